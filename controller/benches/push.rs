//! `cargo xtask bench controller`: the controller under a large mesh.
//!
//! 10 000 pods and 1 000 services in 100 namespaces (one manifests file per
//! namespace), served to simulated node agents over the real TLS/gRPC delta
//! ADS endpoint by the real `weft-controller` process. Prints:
//! - the time from process start to serving;
//! - the time until every client holds the full state (first full push);
//! - per-change push latency, from the manifests file write to each client
//!   receiving the changed pod (p50/p99), which includes the directory poll;
//! - the controller's RSS.
//!
//! The baseline is the same run with one client; the ratio is 100 clients
//! over 1. Sizes are overridable: `PODS`, `SERVICES`, `CLIENTS`, `CHANGES`.

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

/// What a client saw: (client, when, address names in the response).
type Seen = (usize, Instant, Vec<String>);

/// One simulated node agent: subscribes to everything, ACKs every response,
/// reports the names it receives.
async fn client(id: usize, channel: Channel, token: String, seen: mpsc::UnboundedSender<Seen>) {
    let (tx, rx) = mpsc::channel(16);
    for ty in [ADDRESS_TYPE, AUTHORIZATION_TYPE] {
        let req = DeltaDiscoveryRequest {
            type_url: ty.into(),
            ..DeltaDiscoveryRequest::default()
        };
        tx.send(req).await.unwrap();
    }
    let mut stream = delta_ads(channel, &token, ReceiverStream::new(rx))
        .await
        .unwrap();
    while let Ok(Some(resp)) = stream.message().await {
        let at = Instant::now();
        let ack = DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            ..DeltaDiscoveryRequest::default()
        };
        if tx.send(ack).await.is_err() {
            return;
        }
        if resp.type_url == ADDRESS_TYPE {
            let names = resp.resources.into_iter().map(|r| r.name).collect();
            if seen.send((id, at, names)).is_err() {
                return;
            }
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
    /// Every delivery of every change.
    deliveries: Vec<Duration>,
    /// The last client's delivery, per change.
    slowest: Vec<Duration>,
}

struct Bench {
    sizes: Sizes,
    dir: PathBuf,
    cp: ControlPlaneAddress,
    bumped: Vec<(usize, usize)>,
    revision: usize,
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
        let mut held: Vec<HashSet<String>> = vec![HashSet::new(); count];
        let mut full = 0;
        while full < count {
            let (id, _, names) = tokio::time::timeout(WAIT, seen_rx.recv())
                .await
                .unwrap()
                .unwrap();
            if id < first {
                continue;
            }
            let h = &mut held[id - first];
            let before = h.len();
            h.extend(names);
            if before < total_names && h.len() >= total_names {
                full += 1;
            }
        }
        let full_push = start.elapsed();
        drop(held);

        let clients = first + count;
        let mut deliveries = Vec::new();
        let mut slowest = Vec::new();
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
                let (id, at, names) = tokio::time::timeout(WAIT, seen_rx.recv())
                    .await
                    .unwrap()
                    .unwrap();
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
            deliveries,
            slowest,
        }
    }
}

fn main() {
    let sizes = Sizes {
        pods: env_usize("PODS", 10_000).max(NAMESPACES),
        services: env_usize("SERVICES", 1_000).max(NAMESPACES),
    };
    let clients = env_usize("CLIENTS", 100).max(2);
    let changes = env_usize("CHANGES", 30).max(1);
    let dir = std::env::temp_dir().join(format!("weft-bench-controller-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("manifests")).unwrap();
    for ns in 0..NAMESPACES {
        write(
            &dir.join(format!("manifests/ns-{ns}.yaml")),
            &namespace_file(ns, &sizes, &[]),
        );
    }
    let tokens: String = (0..clients)
        .map(|i| format!("node-{i} node-{i}-token-0123456789\n"))
        .collect();
    std::fs::write(dir.join("tokens"), tokens).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_weft-controller"))
        .env("MANIFESTS_DIR", dir.join("manifests"))
        .env("CA_DIR", dir.join("ca"))
        .env("NODE_TOKENS", dir.join("tokens"))
        .env("XDS_ADDR", format!("127.0.0.1:{port}"))
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
    let root = loop {
        if let Ok(r) = std::fs::read_to_string(dir.join("ca/root-cert.pem"))
            && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        {
            break r;
        }
        assert!(started.elapsed() < WAIT, "controller not serving");
        std::thread::sleep(Duration::from_millis(10));
    };
    let ready = started.elapsed();
    let (idle_rss, _) = ctl.rss_kib();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut bench = Bench {
        sizes,
        dir: dir.clone(),
        cp: ControlPlaneAddress::fixed(
            format!("127.0.0.1:{port}"),
            SERVER_NAME,
            weft_hbone::tls::control_plane_client_config(&root).unwrap(),
        ),
        bumped: Vec::new(),
        revision: 0,
    };
    let (one, many) = rt.block_on(async {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let one = bench.phase(0, 1, changes, &mut rx, &tx).await;
        let many = bench.phase(1, clients - 1, changes, &mut rx, &tx).await;
        (one, many)
    });
    let (rss, peak) = ctl.rss_kib();

    let s = &bench.sizes;
    println!(
        "controller: {} pods, {} services, {NAMESPACES} namespaces (one manifests file each); {changes} one-pod changes per phase",
        s.pods, s.services
    );
    println!("start to serving (read + translate + CA): {}", ms(ready));
    let row = |what: &str, base: Duration, run: Duration| {
        let ratio = run.as_secs_f64() / base.as_secs_f64().max(1e-9);
        println!("{what:<34} {:>12} {:>12} {ratio:>8.2}x", ms(base), ms(run));
    };
    println!(
        "{:<34} {:>12} {:>12} {:>9}",
        "",
        "1 client",
        format!("{clients} clients"),
        "ratio"
    );
    row("first full push", one.full_push, many.full_push);
    row(
        "change -> client, p50",
        percentile(&one.deliveries, 0.5),
        percentile(&many.deliveries, 0.5),
    );
    row(
        "change -> client, p99",
        percentile(&one.deliveries, 0.99),
        percentile(&many.deliveries, 0.99),
    );
    row(
        "change -> last client, p50",
        percentile(&one.slowest, 0.5),
        percentile(&many.slowest, 0.5),
    );
    row(
        "change -> last client, p99",
        percentile(&one.slowest, 0.99),
        percentile(&many.slowest, 0.99),
    );
    println!(
        "(change latency includes the file-system notification and the {} ms debounce)",
        weft_controller::changed::DEBOUNCE.as_millis()
    );
    println!(
        "controller RSS: serving, no clients {:.1} MiB; after the run {:.1} MiB; peak {:.1} MiB",
        idle_rss as f64 / 1024.0,
        rss as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    let log = std::fs::read_to_string(dir.join("controller.log")).unwrap_or_default();
    let publishes: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("config published"))
        .collect();
    println!("controller's own account of its last publishes:");
    for l in publishes.iter().rev().take(3).rev() {
        println!("  {l}");
    }
    drop(ctl);
}
