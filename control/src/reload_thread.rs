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
//! lock such a caller waits for it.

use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{RecvTimeoutError, Sender};

use crate::routing::RoutingReloader;

/// The nice value of the reload thread: the lowest priority a thread can give
/// itself without privileges (and cannot raise again without them).
pub const RELOAD_NICE: i32 = 19;

/// A [`RoutingReloader`] shared by the reload thread and the control thread.
#[derive(Clone)]
pub struct SharedReloader(Arc<Mutex<RoutingReloader>>);

impl SharedReloader {
    pub fn new(reloader: RoutingReloader) -> Self {
        SharedReloader(Arc::new(Mutex::new(reloader)))
    }

    /// The reloader, waiting for a tick in progress. A tick that panicked
    /// leaves the reloader as it was before that tick's publish, which is
    /// still a consistent state, so a poisoned lock is used as is.
    pub fn lock(&self) -> MutexGuard<'_, RoutingReloader> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

enum Message {
    Interval(Duration),
    Stop,
}

/// The running tick thread. Stops (and is joined) on [`ReloadThread::stop`]
/// or when dropped.
pub struct ReloadThread {
    tx: Sender<Message>,
    join: Option<JoinHandle<()>>,
}

impl ReloadThread {
    /// Starts ticking `reloader` every `interval`.
    pub fn start(reloader: SharedReloader, interval: Duration) -> std::io::Result<Self> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let join = std::thread::Builder::new()
            .name("routing-reload".into())
            .spawn(move || {
                lower_priority();
                let mut interval = interval;
                loop {
                    match rx.recv_timeout(interval) {
                        Err(RecvTimeoutError::Timeout) => {
                            // A bug in one tick must not end reloading for
                            // the life of the process without a word.
                            let tick = std::panic::AssertUnwindSafe(|| reloader.lock().tick());
                            if std::panic::catch_unwind(tick).is_err() {
                                tracing::error!(
                                    "routing reload panicked; retrying at the next tick"
                                );
                            }
                        }
                        Ok(Message::Interval(new)) => interval = new,
                        Ok(Message::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
            })?;
        Ok(ReloadThread {
            tx,
            join: Some(join),
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
}
