//! Backend health: active checks, passive events and the circuit breaker.
//!
//! Health is this POP's own view of its backends (each POP checks from its
//! own vantage point), so none of it is written to `routing.db`, whose
//! `healthy` column is the operator's flag and replicates between POPs. The
//! state lives in memory, in the [`Checker`] behind a [`HealthLink`], and
//! weighs on routing as an overlay applied whenever a snapshot is built (the
//! way drained and expired backends are marked unhealthy): an excluded
//! backend is routed unhealthy, a half-open one gets a hard limit of its
//! probe count. A new snapshot is published only on a transition (rise,
//! fall, ejection, half-open, close), never per check; the RTT average goes
//! straight into the backend's shared live state, which scoring reads.
//!
//! Layout (sans-IO core, thin driver):
//! - [`spec`]: what a check is, and its three layers of settings;
//! - [`config`]: the `[health]` and `[circuit_breaker]` sections;
//! - [`state`]: one backend's rise/fall, RTT and circuit state machine;
//! - [`core`]: the checker: scheduling with jitter and a concurrency bound,
//!   immediate checks after passive failures, the ejection cap, the overlay;
//! - [`probe`]: the checks (tcp, http, https, grpc, script);
//! - [`driver`]: the task on the control runtime that runs the checks and
//!   feeds the core;
//! - [`webhook`]: the optional POST on each transition;
//! - [`view`]: what the API and metrics show.
//!
//! Data flows one way: routing store → snapshot → [`driver`] (targets);
//! shards → passive channel → [`driver`]; [`core`] → overlay → snapshot.

pub mod config;
pub mod core;
pub mod driver;
pub mod probe;
pub mod spec;
pub mod state;
pub mod view;
pub mod webhook;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use std::collections::{HashMap, HashSet};

use engine::snapshot::BackendRecord;

use self::spec::CheckOverride;

pub use self::core::{Checker, CheckerParams};
use self::state::{Change, CircuitParams};

/// Transition kinds counted in metrics, in [`Change::name`] order.
pub const CHANGES: [&str; 6] = [
    "down",
    "up",
    "circuit_open",
    "circuit_half_open",
    "circuit_closed",
    "ejection_capped",
];

/// What the routing reloader, the driver, the API and metrics share.
#[derive(Clone)]
pub struct HealthLink(Arc<Inner>);

struct Inner {
    checker: Mutex<Checker>,
    /// The version of each routing snapshot published: the driver re-reads
    /// its targets when it changes.
    published: tokio::sync::watch::Sender<u64>,
    transitions: [AtomicU64; 6],
    passive_events: AtomicU64,
    active_checks_enabled: bool,
    circuit_enabled: bool,
    /// Backends' own check settings from the registration API, by id.
    backend_checks: Mutex<Arc<HashMap<String, CheckOverride>>>,
    /// `[health] allow_backend_commands`.
    backend_commands: bool,
    /// Backends whose stored check names a command that is not run, as
    /// last said (each is warned about once while it lasts).
    refused_commands: Mutex<HashSet<String>>,
}

impl HealthLink {
    pub fn new(health: &config::Health, circuit: &config::Circuit) -> HealthLink {
        let params = CheckerParams {
            max_concurrent: health.max_concurrent as usize,
            jitter_percent: health.jitter_percent,
            circuit: circuit.enabled.then_some(CircuitParams {
                failure_threshold: circuit.failure_threshold,
                success_threshold: circuit.success_threshold,
                timeout: circuit.timeout,
                max_timeout: circuit.max_timeout,
            }),
            max_ejection_percent: circuit.max_ejection_percent,
        };
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        HealthLink(Arc::new(Inner {
            checker: Mutex::new(Checker::new(params, seed)),
            published: tokio::sync::watch::Sender::new(0),
            transitions: Default::default(),
            passive_events: AtomicU64::new(0),
            active_checks_enabled: health.any_enabled(),
            circuit_enabled: circuit.enabled,
            backend_checks: Mutex::default(),
            backend_commands: health.allow_backend_commands,
            refused_commands: Mutex::default(),
        }))
    }

    /// The checker. Never held across an await, nor while taking the
    /// routing reloader's lock (the reloader takes this one inside its own).
    pub fn checker(&self) -> MutexGuard<'_, Checker> {
        self.0
            .checker
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Applies the health overlay to records about to become a snapshot.
    pub fn apply(&self, records: &mut [BackendRecord]) {
        self.checker().apply(records);
    }

    /// Records the backends' own check settings as read from the store
    /// (`checks[i]` belongs to `records[i]`). Settings that do not parse
    /// (written by hand) are logged and ignored: the app's apply.
    ///
    /// A check that names a `command` is ignored the same way unless
    /// `[health] allow_backend_commands` is on: the row may come from the
    /// registration API of any POP, through replication.
    pub fn set_backend_checks(&self, records: &[BackendRecord], checks: &[Option<String>]) {
        let mut map = HashMap::new();
        let mut refused = HashSet::new();
        let mut said = self
            .0
            .refused_commands
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for (rec, check) in records.iter().zip(checks) {
            let Some(text) = check.as_deref().filter(|_| !rec.deleted) else {
                continue;
            };
            match serde_json::from_str::<CheckOverride>(text) {
                Ok(layer) if layer.command.is_some() && !self.0.backend_commands => {
                    if !said.contains(&rec.id) {
                        tracing::warn!(backend = %rec.id,
                            "ignoring the backend's own health_check: it names a command, and [health] allow_backend_commands is off; its app's check applies");
                    }
                    refused.insert(rec.id.clone());
                }
                Ok(layer) => {
                    map.insert(rec.id.clone(), layer);
                }
                Err(e) => tracing::warn!(backend = %rec.id, error = %e,
                    "ignoring the backend's stored health_check settings"),
            }
        }
        *said = refused;
        drop(said);
        *self
            .0
            .backend_checks
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Arc::new(map);
    }

    /// The backends' own check settings, by id.
    pub fn backend_checks(&self) -> Arc<HashMap<String, CheckOverride>> {
        Arc::clone(
            &self
                .0
                .backend_checks
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        )
    }

    /// A snapshot with `version` was published.
    pub fn published(&self, version: u64) {
        self.0.published.send_replace(version);
    }

    pub(crate) fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.published.subscribe()
    }

    pub(crate) fn count(&self, change: Change) {
        if let Some(i) = CHANGES.iter().position(|n| *n == change.name()) {
            self.0.transitions[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn count_passive(&self, n: u64) {
        self.0.passive_events.fetch_add(n, Ordering::Relaxed);
    }

    /// Transitions so far, by [`CHANGES`] name.
    pub fn transitions(&self) -> [u64; 6] {
        std::array::from_fn(|i| self.0.transitions[i].load(Ordering::Relaxed))
    }

    /// Passive events the checker received.
    pub fn passive_events(&self) -> u64 {
        self.0.passive_events.load(Ordering::Relaxed)
    }

    /// Checks are on globally or for some app (a backend's own settings may
    /// turn them on for it besides).
    pub fn active_checks_enabled(&self) -> bool {
        self.0.active_checks_enabled
    }

    pub fn circuit_enabled(&self) -> bool {
        self.0.circuit_enabled
    }

    /// `[health] allow_backend_commands`: a backend's own check may name a
    /// command to run.
    pub fn allows_backend_commands(&self) -> bool {
        self.0.backend_commands
    }
}
