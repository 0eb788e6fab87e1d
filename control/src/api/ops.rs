//! What each API call does to the routing store, run on the control loop.
//!
//! HTTP handlers run as tasks; they turn a request into an [`Op`], send it
//! with a reply channel to the control loop, which owns the
//! [`RoutingReloader`] (and through it the store), and await the [`Reply`].
//! So every read and write of `routing.db` stays on the one thread that owns
//! it, in order, and a write is published (the reloader's `reload`) before
//! the client hears back: a registered backend takes the very next
//! connection.

use std::time::{Duration, SystemTime};

use engine::snapshot::{BackendRecord, RoutingSnapshot};
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::routing::{row_expired, unix_ms, RoutingReloader};
use crate::store::{Lifecycle, Registered};

/// One API call, validated.
#[derive(Debug)]
pub enum Op {
    /// A registration, with the backend's own health-check settings (JSON
    /// text) when it sent some.
    Register(BackendRecord, Option<String>),
    Heartbeat(String),
    Drain(String),
    Deregister(String),
    Get(String),
    List,
}

/// An HTTP status and a JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    /// Sent as `Retry-After` (seconds): the request may succeed if repeated.
    pub retry_after_secs: Option<u64>,
}

impl Reply {
    pub fn new(status: u16, body: Value) -> Reply {
        Reply {
            status,
            body,
            retry_after_secs: None,
        }
    }

    /// `{"error": reason}` plus `extra` fields.
    pub fn error(status: u16, reason: impl Into<String>, extra: Value) -> Reply {
        let mut body = json!({ "error": reason.into() });
        if let (Value::Object(b), Value::Object(e)) = (&mut body, extra) {
            b.extend(e);
        }
        Reply::new(status, body)
    }
}

/// An [`Op`] in flight to the control loop.
#[derive(Debug)]
pub struct Command {
    pub op: Op,
    pub reply: oneshot::Sender<Reply>,
}

/// Runs `cmd` against the store and answers it. Called by the control loop.
pub fn execute(cmd: Command, reloader: &mut RoutingReloader) {
    let reply = run(cmd.op, reloader, SystemTime::now());
    // The client may have gone away; nothing to do then.
    let _ = cmd.reply.send(reply);
}

/// The state of one backend as the API reports it: the original's
/// `BackendStatus` fields (`id, app, region, ip, port, healthy,
/// last_heartbeat_secs, registered_secs`) and more.
fn status(
    rec: &BackendRecord,
    life: &Lifecycle,
    ttl: Option<Duration>,
    now_ms: i64,
    snap: &RoutingSnapshot,
    node_id: Option<&str>,
    health: Option<&crate::health::HealthLink>,
) -> Value {
    let expired = row_expired(life, ttl, now_ms, node_id);
    let secs_since = |t: Option<i64>| t.map(|t| (now_ms.saturating_sub(t).max(0) / 1000) as u64);
    let live = snap.find(&rec.id).map(|idx| snap.backend(idx));
    // Most telling first: an operator's drain, then a missed heartbeat, then
    // the health flag, then "the snapshot builder rejected the row".
    let state = if life.draining {
        "draining"
    } else if expired {
        "expired"
    } else if !rec.healthy {
        "unhealthy"
    } else if live.is_none() {
        "invalid"
    } else {
        "serving"
    };
    json!({
        "id": rec.id,
        "app": rec.app,
        "region": rec.region,
        "country": rec.country,
        "ip": rec.ip,
        "port": rec.port,
        "healthy": rec.healthy && !expired,
        "last_heartbeat_secs": secs_since(life.last_heartbeat_ms),
        "registered_secs": secs_since(life.registered_at_ms),
        "weight": rec.weight,
        "soft_limit": rec.soft_limit,
        "hard_limit": rec.hard_limit,
        "draining": life.draining,
        "expired": expired,
        "heartbeat_pop": life.heartbeat_pop,
        "state": state,
        "active_connections": live.map_or(0, |b| b.active()),
        // This POP's health view (checks, RTT, circuit); null when off.
        "health": health.map_or(Value::Null, |h| h.status_json(&rec.id)),
    })
}

/// `ip:port`, IPv6 in brackets.
fn addr_of(rec: &BackendRecord) -> String {
    if rec.ip.contains(':') {
        format!("[{}]:{}", rec.ip, rec.port)
    } else {
        format!("{}:{}", rec.ip, rec.port)
    }
}

/// A store failure as a client should read it: the database busy (another
/// writer, e.g. an operator's `sqlite3` shell, held its lock past the busy
/// timeout) is 503 with `Retry-After`, worth repeating; the disk full is
/// 507 (Insufficient Storage); anything else 500. Nothing was written.
fn store_failed(e: &crate::store::StoreError) -> Reply {
    use rusqlite::ErrorCode;
    tracing::error!(error = %e, "discovery API: routing store error");
    let code = e
        .sqlite_error()
        .and_then(rusqlite::Error::sqlite_error_code);
    let mut reply = Reply::error(500, format!("routing store error: {e}"), json!({}));
    match code {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
            reply.status = 503;
            reply.retry_after_secs = Some(1);
        }
        Some(ErrorCode::DiskFull) => reply.status = 507,
        _ => {}
    }
    reply
}

fn not_found(id: &str, reason: &str) -> Reply {
    Reply::error(404, reason, json!({ "id": id }))
}

/// Does `op` at `now`. Every write that changes routing is published before
/// this returns.
pub fn run(op: Op, reloader: &mut RoutingReloader, now: SystemTime) -> Reply {
    let now_ms = unix_ms(now);
    match op {
        Op::Register(rec, check) => {
            match reloader
                .store_mut()
                .register(&rec, now_ms)
                .and_then(|outcome| {
                    // A registration states the backend's whole wish: no check
                    // settings in it clears earlier ones.
                    reloader
                        .store_mut()
                        .set_health_check(&rec.id, check.as_deref())?;
                    Ok(outcome)
                }) {
                Err(e) => store_failed(&e),
                Ok(outcome) => {
                    reloader.reload_at(now);
                    let updated = outcome == Registered::Updated;
                    tracing::info!(backend = %rec.id, app = %rec.app, region = %rec.region,
                    addr = %addr_of(&rec), updated, "backend registered");
                    let message = if updated {
                        "Backend updated successfully"
                    } else {
                        "Backend registered successfully"
                    };
                    Reply::new(
                        // 201 only when a backend came into being; an update
                        // of a live registration is a plain 200 (the
                        // original said 201 to both).
                        if updated { 200 } else { 201 },
                        json!({ "id": rec.id, "registered": true, "updated": updated, "message": message,
                                "ip": rec.ip }),
                    )
                }
            }
        }
        Op::Heartbeat(id) => {
            // Routing changes only if the backend was expired: then publish
            // at once. (One that expired since the last reload is still
            // routed; the reload its deadline triggers reads this heartbeat.)
            let was_expired = reloader.expired(&id);
            match reloader.store_mut().heartbeat(&id, now_ms) {
                Err(e) => store_failed(&e),
                Ok(false) => not_found(&id, "backend not registered"),
                Ok(true) => {
                    if was_expired {
                        reloader.reload_at(now);
                    }
                    tracing::debug!(backend = %id, "heartbeat");
                    Reply::new(200, json!({ "id": id, "status": "ok" }))
                }
            }
        }
        Op::Drain(id) => match reloader.store_mut().set_draining(&id, true) {
            Err(e) => store_failed(&e),
            Ok(false) => not_found(&id, "backend not found"),
            Ok(true) => {
                reloader.reload_at(now);
                let snap = reloader.handle().load();
                let active = snap.find(&id).map_or(0, |i| snap.backend(i).active());
                tracing::info!(backend = %id, active, "backend draining: no new connections, open ones go on");
                Reply::new(
                    200,
                    json!({ "id": id, "draining": true, "active_connections": active }),
                )
            }
        },
        Op::Deregister(id) => match reloader.store_mut().deregister(&id) {
            Err(e) => store_failed(&e),
            Ok(false) => not_found(&id, "backend not found"),
            Ok(true) => {
                reloader.reload_at(now);
                tracing::info!(backend = %id, "backend deregistered");
                Reply::new(200, json!({ "id": id, "deregistered": true }))
            }
        },
        Op::Get(id) => {
            let ttl = reloader.heartbeat_ttl();
            let snap = reloader.handle().load_full();
            let health = reloader.health().cloned();
            let store = reloader.store_mut();
            let node = store.node_id().map(String::from);
            match store.peek() {
                Err(e) => store_failed(&e),
                Ok(loaded) => loaded
                    .records
                    .iter()
                    .zip(&loaded.lifecycle)
                    .find(|(r, _)| r.id == id && !r.deleted)
                    .map(|(r, l)| {
                        Reply::new(
                            200,
                            status(r, l, ttl, now_ms, &snap, node.as_deref(), health.as_ref()),
                        )
                    })
                    .unwrap_or_else(|| not_found(&id, "backend not found")),
            }
        }
        Op::List => {
            let ttl = reloader.heartbeat_ttl();
            let snap = reloader.handle().load_full();
            let health = reloader.health().cloned();
            let store = reloader.store_mut();
            let node = store.node_id().map(String::from);
            match store.peek() {
                Err(e) => store_failed(&e),
                Ok(loaded) => {
                    let backends: Vec<Value> = loaded
                        .records
                        .iter()
                        .zip(&loaded.lifecycle)
                        .filter(|(r, _)| !r.deleted)
                        .map(|(r, l)| {
                            status(r, l, ttl, now_ms, &snap, node.as_deref(), health.as_ref())
                        })
                        .collect();
                    let total = backends.len();
                    Reply::new(200, json!({ "backends": backends, "total": total }))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RoutingStore;

    const TTL: Duration = Duration::from_secs(30);

    fn reloader(dir: &tempfile::TempDir) -> RoutingReloader {
        let store = RoutingStore::open(&dir.path().join("routing.db")).unwrap();
        RoutingReloader::start_with_ttl(store, Some(TTL)).unwrap()
    }

    fn registration(id: &str, port: u16) -> Op {
        let body =
            format!(r#"{{"id":"{id}","app":"web","region":"eu","ip":"127.0.0.1","port":{port}}}"#);
        Op::Register(
            super::super::validate::registration(body.as_bytes()).unwrap(),
            None,
        )
    }

    fn routed_healthy(r: &RoutingReloader, id: &str) -> Option<bool> {
        let snap = r.handle().load();
        snap.find(id).map(|i| snap.backend(i).healthy)
    }

    #[test]
    fn register_publishes_at_once_with_the_originals_answer() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = reloader(&dir);
        let t0 = SystemTime::now();
        let reply = run(registration("b1", 9001), &mut r, t0);
        assert_eq!(reply.status, 201);
        assert_eq!(reply.body["id"], "b1");
        assert_eq!(reply.body["registered"], true);
        assert_eq!(reply.body["message"], "Backend registered successfully");
        assert_eq!(
            routed_healthy(&r, "b1"),
            Some(true),
            "published before the reply"
        );

        // Same id again: updated in place, 200 (not created).
        let reply = run(registration("b1", 9002), &mut r, t0);
        assert_eq!((reply.status, &reply.body["updated"]), (200, &json!(true)));
        assert_eq!(reply.body["message"], "Backend updated successfully");
        let snap = r.handle().load();
        assert_eq!(snap.backend(snap.find("b1").unwrap()).addr.port(), 9002);
    }

    #[test]
    fn status_has_the_originals_fields_and_more() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = reloader(&dir);
        let t0 = SystemTime::now();
        run(registration("b1", 9001), &mut r, t0);
        let reply = run(Op::Get("b1".into()), &mut r, t0 + Duration::from_secs(5));
        assert_eq!(reply.status, 200);
        let b = &reply.body;
        for field in [
            "id",
            "app",
            "region",
            "ip",
            "port",
            "healthy",
            "last_heartbeat_secs",
            "registered_secs",
        ] {
            assert!(b.get(field).is_some(), "{field} missing from {b}");
        }
        assert_eq!(b["last_heartbeat_secs"], 5);
        assert_eq!(
            (
                b["weight"].as_i64(),
                b["soft_limit"].as_i64(),
                b["hard_limit"].as_i64()
            ),
            (Some(2), Some(100), Some(150))
        );
        assert_eq!(b["state"], "serving");
        assert_eq!(b["country"], Value::Null);

        let list = run(Op::List, &mut r, t0);
        assert_eq!(list.body["total"], 1);
        assert_eq!(list.body["backends"][0]["id"], "b1");

        let missing = run(Op::Get("nope".into()), &mut r, t0);
        assert_eq!(
            (missing.status, &missing.body["error"]),
            (404, &json!("backend not found"))
        );
    }

    #[test]
    fn unknown_ids_are_404_with_the_originals_messages() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = reloader(&dir);
        let now = SystemTime::now();
        let hb = run(Op::Heartbeat("x".into()), &mut r, now);
        assert_eq!(
            (hb.status, &hb.body),
            (404, &json!({"id": "x", "error": "backend not registered"}))
        );
        for op in [Op::Deregister("x".into()), Op::Drain("x".into())] {
            let reply = run(op, &mut r, now);
            assert_eq!(
                (reply.status, &reply.body["error"]),
                (404, &json!("backend not found"))
            );
        }
    }

    #[test]
    fn lifecycle_drain_expiry_revival_deregistration() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = reloader(&dir);
        let t0 = SystemTime::now();
        run(registration("b1", 9001), &mut r, t0);
        run(registration("b2", 9002), &mut r, t0);

        // Drain b1: routed unhealthy, listed as draining.
        let reply = run(Op::Drain("b1".into()), &mut r, t0);
        assert_eq!((reply.status, &reply.body["draining"]), (200, &json!(true)));
        assert_eq!(routed_healthy(&r, "b1"), Some(false));
        assert_eq!(
            run(Op::Get("b1".into()), &mut r, t0).body["state"],
            "draining"
        );

        // b2 misses its heartbeats: expired at the TTL, kept and listed.
        let t1 = t0 + TTL;
        r.tick_at(t1);
        assert_eq!(routed_healthy(&r, "b2"), Some(false));
        let b2 = run(Op::Get("b2".into()), &mut r, t1).body;
        assert_eq!(
            (&b2["state"], &b2["healthy"], &b2["expired"]),
            (&json!("expired"), &json!(false), &json!(true))
        );

        // Its next heartbeat puts it back at once.
        let hb = run(Op::Heartbeat("b2".into()), &mut r, t1);
        assert_eq!(
            (hb.status, &hb.body),
            (200, &json!({"id": "b2", "status": "ok"}))
        );
        assert_eq!(routed_healthy(&r, "b2"), Some(true));

        // Deregistered: gone from routing and from the API.
        let reply = run(Op::Deregister("b2".into()), &mut r, t1);
        assert_eq!(
            (reply.status, &reply.body),
            (200, &json!({"id": "b2", "deregistered": true}))
        );
        assert_eq!(routed_healthy(&r, "b2"), None);
        assert_eq!(run(Op::Get("b2".into()), &mut r, t1).status, 404);
        assert_eq!(run(Op::Heartbeat("b2".into()), &mut r, t1).status, 404);
        assert_eq!(run(Op::List, &mut r, t1).body["total"], 1);
    }
}
