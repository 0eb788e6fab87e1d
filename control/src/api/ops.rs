//! What each API call does to the routing store, run on the control loop.
//!
//! HTTP handlers run as tasks; they turn a request into an [`Op`], send it
//! with a reply channel to the control loop, which owns the
//! [`RoutingReloader`] (and through it the store), and await the [`Reply`].
//! So every read and write of `routing.db` stays on the one thread that owns
//! it, in order, and a write is published (the reloader's `reload`) before
//! the client hears back: a registered backend takes the very next
//! connection.

use std::collections::HashSet;
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
    execute_all(vec![cmd], reloader);
}

/// Runs `cmds` in order and answers them, with one reload for all their
/// writes: a burst of registrations (a fleet starting at once) queued while
/// the previous reload ran costs one full read and rebuild of the table, not
/// one each. Every write is still published before any of them is answered,
/// and a read (`GET`) sees every write queued before it. A read of one
/// backend publishes first only when a write queued before it concerns that
/// backend (a backend's state depends only on its own row): fleet
/// registrations mixed with reads of other backends still share one reload
/// (before, each such read cost a reload of the whole table).
pub fn execute_all(cmds: Vec<Command>, reloader: &mut RoutingReloader) {
    let now = SystemTime::now();
    let mut batch = Batch::default();
    let answers: Vec<_> = cmds
        .into_iter()
        .map(|cmd| (cmd.reply, step(cmd.op, reloader, now, &mut batch)))
        .collect();
    batch.publish(reloader, now);
    // The client may have gone away; nothing to do then.
    for (reply, answer) in answers {
        let _ = reply.send(answer);
    }
}

/// Writes done and not yet published (the backends they concern), with what
/// to log once they are.
#[derive(Default)]
struct Batch {
    unpublished: HashSet<String>,
    logs: Vec<Box<dyn FnOnce()>>,
}

impl Batch {
    /// A write to backend `id` that changes routing: published by the next
    /// [`Batch::publish`], then `log` says so.
    fn wrote(&mut self, id: &str, log: impl FnOnce() + 'static) {
        self.unpublished.insert(id.to_string());
        self.logs.push(Box::new(log));
    }

    /// Whether a write to `id` awaits publishing.
    fn touched(&self, id: &str) -> bool {
        self.unpublished.contains(id)
    }

    /// Publishes the writes so far (one reload) and logs them.
    fn publish(&mut self, reloader: &mut RoutingReloader, now: SystemTime) {
        if !self.unpublished.is_empty() {
            self.unpublished.clear();
            reloader.reload_at(now);
        }
        for log in self.logs.drain(..) {
            log();
        }
    }
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
    // the health flag or this POP's health checks (and circuit breaker),
    // which leave the backend unhealthy in the snapshot, then "the snapshot
    // builder rejected the row".
    let state = if life.draining {
        "draining"
    } else if expired {
        "expired"
    } else if !rec.healthy || live.is_some_and(|b| !b.healthy) {
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
/// 507 (Insufficient Storage), whether the write failed or a store read
/// as it is in the file for want of room refused it; anything else 500.
/// Nothing was written.
fn store_failed(e: &crate::store::StoreError) -> Reply {
    use rusqlite::ErrorCode;
    match e {
        // The store said why at ERROR once; each refusal is not news.
        crate::store::StoreError::NotWritable { .. } => {
            tracing::warn!(error = %e, "discovery API: write refused")
        }
        _ => tracing::error!(error = %e, "discovery API: routing store error"),
    }
    let code = e
        .sqlite_error()
        .and_then(rusqlite::Error::sqlite_error_code);
    let mut reply = Reply::error(500, format!("routing store error: {e}"), json!({}));
    match code {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
            reply.status = 503;
            reply.retry_after_secs = Some(1);
        }
        _ if e.disk_full() => reply.status = 507,
        _ => {}
    }
    reply
}

/// `check` (a registration's `health_check`, canonical JSON) names a
/// command, and this proxy does not run backends' commands (`[health]
/// allow_backend_commands`): anyone who may register would run commands on
/// every POP.
fn names_a_refused_command(reloader: &RoutingReloader, check: &str) -> bool {
    let allowed = reloader
        .health()
        .is_some_and(|h| h.allows_backend_commands());
    !allowed
        && serde_json::from_str::<crate::health::spec::CheckOverride>(check)
            .map_or(true, |layer| layer.command.is_some())
}

fn not_found(id: &str, reason: &str) -> Reply {
    Reply::error(404, reason, json!({ "id": id }))
}

/// Does `op` at `now`. Every write that changes routing is published before
/// this returns.
pub fn run(op: Op, reloader: &mut RoutingReloader, now: SystemTime) -> Reply {
    let mut batch = Batch::default();
    let reply = step(op, reloader, now, &mut batch);
    batch.publish(reloader, now);
    reply
}

/// Does `op` at `now`; a write that changes routing is left in `batch` to
/// publish. A read publishes first what `batch` holds that it would show: a
/// list, every write; one backend, only if a write concerns it.
fn step(op: Op, reloader: &mut RoutingReloader, now: SystemTime, batch: &mut Batch) -> Reply {
    let now_ms = unix_ms(now);
    match &op {
        Op::List => batch.publish(reloader, now),
        Op::Get(id) if batch.touched(id) => batch.publish(reloader, now),
        _ => {}
    }
    match op {
        Op::Register(_, Some(check)) if names_a_refused_command(reloader, &check) => Reply::error(
            400,
            "health_check.command: a backend's own check may not run a command here \
             ([health] allow_backend_commands is off); use type tcp, http, https or grpc, \
             or ask the operator for a script check in the configuration"
                .to_string(),
            json!({ "field": "health_check.command" }),
        ),
        Op::Register(rec, check) => {
            // Checked here, not with the other fields: the listeners' bound
            // addresses are the control loop's (they change with SIGHUP).
            let mut local = engine::own_listeners::LocalIpsOnce::default();
            if let Err(e) =
                super::validate::not_own_listener(&rec, reloader.own_listeners(), &mut |ip| {
                    local.contains(ip)
                })
            {
                tracing::debug!(error = %e, "discovery API: registration refused");
                return Reply::error(400, e.to_string(), json!({ "field": e.field }));
            }
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
                    let updated = outcome == Registered::Updated;
                    let (id, app, region, addr) = (
                        rec.id.clone(),
                        rec.app.clone(),
                        rec.region.clone(),
                        addr_of(&rec),
                    );
                    batch.wrote(&rec.id, move || {
                        tracing::info!(backend = %id, app = %app, region = %region,
                            %addr, updated, "backend registered");
                    });
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
                        batch.wrote(&id, || {});
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
                // The live count is the backend's, whichever snapshot holds
                // it: the one before this drain is published will do.
                let snap = reloader.handle().load();
                let active = snap.find(&id).map_or(0, |i| snap.backend(i).active());
                let who = id.clone();
                batch.wrote(&id, move || {
                    tracing::info!(backend = %who, active, "backend draining: no new connections, open ones go on");
                });
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
                let who = id.clone();
                batch.wrote(
                    &id,
                    move || tracing::info!(backend = %who, "backend deregistered"),
                );
                Reply::new(200, json!({ "id": id, "deregistered": true }))
            }
        },
        Op::Get(id) => {
            let ttl = reloader.heartbeat_ttl();
            let snap = reloader.handle().load_full();
            let health = reloader.health().cloned();
            let store = reloader.store_mut();
            let node = store.node_id().map(String::from);
            match store.peek_one(&id) {
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

    /// A backend registered at the proxy's own listener looped every
    /// connection back into the proxy (QA: one client filled a limit of 50).
    #[test]
    fn a_registration_at_an_own_listener_is_refused_and_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = reloader(&dir);
        r.set_own_listeners(engine::own_listeners::OwnListeners::new([
            "127.0.0.1:18380".parse().unwrap(),
        ]));
        let reply = run(registration("self", 18380), &mut r, SystemTime::now());
        assert_eq!(reply.status, 400, "{}", reply.body);
        assert_eq!(reply.body["field"], "port");
        assert!(reply.body["error"]
            .as_str()
            .unwrap()
            .contains("own listener"));
        assert_eq!(
            run(Op::Get("self".into()), &mut r, SystemTime::now()).status,
            404
        );
        assert_eq!(
            run(registration("ok", 18381), &mut r, SystemTime::now()).status,
            201
        );
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

    /// Where a registration's time goes with 20,000 rows in the table: not a
    /// check, a measurement (`cargo test --release -p edgeproxy-control
    /// --lib api::ops::tests::registration_cost -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn registration_cost_at_20k_rows() {
        use std::time::Instant;
        const ROWS: usize = 20_000;
        const REGISTERS: u32 = 50;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.db");
        drop(RoutingStore::open(&path).unwrap());
        {
            let mut conn = rusqlite::Connection::open(&path).unwrap();
            let tx = conn.transaction().unwrap();
            for i in 0..ROWS {
                tx.execute(
                    "INSERT INTO backends (id, app, region, wg_ip, port, healthy, weight, soft_limit, \
                     hard_limit, deleted, draining, last_heartbeat_ms, registered_at_ms, expired) \
                     VALUES (?1, 'web', 'eu', '10.0.0.1', ?2, 1, 2, 100, 150, 0, 0, ?3, ?3, 0)",
                    rusqlite::params![format!("bulk-{i}"), 1000 + (i % 60000) as i64, unix_ms(SystemTime::now())],
                )
                .unwrap();
            }
            tx.commit().unwrap();
        }
        let mut r = reloader_at(&path);
        let ms = |d: Duration| d.as_secs_f64() * 1000.0 / f64::from(REGISTERS);
        let started = Instant::now();
        for i in 0..REGISTERS {
            let reply = run(
                registration(&format!("new-{i}"), 9000),
                &mut r,
                SystemTime::now(),
            );
            assert_eq!(reply.status, 201);
        }
        let whole = ms(started.elapsed());
        // The same number queued at once, as concurrent clients leave them
        // while a reload runs: one batch.
        let started = Instant::now();
        let (cmds, answers): (Vec<_>, Vec<_>) = (0..REGISTERS)
            .map(|i| queued(registration(&format!("burst-{i}"), 9000)))
            .unzip();
        execute_all(cmds, &mut r);
        let burst = ms(started.elapsed());
        for mut a in answers {
            assert_eq!(a.try_recv().unwrap().status, 201);
        }
        // The same work in its parts.
        let rec = super::super::validate::registration(
            br#"{"id":"part","app":"web","region":"eu","ip":"127.0.0.1","port":9000}"#,
        )
        .unwrap();
        let (mut write, mut check, mut reload, mut read, mut build) = (
            Duration::ZERO,
            Duration::ZERO,
            Duration::ZERO,
            Duration::ZERO,
            Duration::ZERO,
        );
        for _ in 0..REGISTERS {
            let t = Instant::now();
            r.store_mut()
                .register(&rec, unix_ms(SystemTime::now()))
                .unwrap();
            write += t.elapsed();
            let t = Instant::now();
            r.store_mut().set_health_check(&rec.id, None).unwrap();
            check += t.elapsed();
            let t = Instant::now();
            r.reload_at(SystemTime::now());
            reload += t.elapsed();
            let t = Instant::now();
            let loaded = r.store_mut().peek().unwrap();
            read += t.elapsed();
            let t = Instant::now();
            let _ = engine::snapshot::SnapshotBuilder::new().build(&loaded.records);
            build += t.elapsed();
        }
        eprintln!(
            "{ROWS} rows: register via the API op {whole:.2} ms one at a time, {burst:.2} ms each \
             in a burst of {REGISTERS}; parts: row write {:.2} ms, \
             health-check write {:.2} ms, reload {:.2} ms (of which: read every row {:.2} ms, \
             build the snapshot {:.2} ms)",
            ms(write),
            ms(check),
            ms(reload),
            ms(read),
            ms(build)
        );
    }

    /// A command for [`execute_all`] and where its answer arrives.
    fn queued(op: Op) -> (Command, oneshot::Receiver<Reply>) {
        let (reply, rx) = oneshot::channel();
        (Command { op, reply }, rx)
    }

    #[test]
    fn queued_writes_share_one_reload_and_are_published_before_any_answer() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = reloader(&dir);
        let v0 = r.handle().load().version;
        let (cmds, mut answers): (Vec<_>, Vec<_>) = (1..=3)
            .map(|n| queued(registration(&format!("b{n}"), 9000 + n)))
            .unzip();
        execute_all(cmds, &mut r);
        assert_eq!(
            r.handle().load().version,
            v0 + 1,
            "one reload for three writes"
        );
        for (n, rx) in answers.iter_mut().enumerate() {
            assert_eq!(rx.try_recv().unwrap().status, 201);
            assert_eq!(routed_healthy(&r, &format!("b{}", n + 1)), Some(true));
        }

        // A read sees the writes queued before it, published; the writes
        // after it are published too, before anyone is answered.
        let v1 = r.handle().load().version;
        let (c1, _a1) = queued(Op::Drain("b1".into()));
        let (c2, mut a2) = queued(Op::Get("b1".into()));
        let (c3, _a3) = queued(Op::Deregister("b2".into()));
        let (c4, mut a4) = queued(Op::Get("nobody".into()));
        execute_all(vec![c1, c2, c3, c4], &mut r);
        assert_eq!(a2.try_recv().unwrap().body["state"], "draining");
        assert_eq!(a4.try_recv().unwrap().status, 404);
        assert_eq!(r.handle().load().version, v1 + 2);
        assert_eq!(routed_healthy(&r, "b2"), None, "deregistered, published");
    }

    /// Registrations mixed with reads of other backends (a fleet starting
    /// while a dashboard polls) still share one reload; a read of a backend
    /// written earlier in the batch sees that write published.
    #[test]
    fn reads_of_other_backends_do_not_split_a_batchs_reload() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = reloader(&dir);
        run(registration("old", 9000), &mut r, SystemTime::now());
        let v0 = r.handle().load().version;
        let mut ops = Vec::new();
        for n in 1..=4 {
            ops.push(registration(&format!("b{n}"), 9000 + n));
            ops.push(Op::Get("old".into()));
            ops.push(Op::Get("nobody".into()));
        }
        let (cmds, mut answers): (Vec<_>, Vec<_>) = ops.into_iter().map(queued).unzip();
        execute_all(cmds, &mut r);
        assert_eq!(
            r.handle().load().version,
            v0 + 1,
            "one reload for four writes and eight reads of other backends"
        );
        for (i, rx) in answers.iter_mut().enumerate() {
            let reply = rx.try_recv().unwrap();
            let want = [201, 200, 404][i % 3];
            assert_eq!(reply.status, want, "answer {i}: {:?}", reply.body);
            if want == 200 {
                assert_eq!(reply.body["state"], "serving");
            }
        }

        // A read of a backend written before it in the batch: published.
        let v1 = r.handle().load().version;
        let (c1, _a1) = queued(registration("b9", 9009));
        let (c2, mut a2) = queued(Op::Get("b9".into()));
        let (c3, _a3) = queued(Op::Drain("b1".into()));
        let (c4, mut a4) = queued(Op::Get("b1".into()));
        let (c5, mut a5) = queued(Op::List);
        execute_all(vec![c1, c2, c3, c4, c5], &mut r);
        let got = a2.try_recv().unwrap();
        assert_eq!((got.status, &got.body["state"]), (200, &json!("serving")));
        assert_eq!(a4.try_recv().unwrap().body["state"], "draining");
        assert_eq!(a5.try_recv().unwrap().body["total"], 6);
        assert_eq!(r.handle().load().version, v1 + 2);
    }

    fn reloader_at(path: &std::path::Path) -> RoutingReloader {
        let store = RoutingStore::open(path).unwrap();
        RoutingReloader::start_with_ttl(store, Some(TTL)).unwrap()
    }
}
