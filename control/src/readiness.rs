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

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

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
pub struct Readiness(Arc<AtomicU8>);

impl Readiness {
    pub fn phase(&self) -> Phase {
        match self.0.load(Ordering::Relaxed) {
            0 => Phase::Starting,
            1 => Phase::Ready,
            _ => Phase::Draining,
        }
    }

    pub fn set_ready(&self) {
        self.0.store(Phase::Ready as u8, Ordering::Relaxed);
    }

    /// Draining is final: nothing goes back to ready.
    pub fn set_draining(&self) {
        self.0.store(Phase::Draining as u8, Ordering::Relaxed);
    }

    /// `(status, body)` of `GET /ready`.
    pub fn ready_answer(&self) -> (StatusCode, &'static str) {
        match self.phase() {
            Phase::Ready => (StatusCode::OK, "ready\n"),
            Phase::Starting => (StatusCode::SERVICE_UNAVAILABLE, "starting\n"),
            Phase::Draining => (StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
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
        assert_eq!(r.clone().ready_answer(), (StatusCode::OK, "ready\n"));
        r.set_draining();
        assert_eq!(
            r.ready_answer(),
            (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
        );
        assert_eq!(r.phase().name(), "draining");
    }
}
