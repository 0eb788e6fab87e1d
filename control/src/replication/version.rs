//! What replicates: rows of the replicated tables, each with the version
//! (hybrid logical timestamp and origin node) of its last write.
//!
//! Conflicts resolve last-writer-wins on `(hlc, origin)`: the greater pair
//! wins on every node, whatever order the writes arrive in. Origins compare
//! as bytes, so the tie-break is the same everywhere.

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
}
