//! What replicates: rows of the replicated tables, each with the version
//! (hybrid logical timestamp and origin node) of its last write.
//!
//! Conflicts resolve last-writer-wins on `(hlc, origin)`: the greater pair
//! wins on every node, whatever order the writes arrive in. Origins compare
//! as bytes, so the tie-break is the same everywhere.
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

/// A version and the hash of the data written at it: what anti-entropy
/// compares, and what decides between two writes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Stamp {
    pub version: Version,
    /// [`data_hash`] of the row's data.
    pub data: u64,
}

impl Stamp {
    /// True when `self` wins over `other`: the later version, and between
    /// equal versions (two nodes with one id) the greater data hash, so
    /// that every node keeps the same one.
    pub fn beats(&self, other: &Stamp) -> bool {
        self.version.beats(&other.version)
            || (self.version == other.version && self.data > other.data)
    }
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
    /// The replicated columns as a JSON object; `None` is a tombstone (the
    /// row was deleted).
    pub data: Option<String>,
}

impl RowVersion {
    pub fn stamp(&self) -> Stamp {
        Stamp {
            version: self.version.clone(),
            data: data_hash(self.data.as_deref()),
        }
    }

    pub fn is_tombstone(&self) -> bool {
        self.data.is_none()
    }

    /// Bytes this row takes on the wire, roughly (for batch limits).
    pub fn wire_size(&self) -> usize {
        self.key.pk.len()
            + self.version.origin.len()
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
}
