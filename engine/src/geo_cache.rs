//! A shard's cache of recent client address → country answers.
//!
//! # Why
//!
//! Every new connection asks [`crate::geo::GeoResolver::country`] where its
//! client is: the overrides, then a walk down the MaxMind tree and a record
//! decode, about 67 ns (README, "Where edgeproxy's extra CPU per new
//! connection goes"). Clients come back: a browser opens several
//! connections, an API client reconnects, a NAT fronts many users. The
//! answer for an address does not change while the engine runs (the
//! resolver is fixed at start-up), so a shard keeps the last answers in a
//! small direct-mapped table of its own: no lock, no shared cache line,
//! a hit costs a hash and a compare.
//!
//! # Contract
//!
//! - [`GeoCache::country`] returns exactly what the `lookup` it is given
//!   returns for that address: a hit returns the answer a lookup gave
//!   before for the same (canonical) address, a miss calls `lookup` and
//!   keeps its answer. Callers must give the same lookup for the cache's
//!   whole life (one resolver per engine).
//! - [`SLOTS`] entries, direct-mapped: an address displaces whichever
//!   address had its slot. Memory is fixed (16 KiB per shard); a
//!   client base larger than the table just misses more, at the cost of a
//!   lookup plus the hash.
//! - IPv4-mapped IPv6 addresses share the entry of their IPv4 address.

use std::net::IpAddr;

use crate::snapshot::Country;

/// Entries per shard: a power of two, so the slot is the hash's top bits.
pub const SLOTS: usize = 512;
const SLOT_BITS: u32 = SLOTS.trailing_zeros();

/// See the module documentation.
pub struct GeoCache {
    slots: Box<[Slot; SLOTS]>,
}

#[derive(Clone, Copy)]
struct Slot {
    /// The canonical address as a 128-bit key (IPv4 in the low 32 bits,
    /// tagged by [`V4_TAG`] so that it cannot equal an IPv6 address).
    key: u128,
    used: bool,
    country: Option<Country>,
}

const EMPTY: Slot = Slot {
    key: 0,
    used: false,
    country: None,
};

/// Marks an IPv4 key: `::ffff:0:0/96` is where IPv6 keeps mapped IPv4
/// addresses, which are turned into IPv4 before keying, so no IPv6 key
/// carries it.
const V4_TAG: u128 = 0xffff << 32;

fn key(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => V4_TAG | u128::from(u32::from(v4)),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => V4_TAG | u128::from(u32::from(v4)),
            None => u128::from(v6),
        },
    }
}

/// Fibonacci hashing of the key folded to 64 bits: addresses that differ
/// only in their last octet (neighbours behind one ISP) land far apart.
fn slot_of(key: u128) -> usize {
    let folded = (key as u64) ^ ((key >> 64) as u64);
    (folded.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - SLOT_BITS)) as usize
}

impl Default for GeoCache {
    fn default() -> Self {
        GeoCache {
            slots: Box::new([EMPTY; SLOTS]),
        }
    }
}

impl GeoCache {
    /// The country of `ip`: the kept answer, or `lookup(ip)`'s, kept.
    #[inline]
    pub fn country(
        &mut self,
        ip: IpAddr,
        lookup: impl FnOnce(IpAddr) -> Option<Country>,
    ) -> Option<Country> {
        let key = key(ip);
        let slot = &mut self.slots[slot_of(key)];
        if slot.used && slot.key == key {
            return slot.country;
        }
        let country = lookup(ip);
        *slot = Slot {
            key,
            used: true,
            country,
        };
        country
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn c(code: &str) -> Country {
        Country::parse(code).unwrap()
    }

    #[test]
    fn a_second_lookup_of_an_address_is_answered_from_the_table() {
        let mut cache = GeoCache::default();
        let calls = Cell::new(0);
        let lookup = |_| {
            calls.set(calls.get() + 1);
            Some(c("BR"))
        };
        let ip: IpAddr = "200.160.2.3".parse().unwrap();
        assert_eq!(cache.country(ip, lookup), Some(c("BR")));
        assert_eq!(cache.country(ip, lookup), Some(c("BR")));
        assert_eq!(calls.get(), 1);
    }

    #[test]
    fn an_unknown_country_is_kept_too() {
        let mut cache = GeoCache::default();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(cache.country(ip, |_| None), None);
        assert_eq!(cache.country(ip, |_| panic!("looked up again")), None);
    }

    #[test]
    fn a_mapped_address_shares_its_ipv4_entry_and_ipv6_keys_do_not_collide() {
        let mut cache = GeoCache::default();
        let v4 = Ipv4Addr::new(8, 8, 8, 8);
        assert_eq!(
            cache.country(IpAddr::V4(v4), |_| Some(c("US"))),
            Some(c("US"))
        );
        let mapped = IpAddr::V6(v4.to_ipv6_mapped());
        assert_eq!(
            cache.country(mapped, |_| panic!("mapped looked up")),
            Some(c("US"))
        );
        // Same low 32 bits, a real IPv6 address: its own entry.
        let v6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0x0808, 0x0808));
        assert_ne!(key(v6), key(IpAddr::V4(v4)));
        assert_eq!(cache.country(v6, |_| Some(c("DE"))), Some(c("DE")));
    }

    /// More addresses than slots: every answer is still the lookup's, and
    /// the neighbours of one /24 spread over the table instead of taking
    /// turns in a few slots.
    #[test]
    fn displaced_entries_are_looked_up_again_and_answers_stay_right() {
        let mut cache = GeoCache::default();
        let answer = |ip: IpAddr| match ip {
            IpAddr::V4(v4) if v4.octets()[3] % 2 == 0 => Some(c("US")),
            _ => None,
        };
        for round in 0..3 {
            for n in 0..(4 * SLOTS as u32) {
                let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n));
                assert_eq!(cache.country(ip, answer), answer(ip), "round {round}, {ip}");
            }
        }
        let mut used = std::collections::HashSet::new();
        for n in 0..=255u32 {
            used.insert(slot_of(key(IpAddr::V4(Ipv4Addr::from(0xc0a8_0100 + n)))));
        }
        assert!(
            used.len() > 128,
            "a /24 uses {} of {SLOTS} slots",
            used.len()
        );
    }
}
