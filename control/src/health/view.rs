//! What operators see of health: the `health` object of each backend in
//! `GET /api/v1/backends` (and so in `edgeproxy backends list`), and the
//! health metric families.

use std::fmt::Write as _;
use std::time::Instant;

use serde_json::{json, Value};

use super::state::CircuitState;
use super::{HealthLink, CHANGES};

impl HealthLink {
    /// The `health` object of backend `id`: `null` when it is not watched.
    pub fn status_json(&self, id: &str) -> Value {
        let checker = self.checker();
        let Some((h, settings)) = checker.health(id) else {
            return Value::Null;
        };
        let now = Instant::now();
        let last = h.last_check.as_ref().map(|(at, outcome)| {
            json!({
                "ago_ms": now.saturating_duration_since(*at).as_millis() as u64,
                "ok": outcome.ok,
                "error": outcome.error,
            })
        });
        let circuit_until_ms = match h.circuit {
            CircuitState::Open { until } => {
                Some(until.saturating_duration_since(now).as_millis() as u64)
            }
            _ => None,
        };
        json!({
            "state": if h.excluded() { "down" } else { "up" },
            "checks": if settings.enabled { Some(settings.kind.name()) } else { None },
            "status": h.status.name(),
            "last_check": last,
            "rtt_ms": h.rtt_ewma.map(|d| (d.as_secs_f64() * 1e6).round() / 1e3),
            "consecutive_failures": h.consecutive_failures,
            "consecutive_successes": h.consecutive_successes,
            "circuit": h.circuit.name(),
            "circuit_reopens_in_ms": circuit_until_ms,
            "passive_failures": h.passive_failures,
            "ejections": h.ejections,
        })
    }

    /// The health metric families, in Prometheus text format.
    pub fn render_metrics(&self, out: &mut String) {
        let counts = self.transitions();
        let _ = writeln!(
            out,
            "# HELP edgeproxy_health_transitions_total Backend health transitions, by event.\n\
             # TYPE edgeproxy_health_transitions_total counter"
        );
        for (name, n) in CHANGES.iter().zip(counts) {
            let _ = writeln!(
                out,
                "edgeproxy_health_transitions_total{{event=\"{name}\"}} {n}"
            );
        }
        let checker = self.checker();
        let _ = writeln!(
            out,
            "# HELP edgeproxy_health_checks_total Active health checks run.\n\
             # TYPE edgeproxy_health_checks_total counter\n\
             edgeproxy_health_checks_total {}\n\
             # HELP edgeproxy_health_check_failures_total Active health checks that failed.\n\
             # TYPE edgeproxy_health_check_failures_total counter\n\
             edgeproxy_health_check_failures_total {}\n\
             # HELP edgeproxy_health_checks_not_run_total Active health checks that could not run on this host (no local port, descriptor or memory); they count for nothing.\n\
             # TYPE edgeproxy_health_checks_not_run_total counter\n\
             edgeproxy_health_checks_not_run_total {}\n\
             # HELP edgeproxy_health_checks_in_flight Active health checks running now.\n\
             # TYPE edgeproxy_health_checks_in_flight gauge\n\
             edgeproxy_health_checks_in_flight {}\n\
             # HELP edgeproxy_health_passive_events_total Passive events (connect failures, resets, watched successes) the checker received.\n\
             # TYPE edgeproxy_health_passive_events_total counter\n\
             edgeproxy_health_passive_events_total {}",
            checker.checks,
            checker.check_failures,
            checker.checks_not_run,
            checker.in_flight(),
            self.passive_events(),
        );
        let mut rows: Vec<_> = checker.iter().collect();
        rows.sort_by(|a, b| a.0.id.cmp(&b.0.id));
        let family = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        family(
            out,
            "edgeproxy_backend_health_up",
            "gauge",
            "1 while this POP's health view keeps the backend in rotation (checks up, circuit not open).",
        );
        for (t, h) in &rows {
            let _ = writeln!(
                out,
                "edgeproxy_backend_health_up{{backend=\"{}\",app=\"{}\"}} {}",
                escape(&t.id),
                escape(&t.app),
                u8::from(!h.excluded())
            );
        }
        family(
            out,
            "edgeproxy_backend_circuit_state",
            "gauge",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
        );
        for (t, h) in &rows {
            let v = match h.circuit {
                CircuitState::Closed => 0,
                CircuitState::HalfOpen => 1,
                CircuitState::Open { .. } => 2,
            };
            let _ = writeln!(
                out,
                "edgeproxy_backend_circuit_state{{backend=\"{}\",app=\"{}\"}} {v}",
                escape(&t.id),
                escape(&t.app)
            );
        }
        family(
            out,
            "edgeproxy_backend_check_rtt_seconds",
            "gauge",
            "Moving average of the active checks' round-trip time.",
        );
        for (t, h) in &rows {
            if let Some(rtt) = h.rtt_ewma {
                let _ = writeln!(
                    out,
                    "edgeproxy_backend_check_rtt_seconds{{backend=\"{}\",app=\"{}\"}} {}",
                    escape(&t.id),
                    escape(&t.app),
                    rtt.as_secs_f64()
                );
            }
        }
        family(
            out,
            "edgeproxy_backend_check_consecutive_failures",
            "gauge",
            "Active checks failed in a row.",
        );
        for (t, h) in &rows {
            let _ = writeln!(
                out,
                "edgeproxy_backend_check_consecutive_failures{{backend=\"{}\",app=\"{}\"}} {}",
                escape(&t.id),
                escape(&t.app),
                h.consecutive_failures
            );
        }
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
