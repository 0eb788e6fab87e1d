//! One client connection: read the PROXY header if the listener expects one,
//! locate the client, pick a backend (affinity first), connect with bounded
//! retries, then pump bytes both ways until both sides are done.
//!
//! Half-close is preserved: a FIN from one side is passed on as a FIN
//! (`shutdown(SHUT_WR)`) and the other direction keeps flowing. An error on
//! either side ends both directions. A connection with no bytes either way for
//! the idle timeout is closed.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::{select, try_join, Either};

use crate::access::{self, Tally};
use crate::ctx::{ClientSlot, ConnSlot, ListenerCtx, ShardCtx};
use crate::deadlines;
use crate::idle::IdleGuard;
use crate::passive::{BackendSeen, PassiveKind};
use crate::pool::handover::{self, ClientSide, HandOver, Plain};
use crate::pool::stats::PoolStats;
use crate::proxy_protocol::{self, Parsed};
use crate::rate_limit::Refused;
use crate::rt::{self, Chunk, TcpStream};
use crate::select::{self, Choice, ClientGeo};
use crate::snapshot::{ActiveGuard, BackendIdx, BackendLive};
use crate::stats::{ByteCount, ShardStats};
use crate::tls_conn::{TlsClient, TlsError, TlsSession};

/// Why a client connection ended early. Logged at debug level and counted.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("invalid PROXY protocol header: {0}")]
    ProxyHeader(String),
    #[error("no PROXY protocol header within {0:?}")]
    ProxyHeaderTimeout(Duration),
    #[error("client {0} is over its rate limit")]
    RateLimited(IpAddr),
    #[error("client {0} holds its maximum of open connections")]
    ClientConnLimit(IpAddr),
    #[error("no eligible backend (after {attempts} failed attempts)")]
    NoBackend { attempts: usize },
    #[error("idle for {0:?}")]
    Idle(Duration),
    #[error("tls handshake: {0}")]
    TlsHandshake(TlsError),
    #[error("no tls handshake within {0:?}")]
    TlsHandshakeTimeout(Duration),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl ConnError {
    /// A short, stable name for how the connection ended, for the access
    /// log's `end` field.
    pub fn reason(&self) -> &'static str {
        match self {
            ConnError::ProxyHeader(_) => "proxy_header",
            ConnError::ProxyHeaderTimeout(_) => "proxy_header_timeout",
            ConnError::NoBackend { .. } => "no_backend",
            ConnError::Idle(_) => "idle_timeout",
            ConnError::TlsHandshake(_) => "tls_handshake",
            ConnError::TlsHandshakeTimeout(_) => "tls_handshake_timeout",
            ConnError::Tls(_) => "tls_error",
            ConnError::Io(_) => "io_error",
            ConnError::RateLimited(_) => "rate_limited",
            ConnError::ClientConnLimit(_) => "client_conn_limit",
        }
    }
}

pub(crate) async fn serve(
    ctx: Rc<ShardCtx>,
    lctx: Rc<ListenerCtx>,
    client: TcpStream,
    peer: SocketAddr,
    _slot: ConnSlot,
) {
    // Only connections that will write an access-log line keep a tally: a
    // connection's task is what it costs while idle, so without the log it
    // carries one pointer more, not the tally.
    let tally = ctx
        .with_knobs(|k| k.access_log)
        .then(|| Box::new(Tally::new(peer)));
    let result = serve_inner(&ctx, &lctx, &client, peer, tally.as_deref()).await;
    if let Some(tally) = &tally {
        let (end, error) = match &result {
            Ok(()) => ("closed", String::new()),
            Err(e) => (e.reason(), e.to_string()),
        };
        access::log(
            &lctx.spec.name,
            lctx.spec.app.as_deref(),
            tally,
            end,
            &error,
        );
    }
    match result {
        // Counted where they were refused; a flood must not flood the log.
        Err(ConnError::RateLimited(ip) | ConnError::ClientConnLimit(ip)) => {
            ShardStats::bump(&lctx.stats.rejected_client_limit);
            // Who, for the summary line (see `refused_clients`).
            lctx.stats.refused_clients.record(ip);
        }
        Ok(()) => {}
        Err(e) => {
            // (process-wide counter, this listener's): an idle timeout
            // closes a connection that was served, no rejection (QA: it was
            // counted in the listener's rejected "other").
            let counters = match &e {
                ConnError::ProxyHeader(_) | ConnError::ProxyHeaderTimeout(_) => Some((
                    &ctx.stats.rejected_proxy_header,
                    Some(&lctx.stats.rejected_proxy_header),
                )),
                ConnError::NoBackend { .. } => Some((&ctx.stats.no_backend, None)),
                ConnError::Idle(_) => Some((&ctx.stats.idle_timeouts, None)),
                ConnError::TlsHandshake(_) | ConnError::TlsHandshakeTimeout(_) => Some((
                    &ctx.stats.tls_handshake_failures,
                    Some(&lctx.stats.rejected_tls_handshake),
                )),
                ConnError::Io(_) | ConnError::Tls(_) => None,
                ConnError::RateLimited(_) | ConnError::ClientConnLimit(_) => None,
            };
            if let Some((process, listener)) = counters {
                ShardStats::bump(process);
                if let Some(listener) = listener {
                    ShardStats::bump(listener);
                }
            }
            if let ConnError::NoBackend { attempts } = &e {
                ShardStats::bump(&lctx.stats.no_backend);
                if *attempts > 0 {
                    ShardStats::bump(&lctx.stats.no_backend_after_failures);
                }
            }
            tracing::debug!(shard = ctx.id, listener = %lctx.spec.name,
                app = lctx.spec.app.as_deref().unwrap_or("*"), %peer, error = %e, "connection ended");
        }
    }
}

async fn serve_inner(
    ctx: &Rc<ShardCtx>,
    lctx: &ListenerCtx,
    client: &TcpStream,
    peer: SocketAddr,
    tally: Option<&Tally>,
) -> Result<(), ConnError> {
    // The knobs this connection uses, copied out: `Knobs` is 136 bytes, and
    // a local that is borrowed stays in the task for its whole scope.
    let (connect_timeout, idle_timeout, attempts, rtt_weight) = ctx.with_knobs(|knobs| {
        (
            knobs.connect_timeout,
            knobs.idle_timeout,
            knobs.connect_attempts.get() as usize,
            knobs.rtt_weight,
        )
    });
    let buffer_len = ctx.shared.settings.buffer_size as usize;

    let (client_addr, pending) = if lctx.spec.accept_proxy_protocol {
        match rt::timeout(
            ctx.knobs().proxy_header_timeout,
            read_proxy_header(client, buffer_len),
        )
        .await
        {
            Some(r) => r?,
            None => {
                let timeout = ctx.knobs().proxy_header_timeout;
                return Err(ConnError::ProxyHeaderTimeout(timeout));
            }
        }
    } else {
        (peer, None)
    };
    if let Some(t) = tally {
        t.client.set(client_addr);
    }
    // Per-client limits, on the real client (after PROXY protocol) and
    // before any TLS or backend work is spent on it.
    let client_ip = canonical_ip(client_addr.ip());
    let _client_slot = match ctx.with_knobs(|k| ClientSlot::admit(ctx, client_ip, &k.client_limits))
    {
        Ok(slot) => slot,
        Err(Refused::Rate) => return Err(ConnError::RateLimited(client_ip)),
        Err(Refused::Concurrent) => return Err(ConnError::ClientConnLimit(client_ip)),
    };
    // TLS first: a client that cannot finish a handshake never costs a
    // backend connection. The handshake runs on this shard, in this task.
    let (tls, pending) = match &lctx.spec.tls {
        None => (None, pending),
        Some(tls) => {
            // Boxed, like the session and its pumps below: a rustls session
            // is kilobytes, and inline it would enlarge every connection's
            // task, plain TCP included, for the connection's whole life.
            let handshake = Box::pin(TlsSession::accept(
                client,
                tls.current(),
                pending,
                buffer_len,
            ));
            match rt::timeout(tls.handshake_timeout, handshake).await {
                Some(Ok((session, early))) => {
                    ShardStats::bump(&ctx.stats.tls_handshakes);
                    tracing::debug!(shard = ctx.id, sni = session.sni().unwrap_or("-"),
                        alpn = %String::from_utf8_lossy(session.alpn().as_deref().unwrap_or(b"-")),
                        "tls handshake done");
                    (Some(Box::new(session)), early)
                }
                Some(Err(e)) => return Err(ConnError::TlsHandshake(e)),
                None => return Err(ConnError::TlsHandshakeTimeout(tls.handshake_timeout)),
            }
        }
    };
    let geo = &ctx.shared.geo;
    let country = ctx
        .geo_cache
        .borrow_mut()
        .country(client_ip, |ip| geo.country(ip));
    let region = geo.region_for(country);
    let scoring = select::Scoring { rtt_weight };

    // Try backends, best first, until one accepts the connection: a warm
    // pooled socket when this shard has one, else a fresh connect.
    let mut pending = pending;
    let mut header_sent = false;
    let mut failed: Vec<Arc<str>> = Vec::new();
    // `ready_at`: when the backend side was ready, from a clock reading
    // taken anyway (the connect's latency); the idle watch starts there.
    let (backend, live, ready_at) = loop {
        // One clock reading serves this attempt's routing (affinity expiry)
        // and its connect's deadline and latency.
        let now = Instant::now();
        let (addr, live) = {
            let snap = ctx.shared.snapshot.load();
            let client_geo = ClientGeo {
                country,
                region: region.and_then(|r| snap.region_id(r)),
            };
            let local_region = snap.region_id(&ctx.shared.settings.local_region);
            let exclude: Vec<BackendIdx> = failed.iter().filter_map(|id| snap.find(id)).collect();
            let candidates = snap.candidates(lctx.spec.app.as_deref());
            let live_view = match failed.is_empty() {
                true => select::Atomics::at(now),
                false => select::Atomics::at(now).without_probes(),
            };
            let route = |table: &mut crate::affinity::AffinityTable| {
                ctx.sync_affinity(table);
                select::route_scored(
                    &snap,
                    candidates,
                    client_ip,
                    &client_geo,
                    local_region,
                    &exclude,
                    table,
                    now,
                    scoring,
                    &live_view,
                )
            };
            let choice: Option<Choice> = if lctx.local_affinity {
                route(&mut ctx.affinity.borrow_mut())
            } else {
                match ctx.shared.shared_affinity.lock() {
                    Ok(mut table) => route(&mut table),
                    Err(poisoned) => route(&mut poisoned.into_inner()),
                }
            };
            let Some(choice) = choice else {
                return Err(ConnError::NoBackend {
                    attempts: failed.len(),
                });
            };
            if choice.sticky {
                ShardStats::bump(&ctx.stats.affinity_hits);
            }
            ctx.stats.count_tier(choice.tier);
            let b = snap.backend(choice.idx);
            (b.addr, Arc::clone(&b.live))
        };
        let mut started = now;
        if let Some(warm) = ctx.pool.take(&live.id, addr) {
            let (first, idle) = (pending.take(), idle_timeout);
            let handed = Box::pin(pooled(
                ctx,
                lctx,
                client,
                tls.as_deref(),
                client_addr,
                &warm,
                first,
                &live.id,
                idle,
            ))
            .await?;
            match handed {
                HandOver::Live { sent } => {
                    header_sent = true;
                    // The client's first bytes went during the hand-over.
                    byte_counts(ctx, tally).0.add(sent as u64);
                    tracing::debug!(shard = ctx.id, listener = %lctx.spec.name, client = %client_addr,
                        backend = %addr, backend_id = %live.id, "proxying on a warm connection");
                    if let Some(t) = tally {
                        t.backend.set(Some(addr));
                        *t.backend_id.borrow_mut() = Some(Arc::clone(&live.id));
                    }
                    break (warm, live, Instant::now());
                }
                // The backend had closed it: on to a fresh connect, with
                // whatever the client sent (the hand-over took time).
                HandOver::Stale { first, .. } => {
                    pending = first;
                    started = Instant::now();
                }
                HandOver::ClientClosed => return Ok(()),
            }
        }
        let deadline = ctx.connects.start(started, connect_timeout);
        let (error, kind, failed_at) = match deadlines::within(deadline, rt::connect(addr)).await {
            Some(Ok(stream)) => {
                let connected = Instant::now();
                ctx.stats.connect_latency.record(connected - started);
                if live.mark_connecting() {
                    tracing::info!(shard = ctx.id, backend = %live.id, %addr,
                        "backend connects again: no longer failing");
                }
                tracing::debug!(shard = ctx.id, listener = %lctx.spec.name, client = %client_addr,
                    backend = %addr, backend_id = %live.id, "proxying");
                if let Some(t) = tally {
                    t.backend.set(Some(addr));
                    *t.backend_id.borrow_mut() = Some(Arc::clone(&live.id));
                }
                break (stream, live, connected);
            }
            // The proxy's own want (no local port, no descriptor, no
            // memory) says nothing of the backend: it is not blamed, and
            // the next backend (another destination, maybe another port)
            // is tried.
            Some(Err(e)) if crate::passive::is_local_failure(&e) => {
                ShardStats::bump(&ctx.stats.connect_failures);
                if let Some(left_out) = ctx.local_connect_failures.borrow_mut().hit(Instant::now())
                {
                    tracing::warn!(shard = ctx.id, backend = %live.id, %addr, error = %e,
                        same_errors_not_logged = left_out,
                        "backend connect failed on the proxy's side (not the backend's fault; logged at most every 10 s)");
                }
                failed.push(Arc::clone(&live.id));
                if failed.len() >= attempts {
                    return Err(ConnError::NoBackend {
                        attempts: failed.len(),
                    });
                }
                ShardStats::bump(&ctx.stats.retries);
                continue;
            }
            // No clock read for when it failed: a refusal comes about when
            // the attempt started (a round trip later), a timeout at the
            // deadline.
            Some(Err(e)) => (e.to_string(), PassiveKind::ConnectFailed, started),
            None => (
                format!("timed out after {:?}", connect_timeout),
                PassiveKind::ConnectTimeout,
                started + connect_timeout,
            ),
        };
        record_connect_failure(ctx, &live);
        ctx.shared.passive.report(&live.id, kind, started);
        // One WARN when a backend starts failing, not one per failure: a
        // dead backend would otherwise log every connection that tried it.
        // The control side logs a rate-limited summary of the counts. The
        // mark also puts it behind the backends that work, for a backoff
        // (see `crate::backoff`), so the next clients do not try it first.
        if live.mark_failing(started, failed_at) {
            tracing::warn!(shard = ctx.id, backend = %live.id, %addr, %error,
                "backend connect failed: marked failing until a connect succeeds");
        } else {
            tracing::debug!(shard = ctx.id, backend = %live.id, %addr, %error, "backend connect failed");
        }
        failed.push(Arc::clone(&live.id));
        if failed.len() >= attempts {
            return Err(ConnError::NoBackend {
                attempts: failed.len(),
            });
        }
        ShardStats::bump(&ctx.stats.retries);
    };
    let active = ActiveGuard::new(live);

    if lctx.spec.send_proxy_protocol && !header_sent {
        let (header, len) = proxy_header(client, client_addr)?;
        rt::write_bytes(&backend, header, len).await?;
    }
    if let Some(early) = pending {
        byte_counts(ctx, tally).0.add(early.len() as u64);
        rt::write_chunk(&backend, early).await?;
    }
    let seen = BackendSeen::default();
    // Zero: never closed for idleness, so not watched.
    let idle = (!idle_timeout.is_zero()).then(|| ctx.idle.watch(ready_at, idle_timeout));
    let outcome = match &tls {
        None => {
            splice(
                ctx,
                tally,
                client,
                &backend,
                idle.as_ref(),
                buffer_len,
                &seen,
            )
            .await
        }
        Some(session) => {
            Box::pin(splice_tls(
                byte_counts(ctx, tally),
                session,
                client,
                &backend,
                idle.as_ref(),
                buffer_len,
                &seen,
            ))
            .await
        }
    };
    tell_how_the_backend_served(ctx, active.live(), &seen, ready_at);
    outcome
}

/// Tells the backend's part in a connection that ended to its circuit
/// breaker (passive health) and its backoff. A connect that succeeded and
/// was then reset before the backend served anything, while its client was
/// there, is a failure (a reset the client caused, or one after a reply, is
/// neither failure nor success: see [`BackendSeen::reset_before_reply`]),
/// so a success is only told
/// once the connection ended without a reset from the backend, after it
/// sent a byte or closed cleanly (a hung backend proves nothing: see
/// [`BackendSeen::served`]), and only while the control side listens for
/// them. A backend that accepted the connection and reset it before its
/// first byte served nothing: it is marked failing like one whose connect
/// failed, so the next clients go elsewhere while it cools, instead of each
/// being reset in turn.
fn tell_how_the_backend_served(
    ctx: &ShardCtx,
    live: &BackendLive,
    seen: &BackendSeen,
    ready_at: Instant,
) {
    if seen.reset_before_reply() {
        ctx.shared
            .passive
            .report(&live.id, PassiveKind::Reset, ready_at);
    } else if seen.served() && live.successes_watched() {
        ctx.shared
            .passive
            .report(&live.id, PassiveKind::Success, ready_at);
    }
    if seen.reset_before_reply() {
        live.resets_before_reply
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if live.mark_reset_unserved(ready_at, Instant::now()) {
            tracing::warn!(shard = ctx.id, backend = %live.id,
                "backend reset a connection before replying: marked failing until it serves one");
        } else {
            tracing::debug!(shard = ctx.id, backend = %live.id,
                "backend reset a connection before replying");
        }
    } else if live.mark_served(ready_at) {
        tracing::info!(shard = ctx.id, backend = %live.id,
            "backend served a connection: no longer failing");
    }
}

/// The PROXY v2 header naming `client_addr` as the client of `client`.
fn proxy_header(
    client: &TcpStream,
    client_addr: SocketAddr,
) -> io::Result<([u8; proxy_protocol::V2_MAX_ENCODED], usize)> {
    let destination = client.local_addr()?;
    let mut header = [0u8; proxy_protocol::V2_MAX_ENCODED];
    let len = proxy_protocol::encode_v2(client_addr, destination, &mut header);
    Ok((header, len))
}

/// Hands the pooled socket `warm` to the client (see `pool::handover`),
/// counting what happened. Boxed by the caller: only pool hits pay for its
/// state in the connection's task. A client that sends nothing to a
/// backend that says nothing is closed after `idle`, as it would be on a
/// fresh connection.
#[allow(clippy::too_many_arguments)]
async fn pooled(
    ctx: &Rc<ShardCtx>,
    lctx: &ListenerCtx,
    client: &TcpStream,
    tls: Option<&TlsSession>,
    client_addr: SocketAddr,
    warm: &TcpStream,
    pending: Option<Chunk>,
    backend: &Arc<str>,
    idle: Duration,
) -> Result<HandOver, ConnError> {
    let header = match lctx.spec.send_proxy_protocol {
        true => Some(proxy_header(client, client_addr)?),
        false => None,
    };
    // On a TLS listener the handshake with the client is done: the
    // backend's first bytes are the client's first plaintext.
    let handed = match tls {
        None => {
            let side = Plain(client);
            within_idle(idle, hand_over(ctx, warm, &side, header, pending, backend)).await?
        }
        Some(session) => {
            let side = TlsClient {
                socket: client,
                session,
            };
            within_idle(idle, hand_over(ctx, warm, &side, header, pending, backend)).await?
        }
    };
    match &handed {
        // Its bytes are counted by the caller, with the connection's own.
        HandOver::Live { .. } => {}
        HandOver::Stale { replayed, .. } => {
            PoolStats::bump(&ctx.pool.stats.stale);
            if *replayed {
                PoolStats::bump(&ctx.pool.stats.replayed);
            }
            tracing::debug!(shard = ctx.id, %backend, replayed,
                "pool: the backend had closed the warm connection; connecting fresh");
        }
        HandOver::ClientClosed => {}
    }
    Ok(handed)
}

/// `pool::handover::hand_over` with this shard's settings.
async fn hand_over<C: ClientSide>(
    ctx: &Rc<ShardCtx>,
    warm: &TcpStream,
    client: &C,
    header: Option<([u8; proxy_protocol::V2_MAX_ENCODED], usize)>,
    pending: Option<Chunk>,
    backend: &Arc<str>,
) -> Result<HandOver, ConnError>
where
    ConnError: From<C::Error>,
{
    let buffer_len = ctx.shared.settings.buffer_size as usize;
    let patience = ctx.pool.ack_patience();
    let spoke_first = || ctx.pool.spoke_first(backend);
    Ok(handover::hand_over(
        warm,
        client,
        header,
        pending,
        buffer_len,
        patience,
        spoke_first,
    )
    .await?)
}

/// `work`, ended with [`ConnError::Idle`] after `idle` (zero: never).
async fn within_idle<T>(
    idle: Duration,
    work: impl Future<Output = Result<T, ConnError>>,
) -> Result<T, ConnError> {
    if idle.is_zero() {
        return work.await;
    }
    rt::timeout(idle, work)
        .await
        .unwrap_or(Err(ConnError::Idle(idle)))
}

fn record_connect_failure(ctx: &ShardCtx, live: &BackendLive) {
    live.connect_failures
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    ShardStats::bump(&ctx.stats.connect_failures);
}

/// `::ffff:a.b.c.d` (a v4 client on a dual-stack socket) → `a.b.c.d`.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// Reads the PROXY header; returns the client address it carries (the TCP
/// peer for a LOCAL or UNKNOWN header, which carries none) and any payload
/// bytes that followed it.
async fn read_proxy_header(
    client: &TcpStream,
    buffer_len: usize,
) -> Result<(SocketAddr, Option<Chunk>), ConnError> {
    let peer = client.peer_addr()?;
    let mut gathered: Option<Vec<u8>> = None;
    loop {
        let Some(chunk) = rt::read_chunk(client, buffer_len).await? else {
            return Err(ConnError::ProxyHeader(
                "connection closed before the header ended".into(),
            ));
        };
        // Usually the whole header is in the first read; only a header split
        // across reads is gathered into a heap buffer.
        let chunk = match gathered.as_mut() {
            None => chunk,
            Some(acc) => {
                acc.extend_from_slice(chunk.as_slice());
                Chunk::Owned(std::mem::take(acc))
            }
        };
        match proxy_protocol::parse(chunk.as_slice()) {
            Ok(Parsed::Complete { header, consumed }) => {
                let rest = chunk.advance(consumed);
                let pending = (!rest.is_empty()).then_some(rest);
                return Ok((header.source.unwrap_or(peer), pending));
            }
            Ok(Parsed::Incomplete) => {
                if chunk.len() >= proxy_protocol::MAX_HEADER_LEN {
                    return Err(ConnError::ProxyHeader("header too long".into()));
                }
                gathered = Some(chunk.as_slice().to_vec());
            }
            Err(e) => return Err(ConnError::ProxyHeader(e.to_string())),
        }
    }
}

/// Where the bytes of each direction (client → backend, backend → client)
/// are counted: the shard's totals and the connection's own tally. Built
/// where a pump starts rather than kept in the connection's task, which is
/// what an idle connection costs.
fn byte_counts<'a>(ctx: &'a ShardCtx, tally: Option<&'a Tally>) -> (ByteCount<'a>, ByteCount<'a>) {
    (
        ByteCount {
            shard: &ctx.stats.bytes_client_to_backend,
            conn: tally.map(|t| &t.up),
        },
        ByteCount {
            shard: &ctx.stats.bytes_backend_to_client,
            conn: tally.map(|t| &t.down),
        },
    )
}

/// Pumps bytes both ways until both directions have ended, or until `idle`
/// (when watched) finds no byte moved for its timeout. What the backend did
/// (replied, reset) goes to `seen`.
async fn splice(
    ctx: &ShardCtx,
    tally: Option<&Tally>,
    client: &TcpStream,
    backend: &TcpStream,
    idle: Option<&IdleGuard>,
    buffer_len: usize,
    seen: &BackendSeen,
) -> Result<(), ConnError> {
    let (up_bytes, down_bytes) = byte_counts(ctx, tally);
    let unwatched = Cell::new(false);
    let activity = idle.map_or(&unwatched, IdleGuard::activity);
    // Where switched flows are counted, when bulk flows are spliced at all.
    let spliced = ctx
        .shared
        .settings
        .splice_bulk
        .then_some(&ctx.stats.spliced_flows);
    let up = pump(
        client,
        backend,
        activity,
        buffer_len,
        up_bytes,
        spliced,
        BackendAt::Dst(seen),
    );
    let down = pump(
        backend,
        client,
        activity,
        buffer_len,
        down_bytes,
        spliced,
        BackendAt::Src(seen),
    );
    let outcome = until_idle(pin!(try_join(up, down)), idle).await;
    outcome
}

/// Runs one direction of a TLS client's connection (`pump`), then notes in
/// `seen` that the client left when that direction's end says so: the
/// client → backend direction (`up`) ends with the client's end of stream
/// or error (a reset from the backend met on the way was noted first); the
/// other one, when it fails, fails towards the client (its own reads from
/// the backend are noted as they fail). From then on a reset from the
/// backend is what the client's leaving caused, not the backend's failure.
/// (Plain connections note it inside [`pump`], whose future is stored in
/// every connection's task.)
async fn client_leaves_when_done<T, E>(
    pump: impl Future<Output = Result<T, E>>,
    seen: &BackendSeen,
    up: bool,
) -> Result<T, E> {
    let outcome = pump.await;
    if up || outcome.is_err() {
        seen.client_left();
    }
    outcome
}

/// `splice` for a TLS client: decrypt up, encrypt down.
async fn splice_tls(
    (up_bytes, down_bytes): (ByteCount<'_>, ByteCount<'_>),
    session: &TlsSession,
    client: &TcpStream,
    backend: &TcpStream,
    idle: Option<&IdleGuard>,
    buffer_len: usize,
    seen: &BackendSeen,
) -> Result<(), ConnError> {
    let unwatched = Cell::new(false);
    let activity = idle.map_or(&unwatched, IdleGuard::activity);
    let up = client_leaves_when_done(
        session.pump_up(client, backend, activity, buffer_len, up_bytes, seen),
        seen,
        true,
    );
    let down = client_leaves_when_done(
        session.pump_down(backend, client, activity, buffer_len, down_bytes, seen),
        seen,
        false,
    );
    let outcome = until_idle(pin!(try_join(up, down)), idle).await;
    outcome
}

/// Runs both directions (`both`) until they end, or until `idle` (when the
/// connection is watched) finds no byte moved for its timeout.
///
/// Takes `both` pinned by the caller so it is stored once in the connection's
/// task (the task's size is what an idle connection costs).
async fn until_idle<E>(
    mut both: Pin<&mut impl Future<Output = Result<((), ()), E>>>,
    idle: Option<&IdleGuard>,
) -> Result<(), ConnError>
where
    ConnError: From<E>,
{
    let Some(idle) = idle else {
        return both.await.map(drop).map_err(ConnError::from);
    };
    let outcome = match select(both.as_mut(), pin!(idle.expired())).await {
        Either::Left((result, _)) => result.map(drop).map_err(ConnError::from),
        Either::Right(_) => Err(ConnError::Idle(idle.timeout())),
    };
    outcome
}

/// Which end of a [`pump`] the backend is.
#[derive(Clone, Copy)]
enum BackendAt<'a> {
    /// Backend → client.
    Src(&'a BackendSeen),
    /// Client → backend.
    Dst(&'a BackendSeen),
}

impl BackendAt<'_> {
    /// `result` of a send to the pump's `dst`: a failure is noted as the
    /// backend's (a reset) or as the client's leaving.
    fn sent<T>(self, result: io::Result<T>) -> io::Result<T> {
        match (self, &result) {
            (BackendAt::Dst(seen), Err(e)) => seen.send_failed(e),
            (BackendAt::Src(seen), Err(_)) => seen.client_left(),
            _ => {}
        }
        result
    }

    /// A read from the pump's `src` failed with `e`.
    fn read_failed(self, e: &io::Error) {
        match self {
            BackendAt::Src(seen) => seen.read_failed(e),
            BackendAt::Dst(seen) => seen.client_left(),
        }
    }

    /// The pump's `src` closed its side.
    fn src_closed(self) {
        match self {
            BackendAt::Src(seen) => seen.closed(),
            BackendAt::Dst(seen) => seen.client_left(),
        }
    }

    /// The error that ended a splice, on the backend's socket or the
    /// client's.
    fn splice_failed(self, end: rt::SpliceEnd, e: &io::Error) {
        match (self, end) {
            (_, rt::SpliceEnd::Src) => self.read_failed(e),
            (BackendAt::Dst(seen), rt::SpliceEnd::Dst) => seen.send_failed(e),
            (BackendAt::Src(seen), rt::SpliceEnd::Dst) => seen.client_left(),
        }
    }
}

/// Copies `src` to `dst` until `src` ends, then half-closes `dst`: each
/// read, from the task once `src` is readable, is sent on at once
/// (`rt::recv_ready`). With
/// `spliced` (runtime.splice_bulk), a read that fills a whole buffer hands
/// the rest of the flow to splice(2) and is counted there. What the
/// backend's end (`backend`) does is noted in its `BackendSeen`: bytes read
/// from it, its close, a reset met reading from it or sending to it; and so
/// is the client's leaving (its end of stream, a failed read from it or send
/// to it), after which a reset from the backend is not its failure. Every
/// read sets
/// `activity` (the idle sweeper's flag: no clock read per chunk).
async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    activity: &Cell<bool>,
    buffer_len: usize,
    bytes: ByteCount<'_>,
    mut spliced: Option<&std::sync::atomic::AtomicU64>,
    backend: BackendAt<'_>,
) -> io::Result<()> {
    let mut ready = rt::Readiness::new();
    loop {
        let read = rt::recv_ready(src, &mut ready, buffer_len, |bytes, ending| {
            rt::send_or_keep(dst, bytes, ending)
        })
        .await
        .inspect_err(|e| backend.read_failed(e));
        let (n, rest) = match read? {
            // Readable, yet nothing there by the time the task read.
            None => continue,
            Some((0, _)) => {
                backend.src_closed();
                // The peer may already be gone; nothing more to tell it.
                let _ = rt::shutdown_write(dst).await;
                return Ok(());
            }
            Some((n, rest)) => (n, backend.sent(rest)?),
        };
        if let BackendAt::Src(seen) = backend {
            seen.replied();
        }
        activity.set(true);
        bytes.add(n as u64);
        if let Some(rest) = rest {
            backend.sent(rt::write_rest(dst, rest).await)?;
        }
        // A read that filled a whole buffer is a bulk flow: from here on
        // the kernel moves its bytes (see `rt::splice_to_end`).
        let bulk = n >= buffer_len;
        if let (true, Some(counter)) = (bulk, spliced) {
            match rt::Pipe::for_splice() {
                Ok(pipe) => {
                    // The splice waits for readiness its own way: a POLL
                    // left armed would wake this task on every segment.
                    drop(ready);
                    crate::stats::add_owned(counter, 1);
                    // Boxed: only bulk flows pay for its state.
                    let moved = |n: usize| {
                        activity.set(true);
                        bytes.add(n as u64);
                    };
                    let failed = |end, e: &io::Error| backend.splice_failed(end, e);
                    let spliced = Box::pin(rt::splice_to_end(pipe, src, dst, moved, failed)).await;
                    if spliced.is_ok() {
                        backend.src_closed();
                    }
                    return spliced;
                }
                // No pipe to be had: this flow goes on copying.
                Err(e) => {
                    tracing::debug!(error = %e, "bulk flow not spliced");
                    spliced = None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `{:#}` chains (anyhow) print each error's message, then each source's:
    /// a message that already includes its source prints it twice
    /// ("Address already in use (os error 98): Address already in use").
    fn assert_cause_once(e: &dyn std::error::Error) {
        let mut parent = e.to_string();
        let mut next = e.source();
        while let Some(source) = next {
            let text = source.to_string();
            assert!(!parent.contains(&text), "{parent:?} repeats {text:?}");
            parent = text;
            next = source.source();
        }
    }

    #[test]
    fn every_error_names_its_cause_once() {
        let io = || io::Error::from(io::ErrorKind::ConnectionReset);
        let tls = || rustls::Error::General("bad record".into());
        for e in [
            ConnError::ProxyHeader("x".into()),
            ConnError::ProxyHeaderTimeout(Duration::from_secs(1)),
            ConnError::NoBackend { attempts: 2 },
            ConnError::Idle(Duration::from_secs(1)),
            ConnError::TlsHandshake(TlsError::from(tls())),
            ConnError::TlsHandshakeTimeout(Duration::from_secs(1)),
            ConnError::from(TlsError::from(tls())),
            ConnError::from(TlsError::from(io())),
            ConnError::from(TlsError::ClosedInHandshake),
            ConnError::from(io()),
        ] {
            assert_cause_once(&e);
        }
    }

    /// Which end of [`run_pump`] the backend is on.
    #[derive(Clone, Copy)]
    enum Side {
        Src,
        Dst,
    }

    /// Runs one pump between `client` and `backend` (the backend on
    /// `side`), with bulk flows spliced: its outcome, what it saw of the
    /// backend and how many flows it spliced. The runtime is gone when this
    /// returns, and with it the sockets (compio closes them through its
    /// ring), so peer threads blocked on them end.
    fn run_pump(
        client: std::net::TcpStream,
        backend: std::net::TcpStream,
        side: Side,
    ) -> (io::Result<()>, BackendSeen, u64) {
        let runtime = rt::build_runtime(4, 4096).unwrap();
        let ran = runtime.block_on(async move {
            let client = TcpStream::from_std(client).unwrap();
            let backend = TcpStream::from_std(backend).unwrap();
            let (seen, counted, spliced, activity) = (
                BackendSeen::default(),
                std::sync::atomic::AtomicU64::new(0),
                std::sync::atomic::AtomicU64::new(0),
                Cell::new(false),
            );
            let bytes = ByteCount {
                shard: &counted,
                conn: None,
            };
            let (src, dst, at) = match side {
                Side::Src => (&backend, &client, BackendAt::Src(&seen)),
                Side::Dst => (&client, &backend, BackendAt::Dst(&seen)),
            };
            let outcome = pump(src, dst, &activity, 4096, bytes, Some(&spliced), at).await;
            (outcome, seen, spliced.into_inner())
        });
        drop(runtime);
        ran
    }

    /// One pump from a client that sent `hello` to a backend that has
    /// already reset the connection, the backend on `side`.
    fn pump_against_a_reset_backend(side: Side) -> (io::Result<()>, BackendSeen) {
        let (client, mut client_peer) = rt::tests::loopback_pair(64 << 10);
        std::io::Write::write_all(&mut client_peer, b"hello").unwrap();
        let (outcome, seen, _) = run_pump(client, rt::tests::reset_by_its_peer(), side);
        (outcome, seen)
    }

    /// A backend that closes its side without a byte (it only receives)
    /// served; one that sends a byte served; one that never does either
    /// (hung) proved nothing, and its connection, ended by the idle timeout
    /// or the client, must not count as a success (QA: such connections
    /// closed a half-open circuit on a hung backend).
    #[test]
    fn a_backend_serves_by_a_byte_or_a_clean_close_not_by_silence() {
        let (client, _client_peer) = rt::tests::loopback_pair(64 << 10);
        let (backend, backend_peer) = rt::tests::loopback_pair(64 << 10);
        backend_peer.shutdown(std::net::Shutdown::Write).unwrap();
        let (outcome, seen, _) = run_pump(client, backend, Side::Src);
        assert!(outcome.is_ok(), "{outcome:?}");
        assert!(seen.served(), "a clean close is a backend's part done");

        let (client, _client_peer) = rt::tests::loopback_pair(64 << 10);
        let (backend, mut backend_peer) = rt::tests::loopback_pair(64 << 10);
        std::io::Write::write_all(&mut backend_peer, b"hi").unwrap();
        backend_peer.shutdown(std::net::Shutdown::Write).unwrap();
        let (_, seen, _) = run_pump(client, backend, Side::Src);
        assert!(seen.served());

        let silent = BackendSeen::default();
        assert!(!silent.served(), "silence proves nothing");
        silent.replied();
        silent.read_failed(&io::Error::from(io::ErrorKind::ConnectionReset));
        assert!(!silent.served(), "a reset is no success");
    }

    /// A backend that resets while the client is still sending: the pump
    /// towards it fails its send, and that is the reset seen (the read
    /// from it, in the other pump, may never be made).
    #[test]
    fn a_send_refused_by_a_reset_backend_is_a_reset_before_reply() {
        let (outcome, seen) = pump_against_a_reset_backend(Side::Dst);
        assert!(outcome.is_err(), "{outcome:?}");
        assert!(seen.reset_before_reply());
    }

    /// The pump from a backend that reset reads the reset.
    #[test]
    fn a_read_from_a_reset_backend_is_a_reset_before_reply() {
        let (outcome, seen) = pump_against_a_reset_backend(Side::Src);
        assert!(outcome.is_err(), "{outcome:?}");
        assert!(seen.reset_before_reply());
    }

    /// An upload already handed to splice(2) when the backend, which has
    /// replied nothing, resets: the splice's failed write is its reset.
    #[test]
    fn a_spliced_upload_refused_by_a_reset_backend_is_a_reset_before_reply() {
        let (client, mut client_peer) = rt::tests::loopback_pair(64 << 10);
        let uploader = std::thread::spawn(move || {
            // Ends with an error once the pump gives up and the client's
            // socket closes.
            let _ = std::io::Write::write_all(&mut client_peer, &vec![7u8; 8 << 20]);
        });
        let (backend, mut backend_peer) = rt::tests::loopback_pair(64 << 10);
        // Takes the first bytes, then resets without a reply.
        let resetter = std::thread::spawn(move || {
            let _ = std::io::Read::read(&mut backend_peer, &mut [0u8; 4096]);
            socket2::SockRef::from(&backend_peer)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
        });
        let (outcome, seen, spliced) = run_pump(client, backend, Side::Dst);
        resetter.join().unwrap();
        uploader.join().unwrap();
        assert!(outcome.is_err(), "{outcome:?}");
        assert_eq!(spliced, 1, "the flow went to splice(2)");
        assert!(seen.reset_before_reply());
    }
}
