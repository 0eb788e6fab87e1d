//! Command line: `edgeproxy [run] [--config FILE]`, `edgeproxy check-config`,
//! `edgeproxy backends list|add|rm|drain` (the discovery API's client),
//! `edgeproxy cluster status` (replication's view), `edgeproxy drain` /
//! `undrain` / `pop status` (this POP's traffic steering), `edgeproxy bgp
//! status` (the anycast speaker).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "edgeproxy",
    version,
    about = "Edge TCP proxy for Points of Presence",
    long_about = "Edge TCP proxy for Points of Presence.\n\n\
        Proxies TCP connections to the best backend in the routing table \
        (routing.db, SQLite): same country, then same region, then this POP's \
        region, then anywhere, by load and weight; clients stick to their \
        backend for the binding TTL. The routing table is re-read when it \
        changes, without dropping connections.\n\n\
        Without --config, settings come from defaults and the original \
        edgeProxy's environment variables (EDGEPROXY_LISTEN_ADDR, \
        EDGEPROXY_DB_PATH, EDGEPROXY_REGION, ...). Signals: SIGHUP re-reads \
        the config file and the routing table; SIGTERM/SIGINT stop accepting \
        and drain open connections for limits.shutdown_grace_secs."
)]
pub struct Cli {
    /// TOML configuration file (see config/edgeproxy.toml for every key).
    #[arg(
        short,
        long,
        global = true,
        env = "EDGEPROXY_CONFIG",
        value_name = "FILE"
    )]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate the configuration (file plus environment) and print the
    /// effective settings as TOML.
    CheckConfig,
    /// Manage backends through a running proxy's discovery API:
    /// list, add (register or update), rm (deregister), drain.
    Backends(Box<crate::api::client::BackendsArgs>),
    /// Replication between POPs, through a running POP's API: `status`
    /// lists the members, their state, round trip, last sync and lag.
    Cluster(Box<crate::replication::cli::ClusterArgs>),
    /// Drain this POP through its API: GeoDNS (here and at every other
    /// POP) stops answering it, and with BGP its anycast routes are tagged
    /// GRACEFUL_SHUTDOWN, then withdrawn after [bgp] drain_delay_secs.
    /// Open connections go on; the drain outlives a restart.
    Drain(Box<crate::steering::cli::DrainArgs>),
    /// End this POP's drain: back in GeoDNS answers and announced again
    /// (when it can serve).
    Undrain(Box<crate::steering::cli::DrainArgs>),
    /// This POP's traffic steering: `status` says whether it can serve and
    /// why, whether it is drained, in GeoDNS, and announced.
    Pop(Box<crate::steering::cli::PopArgs>),
    /// The anycast BGP speaker: `status` lists the sessions (state, uptime,
    /// hold time, prefixes announced) and the announcement.
    Bgp(Box<crate::bgp::cli::BgpArgs>),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Run => crate::app::run(cli.config),
        Command::CheckConfig => crate::app::check(cli.config.as_deref()).map(|config| {
            print!("{}", config.to_toml());
        }),
        Command::Backends(args) => crate::api::client::run(*args),
        Command::Cluster(args) => crate::replication::cli::run(*args),
        Command::Drain(args) => crate::steering::cli::drain(*args, true),
        Command::Undrain(args) => crate::steering::cli::drain(*args, false),
        Command::Pop(args) => crate::steering::cli::pop(*args),
        Command::Bgp(args) => crate::bgp::cli::run(*args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgeproxy: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
