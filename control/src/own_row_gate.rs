//! When this POP may write its own row of the replicated `pops` table at
//! start.
//!
//! Replication is last-write-wins per row. A POP that writes its row at
//! start (its identity from `[pop]`, a new mesh key, its verdict) versions
//! it then, newer than anything the cluster holds, and with it whatever
//! `draining` its own `routing.db` says. When that file is older than the
//! cluster's copy (wiped, or restored from a backup taken before the
//! operator drained the POP) the start undoes the drain on every POP.
//!
//! So with replication on, a start writes nothing of its row, and
//! announces nothing, until replication has heard the cluster's word on it
//! (`replication::node::Node::hold_own_row`): the copy arrived (persisted
//! here, drain included), an exchange with a member ended without one, or
//! none completed in time. Replication then writes this start's
//! identity over what is there and opens the gate; steering
//! (`crate::steering::controller`) waits for it before judging, writing
//! and announcing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Shared between replication, which opens it, and steering, which waits
/// for it. Cheap to clone.
#[derive(Debug, Clone)]
pub struct OwnRowGate(Arc<AtomicBool>);

impl OwnRowGate {
    /// Closed: replication runs and has not yet heard the cluster's word.
    pub fn closed() -> Self {
        OwnRowGate(Arc::new(AtomicBool::new(false)))
    }

    /// Open from the start: no replication (this POP's file is the only
    /// copy), or a binary upgrade's successor (its predecessor ran with the
    /// cluster's copy in the same file).
    pub fn open() -> Self {
        OwnRowGate(Arc::new(AtomicBool::new(true)))
    }

    /// Replication wrote this start's row over the cluster's copy.
    pub fn set_open(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub fn is_open(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}
