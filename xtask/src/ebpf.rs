//! `cargo xtask ebpf`: compiles the C programs in `ebpf/bpf/` with clang.
//!
//! The object is committed so a plain `cargo build` needs no clang; `--check`
//! (run by `cargo xtask test`) fails when the committed object is stale.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::util::{ensure_tools, root};

const SOURCES: &[&str] = &["capture"];

pub fn build(check: bool) -> Result<()> {
    ensure_tools(&[("clang", "clang"), ("llvm-strip", "llvm")])?;
    if !std::path::Path::new("/usr/include/bpf/bpf_helpers.h").exists() {
        ensure_tools(&[("no-such-tool-libbpf", "libbpf-dev")])?;
    }
    let dir = root().join("ebpf/bpf");
    let arch_include = format!("/usr/include/{}-linux-gnu", std::env::consts::ARCH);
    for name in SOURCES {
        let src = format!("{name}.bpf.c");
        let obj = format!("{name}.bpf.o");
        let out = if check {
            format!("{name}.bpf.o.check")
        } else {
            obj.clone()
        };
        // Relative paths and a fixed compilation dir keep the object
        // byte-identical wherever the tree is checked out.
        let status = Command::new("clang")
            .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
            .arg(format!("-I{arch_include}"))
            .args(["-fdebug-compilation-dir=.", "-c", &src, "-o", &out])
            .current_dir(&dir)
            .status()
            .context("running clang")?;
        if !status.success() {
            bail!("clang failed on {src}");
        }
        // Keep BTF (aya needs it), drop DWARF.
        let status = Command::new("llvm-strip")
            .args(["-g", &out])
            .current_dir(&dir)
            .status()
            .context("running llvm-strip")?;
        if !status.success() {
            bail!("llvm-strip failed on {out}");
        }
        if check {
            let fresh = std::fs::read(dir.join(&out))?;
            let committed = std::fs::read(dir.join(&obj))?;
            let _ = std::fs::remove_file(dir.join(&out));
            if fresh != committed {
                bail!("ebpf/bpf/{obj} is stale: run `cargo xtask ebpf` and commit it");
            }
            eprintln!("ebpf/bpf/{obj} is fresh");
        } else {
            eprintln!("built ebpf/bpf/{obj}");
        }
    }
    Ok(())
}
