//! Structured logging setup (text or JSON) from the `[log]` config section.

use crate::config::{Config, LogFormat};
use tracing_subscriber::EnvFilter;

/// Install the global subscriber. `RUST_LOG`, when set, wins over `log.level`.
pub fn init(cfg: &Config) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(&cfg.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match cfg.log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
