//! End-to-end: the Helm chart is what runs. The lab renders `charts/weft`
//! with `tests/chart-values.yaml` and starts the controller and each
//! ztunnel with exactly the env of the rendered Deployment and DaemonSet
//! (field references resolved, mounted paths moved to what the lab put
//! there, the controller's Service name resolvable on the nodes); it adds
//! only the controller's source (no API server here) and ztunnel's JSON
//! log format. A wrong env name, port, path or server name in a template
//! fails this test.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Result, ensure};
use weft_tests::apps::{self, App};
use weft_tests::chart::{Chart, workspace};
use weft_tests::check::{eventually, metric_sum};
use weft_tests::{Lab, LabOptions, tcpdump};

const SCENARIO: &str = include_str!("../../examples/l4/mesh.yaml");

#[test]
fn the_chart_runs_the_mesh() -> Result<()> {
    let values = workspace().join("tests/chart-values.yaml");
    // What the lab is about to run, as rendered.
    let chart = Chart::render("istio-system", &values)?;
    let z = chart.ztunnel("node-1")?;
    ensure!(
        z.get("XDS_ADDRESS") == Some("weft-controller.istio-system.svc:15012"),
        "ztunnel dials {:?}",
        z.get("XDS_ADDRESS")
    );
    ensure!(z.get("BPF_PIN_DIR") == Some("/sys/fs/bpf/weft"));

    let lab = Lab::up(LabOptions::new("chart", SCENARIO).chart(&values))?;
    // ztunnel pins capture where the chart's hostPath puts it on the node.
    ensure!(
        lab.pin_dir("node-1").ends_with("node-1/weft") && lab.pin_dir("node-1").exists(),
        "pins at {}",
        lab.pin_dir("node-1").display()
    );
    let client = lab.pod("shop/client");
    let web = lab.pod("shop/web-1");
    let _echo = apps::serve(web, 7000, App::Echo)?;
    let pcap = lab.dir().join("underlay.pcap");
    let cap = tcpdump::Tcpdump::start(&lab.node("node-1").netns, "eth0", &pcap)?;
    let marker = "weft-chart-marker-52a9";
    for _ in 0..3 {
        apps::echo_once(client, SocketAddr::new(web.ip.into(), 7000), marker)?;
    }
    let pcap = cap.stop()?;
    let raw = std::fs::read(&pcap)?;
    ensure!(
        !raw.windows(marker.len()).any(|w| w == marker.as_bytes()),
        "plaintext on the underlay"
    );
    ensure!(
        !tcpdump::read(&pcap, "tcp port 15008")?.is_empty(),
        "no HBONE on the underlay"
    );
    // Metrics on the chart's stats port, both sides, mutual TLS.
    for (node, reporter) in [("node-1", "source"), ("node-2", "destination")] {
        let labels = [
            ("reporter", reporter),
            ("destination_workload", "web-1"),
            ("connection_security_policy", "mutual_tls"),
        ];
        eventually(&format!("{node} metrics"), Duration::from_secs(5), || {
            let m = lab.metrics(node)?;
            Ok(
                metric_sum(&m, "istio_tcp_connections_closed_total", &labels) == 3.0
                    && metric_sum(&m, "istio_tcp_received_bytes_total", &labels)
                        >= (3 * marker.len()) as f64,
            )
        })?;
    }
    // The controller served with the chart's names and trust domain.
    let log = lab.controller_log();
    ensure!(
        !log.contains("ERROR"),
        "controller errors:\n{}",
        &log[..log.len().min(2000)]
    );
    Ok(())
}
