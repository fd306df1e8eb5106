//! `ztunnel`: reads its configuration from the environment and runs.

use tracing::info;
use tracing_subscriber::EnvFilter;
use weft_ztunnel::{app, config::Config};

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
    raise_fd_limit();
    let cfg = Config::from_lookup(&|k| std::env::var(k).ok())?;
    info!(config = ?cfg, "starting ztunnel");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(app::run(cfg))?;
    Ok(())
}

/// Every proxied connection holds two sockets: lift the soft file limit to the
/// hard one, as a node proxy must.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
