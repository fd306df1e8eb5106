//! Packet capture on a lab interface, to check what crosses the wire.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::netns::NetNs;

/// A running `tcpdump -w`; [`Tcpdump::stop`] returns the capture file.
#[derive(Debug)]
pub struct Tcpdump {
    child: Child,
    file: PathBuf,
}

impl Tcpdump {
    /// Captures TCP on `iface` in `ns` into `file`.
    pub fn start(ns: &NetNs, iface: &str, file: &Path) -> Result<Self> {
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns.name(),
                "tcpdump",
                "-i",
                iface,
                "-U",
                "-s",
                "0",
                "-w",
            ])
            .arg(file)
            .arg("tcp")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting tcpdump (apt-get install tcpdump)")?;
        // tcpdump prints "listening on …" once the capture is armed.
        let mut child = child;
        let stderr = child.stderr.take().context("tcpdump stderr")?;
        let mut reader = std::io::BufReader::new(stderr);
        let mut line = String::new();
        std::io::BufRead::read_line(&mut reader, &mut line)?;
        if !line.contains("listening") {
            let _ = child.kill();
            bail!("tcpdump did not start: {line}");
        }
        std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
        Ok(Tcpdump {
            child,
            file: file.to_path_buf(),
        })
    }

    /// Stops the capture and returns the pcap file's path.
    pub fn stop(mut self) -> Result<PathBuf> {
        std::thread::sleep(Duration::from_millis(200));
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGINT);
        self.child.wait()?;
        Ok(self.file.clone())
    }
}

impl Drop for Tcpdump {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The capture's packets as tcpdump prints them (`-nn`), filtered by `filter`.
pub fn read(file: &Path, filter: &str) -> Result<Vec<String>> {
    let out = Command::new("tcpdump")
        .arg("-nn")
        .arg("-r")
        .arg(file)
        .arg(filter)
        .output()
        .context("running tcpdump -r")?;
    if !out.status.success() {
        bail!(
            "tcpdump -r failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect())
}
