//! End-to-end: bad input from the network is refused with a reason, counted,
//! and harms nothing else. Each probe comes from a pod's namespace, as an
//! attacker on the pod network would.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Result, ensure};
use weft_hbone::tls::TrustRoots;
use weft_tests::apps::{self, App};
use weft_tests::check::{eventually, metric_sum};
use weft_tests::lab::LabPod;
use weft_tests::peer::{self, Attempt, Outcome};
use weft_tests::{Lab, LabOptions};

const SCENARIO: &str = include_str!("../../examples/l4/mesh.yaml");

fn hbone(pod: &LabPod) -> SocketAddr {
    SocketAddr::new(pod.ip.into(), 15008)
}

/// Sends `bytes` raw to `dst` from `pod`; returns what came back before close.
fn raw(pod: &LabPod, dst: SocketAddr, bytes: &'static [u8]) -> Result<Vec<u8>> {
    pod.netns.run(move || {
        let mut c = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
        c.set_read_timeout(Some(Duration::from_secs(15)))?;
        c.write_all(bytes)?;
        let mut back = Vec::new();
        let _ = c.read_to_end(&mut back);
        Ok(back)
    })
}

fn refused(lab: &Lab, node: &str, reason: &str) -> Result<f64> {
    let m = lab.metrics(node)?;
    Ok(metric_sum(
        &m,
        "weft_connections_refused_total",
        &[("reason", reason)],
    ))
}

/// Garbage, plain HTTP/1, TLS without a client certificate, a certificate from
/// another root, CONNECT to addresses that are not this node's captured pods,
/// a tunnel to the HBONE port, and peers that speak for another identity's
/// client address: each refused with its reason, ztunnel unharmed.
#[test]
fn hbone_refusals() -> Result<()> {
    let mut lab = Lab::up(LabOptions::new("refuse", SCENARIO))?;
    let (outsider, client, web1) = (
        lab.pod("legacy/outsider"),
        lab.pod("shop/client"),
        lab.pod("shop/web-1"),
    );
    let _who = apps::serve(web1, 8080, App::WhoAmI)?;

    // Not TLS at all: the handshake fails, the connection is closed.
    let back = raw(outsider, hbone(web1), b"\x00\x01garbage\xff\xfe\r\n\r\n")?;
    ensure!(back.is_empty() || back[0] == 0x15, "garbage got {back:?}");
    let back = raw(
        outsider,
        hbone(web1),
        b"GET / HTTP/1.1\r\nHost: web\r\n\r\n",
    )?;
    ensure!(
        !back.starts_with(b"HTTP/1.1 200"),
        "plain HTTP/1 got an answer"
    );
    eventually("tls refusals", Duration::from_secs(5), || {
        Ok(refused(&lab, "node-2", "tls_handshake")? >= 2.0)
    })?;

    let ca = lab.ca()?;
    let roots = TrustRoots::from_pem(ca.cert_pem())?;
    let id = |sa: &str, ns: &str| format!("spiffe://cluster.local/ns/{ns}/sa/{sa}").parse();
    let client_cert = ca.issue(&id("client", "shop")?, Duration::from_secs(600))?;
    let web_cert = ca.issue(&id("web", "shop")?, Duration::from_secs(600))?;
    let foreign = weft_hbone::ca::Ca::generate("cluster.local")?
        .issue(&id("client", "shop")?, Duration::from_secs(600))?;
    let base = Attempt {
        server: hbone(web1),
        expect: id("web", "shop")?,
        cert: Some(client_cert.clone()),
        roots: roots.clone(),
        target: SocketAddr::new(web1.ip.into(), 8080),
        forwarded: Some(client.ip.into()),
        payload: Vec::new(),
    };

    // The control: a well-formed attempt gets through and the server sees the client.
    match peer::attempt(outsider, base.clone())? {
        Outcome::Open(back) => {
            let seen = String::from_utf8_lossy(&back);
            ensure!(
                seen.starts_with(&format!("{}:", client.ip)),
                "server saw {seen}"
            );
        }
        other => anyhow::bail!("control attempt: {other:?}"),
    }

    type Case<'a> = (&'a str, Attempt, fn(&Outcome) -> bool, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            "no client certificate",
            Attempt {
                cert: None,
                ..base.clone()
            },
            |o| matches!(o, Outcome::Failed(_)),
            "tls_handshake",
        ),
        (
            "certificate from another root",
            Attempt {
                cert: Some(foreign),
                ..base.clone()
            },
            |o| matches!(o, Outcome::Failed(_)),
            "tls_handshake",
        ),
        (
            "CONNECT to a pod outside the mesh",
            Attempt {
                target: SocketAddr::new(lab.pod("legacy/plain").ip.into(), 8080),
                ..base.clone()
            },
            |o| *o == Outcome::Refused(400),
            "unknown_destination",
        ),
        (
            "CONNECT to a pod on another node",
            Attempt {
                target: SocketAddr::new(client.ip.into(), 8080),
                ..base.clone()
            },
            |o| *o == Outcome::Refused(400),
            "unknown_destination",
        ),
        (
            "CONNECT to the HBONE port",
            Attempt {
                target: hbone(web1),
                ..base.clone()
            },
            |o| *o == Outcome::Refused(400),
            "loop_detected",
        ),
        (
            "no Forwarded client",
            Attempt {
                forwarded: None,
                ..base.clone()
            },
            |o| *o == Outcome::Refused(400),
            "bad_request",
        ),
        (
            "Forwarded names another identity's pod",
            Attempt {
                forwarded: Some(outsider.ip.into()),
                ..base.clone()
            },
            |o| *o == Outcome::Refused(401),
            "identity_mismatch",
        ),
        (
            "peer web speaks for the client's address",
            Attempt {
                cert: Some(web_cert),
                ..base.clone()
            },
            |o| *o == Outcome::Refused(401),
            "identity_mismatch",
        ),
    ];
    for (name, attempt, ok, reason) in cases {
        let before = refused(&lab, "node-2", reason)?;
        let outcome = peer::attempt(outsider, attempt)?;
        ensure!(ok(&outcome), "{name}: got {outcome:?}");
        eventually(name, Duration::from_secs(5), || {
            Ok(refused(&lab, "node-2", reason)? > before)
        })?;
    }
    // The log names the reason for the refusal in words.
    let log = lab.ztunnel_log("node-2");
    ensure!(
        log.contains("which is not one of its workloads"),
        "no identity-mismatch log line"
    );
    ensure!(
        log.contains("no captured pod with that address on node node-2"),
        "no unknown-destination log line"
    );

    // A stalled peer holds a connection open; everyone else is unaffected.
    let stalled = outsider.netns.run({
        let dst = hbone(web1);
        move || Ok(TcpStream::connect_timeout(&dst, Duration::from_secs(5))?)
    })?;
    let seen = apps::whoami(client, SocketAddr::new(web1.ip.into(), 8080))?;
    ensure!(
        seen.ip() == client.ip,
        "mesh call during a stalled peer saw {seen}"
    );
    drop(stalled);
    ensure!(
        lab.ztunnel_alive("node-1") && lab.ztunnel_alive("node-2"),
        "a ztunnel died"
    );
    Ok(())
}

/// A connection storm past the listener's limit is refused (counted as
/// overloaded) without taking ztunnel down, and service resumes after it.
#[test]
fn connection_storm_is_bounded() -> Result<()> {
    const LIMIT: usize = 64;
    let mut lab =
        Lab::up(LabOptions::new("storm", SCENARIO).env("MAX_CONNECTIONS", &LIMIT.to_string()))?;
    let (outsider, client, web1) = (
        lab.pod("legacy/outsider"),
        lab.pod("shop/client"),
        lab.pod("shop/web-1"),
    );
    let _echo = apps::serve(web1, 7000, App::Echo)?;
    let dst = SocketAddr::new(web1.ip.into(), 7000);
    // 4x the limit of plaintext connections into the mesh, all held open.
    let held = outsider.netns.run(move || {
        let mut conns = Vec::new();
        for _ in 0..LIMIT * 4 {
            if let Ok(c) = TcpStream::connect_timeout(&dst, Duration::from_secs(5)) {
                conns.push(c);
            }
        }
        Ok(conns)
    })?;
    let mut alive = 0;
    for mut c in held.iter() {
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut b = [0u8; 1];
        if c.write_all(b"x").is_ok() && c.read_exact(&mut b).is_ok() {
            alive += 1;
        }
    }
    ensure!(
        alive <= LIMIT,
        "{alive} connections served past the limit of {LIMIT}"
    );
    ensure!(
        alive >= LIMIT / 2,
        "only {alive} connections served under a limit of {LIMIT}"
    );
    ensure!(
        refused(&lab, "node-2", "overloaded")? >= (LIMIT * 2) as f64,
        "overload not counted"
    );
    drop(held);
    eventually("service resumes", Duration::from_secs(10), || {
        let seen = apps::client(client, dst, |mut c| {
            c.write_all(b"ping")?;
            let mut b = [0u8; 4];
            c.read_exact(&mut b)?;
            Ok(b)
        });
        Ok(seen.is_ok_and(|b| &b == b"ping"))
    })?;
    ensure!(lab.ztunnel_alive("node-2"), "ztunnel died in the storm");
    Ok(())
}
