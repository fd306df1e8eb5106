//! `ztunnel`: reads its configuration from the environment and runs.
//! `ztunnel uninstall` removes this node's pinned capture and exits.

use tracing::info;
use tracing_subscriber::EnvFilter;
use weft_ztunnel::app;
use weft_ztunnel::config::{self, Config};

/// Threads of the control plane's runtime.
const CONTROL_THREADS: usize = 2;

fn main() -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("LOG_FORMAT").is_ok_and(|f| f == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.with_ansi(false).init();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => {}
        [cmd] if cmd == "uninstall" => {
            let dir = config::bpf_pin_dir(&|k| std::env::var(k).ok());
            app::uninstall(&dir)?;
            return Ok(());
        }
        _ => anyhow::bail!("usage: ztunnel [uninstall] (configuration comes from the environment)"),
    }
    weft_runtime::raise_fd_limit();
    let cfg = Config::from_lookup(&|k| std::env::var(k).ok())?;
    info!(config = ?cfg, "starting ztunnel");
    // The control plane (xDS, certificates, admin and readiness, the
    // capture sync) has two threads, so a large push being applied does not
    // hold up a readiness probe or a certificate a new connection waits
    // for; the proxy has `worker_threads` threads of its own
    // (`proxy::Proxy`).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(CONTROL_THREADS)
        .thread_name("control")
        .enable_all()
        .build()?;
    rt.block_on(app::run(cfg))?;
    Ok(())
}
