//! The health checker's driver: one task on the control thread's Tokio
//! runtime. It runs the checks the [`Checker`] orders as tasks of its own
//! (`JoinSet`), feeds back their results and the shards' passive events,
//! and on transitions logs them, counts them, posts the webhook and asks
//! the routing reloader to publish a snapshot with the new overlay.
//!
//! Nothing here blocks a shard: shards only `try_send` events, and read the
//! snapshot and RTTs lock-free.
//!
//! [`Checker`]: super::Checker

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use engine::log_limit::LogLimit;
use engine::passive::PassiveEvents;
use engine::snapshot::SnapshotHandle;
use serde_json::json;
use tokio::task::JoinSet;

use super::config::Health;
use super::core::{Target, Transition};
use super::spec::{CheckOverride, CheckSettings};
use super::state::{Change, CheckOutcome};
use super::webhook::{self, Webhook};
use super::{probe, HealthLink};
use crate::reload_thread::SharedReloader;

/// Passive events handled per wake-up before checks get their turn.
const EVENT_BATCH: usize = 1024;
/// Checks that could not run on this host are logged at most this often.
const NOT_RUN_LOG_EVERY: Duration = Duration::from_secs(10);

/// Everything the driver needs.
pub struct Driver {
    pub link: HealthLink,
    pub snapshots: SnapshotHandle,
    pub reloader: SharedReloader,
    pub events: Option<PassiveEvents>,
    pub health: Health,
    /// This POP's name, in webhook events.
    pub pop: String,
}

impl Driver {
    /// Runs until the runtime stops.
    pub async fn run(self) {
        let Driver {
            link,
            snapshots,
            reloader,
            mut events,
            health,
            pop,
        } = self;
        let hook = health
            .webhook_url
            .as_deref()
            .and_then(|u| webhook::Target::parse(u).ok())
            .map(Webhook::start);
        let mut versions = link.subscribe();
        let mut app_settings: HashMap<Arc<str>, Arc<CheckSettings>> = HashMap::new();
        refresh_targets(&link, &snapshots, &health, &mut app_settings);
        let mut tasks: JoinSet<(Arc<str>, CheckOutcome)> = JoinSet::new();
        // Which backend each task checks, so a check that panicked still
        // comes back to the checker (as a failure) and frees its slot.
        let mut checking: HashMap<tokio::task::Id, Arc<str>> = HashMap::new();
        // Checks that could not run here: said at most every 10 s.
        let mut not_run = (LogLimit::new(NOT_RUN_LOG_EVERY), 0u64);
        loop {
            let now = Instant::now();
            let (transitions, deadline) = {
                let mut checker = link.checker();
                if checker.checks_not_run > not_run.1 {
                    not_run.1 = checker.checks_not_run;
                    if let (Some(left_out), Some((backend, reason))) =
                        (not_run.0.hit(now), &checker.last_not_run)
                    {
                        tracing::warn!(%backend, reason, not_run = checker.checks_not_run,
                            same_not_logged = left_out,
                            "health check could not run on this host (no local port, descriptor or memory): \
                             it counts for nothing, the backend's health stays as it was (logged at most every 10 s)");
                    }
                }
                checker.on_timers(now);
                checker.on_timers(now);
                while let Some(order) = checker.poll_check(now) {
                    let id = Arc::clone(&order.id);
                    let task = tasks.spawn(async move {
                        let outcome = probe::run(&order).await;
                        (order.id, outcome)
                    });
                    checking.insert(task.id(), id);
                }
                let transitions: Vec<Transition> =
                    std::iter::from_fn(|| checker.poll_transition()).collect();
                (transitions, checker.poll_timeout())
            };
            // Publish first, then tell: what the log and the webhook say is
            // in effect when they say it.
            if transitions.iter().any(|t| t.change.reroutes()) {
                let started = Instant::now();
                let version = reloader.lock_async().await.republish();
                tracing::debug!(
                    version,
                    took_us = started.elapsed().as_micros() as u64,
                    "routing snapshot republished with the health overlay"
                );
            }
            for t in &transitions {
                report(&link, t, hook.as_ref(), &pop);
            }
            // A far deadline when nothing is scheduled: wake-ups come from
            // results, events and new snapshots then.
            let deadline = deadline.unwrap_or_else(|| now + Duration::from_secs(3600));
            tokio::select! {
                Some(done) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                    let now = Instant::now();
                    let mut checker = link.checker();
                    let mut finish = |done: Result<(tokio::task::Id, (Arc<str>, CheckOutcome)), tokio::task::JoinError>| {
                        match done {
                            Ok((task, (id, outcome))) => {
                                checking.remove(&task);
                                checker.on_result(now, &id, outcome);
                            }
                            Err(e) => {
                                if let Some(id) = checking.remove(&e.id()) {
                                    tracing::error!(backend = %id, error = %e, "health check task failed");
                                    checker.on_result(now, &id, CheckOutcome {
                                        ok: false,
                                        rtt: None,
                                        error: Some(format!("check failed to run: {e}")),
                                        // Our fault, not the backend's.
                                        local: true,
                                    });
                                }
                            }
                        }
                    };
                    finish(done);
                    // Collect whatever else finished meanwhile in one go.
                    while let Some(done) = tasks.try_join_next_with_id() {
                        finish(done);
                    }
                }
                event = next_event(&mut events) => match event {
                    Some(first) => {
                        let now = Instant::now();
                        let mut checker = link.checker();
                        checker.on_passive(now, &first.backend, first.kind.is_failure(), first.opened);
                        let mut n = 1;
                        if let Some(rx) = &events {
                            while n < EVENT_BATCH {
                                let Ok(e) = rx.try_recv() else { break };
                                checker.on_passive(now, &e.backend, e.kind.is_failure(), e.opened);
                                n += 1;
                            }
                        }
                        link.count_passive(n as u64);
                    }
                    None => events = None,
                },
                _ = tokio::time::sleep_until(deadline.into()) => {}
                changed = versions.changed() => {
                    if changed.is_ok() {
                        refresh_targets(&link, &snapshots, &health, &mut app_settings);
                    }
                }
            }
        }
    }
}

async fn next_event(events: &mut Option<PassiveEvents>) -> Option<engine::passive::PassiveEvent> {
    match events {
        Some(rx) => rx.recv().await.ok(),
        None => std::future::pending().await,
    }
}

/// Rebuilds the checker's targets from the snapshot in use.
fn refresh_targets(
    link: &HealthLink,
    snapshots: &SnapshotHandle,
    health: &Health,
    app_settings: &mut HashMap<Arc<str>, Arc<CheckSettings>>,
) {
    let snap = snapshots.load_full();
    let backend_checks = link.backend_checks();
    let targets = snap
        .backends
        .iter()
        .map(|b| {
            let app = app_settings
                .entry(Arc::clone(&b.app))
                .or_insert_with(|| Arc::new(health.for_app(&b.app)));
            let settings = match backend_checks.get(&*b.id) {
                None => Arc::clone(app),
                Some(layer) => Arc::new(backend_layer(app, layer, &b.id)),
            };
            Target {
                id: Arc::clone(&b.id),
                app: Arc::clone(&b.app),
                addr: b.addr,
                settings,
                live: Arc::clone(&b.live),
            }
        })
        .collect();
    link.checker().set_targets(Instant::now(), targets);
}

/// A backend's own check settings over its app's. A registration that
/// carries a check asks for it, so `enabled` defaults to true there.
/// Settings that do not fit (an app layer made them invalid) fall back to
/// the app's, with a warning.
fn backend_layer(app: &CheckSettings, layer: &CheckOverride, id: &str) -> CheckSettings {
    let mut layer = layer.clone();
    layer.enabled.get_or_insert(true);
    app.layered(&layer, &format!("backend {id}'s health_check"))
        .unwrap_or_else(|e| {
            tracing::warn!(backend = %id, error = %e,
                "ignoring the backend's own health check settings");
            app.clone()
        })
}

/// Logs, counts and posts one transition.
fn report(link: &HealthLink, t: &Transition, hook: Option<&Webhook>, pop: &str) {
    link.count(t.change);
    let reason = t.reason.as_deref().unwrap_or("");
    match t.change {
        Change::Down => tracing::warn!(backend = %t.id, app = %t.app, reason,
            "health checks failed: backend out of rotation"),
        Change::Up if t.reason.is_some() => tracing::info!(backend = %t.id, app = %t.app, reason,
            "earlier health verdict no longer applies: backend back in rotation"),
        Change::Up => tracing::info!(backend = %t.id, app = %t.app,
            "health checks pass again: backend back in rotation"),
        Change::Ejected(span) => tracing::warn!(backend = %t.id, app = %t.app,
            ejected_ms = span.as_millis() as u64,
            "circuit open: backend ejected after consecutive connection failures"),
        Change::HalfOpen => tracing::info!(backend = %t.id, app = %t.app,
            "circuit half-open: probing the backend with a few connections"),
        Change::Closed => tracing::info!(backend = %t.id, app = %t.app,
            "circuit closed: probes succeeded, backend back in rotation"),
        Change::EjectionCapped => tracing::warn!(backend = %t.id, app = %t.app,
            "circuit would open, but the app is at its ejection cap: backend stays in rotation"),
    }
    if let Some(hook) = hook {
        let ejected_ms = match t.change {
            Change::Ejected(span) => Some(span.as_millis() as u64),
            _ => None,
        };
        hook.send(json!({
            "event": t.change.name(),
            "backend": &*t.id,
            "app": &*t.app,
            "pop": pop,
            "reason": t.reason,
            "ejected_ms": ejected_ms,
            "at_unix_ms": crate::routing::unix_ms(SystemTime::now()),
        }));
    }
}
