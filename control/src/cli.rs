//! Command line: `edgeproxy [run] [--config FILE]`, `edgeproxy check-config`,
//! `edgeproxy backends list|add|rm|drain` (the discovery API's client),
//! `edgeproxy completions SHELL`, `edgeproxy cluster status|forget`
//! (replication's view), `edgeproxy mesh status` and `edgeproxy 6pn` (the WireGuard mesh
//! and its addressing), `edgeproxy drain` / `undrain` / `pop status` (this
//! POP's traffic steering), `edgeproxy bgp status` (the anycast speaker),
//! `edgeproxy upgrade`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "edgeproxy",
    version,
    long_version = crate::version::long(),
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
        and drain open connections for limits.shutdown_grace_secs, and a \
        second SIGTERM/SIGINT closes them at once; SIGUSR2 (or `edgeproxy \
        upgrade`) starts the binary now at the proxy's path, hands it every \
        listening socket, and drains once it serves.\n\n\
        Relative paths in the config file are resolved against the file's \
        directory. Under systemd (Type=notify, see config/edgeproxy.service) \
        the proxy reports READY, RELOADING and STOPPING; with [metrics] on, \
        GET /ready and /live answer probes."
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
    ///
    /// On x86-64 glibc it first re-executes itself once (same pid) with
    /// GLIBC_TUNABLES=glibc.cpu.x86_rep_movsb_threshold=0x1000000, which
    /// makes TLS bulk copies up to 15x faster on AMD CPUs (README, "TLS bulk
    /// and glibc's memcpy"); setting GLIBC_TUNABLES yourself, even empty,
    /// turns that off.
    Run,
    /// Validate the configuration (file plus environment) and print the
    /// effective settings as TOML.
    ///
    /// Also binds every socket it configures and lets go (a port in use is
    /// an error), and reads the routing table without changing it:
    /// listeners that would refuse every connection (no eligible backend)
    /// are warnings on stderr.
    CheckConfig {
        /// Do not bind the sockets: for a file a running proxy is about to
        /// reload (its sockets are in use by that proxy).
        #[arg(long)]
        no_bind: bool,
    },
    /// Manage backends through a running proxy's discovery API:
    /// list, add (register or update), rm (deregister), drain.
    ///
    /// The API's address and token come from --config's [api] section
    /// unless --api and --token say otherwise.
    Backends(Box<crate::api::client::BackendsArgs>),
    /// Replication between POPs, through a running POP's API: `status`
    /// lists the members, their state, round trip, last sync and lag;
    /// `forget NODE_ID` removes a POP decommissioned for good (down) from
    /// every POP's member list and pops table.
    Cluster(Box<crate::replication::cli::ClusterArgs>),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    ///
    /// For example: `edgeproxy completions bash >
    /// /etc/bash_completion.d/edgeproxy`.
    Completions {
        /// The shell: bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Upgrade a running proxy without dropping a connection: it starts the
    /// binary now at its executable path, hands it every listening socket
    /// and drains once the new process serves. If the new binary fails to
    /// start, the running proxy keeps serving and this exits non-zero with
    /// the reason.
    Upgrade(crate::upgrade::client::UpgradeArgs),
    /// The WireGuard mesh between POPs, through a running POP's API:
    /// `status` shows the interface, every peer's endpoint, last handshake
    /// and bytes, and POPs left out of the mesh.
    Mesh(Box<crate::mesh::cli::MeshArgs>),
    /// 6PN addressing (read from the config and routing.db; no running
    /// proxy needed): `show` the cluster's /48 and this POP's /64,
    /// `address ID` the address a backend registered here without one
    /// gets, `backends` the backends on 6PN addresses.
    #[command(name = "6pn")]
    SixPn(crate::mesh::cli::SixPnArgs),
    /// Drain this POP through its API: GeoDNS (here and at every other
    /// POP) stops answering it, and with BGP its anycast routes are tagged
    /// GRACEFUL_SHUTDOWN, then withdrawn after [bgp] drain_delay_secs.
    /// Open connections go on; the drain outlives a restart.
    Drain(Box<crate::steering::cli::DrainArgs>),
    /// End this POP's drain: back in GeoDNS answers and announced again
    /// (when it can serve).
    Undrain(Box<crate::steering::cli::UndrainArgs>),
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
        Command::Run => {
            crate::memcpy_tuning::apply();
            crate::app::run(cli.config)
        }
        Command::CheckConfig { no_bind } => {
            let options = crate::app::CheckOptions { no_bind };
            crate::app::check(cli.config.as_deref(), options).and_then(|(config, warnings)| {
                for w in &warnings {
                    eprintln!("edgeproxy: warning: {w}");
                }
                Ok(crate::stdout::print(&config.to_toml())?)
            })
        }
        Command::Backends(args) => crate::api::client::run(*args, cli.config.as_deref()),
        Command::Cluster(args) => crate::replication::cli::run(*args, cli.config.as_deref()),
        Command::Completions { shell } => completions(shell),
        Command::Upgrade(args) => crate::upgrade::client::run(args, cli.config.as_deref()),
        Command::Mesh(args) => crate::mesh::cli::run_mesh(*args, cli.config.as_deref()),
        Command::SixPn(args) => crate::mesh::cli::run_6pn(args, cli.config.as_deref()),
        Command::Drain(args) => {
            crate::steering::cli::drain(args.api, args.wait, true, cli.config.as_deref())
        }
        Command::Undrain(args) => {
            crate::steering::cli::drain(args.api, false, false, cli.config.as_deref())
        }
        Command::Pop(args) => crate::steering::cli::pop(*args, cli.config.as_deref()),
        Command::Bgp(args) => crate::bgp::cli::run(*args, cli.config.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let message = format!("{e:#}");
            // A successor of a binary upgrade tells its predecessor why (it
            // keeps serving); no-op otherwise.
            crate::upgrade::inherit::report_failure(&message);
            eprintln!("edgeproxy: error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Writes the completion script for `shell` to stdout.
fn completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    use clap::CommandFactory;
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "edgeproxy", &mut script);
    Ok(crate::stdout::print(&String::from_utf8_lossy(&script))?)
}
