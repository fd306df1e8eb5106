//! Which ztunnel on a node is the newest, so that readiness tells them apart.
//!
//! During a rollout the new ztunnel runs beside the old one and both hold
//! the readiness port (SO_REUSEPORT), so the kubelet's probe of the new pod
//! can reach the old process. Each ztunnel therefore claims an abstract
//! unix socket named after its pin directory. Abstract sockets belong to a
//! network namespace, the node's for a ztunnel, so the name is per node
//! with no file and no volume. A starting ztunnel that finds the name taken
//! connects to it. That tells the holder it is superseded: from then on the
//! holder answers not ready, and it releases the name for its successor,
//! which takes it over. A ready answer thus always comes from the newest
//! process.

use std::os::linux::net::SocketAddrExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tracing::{info, warn};

/// How long a starting ztunnel waits for its predecessor to let go.
const TAKEOVER: Duration = Duration::from_secs(10);
/// A superseded ztunnel checks whether its successor still holds the name
/// after this long, then this often.
#[cfg(not(test))]
const RECLAIM_AFTER: Duration = Duration::from_secs(15);
#[cfg(not(test))]
const RECLAIM_EVERY: Duration = Duration::from_secs(5);
#[cfg(test)]
const RECLAIM_AFTER: Duration = Duration::from_millis(300);
#[cfg(test)]
const RECLAIM_EVERY: Duration = Duration::from_millis(50);

/// This process's place in the succession: set once a newer ztunnel on the
/// node has started.
#[derive(Clone, Debug, Default)]
pub struct Succession {
    superseded: Arc<AtomicBool>,
}

impl Succession {
    pub fn superseded(&self) -> bool {
        self.superseded.load(Ordering::Acquire)
    }

    /// Claims `name` (an abstract socket name) for this process, telling a
    /// predecessor that holds it to step down, and waits for it to let go.
    /// Without the claim (no predecessor lets go in time, or no socket), a
    /// warning says readiness cannot tell this process from another, and
    /// the process runs on.
    pub async fn claim(name: &str) -> Self {
        let me = Succession::default();
        let addr = match std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()) {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "cannot name the succession socket; readiness cannot tell ztunnels apart");
                return me;
            }
        };
        let started = Instant::now();
        let mut told = false;
        loop {
            match std::os::unix::net::UnixListener::bind_addr(&addr) {
                Ok(listener) => {
                    if told {
                        info!("took over from the previous ztunnel on this node");
                    }
                    me.watch(listener, addr);
                    return me;
                }
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    // Connecting is the message, sent to whoever holds the
                    // name now: the holder told first may have let go and
                    // an older ztunnel taken the name back in between. A
                    // knock on a holder already stepping down is harmless.
                    // A unix connect blocks while the holder's backlog is
                    // full: bounded.
                    let a = addr.clone();
                    let knock = tokio::task::spawn_blocking(move || {
                        std::os::unix::net::UnixStream::connect_addr(&a).is_ok()
                    });
                    told |= matches!(
                        tokio::time::timeout(Duration::from_secs(1), knock).await,
                        Ok(Ok(true))
                    );
                    if started.elapsed() > TAKEOVER {
                        warn!(
                            "the previous ztunnel did not let go of the succession socket; readiness cannot tell the two apart"
                        );
                        return me;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => {
                    warn!(error = %e, "cannot claim the succession socket; readiness cannot tell ztunnels apart");
                    return me;
                }
            }
        }
    }

    /// Waits for a successor's knock, then steps down and lets go. Should
    /// the successor go away (it crashed, the rollout was undone), this
    /// process takes the name back and is the newest again.
    fn watch(
        &self,
        listener: std::os::unix::net::UnixListener,
        addr: std::os::unix::net::SocketAddr,
    ) {
        let superseded = self.superseded.clone();
        let into_tokio = |l: std::os::unix::net::UnixListener| {
            l.set_nonblocking(true)
                .and_then(|()| tokio::net::UnixListener::from_std(l))
        };
        let mut listener = match into_tokio(listener) {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "cannot watch the succession socket");
                return;
            }
        };
        // Abstract sockets have no permissions: only a process of our own
        // user (a ztunnel) may knock.
        let uid = {
            use std::os::unix::fs::MetadataExt;
            // /proc/self belongs to the process's effective user; unknown,
            // no knock counts.
            std::fs::metadata("/proc/self").map_or(u32::MAX, |m| m.uid())
        };
        tokio::spawn(async move {
            loop {
                loop {
                    match listener.accept().await {
                        Ok((stream, _)) => match stream.peer_cred() {
                            Ok(c) if c.uid() == uid => break,
                            other => {
                                warn!(peer = ?other, "a process of another user knocked on the succession socket; ignored")
                            }
                        },
                        Err(e) => {
                            warn!(error = %e, "succession socket");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
                superseded.store(true, Ordering::Release);
                info!(
                    "a newer ztunnel started on this node: not ready from now on; serving until SIGTERM"
                );
                // Dropping the listener frees the name for the successor.
                drop(listener);
                // Once the successor has taken the name, it holds it while
                // it lives: free again means it is gone.
                tokio::time::sleep(RECLAIM_AFTER).await;
                listener = loop {
                    if let Ok(l) =
                        std::os::unix::net::UnixListener::bind_addr(&addr).map(into_tokio)
                        && let Ok(l) = l
                    {
                        break l;
                    }
                    tokio::time::sleep(RECLAIM_EVERY).await;
                };
                superseded.store(false, Ordering::Release);
                warn!("the newer ztunnel on this node is gone: this one is the newest again");
            }
        });
    }
}

/// The succession socket's name for ztunnels pinning capture in `pin_dir`.
pub fn socket_name(pin_dir: &std::path::Path) -> String {
    format!("weft-ztunnel:{}", pin_dir.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_newer_process_supersedes_the_holder() {
        let name = format!("weft-ztunnel-test:{}", std::process::id());
        let first = Succession::claim(&name).await;
        assert!(!first.superseded());
        let second = Succession::claim(&name).await;
        assert!(first.superseded(), "the first steps down");
        assert!(!second.superseded());
        let third = Succession::claim(&name).await;
        assert!(second.superseded() && !third.superseded());
    }

    /// A successor that goes away (its process, here its runtime, ends)
    /// gives the name back: the old one is the newest again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_holder_comes_back_when_its_successor_is_gone() {
        let name = format!("weft-ztunnel-test-back:{}", std::process::id());
        let first = Succession::claim(&name).await;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let n = name.clone();
        let second = rt
            .spawn(async move { Succession::claim(&n).await })
            .await
            .unwrap();
        assert!(first.superseded() && !second.superseded());
        // Still there: the first stays superseded past its first look.
        tokio::time::sleep(RECLAIM_AFTER * 2).await;
        assert!(first.superseded());
        rt.shutdown_background();
        let started = std::time::Instant::now();
        while first.superseded() {
            assert!(started.elapsed() < Duration::from_secs(5), "not reclaimed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The holder a starting ztunnel knocked on lets go, and another (an
    /// older one reclaiming the name) takes it first: the starting one
    /// knocks on that one too, and takes over.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_holder_that_took_the_name_in_between_is_told_too() {
        use std::os::unix::net::UnixListener;
        let name = format!("weft-ztunnel-test-between:{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let first = UnixListener::bind_addr(&addr).unwrap();
        let n = name.clone();
        let newest = tokio::spawn(async move { Succession::claim(&n).await });
        // Waits for a knock on `l`, holds the name a moment as a holder
        // letting go does, frees it and, with `older`, takes it back at
        // once as an older ztunnel reclaiming it would.
        let knocked = |l: UnixListener, older: bool| {
            let addr = addr.clone();
            tokio::task::spawn_blocking(move || {
                l.set_nonblocking(true).unwrap();
                let started = Instant::now();
                while started.elapsed() < Duration::from_secs(3) {
                    if l.accept().is_ok() {
                        std::thread::sleep(Duration::from_millis(50));
                        drop(l);
                        let next = older.then(|| {
                            UnixListener::bind_addr(&addr)
                                .expect("the name taken back before the newest binds it")
                        });
                        return (true, next);
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                (false, None)
            })
        };
        let (told, older) = knocked(first, true).await.unwrap();
        assert!(told, "the first holder is told");
        let (told, _) = knocked(older.unwrap(), false).await.unwrap();
        assert!(told, "the holder that took the name in between is told too");
        let newest = tokio::time::timeout(Duration::from_secs(5), newest)
            .await
            .expect("the newest takes over well before its 10 s limit")
            .unwrap();
        assert!(!newest.superseded());
        assert!(
            UnixListener::bind_addr(&addr).is_err(),
            "the newest holds the name"
        );
    }
}
