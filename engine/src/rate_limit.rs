//! Per-client admission on one shard: a token bucket of new connections per
//! client IP, and a cap on the connections one client IP holds open.
//!
//! # Contract
//!
//! [`ClientTable::admit`] is called once per new client connection, after
//! the PROXY header (so the client is the real one behind a load balancer)
//! and before TLS or any backend work. It is sans-IO (time is passed in),
//! takes no lock (each shard owns its table) and never allocates after the
//! table's first use: the table is a fixed array of
//! [`ClientTable::capacity`] slots, allocated once.
//!
//! Memory is bounded by construction. Each client IP hashes (with a
//! per-process random key, so addresses cannot be chosen to collide) to a
//! pair of slots; a client not in either takes the one that matters least:
//! an empty slot, else one with no open connection whose bucket is fullest
//! in time (least recently seen), else the least recently seen. A flood of
//! spoofed sources therefore evicts idle clients, not memory; what it can
//! cost is precision: an evicted client starts again with a full bucket and
//! its open connections uncounted (they are released against nothing, see
//! [`Admitted`]). The numbers are counted (`evictions`) so an operator sees
//! when the table is too small.
//!
//! Why per shard: with SO_REUSEPORT steering every connection from one
//! client IP lands on the same shard, so the shard's table sees all of that
//! client's connections and the limit is exact, with no shared cache line on
//! the accept path. Where steering does not hold (PROXY-protocol listeners,
//! where the TCP peer is the load balancer, or a kernel that refused the
//! steering program) a client's connections spread over the shards and each
//! shard applies the limit on its own: the effective limit is then up to
//! `shards ×` the configured one. See README, "Per-client rate limits".

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::time::Instant;

/// The per-client limits, part of the knobs (a SIGHUP can change them).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClientLimits {
    /// Token bucket on: at most `burst` new connections at once, refilled at
    /// `per_sec` a second.
    pub rate_enabled: bool,
    /// Refill rate, new connections per second (> 0).
    pub per_sec: f64,
    /// Bucket size (≥ 1).
    pub burst: u32,
    /// Connections one client IP may hold open on a shard; 0 = no cap.
    pub max_concurrent: u32,
}

impl Default for ClientLimits {
    fn default() -> Self {
        ClientLimits {
            rate_enabled: false,
            per_sec: 100.0,
            burst: 10,
            max_concurrent: 0,
        }
    }
}

impl ClientLimits {
    /// True when any per-client limit applies.
    pub fn active(&self) -> bool {
        self.rate_enabled || self.max_concurrent > 0
    }
}

/// Why a client was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Its bucket is empty.
    Rate,
    /// It already holds `max_concurrent` connections.
    Concurrent,
}

/// A connection admitted: hand it back with [`ClientTable::release`] when
/// the connection ends. It names the slot and the client, so a slot given
/// to another client in between is left alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    slot: u32,
    key: u128,
}

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    key: u128,
    used: bool,
    tokens: f32,
    /// Milliseconds since the table's epoch when the bucket was last
    /// refilled.
    seen_ms: u64,
    open: u32,
}

/// One shard's table of clients.
#[derive(Debug)]
pub struct ClientTable {
    slots: Box<[Slot]>,
    capacity: usize,
    hasher: RandomState,
    epoch: Instant,
    /// Clients that took a slot from another tracked client.
    pub evictions: u64,
}

impl ClientTable {
    /// A table for `capacity` clients (rounded up to a power of two, at
    /// least 2). Nothing is allocated until the first [`admit`].
    ///
    /// [`admit`]: ClientTable::admit
    pub fn new(capacity: usize, epoch: Instant) -> Self {
        ClientTable {
            slots: Box::new([]),
            capacity: capacity.max(2).next_power_of_two(),
            hasher: RandomState::new(),
            epoch,
            evictions: 0,
        }
    }

    /// Slots in the table (clients it can track at once).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Slots in use.
    pub fn tracked(&self) -> usize {
        self.slots.iter().filter(|s| s.used).count()
    }

    /// Admits or refuses a new connection from `ip` at `now`.
    pub fn admit(
        &mut self,
        ip: IpAddr,
        now: Instant,
        limits: &ClientLimits,
    ) -> Result<Admitted, Refused> {
        if self.slots.is_empty() {
            self.slots = vec![Slot::default(); self.capacity].into_boxed_slice();
        }
        let key = key_of(ip);
        let now_ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        let burst = limits.burst.max(1) as f32;
        let first = (self.hasher.hash_one(key) as usize) & (self.capacity - 1);
        let pair = [first, first ^ 1];
        let idx = match pair
            .iter()
            .copied()
            .find(|&i| self.slots[i].used && self.slots[i].key == key)
        {
            Some(i) => {
                let slot = &mut self.slots[i];
                let elapsed = now_ms.saturating_sub(slot.seen_ms) as f64 / 1000.0;
                let refill = (elapsed * limits.per_sec.max(0.0)) as f32;
                slot.tokens = (slot.tokens + refill).min(burst);
                slot.seen_ms = now_ms;
                i
            }
            None => {
                let victim = self.victim(pair);
                if self.slots[victim].used {
                    self.evictions += 1;
                }
                self.slots[victim] = Slot {
                    key,
                    used: true,
                    tokens: burst,
                    seen_ms: now_ms,
                    open: 0,
                };
                victim
            }
        };
        let slot = &mut self.slots[idx];
        if limits.max_concurrent > 0 && slot.open >= limits.max_concurrent {
            return Err(Refused::Concurrent);
        }
        if limits.rate_enabled {
            if slot.tokens < 1.0 {
                return Err(Refused::Rate);
            }
            slot.tokens -= 1.0;
        }
        slot.open += 1;
        Ok(Admitted {
            slot: idx as u32,
            key,
        })
    }

    /// The connection admitted as `admitted` ended.
    pub fn release(&mut self, admitted: Admitted) {
        if let Some(slot) = self.slots.get_mut(admitted.slot as usize) {
            if slot.used && slot.key == admitted.key {
                slot.open = slot.open.saturating_sub(1);
            }
        }
    }

    /// The slot of `pair` a new client should take.
    fn victim(&self, pair: [usize; 2]) -> usize {
        let [a, b] = pair.map(|i| (i, &self.slots[i]));
        for (i, s) in [a, b] {
            if !s.used {
                return i;
            }
        }
        // Prefer a client with nothing open, then the one seen longest ago.
        let rank = |s: &Slot| (s.open > 0, s.seen_ms);
        if rank(a.1) <= rank(b.1) {
            a.0
        } else {
            b.0
        }
    }
}

/// An IP as one 128-bit key (IPv4 as its IPv4-mapped IPv6 form).
fn key_of(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::time::Duration;

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))
    }

    fn rate(per_sec: f64, burst: u32) -> ClientLimits {
        ClientLimits {
            rate_enabled: true,
            per_sec,
            burst,
            max_concurrent: 0,
        }
    }

    #[test]
    fn burst_then_refill_at_the_rate() {
        let t0 = Instant::now();
        let mut t = ClientTable::new(64, t0);
        let l = rate(10.0, 3);
        for _ in 0..3 {
            assert!(t.admit(ip(1), t0, &l).is_ok());
        }
        assert_eq!(t.admit(ip(1), t0, &l), Err(Refused::Rate));
        // Another client has its own bucket.
        assert!(t.admit(ip(2), t0, &l).is_ok());
        // 10/s: one token after 100 ms, not before.
        assert_eq!(
            t.admit(ip(1), t0 + Duration::from_millis(90), &l),
            Err(Refused::Rate)
        );
        assert!(t.admit(ip(1), t0 + Duration::from_millis(200), &l).is_ok());
        // A long pause refills up to the burst, no more.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(t.admit(ip(1), later, &l).is_ok());
        }
        assert_eq!(t.admit(ip(1), later, &l), Err(Refused::Rate));
    }

    #[test]
    fn concurrent_cap_counts_open_connections_until_released() {
        let t0 = Instant::now();
        let mut t = ClientTable::new(64, t0);
        let l = ClientLimits {
            max_concurrent: 2,
            ..ClientLimits::default()
        };
        let a = t.admit(ip(1), t0, &l).unwrap();
        let _b = t.admit(ip(1), t0, &l).unwrap();
        assert_eq!(t.admit(ip(1), t0, &l), Err(Refused::Concurrent));
        assert!(t.admit(ip(2), t0, &l).is_ok());
        t.release(a);
        assert!(t.admit(ip(1), t0, &l).is_ok());
    }

    #[test]
    fn a_flood_of_sources_stays_within_the_table_and_evicts_idle_clients() {
        let t0 = Instant::now();
        let mut t = ClientTable::new(256, t0);
        let l = ClientLimits {
            rate_enabled: true,
            per_sec: 1.0,
            burst: 1,
            max_concurrent: 1,
        };
        // A real client holds a connection open.
        let held = t.admit(ip(0), t0, &l).unwrap();
        for n in 1..100_000 {
            let a = t.admit(ip(n), t0 + Duration::from_millis(n as u64), &l);
            t.release(a.unwrap());
        }
        assert_eq!(t.capacity(), 256);
        assert!(t.tracked() <= 256);
        assert!(t.evictions > 90_000);
        // The client with an open connection was never the one evicted when
        // its pair had an idle neighbour: its cap still holds.
        assert_eq!(
            t.admit(ip(0), t0 + Duration::from_secs(200), &l),
            Err(Refused::Concurrent)
        );
        t.release(held);
    }

    #[test]
    fn release_after_eviction_touches_no_other_client() {
        let t0 = Instant::now();
        let mut t = ClientTable::new(2, t0); // one pair: two clients at most
        let l = ClientLimits {
            max_concurrent: 1,
            ..ClientLimits::default()
        };
        let a = t.admit(ip(1), t0, &l).unwrap();
        let b = t.admit(ip(2), t0, &l).unwrap();
        // A third client evicts one of them (both busy: least recently seen).
        let c = t.admit(ip(3), t0 + Duration::from_millis(1), &l).unwrap();
        assert_eq!(t.evictions, 1);
        t.release(a);
        t.release(b);
        // Client 3 still holds its one connection.
        assert_eq!(
            t.admit(ip(3), t0 + Duration::from_millis(2), &l),
            Err(Refused::Concurrent)
        );
        t.release(c);
    }

    #[test]
    fn ipv4_mapped_and_plain_ipv4_are_one_client() {
        let t0 = Instant::now();
        let mut t = ClientTable::new(16, t0);
        let l = rate(1.0, 1);
        let v4 = Ipv4Addr::new(203, 0, 113, 9);
        assert!(t.admit(IpAddr::V4(v4), t0, &l).is_ok());
        assert_eq!(
            t.admit(IpAddr::V6(v4.to_ipv6_mapped()), t0, &l),
            Err(Refused::Rate)
        );
    }

    #[test]
    fn nothing_is_allocated_before_first_use() {
        let t = ClientTable::new(1 << 20, Instant::now());
        assert_eq!(t.tracked(), 0);
        assert!(t.slots.is_empty());
    }
}
