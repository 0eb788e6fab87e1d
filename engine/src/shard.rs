//! A shard: one thread, one compio runtime, pinned to one core.
//!
//! The shard owns its accept loops, its connections and its affinity table.
//! The control side talks to it only through [`Command`]s; the shard reads the
//! routing snapshot and the knobs lock-free.

use std::collections::HashMap;
use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::affinity::AffinityTable;
use crate::conn;
use crate::ctx::{ConnSlot, ListenerCtx, ShardCtx, Shared};
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
    /// Stop accepting, wait up to `grace` for open connections, then exit.
    Shutdown {
        grace: Duration,
    },
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
    let ttl = shared.knobs.load().affinity_ttl;
    let ctx = Rc::new(ShardCtx::new(
        id,
        shared,
        stats,
        AffinityTable::new(ttl),
        pool_stats,
    ));
    let _ = ready.send(Ok(()));
    runtime.block_on(shard_main(ctx, commands));
}

async fn shard_main(ctx: Rc<ShardCtx>, commands: async_channel::Receiver<Command>) {
    let mut accept_loops: HashMap<Arc<str>, rt::JoinHandle<()>> = HashMap::new();
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
                    let lctx = Rc::new(ListenerCtx {
                        local_affinity: steered && !spec.accept_proxy_protocol,
                        spec: Arc::clone(&spec),
                        stats,
                    });
                    let task = rt::spawn(accept_loop(Rc::clone(&ctx), lctx, listener));
                    // Replacing a handle drops (cancels) the old accept loop.
                    accept_loops.insert(Arc::clone(&spec.name), task);
                }
                Err(e) => tracing::error!(shard = ctx.id, listener = %spec.name, error = %e,
                    "cannot register listener with the runtime"),
            },
            Command::RemoveListener(name) => {
                // Dropping the handle cancels the accept loop and closes this
                // shard's socket; open connections are separate tasks and go on.
                accept_loops.remove(&name);
            }
            Command::Shutdown { grace } => {
                accept_loops.clear();
                // Warm sockets serve new clients only: none are coming.
                drop(pool_task.take());
                ctx.pool.close_all();
                drain(&ctx, grace).await;
                break;
            }
        }
    }
}

/// Waits for this shard's connections to finish, at most `grace`.
async fn drain(ctx: &ShardCtx, grace: Duration) {
    let deadline = Instant::now() + grace;
    // Connections end on their own schedule; a short poll costs nothing next
    // to a drain that lasts seconds, and needs no wake-up plumbing in every
    // connection.
    while ctx.stats.active() > 0 && Instant::now() < deadline {
        rt::sleep(Duration::from_millis(20).min(grace)).await;
    }
    let left = ctx.stats.active();
    if left > 0 {
        tracing::warn!(
            shard = ctx.id,
            connections = left,
            "grace period over: closing connections still open"
        );
    }
}

async fn accept_loop(ctx: Rc<ShardCtx>, lctx: Rc<ListenerCtx>, listener: rt::TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                ShardStats::bump(&ctx.stats.accepted);
                ShardStats::bump(&lctx.stats.accepted);
                let Some(slot) = ConnSlot::take(&ctx, &lctx) else {
                    ShardStats::bump(&ctx.stats.rejected_limit);
                    ShardStats::bump(&lctx.stats.rejected_limit);
                    tracing::debug!(shard = ctx.id, %peer, "connection limit reached; closing");
                    continue;
                };
                rt::spawn(conn::serve(
                    Rc::clone(&ctx),
                    Rc::clone(&lctx),
                    stream,
                    peer,
                    slot,
                ))
                .detach();
            }
            Err(e) => {
                // Out of descriptors or memory: back off instead of spinning.
                let starved = matches!(
                    e.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                );
                if starved {
                    tracing::warn!(shard = ctx.id, listener = %lctx.spec.name, error = %e,
                        "accept failed; backing off 100 ms");
                    rt::sleep(Duration::from_millis(100)).await;
                } else {
                    tracing::debug!(shard = ctx.id, listener = %lctx.spec.name, error = %e, "accept failed");
                }
            }
        }
    }
}

/// Sweeps expired affinity bindings; shard 0 also sweeps the shared table.
async fn affinity_gc(ctx: Rc<ShardCtx>) {
    loop {
        let (interval, ttl) = {
            let k = ctx.shared.knobs.load();
            (
                k.affinity_gc_interval.max(Duration::from_secs(1)),
                k.affinity_ttl,
            )
        };
        rt::sleep(interval).await;
        let now = Instant::now();
        let removed = {
            let mut table = ctx.affinity.borrow_mut();
            table.set_ttl(ttl);
            table.gc(now)
        };
        if ctx.id == 0 {
            if let Ok(mut shared) = ctx.shared.shared_affinity.lock() {
                shared.set_ttl(ttl);
                shared.gc(now);
            }
        }
        if removed > 0 {
            tracing::debug!(shard = ctx.id, removed, "expired affinity bindings swept");
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
