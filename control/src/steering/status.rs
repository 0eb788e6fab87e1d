//! What `GET /api/v1/pop`, `edgeproxy pop status` and the metrics show of
//! this POP's steering state.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PopStatus {
    pub node_id: String,
    pub name: String,
    pub region: String,
    /// Drained by the operator (kept across restarts).
    pub draining: bool,
    /// Starting with replication: the cluster's copy of this POP's row
    /// has not come yet, so `draining` is what `routing.db` said, which
    /// may be older (the POP announces nothing and is left out of GeoDNS
    /// meanwhile).
    #[serde(default)]
    pub awaiting_own_row: bool,
    /// A stop signal arrived.
    pub shutting_down: bool,
    /// Its own verdict: a serving listener runs and has a healthy backend.
    pub serving: bool,
    /// The verdict in words (`serving`, `no healthy backend for web`, …).
    pub verdict: String,
    /// GeoDNS (here and at the other POPs) answers this POP: it takes
    /// traffic, or no POP does and it is live and undrained (the fallback).
    /// By GeoDNS's own rule (`dns::geodns::standing`).
    pub geodns: bool,
    /// Answered only as that fallback: it cannot serve, and no POP can.
    #[serde(default)]
    pub geodns_fallback: bool,
    /// The listeners the verdict is about.
    pub listeners: Vec<String>,
    /// With BGP: `announced`, `draining` or `withdrawn`.
    pub announcement: Option<String>,
    pub announcement_reason: Option<String>,
    /// During a soft drain: milliseconds until the withdrawal.
    pub withdraw_in_ms: Option<u64>,
}

/// Appends `edgeproxy_pop_*` to a Prometheus text page.
pub fn render_metrics(s: &PopStatus, out: &mut String) {
    for (name, help, value) in [
        (
            "edgeproxy_pop_serving",
            "1 while this POP judges it can serve: a serving listener runs and has a healthy backend.",
            s.serving,
        ),
        (
            "edgeproxy_pop_draining",
            "1 while this POP is drained by the operator (edgeproxy drain).",
            s.draining,
        ),
        (
            "edgeproxy_pop_geodns_answered",
            "1 while GeoDNS answers this POP: it can serve and is not drained or stopping, or no POP can serve and it is live and not drained (the fallback).",
            s.geodns,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        let _ = writeln!(out, "{name} {}", u8::from(value));
    }
}
