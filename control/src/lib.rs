//! edgeproxy control plane: configuration, the routing store and its reload
//! loop, process composition and signals. Runs on its own thread; never on a
//! shard.

pub mod api;
pub mod app;
pub mod bfd;
pub mod bgp;
pub mod bounded_http;
pub mod check_routing;
pub mod cli;
pub mod client_limits;
pub mod config;
pub mod config_diff;
pub mod config_env;
pub mod config_paths;
pub mod config_watch;
pub mod demo;
pub mod drain;
pub mod fd_limit;
pub mod geodns;
pub mod health;
pub mod internal_dns;
pub mod log_config;
pub mod logging;
pub mod memcpy_tuning;
pub mod mesh;
pub mod metrics;
pub mod no_backend_warn;
pub mod own_row_gate;
pub mod pg_source;
pub mod pool_config;
pub mod process_metrics;
pub mod readiness;
pub mod reload_guard;
pub mod reload_thread;
pub mod replication;
pub mod routing;
pub mod routing_db_path;
pub mod sd_notify;
pub mod stdout;
pub mod steering;
pub mod store;
pub mod tls;
pub mod traffic_watch;
pub mod upgrade;
pub mod version;
