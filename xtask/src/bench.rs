//! `cargo xtask bench l4`: pod-to-pod across two lab nodes, the plain path (two
//! pods outside the mesh) against the mesh (two captured pods), same run, same
//! nodes. Prints throughput, request latency, connection latency, the ratios,
//! and ztunnel's memory idle and holding 1 000 connections.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use weft_tests::apps::{self, App};
use weft_tests::lab::LabPod;
use weft_tests::{Lab, LabOptions};

use crate::lab::scenario;
use crate::util::{build_bins, ensure_tools, require_root};

const THROUGHPUT_SECONDS: &str = "5";
const RR_ROUNDS: usize = 20_000;
const CRR_ROUNDS: usize = 2_000;
const HELD_CONNECTIONS: usize = 1_000;
const MESSAGE: usize = 64;

struct PathResult {
    gbps: f64,
    rr: Vec<Duration>,
    crr: Vec<Duration>,
}

/// The controller's push benchmark (`controller/benches/push.rs`), optimized.
pub fn controller() -> Result<()> {
    crate::util::run(
        &crate::util::cargo(),
        &["bench", "-p", "weft-controller", "--bench", "push"],
    )
}

pub fn l4() -> Result<()> {
    require_root("cargo xtask bench l4")?;
    ensure_tools(&[("iperf3", "iperf3")])?;
    raise_fd_limit();
    let bins = build_bins(true)?;
    let mut opts = LabOptions::new("bench", &scenario("l4")?);
    opts.bin_dir = bins;
    let lab = Lab::up(opts)?;
    let plain = (lab.pod("legacy/outsider"), lab.pod("legacy/plain"));
    let mesh = (lab.pod("shop/client"), lab.pod("shop/web-1"));
    let _echo_plain = apps::serve(plain.1, 7000, App::Echo)?;
    let _echo_mesh = apps::serve(mesh.1, 7000, App::Echo)?;

    let idle = (rss(&lab, "node-1")?, rss(&lab, "node-2")?);
    println!("\nbench l4: release ztunnel, 2 nodes, pod -> pod across nodes");
    println!(
        "  plain = legacy/outsider -> legacy/plain (no mesh); mesh = shop/client -> shop/web-1 (eBPF capture + HBONE mTLS)\n"
    );
    let p = measure(plain.0, plain.1)?;
    let m = measure(mesh.0, mesh.1)?;
    let held = hold_connections(&lab, mesh.0, mesh.1)?;

    let row = |name: &str, plain: f64, mesh: f64, unit: &str, ratio: String| {
        println!("  {name:<28} {plain:>10.1} {unit:<7} {mesh:>10.1} {unit:<7} {ratio}");
    };
    println!("  {:<28} {:>18} {:>18} mesh vs plain", "", "plain", "mesh");
    row(
        "throughput",
        p.gbps,
        m.gbps,
        "Gbit/s",
        format!("{:.2}x", m.gbps / p.gbps),
    );
    for (name, pv, mv) in [
        ("request/response", &p.rr, &m.rr),
        ("connect+request+close", &p.crr, &m.crr),
    ] {
        for q in [50.0, 99.0] {
            let (a, b) = (pct(pv, q), pct(mv, q));
            row(
                &format!("{name} p{q:.0}"),
                a,
                b,
                "us",
                format!("+{:.0} us ({:.2}x)", b - a, b / a),
            );
        }
    }
    println!(
        "\n  ztunnel RSS idle:                          node-1 {:.1} MiB, node-2 {:.1} MiB",
        idle.0, idle.1
    );
    println!(
        "  ztunnel RSS holding {HELD_CONNECTIONS} mesh connections:     node-1 {:.1} MiB, node-2 {:.1} MiB",
        held.0, held.1
    );
    println!(
        "\n  rounds: throughput {THROUGHPUT_SECONDS}s (iperf3), request/response {RR_ROUNDS} x {MESSAGE} B on one connection, connect+request+close {CRR_ROUNDS}"
    );
    Ok(())
}

fn measure(client: &LabPod, server: &LabPod) -> Result<PathResult> {
    let gbps = iperf(client, server)?;
    let dst = SocketAddr::new(server.ip.into(), 7000);
    let rr = apps::client(client, dst, |mut c| {
        c.set_nodelay(true)?;
        let msg = [7u8; MESSAGE];
        let mut back = [0u8; MESSAGE];
        let mut out = Vec::with_capacity(RR_ROUNDS);
        for i in 0..RR_ROUNDS + 1000 {
            let t = Instant::now();
            c.write_all(&msg)?;
            c.read_exact(&mut back)?;
            if i >= 1000 {
                out.push(t.elapsed());
            }
        }
        Ok(out)
    })?;
    let crr = client.netns.run(move || {
        let msg = [7u8; MESSAGE];
        let mut back = [0u8; MESSAGE];
        let mut out = Vec::with_capacity(CRR_ROUNDS);
        for _ in 0..CRR_ROUNDS {
            let t = Instant::now();
            let mut c = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
            c.set_nodelay(true)?;
            c.write_all(&msg)?;
            c.read_exact(&mut back)?;
            drop(c);
            out.push(t.elapsed());
        }
        Ok(out)
    })?;
    Ok(PathResult { gbps, rr, crr })
}

fn iperf(client: &LabPod, server: &LabPod) -> Result<f64> {
    let mut srv = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            server.netns.name(),
            "iperf3",
            "-s",
            "-1",
            "-p",
            "5201",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting iperf3 server")?;
    std::thread::sleep(Duration::from_millis(300));
    let out = client.netns.exec_output(
        "iperf3",
        &[
            "-c",
            &server.ip.to_string(),
            "-p",
            "5201",
            "-t",
            THROUGHPUT_SECONDS,
            "-J",
        ],
    )?;
    let _ = srv.wait();
    if !out.status.success() {
        bail!("iperf3 failed: {}", String::from_utf8_lossy(&out.stdout));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 output has no end.sum_received")?;
    Ok(bps / 1e9)
}

/// Opens and holds connections through the mesh; returns both ztunnels' RSS.
fn hold_connections(lab: &Lab, client: &LabPod, server: &LabPod) -> Result<(f64, f64)> {
    let dst = SocketAddr::new(server.ip.into(), 7000);
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = client.netns.spawn(move || {
        let mut conns = Vec::with_capacity(HELD_CONNECTIONS);
        for _ in 0..HELD_CONNECTIONS {
            let mut c = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
            c.write_all(b"x")?;
            let mut b = [0u8; 1];
            c.read_exact(&mut b)?;
            conns.push(c);
        }
        let _ = ready_tx.send(());
        let _ = rx.recv();
        Ok(())
    })?;
    ready_rx
        .recv_timeout(Duration::from_secs(120))
        .context("opening the held connections")?;
    std::thread::sleep(Duration::from_millis(500));
    let held = (rss(lab, "node-1")?, rss(lab, "node-2")?);
    let _ = tx.send(());
    handle
        .join()
        .map_err(|_| anyhow::anyhow!("holder panicked"))??;
    Ok(held)
}

fn rss(lab: &Lab, node: &str) -> Result<f64> {
    let pid = lab.ztunnel_pid(node).context("no ztunnel pid")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")?;
    Ok(kb / 1024.0)
}

fn pct(samples: &[Duration], q: f64) -> f64 {
    let mut v: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    v.sort_by(f64::total_cmp);
    let i = ((q / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[i.min(v.len() - 1)]
}

fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
