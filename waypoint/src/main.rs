//! `waypoint`: reads its configuration from the environment and runs.

use tracing::info;
use tracing_subscriber::EnvFilter;
use weft_waypoint::app;
use weft_waypoint::config::Config;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true);
    if std::env::var("LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().flatten_event(true).init();
    } else {
        builder.with_ansi(false).init();
    }
    weft_runtime::raise_fd_limit();
    let cfg = Config::from_lookup(&|k| std::env::var(k).ok())?;
    info!(config = ?cfg, "starting waypoint");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(app::run(cfg))?;
    Ok(())
}
