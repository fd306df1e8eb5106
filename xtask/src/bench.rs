//! `cargo xtask bench l4`: pod-to-pod across two lab nodes, the plain path (two
//! pods outside the mesh) against the mesh (two captured pods), same run, same
//! nodes. Prints throughput with ztunnel's CPU per GB, request latency,
//! connection latency, a sustained connection-churn phase in 10 s windows,
//! the ratios, and ztunnel's memory idle and holding 10 000 connections.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use weft_tests::apps::{self, App};
use weft_tests::lab::LabPod;
use weft_tests::{Lab, LabOptions};

use crate::lab::scenario;
use crate::util::{build_bins, ensure_tools, require_root};

const THROUGHPUT_SECONDS: &str = "5";
/// Throughput runs per path: the median is reported, so one run disturbed by
/// the host (this is a shared 2-core VM) does not decide the figure.
const THROUGHPUT_RUNS: usize = 3;
const RR_ROUNDS: usize = 20_000;
const CRR_ROUNDS: usize = 2_000;
const HELD_CONNECTIONS: usize = 10_000;
const MESSAGE: usize = 64;
/// Sustained connect+request+close: windows of this long, so a rate that
/// decays (port exhaustion, leaks) shows.
const CHURN_WINDOW: Duration = Duration::from_secs(10);
const CHURN_WINDOWS_PLAIN: usize = 2;
const CHURN_WINDOWS_MESH: usize = 6;
/// Throughput runs of each build when comparing with a baseline build,
/// unless `--rounds` says otherwise.
pub const BASELINE_ROUNDS: usize = 5;
/// The unmeasured run after each restart.
const WARM_UP_SECONDS: &str = "1";

struct PathResult {
    /// Each throughput run, in the order run.
    runs: Vec<Throughput>,
    rr: Vec<Duration>,
    crr: Vec<Duration>,
}

struct Throughput {
    gbps: f64,
    /// Bytes iperf3 moved.
    bytes: f64,
    /// CPU seconds each ztunnel (node-1, node-2) spent meanwhile.
    cpu: (f64, f64),
}

impl Throughput {
    /// Both ztunnels' CPU seconds per GB moved.
    fn cpu_per_gb(&self) -> f64 {
        (self.cpu.0 + self.cpu.1) / (self.bytes / 1e9)
    }
}

/// The middle element of `runs` by `key`.
fn median_by<T>(runs: &[T], key: impl Fn(&T) -> f64) -> &T {
    let mut sorted: Vec<&T> = runs.iter().collect();
    sorted.sort_by(|a, b| key(a).total_cmp(&key(b)));
    sorted[sorted.len() / 2]
}

/// The controller's push benchmark (`controller/benches/push.rs`), optimized.
pub fn controller() -> Result<()> {
    crate::util::run(
        &crate::util::cargo(),
        &["bench", "-p", "weft-controller", "--bench", "push"],
    )
}

/// What `cargo xtask bench l4` runs.
pub enum L4 {
    /// Every phase.
    Full,
    /// Throughput, latency and CPU per GB only; with a `baseline` ztunnel
    /// binary, then CPU per GB of both builds, that many rounds each (see
    /// [`against_baseline`]).
    Throughput { baseline: Option<(PathBuf, usize)> },
}

pub fn l4(mode: L4) -> Result<()> {
    require_root("cargo xtask bench l4")?;
    let baseline = match &mode {
        L4::Throughput {
            baseline: Some((bin, rounds)),
        } => Some((executable(bin)?, *rounds)),
        _ => None,
    };
    ensure_tools(&[("iperf3", "iperf3")])?;
    // The hold phase keeps 10 000 client sockets in this process.
    weft_runtime::raise_fd_limit();
    let bins = build_bins(true)?;
    let mut opts = LabOptions::new("bench", &scenario("l4")?);
    opts.bin_dir = bins;
    let mut lab = Lab::up(opts)?;
    // Every namespace that opens connections in the churn phase: the client
    // pods and the nodes (ztunnel connects from pod addresses there). Without
    // these the bench measures TIME_WAIT exhaustion, not the mesh.
    let openers = ["legacy/outsider", "shop/client"]
        .iter()
        .map(|p| &lab.pod(p).netns)
        .chain(lab.nodes().map(|n| &n.netns));
    for ns in openers {
        ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        ns.sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;
    }
    let pod = |name| lab.pod(name).clone();
    let (plain, mesh) = (
        (pod("legacy/outsider"), pod("legacy/plain")),
        (pod("shop/client"), pod("shop/web-1")),
    );
    let (plain, mesh) = ((&plain.0, &plain.1), (&mesh.0, &mesh.1));
    let _echo_plain = apps::serve(plain.1, 7000, App::Echo)?;
    let _echo_mesh = apps::serve(mesh.1, 7000, App::Echo)?;
    let _echo_held = EchoProcess::start(mesh.1, 7001)?;

    let idle = (rss(&lab, "node-1")?, rss(&lab, "node-2")?);
    println!("\nbench l4: release ztunnel, 2 nodes, pod -> pod across nodes");
    println!(
        "  plain = legacy/outsider -> legacy/plain (no mesh); mesh = shop/client -> shop/web-1 (eBPF capture + HBONE mTLS)\n"
    );
    let p = measure(&lab, plain.0, plain.1)?;
    let m = measure(&lab, mesh.0, mesh.1)?;

    let row = |name: &str, plain: f64, mesh: f64, unit: &str, ratio: String| {
        println!("  {name:<28} {plain:>10.1} {unit:<7} {mesh:>10.1} {unit:<7} {ratio}");
    };
    println!("  {:<28} {:>18} {:>18} mesh vs plain", "", "plain", "mesh");
    let gbps = |r: &PathResult| median_by(&r.runs, |t| t.gbps).gbps;
    row(
        "throughput (median)",
        gbps(&p),
        gbps(&m),
        "Gbit/s",
        format!("{:.2}x", gbps(&m) / gbps(&p)),
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
    let mid = median_by(&m.runs, Throughput::cpu_per_gb);
    let gb = mid.bytes / 1e9;
    let each: Vec<String> = m
        .runs
        .iter()
        .map(|t| format!("{:.2}", t.cpu_per_gb()))
        .collect();
    println!(
        "\n  ztunnel CPU per GB (mesh throughput phase, {THROUGHPUT_RUNS} runs: {}):\n    median run: node-1 {:.2} s, node-2 {:.2} s, both {:.2} CPU-s/GB (goal <= 1.8)",
        each.join(", "),
        mid.cpu.0 / gb,
        mid.cpu.1 / gb,
        mid.cpu_per_gb()
    );
    if let L4::Throughput { .. } = mode {
        if let Some((baseline, rounds)) = baseline {
            against_baseline(&mut lab, &baseline, rounds)?;
        }
        return Ok(());
    }
    let churn_plain = churn(plain.0, plain.1, CHURN_WINDOWS_PLAIN)?;
    let churn_mesh = churn(mesh.0, mesh.1, CHURN_WINDOWS_MESH)?;
    let direct = churn_plain.iter().sum::<f64>() / churn_plain.len() as f64;
    println!(
        "\n  sustained connect+request+close, {}s windows (plain mean {direct:.0}/s):",
        CHURN_WINDOW.as_secs()
    );
    for (i, rate) in churn_plain.iter().enumerate() {
        println!("    plain window {}: {rate:>8.0}/s", i + 1);
    }
    for (i, rate) in churn_mesh.iter().enumerate() {
        println!(
            "    mesh  window {}: {rate:>8.0}/s  {:.2}x plain",
            i + 1,
            rate / direct
        );
    }
    let mesh_mean = churn_mesh.iter().sum::<f64>() / churn_mesh.len() as f64;
    let (first, last) = (churn_mesh[0], churn_mesh[churn_mesh.len() - 1]);
    println!(
        "    mesh whole phase {mesh_mean:.0}/s = {:.2}x plain (goal >= 0.27); last window {:.2}x the first (goal >= 0.9)",
        mesh_mean / direct,
        last / first
    );
    let held = hold_connections(&lab, mesh.0, mesh.1)?;
    println!(
        "\n  ztunnel RSS idle:                          node-1 {:.1} MiB, node-2 {:.1} MiB",
        idle.0, idle.1
    );
    println!(
        "  ztunnel RSS holding {HELD_CONNECTIONS} mesh connections:    node-1 {:.1} MiB, node-2 {:.1} MiB",
        held.0, held.1
    );
    println!(
        "  RSS per held connection:                   node-1 {:.1} KiB, node-2 {:.1} KiB (goal <= 8)",
        (held.0 - idle.0) * 1024.0 / HELD_CONNECTIONS as f64,
        (held.1 - idle.1) * 1024.0 / HELD_CONNECTIONS as f64
    );
    println!(
        "\n  rounds: throughput {THROUGHPUT_RUNS} x {THROUGHPUT_SECONDS}s (iperf3), request/response {RR_ROUNDS} x {MESSAGE} B on one connection, connect+request+close {CRR_ROUNDS}"
    );
    Ok(())
}

/// Connect+request+close in a loop for `windows` × [`CHURN_WINDOW`]; the
/// rate of each window.
fn churn(client: &LabPod, server: &LabPod, windows: usize) -> Result<Vec<f64>> {
    let dst = SocketAddr::new(server.ip.into(), 7000);
    client.netns.run(move || {
        let msg = [7u8; MESSAGE];
        let mut back = [0u8; MESSAGE];
        let mut rates = Vec::with_capacity(windows);
        for _ in 0..windows {
            let start = Instant::now();
            let mut n = 0u64;
            while start.elapsed() < CHURN_WINDOW {
                let mut c = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
                c.set_nodelay(true)?;
                c.write_all(&msg)?;
                c.read_exact(&mut back)?;
                drop(c);
                n += 1;
            }
            rates.push(n as f64 / start.elapsed().as_secs_f64());
        }
        Ok(rates)
    })
}

/// User plus system CPU seconds of `pid` so far.
pub(crate) fn cpu_seconds(pid: u32) -> Result<f64> {
    let (user, system) = weft_runtime::cpu_seconds(pid)?;
    Ok(user + system)
}

/// The baseline binary as an absolute path, checked before the lab starts
/// (a bare name would be looked up on PATH by `ip netns exec`).
fn executable(bin: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::fs::canonicalize(bin)
        .with_context(|| format!("baseline ztunnel {}", bin.display()))?;
    let meta = std::fs::metadata(&path)?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        bail!(
            "baseline ztunnel {} is not an executable file",
            path.display()
        );
    }
    Ok(path)
}

/// The pids of both nodes' ztunnels.
fn ztunnel_pids(lab: &Lab) -> Result<(u32, u32)> {
    Ok((
        lab.ztunnel_pid("node-1").context("no ztunnel on node-1")?,
        lab.ztunnel_pid("node-2").context("no ztunnel on node-2")?,
    ))
}

fn measure(lab: &Lab, client: &LabPod, server: &LabPod) -> Result<PathResult> {
    let pids = ztunnel_pids(lab)?;
    let mut runs = Vec::with_capacity(THROUGHPUT_RUNS);
    for _ in 0..THROUGHPUT_RUNS {
        runs.push(throughput(pids, client, server)?);
    }
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
    Ok(PathResult { runs, rr, crr })
}

/// One iperf3 run, with the CPU the ztunnels `pids` spent meanwhile.
fn throughput(pids: (u32, u32), client: &LabPod, server: &LabPod) -> Result<Throughput> {
    let before = (cpu_seconds(pids.0)?, cpu_seconds(pids.1)?);
    let (gbps, bytes) = iperf(client, server, THROUGHPUT_SECONDS)?;
    let cpu = (
        cpu_seconds(pids.0)? - before.0,
        cpu_seconds(pids.1)? - before.1,
    );
    Ok(Throughput { gbps, bytes, cpu })
}

/// CPU per GB of the built ztunnel against `baseline` (another build's
/// binary), in one lab: both nodes' ztunnels are replaced by a rolling
/// restart before each run, and the two builds take turns, so that a host
/// that is slower for a while weighs on both alike. Each measured run
/// follows a short unmeasured one, so neither build's figure holds its
/// first connection's handshake. The baseline must hand over as this build
/// does (SO_REUSEPORT listeners, the "ztunnel ready" log line, the same
/// pinned capture). Ends with this build's ztunnels running.
fn against_baseline(lab: &mut Lab, baseline: &Path, rounds: usize) -> Result<()> {
    let (client, server) = (
        lab.pod("shop/client").clone(),
        lab.pod("shop/web-1").clone(),
    );
    let mut built = Vec::with_capacity(rounds);
    let mut base = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let mut turns = [(true, Some(baseline.to_path_buf())), (false, None)];
        if round % 2 == 1 {
            turns.reverse();
        }
        for (is_base, bin) in turns {
            roll(lab, bin)?;
            iperf(&client, &server, WARM_UP_SECONDS)?;
            let run = throughput(ztunnel_pids(lab)?, &client, &server)?;
            if is_base { &mut base } else { &mut built }.push(run);
        }
    }
    if rounds.is_multiple_of(2) {
        // The last round ran this build first: its last turn was the
        // baseline's.
        roll(lab, None)?;
    }
    let list = |runs: &[Throughput]| {
        runs.iter()
            .map(|t| format!("{:.2}", t.cpu_per_gb()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (b, c) = (
        median_by(&base, Throughput::cpu_per_gb).cpu_per_gb(),
        median_by(&built, Throughput::cpu_per_gb).cpu_per_gb(),
    );
    println!(
        "\n  ztunnel CPU per GB against {} ({rounds} runs each, taking turns):",
        baseline.display()
    );
    let gbps = |runs: &[Throughput]| median_by(runs, |t| t.gbps).gbps;
    println!(
        "    baseline:   {}; median {b:.2} CPU-s/GB, {:.1} Gbit/s",
        list(&base),
        gbps(&base)
    );
    println!(
        "    this build: {}; median {c:.2} CPU-s/GB, {:.1} Gbit/s",
        list(&built),
        gbps(&built)
    );
    // Each round's two runs were next to each other in time: their ratio
    // is the least disturbed by the host.
    let pairs: Vec<f64> = built
        .iter()
        .zip(&base)
        .map(|(c, b)| c.cpu_per_gb() / b.cpu_per_gb())
        .collect();
    println!(
        "    this build / baseline: {:.3} (medians); {:.3} (median of the {rounds} rounds' ratios)",
        c / b,
        median_by(&pairs, |r| *r)
    );
    Ok(())
}

/// Replaces both nodes' ztunnels with `bin` (this build's with `None`) by
/// a rolling restart, each old one drained and gone before the next.
fn roll(lab: &mut Lab, bin: Option<PathBuf>) -> Result<()> {
    lab.use_ztunnel_binary(bin);
    for node in ["node-1", "node-2"] {
        let mut old = lab.restart_ztunnel(node)?;
        // Above the default drain deadline (30 s).
        weft_tests::lab::wait_exit(
            &mut old,
            &format!("the old ztunnel on {node}"),
            Duration::from_secs(60),
        )?;
    }
    Ok(())
}

/// Gbit/s and bytes received in a run of `seconds`.
fn iperf(client: &LabPod, server: &LabPod, seconds: &str) -> Result<(f64, f64)> {
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
            seconds,
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
    let bytes = v["end"]["sum_received"]["bytes"]
        .as_f64()
        .context("iperf3 output has no end.sum_received.bytes")?;
    Ok((bps / 1e9, bytes))
}

/// An echo server in a process of its own inside a pod (see
/// [`apps::echo_forever`]); killed on drop.
struct EchoProcess(std::process::Child);

impl EchoProcess {
    fn start(pod: &LabPod, port: u16) -> Result<Self> {
        let exe = std::env::current_exe()?;
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", pod.netns.name()])
            .arg(exe)
            .args(["__echo-forever", &port.to_string()])
            .stdin(std::process::Stdio::null());
        // Gone with us, even on Ctrl-C or a crash.
        weft_tests::lab::die_with_parent(&mut cmd);
        let child = cmd.spawn().context("starting the echo process")?;
        // Wait until it listens.
        let dst = SocketAddr::new(pod.ip.into(), port);
        for _ in 0..100 {
            if pod
                .netns
                .run(move || Ok(TcpStream::connect_timeout(&dst, Duration::from_millis(100))))?
                .is_ok()
            {
                return Ok(EchoProcess(child));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("the echo process did not listen on {dst}")
    }
}

impl Drop for EchoProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Opens and holds connections through the mesh; returns both ztunnels' RSS.
fn hold_connections(lab: &Lab, client: &LabPod, server: &LabPod) -> Result<(f64, f64)> {
    let dst = SocketAddr::new(server.ip.into(), 7001);
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = client.netns.spawn(move || {
        let mut conns = Vec::with_capacity(HELD_CONNECTIONS);
        let opened = (|| -> Result<()> {
            for i in 0..HELD_CONNECTIONS {
                let mut c = TcpStream::connect_timeout(&dst, Duration::from_secs(5))
                    .with_context(|| format!("connection {i}"))?;
                c.write_all(b"x")?;
                let mut b = [0u8; 1];
                c.read_exact(&mut b)?;
                conns.push(c);
            }
            Ok(())
        })();
        let failed = opened.as_ref().err().map(|e| format!("{e:#}"));
        let _ = ready_tx.send(failed);
        let _ = rx.recv();
        opened
    })?;
    match ready_rx.recv_timeout(Duration::from_secs(300)) {
        Ok(None) => {}
        Ok(Some(e)) => bail!("opening the held connections: {e}"),
        Err(e) => bail!("opening the held connections: {e}"),
    }
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

/// `cargo xtask bench restart`: release ztunnels on the lab. For each node, a
/// rolling restart (new process beside the old one, which drains) while a
/// pod opens connections at a fixed rate and an upload runs across it:
/// failed and total connections, bytes intact. Then a crash (SIGKILL) and a
/// cold start: how long captured pods could not connect.
pub fn restart() -> Result<()> {
    require_root("cargo xtask bench restart")?;
    const RATE: u32 = 400;
    const TIME: Duration = Duration::from_secs(10);
    let bins = build_bins(true)?;
    let mut opts = LabOptions::new("bench-restart", &scenario("l4")?);
    opts.bin_dir = bins;
    let mut lab = Lab::up(opts)?;
    let client = lab.pod("shop/client").clone();
    let web = lab.pod("shop/web-1").clone();
    let _echo = apps::serve(&web, 7000, App::Echo)?;
    let _sink = apps::serve(&web, 9000, App::Sink)?;
    let echo = SocketAddr::new(web.ip.into(), 7000);
    let sink = SocketAddr::new(web.ip.into(), 9000);
    println!("\nbench restart: release ztunnel, shop/client (node-1) -> shop/web-1 (node-2)");
    println!(
        "  rolling restart under {RATE} connections/s for {}s and a 4 MB/s upload:",
        TIME.as_secs()
    );
    for node in ["node-1", "node-2"] {
        let r = weft_tests::rollout::restart_under_load(
            &mut lab,
            node,
            &client,
            (echo, sink),
            RATE,
            TIME,
        )?;
        let (churned, uploaded, status) = (r.churn, r.upload, r.old_exit);
        println!(
            "    {node}: {} failed of {} connections; upload {}; old process exited {status}",
            churned.failed.len(),
            churned.ok + churned.failed.len() as u64,
            match uploaded {
                Ok(n) => format!("{} MB intact (SHA-256)", n / (1024 * 1024)),
                Err(e) => format!("FAILED: {e:#}"),
            }
        );
    }
    // A crash and a cold start: the pinned capture drops SYNs meanwhile.
    lab.kill_ztunnel("node-1")?;
    let killed = Instant::now();
    lab.start_ztunnel_again("node-1")?;
    let mut tries = 0u32;
    loop {
        tries += 1;
        let ok = client.netns.run(move || {
            Ok(
                TcpStream::connect_timeout(&echo, Duration::from_millis(200)).is_ok_and(|mut c| {
                    let mut b = [0u8; 4];
                    c.write_all(b"ping").is_ok() && c.read_exact(&mut b).is_ok()
                }),
            )
        })?;
        if ok {
            break;
        }
        if killed.elapsed() > Duration::from_secs(30) {
            bail!("no connection 30 s after the crash");
        }
    }
    println!(
        "  crash (SIGKILL) and cold start of node-1's ztunnel: first good connection {:.0} ms after the kill ({tries} tries)",
        killed.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}
