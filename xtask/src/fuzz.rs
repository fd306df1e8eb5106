//! `cargo xtask fuzz TARGET|all --secs N`: builds the fuzz targets in `fuzz/`
//! with libFuzzer's coverage instrumentation (the flags cargo-fuzz passes,
//! all stable rustc options; no sanitizer, so no nightly: the code under
//! test forbids `unsafe`, and panics are what we hunt) and runs each for N
//! seconds from its seeds. A crash fails the command and leaves its input in
//! `fuzz/artifacts/TARGET/`.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::util::{cargo, root};

pub const TARGETS: [&str; 3] = ["hbone_headers", "xds_decode", "manifests"];

/// The instrumentation cargo-fuzz asks of rustc for libFuzzer.
const RUSTFLAGS: &str = "-Cpasses=sancov-module \
    -Cllvm-args=-sanitizer-coverage-level=4 \
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
    -Cllvm-args=-sanitizer-coverage-pc-table \
    -Cllvm-args=-sanitizer-coverage-trace-compares \
    --cfg fuzzing";

pub fn run(args: &[&str]) -> Result<()> {
    let (target, secs) = match args {
        [target, "--secs", secs] => (*target, secs.parse::<u64>().context("--secs N")?),
        [target] => (*target, 60),
        _ => bail!("usage: cargo xtask fuzz TARGET|all [--secs N]"),
    };
    let targets: Vec<&str> = match target {
        "all" => TARGETS.to_vec(),
        t if TARGETS.contains(&t) => vec![t],
        t => bail!("unknown fuzz target {t:?}; targets: {}", TARGETS.join(", ")),
    };
    let dir = root().join("fuzz");
    // With --target, RUSTFLAGS reach only the targets, not build scripts and
    // proc macros (which must not be instrumented), as cargo-fuzz does it.
    let triple = host_triple()?;
    let mut build = Command::new(cargo());
    build
        .args(["build", "--release", "--bins", "--target", &triple])
        .arg("--manifest-path")
        .arg(dir.join("Cargo.toml"))
        .env("RUSTFLAGS", RUSTFLAGS)
        .env_remove("RUSTC_WRAPPER");
    eprintln!(
        "+ RUSTFLAGS=… cargo build --release --target {triple} --manifest-path fuzz/Cargo.toml"
    );
    let status = build.status().context("running cargo")?;
    if !status.success() {
        bail!("building the fuzz targets failed");
    }
    let bins = dir.join("target").join(&triple).join("release");
    for t in targets {
        fuzz_one(&dir, &bins, t, secs)?;
    }
    Ok(())
}

/// The host triple of the toolchain in use.
fn host_triple() -> Result<String> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(rustc)
        .arg("-vV")
        .output()
        .context("running rustc -vV")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_string)
        .context("rustc -vV printed no host")
}

fn fuzz_one(dir: &Path, bins: &Path, target: &str, secs: u64) -> Result<()> {
    let corpus = dir.join("corpus").join(target);
    let artifacts = dir.join("artifacts").join(target);
    std::fs::create_dir_all(&corpus)?;
    std::fs::create_dir_all(&artifacts)?;
    let seeds = dir.join("seeds").join(target);
    let mut cmd = Command::new(bins.join(target));
    cmd.arg(format!("-max_total_time={secs}"))
        .arg("-rss_limit_mb=2048")
        .arg("-max_len=65536")
        .arg("-print_final_stats=1")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg(&corpus);
    if seeds.is_dir() {
        cmd.arg(&seeds);
    }
    eprintln!("+ fuzz {target} for {secs}s");
    let status = cmd.status().with_context(|| format!("running {target}"))?;
    if !status.success() {
        bail!(
            "fuzz target {target} found a crash: its input is in {}",
            artifacts.display()
        );
    }
    Ok(())
}
