//! End-to-end: ztunnel restarted as a rollout restarts it, under load. The
//! new process binds beside the old one (SO_REUSEPORT) and adopts the pinned
//! capture; the old one closes its listeners (queued connections move to the
//! new one, net.ipv4.tcp_migrate_req), sends GOAWAY and lets open
//! connections finish before it exits.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Result, ensure};
use weft_tests::apps::{self, App};
use weft_tests::lab::LabPod;
use weft_tests::{Lab, LabOptions, rollout};

const SCENARIO: &str = include_str!("../../examples/l4/mesh.yaml");
const MB: u64 = 1024 * 1024;

fn addr(pod: &LabPod, port: u16) -> SocketAddr {
    SocketAddr::new(pod.ip.into(), port)
}

/// Restarts ztunnel on `node` while shop/client opens 200 connections a
/// second to web-1 for 10 s and a paced upload runs across the restart:
/// no connection fails, the upload arrives whole (SHA-256), and the old
/// ztunnel drains and exits by itself.
fn restart_under_load(node: &str) -> Result<()> {
    let mut lab = Lab::up(LabOptions::new(&format!("restart-{node}"), SCENARIO))?;
    let client = lab.pod("shop/client").clone();
    let web = lab.pod("shop/web-1").clone();
    let _echo = apps::serve(&web, 7000, App::Echo)?;
    let _sink = apps::serve(&web, 9000, App::Sink)?;
    // Warm: certificates issued, pooled connections up.
    ensure!(
        apps::churn(&client, addr(&web, 7000), 50, Duration::from_millis(200))?
            .failed
            .is_empty()
    );

    let ports = (addr(&web, 7000), addr(&web, 9000));
    let rollout =
        rollout::restart_under_load(&mut lab, node, &client, ports, 200, Duration::from_secs(10))?;
    let churned = &rollout.churn;
    let sent = rollout
        .upload
        .as_ref()
        .map_err(|e| anyhow::anyhow!("the transfer across the restart: {e:#}"))?;
    println!(
        "{node} restarted: {} connections, {} failed; {} MB uploaded across it",
        churned.ok + churned.failed.len() as u64,
        churned.failed.len(),
        sent / MB
    );
    if !churned.failed.is_empty() {
        for n in ["node-1", "node-2"] {
            for line in lab
                .ztunnel_log(n)
                .lines()
                .filter(|l| {
                    !l.contains("connection complete")
                        && (l.contains("WARN") || l.contains("refused") || l.contains("drain"))
                })
                .take(12)
            {
                eprintln!("{n}: {}", &line[..line.len().min(400)]);
            }
        }
    }
    ensure!(
        churned.failed.is_empty(),
        "{} of {} connections failed across the restart: {:?}",
        churned.failed.len(),
        churned.ok + churned.failed.len() as u64,
        &churned.failed[..churned.failed.len().min(5)]
    );
    ensure!(churned.ok >= 1500, "only {} connections made", churned.ok);
    // The old one drained (its connections finished) and exited cleanly.
    let status = rollout.old_exit;
    ensure!(status.success(), "the old ztunnel exited with {status}");
    let log = lab.ztunnel_log(node);
    ensure!(
        log.contains("drained: every connection finished"),
        "the old ztunnel did not drain"
    );
    ensure!(lab.ztunnel_alive(node), "the new ztunnel is not running");
    Ok(())
}

/// The client's node: the outbound listener and the HBONE client side.
#[test]
fn restart_source_node_drops_nothing() -> Result<()> {
    restart_under_load("node-1")
}

/// The server's node: the HBONE listener, whose old connections get GOAWAY.
#[test]
fn restart_destination_node_drops_nothing() -> Result<()> {
    restart_under_load("node-2")
}
