//! The policy route that makes the kernel deliver assigned segments locally:
//! `ip rule fwmark <mark> lookup <table>` + `local 0.0.0.0/0 dev lo table <table>`.
//!
//! Without it a segment whose socket was assigned at tc ingress would still be
//! forwarded, since its destination is not a local address.

use std::process::Command;

use tracing::info;

/// The capture policy route. Like the pinned capture it outlives ztunnel (a
/// restart must not stop assigned segments reaching the new listeners); only
/// [`PolicyRoute::uninstall`] removes it.
#[derive(Debug)]
pub struct PolicyRoute;

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("cannot run `ip {args}` (is iproute2 installed?): {source}")]
    Spawn {
        args: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`ip {args}` failed: {stderr}")]
    Failed { args: String, stderr: String },
}

fn ip(args: &[&str]) -> Result<String, RoutingError> {
    let joined = args.join(" ");
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| RoutingError::Spawn {
            args: joined.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(RoutingError::Failed {
            args: joined,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Sets `net.ipv4.tcp_migrate_req` in the current network namespace: when a
/// listener in a SO_REUSEPORT group closes, connections in its accept queue
/// move to another listener of the group (a restart handover) instead of
/// being reset.
pub fn enable_request_migration() -> std::io::Result<()> {
    std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1")
}

// === impl PolicyRoute ===

impl PolicyRoute {
    /// Installs the rule and route in the current network namespace (idempotent).
    pub fn install(mark: u32, table: u32) -> Result<(), RoutingError> {
        let mark_s = format!("{mark:#x}/{mark:#x}");
        let table_s = table.to_string();
        let rules = ip(&["-4", "rule", "show"])?;
        let want = format!("fwmark {mark:#x}/{mark:#x} lookup {table}");
        if !rules.lines().any(|l| l.contains(&want)) {
            ip(&[
                "-4", "rule", "add", "fwmark", &mark_s, "lookup", &table_s, "priority", "100",
            ])?;
        }
        ip(&[
            "-4",
            "route",
            "replace",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            &table_s,
        ])?;
        info!(component = "capture", mark = %format!("{mark:#x}"), table, "policy route installed");
        Ok(())
    }

    /// Removes the rule and route from the current network namespace
    /// (idempotent: what is not there is not an error).
    pub fn uninstall(mark: u32, table: u32) -> Result<(), RoutingError> {
        let mark_s = format!("{mark:#x}/{mark:#x}");
        let table_s = table.to_string();
        let want = format!("fwmark {mark:#x}/{mark:#x} lookup {table}");
        while ip(&["-4", "rule", "show"])?
            .lines()
            .any(|l| l.contains(&want))
        {
            ip(&["-4", "rule", "del", "fwmark", &mark_s, "lookup", &table_s])?;
        }
        ip(&["-4", "route", "flush", "table", &table_s]).or_else(|e| match e {
            // iproute2 reports an empty table as a failure.
            RoutingError::Failed { .. } => Ok(String::new()),
            e => Err(e),
        })?;
        info!(component = "capture", table, "policy route removed");
        Ok(())
    }
}
