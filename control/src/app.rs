//! Composes the process: config → GeoIP → routing store → data plane, then
//! runs the control loop on this thread until SIGTERM/SIGINT.
//!
//! The control loop (a single-threaded Tokio runtime) owns everything that
//! may block: config files, signals, the discovery API's SQLite writes. The
//! periodic routing reload runs on its own low-priority thread
//! (`reload_thread`). The shards never wait on either.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use engine::geo::{GeoDb, GeoResolver, RegionMap};
use engine::snapshot::Country;
use engine::{Engine, EngineSettings, Knobs, ListenerSpec};
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::config::{self, Config};
use crate::reload_thread::{ReloadThread, SharedReloader};
use crate::routing::RoutingReloader;
use crate::store::RoutingStore;
use crate::tls::TlsListeners;

/// Runs the proxy until a stop signal. Errors before the proxy is up are
/// returned (the caller prints them and exits non-zero).
pub fn run(config_path: Option<PathBuf>) -> anyhow::Result<()> {
    let config = config::load(config_path.as_deref(), &config::ProcessEnv)?;
    crate::logging::init(&config.log.level);
    let geo = Arc::new(build_geo(&config)?);

    let mut store = RoutingStore::open(&config.routing.db_path)?;
    store.set_node_id(&config.replication.node_id);
    if config.demo.backends > 0 {
        let records =
            crate::demo::start(config.demo.backends, &config.demo.app, &config.pop.region)
                .context("cannot start demo backends")?;
        for rec in &records {
            store.upsert(rec)?;
        }
    }
    let reloader = SharedReloader::new(RoutingReloader::start_with_ttl(
        store,
        Some(config.api.heartbeat_ttl),
    )?);
    let snapshot = reloader.lock().handle().clone();
    let first = snapshot.load();
    tracing::info!(
        version = first.version,
        backends = first.backends.len(),
        apps = first.app_count(),
        db = %config.routing.db_path.display(),
        "routing table loaded"
    );
    drop(first);

    let metrics_listener = match config.metrics.enabled {
        true => Some(crate::metrics::bind(config.metrics.listen_addr)?),
        false => None,
    };
    let mut tls = TlsListeners::default();
    let specs = config
        .listeners
        .iter()
        .map(|l| spec_of(l, &mut tls))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // Internal DNS: bound now (a bind failure stops startup), served on the
    // control runtime below. See `internal_dns`.
    let dns = crate::internal_dns::bind(&config, snapshot.clone(), Arc::clone(&geo))?;
    // Replication's UDP sockets: bound now, started on the control runtime.
    let replication = crate::replication::driver::bind(&config)?;
    let mut engine = Engine::start(
        engine_settings(&config),
        knobs(&config),
        &specs,
        snapshot.clone(),
        geo,
    )?;
    engine.set_pool(config.pool.policy());
    log_pool(&config.pool);
    // Health checks and the circuit breaker: their state weighs on every
    // snapshot from now on (see `health`); the driver starts on the control
    // runtime below. It always runs: a backend may register with a check of
    // its own while checks are off for its app, and with nothing to check
    // it only waits.
    let health = crate::health::HealthLink::new(&config.health, &config.circuit_breaker);
    reloader.lock().set_health(health.clone());
    let passive_events = engine.take_passive_events();
    for l in engine.listeners() {
        tracing::info!(listener = %l.spec.name, addr = %l.local_addr, app = l.spec.app.as_deref().unwrap_or("*"),
            proxy_protocol = l.spec.accept_proxy_protocol, tls = l.spec.tls.is_some(), steered = l.steered, "listening");
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the control runtime")?;
    // Stop and reload signals are handled from here on, before anything says
    // the proxy is ready (see `Signals`).
    let signals = {
        let _context = runtime.enter();
        Signals::install()?
    };
    let replication = match replication {
        None => None,
        Some(bound) => {
            let _context = runtime.enter();
            Some(bound.start(reloader.clone())?)
        }
    };
    if let Some(listener) = metrics_listener {
        let addr = listener.local_addr()?;
        let sources = crate::metrics::Sources {
            engine: engine.stats_view(),
            snapshot: snapshot.clone(),
            started: std::time::Instant::now(),
            replication: replication.as_ref().map(|r| r.status()),
            health: Some(health.clone()),
        };
        runtime.block_on(async { crate::metrics::serve(listener, sources) })?;
        tracing::info!(%addr, "metrics listening");
    }
    // The discovery API: bound here (a taken port fails the start), its
    // requests executed by the control loop, which owns the routing store.
    let api = match crate::api::bind(&config.api)? {
        None => None,
        Some(bound) => Some(runtime.block_on(async {
            bound.serve(snapshot.clone(), replication.as_ref().map(|r| r.status()))
        })?),
    };
    if let Some(dns) = dns {
        runtime.spawn(dns.serve());
    }
    runtime.spawn(
        crate::health::driver::Driver {
            link: health.clone(),
            snapshots: snapshot.clone(),
            reloader: reloader.clone(),
            events: passive_events,
            health: config.health.clone(),
            pop: config.pop.name.clone(),
        }
        .run(),
    );
    tracing::info!(
        active_checks = health.active_checks_enabled(),
        circuit_breaker = health.circuit_enabled(),
        max_concurrent = config.health.max_concurrent,
        "health checker started"
    );
    // Every listener and service is up and the signal handlers are in place:
    // tests and operators wait for this line.
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        pop = %config.pop.name,
        region = %config.pop.region,
        shards = engine.shard_count(),
        reload_interval_ms = config.routing.reload_interval.as_millis() as u64,
        "edgeproxy ready"
    );
    let ticks = ReloadThread::start(reloader.clone(), config.routing.reload_interval)
        .context("cannot start the routing reload thread")?;
    let grace = runtime.block_on(control_loop(
        signals,
        config_path,
        config,
        (&reloader, &ticks),
        &mut engine,
        &mut tls,
        (api, replication.as_ref()),
    ))?;
    if let Some(r) = &replication {
        // Leave the cluster first: the other POPs mark this one down at
        // once instead of after the suspicion timeout.
        runtime.block_on(r.shutdown(Duration::from_secs(2)));
    }
    ticks.stop();
    tracing::info!(
        grace_secs = grace.as_secs(),
        open = engine.active_connections(),
        "shutting down: stopped accepting, draining open connections"
    );
    engine.shutdown(grace);
    tracing::info!("shutdown complete");
    Ok(())
}

/// Loads and validates the configuration as `run` would, without starting
/// anything, and returns the effective configuration.
pub fn check(config_path: Option<&Path>) -> anyhow::Result<Config> {
    let config = config::load(config_path, &config::ProcessEnv)?;
    build_geo(&config)?;
    let mut tls = TlsListeners::default();
    for l in &config.listeners {
        spec_of(l, &mut tls)?;
    }
    Ok(config)
}

/// SIGHUP, SIGTERM and SIGINT, caught from the moment [`Signals::install`]
/// returns. Installed before `edgeproxy ready` is logged: until then a stop
/// signal would get the default action (the process dies without draining),
/// so a supervisor that signals as soon as the proxy says it is ready must
/// find the handlers in place. A signal that arrives before the control loop
/// polls for it is kept and seen by that first poll.
struct Signals {
    hup: Signal,
    term: Signal,
    int: Signal,
}

impl Signals {
    /// Must run inside the control runtime's context.
    fn install() -> anyhow::Result<Signals> {
        Ok(Signals {
            hup: signal(SignalKind::hangup()).context("cannot install SIGHUP handler")?,
            term: signal(SignalKind::terminate()).context("cannot install SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("cannot install SIGINT handler")?,
        })
    }
}

/// Returns the drain grace period once a stop signal arrives.
async fn control_loop(
    signals: Signals,
    config_path: Option<PathBuf>,
    mut config: Config,
    (reloader, ticks): (&SharedReloader, &ReloadThread),
    engine: &mut Engine,
    tls: &mut TlsListeners,
    (mut api, replication): (
        Option<crate::api::Server>,
        Option<&crate::replication::driver::Handle>,
    ),
) -> anyhow::Result<Duration> {
    let Signals {
        mut hup,
        mut term,
        mut int,
    } = signals;
    let mut ticker = tokio::time::interval(config.routing.reload_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            // Certificate files are polled at the routing reload interval;
            // with no TLS listener there is nothing to wake up for.
            _ = ticker.tick(), if !tls.is_empty() => {
                tls.refresh(false);
            }
            _ = hup.recv() => {
                tracing::info!("SIGHUP: re-reading configuration and routing table");
                match &config_path {
                    None => tracing::info!("no config file given; only the routing table is re-read"),
                    Some(path) => match config::load(Some(path), &config::ProcessEnv) {
                        Ok(new) => match apply(&config, &new, engine, tls) {
                            Ok(()) => {
                                if new.routing.reload_interval != config.routing.reload_interval {
                                    ticks.set_interval(new.routing.reload_interval);
                                    ticker = tokio::time::interval(new.routing.reload_interval);
                                    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                                }
                                config = new;
                            }
                            Err(e) => tracing::error!(error = format!("{e:#}"), "new configuration rejected; keeping the running one"),
                        },
                        Err(e) => tracing::error!(error = %e, "new configuration rejected; keeping the running one"),
                    },
                }
                reloader.lock().reload();
                tls.refresh(true);
            }
            _ = term.recv() => return Ok(config.limits.shutdown_grace),
            _ = int.recv() => return Ok(config.limits.shutdown_grace),
            // Discovery API calls: store writes and reads, each write
            // published before the caller hears back.
            cmd = crate::api::next_command(&mut api) => {
                crate::api::execute(cmd, &mut reloader.lock());
                // A write goes out to the other POPs now, not at the next
                // change-log poll.
                if let Some(r) = replication {
                    r.poke();
                }
            }
        }
    }
}

/// Applies what can change without a restart and logs the rest.
///
/// Everything the new listeners need (certificates) is built first: if any of
/// it fails, nothing changes and the error is returned.
fn apply(
    old: &Config,
    new: &Config,
    engine: &mut Engine,
    tls: &mut TlsListeners,
) -> anyhow::Result<()> {
    let mut starting = Vec::new();
    for l in &new.listeners {
        if !old.listeners.contains(l) {
            starting.push(spec_of(l, tls)?);
        }
    }
    if old.pool != new.pool {
        engine.set_pool(new.pool.policy());
        log_pool(&new.pool);
    }
    let new_knobs = knobs(new);
    if *engine.knobs() != new_knobs {
        tracing::info!(?new_knobs, "limits and timeouts updated");
        engine.set_knobs(new_knobs);
    }
    // Listeners: removed or changed ones stop; added or changed ones start.
    for l in &old.listeners {
        let kept = new.listeners.iter().any(|n| n == l);
        if !kept && engine.remove_listener(&l.name) {
            tracing::info!(listener = %l.name, addr = %l.addr, "listener stopped");
        }
    }
    tls.retain(|name| {
        new.listeners
            .iter()
            .any(|l| l.name == name && l.tls.is_some())
    });
    for spec in starting {
        let name = spec.name.clone();
        match engine.add_listener(spec) {
            Ok(addr) => tracing::info!(listener = %name, %addr, "listening"),
            Err(e) => tracing::error!(listener = %name, error = %e, "cannot start listener"),
        }
    }
    let restart_only = [
        ("runtime", old.runtime != new.runtime),
        (
            "routing.db_path",
            old.routing.db_path != new.routing.db_path,
        ),
        ("geo", old.geo != new.geo),
        ("pop", old.pop != new.pop),
        ("demo", old.demo != new.demo),
        ("log", old.log != new.log),
        ("api", old.api != new.api),
        ("dns", old.dns != new.dns),
        ("metrics", old.metrics != new.metrics),
        ("replication", old.replication != new.replication),
        (
            "health (except rtt_weight)",
            old.health.global != new.health.global
                || old.health.apps != new.health.apps
                || old.health.max_concurrent != new.health.max_concurrent
                || old.health.webhook_url != new.health.webhook_url,
        ),
        (
            "circuit_breaker",
            old.circuit_breaker != new.circuit_breaker,
        ),
        (
            "rate_limit.tracked_clients",
            old.rate_limit.tracked_clients != new.rate_limit.tracked_clients,
        ),
    ];
    for (section, changed) in restart_only {
        if changed {
            tracing::warn!(
                section,
                "this setting changed but takes effect only after a restart"
            );
        }
    }
    Ok(())
}

fn log_pool(pool: &crate::pool_config::Pool) {
    if pool.enabled {
        tracing::info!(
            warm = ?pool.warm,
            min_rtt_ms = pool.min_rtt_ms,
            apps = ?pool.apps,
            max_per_backend = pool.max_per_backend,
            idle_timeout_secs = pool.idle_timeout.as_secs(),
            max_lifetime_secs = pool.max_lifetime.as_secs(),
            speaks_first = ?pool.speaks_first,
            "pool: warm backend connections on (per shard)"
        );
    } else {
        tracing::info!("pool: warm backend connections off");
    }
}

fn build_geo(config: &Config) -> anyhow::Result<GeoResolver> {
    let db = match &config.geo.db_path {
        Some(path) => GeoDb::open(path)
            .with_context(|| format!("cannot load GeoIP database {}", path.display()))?,
        None => GeoDb::embedded().context("cannot load the embedded GeoIP database")?,
    };
    let regions = match &config.geo.regions {
        None => RegionMap::default(),
        Some(map) => RegionMap::new(
            &config.geo.default_region,
            map.iter().map(|(region, countries)| {
                (
                    region.clone(),
                    countries.iter().filter_map(|c| Country::parse(c)).collect(),
                )
            }),
        ),
    };
    let overrides = config
        .geo
        .overrides
        .iter()
        .filter_map(|o| Some((o.cidr, Country::parse(&o.country)?)))
        .collect();
    Ok(GeoResolver::new(overrides, Some(db), regions))
}

fn engine_settings(config: &Config) -> EngineSettings {
    EngineSettings {
        shards: config.runtime.shards as usize,
        pin_cores: config.runtime.pin_cores,
        buffer_count: config.runtime.buffer_count.min(32768) as u16,
        buffer_size: config.runtime.buffer_size,
        splice_bulk: config.runtime.splice_bulk,
        local_region: Arc::from(config.pop.region.as_str()),
        client_table_capacity: config.rate_limit.tracked_clients,
    }
}

fn knobs(config: &Config) -> Knobs {
    Knobs {
        max_connections: config.limits.max_connections,
        max_connections_per_shard: config.limits.max_connections_per_shard,
        connect_timeout: config.limits.connect_timeout,
        connect_attempts: config.limits.connect_attempts,
        idle_timeout: config.limits.idle_timeout,
        affinity_ttl: config.affinity.ttl,
        affinity_gc_interval: config.affinity.gc_interval,
        rtt_weight: config.health.rtt_weight,
        client_limits: config.rate_limit.client_limits(),
        ..Knobs::default()
    }
}

fn spec_of(l: &config::Listener, tls: &mut TlsListeners) -> anyhow::Result<ListenerSpec> {
    let termination = match &l.tls {
        None => None,
        Some(settings) => Some(
            tls.termination_for(&l.name, settings)
                .with_context(|| format!("listener {:?}", l.name))?,
        ),
    };
    Ok(ListenerSpec {
        name: Arc::from(l.name.as_str()),
        addr: l.addr,
        app: l.app.as_deref().map(Arc::from),
        accept_proxy_protocol: l.accept_proxy_protocol,
        send_proxy_protocol: l.send_proxy_protocol,
        tls: termination,
    })
}
