//! `edgeproxy_mesh_*` in the Prometheus text format, from the published
//! [`MeshStatus`]: peers, each peer's bytes, handshake age, path verdict
//! and probes, and the reconciliation counters.

use std::fmt::Write as _;

use super::status::MeshStatus;

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Appends the mesh's metric families to `out`.
pub fn write(out: &mut String, s: &MeshStatus) {
    header(
        out,
        "edgeproxy_mesh_peers",
        "gauge",
        "WireGuard peers configured on the mesh interface.",
    );
    let _ = writeln!(out, "edgeproxy_mesh_peers {}", s.peers.len());
    header(
        out,
        "edgeproxy_mesh_pops_skipped",
        "gauge",
        "POPs of the pops table that are not peers (down, no mesh, or a conflict).",
    );
    let _ = writeln!(out, "edgeproxy_mesh_pops_skipped {}", s.skipped.len());
    let label =
        |p: &super::status::PeerView| escape(p.node_id.as_deref().unwrap_or(p.public_key.as_str()));
    for (name, help, value) in [
        (
            "edgeproxy_mesh_peer_rx_bytes_total",
            "Bytes received from the peer through the tunnel.",
            (|p: &super::status::PeerView| Some(p.rx_bytes)) as fn(&_) -> Option<u64>,
        ),
        (
            "edgeproxy_mesh_peer_tx_bytes_total",
            "Bytes sent to the peer through the tunnel.",
            |p| Some(p.tx_bytes),
        ),
        (
            "edgeproxy_mesh_peer_last_handshake_seconds",
            "Seconds since the last completed handshake with the peer (absent: never).",
            |p| p.last_handshake_secs,
        ),
        (
            "edgeproxy_mesh_peer_path_up",
            "1 while the path to the peer works, 0 when it is down (three pings through the \
             tunnel unanswered, or, for a peer that never answered one, no WireGuard handshake \
             for longer than a session lasts); absent when neither can tell.",
            |p| p.path_up.map(u64::from),
        ),
        (
            "edgeproxy_mesh_peer_probes_lost_total",
            "Pings through the tunnel to the peer's 6PN address that got no answer in time.",
            |p| p.probes_lost,
        ),
    ] {
        let kind = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        header(out, name, kind, help);
        for p in &s.peers {
            if let Some(v) = value(p) {
                let _ = writeln!(out, "{name}{{peer=\"{}\"}} {v}", label(p));
            }
        }
    }
    let name = "edgeproxy_mesh_peer_probe_rtt_seconds";
    header(
        out,
        name,
        "gauge",
        "Round trip of the last answered ping through the tunnel to the peer (absent: none yet).",
    );
    for p in &s.peers {
        if let Some(v) = p.probe_rtt_secs {
            let _ = writeln!(out, "{name}{{peer=\"{}\"}} {v}", label(p));
        }
    }
    let c = &s.counters;
    for (name, help, v) in [
        (
            "edgeproxy_mesh_reconciliations_total",
            "Reconciliation passes (membership and table against the interface).",
            c.reconciliations,
        ),
        (
            "edgeproxy_mesh_reconcile_errors_total",
            "Passes in which a change could not be applied (retried at the next).",
            c.errors,
        ),
    ] {
        header(out, name, "counter", help);
        let _ = writeln!(out, "{name} {v}");
    }
    header(
        out,
        "edgeproxy_mesh_changes_total",
        "counter",
        "Changes applied to the interface, by kind.",
    );
    for (kind, v) in [
        ("peer_added", c.peers_added),
        ("peer_updated", c.peers_updated),
        ("peer_removed", c.peers_removed),
        ("route", c.routes_changed),
        ("address", c.addresses_changed),
    ] {
        let _ = writeln!(out, "edgeproxy_mesh_changes_total{{kind=\"{kind}\"}} {v}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::status::PeerView;

    #[test]
    fn every_peer_has_its_counters_and_a_never_handshaken_one_no_age() {
        let s = MeshStatus {
            peers: vec![
                PeerView {
                    node_id: Some("node-1".into()),
                    rx_bytes: 10,
                    tx_bytes: 20,
                    last_handshake_secs: Some(3),
                    path_up: Some(false),
                    probe_rtt_secs: Some(0.0125),
                    probes_lost: Some(4),
                    ..Default::default()
                },
                PeerView {
                    node_id: Some("node-\"2".into()),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let mut out = String::new();
        write(&mut out, &s);
        assert!(out.contains("edgeproxy_mesh_peers 2\n"), "{out}");
        assert!(out.contains("edgeproxy_mesh_peer_rx_bytes_total{peer=\"node-1\"} 10\n"));
        assert!(out.contains("edgeproxy_mesh_peer_tx_bytes_total{peer=\"node-1\"} 20\n"));
        assert!(out.contains("edgeproxy_mesh_peer_last_handshake_seconds{peer=\"node-1\"} 3\n"));
        assert!(!out.contains("edgeproxy_mesh_peer_last_handshake_seconds{peer=\"node-\\\"2\"}"));
        assert!(out.contains("edgeproxy_mesh_peer_rx_bytes_total{peer=\"node-\\\"2\"} 0\n"));
        assert!(
            out.contains("edgeproxy_mesh_peer_path_up{peer=\"node-1\"} 0\n"),
            "{out}"
        );
        assert!(!out.contains("edgeproxy_mesh_peer_path_up{peer=\"node-\\\"2\"}"));
        assert!(
            out.contains("edgeproxy_mesh_peer_probe_rtt_seconds{peer=\"node-1\"} 0.0125\n"),
            "{out}"
        );
        assert!(out.contains("edgeproxy_mesh_peer_probes_lost_total{peer=\"node-1\"} 4\n"));
        assert!(!out.contains("edgeproxy_mesh_peer_probe_rtt_seconds{peer=\"node-\\\"2\"}"));
        assert!(!out.contains("edgeproxy_mesh_peer_probes_lost_total{peer=\"node-\\\"2\"}"));
    }
}
