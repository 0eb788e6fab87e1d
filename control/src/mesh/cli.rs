//! `edgeproxy mesh status` (a running POP's mesh, from its API) and
//! `edgeproxy 6pn` (the 6PN plan, from the configuration and `routing.db`,
//! read-only; no running proxy needed).

use std::net::{IpAddr, Ipv6Addr};
use std::path::Path;

use anyhow::Context;
use clap::{Args, Subcommand};
use rusqlite::{Connection, OpenFlags};
use serde_json::Value;

use super::addressing::{subnet_for_node, PopPrefix};
use super::status::MeshStatus;

#[derive(Debug, Args)]
pub struct MeshArgs {
    #[command(flatten)]
    pub api: crate::api::client::ApiArgs,
    #[command(subcommand)]
    pub action: MeshAction,
}

#[derive(Debug, Subcommand)]
pub enum MeshAction {
    /// This POP's WireGuard interface (implementation, key, endpoint, 6PN
    /// prefix) and every peer: endpoint, allowed IPs, last handshake,
    /// bytes each way; POPs left out of the mesh and why.
    Status,
}

/// `config`: `--config`, where the API's address and token are found.
pub fn run_mesh(args: MeshArgs, config: Option<&Path>) -> anyhow::Result<()> {
    let client = args.api.client(config)?;
    let body = client.call("GET", "/api/v1/mesh", None)?;
    match args.action {
        MeshAction::Status if args.api.json => println!("{}", serde_json::to_string_pretty(&body)?),
        MeshAction::Status => print!("{}", render_status(&body)),
    }
    Ok(())
}

fn table(rows: &[Vec<String>]) -> String {
    let mut out = String::new();
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The status as text: the interface, then one row per peer.
pub fn render_status(body: &Value) -> String {
    if body["enabled"] != Value::Bool(true) {
        return "the mesh is off on this POP ([mesh] enabled = false)\n".into();
    }
    let s: MeshStatus = match serde_json::from_value(body.clone()) {
        Ok(s) => s,
        Err(e) => return format!("unexpected answer from the API: {e}\n"),
    };
    let mut out = format!(
        "interface {} ({}), listening on UDP {}, endpoint {}\n\
         public key {}\n\
         6PN: cluster {}{}, this POP {} at {}\n\
         path probes: {}\n\n",
        s.interface,
        s.implementation,
        s.listen_port,
        s.endpoint,
        s.public_key,
        s.cluster_prefix,
        if s.cluster_prefix_derived {
            " (derived from the cluster secret)"
        } else {
            ""
        },
        s.prefix,
        s.address,
        match &s.path_probe {
            Some(socket) => format!("ICMPv6 echo through the tunnel ({socket})"),
            None => "off (paths judged from WireGuard handshakes only)".into(),
        },
    );
    let dash = || "-".to_string();
    let mut rows = vec![[
        "PEER",
        "ENDPOINT",
        "ALLOWED IPS",
        "HANDSHAKE",
        "PATH",
        "RTT",
        "RECEIVED",
        "SENT",
    ]
    .map(String::from)
    .to_vec()];
    for p in &s.peers {
        rows.push(vec![
            p.node_id.clone().unwrap_or_else(|| p.public_key.clone()),
            p.endpoint.clone().unwrap_or_else(dash),
            p.allowed_ips.join(","),
            p.last_handshake_secs
                .map(|t| format!("{t}s ago"))
                .unwrap_or_else(|| "never".into()),
            // From the pings, else the handshake age ("-": neither tells).
            match p.path_up {
                Some(true) => "up".into(),
                Some(false) => "DOWN".into(),
                None => dash(),
            },
            // The last answered ping's round trip.
            p.probe_rtt_secs
                .map(|s| format!("{:.1}ms", s * 1000.0))
                .unwrap_or_else(dash),
            bytes(p.rx_bytes),
            bytes(p.tx_bytes),
        ]);
    }
    out.push_str(&table(&rows));
    if !s.skipped.is_empty() {
        out.push_str("\nnot peers:\n");
        for k in &s.skipped {
            out.push_str(&format!("  {}: {}\n", k.node_id, k.reason));
        }
    }
    if let Some(e) = &s.last_error {
        out.push_str(&format!("\nlast error: {e}\n"));
    }
    out
}

#[derive(Debug, Args)]
pub struct SixPnArgs {
    #[command(subcommand)]
    pub action: Option<SixPnAction>,
}

#[derive(Debug, Subcommand)]
pub enum SixPnAction {
    /// The cluster's /48, this POP's /64 and address, and every POP's
    /// prefix recorded in routing.db (the default).
    Show,
    /// The 6PN address a backend gets when it registers without one: stable
    /// for the same id at the same POP.
    Address {
        /// The backend's id (as in `POST /api/v1/register`).
        backend_id: String,
        /// Allocate at this POP (node id) instead of this one.
        #[arg(long, value_name = "NODE")]
        pop: Option<String>,
    },
    /// Backends of routing.db with a 6PN address, and the POP whose /64
    /// holds it.
    Backends,
}

/// What `edgeproxy 6pn` reads of `routing.db`: (node id, prefix6, endpoint).
fn pops_in(db: &Path) -> anyhow::Result<Vec<(String, String, String)>> {
    let conn = open_read_only(db)?;
    let mut stmt =
        match conn.prepare("SELECT node_id, prefix6, wg_endpoint FROM pops ORDER BY node_id") {
            Ok(s) => s,
            // No pops table yet: replication never ran on this file.
            Err(_) => return Ok(Vec::new()),
        };
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, Option<String>>(1)?.unwrap_or_default(),
            r.get::<_, Option<String>>(2)?.unwrap_or_default(),
        ))
    })?;
    Ok(rows.filter_map(Result::ok).collect())
}

fn open_read_only(db: &Path) -> anyhow::Result<Connection> {
    Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("cannot open {} read-only", db.display()))
}

pub fn run_6pn(args: SixPnArgs, config_path: Option<&Path>) -> anyhow::Result<()> {
    let config = crate::config::load(config_path, &crate::config::ProcessEnv)?;
    let six = config.mesh.six_pn(&config.replication);
    let node = &config.replication.node_id;
    let db = &config.routing.db_path;
    match args.action.unwrap_or(SixPnAction::Show) {
        SixPnAction::Show => {
            println!(
                "cluster prefix  {}  ({}; RFC 4193: fd + 40-bit global ID {:010x})",
                six.cluster,
                if six.derived {
                    "derived from the cluster secret"
                } else {
                    "configured"
                },
                six.cluster.global_id()
            );
            println!(
                "this POP        {node}: {}  address {}  (subnet {:04x}{})",
                six.pop,
                six.pop_address(),
                six.pop.subnet(),
                if config.mesh.pop_subnet.is_some() {
                    ", configured"
                } else {
                    ", from the node id"
                }
            );
            if !config.mesh.enabled {
                println!("the mesh is off in this configuration ([mesh] enabled = false)");
            }
            if !config.replication.enabled {
                println!(
                    "replication is off: without the cluster secret this prefix is not the cluster's"
                );
            }
            if db.exists() {
                let pops = pops_in(db)?;
                if !pops.is_empty() {
                    println!();
                    let mut rows = vec![["NODE", "PREFIX", "ADDRESS", "WIREGUARD ENDPOINT"]
                        .map(String::from)
                        .to_vec()];
                    for (id, prefix, endpoint) in pops {
                        let addr = PopPrefix::parse(&prefix)
                            .map(|p| p.pop_address().to_string())
                            .unwrap_or_else(|| "-".into());
                        let dash = |s: String| if s.is_empty() { "-".to_string() } else { s };
                        rows.push(vec![id, dash(prefix), addr, dash(endpoint)]);
                    }
                    print!("{}", table(&rows));
                }
            }
        }
        SixPnAction::Address { backend_id, pop } => {
            let prefix = match pop.as_deref() {
                None => six.pop,
                Some(other) if other == node => six.pop,
                Some(other) => {
                    let recorded = if db.exists() {
                        pops_in(db)?
                            .into_iter()
                            .find(|(id, _, _)| id == other)
                            .and_then(|(_, p, _)| PopPrefix::parse(&p))
                    } else {
                        None
                    };
                    match recorded {
                        Some(p) => p,
                        None => {
                            eprintln!(
                                "note: {other} has no prefix in {}; assuming its default subnet (from its node id)",
                                db.display()
                            );
                            six.cluster.pop(subnet_for_node(other))
                        }
                    }
                }
            };
            println!("{}", prefix.backend_address(&backend_id));
        }
        SixPnAction::Backends => {
            let pops: Vec<(String, PopPrefix)> = if db.exists() {
                pops_in(db)?
                    .into_iter()
                    .filter_map(|(id, p, _)| Some((id, PopPrefix::parse(&p)?)))
                    .collect()
            } else {
                anyhow::bail!("{} does not exist", db.display());
            };
            let conn = open_read_only(db)?;
            let mut stmt = conn.prepare(
                "SELECT id, app, wg_ip, port FROM backends \
                 WHERE deleted IS NULL OR deleted = 0 ORDER BY id",
            )?;
            let mut rows = vec![["ID", "APP", "ADDRESS", "POP"].map(String::from).to_vec()];
            let found = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, Option<String>>(0)?.unwrap_or_default(),
                    r.get::<_, Option<String>>(1)?.unwrap_or_default(),
                    r.get::<_, Option<String>>(2)?.unwrap_or_default(),
                    r.get::<_, Option<i64>>(3)?.unwrap_or_default(),
                ))
            })?;
            for (id, app, ip, port) in found.filter_map(Result::ok) {
                let Ok(IpAddr::V6(v6)) = ip.parse::<IpAddr>() else {
                    continue;
                };
                if !six.cluster.contains(&v6) {
                    continue;
                }
                let owner = owner_of(&pops, &v6).unwrap_or_else(|| "-".into());
                rows.push(vec![id, app, format!("[{v6}]:{port}"), owner]);
            }
            print!("{}", table(&rows));
        }
    }
    Ok(())
}

fn owner_of(pops: &[(String, PopPrefix)], ip: &Ipv6Addr) -> Option<String> {
    pops.iter()
        .find(|(_, p)| p.contains(ip))
        .map(|(id, _)| id.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::status::{PeerView, SkippedView};

    #[test]
    fn status_lists_peers_and_the_pops_left_out() {
        let s = MeshStatus {
            enabled: true,
            implementation: "embedded".into(),
            interface: "ep6pn".into(),
            public_key: "PUB".into(),
            listen_port: 51820,
            endpoint: "10.0.0.1:51820".into(),
            cluster_prefix: "fd12:3456:789a::/48".into(),
            cluster_prefix_derived: true,
            prefix: "fd12:3456:789a:1::/64".into(),
            address: "fd12:3456:789a:1::1".into(),
            peers: vec![
                PeerView {
                    node_id: Some("fra-1".into()),
                    public_key: "K1".into(),
                    endpoint: Some("10.0.0.2:51820".into()),
                    allowed_ips: vec!["fd12:3456:789a:2::/64".into()],
                    last_handshake_secs: Some(4),
                    rx_bytes: 2048,
                    tx_bytes: 10,
                    persistent_keepalive_secs: Some(25),
                    path_up: Some(false),
                    probe_rtt_secs: Some(0.0213),
                    probes_lost: Some(3),
                },
                PeerView {
                    public_key: "K2".into(),
                    ..Default::default()
                },
            ],
            skipped: vec![SkippedView {
                node_id: "nrt-1".into(),
                reason: "membership says it is down".into(),
            }],
            ..Default::default()
        };
        let text = render_status(&serde_json::to_value(&s).unwrap());
        assert!(text.contains("interface ep6pn (embedded)"), "{text}");
        assert!(text.contains("derived from the cluster secret"), "{text}");
        assert!(text.contains("path probes: off"), "{text}");
        let fra = text.lines().find(|l| l.starts_with("fra-1")).unwrap();
        for cell in [
            "10.0.0.2:51820",
            "fd12:3456:789a:2::/64",
            "4s ago",
            " DOWN ",
            " 21.3ms ",
            "2.0 KiB",
            "10 B",
        ] {
            assert!(fra.contains(cell), "{cell} missing in {fra}");
        }
        let k2 = text.lines().find(|l| l.starts_with("K2")).unwrap();
        assert!(k2.contains("never"), "{k2}");
        assert!(text.contains("nrt-1: membership says it is down"), "{text}");
        assert_eq!(
            render_status(&serde_json::json!({"enabled": false})),
            "the mesh is off on this POP ([mesh] enabled = false)\n"
        );
    }
}
