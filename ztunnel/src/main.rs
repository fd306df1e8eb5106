//! `ztunnel`: reads its configuration from the environment and runs.
//! `ztunnel uninstall` removes this node's pinned capture and exits.

use tracing::info;
use tracing_subscriber::EnvFilter;
use weft_ztunnel::app;
use weft_ztunnel::config::{self, Config};

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
    raise_fd_limit();
    let cfg = Config::from_lookup(&|k| std::env::var(k).ok())?;
    info!(config = ?cfg, "starting ztunnel");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(app::run(cfg))?;
    Ok(())
}

/// Every proxied connection holds two sockets: lift the file limit as far as
/// the kernel allows (`fs.nr_open`, when privileged, as a node proxy is),
/// else the soft limit to the hard one.
fn raise_fd_limit() {
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
