//! How many connections the open-files limit (`RLIMIT_NOFILE`) lets the
//! proxy serve, and raising that limit as far as allowed.
//!
//! Each proxied connection holds two descriptors (client and backend), and
//! bulk flows briefly two more per spliced direction (which fall back to
//! copying when no pipe can be had). A proxy that accepts more clients than
//! it has descriptors for accepts them and then fails to reach a backend
//! (measured: 51 of 2,000 clients accepted and closed under `ulimit -n
//! 512`). So, like HAProxy's derived `maxconn`, the default connection
//! limit is what the descriptors allow once a reserve for everything else
//! is set aside; at that limit the shards stop accepting and further clients
//! wait in the kernel's accept queue (see `engine::ctx::ConnSlot`).
//!
//! At start the soft limit is raised to the hard limit (what an
//! unprivileged process may do), and both are logged.

use std::io;

use crate::config::Config;

/// Descriptors per proxied connection: client and backend.
pub const PER_CONNECTION: u64 = 2;

/// Descriptors the process needs whatever the traffic: standard streams,
/// the routing store and its journal, runtimes' event descriptors, the log,
/// signal handling, demo backends, a few in flight.
pub const BASE_RESERVE: u64 = 64;

/// Descriptors per shard and listener (a listening socket each), plus a
/// shard's own (its io_uring instance, wake-up descriptors).
const PER_SHARD: u64 = 4;

/// With `[pool]` on, the share of the descriptors left after the reserve
/// that warm backend sockets may hold: one in four. They are set aside like
/// the reserve (the derived connection limit shrinks by them), and the pool
/// never holds more (split evenly between the shards): each warm socket is a
/// descriptor no connection counts. Without that, a pool near the limit
/// took descriptors the limit had promised to clients and health checks.
const POOL_SHARE: u64 = 4;

/// Connections the discovery API serves at once.
const API_CONNECTIONS: u64 = crate::api::MAX_CONNECTIONS as u64;

/// Connections the metrics/probe listener serves at once.
const METRICS_CONNECTIONS: u64 = crate::metrics::MAX_CONNECTIONS as u64;

/// The open-files limit, soft and hard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoFile {
    pub soft: u64,
    pub hard: u64,
}

/// The current limit.
pub fn current() -> io::Result<NoFile> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(NoFile {
        soft: lim.rlim_cur,
        hard: lim.rlim_max,
    })
}

/// Raises the soft limit to the hard limit. Returns the limit before and
/// after.
pub fn raise() -> io::Result<(NoFile, NoFile)> {
    let before = current()?;
    if before.soft < before.hard {
        let lim = libc::rlimit {
            rlim_cur: before.hard,
            rlim_max: before.hard,
        };
        // SAFETY: setrlimit reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((before, current()?))
}

/// Descriptors `config` needs besides its connections.
pub fn reserve(config: &Config) -> u64 {
    let shards = u64::from(config.runtime.shards.max(1));
    let listeners = config.listeners.len() as u64;
    let mut reserve = BASE_RESERVE + shards * (listeners + PER_SHARD);
    if config.metrics.enabled {
        reserve += METRICS_CONNECTIONS;
    }
    if config.api.enabled {
        reserve += API_CONNECTIONS;
    }
    if config.dns.enabled {
        reserve +=
            u64::from(config.dns.tcp_max_connections.get()) + u64::from(config.dns.udp_workers) + 1;
    }
    if config.replication.enabled {
        reserve += 32;
    }
    if config.health.any_enabled() {
        // A socket (or a script's child) per check in flight, and the
        // webhook's connection. Without it a proxy at its limit had no
        // descriptor left for checks: they failed with EMFILE and took
        // healthy backends out of rotation. (HAProxy's derived maxsock
        // counts its checks too.)
        reserve += u64::from(config.health.max_concurrent) + 1;
    }
    reserve
}

/// Descriptors set aside for warm backend sockets (`[pool]`) under `nofile`:
/// none with the pool off.
pub fn pool_reserve(config: &Config, nofile: u64) -> u64 {
    if !config.pool.enabled {
        return 0;
    }
    nofile.saturating_sub(reserve(config)) / POOL_SHARE
}

/// Everything set aside from `nofile` besides connections: the reserve and
/// the pool's share.
fn set_aside(config: &Config, nofile: u64) -> u64 {
    reserve(config) + pool_reserve(config, nofile)
}

/// The pool's policy under the limit in force now, `None` when it is off:
/// its sockets on each of `shards` (the running ones) at most their share
/// of [`pool_reserve`].
pub fn pool_policy(config: &Config, shards: u32) -> Option<engine::pool::Policy> {
    let nofile = current().map(|n| n.soft).unwrap_or(1024);
    let per_shard = pool_reserve(config, nofile) / u64::from(shards.max(1));
    config.pool.policy().map(|mut p| {
        p.max_sockets = per_shard.clamp(1, u64::from(u32::MAX)) as u32;
        p
    })
}

/// The connection limit `nofile` descriptors allow with `reserve` set
/// aside: at least 1 (0 would mean "unlimited").
pub fn derived(nofile: u64, reserve: u64) -> u32 {
    let room = nofile.saturating_sub(reserve) / PER_CONNECTION;
    room.clamp(1, u64::from(u32::MAX)) as u32
}

/// Where the effective connection limit came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `limits.max_connections` in the file (0 = unlimited).
    Configured,
    /// Derived from the open-files limit.
    OpenFiles,
}

/// The process-wide connection limit for `config` under `nofile` (the soft
/// limit in force).
pub fn max_connections(config: &Config, nofile: u64) -> (u32, Source) {
    match config.limits.max_connections {
        Some(n) => (n, Source::Configured),
        None => (
            derived(nofile, set_aside(config, nofile)),
            Source::OpenFiles,
        ),
    }
}

/// [`max_connections`] under the limit in force now.
pub fn max_connections_now(config: &Config) -> u32 {
    let nofile = current().map(|n| n.soft).unwrap_or(1024);
    max_connections(config, nofile).0
}

/// Raises the open-files limit and logs the connection limit that follows.
/// Returns it.
pub fn raise_and_log(config: &Config) -> u32 {
    let nofile = match raise() {
        Ok((before, after)) => {
            if before.soft < after.soft {
                tracing::info!(
                    from = before.soft,
                    to = after.soft,
                    hard = after.hard,
                    "open files limit raised to the hard limit"
                );
            } else {
                tracing::info!(limit = after.soft, hard = after.hard, "open files limit");
            }
            after.soft
        }
        Err(e) => {
            let soft = current().map(|n| n.soft).unwrap_or(1024);
            tracing::warn!(error = %e, limit = soft, "cannot raise the open files limit");
            soft
        }
    };
    let reserve = set_aside(config, nofile);
    let (limit, source) = max_connections(config, nofile);
    let fits = derived(nofile, reserve);
    match source {
        Source::OpenFiles => {
            tracing::info!(max_connections = limit, open_files = nofile, reserved = reserve,
                per_connection = PER_CONNECTION,
                "connection limit derived from the open files limit; further clients wait in the accept queue");
            if limit < 100 {
                tracing::warn!(max_connections = limit, open_files = nofile,
                    "the open files limit leaves room for few connections: raise it (ulimit -n, LimitNOFILE=)");
            }
        }
        Source::Configured if limit == 0 || limit > fits => {
            tracing::warn!(
                max_connections = limit,
                open_files = nofile,
                fits,
                "limits.max_connections is above what the open files limit can serve: \
                 past about that many connections, clients are accepted but cannot reach a backend \
                 (unset it to derive the limit, or raise the open files limit)"
            );
        }
        Source::Configured => {
            tracing::info!(
                max_connections = limit,
                open_files = nofile,
                "connection limit"
            );
        }
    }
    limit
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::from_raw(toml::from_str(text).unwrap(), &[("X", "")]).unwrap()
    }

    #[test]
    fn two_descriptors_per_connection_after_the_reserve() {
        assert_eq!(derived(512, 100), 206);
        assert_eq!(derived(1_048_576, 100), 524_238);
        // Never 0 (unlimited), even with nothing to spare.
        assert_eq!(derived(50, 100), 1);
    }

    #[test]
    fn the_reserve_grows_with_shards_listeners_and_services() {
        let plain = config("[runtime]\nshards = 2\n");
        assert_eq!(reserve(&plain), BASE_RESERVE + 2 * (1 + PER_SHARD));
        let busy = config(
            "[runtime]\nshards = 2\n[api]\nenabled = true\n[dns]\nenabled = true\nudp_workers = 2\n\
             [[listener]]\naddr = \"127.0.0.1:1\"\n[[listener]]\naddr = \"127.0.0.1:2\"\n",
        );
        assert_eq!(
            reserve(&busy),
            BASE_RESERVE + 2 * (2 + PER_SHARD) + API_CONNECTIONS + 256 + 2 + 1
        );
    }

    /// QA: at the derived limit (prlimit 256, 91 clients held, 100
    /// backends with HTTP checks) 17 healthy backends were taken out by
    /// checks that failed with "Too many open files".
    #[test]
    fn the_reserve_holds_every_health_check_in_flight() {
        let off = config("[runtime]\nshards = 2\n");
        let on = config("[runtime]\nshards = 2\n[health]\nenabled = true\nmax_concurrent = 100\n");
        assert_eq!(reserve(&on), reserve(&off) + 100 + 1);
        let app = config(
            "[runtime]\nshards = 2\n[health]\nmax_concurrent = 10\n[health.apps.web]\nenabled = true\n",
        );
        assert_eq!(reserve(&app), reserve(&off) + 10 + 1);
    }

    /// QA: warm pool sockets were not counted: under `ulimit -n 256` with
    /// 40 warmed backends the pool held 80 descriptors the derived limit
    /// had promised to clients.
    #[test]
    fn the_pools_share_is_set_aside_and_bounds_it() {
        let off = config("[runtime]\nshards = 2\n");
        let on = config("[runtime]\nshards = 2\n[pool]\nenabled = true\n");
        assert_eq!(pool_reserve(&off, 1024), 0);
        let share = (1024 - reserve(&on)) / POOL_SHARE;
        assert_eq!(pool_reserve(&on, 1024), share);
        assert_eq!(
            u64::from(max_connections(&on, 1024).0),
            (1024 - reserve(&on) - share) / PER_CONNECTION
        );
        assert_eq!(pool_policy(&off, 2), None);
        let nofile = current().unwrap().soft;
        let policy = pool_policy(&on, 2).unwrap();
        assert_eq!(
            u64::from(policy.max_sockets),
            (pool_reserve(&on, nofile) / 2).max(1)
        );
    }

    #[test]
    fn a_configured_limit_wins_and_unset_derives() {
        let c = config("[limits]\nmax_connections = 7\n");
        assert_eq!(max_connections(&c, 512), (7, Source::Configured));
        let c = config("[runtime]\nshards = 1\n");
        let (n, source) = max_connections(&c, 512);
        assert_eq!(source, Source::OpenFiles);
        assert_eq!(u64::from(n), (512 - reserve(&c)) / 2);
    }

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_limit() {
        let (_, after) = raise().unwrap();
        assert_eq!(after.soft, after.hard);
        assert_eq!(current().unwrap(), after);
    }
}
