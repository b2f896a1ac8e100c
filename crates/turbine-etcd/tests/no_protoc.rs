//! The workspace builds without a protobuf compiler: no crate that runs or ships one is in
//! the lock file, so no build script can reach for `protoc` on the machine's `PATH`.

const LOCK: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../Cargo.lock"));

#[test]
fn no_protobuf_code_generator_is_built() {
    let packages: Vec<&str> = LOCK
        .lines()
        .filter_map(|line| line.strip_prefix("name = \""))
        .filter_map(|rest| rest.strip_suffix('"'))
        .collect();
    assert!(
        packages.contains(&"prost"),
        "the lock file was not read: {} packages",
        packages.len()
    );
    // The crates through which a build gets or runs protoc, or generates code from .proto files.
    let generator = |name: &str| {
        matches!(
            name,
            "prost-build" | "tonic-build" | "tonic-prost-build" | "protobuf-src" | "protox"
        ) || name.starts_with("protoc-bin")
            || name.starts_with("protobuf-codegen")
    };
    let generators: Vec<&&str> = packages.iter().filter(|name| generator(name)).collect();
    assert!(generators.is_empty(), "code generators in Cargo.lock: {generators:?}");
}
