//! The database side: connect (TLS through rustls with the *ring*
//! provider, like every other TLS in edgeproxy), make sure changes are
//! notified, `LISTEN`, and read the table.
//!
//! The table is the original's `backends` (`id, app, region, country,
//! wg_ip, port, healthy, weight, soft_limit, hard_limit, deleted`; extra
//! columns are ignored, `country` may be missing). Every value is read as
//! text (`::text`) and numbers are parsed per row, so any column type
//! reads (integers, booleans, numerics, text) and one bad value costs its
//! row, never the read.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::config::Postgres;
use super::mirror::{self, MirrorRow, Number};

/// Why the database could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgError {
    #[error("cannot load CA file {path}: {cause}")]
    CaFile { path: String, cause: String },
    #[error("tls setup: {0}")]
    Tls(String),
    #[error("no connection within {0:?}")]
    ConnectTimeout(Duration),
    #[error("{}", describe(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("query took longer than {0:?}")]
    QueryTimeout(Duration),
    #[error("table backends has no column {0}")]
    MissingColumn(&'static str),
    #[error("no table backends that this role can read in its search_path (missing, in another schema, or no privilege on it)")]
    NoTable,
}

impl PgError {
    /// The database answered, but its `backends` table cannot be read as
    /// it is: missing, without a column edgeproxy needs, or not readable
    /// by this role (SQLSTATE class 42).
    pub fn is_table_problem(&self) -> bool {
        match self {
            PgError::MissingColumn(_) | PgError::NoTable => true,
            PgError::Db(e) => e.code().is_some_and(|c| c.code().starts_with("42")),
            _ => false,
        }
    }
}

impl PgError {
    /// The database refuses the role or its password (SQLSTATE class 28:
    /// a wrong or changed password, an unknown role, no `pg_hba.conf`
    /// entry).
    pub fn is_refused_credentials(&self) -> bool {
        matches!(self, PgError::Db(e) if e.code().is_some_and(|c| c.code().starts_with("28")))
    }
}

/// tokio-postgres's own message is terse ("db error", "error performing
/// TLS handshake"); the reason is in the server's message or the source
/// chain.
fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        );
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Columns read, in order; all required but `country`.
const COLUMNS: [&str; 11] = [
    "id",
    "app",
    "region",
    "country",
    "wg_ip",
    "port",
    "healthy",
    "weight",
    "soft_limit",
    "hard_limit",
    "deleted",
];

/// The TLS connector: the server's certificate must chain to `ca_file`'s
/// certificates, or to the system's roots, and name the host connected to.
pub fn tls(ca_file: Option<&Path>) -> Result<MakeRustlsConnect, PgError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| PgError::CaFile {
                    path: path.display().to_string(),
                    cause: e.to_string(),
                })?;
            if certs.is_empty() {
                return Err(PgError::CaFile {
                    path: path.display().to_string(),
                    cause: "no certificate in it".into(),
                });
            }
            for cert in certs {
                roots.add(cert).map_err(|e| PgError::CaFile {
                    path: path.display().to_string(),
                    cause: e.to_string(),
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| PgError::Tls(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// A session: the client, notifications as they arrive, and the task that
/// drives the connection (it ends when the connection does).
pub struct Session {
    pub client: Client,
    pub notifications: mpsc::UnboundedReceiver<()>,
    pub connection: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    /// The `SELECT` for this table's columns.
    select: String,
    /// The notifying trigger was there (or installed) at connect:
    /// [`Session::ensure_trigger`] puts it back should it go.
    pub trigger: bool,
}

/// Connects, installs the notifying trigger if asked and missing, and
/// starts listening.
pub async fn connect(settings: &Postgres, tls: MakeRustlsConnect) -> Result<Session, PgError> {
    let mut config = settings
        .url
        .as_ref()
        .expect("checked at config load")
        .config();
    config
        .connect_timeout(settings.connect_timeout)
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30))
        .application_name("edgeproxy");
    let (client, mut connection) =
        tokio::time::timeout(settings.connect_timeout, config.connect(tls))
            .await
            .map_err(|_| PgError::ConnectTimeout(settings.connect_timeout))??;
    let (tx, notifications) = mpsc::unbounded_channel();
    let connection = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(_))) => {
                    let _ = tx.send(());
                }
                Some(Ok(AsyncMessage::Notice(n))) => {
                    tracing::debug!(notice = %n, "postgres notice");
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            }
        }
    });
    // Owned by the session from here: whatever fails below drops it, and
    // with it the connection.
    let mut session = Session {
        client,
        notifications,
        connection,
        select: String::new(),
        trigger: false,
    };
    let client = &session.client;
    let timeout = settings.query_timeout;
    // The server gives up on a statement when edgeproxy does: a read stuck
    // behind a lock (an operator's `LOCK TABLE`, a long migration) would
    // otherwise go on waiting in a server process of its own after the
    // session is dropped, one more per retry, until the database ran out
    // of connections.
    within(timeout, async {
        client
            .batch_execute(&format!(
                "SET statement_timeout = {}",
                timeout.as_millis().max(1)
            ))
            .await
            .map_err(PgError::from)
    })
    .await?;
    let select = within(timeout, select_for(client)).await?;
    let mut trigger = false;
    if settings.install_trigger {
        match within(timeout, install_trigger(client, &settings.channel)).await {
            Ok(_) => trigger = true,
            Err(e) => tracing::warn!(error = %e, channel = %settings.channel,
                "postgres: cannot install the change trigger on backends; changes are seen every reload_secs"),
        }
    }
    within(timeout, async {
        client
            .batch_execute(&format!("LISTEN {}", settings.channel))
            .await
            .map_err(PgError::from)
    })
    .await?;
    session.select = select;
    session.trigger = trigger;
    Ok(session)
}

impl Session {
    /// Puts the notifying trigger back if it was there at connect and has
    /// gone since (dropped by a migration or by hand: changes would then
    /// be seen only by the periodic read, without a word). Says so, once:
    /// a trigger that cannot be put back is not looked for again in this
    /// session.
    pub async fn ensure_trigger(&mut self, settings: &Postgres) {
        if !self.trigger {
            return;
        }
        let installed = within(
            settings.query_timeout,
            install_trigger(&self.client, &settings.channel),
        )
        .await;
        match installed {
            Ok(false) => {}
            Ok(true) => tracing::warn!(channel = %settings.channel,
                "postgres: the change trigger on backends was gone (dropped?); installed it again: \
                 changes made meanwhile were seen by the periodic read"),
            Err(e) => {
                self.trigger = false;
                tracing::warn!(error = %e, channel = %settings.channel,
                    "postgres: the change trigger on backends is gone and cannot be installed again; \
                     changes are seen every reload_secs");
            }
        }
    }
}

async fn within<T>(
    limit: Duration,
    f: impl std::future::Future<Output = Result<T, PgError>>,
) -> Result<T, PgError> {
    tokio::time::timeout(limit, f)
        .await
        .map_err(|_| PgError::QueryTimeout(limit))?
}

/// The `SELECT` for the table as it is: `country` may be missing (older
/// tables), the other columns may not.
async fn select_for(client: &Client) -> Result<String, PgError> {
    let present: Vec<String> = client
        .query(
            "SELECT column_name::text FROM information_schema.columns \
             WHERE table_name = 'backends' AND table_schema = ANY (current_schemas(false))",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    // information_schema lists only what this role may use: no row at
    // all is no table as far as it can tell, not a missing `id`.
    if present.is_empty() {
        return Err(PgError::NoTable);
    }
    let mut parts = Vec::new();
    for (i, column) in COLUMNS.iter().enumerate() {
        let has = present.iter().any(|c| c == column);
        let expr = match (has, i) {
            (false, 3) => "NULL::text".to_string(),
            (false, _) => return Err(PgError::MissingColumn(column)),
            // Every type has a text form, so no value can fail the read:
            // numbers are parsed here, row by row (`Number::from_db`).
            (true, _) => format!("{column}::text"),
        };
        parts.push(expr);
    }
    Ok(format!("SELECT {} FROM backends", parts.join(", ")))
}

/// A statement-level trigger on `backends` that notifies `channel` on every
/// insert, update, delete and truncate. Created once; a concurrent creator
/// (another POP) winning the race is fine. Returns whether it was missing.
async fn install_trigger(client: &Client, channel: &str) -> Result<bool, PgError> {
    let name = format!("edgeproxy_notify_{channel}");
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid \
             WHERE c.relname = 'backends' AND t.tgname = $1 AND NOT t.tgisinternal",
            &[&name],
        )
        .await?
        .is_some();
    if exists {
        return Ok(false);
    }
    let sql = format!(
        "CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $f$ \
         BEGIN PERFORM pg_notify('{channel}', TG_OP); RETURN NULL; END $f$; \
         CREATE TRIGGER {name} AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON backends \
         FOR EACH STATEMENT EXECUTE PROCEDURE {name}();"
    );
    match client.batch_execute(&sql).await {
        Ok(()) => {
            tracing::info!(trigger = %name, channel, "postgres: installed the change trigger on backends");
            Ok(true)
        }
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_OBJECT) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

impl Drop for Session {
    /// The task driving the connection holds the socket while a statement
    /// is pending, however long the server takes: a session given up on
    /// closes its socket now.
    fn drop(&mut self) {
        self.connection.abort();
    }
}

/// One read of the table.
pub struct Fetched {
    pub rows: BTreeMap<String, MirrorRow>,
    /// Rows without an id: skipped.
    pub no_id: usize,
    /// Ids more than one row holds: one row kept for each.
    pub duplicate_ids: BTreeSet<String>,
}

impl Session {
    /// Every row of the table, by id (see [`mirror::by_id`]), the number
    /// of rows without an id (skipped), and the ids more than one row holds.
    pub async fn fetch(&self, timeout: Duration) -> Result<Fetched, PgError> {
        let rows = within(timeout, async {
            self.client
                .query(self.select.as_str(), &[])
                .await
                .map_err(PgError::from)
        })
        .await?;
        let mut no_id = 0;
        let mut read = Vec::with_capacity(rows.len());
        for r in rows {
            let Some(id) = r.get::<_, Option<String>>(0) else {
                no_id += 1;
                continue;
            };
            let number = |i| r.get::<_, Option<String>>(i).map(Number::from_db);
            let row = MirrorRow {
                id: id.clone(),
                app: r.get(1),
                region: r.get(2),
                country: r.get(3),
                wg_ip: r.get(4),
                port: number(5),
                healthy: number(6),
                weight: number(7),
                soft_limit: number(8),
                hard_limit: number(9),
                deleted: number(10),
            };
            read.push(row);
        }
        let (rows, duplicate_ids) = mirror::by_id(read);
        Ok(Fetched {
            rows,
            no_id,
            duplicate_ids,
        })
    }
}
