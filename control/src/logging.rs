//! Log setup: `tracing` to stderr. `RUST_LOG` wins over the configured level
//! (and over `DEBUG=1`, which the config maps to "debug").

use std::io::IsTerminal;

pub fn init(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}
