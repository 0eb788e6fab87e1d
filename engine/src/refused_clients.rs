//! Which clients a listener's per-client limits refused, per interval: the
//! heaviest few with their counts and an estimate of how many distinct
//! clients in all, so the summary line tells one abusive client from a
//! wide flood.
//!
//! # Contract
//!
//! One [`RefusedClients`] per listener per shard (in its
//! [`crate::stats::ListenerStats`]). The shard calls
//! [`RefusedClients::record`] for each connection refused by a per-client
//! limit; an admitted connection costs nothing. One reader (the control
//! side's traffic watch) calls [`RefusedClients::take`] once per interval:
//! it ends the interval and returns what it saw.
//!
//! Bounded memory under a spoofed-source flood, by construction: the
//! heaviest clients are kept with the Space-Saving algorithm (Metwally et
//! al., 2005) in [`TRACKED`] fixed slots (a new client takes the lightest
//! slot and inherits its count as a floor, so the counts of the heavy
//! ones stay right and any client refused more than `refused / TRACKED`
//! times is among them), and distinct clients are counted by linear
//! counting on a fixed bitmap of [`BITMAP_BITS`] bits (exact for a few,
//! within a few per cent up to thousands, "more than" beyond, written
//! `15615+`).
//!
//! No lock: the shard is the only writer. Each interval has its own half
//! (the shard writes the half of the current interval, the reader reads
//! the other), and a slot's key, count and floor are read consistently
//! through a sequence number (a seqlock the writer never waits on).

use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

/// Clients kept per listener, shard and interval.
pub const TRACKED: usize = 16;
/// Bits of the distinct-client bitmap (a power of two).
pub const BITMAP_BITS: usize = 2048;
const WORDS: usize = BITMAP_BITS / 64;

/// One shard's record of one listener's refused clients.
#[derive(Debug)]
pub struct RefusedClients {
    /// The interval being recorded; advanced by the reader.
    epoch: AtomicU64,
    halves: [Half; 2],
}

#[derive(Debug)]
struct Half {
    /// The interval whose refusals it holds.
    epoch: AtomicU64,
    slots: [Slot; TRACKED],
    seen: [AtomicU64; WORDS],
}

#[derive(Debug, Default)]
struct Slot {
    /// Odd while the writer changes `key` and `floor`.
    seq: AtomicU32,
    key_hi: AtomicU64,
    key_lo: AtomicU64,
    /// Refusals counted to this client (0: the slot is free), including
    /// `floor`.
    count: AtomicU64,
    /// The count the slot had when this client took it: its own count is
    /// at least `count - floor`.
    floor: AtomicU64,
}

impl Default for RefusedClients {
    fn default() -> Self {
        RefusedClients {
            epoch: AtomicU64::new(0),
            halves: [Half::default(), Half::default()],
        }
    }
}

impl Default for Half {
    fn default() -> Self {
        Half {
            epoch: AtomicU64::new(0),
            slots: Default::default(),
            seen: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// One client as one interval saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offender {
    pub ip: IpAddr,
    /// Refusals counted to it (an upper bound when `floor > 0`).
    pub count: u64,
    /// Of `count`, what it may have inherited: its refusals are at least
    /// `count - floor`; exactly `count` when 0.
    pub floor: u64,
}

impl Offender {
    /// Its refusals, at least.
    pub fn at_least(&self) -> u64 {
        self.count - self.floor.min(self.count)
    }
}

/// What one or more shards saw of one listener in one interval; merge the
/// shards' with [`Interval::merge`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interval {
    pub offenders: Vec<Offender>,
    seen: [u64; WORDS],
}

impl Default for Interval {
    fn default() -> Self {
        Interval {
            offenders: Vec::new(),
            seen: [0; WORDS],
        }
    }
}

/// How many distinct clients were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Distinct {
    /// About this many (exact for a few).
    About(u64),
    /// More than this many: the bitmap is full.
    MoreThan(u64),
}

impl std::fmt::Display for Distinct {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Distinct::About(n) => write!(f, "{n}"),
            // No space: it is a log field's value.
            Distinct::MoreThan(n) => write!(f, "{n}+"),
        }
    }
}

impl Interval {
    /// Adds another shard's view of the same listener and interval (a
    /// client whose connections spread over shards adds up).
    pub fn merge(&mut self, other: Interval) {
        for o in other.offenders {
            match self.offenders.iter_mut().find(|m| m.ip == o.ip) {
                Some(m) => {
                    m.count += o.count;
                    m.floor += o.floor;
                }
                None => self.offenders.push(o),
            }
        }
        for (mine, theirs) in self.seen.iter_mut().zip(other.seen) {
            *mine |= theirs;
        }
    }

    /// The `n` clients refused most, heaviest first (by what they were
    /// refused at least, then by address).
    pub fn top(&self, n: usize) -> Vec<Offender> {
        let mut all = self.offenders.clone();
        all.sort_by(|a, b| {
            (b.at_least(), b.count)
                .cmp(&(a.at_least(), a.count))
                .then_with(|| a.ip.cmp(&b.ip))
        });
        all.truncate(n);
        all
    }

    /// Distinct clients refused, by linear counting (Whang et al., 1990):
    /// `-m ln(zero bits / m)`.
    pub fn distinct(&self) -> Distinct {
        let m = BITMAP_BITS as f64;
        let zeros: u32 = self.seen.iter().map(|w| w.count_zeros()).sum();
        if zeros == 0 {
            // Where the estimate stops meaning much: m ln m.
            return Distinct::MoreThan((m * m.ln()) as u64);
        }
        let estimate = -m * (f64::from(zeros) / m).ln();
        // Never fewer than the clients named.
        Distinct::About((estimate.round() as u64).max(self.offenders.len() as u64))
    }
}

impl RefusedClients {
    /// Counts one refused connection from `ip`. Only the owning shard calls
    /// it.
    pub fn record(&self, ip: IpAddr) {
        let epoch = self.epoch.load(Ordering::Acquire);
        let half = &self.halves[(epoch & 1) as usize];
        if half.epoch.load(Ordering::Relaxed) != epoch {
            // First refusal of this interval: forget the one two back.
            half.clear();
            half.epoch.store(epoch, Ordering::Release);
        }
        let key = key_of(ip);
        half.mark(key);
        half.count(key);
    }

    /// Ends the interval and returns what it recorded. One reader only.
    pub fn take(&self) -> Interval {
        let epoch = self.epoch.fetch_add(1, Ordering::AcqRel);
        let half = &self.halves[(epoch & 1) as usize];
        if half.epoch.load(Ordering::Acquire) != epoch {
            return Interval::default();
        }
        Interval {
            offenders: half.slots.iter().filter_map(Slot::read).collect(),
            seen: std::array::from_fn(|i| half.seen[i].load(Ordering::Relaxed)),
        }
    }
}

impl Half {
    fn clear(&self) {
        for slot in &self.slots {
            slot.write(0, 0, 0);
        }
        for word in &self.seen {
            word.store(0, Ordering::Relaxed);
        }
    }

    fn mark(&self, key: u128) {
        let bit = spread(key) as usize & (BITMAP_BITS - 1);
        let word = &self.seen[bit / 64];
        let was = word.load(Ordering::Relaxed);
        let mask = 1u64 << (bit % 64);
        if was & mask == 0 {
            word.store(was | mask, Ordering::Relaxed);
        }
    }

    /// Space-Saving: the client's slot, else a free one, else the lightest
    /// one, whose count it inherits as its floor.
    fn count(&self, key: u128) {
        let mut lightest = &self.slots[0];
        let mut lightest_count = u64::MAX;
        for slot in &self.slots {
            let count = slot.count.load(Ordering::Relaxed);
            if count > 0 && slot.key() == key {
                // Its key and floor stay: no sequence change needed.
                slot.count.store(count + 1, Ordering::Relaxed);
                return;
            }
            if count < lightest_count {
                lightest = slot;
                lightest_count = count;
            }
        }
        lightest.write(key, lightest_count + 1, lightest_count);
    }
}

impl Slot {
    fn key(&self) -> u128 {
        (u128::from(self.key_hi.load(Ordering::Relaxed)) << 64)
            | u128::from(self.key_lo.load(Ordering::Relaxed))
    }

    /// The writer's side of the seqlock.
    fn write(&self, key: u128, count: u64, floor: u64) {
        let seq = self.seq.load(Ordering::Relaxed);
        self.seq.store(seq.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        self.key_hi.store((key >> 64) as u64, Ordering::Relaxed);
        self.key_lo.store(key as u64, Ordering::Relaxed);
        self.count.store(count, Ordering::Relaxed);
        self.floor.store(floor, Ordering::Relaxed);
        self.seq.store(seq.wrapping_add(2), Ordering::Release);
    }

    /// The reader's side: a consistent (key, count, floor), or `None` for a
    /// free slot or one the writer kept changing.
    fn read(&self) -> Option<Offender> {
        for _ in 0..8 {
            let before = self.seq.load(Ordering::Acquire);
            if before % 2 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let key = self.key();
            let count = self.count.load(Ordering::Relaxed);
            let floor = self.floor.load(Ordering::Relaxed);
            fence(Ordering::Acquire);
            if self.seq.load(Ordering::Relaxed) != before {
                continue;
            }
            return (count > 0).then(|| Offender {
                ip: ip_of(key),
                count,
                floor: floor.min(count),
            });
        }
        None
    }
}

/// An IP as one 128-bit key (IPv4 as its IPv4-mapped IPv6 form).
fn key_of(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn ip_of(key: u128) -> IpAddr {
    Ipv6Addr::from(key).to_canonical()
}

/// A key's bitmap position: splitmix64's finalizer over both halves, the
/// same on every shard (their bitmaps are OR'ed).
fn spread(key: u128) -> u64 {
    let mut x = ((key >> 64) as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ key as u64;
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn v4(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))
    }

    #[test]
    fn names_each_client_with_its_exact_count_while_few() {
        let r = RefusedClients::default();
        for _ in 0..40 {
            r.record(v4(1));
        }
        for _ in 0..3 {
            r.record(v4(2));
        }
        let got = r.take();
        assert_eq!(
            got.top(5),
            [
                Offender {
                    ip: v4(1),
                    count: 40,
                    floor: 0
                },
                Offender {
                    ip: v4(2),
                    count: 3,
                    floor: 0
                },
            ]
        );
        assert_eq!(got.distinct(), Distinct::About(2));
    }

    #[test]
    fn each_interval_starts_empty() {
        let r = RefusedClients::default();
        r.record(v4(1));
        assert_eq!(r.take().top(5).len(), 1);
        assert_eq!(r.take(), Interval::default(), "nothing since");
        r.record(v4(2));
        r.take();
        // Two intervals on, the first half is written again: cleared first.
        r.record(v4(3));
        let got = r.take();
        assert_eq!(got.top(5).iter().map(|o| o.ip).collect::<Vec<_>>(), [v4(3)]);
        assert_eq!(got.distinct(), Distinct::About(1));
    }

    /// 100,000 spoofed sources refused once each, one real abuser refused
    /// 10,000 times among them (9 %, above the 1/16 that Space-Saving
    /// guarantees to keep): the abuser is named first, its count right and
    /// its floor within bounds, memory is the fixed slots, and the distinct
    /// count says "many".
    #[test]
    fn a_spoofed_flood_keeps_the_abuser_on_top_in_fixed_memory() {
        let r = RefusedClients::default();
        for n in 0..100_000u32 {
            r.record(v4(1_000 + n));
            if n % 10 == 0 {
                r.record(v4(1));
            }
        }
        let got = r.take();
        assert_eq!(got.offenders.len(), TRACKED);
        let top = got.top(5)[0];
        assert_eq!(top.ip, v4(1));
        assert!(top.count >= 10_000, "{top:?}");
        assert!(
            top.at_least() >= 10_000 - 110_000 / TRACKED as u64,
            "{top:?}"
        );
        assert!(matches!(got.distinct(), Distinct::MoreThan(_)));
        assert_eq!(got.distinct().to_string(), "15615+");
    }

    #[test]
    fn distinct_clients_are_estimated_within_a_few_per_cent() {
        let r = RefusedClients::default();
        for n in 0..1_000 {
            r.record(v4(n));
            r.record(v4(n));
        }
        let Distinct::About(n) = r.take().distinct() else {
            panic!("saturated")
        };
        assert!((950..=1_050).contains(&n), "{n}");
    }

    #[test]
    fn shards_merge_by_client_and_union_their_bitmaps() {
        let (a, b) = (RefusedClients::default(), RefusedClients::default());
        for _ in 0..4 {
            a.record(v4(1));
        }
        b.record(v4(1));
        b.record("2001:db8::7".parse().unwrap());
        let mut got = a.take();
        got.merge(b.take());
        assert_eq!(
            got.top(5)
                .iter()
                .map(|o| (o.ip.to_string(), o.count))
                .collect::<Vec<_>>(),
            [("10.0.0.1".to_string(), 5), ("2001:db8::7".to_string(), 1)]
        );
        assert_eq!(got.distinct(), Distinct::About(2));
    }
}
