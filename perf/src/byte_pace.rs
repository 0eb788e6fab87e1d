//! Pacing a byte stream at a fixed rate: the open-loop form of the TLS bulk
//! scenarios.
//!
//! Closed-loop bulk (every side as fast as it can) measures a proxy's CPU per
//! GB under a condition that differs between proxies on loopback: when the
//! proxy is the slowest stage its receive window closes, and the sender's
//! queued segments then leave when the proxy's window update arrives, that
//! is, inside the proxy's `recv(2)` and on its CPU; a proxy that keeps up
//! never pays for them. A run settles in one regime or the other (measured
//! 2026-12-04: edgeproxy's TLS upload near 590 or near 880 ms per GB from
//! run to run, nginx's likewise). At a fixed rate below every proxy's
//! maximum each one does the same work per byte for the same offered load.

use std::time::{Duration, Instant};

/// Write size while paced: small enough that the stream stays smooth at the
/// rates the suite uses (64 KiB every ~0.1–0.2 ms per stream).
pub const PACED_CHUNK: usize = 64 * 1024;

/// How far behind its schedule a sender may fall and still catch up. A
/// sender stalled longer (its core taken by other work, as in a suite run
/// beside a build) forgives the rest instead of bursting it out: a burst
/// would put the bytes of the stall into the measured window and the rate
/// above the one every target is offered (the smoke test's check, seen at
/// 1.06x under a concurrent build, 2026-12-06).
pub const CATCH_UP_AT_MOST: Duration = Duration::from_millis(10);

/// Sleeps a sender so that it moves `bytes_per_sec` on average since it
/// started; it never bursts ahead of the rate, and a late sender catches up
/// at most [`CATCH_UP_AT_MOST`] of it.
pub struct BytePacer {
    started: Instant,
    bytes_per_sec: f64,
    moved: u64,
}

impl BytePacer {
    /// `bytes_per_sec` must be positive.
    pub fn new(bytes_per_sec: f64) -> BytePacer {
        BytePacer {
            started: Instant::now(),
            bytes_per_sec: bytes_per_sec.max(1.0),
            moved: 0,
        }
    }

    /// Counts bytes the sender moved.
    pub fn moved(&mut self, n: usize) {
        self.moved += n as u64;
    }

    /// When, after the start, the next byte is due.
    pub fn due(&self) -> Duration {
        Duration::from_secs_f64(self.moved as f64 / self.bytes_per_sec)
    }

    /// Sleeps until the next byte is due (returns at once when late, after
    /// forgiving what is later than [`CATCH_UP_AT_MOST`]).
    pub fn wait(&mut self) {
        let (due, now) = (self.due(), self.started.elapsed());
        if due > now {
            std::thread::sleep(due - now);
        } else if now - due > CATCH_UP_AT_MOST {
            // Move the start so that the sender is exactly that late.
            self.started += now - due - CATCH_UP_AT_MOST;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_byte_is_due_when_the_bytes_moved_so_far_have_taken_their_time() {
        let mut p = BytePacer::new(10e6);
        assert_eq!(p.due(), Duration::ZERO);
        p.moved(1_000_000);
        assert_eq!(p.due(), Duration::from_millis(100));
        p.moved(PACED_CHUNK);
        assert_eq!(p.due(), Duration::from_secs_f64(1_065_536.0 / 10e6));
    }

    #[test]
    fn a_stalled_sender_catches_up_only_a_little() {
        let mut p = BytePacer::new(1e6);
        std::thread::sleep(Duration::from_millis(100));
        p.wait();
        // 100 ms behind: all but CATCH_UP_AT_MOST of it is forgiven.
        let behind = p.started.elapsed() - p.due();
        assert!(
            behind >= CATCH_UP_AT_MOST && behind < CATCH_UP_AT_MOST * 2,
            "{behind:?}"
        );
    }

    #[test]
    fn a_sender_that_is_late_does_not_wait() {
        let mut p = BytePacer::new(1.0);
        let t = Instant::now();
        p.wait();
        assert!(t.elapsed() < Duration::from_secs(1));
    }
}
