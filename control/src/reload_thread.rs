//! The routing reloader's periodic tick, on its own low-priority thread.
//!
//! Each reload interval the reloader asks SQLite whether `routing.db` changed
//! and, when it did, reads every row, builds a snapshot and swaps it in: a few
//! hundred microseconds of CPU per change. Run on the control thread, that CPU
//! came out of a shard's core at the shard's own priority: in the perf suite's
//! hot-reload scenario (a change every 100 ms) the shard then waited for its
//! core about 0.5 ms per reload, and its p99 rose with it. A reload is not
//! latency-critical, so the tick runs here under `SCHED_IDLE`: a shard that
//! wakes on its core preempts it at once. At nice 19 (before 2026-12-04) the
//! shard's weight was about 70 times the reload's, but a woken shard still
//! waited for the reload's running slice to end, and in the hot-reload
//! scenario its p99 stayed ~40 % above steady (README, "Reloads under
//! SCHED_IDLE"). On a core its shards keep fully busy a reload then gets
//! very little of it (a weight of 3 against a shard's 1,024), so routing
//! changes take effect later there instead of every connection paying for
//! them; the thread is not pinned, so a core with idle time runs it.
//!
//! The control thread keeps the same reloader (behind a mutex) for what must
//! happen before it answers: discovery API writes are published before the
//! caller hears back, and SIGHUP re-reads the table. While a tick holds the
//! lock such a caller waits for it, and a tick under `SCHED_IDLE` on cores
//! the shards keep busy can hold it for seconds (QA: 9–12 s for a table of
//! 3,000 backends on a saturated core). The control thread runs the
//! replication, BGP, health and API tasks on one Tokio runtime, so it must
//! never block on that lock: what only needs a reload soon asks for one
//! ([`SharedReloader::reload_soon`]: done by the tick thread, woken for it,
//! and asked for many times before it runs, done once), what can do without
//! the lock skips its
//! turn ([`SharedReloader::try_lock`]), and what must wait waits as a task
//! ([`SharedReloader::lock_async`]), leaving the runtime to the others.
//! Before 2026-12-06 it blocked the runtime: a POP whose cores were busy
//! stopped answering its peers' probes and was declared down. And until
//! 2026-12-06 `reload_soon` with the lock free reloaded on the caller's
//! thread, at normal priority: replication asks for one per batch of rows
//! it applies, so a burst of registrations elsewhere rebuilt the whole
//! table up to 200 times a second on the control runtime.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{RecvTimeoutError, Sender};

use crate::reload_guard::{Guard, Turns, STARVED_AFTER};
use crate::routing::RoutingReloader;

/// The nice value of the reload thread: the lowest priority a thread can give
/// itself without privileges (and cannot raise again without them).
pub const RELOAD_NICE: i32 = 19;

/// A [`RoutingReloader`] shared by the reload thread and the control thread.
#[derive(Clone)]
pub struct SharedReloader(Arc<Shared>);

struct Shared {
    reloader: Mutex<RoutingReloader>,
    /// A reload was asked for ([`SharedReloader::reload_soon`]): the tick
    /// thread does it.
    reload_due: AtomicBool,
    /// Wakes the tick thread for it, while one runs.
    wake: Mutex<Option<Sender<Message>>>,
}

/// How long [`SharedReloader::lock_async`] lets the runtime run between two
/// tries of a taken lock.
const LOCK_RETRY: Duration = Duration::from_millis(2);

impl SharedReloader {
    pub fn new(reloader: RoutingReloader) -> Self {
        SharedReloader(Arc::new(Shared {
            reloader: Mutex::new(reloader),
            reload_due: AtomicBool::new(false),
            wake: Mutex::new(None),
        }))
    }

    /// The reloader, waiting for a tick in progress: for the start and for
    /// threads of their own, never on the control runtime once the tick
    /// thread runs (see the module documentation). A tick that panicked
    /// leaves the reloader as it was before that tick's publish, which is
    /// still a consistent state, so a poisoned lock is used as is.
    pub fn lock(&self) -> MutexGuard<'_, RoutingReloader> {
        self.0
            .reloader
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The reloader if nobody holds it now.
    pub fn try_lock(&self) -> Option<MutexGuard<'_, RoutingReloader>> {
        match self.0.reloader.try_lock() {
            Ok(guard) => Some(guard),
            Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// The reloader, waited for as a task: the runtime runs its other tasks
    /// meanwhile (a plain [`lock`](Self::lock) would stop them all for as
    /// long as a starved tick holds it).
    pub async fn lock_async(&self) -> MutexGuard<'_, RoutingReloader> {
        loop {
            if let Some(guard) = self.try_lock() {
                return guard;
            }
            tokio::time::sleep(LOCK_RETRY).await;
        }
    }

    /// Has the tick thread reload as soon as it can (after a tick in
    /// progress, which may have read the table before what this reload is
    /// for); requests made before it gets to them make one reload. Without
    /// a tick thread (during start), reloads now if the lock is free. Never
    /// waits.
    pub fn reload_soon(&self) {
        self.0.reload_due.store(true, Ordering::Release);
        let wake = self
            .0
            .wake
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        if wake.is_some_and(|wake| wake.send(Message::Wake).is_ok()) {
            return;
        }
        // No tick thread: done here if the lock is free; a holder that lets
        // go after this look leaves the flag to the thread's first tick.
        if let Some(mut reloader) = self.try_lock() {
            if self.0.reload_due.swap(false, Ordering::AcqRel) {
                reloader.reload();
            }
        }
    }

    /// One turn of the tick thread: a tick, and the reload asked for, if
    /// any.
    fn tick(&self) {
        let mut reloader = self.lock();
        reloader.tick();
        if self.0.reload_due.swap(false, Ordering::AcqRel) {
            reloader.reload();
        }
    }

    /// The reload asked for, if it is still due (the tick thread, woken).
    fn reload_if_due(&self) {
        if !self.0.reload_due.load(Ordering::Acquire) {
            return;
        }
        let mut reloader = self.lock();
        if self.0.reload_due.swap(false, Ordering::AcqRel) {
            reloader.reload();
        }
    }

    fn set_wake(&self, wake: Option<Sender<Message>>) {
        *self
            .0
            .wake
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = wake;
    }
}

enum Message {
    Interval(Duration),
    /// [`SharedReloader::reload_soon`].
    Wake,
    Stop,
}

/// The running tick thread. Stops (and is joined) on [`ReloadThread::stop`]
/// or when dropped.
pub struct ReloadThread {
    tx: Sender<Message>,
    join: Option<JoinHandle<()>>,
    /// Raises the thread while a turn is starved (see [`crate::reload_guard`]).
    _guard: Guard,
    /// To stop waking this thread once it stops.
    reloader: SharedReloader,
}

impl ReloadThread {
    /// Starts ticking `reloader` every `interval`.
    pub fn start(reloader: SharedReloader, interval: Duration) -> std::io::Result<Self> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let woken = reloader.clone();
        let turns = Turns::new();
        let watched = turns.clone();
        let join = std::thread::Builder::new()
            .name("routing-reload".into())
            .spawn(move || {
                watched.register_current_thread();
                lower_priority();
                let mut interval = interval;
                // A deadline, not a timeout per receive: wake-ups coming
                // faster than the interval must not put the tick off.
                let mut next_tick = Instant::now() + interval;
                loop {
                    watched.due_at(next_tick, STARVED_AFTER);
                    let message = rx.recv_deadline(next_tick);
                    let _turn = TurnEnd(&watched);
                    match message {
                        Err(RecvTimeoutError::Timeout) => {
                            next_tick = Instant::now() + interval;
                            // A bug in one tick must not end reloading for
                            // the life of the process without a word.
                            let tick = std::panic::AssertUnwindSafe(|| reloader.tick());
                            if std::panic::catch_unwind(tick).is_err() {
                                tracing::error!(
                                    "routing reload panicked; retrying at the next tick"
                                );
                            }
                        }
                        Ok(Message::Wake) => {
                            let reload = std::panic::AssertUnwindSafe(|| reloader.reload_if_due());
                            if std::panic::catch_unwind(reload).is_err() {
                                tracing::error!(
                                    "routing reload panicked; retrying at the next tick"
                                );
                            }
                        }
                        Ok(Message::Interval(new)) => {
                            interval = new;
                            next_tick = Instant::now() + interval;
                        }
                        Ok(Message::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
            })?;
        let guard = Guard::start(turns, STARVED_AFTER)?;
        woken.set_wake(Some(tx.clone()));
        Ok(ReloadThread {
            tx,
            join: Some(join),
            _guard: guard,
            reloader: woken,
        })
    }

    /// Ticks every `interval` from now on (SIGHUP with a new
    /// `reload_interval_ms`).
    pub fn set_interval(&self, interval: Duration) {
        let _ = self.tx.send(Message::Interval(interval));
    }

    /// Stops ticking and waits for a tick in progress to finish.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.reloader.set_wake(None);
        let _ = self.tx.send(Message::Stop);
        if let Some(join) = self.join.take() {
            let _ = join.join();
        }
    }
}

impl Drop for ReloadThread {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Marks the end of a turn when dropped (a panic in it included): the
/// thread goes back under `SCHED_IDLE` if the guard raised it meanwhile.
struct TurnEnd<'a>(&'a Turns);

impl Drop for TurnEnd<'_> {
    fn drop(&mut self) {
        if self.0.turn_done() {
            lower_priority();
        }
    }
}

/// Sets the calling thread's nice value to [`RELOAD_NICE`], then its policy
/// to `SCHED_IDLE` (on Linux both `setpriority(PRIO_PROCESS, tid)` and
/// `sched_setscheduler(0, …)` apply to the one thread). An unprivileged
/// thread may do both; failure only costs the shards a little latency, so
/// it is logged and ignored (nice 19 stays if only `SCHED_IDLE` is refused).
fn lower_priority() {
    // SAFETY: plain syscalls on the calling thread's own id.
    let rc = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, RELOAD_NICE)
    };
    if rc != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(),
            "cannot lower the routing reload thread's priority; reloads compete with the shards");
    }
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param for the call; 0 is this thread.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(),
            "cannot run the routing reload thread under SCHED_IDLE; it stays at nice 19");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RoutingStore;

    /// The nice value of thread `tid` of this process, from `/proc`.
    fn thread_nice(tid: i32) -> Option<i32> {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
        // Field 19 (1-based) is the nice value; the fields after the `)`
        // that closes the command name start at field 3.
        let after = &stat[stat.rfind(')')? + 1..];
        after.split_whitespace().nth(16)?.parse().ok()
    }

    #[test]
    fn the_thread_ticks_at_idle_priority_and_stops_on_request() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.db");
        let store = RoutingStore::open(&path).unwrap();
        let reloader = SharedReloader::new(RoutingReloader::start_with_ttl(store, None).unwrap());
        let handle = reloader.lock().handle().clone();
        let v0 = handle.load().version;
        let thread = ReloadThread::start(reloader.clone(), Duration::from_millis(5)).unwrap();

        // A change made by another connection is published by the thread's
        // tick, with no help from this one.
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute(
            "INSERT INTO backends (id, app, region, wg_ip, port, healthy, weight, soft_limit, hard_limit)
             VALUES ('a', 'web', 'sa', '10.0.0.1', 80, 1, 1, 100, 150)",
            [],
        )
        .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while handle.load().version == v0 {
            assert!(std::time::Instant::now() < deadline, "no reload published");
            std::thread::yield_now();
        }
        assert_eq!(handle.load().backends.len(), 1);

        // It runs at nice 19, under SCHED_IDLE.
        let tid = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .find(|t| {
                std::fs::read_to_string(t.path().join("comm"))
                    .is_ok_and(|c| c.trim() == "routing-reload")
            })
            .map(|t| t.file_name().to_string_lossy().parse::<i32>().unwrap())
            .expect("routing-reload thread");
        assert_eq!(thread_nice(tid), Some(RELOAD_NICE));
        // SAFETY: a plain query of one of this process's threads.
        assert_eq!(unsafe { libc::sched_getscheduler(tid) }, libc::SCHED_IDLE);

        // Stopped, it publishes nothing more.
        thread.stop();
        let v1 = handle.load().version;
        conn.execute("UPDATE backends SET port = 81", []).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(handle.load().version, v1);
        // The control thread's own reload still works.
        reloader.lock().tick();
        assert!(handle.load().version > v1);
    }

    fn shared_reloader(dir: &tempfile::TempDir) -> SharedReloader {
        let store = RoutingStore::open(&dir.path().join("routing.db")).unwrap();
        SharedReloader::new(RoutingReloader::start_with_ttl(store, None).unwrap())
    }

    /// QA: a tick starved under `SCHED_IDLE` held the lock for seconds, and
    /// the control runtime's reloads (replication, steering) waited for it,
    /// every other task with them. Asked for while the lock is taken, a
    /// reload returns at once and the tick thread does it when it lets go.
    #[test]
    fn a_reload_asked_for_while_the_lock_is_taken_never_waits_and_the_tick_does_it() {
        let dir = tempfile::tempdir().unwrap();
        let reloader = shared_reloader(&dir);
        let handle = reloader.lock().handle().clone();
        let v0 = handle.load().version;
        let thread = {
            // A tick in progress (std's mutex: taken again from this
            // thread, `try_lock` says it is taken, as from another).
            let _tick = reloader.lock();
            reloader.reload_soon();
            assert_eq!(handle.load().version, v0, "reloaded under a held lock");
            ReloadThread::start(reloader.clone(), Duration::from_millis(5)).unwrap()
        };
        // Nothing changed in the table: only the reload asked for publishes.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while handle.load().version == v0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the reload asked for was never done"
            );
            std::thread::yield_now();
        }
        thread.stop();
        // With the lock free it is done at once, by the caller.
        let v1 = handle.load().version;
        reloader.reload_soon();
        assert!(handle.load().version > v1);
    }

    /// QA: with the lock free, each request reloaded at once on the
    /// caller's thread (the control runtime, at normal priority), one whole
    /// rebuild per batch of rows replication applied. With the tick thread
    /// running, requests wake it, and those made before it gets to them
    /// make one reload.
    #[test]
    fn reloads_asked_for_in_a_burst_are_done_by_the_tick_thread_together() {
        let dir = tempfile::tempdir().unwrap();
        let reloader = shared_reloader(&dir);
        let handle = reloader.lock().handle().clone();
        // An interval no tick of this test reaches.
        let thread = ReloadThread::start(reloader.clone(), Duration::from_secs(3600)).unwrap();
        let v0 = handle.load().version;
        {
            // The tick thread busy (a tick in progress) while they come.
            let _tick = reloader.lock();
            for _ in 0..1000 {
                reloader.reload_soon();
            }
            assert_eq!(handle.load().version, v0, "reloaded on the caller's thread");
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while handle.load().version == v0 {
            assert!(std::time::Instant::now() < deadline, "never reloaded");
            std::thread::yield_now();
        }
        // The lock free now: still the thread's to do, not the caller's.
        for _ in 0..1000 {
            reloader.reload_soon();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while reloader.0.reload_due.load(Ordering::Acquire) {
            assert!(std::time::Instant::now() < deadline, "never reloaded");
            std::thread::yield_now();
        }
        thread.stop();
        let reloads = handle.load().version - v0;
        assert!(
            (2..100).contains(&reloads),
            "{reloads} reloads for 2,000 requests in two bursts"
        );
    }

    /// Waiting for the lock as a task leaves the runtime to its other tasks
    /// (the control runtime's gossip, BGP keepalives, API): the holder here
    /// lets go only once another task on the runtime has run five times.
    #[test]
    fn waiting_for_the_lock_as_a_task_leaves_the_runtime_to_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let reloader = shared_reloader(&dir);
        let turns = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let holder = {
            let (reloader, turns) = (reloader.clone(), Arc::clone(&turns));
            std::thread::spawn(move || {
                let _tick = reloader.lock();
                held_tx.send(()).unwrap();
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while turns.load(Ordering::Relaxed) < 5 && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        held_rx.recv().unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let turns_when_locked = runtime.block_on(async {
            let other = {
                let turns = Arc::clone(&turns);
                tokio::spawn(async move {
                    loop {
                        turns.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                })
            };
            let _reloader = reloader.lock_async().await;
            other.abort();
            turns.load(Ordering::Relaxed)
        });
        holder.join().unwrap();
        assert!(
            turns_when_locked >= 5,
            "the runtime's other task ran {turns_when_locked} times while the lock was awaited"
        );
    }
}
