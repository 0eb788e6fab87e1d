//! A shard: one thread, one compio runtime, pinned to one core.
//!
//! The shard owns its accept loops, its connections and its affinity table.
//! The control side talks to it only through [`Command`]s; the shard reads the
//! routing snapshot and the knobs lock-free.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::affinity::AffinityTable;
use crate::conn;
use crate::ctx::{ConnSlot, ListenerCtx, ShardCtx, Shared};
use crate::log_limit::LogLimit;
use crate::rt;
use crate::settings::ListenerSpec;
use crate::stats::{ListenerStats, ShardStats};

pub(crate) enum Command {
    AddListener {
        spec: Arc<ListenerSpec>,
        socket: std::net::TcpListener,
        steered: bool,
        stats: Arc<ListenerStats>,
    },
    RemoveListener(Arc<str>),
    /// Running listeners (by their current name) take new settings on the
    /// sockets they have (see `Engine::update_listeners`). One command for
    /// the whole reload: two listeners may swap names.
    UpdateListeners(Arc<[(Arc<str>, Arc<ListenerSpec>)]>),
    /// Stop accepting on every listener without losing a connection the
    /// kernel already queued or handed over (see `rt::AcceptGate`), close
    /// this shard's listening sockets, and report on `done` how many
    /// connections the last sweep took. Open connections go on.
    StopAccepting {
        done: std::sync::mpsc::Sender<usize>,
    },
    /// Stop accepting, wait up to `grace` for open connections, then exit.
    Shutdown {
        grace: Duration,
    },
}

/// The settings an accept loop gives the connections it accepts; a reload
/// that changes a listener but not its address replaces them in place.
type CurrentListener = Rc<RefCell<Rc<ListenerCtx>>>;

/// One running accept loop and the gate that stops it.
struct AcceptLoop {
    gate: Rc<rt::AcceptGate>,
    task: rt::JoinHandle<usize>,
    current: CurrentListener,
    /// The kernel steers each client to this loop's socket by its address.
    steered: bool,
}

/// What a listener's connections on this shard know of it.
fn listener_ctx(spec: &Arc<ListenerSpec>, steered: bool, stats: Arc<ListenerStats>) -> ListenerCtx {
    ListenerCtx {
        local_affinity: steered && !spec.accept_proxy_protocol,
        spec: Arc::clone(spec),
        stats,
    }
}

/// Stops every loop in `loops` and waits for each to hand over its last
/// connections; returns how many the final sweeps took.
async fn stop_all(loops: &mut HashMap<Arc<str>, Vec<AcceptLoop>>) -> usize {
    let running: Vec<AcceptLoop> = loops.drain().flat_map(|(_, l)| l).collect();
    for l in &running {
        l.gate.stop();
    }
    let mut swept = 0;
    for l in running {
        swept += l.task.await.unwrap_or(0);
    }
    swept
}

/// Thread body of shard `id`. Reports on `ready` whether its runtime started.
pub(crate) fn run(
    id: usize,
    shared: Arc<Shared>,
    stats: Arc<ShardStats>,
    pool_stats: Arc<crate::pool::stats::PoolStats>,
    commands: async_channel::Receiver<Command>,
    ready: std::sync::mpsc::Sender<io::Result<()>>,
) {
    if shared.settings.pin_cores {
        if let Some(cores) = core_affinity::get_core_ids().filter(|c| !c.is_empty()) {
            let core = cores[id % cores.len()];
            if !core_affinity::set_for_current(core) {
                tracing::warn!(shard = id, core = core.id, "could not pin shard to core");
            }
        }
    }
    let runtime = match rt::build_runtime(shared.settings.buffer_count, shared.settings.buffer_size)
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let (ttl, max_clients) = {
        let k = shared.knobs.load();
        (k.affinity_ttl, k.affinity_max_clients)
    };
    let mut affinity = AffinityTable::new(ttl);
    affinity.set_max_clients(max_clients);
    let ctx = Rc::new(ShardCtx::new(id, shared, stats, affinity, pool_stats));
    let _ = ready.send(Ok(()));
    rt::block_on_task(&runtime, shard_main(ctx, commands));
}

async fn shard_main(ctx: Rc<ShardCtx>, commands: async_channel::Receiver<Command>) {
    let mut accept_loops: HashMap<Arc<str>, Vec<AcceptLoop>> = HashMap::new();
    let _gc = rt::spawn(affinity_gc(Rc::clone(&ctx)));
    let mut pool_task = Some(rt::spawn(crate::pool::driver::maintain(
        Rc::clone(&ctx.pool),
        Arc::clone(&ctx.shared.pool_policy),
        ctx.shared.snapshot.clone(),
        Arc::clone(&ctx.shared.settings.local_region),
    )));
    while let Ok(command) = commands.recv().await {
        match command {
            Command::AddListener {
                spec,
                socket,
                steered,
                stats,
            } => match rt::listener_from_std(socket) {
                Ok(listener) => {
                    let current =
                        Rc::new(RefCell::new(Rc::new(listener_ctx(&spec, steered, stats))));
                    let gate = Rc::new(rt::AcceptGate::new());
                    let task = rt::spawn(accept_loop(
                        Rc::clone(&ctx),
                        Rc::clone(&current),
                        listener,
                        Rc::clone(&gate),
                    ));
                    // A shard may serve several sockets of one listener
                    // (after an upgrade to fewer shards than sockets).
                    accept_loops
                        .entry(Arc::clone(&spec.name))
                        .or_default()
                        .push(AcceptLoop {
                            gate,
                            task,
                            current,
                            steered,
                        });
                }
                Err(e) => tracing::error!(shard = ctx.id, listener = %spec.name, error = %e,
                    "cannot register listener with the runtime"),
            },
            Command::RemoveListener(name) => {
                // Dropping the handles cancels the accept loops and closes
                // this shard's sockets (so their queues go with them: a
                // gentle stop would save nothing); open connections are
                // separate tasks and go on.
                accept_loops.remove(&name);
            }
            Command::UpdateListeners(updates) => {
                // Every old name out first, then every new one in: a name
                // may pass from one listener to another.
                let taken: Vec<_> = updates
                    .iter()
                    .map(|(old, spec)| (accept_loops.remove(old).unwrap_or_default(), spec))
                    .collect();
                for (loops, spec) in taken {
                    for l in &loops {
                        let stats = Arc::clone(&l.current.borrow().stats);
                        *l.current.borrow_mut() = Rc::new(listener_ctx(spec, l.steered, stats));
                    }
                    accept_loops.insert(Arc::clone(&spec.name), loops);
                }
            }
            Command::StopAccepting { done } => {
                let swept = stop_all(&mut accept_loops).await;
                let _ = done.send(swept);
            }
            Command::Shutdown { grace } => {
                stop_all(&mut accept_loops).await;
                // Warm sockets serve new clients only: none are coming.
                drop(pool_task.take());
                ctx.pool.close_all();
                drain(&ctx, grace).await;
                break;
            }
        }
    }
}

/// Waits for this shard's connections to finish, at most `grace`, or until
/// a fast stop is asked for.
async fn drain(ctx: &ShardCtx, grace: Duration) {
    // A grace beyond what an `Instant` can hold (the configuration bounds
    // it, an embedder may not) means no deadline: wait for the connections
    // or a fast stop, rather than panic and cut every connection at once.
    let deadline = Instant::now().checked_add(grace);
    let stop_now = || {
        ctx.shared
            .stop_now
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    // Connections end on their own schedule; a short poll costs nothing next
    // to a drain that lasts seconds, and needs no wake-up plumbing in every
    // connection.
    while ctx.stats.active() > 0 && deadline.is_none_or(|d| Instant::now() < d) && !stop_now() {
        rt::sleep(Duration::from_millis(20).min(grace)).await;
    }
    let left = ctx.stats.active();
    if left > 0 {
        let why = match stop_now() {
            true => "fast stop: closing connections still open",
            false => "grace period over: closing connections still open",
        };
        tracing::warn!(shard = ctx.id, connections = left, "{why}");
    }
}

/// How often a shard's accept loop logs that accepting fails for want of
/// descriptors or memory (it backs off 100 ms each time: otherwise 10 lines a
/// second per shard and listener).
const ACCEPT_FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// How often a paused accept loop looks again for a free connection slot
/// (slots free on any shard; a poll needs no wake-up plumbing between
/// shards, and runs only while a limit is reached).
const LIMIT_POLL: Duration = Duration::from_millis(5);

/// Waits until this shard may accept another connection (see
/// [`ConnSlot`]): meanwhile clients wait in the kernel's accept queue. Gives
/// up when `gate` stops: a stopping loop hands over what it holds.
async fn wait_for_room(ctx: &ShardCtx, current: &CurrentListener, gate: &rt::AcceptGate) {
    if ConnSlot::room(ctx) {
        return;
    }
    let lctx = Rc::clone(&current.borrow());
    ShardStats::bump(&ctx.stats.limit_waits);
    ShardStats::bump(&lctx.stats.limit_waits);
    tracing::debug!(shard = ctx.id, listener = %lctx.spec.name,
        "connection limit reached; accepting paused");
    while !ConnSlot::room(ctx) && !gate.is_stopped() {
        rt::sleep(LIMIT_POLL).await;
    }
}

/// Accepts until `gate` stops; then takes what is already queued and
/// returns how many connections that final sweep took.
async fn accept_loop(
    ctx: Rc<ShardCtx>,
    current: CurrentListener,
    listener: rt::TcpListener,
    gate: Rc<rt::AcceptGate>,
) -> usize {
    let mut starved_log = LogLimit::new(ACCEPT_FAILURE_LOG_INTERVAL);
    // Read after every wait: a reload may have replaced it meanwhile.
    let now = || Rc::clone(&current.borrow());
    loop {
        wait_for_room(&ctx, &current, &gate).await;
        let Some(accepted) = gate.accept(&listener).await else {
            break;
        };
        match accepted {
            Ok((stream, peer)) => {
                // The accept was pending while other shards (or a SIGHUP
                // lowering the limit) may have reached it: then this client
                // waits here, held but not served, like the ones queued in
                // the kernel.
                wait_for_room(&ctx, &current, &gate).await;
                let lctx = now();
                admit(&ctx, &lctx, stream, peer);
                if gate.more_queued() {
                    take_queued(&ctx, &lctx, &listener, &gate);
                }
            }
            Err(e) => {
                let lctx = now();
                // Out of descriptors or memory: back off instead of spinning.
                let starved = matches!(
                    e.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                );
                if starved {
                    if let Some(left_out) = starved_log.hit(Instant::now()) {
                        tracing::warn!(shard = ctx.id, listener = %lctx.spec.name, error = %e,
                            same_errors_not_logged = left_out,
                            "accept failed; backing off 100 ms (logged at most every 10 s)");
                    }
                    rt::sleep(Duration::from_millis(100)).await;
                } else {
                    tracing::debug!(shard = ctx.id, listener = %lctx.spec.name, error = %e, "accept failed");
                }
            }
        }
    }
    // Stopped. Whatever is queued now was meant for this socket while this
    // loop still waited on it: serve it here rather than leave it for a
    // waiter that may not be woken (see `rt::AcceptGate`).
    let lctx = now();
    let mut swept = 0;
    loop {
        match rt::accept_now(&listener) {
            Ok(Some((stream, peer))) => {
                swept += 1;
                admit(&ctx, &lctx, stream, peer);
            }
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(shard = ctx.id, listener = %lctx.spec.name, error = %e,
                    "accept failed while stopping");
                break;
            }
        }
    }
    swept
}

/// Connections [`take_queued`] takes at most after one io_uring accept.
/// Measured (README, "New connections: taking what is queued"): 16 made
/// a flood of 512 clients at once cost more per connection and lowered the
/// capped maximum by 11–24 %, as multishot accept did; 4 kept the flood
/// where one accept per turn had it.
const TAKE_QUEUED_AT_MOST: usize = 4;

/// Takes connections already queued behind the one just accepted with plain
/// `accept(2)` calls, as many as there is room for, up to
/// [`TAKE_QUEUED_AT_MOST`], instead of one per turn of the ring: a client
/// that arrived with others no longer waits for every connection task to
/// run once per client queued before it. Only called when the kernel said
/// more were queued, so a light load pays no failing call.
fn take_queued(
    ctx: &Rc<ShardCtx>,
    lctx: &Rc<ListenerCtx>,
    listener: &rt::TcpListener,
    gate: &rt::AcceptGate,
) {
    let mut empty = false;
    for _ in 0..TAKE_QUEUED_AT_MOST {
        if !ConnSlot::room(ctx) {
            break;
        }
        match rt::accept_now(listener) {
            Ok(Some((stream, peer))) => admit(ctx, lctx, stream, peer),
            Ok(None) => {
                empty = true;
                break;
            }
            // The ring's next accept meets the same error and deals with
            // it (backs off when out of descriptors).
            Err(e) => {
                tracing::debug!(shard = ctx.id, listener = %lctx.spec.name, error = %e,
                    "accept of a queued connection failed");
                break;
            }
        }
    }
    gate.drained(empty);
}

/// Counts a new connection and spawns its task. Callers wait for room
/// first; a stopping loop (its last sweep) may go over the limit by what
/// the kernel had queued, rather than reset those clients.
fn admit(
    ctx: &Rc<ShardCtx>,
    lctx: &Rc<ListenerCtx>,
    stream: rt::TcpStream,
    peer: std::net::SocketAddr,
) {
    ShardStats::bump(&ctx.stats.accepted);
    ShardStats::bump(&lctx.stats.accepted);
    let slot = ConnSlot::take(ctx, lctx);
    rt::spawn(conn::serve(
        Rc::clone(ctx),
        Rc::clone(lctx),
        stream,
        peer,
        slot,
    ))
    .detach();
}

/// Sweeps expired affinity bindings; shard 0 also sweeps the shared table.
async fn affinity_gc(ctx: Rc<ShardCtx>) {
    loop {
        let interval = ctx
            .shared
            .knobs
            .load()
            .affinity_gc_interval
            .max(Duration::from_secs(1));
        rt::sleep(interval).await;
        // The knobs as they are after the sleep, not before it: a change
        // made meanwhile is in force for this sweep (routing puts it in
        // force at once anyway, see `ShardCtx::sync_affinity`).
        let max = ctx.knobs().affinity_max_clients;
        let now = Instant::now();
        let (removed, unbound) = {
            let mut table = ctx.affinity.borrow_mut();
            ctx.sync_affinity(&mut table);
            (table.gc(now), table.take_unbound())
        };
        let mut shared_unbound = 0;
        if ctx.id == 0 {
            if let Ok(mut shared) = ctx.shared.shared_affinity.lock() {
                ctx.sync_affinity(&mut shared);
                shared.gc(now);
                shared_unbound = shared.take_unbound();
            }
        }
        if removed > 0 {
            tracing::debug!(shard = ctx.id, removed, "expired affinity bindings swept");
        }
        if unbound + shared_unbound > 0 {
            tracing::warn!(
                shard = ctx.id,
                clients = unbound + shared_unbound,
                max_clients = max,
                "affinity table full: new clients were served without a binding"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    /// An idle proxied connection costs little more than its task, whose size
    /// is the size of `conn::serve`'s future: keep it small (TLS state and
    /// rare paths are boxed for that reason).
    #[test]
    fn connection_task_stays_small() {
        fn output_size<A, B, C, D, E, R>(_: fn(A, B, C, D, E) -> R) -> usize {
            std::mem::size_of::<R>()
        }
        let serve: fn(_, _, _, _, _) -> _ = crate::conn::serve;
        let size = output_size(serve);
        assert!(size <= 2560, "conn::serve's future is {size} bytes");
    }
}
