//! What every Weft process runs besides its job: small admin HTTP servers
//! ([`admin::serve`]), Prometheus text ([`metrics::encode`]), the shutdown
//! signal ([`shutdown_signal`]), the file limit ([`raise_fd_limit`]), and
//! a process's CPU time as the kernel counts it ([`cpu_seconds`]).

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

/// User and system (kernel) CPU seconds process `pid` has used so far, all
/// its threads, from `/proc/<pid>/stat`.
pub fn cpu_seconds(pid: u32) -> std::io::Result<(f64, f64)> {
    stat_cpu_seconds(&format!("/proc/{pid}/stat"))
}

/// Each thread of process `pid`: its name and the CPU seconds (user and
/// system) it has used so far, from `/proc/<pid>/task/*/`.
pub fn thread_cpu_seconds(pid: u32) -> std::io::Result<Vec<(String, f64)>> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let dir = task?.path();
        // A thread that ends meanwhile is no longer one of them.
        let (Ok(name), Ok((user, system))) = (
            std::fs::read_to_string(dir.join("comm")),
            stat_cpu_seconds(&dir.join("stat").to_string_lossy()),
        ) else {
            continue;
        };
        threads.push((name.trim_end().to_string(), user + system));
    }
    Ok(threads)
}

/// utime and stime of a `stat` file of procfs, in seconds.
fn stat_cpu_seconds(path: &str) -> std::io::Result<(f64, f64)> {
    let stat = std::fs::read_to_string(path)?;
    // After the parenthesised command name (which may hold spaces): the
    // state, the 3rd field of the line, ..., utime and stime, the 14th and
    // 15th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    Ok((ticks(11) / hz, ticks(12) / hz))
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    /// This process's user time grows while it computes; a process that
    /// does not exist is an error.
    #[test]
    fn cpu_seconds_counts_this_process() {
        let me = std::process::id();
        let (user0, system0) = super::cpu_seconds(me).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut x = 0u64;
        loop {
            for i in 0..1_000_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
            let (user, system) = super::cpu_seconds(me).unwrap();
            assert!(user >= user0 && system >= system0);
            if user - user0 >= 0.05 {
                break;
            }
            assert!(Instant::now() < deadline, "user time stayed at {user0}");
        }
        assert!(super::cpu_seconds(u32::MAX).is_err());
    }

    /// A named thread that computes is listed under its name, with the
    /// time it spent.
    #[test]
    fn thread_cpu_seconds_names_each_thread() {
        let me = std::process::id();
        let (done, wait) = std::sync::mpsc::channel();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let worker = std::thread::Builder::new()
            .name("busy-thread".into())
            .spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(10);
                let mut x = 0u64;
                // Until the kernel counts 50 ms of its CPU, or 10 s pass.
                while Instant::now() < deadline {
                    for i in 0..1_000_000u64 {
                        x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
                    }
                    let threads = super::thread_cpu_seconds(me).unwrap();
                    if threads
                        .iter()
                        .any(|(n, s)| n == "busy-thread" && *s >= 0.05)
                    {
                        break;
                    }
                }
                done.send(()).unwrap();
                // Alive while the test reads it.
                let _ = stopped.recv();
            })
            .unwrap();
        wait.recv().unwrap();
        let threads = super::thread_cpu_seconds(me).unwrap();
        stop.send(()).unwrap();
        worker.join().unwrap();
        let busy: Vec<_> = threads.iter().filter(|(n, _)| n == "busy-thread").collect();
        assert_eq!(busy.len(), 1, "{threads:?}");
        assert!(busy[0].1 >= 0.05, "{threads:?}");
        // This thread waited meanwhile: its time is its own, not the
        // process's (the kernel keeps 15 bytes of a thread's name).
        let me_name: String = std::thread::current()
            .name()
            .unwrap_or_default()
            .chars()
            .take(15)
            .collect();
        let waited: Vec<_> = threads.iter().filter(|(n, _)| *n == me_name).collect();
        assert_eq!(waited.len(), 1, "{me_name:?} in {threads:?}");
        assert!(waited[0].1 < busy[0].1, "{threads:?}");
        assert!(super::thread_cpu_seconds(u32::MAX).is_err());
    }
}
