//! `edgeproxy cluster status`: replication's view of the cluster from a
//! running POP's API (`GET /api/v1/cluster`), as a table or as JSON; and
//! `edgeproxy cluster forget` (`DELETE /api/v1/cluster/members/{id}`).

use std::path::Path;

use clap::{Args, Subcommand};
use serde_json::Value;

use super::status::ClusterStatus;

#[derive(Debug, Args)]
pub struct ClusterArgs {
    #[command(flatten)]
    pub api: crate::api::client::ApiArgs,
    #[command(subcommand)]
    pub action: ClusterAction,
}

#[derive(Debug, Subcommand)]
pub enum ClusterAction {
    /// This POP and every member it knows: state (alive, suspect, down),
    /// round trip, last anti-entropy exchange, lag, schema version.
    Status,
    /// Forget a POP decommissioned for good: it leaves the member list
    /// (status, metrics) and the pops table here, and the deletion
    /// replicates so that every POP forgets it. Refused while the POP is
    /// alive or suspect: stop it first and wait until `cluster status`
    /// shows it down. If it ever starts again, it rejoins as a new member.
    Forget {
        /// The node id of the POP to forget (`replication.node_id`).
        #[arg(value_name = "NODE_ID")]
        node_id: String,
    },
}

/// `config`: `--config`, where the API's address and token are found.
pub fn run(args: ClusterArgs, config: Option<&Path>) -> anyhow::Result<()> {
    let client = args.api.client(config)?;
    let body = match &args.action {
        ClusterAction::Status => client.call("GET", "/api/v1/cluster", None)?,
        ClusterAction::Forget { node_id } => client.call(
            "DELETE",
            &format!("/api/v1/cluster/members/{}", percent_encode(node_id)),
            None,
        )?,
    };
    match args.action {
        _ if args.api.json => println!("{}", serde_json::to_string_pretty(&body)?),
        ClusterAction::Status => print!("{}", render(&body)),
        ClusterAction::Forget { node_id } if body["replicated"] == Value::Bool(false) => {
            println!("{node_id} was already forgotten")
        }
        ClusterAction::Forget { node_id } => println!(
            "forgot {node_id}: no longer a member here; every other POP forgets it as the \
             deletion of its pops row reaches it"
        ),
    }
    Ok(())
}

/// A node id for a URL path (ids are letters, digits, `-_.`, but the
/// command line may pass anything: the API then says it is unknown).
fn percent_encode(id: &str) -> String {
    id.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The status as text: a header line about this node, then one row per
/// member.
pub fn render(body: &Value) -> String {
    if body["enabled"] != Value::Bool(true) {
        return "replication is off on this POP ([replication] enabled = false)\n".into();
    }
    let s: ClusterStatus = match serde_json::from_value(body.clone()) {
        Ok(s) => s,
        Err(e) => return format!("unexpected answer from the API: {e}\n"),
    };
    let (alive, suspect, down) = s.by_state();
    let mut out = format!(
        "node {} in cluster {} (schema {}), gossip {}, transport {}\n\
         {} rows, digest {}; members: {alive} alive, {suspect} suspect, {down} down\n\n",
        s.node_id, s.cluster, s.schema_version, s.gossip_addr, s.transport_addr, s.rows, s.digest
    );
    if let Some(error) = &s.store_error {
        // Above the table: the rows below may be what this POP is missing.
        out.insert_str(
            out.len() - 1,
            &format!(
                "routing.db NOT WRITABLE: {error}\n  (routing from the last table; rows from other POPs are written once it is)\n"
            ),
        );
    }
    if s.accepting_second_secret {
        out.insert_str(
            out.len() - 1,
            &format!(
                "secret rotation: also accepting POPs that hold accept_secret; {} gossip datagrams \
                 opened under it so far (flat everywhere: no POP uses it any more)\n",
                s.counters.gossip_accepted_secret
            ),
        );
    }
    let mut rows = vec![[
        "NODE",
        "NAME",
        "REGION",
        "STATE",
        "RTT",
        "LAST SYNC",
        "IN SYNC",
        "LAG",
        "GOSSIP",
    ]
    .map(String::from)
    .to_vec()];
    let dash = || "-".to_string();
    for m in &s.members {
        rows.push(vec![
            m.node_id.clone(),
            m.name.clone().unwrap_or_else(dash),
            m.region.clone().unwrap_or_else(dash),
            m.state.clone(),
            m.rtt_ms.map(|r| format!("{r:.1}ms")).unwrap_or_else(dash),
            m.last_sync_secs
                .map(|t| format!("{t}s ago"))
                .unwrap_or_else(dash),
            match m.in_sync {
                Some(true) => "yes",
                Some(false) => "no",
                // No exchange with it yet since this POP started.
                None => "-",
            }
            .to_string(),
            m.lag_ms.map(|l| format!("{l}ms")).unwrap_or_else(dash),
            m.gossip_addr.clone(),
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for row in &rows {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::status::MemberView;

    #[test]
    fn renders_members_with_missing_values_as_dashes() {
        let status = ClusterStatus {
            enabled: true,
            node_id: "gru-1".into(),
            cluster: "prod".into(),
            schema_version: 3,
            rows: 12,
            digest: "00ff".into(),
            members: vec![
                MemberView {
                    node_id: "fra-1".into(),
                    name: Some("pop-fra".into()),
                    region: Some("eu".into()),
                    state: "alive".into(),
                    rtt_ms: Some(101.25),
                    last_sync_secs: Some(1),
                    in_sync: Some(true),
                    lag_ms: Some(52),
                    gossip_addr: "10.0.0.2:4001".into(),
                    ..MemberView::default()
                },
                MemberView {
                    node_id: "syd-1".into(),
                    state: "alive".into(),
                    in_sync: None,
                    gossip_addr: "10.0.0.4:4001".into(),
                    ..MemberView::default()
                },
                MemberView {
                    node_id: "nrt-1".into(),
                    state: "down".into(),
                    in_sync: Some(false),
                    gossip_addr: "10.0.0.3:4001".into(),
                    ..MemberView::default()
                },
            ],
            ..ClusterStatus::default()
        };
        let text = render(&serde_json::to_value(&status).unwrap());
        assert!(
            text.contains("node gru-1 in cluster prod (schema 3)"),
            "{text}"
        );
        assert!(!text.contains("secret rotation"), "{text}");
        let mut rotating = status.clone();
        rotating.accepting_second_secret = true;
        rotating.counters.gossip_accepted_secret = 42;
        let text = render(&serde_json::to_value(&rotating).unwrap());
        assert!(
            text.contains(
                "secret rotation: also accepting POPs that hold accept_secret; 42 gossip"
            ),
            "{text}"
        );
        assert!(text.contains("2 alive, 0 suspect, 1 down"), "{text}");
        let fra = text.lines().find(|l| l.starts_with("fra-1")).unwrap();
        for cell in ["pop-fra", "eu", "alive", "101.2ms", "1s ago", "yes", "52ms"] {
            assert!(fra.contains(cell), "{cell} missing in {fra}");
        }
        let nrt = text.lines().find(|l| l.starts_with("nrt-1")).unwrap();
        assert!(nrt.contains("down") && nrt.contains(" - "), "{nrt}");
        assert!(nrt.contains(" no "), "{nrt}");
        // No exchange with it yet: neither "yes" nor "no".
        let syd = text.lines().find(|l| l.starts_with("syd-1")).unwrap();
        assert!(!syd.contains(" no ") && !syd.contains(" yes "), "{syd}");
        assert!(!text.contains("NOT WRITABLE"), "{text}");
        let full = ClusterStatus {
            store_error: Some("database or disk is full".into()),
            ..status
        };
        let text = render(&serde_json::to_value(&full).unwrap());
        let said = text
            .lines()
            .position(|l| l.contains("routing.db NOT WRITABLE: database or disk is full"));
        let table = text.lines().position(|l| l.starts_with("NODE"));
        assert!(said.is_some() && said < table, "{text}");
        assert_eq!(
            render(&serde_json::json!({"enabled": false})),
            "replication is off on this POP ([replication] enabled = false)\n"
        );
    }
}
