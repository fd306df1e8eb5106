//! The control plane under the data plane: certificates from the mesh CA
//! renewed under live traffic, and a controller outage that the data plane
//! rides out, then resyncs from.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use weft_api::Identity;
use weft_hbone::ca::Ca;
use weft_hbone::tls::TrustRoots;
use weft_tests::apps::{self, App};
use weft_tests::check::eventually;
use weft_tests::lab::LabPod;
use weft_tests::peer::{self, Attempt, Outcome};
use weft_tests::{Lab, LabOptions};

const SCENARIO: &str = include_str!("../../examples/l4/mesh.yaml");

fn addr(pod: &LabPod, port: u16) -> SocketAddr {
    SocketAddr::new(pod.ip.into(), port)
}

/// A connection opened from inside `pod`, usable from this thread.
fn connect(pod: &LabPod, dst: SocketAddr) -> Result<(TcpStream, BufReader<TcpStream>)> {
    let conn = apps::client(pod, dst, Ok)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let reader = BufReader::new(conn.try_clone()?);
    Ok((conn, reader))
}

/// One echo round trip with a numbered line.
fn round_trip(conn: &mut TcpStream, reader: &mut BufReader<TcpStream>, i: usize) -> Result<()> {
    let line = format!("ping {i} {}\n", "x".repeat(1000));
    conn.write_all(line.as_bytes())?;
    let mut back = String::new();
    reader
        .read_line(&mut back)
        .with_context(|| format!("round trip {i}"))?;
    ensure!(
        back == line,
        "round trip {i}: echoed {} bytes that differ",
        back.len()
    );
    Ok(())
}

/// `not_after` of the certificate ztunnel on `node` holds for `identity`.
fn not_after(lab: &Lab, node: &str, identity: &str) -> Result<u64> {
    let dump = lab.config_dump(node)?;
    dump["certificates"]
        .as_array()
        .and_then(|certs| certs.iter().find(|c| c["identity"] == identity))
        .and_then(|c| c["not_after"].as_u64())
        .with_context(|| {
            format!(
                "no certificate for {identity} on {node}: {}",
                dump["certificates"]
            )
        })
}

/// With 4 s certificates, both ends renew at half-life while one connection
/// carries traffic; the connection never drops and new ones use the new certificates.
#[test]
fn certificates_renew_under_live_traffic() -> Result<()> {
    let lab = Lab::up(
        LabOptions::new("renewal", SCENARIO)
            .env("CERT_TTL_SECONDS", "4")
            .controller_env("MAX_CERT_TTL_SECONDS", "4"),
    )?;
    let (client, web) = (
        lab.pod("shop/client").clone(),
        lab.pod("shop/web-1").clone(),
    );
    let _echo = apps::serve(&web, 9000, App::Echo)?;
    let web_id = "spiffe://cluster.local/ns/shop/sa/web";
    let client_id = "spiffe://cluster.local/ns/shop/sa/client";
    let (mut conn, mut reader) = connect(&client, addr(&web, 9000))?;
    // The first round trip sets up the tunnel: both ends hold certificates after it.
    round_trip(&mut conn, &mut reader, 0)?;
    let first = (
        not_after(&lab, "node-2", web_id)?,
        not_after(&lab, "node-1", client_id)?,
    );
    let mut renewals = 0;
    let mut last = first;
    let start = Instant::now();
    let mut i = 1;
    while start.elapsed() < Duration::from_secs(7) {
        round_trip(&mut conn, &mut reader, i)?;
        i += 1;
        let now = (
            not_after(&lab, "node-2", web_id)?,
            not_after(&lab, "node-1", client_id)?,
        );
        if now.0 > last.0 {
            renewals += 1;
        }
        last = now;
        std::thread::sleep(Duration::from_millis(100));
    }
    ensure!(
        renewals >= 2,
        "web's certificate renewed {renewals} times in 7 s (lifetime 4 s)"
    );
    ensure!(last.1 > first.1, "client's certificate never renewed");
    // A new connection handshakes with the renewed certificates.
    let (mut fresh, mut fresh_reader) = connect(&client, addr(&web, 9000))?;
    round_trip(&mut fresh, &mut fresh_reader, 0)?;
    ensure!(
        lab.controller_log().matches("certificate signed").count() >= 6,
        "the controller signed too few certificates:\n{}",
        lab.controller_log()
    );
    Ok(())
}

/// The controller is killed: open and new connections between known
/// workloads keep working on the last good state. A change made meanwhile
/// lands when it is back.
#[test]
fn controller_outage_then_resync() -> Result<()> {
    let mut lab = Lab::up(LabOptions::new("outage", SCENARIO))?;
    let (client, web) = (
        lab.pod("shop/client").clone(),
        lab.pod("shop/web-1").clone(),
    );
    let _echo = apps::serve(&web, 9000, App::Echo)?;
    let _who = apps::serve(&web, 8080, App::WhoAmI)?;
    let (mut conn, mut reader) = connect(&client, addr(&web, 9000))?;
    round_trip(&mut conn, &mut reader, 0)?;

    lab.kill_controller()?;
    eventually(
        "ztunnels notice the outage",
        Duration::from_secs(10),
        || {
            Ok(lab
                .ztunnel_log("node-1")
                .contains("serving the last good state"))
        },
    )?;
    round_trip(&mut conn, &mut reader, 1)?;
    let seen = apps::whoami(&client, addr(&web, 8080))?;
    ensure!(
        seen.ip() == std::net::IpAddr::from(client.ip),
        "server saw {seen}"
    );

    // While it is down, web-1 leaves the mesh (pod label); nothing can change yet.
    lab.label("Pod", "shop/web-1", "istio.io/dataplane-mode", Some("none"))?;
    std::thread::sleep(Duration::from_secs(1));
    lab.wait_captured("shop/web-1", true)?;

    lab.start_controller()?;
    lab.wait_captured("shop/web-1", false)?;
    round_trip(&mut conn, &mut reader, 2)?;
    ensure!(
        lab.ztunnel_alive("node-1") && lab.ztunnel_alive("node-2"),
        "a ztunnel died"
    );
    Ok(())
}

/// Root rotation as Istio does it: the new root joins the trust bundle, then
/// the signing CA moves to it. With 4 s certificates renewing throughout, one
/// connection carries traffic from start to end and never drops, and new
/// connections work after each step. At the end both ztunnels present
/// certificates of the new root and accept peers that only it vouches for.
#[test]
fn root_rotation_under_live_traffic() -> Result<()> {
    let mut lab = Lab::up(
        LabOptions::new("rotate", SCENARIO)
            .env("CERT_TTL_SECONDS", "4")
            .controller_env("MAX_CERT_TTL_SECONDS", "4"),
    )?;
    let (client, web1, web2, outsider) = (
        lab.pod("shop/client").clone(),
        lab.pod("shop/web-1").clone(),
        lab.pod("shop/web-2").clone(),
        lab.pod("legacy/outsider").clone(),
    );
    let _echo1 = apps::serve(&web1, 9000, App::Echo)?;
    let _echo2 = apps::serve(&web2, 9000, App::Echo)?;
    let (mut conn, mut reader) = connect(&client, addr(&web1, 9000))?;
    round_trip(&mut conn, &mut reader, 0)?;
    let mut i = 1;
    // Round trips on the live connection for `secs`, then one on a new one.
    let mut traffic = |conn: &mut TcpStream, reader: &mut BufReader<TcpStream>, secs: u64| {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(secs) {
            round_trip(conn, reader, i)?;
            i += 1;
            std::thread::sleep(Duration::from_millis(100));
        }
        let (mut fresh, mut fresh_reader) = connect(&client, addr(&web1, 9000))?;
        round_trip(&mut fresh, &mut fresh_reader, 0)
    };

    let old = lab.ca()?;
    let new = Ca::generate("cluster.local")?;
    let dir = lab.ca_dir();
    let bundle = format!("{}{}", old.cert_pem(), new.cert_pem());
    let plug_in = |cert: &str, key: &str| -> Result<()> {
        std::fs::write(dir.join("ca-cert.pem"), cert)?;
        std::fs::write(dir.join("ca-key.pem"), key)?;
        std::fs::write(dir.join("root-cert.pem"), &bundle)?;
        Ok(())
    };

    // 1. Trust both roots; the old one still signs.
    plug_in(old.cert_pem(), &old.key_pem())?;
    lab.kill_controller()?;
    lab.start_controller()?;
    traffic(&mut conn, &mut reader, 5)?;
    for node in ["node-1", "node-2"] {
        ensure!(
            lab.ztunnel_log(node).contains("mesh trust roots updated"),
            "{node} never learned the bundle"
        );
    }

    // 2. The new root signs.
    plug_in(new.cert_pem(), &new.key_pem())?;
    lab.kill_controller()?;
    lab.start_controller()?;
    traffic(&mut conn, &mut reader, 5)?;

    // Both ztunnels now prove themselves with the new root, and accept a
    // peer whose certificate only the new root vouches for (dialled from a
    // pod outside the mesh, so no ztunnel tunnels it on the way out).
    let client_id: Identity = "spiffe://cluster.local/ns/shop/sa/client".parse()?;
    let web_id: Identity = "spiffe://cluster.local/ns/shop/sa/web".parse()?;
    for (node, web) in [("node-2", &web1), ("node-1", &web2)] {
        let outcome = peer::attempt(
            &outsider,
            Attempt {
                server: addr(web, 15008),
                expect: web_id.clone(),
                cert: Some(new.issue(&client_id, Duration::from_secs(600))?),
                roots: TrustRoots::from_pem(new.cert_pem())?,
                target: addr(web, 9000),
                forwarded: Some(client.ip.into()),
                payload: b"new root\n".to_vec(),
            },
        )?;
        ensure!(
            outcome == Outcome::Open(b"new root\n".to_vec()),
            "{node}: {outcome:?}\n{}",
            lab.ztunnel_log(node)
                .lines()
                .filter(|l| l.contains("refused") || l.contains("roots") || l.contains("WARN"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    round_trip(&mut conn, &mut reader, i)?;
    Ok(())
}

/// SIGTERM: the controller closes its xDS streams and exits within 5 s,
/// without waiting for the ztunnels connected to it, which keep serving.
#[test]
fn controller_exits_promptly_on_sigterm() -> Result<()> {
    let mut lab = Lab::up(LabOptions::new("ctl-stop", SCENARIO))?;
    let (client, web) = (
        lab.pod("shop/client").clone(),
        lab.pod("shop/web-1").clone(),
    );
    let _echo = apps::serve(&web, 9000, App::Echo)?;
    let (mut conn, mut reader) = connect(&client, addr(&web, 9000))?;
    round_trip(&mut conn, &mut reader, 0)?;
    let (took, status) = lab.stop_controller(Duration::from_secs(15))?;
    println!("controller exited {took:?} after SIGTERM ({status})");
    ensure!(
        took < Duration::from_secs(5),
        "the controller took {took:?} to exit"
    );
    ensure!(status.success(), "the controller exited with {status}");
    ensure!(
        lab.controller_log().contains("controller stopped"),
        "no orderly stop in the log"
    );
    round_trip(&mut conn, &mut reader, 1)?;
    ensure!(
        lab.ztunnel_alive("node-1") && lab.ztunnel_alive("node-2"),
        "a ztunnel died"
    );
    Ok(())
}

/// A restarted ztunnel serves only once it holds the whole state. The
/// controller sends its pushes in parts (`XDS_PUSH_CHUNK=1`), and a relay
/// between it and node-1's new ztunnel holds back the end of the first
/// Address push. ztunnel applies and ACKs the parts before it, yet stays
/// unready, and a captured pod on its node cannot connect: a half-known
/// mesh passes no traffic. Once the end arrives, ztunnel turns ready and
/// the same connection works.
#[test]
fn a_restarted_ztunnel_is_ready_only_after_the_end_of_state() -> Result<()> {
    let mut lab =
        Lab::up(LabOptions::new("end-of-state", SCENARIO).controller_env("XDS_PUSH_CHUNK", "1"))?;
    let (client, web) = (
        lab.pod("shop/client").clone(),
        lab.pod("shop/web-1").clone(),
    );
    let _echo = apps::serve(&web, 9000, App::Echo)?;
    {
        let (mut conn, mut reader) = connect(&client, addr(&web, 9000))?;
        round_trip(&mut conn, &mut reader, 0)?;
    }

    let relay = weft_tests::relay::Relay::start(&lab, 15013)?;
    lab.kill_ztunnel("node-1")?;
    lab.add_ztunnel_env(vec![("XDS_ADDRESS".into(), relay.addr.to_string())]);
    lab.start_ztunnel_again("node-1")?;
    eventually(
        "the relay holds the end of the first Address push, the parts before it ACKed",
        Duration::from_secs(20),
        || {
            let (passed, acked) = relay.partial();
            Ok(relay.holding() && passed >= 2 && acked == passed)
        },
    )?;
    let (status, body) = lab.http_get("node-1", 15021, "/healthz/ready")?;
    ensure!(status == 503, "ready with half the state: {status} {body}");
    let dst = addr(&web, 9000);
    let got_through = client
        .netns
        .run(move || Ok(TcpStream::connect_timeout(&dst, Duration::from_secs(2)).is_ok()))?;
    ensure!(
        !got_through,
        "a connection got through a ztunnel that holds half the state"
    );
    ensure!(relay.holding(), "still held while unready");

    relay.release();
    lab.wait_ztunnel_ready("node-1")?;
    let (mut conn, mut reader) = connect(&client, addr(&web, 9000))?;
    round_trip(&mut conn, &mut reader, 1)?;
    let (passed, acked) = relay.partial();
    ensure!(acked == passed, "every part ACKed: {acked} of {passed}");
    // The parts were applied once, as one push: ztunnel's apply histogram
    // counts whole responses, not parts.
    let metrics = lab.metrics("node-1")?;
    let applies = metrics
        .lines()
        .find(|l| l.starts_with("weft_xds_apply_seconds_count{type=\"address\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .context("no weft_xds_apply_seconds_count for address")?;
    ensure!(
        applies >= 1 && (applies as usize) < passed + 1,
        "{applies} Address applies for {passed} parts and an end"
    );
    Ok(())
}
