//! End-to-end: Istio's stock Grafana dashboards (Istio Service, Istio
//! Workload, Istio Mesh) and Kiali, read against the lab's own Prometheus
//! text after HTTP through the waypoint and TCP between ztunnels. Each panel
//! is its query's selector (metric and label matchers, with the dashboards'
//! default variables); a panel "shows" when a scraped series matches it.
//! The table below is what Istio 1.24+ ships; ARCHITECTURE.md ("Dashboards
//! and Kiali") says why each panel shows waypoint traffic or cannot.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Result, ensure};
use weft_tests::apps::{self, App};
use weft_tests::bookinfo::{MESH, WAYPOINT_POD, get};
use weft_tests::check::eventually;
use weft_tests::{Lab, LabOptions};

/// A label matcher as PromQL writes it.
#[derive(Clone, Copy, Debug)]
enum Op {
    Eq,
    /// `=~`, with the alternations and `.*` suffixes the dashboards use.
    Re,
}

/// One panel's query selector.
struct Panel {
    dashboard: &'static str,
    title: &'static str,
    metric: &'static str,
    matchers: &'static [(&'static str, Op, &'static str)],
}

use Op::{Eq, Re};

/// `$qrep` is the dashboards' reporter variable: `destination` by default.
const PANELS: &[Panel] = &[
    Panel {
        dashboard: "service",
        title: "Client Request Volume / Success Rate / Duration",
        metric: "istio_requests_total",
        matchers: &[
            ("reporter", Re, "$qrep"),
            ("destination_service", Eq, "$service"),
        ],
    },
    Panel {
        dashboard: "service",
        title: "Server Request Volume / Success Rate / Duration",
        metric: "istio_requests_total",
        matchers: &[
            ("reporter", Eq, "destination"),
            ("destination_service", Eq, "$service"),
        ],
    },
    Panel {
        dashboard: "service",
        title: "TCP Received Bytes / TCP Sent Bytes",
        metric: "istio_tcp_received_bytes_total",
        matchers: &[
            ("reporter", Re, "$qrep"),
            ("destination_service", Eq, "$service"),
        ],
    },
    Panel {
        dashboard: "service",
        title: "Client Workloads: requests, success, duration, sizes by source",
        metric: "istio_request_duration_milliseconds_bucket",
        matchers: &[
            ("reporter", Re, "$qrep"),
            ("destination_service", Eq, "$service"),
            ("source_workload", Re, ".*"),
            ("source_workload_namespace", Re, ".*"),
            ("connection_security_policy", Eq, "mutual_tls"),
        ],
    },
    Panel {
        dashboard: "service",
        title: "Client Workloads: TCP bytes by source",
        metric: "istio_tcp_received_bytes_total",
        matchers: &[
            ("reporter", Re, "$qrep"),
            ("destination_service", Eq, "$service"),
            ("connection_security_policy", Eq, "mutual_tls"),
        ],
    },
    Panel {
        dashboard: "service",
        title: "Service Workloads: requests, success, duration, sizes by workload",
        metric: "istio_requests_total",
        matchers: &[
            ("reporter", Eq, "destination"),
            ("destination_service", Eq, "$service"),
            ("destination_workload", Re, ".*"),
            ("connection_security_policy", Eq, "mutual_tls"),
        ],
    },
    Panel {
        dashboard: "service",
        title: "Service Workloads: TCP bytes by workload",
        metric: "istio_tcp_received_bytes_total",
        matchers: &[
            ("reporter", Eq, "destination"),
            ("destination_service", Eq, "$service"),
            ("connection_security_policy", Eq, "mutual_tls"),
        ],
    },
    Panel {
        dashboard: "workload",
        title: "Incoming Request Volume / Success Rate / Duration; Inbound Workloads",
        metric: "istio_requests_total",
        matchers: &[
            ("reporter", Re, "$qrep"),
            ("destination_workload", Eq, "reviews-v1"),
            ("destination_workload_namespace", Eq, "bookinfo"),
        ],
    },
    Panel {
        dashboard: "workload",
        title: "TCP Server Traffic; Inbound TCP bytes",
        metric: "istio_tcp_sent_bytes_total",
        matchers: &[
            ("reporter", Re, "$qrep"),
            ("destination_workload", Eq, "reviews-v1"),
            ("destination_workload_namespace", Eq, "bookinfo"),
        ],
    },
    Panel {
        dashboard: "workload",
        title: "TCP Client Traffic (productpage)",
        metric: "istio_tcp_sent_bytes_total",
        matchers: &[
            ("reporter", Re, "$qrep"),
            ("source_workload", Eq, "productpage"),
            ("source_workload_namespace", Eq, "bookinfo"),
        ],
    },
    Panel {
        dashboard: "workload",
        title: "Outbound Services: requests, success, duration, sizes (productpage)",
        metric: "istio_requests_total",
        matchers: &[
            ("reporter", Eq, "source"),
            ("source_workload", Eq, "productpage"),
            ("source_workload_namespace", Eq, "bookinfo"),
        ],
    },
    Panel {
        dashboard: "workload",
        title: "Outbound Services: TCP bytes (productpage)",
        metric: "istio_tcp_received_bytes_total",
        matchers: &[
            ("reporter", Eq, "source"),
            ("source_workload", Eq, "productpage"),
            ("source_workload_namespace", Eq, "bookinfo"),
        ],
    },
    Panel {
        dashboard: "mesh",
        title: "HTTP/gRPC Workloads",
        metric: "istio_requests_total",
        matchers: &[("reporter", Re, "source|waypoint")],
    },
    Panel {
        dashboard: "mesh",
        title: "TCP Workloads",
        metric: "istio_tcp_sent_bytes_total",
        matchers: &[("reporter", Re, "source|waypoint")],
    },
];

/// Every series of `metric` in Prometheus text, as its labels.
fn series(text: &str, metric: &str) -> Vec<BTreeMap<String, String>> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, _) = l.rsplit_once(' ')?;
            let (name, rest) = series.split_once('{')?;
            (name == metric).then(|| {
                let mut labels = BTreeMap::new();
                let mut rest = rest.trim_end_matches('}');
                while let Some((k, v)) = rest.split_once("=\"") {
                    let Some(end) = v.find('"') else { break };
                    labels.insert(k.trim_start_matches(',').to_string(), v[..end].to_string());
                    rest = &v[end + 1..];
                }
                labels
            })
        })
        .collect()
}

/// `=~` as the dashboards use it: alternatives, each exact or ending `.*`.
fn regex_match(pattern: &str, value: &str) -> bool {
    pattern.split('|').any(|alt| match alt.strip_suffix(".*") {
        Some(prefix) => value.starts_with(prefix),
        None => alt == value,
    })
}

fn shows(panel: &Panel, text: &str, qrep: &str) -> bool {
    shows_for(panel, text, qrep, "reviews.bookinfo.svc.cluster.local")
}

fn shows_for(panel: &Panel, text: &str, qrep: &str, service: &str) -> bool {
    series(text, panel.metric).iter().any(|labels| {
        panel.matchers.iter().all(|(k, op, v)| {
            let want = v.replace("$qrep", qrep).replace("$service", service);
            let have = labels.get(*k).map(String::as_str).unwrap_or_default();
            match op {
                Op::Eq => have == want,
                Op::Re => regex_match(&want, have),
            }
        })
    })
}

/// The labels Kiali's graph needs on every series, or it drops the series.
const KIALI: &[&str] = &[
    "source_workload_namespace",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "destination_service_namespace",
    "destination_service",
    "destination_service_name",
    "destination_workload_namespace",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "response_flags",
];

#[test]
fn stock_dashboards_and_kiali_on_the_labs_metrics() -> Result<()> {
    let mut lab = Lab::up(LabOptions::new("dashboards", MESH))?;
    let mut servers = Vec::new();
    for pod in ["bookinfo/reviews-v1", "bookinfo/reviews-v2"] {
        servers.push(apps::serve(lab.pod(pod), 9080, App::Http)?);
        servers.push(apps::serve(lab.pod(pod), 9090, App::WhoAmI)?);
    }
    let client = lab.pod("bookinfo/productpage");
    // HTTP through the waypoint (reviews is bound to it), TCP to a pod's
    // address (pods are not bound: ztunnel to ztunnel).
    eventually("HTTP through the waypoint", Duration::from_secs(10), || {
        Ok(get(&lab, "/", &[])?.status == 200)
    })?;
    for _ in 0..10 {
        ensure!(get(&lab, "/", &[])?.status == 200);
        apps::whoami(client, "10.244.2.10:9090".parse::<SocketAddr>()?)?;
        // TCP to a service bound to the waypoint: forwarded at L4 there.
        apps::whoami(client, "10.96.0.25:9090".parse::<SocketAddr>()?)?;
    }
    let text = format!(
        "{}\n{}\n{}",
        lab.waypoint_metrics(WAYPOINT_POD)?,
        lab.metrics("node-1")?,
        lab.metrics("node-2")?
    );

    // Kiali: every waypoint series has every label it needs, filled in.
    let waypoint: Vec<_> = series(&text, "istio_requests_total")
        .into_iter()
        .filter(|l| l.get("reporter").map(String::as_str) == Some("waypoint"))
        .collect();
    ensure!(!waypoint.is_empty(), "no waypoint series");
    for labels in &waypoint {
        for k in KIALI.iter().chain(&["request_protocol", "response_code"]) {
            ensure!(
                labels
                    .get(*k)
                    .is_some_and(|v| !v.is_empty() && v != "unknown"),
                "Kiali needs {k}: {labels:?}"
            );
        }
    }

    // Each panel, with the default reporter and with `waypoint` added.
    let mut table = Vec::new();
    for p in PANELS {
        let default = shows(p, &text, "destination");
        let edited = shows(p, &text, "destination|waypoint");
        table.push((p.dashboard, p.title, default, edited));
        println!(
            "{:<9} {:<72} default {:<5} with waypoint in $qrep {}",
            p.dashboard, p.title, default, edited
        );
    }
    let expect = |title: &str, default: bool, edited: bool| -> Result<()> {
        let row = table
            .iter()
            .find(|r| r.1 == title)
            .ok_or_else(|| anyhow::anyhow!("no panel {title}"))?;
        ensure!(
            (row.2, row.3) == (default, edited),
            "{title}: shows {} by default and {} with waypoint (want {default}, {edited})",
            row.2,
            row.3
        );
        Ok(())
    };
    // HTTP through a waypoint has no destination reporter (no sidecar):
    // the reporter filter hides it until `waypoint` is added to $qrep.
    expect(
        "Client Request Volume / Success Rate / Duration",
        false,
        true,
    )?;
    expect(
        "Client Workloads: requests, success, duration, sizes by source",
        false,
        true,
    )?;
    expect(
        "Incoming Request Volume / Success Rate / Duration; Inbound Workloads",
        false,
        true,
    )?;
    // Panels that hard-code reporter="destination" or "source" for HTTP
    // cannot show it: only a sidecar reports HTTP at either end.
    expect(
        "Server Request Volume / Success Rate / Duration",
        false,
        false,
    )?;
    expect(
        "Service Workloads: requests, success, duration, sizes by workload",
        false,
        false,
    )?;
    expect(
        "Outbound Services: requests, success, duration, sizes (productpage)",
        false,
        false,
    )?;
    // ztunnel's L4 metrics feed the TCP panels of both ends.
    expect("TCP Server Traffic; Inbound TCP bytes", true, true)?;
    expect("TCP Client Traffic (productpage)", true, true)?;
    expect("Outbound Services: TCP bytes (productpage)", true, true)?;
    // The mesh dashboard reads the waypoint already.
    expect("HTTP/gRPC Workloads", true, true)?;
    expect("TCP Workloads", true, true)?;
    // TCP through the waypoint feeds the Service dashboard's TCP panels:
    // the destination ztunnel names the service (the waypoint's CONNECT
    // says it in `Forwarded: host=`), and the waypoint reports its own.
    let tcp = "reviews-tcp.bookinfo.svc.cluster.local";
    for title in [
        "TCP Received Bytes / TCP Sent Bytes",
        "Client Workloads: TCP bytes by source",
    ] {
        let p = PANELS
            .iter()
            .find(|p| p.title == title)
            .ok_or_else(|| anyhow::anyhow!("no panel {title}"))?;
        let (default, edited) = (
            shows_for(p, &text, "destination", tcp),
            shows_for(p, &text, "destination|waypoint", tcp),
        );
        println!("service   {title} for {tcp}: default {default}, with waypoint {edited}");
        ensure!(default && edited, "{title} for {tcp}: {default}, {edited}");
    }
    let waypoint_tcp: Vec<_> = series(&text, "istio_tcp_received_bytes_total")
        .into_iter()
        .filter(|l| l.get("reporter").map(String::as_str) == Some("waypoint"))
        .collect();
    ensure!(!waypoint_tcp.is_empty(), "no waypoint TCP series");
    for labels in &waypoint_tcp {
        for k in KIALI {
            ensure!(
                labels
                    .get(*k)
                    .is_some_and(|v| !v.is_empty() && v != "unknown"),
                "Kiali needs {k}: {labels:?}"
            );
        }
    }
    drop(servers);
    lab.teardown()
}
