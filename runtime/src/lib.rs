//! What every Weft process runs besides its job: small admin HTTP servers
//! ([`admin::serve`]), Prometheus text ([`metrics::encode`]), the shutdown
//! signal ([`shutdown_signal`]) and the file limit ([`raise_fd_limit`]).

#![forbid(unsafe_code)]

pub mod admin;
pub mod metrics;

/// Lifts this process's file limit as far as the kernel allows: to
/// `fs.nr_open` where privileged (CAP_SYS_RESOURCE), else the soft limit to
/// the hard one. A proxy holds two sockets per connection.
pub fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(max) = nr_open
        && setrlimit(Resource::RLIMIT_NOFILE, max, max).is_ok()
    {
        return;
    }
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// Resolves on SIGTERM (how Kubernetes stops a pod) or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
