//! The three capture listeners and what they share.
//!
//! Start at [`Proxy::start`]: [`outbound`] takes pods' outgoing connections (15001),
//! [`inbound`] terminates HBONE (15008), [`inbound_plaintext`] takes plaintext
//! to captured pods (15006). All upstream sockets toward pods are transparent,
//! so applications see real peer addresses on both sides.

mod copy;
pub mod inbound;
pub mod inbound_plaintext;
pub mod open;
pub mod outbound;

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tracing::{error, info, warn};
use weft_api::authz::{DenyReason, Verdict};
use weft_api::{Identity, Service, Workload};
use weft_hbone::client::Pool;
use weft_hbone::server::StreamBudget;

use crate::config::{CONNECT_TIMEOUT, Config, HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
use crate::metrics::{
    Direction, Metrics, Peer, PolicyLabels, PolicyReason, RefusalReason, Reporter, SecurityPolicy,
    TcpLabels,
};
use crate::state::{State, Store};
use weft_identity::CertManager;

/// Pooled HBONE connections, keyed as Istio's ztunnel keys them: (source pod
/// address, source identity, destination identity, destination pod
/// address:15008). Istio refuses a CONNECT whose target is not the address
/// the connection was dialled to, and takes the TCP peer as the source, so a
/// connection serves one source pod and one destination pod.
pub type PoolKey = (IpAddr, Identity, Identity, SocketAddr);

/// Everything a connection handler needs.
#[derive(Debug)]
pub struct ProxyInputs {
    pub cfg: Config,
    pub state: Arc<Store>,
    pub certs: Arc<CertManager>,
    pub metrics: Arc<Metrics>,
    /// One HBONE pool per proxy worker ([`Proxy`]): a pooled connection's
    /// task and the streams over it run on one thread.
    pub pools: Box<[Pool<PoolKey>]>,
    /// Inbound HBONE streams, taken before a stream's task is spawned.
    pub streams: Arc<StreamBudget>,
    /// Becomes `true` when ztunnel drains: listeners close, HBONE servers
    /// send GOAWAY, open connections finish.
    pub drain: tokio::sync::watch::Receiver<bool>,
    /// Admitted inbound connections: a policy change re-checks them.
    pub open: Arc<open::OpenConnections>,
}

thread_local! {
    /// The proxy worker this thread is ([`Proxy`]); 0 elsewhere.
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

impl ProxyInputs {
    /// The HBONE pool of the worker this runs on.
    pub fn pool(&self) -> &Pool<PoolKey> {
        &self.pools[WORKER.get() % self.pools.len()]
    }

    /// Admits an inbound connection to `dst`: authorized by `state`, the
    /// snapshot of `generation`, then registered so that later policy
    /// changes apply to it too ([`open::OpenConnections::register_checked`]).
    /// None when a policy denies it (logged and counted).
    pub fn admit(
        &self,
        state: &State,
        generation: u64,
        dst: &Workload,
        a: open::Admission<'_>,
    ) -> Option<open::Registered> {
        authorize(&self.metrics, state, dst, &a)
            .then(|| {
                self.open
                    .register_checked(&self.state, generation, &self.metrics, a)
            })
            .flatten()
    }
}

/// The proxy workers, started: each is a thread with a runtime of its own
/// and its own three listeners in the ports' SO_REUSEPORT groups, so the
/// kernel spreads connections over the workers by their addresses and every
/// task a connection spawns (its splice, its HBONE connection, the streams
/// over it) stays on the thread that accepted it. With one runtime shared
/// by all workers, the two halves of a bulk transfer (the splice and the
/// HBONE connection's task) woke each other across threads and its bytes
/// moved between the cores' caches. Measured on the sending node under
/// iperf3, per GB: futex calls 2,100 before, none now; context switches
/// 6,900 before, 1,200 now. Envoy's workers own their connections the same
/// way.
#[derive(Debug)]
pub struct Proxy {
    /// One per worker: done when that worker has accepted its last
    /// connection and every one of them has finished.
    finished: Vec<tokio::sync::oneshot::Receiver<()>>,
}

/// One of something for each listening port: a worker's listeners, or the
/// connections a port may hold at once across the workers.
#[derive(Clone, Debug)]
struct Ports<T> {
    outbound: T,
    inbound: T,
    inbound_plaintext: T,
}

impl<T> Ports<T> {
    /// `f` of each port number.
    fn try_new(mut f: impl FnMut(u16) -> io::Result<T>) -> io::Result<Self> {
        Ok(Ports {
            outbound: f(OUTBOUND_PORT)?,
            inbound: f(HBONE_PORT)?,
            inbound_plaintext: f(INBOUND_PLAINTEXT_PORT)?,
        })
    }

    fn try_map<U>(self, mut f: impl FnMut(T) -> io::Result<U>) -> io::Result<Ports<U>> {
        Ok(Ports {
            outbound: f(self.outbound)?,
            inbound: f(self.inbound)?,
            inbound_plaintext: f(self.inbound_plaintext)?,
        })
    }
}

// === impl Proxy ===

impl Proxy {
    /// Binds the listeners (transparent, on `cfg.listen_addr`) and starts
    /// one worker per HBONE pool in `inputs`; returns once every worker
    /// listens. Fails if a listener, a runtime or a thread cannot be had:
    /// ztunnel then exits.
    ///
    /// A worker that stops before the drain (it could not listen, or its
    /// accept loops panicked) takes ztunnel down: a proxy short of a
    /// worker would go on answering ready. Capture stays pinned, and the
    /// next ztunnel takes over.
    pub async fn start(inputs: Arc<ProxyInputs>) -> io::Result<Self> {
        let ip = IpAddr::V4(inputs.cfg.listen_addr);
        let bind =
            |port| transparent_listener(SocketAddr::new(ip, port)).and_then(TcpListener::into_std);
        let workers = (0..inputs.pools.len())
            .map(|_| Ports::try_new(bind))
            .collect::<io::Result<Vec<_>>>()?;
        let limit = inputs.cfg.max_connections;
        let permits = Ports::try_new(|_| Ok(Arc::new(Semaphore::new(limit))))?;
        let mut finished = Vec::with_capacity(workers.len());
        let mut listening = Vec::with_capacity(workers.len());
        for (index, listeners) in workers.into_iter().enumerate() {
            let (done, wait) = tokio::sync::oneshot::channel();
            let (up, started) = tokio::sync::oneshot::channel();
            let (pi, permits) = (inputs.clone(), permits.clone());
            std::thread::Builder::new()
                .name(format!("proxy-{index}"))
                .spawn(move || worker(index, listeners, permits, pi, up, done))?;
            finished.push(wait);
            listening.push(started);
        }
        for started in listening {
            started
                .await
                .unwrap_or_else(|_| Err(io::Error::other("a proxy worker ended as it started")))?;
        }
        Ok(Proxy { finished })
    }

    /// Returns once the drain has started and every worker has finished
    /// every connection it accepted.
    pub async fn finished(self) {
        for worker in self.finished {
            let _ = worker.await;
        }
    }
}

/// A worker's thread: its runtime, its listeners registered there (`up`
/// says whether they are), then [`serve`] until the drain has finished
/// (`done`). The runtime then runs on until the process exits, so what its
/// connections left behind (pooled HBONE connections, a stream's last
/// metrics) is not cut short before the rest of ztunnel has drained.
fn worker(
    index: usize,
    listeners: Ports<std::net::TcpListener>,
    permits: Ports<Arc<Semaphore>>,
    pi: Arc<ProxyInputs>,
    up: tokio::sync::oneshot::Sender<io::Result<()>>,
    done: tokio::sync::oneshot::Sender<()>,
) {
    WORKER.set(index);
    let (runtime, listeners) = match runtime_listening(listeners) {
        Ok(r) => r,
        Err(e) => {
            let _ = up.send(Err(e));
            return;
        }
    };
    let _ = up.send(Ok(()));
    let drain = pi.drain.clone();
    let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(serve(listeners, permits, pi));
    }));
    if served.is_err() || !*drain.borrow() {
        error!(
            worker = index,
            panicked = served.is_err(),
            "a proxy worker stopped before the drain; ztunnel exits (capture stays pinned)"
        );
        std::process::exit(1);
    }
    let _ = done.send(());
    runtime.block_on(std::future::pending::<()>());
}

/// A single-threaded runtime, and `listeners` registered with it.
fn runtime_listening(
    listeners: Ports<std::net::TcpListener>,
) -> io::Result<(tokio::runtime::Runtime, Ports<TcpListener>)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let listeners = {
        let _guard = runtime.enter();
        listeners.try_map(TcpListener::from_std)?
    };
    Ok((runtime, listeners))
}

/// A worker: accepts on its listeners until the drain starts, then returns
/// once every connection it accepted has finished.
async fn serve(
    listeners: Ports<TcpListener>,
    permits: Ports<Arc<Semaphore>>,
    pi: Arc<ProxyInputs>,
) {
    tokio::join!(
        accept_loop(
            listeners.outbound,
            Direction::outbound,
            permits.outbound,
            pi.clone(),
            outbound::handle
        ),
        accept_loop(
            listeners.inbound,
            Direction::inbound,
            permits.inbound,
            pi.clone(),
            inbound::handle
        ),
        accept_loop(
            listeners.inbound_plaintext,
            Direction::inbound_plaintext,
            permits.inbound_plaintext,
            pi.clone(),
            inbound_plaintext::handle
        ),
    );
}

/// Accepts connections and spawns `handle` for each, holding at most
/// `MAX_CONNECTIONS` at once (`permits`, shared by every worker's loop on
/// this port):
/// past that, new connections are closed at once and counted, so a storm
/// cannot exhaust memory or file descriptors.
async fn accept_loop<F, Fut>(
    listener: TcpListener,
    direction: Direction,
    permits: Arc<Semaphore>,
    pi: Arc<ProxyInputs>,
    handle: F,
) where
    F: Fn(Arc<ProxyInputs>, TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let limit = pi.cfg.max_connections;
    // This loop's own connections, for its drain: the shared permits count
    // every worker's.
    let own = Arc::new(Semaphore::new(limit));
    // When the "limit reached" warning was last logged (at most every 5 s).
    let mut last_warn: Option<Instant> = None;
    let mut drain = pi.drain.clone();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = weft_hbone::server::drained(&mut drain) => break,
        };
        let (stream, peer) = match accepted {
            Ok(c) => c,
            Err(error) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(?direction, %error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (Ok(permit), Ok(mine)) = (
            permits.clone().try_acquire_owned(),
            own.clone().try_acquire_owned(),
        ) else {
            pi.metrics.refuse(direction, RefusalReason::overloaded);
            if last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                last_warn = Some(Instant::now());
                warn!(
                    ?direction,
                    limit, "connection limit reached, refusing new connections"
                );
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let fut = handle(pi.clone(), stream, peer);
        tokio::spawn(async move {
            fut.await;
            drop((permit, mine));
        });
    }
    // Closing the listener hands its queued connections to the new ztunnel.
    drop(listener);
    info!(?direction, "listener closed; draining its connections");
    let all = u32::try_from(limit).unwrap_or(u32::MAX);
    let _ = own.acquire_many(all).await;
}

/// A listener that accepts connections for any destination address steered to
/// it by the capture program (IP_TRANSPARENT).
/// SO_REUSEPORT: a new ztunnel binds beside the running one and takes new
/// connections from it; connections still queued when the old one closes its
/// listener move to the new one (net.ipv4.tcp_migrate_req).
pub fn transparent_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    weft_runtime::admin::reuse_port_listener(addr, true)
}

/// Connects to `dst` from `src` (a pod address, not the node's), so the
/// destination sees the real client. Bounded by [`CONNECT_TIMEOUT`].
pub async fn transparent_connect(src: IpAddr, dst: SocketAddr) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_ip_transparent_v4(true)?;
    socket.set_nonblocking(true)?;
    // Without this, bind(src, 0) must find a port free for every destination
    // from `src` at once: under connection churn the kernel searches the
    // whole range on every connect (measured: 1,857/s falling to 164/s, a
    // core spent searching). With it the port is chosen at connect time,
    // unique per 4-tuple only.
    nix::sys::socket::setsockopt(
        &socket,
        nix::sys::socket::sockopt::IpBindAddressNoPort,
        &true,
    )
    .map_err(io::Error::from)?;
    socket.bind(&SocketAddr::new(src, 0).into())?;
    let socket = TcpSocket::from_std_stream(socket.into());
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Connects to `target` from `src` (transparent) and splices `client` to it.
/// A failed connect is counted and logged as a refusal. Returns (bytes
/// client→target, bytes target→client, error).
pub async fn forward<C>(
    metrics: &Metrics,
    direction: Direction,
    client: &mut C,
    src: SocketAddr,
    target: SocketAddr,
) -> (u64, u64, Option<io::Error>)
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    forward_until(
        metrics,
        direction,
        client,
        src,
        target,
        std::future::pending(),
    )
    .await
}

/// [`forward`], ended early when `stop` yields the error to report; the
/// bytes moved until then are still counted.
pub async fn forward_until<C>(
    metrics: &Metrics,
    direction: Direction,
    client: &mut C,
    src: SocketAddr,
    target: SocketAddr,
    stop: impl std::future::Future<Output = io::Error>,
) -> (u64, u64, Option<io::Error>)
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    match transparent_connect(src.ip(), target).await {
        Ok(mut upstream) => copy::copy_bidirectional_until(client, &mut upstream, stop).await,
        Err(e) => {
            refused(
                metrics,
                direction,
                RefusalReason::upstream_connect,
                src,
                target,
                &e,
            );
            (0, 0, Some(e))
        }
    }
}

/// One proxied connection's metrics and access log, from open to close.
#[derive(Debug)]
pub struct ConnectionLog {
    labels: TcpLabels,
    direction: Direction,
    started: Instant,
    src: SocketAddr,
    dst: SocketAddr,
    src_identity: String,
    dst_identity: String,
    dst_workload: String,
    dst_service: String,
}

impl ConnectionLog {
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        metrics: &Metrics,
        direction: Direction,
        src_addr: SocketAddr,
        dst_addr: SocketAddr,
        src: Peer<'_>,
        dst: Peer<'_>,
        security: SecurityPolicy,
    ) -> Self {
        let reporter = match direction {
            Direction::outbound => Reporter::source,
            Direction::inbound | Direction::inbound_plaintext => Reporter::destination,
        };
        let labels = TcpLabels::new(reporter, &src, &dst, security);
        metrics.opened.get_or_create(&labels).inc();
        ConnectionLog {
            direction,
            started: Instant::now(),
            src: src_addr,
            dst: dst_addr,
            src_identity: labels.peers.source_principal.clone(),
            dst_identity: labels.peers.destination_principal.clone(),
            dst_workload: dst
                .workload
                .map(|w| format!("{}/{}", w.namespace, w.name))
                .unwrap_or_default(),
            dst_service: dst.service.map(|s| s.hostname.clone()).unwrap_or_default(),
            labels,
        }
    }

    /// Records the close: byte counters, closed counter, one access log line.
    pub fn close(self, metrics: &Metrics, up: u64, down: u64, error: Option<&io::Error>) {
        metrics.received.get_or_create(&self.labels).inc_by(up);
        metrics.sent.get_or_create(&self.labels).inc_by(down);
        metrics.closed.get_or_create(&self.labels).inc();
        let error = error.map(ToString::to_string).unwrap_or_default();
        info!(
            target: "access",
            direction = ?self.direction,
            src.addr = %self.src,
            src.identity = %self.src_identity,
            dst.addr = %self.dst,
            dst.workload = %self.dst_workload,
            dst.service = %self.dst_service,
            dst.identity = %self.dst_identity,
            security = ?self.labels.connection_security_policy,
            bytes_sent = up,
            bytes_recv = down,
            duration_ms = self.started.elapsed().as_millis() as u64,
            error = %error,
            "connection complete"
        );
    }
}

/// Logs and counts a refused connection.
pub fn refused(
    metrics: &Metrics,
    direction: Direction,
    reason: RefusalReason,
    src: SocketAddr,
    dst: SocketAddr,
    detail: &dyn std::fmt::Display,
) {
    metrics.refuse(direction, reason);
    warn!(
        target: "access",
        ?direction,
        src.addr = %src,
        dst.addr = %dst,
        ?reason,
        error = %detail,
        "connection refused"
    );
}

/// Decides a connection to `dst` by its policies. A denial is counted (by
/// reason and by deciding policy) and logged with the policy's name; a
/// dry-run policy that matched is counted and logged, never enforced.
pub fn authorize(
    metrics: &Metrics,
    state: &State,
    dst: &Workload,
    a: &open::Admission<'_>,
) -> bool {
    let (verdict, dry_run) = state.authorize(dst, &a.connection());
    if dry_run.is_empty() && matches!(verdict, Verdict::Allow { .. }) {
        return true;
    }
    let (direction, src_addr, dst_addr) = (a.direction, a.source_addr, a.destination_addr);
    // Only what is logged pays for these.
    let src_identity = a.source.map(ToString::to_string).unwrap_or_default();
    let dst_workload = format!("{}/{}", dst.namespace, dst.name);
    for policy in dry_run {
        info!(
            target: "access",
            ?direction,
            src.addr = %src_addr,
            src.identity = %src_identity,
            dst.addr = %dst_addr,
            dst.workload = %dst_workload,
            %policy,
            "dry-run policy matched (not enforced)"
        );
        let labels = PolicyLabels {
            direction,
            policy,
            reason: PolicyReason::dry_run_matched,
        };
        metrics.policy_dry_run.get_or_create(&labels).inc();
    }
    let Verdict::Deny { policy, reason } = verdict else {
        return true;
    };
    let policy = policy.unwrap_or_default();
    let reason = match reason {
        DenyReason::DenyMatched => PolicyReason::deny_matched,
        DenyReason::NoAllowMatched => PolicyReason::no_allow_matched,
        DenyReason::Unavailable => PolicyReason::policy_unavailable,
    };
    metrics.refuse(direction, RefusalReason::policy_denied);
    warn!(
        target: "access",
        ?direction,
        src.addr = %src_addr,
        src.identity = %src_identity,
        dst.addr = %dst_addr,
        dst.workload = %dst_workload,
        %policy,
        ?reason,
        "connection denied by policy"
    );
    let labels = PolicyLabels {
        direction,
        policy,
        reason,
    };
    metrics.policy_denials.get_or_create(&labels).inc();
    false
}

/// A workload's identity when its fields form a valid one.
pub fn identity_of(w: &Workload) -> Option<Identity> {
    w.identity().ok()
}

/// The peer description of a workload for labels.
pub fn peer<'a>(
    w: Option<&'a Workload>,
    id: Option<&'a Identity>,
    svc: Option<&'a Service>,
) -> Peer<'a> {
    Peer {
        workload: w,
        identity: id,
        service: svc,
    }
}
