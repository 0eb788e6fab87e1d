//! Should this POP announce? A pure state machine over time: what the POP
//! wants ([`Want`], decided by `crate::steering` from the operator's drain,
//! shutdown, and whether it can serve) goes in with the time; the
//! announcement [`Phase`] comes out, with the next instant it may change
//! by itself ([`Policy::poll_timeout`]).
//!
//! - Able to serve, nobody asked to stop: **announced**.
//! - Drained or shutting down: a **soft drain**. The routes stay, tagged
//!   GRACEFUL_SHUTDOWN (RFC 8326) and optionally prepended, so upstreams
//!   move traffic to other POPs while this one still accepts it; after the
//!   drain delay they are **withdrawn**.
//! - Unable to serve (no healthy backend, listeners down): **withdrawn at
//!   once** — waiting would only send clients to a POP that fails them.
//!
//! A POP never announces in order to drain: from withdrawn, a drain stays
//! withdrawn. At start nothing is announced until the first verdict says
//! the POP can serve.

use std::time::{Duration, Instant};

/// Why the POP stops serving gracefully.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainCause {
    /// `edgeproxy drain` / `POST /api/v1/pop/drain`.
    Operator,
    /// SIGTERM / SIGINT: the process is stopping.
    Shutdown,
}

/// Why the POP cannot serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailCause {
    /// No app carried by the serving listeners has a healthy backend.
    NoHealthyBackend,
    /// None of the serving listeners is running.
    ListenersDown,
}

/// What the POP wants, as judged now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    Serve,
    Drain(DrainCause),
    Fail(FailCause),
}

/// Why nothing is announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WithdrawCause {
    /// Not yet judged able to serve since the start.
    Starting,
    Drained(DrainCause),
    Failed(FailCause),
}

/// The announcement state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Announced,
    /// Announced with GRACEFUL_SHUTDOWN until `withdraw_at`.
    Draining {
        cause: DrainCause,
        withdraw_at: Instant,
    },
    Withdrawn(WithdrawCause),
}

impl Phase {
    /// Whether routes are announced, and whether they carry the
    /// GRACEFUL_SHUTDOWN tag: `None` when withdrawn.
    pub fn graceful_shutdown(&self) -> Option<bool> {
        match self {
            Phase::Announced => Some(false),
            Phase::Draining { .. } => Some(true),
            Phase::Withdrawn(_) => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Phase::Announced => "announced",
            Phase::Draining { .. } => "draining",
            Phase::Withdrawn(_) => "withdrawn",
        }
    }

    /// Why, in words (for status and logs); `None` when announced.
    pub fn reason(&self) -> Option<&'static str> {
        let drain = |c: &DrainCause| match c {
            DrainCause::Operator => "drained by the operator",
            DrainCause::Shutdown => "shutting down",
        };
        match self {
            Phase::Announced => None,
            Phase::Draining { cause, .. } => Some(drain(cause)),
            Phase::Withdrawn(WithdrawCause::Starting) => Some("starting: not yet able to serve"),
            Phase::Withdrawn(WithdrawCause::Drained(c)) => Some(drain(c)),
            Phase::Withdrawn(WithdrawCause::Failed(FailCause::NoHealthyBackend)) => {
                Some("no healthy backend for the apps of the serving listeners")
            }
            Phase::Withdrawn(WithdrawCause::Failed(FailCause::ListenersDown)) => {
                Some("the serving listeners are down")
            }
        }
    }
}

/// The phase after `phase` given `want` at `now`. Pure.
pub fn next(phase: Phase, want: Want, now: Instant, drain_delay: Duration) -> Phase {
    match (phase, want) {
        (_, Want::Serve) => Phase::Announced,
        (_, Want::Fail(f)) => Phase::Withdrawn(WithdrawCause::Failed(f)),
        (Phase::Announced, Want::Drain(cause)) if drain_delay.is_zero() => {
            Phase::Withdrawn(WithdrawCause::Drained(cause))
        }
        (Phase::Announced, Want::Drain(cause)) => Phase::Draining {
            cause,
            withdraw_at: now + drain_delay,
        },
        // A drain that started keeps its deadline, whatever the cause now
        // (a shutdown during an operator's drain withdraws no later).
        (Phase::Draining { withdraw_at, .. }, Want::Drain(cause)) if now >= withdraw_at => {
            Phase::Withdrawn(WithdrawCause::Drained(cause))
        }
        (Phase::Draining { withdraw_at, .. }, Want::Drain(cause)) => {
            Phase::Draining { cause, withdraw_at }
        }
        (Phase::Withdrawn(_), Want::Drain(cause)) => {
            Phase::Withdrawn(WithdrawCause::Drained(cause))
        }
    }
}

/// [`next`] with its state: feed it the want whenever it may have changed
/// and when [`poll_timeout`](Policy::poll_timeout) passes.
#[derive(Debug, Clone)]
pub struct Policy {
    phase: Phase,
    drain_delay: Duration,
}

impl Policy {
    pub fn new(drain_delay: Duration) -> Policy {
        Policy {
            phase: Phase::Withdrawn(WithdrawCause::Starting),
            drain_delay,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Steps to the phase for `want` at `now`; returns the previous phase
    /// when it changed (the cause counts as a change).
    pub fn step(&mut self, now: Instant, want: Want) -> Option<Phase> {
        let next = next(self.phase, want, now, self.drain_delay);
        (next != self.phase).then(|| std::mem::replace(&mut self.phase, next))
    }

    /// When the phase changes by itself (a drain's withdrawal).
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Draining { withdraw_at, .. } => Some(withdraw_at),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DELAY: Duration = Duration::from_secs(5);

    #[test]
    fn nothing_is_announced_until_the_pop_can_serve() {
        let t0 = Instant::now();
        let mut p = Policy::new(DELAY);
        assert_eq!(p.phase().graceful_shutdown(), None);
        let fail = Want::Fail(FailCause::NoHealthyBackend);
        assert!(p.step(t0, fail).is_some(), "the cause changed");
        assert_eq!(p.phase().graceful_shutdown(), None);
        assert_eq!(
            p.step(t0, Want::Serve),
            Some(Phase::Withdrawn(WithdrawCause::Failed(
                FailCause::NoHealthyBackend
            )))
        );
        assert_eq!(p.phase(), Phase::Announced);
        assert_eq!(p.step(t0, Want::Serve), None, "no change, nothing to do");
    }

    #[test]
    fn a_drain_tags_the_routes_then_withdraws_them_after_the_delay() {
        let t0 = Instant::now();
        let mut p = Policy::new(DELAY);
        p.step(t0, Want::Serve);
        let drain = Want::Drain(DrainCause::Operator);
        p.step(t0, drain);
        assert_eq!(p.phase().graceful_shutdown(), Some(true));
        assert_eq!(p.poll_timeout(), Some(t0 + DELAY));
        // Just before the deadline: still tagged.
        assert_eq!(p.step(t0 + DELAY - Duration::from_millis(1), drain), None);
        assert_eq!(p.phase().graceful_shutdown(), Some(true));
        p.step(t0 + DELAY, drain);
        assert_eq!(
            p.phase(),
            Phase::Withdrawn(WithdrawCause::Drained(DrainCause::Operator))
        );
        assert_eq!(p.poll_timeout(), None);
        // Undrain: announced again.
        p.step(t0 + DELAY * 2, Want::Serve);
        assert_eq!(p.phase(), Phase::Announced);
    }

    #[test]
    fn a_failure_withdraws_at_once_even_during_a_drain() {
        let t0 = Instant::now();
        let mut p = Policy::new(DELAY);
        p.step(t0, Want::Serve);
        p.step(t0, Want::Fail(FailCause::ListenersDown));
        assert_eq!(p.phase().graceful_shutdown(), None);
        p.step(t0, Want::Serve);
        p.step(t0, Want::Drain(DrainCause::Shutdown));
        p.step(
            t0 + Duration::from_secs(1),
            Want::Fail(FailCause::NoHealthyBackend),
        );
        assert_eq!(
            p.phase(),
            Phase::Withdrawn(WithdrawCause::Failed(FailCause::NoHealthyBackend))
        );
    }

    #[test]
    fn a_withdrawn_pop_does_not_announce_to_drain() {
        let t0 = Instant::now();
        let mut p = Policy::new(DELAY);
        p.step(t0, Want::Drain(DrainCause::Shutdown));
        assert_eq!(
            p.phase(),
            Phase::Withdrawn(WithdrawCause::Drained(DrainCause::Shutdown))
        );
        p.step(t0, Want::Fail(FailCause::NoHealthyBackend));
        p.step(t0, Want::Drain(DrainCause::Operator));
        assert_eq!(p.phase().graceful_shutdown(), None);
    }

    #[test]
    fn a_shutdown_during_a_drain_keeps_the_drains_deadline() {
        let t0 = Instant::now();
        let mut p = Policy::new(DELAY);
        p.step(t0, Want::Serve);
        p.step(t0, Want::Drain(DrainCause::Operator));
        p.step(
            t0 + Duration::from_secs(4),
            Want::Drain(DrainCause::Shutdown),
        );
        assert_eq!(
            p.phase(),
            Phase::Draining {
                cause: DrainCause::Shutdown,
                withdraw_at: t0 + DELAY
            }
        );
    }

    #[test]
    fn without_a_delay_a_drain_withdraws_at_once() {
        let t0 = Instant::now();
        let mut p = Policy::new(Duration::ZERO);
        p.step(t0, Want::Serve);
        p.step(t0, Want::Drain(DrainCause::Operator));
        assert_eq!(p.phase().graceful_shutdown(), None);
    }

    #[test]
    fn every_phase_says_why() {
        let t0 = Instant::now();
        assert_eq!(Phase::Announced.reason(), None);
        for phase in [
            Phase::Draining {
                cause: DrainCause::Operator,
                withdraw_at: t0,
            },
            Phase::Withdrawn(WithdrawCause::Starting),
            Phase::Withdrawn(WithdrawCause::Drained(DrainCause::Shutdown)),
            Phase::Withdrawn(WithdrawCause::Failed(FailCause::NoHealthyBackend)),
            Phase::Withdrawn(WithdrawCause::Failed(FailCause::ListenersDown)),
        ] {
            assert!(phase.reason().is_some_and(|r| !r.is_empty()), "{phase:?}");
        }
    }
}
