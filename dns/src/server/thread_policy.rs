//! The scheduling policy of the UDP worker threads.
//!
//! Under the default policy (`SCHED_OTHER`) a worker that a datagram wakes
//! preempts whatever runs on its core at once: a proxy shard in the middle
//! of its work, or — in `dns-bench` — the load generator, which then wakes
//! the worker again for its very next query. Each query costs a context
//! switch on both sides. Under `SCHED_BATCH` a woken worker does not preempt
//! the running task (the kernel's wake-up preemption skips batch tasks); it
//! runs when that task's turn ends or it sleeps, or at once on an idle core,
//! and then finds a batch of queries for one `recvmmsg`. Measured with
//! `dns-bench` on a 2-core VM: server context switches per 1,000 queries
//! 140–180 → 50–100, server CPU per query 2.5 → 2.0 µs, the same average
//! latency. The price is latency only on a core that is busy with something
//! else: a query waits for the running task's turn (a few milliseconds at
//! most) instead of interrupting it.

use std::io;

/// Puts the calling thread under `SCHED_BATCH` (static priority 0, the
/// only one the policy has). Needs no privilege.
pub fn set_batch() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` outlives the call.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The calling thread's policy (`libc::SCHED_*`).
#[cfg(test)]
pub fn current() -> io::Result<i32> {
    // SAFETY: pid 0 is the calling thread.
    match unsafe { libc::sched_getscheduler(0) } {
        -1 => Err(io::Error::last_os_error()),
        policy => Ok(policy),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_put_under_batch_reports_batch_and_others_keep_theirs() {
        let before = current().unwrap();
        let inside = std::thread::spawn(|| {
            set_batch().unwrap();
            current().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(inside, libc::SCHED_BATCH);
        assert_eq!(
            current().unwrap(),
            before,
            "only the calling thread changes"
        );
    }
}
