//! A node's replicated state in memory: every row version it holds, grouped
//! into digest buckets, and the merge rule.
//!
//! The anti-entropy exchange compares digests before it compares rows: each
//! row version (its [`Stamp`]: key, version and a hash of its data, so that
//! two nodes holding different data under one version differ) hashes to 64
//! bits, a bucket's digest is the wrapping sum of
//! its rows' hashes and the top digest the sum of the buckets. Sums update in
//! O(1) per write, and two nodes holding the same versions have the same
//! digests whatever order they learned them in. The hash is SHA-256 of a
//! fixed encoding (not Rust's `Hash`, which may differ between builds), so
//! every node, whatever its build, computes the same digests.
//!
//! Sans-IO: the database is the driver's business; this is what it loads at
//! start and what it keeps in step with every write.

use std::collections::BTreeMap;

use super::hlc::Hlc;
use super::version::{data_hash, RowKey, RowVersion, Stamp, Table, Version};

/// Digest buckets. A sync that finds digests differing exchanges the bucket
/// digests (8 bytes each) and then the versions of the differing buckets
/// only: 256 keeps the first at 2 KiB and the second small for tables of
/// many thousand rows.
pub const BUCKETS: usize = 256;

/// What [`Replica::merge`] did with an incoming row version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merge {
    /// It was newer than ours (or we had none): it is now ours.
    Applied { replaced: bool },
    /// Ours is newer: the incoming write lost.
    Stale,
    /// We already have exactly this version, with this data.
    Duplicate,
}

#[derive(Debug, Clone)]
struct Entry {
    version: Version,
    intent: Option<Version>,
    data: Option<String>,
    /// [`data_hash`] of `data`.
    data_hash: u64,
    /// The digest term of this entry.
    hash: u64,
}

impl Entry {
    fn stamp(&self) -> Stamp {
        Stamp {
            version: self.version.clone(),
            intent: self.intent.clone(),
            data: self.data_hash,
        }
    }
}

/// Every row version this node holds.
#[derive(Debug, Clone)]
pub struct Replica {
    buckets: Vec<BTreeMap<RowKey, Entry>>,
    sums: Vec<u64>,
    top: u64,
    rows: usize,
}

impl Default for Replica {
    fn default() -> Self {
        Replica {
            buckets: vec![BTreeMap::new(); BUCKETS],
            sums: vec![0; BUCKETS],
            top: 0,
            rows: 0,
        }
    }
}

impl Replica {
    pub fn new() -> Replica {
        Replica::default()
    }

    /// Row versions held (tombstones included).
    pub fn len(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// The top digest: equal on two nodes (but for a 2^-64 chance) exactly
    /// when they hold the same versions.
    pub fn top_digest(&self) -> u64 {
        self.top
    }

    pub fn bucket_digests(&self) -> &[u64] {
        &self.sums
    }

    pub fn version_of(&self, key: &RowKey) -> Option<&Version> {
        self.buckets[bucket_of(key)].get(key).map(|e| &e.version)
    }

    /// The version held for `key` and the hash of its data.
    pub fn stamp_of(&self, key: &RowKey) -> Option<Stamp> {
        self.buckets[bucket_of(key)].get(key).map(Entry::stamp)
    }

    pub fn get(&self, key: &RowKey) -> Option<RowVersion> {
        self.buckets[bucket_of(key)].get(key).map(|e| RowVersion {
            key: key.clone(),
            version: e.version.clone(),
            intent: e.intent.clone(),
            data: e.data.clone(),
        })
    }

    /// The data of a live row (`None` for an unknown row or a tombstone).
    pub fn data(&self, key: &RowKey) -> Option<&str> {
        self.buckets[bucket_of(key)]
            .get(key)
            .and_then(|e| e.data.as_deref())
    }

    /// The greatest timestamp held, to restart the clock above it.
    pub fn max_hlc(&self) -> Hlc {
        self.buckets
            .iter()
            .flat_map(|b| b.values())
            .map(|e| e.version.hlc)
            .max()
            .unwrap_or_default()
    }

    /// Takes `row` if it wins over what we hold (last-writer-wins; between
    /// equal versions with different data, see [`Stamp::beats`]).
    pub fn merge(&mut self, row: RowVersion) -> Merge {
        let b = bucket_of(&row.key);
        let incoming = row.stamp();
        if let Some(have) = self.buckets[b].get(&row.key) {
            let held = have.stamp();
            if incoming == held {
                return Merge::Duplicate;
            }
            if !incoming.beats(&held) {
                return Merge::Stale;
            }
        }
        let replaced = self.insert_hashed(b, row, incoming.data);
        Merge::Applied { replaced }
    }

    /// Stores `row` unconditionally (a local write, or a load at start).
    pub fn put(&mut self, row: RowVersion) {
        let b = bucket_of(&row.key);
        self.insert(b, row);
    }

    fn insert(&mut self, b: usize, row: RowVersion) -> bool {
        let data_hash = data_hash(row.data.as_deref());
        self.insert_hashed(b, row, data_hash)
    }

    /// [`Replica::insert`] with the data's hash already computed (a merge
    /// has it from comparing stamps).
    fn insert_hashed(&mut self, b: usize, row: RowVersion, data_hash: u64) -> bool {
        let hash = entry_hash(&row.key, &row.version, row.intent.as_ref(), data_hash);
        let entry = Entry {
            version: row.version,
            intent: row.intent,
            data: row.data,
            data_hash,
            hash,
        };
        let old = self.buckets[b].insert(row.key, entry);
        if let Some(old) = &old {
            self.sums[b] = self.sums[b].wrapping_sub(old.hash);
            self.top = self.top.wrapping_sub(old.hash);
        } else {
            self.rows += 1;
        }
        self.sums[b] = self.sums[b].wrapping_add(hash);
        self.top = self.top.wrapping_add(hash);
        old.is_some()
    }

    /// Removes tombstones written before `before` (HLC): deletions old
    /// enough that no late write can still arrive from before them. Returns
    /// the keys removed (the driver deletes them from the database too).
    pub fn collect_tombstones(&mut self, before: Hlc) -> Vec<RowKey> {
        let mut removed = Vec::new();
        for b in 0..BUCKETS {
            let dead: Vec<RowKey> = self.buckets[b]
                .iter()
                .filter(|(_, e)| e.data.is_none() && e.version.hlc < before)
                .map(|(k, _)| k.clone())
                .collect();
            for key in dead {
                if self.remove(&key) {
                    removed.push(key);
                }
            }
        }
        removed
    }

    /// Drops whatever version of `key` is held; true if one was.
    pub fn remove(&mut self, key: &RowKey) -> bool {
        let b = bucket_of(key);
        let Some(e) = self.buckets[b].remove(key) else {
            return false;
        };
        self.sums[b] = self.sums[b].wrapping_sub(e.hash);
        self.top = self.top.wrapping_sub(e.hash);
        self.rows -= 1;
        true
    }

    /// The buckets whose digests differ from `theirs` (which must have
    /// [`BUCKETS`] entries; a malformed list counts as all different).
    pub fn differing_buckets(&self, theirs: &[u64]) -> Vec<u16> {
        if theirs.len() != BUCKETS {
            return (0..BUCKETS as u16).collect();
        }
        (0..BUCKETS)
            .filter(|&b| self.sums[b] != theirs[b])
            .map(|b| b as u16)
            .collect()
    }

    /// The stamps of every row in `buckets`, in key order.
    pub fn versions_in(&self, buckets: &[u16]) -> impl Iterator<Item = (&RowKey, Stamp)> + '_ {
        let mut list: Vec<u16> = buckets
            .iter()
            .copied()
            .filter(|&b| (b as usize) < BUCKETS)
            .collect();
        list.sort_unstable();
        list.dedup();
        list.into_iter()
            .flat_map(move |b| self.buckets[b as usize].iter().map(|(k, e)| (k, e.stamp())))
    }

    /// The keys of `bucket`, in order.
    pub fn keys_in(&self, bucket: u16) -> impl Iterator<Item = &RowKey> + '_ {
        self.buckets
            .get(bucket as usize)
            .into_iter()
            .flat_map(|b| b.keys())
    }

    /// Every row held, in bucket then key order.
    pub fn iter(&self) -> impl Iterator<Item = RowVersion> + '_ {
        self.buckets.iter().flat_map(|b| {
            b.iter().map(|(k, e)| RowVersion {
                key: k.clone(),
                version: e.version.clone(),
                intent: e.intent.clone(),
                data: e.data.clone(),
            })
        })
    }
}

/// The digest bucket of a row.
pub fn bucket_of(key: &RowKey) -> usize {
    let d = ring::digest::digest(&ring::digest::SHA256, &key_bytes(key));
    d.as_ref()[0] as usize % BUCKETS
}

fn key_bytes(key: &RowKey) -> Vec<u8> {
    let mut b = Vec::with_capacity(key.pk.len() + 6);
    b.push(match key.table {
        Table::Backends => 1,
        Table::Pops => 2,
    });
    b.extend_from_slice(&(key.pk.len() as u32).to_be_bytes());
    b.extend_from_slice(key.pk.as_bytes());
    b
}

/// 64 bits of SHA-256 over (key, hlc, origin, data hash, and the intent if
/// the write has one of its own). The data is in it so that two nodes
/// holding different data under one version (two nodes sharing an id) see
/// different digests and exchange the rows.
fn entry_hash(key: &RowKey, version: &Version, intent: Option<&Version>, data_hash: u64) -> u64 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&key_bytes(key));
    ctx.update(&version.hlc.0.to_be_bytes());
    ctx.update(&(version.origin.len() as u32).to_be_bytes());
    ctx.update(version.origin.as_bytes());
    ctx.update(&data_hash.to_be_bytes());
    if let Some(intent) = intent {
        ctx.update(&intent.hlc.0.to_be_bytes());
        ctx.update(&(intent.origin.len() as u32).to_be_bytes());
        ctx.update(intent.origin.as_bytes());
    }
    let d = ctx.finish();
    u64::from_be_bytes(d.as_ref()[..8].try_into().expect("SHA-256 is 32 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn row(pk: &str, ms: u64, origin: &str, data: Option<&str>) -> RowVersion {
        RowVersion {
            key: RowKey::new(Table::Backends, pk),
            version: Version {
                hlc: Hlc::new(ms, 0),
                origin: Arc::from(origin),
            },
            intent: None,
            data: data.map(String::from),
        }
    }

    #[test]
    fn last_writer_wins_in_any_arrival_order() {
        let writes = [
            row("a", 1, "n1", Some("one")),
            row("a", 3, "n2", Some("three")),
            row("a", 2, "n3", Some("two")),
            row("a", 3, "n1", Some("three-but-n1")),
        ];
        let mut forward = Replica::new();
        let mut backward = Replica::new();
        for w in &writes {
            forward.merge(w.clone());
        }
        for w in writes.iter().rev() {
            backward.merge(w.clone());
        }
        let key = RowKey::new(Table::Backends, "a");
        assert_eq!(forward.data(&key), Some("three"), "(3, n2) beats (3, n1)");
        assert_eq!(forward.get(&key), backward.get(&key));
        assert_eq!(forward.top_digest(), backward.top_digest());
    }

    #[test]
    fn merge_reports_what_it_did() {
        let mut r = Replica::new();
        assert_eq!(
            r.merge(row("a", 2, "n1", Some("x"))),
            Merge::Applied { replaced: false }
        );
        assert_eq!(r.merge(row("a", 2, "n1", Some("x"))), Merge::Duplicate);
        assert_eq!(r.merge(row("a", 1, "n1", Some("old"))), Merge::Stale);
        assert_eq!(
            r.merge(row("a", 5, "n1", None)),
            Merge::Applied { replaced: true }
        );
        assert_eq!(r.data(&RowKey::new(Table::Backends, "a")), None);
        assert_eq!(r.len(), 1, "a tombstone is still a version");
    }

    #[test]
    fn digests_match_exactly_when_versions_match() {
        let mut a = Replica::new();
        let mut b = Replica::new();
        for i in 0..500 {
            a.put(row(&format!("r{i}"), i, "n1", Some("d")));
            b.put(row(&format!("r{i}"), i, "n1", Some("d")));
        }
        assert_eq!(a.top_digest(), b.top_digest());
        assert!(a.differing_buckets(b.bucket_digests()).is_empty());
        b.merge(row("r7", 1000, "n2", Some("changed")));
        assert_ne!(a.top_digest(), b.top_digest());
        let diff = a.differing_buckets(b.bucket_digests());
        assert_eq!(
            diff,
            vec![bucket_of(&RowKey::new(Table::Backends, "r7")) as u16]
        );
        let listed: Vec<_> = b.versions_in(&diff).map(|(k, _)| k.pk.clone()).collect();
        assert!(listed.contains(&"r7".to_string()));
        assert!(
            listed.len() < 20,
            "one bucket of 500 rows: {}",
            listed.len()
        );
    }

    #[test]
    fn equal_versions_with_different_data_differ_in_digests_and_converge() {
        // Two nodes sharing the id n1 wrote different data at one version.
        let mut a = Replica::new();
        let mut b = Replica::new();
        a.put(row("dup", 7, "n1", Some("port 10005")));
        b.put(row("dup", 7, "n1", Some("port 20005")));
        assert_ne!(a.top_digest(), b.top_digest(), "the difference is visible");
        let bucket = bucket_of(&RowKey::new(Table::Backends, "dup")) as u16;
        assert_eq!(a.differing_buckets(b.bucket_digests()), vec![bucket]);
        // Each takes the other's row: one wins on both sides.
        let (from_a, from_b) = (a.iter().next().unwrap(), b.iter().next().unwrap());
        let took_b = a.merge(from_b.clone());
        let took_a = b.merge(from_a.clone());
        assert!(
            matches!(
                (took_a, took_b),
                (Merge::Applied { .. }, Merge::Stale) | (Merge::Stale, Merge::Applied { .. })
            ),
            "{took_a:?} {took_b:?}"
        );
        assert_eq!(a.get(&from_a.key), b.get(&from_a.key));
        assert_eq!(a.top_digest(), b.top_digest());
    }

    #[test]
    fn old_tombstones_are_collected_and_leave_the_digest() {
        let mut r = Replica::new();
        r.put(row("live", 1, "n1", Some("d")));
        let only_live = r.top_digest();
        r.put(row("gone", 1, "n1", None));
        r.put(row("recent", 9, "n1", None));
        let removed = r.collect_tombstones(Hlc::new(5, 0));
        assert_eq!(removed, vec![RowKey::new(Table::Backends, "gone")]);
        assert_eq!(r.len(), 2);
        r.collect_tombstones(Hlc::new(10, 0));
        assert_eq!(r.top_digest(), only_live);
    }
}
