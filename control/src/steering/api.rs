//! The steering endpoints of the discovery API, as plain functions the HTTP
//! layer (`crate::api`) routes to: `GET /api/v1/pop`, `POST
//! /api/v1/pop/drain`, `POST /api/v1/pop/undrain`, `GET /api/v1/bgp`.
//! Each returns the HTTP status and the JSON body.

use serde_json::{json, Value};

use super::Handle;

fn unavailable() -> (u16, Value) {
    (
        503,
        json!({"error": "this POP's steering state is not available (still starting, or stopping)"}),
    )
}

/// `GET /api/v1/pop`: this POP's steering state.
pub fn pop(handle: Option<&Handle>) -> (u16, Value) {
    match handle {
        Some(h) => (200, json!(h.status())),
        None => unavailable(),
    }
}

/// `POST /api/v1/pop/drain` (`on`) and `/undrain`: answers once the drain
/// is recorded in this POP's row (replicated to the other POPs at once);
/// the BGP withdrawal follows after the drain delay.
pub async fn drain(handle: Option<&Handle>, on: bool) -> (u16, Value) {
    let Some(h) = handle else {
        return unavailable();
    };
    match h.drain(on).await {
        Ok(status) => (200, json!(status)),
        Err(e) => (503, json!({"error": e.to_string()})),
    }
}

/// `GET /api/v1/bgp`: the speaker's sessions and announcement.
pub fn bgp(handle: Option<&Handle>) -> (u16, Value) {
    match handle.map(|h| h.bgp_status()) {
        Some(Some(status)) => (200, json!(status)),
        Some(None) => (200, json!({"enabled": false})),
        None => unavailable(),
    }
}
