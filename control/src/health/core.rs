//! The health checker's core, without I/O: which backend to check next and
//! when, what each result and each passive event changes, and the overlay
//! the routing snapshot is built with.
//!
//! # Call order (the driver's loop)
//!
//! 1. [`Checker::set_targets`] whenever a new routing snapshot is published
//!    (backends come and go; their health is kept by id).
//! 2. [`Checker::poll_check`] until `None`: each [`CheckOrder`] is one check
//!    to run now. At most `max_concurrent` are in flight; each finished one
//!    comes back through [`Checker::on_result`].
//! 3. [`Checker::on_passive`] for each event the shards reported.
//! 4. [`Checker::on_timers`], then [`Checker::poll_transition`] until
//!    `None`: transitions that change routing (publish a snapshot once for
//!    all of them) or that are only reported (the ejection cap).
//! 5. Sleep until [`Checker::poll_timeout`], a result, an event or new
//!    targets, whichever comes first.
//!
//! Scheduling: a new backend's first check comes at a random point of its
//! first interval, and every later one `interval ± jitter` after the
//! previous one finished, so 10,000 backends make a steady trickle, never a
//! burst per interval. A passive failure asks for an immediate check (ahead
//! of the schedule, still within the concurrency bound).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::snapshot::{BackendLive, BackendRecord};

use super::spec::CheckSettings;
use super::state::{BackendHealth, Change, CheckOutcome, CircuitParams, CircuitState, Status};

/// One backend to watch.
#[derive(Debug, Clone)]
pub struct Target {
    pub id: Arc<str>,
    pub app: Arc<str>,
    pub addr: SocketAddr,
    pub settings: Arc<CheckSettings>,
    /// The backend's shared live state: the checker writes its RTT and
    /// whether shards should report successes.
    pub live: Arc<BackendLive>,
}

/// One check to run now.
#[derive(Debug, Clone)]
pub struct CheckOrder {
    pub id: Arc<str>,
    pub app: Arc<str>,
    pub addr: SocketAddr,
    pub settings: Arc<CheckSettings>,
}

/// A state change of one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub id: Arc<str>,
    pub app: Arc<str>,
    pub change: Change,
    /// The last check's error, when a check caused the change.
    pub reason: Option<String>,
}

/// How health weighs on one backend in the snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overlay {
    /// Out of rotation (down, or circuit open).
    Excluded,
    /// Circuit half-open: at most this many connections at once.
    Probing(u32),
}

/// Settings of the checker as a whole.
#[derive(Debug, Clone, Copy)]
pub struct CheckerParams {
    pub max_concurrent: usize,
    pub jitter_percent: u32,
    /// `None`: the circuit breaker is off.
    pub circuit: Option<CircuitParams>,
    pub max_ejection_percent: u32,
}

struct Entry {
    target: Target,
    health: BackendHealth,
    /// Bumped whenever the entry is rescheduled: stale heap items are skipped.
    generation: u64,
    in_flight: bool,
    /// An immediate check was asked for while one was in flight.
    again: bool,
    /// A passive failure came while a check was in flight: that check
    /// confirms it if it fails; if it passes (it may have started before
    /// the failure), the next one does.
    confirm_next: bool,
    urgent_queued: bool,
}

/// The checker's whole state.
pub struct Checker {
    params: CheckerParams,
    entries: HashMap<Arc<str>, Entry>,
    schedule: BinaryHeap<Reverse<(Instant, u64, Arc<str>)>>,
    urgent: VecDeque<Arc<str>>,
    timers: BinaryHeap<Reverse<(Instant, Arc<str>)>>,
    in_flight: usize,
    transitions: VecDeque<Transition>,
    rng: fastrand::Rng,
    /// Checks run so far, and how many failed.
    pub checks: u64,
    pub check_failures: u64,
    /// Checks that could not run on this host (see `CheckOutcome::local`),
    /// and the last one's backend and reason.
    pub checks_not_run: u64,
    pub last_not_run: Option<(Arc<str>, String)>,
}

impl Checker {
    pub fn new(params: CheckerParams, seed: u64) -> Self {
        Checker {
            params,
            entries: HashMap::new(),
            schedule: BinaryHeap::new(),
            urgent: VecDeque::new(),
            timers: BinaryHeap::new(),
            in_flight: 0,
            transitions: VecDeque::new(),
            rng: fastrand::Rng::with_seed(seed),
            checks: 0,
            check_failures: 0,
            checks_not_run: 0,
            last_not_run: None,
        }
    }

    pub fn params(&self) -> &CheckerParams {
        &self.params
    }

    /// Backends watched.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Checks running now.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Replaces the watched backends. Health carries over by id, unless the
    /// backend moved to another address (it starts over); a backend whose
    /// settings or address changed is rescheduled; gone backends are
    /// forgotten.
    pub fn set_targets(&mut self, now: Instant, targets: Vec<Target>) {
        let mut old = std::mem::take(&mut self.entries);
        for target in targets {
            let id = Arc::clone(&target.id);
            let entry = match old.remove(&id) {
                Some(mut e) => {
                    let moved = e.target.addr != target.addr;
                    let resched = moved || e.target.settings != target.settings;
                    if moved {
                        // Another address is another host (a replacement
                        // instance): what was measured of the old one says
                        // nothing of it.
                        let was_excluded = e.health.excluded();
                        e.health = BackendHealth::default();
                        target.live.set_rtt_us(0);
                        if was_excluded {
                            self.transitions.push_back(Transition {
                                id: Arc::clone(&id),
                                app: Arc::clone(&target.app),
                                change: Change::Up,
                                reason: Some(format!(
                                    "moved from {} to {}: health starts over",
                                    e.target.addr, target.addr
                                )),
                            });
                        }
                    }
                    // The live state may be a new Arc after a rebuild: keep
                    // writing to the one shards read now.
                    if let Some(rtt) = e.health.rtt_ewma {
                        target.live.set_rtt_us(micros(rtt));
                    }
                    target.live.set_watch_successes(e.health.wants_successes());
                    e.target = target;
                    // Checks turned off: nothing will check the backend
                    // again, so their verdict must not keep it out.
                    if !moved && !e.target.settings.enabled && e.health.forget_checks() {
                        self.transitions.push_back(Transition {
                            id: Arc::clone(&id),
                            app: Arc::clone(&e.target.app),
                            change: Change::Up,
                            reason: Some("health checks turned off".into()),
                        });
                    }
                    if resched && !e.in_flight {
                        e.generation += 1;
                        self.schedule_first(now, &id, &e);
                    }
                    e
                }
                None => {
                    let e = Entry {
                        target,
                        health: BackendHealth::default(),
                        generation: 0,
                        in_flight: false,
                        again: false,
                        confirm_next: false,
                        urgent_queued: false,
                    };
                    self.schedule_first(now, &id, &e);
                    e
                }
            };
            self.entries.insert(id, entry);
        }
        // Checks in flight for forgotten backends still come back; they
        // must not count against the bound forever.
        for (_, gone) in old {
            if gone.in_flight {
                self.in_flight -= 1;
            }
        }
    }

    fn schedule_first(&mut self, now: Instant, id: &Arc<str>, e: &Entry) {
        if !e.target.settings.enabled {
            return;
        }
        let interval = e.target.settings.interval;
        let offset = interval.mul_f64(self.rng.f64());
        self.schedule
            .push(Reverse((now + offset, e.generation, Arc::clone(id))));
    }

    fn schedule_next(&mut self, now: Instant, id: &Arc<str>) {
        let Some(e) = self.entries.get_mut(id) else {
            return;
        };
        if !e.target.settings.enabled {
            return;
        }
        e.generation += 1;
        let interval = e.target.settings.interval;
        let j = f64::from(self.params.jitter_percent) / 100.0;
        let factor = 1.0 + j * (2.0 * self.rng.f64() - 1.0);
        self.schedule.push(Reverse((
            now + interval.mul_f64(factor),
            e.generation,
            Arc::clone(id),
        )));
    }

    /// The next check to run now, if one is due and the bound allows.
    pub fn poll_check(&mut self, now: Instant) -> Option<CheckOrder> {
        if self.in_flight >= self.params.max_concurrent {
            return None;
        }
        while let Some(id) = self.urgent.pop_front() {
            if let Some(e) = self.entries.get_mut(&id) {
                e.urgent_queued = false;
                if !e.in_flight {
                    return Some(self.start(&id));
                }
            }
        }
        while let Some(Reverse((due, generation, _))) = self.schedule.peek() {
            if *due > now {
                return None;
            }
            let generation = *generation;
            let Reverse((_, _, id)) = self.schedule.pop()?;
            match self.entries.get(&id) {
                Some(e) if e.generation == generation && !e.in_flight => {
                    return Some(self.start(&id));
                }
                _ => continue,
            }
        }
        None
    }

    fn start(&mut self, id: &Arc<str>) -> CheckOrder {
        self.in_flight += 1;
        let e = self
            .entries
            .get_mut(id)
            .expect("started an entry that exists");
        e.in_flight = true;
        e.generation += 1;
        CheckOrder {
            id: Arc::clone(id),
            app: Arc::clone(&e.target.app),
            addr: e.target.addr,
            settings: Arc::clone(&e.target.settings),
        }
    }

    /// A check of `id` finished at `now`.
    pub fn on_result(&mut self, now: Instant, id: &Arc<str>, outcome: CheckOutcome) {
        let Some(e) = self.entries.get_mut(id) else {
            return; // forgotten meanwhile (set_targets released its slot)
        };
        if !e.in_flight {
            return;
        }
        e.in_flight = false;
        self.in_flight -= 1;
        if outcome.local {
            // Out of local ports, descriptors or memory here: nothing is
            // known of the backend, whose health stays as it was (a
            // confirmation asked for waits for the next check, on its
            // schedule: asking again at once would spin while short).
            e.again = false;
            self.checks_not_run += 1;
            self.last_not_run = Some((Arc::clone(id), outcome.error.unwrap_or_default()));
            self.schedule_next(now, id);
            return;
        }
        self.checks += 1;
        if !outcome.ok {
            self.check_failures += 1;
        }
        if !e.target.settings.enabled {
            // Turned off while it ran: its verdict no longer applies.
            e.again = false;
            e.confirm_next = false;
            return;
        }
        if !outcome.ok && std::mem::take(&mut e.confirm_next) {
            e.health.expect_confirmation();
        }
        let reason = outcome.error.clone();
        let s = &e.target.settings;
        let change = e
            .health
            .on_check(now, outcome, s.healthy_threshold, s.unhealthy_threshold);
        if let Some(rtt) = e.health.rtt_ewma {
            e.target.live.set_rtt_us(micros(rtt));
        }
        let again = std::mem::take(&mut e.again);
        if std::mem::take(&mut e.confirm_next) && again && e.health.status == Status::Up {
            e.health.expect_confirmation();
        }
        if let Some(change) = change {
            self.transitions.push_back(Transition {
                id: Arc::clone(id),
                app: Arc::clone(&e.target.app),
                change,
                reason,
            });
        }
        self.schedule_next(now, id);
        if again {
            self.request_now(id);
        }
    }

    /// Asks for a check of `id` ahead of its schedule.
    pub fn request_now(&mut self, id: &Arc<str>) {
        let Some(e) = self.entries.get_mut(id) else {
            return;
        };
        if !e.target.settings.enabled {
            return;
        }
        if e.in_flight {
            e.again = true;
        } else if !e.urgent_queued {
            e.urgent_queued = true;
            self.urgent.push_back(Arc::clone(id));
        }
    }

    /// A shard saw `failure` (or a success) on `id` at `now`, on a
    /// connection opened at `opened`. While the circuit is half-open only
    /// connections opened since decide it (see
    /// [`BackendHealth::predates_probing`]).
    pub fn on_passive(&mut self, now: Instant, id: &str, failure: bool, opened: Instant) {
        let Some(e) = self.entries.get(id) else {
            return;
        };
        if e.health.predates_probing(opened) {
            return;
        }
        let id = Arc::clone(&e.target.id);
        let app = Arc::clone(&e.target.app);
        let may_eject = !failure || self.may_eject(&app);
        let circuit = self.params.circuit;
        let e = self.entries.get_mut(&id).expect("looked up above");
        let change = e
            .health
            .on_passive(now, failure, circuit.as_ref(), may_eject);
        e.target
            .live
            .set_watch_successes(e.health.wants_successes());
        let check = failure && e.target.settings.enabled && e.health.status == Status::Up;
        if check {
            if e.in_flight {
                e.confirm_next = true;
            } else {
                e.health.expect_confirmation();
            }
        }
        if let Some(change) = change {
            if let Some(until) = e.health.next_timer() {
                self.timers.push(Reverse((until, Arc::clone(&id))));
            }
            self.transitions.push_back(Transition {
                id: Arc::clone(&id),
                app,
                change,
                reason: None,
            });
        }
        if check {
            self.request_now(&id);
        }
    }

    /// Whether `app` may have one more backend ejected: fewer than
    /// `max_ejection_percent` of its backends are (at least one always may).
    fn may_eject(&self, app: &Arc<str>) -> bool {
        let (mut total, mut ejected) = (0u64, 0u64);
        for e in self.entries.values().filter(|e| e.target.app == *app) {
            total += 1;
            if e.health.circuit != CircuitState::Closed {
                ejected += 1;
            }
        }
        let allowed = (total * u64::from(self.params.max_ejection_percent) / 100).max(1);
        ejected < allowed
    }

    /// Ends ejections whose time is up.
    pub fn on_timers(&mut self, now: Instant) {
        while let Some(Reverse((at, _))) = self.timers.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((_, id))) = self.timers.pop() else {
                break;
            };
            if let Some(e) = self.entries.get_mut(&id) {
                if let Some(change) = e.health.on_timer(now) {
                    e.target
                        .live
                        .set_watch_successes(e.health.wants_successes());
                    self.transitions.push_back(Transition {
                        id: Arc::clone(&id),
                        app: Arc::clone(&e.target.app),
                        change,
                        reason: None,
                    });
                }
            }
        }
    }

    #[must_use]
    pub fn poll_transition(&mut self) -> Option<Transition> {
        self.transitions.pop_front()
    }

    /// When the checker next has something to do by itself.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let room = self.in_flight < self.params.max_concurrent;
        let check = if !room {
            None
        } else if !self.urgent.is_empty() {
            Some(Instant::now())
        } else {
            self.schedule.peek().map(|Reverse((t, _, _))| *t)
        };
        let timer = self.timers.peek().map(|Reverse((t, _))| *t);
        match (check, timer) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// How health weighs on `id` in the next snapshot, if at all.
    pub fn overlay(&self, id: &str, success_threshold: u32) -> Option<Overlay> {
        let e = self.entries.get(id)?;
        if e.health.excluded() {
            Some(Overlay::Excluded)
        } else if e.health.circuit == CircuitState::HalfOpen {
            Some(Overlay::Probing(success_threshold.max(1)))
        } else {
            None
        }
    }

    /// Applies [`Checker::overlay`] to records about to become a snapshot:
    /// excluded backends are routed unhealthy, probing ones get a hard limit
    /// of the probe count. Nothing is written to the store: health is this
    /// POP's own view and never replicates.
    pub fn apply(&self, records: &mut [BackendRecord]) {
        let probes = self.params.circuit.map_or(1, |c| c.success_threshold);
        for rec in records.iter_mut().filter(|r| !r.deleted) {
            match self.overlay(&rec.id, probes) {
                Some(Overlay::Excluded) => rec.healthy = false,
                Some(Overlay::Probing(n)) => {
                    let n = i64::from(n);
                    rec.hard_limit = if rec.hard_limit == 0 {
                        n
                    } else {
                        rec.hard_limit.min(n)
                    };
                }
                None => {}
            }
        }
    }

    /// The health of `id`, for the API.
    pub fn health(&self, id: &str) -> Option<(&BackendHealth, &CheckSettings)> {
        self.entries
            .get(id)
            .map(|e| (&e.health, &*e.target.settings))
    }

    /// Every watched backend's health, for metrics.
    pub fn iter(&self) -> impl Iterator<Item = (&Target, &BackendHealth)> {
        self.entries.values().map(|e| (&e.target, &e.health))
    }
}

fn micros(d: Duration) -> u32 {
    d.as_micros().clamp(1, u128::from(u32::MAX)) as u32
}

#[cfg(test)]
mod tests;
