//! `edgeproxy drain [--wait]`, `edgeproxy undrain` and `edgeproxy pop
//! status`, through a running POP's API.

use std::path::Path;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use serde_json::Value;

use super::status::PopStatus;
use crate::api::client::ApiArgs;

#[derive(Debug, Args)]
pub struct DrainArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// Wait until the anycast routes are withdrawn (the drain delay) before
    /// returning.
    #[arg(long)]
    pub wait: bool,
}

/// `edgeproxy undrain`: no `--wait`, there is nothing to wait for.
#[derive(Debug, Args)]
pub struct UndrainArgs {
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Debug, Args)]
pub struct PopArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(subcommand)]
    pub action: PopAction,
}

#[derive(Debug, Subcommand)]
pub enum PopAction {
    /// Whether this POP can serve and why, whether it is drained, whether
    /// GeoDNS answers it, and its anycast announcement.
    Status,
}

fn parse(body: &Value) -> anyhow::Result<PopStatus> {
    serde_json::from_value(body.clone())
        .map_err(|e| anyhow::anyhow!("unexpected answer from the API: {e}"))
}

/// `edgeproxy drain` (`on`, waiting for the withdrawal with `wait`) and
/// `edgeproxy undrain`. `config`: `--config`, where the API's address and
/// token are found.
pub fn drain(api: ApiArgs, wait: bool, on: bool, config: Option<&Path>) -> anyhow::Result<()> {
    let client = api.client(config)?;
    let path = if on {
        "/api/v1/pop/drain"
    } else {
        "/api/v1/pop/undrain"
    };
    let mut body = client.call("POST", path, None)?;
    if on && wait {
        let s = parse(&body)?;
        let patience =
            Duration::from_millis(s.withdraw_in_ms.unwrap_or(0)) + Duration::from_secs(30);
        let deadline = Instant::now() + patience;
        while parse(&body)?
            .announcement
            .as_deref()
            .is_some_and(|a| a != "withdrawn")
        {
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "the routes were not withdrawn within {} s",
                    patience.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
            body = client.call("GET", "/api/v1/pop", None)?;
        }
    }
    if api.json {
        println!("{}", serde_json::to_string_pretty(&body)?);
    } else {
        print!("{}", render(&parse(&body)?));
    }
    Ok(())
}

pub fn pop(args: PopArgs, config: Option<&Path>) -> anyhow::Result<()> {
    let body = args.api.client(config)?.call("GET", "/api/v1/pop", None)?;
    match args.action {
        PopAction::Status if args.api.json => println!("{}", serde_json::to_string_pretty(&body)?),
        PopAction::Status => print!("{}", render(&parse(&body)?)),
    }
    Ok(())
}

pub fn render(s: &PopStatus) -> String {
    let mut out = format!("pop {} ({}, region {})\n", s.node_id, s.name, s.region);
    out.push_str(&format!(
        "drained:   {}\n",
        match (s.draining, s.shutting_down, s.awaiting_own_row) {
            (_, true, _) => "stopping",
            (true, false, true) => "yes, as routing.db says (not known yet: waiting for the cluster's copy of this POP's row)",
            (false, false, true) => "no, as routing.db says (not known yet: waiting for the cluster's copy of this POP's row)",
            (true, false, false) => "yes (edgeproxy undrain to serve again)",
            (false, false, false) => "no",
        }
    ));
    // No serving listener at all: say where one must be, not an empty list.
    let listeners = match s.listeners.as_slice() {
        [] => "no listener is reachable at the anycast prefixes or [pop] public_addrs: \
               bind one to 0.0.0.0, [::], an anycast or a public address"
            .to_string(),
        names => format!("listeners {}", names.join(", ")),
    };
    out.push_str(&format!(
        "serving:   {} ({}; {listeners})\n",
        if s.serving { "yes" } else { "no" },
        s.verdict,
    ));
    out.push_str(&format!(
        "geodns:    {}\n",
        match (s.geodns, s.geodns_fallback) {
            (true, false) => "answered",
            (true, true) => "answered as the fallback (no POP can serve, this one neither)",
            (false, _) => "left out of answers",
        }
    ));
    if let Some(a) = &s.announcement {
        out.push_str(&format!("anycast:   {a}"));
        if let Some(r) = &s.announcement_reason {
            out.push_str(&format!(" ({r})"));
        }
        if let Some(ms) = s.withdraw_in_ms {
            out.push_str(&format!(", withdrawn in {:.1} s", ms as f64 / 1000.0));
        }
        out.push('\n');
    } else {
        out.push_str("anycast:   off ([bgp] enabled = false)\n");
    }
    out
}

/// Left-aligned columns, two spaces apart, no trailing blanks.
pub fn table(rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..rows.first().map_or(0, Vec::len))
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_drained_pop_with_its_announcement() {
        let s = PopStatus {
            node_id: "gru-1".into(),
            name: "pop-gru".into(),
            region: "sa".into(),
            draining: true,
            serving: true,
            verdict: "serving".into(),
            listeners: vec!["default".into()],
            announcement: Some("draining".into()),
            announcement_reason: Some("drained by the operator".into()),
            withdraw_in_ms: Some(4200),
            ..PopStatus::default()
        };
        let text = render(&s);
        assert!(text.contains("drained:   yes"), "{text}");
        assert!(
            text.contains("serving:   yes (serving; listeners default)"),
            "{text}"
        );
        assert!(text.contains("geodns:    left out of answers"), "{text}");
        assert!(
            text.contains("anycast:   draining (drained by the operator), withdrawn in 4.2 s"),
            "{text}"
        );
        let off = render(&PopStatus::default());
        assert!(off.contains("anycast:   off"), "{off}");
        let starting = render(&PopStatus {
            awaiting_own_row: true,
            ..PopStatus::default()
        });
        assert!(
            starting.contains(
                "drained:   no, as routing.db says (not known yet: waiting for the cluster's copy"
            ),
            "{starting}"
        );
        let fallback = render(&PopStatus {
            geodns: true,
            geodns_fallback: true,
            ..PopStatus::default()
        });
        assert!(
            fallback.contains("geodns:    answered as the fallback"),
            "{fallback}"
        );
    }

    /// QA: with no listener at a wildcard, anycast or public address the
    /// list of serving listeners is empty, and status printed `listeners )`.
    #[test]
    fn no_serving_listener_is_said_not_printed_as_an_empty_list() {
        let s = PopStatus {
            verdict: "the serving listeners are down".into(),
            ..PopStatus::default()
        };
        let text = render(&s);
        assert!(!text.contains("listeners )"), "{text}");
        assert!(
            text.contains(
                "serving:   no (the serving listeners are down; no listener is reachable \
                 at the anycast prefixes or [pop] public_addrs: bind one to 0.0.0.0, [::], \
                 an anycast or a public address)\n"
            ),
            "{text}"
        );
    }
}
