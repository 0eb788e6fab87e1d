//! Traffic must never disappear silently: a listener whose app has no
//! eligible backend (a typo in `app`, an empty table, a `routing.db_path`
//! pointing at a new empty file) refuses every connection. This module finds
//! such listeners and says why, at WARN: at start, after SIGHUP, after every
//! routing reload, and in `check-config`.
//!
//! Sans-IO. [`Coverage::observe`] takes the rows of a reload (with their
//! discovery-API state) and the snapshot built from them; [`Coverage::check`]
//! matches them against the listeners ([`Coverage::set_listeners`]) and
//! returns a [`Gap`] per listener without an eligible backend, with the
//! reason: none registered, or every one unhealthy, draining, expired (missed
//! heartbeats), at its hard limit, or invalid (a row the proxy cannot route).
//! The last gaps are also shared ([`Coverage::shared`]) with the traffic
//! watch, which names the reason when it reports refused connections.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Arc, Mutex};

use engine::snapshot::{BackendRecord, RoutingSnapshot};

use crate::store::Lifecycle;

/// Why one backend cannot take a new connection, most telling first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RowState {
    Eligible,
    Draining,
    Expired,
    Unhealthy,
    Invalid,
    AtHardLimit,
}

impl RowState {
    fn name(self) -> &'static str {
        match self {
            RowState::Eligible => "eligible",
            RowState::Draining => "draining",
            RowState::Expired => "expired (no heartbeat within the TTL)",
            RowState::Unhealthy => "unhealthy",
            RowState::Invalid => "invalid (rows the proxy cannot route, see earlier warnings)",
            RowState::AtHardLimit => "at the hard limit",
        }
    }
}

/// One live row, as far as coverage cares.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    id: String,
    app: String,
    /// Its state at the reload; `Eligible` rows are checked against their
    /// hard limit when a check runs (live counts move).
    state: RowState,
}

/// Why a listener has no eligible backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// No live row for the app (or, for a listener serving every app, none
    /// at all).
    NoneRegistered,
    /// Rows exist; none is eligible. Counts per state.
    NoneEligible(BTreeMap<RowState, usize>),
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let counts = match self {
            Reason::NoneRegistered => return f.write_str("no backend registered"),
            Reason::NoneEligible(counts) => counts,
        };
        let total: usize = counts.values().sum();
        match (counts.len(), total) {
            (1, 1) => write!(f, "its only backend is {}", first(counts).name()),
            (1, n) => write!(f, "all {n} backends are {}", first(counts).name()),
            _ => {
                let parts: Vec<String> = counts
                    .iter()
                    .map(|(state, n)| format!("{n} {}", state.name()))
                    .collect();
                write!(
                    f,
                    "none of {total} backends is eligible: {}",
                    parts.join(", ")
                )
            }
        }
    }
}

fn first(counts: &BTreeMap<RowState, usize>) -> RowState {
    *counts.keys().next().expect("not empty")
}

/// A listener that refuses every connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    pub listener: String,
    /// `None`: the listener serves every app.
    pub app: Option<String>,
    pub reason: Reason,
}

/// The listeners' view of the routing table. See the module docs.
#[derive(Debug, Default)]
pub struct Coverage {
    rows: Vec<Row>,
    /// (listener name, app it serves; `None`: every app).
    listeners: Vec<(String, Option<String>)>,
    /// The last check's reasons, by listener name.
    shared: Arc<Mutex<BTreeMap<String, String>>>,
}

impl Coverage {
    /// Keeps the live rows of a reload: `records` and `lifecycle` as loaded
    /// (after heartbeat expiry was applied), `expired` the ids routed as
    /// expired, `snapshot` what was built from them (rows missing from it
    /// were invalid).
    pub fn observe(
        &mut self,
        records: &[BackendRecord],
        lifecycle: &[Lifecycle],
        expired: &BTreeSet<String>,
        snapshot: &RoutingSnapshot,
    ) {
        self.rows.clear();
        for (i, rec) in records.iter().enumerate() {
            if rec.deleted {
                continue;
            }
            let draining = lifecycle.get(i).is_some_and(|l| l.draining);
            let state = if draining {
                RowState::Draining
            } else if expired.contains(&rec.id) {
                RowState::Expired
            } else if !rec.healthy {
                RowState::Unhealthy
            } else if snapshot.find(&rec.id).is_none() {
                RowState::Invalid
            } else {
                RowState::Eligible
            };
            self.rows.push(Row {
                id: rec.id.clone(),
                app: rec.app.clone(),
                state,
            });
        }
    }

    /// The listeners to check from now on.
    pub fn set_listeners(&mut self, listeners: Vec<(String, Option<String>)>) {
        self.listeners = listeners;
    }

    /// Reasons of the last check, by listener, for other threads.
    pub fn shared(&self) -> Arc<Mutex<BTreeMap<String, String>>> {
        Arc::clone(&self.shared)
    }

    /// The listeners without an eligible backend now. `snapshot` gives the
    /// live connection counts (a backend at its hard limit is not eligible).
    pub fn check(&self, snapshot: &RoutingSnapshot) -> Vec<Gap> {
        let now_state = |row: &Row| match row.state {
            RowState::Eligible => match snapshot.find(&row.id).map(|i| snapshot.backend(i)) {
                Some(b) if !b.under_hard_limit(b.active()) => RowState::AtHardLimit,
                _ => RowState::Eligible,
            },
            other => other,
        };
        let mut gaps = Vec::new();
        for (name, app) in &self.listeners {
            let mut counts: BTreeMap<RowState, usize> = BTreeMap::new();
            for row in self
                .rows
                .iter()
                .filter(|r| app.as_deref().is_none_or(|a| a == r.app))
            {
                *counts.entry(now_state(row)).or_default() += 1;
            }
            if counts.contains_key(&RowState::Eligible) {
                continue;
            }
            let reason = if counts.is_empty() {
                Reason::NoneRegistered
            } else {
                Reason::NoneEligible(counts)
            };
            gaps.push(Gap {
                listener: name.clone(),
                app: app.clone(),
                reason,
            });
        }
        if let Ok(mut shared) = self.shared.lock() {
            *shared = gaps
                .iter()
                .map(|g| (g.listener.clone(), g.reason.to_string()))
                .collect();
        }
        gaps
    }

    /// [`check`](Coverage::check), and a WARN per gap; `when` says what
    /// prompted it ("start", "SIGHUP", "reload").
    pub fn warn(&self, snapshot: &RoutingSnapshot, when: &str) -> usize {
        let gaps = self.check(snapshot);
        for gap in &gaps {
            tracing::warn!(listener = %gap.listener, app = gap.app.as_deref().unwrap_or("*"),
                reason = %gap.reason, checked_at = when,
                "listener has no eligible backend: every connection to it is refused");
        }
        gaps.len()
    }
}

/// A gap as one line of text, for `check-config`.
impl fmt::Display for Gap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.app {
            Some(app) => write!(
                f,
                "listener {:?} (app {app:?}) has no eligible backend: {}; every connection to it would be refused",
                self.listener, self.reason
            ),
            None => write!(
                f,
                "listener {:?} (every app) has no eligible backend: {}; every connection to it would be refused",
                self.listener, self.reason
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::snapshot::{ActiveGuard, SnapshotBuilder};

    fn rec(id: &str, app: &str) -> BackendRecord {
        BackendRecord {
            id: id.into(),
            app: app.into(),
            region: "sa".into(),
            country: None,
            ip: "127.0.0.1".into(),
            port: 9,
            healthy: true,
            weight: 1,
            soft_limit: 1,
            hard_limit: 1,
            deleted: false,
        }
    }

    fn listeners(list: &[(&str, Option<&str>)]) -> Vec<(String, Option<String>)> {
        list.iter()
            .map(|(n, a)| (n.to_string(), a.map(str::to_string)))
            .collect()
    }

    fn coverage(
        records: &[BackendRecord],
        lifecycle: &[Lifecycle],
        expired: &[&str],
    ) -> (Coverage, RoutingSnapshot) {
        let snapshot = SnapshotBuilder::new().build(records).snapshot;
        let mut c = Coverage::default();
        let expired = expired.iter().map(|s| s.to_string()).collect();
        c.observe(records, lifecycle, &expired, &snapshot);
        (c, snapshot)
    }

    #[test]
    fn a_typo_in_app_and_an_empty_table_are_none_registered() {
        let (mut c, snap) = coverage(&[rec("w1", "web")], &[], &[]);
        c.set_listeners(listeners(&[
            ("front", Some("wbe")),
            ("all", None),
            ("ok", Some("web")),
        ]));
        let gaps = c.check(&snap);
        assert_eq!(gaps.len(), 1);
        assert_eq!(gaps[0].listener, "front");
        assert_eq!(gaps[0].reason, Reason::NoneRegistered);
        assert_eq!(
            gaps[0].to_string(),
            "listener \"front\" (app \"wbe\") has no eligible backend: no backend registered; \
             every connection to it would be refused"
        );

        let (mut c, snap) = coverage(&[], &[], &[]);
        c.set_listeners(listeners(&[("all", None)]));
        assert_eq!(c.check(&snap)[0].reason, Reason::NoneRegistered);
        assert_eq!(c.shared().lock().unwrap()["all"], "no backend registered");
    }

    #[test]
    fn every_reason_is_named_and_counted() {
        let mut unhealthy = rec("u", "web");
        unhealthy.healthy = false;
        let mut bad = rec("bad", "web");
        bad.ip = "not an ip".into();
        let mut gone = rec("gone", "web");
        gone.deleted = true;
        let drained = Lifecycle {
            draining: true,
            ..Lifecycle::default()
        };
        let records = [rec("d", "web"), rec("e", "web"), unhealthy, bad, gone];
        let lifecycle = [
            drained,
            Lifecycle::default(),
            Lifecycle::default(),
            Lifecycle::default(),
            Lifecycle::default(),
        ];
        let (mut c, snap) = coverage(&records, &lifecycle, &["e"]);
        c.set_listeners(listeners(&[("front", Some("web"))]));
        let gaps = c.check(&snap);
        assert_eq!(
            gaps[0].reason.to_string(),
            "none of 4 backends is eligible: 1 draining, 1 expired (no heartbeat within the TTL), \
             1 unhealthy, 1 invalid (rows the proxy cannot route, see earlier warnings)"
        );
    }

    #[test]
    fn all_in_one_state_reads_as_all() {
        let mut a = rec("a", "web");
        a.healthy = false;
        let mut b = rec("b", "web");
        b.healthy = false;
        let (mut c, snap) = coverage(&[a, b], &[], &[]);
        c.set_listeners(listeners(&[("front", Some("web"))]));
        assert_eq!(
            c.check(&snap)[0].reason.to_string(),
            "all 2 backends are unhealthy"
        );
    }

    #[test]
    fn backends_at_their_hard_limit_count_when_checked() {
        let (mut c, snap) = coverage(&[rec("a", "web")], &[], &[]);
        c.set_listeners(listeners(&[("front", Some("web"))]));
        assert!(c.check(&snap).is_empty());
        // Live counts move without a reload: the check sees them.
        let busy = ActiveGuard::new(Arc::clone(&snap.backends[0].live));
        assert_eq!(
            c.check(&snap)[0].reason.to_string(),
            "its only backend is at the hard limit"
        );
        drop(busy);
        assert!(c.check(&snap).is_empty());
        assert!(c.shared().lock().unwrap().is_empty());
    }
}
