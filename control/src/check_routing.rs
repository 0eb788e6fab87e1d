//! `check-config`'s look at the routing table: what `run` would find there,
//! read without writing anything (no file created, no schema migrated).
//!
//! Errors are what would stop `run` (the path's directory does not exist, it
//! is a directory, the file is not a routing store). Warnings are what would
//! cost traffic: a table that does not exist yet (created empty by `run`),
//! rows the proxy would skip (a row at one of the listeners' addresses
//! among them), rows with a weight or soft limit of 0 (read
//! as 1: see `engine::snapshot::RecordNote`), and each listener with no eligible backend
//! (`crate::no_backend_warn`), counting the demo backends `run` would add.

use std::collections::BTreeSet;
use std::time::SystemTime;

use engine::own_listeners::OwnListeners;
use engine::snapshot::{BackendRecord, SnapshotBuilder};

use crate::config::Config;
use crate::no_backend_warn::Coverage;
use crate::routing::{apply_lifecycle, unix_ms, StandIn};
use crate::routing_db_path::{absolute, inspect};
use crate::store::{peek_read_only, Lifecycle, Loaded};

/// The warnings for `config`'s routing table and `listeners` ((name, app)).
pub fn warnings(
    config: &Config,
    listeners: &[(String, Option<String>)],
) -> anyhow::Result<Vec<String>> {
    let path = &config.routing.db_path;
    let mut out = Vec::new();
    let mut loaded = if inspect(path)? {
        peek_read_only(path)?
    } else {
        out.push(format!(
            "routing store {} does not exist: `run` will create it empty (no backend is routable until rows are added)",
            absolute(path).display()
        ));
        Loaded::default()
    };
    for (id, reason) in &loaded.bad_rows {
        out.push(format!(
            "routing row {id} cannot be read and would be skipped: {reason}"
        ));
    }
    add_demo_rows(config, &mut loaded);
    let expiry = apply_lifecycle(
        &mut loaded.records,
        &loaded.lifecycle,
        Some(config.api.heartbeat_ttl),
        unix_ms(SystemTime::now()),
        None,
        &StandIn::default(),
    );
    // As configured: a listener on port 0 gets its port only when `run`
    // binds it, and no row can point at port 0.
    let mut builder = SnapshotBuilder::new();
    builder.set_own_listeners(OwnListeners::new(config.listeners.iter().map(|l| l.addr)));
    let built = builder.build(&loaded.records);
    for (id, reason) in &built.skipped {
        out.push(format!(
            "routing row {id} is invalid and would be skipped: {reason}"
        ));
    }
    for (id, note) in &built.notes {
        out.push(format!("routing row {id}: {note}"));
    }
    let mut coverage = Coverage::default();
    coverage.observe(
        &loaded.records,
        &loaded.lifecycle,
        &expiry.expired,
        &built.snapshot,
    );
    coverage.set_listeners(listeners.to_vec());
    out.extend(
        coverage
            .check(&built.snapshot)
            .iter()
            .map(|g| g.to_string()),
    );
    Ok(out)
}

/// The rows `[demo]` makes `run` write (`demo-1`...), in place of any rows
/// with those ids. Their addresses are not known before they start; any
/// valid one stands in.
fn add_demo_rows(config: &Config, loaded: &mut Loaded) {
    let ids: BTreeSet<String> = (1..=config.demo.backends)
        .map(|n| format!("demo-{n}"))
        .collect();
    let keep: Vec<bool> = loaded
        .records
        .iter()
        .map(|r| !ids.contains(&r.id))
        .collect();
    let mut i = 0;
    loaded.records.retain(|_| {
        i += 1;
        keep[i - 1]
    });
    let mut i = 0;
    loaded.lifecycle.retain(|_| {
        i += 1;
        keep[i - 1]
    });
    for id in ids {
        loaded.records.push(BackendRecord {
            id,
            app: config.demo.app.clone(),
            region: config.pop.region.clone(),
            country: None,
            ip: "127.0.0.1".into(),
            port: 1,
            healthy: true,
            weight: 1,
            soft_limit: 100,
            hard_limit: 150,
            deleted: false,
        });
        loaded.lifecycle.push(Lifecycle::default());
    }
}
