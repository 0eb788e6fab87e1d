//! Where the process is in its life, for probes and service managers:
//! starting, ready (every listener bound and a routing table loaded), or
//! draining (stopped accepting after SIGTERM/SIGINT, open connections
//! finishing).
//!
//! Served on the metrics listener: `GET /ready` answers 200 `ready` when
//! ready and 503 `starting` / `draining` otherwise (a load balancer or a
//! Kubernetes readiness probe stops sending traffic during a drain);
//! `GET /live` answers 200 `live` as long as the control thread serves
//! requests, draining included (a liveness probe must not kill a proxy
//! that is finishing its connections). The discovery API's `/health`
//! follows `/ready` (see `api::http`).
//!
//! Ready is not withdrawn by a listener that a reload (SIGHUP, config
//! watch) added but could not start (its port in use): the listeners that
//! were serving still serve, and a 503 would have the load balancer take
//! them out too, turning a bad config edit into an outage. Such a listener
//! is kept here ([`Readiness::set_not_listening`]) for `/metrics`
//! (`edgeproxy_listener_up 0`), the body of `/ready` (still 200) and the
//! systemd status, and every later reload tries to start it again.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;

/// The phases, in the order a process goes through them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Starting = 0,
    Ready = 1,
    Draining = 2,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Ready => "ready",
            Phase::Draining => "draining",
        }
    }
}

/// The process's phase, shared by whoever reports it. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    phase: Arc<AtomicU8>,
    /// Listeners the configuration asks for that are not running (their
    /// start at a reload failed), by name.
    not_listening: Arc<Mutex<Vec<String>>>,
}

impl Readiness {
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Relaxed) {
            0 => Phase::Starting,
            1 => Phase::Ready,
            _ => Phase::Draining,
        }
    }

    pub fn set_ready(&self) {
        self.phase.store(Phase::Ready as u8, Ordering::Relaxed);
    }

    /// Draining is final: nothing goes back to ready.
    pub fn set_draining(&self) {
        self.phase.store(Phase::Draining as u8, Ordering::Relaxed);
    }

    /// Records the listeners the configuration asks for that are not
    /// running, after a reload (empty: all are).
    pub fn set_not_listening(&self, names: Vec<String>) {
        *self.not_listening.lock().unwrap_or_else(|p| p.into_inner()) = names;
    }

    /// What [`Readiness::set_not_listening`] last recorded.
    pub fn not_listening(&self) -> Vec<String> {
        self.not_listening
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// `(status, body)` of `GET /ready`. Ready stays 200 with a listener
    /// not running (see the module docs); the body names it.
    pub fn ready_answer(&self) -> (StatusCode, String) {
        match self.phase() {
            Phase::Ready => {
                let missing = self.not_listening();
                if missing.is_empty() {
                    (StatusCode::OK, "ready\n".into())
                } else {
                    let names = missing.join(", ");
                    let body = format!("ready; not listening (start failed, retried at the next reload): {names}\n");
                    (StatusCode::OK, body)
                }
            }
            Phase::Starting => (StatusCode::SERVICE_UNAVAILABLE, "starting\n".into()),
            Phase::Draining => (StatusCode::SERVICE_UNAVAILABLE, "draining\n".into()),
        }
    }
}

/// `/ready` and `/live`, to merge into the metrics listener's router.
pub fn routes(readiness: Readiness) -> Router {
    Router::new()
        .route(
            "/ready",
            get(move || {
                let readiness = readiness.clone();
                async move { readiness.ready_answer() }
            }),
        )
        .route("/live", get(|| async { (StatusCode::OK, "live\n") }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starting_then_ready_then_draining_for_good() {
        let r = Readiness::default();
        assert_eq!(r.ready_answer().0, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.ready_answer().1, "starting\n");
        r.set_ready();
        assert_eq!(r.clone().ready_answer(), (StatusCode::OK, "ready\n".into()));
        r.set_draining();
        assert_eq!(
            r.ready_answer(),
            (StatusCode::SERVICE_UNAVAILABLE, "draining\n".into())
        );
        assert_eq!(r.phase().name(), "draining");
    }

    /// QA: a listener a SIGHUP added with its port in use was never
    /// retried, and nothing but one ERROR line said so.
    #[test]
    fn a_listener_not_running_keeps_ready_and_is_named() {
        let r = Readiness::default();
        r.set_ready();
        r.set_not_listening(vec!["b".into(), "c".into()]);
        let (status, body) = r.ready_answer();
        assert_eq!(status, StatusCode::OK);
        assert!(body.starts_with("ready; not listening"), "{body}");
        assert!(body.ends_with(": b, c\n"), "{body}");
        r.set_not_listening(Vec::new());
        assert_eq!(r.ready_answer(), (StatusCode::OK, "ready\n".into()));
    }
}
