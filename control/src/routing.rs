//! Keeps the published routing snapshot in step with `routing.db`.
//!
//! [`RoutingReloader::tick`] runs every reload interval on the control thread:
//! it asks the store whether anything may have changed (cheap), and only then
//! reads every row, builds a new snapshot and publishes it. A database that
//! cannot be read leaves the last good snapshot in place.
//!
//! The discovery API's per-backend state weighs on routing here (see
//! [`apply_lifecycle`]): a drained backend, and one whose last heartbeat is
//! older than the heartbeat TTL, is published as unhealthy, so it takes no
//! new connections (and loses its affinity bindings) while open connections
//! go on. Expiry changes nothing in the file, so the reloader also reloads
//! when the earliest heartbeat deadline it saw has passed.

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use engine::snapshot::{BackendRecord, SnapshotBuilder, SnapshotHandle};

use crate::store::{Lifecycle, RoutingStore, StoreError};

pub struct RoutingReloader {
    store: RoutingStore,
    builder: SnapshotBuilder,
    handle: SnapshotHandle,
    /// The last tick failed; the next success is logged as a recovery.
    failing: bool,
    /// Heartbeat TTL; `None`: nothing expires.
    ttl: Option<Duration>,
    /// The earliest heartbeat deadline still ahead at the last reload (Unix
    /// ms): a reload is due when it passes.
    next_expiry_ms: Option<i64>,
    /// Backends expired at the last reload, to log each change once.
    expired: BTreeSet<String>,
}

/// Unix milliseconds of `t` (0 before the epoch).
pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis().min(i64::MAX as u128) as i64)
        .unwrap_or(0)
}

/// True when a heartbeat at `last_ms` is too old at `now_ms` (the original's
/// rule: expired once `now - last >= ttl`).
pub fn is_expired(last_ms: i64, ttl: Duration, now_ms: i64) -> bool {
    now_ms.saturating_sub(last_ms) >= ttl.as_millis().min(i64::MAX as u128) as i64
}

/// Marks drained and expired backends unhealthy in `records` (`lifecycle[i]`
/// belongs to `records[i]`), so selection skips them for new connections.
/// Rows without a heartbeat (not registered through the API) never expire.
/// Returns the ids of the expired live backends and the earliest heartbeat
/// deadline still ahead (Unix ms), when the routing view changes next by
/// itself.
pub fn apply_lifecycle(
    records: &mut [BackendRecord],
    lifecycle: &[Lifecycle],
    ttl: Option<Duration>,
    now_ms: i64,
) -> (BTreeSet<String>, Option<i64>) {
    let mut expired = BTreeSet::new();
    let mut next: Option<i64> = None;
    for (rec, life) in records.iter_mut().zip(lifecycle) {
        if rec.deleted {
            continue;
        }
        if life.draining {
            rec.healthy = false;
        }
        if let (Some(ttl), Some(last)) = (ttl, life.last_heartbeat_ms) {
            if is_expired(last, ttl, now_ms) {
                rec.healthy = false;
                expired.insert(rec.id.clone());
            } else {
                let deadline = last.saturating_add(ttl.as_millis().min(i64::MAX as u128) as i64);
                next = Some(next.map_or(deadline, |n| n.min(deadline)));
            }
        }
    }
    (expired, next)
}

/// What one reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    Unchanged,
    Published { version: u64, backends: usize },
}

impl RoutingReloader {
    /// Loads the table once and returns the reloader with its first snapshot
    /// published in `handle`.
    pub fn start(store: RoutingStore) -> Result<Self, StoreError> {
        Self::start_with_ttl(store, None)
    }

    /// [`start`], with backends whose heartbeat is older than `ttl` routed
    /// as unhealthy (`None`: nothing expires).
    ///
    /// [`start`]: RoutingReloader::start
    pub fn start_with_ttl(
        mut store: RoutingStore,
        ttl: Option<Duration>,
    ) -> Result<Self, StoreError> {
        let mut builder = SnapshotBuilder::new();
        let mut loaded = load_logged(&mut store)?;
        let (expired, next_expiry_ms) = apply_lifecycle(
            &mut loaded.records,
            &loaded.lifecycle,
            ttl,
            unix_ms(SystemTime::now()),
        );
        if !expired.is_empty() {
            tracing::info!(backends = %expired.iter().map(String::as_str).collect::<Vec<_>>().join(","), "registered backends with an expired heartbeat take no new connections");
        }
        let built = builder.build(&loaded.records);
        log_skipped(&built.skipped);
        let handle = SnapshotHandle::new(built.snapshot);
        Ok(RoutingReloader {
            store,
            builder,
            handle,
            failing: false,
            ttl,
            next_expiry_ms,
            expired,
        })
    }

    /// The heartbeat TTL (`None`: nothing expires).
    pub fn heartbeat_ttl(&self) -> Option<Duration> {
        self.ttl
    }

    /// Whether `id` was routed as expired by the last reload.
    pub fn expired(&self, id: &str) -> bool {
        self.expired.contains(id)
    }

    pub fn handle(&self) -> &SnapshotHandle {
        &self.handle
    }

    pub fn store_mut(&mut self) -> &mut RoutingStore {
        &mut self.store
    }

    /// Reloads if the store changed (or a heartbeat deadline passed). Errors
    /// are logged, never returned: the data plane keeps the last good
    /// snapshot.
    pub fn tick(&mut self) -> Reload {
        self.tick_at(SystemTime::now())
    }

    /// [`tick`] with the clock passed in (heartbeat expiry is judged at `now`).
    ///
    /// [`tick`]: RoutingReloader::tick
    pub fn tick_at(&mut self, now: SystemTime) -> Reload {
        let expiry_due = self.next_expiry_ms.is_some_and(|at| unix_ms(now) >= at);
        let changed = match self.store.changed() {
            Ok(changed) => changed || self.failing || expiry_due,
            Err(e) => {
                self.fail(&e);
                return Reload::Unchanged;
            }
        };
        if !changed {
            return Reload::Unchanged;
        }
        self.reload_at(now)
    }

    /// Reads the whole table and publishes it, whether or not it changed.
    pub fn reload(&mut self) -> Reload {
        self.reload_at(SystemTime::now())
    }

    /// [`reload`] with the clock passed in.
    ///
    /// [`reload`]: RoutingReloader::reload
    pub fn reload_at(&mut self, now: SystemTime) -> Reload {
        let started = Instant::now();
        let mut loaded = match load_logged(&mut self.store) {
            Ok(r) => r,
            Err(e) => {
                self.fail(&e);
                return Reload::Unchanged;
            }
        };
        if self.failing {
            tracing::info!(path = %self.store.path().display(), "routing database readable again");
            self.failing = false;
        }
        let (expired, next_expiry_ms) = apply_lifecycle(
            &mut loaded.records,
            &loaded.lifecycle,
            self.ttl,
            unix_ms(now),
        );
        let built = self.builder.build(&loaded.records);
        log_skipped(&built.skipped);
        let version = built.snapshot.version;
        let backends = built.snapshot.backends.len();
        self.handle.publish(built.snapshot);
        tracing::info!(
            version,
            backends,
            took_us = started.elapsed().as_micros() as u64,
            "routing table reloaded"
        );
        // After publishing: what these lines say is in effect.
        for id in expired.difference(&self.expired) {
            tracing::warn!(backend = %id, ttl_secs = self.ttl.map(|t| t.as_secs()),
                "backend heartbeat expired: no new connections until it heartbeats again");
        }
        for id in self.expired.difference(&expired) {
            if loaded.records.iter().any(|r| r.id == *id && !r.deleted) {
                tracing::info!(backend = %id, "backend heartbeat resumed: back in service");
            }
        }
        self.expired = expired;
        self.next_expiry_ms = next_expiry_ms;
        Reload::Published { version, backends }
    }

    fn fail(&mut self, e: &StoreError) {
        // Log every failing tick at error level only once per outage.
        if !self.failing {
            tracing::error!(error = %e, version = self.handle.load().version,
                "cannot read routing database; keeping the last good routing table");
        } else {
            tracing::debug!(error = %e, "routing database still unreadable");
        }
        self.failing = true;
    }
}

fn load_logged(store: &mut RoutingStore) -> Result<crate::store::Loaded, StoreError> {
    let loaded = store.load()?;
    for (id, reason) in &loaded.bad_rows {
        tracing::warn!(backend = %id, %reason, "skipping unreadable routing row");
    }
    Ok(loaded)
}

fn log_skipped(skipped: &[(String, engine::snapshot::RecordError)]) {
    for (id, reason) in skipped {
        tracing::warn!(backend = %id, %reason, "skipping invalid routing row");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str) -> BackendRecord {
        BackendRecord {
            id: id.into(),
            app: "web".into(),
            region: "sa".into(),
            country: None,
            ip: "127.0.0.1".into(),
            port: 9,
            healthy: true,
            weight: 1,
            soft_limit: 100,
            hard_limit: 150,
            deleted: false,
        }
    }

    fn hb(ms: i64) -> Lifecycle {
        Lifecycle {
            draining: false,
            last_heartbeat_ms: Some(ms),
            registered_at_ms: Some(ms),
        }
    }

    const TTL: Duration = Duration::from_secs(10);

    #[test]
    fn drained_and_expired_backends_are_routed_unhealthy() {
        let mut records = vec![
            rec("manual"),
            rec("fresh"),
            rec("old"),
            rec("drained"),
            rec("gone"),
        ];
        records[4].deleted = true;
        let drained = Lifecycle {
            draining: true,
            ..hb(95_000)
        };
        let lifecycle = [Lifecycle::default(), hb(95_000), hb(90_000), drained, hb(0)];
        let (expired, next) = apply_lifecycle(&mut records, &lifecycle, Some(TTL), 100_000);
        let healthy: Vec<bool> = records.iter().map(|r| r.healthy).collect();
        assert_eq!(healthy, [true, true, false, false, true]);
        assert_eq!(expired.into_iter().collect::<Vec<_>>(), ["old"]);
        // fresh and drained both expire at 105 000.
        assert_eq!(next, Some(105_000));
    }

    #[test]
    fn expiry_is_at_exactly_the_ttl_and_off_without_one() {
        assert!(!is_expired(0, TTL, 9_999));
        assert!(is_expired(0, TTL, 10_000));
        // A heartbeat from the future (clock stepped back) is not expired.
        assert!(!is_expired(20_000, TTL, 10_000));
        let mut records = vec![rec("old")];
        let (expired, next) = apply_lifecycle(&mut records, &[hb(0)], None, i64::MAX);
        assert!(expired.is_empty() && next.is_none() && records[0].healthy);
    }

    #[test]
    fn reloader_republishes_when_a_heartbeat_deadline_passes() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = RoutingStore::open(&dir.path().join("routing.db")).unwrap();
        let t0 = SystemTime::now();
        store.register(&rec("a"), unix_ms(t0)).unwrap();
        let mut reloader = RoutingReloader::start_with_ttl(store, Some(TTL)).unwrap();
        let healthy = |r: &RoutingReloader| {
            let snap = r.handle().load();
            snap.backends
                .iter()
                .find(|b| &*b.id == "a")
                .map(|b| b.healthy)
        };
        assert_eq!(healthy(&reloader), Some(true));
        assert_eq!(
            reloader.tick_at(t0 + TTL - Duration::from_millis(1)),
            Reload::Unchanged
        );
        assert!(matches!(
            reloader.tick_at(t0 + TTL),
            Reload::Published { .. }
        ));
        assert_eq!(
            healthy(&reloader),
            Some(false),
            "expired: no new connections"
        );
        assert!(reloader.expired("a"));
        // Nothing more to do until something changes.
        assert_eq!(reloader.tick_at(t0 + TTL * 5), Reload::Unchanged);

        // A heartbeat is quiet for the store; the caller reloads to revive.
        let t1 = t0 + TTL * 6;
        assert!(reloader.store_mut().heartbeat("a", unix_ms(t1)).unwrap());
        assert_eq!(reloader.tick_at(t1), Reload::Unchanged);
        reloader.reload_at(t1);
        assert_eq!(healthy(&reloader), Some(true));
        assert!(!reloader.expired("a"));
    }
}
