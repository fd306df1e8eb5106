//! End-to-end: Istio's AuthorizationPolicy and PeerAuthentication, written as
//! manifests, enforced by ztunnel on real connections, across nodes and on
//! one node, with the deciding policy in the metrics and the access log.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use weft_tests::apps::{self, App};
use weft_tests::check::{eventually, log_lines, metric_sum};
use weft_tests::lab::LabPod;
use weft_tests::{Lab, LabOptions};

const MESH: &str = include_str!("../../examples/l4/mesh.yaml");

/// A second meshed namespace, so policies can tell callers apart by namespace.
const OPS: &str = r#"
---
apiVersion: v1
kind: Namespace
metadata:
  name: ops
  labels:
    istio.io/dataplane-mode: ambient
---
apiVersion: v1
kind: Pod
metadata:
  name: probe
  namespace: ops
  labels: {app: probe}
spec:
  nodeName: node-1
  serviceAccountName: probe
  containers: [{name: app, image: probe}]
status:
  podIP: 10.244.1.30
"#;

/// Policies take effect on new connections within this long of the file change.
const EFFECT: Duration = Duration::from_secs(1);

fn addr(pod: &LabPod, port: u16) -> SocketAddr {
    SocketAddr::new(pod.ip.into(), port)
}

/// Whether `from` gets through to the WhoAmI server at `to`, and is seen
/// there with its own address.
fn reaches(from: &LabPod, to: SocketAddr) -> bool {
    apps::whoami(from, to).is_ok_and(|seen| seen.ip() == std::net::IpAddr::V4(from.ip))
}

/// Writes a policy file and waits until `settled` holds for new
/// connections; returns how long that took. Fails past [`EFFECT`].
fn apply(lab: &Lab, file: &str, yaml: &str, settled: impl Fn() -> bool) -> Result<Duration> {
    let start = Instant::now();
    lab.write_manifest(file, yaml)?;
    eventually(&format!("{file} in force"), EFFECT, || Ok(settled()))?;
    Ok(start.elapsed())
}

fn denials(lab: &Lab, node: &str, labels: &[(&str, &str)]) -> Result<f64> {
    Ok(metric_sum(
        &lab.metrics(node)?,
        "weft_policy_denials_total",
        labels,
    ))
}

/// An ALLOW policy by principal admits one caller and refuses the others; a
/// DENY policy by namespace refuses that namespace only. Across nodes
/// (HBONE, answered 401) and on one node (in-process delivery) alike; each
/// change takes effect on new connections within a second, and every denial
/// is counted and logged with the deciding policy. As a dry run the DENY
/// refuses nothing and counts what it would have refused. An ALLOW by service
/// account (Istio's ServiceAccountMatch on the wire) admits that account only.
#[test]
fn authorization_policy_by_principal_and_namespace() -> Result<()> {
    let lab = Lab::up(LabOptions::new("authz", &format!("{MESH}{OPS}")))?;
    let (client, web1, web2, probe) = (
        lab.pod("shop/client"),
        lab.pod("shop/web-1"),
        lab.pod("shop/web-2"),
        lab.pod("ops/probe"),
    );
    let _w1 = apps::serve(web1, 8080, App::WhoAmI)?;
    let _w2 = apps::serve(web2, 8080, App::WhoAmI)?;
    let remote = addr(web1, 8080); // node-2: over HBONE
    let local = addr(web2, 8080); // node-1, as every caller: in-process
    for from in [client, probe] {
        ensure!(
            reaches(from, remote) && reaches(from, local),
            "{} before any policy",
            from.name
        );
    }
    ensure!(reaches(web2, remote), "web-2 before any policy");

    let took = apply(
        &lab,
        "policy.yaml",
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-from-client, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/shop/sa/client"]}
"#,
        || !reaches(probe, remote),
    )?;
    eprintln!("ALLOW by principal in force after {took:?}");
    ensure!(
        reaches(client, remote),
        "the allowed principal, across nodes"
    );
    ensure!(reaches(client, local), "the allowed principal, same node");
    ensure!(
        !reaches(web2, remote),
        "principal shop/sa/web is not allowed"
    );
    ensure!(
        !reaches(probe, local),
        "ops/probe is not allowed on one node either"
    );
    let no_allow = [("reason", "no_allow_matched"), ("policy", "")];
    ensure!(
        denials(&lab, "node-2", &no_allow)? >= 2.0,
        "node-2 counts its denials"
    );
    ensure!(
        denials(&lab, "node-1", &no_allow)? >= 1.0,
        "node-1 counts the same-node denial"
    );
    let refused = metric_sum(
        &lab.metrics("node-2")?,
        "weft_connections_refused_total",
        &[("direction", "inbound"), ("reason", "policy_denied")],
    );
    ensure!(refused >= 2.0, "refused counter: {refused}");

    let took = apply(
        &lab,
        "policy.yaml",
        r#"
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: no-ops, namespace: shop}
spec:
  action: DENY
  rules:
  - from:
    - source: {namespaces: ["ops"]}
"#,
        || reaches(web2, remote),
    )?;
    eprintln!("DENY by namespace in force after {took:?}");
    ensure!(
        !reaches(probe, remote),
        "namespace ops is denied, across nodes"
    );
    ensure!(!reaches(probe, local), "namespace ops is denied, same node");
    ensure!(
        reaches(client, remote) && reaches(client, local),
        "shop is not"
    );
    let by_policy = [("reason", "deny_matched"), ("policy", "shop/no-ops")];
    ensure!(denials(&lab, "node-2", &by_policy)? >= 1.0);
    ensure!(denials(&lab, "node-1", &by_policy)? >= 1.0);
    let logged = log_lines(
        &lab.ztunnel_log("node-2"),
        &[
            ("policy", "shop/no-ops"),
            ("src.identity", "spiffe://cluster.local/ns/ops/sa/probe"),
        ],
    );
    ensure!(
        !logged.is_empty(),
        "node-2's access log names the policy and the caller"
    );

    // The same DENY as a dry run: ops is back, and each connection it would
    // have refused is counted and logged, not refused.
    let dry_run = |lab: &Lab, node: &str| -> Result<f64> {
        Ok(metric_sum(
            &lab.metrics(node)?,
            "weft_policy_dry_run_matches_total",
            &[("policy", "shop/no-ops"), ("reason", "dry_run_matched")],
        ))
    };
    let before = (dry_run(&lab, "node-1")?, dry_run(&lab, "node-2")?);
    ensure!(before == (0.0, 0.0), "no dry run yet: {before:?}");
    apply(
        &lab,
        "policy.yaml",
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: no-ops
  namespace: shop
  annotations: {istio.io/dry-run: "true"}
spec:
  action: DENY
  rules:
  - from:
    - source: {namespaces: ["ops"]}
"#,
        || reaches(probe, remote),
    )?;
    ensure!(
        reaches(probe, local),
        "dry run: ops gets in on one node too"
    );
    ensure!(
        dry_run(&lab, "node-2")? >= 1.0,
        "node-2 counts the dry-run match"
    );
    ensure!(
        dry_run(&lab, "node-1")? >= 1.0,
        "node-1 counts the dry-run match"
    );
    let logged = log_lines(
        &lab.ztunnel_log("node-2"),
        &[
            ("message", "dry-run policy matched (not enforced)"),
            ("policy", "shop/no-ops"),
        ],
    );
    ensure!(!logged.is_empty(), "node-2 logs the dry-run match");
    ensure!(reaches(client, remote), "shop never matched");

    // ALLOW by service account: sent as istiod sends it (ServiceAccountMatch,
    // fields 11 and 12 of istio.security.Match) and enforced by both nodes.
    apply(
        &lab,
        "policy.yaml",
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-from-probe, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules:
  - from:
    - source: {serviceAccounts: ["ops/probe", "shop/client"], notServiceAccounts: ["shop/client"]}
"#,
        || !reaches(client, remote),
    )?;
    ensure!(
        reaches(probe, remote) && reaches(probe, local),
        "the allowed service account, across nodes and on one node"
    );
    ensure!(
        !reaches(client, local),
        "shop/client is listed, but excluded by notServiceAccounts"
    );
    ensure!(!reaches(web2, remote), "shop/web is not allowed");

    // The policy goes away: everyone is back.
    apply(&lab, "policy.yaml", "", || reaches(client, remote))?;
    ensure!(reaches(probe, local) && reaches(web2, remote));
    Ok(())
}

/// STRICT refuses plaintext to captured pods and keeps mTLS working; a
/// port-level PERMISSIVE exception lets plaintext through on that port only;
/// a PeerAuthentication that stops translating keeps its last good version,
/// and the controller names the resource and the field.
#[test]
fn peer_authentication_strict() -> Result<()> {
    let lab = Lab::up(LabOptions::new("peerauthn", MESH))?;
    let (client, web1, outsider) = (
        lab.pod("shop/client"),
        lab.pod("shop/web-1"),
        lab.pod("legacy/outsider"),
    );
    let _w = apps::serve(web1, 8080, App::WhoAmI)?;
    let _w2 = apps::serve(web1, 9090, App::WhoAmI)?;
    let (web, metrics_port) = (addr(web1, 8080), addr(web1, 9090));
    ensure!(
        reaches(outsider, web),
        "PERMISSIVE by default: plaintext gets in"
    );

    let strict = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec:
  mtls: {mode: STRICT}
"#;
    let took = apply(&lab, "peer-authn.yaml", strict, || !reaches(outsider, web))?;
    eprintln!("STRICT in force after {took:?}");
    ensure!(!reaches(outsider, metrics_port), "STRICT covers every port");
    ensure!(reaches(client, web), "mTLS still gets in");
    let static_strict = [
        ("direction", "inbound_plaintext"),
        ("policy", "istio-system/istio_converted_static_strict"),
    ];
    ensure!(denials(&lab, "node-2", &static_strict)? >= 2.0);

    let with_exception = format!(
        "{strict}---\n{}",
        r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: web-metrics, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  portLevelMtls:
    9090: {mode: PERMISSIVE}
"#
    );
    apply(&lab, "peer-authn.yaml", &with_exception, || {
        reaches(outsider, metrics_port)
    })?;
    ensure!(!reaches(outsider, web), "8080 stays STRICT");
    ensure!(reaches(client, web) && reaches(client, metrics_port));
    let converted = [("policy", "shop/converted_peer_authentication_web-metrics")];
    ensure!(denials(&lab, "node-2", &converted)? >= 1.0);

    // A typo in the mode: the resource is refused by name and field, and the
    // last good version stays in force.
    lab.write_manifest(
        "peer-authn.yaml",
        &with_exception.replace("STRICT", "STRICTT"),
    )?;
    eventually("the refusal is logged", Duration::from_secs(5), || {
        Ok(lab
            .controller_log()
            .contains("PeerAuthentication shop/default: spec.mtls.mode"))
    })?;
    std::thread::sleep(Duration::from_millis(500));
    ensure!(!reaches(outsider, web), "the last good STRICT stays");
    ensure!(reaches(outsider, metrics_port) && reaches(client, web));
    Ok(())
}

/// A second pod of shop's `client` service account, on node-1 beside `client`.
const CLIENT_2: &str = r#"
---
apiVersion: v1
kind: Pod
metadata:
  name: client-2
  namespace: shop
  labels: {app: client}
spec:
  nodeName: node-1
  serviceAccountName: client
  containers: [{name: app, image: client}]
status:
  podIP: 10.244.1.12
"#;

/// HBONE as Istio's ztunnel expects it: two pods of one service account on
/// one node call one destination; each is seen there with its own address,
/// over its own HBONE connection dialled from that address (Istio takes the
/// TCP peer as the source and refuses a CONNECT to another address than the
/// one dialled), never from the node's. An ipBlocks ALLOW on one pod's /32
/// admits that pod and not its twin.
#[test]
fn hbone_dialled_from_each_source_pod() -> Result<()> {
    let lab = Lab::up(LabOptions::new("hbone-src", &format!("{MESH}{CLIENT_2}")))?;
    let (client, twin, web1) = (
        lab.pod("shop/client"),
        lab.pod("shop/client-2"),
        lab.pod("shop/web-1"),
    );
    let _w1 = apps::serve(web1, 8080, App::WhoAmI)?;
    let remote = addr(web1, 8080);
    let node2 = lab.node("node-2");
    let pcap = lab.dir().join("hbone.pcap");
    let cap = weft_tests::tcpdump::Tcpdump::start(&node2.netns, &node2.underlay_iface, &pcap)?;
    for from in [client, twin] {
        ensure!(reaches(from, remote), "{} is not seen as itself", from.name);
    }
    let pcap = cap.stop()?;
    // The opening SYN of every HBONE connection that reached node-2.
    let syns = weft_tests::tcpdump::read(
        &pcap,
        "tcp dst port 15008 and tcp[tcpflags] & tcp-syn != 0 and tcp[tcpflags] & tcp-ack == 0",
    )?;
    let sources: std::collections::BTreeSet<String> = syns
        .iter()
        .filter_map(|l| {
            l.split_once(" IP ")?
                .1
                .split_once(" > ")?
                .0
                .rsplit_once('.')
        })
        .map(|(ip, _port)| ip.to_string())
        .collect();
    let want: std::collections::BTreeSet<String> =
        [client.ip.to_string(), twin.ip.to_string()].into();
    ensure!(
        sources == want,
        "HBONE connections came from {sources:?}, want one from each pod {want:?}: {syns:?}"
    );

    apply(
        &lab,
        "policy.yaml",
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-from-twin, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules:
  - from:
    - source: {ipBlocks: ["10.244.1.12/32"]}
"#,
        || !reaches(client, remote),
    )?;
    ensure!(reaches(twin, remote), "the /32 of client-2 is allowed");
    Ok(())
}

/// A policy change applies to open connections too, as in Istio's ztunnel:
/// a new DENY closes the long-lived connection it matches (the client sees
/// it end, the log names why), and leaves one it does not match open.
#[test]
fn a_new_deny_closes_the_open_connections_it_matches() -> Result<()> {
    use std::io::{BufRead, BufReader, Write};
    let lab = Lab::up(LabOptions::new("deny-open", MESH))?;
    let client = lab.pod("shop/client");
    let web = lab.pod("shop/web-1");
    let _a = apps::serve(web, 9000, App::Echo)?;
    let _b = apps::serve(web, 9001, App::Echo)?;
    let open = |port: u16| -> Result<(std::net::TcpStream, BufReader<std::net::TcpStream>)> {
        let c = apps::client(client, addr(web, port), Ok)?;
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        let r = BufReader::new(c.try_clone()?);
        Ok((c, r))
    };
    let round_trip = |c: &mut std::net::TcpStream,
                      r: &mut BufReader<std::net::TcpStream>,
                      n: u32|
     -> Result<()> {
        c.write_all(format!("line {n}\n").as_bytes())?;
        let mut line = String::new();
        r.read_line(&mut line)?;
        ensure!(line == format!("line {n}\n"), "echo returned {line:?}");
        Ok(())
    };
    let (mut denied, mut denied_r) = open(9000)?;
    let (mut kept, mut kept_r) = open(9001)?;
    round_trip(&mut denied, &mut denied_r, 0)?;
    round_trip(&mut kept, &mut kept_r, 0)?;

    lab.write_manifest(
        "deny-9000.yaml",
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-9000, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules: [{to: [{operation: {ports: ["9000"]}}]}]
"#,
    )?;
    // Closed within a bounded wait: a write then a read finds the end.
    eventually(
        "the denied connection is closed",
        Duration::from_secs(10),
        || {
            let _ = denied.write_all(b"ping\n");
            let mut line = String::new();
            Ok(matches!(denied_r.read_line(&mut line), Ok(0) | Err(_)))
        },
    )?;
    round_trip(&mut kept, &mut kept_r, 1)?;
    ensure!(
        lab.ztunnel_log("node-2")
            .contains("open connection closed: the policy now denies it"),
        "no log line for the closed connection"
    );
    // What it carried until then is counted: on node-2 only the closed
    // connection has ended, and it received "line 0\n" (7 bytes) at least.
    let received: f64 = lab
        .metrics("node-2")?
        .lines()
        .filter(|l| l.starts_with("istio_tcp_received_bytes_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    ensure!(
        received >= 7.0,
        "the closed connection's bytes are not counted on node-2 ({received})"
    );
    // New connections to 9000 are refused too; 9001 still serves new ones.
    let refused = open(9000).and_then(|(mut c, mut r)| round_trip(&mut c, &mut r, 3));
    ensure!(refused.is_err(), "a new connection to 9000 got through");
    let (mut fresh, mut fresh_r) = open(9001)?;
    round_trip(&mut fresh, &mut fresh_r, 4)?;
    round_trip(&mut kept, &mut kept_r, 2)?;
    Ok(())
}
