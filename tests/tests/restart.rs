//! End-to-end: ztunnel restarted as a rollout restarts it, under load. The
//! new process binds beside the old one (SO_REUSEPORT) and adopts the pinned
//! capture; the old one closes its listeners (queued connections move to the
//! new one, net.ipv4.tcp_migrate_req), sends GOAWAY and lets open
//! connections finish before it exits.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
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

/// Both ztunnels of a rollout hold the readiness port (SO_REUSEPORT), so a
/// probe reaches either. Once the new one has started, the old one never
/// answers ready: every ready answer comes from the new process, and the
/// old one says it was superseded (the pid in each answer tells them apart).
#[test]
fn readiness_answers_only_for_the_newest_ztunnel() -> Result<()> {
    let mut lab = Lab::up(LabOptions::new("succession", SCENARIO))?;
    let node = "node-1";
    let old_pid = lab.ztunnel_pid(node).context("no ztunnel")?;
    let mut old = lab.start_successor(node)?;
    let new_pid = lab.ztunnel_pid(node).context("no new ztunnel")?;
    ensure!(old_pid != new_pid);
    let (mut from_new, mut from_old) = (0, 0);
    // Each probe on a fresh connection: the kernel spreads them over both.
    for _ in 0..60 {
        let (status, body) = lab.http_get(node, 15021, "/healthz/ready")?;
        if body.contains(&format!("pid {new_pid})")) {
            ensure!(
                status == 200,
                "the new ztunnel is not ready: {status} {body}"
            );
            from_new += 1;
        } else if body.contains(&format!("pid {old_pid})")) {
            ensure!(
                status == 503 && body.starts_with("superseded"),
                "the old ztunnel answered {status} {body:?}"
            );
            from_old += 1;
        } else {
            anyhow::bail!("an answer from neither: {status} {body:?}");
        }
    }
    println!(
        "readiness: {from_new} answers from the new ztunnel (ready), {from_old} from the old (superseded)"
    );
    ensure!(
        from_new > 0 && from_old > 0,
        "the probes did not reach both ({from_new}/{from_old})"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    old.wait()?;
    let (status, body) = lab.http_get(node, 15021, "/healthz/ready")?;
    ensure!(
        status == 200 && body.contains(&format!("pid {new_pid})")),
        "{status} {body}"
    );
    Ok(())
}
