//! End-to-end: hostile peers against ztunnel's HBONE listener. Each attack is
//! a real mTLS session with a valid mesh certificate, so it reaches HTTP/2;
//! each test checks that ztunnel stays up, that its memory stays bounded and
//! that a legitimate connection made during the attack gets through.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use weft_hbone::tls::TrustRoots;
use weft_tests::apps::{self, App};
use weft_tests::check::metric_sum;
use weft_tests::lab::LabPod;
use weft_tests::peer::Attempt;
use weft_tests::peer::hostile::{self, Attack};
use weft_tests::{Lab, LabOptions};

const SCENARIO: &str = include_str!("../../examples/l4/mesh.yaml");
/// What ztunnel may grow by under one attack.
const RSS_BUDGET_MIB: f64 = 64.0;

fn addr(pod: &LabPod, port: u16) -> SocketAddr {
    SocketAddr::new(pod.ip.into(), port)
}

fn rss_mib(lab: &Lab, node: &str) -> Result<f64> {
    let pid = lab.ztunnel_pid(node).context("no ztunnel")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .context("no VmRSS")
}

/// A CONNECT as shop/client would send it to web-1's :7000, from `from`.
fn attempt(lab: &Lab) -> Result<Attempt> {
    let (client, web1) = (lab.pod("shop/client"), lab.pod("shop/web-1"));
    let ca = lab.ca()?;
    let id = |sa: &str| format!("spiffe://cluster.local/ns/shop/sa/{sa}").parse();
    Ok(Attempt {
        server: addr(web1, 15008),
        expect: id("web")?,
        cert: Some(ca.issue(&id("client")?, Duration::from_secs(600))?),
        roots: TrustRoots::from_pem(ca.cert_pem())?,
        target: addr(web1, 7000),
        forwarded: Some(client.ip.into()),
        payload: Vec::new(),
    })
}

/// One echo round trip from `pod` through the mesh.
fn round_trip(pod: &LabPod, dst: SocketAddr) -> Result<()> {
    apps::client(pod, dst, |mut c| {
        c.write_all(b"ping")?;
        let mut b = [0u8; 4];
        c.read_exact(&mut b)?;
        ensure!(&b == b"ping", "echo returned {b:?}");
        Ok(())
    })
}

/// Runs `attack` from the legacy pod (off-mesh, holding a stolen client
/// certificate) for `time`, with a legitimate round trip in the middle.
fn under_attack(lab: &mut Lab, attack: Attack, time: Duration) -> Result<hostile::Report> {
    let attacker = lab.pod("legacy/outsider").clone();
    let a = attempt(lab)?;
    let running = std::thread::spawn(move || hostile::run(&attacker, a, attack, time));
    std::thread::sleep(time / 3);
    let legit = round_trip(lab.pod("shop/client"), addr(lab.pod("shop/web-1"), 7000));
    let report = running
        .join()
        .map_err(|_| anyhow::anyhow!("attacker panicked"))??;
    legit.with_context(|| format!("a legitimate connection during {attack:?}"))?;
    ensure!(lab.ztunnel_alive("node-2"), "ztunnel died under {attack:?}");
    Ok(report)
}

/// Rapid reset, a CONTINUATION flood, a SETTINGS flood and a PING flood, one
/// after the other: ztunnel stays up, grows by less than 64 MiB under each,
/// and serves a legitimate connection during each; the CONTINUATION flood is
/// cut off (the header list is bounded, never buffered), and so is rapid
/// reset (GOAWAY once half of 100 streams or more were reset unanswered).
#[test]
fn hostile_http2_peers() -> Result<()> {
    let mut lab = Lab::up(LabOptions::new("hostile-h2", SCENARIO))?;
    let _echo = apps::serve(lab.pod("shop/web-1"), 7000, App::Echo)?;
    round_trip(lab.pod("shop/client"), addr(lab.pod("shop/web-1"), 7000))?;
    let base = rss_mib(&lab, "node-2")?;
    for attack in [
        Attack::RapidReset,
        Attack::ContinuationFlood,
        Attack::SettingsFlood,
        Attack::PingFlood,
    ] {
        let report = under_attack(&mut lab, attack, Duration::from_secs(4))?;
        let rss = rss_mib(&lab, "node-2")?;
        println!(
            "{attack:?}: {} frames, cut off: {}, ztunnel RSS {rss:.1} MiB (from {base:.1})",
            report.frames, report.cut_off
        );
        ensure!(
            rss < base + RSS_BUDGET_MIB,
            "{attack:?}: ztunnel grew to {rss:.1} MiB from {base:.1}"
        );
        // (How many frames got written before that depends on socket
        // buffers, not on ztunnel, so it is printed, not checked.)
        if matches!(attack, Attack::ContinuationFlood | Attack::RapidReset) {
            ensure!(report.cut_off, "the {attack:?} was not cut off");
        }
    }
    Ok(())
}

/// Streams are budgeted per peer address before any task is spawned: a peer
/// holding 100 CONNECT streams gets its share (half the total, set here by
/// MAX_CONNECTIONS=64) and the rest are refused with REFUSED_STREAM and
/// counted as overloaded, while another pod still gets through.
#[test]
fn stream_budget_per_peer() -> Result<()> {
    const LIMIT: usize = 64;
    let mut lab = Lab::up(
        LabOptions::new("hostile-streams", SCENARIO).env("MAX_CONNECTIONS", &LIMIT.to_string()),
    )?;
    let _echo = apps::serve(lab.pod("shop/web-1"), 7000, App::Echo)?;
    let report = under_attack(&mut lab, Attack::OpenStreams, Duration::from_secs(4))?;
    ensure!(report.frames == 100, "sent {} streams", report.frames);
    let refused = metric_sum(
        &lab.metrics("node-2")?,
        "weft_connections_refused_total",
        &[("direction", "inbound"), ("reason", "overloaded")],
    );
    let share = (LIMIT / 2) as f64;
    ensure!(
        refused >= 100.0 - share,
        "{refused} streams refused; want at least {} of 100 past the share of {share}",
        100.0 - share
    );
    Ok(())
}

/// Slowloris at scale: 10 000 TCP connections to web-1's HBONE port that
/// never start TLS. ztunnel holds each only for the handshake timeout, at
/// less than 16 KiB apiece (so at most MAX_CONNECTIONS × 16 KiB in all),
/// serves a legitimate connection meanwhile, and then closes every one.
#[test]
fn idle_connections_on_hbone_port() -> Result<()> {
    const HELD: usize = 10_000;
    let mut lab = Lab::up(LabOptions::new("hostile-idle", SCENARIO))?;
    let _echo = apps::serve(lab.pod("shop/web-1"), 7000, App::Echo)?;
    round_trip(lab.pod("shop/client"), addr(lab.pod("shop/web-1"), 7000))?;
    let base = rss_mib(&lab, "node-2")?;
    let dst = addr(lab.pod("shop/web-1"), 15008);
    let conns = lab.pod("legacy/outsider").netns.run(move || {
        let mut conns = Vec::with_capacity(HELD);
        for i in 0..HELD {
            let c = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(5))
                .with_context(|| format!("idle connection {i}"))?;
            c.set_nonblocking(true)?;
            conns.push(c);
        }
        Ok(conns)
    })?;
    round_trip(lab.pod("shop/client"), addr(lab.pod("shop/web-1"), 7000))
        .context("a legitimate connection beside 10 000 idle ones")?;
    let held = rss_mib(&lab, "node-2")?;
    let per_conn_kib = (held - base) * 1024.0 / HELD as f64;
    println!(
        "ztunnel RSS holding {HELD} idle connections: {held:.1} MiB (from {base:.1}), {per_conn_kib:.1} KiB each"
    );
    ensure!(
        per_conn_kib < 16.0,
        "{per_conn_kib:.1} KiB per idle connection ({held:.1} MiB from {base:.1})"
    );
    // Past the 10 s handshake timeout every one is closed by ztunnel.
    let closed = |conns: &mut Vec<std::net::TcpStream>| {
        let mut b = [0u8; 1];
        conns.retain_mut(
            |c| matches!(c.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        );
        conns.is_empty()
    };
    let mut open = conns;
    weft_tests::check::eventually(
        "ztunnel closes the idle connections",
        Duration::from_secs(25),
        || Ok(closed(&mut open)),
    )?;
    ensure!(lab.ztunnel_alive("node-2"), "ztunnel died");
    Ok(())
}

/// An echo server in its own process (Python's asyncio, present on every
/// machine CI runs on), so the test process's file limit holds only the
/// clients. Killed on drop.
struct EchoProcess(std::process::Child);

impl EchoProcess {
    fn start(pod: &LabPod, port: u16) -> Result<EchoProcess> {
        const SRC: &str = r#"
import asyncio, sys
async def echo(r, w):
    try:
        while True:
            d = await r.read(65536)
            if not d:
                break
            w.write(d)
            await w.drain()
    except Exception:
        pass
    w.close()
async def main():
    s = await asyncio.start_server(echo, "0.0.0.0", int(sys.argv[1]), backlog=4096)
    async with s:
        await s.serve_forever()
asyncio.run(main())
"#;
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", pod.netns.name(), "python3", "-c", SRC])
            .arg(port.to_string())
            .stdin(std::process::Stdio::null())
            .spawn()
            .context("starting the echo process")?;
        Ok(EchoProcess(child))
    }
}

impl Drop for EchoProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `n` connections from `pod` to `dst`, opened and left idle.
fn hold(pod: &LabPod, dst: SocketAddr, n: usize) -> Result<Vec<std::net::TcpStream>> {
    pod.netns.run(move || {
        let mut conns = Vec::with_capacity(n);
        for i in 0..n {
            let c = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(5))
                .with_context(|| format!("idle connection {i} to {dst}"))?;
            c.set_nonblocking(true)?;
            conns.push(c);
        }
        Ok(conns)
    })
}

/// Random bytes (not HTTP, not TLS, not anything) on `count` connections,
/// each echoed back intact: the capture listeners carry application bytes
/// as they are, whatever they are.
fn garbage(pod: &LabPod, dst: SocketAddr, count: usize) -> Result<()> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..count {
        let mut junk = vec![0u8; 16 * 1024];
        apps::fill_pattern(&mut junk, &mut state);
        apps::client(pod, dst, move |mut c| {
            c.set_read_timeout(Some(Duration::from_secs(5)))?;
            c.write_all(&junk)?;
            let mut back = vec![0u8; junk.len()];
            c.read_exact(&mut back)?;
            ensure!(back == junk, "garbage came back changed");
            Ok(())
        })?;
    }
    Ok(())
}

/// Raw TCP at the capture listeners. 8,000 idle connections from outside
/// the mesh to a captured pod (15006 on its node: each holds two of
/// ztunnel's sockets, and this sandbox caps a process at 20,000 files),
/// then 5,000 from a captured pod (15001 on its node, each a stream over
/// HBONE), each followed by garbage: both ztunnels stay up, grow by a
/// bounded amount per connection, and serve a legitimate connection
/// meanwhile.
#[test]
fn idle_and_garbage_on_capture_ports() -> Result<()> {
    const INBOUND: usize = 8_000;
    const OUTBOUND: usize = 5_000;
    const KIB_PER_CONN: f64 = 32.0;
    let mut lab = Lab::up(LabOptions::new("hostile-capture", SCENARIO))?;
    let web1 = lab.pod("shop/web-1");
    let _echo = apps::serve(web1, 7000, App::Echo)?;
    let _held = EchoProcess::start(web1, 7001)?;
    let (held_dst, legit_dst) = (addr(web1, 7001), addr(web1, 7000));
    weft_tests::check::eventually("the echo process listens", Duration::from_secs(10), || {
        Ok(round_trip(lab.pod("shop/client"), held_dst).is_ok())
    })?;
    for (name, from, n, node) in [
        (
            "15006 (inbound plaintext)",
            "legacy/outsider",
            INBOUND,
            "node-2",
        ),
        ("15001 (outbound)", "shop/client", OUTBOUND, "node-1"),
    ] {
        let base = rss_mib(&lab, node)?;
        let conns = hold(lab.pod(from), held_dst, n)?;
        round_trip(lab.pod("shop/web-2"), legit_dst)
            .with_context(|| format!("a legitimate connection beside {n} idle ones on {name}"))?;
        let rss = rss_mib(&lab, node)?;
        let per_conn = (rss - base) * 1024.0 / n as f64;
        println!(
            "{name}: {n} idle connections, {node} ztunnel {rss:.1} MiB (from {base:.1}), {per_conn:.1} KiB each"
        );
        ensure!(
            per_conn < KIB_PER_CONN,
            "{name}: {per_conn:.1} KiB per idle connection"
        );
        garbage(lab.pod(from), held_dst, 50).with_context(|| format!("garbage through {name}"))?;
        drop(conns);
        ensure!(
            lab.ztunnel_alive("node-1") && lab.ztunnel_alive("node-2"),
            "a ztunnel died on {name}"
        );
        round_trip(lab.pod("shop/client"), legit_dst)
            .with_context(|| format!("after the connections on {name} closed"))?;
    }
    Ok(())
}
