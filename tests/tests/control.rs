//! The control plane under the data plane: certificates from the mesh CA
//! renewed under live traffic, and a controller outage that the data plane
//! rides out, then resyncs from.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use weft_tests::apps::{self, App};
use weft_tests::check::eventually;
use weft_tests::lab::LabPod;
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
