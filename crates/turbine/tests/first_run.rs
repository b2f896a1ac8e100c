//! `turbine serve` on a fresh machine that lacks what fetching the default model needs: each
//! case fails at once with one line saying what to install, and leaves the cache clean.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

const BIN: &str = env!("CARGO_BIN_EXE_turbine");

/// Runs `turbine serve` with an empty model cache and `env` set, and returns the first line
/// of what it printed after checking that it failed and left no download behind.
fn serve_fails(env: &[(&str, &std::ffi::OsStr)]) -> Result<String> {
    let cache = tempfile::tempdir()?;
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--port", "0", "--model-cache-dir"])
        .arg(cache.path());
    for (key, value) in env {
        cmd.env(key, value);
    }
    let out = cmd.output()?;
    let stderr = String::from_utf8(out.stderr)?;
    assert!(!out.status.success(), "serve succeeded: {stderr}");
    let first = stderr
        .lines()
        .find(|l| l.starts_with("turbine:"))
        .with_context(|| format!("no error line in {stderr:?}"))?;
    assert!(first.contains("--model PATH"), "{first:?} should name the way around");
    assert_eq!(
        leftovers(cache.path())?,
        Vec::<String>::new(),
        "the cache holds leftovers"
    );
    Ok(first.to_owned())
}

/// Files left anywhere under `dir` (directories the fetch created for its output may stay).
fn leftovers(dir: &Path) -> Result<Vec<String>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            found.extend(leftovers(&path)?);
        } else {
            found.push(path.display().to_string());
        }
    }
    Ok(found)
}

#[test]
fn without_python_it_says_to_install_python_with_pip() -> Result<()> {
    let empty = tempfile::tempdir()?;
    let first = serve_fails(&[("PATH", empty.path().as_os_str())])?;
    assert!(first.contains("python3 is not on PATH"), "{first:?}");
    assert!(first.contains("python3-pip"), "{first:?}");
    Ok(())
}

#[test]
fn without_pip_it_says_to_install_pip() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let venv = dir.path().join("venv");
    // A real Python 3 that lacks pip, as a minimal install has it.
    let made = Command::new("python3")
        .args(["-m", "venv", "--without-pip"])
        .arg(&venv)
        .status()?;
    assert!(made.success(), "python3 -m venv --without-pip failed");
    let first = serve_fails(&[("PATH", venv.join("bin").as_os_str())])?;
    assert!(first.contains("python3 has no pip module"), "{first:?}");
    Ok(())
}

#[test]
fn without_the_package_index_it_says_so() -> Result<()> {
    // A loopback port that was just free: nothing listens there, so pip is refused at once.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let index = format!("http://127.0.0.1:{port}/simple/");
    let no_links = tempfile::tempdir()?;
    let first = serve_fails(&[
        ("PIP_INDEX_URL", index.as_ref()),
        ("PIP_FIND_LINKS", no_links.path().as_os_str()),
        ("PIP_CONFIG_FILE", "/dev/null".as_ref()),
        ("PIP_NO_CACHE_DIR", "1".as_ref()),
        ("PIP_RETRIES", "1".as_ref()),
    ])?;
    assert!(first.contains("cannot reach the Python package index"), "{first:?}");
    Ok(())
}
