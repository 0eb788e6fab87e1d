//! Hybrid logical clock (Kulkarni et al., 2014): timestamps that follow wall
//! time closely, never go backwards on one node, and order every event a node
//! has seen after the events that caused it, even when clocks disagree.
//!
//! A timestamp is 64 bits: the upper 48 are Unix milliseconds, the lower 16 a
//! counter that separates events within the same millisecond. Ordered as
//! integers, so last-writer-wins compares two `u64`s (ties broken by origin,
//! see `version`).
//!
//! Sans-IO: wall time is passed in.

use serde::{Deserialize, Serialize};

/// Bits of the logical counter.
const COUNTER_BITS: u32 = 16;
const COUNTER_MASK: u64 = (1 << COUNTER_BITS) - 1;

/// A remote timestamp this far ahead of our wall clock is refused: one node
/// with a clock days ahead would otherwise drag every clock in the cluster
/// along, and its writes would win every conflict until then.
pub const MAX_DRIFT_MS: u64 = 60_000;

/// One hybrid logical timestamp.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Hlc(pub u64);

impl Hlc {
    pub fn new(physical_ms: u64, counter: u16) -> Hlc {
        Hlc((physical_ms << COUNTER_BITS) | counter as u64)
    }

    /// Unix milliseconds.
    pub fn physical_ms(self) -> u64 {
        self.0 >> COUNTER_BITS
    }

    pub fn counter(self) -> u16 {
        (self.0 & COUNTER_MASK) as u16
    }
}

impl std::fmt::Display for Hlc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.physical_ms(), self.counter())
    }
}

/// A remote timestamp was too far in the future to accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("timestamp {remote} is {ahead_ms} ms ahead of this node's clock (at most {MAX_DRIFT_MS} ms accepted)")]
pub struct ClockDrift {
    pub remote: Hlc,
    pub ahead_ms: u64,
}

/// The clock of one node.
#[derive(Debug, Clone, Default)]
pub struct HlcClock {
    last: Hlc,
}

impl HlcClock {
    /// A clock that will never issue a timestamp at or below `floor` (the
    /// highest one this node issued or saw before a restart: its wall clock
    /// may have stepped back meanwhile).
    pub fn starting_after(floor: Hlc) -> HlcClock {
        HlcClock { last: floor }
    }

    /// The last timestamp issued or observed.
    pub fn last(&self) -> Hlc {
        self.last
    }

    /// A timestamp for a local event at wall time `wall_ms`: greater than
    /// every timestamp issued or observed so far.
    pub fn now(&mut self, wall_ms: u64) -> Hlc {
        let last_ms = self.last.physical_ms();
        self.last = if wall_ms > last_ms {
            Hlc::new(wall_ms, 0)
        } else {
            next_after(self.last)
        };
        self.last
    }

    /// Takes a timestamp received from another node into account, so that
    /// our next local event orders after it.
    pub fn observe(&mut self, remote: Hlc, wall_ms: u64) -> Result<(), ClockDrift> {
        let ahead_ms = remote.physical_ms().saturating_sub(wall_ms);
        if ahead_ms > MAX_DRIFT_MS {
            return Err(ClockDrift { remote, ahead_ms });
        }
        if remote > self.last {
            self.last = remote;
        }
        Ok(())
    }
}

/// The smallest timestamp after `t`: the next counter value, or the next
/// millisecond when the counter is full (65,536 events in one millisecond).
fn next_after(t: Hlc) -> Hlc {
    if t.counter() as u64 == COUNTER_MASK {
        Hlc::new(t.physical_ms() + 1, 0)
    } else {
        Hlc(t.0 + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_wall_time_and_counts_within_a_millisecond() {
        let mut c = HlcClock::default();
        assert_eq!(c.now(1000), Hlc::new(1000, 0));
        assert_eq!(c.now(1000), Hlc::new(1000, 1));
        assert_eq!(c.now(1001), Hlc::new(1001, 0));
    }

    #[test]
    fn never_goes_backwards_when_the_wall_clock_does() {
        let mut c = HlcClock::default();
        let a = c.now(5000);
        let b = c.now(4000);
        let d = c.now(4500);
        assert!(a < b && b < d, "{a} {b} {d}");
        assert_eq!(b.physical_ms(), 5000);
    }

    #[test]
    fn orders_local_events_after_observed_remote_ones() {
        let mut c = HlcClock::default();
        c.now(1000);
        let remote = Hlc::new(1500, 7);
        c.observe(remote, 1000).unwrap();
        let next = c.now(1000);
        assert!(next > remote);
        assert_eq!(next, Hlc::new(1500, 8));
    }

    #[test]
    fn refuses_timestamps_far_in_the_future() {
        let mut c = HlcClock::default();
        let err = c
            .observe(Hlc::new(10_000 + MAX_DRIFT_MS + 1, 0), 10_000)
            .unwrap_err();
        assert_eq!(err.ahead_ms, MAX_DRIFT_MS + 1);
        assert_eq!(c.last(), Hlc::default(), "a refused timestamp is not taken");
        c.observe(Hlc::new(10_000 + MAX_DRIFT_MS, 0), 10_000)
            .unwrap();
    }

    #[test]
    fn a_full_counter_moves_to_the_next_millisecond() {
        let mut c = HlcClock::starting_after(Hlc::new(9, u16::MAX));
        assert_eq!(c.now(0), Hlc::new(10, 0));
    }

    #[test]
    fn restarts_above_the_floor() {
        let mut c = HlcClock::starting_after(Hlc::new(2000, 3));
        assert_eq!(c.now(1000), Hlc::new(2000, 4));
    }
}
