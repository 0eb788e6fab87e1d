//! edgeproxy control plane: configuration, the routing store and its reload
//! loop, process composition and signals. Runs on its own thread; never on a
//! shard.

pub mod api;
pub mod app;
pub mod cli;
pub mod client_limits;
pub mod config;
pub mod config_env;
pub mod demo;
pub mod health;
pub mod internal_dns;
pub mod logging;
pub mod metrics;
pub mod pool_config;
pub mod reload_thread;
pub mod replication;
pub mod routing;
pub mod store;
pub mod tls;
