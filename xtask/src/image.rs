//! `cargo xtask image`: the three images from `Containerfile`, tagged with
//! the chart's appVersion, so the chart's default values name them:
//! `weft/controller`, `weft/ztunnel`, `weft/waypoint`.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::util::{have, root};

const COMPONENTS: [&str; 3] = ["controller", "ztunnel", "waypoint"];

pub fn run() -> Result<()> {
    let Some(engine) = ["podman", "docker"].into_iter().find(|e| have(e)) else {
        bail!(
            "neither docker nor podman is installed here: no image was built. \
             Install one of them and run `cargo xtask image` again."
        );
    };
    // docker needs its daemon; podman has none.
    let info = Command::new(engine).arg("info").output()?;
    if !info.status.success() {
        bail!(
            "{engine} is installed but cannot build here ({}): no image was built",
            String::from_utf8_lossy(&info.stderr)
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("no daemon")
                .trim()
        );
    }
    let tag = app_version()?;
    for c in COMPONENTS {
        let name = format!("weft/{c}:{tag}");
        eprintln!("+ {engine} build --target {c} -t {name} .");
        let ok = Command::new(engine)
            .current_dir(root())
            .args([
                "build",
                "-f",
                "Containerfile",
                "--target",
                c,
                "-t",
                &name,
                ".",
            ])
            .status()
            .with_context(|| format!("{engine} build"))?
            .success();
        if !ok {
            bail!("{engine} build of {name} failed");
        }
    }
    println!("built weft/{{{}}}:{tag}", COMPONENTS.join(","));
    Ok(())
}

/// The chart's appVersion: the tag its values default to.
pub fn app_version() -> Result<String> {
    let chart = std::fs::read_to_string(root().join("charts/weft/Chart.yaml"))?;
    chart
        .lines()
        .find_map(|l| l.strip_prefix("appVersion:"))
        .map(|v| v.trim().trim_matches('"').to_string())
        .context("charts/weft/Chart.yaml has no appVersion")
}
