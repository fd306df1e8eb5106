//! `weft-controller`: reads its configuration from the environment and runs.

use tracing::info;
use tracing_subscriber::EnvFilter;
use weft_controller::app::{self, Config};

fn main() -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .init();
    let cfg = Config::from_lookup(&|k| std::env::var(k).ok())?;
    info!(config = ?cfg, "starting weft-controller");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(app::run(cfg));
    // Tasks still running (streams, watches) are dropped, not awaited.
    rt.shutdown_timeout(std::time::Duration::from_millis(500));
    result?;
    Ok(())
}
