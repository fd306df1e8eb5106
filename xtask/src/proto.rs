//! `cargo xtask proto`: generates Rust from our own `.proto` files
//! (`xds/proto/`) into `xds/src/generated/`, with protox (a protobuf
//! compiler in Rust, so no protoc) and prost-build, formatted by rustfmt.
//!
//! The output is committed so a plain `cargo build` generates nothing;
//! `--check` (run by `cargo xtask test`) fails when it is stale.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::util::root;

pub fn run(check: bool) -> Result<()> {
    let root = root();
    let proto_dir = root.join("xds/proto");
    let generated = root.join("xds/src/generated");
    let mut files = Vec::new();
    find_protos(&proto_dir, &mut files)?;
    files.sort();
    let fds = protox::compile(&files, [&proto_dir]).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let out = std::env::temp_dir().join(format!("weft-proto-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    let result = generate(fds, &out).and_then(|()| compare_or_copy(&out, &generated, check));
    let _ = std::fs::remove_dir_all(&out);
    result
}

fn find_protos(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| dir.display().to_string())? {
        let path = entry?.path();
        if path.is_dir() {
            find_protos(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path);
        }
    }
    Ok(())
}

fn generate(fds: prost_types::FileDescriptorSet, out: &Path) -> Result<()> {
    prost_build::Config::new()
        .out_dir(out)
        // Deterministic encoding: versions are hashes of the bytes.
        .btree_map(["."])
        .compile_fds(fds)
        .context("prost-build")?;
    for entry in std::fs::read_dir(out)? {
        let path = entry?.path();
        let status = Command::new("rustfmt")
            .args(["--edition", "2024"])
            .arg(&path)
            .status()
            .context("running rustfmt")?;
        if !status.success() {
            bail!("rustfmt failed on {}", path.display());
        }
    }
    Ok(())
}

fn compare_or_copy(out: &Path, generated: &Path, check: bool) -> Result<()> {
    let mut names: Vec<_> = std::fs::read_dir(out)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    names.sort();
    for name in names {
        let fresh = std::fs::read(out.join(&name))?;
        let target = generated.join(&name);
        let shown = format!("xds/src/generated/{}", name.to_string_lossy());
        if check {
            if std::fs::read(&target).ok().as_deref() != Some(&fresh[..]) {
                bail!("{shown} is stale: run `cargo xtask proto` and commit it");
            }
            eprintln!("{shown} is fresh");
        } else {
            std::fs::create_dir_all(generated)?;
            std::fs::write(&target, fresh)?;
            eprintln!("wrote {shown}");
        }
    }
    Ok(())
}
