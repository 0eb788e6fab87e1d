//! edgeproxy's internal DNS: `.internal` names answered from the same routing
//! snapshot the proxy routes by, so services find each other without
//! hard-coded addresses.
//!
//! The answering logic is sans-IO and deterministic: [`Answerer::answer`]
//! turns query bytes (plus the client's address and the current
//! [`RoutingSnapshot`](engine::snapshot::RoutingSnapshot)) into reply bytes.
//! [`server`] is the thin Tokio driver that runs it: TCP on the control
//! thread, UDP on worker threads of its own.
//!
//! Modules, in the order a query meets them: [`ecs`] (client subnet),
//! [`names`] (what the name refers to), [`index`] (per-snapshot lookup
//! tables), [`answer`] (records and reply encoding); [`zone`] holds the
//! static configuration. [`geodns`] answers an optional public zone with
//! the nearest POPs that take traffic.

pub mod answer;
pub mod ecs;
pub mod geodns;
pub mod index;
pub mod names;
pub mod salvage;
pub mod server;
pub mod zone;

pub use answer::{Answered, Answerer, Transport, MAX_RRSET_RECORDS, MAX_UDP_PAYLOAD};
pub use geodns::GeoZone;
pub use server::{DnsServer, ServerSettings};
pub use zone::{PopEntry, ZoneConfig, ZoneError};
