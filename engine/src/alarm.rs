//! A one-shot alarm a connection's task waits on and a shard's sweeper
//! rings (idle timeouts, connect deadlines): two `Cell`s, no allocation,
//! cheap to poll on every wake-up of the task, single-threaded like the
//! shard.

use std::cell::Cell;
use std::future::Future;
use std::task::{Context, Poll, Waker};

#[derive(Default)]
pub(crate) struct Alarm {
    rung: Cell<bool>,
    /// The waiting task's waker, from its last poll of [`Alarm::wait`].
    waker: Cell<Option<Waker>>,
}

impl Alarm {
    pub fn is_rung(&self) -> bool {
        self.rung.get()
    }

    /// Rings it: the waiting task is scheduled (never run here).
    pub fn ring(&self) {
        self.rung.set(true);
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    /// Resolves once rung.
    pub fn wait(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| self.poll_wait(cx))
    }

    /// [`Alarm::wait`] as a poll: ready once rung, else the task in `cx` is
    /// the one woken when it rings.
    pub fn poll_wait(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.rung.get() {
            return Poll::Ready(());
        }
        let waker = match self.waker.take() {
            Some(w) if w.will_wake(cx.waker()) => w,
            _ => cx.waker().clone(),
        };
        self.waker.set(Some(waker));
        Poll::Pending
    }

    /// Drops the waiting task's waker: nobody waits any more, and a waker
    /// kept would keep that task alive until the sweeper lets go.
    pub fn forget_waker(&self) {
        self.waker.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    #[test]
    fn a_waiting_task_resumes_when_rung_by_another() {
        compio::runtime::Runtime::new().unwrap().block_on(async {
            let alarm = Rc::new(Alarm::default());
            let ringer = Rc::clone(&alarm);
            compio::runtime::spawn(async move { ringer.ring() }).detach();
            alarm.wait().await;
            assert!(alarm.is_rung());
        });
    }
}
