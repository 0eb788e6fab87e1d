//! PostgreSQL as the routing source, for operators who keep their service
//! catalogue in PostgreSQL (or a PostgreSQL-compatible database): the
//! database's `backends` table — the original's layout — is the truth, and
//! `routing.db` becomes its local mirror.
//!
//! How it flows: a thread of its own (`pg-source`, a current-thread Tokio
//! runtime with tokio-postgres) keeps one session open, `LISTEN`s on
//! `postgres.channel` (a statement-level trigger it installs on `backends`
//! notifies it of every change), and reads the whole table on each
//! notification and every `postgres.reload_secs` (the fallback when nothing
//! notifies; each such read also puts the trigger back should it have
//! been dropped). A read that differs from `routing.db` is written there in one
//! transaction ([`mirror`]), and the routing reloader publishes it at once
//! (unless its own tick did, in between): the same store, snapshot builder
//! and publish as `routing.db` alone.
//!
//! When the database is unreachable (down, restarting, partitioned, a
//! query past `query_timeout_secs`), nothing changes: `routing.db` keeps the
//! last table read, the proxy routes by it (also after a restart of the
//! proxy), and the source reconnects with a growing back-off (1 s, doubling,
//! at most `reload_secs`), logging the outage once and the recovery once.
//! The data plane never waits for any of this.
//!
//! At start, [`PgSource::start`] waits for the first read for up to the
//! connect and query timeouts, so a reachable database is mirrored before
//! the proxy serves; an unreachable one does not hold the start up.
//!
//! Not combined with writers of `routing.db` (the discovery API, demo
//! backends: refused by the configuration), nor with replication between
//! POPs: with PostgreSQL the database is the shared truth.

pub mod client;
pub mod config;
pub mod mirror;

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::watch;

use crate::reload_thread::SharedReloader;
use config::Postgres;

/// The running source. Stops (and is joined) on [`PgSource::stop`] or drop.
pub struct PgSource {
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How the first read at start went, for the start-up log.
#[derive(Debug)]
enum First {
    Mirrored {
        rows: usize,
    },
    /// Why, and what kind of failure.
    Failed(String, Cause),
}

impl PgSource {
    /// Starts the source if `[postgres]` is enabled, mirroring into
    /// `db_path` (already opened and migrated by the store) and publishing
    /// through `reloader`.
    pub fn start(
        settings: &Postgres,
        db_path: &Path,
        reloader: SharedReloader,
    ) -> std::io::Result<Option<PgSource>> {
        if !settings.enabled {
            return Ok(None);
        }
        if settings.max_connections != config::defaults::MAX_CONNECTIONS {
            tracing::info!(max_connections = settings.max_connections,
                "EDGEPROXY_POSTGRES_MAX_CONNECTIONS is accepted for compatibility; edgeproxy uses one session");
        }
        let (stop, stopped) = watch::channel(false);
        let (first_tx, first_rx) = std::sync::mpsc::channel();
        let settings_for_wait = settings.clone();
        let settings = settings.clone();
        let db_path = db_path.to_path_buf();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name("pg-source".into())
            .spawn(move || runtime.block_on(run(settings, db_path, reloader, stopped, first_tx)))?;
        let source = PgSource {
            stop,
            thread: Some(thread),
        };
        // Wait for the first read, bounded: an unreachable database must
        // not hold the start up (connect, then a few queries).
        let patience = source_patience(&settings_for_wait);
        match first_rx.recv_timeout(patience) {
            Ok(First::Mirrored { rows }) => {
                tracing::info!(rows, "postgres: routing table read at start")
            }
            Ok(First::Failed(why, Cause::Unreachable)) => tracing::warn!(error = %why,
                "postgres: unreachable at start; serving the table last mirrored into routing.db"),
            Ok(First::Failed(why, Cause::Credentials)) => tracing::warn!(error = %why,
                "postgres: the database refuses edgeproxy's login (role, password or pg_hba.conf; see postgres.url) at start; serving the table last mirrored into routing.db"),
            Ok(First::Failed(why, Cause::Table)) => tracing::warn!(error = %why,
                "postgres: cannot read table backends at start; serving the table last mirrored into routing.db"),
            Err(_) => tracing::warn!(
                "postgres: no answer yet; serving the table last mirrored into routing.db"
            ),
        }
        Ok(Some(source))
    }

    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for PgSource {
    fn drop(&mut self) {
        self.halt();
    }
}

/// How long the start waits for the first read: the connection, then the
/// handful of queries a session starts with.
fn source_patience(settings: &Postgres) -> Duration {
    settings.connect_timeout + settings.query_timeout * 2
}

/// Whether the last attempt worked, to log an outage and a recovery once.
struct Health {
    up: Option<bool>,
    /// What the outage is: logged again when that changes (QA: a session
    /// lost, then its reconnection refused for a changed password, said
    /// only "terminating connection").
    cause: Cause,
}

/// What keeps the table from being read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    /// The database is not reachable, or the session was lost.
    Unreachable,
    /// The database refuses this login (SQLSTATE class 28: the role, its
    /// password, or no `pg_hba.conf` entry, e.g. for plain text where the
    /// server takes TLS only).
    Credentials,
    /// The database answers, but its `backends` table cannot be read.
    Table,
}

impl Health {
    fn ok(&mut self) {
        if self.up == Some(false) {
            tracing::info!("postgres: reachable again; following the database");
        }
        self.up = Some(true);
    }

    fn failed(&mut self, e: &SessionError) {
        let cause = e.cause();
        if self.up != Some(false) || self.cause != cause {
            match cause {
                Cause::Table => tracing::error!(error = %e,
                    "postgres: cannot read table backends; keeping the last routing table until it can"),
                Cause::Credentials => tracing::error!(error = %e,
                    "postgres: the database refuses edgeproxy's login (role, password or pg_hba.conf; see postgres.url); keeping the last routing table until it accepts it"),
                Cause::Unreachable => tracing::error!(error = %e,
                    "postgres: unreachable; keeping the last routing table until it is back"),
            }
        } else {
            tracing::debug!(error = %e, "postgres: still unreachable");
        }
        self.up = Some(false);
        self.cause = cause;
    }
}

async fn run(
    settings: Postgres,
    db_path: PathBuf,
    reloader: SharedReloader,
    mut stopped: watch::Receiver<bool>,
    first: std::sync::mpsc::Sender<First>,
) {
    let mut first = Some(first);
    let mut health = Health {
        up: None,
        cause: Cause::Unreachable,
    };
    let mut backoff = Duration::from_secs(1);
    let tls = match client::tls(settings.ca_file.as_deref()) {
        Ok(tls) => tls,
        Err(e) => {
            // Checked at config load as far as it can be; a CA file that
            // went bad since is an outage like any other.
            tracing::error!(error = %e, "postgres: cannot set up TLS; the routing table stays as mirrored");
            if let Some(f) = first.take() {
                let _ = f.send(First::Failed(e.to_string(), Cause::Unreachable));
            }
            let _ = stopped.wait_for(|s| *s).await;
            return;
        }
    };
    loop {
        let outcome = tokio::select! {
            r = session(&settings, &db_path, &reloader, tls.clone(), &mut first, &mut health, &mut backoff) => r,
            _ = stopped.wait_for(|s| *s) => return,
        };
        if let Err(e) = outcome {
            health.failed(&e);
            if let Some(f) = first.take() {
                let _ = f.send(First::Failed(e.to_string(), e.cause()));
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = stopped.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(settings.reload.max(Duration::from_secs(1)));
    }
}

/// One session: connect, mirror, then mirror again on every notification
/// and every `reload_secs`, until the connection fails.
async fn session(
    settings: &Postgres,
    db_path: &Path,
    reloader: &SharedReloader,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    first: &mut Option<std::sync::mpsc::Sender<First>>,
    health: &mut Health,
    backoff: &mut Duration,
) -> Result<(), SessionError> {
    let mut session = client::connect(settings, tls).await?;
    let mut sqlite = mirror::open(db_path).map_err(SessionError::Mirror)?;
    let url = settings
        .url
        .as_ref()
        .map(|u| u.redacted())
        .unwrap_or_default();
    if health.up == Some(false) {
        // A retry during an outage (the table locked, say, when connecting
        // works but reading does not): "reachable again" says when it
        // ends, and one line per retry would flood the log.
        tracing::debug!(channel = %settings.channel, %url, "postgres: connected; listening for changes");
    } else {
        tracing::info!(channel = %settings.channel, %url, "postgres: connected; listening for changes");
    }
    let rows = sync(&session, &mut sqlite, settings, reloader).await?;
    health.ok();
    *backoff = Duration::from_secs(1);
    if let Some(f) = first.take() {
        let _ = f.send(First::Mirrored { rows });
    }
    let mut poll = tokio::time::interval_at(
        tokio::time::Instant::now() + settings.reload,
        settings.reload,
    );
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let polled = tokio::select! {
            n = session.notifications.recv() => {
                if n.is_none() {
                    break;
                }
                // A burst of statements is one read.
                while session.notifications.try_recv().is_ok() {}
                false
            }
            _ = poll.tick() => true,
            ended = &mut session.connection => {
                return Err(match ended {
                    Ok(Ok(())) => SessionError::Closed,
                    Ok(Err(e)) => SessionError::Pg(e.into()),
                    Err(e) => SessionError::Closed.with_context(e.to_string()),
                });
            }
        };
        sync(&session, &mut sqlite, settings, reloader).await?;
        if polled {
            // Notifications stop without a word if the trigger goes.
            session.ensure_trigger(settings).await;
        }
    }
    Err(SessionError::Closed)
}

/// Reads the database's table and mirrors what differs; returns the number
/// of rows read. A failure to write `routing.db` is logged and retried at
/// the next read (the session stays).
async fn sync(
    session: &client::Session,
    sqlite: &mut rusqlite::Connection,
    settings: &Postgres,
    reloader: &SharedReloader,
) -> Result<usize, SessionError> {
    let fetched = session.fetch(settings.query_timeout).await?;
    if fetched.no_id > 0 {
        tracing::warn!(rows = fetched.no_id, "postgres: rows without an id skipped");
    }
    if !fetched.duplicate_ids.is_empty() {
        let ids: Vec<&str> = fetched
            .duplicate_ids
            .iter()
            .take(10)
            .map(String::as_str)
            .collect();
        tracing::warn!(
            count = fetched.duplicate_ids.len(),
            ids = %ids.join(","),
            "postgres: ids held by more than one row (no primary key on id?): one row kept for each, \
             the same at every read (the least by its values); fix the table"
        );
    }
    let wanted = fetched.rows;
    let outcome = mirror::read(sqlite).and_then(|current| {
        let plan = mirror::plan(&current, &wanted);
        if plan.is_empty() {
            return Ok(None);
        }
        mirror::apply(sqlite, &plan)?;
        Ok(Some((plan.upsert.len(), plan.delete.len())))
    });
    match outcome {
        Ok(None) => {}
        Ok(Some((upserted, deleted))) => {
            tracing::info!(
                rows = wanted.len(),
                upserted,
                deleted,
                "postgres: routing table mirrored"
            );
            // If the routing reloader's own tick noticed the commit
            // first, it has published this table already: a reload here
            // would publish it a second time (QA). `tick` publishes only
            // what the last publish has not seen.
            reloader.lock().tick();
        }
        Err(e) => tracing::error!(error = %e, db = %sqlite.path().unwrap_or("routing.db"),
            "postgres: cannot write the mirror into routing.db; retrying at the next read"),
    }
    Ok(wanted.len())
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("{0}")]
    Pg(#[from] client::PgError),
    #[error("the connection closed")]
    Closed,
    #[error("the connection closed: {0}")]
    ClosedBecause(String),
    #[error("cannot open routing.db for the mirror: {0}")]
    Mirror(rusqlite::Error),
}

impl SessionError {
    /// What kind of failure this is, for the log.
    fn cause(&self) -> Cause {
        match self {
            SessionError::Pg(e) if e.is_table_problem() => Cause::Table,
            SessionError::Pg(e) if e.is_refused_credentials() => Cause::Credentials,
            _ => Cause::Unreachable,
        }
    }

    fn with_context(self, why: String) -> SessionError {
        match self {
            SessionError::Closed => SessionError::ClosedBecause(why),
            other => other,
        }
    }
}
