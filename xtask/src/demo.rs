//! `cargo xtask demo`: the L4 mesh on two lab nodes, with real traffic, and
//! what it looked like: client addresses, the wire, refusals, metrics, and
//! Istio policy applied as a manifest.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use weft_hbone::ca::Ca;
use weft_tests::apps::{self, App};
use weft_tests::check::{eventually, metric_sum};
use weft_tests::peer::{self, Attempt, Outcome};
use weft_tests::{Lab, LabOptions, tcpdump};

use crate::lab::{print_lab, scenario};
use crate::util::{build_bins, require_root};

fn curl(lab: &Lab, pod: &str, url: &str) -> Result<String> {
    let out = lab
        .pod(pod)
        .netns
        .exec_output("curl", &["-sS", "--max-time", "5", url])?;
    if !out.status.success() {
        bail!(
            "curl {url} from {pod}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub fn run() -> Result<()> {
    require_root("cargo xtask demo")?;
    let bins = build_bins(false)?;
    let mut opts = LabOptions::new("demo", &scenario("l4")?);
    opts.bin_dir = bins;
    println!("\n== Weft demo: examples/l4 — namespace shop is ambient, legacy is not ==");
    let started = Instant::now();
    let lab = Lab::up(opts)?;
    println!("({:.1}s)", started.elapsed().as_secs_f32());
    print_lab(&lab);
    let mut servers = Vec::new();
    for pod in ["shop/web-1", "shop/web-2", "legacy/plain"] {
        servers.push(apps::serve(lab.pod(pod), 8080, App::Http)?);
    }

    println!("\n1. shop/client (node-1) -> shop/web-1 (node-2): curl http://10.244.2.10:8080/");
    let pcap = lab.dir().join("demo.pcap");
    let cap = tcpdump::Tcpdump::start(&lab.node("node-1").netns, "eth0", &pcap).ok();
    let reply = curl(&lab, "shop/client", "http://10.244.2.10:8080/")?;
    println!("   {reply}   <- the server sees the client's own address");
    if let Some(cap) = cap {
        let pcap = cap.stop()?;
        let all = tcpdump::read(&pcap, "tcp")?;
        let hbone = tcpdump::read(&pcap, "tcp port 15008")?;
        let raw = std::fs::read(&pcap)?;
        let plaintext = raw.windows(10).any(|w| w == b"hello from");
        println!(
            "   on the underlay: {} TCP packets, {} of them HBONE (port 15008); TLS 1.3 records: {}; plaintext \"hello from\" seen: {}",
            all.len(),
            hbone.len(),
            if raw.windows(3).any(|w| w == [0x17, 0x03, 0x03]) {
                "yes"
            } else {
                "no"
            },
            if plaintext { "YES (bad)" } else { "no" }
        );
    } else {
        println!("   (install tcpdump to see the wire)");
    }

    println!("\n2. shop/client -> Service web (10.96.0.10:80 -> pods' port 'http'), four calls:");
    for _ in 0..4 {
        println!("   {}", curl(&lab, "shop/client", "http://10.96.0.10/")?);
    }
    println!("   round robin over web-1 (other node, HBONE) and web-2 (same node, in-process)");

    println!(
        "\n3. legacy/outsider (not in the mesh) -> shop/web-1: plaintext, accepted (PERMISSIVE)"
    );
    println!(
        "   {}",
        curl(&lab, "legacy/outsider", "http://10.244.2.10:8080/")?
    );
    println!("   legacy/outsider -> legacy/plain: no mesh on either side, untouched");
    println!(
        "   {}",
        curl(&lab, "legacy/outsider", "http://10.244.2.20:8080/")?
    );

    println!("\n4. A forged peer: valid-looking certificate for shop/client, from another CA,");
    println!("   dials web-1's HBONE port from legacy/outsider:");
    let forged_ca = Ca::generate("cluster.local").context("generating the forged CA")?;
    let client_id = "spiffe://cluster.local/ns/shop/sa/client".parse()?;
    let web_id = "spiffe://cluster.local/ns/shop/sa/web".parse()?;
    let cert = forged_ca.issue(&client_id, Duration::from_secs(3600))?;
    let roots = weft_hbone::tls::TrustRoots::from_pem(lab.ca()?.cert_pem())?;
    let web = lab.pod("shop/web-1");
    let outcome = peer::attempt(
        lab.pod("legacy/outsider"),
        Attempt {
            server: SocketAddr::new(web.ip.into(), 15008),
            expect: web_id,
            cert: Some(cert),
            roots,
            target: SocketAddr::new(web.ip.into(), 8080),
            forwarded: Some(lab.pod("shop/client").ip.into()),
            payload: b"GET / HTTP/1.0\r\n\r\n".to_vec(),
        },
    )?;
    match outcome {
        Outcome::Open(_) => bail!("the forged peer got through"),
        Outcome::Refused(code) => println!("   refused: HTTP {code}"),
        Outcome::Failed(e) => println!("   refused during the handshake: {e}"),
    }

    println!("\n5. Metrics (node-2, istio_tcp_connections_opened_total, reporter=destination):");
    eventually("metrics", Duration::from_secs(5), || {
        let m = lab.metrics("node-2")?;
        Ok(metric_sum(
            &m,
            "istio_tcp_connections_opened_total",
            &[("reporter", "destination")],
        ) >= 4.0)
    })?;
    let m = lab.metrics("node-2")?;
    for line in m.lines().filter(|l| {
        l.starts_with("istio_tcp_connections_opened_total")
            || l.starts_with("weft_connections_refused_total")
    }) {
        let short: Vec<&str> = line
            .split(',')
            .filter(|kv| {
                [
                    "source_workload",
                    "destination_workload",
                    "connection_security_policy",
                    "reason",
                    "} ",
                ]
                .iter()
                .any(|k| kv.contains(k))
                    || kv.starts_with("istio")
                    || kv.starts_with("weft")
            })
            .collect();
        println!("   {}", short.join(","));
    }
    policy(&lab)?;
    drop(servers);
    println!("\n== removing the lab ==");
    drop(lab);
    println!("done: no namespaces, links, programs or processes left behind.");
    Ok(())
}

/// Istio's policy kinds, as a user applies them.
const POLICY: &str = r#"apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec:
  mtls: {mode: STRICT}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-from-client, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/shop/sa/client"]}
"#;

/// Step 6: a PeerAuthentication and an AuthorizationPolicy, written to the
/// controller's manifests directory, enforced by the destination's ztunnel.
fn policy(lab: &Lab) -> Result<()> {
    println!("\n6. Policy, as a manifest (what kubectl apply is in a cluster):");
    println!("   PeerAuthentication shop/default: STRICT");
    println!(
        "   AuthorizationPolicy shop/web-from-client: app=web ALLOW from principal cluster.local/ns/shop/sa/client"
    );
    let start = Instant::now();
    lab.write_manifest("policy.yaml", POLICY)?;
    let url = "http://10.244.2.10:8080/";
    eventually("the policy is in force", Duration::from_secs(5), || {
        Ok(curl(lab, "legacy/outsider", url).is_err())
    })?;
    println!(
        "   in force on new connections after {} ms",
        start.elapsed().as_millis()
    );
    for (pod, allowed, why) in [
        ("shop/client", true, "allowed by principal"),
        (
            "shop/web-2",
            false,
            "mTLS, but principal shop/sa/web is not allowed",
        ),
        ("legacy/outsider", false, "plaintext: STRICT refuses it"),
    ] {
        match (curl(lab, pod, url), allowed) {
            (Ok(reply), true) => println!("   {pod:<16} -> shop/web-1: {reply}   ({why})"),
            (Err(_), false) => println!("   {pod:<16} -> shop/web-1: refused   ({why})"),
            (Ok(_), false) => bail!("{pod} got through to shop/web-1; the policy should refuse it"),
            (Err(e), true) => bail!("{pod} was refused: {e:#}"),
        }
    }
    println!("   node-2 counts each denial by the policy that decided it:");
    let m = lab.metrics("node-2")?;
    for line in m
        .lines()
        .filter(|l| l.starts_with("weft_policy_denials_total"))
    {
        println!("   {line}");
    }
    Ok(())
}
