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
//! Whether a row is healthy and under its hard limit is read from the
//! snapshot given to the check, not remembered from the reload: health
//! checks and the circuit breaker republish snapshots without a reload, and
//! live counts move all the time.
//!
//! The traffic watch reports refusals long after a check ran, so it gets
//! the rows and listeners ([`Coverage::shared`]) and checks the listener it
//! reports on against the snapshot of that moment, rather than reading the
//! reasons of the last reload's check (which were another moment's, and
//! said nothing of a listener that had backends then).

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
    /// Its state at the reload; `Eligible` rows are checked against the
    /// snapshot when a check runs (health, hard limit).
    state: RowState,
}

/// What a check reads: the rows of the last reload and the listeners.
#[derive(Debug, Default)]
struct Table {
    rows: Vec<Row>,
    /// (listener name, app it serves; `None`: every app).
    listeners: Vec<(String, Option<String>)>,
}

impl Table {
    /// Why `app`'s listener (`None`: every app) has no eligible backend in
    /// `snapshot`, or `None` when it has one.
    fn gap(&self, app: Option<&str>, snapshot: &RoutingSnapshot) -> Option<Reason> {
        let now_state = |row: &Row| match row.state {
            RowState::Eligible => match snapshot.find(&row.id).map(|i| snapshot.backend(i)) {
                // Gone from this snapshot: a row the builder skipped.
                None => RowState::Invalid,
                // The row's flag, or this POP's health checks or circuit
                // breaker since the reload.
                Some(b) if !b.healthy => RowState::Unhealthy,
                Some(b) if !b.under_hard_limit(b.active()) => RowState::AtHardLimit,
                Some(_) => RowState::Eligible,
            },
            other => other,
        };
        let mut counts: BTreeMap<RowState, usize> = BTreeMap::new();
        for row in self.rows.iter().filter(|r| app.is_none_or(|a| a == r.app)) {
            *counts.entry(now_state(row)).or_default() += 1;
        }
        if counts.contains_key(&RowState::Eligible) {
            None
        } else if counts.is_empty() {
            Some(Reason::NoneRegistered)
        } else {
            Some(Reason::NoneEligible(counts))
        }
    }
}

/// The rows and listeners a [`Coverage`] checks, for another thread (the
/// traffic watch) to check one listener at the moment it reports.
#[derive(Debug, Clone)]
pub struct SharedCoverage(Arc<Mutex<Table>>);

impl SharedCoverage {
    /// Why `listener` has no eligible backend in `snapshot`, or `None` when
    /// it has one (or is not a listener any more).
    pub fn gap(&self, listener: &str, snapshot: &RoutingSnapshot) -> Option<Reason> {
        let table = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (_, app) = table.listeners.iter().find(|(name, _)| name == listener)?;
        table.gap(app.as_deref(), snapshot)
    }
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
    table: Arc<Mutex<Table>>,
    /// The gaps last warned about, listener → reason: a reload warns only
    /// about what changed (QA: in a cluster, every replicated change
    /// reloads, and the same WARN came 4-5 times in 100 ms).
    said: BTreeMap<String, String>,
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
        let mut rows = Vec::with_capacity(records.len());
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
            rows.push(Row {
                id: rec.id.clone(),
                app: rec.app.clone(),
                state,
            });
        }
        self.lock().rows = rows;
    }

    /// The listeners to check from now on.
    /// Every gap is said again at the next check (a SIGHUP shows the
    /// whole picture).
    pub fn set_listeners(&mut self, listeners: Vec<(String, Option<String>)>) {
        self.said.clear();
        self.lock().listeners = listeners;
    }

    /// The rows and listeners, as they will be from now on, for other
    /// threads.
    pub fn shared(&self) -> SharedCoverage {
        SharedCoverage(Arc::clone(&self.table))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The listeners without an eligible backend in `snapshot`: its health
    /// (checks, circuit breaker) and live connection counts (a backend at
    /// its hard limit is not eligible).
    pub fn check(&self, snapshot: &RoutingSnapshot) -> Vec<Gap> {
        let table = self.lock();
        table
            .listeners
            .iter()
            .filter_map(|(name, app)| {
                Some(Gap {
                    listener: name.clone(),
                    app: app.clone(),
                    reason: table.gap(app.as_deref(), snapshot)?,
                })
            })
            .collect()
    }

    /// [`check`](Coverage::check), and a WARN per gap; `when` says what
    /// prompted it ("start", "reload"). Only a gap that is new since the
    /// last check or [`set_listeners`](Coverage::set_listeners), or whose
    /// reason changed, is said; a gap that closed is said at INFO. Returns
    /// how many gaps there are.
    pub fn warn(&mut self, snapshot: &RoutingSnapshot, when: &str) -> usize {
        let gaps = self.check(snapshot);
        let mut said = BTreeMap::new();
        for gap in &gaps {
            let reason = gap.reason.to_string();
            if self.said.get(&gap.listener) != Some(&reason) {
                tracing::warn!(listener = %gap.listener, app = gap.app.as_deref().unwrap_or("*"),
                    reason = %gap.reason, checked_at = when,
                    "listener has no eligible backend: every connection to it is refused");
            }
            said.insert(gap.listener.clone(), reason);
        }
        let listeners: Vec<String> = self
            .lock()
            .listeners
            .iter()
            .map(|(n, _)| n.clone())
            .collect();
        for listener in self
            .said
            .keys()
            .filter(|l| !said.contains_key(*l) && listeners.contains(l))
        {
            tracing::info!(%listener, checked_at = when, "listener has an eligible backend again");
        }
        self.said = said;
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
        assert_eq!(c.shared().gap("all", &snap), Some(Reason::NoneRegistered));
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
        assert_eq!(c.shared().gap("front", &snap), None);
    }

    /// Each listener's reason is its own and of the snapshot it is checked
    /// against. With two listeners, the traffic watch read the reasons of
    /// the last reload's check: a listener whose backend had been at its
    /// hard limit then was said to be so when health checks had taken its
    /// backend out since, and one that had backends then was said to have
    /// had eligible ones whatever refused it.
    #[test]
    fn each_listener_gets_its_own_reason_as_of_the_snapshot_checked() {
        let records = [rec("w", "web"), rec("a", "api")];
        let (mut c, snap) = coverage(&records, &[], &[]);
        c.set_listeners(listeners(&[("front", Some("web")), ("back", Some("api"))]));
        let shared = c.shared();
        // At the reload: web's backend at its hard limit, api's fine.
        let busy = ActiveGuard::new(Arc::clone(&snap.backends[0].live));
        let gaps = c.check(&snap);
        assert_eq!(gaps.len(), 1);
        assert_eq!(gaps[0].listener, "front");
        assert_eq!(
            gaps[0].reason.to_string(),
            "its only backend is at the hard limit"
        );
        assert_eq!(shared.gap("back", &snap), None);
        drop(busy);
        // Then health checks take api's backend out (a republished snapshot,
        // no reload): each listener as it is now.
        let mut sick = records.clone();
        sick[1].healthy = false;
        let republished = SnapshotBuilder::new().build(&sick).snapshot;
        assert_eq!(shared.gap("front", &republished), None);
        assert_eq!(
            shared.gap("back", &republished).map(|r| r.to_string()),
            Some("its only backend is unhealthy".into())
        );
        assert_eq!(shared.gap("gone", &republished), None);
        // A row the snapshot no longer routes is named invalid.
        let without_web = SnapshotBuilder::new().build(&records[1..]).snapshot;
        assert_eq!(
            shared.gap("front", &without_web).map(|r| r.to_string()),
            Some(
                "its only backend is invalid (rows the proxy cannot route, see earlier warnings)"
                    .into()
            )
        );
    }
}
