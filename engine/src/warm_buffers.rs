//! The shard's most recently used bulk read buffers, handed out last-freed
//! first, so that a bulk TLS read lands in memory still in the CPU's cache.
//!
//! The provided-buffer ring hands its buffers out in turn: a freed buffer
//! is used again only after all the others (256 × 64 KiB = 16 MiB a shard),
//! so every ring read is a copy into cold memory. Profiled during TLS
//! download paced at 640 MB/s (2026-12-04, Intel Xeon VM), the kernel's copy
//! into edgeproxy's buffers (`_copy_to_iter`) took 2.1× the samples of the
//! same copy into HAProxy's, for the same bytes. A bulk direction that
//! finds nothing waiting gives its buffer back here instead of freeing it,
//! waits for readiness without holding a buffer, and then reads into the
//! warmest one. At most [`WARM_BUFFERS`] are kept per shard, so the cost is
//! bounded whatever the number of connections.

use std::cell::RefCell;

/// Buffers kept per shard: enough for the bulk flows that are between two
/// reads at one time on a core, few enough to stay in its cache.
pub(crate) const WARM_BUFFERS: usize = 8;

thread_local! {
    static WARM: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// The most recently given back buffer (empty, with at least `len`
/// capacity), or a new one.
pub(crate) fn take(len: usize) -> Vec<u8> {
    // `try_with`: a connection's task may be dropped while the shard's
    // thread is being torn down, after this thread-local is gone.
    let mut buf = WARM
        .try_with(|warm| warm.borrow_mut().pop())
        .ok()
        .flatten()
        .unwrap_or_default();
    buf.clear();
    buf.reserve_exact(len);
    buf
}

/// Keeps `buf` for the next [`take`] on this shard, or frees it when enough
/// are kept already.
pub(crate) fn give(buf: Vec<u8>) {
    if buf.capacity() == 0 {
        return;
    }
    let _ = WARM.try_with(|warm| {
        let mut warm = warm.borrow_mut();
        if warm.len() < WARM_BUFFERS {
            warm.push(buf);
        }
    });
}

#[cfg(test)]
pub(crate) fn kept() -> usize {
    WARM.with_borrow(Vec::len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_buffer_given_back_is_the_first_taken() {
        let (a, b) = (take(1024), take(1024));
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        give(a);
        give(b);
        let (first, second) = (take(1024), take(1024));
        assert_eq!((first.as_ptr(), second.as_ptr()), (pb, pa));
    }

    #[test]
    fn at_most_warm_buffers_are_kept() {
        let bufs: Vec<_> = (0..WARM_BUFFERS + 3).map(|_| take(64)).collect();
        for b in bufs {
            give(b);
        }
        assert_eq!(kept(), WARM_BUFFERS);
        for _ in 0..WARM_BUFFERS {
            drop(take(64));
        }
        assert_eq!(kept(), 0);
    }

    #[test]
    fn a_taken_buffer_is_empty_and_large_enough() {
        let mut b = take(16);
        b.extend_from_slice(b"leftover");
        give(b);
        let b = take(4096);
        assert!(b.is_empty());
        assert!(b.capacity() >= 4096);
    }
}
