//! One backend's health, as a state machine without I/O: the active checks'
//! rise/fall counters and RTT average, and the passive circuit breaker.
//! Time is passed in; every change of routing is returned as a
//! [`Change`], so the caller publishes a snapshot only when one happens.
//!
//! Active: a backend starts up (a restart must not take the fleet out while
//! the first checks run). `unhealthy_threshold` consecutive failed checks
//! take it down; `healthy_threshold` consecutive successes bring it back. A
//! failed check that confirms a passive failure (a client's connect just
//! failed too) takes it down at once: two observers agree, and the goal is
//! out of rotation within one check timeout.
//!
//! Circuit breaker (passive): `failure_threshold` consecutive failures
//! reported by the shards open it (eject) for `timeout × ejections` (capped
//! at `max_timeout`); then it is half-open, and a few connections probe the
//! backend (the snapshot caps it at `success_threshold` open connections).
//! `success_threshold` successes close it; one failure opens it again, for
//! longer. The ejection count is forgotten after `max_timeout` closed
//! without a failure. Whether an app may lose one more backend (the
//! ejection cap) is the caller's decision, passed in as `may_eject`.

use std::time::{Duration, Instant};

/// Weight of a new RTT sample in the moving average.
pub const RTT_ALPHA: f64 = 0.3;

/// The active checks' verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Up,
    Down,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Up => "up",
            Status::Down => "down",
        }
    }
}

/// The circuit breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed,
    /// Ejected until the instant given.
    Open {
        until: Instant,
    },
    HalfOpen,
}

impl CircuitState {
    pub fn name(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open { .. } => "open",
            CircuitState::HalfOpen => "half_open",
        }
    }
}

/// A change that alters routing (and is logged, counted and sent to the
/// webhook).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Active checks took the backend out.
    Down,
    /// Active checks brought it back.
    Up,
    /// The circuit opened: ejected for the duration given.
    Ejected(Duration),
    /// The ejection ended: a few connections probe the backend.
    HalfOpen,
    /// Probes succeeded: back in full rotation.
    Closed,
    /// The app is at its ejection cap: the backend stays in rotation.
    EjectionCapped,
}

impl Change {
    pub fn name(self) -> &'static str {
        match self {
            Change::Down => "down",
            Change::Up => "up",
            Change::Ejected(_) => "circuit_open",
            Change::HalfOpen => "circuit_half_open",
            Change::Closed => "circuit_closed",
            Change::EjectionCapped => "ejection_capped",
        }
    }

    /// Whether the routing snapshot must be rebuilt.
    pub fn reroutes(self) -> bool {
        !matches!(self, Change::EjectionCapped)
    }
}

/// Thresholds of the circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitParams {
    pub failure_threshold: u32,
    pub success_threshold: u32,
    pub timeout: Duration,
    pub max_timeout: Duration,
}

/// The outcome of one active check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckOutcome {
    pub ok: bool,
    /// Time to the answer, for a success whose time is known: none when
    /// this process did not run while the check waited (see
    /// `probe::run`), which says nothing of the backend's time.
    pub rtt: Option<Duration>,
    /// Why it failed, for the API and the logs.
    pub error: Option<String>,
    /// It could not run on this host (no local port, descriptor or memory
    /// for it): says nothing of the backend.
    pub local: bool,
}

/// Everything known about one backend's health.
#[derive(Debug, Clone)]
pub struct BackendHealth {
    pub status: Status,
    pub consecutive_successes: u32,
    pub consecutive_failures: u32,
    pub rtt_ewma: Option<Duration>,
    pub last_check: Option<(Instant, CheckOutcome)>,
    pub circuit: CircuitState,
    /// Consecutive passive failures while closed; successes while half-open.
    pub passive_failures: u32,
    pub probe_successes: u32,
    pub ejections: u32,
    closed_since: Option<Instant>,
    /// When the circuit last went half-open: connections opened before it
    /// (during or before the ejection) do not decide it.
    half_open_since: Option<Instant>,
    /// A passive failure waits for its confirming check.
    confirm_pending: bool,
    /// The cap already stopped this backend's ejection (logged once).
    capped: bool,
}

impl Default for BackendHealth {
    fn default() -> Self {
        BackendHealth {
            status: Status::Up,
            consecutive_successes: 0,
            consecutive_failures: 0,
            rtt_ewma: None,
            last_check: None,
            circuit: CircuitState::Closed,
            passive_failures: 0,
            probe_successes: 0,
            ejections: 0,
            closed_since: None,
            half_open_since: None,
            confirm_pending: false,
            capped: false,
        }
    }
}

impl BackendHealth {
    /// Out of rotation: down by checks, or ejected.
    pub fn excluded(&self) -> bool {
        self.status == Status::Down || matches!(self.circuit, CircuitState::Open { .. })
    }

    /// Whether shards should report successful connects.
    pub fn wants_successes(&self) -> bool {
        self.passive_failures > 0 || self.circuit == CircuitState::HalfOpen
    }

    /// Whether a passive event about a connection opened at `opened` is to
    /// be ignored: the circuit is half-open and the connection is older than
    /// that. Opened before the ejection (a long download, a websocket), it
    /// says nothing of the probes: QA found one such connection, ending
    /// while half-open, closing a circuit no probe had tried.
    pub fn predates_probing(&self, opened: Instant) -> bool {
        self.circuit == CircuitState::HalfOpen && self.half_open_since.is_some_and(|t| opened < t)
    }

    /// Records an active check's outcome at `now`.
    pub fn on_check(
        &mut self,
        now: Instant,
        outcome: CheckOutcome,
        rise: u32,
        fall: u32,
    ) -> Option<Change> {
        let confirming = std::mem::take(&mut self.confirm_pending);
        let ok = outcome.ok;
        if ok {
            if let Some(rtt) = outcome.rtt {
                let sample = rtt.as_secs_f64();
                let avg = match self.rtt_ewma {
                    None => sample,
                    Some(prev) => prev.as_secs_f64() * (1.0 - RTT_ALPHA) + sample * RTT_ALPHA,
                };
                self.rtt_ewma = Some(Duration::from_secs_f64(avg));
            }
            self.consecutive_successes = self.consecutive_successes.saturating_add(1);
            self.consecutive_failures = 0;
        } else {
            self.consecutive_failures = self.consecutive_failures.saturating_add(1);
            self.consecutive_successes = 0;
        }
        self.last_check = Some((now, outcome));
        match self.status {
            Status::Down if ok && self.consecutive_successes >= rise => {
                self.status = Status::Up;
                Some(Change::Up)
            }
            Status::Up if !ok && (self.consecutive_failures >= fall || confirming) => {
                self.status = Status::Down;
                Some(Change::Down)
            }
            _ => None,
        }
    }

    /// Forgets what the active checks said, once they are turned off: the
    /// backend is up as far as they are concerned, and no last check is
    /// shown (the RTT average stays, as the last one measured). True when
    /// that brings it back up.
    pub fn forget_checks(&mut self) -> bool {
        let was_down = self.status == Status::Down;
        self.status = Status::Up;
        self.consecutive_failures = 0;
        self.consecutive_successes = 0;
        self.confirm_pending = false;
        self.last_check = None;
        was_down
    }

    /// Marks that the next check confirms a passive failure.
    pub fn expect_confirmation(&mut self) {
        self.confirm_pending = true;
    }

    /// Records a passive event at `now`. `circuit` is `None` when the
    /// breaker is off; `may_eject` says whether the app is below its
    /// ejection cap.
    pub fn on_passive(
        &mut self,
        now: Instant,
        failure: bool,
        circuit: Option<&CircuitParams>,
        may_eject: bool,
    ) -> Option<Change> {
        let p = circuit?;
        match self.circuit {
            CircuitState::Closed => {
                if !failure {
                    self.passive_failures = 0;
                    self.capped = false;
                    return None;
                }
                if self
                    .closed_since
                    .is_some_and(|t| now.saturating_duration_since(t) >= p.max_timeout)
                {
                    self.ejections = 0;
                }
                self.passive_failures = self.passive_failures.saturating_add(1);
                if self.passive_failures < p.failure_threshold {
                    return None;
                }
                if !may_eject {
                    if self.capped {
                        return None;
                    }
                    self.capped = true;
                    return Some(Change::EjectionCapped);
                }
                Some(self.open(now, p))
            }
            CircuitState::HalfOpen => {
                if failure {
                    // Probing failed: out again, for longer. The cap counted
                    // this backend as ejected already when it opened first.
                    return Some(self.open(now, p));
                }
                self.probe_successes += 1;
                if self.probe_successes >= p.success_threshold {
                    self.circuit = CircuitState::Closed;
                    self.closed_since = Some(now);
                    self.passive_failures = 0;
                    self.probe_successes = 0;
                    return Some(Change::Closed);
                }
                None
            }
            // Connections picked before the ejection was published.
            CircuitState::Open { .. } => None,
        }
    }

    fn open(&mut self, now: Instant, p: &CircuitParams) -> Change {
        self.ejections = self.ejections.saturating_add(1);
        let span = p.timeout.saturating_mul(self.ejections).min(p.max_timeout);
        self.circuit = CircuitState::Open { until: now + span };
        self.passive_failures = 0;
        self.probe_successes = 0;
        self.capped = false;
        Change::Ejected(span)
    }

    /// Moves an open circuit whose time is up to half-open.
    pub fn on_timer(&mut self, now: Instant) -> Option<Change> {
        match self.circuit {
            CircuitState::Open { until } if now >= until => {
                self.circuit = CircuitState::HalfOpen;
                self.half_open_since = Some(now);
                self.probe_successes = 0;
                Some(Change::HalfOpen)
            }
            _ => None,
        }
    }

    /// When [`on_timer`] has something to do.
    ///
    /// [`on_timer`]: BackendHealth::on_timer
    pub fn next_timer(&self) -> Option<Instant> {
        match self.circuit {
            CircuitState::Open { until } => Some(until),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(ms: u64) -> CheckOutcome {
        CheckOutcome {
            ok: true,
            rtt: Some(Duration::from_millis(ms)),
            error: None,
            local: false,
        }
    }

    fn fail() -> CheckOutcome {
        CheckOutcome {
            ok: false,
            rtt: None,
            error: Some("refused".into()),
            local: false,
        }
    }

    const P: CircuitParams = CircuitParams {
        failure_threshold: 3,
        success_threshold: 2,
        timeout: Duration::from_secs(10),
        max_timeout: Duration::from_secs(25),
    };

    #[test]
    fn falls_after_the_threshold_and_rises_after_its_own() {
        let t = Instant::now();
        let mut h = BackendHealth::default();
        assert_eq!(h.on_check(t, fail(), 2, 3), None);
        assert_eq!(h.on_check(t, fail(), 2, 3), None);
        assert_eq!(h.on_check(t, fail(), 2, 3), Some(Change::Down));
        assert!(h.excluded());
        assert_eq!(h.on_check(t, fail(), 2, 3), None, "one transition only");
        assert_eq!(h.on_check(t, ok(1), 2, 3), None);
        assert_eq!(h.on_check(t, ok(1), 2, 3), Some(Change::Up));
        assert!(!h.excluded());
    }

    #[test]
    fn a_flapping_backend_never_transitions() {
        let t = Instant::now();
        let mut h = BackendHealth::default();
        for i in 0..100 {
            let outcome = if i % 2 == 0 { fail() } else { ok(1) };
            assert_eq!(h.on_check(t, outcome, 2, 3), None);
        }
        // Two failures then a success: still no fall with threshold 3.
        for _ in 0..10 {
            h.on_check(t, fail(), 2, 3);
            h.on_check(t, fail(), 2, 3);
            assert_eq!(h.on_check(t, ok(1), 2, 3), None);
        }
        assert_eq!(h.status, Status::Up);
    }

    #[test]
    fn a_confirmed_passive_failure_takes_the_backend_down_at_once() {
        let t = Instant::now();
        let mut h = BackendHealth::default();
        h.expect_confirmation();
        assert_eq!(h.on_check(t, fail(), 2, 3), Some(Change::Down));
        // A check that succeeds clears the pending confirmation.
        let mut h = BackendHealth::default();
        h.expect_confirmation();
        assert_eq!(h.on_check(t, ok(1), 2, 3), None);
        assert_eq!(h.on_check(t, fail(), 2, 3), None);
    }

    #[test]
    fn rtt_is_a_moving_average_of_successes() {
        let t = Instant::now();
        let mut h = BackendHealth::default();
        h.on_check(t, ok(10), 2, 3);
        assert_eq!(h.rtt_ewma, Some(Duration::from_millis(10)));
        h.on_check(t, ok(20), 2, 3);
        let ms = h.rtt_ewma.unwrap().as_secs_f64() * 1000.0;
        assert!((ms - 13.0).abs() < 1e-6, "{ms}");
        h.on_check(t, fail(), 2, 3);
        let after = h.rtt_ewma.unwrap().as_secs_f64() * 1000.0;
        assert!((after - 13.0).abs() < 1e-6);
        // A success whose time is unknown (the process did not run while
        // it waited) counts as a success and leaves the average alone.
        let unknown = CheckOutcome { rtt: None, ..ok(0) };
        h.on_check(t, unknown.clone(), 1, 3);
        assert_eq!(h.on_check(t, unknown, 1, 3), None);
        assert_eq!(h.consecutive_successes, 2);
        let same = h.rtt_ewma.unwrap().as_secs_f64() * 1000.0;
        assert!((same - 13.0).abs() < 1e-6, "{same}");
    }

    #[test]
    fn circuit_opens_half_opens_closes_and_backs_off() {
        let t0 = Instant::now();
        let mut h = BackendHealth::default();
        let fail_at = |h: &mut BackendHealth, t| h.on_passive(t, true, Some(&P), true);
        assert_eq!(fail_at(&mut h, t0), None);
        assert!(h.wants_successes());
        assert_eq!(fail_at(&mut h, t0), None);
        assert_eq!(
            fail_at(&mut h, t0),
            Some(Change::Ejected(Duration::from_secs(10)))
        );
        assert!(h.excluded());
        assert_eq!(h.next_timer(), Some(t0 + Duration::from_secs(10)));
        assert_eq!(h.on_timer(t0 + Duration::from_secs(9)), None);
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(h.on_timer(t1), Some(Change::HalfOpen));
        assert!(!h.excluded() && h.wants_successes());
        // A failed probe: open again, twice as long.
        assert_eq!(
            fail_at(&mut h, t1),
            Some(Change::Ejected(Duration::from_secs(20)))
        );
        let t2 = t1 + Duration::from_secs(20);
        assert_eq!(h.on_timer(t2), Some(Change::HalfOpen));
        assert_eq!(h.on_passive(t2, false, Some(&P), true), None);
        assert_eq!(
            h.on_passive(t2, false, Some(&P), true),
            Some(Change::Closed)
        );
        assert!(!h.wants_successes());
        // A third ejection is capped at max_timeout.
        for _ in 0..2 {
            fail_at(&mut h, t2);
        }
        assert_eq!(
            fail_at(&mut h, t2),
            Some(Change::Ejected(Duration::from_secs(25)))
        );
    }

    #[test]
    fn a_success_resets_the_failure_count_and_backoff_is_forgotten() {
        let t0 = Instant::now();
        let mut h = BackendHealth::default();
        for _ in 0..2 {
            h.on_passive(t0, true, Some(&P), true);
        }
        h.on_passive(t0, false, Some(&P), true);
        assert_eq!(h.on_passive(t0, true, Some(&P), true), None);
        assert_eq!(h.passive_failures, 1);
        // Eject once, recover, stay closed past max_timeout: next ejection is
        // back to the base timeout.
        for _ in 0..2 {
            h.on_passive(t0, true, Some(&P), true);
        }
        let t1 = t0 + Duration::from_secs(10);
        h.on_timer(t1);
        h.on_passive(t1, false, Some(&P), true);
        h.on_passive(t1, false, Some(&P), true);
        assert_eq!(h.circuit, CircuitState::Closed);
        let late = t1 + Duration::from_secs(26);
        for _ in 0..2 {
            h.on_passive(late, true, Some(&P), true);
        }
        assert_eq!(
            h.on_passive(late, true, Some(&P), true),
            Some(Change::Ejected(Duration::from_secs(10)))
        );
    }

    #[test]
    fn the_cap_keeps_the_backend_in_and_says_so_once() {
        let t = Instant::now();
        let mut h = BackendHealth::default();
        for _ in 0..2 {
            h.on_passive(t, true, Some(&P), false);
        }
        assert_eq!(
            h.on_passive(t, true, Some(&P), false),
            Some(Change::EjectionCapped)
        );
        assert_eq!(h.on_passive(t, true, Some(&P), false), None);
        assert!(!h.excluded());
        // Room again: the next failure ejects.
        assert!(matches!(
            h.on_passive(t, true, Some(&P), true),
            Some(Change::Ejected(_))
        ));
    }

    #[test]
    fn without_a_breaker_passive_events_change_nothing() {
        let mut h = BackendHealth::default();
        for _ in 0..100 {
            assert_eq!(h.on_passive(Instant::now(), true, None, true), None);
        }
        assert!(!h.excluded());
    }
}
