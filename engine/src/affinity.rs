//! Client affinity: sticky client → backend bindings with a sliding TTL.
//!
//! # Contract
//!
//! An [`AffinityTable`] maps a client IP address to the id of the backend it
//! was last routed to. Time is passed in (`now`), never read from a clock, so
//! the table is deterministic to test.
//!
//! * **Sliding TTL.** A binding expires once it has been idle — neither bound
//!   nor hit by [`AffinityTable::lookup`] — for longer than the TTL. Every hit
//!   moves its expiry to `now + ttl`, so a client that keeps coming back stays
//!   bound indefinitely; one that goes quiet for a TTL is rebalanced.
//! * The TTL is read when a binding is checked, not stored in it, so
//!   [`AffinityTable::set_ttl`] applies to existing bindings at once.
//! * A TTL of zero disables affinity: lookups miss, binds do nothing.
//! * IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are treated as the IPv4
//!   address `a.b.c.d`, so a dual-stack listener and an IPv4 listener agree
//!   on who the client is.
//! * Expired bindings are removed when a lookup finds them and by
//!   [`AffinityTable::gc`]; the owner must call `gc` periodically, otherwise
//!   bindings of clients that never return stay in memory.
//! * **Bounded.** At most [`AffinityTable::set_max_clients`] bindings
//!   (default [`DEFAULT_MAX_CLIENTS`]): a new client that finds the table
//!   full is served but not bound (counted in [`AffinityTable::unbound`]),
//!   until `gc` frees room. Without a bound, one client per address of an
//!   IPv6 /64 could grow the table without limit within one TTL.
//!
//! Bindings hold the backend *id*, not an index, so they survive snapshot
//! swaps; whether the backend is still usable is checked by
//! [`crate::select::route`].

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
struct Binding {
    backend: Arc<str>,
    /// When the binding was made or last hit. Expiry is `last_seen + ttl`,
    /// computed with the table's current TTL (no `Instant` overflow, and TTL
    /// changes apply to existing bindings).
    last_seen: Instant,
}

/// Sticky client → backend bindings with a sliding TTL. See the module
/// documentation for the rules.
#[derive(Debug, Clone)]
pub struct AffinityTable {
    bindings: HashMap<IpAddr, Binding>,
    ttl: Duration,
    max_clients: usize,
    /// New clients not bound because the table was full, since the last
    /// [`AffinityTable::take_unbound`].
    unbound: u64,
}

/// Bindings a table holds by default: about 64 MB at most (a binding takes
/// about 64 bytes with the map's overhead).
pub const DEFAULT_MAX_CLIENTS: usize = 1_000_000;

/// An affinity table shared between shards, used when connections from one
/// client cannot be steered to one shard (PROXY-protocol listeners, or when
/// the kernel refuses the steering program).
pub type SharedAffinity = std::sync::Arc<std::sync::Mutex<AffinityTable>>;

/// The key for `ip`: IPv4-mapped IPv6 addresses become plain IPv4.
fn key(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

impl AffinityTable {
    /// An empty table whose bindings expire after `ttl` of inactivity. A `ttl`
    /// of zero disables affinity: [`lookup`](Self::lookup) always misses and
    /// [`bind`](Self::bind) does nothing.
    pub fn new(ttl: Duration) -> Self {
        AffinityTable {
            bindings: HashMap::new(),
            ttl,
            max_clients: DEFAULT_MAX_CLIENTS,
            unbound: 0,
        }
    }

    /// Holds at most `max` bindings from now on (bindings beyond it are
    /// kept until they expire; no new client is bound meanwhile).
    pub fn set_max_clients(&mut self, max: usize) {
        self.max_clients = max;
    }

    /// New clients left unbound because the table was full, since the last
    /// call; resets the count.
    pub fn take_unbound(&mut self) -> u64 {
        std::mem::take(&mut self.unbound)
    }

    /// True when `b`, checked at `now`, has been idle for longer than `ttl`.
    /// A `now` earlier than the binding's last use (another shard's clock
    /// reading, taken a little earlier) counts as no idle time.
    fn expired(ttl: Duration, b: &Binding, now: Instant) -> bool {
        ttl.is_zero() || now.saturating_duration_since(b.last_seen) > ttl
    }

    /// The backend id `ip` is bound to, if the binding is live at `now`.
    ///
    /// A hit refreshes the binding: its expiry becomes `now + ttl` (sliding
    /// TTL), so a client that keeps coming stays bound. An expired binding is
    /// removed and `None` returned. Borrowed, and found with one hash of the
    /// key: this runs for every connection of a returning client.
    pub fn lookup(&mut self, ip: IpAddr, now: Instant) -> Option<&str> {
        if self.ttl.is_zero() {
            return None;
        }
        let Entry::Occupied(found) = self.bindings.entry(key(ip)) else {
            return None;
        };
        if Self::expired(self.ttl, found.get(), now) {
            found.remove();
            return None;
        }
        let b = found.into_mut();
        b.last_seen = b.last_seen.max(now);
        Some(&b.backend)
    }

    /// Binds `ip` to `backend` as of `now`, replacing any previous binding.
    /// Does nothing when affinity is disabled (TTL zero).
    pub fn bind(&mut self, ip: IpAddr, backend: Arc<str>, now: Instant) {
        if self.ttl.is_zero() {
            return;
        }
        let k = key(ip);
        if self.bindings.len() >= self.max_clients && !self.bindings.contains_key(&k) {
            self.unbound += 1;
            return;
        }
        self.bindings.insert(
            k,
            Binding {
                backend,
                last_seen: now,
            },
        );
    }

    /// Removes the binding of `ip`, if any.
    pub fn forget(&mut self, ip: IpAddr) {
        self.bindings.remove(&key(ip));
    }

    /// Removes every binding expired at `now` and returns how many were
    /// removed. Live bindings are untouched (not refreshed).
    pub fn gc(&mut self, now: Instant) -> usize {
        let before = self.bindings.len();
        let ttl = self.ttl;
        self.bindings.retain(|_, b| !Self::expired(ttl, b, now));
        before - self.bindings.len()
    }

    /// Number of bindings held, including expired ones not yet collected.
    pub fn len(&self) -> usize {
        self.bindings.len()
    }

    /// True when no binding is held.
    pub fn is_empty(&self) -> bool {
        self.bindings.is_empty()
    }

    /// The current TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The most bindings held (see [`AffinityTable::set_max_clients`]).
    pub fn max_clients(&self) -> usize {
        self.max_clients
    }

    /// Puts `ttl` and `max_clients` in force, as [`AffinityTable::set_ttl`]
    /// and [`AffinityTable::set_max_clients`] do; writes nothing when both
    /// already are. Cheap enough to call before every lookup, which is how
    /// a configuration change reaches the table before the next client is
    /// routed.
    pub fn configure(&mut self, ttl: Duration, max_clients: usize) {
        if ttl != self.ttl {
            self.set_ttl(ttl);
        }
        if max_clients != self.max_clients {
            self.max_clients = max_clients;
        }
    }

    /// Changes the TTL. It applies to existing bindings immediately (a binding
    /// idle for longer than the new TTL is expired). Setting zero disables
    /// affinity and drops every binding.
    pub fn set_ttl(&mut self, ttl: Duration) {
        self.ttl = ttl;
        if ttl.is_zero() {
            self.bindings.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const TTL: Duration = Duration::from_secs(30);
    const MS: Duration = Duration::from_millis(1);

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(198, 51, 100, last))
    }

    fn id(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    fn hit(t: &mut AffinityTable, ip: IpAddr, now: Instant) -> Option<String> {
        t.lookup(ip, now).map(|b| b.to_string())
    }

    #[test]
    fn a_full_table_binds_no_new_client_until_gc_frees_room() {
        let mut t = AffinityTable::new(TTL);
        t.set_max_clients(2);
        let t0 = Instant::now();
        t.bind(ip(1), id("b1"), t0);
        t.bind(ip(2), id("b2"), t0 + TTL / 2);
        t.bind(ip(3), id("b3"), t0 + TTL / 2);
        assert_eq!(t.len(), 2);
        assert_eq!(hit(&mut t, ip(3), t0 + TTL / 2), None);
        // A bound client still moves to another backend.
        t.bind(ip(1), id("b9"), t0 + TTL / 2);
        assert_eq!(hit(&mut t, ip(1), t0 + TTL / 2).as_deref(), Some("b9"));
        assert_eq!(t.take_unbound(), 1);
        assert_eq!(t.take_unbound(), 0);
        // ip(2) expires; gc makes room for ip(3).
        assert_eq!(t.gc(t0 + TTL * 2), 2);
        t.bind(ip(3), id("b3"), t0 + TTL * 2);
        assert_eq!(hit(&mut t, ip(3), t0 + TTL * 2).as_deref(), Some("b3"));
    }

    #[test]
    fn unknown_client_misses() {
        let mut t = AffinityTable::new(TTL);
        assert_eq!(t.lookup(ip(1), Instant::now()), None);
        assert!(t.is_empty());
    }

    #[test]
    fn bound_client_hits_its_backend() {
        let mut t = AffinityTable::new(TTL);
        let now = Instant::now();
        t.bind(ip(1), id("b1"), now);
        t.bind(ip(2), id("b2"), now);
        assert_eq!(hit(&mut t, ip(1), now).as_deref(), Some("b1"));
        assert_eq!(hit(&mut t, ip(2), now).as_deref(), Some("b2"));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn binding_again_replaces_the_backend() {
        let mut t = AffinityTable::new(TTL);
        let now = Instant::now();
        t.bind(ip(1), id("b1"), now);
        t.bind(ip(1), id("b2"), now);
        assert_eq!(hit(&mut t, ip(1), now).as_deref(), Some("b2"));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn binding_lives_for_exactly_the_ttl() {
        let t0 = Instant::now();
        let mut t = AffinityTable::new(TTL);
        t.bind(ip(1), id("b1"), t0);
        assert_eq!(hit(&mut t, ip(1), t0 + TTL).as_deref(), Some("b1"));
    }

    #[test]
    fn binding_expires_after_the_ttl_and_is_removed() {
        let t0 = Instant::now();
        let mut t = AffinityTable::new(TTL);
        t.bind(ip(1), id("b1"), t0);
        assert_eq!(t.lookup(ip(1), t0 + TTL + MS), None);
        assert!(t.is_empty(), "an expired lookup removes the binding");
    }

    #[test]
    fn hits_slide_the_expiry() {
        let t0 = Instant::now();
        let mut t = AffinityTable::new(TTL);
        t.bind(ip(1), id("b1"), t0);
        let step = TTL - MS;
        // Three hits each within a TTL of the previous one: the last is far
        // past the first binding's TTL.
        for k in 1..=3 {
            assert_eq!(hit(&mut t, ip(1), t0 + step * k).as_deref(), Some("b1"));
        }
        let last = t0 + step * 3;
        assert_eq!(hit(&mut t, ip(1), last + TTL).as_deref(), Some("b1"));
        assert_eq!(t.lookup(ip(1), last + TTL + TTL + MS), None);
    }

    #[test]
    fn an_earlier_now_neither_expires_nor_rewinds_a_binding() {
        let t0 = Instant::now();
        let mut t = AffinityTable::new(TTL);
        t.bind(ip(1), id("b1"), t0 + TTL);
        // A shard whose clock reading is older than the binding.
        assert_eq!(hit(&mut t, ip(1), t0).as_deref(), Some("b1"));
        // The hit at t0 did not move last use back to t0.
        assert_eq!(hit(&mut t, ip(1), t0 + TTL + TTL).as_deref(), Some("b1"));
    }

    #[test]
    fn gc_removes_only_expired_bindings_and_counts_them() {
        let t0 = Instant::now();
        let mut t = AffinityTable::new(TTL);
        t.bind(ip(1), id("old"), t0);
        t.bind(ip(2), id("old"), t0);
        t.bind(ip(3), id("fresh"), t0 + TTL);
        let now = t0 + TTL + MS;
        assert_eq!(t.gc(now), 2);
        assert_eq!(t.len(), 1);
        assert_eq!(hit(&mut t, ip(3), now).as_deref(), Some("fresh"));
        assert_eq!(t.gc(now), 0);
    }

    #[test]
    fn gc_does_not_refresh_live_bindings() {
        let t0 = Instant::now();
        let mut t = AffinityTable::new(TTL);
        t.bind(ip(1), id("b1"), t0);
        assert_eq!(t.gc(t0 + TTL), 0);
        assert_eq!(t.gc(t0 + TTL + MS), 1);
    }

    #[test]
    fn forget_removes_a_binding() {
        let now = Instant::now();
        let mut t = AffinityTable::new(TTL);
        t.bind(ip(1), id("b1"), now);
        t.bind(ip(2), id("b2"), now);
        t.forget(ip(1));
        t.forget(ip(9)); // unknown: no effect
        assert_eq!(t.lookup(ip(1), now), None);
        assert_eq!(hit(&mut t, ip(2), now).as_deref(), Some("b2"));
    }

    #[test]
    fn ttl_zero_disables_affinity() {
        let now = Instant::now();
        let mut t = AffinityTable::new(Duration::ZERO);
        t.bind(ip(1), id("b1"), now);
        assert!(t.is_empty());
        assert_eq!(t.lookup(ip(1), now), None);
    }

    #[test]
    fn set_ttl_zero_drops_every_binding() {
        let now = Instant::now();
        let mut t = AffinityTable::new(TTL);
        t.bind(ip(1), id("b1"), now);
        t.set_ttl(Duration::ZERO);
        assert!(t.is_empty());
        assert_eq!(t.ttl(), Duration::ZERO);
        t.bind(ip(1), id("b1"), now);
        assert_eq!(t.lookup(ip(1), now), None);
        // Re-enabling starts from an empty table.
        t.set_ttl(TTL);
        assert_eq!(t.lookup(ip(1), now), None);
        t.bind(ip(1), id("b1"), now);
        assert_eq!(hit(&mut t, ip(1), now).as_deref(), Some("b1"));
    }

    #[test]
    fn shorter_ttl_applies_to_existing_bindings() {
        let t0 = Instant::now();
        let mut t = AffinityTable::new(TTL);
        t.bind(ip(1), id("b1"), t0);
        t.bind(ip(2), id("b2"), t0);
        t.set_ttl(Duration::from_secs(5));
        let now = t0 + Duration::from_secs(10);
        assert_eq!(t.lookup(ip(1), now), None);
        assert_eq!(t.gc(now), 1);
        assert!(t.is_empty());
    }

    #[test]
    fn configure_applies_what_changed_and_keeps_the_rest() {
        let t0 = Instant::now();
        let mut t = AffinityTable::new(TTL);
        t.bind(ip(1), id("b1"), t0);
        // Unchanged: the binding stays.
        t.configure(TTL, DEFAULT_MAX_CLIENTS);
        assert_eq!(t.lookup(ip(1), t0), Some("b1"));
        // A smaller table: no new client is bound, the bound one stays.
        t.configure(TTL, 1);
        assert_eq!(t.max_clients(), 1);
        t.bind(ip(2), id("b2"), t0);
        assert_eq!(t.lookup(ip(2), t0), None);
        assert_eq!(t.take_unbound(), 1);
        // TTL zero: affinity off, every binding dropped.
        t.configure(Duration::ZERO, 1);
        assert!(t.is_empty());
        assert_eq!(t.lookup(ip(1), t0), None);
    }

    #[test]
    fn ipv4_mapped_ipv6_and_ipv4_share_one_binding() {
        let now = Instant::now();
        let v4 = Ipv4Addr::new(198, 51, 100, 7);
        let mapped = IpAddr::V6(v4.to_ipv6_mapped());
        let mut t = AffinityTable::new(TTL);

        t.bind(mapped, id("b1"), now);
        assert_eq!(hit(&mut t, IpAddr::V4(v4), now).as_deref(), Some("b1"));
        t.bind(IpAddr::V4(v4), id("b2"), now);
        assert_eq!(t.len(), 1);
        assert_eq!(hit(&mut t, mapped, now).as_deref(), Some("b2"));
        t.forget(mapped);
        assert!(t.is_empty());
    }

    #[test]
    fn native_ipv6_is_not_confused_with_ipv4() {
        let now = Instant::now();
        let mut t = AffinityTable::new(TTL);
        // ::c633:6407 is the deprecated IPv4-compatible form of 198.51.100.7:
        // a real IPv6 address, not to be folded.
        let compat = IpAddr::V6(Ipv4Addr::new(198, 51, 100, 7).to_ipv6_compatible());
        let v6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7));
        t.bind(ip(7), id("v4"), now);
        assert_eq!(t.lookup(compat, now), None);
        assert_eq!(t.lookup(v6, now), None);
        t.bind(v6, id("v6"), now);
        assert_eq!(hit(&mut t, v6, now).as_deref(), Some("v6"));
        assert_eq!(hit(&mut t, ip(7), now).as_deref(), Some("v4"));
    }

    #[test]
    fn shared_table_is_usable_across_threads() {
        let shared: SharedAffinity = Arc::new(std::sync::Mutex::new(AffinityTable::new(TTL)));
        let now = Instant::now();
        let other = Arc::clone(&shared);
        std::thread::spawn(move || other.lock().unwrap().bind(ip(1), id("b1"), now))
            .join()
            .unwrap();
        let got = shared.lock().unwrap().lookup(ip(1), now).map(str::to_owned);
        assert_eq!(got.as_deref(), Some("b1"));
    }
}
