//! End-to-end: the L4 data path on the lab. Real namespaces, the real eBPF
//! program, real ztunnel processes, real TLS; every test builds its own lab.
//! Run as root, through `cargo xtask test`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
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
    apps::echo_once(client, addr(web, 9003), marker)?;
    let pcap = cap.stop()?;

    // The underlay carried the flows only as HBONE, and never the plaintext.
    let raw = std::fs::read(&pcap)?;
    ensure!(
        !raw.windows(marker.len()).any(|w| w == marker.as_bytes()),
        "plaintext marker seen on the underlay"
    );
    let hbone = tcpdump::read(&pcap, "tcp port 15008")?;
    // Besides HBONE, only the control plane's TLS (xDS and CA) crosses the underlay.
    let other = tcpdump::read(&pcap, "tcp and not port 15008 and not port 15012")?;
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

/// A connection is served by one proxy worker on each node: its splice, its
/// HBONE connection and the stream over it run on the worker thread that
/// accepted it, so a bulk transfer's bytes stay in one core's caches. Both
/// ztunnels have their two workers (`ZTUNNEL_WORKER_THREADS`, default 2).
/// Six uploads of 100 MB, each on a new connection (the kernel spreads them
/// over the workers by their source ports), and one worker does (almost)
/// all of each one's proxy work on each node: also when its connection
/// landed on the other worker than the first one, whose HBONE connection a
/// pool shared by the workers would have reused.
#[test]
fn a_connection_stays_on_one_worker() -> Result<()> {
    let lab = Lab::up(LabOptions::new("workers", SCENARIO))?;
    let client = lab.pod("shop/client");
    let web = lab.pod("shop/web-1");
    let _sink = apps::serve(web, 9000, App::Sink)?;
    // Warm: certificates issued, so the uploads below are all proxying.
    apps::upload(client, addr(web, 9000), MB)?;
    let proxy_threads = |node: &str| -> Result<Vec<(String, f64)>> {
        let pid = lab.ztunnel_pid(node).context("no ztunnel")?;
        let mut threads: Vec<_> = weft_runtime::thread_cpu_seconds(pid)?
            .into_iter()
            .filter(|(name, _)| name.starts_with("proxy-"))
            .collect();
        threads.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(threads)
    };
    let names = |t: &[(String, f64)]| t.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    let mut busiest_on_node_1 = Vec::new();
    for upload in 0..6 {
        let before = [proxy_threads("node-1")?, proxy_threads("node-2")?];
        apps::upload(client, addr(web, 9000), 100 * MB)?;
        for (node, before) in ["node-1", "node-2"].into_iter().zip(before) {
            let after = proxy_threads(node)?;
            ensure!(
                names(&after) == ["proxy-0", "proxy-1"] && names(&before) == names(&after),
                "{node}: proxy threads {:?}, want proxy-0 and proxy-1",
                names(&after)
            );
            let spent: Vec<f64> = after
                .iter()
                .zip(&before)
                .map(|((_, a), (_, b))| a - b)
                .collect();
            let total: f64 = spent.iter().sum();
            let busiest = (0..spent.len())
                .max_by(|&a, &b| spent[a].total_cmp(&spent[b]))
                .unwrap_or(0);
            // 100 MB through TLS takes more than the 10 ms a tick counts.
            ensure!(
                total >= 0.05,
                "{node}, upload {upload}: the proxy threads spent {total:.2} s"
            );
            ensure!(
                spent[busiest] >= 0.9 * total,
                "{node}, upload {upload}: the proxy work was spread over the workers: {spent:?} s"
            );
            if node == "node-1" {
                busiest_on_node_1.push(busiest);
            }
        }
    }
    eprintln!("the worker of each upload on node-1: {busiest_on_node_1:?}");
    Ok(())
}

/// Every kind of path gives the server the real client address, and each is
/// accounted as what it is: service round robin (other node over HBONE, same
/// node in-process), passthrough to a pod outside the mesh, plaintext into the
/// mesh (PERMISSIVE), and pods outside the mesh untouched.
#[test]
fn paths_and_client_addresses() -> Result<()> {
    let lab = Lab::up(LabOptions::new("paths", SCENARIO))?;
    let (client, outsider) = (lab.pod("shop/client"), lab.pod("legacy/outsider"));
    let (web1, web2, plain) = (
        lab.pod("shop/web-1"),
        lab.pod("shop/web-2"),
        lab.pod("legacy/plain"),
    );
    let s1 = apps::serve(web1, 8080, App::WhoAmI)?;
    let s2 = apps::serve(web2, 8080, App::WhoAmI)?;
    let _s3 = apps::serve(plain, 8080, App::WhoAmI)?;
    let vip: SocketAddr = "10.96.0.10:80".parse()?;

    for _ in 0..4 {
        let seen = apps::whoami(client, vip)?;
        ensure!(seen.ip() == client.ip, "via the VIP the server saw {seen}");
    }
    let hits = |s: &apps::Server| s.accepted.load(std::sync::atomic::Ordering::Acquire);
    ensure!(
        hits(&s1) == 2 && hits(&s2) == 2,
        "round robin: web-1 {} web-2 {}",
        hits(&s1),
        hits(&s2)
    );

    for (from, to) in [
        (client, plain),
        (outsider, web1),
        (outsider, plain),
        (client, web2),
    ] {
        let seen = apps::whoami(from, addr(to, 8080))?;
        ensure!(
            seen.ip() == from.ip,
            "{} -> {}: server saw {seen}",
            from.name,
            to.name
        );
    }

    let n1 = [("reporter", "source"), ("source_workload", "client")];
    eventually("node-1 metrics", Duration::from_secs(5), || {
        let m = lab.metrics("node-1")?;
        let opened = |dst: &str, svc: &str, sec: &str| {
            let mut l = n1.to_vec();
            l.extend([
                ("destination_workload", dst),
                ("destination_service", svc),
                ("connection_security_policy", sec),
            ]);
            metric_sum(&m, "istio_tcp_connections_closed_total", &l)
        };
        let svc = "web.shop.svc.cluster.local";
        Ok(opened("web-1", svc, "mutual_tls") == 2.0
            && opened("web-2", svc, "mutual_tls") == 3.0
            && opened("plain", "unknown", "unknown") == 1.0)
    })?;
    eventually("node-2 plaintext inbound", Duration::from_secs(5), || {
        let m = lab.metrics("node-2")?;
        let l = [
            ("reporter", "destination"),
            ("source_workload", "outsider"),
            ("destination_workload", "web-1"),
            ("connection_security_policy", "none"),
        ];
        Ok(metric_sum(&m, "istio_tcp_connections_closed_total", &l) == 1.0)
    })?;
    // Node-local traffic is never captured: a captured pod reaching its own
    // node's address goes straight there.
    let node1 = lab.node("node-1");
    let _on_node = apps::serve_in(&node1.netns, "node-1", 9100, App::WhoAmI)?;
    let before = lab.config_dump("node-1")?["capture"]["counters"]["outbound"].as_u64();
    let seen = apps::whoami(client, SocketAddr::new(node1.underlay_ip.into(), 9100))?;
    ensure!(seen.ip() == client.ip, "node saw {seen}");
    let after = lab.config_dump("node-1")?["capture"]["counters"]["outbound"].as_u64();
    ensure!(
        before == after,
        "node-local connection was captured ({before:?} -> {after:?})"
    );

    // legacy -> legacy never touched either ztunnel.
    for node in ["node-1", "node-2"] {
        let m = lab.metrics(node)?;
        let l = [
            ("source_workload", "outsider"),
            ("destination_workload", "plain"),
        ];
        ensure!(
            metric_sum(&m, "istio_tcp_connections_opened_total", &l) == 0.0,
            "{node} saw outsider -> plain"
        );
    }
    Ok(())
}

fn round_trip(conn: &mut std::net::TcpStream, msg: &[u8]) -> Result<()> {
    use std::io::{Read, Write};
    conn.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    conn.read_exact(&mut back)?;
    ensure!(back == msg, "echo mismatch");
    Ok(())
}

/// Labelling a running pod captures its new connections and leaves its open
/// ones alone; unlabelling releases new connections while connections already
/// through ztunnel keep working (draining).
#[test]
fn capture_follows_label_on_running_pod() -> Result<()> {
    let mut lab = Lab::up(LabOptions::new("toggle", SCENARIO))?;
    let outsider = lab.pod("legacy/outsider").clone();
    let plain = lab.pod("legacy/plain").clone();
    let _echo = apps::serve(&plain, 7000, App::Echo)?;
    let dst = addr(&plain, 7000);
    let open = |pod: &weft_tests::lab::LabPod| -> Result<std::net::TcpStream> {
        let c = pod.netns.run(move || {
            Ok(std::net::TcpStream::connect_timeout(
                &dst,
                Duration::from_secs(5),
            )?)
        })?;
        c.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(c)
    };
    let through_ztunnel = |lab: &Lab| -> Result<f64> {
        let m = lab.metrics("node-1")?;
        let l = [
            ("reporter", "source"),
            ("source_workload", "outsider"),
            ("destination_workload", "plain"),
        ];
        Ok(metric_sum(&m, "istio_tcp_connections_opened_total", &l))
    };

    let mut a = open(&outsider)?;
    round_trip(&mut a, b"before")?;
    lab.label(
        "Pod",
        "legacy/outsider",
        "istio.io/dataplane-mode",
        Some("ambient"),
    )?;
    lab.wait_captured("legacy/outsider", true)?;
    round_trip(&mut a, b"a still direct")?;
    let mut b = open(&outsider)?;
    round_trip(&mut b, b"b through the mesh")?;
    ensure!(through_ztunnel(&lab)? == 1.0, "only b goes through ztunnel");

    lab.label("Pod", "legacy/outsider", "istio.io/dataplane-mode", None)?;
    lab.wait_captured("legacy/outsider", false)?;
    round_trip(&mut b, b"b drains")?;
    round_trip(&mut a, b"a unaffected")?;
    let mut c = open(&outsider)?;
    round_trip(&mut c, b"c direct again")?;
    ensure!(
        through_ztunnel(&lab)? == 1.0,
        "c must not go through ztunnel"
    );
    drop((a, b, c));
    eventually("b closed", Duration::from_secs(5), || {
        let m = lab.metrics("node-1")?;
        Ok(metric_sum(
            &m,
            "istio_tcp_connections_closed_total",
            &[("source_workload", "outsider")],
        ) == 1.0)
    })?;
    Ok(())
}

/// A broken config file is reported and ignored: ztunnel keeps the last good
/// state, keeps capturing, and keeps serving the mesh.
#[test]
fn bad_config_keeps_last_good_state() -> Result<()> {
    let lab = Lab::up(LabOptions::new("badcfg", SCENARIO))?;
    let (client, web) = (lab.pod("shop/client"), lab.pod("shop/web-1"));
    let _who = apps::serve(web, 8080, App::WhoAmI)?;
    // A broken edit of the scenario file, and a file with one bad document.
    lab.write_manifest(
        "scenario.yaml",
        "apiVersion: v1\nkind: [Pod\n  - not: closed\n",
    )?;
    lab.write_manifest(
        "extra.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: broken, namespace: shop}\nspec: {containers: 7}\n",
    )?;
    eventually("the bad files are reported", Duration::from_secs(5), || {
        let log = lab.controller_log();
        Ok(log.contains("keeping its last good contents")
            && log.contains("extra.yaml document 0 (Pod broken)"))
    })?;
    ensure!(
        lab.controller_log().contains("scenario.yaml"),
        "the error does not name the file:\n{}",
        lab.controller_log()
    );
    let seen = apps::whoami(client, addr(web, 8080))?;
    ensure!(seen.ip() == client.ip, "server saw {seen}");
    let dump = lab.config_dump("node-2")?;
    ensure!(
        dump["workloads"].as_array().is_some_and(|w| w.len() == 5),
        "state lost: {}",
        dump["workloads"]
    );
    ensure!(
        dump["capture"]["captured"]
            .as_array()
            .is_some_and(|c| !c.is_empty()),
        "capture lost: {}",
        dump["capture"]
    );
    Ok(())
}

/// Labelling a namespace `istio.io/dataplane-mode=ambient` in its manifest
/// captures every pod of it on its node, with nothing restarted: traffic
/// between them then goes through both ztunnels as mTLS with their
/// identities, and the server still sees the client's own address.
/// Removing the label releases them.
#[test]
fn namespace_label_captures_its_pods() -> Result<()> {
    let mut lab = Lab::up(LabOptions::new("nslabel", SCENARIO))?;
    let outsider = lab.pod("legacy/outsider").clone();
    let plain = lab.pod("legacy/plain").clone();
    let _who = apps::serve(&plain, 8080, App::WhoAmI)?;
    let dst = addr(&plain, 8080);
    let mtls = |lab: &Lab| -> Result<f64> {
        Ok(metric_sum(
            &lab.metrics("node-2")?,
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "destination"),
                ("destination_workload", "plain"),
                (
                    "source_principal",
                    "spiffe://cluster.local/ns/legacy/sa/default",
                ),
                (
                    "destination_principal",
                    "spiffe://cluster.local/ns/legacy/sa/default",
                ),
                ("connection_security_policy", "mutual_tls"),
            ],
        ))
    };
    ensure!(apps::whoami(&outsider, dst)?.ip() == std::net::IpAddr::V4(outsider.ip));
    ensure!(mtls(&lab)? == 0.0, "not in the mesh yet");

    lab.label(
        "Namespace",
        "legacy",
        "istio.io/dataplane-mode",
        Some("ambient"),
    )?;
    lab.wait_captured("legacy/outsider", true)?;
    lab.wait_captured("legacy/plain", true)?;
    ensure!(
        apps::whoami(&outsider, dst)?.ip() == std::net::IpAddr::V4(outsider.ip),
        "the client's address survives the tunnel"
    );
    eventually(
        "the mTLS connection is counted",
        Duration::from_secs(5),
        || Ok(mtls(&lab)? == 1.0),
    )?;

    lab.label("Namespace", "legacy", "istio.io/dataplane-mode", None)?;
    lab.wait_captured("legacy/outsider", false)?;
    lab.wait_captured("legacy/plain", false)?;
    apps::whoami(&outsider, dst)?;
    ensure!(
        mtls(&lab)? == 1.0,
        "released: the new connection went direct"
    );
    Ok(())
}

/// A Service without a selector reaches the endpoints its EndpointSlice
/// lists (here a pod outside the mesh, by the slice's port name), never an
/// endpoint the slice marks not ready; the connections are counted under
/// the Service.
#[test]
fn selector_less_service_uses_its_endpoint_slice() -> Result<()> {
    let lab = Lab::up(LabOptions::new("slices", SCENARIO))?;
    let client = lab.pod("shop/client");
    let plain = lab.pod("legacy/plain");
    let _who = apps::serve(plain, 17000, App::WhoAmI)?;
    lab.write_manifest(
        "db.yaml",
        &format!(
            r#"
apiVersion: v1
kind: Service
metadata: {{name: db, namespace: shop}}
spec: {{clusterIP: 10.96.0.99, ports: [{{name: tcp-db, port: 5432}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: db-1, namespace: shop, labels: {{kubernetes.io/service-name: db}}}}
addressType: IPv4
ports: [{{name: tcp-db, port: 17000}}]
endpoints:
- addresses: ["{}"]
- addresses: ["192.0.2.77"]
  conditions: {{ready: false}}
"#,
            plain.ip
        ),
    )?;
    let vip: SocketAddr = "10.96.0.99:5432".parse()?;
    eventually("the Service resolves", Duration::from_secs(10), || {
        Ok(apps::whoami(client, vip).is_ok())
    })?;
    for _ in 0..10 {
        let seen = apps::whoami(client, vip)?;
        ensure!(seen.ip() == client.ip, "the endpoint saw {seen}");
    }
    let labels = [
        ("reporter", "source"),
        ("destination_service", "db.shop.svc.cluster.local"),
        ("destination_workload", "db"),
    ];
    closed_on_node_1(&lab, "the Service's connections", &labels, |n| n >= 11.0)
}

/// kube-proxy in IPVS mode binds every Service VIP to a dummy interface
/// (`kube-ipvs0`) on each node, so VIPs look like the node's own addresses.
/// Taken as such, a pod's connection to a VIP would escape capture and
/// reach the backend in plaintext, around policy. Here a VIP sits on
/// `kube-ipvs0` and another on an interface of another name: connections to
/// both still go through ztunnel (counted by it, under their Service).
#[test]
fn ipvs_vips_are_not_node_addresses() -> Result<()> {
    let lab = Lab::up(LabOptions::new("ipvs", SCENARIO))?;
    let client = lab.pod("shop/client");
    let web1 = lab.pod("shop/web-1");
    let web2 = lab.pod("shop/web-2");
    let _w1 = apps::serve(web1, 8080, App::WhoAmI)?;
    let _w2 = apps::serve(web2, 8080, App::WhoAmI)?;
    lab.write_manifest(
        "web-alt.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web-alt, namespace: shop}\nspec: {clusterIP: 10.96.0.11, selector: {app: web}, ports: [{name: http, port: 80, targetPort: http}]}\n",
    )?;
    let node = &lab.node("node-1").netns;
    // A portless bridge stands in for the dummy device (this kernel has no
    // dummy module): an interface that only holds addresses.
    node.ip(&["link", "add", "kube-ipvs0", "type", "bridge"])?;
    node.ip(&["addr", "add", "10.96.0.10/32", "dev", "kube-ipvs0"])?;
    node.ip(&["link", "add", "vip0", "type", "bridge"])?;
    node.ip(&["addr", "add", "10.96.0.11/32", "dev", "vip0"])?;
    // ztunnel picks up interfaces and addresses on its next sync.
    std::thread::sleep(Duration::from_secs(2));
    for vip in ["10.96.0.10:80", "10.96.0.11:80"] {
        let vip: SocketAddr = vip.parse()?;
        eventually(
            &format!("{vip} through ztunnel"),
            Duration::from_secs(10),
            || Ok(apps::whoami(client, vip).is_ok()),
        )?;
        for _ in 0..4 {
            let seen = apps::whoami(client, vip)?;
            ensure!(seen.ip() == client.ip, "the backend saw {seen}");
        }
    }
    for svc in [
        "web.shop.svc.cluster.local",
        "web-alt.shop.svc.cluster.local",
    ] {
        let labels = [("reporter", "source"), ("destination_service", svc)];
        closed_on_node_1(&lab, svc, &labels, |n| n >= 5.0)?;
    }
    Ok(())
}

/// A bridge CNI (flannel, the bridge plugin): each node's pods on one Linux
/// bridge, on-link in their /24. A captured pod's connection to a pod on
/// the same node is switched by the bridge at layer 2, never routed: unless
/// capture takes it, it would reach its peer in plaintext, around ztunnel.
/// Both same-node and cross-node connections go through ztunnel (counted
/// there, mutual TLS), and the underlay carries no plaintext.
#[test]
fn bridge_cni_capture() -> Result<()> {
    let lab = Lab::up(LabOptions::new("bridge-cni", SCENARIO).bridge_cni())?;
    let client = lab.pod("shop/client");
    let (web1, web2) = (lab.pod("shop/web-1"), lab.pod("shop/web-2"));
    ensure!(client.node == web2.node && client.node != web1.node);
    let _w1 = apps::serve(web1, 9002, App::WhoAmI)?;
    let _w2 = apps::serve(web2, 9002, App::WhoAmI)?;
    let _echo = apps::serve(web1, 9003, App::Echo)?;
    let pcap = lab.dir().join("underlay.pcap");
    let cap = tcpdump::Tcpdump::start(&lab.node("node-1").netns, "eth0", &pcap)?;
    let marker = "weft-bridge-marker-3f1e";
    apps::echo_once(client, addr(web1, 9003), marker)?;
    for web in [web1, web2] {
        for _ in 0..3 {
            let seen = apps::whoami(client, addr(web, 9002))?;
            ensure!(seen.ip() == client.ip, "{} saw {seen}", web.name);
        }
    }
    let pcap = cap.stop()?;
    let raw = std::fs::read(&pcap)?;
    ensure!(
        !raw.windows(marker.len()).any(|w| w == marker.as_bytes()),
        "plaintext on the underlay"
    );
    for (web, n) in [("web-1", 4.0), ("web-2", 3.0)] {
        let labels = [
            ("reporter", "source"),
            ("destination_workload", web),
            ("connection_security_policy", "mutual_tls"),
        ];
        closed_on_node_1(&lab, web, &labels, |got| got == n)?;
    }
    Ok(())
}

/// Waits (5 s at most) until node-1's ztunnel has counted closed
/// connections with `labels` in a number that `want` accepts.
fn closed_on_node_1(
    lab: &Lab,
    what: &str,
    labels: &[(&str, &str)],
    want: impl Fn(f64) -> bool,
) -> Result<()> {
    eventually(
        &format!("{what} counted by ztunnel"),
        Duration::from_secs(5),
        || {
            let m = lab.metrics("node-1")?;
            Ok(want(metric_sum(
                &m,
                "istio_tcp_connections_closed_total",
                labels,
            )))
        },
    )
}
