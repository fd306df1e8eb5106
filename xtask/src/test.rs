//! `cargo xtask test`: everything CI checks, in the order that fails fastest;
//! the fuzz targets last, for a few seconds each.

use anyhow::Result;

use crate::util::{self, cargo, ensure_tools, require_root};

pub fn run(extra: &[&str]) -> Result<()> {
    require_root("cargo xtask test")?;
    ensure_tools(&[
        ("ip", "iproute2"),
        ("tcpdump", "tcpdump"),
        ("curl", "curl"),
        ("clang", "clang"),
        ("llvm-strip", "llvm"),
        // libFuzzer (the fuzz targets) is C++.
        ("c++", "g++"),
        // The echo server of the capture-listener flood test.
        ("python3", "python3"),
    ])?;
    let cargo = cargo();
    util::run(&cargo, &["fmt", "--all", "--", "--check"])?;
    crate::ebpf::build(true)?;
    crate::proto::run(true)?;
    crate::chart::run()?;
    util::run(
        &cargo,
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    let bins = crate::util::build_bins(false)?;
    // Unit and component tests: everything but the lab.
    util::run(&cargo, &["test", "--workspace", "--exclude", "weft-tests"])?;
    // The lab tests run one at a time: each starts processes and moves
    // hundreds of megabytes, and the machine has two cores.
    let bin_dir = bins.to_string_lossy().into_owned();
    let mut args = vec!["test", "-p", "weft-tests", "--", "--test-threads=1"];
    args.extend(extra);
    eprintln!("+ WEFT_BIN_DIR={bin_dir} {cargo} {}", args.join(" "));
    let status = util::command(&cargo)
        .args(&args)
        .env("WEFT_BIN_DIR", &bin_dir)
        .status()?;
    anyhow::ensure!(status.success(), "end-to-end tests failed");
    // Each fuzz target briefly: a crash found fails CI with its input kept.
    crate::fuzz::run(&["all", "--secs", FUZZ_SECONDS])
}

/// Seconds each fuzz target runs in `cargo xtask test`.
const FUZZ_SECONDS: &str = "15";
