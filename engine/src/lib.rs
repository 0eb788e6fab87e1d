//! edgeproxy data plane.
//!
//! Pure logic (snapshot, selection, affinity, geo, PROXY protocol) is
//! runtime-free and tested deterministically; everything that touches compio
//! lives in [`rt`], used by the shard and connection modules.

pub mod access;
pub mod affinity;
mod alarm;
pub mod backoff;
pub mod cbpf;
mod conn;
mod ctx;
mod deadlines;
mod engine;
pub mod failure_streak;
pub mod geo;
mod geo_cache;
mod idle;
pub mod listener;
pub mod log_limit;
pub mod own_listeners;
pub mod passive;
pub mod pool;
pub mod proxy_protocol;
pub mod rate_limit;
pub mod refused_clients;
pub mod rt;
pub mod select;
pub mod settings;
mod shard;
pub mod snapshot;
pub mod stats;
pub mod tls;
mod tls_conn;
mod warm_buffers;

pub use engine::{
    BoundListeners, Engine, EngineError, FastStop, ListenerSummary, RunningListener, StatsView,
};
pub use settings::{EngineSettings, Knobs, ListenerSpec};
