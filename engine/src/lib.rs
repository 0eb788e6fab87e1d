//! edgeproxy data plane.
//!
//! Pure logic (snapshot, selection, affinity, geo, PROXY protocol) is
//! runtime-free and tested deterministically; everything that touches compio
//! lives in [`rt`] and the shard and connection modules built on it.

pub mod affinity;
pub mod geo;
pub mod proxy_protocol;
pub mod select;
pub mod snapshot;
