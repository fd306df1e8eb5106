//! A rolling restart under load, as the restart e2e test and
//! `cargo xtask bench restart` both run it: a pod opens connections at a fixed
//! rate and uploads at a fixed rate while ztunnel on one node is restarted
//! beside itself, and the old process drains and exits.

use std::net::SocketAddr;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};

use crate::Lab;
use crate::apps::{self, Churn};
use crate::lab::{LabPod, wait_exit};

/// Upload rate across the restart.
pub const UPLOAD_BYTES_PER_SEC: u64 = 4 * 1024 * 1024;
/// How long the old ztunnel may take to drain and exit.
const EXIT_WITHIN: Duration = Duration::from_secs(40);

/// What a rolling restart came to.
#[derive(Debug)]
pub struct Rollout {
    /// The connections opened across it.
    pub churn: Churn,
    /// Bytes uploaded across it, checked by SHA-256 at the sink; or why not.
    pub upload: Result<u64>,
    /// How the old ztunnel exited.
    pub old_exit: ExitStatus,
}

/// From `client`: connections to the [`apps::App::Echo`] at `echo` at `rate`
/// per second for `time`, and an upload to the [`apps::App::Sink`] at `sink`
/// for `time` less 2 s; 2 s in, ztunnel on `node` is restarted. Returns once
/// the load is done and the old ztunnel has exited.
pub fn restart_under_load(
    lab: &mut Lab,
    node: &str,
    client: &LabPod,
    (echo, sink): (SocketAddr, SocketAddr),
    rate: u32,
    time: Duration,
) -> Result<Rollout> {
    let (c1, c2) = (client.clone(), client.clone());
    let churn = std::thread::spawn(move || apps::churn(&c1, echo, rate, time));
    let upload = std::thread::spawn(move || {
        apps::paced_upload(
            &c2,
            sink,
            UPLOAD_BYTES_PER_SEC,
            time - Duration::from_secs(2),
        )
    });
    std::thread::sleep(Duration::from_secs(2));
    let restarted = Instant::now();
    let mut old = lab.restart_ztunnel(node)?;
    let churn = churn.join().map_err(|_| anyhow!("churn panicked"))??;
    let upload = upload.join().map_err(|_| anyhow!("upload panicked"))?;
    let old_exit = wait_exit(
        &mut old,
        &format!("the old ztunnel on {node}"),
        EXIT_WITHIN.saturating_sub(restarted.elapsed()),
    )?;
    Ok(Rollout {
        churn,
        upload,
        old_exit,
    })
}
