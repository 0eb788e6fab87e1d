//! `edgeproxy bgp status`: the speaker's sessions and announcement from a
//! running POP's API (`GET /api/v1/bgp`), as a table or as JSON.

use std::path::Path;

use clap::{Args, Subcommand};
use serde_json::Value;

use super::status::BgpStatus;
use crate::api::client::ApiArgs;

#[derive(Debug, Args)]
pub struct BgpArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(subcommand)]
    pub action: BgpAction,
}

#[derive(Debug, Subcommand)]
pub enum BgpAction {
    /// The announcement (announced, draining, withdrawn, and why) and every
    /// session: state, uptime, negotiated hold time, prefixes announced.
    Status,
}

/// `config`: `--config`, where the API's address and token are found.
pub fn run(args: BgpArgs, config: Option<&Path>) -> anyhow::Result<()> {
    let body = args.api.client(config)?.call("GET", "/api/v1/bgp", None)?;
    match args.action {
        BgpAction::Status if args.api.json => println!("{}", serde_json::to_string_pretty(&body)?),
        BgpAction::Status => print!("{}", render(&body)),
    }
    Ok(())
}

/// `1h2m3s`, `4m5s`, `6s`.
pub fn duration_text(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

pub fn render(body: &Value) -> String {
    if body["enabled"] != Value::Bool(true) {
        return "BGP is off on this POP ([bgp] enabled = false)\n".into();
    }
    let s: BgpStatus = match serde_json::from_value(body.clone()) {
        Ok(s) => s,
        Err(e) => return format!("unexpected answer from the API: {e}\n"),
    };
    let mut out = format!(
        "BGP: AS {}, router id {}; prefixes {}\nannouncement: {}",
        s.local_asn,
        s.router_id,
        s.prefixes.join(", "),
        s.phase
    );
    if let Some(r) = &s.reason {
        out.push_str(&format!(" ({r})"));
    }
    if let Some(ms) = s.withdraw_in_ms {
        out.push_str(&format!(", withdrawn in {:.1} s", ms as f64 / 1000.0));
    }
    out.push_str(&format!(
        "\nsessions: {} of {} established\n\n",
        s.established(),
        s.neighbors.len()
    ));
    let dash = || "-".to_string();
    let mut rows = vec![[
        "NEIGHBOR",
        "ASN",
        "STATE",
        "UPTIME",
        "HOLD",
        "MD5",
        "BFD",
        "PREFIXES",
        "GSHUT",
        "UPDATES",
        "FLAPS",
        "LAST ERROR",
    ]
    .map(String::from)
    .to_vec()];
    for n in &s.neighbors {
        rows.push(vec![
            n.neighbor.clone(),
            n.asn.to_string(),
            n.state.clone(),
            n.uptime_secs.map(duration_text).unwrap_or_else(dash),
            n.hold_time_secs
                .map(|h| format!("{h}s"))
                .unwrap_or_else(dash),
            if n.tcp_md5 { "on" } else { "off" }.to_string(),
            match &n.bfd {
                None => dash(),
                Some(state) if n.bfd_downs > 0 => format!("{state} ({} down)", n.bfd_downs),
                Some(state) => state.clone(),
            },
            n.prefixes_announced.to_string(),
            if n.graceful_shutdown { "yes" } else { "no" }.to_string(),
            n.updates_sent.to_string(),
            n.flaps.to_string(),
            n.last_error.clone().unwrap_or_else(dash),
        ]);
    }
    out.push_str(&crate::steering::cli::table(&rows));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bgp::status::NeighborStatus;

    #[test]
    fn renders_the_phase_and_one_row_per_neighbor() {
        let status = BgpStatus {
            enabled: true,
            local_asn: 65010,
            router_id: "192.0.2.10".into(),
            prefixes: vec!["198.51.100.0/24".into()],
            phase: "draining".into(),
            reason: Some("drained by the operator".into()),
            withdraw_in_ms: Some(3200),
            neighbors: vec![
                NeighborStatus {
                    neighbor: "192.0.2.1".into(),
                    asn: 65000,
                    state: "established".into(),
                    uptime_secs: Some(3723),
                    hold_time_secs: Some(9),
                    tcp_md5: true,
                    prefixes_announced: 1,
                    graceful_shutdown: true,
                    updates_sent: 2,
                    bfd: Some("up".into()),
                    bfd_downs: 1,
                    ..NeighborStatus::default()
                },
                NeighborStatus {
                    neighbor: "192.0.2.2".into(),
                    asn: 65001,
                    state: "active".into(),
                    last_error: Some("connect: connection refused".into()),
                    ..NeighborStatus::default()
                },
            ],
        };
        let text = render(&serde_json::to_value(&status).unwrap());
        assert!(text.contains("AS 65010, router id 192.0.2.10"), "{text}");
        assert!(
            text.contains("announcement: draining (drained by the operator), withdrawn in 3.2 s"),
            "{text}"
        );
        assert!(text.contains("sessions: 1 of 2 established"), "{text}");
        let up = text.lines().find(|l| l.starts_with("192.0.2.1 ")).unwrap();
        for cell in [
            "65000",
            "established",
            "1h2m3s",
            "9s",
            " on ",
            "yes",
            "up (1 down)",
        ] {
            assert!(up.contains(cell), "{cell} missing in {up}");
        }
        let down = text.lines().find(|l| l.starts_with("192.0.2.2")).unwrap();
        assert!(
            down.contains("connection refused") && down.contains(" off "),
            "{down}"
        );
        assert_eq!(
            render(&serde_json::json!({"enabled": false})),
            "BGP is off on this POP ([bgp] enabled = false)\n"
        );
    }
}
