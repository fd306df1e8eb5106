//! `cargo xtask bench controller`: the controller's cost curve.
//!
//! For each size (1 000, 10 000 and 50 000 pods by default; services at a
//! tenth of the pods, in 100 namespaces, one manifests file each), the real
//! `weft-controller` process serves simulated node agents over the real
//! TLS/gRPC delta ADS endpoint. The agents announce the end-of-state marker
//! and ACK every response, as ztunnel does; one more agent is ztunnel's own
//! xDS client and state (`weft_ztunnel::xds`), whose apply time is read
//! from its `weft_xds_apply_seconds` histogram. Per size it prints:
//! - the time from process start to serving;
//! - the time until every agent holds the full state (first full push),
//!   and the controller's CPU time in it (the agents share its cores);
//! - per-change latency, from the manifests file write to each agent's ACK
//!   of the changed pod (p50/p99), which includes the file-system
//!   notification and the debounce;
//! - bytes sent per change, to all agents and per agent;
//! - ztunnel's apply time per response, p99;
//! - the controller's RSS.
//!
//! The baseline is the same run with one agent; the ratio is 100 over 1.
//! Then the curve: each figure against the previous size, beside the pod
//! ratio, so the cost of another size can be read off. Overridable: `PODS`
//! (a comma-separated list), `CLIENTS`, `CHANGES`.

#![expect(clippy::unwrap_used, reason = "a benchmark: setup failures abort it")]

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use weft_xds::grpc::{ControlPlaneAddress, connect, delta_ads};
use weft_xds::proto::discovery::DeltaDiscoveryRequest;
use weft_xds::{ADDRESS_TYPE, AUTHORIZATION_TYPE};

const NAMESPACES: usize = 100;
const SERVER_NAME: &str = "weft-controller.istio-system.svc";
/// Every wait is bounded: a stuck controller fails the bench, never hangs it.
const WAIT: Duration = Duration::from_secs(120);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Sizes {
    pods: usize,
    services: usize,
}

/// The manifests of namespace `ns`; `revision` labels the pods whose index
/// is in `bumped` (a change to those pods' resources).
fn namespace_file(ns: usize, sizes: &Sizes, bumped: &[(usize, usize)]) -> String {
    let pods = sizes.pods / NAMESPACES;
    let services = sizes.services / NAMESPACES;
    let mut out = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{ns}, labels: {{istio.io/dataplane-mode: ambient}}}}\n"
    );
    for p in 0..pods {
        let global = ns * pods + p;
        let revision = bumped
            .iter()
            .find(|(i, _)| *i == global)
            .map_or(0, |(_, r)| *r);
        let svc = p % services.max(1);
        let node = global % 100;
        let ip = format!(
            "10.{}.{}.{}",
            64 + global / 65536,
            (global / 256) % 256,
            global % 256
        );
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{global}, namespace: ns-{ns}, labels: {{app: svc-{svc}, version: r{revision}}}}}\n\
             spec: {{nodeName: node-{node}, serviceAccountName: sa-{svc}, containers: [{{name: app, ports: [{{name: http, containerPort: 8080}}]}}]}}\n\
             status: {{podIP: {ip}}}\n"
        );
    }
    for s in 0..services {
        let global = ns * services + s;
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{s}, namespace: ns-{ns}}}\n\
             spec: {{clusterIP: 10.96.{}.{}, selector: {{app: svc-{s}}}, ports: [{{name: http, port: 80, targetPort: http}}]}}\n",
            global / 256,
            global % 256
        );
    }
    out
}

fn write(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The controller process and its files; both go away on drop.
struct Controller {
    child: Child,
    dir: PathBuf,
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Controller {
    fn rss_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

/// What a client saw: (client, when it ACKed, address names in the
/// response, the response's encoded size).
type Seen = (usize, Instant, Vec<String>, usize);

/// One simulated node agent: subscribes to everything announcing the
/// end-of-state marker, ACKs every response, reports what it receives.
async fn client(id: usize, channel: Channel, token: String, seen: mpsc::UnboundedSender<Seen>) {
    let (tx, rx) = mpsc::channel(16);
    let node = weft_xds::client::node(format!("bench~{id}"), &format!("node-{id}"));
    for ty in [ADDRESS_TYPE, AUTHORIZATION_TYPE] {
        let req = DeltaDiscoveryRequest {
            node: Some(node.clone()),
            type_url: ty.into(),
            ..DeltaDiscoveryRequest::default()
        };
        tx.send(req).await.unwrap();
    }
    let mut stream = delta_ads(channel, &token, ReceiverStream::new(rx))
        .await
        .unwrap();
    while let Ok(Some(resp)) = stream.message().await {
        let bytes = prost::Message::encoded_len(&resp);
        let ack = DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            ..DeltaDiscoveryRequest::default()
        };
        if tx.send(ack).await.is_err() {
            return;
        }
        let at = Instant::now();
        let names = if resp.type_url == ADDRESS_TYPE {
            resp.resources.into_iter().map(|r| r.name).collect()
        } else {
            Vec::new()
        };
        if seen.send((id, at, names, bytes)).is_err() {
            return;
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

struct Phase {
    full_push: Duration,
    /// The controller's CPU time (all its threads) during the first full
    /// push: its own cost, apart from the simulated clients on the same cores.
    full_push_cpu: Duration,
    /// Every delivery of every change.
    deliveries: Vec<Duration>,
    /// The last client's delivery, per change.
    slowest: Vec<Duration>,
    /// Bytes of every response to every client while the changes were
    /// delivered, per change.
    bytes_per_change: f64,
}

struct Bench {
    sizes: Sizes,
    dir: PathBuf,
    cp: ControlPlaneAddress,
    bumped: Vec<(usize, usize)>,
    revision: usize,
    /// How many Address names a client holds at the end of its first
    /// push, and their fingerprint: learnt from the first client, whose
    /// names are kept; later clients are only counted.
    everything: Option<(usize, u64)>,
    /// The controller process.
    pid: u32,
}

/// CPU time a process has used so far, user and system, all threads.
fn cpu_time(pid: u32) -> Duration {
    let (user, system) = weft_runtime::cpu_seconds(pid).unwrap_or_default();
    Duration::from_secs_f64(user + system)
}

/// A name's share of a fingerprint: the wrapping sum over a set of names
/// tells, with the count, whether a client got each name once, without
/// keeping a hundred copies of the mesh's names (which slowed the
/// clients' side of the bench, on the same cores as the controller).
fn fingerprint(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Bench {
    /// Connects `count` new clients (ids from `first`), waits until each holds
    /// every address, then makes `changes` one-pod changes and times them
    /// against all `first + count` clients.
    async fn phase(
        &mut self,
        first: usize,
        count: usize,
        changes: usize,
        seen_rx: &mut mpsc::UnboundedReceiver<Seen>,
        seen_tx: &mpsc::UnboundedSender<Seen>,
    ) -> Phase {
        let total_names = self.sizes.pods + self.sizes.services;
        let cpu_before = cpu_time(self.pid);
        let start = Instant::now();
        for id in first..first + count {
            let channel = connect(&self.cp).unwrap();
            tokio::spawn(client(
                id,
                channel,
                format!("node-{id}-token-0123456789"),
                seen_tx.clone(),
            ));
        }
        let mut held: Vec<HashSet<String>> = Vec::new();
        let mut counted: Vec<(usize, u64)> = vec![(0, 0); count];
        let mut full = 0;
        while full < count {
            let (id, _, names, _) = tokio::time::timeout(WAIT, seen_rx.recv())
                .await
                .unwrap()
                .unwrap();
            if id < first {
                continue;
            }
            match self.everything {
                None => {
                    held.resize_with(count, HashSet::new);
                    let h = &mut held[id - first];
                    let before = h.len();
                    h.extend(names);
                    if before < total_names && h.len() >= total_names {
                        full += 1;
                    }
                }
                Some(want) => {
                    let c = &mut counted[id - first];
                    let before = *c;
                    for n in &names {
                        c.0 += 1;
                        c.1 = c.1.wrapping_add(fingerprint(n));
                    }
                    if before != want && *c == want {
                        full += 1;
                    }
                }
            }
        }
        let full_push = start.elapsed();
        let full_push_cpu = cpu_time(self.pid).saturating_sub(cpu_before);
        if let Some(h) = held.first() {
            let sum = h.iter().fold(0u64, |s, n| s.wrapping_add(fingerprint(n)));
            self.everything = Some((h.len(), sum));
        }
        drop(held);

        let clients = first + count;
        let mut deliveries = Vec::new();
        let mut slowest = Vec::new();
        let mut bytes = 0usize;
        let pods_per_ns = self.sizes.pods / NAMESPACES;
        for c in 0..changes {
            // Spread the changes over namespaces and pods.
            let ns = (c * 37) % NAMESPACES;
            let pod = ns * pods_per_ns + (c * 11) % pods_per_ns;
            self.revision += 1;
            self.bumped.retain(|(i, _)| *i != pod);
            self.bumped.push((pod, self.revision));
            let name_part = format!("/Pod/ns-{ns}/pod-{pod}");
            // Drain what earlier changes left behind.
            while seen_rx.try_recv().is_ok() {}
            let text = namespace_file(ns, &self.sizes, &self.bumped);
            let t0 = Instant::now();
            write(&self.dir.join(format!("manifests/ns-{ns}.yaml")), &text);
            let mut got = vec![false; clients];
            let mut n = 0;
            while n < clients {
                let (id, at, names, size) = tokio::time::timeout(WAIT, seen_rx.recv())
                    .await
                    .unwrap()
                    .unwrap();
                bytes += size;
                if !got[id] && names.iter().any(|x| x.ends_with(&name_part)) {
                    got[id] = true;
                    n += 1;
                    deliveries.push(at - t0);
                }
            }
            slowest.push(t0.elapsed());
        }
        deliveries.sort();
        slowest.sort();
        Phase {
            full_push,
            full_push_cpu,
            deliveries,
            slowest,
            bytes_per_change: bytes as f64 / changes as f64,
        }
    }
}

/// One size's figures.
struct Row {
    pods: usize,
    ready: Duration,
    one: Phase,
    many: Phase,
    clients: usize,
    idle_rss: f64,
    rss: f64,
    peak: f64,
    /// ztunnel's own client: time to the whole first state, and the p99
    /// (a histogram bucket's upper bound) of its applies during the changes.
    ztunnel_first: Duration,
    ztunnel_apply_p99: f64,
    publishes: Vec<String>,
}

/// `weft_xds_apply_seconds` buckets of type address: (upper bound, count).
fn apply_buckets(metrics: &weft_ztunnel::metrics::Metrics) -> Vec<(f64, u64)> {
    metrics
        .encode()
        .lines()
        .filter(|l| {
            l.starts_with("weft_xds_apply_seconds_bucket{") && l.contains("type=\"address\"")
        })
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect()
}

/// The upper bound of the bucket holding the p-th quantile of the applies
/// between two readings of the cumulative buckets.
fn bucket_quantile(before: &[(f64, u64)], after: &[(f64, u64)], p: f64) -> f64 {
    let diff: Vec<(f64, u64)> = after
        .iter()
        .map(|(le, n)| {
            let was = before.iter().find(|(l, _)| l == le).map_or(0, |(_, c)| *c);
            (*le, n - was)
        })
        .collect();
    let total = diff.last().map_or(0, |(_, n)| *n);
    let want = (total as f64 * p).ceil() as u64;
    diff.iter()
        .find(|(_, n)| *n >= want.max(1))
        .map_or(f64::NAN, |(le, _)| *le)
}

fn run(pods: usize, clients: usize, changes: usize) -> Row {
    let sizes = Sizes {
        pods: pods.max(NAMESPACES),
        services: (pods / 10).max(NAMESPACES),
    };
    let dir = std::env::temp_dir().join(format!(
        "weft-bench-controller-{}-{pods}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("manifests")).unwrap();
    for ns in 0..NAMESPACES {
        write(
            &dir.join(format!("manifests/ns-{ns}.yaml")),
            &namespace_file(ns, &sizes, &[]),
        );
    }
    let mut tokens: String = (0..clients)
        .map(|i| format!("node-{i} node-{i}-token-0123456789\n"))
        .collect();
    tokens.push_str("node-ztunnel node-ztunnel-token-0123456789\n");
    std::fs::write(dir.join("tokens"), tokens).unwrap();
    std::fs::write(dir.join("ztunnel-token"), "node-ztunnel-token-0123456789").unwrap();
    let started = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_weft-controller"))
        .env("MANIFESTS_DIR", dir.join("manifests"))
        .env("CA_DIR", dir.join("ca"))
        .env("NODE_TOKENS", dir.join("tokens"))
        // The kernel picks; the log says what was bound. A port probed free
        // here could be taken before the controller binds it.
        .env("XDS_ADDR", "127.0.0.1:0")
        .env("SERVER_NAMES", SERVER_NAME)
        .env("METRICS_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join("controller.log")).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ctl = Controller {
        child,
        dir: dir.clone(),
    };
    let port = loop {
        let log = std::fs::read_to_string(dir.join("controller.log")).unwrap_or_default();
        if let Some(port) = log
            .lines()
            .filter(|l| l.contains("controller serving xDS and CA"))
            .find_map(|l| {
                l.split("address=127.0.0.1:")
                    .nth(1)?
                    .split_whitespace()
                    .next()
            })
            .and_then(|p| p.parse::<u16>().ok())
        {
            break port;
        }
        assert!(started.elapsed() < WAIT, "controller not serving");
        std::thread::sleep(Duration::from_millis(10));
    };
    // The CA writes its root before anything listens.
    let root = std::fs::read_to_string(dir.join("ca/root-cert.pem")).unwrap();
    let ready = started.elapsed();
    let (idle_rss, _) = ctl.rss_kib();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cp = ControlPlaneAddress::fixed(
        format!("127.0.0.1:{port}"),
        SERVER_NAME,
        weft_hbone::tls::control_plane_client_config(&root).unwrap(),
    );
    let mut bench = Bench {
        sizes,
        dir: dir.clone(),
        cp: cp.clone(),
        bumped: Vec::new(),
        revision: 0,
        everything: None,
        pid: ctl.child.id(),
    };
    // ztunnel's own client and state first, alone, on a runtime of its own
    // (as in ztunnel): how long the whole first state takes it to apply.
    let zt_metrics = std::sync::Arc::new(weft_ztunnel::metrics::Metrics::default());
    let zt_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let zt = {
        let _in = zt_rt.enter();
        weft_ztunnel::xds::client(
            connect(&cp).unwrap(),
            dir.join("ztunnel-token"),
            "node-ztunnel",
            std::sync::Arc::new(weft_ztunnel::state::Store::default()),
            zt_metrics.clone(),
        )
    };
    let synced = zt.synced();
    let t0 = Instant::now();
    let (zt_stop, zt_stopped) = tokio::sync::oneshot::channel::<()>();
    let zt_thread = std::thread::spawn(move || {
        zt_rt.block_on(async {
            tokio::select! {
                () = zt.run() => {}
                _ = zt_stopped => {}
            }
        });
    });
    while !synced.load(std::sync::atomic::Ordering::Acquire) {
        assert!(t0.elapsed() < WAIT, "ztunnel's client never synced");
        std::thread::sleep(Duration::from_millis(1));
    }
    let ztunnel_first = t0.elapsed();
    let before = apply_buckets(&zt_metrics);
    let (one, many) = rt.block_on(async {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let one = bench.phase(0, 1, changes, &mut rx, &tx).await;
        let many = bench.phase(1, clients - 1, changes, &mut rx, &tx).await;
        (one, many)
    });
    let after = apply_buckets(&zt_metrics);
    let (rss, peak) = ctl.rss_kib();
    let log = std::fs::read_to_string(dir.join("controller.log")).unwrap_or_default();
    let publishes: Vec<String> = log
        .lines()
        .filter(|l| l.contains("config published"))
        .map(str::to_string)
        .collect();
    drop(rt);
    let _ = zt_stop.send(());
    zt_thread.join().unwrap();
    drop(ctl);
    Row {
        pods: bench.sizes.pods,
        ready,
        one,
        many,
        clients,
        idle_rss: idle_rss as f64 / 1024.0,
        rss: rss as f64 / 1024.0,
        peak: peak as f64 / 1024.0,
        ztunnel_first,
        ztunnel_apply_p99: bucket_quantile(&before, &after, 0.99),
        publishes: publishes.iter().rev().take(3).rev().cloned().collect(),
    }
}

fn print_row(r: &Row, changes: usize) {
    println!(
        "\n== {} pods, {} services, {NAMESPACES} namespaces; {changes} one-pod changes per phase",
        r.pods,
        (r.pods / 10).max(NAMESPACES)
    );
    println!("start to serving (read + translate + CA): {}", ms(r.ready));
    let row = |what: &str, base: Duration, run: Duration| {
        let ratio = run.as_secs_f64() / base.as_secs_f64().max(1e-9);
        println!("{what:<34} {:>12} {:>12} {ratio:>8.2}x", ms(base), ms(run));
    };
    println!(
        "{:<34} {:>12} {:>12} {:>9}",
        "",
        "1 client",
        format!("{} clients", r.clients),
        "ratio"
    );
    row("first full push", r.one.full_push, r.many.full_push);
    row(
        "  the controller's CPU in it",
        r.one.full_push_cpu,
        r.many.full_push_cpu,
    );
    row(
        "change -> ACK, p50",
        percentile(&r.one.deliveries, 0.5),
        percentile(&r.many.deliveries, 0.5),
    );
    row(
        "change -> ACK, p99",
        percentile(&r.one.deliveries, 0.99),
        percentile(&r.many.deliveries, 0.99),
    );
    row(
        "change -> last client's ACK, p99",
        percentile(&r.one.slowest, 0.99),
        percentile(&r.many.slowest, 0.99),
    );
    println!(
        "{:<34} {:>12} {:>12} {:>8.2}x",
        "bytes sent per change",
        format!("{:.0} B", r.one.bytes_per_change),
        format!("{:.0} B", r.many.bytes_per_change),
        r.many.bytes_per_change / r.one.bytes_per_change.max(1.0)
    );
    println!(
        "ztunnel's client: whole first state applied in {}; apply per response during the changes, p99 <= {:.2} ms (histogram bucket)",
        ms(r.ztunnel_first),
        r.ztunnel_apply_p99 * 1e3
    );
    println!(
        "controller RSS: serving, no clients {:.1} MiB; after the run {:.1} MiB; peak {:.1} MiB",
        r.idle_rss, r.rss, r.peak
    );
    println!("controller's own account of its last publishes:");
    for l in &r.publishes {
        println!("  {l}");
    }
}

fn main() {
    let sizes: Vec<usize> = std::env::var("PODS")
        .unwrap_or_else(|_| "1000,10000,50000".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    let clients = env_usize("CLIENTS", 100).max(2);
    let changes = env_usize("CHANGES", 30).max(1);
    println!(
        "(change latency includes the file-system notification and the {} ms debounce)",
        weft_controller::changed::DEBOUNCE.as_millis()
    );
    let mut rows = Vec::new();
    for pods in sizes {
        let r = run(pods, clients, changes);
        print_row(&r, changes);
        rows.push(r);
    }
    println!(
        "\n== the curve ({} clients); in brackets, the growth over the previous size",
        clients
    );
    println!(
        "{:>12} {:>18} {:>16} {:>18} {:>18} {:>16} {:>18}",
        "pods",
        "first push",
        "change p50",
        "change p99",
        "RSS",
        "B/change/client",
        "ztunnel apply p99"
    );
    let mut prev: Option<&Row> = None;
    for r in &rows {
        let p50 = percentile(&r.many.deliveries, 0.5).as_secs_f64() * 1e3;
        let p99 = percentile(&r.many.deliveries, 0.99).as_secs_f64() * 1e3;
        let first = r.many.full_push.as_secs_f64() * 1e3;
        let per_client = r.many.bytes_per_change / r.clients as f64;
        let figures = [
            first,
            p50,
            p99,
            r.rss,
            per_client,
            r.ztunnel_apply_p99 * 1e3,
        ];
        let growth = |i: usize, v: f64| match prev {
            None => String::new(),
            Some(p) => {
                let pv = [
                    p.many.full_push.as_secs_f64() * 1e3,
                    percentile(&p.many.deliveries, 0.5).as_secs_f64() * 1e3,
                    percentile(&p.many.deliveries, 0.99).as_secs_f64() * 1e3,
                    p.rss,
                    p.many.bytes_per_change / p.clients as f64,
                    p.ztunnel_apply_p99 * 1e3,
                ][i];
                format!(" ({:.1}x)", v / pv.max(1e-9))
            }
        };
        let cell =
            |i: usize, unit: &str| format!("{:.1}{unit}{}", figures[i], growth(i, figures[i]));
        let pods = match prev {
            None => r.pods.to_string(),
            Some(p) => format!("{} ({:.0}x)", r.pods, r.pods as f64 / p.pods as f64),
        };
        println!(
            "{pods:>12} {:>18} {:>16} {:>18} {:>18} {:>16} {:>18}",
            cell(0, " ms"),
            cell(1, " ms"),
            cell(2, " ms"),
            cell(3, " MiB"),
            cell(4, " B"),
            cell(5, " ms")
        );
        prev = Some(r);
    }
    if let Some(r) = rows.iter().find(|r| r.pods == 10_000) {
        let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
        let first = r.many.full_push;
        let p99 = percentile(&r.many.deliveries, 0.99);
        println!("\ngoals at 10 000 pods, {} clients:", r.clients);
        println!(
            "  first full push < 2 s: {} ({})",
            ms(first),
            verdict(first < Duration::from_secs(2))
        );
        println!(
            "  change -> client p99 < 100 ms: {} ({})",
            ms(p99),
            verdict(p99 < Duration::from_millis(100))
        );
        println!(
            "  controller RSS < 300 MiB: {:.1} MiB peak ({})",
            r.peak,
            verdict(r.peak < 300.0)
        );
    }
}
