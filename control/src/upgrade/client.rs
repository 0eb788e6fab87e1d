//! `edgeproxy upgrade`: asks a running proxy to upgrade to the binary now at
//! its executable path, and reports the outcome.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;

#[derive(Debug, Args)]
pub struct UpgradeArgs {
    /// The proxy's upgrade control socket (default:
    /// EDGEPROXY_UPGRADE_CONTROL_SOCKET, else `upgrade.control_socket` from
    /// the configuration, `edgeproxy.sock` next to routing.db).
    // The variable is read in `run`, not by clap: clap counted it as
    // `--socket` given, and refused `--pid` beside it ("cannot be used with
    // '--socket <PATH>'") for a shell that merely had it exported.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Send SIGUSR2 to this process instead of using the control socket
    /// (the outcome is then only in the proxy's log). Refused unless it is
    /// a running edgeproxy (its binary is an edgeproxy and it handles
    /// SIGUSR2).
    #[arg(long, value_name = "PID", conflicts_with = "socket")]
    pub pid: Option<i32>,
    /// Give up waiting for the outcome after this many seconds (default:
    /// `upgrade.ready_timeout_secs` plus 10). Not with --pid, which does
    /// not wait.
    #[arg(long, value_name = "SECS", conflicts_with = "pid")]
    pub timeout: Option<u64>,
}

/// Runs the subcommand; `config_path` is the global `--config`.
pub fn run(args: UpgradeArgs, config_path: Option<&Path>) -> anyhow::Result<()> {
    if let Some(pid) = args.pid {
        super::target::signal_upgrade(pid)?;
        println!("sent SIGUSR2 to {pid}; the proxy logs the outcome");
        return Ok(());
    }
    let socket = args.socket.or_else(|| {
        std::env::var_os("EDGEPROXY_UPGRADE_CONTROL_SOCKET")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    });
    let (path, ready_timeout) = match socket {
        // The proxy's own `ready_timeout_secs` if its configuration is at
        // hand, so that a slow start is not given up on before the proxy
        // does.
        Some(p) => (
            p,
            config_path
                .and_then(|c| crate::config::load(Some(c), &crate::config::ProcessEnv).ok())
                .map_or(super::config::defaults::READY_TIMEOUT_SECS, |c| {
                    c.upgrade.ready_timeout.as_secs()
                }),
        ),
        None => {
            let config = crate::config::load(config_path, &crate::config::ProcessEnv)?;
            let path = config.upgrade.control_socket.context(
                "upgrade.control_socket is disabled in the configuration; use --socket or --pid",
            )?;
            (path, config.upgrade.ready_timeout.as_secs())
        }
    };
    let timeout = Duration::from_secs(args.timeout.unwrap_or(ready_timeout + 10));
    let answer = match super::control_socket::request_upgrade(&path, timeout) {
        Ok(answer) => answer,
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
            bail!("asked {} to upgrade: {e}", path.display())
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "cannot reach the proxy's control socket {} (is it running with this \
                     configuration?)",
                    path.display()
                )
            })
        }
    };
    match answer.strip_prefix("ok ") {
        Some(rest) => {
            let pid = rest.strip_prefix("pid=").unwrap_or(rest);
            println!("upgraded: the new process (pid {pid}) serves; the old one drains");
            Ok(())
        }
        None => match answer.strip_prefix("stopping ") {
            // QA: "the running proxy keeps serving: this process is
            // stopping" said both at once.
            Some(why) => bail!(
                "upgrade abandoned, and the running proxy is not serving on: {} (a stop signal \
                 arrived during the upgrade; the new process was stopped too)",
                why.trim_end()
            ),
            None => bail!(
                "upgrade failed, the running proxy keeps serving: {}",
                answer.strip_prefix("error ").unwrap_or(&answer)
            ),
        },
    }
}
