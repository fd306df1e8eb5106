//! End-to-end: the L4 data path on the lab. Real namespaces, the real eBPF
//! program, real ztunnel processes, real TLS; every test builds its own lab.
//! Run as root, through `cargo xtask test`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Result, ensure};
use weft_tests::apps::{self, App};
use weft_tests::check::{eventually, log_lines, metric_sum};
use weft_tests::{Lab, LabOptions, tcpdump};

const SCENARIO: &str = include_str!("../../examples/l4/mesh.yaml");
const MB: u64 = 1024 * 1024;

fn addr(pod: &weft_tests::lab::LabPod, port: u16) -> SocketAddr {
    SocketAddr::new(pod.ip.into(), port)
}

/// A captured pod's connection to a captured pod on another node crosses the
/// underlay only as TLS to port 15008, arrives intact in both directions
/// (100 MB up, 20 MB down, SHA-256), shows the real client address to the
/// server, and is counted and logged with both identities on both nodes.
#[test]
fn cross_node_mtls_bulk() -> Result<()> {
    let lab = Lab::up(LabOptions::new("bulk", SCENARIO))?;
    let client = lab.pod("shop/client");
    let web = lab.pod("shop/web-1");
    let _sink = apps::serve(web, 9000, App::Sink)?;
    let _source = apps::serve(web, 9001, App::Source(20 * MB))?;
    let _who = apps::serve(web, 9002, App::WhoAmI)?;
    let _echo = apps::serve(web, 9003, App::Echo)?;

    let pcap = lab.dir().join("underlay.pcap");
    let cap = tcpdump::Tcpdump::start(&lab.node("node-1").netns, "eth0", &pcap)?;
    apps::upload(client, addr(web, 9000), 100 * MB)?;
    apps::download(client, addr(web, 9001), 20 * MB)?;
    let seen = apps::whoami(client, addr(web, 9002))?;
    ensure!(
        seen.ip() == client.ip,
        "server saw {seen}, want {}",
        client.ip
    );
    let marker = "weft-plaintext-marker-7c1d0e";
    let echoed = apps::client(client, addr(web, 9003), move |mut c| {
        use std::io::{Read, Write};
        c.write_all(marker.as_bytes())?;
        c.shutdown(std::net::Shutdown::Write)?;
        let mut s = String::new();
        c.read_to_string(&mut s)?;
        Ok(s)
    })?;
    ensure!(echoed == marker, "echo returned {echoed:?}");
    let pcap = cap.stop()?;

    // The underlay carried the flows only as HBONE, and never the plaintext.
    let raw = std::fs::read(&pcap)?;
    ensure!(
        !raw.windows(marker.len()).any(|w| w == marker.as_bytes()),
        "plaintext marker seen on the underlay"
    );
    let hbone = tcpdump::read(&pcap, "tcp port 15008")?;
    let other = tcpdump::read(&pcap, "tcp and not port 15008")?;
    ensure!(
        hbone.len() > 1000,
        "only {} HBONE packets captured",
        hbone.len()
    );
    ensure!(
        other.is_empty(),
        "non-HBONE TCP on the underlay: {:?}",
        &other[..other.len().min(5)]
    );
    // TLS 1.3 application data records (0x17 0x03 0x03) are what HBONE carries.
    ensure!(
        raw.windows(3).any(|w| w == [0x17, 0x03, 0x03]),
        "no TLS records on the underlay"
    );

    // Metrics: source side on node-1, destination side on node-2, mutual TLS.
    let client_id = "spiffe://cluster.local/ns/shop/sa/client";
    let web_id = "spiffe://cluster.local/ns/shop/sa/web";
    let common = [
        ("source_workload", "client"),
        ("source_principal", client_id),
        ("destination_workload", "web-1"),
        ("destination_principal", web_id),
        ("connection_security_policy", "mutual_tls"),
    ];
    for (node, reporter) in [("node-1", "source"), ("node-2", "destination")] {
        let mut labels = common.to_vec();
        labels.push(("reporter", reporter));
        eventually(&format!("{node} metrics"), Duration::from_secs(5), || {
            let m = lab.metrics(node)?;
            let opened = metric_sum(&m, "istio_tcp_connections_opened_total", &labels);
            let closed = metric_sum(&m, "istio_tcp_connections_closed_total", &labels);
            let received = metric_sum(&m, "istio_tcp_received_bytes_total", &labels);
            let sent = metric_sum(&m, "istio_tcp_sent_bytes_total", &labels);
            Ok(opened == 4.0
                && closed == 4.0
                && received >= (100 * MB + marker.len() as u64) as f64
                && sent >= (20 * MB) as f64)
        })?;
    }
    // The capture program took the outbound SYNs on node-1 and HBONE on node-2.
    let c1 = &lab.config_dump("node-1")?["capture"]["counters"];
    let c2 = &lab.config_dump("node-2")?["capture"]["counters"];
    ensure!(c1["outbound"].as_u64() >= Some(4), "node-1 counters {c1}");
    ensure!(c2["hbone"].as_u64() >= Some(1), "node-2 counters {c2}");

    // The destination's access log names the peer identity and the bytes.
    let lines = log_lines(
        &lab.ztunnel_log("node-2"),
        &[
            ("message", "connection complete"),
            ("direction", "inbound"),
            ("src.identity", client_id),
            ("dst.addr", &addr(web, 9000).to_string()),
        ],
    );
    ensure!(lines.len() == 1, "access log lines: {lines:?}");
    ensure!(
        lines[0]["bytes_sent"].as_u64() == Some(100 * MB),
        "{}",
        lines[0]
    );
    Ok(())
}
