//! Answering a datagram allocates in proportion to the datagram, not to
//! what its header claims: measured with a counting global allocator.
//!
//! Regression test for a bug found by `tests/bounded_memory.rs`: a 12-byte
//! header claiming 65,535 questions made the decoder reserve room for all of
//! them (megabytes per packet), and 5,000 garbage datagrams a round grew the
//! proxy's resident memory round after round.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dns::{Answerer, Transport, ZoneConfig};
use engine::geo::{GeoResolver, RegionMap};
use engine::snapshot::SnapshotBuilder;

/// The system allocator, remembering the largest single allocation.
struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[test]
fn a_header_claiming_huge_counts_allocates_little() {
    let zone = ZoneConfig::new("internal", 5, "sa", Vec::new(), Vec::new()).unwrap();
    let geo = GeoResolver::new(Vec::new(), None, RegionMap::default());
    let mut answerer = Answerer::new(Arc::new(zone), Arc::new(geo));
    let snapshot = SnapshotBuilder::new().build(&[]).snapshot;
    let client: IpAddr = "10.0.0.1".parse().unwrap();
    let mut out = Vec::with_capacity(4096);
    // Warm up whatever the answerer sets up once.
    let _ = answerer.answer(&[0u8; 12], client, Transport::Udp, &snapshot, &mut out);

    for counts in [
        [0xff, 0xff, 0, 0, 0, 0, 0, 0],
        [0, 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        [0, 0, 0, 0, 0, 0, 0xff, 0xff],
    ] {
        let mut packet = vec![0x12, 0x34, 0x01, 0x00];
        packet.extend_from_slice(&counts);
        packet.extend_from_slice(&[0u8; 20]);
        LARGEST.store(0, Ordering::Relaxed);
        let answered = answerer
            .answer(&packet, client, Transport::Udp, &snapshot, &mut out)
            .expect("answered");
        let largest = LARGEST.load(Ordering::Relaxed);
        assert_eq!(answered.rcode, hickory_proto::op::ResponseCode::FormErr);
        assert!(
            largest <= 16 * 1024,
            "a {}-byte datagram claiming counts {counts:?} allocated {largest} bytes at once",
            packet.len()
        );
    }
}
