//! What replicates: rows of the replicated tables, each with the version
//! (hybrid logical timestamp and origin node) of its last write.
//!
//! Conflicts resolve last-writer-wins on `(hlc, origin)`: the greater pair
//! wins on every node, whatever order the writes arrive in. Origins compare
//! as bytes, so the tie-break is the same everywhere.
//!
//! **Deliberate writes before verdicts.** Some writes are nobody's decision:
//! a POP's expiry verdict on a backend it judges (`expired`) and the POP
//! taking over its heartbeats (`heartbeat_pop`), rewritten by the POP that
//! judges whenever they no longer hold. Under plain last-writer-wins such a
//! write, made on one side of a partition after an operator deleted or
//! changed the row on the other side, was the later one and undid the
//! delete or the change when the partition healed. So every version also
//! names its row's *intent*: the version of the last deliberate write (a
//! registration, an edit, a delete), which a verdict inherits. Rows compare
//! by intent first and by version only between equal intents: a deliberate
//! write beats every verdict made without knowing of it, and the verdict,
//! if it still holds, is judged again on top of it. One lexicographic order,
//! so merges still converge whatever the arrival order.
//!
//! Two writes should never share a version, but they do when two nodes run
//! with the same id (each mints `(hlc, origin)` from its own clock). So what
//! nodes compare is a [`Stamp`]: the version plus a hash of the data written
//! at it, the last breaking ties. Equal versions with different data then
//! still have one winner, the same on every node, and differ in the digests.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::hlc::Hlc;

/// A node's id (`replication.node_id`, default: the host name).
pub type NodeId = Arc<str>;

/// A replicated table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Table {
    /// `backends`, keyed by `id`.
    Backends,
    /// `pops`, keyed by `node_id`.
    Pops,
}

impl Table {
    pub const ALL: [Table; 2] = [Table::Backends, Table::Pops];

    /// The SQL table name.
    pub fn name(self) -> &'static str {
        match self {
            Table::Backends => "backends",
            Table::Pops => "pops",
        }
    }

    /// The primary key column.
    pub fn key_column(self) -> &'static str {
        match self {
            Table::Backends => "id",
            Table::Pops => "node_id",
        }
    }

    pub fn from_name(name: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// Which row.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RowKey {
    pub table: Table,
    pub pk: String,
}

impl RowKey {
    pub fn new(table: Table, pk: impl Into<String>) -> RowKey {
        RowKey {
            table,
            pk: pk.into(),
        }
    }
}

impl std::fmt::Display for RowKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.table.name(), self.pk)
    }
}

/// The version of one write: when (hybrid logical clock) and where.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Version {
    pub hlc: Hlc,
    pub origin: NodeId,
}

impl Version {
    /// True when `self` wins over `other` under last-writer-wins.
    pub fn beats(&self, other: &Version) -> bool {
        (self.hlc, self.origin.as_bytes()) > (other.hlc, other.origin.as_bytes())
    }
}

/// A version, its intent and the hash of the data written at it: what
/// anti-entropy compares, and what decides between two writes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Stamp {
    pub version: Version,
    /// See [`RowVersion::intent`].
    pub intent: Option<Version>,
    /// [`data_hash`] of the row's data.
    pub data: u64,
}

impl Stamp {
    /// The version of the last deliberate write (see the module's doc).
    pub fn intent(&self) -> &Version {
        self.intent.as_ref().unwrap_or(&self.version)
    }

    /// True when `self` wins over `other`: the later intent; between equal
    /// intents the later version; between equal versions (two nodes with
    /// one id) the greater data hash, so that every node keeps the same one.
    pub fn beats(&self, other: &Stamp) -> bool {
        let (mine, theirs) = (self.intent(), other.intent());
        if mine != theirs {
            return mine.beats(theirs);
        }
        self.version.beats(&other.version)
            || (self.version == other.version && self.data > other.data)
    }
}

/// True when a live row's replicated data went from `old` to `new`
/// changing only [`VERDICT_COLUMNS`]: a verdict, which keeps the row's
/// intent. Anything unreadable counts as a deliberate write.
pub fn only_verdicts_differ(table: Table, old: &str, new: &str) -> bool {
    type Object = serde_json::Map<String, serde_json::Value>;
    let (Ok(old), Ok(new)) = (
        serde_json::from_str::<Object>(old),
        serde_json::from_str::<Object>(new),
    ) else {
        return false;
    };
    let is_verdict = |column: &str| VERDICT_COLUMNS.contains(&(table, column));
    let differs = |column: &String| old.get(column) != new.get(column);
    old.keys()
        .chain(new.keys())
        .filter(|&c| differs(c))
        .all(|c| is_verdict(c))
}

/// 64 bits of SHA-256 of a row's replicated data; a tombstone hashes
/// differently from any data.
pub fn data_hash(data: Option<&str>) -> u64 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    match data {
        None => ctx.update(&[0]),
        Some(d) => {
            ctx.update(&[1]);
            ctx.update(d.as_bytes());
        }
    }
    let d = ctx.finish();
    u64::from_be_bytes(d.as_ref()[..8].try_into().expect("SHA-256 is 32 bytes"))
}

/// One row at one version, as it travels between nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowVersion {
    pub key: RowKey,
    pub version: Version,
    /// When this write is a verdict (it changed only [`VERDICT_COLUMNS`] of
    /// a live row), the version of the last deliberate write it sits on,
    /// which it inherits; `None` when this write is itself deliberate.
    pub intent: Option<Version>,
    /// The replicated columns as a JSON object; `None` is a tombstone (the
    /// row was deleted).
    pub data: Option<String>,
}

/// Columns written by a POP's own judgement rather than by anyone's
/// decision (see the module's doc): the heartbeat's judge and its verdict.
pub const VERDICT_COLUMNS: &[(Table, &str)] = &[
    (Table::Backends, "expired"),
    (Table::Backends, "heartbeat_pop"),
];

impl RowVersion {
    pub fn stamp(&self) -> Stamp {
        Stamp {
            version: self.version.clone(),
            intent: self.intent.clone(),
            data: data_hash(self.data.as_deref()),
        }
    }

    /// The version of the last deliberate write (see the module's doc).
    pub fn intent(&self) -> &Version {
        self.intent.as_ref().unwrap_or(&self.version)
    }

    pub fn is_tombstone(&self) -> bool {
        self.data.is_none()
    }

    /// Bytes this row takes on the wire, roughly (for batch limits).
    pub fn wire_size(&self) -> usize {
        self.key.pk.len()
            + self.version.origin.len()
            + self.intent.as_ref().map_or(0, |v| v.origin.len() + 8)
            + self.data.as_ref().map_or(0, String::len)
            + 16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(ms: u64, origin: &str) -> Version {
        Version {
            hlc: Hlc::new(ms, 0),
            origin: Arc::from(origin),
        }
    }

    #[test]
    fn later_writes_win_and_ties_break_by_origin_the_same_everywhere() {
        assert!(v(2, "a").beats(&v(1, "z")));
        assert!(!v(1, "z").beats(&v(2, "a")));
        assert!(v(1, "b").beats(&v(1, "a")));
        assert!(!v(1, "a").beats(&v(1, "b")));
        assert!(!v(1, "a").beats(&v(1, "a")), "equal versions: no winner");
    }

    #[test]
    fn equal_versions_with_different_data_have_one_winner() {
        let stamp = |ms, origin, data: Option<&str>| Stamp {
            version: v(ms, origin),
            intent: None,
            data: data_hash(data),
        };
        // Two nodes sharing the id "a" wrote different data at one version.
        let (x, y) = (stamp(1, "a", Some("x")), stamp(1, "a", Some("y")));
        assert_ne!(x, y);
        assert!(x.beats(&y) != y.beats(&x), "exactly one wins");
        let tomb = stamp(1, "a", None);
        assert!(tomb.beats(&x) != x.beats(&tomb));
        assert!(!x.beats(&x.clone()));
        // The version still comes first: the data only breaks ties.
        let later = stamp(2, "a", Some("x"));
        assert!(later.beats(&y) && later.beats(&x));
        assert!(!y.beats(&later) && !x.beats(&later));
    }

    #[test]
    fn a_deliberate_write_beats_a_later_verdict_made_without_knowing_of_it() {
        let stamp = |ms, origin, intent: Option<Version>, data: &str| Stamp {
            version: v(ms, origin),
            intent,
            data: data_hash(Some(data)),
        };
        // Registered at 1 (a); deleted at 3 on one side of a partition (b);
        // the expiry verdict at 5 on the other side sits on the write at 1.
        let deleted = stamp(3, "b", None, "deleted");
        let expired = stamp(5, "a", Some(v(1, "a")), "expired");
        assert!(deleted.beats(&expired) && !expired.beats(&deleted));
        // The verdict judged again on top of the delete: same intent, later.
        let expired_again = stamp(6, "a", Some(v(3, "b")), "deleted+expired");
        assert!(expired_again.beats(&deleted) && !deleted.beats(&expired_again));
        assert!(expired_again.beats(&expired));
        // A tombstone is deliberate too.
        let tomb = Stamp {
            version: v(3, "b"),
            intent: None,
            data: data_hash(None),
        };
        assert!(tomb.beats(&expired) && !expired.beats(&tomb));
        // A deliberate write after the delete still wins over it.
        let again = stamp(4, "a", None, "registered again");
        assert!(again.beats(&deleted) && again.beats(&expired));
    }

    #[test]
    fn only_changes_to_verdict_columns_are_verdicts() {
        let row = r#"{"id":"x","weight":2,"deleted":0,"expired":0,"heartbeat_pop":"gru"}"#;
        let verdict = |t| only_verdicts_differ(Table::Backends, row, t);
        assert!(verdict(
            r#"{"id":"x","weight":2,"deleted":0,"expired":1,"heartbeat_pop":"gru"}"#
        ));
        assert!(verdict(
            r#"{"id":"x","weight":2,"deleted":0,"expired":0,"heartbeat_pop":"fra"}"#
        ));
        assert!(!verdict(
            r#"{"id":"x","weight":2,"deleted":1,"expired":1,"heartbeat_pop":"gru"}"#
        ));
        assert!(!verdict(
            r#"{"id":"x","weight":3,"deleted":0,"expired":0,"heartbeat_pop":"gru"}"#
        ));
        // A column that appears or disappears is a change of its own.
        assert!(!verdict(
            r#"{"id":"x","weight":2,"deleted":0,"expired":0,"heartbeat_pop":"gru","port":1}"#
        ));
        assert!(!verdict("not json"));
        // Columns of the same name in another table are not verdicts.
        let pop = r#"{"node_id":"gru","expired":0}"#;
        assert!(!only_verdicts_differ(
            Table::Pops,
            pop,
            r#"{"node_id":"gru","expired":1}"#
        ));
    }
}
