//! How much one anti-entropy exchange with a peer carries, fitted to the
//! link it runs over (sans-IO: the node reports how each exchange ended).
//!
//! An exchange must finish within the node's sync timeout. A fixed size
//! (512 KB of rows each way, plus up to 8,192 versions listed) fits a LAN
//! many times over, but not a long lossy link: QA healed a 20,000-row
//! divergence between two POPs 100 ms apart with 1 % loss, where QUIC's
//! congestion control moves ~150 KB/s, and most exchanges timed out and
//! started over (144 s). Like a congestion window, but per exchange: a
//! timeout halves the budget, an exchange that ended in well under the
//! timeout doubles it again, up to the fixed maximum. Everything an
//! exchange lists or carries scales with it.

use std::time::Duration;

/// Bounds on what one exchange carries at most (on a good link), so that a node that was away for a
/// day catches up over several exchanges instead of stalling its peers with
/// one huge one.
pub mod limits {
    /// Versions listed in one `SyncVersions`.
    pub const SYNC_VERSIONS: usize = 8192;
    /// Bytes of rows in one `SyncRows` or `SyncWanted`.
    pub const SYNC_ROW_BYTES: usize = 512 * 1024;
    /// Keys asked for in one `SyncRows`.
    pub const SYNC_WANT: usize = 4096;
    /// Bytes of rows in one broadcast message.
    pub const BROADCAST_BYTES: usize = 256 * 1024;
    /// Anti-entropy exchanges in flight at once.
    pub const SYNCS_IN_FLIGHT: usize = 2;
}

/// The smallest budget: a few dozen rows still move per exchange on any
/// link that moves anything.
pub const MIN_ROW_BYTES: usize = 16 * 1024;

/// An exchange that took less than this share of the timeout had room for
/// twice as much.
const GROW_BELOW: u32 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncBudget {
    row_bytes: usize,
}

impl Default for SyncBudget {
    /// A new peer starts at the maximum: on a good link nothing changes.
    fn default() -> SyncBudget {
        SyncBudget {
            row_bytes: limits::SYNC_ROW_BYTES,
        }
    }
}

impl SyncBudget {
    /// Bytes of rows in one `SyncRows` or `SyncWanted`.
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }

    /// Versions listed in one `SyncVersions`: in proportion, so that in a
    /// big divergence (every listed row missing on the other side) the list
    /// does not name several times more rows than the exchange can carry,
    /// only to list them again in the next one.
    pub fn versions(&self) -> usize {
        self.scaled(limits::SYNC_VERSIONS)
    }

    /// Keys asked for in one `SyncRows`.
    pub fn wants(&self) -> usize {
        self.scaled(limits::SYNC_WANT)
    }

    fn scaled(&self, at_max: usize) -> usize {
        (at_max * self.row_bytes / limits::SYNC_ROW_BYTES).max(1)
    }

    /// An exchange ended (its rows arrived) after `took`.
    pub fn completed(&mut self, took: Duration, timeout: Duration) {
        if took < timeout / GROW_BELOW {
            self.row_bytes = (self.row_bytes * 2).min(limits::SYNC_ROW_BYTES);
        }
    }

    /// An exchange timed out.
    pub fn timed_out(&mut self) {
        self.row_bytes = (self.row_bytes / 2).max(MIN_ROW_BYTES);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(10);

    #[test]
    fn halves_on_timeouts_down_to_the_floor_and_grows_back_on_quick_exchanges() {
        let mut b = SyncBudget::default();
        assert_eq!(b.row_bytes(), limits::SYNC_ROW_BYTES);
        assert_eq!(b.versions(), limits::SYNC_VERSIONS);
        b.timed_out();
        assert_eq!(b.row_bytes(), limits::SYNC_ROW_BYTES / 2);
        assert_eq!(b.versions(), limits::SYNC_VERSIONS / 2);
        assert_eq!(b.wants(), limits::SYNC_WANT / 2);
        for _ in 0..20 {
            b.timed_out();
        }
        assert_eq!(b.row_bytes(), MIN_ROW_BYTES);
        assert!(b.versions() >= 1 && b.wants() >= 1);
        // A slow exchange that still made it: no growth.
        b.completed(Duration::from_secs(6), TIMEOUT);
        assert_eq!(b.row_bytes(), MIN_ROW_BYTES);
        b.completed(Duration::from_millis(500), TIMEOUT);
        assert_eq!(b.row_bytes(), 2 * MIN_ROW_BYTES);
        for _ in 0..20 {
            b.completed(Duration::from_millis(500), TIMEOUT);
        }
        assert_eq!(b.row_bytes(), limits::SYNC_ROW_BYTES);
    }
}
