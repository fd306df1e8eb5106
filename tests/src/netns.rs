//! Named network namespaces (`ip netns`): create, delete, run code inside.

use std::fs::File;
use std::process::{Command, Output};
use std::thread;

use anyhow::{Context, Result, bail};
use nix::sched::{CloneFlags, setns};

/// A named network namespace. Not deleted on drop: the [`crate::Lab`] owns cleanup.
#[derive(Clone, Debug)]
pub struct NetNs {
    name: String,
}

// === impl NetNs ===

impl NetNs {
    /// Creates the namespace and brings its loopback up.
    pub fn create(name: &str) -> Result<Self> {
        run("ip", &["netns", "add", name])?;
        let ns = NetNs {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <ns> args…`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, cmd: &str, args: &[&str]) -> Result<String> {
        let mut all = vec!["netns", "exec", &self.name, cmd];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs `ip netns exec <ns> cmd args…` and returns the raw output.
    pub fn exec_output(&self, cmd: &str, args: &[&str]) -> Result<Output> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, cmd])
            .args(args)
            .output()
            .with_context(|| format!("running {cmd} in {}", self.name))?;
        Ok(out)
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")])?;
        Ok(())
    }

    /// Runs `f` on a new thread that has entered this namespace; returns its result.
    pub fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T> + Send + 'static,
    {
        self.spawn(f)?
            .join()
            .map_err(|_| anyhow::anyhow!("thread in {} panicked", self.name))?
    }

    /// Starts `f` on a new thread inside this namespace.
    pub fn spawn<T, F>(&self, f: F) -> Result<thread::JoinHandle<Result<T>>>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T> + Send + 'static,
    {
        let path = format!("/run/netns/{}", self.name);
        let file = File::open(&path).with_context(|| format!("opening {path}"))?;
        let name = self.name.clone();
        Ok(thread::Builder::new()
            .name(format!("netns-{name}"))
            .spawn(move || {
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("entering network namespace {name}"))?;
                f()
            })?)
    }

    /// Deletes the namespace (its interfaces go with it).
    pub fn delete(name: &str) -> Result<()> {
        run("ip", &["netns", "del", name]).map(drop)
    }

    /// Names of every namespace on the host.
    pub fn list() -> Result<Vec<String>> {
        let out = run("ip", &["netns", "list"])?;
        Ok(out
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(String::from)
            .collect())
    }
}

/// Runs a command, failing with its stderr.
pub fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
