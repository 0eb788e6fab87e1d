//! The speaker in Prometheus text format, appended to `/metrics` by
//! `crate::metrics`.

use std::fmt::Write as _;

use super::status::{BgpStatus, NeighborStatus};

/// The phases `edgeproxy_bgp_announcement` has a sample for.
const PHASES: [&str; 3] = ["announced", "draining", "withdrawn"];

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Appends the `edgeproxy_bgp_*` families.
pub fn render(status: &BgpStatus, out: &mut String) {
    family(
        out,
        "edgeproxy_bgp_announcement",
        "gauge",
        "1 for the current phase of this POP's anycast announcement: announced, draining (tagged GRACEFUL_SHUTDOWN) or withdrawn.",
    );
    for phase in PHASES {
        let on = u8::from(status.phase == phase);
        let _ = writeln!(out, "edgeproxy_bgp_announcement{{phase=\"{phase}\"}} {on}");
    }
    let per_neighbor: [(&str, &str, &str, Field); 5] = [
        (
            "edgeproxy_bgp_session_established",
            "gauge",
            "1 while the BGP session with the neighbor is established.",
            |n| u64::from(n.state == "established"),
        ),
        (
            "edgeproxy_bgp_session_uptime_seconds",
            "gauge",
            "Seconds since the session was established (0 when it is not).",
            |n| n.uptime_secs.unwrap_or(0),
        ),
        (
            "edgeproxy_bgp_prefixes_announced",
            "gauge",
            "Prefixes the neighbor holds from this POP.",
            |n| n.prefixes_announced as u64,
        ),
        (
            "edgeproxy_bgp_updates_sent_total",
            "counter",
            "UPDATE messages sent to the neighbor.",
            |n| n.updates_sent,
        ),
        (
            "edgeproxy_bgp_session_flaps_total",
            "counter",
            "Times the session left Established.",
            |n| n.flaps,
        ),
    ];
    samples(out, &per_neighbor, status.neighbors.iter());
    // BFD: only neighbors that run it have samples.
    let per_bfd: [(&str, &str, &str, Field); 2] = [
        (
            "edgeproxy_bgp_bfd_up",
            "gauge",
            "1 while the BFD session with the neighbor is up (neighbors with bfd = true).",
            |n| u64::from(n.bfd.as_deref() == Some("up")),
        ),
        (
            "edgeproxy_bgp_bfd_session_downs_total",
            "counter",
            "Times the BFD session with the neighbor went from up to down (each reset the BGP session).",
            |n| n.bfd_downs,
        ),
    ];
    samples(
        out,
        &per_bfd,
        status.neighbors.iter().filter(|n| n.bfd.is_some()),
    );
}

type Field = fn(&NeighborStatus) -> u64;

/// Each family with one sample per neighbor in `neighbors`.
fn samples<'a>(
    out: &mut String,
    families: &[(&str, &str, &str, Field)],
    neighbors: impl Iterator<Item = &'a NeighborStatus> + Clone,
) {
    for (name, kind, help, value) in families {
        family(out, name, kind, help);
        for n in neighbors.clone() {
            let _ = writeln!(out, "{name}{{neighbor=\"{}\"}} {}", n.neighbor, value(n));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bgp::status::NeighborStatus;

    #[test]
    fn one_sample_per_phase_and_per_neighbor() {
        let status = BgpStatus {
            enabled: true,
            phase: "draining".into(),
            neighbors: vec![NeighborStatus {
                neighbor: "10.0.0.1".into(),
                state: "established".into(),
                uptime_secs: Some(12),
                prefixes_announced: 2,
                updates_sent: 3,
                bfd: Some("up".into()),
                bfd_downs: 2,
                ..NeighborStatus::default()
            }],
            ..BgpStatus::default()
        };
        let mut out = String::new();
        render(&status, &mut out);
        for line in [
            "edgeproxy_bgp_announcement{phase=\"draining\"} 1",
            "edgeproxy_bgp_announcement{phase=\"announced\"} 0",
            "edgeproxy_bgp_session_established{neighbor=\"10.0.0.1\"} 1",
            "edgeproxy_bgp_session_uptime_seconds{neighbor=\"10.0.0.1\"} 12",
            "edgeproxy_bgp_prefixes_announced{neighbor=\"10.0.0.1\"} 2",
            "edgeproxy_bgp_updates_sent_total{neighbor=\"10.0.0.1\"} 3",
            "edgeproxy_bgp_bfd_up{neighbor=\"10.0.0.1\"} 1",
            "edgeproxy_bgp_bfd_session_downs_total{neighbor=\"10.0.0.1\"} 2",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} missing:\n{out}");
        }
    }
}
