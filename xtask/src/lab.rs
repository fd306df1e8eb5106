//! `cargo xtask lab up|down|status`: a lab to poke at by hand.

use std::time::Duration;

use anyhow::{Context, Result};
use weft_tests::lab;
use weft_tests::{Lab, LabOptions};

use crate::util::{build_bins, require_root, root};

/// All `*.yaml` of `examples/<scenario>/`, as one multi-document stream.
pub fn scenario(name: &str) -> Result<String> {
    let dir = root().join("examples").join(name);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .with_context(|| format!("no scenario at {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let mut out = String::new();
    for f in files {
        out.push_str(&std::fs::read_to_string(&f)?);
        out.push_str("\n---\n");
    }
    Ok(out)
}

pub fn up(name: &str, release: bool) -> Result<()> {
    require_root("cargo xtask lab up")?;
    let bins = build_bins(release)?;
    let mut opts = LabOptions::new(name, &scenario(name)?);
    opts.bin_dir = bins;
    let lab = Lab::up(opts)?;
    print_lab(&lab);
    println!(
        "\nRun things in a pod:   ip netns exec {}-shop-client curl -s http://10.244.2.10:8080/",
        lab.id()
    );
    println!(
        "ztunnel logs:          {}/ztunnel-<node>.log",
        lab.dir().display()
    );
    println!(
        "Metrics of a node:     ip netns exec {}-node-1 curl -s localhost:15020/metrics",
        lab.id()
    );
    println!("\nThe lab stays up until Ctrl-C (or `cargo xtask lab down`).");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

pub fn print_lab(lab: &Lab) {
    println!("lab {} is up:", lab.id());
    for node in lab.nodes() {
        println!(
            "  {} (underlay {}, netns {})",
            node.name,
            node.underlay_ip,
            node.netns.name()
        );
        for pod in lab.pods().filter(|p| p.node == node.name) {
            println!(
                "    {:<20} {:<13} netns {}",
                format!("{}/{}", pod.namespace, pod.name),
                pod.ip,
                pod.netns.name()
            );
        }
    }
}

pub fn down() -> Result<()> {
    let removed = lab::down_all()?;
    if removed.is_empty() {
        println!("no labs on this host");
    }
    for id in removed {
        println!("removed lab {id}");
    }
    Ok(())
}

pub fn status() -> Result<()> {
    let labs = lab::registered()?;
    if labs.is_empty() {
        println!("no labs on this host");
    }
    for (id, owner, alive) in labs {
        let state = if alive {
            "running"
        } else {
            "stale (owner gone; `lab down` removes it)"
        };
        println!("{id}: owner pid {owner}, {state}");
    }
    Ok(())
}
