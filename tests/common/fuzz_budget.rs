//! How long each `bolero` property target runs under plain `cargo test`:
//! `EDGEPROXY_FUZZ_SECS` seconds, else the target file's default. Shared by
//! every fuzz file of the workspace (`#[path]`-included from the crates'
//! own `tests/`), so the variable means the same everywhere.

use std::time::Duration;

/// `EDGEPROXY_FUZZ_SECS`, else `default_secs`.
pub fn budget(default_secs: u64) -> Duration {
    let secs = std::env::var("EDGEPROXY_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_secs);
    Duration::from_secs(secs)
}
