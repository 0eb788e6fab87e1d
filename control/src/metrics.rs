//! Prometheus metrics on an admin listener (`GET /metrics`, text format
//! 0.0.4), served by the control thread.
//!
//! Nothing here touches the hot path: shards bump their own relaxed atomics
//! (`engine::stats`), and a scrape sums them. Per-backend counts come from the
//! current routing snapshot's live state, which shards share anyway for load
//! scoring.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;

use anyhow::Context;
use engine::select::Tier;
use engine::snapshot::{Backend, SnapshotHandle};
use engine::stats::CONNECT_LATENCY_BOUNDS;
use engine::StatsView;

/// Connections served at once (scrapers and probes); more wait in the
/// kernel's accept queue. Set aside in the descriptor reserve
/// (`crate::fd_limit`): without a cap, clients holding connections open
/// took the descriptors the data plane needs, and `/live` failed with them.
pub const MAX_CONNECTIONS: usize = 16;

/// What a scrape reads.
#[derive(Clone)]
pub struct Sources {
    pub engine: StatsView,
    pub snapshot: SnapshotHandle,
    pub started: std::time::Instant,
    /// Set when replication runs.
    pub replication: Option<crate::replication::status::StatusHandle>,
    /// Set when the mesh runs.
    pub mesh: Option<crate::mesh::status::StatusHandle>,
    /// Health checks and circuit breaker, when on.
    pub health: Option<crate::health::HealthLink>,
    /// For `/ready` and `/live` (`crate::readiness`).
    pub readiness: crate::readiness::Readiness,
    /// This POP's steering state and the BGP speaker.
    pub steering: Option<crate::steering::Handle>,
    /// The TLS certificates served and when each expires.
    pub tls_expiry: crate::tls::ExpiryView,
    /// False while routing.db is read as it is because it cannot be
    /// written (`RoutingStore::writable_flag`).
    pub store_writable: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Binds the admin listener. Done before the data plane starts, so a bind
/// failure is a clean startup error.
pub fn bind(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    // After a binary upgrade the socket is the previous process's.
    let listener = match crate::upgrade::sockets::take_tcp_listener("metrics", addr) {
        Some(inherited) => {
            crate::bounded_http::widen_backlog(&inherited);
            inherited
        }
        None => crate::bounded_http::listen(addr)
            .with_context(|| format!("metrics: cannot listen on {addr}"))?,
    };
    listener.set_nonblocking(true)?;
    crate::upgrade::sockets::register("metrics", &[std::os::fd::AsFd::as_fd(&listener)])
        .context("metrics: cannot register the socket for upgrades")?;
    Ok(listener)
}

/// Serves `/metrics` on the current Tokio runtime until the returned task
/// is aborted (scrapes in progress finish). Connections are bounded as the
/// discovery API's are (`crate::bounded_http`).
pub fn serve(
    listener: std::net::TcpListener,
    sources: Sources,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let probes = crate::readiness::routes(sources.readiness.clone());
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let sources = sources.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        render(&sources),
                    )
                }
            }),
        )
        .route(
            "/",
            axum::routing::get(|| async { "edgeproxy admin: GET /metrics, /ready, /live\n" }),
        )
        .merge(probes);
    Ok(tokio::spawn(crate::bounded_http::accept_loop(
        listener,
        app,
        MAX_CONNECTIONS,
        "metrics",
    )))
}

/// Writes one metric family: HELP, TYPE and its samples.
struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    fn single(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.header(name, kind, help);
        self.sample(name, &[], value);
    }

    /// One family with a sample per backend, labelled `backend` and `app`.
    fn per_backend(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        backends: &[Backend],
        value: impl Fn(&Backend) -> u64,
    ) {
        self.header(name, kind, help);
        for b in backends {
            self.sample(name, &[("backend", &b.id), ("app", &b.app)], value(b));
        }
    }
}

/// Label values escape backslash, double quote and newline.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub fn render(sources: &Sources) -> String {
    let mut out = String::with_capacity(8 * 1024);
    let mut f = Family { out: &mut out };
    let s = sources.engine.summary();
    let listeners = sources.engine.listeners();

    f.header(
        "edgeproxy_listener_up",
        "gauge",
        "1 for each listener running; 0 for one the configuration asks for that is not (its start at a reload failed, e.g. its port in use: every reload tries again).",
    );
    for l in &listeners {
        f.sample("edgeproxy_listener_up", &[("listener", &l.name)], 1);
    }
    // Recorded at the last reload; a scrape that meets the engine between
    // a listener's start and that record must not show it twice.
    for name in sources.readiness.not_listening() {
        if !listeners.iter().any(|l| l.name == name) {
            f.sample("edgeproxy_listener_up", &[("listener", &name)], 0);
        }
    }
    f.header(
        "edgeproxy_listener_connections_accepted_total",
        "counter",
        "Client connections accepted, per listener.",
    );
    for l in &listeners {
        f.sample(
            "edgeproxy_listener_connections_accepted_total",
            &[("listener", &l.name)],
            l.accepted,
        );
    }
    f.header(
        "edgeproxy_listener_connections_active",
        "gauge",
        "Client connections open now, per listener.",
    );
    for l in &listeners {
        f.sample(
            "edgeproxy_listener_connections_active",
            &[("listener", &l.name)],
            l.active,
        );
    }
    f.header(
        "edgeproxy_listener_connections_rejected_total",
        "counter",
        "Client connections closed early, per listener and reason (proxy_header: bad or late PROXY header; tls_handshake: failed or timed out; no_backend; client_limit: a per-client rate or connection limit). A connection limit closes nothing: accepting pauses (see edgeproxy_listener_accept_limit_waits_total).",
    );
    for l in &listeners {
        for (reason, n) in [
            ("proxy_header", l.rejected_proxy_header),
            ("tls_handshake", l.rejected_tls_handshake),
            ("no_backend", l.no_backend),
            ("client_limit", l.rejected_client_limit),
        ] {
            f.sample(
                "edgeproxy_listener_connections_rejected_total",
                &[("listener", &l.name), ("reason", reason)],
                n,
            );
        }
    }
    f.header(
        "edgeproxy_listener_accept_limit_waits_total",
        "counter",
        "Times a listener's accept loop paused because a connection limit was reached (clients then wait in the kernel's accept queue).",
    );
    for l in &listeners {
        f.sample(
            "edgeproxy_listener_accept_limit_waits_total",
            &[("listener", &l.name)],
            l.limit_waits,
        );
    }
    f.single(
        "edgeproxy_routing_store_writable",
        "gauge",
        "0 while routing.db cannot be opened for writing (a full or read-only disk at start): the POP routes from the table as it is in the file, the discovery API refuses writes (507 when the disk is full), and the read-write open is tried again every few seconds; else 1.",
        u64::from(sources.store_writable.load(Relaxed)),
    );
    f.single(
        "edgeproxy_max_connections",
        "gauge",
        "The process-wide connection limit in force (0 = unlimited); by default derived from the open files limit.",
        sources.engine.max_connections(),
    );
    f.header(
        "edgeproxy_shard_connections_accepted_total",
        "counter",
        "Client connections accepted, per shard.",
    );
    for (shard, n) in sources.engine.accepted_per_shard().iter().enumerate() {
        f.sample(
            "edgeproxy_shard_connections_accepted_total",
            &[("shard", &shard.to_string())],
            n,
        );
    }
    f.single(
        "edgeproxy_connections_active",
        "gauge",
        "Client connections open now.",
        s.active,
    );
    f.header(
        "edgeproxy_connections_rejected_total",
        "counter",
        "Client connections closed early, by reason.",
    );
    for (reason, n) in [
        ("proxy_header", s.rejected_proxy_header),
        ("no_backend", s.no_backend),
        ("tls_handshake", s.tls_handshake_failures),
    ] {
        f.sample(
            "edgeproxy_connections_rejected_total",
            &[("reason", reason)],
            n,
        );
    }
    f.single(
        "edgeproxy_idle_timeouts_total",
        "counter",
        "Connections closed by the idle timeout.",
        s.idle_timeouts,
    );
    f.header(
        "edgeproxy_bytes_total",
        "counter",
        "Bytes proxied, by direction.",
    );
    f.sample(
        "edgeproxy_bytes_total",
        &[("direction", "client_to_backend")],
        s.bytes_client_to_backend,
    );
    f.sample(
        "edgeproxy_bytes_total",
        &[("direction", "backend_to_client")],
        s.bytes_backend_to_client,
    );
    f.single(
        "edgeproxy_spliced_flows_total",
        "counter",
        "Directions of connections moved with splice(2), without copying through user space, after a read filled a whole buffer (runtime.splice_bulk).",
        s.spliced_flows,
    );
    f.single(
        "edgeproxy_backend_connect_retries_total",
        "counter",
        "Further backends tried after a failed connect.",
        s.retries,
    );
    f.header(
        "edgeproxy_selections_total",
        "counter",
        "Backends chosen, by geo tier (country, region, local POP region, fallback).",
    );
    for tier in Tier::ALL {
        f.sample(
            "edgeproxy_selections_total",
            &[("tier", tier.name())],
            s.tier[tier as usize],
        );
    }
    f.single(
        "edgeproxy_affinity_hits_total",
        "counter",
        "Backends chosen from a client affinity binding.",
        s.affinity_hits,
    );
    f.single(
        "edgeproxy_tls_handshakes_total",
        "counter",
        "TLS handshakes completed.",
        s.tls_handshakes,
    );
    f.single(
        "edgeproxy_tls_handshake_failures_total",
        "counter",
        "TLS handshakes that failed or timed out.",
        s.tls_handshake_failures,
    );
    let expiry = sources.tls_expiry.load();
    if !expiry.is_empty() {
        f.header(
            "edgeproxy_tls_certificate_expiry_timestamp_seconds",
            "gauge",
            "When each certificate file served ends its validity (Unix time); alert on it minus time().",
        );
        for c in expiry.iter() {
            f.sample(
                "edgeproxy_tls_certificate_expiry_timestamp_seconds",
                &[
                    ("listener", &c.listener),
                    ("cert", &c.cert.display().to_string()),
                ],
                c.not_after,
            );
        }
    }

    f.header(
        "edgeproxy_backend_connect_seconds",
        "histogram",
        "Time to connect to a backend (successful connects).",
    );
    for (i, bound) in CONNECT_LATENCY_BOUNDS.iter().enumerate() {
        f.sample(
            "edgeproxy_backend_connect_seconds_bucket",
            &[("le", &bound.to_string())],
            s.connect_latency_cumulative[i],
        );
    }
    let count = *s.connect_latency_cumulative.last().unwrap_or(&0);
    f.sample(
        "edgeproxy_backend_connect_seconds_bucket",
        &[("le", "+Inf")],
        count,
    );
    f.sample(
        "edgeproxy_backend_connect_seconds_sum",
        &[],
        s.connect_latency_sum_secs,
    );
    f.sample("edgeproxy_backend_connect_seconds_count", &[], count);

    let snap = sources.snapshot.load();
    f.single(
        "edgeproxy_routing_snapshot_version",
        "gauge",
        "Version of the routing snapshot in use (bumps on every publish).",
        snap.version,
    );
    f.single(
        "edgeproxy_routing_reloads_total",
        "counter",
        "Routing snapshots published after the first.",
        snap.version.saturating_sub(1),
    );
    f.single(
        "edgeproxy_routing_backends",
        "gauge",
        "Backends in the routing snapshot (deleted and invalid rows left out).",
        snap.backends.len(),
    );
    let backends = &snap.backends;
    f.per_backend(
        "edgeproxy_backend_connections_active",
        "gauge",
        "Connections open to each backend, across shards.",
        backends,
        |b| u64::from(b.live.active()),
    );
    f.per_backend(
        "edgeproxy_backend_connections_total",
        "counter",
        "Connections proxied to each backend.",
        backends,
        |b| b.live.total.load(Relaxed),
    );
    // One family, a label per backend (sum() for the total): not a second
    // family next to an unlabelled total.
    f.per_backend(
        "edgeproxy_backend_connect_failures_total",
        "counter",
        "Backend connect attempts that failed (refused, unreachable, timed out), per backend in the routing table.",
        backends,
        |b| b.live.connect_failures.load(Relaxed),
    );
    f.per_backend(
        "edgeproxy_backend_resets_before_reply_total",
        "counter",
        "Connections a backend accepted and then reset before sending a byte (a server that fails every request), per backend in the routing table.",
        backends,
        |b| b.live.resets_before_reply.load(Relaxed),
    );
    f.per_backend(
        "edgeproxy_backend_healthy",
        "gauge",
        "1 if the backend may take new connections.",
        backends,
        |b| u64::from(b.healthy),
    );
    f.single(
        "edgeproxy_uptime_seconds",
        "gauge",
        "Seconds since the process started.",
        sources.started.elapsed().as_secs(),
    );
    drop(snap);
    if let Some(r) = &sources.replication {
        replication(&mut f, &r.load());
    }
    let (passive_sent, passive_dropped) = sources.engine.passive_events();
    f.single(
        "edgeproxy_passive_events_dropped_total",
        "counter",
        "Passive health events shards dropped (queue full, or no checker listening).",
        passive_dropped,
    );
    f.single(
        "edgeproxy_passive_events_sent_total",
        "counter",
        "Passive health events shards queued for the checker.",
        passive_sent,
    );
    f.single(
        "edgeproxy_client_rate_limited_total",
        "counter",
        "New connections refused by the per-client rate limit.",
        s.rate_limited,
    );
    f.single(
        "edgeproxy_client_connection_limited_total",
        "counter",
        "New connections refused by the per-client cap on open connections.",
        s.client_conn_limited,
    );
    f.single(
        "edgeproxy_client_table_evictions_total",
        "counter",
        "Tracked clients evicted from the shards' rate-limit tables by new ones.",
        s.client_evictions,
    );
    pool(&mut f, &sources.engine.pool());
    if let Some(m) = &sources.mesh {
        crate::mesh::metrics::write(&mut out, &m.load());
    }
    if let Some(health) = &sources.health {
        health.render_metrics(&mut out);
    }
    crate::process_metrics::render(&mut out);
    if let Some(steering) = &sources.steering {
        crate::steering::status::render_metrics(&steering.status(), &mut out);
        if let Some(bgp) = steering.bgp_status() {
            crate::bgp::metrics::render(&bgp, &mut out);
        }
    }
    out
}

/// `edgeproxy_pool_*`: warm backend connections, summed over shards.
fn pool(f: &mut Family<'_>, p: &engine::pool::stats::PoolSummary) {
    f.single(
        "edgeproxy_pool_hits_total",
        "counter",
        "Client connections that took a warm pooled backend connection.",
        p.hits,
    );
    f.single(
        "edgeproxy_pool_misses_total",
        "counter",
        "Client connections to a warmed backend that found no usable pooled connection and connected fresh.",
        p.misses,
    );
    f.single(
        "edgeproxy_pool_stale_total",
        "counter",
        "Pooled connections found closed by the backend (never handed to a client: it got a fresh connection).",
        p.stale,
    );
    f.single(
        "edgeproxy_pool_replayed_total",
        "counter",
        "Of the stale: found after the client's first bytes were sent, which were sent again on a fresh connection.",
        p.replayed,
    );
    f.single(
        "edgeproxy_pool_expired_total",
        "counter",
        "Pooled connections closed by the idle timeout or the maximum lifetime.",
        p.expired,
    );
    f.header(
        "edgeproxy_pool_connects_total",
        "counter",
        "Background connects made to fill the pool, by result.",
    );
    f.sample(
        "edgeproxy_pool_connects_total",
        &[("result", "ok")],
        p.connects,
    );
    f.sample(
        "edgeproxy_pool_connects_total",
        &[("result", "failed")],
        p.connect_failures,
    );
    f.single(
        "edgeproxy_pool_speaks_first_excluded_total",
        "counter",
        "Backends excluded from pooling because they sent bytes before any client (pool.speaks_first = exclude).",
        p.speaks_first_excluded,
    );
    f.single(
        "edgeproxy_pool_idle_connections",
        "gauge",
        "Warm backend connections waiting in the pool now (all shards).",
        p.idle,
    );
    f.single(
        "edgeproxy_pool_connecting",
        "gauge",
        "Background pool connects in flight now.",
        p.connecting,
    );
}

/// `edgeproxy_replication_*`: members by state, bytes, rows, conflicts,
/// refused peers, anti-entropy exchanges and the lag histogram.
fn replication(f: &mut Family<'_>, s: &crate::replication::status::ClusterStatus) {
    let (alive, suspect, down) = s.by_state();
    f.header(
        "edgeproxy_replication_members",
        "gauge",
        "Other cluster members by SWIM state.",
    );
    for (state, n) in [("alive", alive), ("suspect", suspect), ("down", down)] {
        f.sample("edgeproxy_replication_members", &[("state", state)], n);
    }
    let c = &s.counters;
    f.header(
        "edgeproxy_replication_bytes_sent_total",
        "counter",
        "Bytes sent, by channel: gossip datagrams, broadcast and anti-entropy messages (QUIC payload).",
    );
    for (channel, v) in [
        ("gossip", c.gossip_bytes_sent),
        ("broadcast", c.broadcast_bytes_sent),
        ("sync", c.sync_bytes_sent),
    ] {
        f.sample(
            "edgeproxy_replication_bytes_sent_total",
            &[("channel", channel)],
            v,
        );
    }
    f.header(
        "edgeproxy_replication_bytes_received_total",
        "counter",
        "Bytes received, by channel.",
    );
    for (channel, v) in [
        ("gossip", c.gossip_bytes_received),
        ("transport", c.transport_bytes_received),
    ] {
        f.sample(
            "edgeproxy_replication_bytes_received_total",
            &[("channel", channel)],
            v,
        );
    }
    f.single(
        "edgeproxy_replication_rows",
        "gauge",
        "Row versions held (tombstones included).",
        s.rows,
    );
    f.single(
        "edgeproxy_replication_local_changes_total",
        "counter",
        "Local row changes versioned and broadcast.",
        c.local_changes,
    );
    f.single(
        "edgeproxy_replication_rows_applied_total",
        "counter",
        "Remote row versions applied here (written to routing.db).",
        c.rows_applied,
    );
    f.single(
        "edgeproxy_replication_store_write_failures_total",
        "counter",
        "Replication's writes to routing.db that failed (a full disk, a read-only file system, a lock held too long).",
        c.store_write_failures,
    );
    f.single(
        "edgeproxy_replication_store_writable",
        "gauge",
        "0 while replication cannot write routing.db (rows from other POPs wait; anti-entropy brings them again once it can), else 1. The POP routes from its last table meanwhile.",
        u64::from(s.store_error.is_none()),
    );
    f.single(
        "edgeproxy_replication_conflicts_resolved_total",
        "counter",
        "Incoming row versions that lost to a newer one (last-writer-wins).",
        c.conflicts_resolved,
    );
    f.single(
        "edgeproxy_replication_syncs_total",
        "counter",
        "Anti-entropy exchanges this node started and finished.",
        c.syncs,
    );
    f.single(
        "edgeproxy_replication_syncs_in_sync_total",
        "counter",
        "Of those, exchanges that found both nodes identical.",
        c.syncs_in_sync,
    );
    f.single(
        "edgeproxy_replication_transport_wire_bytes_sent_total",
        "counter",
        "Broadcast and anti-entropy bytes as written on QUIC streams: large messages compressed where the peer negotiated it.",
        c.transport_wire_bytes_sent,
    );
    f.single(
        "edgeproxy_replication_messages_dropped_total",
        "counter",
        "Transport messages dropped (peer queue full or unreachable); anti-entropy repairs them.",
        c.messages_dropped,
    );
    f.single(
        "edgeproxy_replication_gossip_accepted_secret_total",
        "counter",
        "Gossip datagrams that opened under replication.accept_secret, not this POP's own secret: peers still sealing with that secret. Flat on every POP: no POP uses it any more.",
        c.gossip_accepted_secret,
    );
    f.header(
        "edgeproxy_replication_refused_total",
        "counter",
        "Peers' datagrams, messages or handshakes refused, by reason.",
    );
    for (reason, n) in &s.refused {
        f.sample(
            "edgeproxy_replication_refused_total",
            &[("reason", reason)],
            n,
        );
    }
    let (member, this_pop) = crate::replication::metrics::back_after_ttl();
    f.header(
        "edgeproxy_replication_back_after_tombstone_ttl_total",
        "counter",
        "Returns after longer than replication.tombstone_ttl_secs: a member up again after being down here that long (who=member), or this POP hearing another after none that long (who=this_pop). Rows deleted meanwhile may come back.",
    );
    for (who, n) in [("member", member), ("this_pop", this_pop)] {
        f.sample(
            "edgeproxy_replication_back_after_tombstone_ttl_total",
            &[("who", who)],
            n,
        );
    }
    let (buckets, sum_ms) = crate::replication::metrics::lag_histogram();
    f.header(
        "edgeproxy_replication_lag_seconds",
        "histogram",
        "Delay from a row's write at its origin POP to its arrival here.",
    );
    let bounds = crate::replication::metrics::LAG_BUCKETS_MS;
    for (i, count) in buckets.iter().enumerate() {
        let le = bounds
            .get(i)
            .map(|ms| format!("{}", *ms as f64 / 1000.0))
            .unwrap_or_else(|| "+Inf".into());
        f.sample(
            "edgeproxy_replication_lag_seconds_bucket",
            &[("le", &le)],
            count,
        );
    }
    f.sample(
        "edgeproxy_replication_lag_seconds_sum",
        &[],
        sum_ms as f64 / 1000.0,
    );
    f.sample(
        "edgeproxy_replication_lag_seconds_count",
        &[],
        buckets.last().copied().unwrap_or(0),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
