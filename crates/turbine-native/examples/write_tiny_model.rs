//! Writes the small random-weight Llama that the tests generate (byte-level `tokenizer.json`,
//! chat template, safetensors) to a directory: a model and tokenizer for trying Turbine, and a
//! tokenizer that other tools (aiperf, transformers) load offline.
//!
//! `cargo run --release -p turbine-native --example write_tiny_model -- DIR`

fn main() -> std::process::ExitCode {
    let Some(dir) = std::env::args_os().nth(1) else {
        eprintln!("usage: write_tiny_model DIR");
        return std::process::ExitCode::FAILURE;
    };
    let dir = std::path::PathBuf::from(dir);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("write_tiny_model: {}: {e}", dir.display());
        return std::process::ExitCode::FAILURE;
    }
    match turbine_native::tiny::write_tiny_model(&dir, &turbine_native::tiny::TinySpec::default()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("write_tiny_model: {}: {e}", dir.display());
            std::process::ExitCode::FAILURE
        }
    }
}
