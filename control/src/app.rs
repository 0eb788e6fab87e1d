//! Composes the process: config → GeoIP and certificates → every socket
//! bound → routing store → data plane, then runs the control loop on this
//! thread until SIGTERM/SIGINT, then the drain (`drain`), with the control
//! thread still answering, until the shards are done or a second signal.
//!
//! The control loop (a single-threaded Tokio runtime) owns everything that
//! may block: config files, signals, the discovery API's SQLite writes. The
//! periodic routing reload runs on its own low-priority thread
//! (`reload_thread`), the counters' summaries on another (`traffic_watch`).
//! The shards never wait on any of them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use engine::geo::{GeoDb, GeoResolver, RegionMap};
use engine::own_listeners::OwnListeners;
use engine::snapshot::Country;
use engine::{Engine, EngineSettings, Knobs, ListenerSpec};
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::config::{self, Config};
use crate::config_watch::ConfigWatch;
use crate::own_row_gate::OwnRowGate;
use crate::reload_thread::{ReloadThread, SharedReloader};
use crate::routing::RoutingReloader;
use crate::store::RoutingStore;
use crate::tls::TlsListeners;
use crate::upgrade::UpgradeEvent;

/// Runs the proxy until a stop signal. Errors before the proxy is up are
/// returned (the caller prints them and exits non-zero).
///
/// Order: everything that can fail without side effects first (config,
/// GeoIP, certificates), then every socket is bound (listeners, metrics,
/// API, DNS), and only then is anything created (a new `routing.db`, demo
/// backends): a start that fails on a port in use leaves nothing behind.
/// The data plane starts accepting last, once everything that can fail
/// has not (a successor of a binary upgrade that failed after accepting
/// would drop the connections it took).
/// How long after a binary upgrade's successor is ready a listener it adds
/// waits for an address its predecessor may still hold.
const PREDECESSOR_RELEASE_WINDOW: Duration = Duration::from_secs(10);

pub fn run(config_path: Option<PathBuf>) -> anyhow::Result<()> {
    // A successor of a binary upgrade takes its sockets before anything
    // binds (and before any thread starts: this edits the environment).
    let inherited = crate::upgrade::inherit::from_env()
        .context("binary upgrade: cannot take over the previous process's sockets")?;
    // What it serves, as it said (this too edits the environment).
    let predecessor_tls = inherited
        .as_ref()
        .map(|_| crate::tls::Predecessor::from_env());
    let watch_from = ConfigWatch::stamp(config_path.as_deref());
    let config = config::load(config_path.as_deref(), &config::ProcessEnv)?;
    crate::logging::init(&config.log);
    if let Some(got) = &inherited {
        tracing::info!(
            entries = got.entries,
            sockets = got.sockets,
            "upgrade: took over the previous process's sockets"
        );
    }
    let geo = Arc::new(build_geo(&config)?);
    let mut tls = match predecessor_tls {
        Some(predecessor) => TlsListeners::for_successor(predecessor),
        None => TlsListeners::default(),
    };
    let specs = config
        .listeners
        .iter()
        .map(|l| spec_of(l, &mut tls))
        .collect::<anyhow::Result<Vec<_>>>()?;
    tls.started();

    let sockets = bind_all(&config, &specs, config.runtime.shards as usize, &geo)?;
    crate::fd_limit::raise_and_log(&config);

    crate::routing_db_path::prepare(&config.routing.db_path)?;
    let mut store = RoutingStore::open(&config.routing.db_path)?;
    store.set_node_id(&config.replication.node_id);
    // The mesh's key and 6PN prefix, checked against this POP's row.
    let mut mesh = crate::mesh::driver::prepare(&config, &mut store)?;
    if config.demo.backends > 0 {
        let records =
            crate::demo::start(config.demo.backends, &config.demo.app, &config.pop.region)
                .context("cannot start demo backends")?;
        for rec in &records {
            store.upsert(rec)?;
        }
    }
    // Rows pointing at a listener would loop: left out from the first
    // snapshot on (the listeners are bound, their ports known).
    let own = OwnListeners::new(sockets.listeners.local_addrs());
    let store_writable = store.writable_flag();
    let reloader = SharedReloader::new(RoutingReloader::start_with(
        store,
        Some(config.api.heartbeat_ttl),
        own,
    )?);
    // `[postgres]`: the database's table, mirrored into routing.db before
    // the first snapshot is read (bounded wait; see `pg_source`).
    let postgres = crate::pg_source::PgSource::start(
        &config.postgres,
        &config.routing.db_path,
        reloader.clone(),
    )
    .context("cannot start the PostgreSQL routing source")?;
    let snapshot = reloader.lock().handle().clone();
    let first = snapshot.load();
    tracing::info!(
        version = first.version,
        backends = first.backends.len(),
        apps = first.app_count(),
        db = %crate::routing_db_path::absolute(&config.routing.db_path).display(),
        "routing table loaded"
    );
    drop(first);

    let Sockets {
        listeners,
        metrics: metrics_listener,
        api: api_socket,
        dns,
        mut replication,
    } = sockets;
    if let (Some(bound), Some(m)) = (replication.as_mut(), mesh.as_mut()) {
        bound.set_mesh(m.columns(bound.advertised_ip()));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the control runtime")?;
    // Stop and reload signals are handled from here on, before anything says
    // the proxy is ready (see `Signals`).
    let mut signals = {
        let _context = runtime.enter();
        Signals::install()?
    };
    let readiness = crate::readiness::Readiness::default();
    let mut upgrades = {
        let _context = runtime.enter();
        crate::upgrade::Upgrades::start(&config.upgrade)?
    };
    // The mesh interface is up (or the start fails) before this POP's row
    // tells the other POPs to peer with it.
    let mesh_cluster = mesh.as_ref().map(|m| m.six_pn().cluster.net());
    let mut mesh = mesh.map(|m| m.start(snapshot.clone())).transpose()?;
    // The unreachable route a previous run left (killed, or the predecessor
    // of a binary upgrade) when this run's mesh is off or on another /48:
    // now, or for a successor once its predecessor stopped its mesh.
    crate::mesh::leftover::sweep_at_start(&runtime, mesh_cluster);
    // The data plane starts before replication: steering judges its
    // listeners, and this POP's row must carry that verdict before it first
    // replicates. (A successor of a binary upgrade starts replication only
    // after it reported ready, see below, so it cannot fail after it
    // accepted because of replication.)
    let mut engine = Engine::start_bound(
        engine_settings(&config),
        knobs(&config),
        listeners,
        snapshot.clone(),
        geo,
    )?;
    let pool = crate::fd_limit::pool_policy(&config, config.runtime.shards);
    log_pool(&config.pool, pool.as_ref());
    engine.set_pool(pool);
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
    // Listeners that would refuse every connection, said at once.
    let coverage = {
        let mut reloader = reloader.lock();
        let coverage = reloader.coverage_mut();
        coverage.set_listeners(listener_apps(&config));
        coverage.warn(&snapshot.load(), "start");
        coverage.shared()
    };
    let _watch = crate::traffic_watch::WatchThread::start(
        crate::traffic_watch::Sources {
            stats: engine.stats_view(),
            snapshot: snapshot.clone(),
            coverage,
        },
        config.log.summary_interval,
    )
    .context("cannot start the traffic watch thread")?;

    // Traffic steering (POP drain, the anycast speaker, this POP's verdict
    // in `pops`): started before replication so this POP's row holds a
    // real verdict before it first replicates.
    // With replication starting afresh, this POP's row waits for the
    // cluster's copy of it (see `crate::own_row_gate`).
    let own_row = match &replication {
        Some(bound) if !bound.inherited() => OwnRowGate::closed(),
        _ => OwnRowGate::open(),
    };
    let steering = {
        let _context = runtime.enter();
        let inherited = (config.bgp.enabled && crate::upgrade::inherit::is_successor())
            .then(crate::bgp::driver::inherit_from_predecessor);
        crate::steering::start(
            &config,
            snapshot.clone(),
            engine.stats_view(),
            reloader.clone(),
            inherited,
            own_row.clone(),
        )
        .context("cannot start traffic steering")?
    };
    // A successor of a binary upgrade runs replication's member once its
    // predecessor has stopped it (after this process reported ready): two
    // processes must never run one member on the same sockets.
    let replication = match replication {
        None => None,
        Some(bound) if bound.inherited() => {
            let _context = runtime.enter();
            Some(bound.start_after_hand_off(reloader.clone()))
        }
        Some(bound) => {
            let _context = runtime.enter();
            Some(bound.start(reloader.clone(), own_row)?)
        }
    };
    let mut metrics = None;
    if let Some(listener) = metrics_listener {
        let addr = listener.local_addr()?;
        let sources = crate::metrics::Sources {
            engine: engine.stats_view(),
            snapshot: snapshot.clone(),
            started: std::time::Instant::now(),
            replication: replication.as_ref().map(|r| r.status()),
            mesh: mesh.as_ref().map(|m| m.status()),
            steering: Some(steering.clone()),
            health: Some(health.clone()),
            readiness: readiness.clone(),
            tls_expiry: tls.expiry(),
            store_writable: store_writable.clone(),
        };
        metrics = Some(runtime.block_on(async { crate::metrics::serve(listener, sources) })?);
        tracing::info!(%addr, "metrics listening");
    }
    // The discovery API: its requests executed by the control loop, which
    // owns the routing store.
    let api = match api_socket {
        None => None,
        Some(bound) => Some(runtime.block_on(async {
            bound
                .with_mesh(mesh.as_ref().map(|m| (m.api_hooks(), m.status())))
                .serve(
                    snapshot.clone(),
                    replication.as_ref().map(|r| r.api_hooks()),
                    readiness.clone(),
                    Some(steering.clone()),
                )
        })?),
    };
    let (stop_dns, dns_stop) = tokio::sync::watch::channel(false);
    if let Some(dns) = dns {
        runtime.spawn(dns.serve(snapshot.clone(), dns_stop));
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
    // Inherited sockets the new configuration has no use for (a listener
    // it removed) go now, before this process says it serves.
    crate::upgrade::sockets::release_unclaimed();
    // Every listener and service is up and the signal handlers are in place:
    // tests and operators wait for this line.
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        pid = std::process::id(),
        pop = %config.pop.name,
        region = %config.pop.region,
        shards = engine.shard_count(),
        reload_interval_ms = config.routing.reload_interval.as_millis() as u64,
        "edgeproxy ready"
    );
    readiness.set_ready();
    crate::sd_notify::ready(&ready_status(&engine, &[]));
    let ticks = ReloadThread::start(reloader.clone(), config.routing.reload_interval)
        .context("cannot start the routing reload thread")?;
    if inherited.is_some() {
        // A config edit or SIGHUP made during the upgrade may have started a
        // listener in the predecessor, which it closes only now; this
        // process applies the same edit at once (see `config_watch`).
        engine.predecessor_may_hold_addresses(PREDECESSOR_RELEASE_WINDOW);
    }
    // The predecessor of a binary upgrade stops accepting now.
    crate::upgrade::inherit::report_ready();
    upgrades.serving();
    let mut services = Services {
        api,
        upgrades,
        metrics,
        stop_dns,
        watch: ConfigWatch::new(config_path.as_deref(), &config.config_watch, watch_from),
        replication,
        steering,
        readiness: readiness.clone(),
    };
    let exit = runtime.block_on(control_loop(
        &mut signals,
        config_path,
        config,
        (&reloader, &ticks),
        &mut engine,
        &mut tls,
        &mut services,
    ))?;
    // Anycast first: routes tagged GRACEFUL_SHUTDOWN for the drain delay,
    // then withdrawn, and the withdrawal on the wire, while the listeners
    // still accept; GeoDNS everywhere stops answering this POP meanwhile.
    let upgraded = matches!(exit, Exit::Upgraded(..));
    let grace = match exit {
        Exit::Stop(grace) => {
            runtime.block_on(services.steering.shutdown());
            if let Some(r) = &services.replication {
                // Leave the cluster first: the other POPs mark this one down at
                // once instead of after the suspicion timeout.
                runtime.block_on(r.shutdown(Duration::from_secs(2)));
            }
            runtime.block_on(services.upgrades.shut_down());
            grace
        }
        Exit::Upgraded(grace, successor) => {
            // The successor owns this POP's row and its anycast verdict
            // now: nothing is withdrawn or marked "not serving", and the
            // BGP sessions go on in it (the routers see nothing).
            crate::sd_notify::main_pid(successor.pid);
            // The mesh first: 6PN traffic stops from this process's WireGuard
            // stopping to the successor's starting on the same TUN device.
            // (`Mesh` before `BgpDone` always: a successor with the mesh off
            // reads `BgpDone` without it as "no mesh ran there", see
            // `upgrade::inherit::await_no_mesh`.)
            if let Some(m) = mesh.take() {
                m.release(Duration::from_secs(5));
                successor.release_mesh();
            }
            let sessions = runtime.block_on(services.steering.hand_over());
            successor.release_bgp(sessions);
            // Replication first, the gap in gossip is as short as this:
            // stop the member without leaving, then the successor runs it.
            if let Some(r) = services.replication.take() {
                let generation = runtime.block_on(r.release(Duration::from_secs(3)));
                successor.release_replication(generation);
            }
            let successor_pid = successor.pid;
            runtime.block_on(hand_over(
                &mut engine,
                &mut services,
                &reloader,
                grace,
                (&mut signals, successor_pid),
            ))
        }
    };
    ticks.stop();
    drop(postgres);
    readiness.set_draining();
    let open = engine.active_connections();
    crate::sd_notify::stopping(&format!(
        "draining {open} connection(s), at most {} s",
        grace.as_secs()
    ));
    if !upgraded {
        tracing::info!(
            grace_secs = grace.as_secs(),
            open,
            "shutting down: stopped accepting, draining open connections \
             (a second SIGTERM/SIGINT closes them now)"
        );
    } else if open > 0 && !grace.is_zero() {
        // QA: after an upgrade the stop line above, with its "second
        // SIGTERM", came though no signal had been sent.
        tracing::info!(
            grace_secs = grace.as_secs(),
            open,
            "upgrade: connections still open after the hand-over; draining them \
             for what is left of the grace period (a SIGTERM/SIGINT closes them now)"
        );
    }
    // The shards drain on their own threads; this one keeps answering the
    // API, metrics, probes and DNS, and listens for a second stop signal.
    let fast = engine.fast_stop();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let drainer = std::thread::Builder::new()
        .name("drain".into())
        .spawn(move || {
            engine.shutdown(grace);
            let _ = done_tx.send(());
        })
        .context("cannot start the drain thread")?;
    let Signals {
        hup,
        term,
        int,
        usr2,
    } = &mut signals;
    runtime.block_on(crate::drain::serve_until_done(
        done_rx,
        crate::drain::DrainSignals {
            term,
            int,
            hup,
            usr2,
        },
        fast,
        services.api.take(),
    ));
    if drainer.join().is_err() {
        tracing::error!("the drain thread panicked");
    }
    if let Some(m) = mesh {
        // After the drain: connections to backends at other POPs go
        // through the tunnel until then.
        m.stop(Duration::from_secs(5));
    }
    tracing::info!("shutdown complete");
    Ok(())
}

/// What `systemctl status` shows once the proxy is up: the listeners as
/// bound (the real port where 0 was asked for).
fn ready_status(engine: &Engine, not_listening: &[String]) -> String {
    let addrs: Vec<String> = engine
        .listeners()
        .iter()
        .map(|l| format!("{} {}", l.spec.name, l.local_addr))
        .collect();
    let mut status = format!(
        "ready: {} shard(s), listening on {}",
        engine.shard_count(),
        addrs.join(", ")
    );
    if !not_listening.is_empty() {
        status.push_str(&format!(
            "; NOT listening (start failed, retried at the next reload): {}",
            not_listening.join(", ")
        ));
    }
    status
}

/// Every socket the process serves, bound, nothing served yet.
struct Sockets {
    listeners: engine::BoundListeners,
    metrics: Option<std::net::TcpListener>,
    api: Option<crate::api::Bound>,
    dns: Option<crate::internal_dns::Bound>,
    replication: Option<crate::replication::driver::Bound>,
}

/// Binds every socket of `config`: the listeners (for `shards` shards), the
/// metrics listener, the API, the DNS and the replication sockets. The first failure (a port
/// in use, an address not on this host, a privileged port) is the error.
fn bind_all(
    config: &Config,
    specs: &[ListenerSpec],
    shards: usize,
    geo: &Arc<GeoResolver>,
) -> anyhow::Result<Sockets> {
    // Sockets a binary upgrade handed over are adopted, the rest bound.
    let listeners = engine::BoundListeners::from_groups(
        shards,
        crate::upgrade::listener_groups(specs.to_vec(), shards)?,
    );
    let metrics = match config.metrics.enabled {
        true => Some(crate::metrics::bind(config.metrics.listen_addr)?),
        false => None,
    };
    let api = crate::api::bind(&config.api)?;
    let dns = crate::internal_dns::bind(config, Arc::clone(geo))?;
    let replication = crate::replication::driver::bind(config)?;
    Ok(Sockets {
        listeners,
        metrics,
        api,
        dns,
        replication,
    })
}

/// Whether the engine runs a listener named `name` (names are unique in a
/// configuration).
fn running(engine: &Engine, name: &str) -> bool {
    engine.listeners().iter().any(|l| &*l.spec.name == name)
}

/// The listeners `config` asks for that the engine does not run.
fn not_listening<'c>(config: &'c Config, engine: &Engine) -> Vec<&'c config::Listener> {
    config
        .listeners
        .iter()
        .filter(|l| !running(engine, &l.name))
        .collect()
}

/// The addresses the engine's listeners are bound to: a backend there
/// would loop (see `engine::own_listeners`).
fn own_listeners(engine: &Engine) -> OwnListeners {
    OwnListeners::new(engine.listeners().iter().map(|l| l.local_addr))
}

/// (name, app) of each configured listener, for `no_backend_warn`.
fn listener_apps(config: &Config) -> Vec<(String, Option<String>)> {
    config
        .listeners
        .iter()
        .map(|l| (l.name.clone(), l.app.clone()))
        .collect()
}

/// How `check-config` runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct CheckOptions {
    /// Skip binding the sockets (to check a file for a running proxy, which
    /// holds them, before reloading it).
    pub no_bind: bool,
}

/// Loads and validates the configuration as `run` would, without starting
/// anything, and returns the effective configuration. Also binds every
/// socket and lets go (a port in use is an error, like `nginx -t`), checks
/// the routing store's path and reads its table without writing it: each
/// listener that would refuse every connection is a warning, returned as a
/// line of text.
pub fn check(
    config_path: Option<&Path>,
    options: CheckOptions,
) -> anyhow::Result<(Config, Vec<String>)> {
    let config = config::load(config_path, &config::ProcessEnv)?;
    let geo = Arc::new(build_geo(&config)?);
    let mut tls = TlsListeners::default();
    let mut specs = Vec::with_capacity(config.listeners.len());
    for l in &config.listeners {
        specs.push(spec_of(l, &mut tls)?);
    }
    if !options.no_bind {
        // A file for a running proxy finds its ports taken by that proxy:
        // say how to check it anyway.
        let bound = bind_all(&config, &specs, 1, &geo).map_err(|e| {
            anyhow::anyhow!(
                "{e:#} (check-config binds every socket the file configures; \
                 `check-config --no-bind` checks the file without binding)"
            )
        })?;
        drop(bound);
    }
    if config.mesh.enabled {
        crate::mesh::keys::check(&config.mesh.private_key_file)?;
    }
    let mut warnings = tls.take_warnings();
    warnings.extend(crate::check_routing::warnings(
        &config,
        &listener_apps(&config),
    )?);
    Ok((config, warnings))
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
    /// Binary upgrade (nginx's signal for it).
    usr2: Signal,
}

impl Signals {
    /// Must run inside the control runtime's context.
    fn install() -> anyhow::Result<Signals> {
        let signals = Signals {
            hup: signal(SignalKind::hangup()).context("cannot install SIGHUP handler")?,
            term: signal(SignalKind::terminate()).context("cannot install SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("cannot install SIGINT handler")?,
            usr2: signal(SignalKind::user_defined2()).context("cannot install SIGUSR2 handler")?,
        };
        // A binary upgrade's predecessor starts us with SIGHUP and SIGUSR2
        // blocked (`upgrade::successor`), so that one sent meanwhile waits
        // for these handlers instead of killing us: it is delivered now.
        // Threads started before this keep them blocked; the signal goes to
        // this one or to those started after.
        let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: sigemptyset initialises the set before sigaddset and
        // pthread_sigmask read it; this changes only this thread's mask.
        let unblocked = unsafe {
            libc::sigemptyset(set.as_mut_ptr());
            libc::sigaddset(set.as_mut_ptr(), libc::SIGHUP);
            libc::sigaddset(set.as_mut_ptr(), libc::SIGUSR2);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, set.as_ptr(), std::ptr::null_mut())
        };
        if unblocked != 0 {
            anyhow::bail!(
                "cannot unblock SIGHUP and SIGUSR2: {}",
                std::io::Error::from_raw_os_error(unblocked)
            );
        }
        Ok(signals)
    }
}

/// What the control loop serves besides the data plane.
struct Services {
    api: Option<crate::api::Server>,
    upgrades: crate::upgrade::Upgrades,
    metrics: Option<tokio::task::JoinHandle<()>>,
    stop_dns: tokio::sync::watch::Sender<bool>,
    /// `[config_watch]`.
    watch: ConfigWatch,
    /// `[replication]`, when enabled.
    replication: Option<crate::replication::driver::Handle>,
    /// Traffic steering: told when the listeners change.
    steering: crate::steering::Handle,
    /// Told which configured listeners a reload could not start.
    readiness: crate::readiness::Readiness,
}

/// Why the control loop ended; both carry the drain grace period.
enum Exit {
    /// SIGTERM or SIGINT.
    Stop(Duration),
    /// A successor serves on our sockets.
    Upgraded(Duration, crate::upgrade::Successor),
}

/// Runs until a stop signal or a completed binary upgrade.
async fn control_loop(
    signals: &mut Signals,
    config_path: Option<PathBuf>,
    mut config: Config,
    (reloader, ticks): (&SharedReloader, &ReloadThread),
    engine: &mut Engine,
    tls: &mut TlsListeners,
    services: &mut Services,
) -> anyhow::Result<Exit> {
    let Signals {
        hup,
        term,
        int,
        usr2,
    } = signals;
    let mut ticker = tokio::time::interval(config.routing.reload_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let watch = &mut services.watch;
    // A SIGHUP applied here while an upgrade is in flight, to pass on to the
    // successor (which may have read the file before it changed).
    let mut reload_during_upgrade = false;
    loop {
        tokio::select! {
            // Certificate files are polled at the routing reload interval;
            // with no TLS listener there is nothing to wake up for.
            _ = ticker.tick(), if !tls.is_empty() => {
                tls.refresh(false);
            }
            _ = hup.recv() => {
                tracing::info!("SIGHUP: re-reading configuration and routing table");
                reload_config(config_path.as_deref(), &mut config, (&mut ticker, ticks), engine, tls, (reloader, &services.steering, &services.readiness)).await;
                reload_during_upgrade |= services.upgrades.pending();
                watch.seen();
                watch.reconfigure(&config.config_watch);
            }
            // `[config_watch]`: a changed file is applied as SIGHUP is.
            () = watch.changed() => {
                tracing::info!("config file changed: re-reading configuration and routing table");
                reload_config(config_path.as_deref(), &mut config, (&mut ticker, ticks), engine, tls, (reloader, &services.steering, &services.readiness)).await;
                watch.reconfigure(&config.config_watch);
            }
            _ = term.recv() => return Ok(Exit::Stop(config.limits.shutdown_grace)),
            _ = int.recv() => return Ok(Exit::Stop(config.limits.shutdown_grace)),
            // Discovery API calls: store writes and reads, each write
            // published before the caller hears back (calls queued together
            // share one reload).
            cmds = crate::api::next_commands(&mut services.api) => {
                crate::api::execute_all(cmds, &mut *reloader.lock_async().await);
                // A write goes out to the other POPs now, not at the next
                // change-log poll.
                if let Some(r) = &services.replication {
                    r.poke();
                }
            }
            // Binary upgrade: SIGUSR2 or `edgeproxy upgrade`; the attempt
            // runs on its own thread while this loop goes on.
            _ = usr2.recv() => {
                tracing::info!("SIGUSR2: binary upgrade");
                services.upgrades.begin(None, crate::upgrade::listener_entries(engine.listeners()), tls.served_expired());
            }
            event = services.upgrades.next_event() => match event {
                UpgradeEvent::Requested(reply) => services.upgrades.begin(Some(reply), crate::upgrade::listener_entries(engine.listeners()), tls.served_expired()),
                UpgradeEvent::Finished(Ok(successor)) => {
                    // QA: systemd's reload signals $MAINPID, this process
                    // until the successor is ready; the reload was lost.
                    if reload_during_upgrade {
                        successor.pass_on_reload();
                    }
                    return Ok(Exit::Upgraded(config.limits.shutdown_grace, successor));
                }
                // Logged and answered; this process keeps serving.
                UpgradeEvent::Finished(Err(_)) => reload_during_upgrade = false,
            },
        }
    }
}

/// SIGHUP (or a change seen by the config watch): re-reads the config file
/// and applies what can change at run time (an invalid file changes
/// nothing), then re-reads the routing table and certificates.
async fn reload_config(
    config_path: Option<&Path>,
    config: &mut Config,
    (ticker, ticks): (&mut tokio::time::Interval, &ReloadThread),
    engine: &mut Engine,
    tls: &mut TlsListeners,
    (reloader, steering, readiness): (
        &SharedReloader,
        &crate::steering::Handle,
        &crate::readiness::Readiness,
    ),
) {
    crate::sd_notify::reloading();
    match config_path {
        None => tracing::info!("no config file given; only the routing table is re-read"),
        Some(path) => match config::load(Some(path), &config::ProcessEnv) {
            Ok(new) => match apply(config, &new, engine, tls) {
                Ok(next) => {
                    if next.routing.reload_interval != config.routing.reload_interval {
                        ticks.set_interval(next.routing.reload_interval);
                        *ticker = tokio::time::interval(next.routing.reload_interval);
                        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    }
                    if next.listeners != config.listeners {
                        steering.set_listeners(&next);
                    }
                    *config = next;
                }
                Err(e) => tracing::error!(
                    error = format!("{e:#}"),
                    "new configuration rejected; keeping the running one"
                ),
            },
            Err(e) => {
                tracing::error!(error = %e, "new configuration rejected; keeping the running one")
            }
        },
    }
    let missing = not_listening(config, engine);
    let named: Vec<String> = missing
        .iter()
        .map(|l| format!("{} {}", l.name, l.addr))
        .collect();
    if !missing.is_empty() {
        tracing::warn!(listeners = %named.join(", "),
            "configured listeners are not running; the next reload (SIGHUP or config change) tries to start them again");
    }
    readiness.set_not_listening(missing.iter().map(|l| l.name.clone()).collect());
    {
        // The reload warns about listeners (as they now are) with no
        // eligible backend.
        let mut reloader = reloader.lock_async().await;
        reloader.coverage_mut().set_listeners(listener_apps(config));
        reloader.set_own_listeners(own_listeners(engine));
        reloader.reload();
    }
    tls.refresh(true);
    crate::sd_notify::ready(&ready_status(engine, &named));
}

/// After a successor reported ready: stop accepting everywhere (the
/// sockets live on in the successor), then drain for up to `grace` while
/// still answering discovery API requests on connections already open.
/// Returns what is left of the grace period: none after a SIGTERM or
/// SIGINT, which ends the drain as a second one ends a stop's. SIGHUP and
/// SIGUSR2 are for the successor (`successor_pid`), and said to be.
async fn hand_over(
    engine: &mut Engine,
    services: &mut Services,
    reloader: &SharedReloader,
    grace: Duration,
    (signals, successor_pid): (&mut Signals, u32),
) -> Duration {
    let deadline = tokio::time::Instant::now() + grace;
    let swept = engine.stop_accepting(Duration::from_secs(5));
    if let Some(api) = &services.api {
        api.stop_accepting();
    }
    if let Some(metrics) = services.metrics.take() {
        metrics.abort();
    }
    let _ = services.stop_dns.send(true);
    services.upgrades.handed_over();
    tracing::info!(
        open = engine.active_connections(),
        last_accepted = swept,
        grace_secs = grace.as_secs(),
        "upgrade: stopped accepting; draining open connections"
    );
    let mut poll = tokio::time::interval(Duration::from_millis(50));
    // `edgeproxy upgrade` hears the outcome from a task of this runtime.
    while (engine.active_connections() > 0 || services.upgrades.replying())
        && tokio::time::Instant::now() < deadline
    {
        // QA: without these the old process ignored stop signals for the
        // whole grace period.
        let signal = tokio::select! {
            _ = poll.tick() => None,
            _ = signals.term.recv() => Some("SIGTERM"),
            _ = signals.int.recv() => Some("SIGINT"),
            // QA: both went unanswered (`kill -USR2 $(pidof edgeproxy)`
            // reaches this process too while it drains).
            _ = signals.hup.recv() => {
                tracing::info!(successor = successor_pid,
                    "SIGHUP ignored: this process handed over after an upgrade and is draining");
                None
            }
            _ = signals.usr2.recv() => {
                tracing::info!(successor = successor_pid,
                    "SIGUSR2 ignored: this process handed over after an upgrade and is draining");
                None
            }
            cmds = crate::api::next_commands(&mut services.api) => {
                crate::api::execute_all(cmds, &mut *reloader.lock_async().await);
                if let Some(r) = &services.replication {
                    r.poke();
                }
                None
            }
        };
        if let Some(signal) = signal {
            tracing::warn!(
                signal,
                open = engine.active_connections(),
                "stop signal during the upgrade's drain: closing open connections now"
            );
            return Duration::ZERO;
        }
    }
    deadline.saturating_duration_since(tokio::time::Instant::now())
}

/// Applies what can change without a restart, warns about each
/// restart-only key that differs from what runs (old → new), and returns the
/// configuration that runs from now on (see `config_diff::split`).
///
/// Everything the new listeners need (certificates) is built first: if any of
/// it fails, nothing changes and the error is returned.
fn apply(
    old: &Config,
    new: &Config,
    engine: &mut Engine,
    tls: &mut TlsListeners,
) -> anyhow::Result<Config> {
    // New or changed listeners start, and so do those asked for before that
    // are not running: their start at an earlier reload failed (a port in
    // use), and the file still asks for them.
    let mut starting = Vec::new();
    for l in &new.listeners {
        if !old.listeners.contains(l) || !running(engine, &l.name) {
            starting.push(spec_of(l, tls)?);
        }
    }
    let changed: Vec<&config::Listener> = old
        .listeners
        .iter()
        .filter(|l| !new.listeners.contains(l) && running(engine, &l.name))
        .collect();
    let (updates, starting) = in_place(changed, starting);
    if old.pool != new.pool {
        // Split between the shards that run (runtime.shards waits for a
        // restart).
        let pool = crate::fd_limit::pool_policy(new, old.runtime.shards);
        log_pool(&new.pool, pool.as_ref());
        engine.set_pool(pool);
    }
    let (next, restart) = crate::config_diff::split(old, new);
    // From what runs from now on, not from the file: a restart-only key
    // (runtime.shards, [dns]) must not move the derived connection limit
    // before the restart.
    // Named whether or not the engine's knobs moved: some keys the line
    // names are read elsewhere (`limits.shutdown_grace_secs`, at the next
    // stop or upgrade).
    let new_knobs = knobs(&next);
    let changes = knob_changes(old, &next, &engine.knobs(), &new_knobs);
    if *engine.knobs() != new_knobs {
        // Stored first: the line says they are in force.
        engine.set_knobs(new_knobs);
    }
    if !changes.is_empty() {
        tracing::info!(changes = %crate::config_diff::joined(&changes), "limits and timeouts updated");
    }
    // Listeners: those changed on their own address take the new settings
    // on the sockets they have; the other changed and the removed ones
    // stop; added ones (and changed ones on another address) start.
    // Those that stop go first: their names may pass to an updated one.
    for l in &old.listeners {
        let kept = new.listeners.iter().any(|n| n == l);
        let updating = updates.iter().any(|(name, _)| *name == l.name);
        if !kept && !updating && engine.remove_listener(&l.name) {
            tracing::info!(listener = %l.name, addr = %l.addr, "listener stopped");
        }
    }
    let updated: Vec<(String, String, std::net::SocketAddr)> = updates
        .iter()
        .map(|(old, spec)| (old.clone(), spec.name.to_string(), spec.addr))
        .collect();
    match engine.update_listeners(updates) {
        Ok(()) => {
            for (old, name, addr) in updated {
                match old == name {
                    true => tracing::info!(listener = %name, %addr,
                        "listener updated in place (its sockets stay open)"),
                    false => tracing::info!(listener = %name, was = %old, %addr,
                        "listener renamed and updated in place (its sockets stay open)"),
                }
            }
        }
        // Not expected: the pairs were made from what runs. The listeners
        // keep their old settings (`not_listening` names any left out).
        Err(e) => tracing::error!(error = %e, "cannot update listeners in place"),
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
            Err(e) => tracing::error!(listener = %name, error = %e,
                "cannot start listener; the next reload (SIGHUP or config change) tries again"),
        }
    }
    for change in &restart {
        tracing::warn!(key = %change.key, old = %change.old, new = %change.new,
            "changed in the file, but takes effect only after a restart; running with the old value");
    }
    Ok(next)
}

/// What a reload changed among the knobs, key by key, for the `limits and
/// timeouts updated` line: every section [`knobs`] reads, and the connection
/// limit when it is derived (it moves with the listeners and the open-files
/// limit, with no key of its own). `next` is the configuration that runs
/// from now on (restart-only keys as they run).
fn knob_changes(
    old: &Config,
    next: &Config,
    old_knobs: &Knobs,
    new_knobs: &Knobs,
) -> Vec<crate::config_diff::Change> {
    use crate::config_diff::{diff, Change};
    let mut changes = diff("limits", &old.limits, &next.limits);
    changes.extend(diff("affinity", &old.affinity, &next.affinity));
    // `next` keeps the running routing.db_path (restart-only): what differs
    // here is reload_interval_ms, which applies at once.
    changes.extend(diff("routing", &old.routing, &next.routing));
    changes.extend(diff("log.access", &old.log.access, &next.log.access));
    changes.extend(diff(
        "health.rtt_weight",
        &old.health.rtt_weight,
        &next.health.rtt_weight,
    ));
    // `next` keeps the running rate_limit.tracked_clients (restart-only,
    // warned about on its own), so only what applies shows here.
    changes.extend(diff("rate_limit", &old.rate_limit, &next.rate_limit));
    if old_knobs.max_connections != new_knobs.max_connections
        && next.limits.max_connections.is_none()
    {
        changes.push(Change {
            key: "max_connections (derived)".into(),
            old: old_knobs.max_connections.to_string(),
            new: new_knobs.max_connections.to_string(),
        });
    }
    changes
}

fn log_pool(pool: &crate::pool_config::Pool, policy: Option<&engine::pool::Policy>) {
    if pool.enabled {
        tracing::info!(
            warm = ?pool.warm,
            min_rtt_ms = pool.min_rtt_ms,
            apps = ?pool.apps,
            max_per_backend = pool.max_per_backend,
            idle_timeout_secs = pool.idle_timeout.as_secs(),
            max_lifetime_secs = pool.max_lifetime.as_secs(),
            speaks_first = ?pool.speaks_first,
            max_sockets = policy.map(|p| p.max_sockets),
            "pool: warm backend connections on (per shard)"
        );
    } else {
        tracing::info!("pool: warm backend connections off");
    }
}

fn build_geo(config: &Config) -> anyhow::Result<GeoResolver> {
    let db = match &config.geo.db_path {
        // GeoError names the file and its cause already.
        Some(path) => GeoDb::open(path)?,
        None => GeoDb::embedded().context("cannot load the embedded GeoIP database")?,
    };
    let regions = match &config.geo.regions {
        None => RegionMap::builtin(&config.geo.default_region),
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
        max_connections: crate::fd_limit::max_connections_now(config),
        max_connections_per_shard: config.limits.max_connections_per_shard,
        connect_timeout: config.limits.connect_timeout,
        connect_attempts: config.limits.connect_attempts,
        idle_timeout: config.limits.idle_timeout,
        affinity_ttl: config.affinity.ttl,
        affinity_gc_interval: config.affinity.gc_interval,
        affinity_max_clients: config.affinity.max_clients as usize,
        rtt_weight: config.health.rtt_weight,
        client_limits: config.rate_limit.client_limits(),
        access_log: config.log.access,
        ..Knobs::default()
    }
}

/// Pairs each listener to start with a changed running one (`changed`:
/// each runs, on its configured address) on the same fixed address (port 0
/// asks for a new port each time), so that it takes over that listener's
/// sockets instead of closing and binding again. Returns the pairs (the
/// running listener's name, its new settings) and the listeners left to
/// start.
fn in_place(
    mut free: Vec<&config::Listener>,
    starting: Vec<ListenerSpec>,
) -> (Vec<(String, ListenerSpec)>, Vec<ListenerSpec>) {
    let mut updates = Vec::new();
    let mut rest = Vec::new();
    for spec in starting {
        let same_socket = free
            .iter()
            .position(|old| spec.addr.port() != 0 && old.addr == spec.addr);
        match same_socket {
            Some(i) => updates.push((free.swap_remove(i).name.clone(), spec)),
            None => rest.push(spec),
        }
    }
    (updates, rest)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::from_raw(toml::from_str(text).unwrap(), &[("X", "")]).unwrap()
    }

    fn named(old: &str, new: &str, max: (u32, u32)) -> String {
        let (old, new) = (config(old), config(new));
        let (next, _) = crate::config_diff::split(&old, &new);
        let old_knobs = Knobs {
            max_connections: max.0,
            ..knobs(&old)
        };
        let new_knobs = Knobs {
            max_connections: max.1,
            ..knobs(&next)
        };
        crate::config_diff::joined(&knob_changes(&old, &next, &old_knobs, &new_knobs))
    }

    #[test]
    fn every_knob_that_changed_is_named() {
        assert_eq!(
            named("", "[health]\nrtt_weight = 0.5\n", (10, 10)),
            "health.rtt_weight: 0.0 → 0.5"
        );
        assert_eq!(
            named("", "[rate_limit]\nburst = 7\n", (10, 10)),
            "rate_limit.burst: 10 → 7"
        );
        // The restart-only key of the section is not named here.
        assert_eq!(
            named("", "[rate_limit]\ntracked_clients = 7\n", (10, 10)),
            ""
        );
        // A derived limit that moved (a listener added) is named...
        assert_eq!(
            named("", "", (9963, 9961)),
            "max_connections (derived): 9963 → 9961"
        );
        // ...a configured one by its key only.
        assert_eq!(
            named("", "[limits]\nmax_connections = 4\n", (9963, 4)),
            "limits.max_connections: (unset) → 4"
        );
        // A key the engine does not hold (read at the next stop) too.
        assert_eq!(
            named("", "[limits]\nshutdown_grace_secs = 5\n", (10, 10)),
            "limits.shutdown_grace_secs: 30 → 5"
        );
        // The routing table's check interval applies at once, and is said
        // to (it applied in silence: neither this line nor a WARN).
        assert_eq!(
            named("", "[routing]\nreload_interval_ms = 500\n", (10, 10)),
            "routing.reload_interval_ms: 1000 → 500"
        );
        // Its restart-only neighbour is not named here.
        assert_eq!(
            named("", "[routing]\ndb_path = \"/tmp/other.db\"\n", (10, 10)),
            ""
        );
    }
}
