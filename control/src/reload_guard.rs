//! Bounded staleness for the routing reload thread, which runs under
//! `SCHED_IDLE` ([`crate::reload_thread`]).
//!
//! Under `SCHED_IDLE` a reload never takes a shard's core while the shard
//! has work, but on cores something keeps fully busy (the shards past
//! saturation, or any other program on the host) it gets a weight of 3
//! against a normal thread's 1,024, and every routing change waits: an
//! expired heartbeat, a drain, a health verdict, a PostgreSQL mirror (whose
//! thread waits for the reloader's lock). Seen with three busy loops on the
//! two cores of the test host: a registration's heartbeat expiry not applied
//! within 5 s, a hot reload 2.2 s late, a PostgreSQL recovery not said within
//! 30 s; and in QA a starved reload of 3,000 backends held the lock 9–12 s.
//!
//! So a guard thread at normal priority watches the reload thread's turns:
//! a turn not done a second after it was due is starved, and the guard
//! raises the thread to `SCHED_OTHER` at nice 0, a shard's own priority,
//! until that turn ends; the thread then lowers itself to `SCHED_IDLE` at
//! nice 19 again. At nice 19 (a weight of 15) a raised turn still took
//! 3–7 s in `tests/hot_reload.rs` beside the busy loops and the test's own
//! hundred streaming threads. A shard then shares its core with one reload
//! (under a millisecond of CPU in a release build) once a second at most,
//! for routing changes that take effect instead of waiting for idle time.
//! Raising takes `CAP_SYS_NICE` or an `RLIMIT_NICE` that allows nice 0
//! (the shipped unit sets `LimitNICE=+0`: nothing above the default
//! priority); without either it is said once and the thread stays as it
//! was.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{RecvTimeoutError, Sender};

/// How long past its due time a turn may take before it counts as starved.
pub const STARVED_AFTER: Duration = Duration::from_secs(1);

/// What the watched thread tells the guard.
pub struct Turns {
    epoch: Instant,
    /// The watched thread's id; 0 until it registers.
    tid: AtomicI32,
    /// Milliseconds since `epoch` after which the current or next turn is
    /// starved if not done; `u64::MAX`: none expected.
    overdue_at_ms: AtomicU64,
    /// Raised by the guard and not lowered since.
    raised: AtomicBool,
    /// How many times the guard raised it.
    raises: AtomicU64,
}

impl Turns {
    pub fn new() -> Arc<Turns> {
        Arc::new(Turns {
            epoch: Instant::now(),
            tid: AtomicI32::new(0),
            overdue_at_ms: AtomicU64::new(u64::MAX),
            raised: AtomicBool::new(false),
            raises: AtomicU64::new(0),
        })
    }

    /// Called on the watched thread: it is the one the guard raises.
    pub fn register_current_thread(&self) {
        // SAFETY: gettid has no preconditions.
        self.tid.store(unsafe { libc::gettid() }, Ordering::Release);
    }

    /// The next turn is due at `due`; past `due` + `starved_after` it is
    /// starved.
    pub fn due_at(&self, due: Instant, starved_after: Duration) {
        let at = (due + starved_after).saturating_duration_since(self.epoch);
        self.overdue_at_ms
            .store(at.as_millis() as u64, Ordering::Release);
    }

    /// Called on the watched thread after a turn: nothing is due until the
    /// next [`due_at`](Self::due_at); returns whether the guard had raised
    /// the thread (then the caller lowers its priority again).
    pub fn turn_done(&self) -> bool {
        self.overdue_at_ms.store(u64::MAX, Ordering::Release);
        self.raised.swap(false, Ordering::AcqRel)
    }

    /// How many times the guard raised the thread.
    pub fn raises(&self) -> u64 {
        self.raises.load(Ordering::Relaxed)
    }

    fn starved(&self) -> bool {
        let now = self.epoch.elapsed().as_millis() as u64;
        now > self.overdue_at_ms.load(Ordering::Acquire) && !self.raised.load(Ordering::Acquire)
    }

    /// The guard itself did not run for a while (see [`looked_late`]): a
    /// turn expected now gets `starved_after` from now, as if it had just
    /// come due, instead of being judged on time nobody had.
    fn restart_overdue_clock(&self, starved_after: Duration) {
        let fresh = (self.epoch.elapsed() + starved_after).as_millis() as u64;
        // Only a turn that is expected (not u64::MAX) moves, and only later.
        let _ = self
            .overdue_at_ms
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |at| {
                (at != u64::MAX && at < fresh).then_some(fresh)
            });
    }
}

/// Whether the guard's look at `now`, the one after its look at `previous`
/// (`period` apart), came more than `starved_after` late. Then the guard,
/// a thread at normal priority, did not run either: the whole process was
/// stopped (SIGSTOP, a debugger) or its host paused (a VM migrated, a
/// hypervisor's steal), and a turn that came due meanwhile was not starved
/// by busy cores. (Seen: a POP resumed after SIGSTOP said "routing reload
/// starved under SCHED_IDLE (its cores are busy)" on idle cores.)
fn looked_late(previous: Instant, now: Instant, period: Duration, starved_after: Duration) -> bool {
    now.saturating_duration_since(previous) > period + starved_after
}

/// The guard thread; stops (and is joined) when dropped.
pub struct Guard {
    stop: Option<Sender<()>>,
    join: Option<JoinHandle<()>>,
}

impl Guard {
    /// Watches `turns`, looking every quarter of `starved_after`.
    pub fn start(turns: Arc<Turns>, starved_after: Duration) -> std::io::Result<Guard> {
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let join = std::thread::Builder::new()
            .name("reload-guard".into())
            .spawn(move || {
                let mut refused = false;
                let period = starved_after / 4;
                let mut looked = Instant::now();
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(period) {
                    let now = Instant::now();
                    let previous = std::mem::replace(&mut looked, now);
                    if looked_late(previous, now, period, starved_after) {
                        turns.restart_overdue_clock(starved_after);
                        tracing::debug!(
                            gap_ms = (now - previous).as_millis() as u64,
                            "reload guard: this process did not run for a while (stopped or its host \
                             paused); the routing reload's turn is judged from now"
                        );
                        continue;
                    }
                    if refused || !turns.starved() {
                        continue;
                    }
                    let tid = turns.tid.load(Ordering::Acquire);
                    match raise(tid) {
                        Ok(()) => {
                            turns.raised.store(true, Ordering::Release);
                            if turns.raises.fetch_add(1, Ordering::Relaxed) == 0 {
                                tracing::warn!(starved_after_ms = starved_after.as_millis() as u64,
                                    "routing reload starved under SCHED_IDLE (its cores are busy): \
                                     raised to normal priority until its turn ends (said once)");
                            } else {
                                tracing::debug!("routing reload starved again: raised");
                            }
                        }
                        Err(e) => {
                            refused = true;
                            tracing::warn!(error = %e,
                                "routing reload starved under SCHED_IDLE (its cores are busy) and \
                                 cannot be raised: routing changes wait until the cores have idle \
                                 time (give edgeproxy CAP_SYS_NICE or LimitNICE=+0)");
                        }
                    }
                }
            })?;
        Ok(Guard {
            stop: Some(stop),
            join: Some(join),
        })
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // Closing the channel wakes the guard.
        self.stop.take();
        if let Some(join) = self.join.take() {
            let _ = join.join();
        }
    }
}

/// Moves thread `tid` from `SCHED_IDLE` to `SCHED_OTHER` at nice 0 (the
/// thread goes back to nice 19 with `SCHED_IDLE` after its turn).
fn raise(tid: i32) -> std::io::Result<()> {
    if tid == 0 {
        return Ok(());
    }
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param; `tid` is a thread of this
    // process (a thread that ended makes the calls fail with ESRCH).
    let raised = unsafe {
        libc::sched_setscheduler(tid, libc::SCHED_OTHER, &param) == 0
            && libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 0) == 0
    };
    if raised {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pin_to_cpu0() {
        // SAFETY: a zeroed cpu_set_t is a valid empty set; 0 is this thread.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(0, &mut set);
            assert_eq!(
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
                0
            );
        }
    }

    fn policy() -> i32 {
        // SAFETY: 0 is this thread.
        unsafe { libc::sched_getscheduler(0) }
    }

    /// CPU time this thread has used.
    fn thread_cpu() -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec to write.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    /// A `SCHED_IDLE` thread doing a turn on a CPU two spinning threads
    /// keep busy is raised to `SCHED_OTHER` once the turn is overdue, and
    /// back under `SCHED_IDLE` after it. (Unraised, the turn's 10 ms of CPU
    /// would take about 7 s of wall time there: a weight of 3 against
    /// 2,048.)
    #[test]
    fn a_starved_idle_thread_is_raised_until_its_turn_ends() {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "this test changes scheduling policies and needs root (CI runs as root)"
        );
        let spin = Arc::new(AtomicBool::new(true));
        let spinners: Vec<_> = (0..2)
            .map(|_| {
                let spin = spin.clone();
                std::thread::spawn(move || {
                    pin_to_cpu0();
                    while spin.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        let turns = Turns::new();
        let guard = Guard::start(turns.clone(), Duration::from_millis(200)).unwrap();
        let watched = turns.clone();
        let (during, after) = std::thread::spawn(move || {
            pin_to_cpu0();
            watched.register_current_thread();
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: valid param; 0 is this thread.
            assert_eq!(
                unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) },
                0
            );
            watched.due_at(Instant::now(), Duration::from_millis(200));
            let start = thread_cpu();
            while thread_cpu() - start < Duration::from_millis(10) {
                std::hint::spin_loop();
            }
            let during = policy();
            if watched.turn_done() {
                // SAFETY: as above.
                unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
            }
            (during, policy())
        })
        .join()
        .unwrap();
        spin.store(false, Ordering::Relaxed);
        for s in spinners {
            s.join().unwrap();
        }
        drop(guard);
        assert!(turns.raises() >= 1, "never raised");
        assert_eq!(during, libc::SCHED_OTHER, "not raised during its turn");
        assert_eq!(after, libc::SCHED_IDLE, "not lowered after its turn");
    }

    /// A look a period after the last is on time, a look more than
    /// `starved_after` past that is late (the guard did not run).
    #[test]
    fn a_look_after_a_gap_longer_than_the_starved_time_is_late() {
        let (period, starved_after) = (Duration::from_millis(250), Duration::from_secs(1));
        let t0 = Instant::now();
        assert!(!looked_late(t0, t0 + period, period, starved_after));
        assert!(!looked_late(
            t0,
            t0 + period + starved_after,
            period,
            starved_after
        ));
        assert!(looked_late(
            t0,
            t0 + period + starved_after + Duration::from_millis(1),
            period,
            starved_after
        ));
        // A clock that went nowhere (or back) is not late.
        assert!(!looked_late(t0 + period, t0, period, starved_after));
    }

    /// After a gap, a turn that was overdue is judged from now: not starved
    /// until `starved_after` has passed again. No turn expected stays none
    /// expected, and a turn due later keeps its time.
    #[test]
    fn a_gap_restarts_the_overdue_clock_of_an_expected_turn_only() {
        let starved_after = Duration::from_secs(1);
        // Watching for ten seconds already.
        let turns = Turns {
            epoch: Instant::now() - Duration::from_secs(10),
            ..Arc::into_inner(Turns::new()).unwrap()
        };
        turns.restart_overdue_clock(starved_after);
        assert_eq!(turns.overdue_at_ms.load(Ordering::Acquire), u64::MAX);
        assert!(!turns.starved());

        // Due at the start, overdue a second later: starved by now.
        turns.due_at(turns.epoch, starved_after);
        assert!(turns.starved());
        turns.restart_overdue_clock(starved_after);
        assert!(!turns.starved(), "judged on the gap");
        let fresh = turns.overdue_at_ms.load(Ordering::Acquire);
        assert!(fresh >= (Duration::from_secs(10) + starved_after).as_millis() as u64);

        // A turn due far ahead keeps its time.
        turns.due_at(Instant::now() + Duration::from_secs(60), starved_after);
        let later = turns.overdue_at_ms.load(Ordering::Acquire);
        turns.restart_overdue_clock(starved_after);
        assert_eq!(turns.overdue_at_ms.load(Ordering::Acquire), later);
    }
}
