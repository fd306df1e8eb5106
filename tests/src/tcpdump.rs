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
    report: Option<std::thread::JoinHandle<String>>,
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
                // Each packet is handed over as it arrives, not in ring
                // blocks retired up to a second later.
                "--immediate-mode",
                "-s",
                "0",
                "-w",
            ])
            .arg(file)
            .arg("tcp")
            .stdin(Stdio::null())
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
        let report = std::thread::spawn(move || {
            let mut rest = String::new();
            let _ = std::io::Read::read_to_string(&mut reader, &mut rest);
            rest
        });
        // "listening" is printed before the filter is attached, and libpcap
        // drops what arrived before that: give it a moment.
        std::thread::sleep(Duration::from_millis(500));
        Ok(Tcpdump {
            child,
            file: file.to_path_buf(),
            report: Some(report),
        })
    }

    /// Stops the capture and returns the pcap file's path.
    pub fn stop(mut self) -> Result<PathBuf> {
        // Without immediate mode, libpcap handed packets over in ring
        // blocks retired at most once a second, and stopping sooner lost the
        // last block (seen: "0 packets captured, 23 received by filter").
        // With it, a moment lets the last packets be read and written.
        std::thread::sleep(Duration::from_millis(300));
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGINT);
        self.child.wait()?;
        let report = self
            .report
            .take()
            .and_then(|r| r.join().ok())
            .unwrap_or_default();
        if std::env::var_os("WEFT_DEBUG_TCPDUMP").is_some() {
            eprintln!("tcpdump: {report}");
        }
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
