//! The HTTP side: routes, the guards every request passes (rate limit,
//! browser origin, loopback host, token), and handlers that turn requests
//! into [`Op`]s. Connections are accepted and bounded by
//! [`crate::bounded_http`].

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::path::ErrorKind;
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use engine::snapshot::SnapshotHandle;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use super::auth;
use super::config::ApiToken;
use super::limit::RateLimiter;
use super::ops::{Command, Op, Reply};
use crate::bounded_http::Peer;

/// A request's body must arrive within this.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) struct Shared {
    pub commands: mpsc::Sender<Command>,
    pub token: Option<ApiToken>,
    /// A second token accepted as well (`api.accept_token`).
    pub accept_token: Option<ApiToken>,
    /// No token: requests must name the host by address or `localhost`.
    pub loopback_only: bool,
    pub limiter: Mutex<RateLimiter>,
    pub max_body: usize,
    pub snapshot: SnapshotHandle,
    pub started: Instant,
    /// Replication's status and commands, when it runs.
    pub cluster: Option<crate::replication::driver::ApiHooks>,
    /// `/health` says 503 `draining` once a drain starts.
    pub readiness: crate::readiness::Readiness,
    /// The mesh: 6PN allocation for registrations without an address, and
    /// its status. `None` without a mesh.
    pub mesh: Option<(
        crate::mesh::driver::ApiHooks,
        crate::mesh::status::StatusHandle,
    )>,
    /// Traffic steering: the POP's drain and the BGP speaker.
    pub steering: Option<crate::steering::Handle>,
}

type AppState = Arc<Shared>;

fn reply(r: Reply) -> Response {
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, Json(r.body)).into_response();
    if let Some(secs) = r.retry_after_secs {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

fn error(status: u16, reason: &str) -> Response {
    reply(Reply::error(status, reason, json!({})))
}

pub(super) fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/api/v1/register", post(register))
        .route("/api/v1/heartbeat/{id}", post(heartbeat))
        .route("/api/v1/backends", get(list))
        .route("/api/v1/backends/{id}", get(get_one).delete(deregister))
        .route("/api/v1/backends/{id}/drain", post(drain))
        .route("/api/v1/cluster", get(cluster))
        .route("/api/v1/cluster/members/{id}", delete(forget_member))
        .route("/api/v1/mesh", get(mesh))
        .route("/api/v1/pop", get(pop))
        .route("/api/v1/pop/drain", post(pop_drain))
        .route("/api/v1/pop/undrain", post(pop_undrain))
        .route("/api/v1/bgp", get(bgp))
        .fallback(|| async { error(404, "no such endpoint") })
        // A known path with the wrong method: JSON like every other error
        // (axum's default is an empty body). axum still sets `Allow`.
        .method_not_allowed_fallback(|| async { error(405, "method not allowed") })
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// Runs before every route (and the fallback), in this order: rate limit
/// (429), browser origin (403), loopback host (403), token (401).
async fn guard(State(s): State<AppState>, req: Request, next: Next) -> Response {
    match refusal(&s, &req) {
        Some(refused) => refuse(req, s.max_body, refused).await,
        None => next.run(req).await,
    }
}

/// How long a refused request's body is waited for (see [`refuse`]).
const REFUSED_BODY_WAIT: Duration = Duration::from_secs(1);

/// Answers a refused request with `response` once its body is read (at
/// most `max` bytes, for at most [`REFUSED_BODY_WAIT`]), so that its
/// keep-alive connection stays usable. Answered before, with the body
/// still on its way, the connection was closed without a word, and a
/// client that pools connections (ureq does) sent its next request into
/// a closed one: "Peer disconnected". A body that is larger or late gets
/// the answer with `Connection: close`, which such clients heed.
async fn refuse(req: Request, max: usize, mut response: Response) -> Response {
    let read = tokio::time::timeout(
        REFUSED_BODY_WAIT,
        axum::body::to_bytes(req.into_body(), max),
    )
    .await;
    if !matches!(read, Ok(Ok(_))) {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// The answer that refuses `req` before any route sees it, if one does.
fn refusal(s: &AppState, req: &Request) -> Option<Response> {
    let peer = req.extensions().get::<Peer>().map(|p| p.0);
    if let Some(peer) = peer {
        let verdict = s
            .limiter
            .lock()
            .map(|mut l| l.check(peer.ip(), Instant::now()))
            .unwrap_or(Ok(()));
        if let Err(wait) = verdict {
            let mut resp = error(429, "rate limit exceeded");
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            return Some(resp);
        }
    }
    // Browsers send Origin on cross-site POSTs; no API client does. This
    // keeps web pages from driving a tokenless API on loopback.
    if req.headers().contains_key(header::ORIGIN) {
        return Some(error(403, "requests from web pages are not accepted"));
    }
    if s.loopback_only {
        let named = req.uri().authority().map(|a| a.host());
        let host = req.headers().get(header::HOST).map(|h| h.as_bytes());
        if !auth::names_local_host(named, host) {
            return Some(error(
                403,
                "without a token the API answers only to Host: localhost or an address",
            ));
        }
    }
    let public = req.uri().path() == "/health"
        && (req.method() == Method::GET || req.method() == Method::HEAD);
    if let (Some(token), false) = (&s.token, public) {
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|h| auth::bearer(h.as_bytes()));
        // Both compared, whichever matches: the time says nothing of which.
        let valid = |p: &[u8]| {
            let second = s.accept_token.as_ref().is_some_and(|a| a.matches(p));
            token.matches(p) | second
        };
        if !presented.is_some_and(valid) {
            tracing::warn!(peer = %peer.map_or_else(|| "-".to_string(), |p| p.to_string()),
                method = %req.method(), path = %req.uri().path(),
                "discovery API: request without a valid token refused");
            let mut resp = error(401, "missing or invalid bearer token");
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"edgeproxy\""),
            );
            return Some(resp);
        }
    }
    None
}

/// Sends `op` to the control loop and waits for its answer.
async fn call(s: &Shared, op: Op) -> Response {
    match ask(s, op).await {
        Ok(r) => reply(r),
        Err(response) => response,
    }
}

/// The control loop's reply to `op`, or the error response when it cannot
/// give one.
async fn ask(s: &Shared, op: Op) -> Result<Reply, Response> {
    let (tx, rx) = oneshot::channel();
    if s.commands.send(Command { op, reply: tx }).await.is_err() {
        return Err(error(503, "the control loop is not running"));
    }
    rx.await
        .map_err(|_| error(503, "the control loop dropped the request"))
}

async fn health(State(s): State<AppState>) -> Response {
    let snap = s.snapshot.load();
    let n = snap.backends.len();
    // While draining (SIGTERM), 503: load balancers stop sending.
    let (status, text) = match s.readiness.phase() {
        crate::readiness::Phase::Draining => (StatusCode::SERVICE_UNAVAILABLE, "draining"),
        _ => (StatusCode::OK, "ok"),
    };
    let body = Json(json!({
        "status": text,
        "version": env!("CARGO_PKG_VERSION"),
        "registered_backends": n,
        "backends": n,
        "uptime_secs": s.started.elapsed().as_secs(),
        "routing_version": snap.version,
    }));
    (status, body).into_response()
}

async fn register(State(s): State<AppState>, req: Request) -> Response {
    let too_big = || {
        reply(Reply::error(
            400,
            format!("body: larger than {} bytes", s.max_body),
            json!({ "field": "body" }),
        ))
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > s.max_body as u64) {
        return too_big();
    }
    let body = match tokio::time::timeout(
        BODY_READ_TIMEOUT,
        axum::body::to_bytes(req.into_body(), s.max_body),
    )
    .await
    {
        Err(_) => {
            return reply(Reply::error(
                400,
                "body: not received in time",
                json!({ "field": "body" }),
            ))
        }
        Ok(Err(e)) => {
            let e = e.into_inner();
            if e.is::<http_body_util::LengthLimitError>() {
                return too_big();
            }
            // QA: a malformed chunked body (a chunk size that is not hex)
            // was answered "larger than 16384 bytes".
            return reply(Reply::error(
                400,
                format!("body: cannot be read: {e}"),
                json!({ "field": "body" }),
            ));
        }
        Ok(Ok(body)) => body,
    };
    let hooks = s.mesh.as_ref().map(|(hooks, _)| hooks.clone());
    let allocate = hooks
        .as_ref()
        .map(|h| move |id: &str| std::net::IpAddr::V6(h.allocate(id)));
    let allocate = allocate
        .as_ref()
        .map(|f| f as &dyn Fn(&str) -> std::net::IpAddr);
    let omitted_ip = !matches!(
        serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .as_ref()
            .and_then(|v| v.get("ip")),
        Some(v) if !v.is_null()
    );
    let parsed = super::validate::registration_with(&body, allocate)
        .and_then(|rec| Ok((rec, super::validate::health_check(&body)?)));
    match parsed {
        Ok((rec, check)) => {
            // A 6PN address allocated here is configured on the mesh
            // interface before the backend hears it, so it can bind it.
            if let (true, Some(h), Ok(std::net::IpAddr::V6(ip))) =
                (omitted_ip, hooks.as_ref(), rec.ip.parse())
            {
                h.ensure_local(ip).await;
            }
            let ignored = super::validate::ignored_fields(&body);
            match ask(&s, Op::Register(rec, check)).await {
                Ok(mut r) if r.status < 300 && !ignored.is_empty() => {
                    tracing::info!(fields = %ignored.join(", "),
                        "discovery API: registration carried fields this API does not know; ignored (as the original edgeProxy does)");
                    r.body["ignored_fields"] = json!(ignored);
                    reply(r)
                }
                Ok(r) => reply(r),
                Err(response) => response,
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, "discovery API: registration refused");
            reply(Reply::error(
                400,
                e.to_string(),
                json!({ "field": e.field }),
            ))
        }
    }
}

/// Replication's view of the cluster (read from what the driver
/// publishes; never waits for it).
async fn cluster(State(s): State<AppState>) -> Response {
    match &s.cluster {
        Some(c) => Json(&*c.status.load()).into_response(),
        None => Json(json!({ "enabled": false, "members": [] })).into_response(),
    }
}

/// `edgeproxy cluster forget`: a POP decommissioned for good leaves the
/// membership and the `pops` table here, and (replicated) everywhere.
async fn forget_member(State(s): State<AppState>, BackendId(id): BackendId) -> Response {
    use crate::replication::driver::ForgetError;
    use crate::replication::node::ForgetRefused;
    let Some(c) = &s.cluster else {
        return error(
            409,
            "replication is off on this POP ([replication] enabled = false)",
        );
    };
    match c.forget(id.clone()).await {
        Ok(f) => Json(json!({
            "forgotten": id,
            "identities": f.identities,
            "replicated": f.replicated,
        }))
        .into_response(),
        Err(e) => {
            let status = match &e {
                ForgetError::Refused(ForgetRefused::Unknown { .. }) => 404,
                ForgetError::Refused(_) => 409,
                _ => 503,
            };
            error(status, &e.to_string())
        }
    }
}

/// The mesh's interface and peers (what the mesh driver last published).
async fn mesh(State(s): State<AppState>) -> Response {
    match &s.mesh {
        Some((_, status)) => Json(&*status.load()).into_response(),
        None => Json(json!({ "enabled": false, "peers": [] })).into_response(),
    }
}

/// A backend id from the path. An extractor of its own so that an id axum
/// cannot decode (`%C3`: not UTF-8 once percent-decoded) gets the
/// documented `{"error","field"}` JSON, like every other bad input, not
/// axum's text/plain rejection.
struct BackendId(String);

impl<S: Send + Sync> FromRequestParts<S> for BackendId {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(id)) => Ok(BackendId(id)),
            Err(rejection) => {
                let why = match &rejection {
                    PathRejection::FailedToDeserializePathParams(e)
                        if matches!(e.kind(), ErrorKind::InvalidUtf8InPathParam { .. }) =>
                    {
                        "not valid UTF-8 once percent-decoded".to_string()
                    }
                    other => other.body_text(),
                };
                Err(reply(Reply::error(
                    rejection.status().as_u16(),
                    format!("id: {why}"),
                    json!({ "field": "id" }),
                )))
            }
        }
    }
}

async fn heartbeat(State(s): State<AppState>, BackendId(id): BackendId) -> Response {
    call(&s, Op::Heartbeat(id)).await
}

async fn list(State(s): State<AppState>) -> Response {
    call(&s, Op::List).await
}

async fn get_one(State(s): State<AppState>, BackendId(id): BackendId) -> Response {
    call(&s, Op::Get(id)).await
}

async fn deregister(State(s): State<AppState>, BackendId(id): BackendId) -> Response {
    call(&s, Op::Deregister(id)).await
}

async fn drain(State(s): State<AppState>, BackendId(id): BackendId) -> Response {
    call(&s, Op::Drain(id)).await
}

/// Traffic steering (`crate::steering::api`): a status and a JSON body.
fn steering_reply((status, body): (u16, serde_json::Value)) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(body)).into_response()
}

async fn pop(State(s): State<AppState>) -> Response {
    steering_reply(crate::steering::api::pop(s.steering.as_ref()))
}

async fn pop_drain(State(s): State<AppState>) -> Response {
    steering_reply(crate::steering::api::drain(s.steering.as_ref(), true).await)
}

async fn pop_undrain(State(s): State<AppState>) -> Response {
    steering_reply(crate::steering::api::drain(s.steering.as_ref(), false).await)
}

async fn bgp(State(s): State<AppState>) -> Response {
    steering_reply(crate::steering::api::bgp(s.steering.as_ref()))
}
