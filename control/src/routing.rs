//! Keeps the published routing snapshot in step with `routing.db`.
//!
//! [`RoutingReloader::tick`] runs every reload interval on the control thread:
//! it asks the store whether anything may have changed (cheap), and only then
//! reads every row, builds a new snapshot and publishes it. A database that
//! cannot be read leaves the last good snapshot in place.

use std::time::Instant;

use engine::snapshot::{BackendRecord, SnapshotBuilder, SnapshotHandle};

use crate::store::{RoutingStore, StoreError};

pub struct RoutingReloader {
    store: RoutingStore,
    builder: SnapshotBuilder,
    handle: SnapshotHandle,
    /// The last tick failed; the next success is logged as a recovery.
    failing: bool,
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
    pub fn start(mut store: RoutingStore) -> Result<Self, StoreError> {
        let mut builder = SnapshotBuilder::new();
        let records = load_logged(&mut store)?;
        let built = builder.build(&records);
        log_skipped(&built.skipped);
        let handle = SnapshotHandle::new(built.snapshot);
        Ok(RoutingReloader {
            store,
            builder,
            handle,
            failing: false,
        })
    }

    pub fn handle(&self) -> &SnapshotHandle {
        &self.handle
    }

    pub fn store_mut(&mut self) -> &mut RoutingStore {
        &mut self.store
    }

    /// Reloads if the store changed. Errors are logged, never returned: the
    /// data plane keeps the last good snapshot.
    pub fn tick(&mut self) -> Reload {
        let changed = match self.store.changed() {
            Ok(changed) => changed || self.failing,
            Err(e) => {
                self.fail(&e);
                return Reload::Unchanged;
            }
        };
        if !changed {
            return Reload::Unchanged;
        }
        self.reload()
    }

    /// Reads the whole table and publishes it, whether or not it changed.
    pub fn reload(&mut self) -> Reload {
        let started = Instant::now();
        let records = match load_logged(&mut self.store) {
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
        let built = self.builder.build(&records);
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

fn load_logged(store: &mut RoutingStore) -> Result<Vec<BackendRecord>, StoreError> {
    let loaded = store.load()?;
    for (id, reason) in &loaded.bad_rows {
        tracing::warn!(backend = %id, %reason, "skipping unreadable routing row");
    }
    Ok(loaded.records)
}

fn log_skipped(skipped: &[(String, engine::snapshot::RecordError)]) {
    for (id, reason) in skipped {
        tracing::warn!(backend = %id, %reason, "skipping invalid routing row");
    }
}
