//! The mirror: the database's `backends` table written into `routing.db`,
//! so that the routing store, the reloader, the snapshot they publish, DNS,
//! metrics and a restart while the database is down all work as they do
//! with `routing.db` alone.
//!
//! [`plan`] is the decision, without I/O: from the rows `routing.db` holds
//! and the rows the database holds, which to write and which to delete.
//! [`apply`] runs it in one SQLite transaction on a connection of its own
//! (the store documents that other writers are expected), so the reloader
//! sees the whole change at once or not at all.
//!
//! Only the original's columns (and `country`) are mirrored; values are
//! copied as they are (NULLs too, and a number column's value that is not
//! a number, as text: see [`Number`]), and the store and snapshot builder
//! judge them as they judge a hand-written row. Rows the database does not
//! have are deleted from `routing.db`: it is a mirror.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{params, Connection, OpenFlags, TransactionBehavior};

/// One row of `backends` as mirrored: the original's columns and
/// `country`, each as stored (NULL allowed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorRow {
    pub id: String,
    pub app: Option<String>,
    pub region: Option<String>,
    pub country: Option<String>,
    pub wg_ip: Option<String>,
    pub port: Option<Number>,
    pub healthy: Option<Number>,
    pub weight: Option<Number>,
    pub soft_limit: Option<Number>,
    pub hard_limit: Option<Number>,
    pub deleted: Option<Number>,
}

/// A value of one of the number columns (`port`, `healthy`, `weight`,
/// `soft_limit`, `hard_limit`, `deleted`) as the database holds it, whatever
/// the column's type there: an integer (booleans as 1 and 0), a number
/// that is not one, or text that is no number at all. Only an integer
/// routes; the others reach `routing.db` as they are, where the store skips
/// the row with a warning naming it and the value, as it does a
/// hand-written row. (Casting in SQL instead failed the whole read on one
/// bad value: nothing in the table was followed any more.)
#[derive(Debug, Clone)]
pub enum Number {
    Int(i64),
    Real(f64),
    Text(String),
}

impl Number {
    /// From the database's text form of the value (`::text`, which every
    /// type has). `true`/`false` (a boolean column) read as 1 and 0; text
    /// SQLite would store as a number (`8080`, `8080.0`, `1e3`) reads as
    /// that number, so that what is read back from `routing.db` compares
    /// equal.
    pub fn from_db(text: String) -> Number {
        let t = text.trim();
        if t.eq_ignore_ascii_case("true") {
            return Number::Int(1);
        }
        if t.eq_ignore_ascii_case("false") {
            return Number::Int(0);
        }
        if let Ok(n) = t.parse::<i64>() {
            return Number::Int(n);
        }
        match t.parse::<f64>() {
            // Rust also reads "inf" and "NaN", SQLite does not.
            Ok(f) if f.is_finite() && t.bytes().any(|b| b.is_ascii_digit()) => {
                if f.fract() == 0.0 && f.abs() < 9.0e15 {
                    Number::Int(f as i64)
                } else {
                    Number::Real(f)
                }
            }
            _ => Number::Text(text),
        }
    }
}

impl PartialEq for Number {
    fn eq(&self, other: &Number) -> bool {
        match (self, other) {
            (Number::Int(a), Number::Int(b)) => a == b,
            (Number::Real(a), Number::Real(b)) => a.to_bits() == b.to_bits(),
            (Number::Text(a), Number::Text(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for Number {}

impl rusqlite::ToSql for Number {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Number::Int(n) => ToSqlOutput::from(*n),
            Number::Real(f) => ToSqlOutput::from(*f),
            Number::Text(t) => ToSqlOutput::from(t.as_str()),
        })
    }
}

/// What to do to `routing.db`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan<'a> {
    /// Rows that are new or differ.
    pub upsert: Vec<&'a MirrorRow>,
    /// Ids the database no longer has.
    pub delete: Vec<&'a str>,
}

impl Plan<'_> {
    pub fn is_empty(&self) -> bool {
        self.upsert.is_empty() && self.delete.is_empty()
    }
}

/// The database's rows by id, and the ids more than one row holds (a
/// table without a primary key). Of such rows one is kept, the same one
/// whatever order the database returns them in: the least by its values.
/// QA: the last one read was kept, so the backend could change after an
/// UPDATE of the other row moved it in the scan, and the warning named no
/// id.
pub fn by_id(
    rows: impl IntoIterator<Item = MirrorRow>,
) -> (BTreeMap<String, MirrorRow>, BTreeSet<String>) {
    let mut out: BTreeMap<String, MirrorRow> = BTreeMap::new();
    let mut duplicates = BTreeSet::new();
    for row in rows {
        match out.entry(row.id.clone()) {
            Entry::Vacant(v) => {
                v.insert(row);
            }
            Entry::Occupied(mut kept) => {
                duplicates.insert(row.id.clone());
                if format!("{row:?}") < format!("{:?}", kept.get()) {
                    kept.insert(row);
                }
            }
        }
    }
    (out, duplicates)
}

/// The changes that make `current` (in `routing.db`, by id; `None` for a
/// row whose stored values could not be read as the expected types) equal
/// to `wanted` (the database's).
pub fn plan<'a>(
    current: &'a BTreeMap<String, Option<MirrorRow>>,
    wanted: &'a BTreeMap<String, MirrorRow>,
) -> Plan<'a> {
    let upsert = wanted
        .iter()
        .filter(|(id, row)| current.get(*id) != Some(&Some((*row).clone())))
        .map(|(_, row)| row)
        .collect();
    let delete = current
        .keys()
        .filter(|id| !wanted.contains_key(*id))
        .map(String::as_str)
        .collect();
    Plan { upsert, delete }
}

/// Opens its own connection to `routing.db` (which the store created and
/// migrated), waiting up to 5 s on a writer that holds the lock.
pub fn open(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

/// The mirrored columns of every row of `routing.db`, by id.
pub fn read(conn: &Connection) -> rusqlite::Result<BTreeMap<String, Option<MirrorRow>>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, app, region, country, wg_ip, port, healthy, weight, soft_limit, \
         hard_limit, deleted FROM backends",
    )?;
    let mut rows = stmt.query([])?;
    let mut out = BTreeMap::new();
    while let Some(row) = rows.next()? {
        let Some(id) = text(row.get_ref(0)?).flatten() else {
            continue;
        };
        let parsed = (|| {
            Some(MirrorRow {
                id: id.clone(),
                app: text(row.get_ref(1).ok()?)?,
                region: text(row.get_ref(2).ok()?)?,
                country: text(row.get_ref(3).ok()?)?,
                wg_ip: text(row.get_ref(4).ok()?)?,
                port: int(row.get_ref(5).ok()?)?,
                healthy: int(row.get_ref(6).ok()?)?,
                weight: int(row.get_ref(7).ok()?)?,
                soft_limit: int(row.get_ref(8).ok()?)?,
                hard_limit: int(row.get_ref(9).ok()?)?,
                deleted: int(row.get_ref(10).ok()?)?,
            })
        })();
        out.insert(id, parsed);
    }
    Ok(out)
}

/// `Some(None)` for NULL, `None` when the value is not text.
fn text(v: ValueRef<'_>) -> Option<Option<String>> {
    match v {
        ValueRef::Null => Some(None),
        ValueRef::Text(t) => Some(Some(String::from_utf8_lossy(t).into_owned())),
        _ => None,
    }
}

/// `Some(None)` for NULL, `None` for a blob (never mirrored).
fn int(v: ValueRef<'_>) -> Option<Option<Number>> {
    match v {
        ValueRef::Null => Some(None),
        ValueRef::Integer(i) => Some(Some(Number::Int(i))),
        ValueRef::Real(f) => Some(Some(Number::Real(f))),
        ValueRef::Text(t) => Some(Some(Number::Text(String::from_utf8_lossy(t).into_owned()))),
        ValueRef::Blob(_) => None,
    }
}

/// Runs `plan` in one transaction.
pub fn apply(conn: &mut Connection, plan: &Plan<'_>) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    {
        let mut update = tx.prepare_cached(
            "UPDATE backends SET app = ?1, region = ?2, country = ?3, wg_ip = ?4, port = ?5, \
             healthy = ?6, weight = ?7, soft_limit = ?8, hard_limit = ?9, deleted = ?10 \
             WHERE id = ?11",
        )?;
        let mut insert = tx.prepare_cached(
            "INSERT INTO backends (app, region, country, wg_ip, port, healthy, weight, \
             soft_limit, hard_limit, deleted, id) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )?;
        for r in &plan.upsert {
            let values = params![
                r.app,
                r.region,
                r.country,
                r.wg_ip,
                r.port,
                r.healthy,
                r.weight,
                r.soft_limit,
                r.hard_limit,
                r.deleted,
                r.id,
            ];
            // UPDATE-then-INSERT, as the store does: no primary key needed.
            if update.execute(values)? == 0 {
                insert.execute(values)?;
            }
        }
        let mut delete = tx.prepare_cached("DELETE FROM backends WHERE id = ?1")?;
        for id in &plan.delete {
            delete.execute([id])?;
        }
    }
    tx.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, port: i64) -> MirrorRow {
        MirrorRow {
            id: id.into(),
            app: Some("web".into()),
            region: Some("sa".into()),
            country: None,
            wg_ip: Some("10.0.0.1".into()),
            port: Some(Number::Int(port)),
            healthy: Some(Number::Int(1)),
            weight: Some(Number::Int(1)),
            soft_limit: Some(Number::Int(100)),
            hard_limit: Some(Number::Int(150)),
            deleted: Some(Number::Int(0)),
        }
    }

    fn wanted(rows: &[MirrorRow]) -> BTreeMap<String, MirrorRow> {
        rows.iter().map(|r| (r.id.clone(), r.clone())).collect()
    }

    #[test]
    fn of_rows_sharing_an_id_the_same_one_is_kept_in_any_order() {
        let rows = [row("a", 1), row("b", 2), row("a", 3), row("a", 2)];
        let (forward, dup) = by_id(rows.iter().cloned());
        let (backward, dup_backward) = by_id(rows.iter().rev().cloned());
        assert_eq!(forward, backward);
        assert_eq!(forward["a"], row("a", 1));
        assert_eq!(forward["b"], row("b", 2));
        assert_eq!(dup, BTreeSet::from(["a".to_string()]));
        assert_eq!(dup, dup_backward);
    }

    #[test]
    fn only_differences_are_written_and_missing_rows_deleted() {
        let current: BTreeMap<String, Option<MirrorRow>> = [
            ("a".to_string(), Some(row("a", 1))),
            ("b".to_string(), Some(row("b", 2))),
            ("gone".to_string(), Some(row("gone", 3))),
            // Unreadable in routing.db: rewritten.
            ("bad".to_string(), None),
        ]
        .into();
        let new = wanted(&[row("a", 1), row("b", 20), row("bad", 4), row("new", 5)]);
        let p = plan(&current, &new);
        let ids: Vec<&str> = p.upsert.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["b", "bad", "new"]);
        assert_eq!(p.delete, ["gone"]);
        // Applied, nothing is left to do.
        let same: BTreeMap<String, Option<MirrorRow>> = new
            .iter()
            .map(|(k, v)| (k.clone(), Some(v.clone())))
            .collect();
        assert!(plan(&same, &new).is_empty());
    }

    #[test]
    fn a_plan_applies_in_one_transaction_and_reads_back_equal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.db");
        // The store creates and migrates the table, as at start.
        drop(crate::store::RoutingStore::open(&path).unwrap());
        let mut conn = open(&path).unwrap();
        conn.execute_batch(
            "INSERT INTO backends (id, app, region, wg_ip, port, healthy, weight, soft_limit, hard_limit, deleted)
             VALUES ('hand', 'web', 'sa', '10.0.0.9', x'1f90', 1, 1, 100, 150, 0)",
        )
        .unwrap();
        let mut with_nulls = row("n", 7);
        with_nulls.country = Some("BR".into());
        with_nulls.weight = None;
        let new = wanted(&[row("a", 1), with_nulls]);
        let current = read(&conn).unwrap();
        assert_eq!(
            current.get("hand"),
            Some(&None),
            "unreadable row seen as such"
        );
        let p = plan(&current, &new);
        assert_eq!(p.delete, ["hand"]);
        apply(&mut conn, &p).unwrap();
        let back = read(&conn).unwrap();
        let expected: BTreeMap<String, Option<MirrorRow>> = new
            .iter()
            .map(|(k, v)| (k.clone(), Some(v.clone())))
            .collect();
        assert_eq!(back, expected);
        // And the store reads it as it reads any row: `a` routes, the row
        // with a NULL weight is judged by the store (not by the mirror).
        let mut store = crate::store::RoutingStore::open(&path).unwrap();
        let loaded = store.load().unwrap();
        assert!(loaded.records.iter().any(|r| r.id == "a"));
        assert_eq!(loaded.records.len() + loaded.bad_rows.len(), 2);
    }

    #[test]
    fn numbers_read_from_any_column_type_and_bad_ones_stay_as_they_are() {
        let n = |t: &str| Number::from_db(t.to_string());
        assert_eq!(n("8080"), Number::Int(8080));
        assert_eq!(n(" -5 "), Number::Int(-5));
        assert_eq!(n("true"), Number::Int(1));
        assert_eq!(n("false"), Number::Int(0));
        assert_eq!(n("8080.00"), Number::Int(8080));
        assert_eq!(n("1.5"), Number::Real(1.5));
        assert_eq!(n("80x"), Number::Text("80x".into()));
        assert_eq!(n("NaN"), Number::Text("NaN".into()));
        assert_eq!(n("inf"), Number::Text("inf".into()));
    }

    /// The fixture of the bug: a text `port` column with one bad value
    /// failed the whole read. Such values now reach routing.db as they are,
    /// read back equal (nothing is rewritten at every read), and the store
    /// skips just that row, naming the value.
    #[test]
    fn a_bad_number_costs_its_row_only_and_reads_back_equal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.db");
        drop(crate::store::RoutingStore::open(&path).unwrap());
        let mut conn = open(&path).unwrap();
        let mut text_port = row("text-port", 1);
        text_port.port = Some(Number::from_db("80x".into()));
        let mut real_weight = row("real-weight", 2);
        real_weight.weight = Some(Number::from_db("1.5".into()));
        let new = wanted(&[row("good", 3), text_port, real_weight]);
        let current = read(&conn).unwrap();
        apply(&mut conn, &plan(&current, &new)).unwrap();
        let back = read(&conn).unwrap();
        assert!(plan(&back, &new).is_empty(), "{back:?}");
        let mut store = crate::store::RoutingStore::open(&path).unwrap();
        let loaded = store.load().unwrap();
        let ids: Vec<&str> = loaded.records.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["good"]);
        let bad: Vec<String> = loaded
            .bad_rows
            .iter()
            .map(|(id, why)| format!("{id}: {why}"))
            .collect();
        assert_eq!(bad.len(), 2, "{bad:?}");
        assert!(
            bad.iter()
                .any(|b| b.starts_with("text-port") && b.contains("80x")),
            "{bad:?}"
        );
        assert!(
            bad.iter()
                .any(|b| b.starts_with("real-weight") && b.contains("1.5")),
            "{bad:?}"
        );
    }
}
