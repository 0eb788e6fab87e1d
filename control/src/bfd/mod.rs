//! BFD (RFC 5880, single hop over UDP per RFC 5881) for the BGP speaker's
//! neighbors: a router running BFD on its session with this POP declares
//! the POP gone within its detection time (3 × 100 ms by default here),
//! not the BGP hold time (3–9 s here, 90 s in many routers), and drops the
//! anycast route at once. A POP whose host hangs, whose process is stopped
//! or whose link is cut stops answering; the router's BFD notices and tears
//! down the BGP session (RFC 5882 §4.3). The other way, when the router's
//! BFD session goes Down after it was Up, this side resets the BGP session
//! (Cease, subcode "BFD Down", RFC 9384).
//!
//! Written here, not taken from a crate: the crates that exist (2026-12) are
//! young single-author daemons on their own runtime, with no way to hand a
//! live session to a binary upgrade's successor — which edgeproxy needs so
//! that an upgrade does not look like a failure to the router (BIRD 2.0
//! takes BGP down on any Up → Down of BFD, AdminDown included).
//!
//! Layout, sans-IO first: [`packet`] (Control packets), [`session`] (the
//! state machine, timers as deadlines, the hand-off state), then
//! [`driver`] (the sockets, on a thread of its own).

pub mod driver;
pub mod packet;
pub mod session;

pub use driver::{Bfd, BfdView};
pub use session::{HandedBfd, Timers};
