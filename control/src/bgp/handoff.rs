//! An established BGP session as a binary upgrade hands it from the old
//! process to its successor (see `crate::upgrade`): the TCP connection's
//! descriptor travels beside this state (`SCM_RIGHTS`), so the router sees
//! one session go on — no NOTIFICATION, no flap, no route withdrawn and
//! announced again, and no reliance on the router's Graceful Restart.
//!
//! The successor rebuilds the session without a word on the wire
//! ([`super::session::Session::resume`]): it replays the handshake into its
//! own state machine with the peer's OPEN as it came, and checks that its
//! own OPEN would be the one the peer agreed to; if not (the configuration
//! changed what the session negotiates), it ends the session with a Cease
//! NOTIFICATION and starts a fresh one instead.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::routes::PathAttrs;

/// What the successor needs to go on with one established session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandedSession {
    /// The neighbor (its configured address and port): which of the
    /// successor's neighbors this is.
    pub peer: SocketAddr,
    /// The OPEN this side sent, encoded: the successor's own must be the
    /// same, or the peer agreed to something else.
    pub local_open: Vec<u8>,
    /// The peer's OPEN, encoded as it came.
    pub peer_open: Vec<u8>,
    /// Bytes read from the connection that are not a whole message yet.
    pub unread: Vec<u8>,
    /// Adj-RIB-Out: what the peer holds from this side.
    pub sent: Vec<(IpNet, PathAttrs)>,
    /// How long the session has been established, in milliseconds.
    pub established_ms: u64,
    pub updates_sent: u64,
    pub flaps: u64,
    /// The BFD session with the same neighbor, when it runs one: the
    /// successor goes on with it (a fresh one would say Down, and the
    /// router would take the BGP session down). Absent from a predecessor
    /// without BFD.
    #[serde(default)]
    pub bfd: Option<crate::bfd::HandedBfd>,
}

/// A handed session with its connection.
#[derive(Debug)]
pub struct Handed {
    pub state: HandedSession,
    pub socket: OwnedFd,
}
