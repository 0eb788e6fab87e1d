//! The pool's bookkeeping for one shard, without sockets or clocks: which
//! backends to warm, how many sockets each, when to refill, expire, close or
//! exclude. Time is passed in; the socket check is injected (a closure from
//! socket to [`Health`]), so tests drive it with fake sockets and a fake
//! clock.
//!
//! # Call order
//!
//! - [`Book::refresh`] with each routing snapshot (the driver calls it every
//!   tick): backends worth warming get an entry; entries of backends that
//!   left the table, turned unhealthy (drained backends are routed
//!   unhealthy), changed address or stopped qualifying are dropped, and
//!   their sockets with them (dropping a socket closes it).
//! - [`Book::take`] when a client connection picked a backend: the newest
//!   usable socket, checked first, or `None` (a miss: connect fresh).
//! - [`Book::poll_connect`] until `None` after every call above: each
//!   [`Order`] is one background connect, answered by [`Book::connected`] or
//!   [`Book::connect_failed`].
//! - [`Book::sweep`] every tick: expiry, and the check of every idle socket
//!   (a backend that closed it, or spoke first).
//!
//! # How many
//!
//! Each warmed backend starts at a target of one socket. A client that finds
//! its backend's pool empty (a miss) raises the target by one, up to
//! `max_per_backend`; a socket that waited `idle_timeout` without a taker
//! lowers it by one, never below one. Under steady load the target settles
//! where refills (one round trip each) keep up with takes. Sockets are taken
//! newest first, so surplus ones age out and shrink the pool.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::check::Health;
use super::stats::PoolStats;
use super::{Policy, SpeaksFirst, Warm};
use crate::snapshot::{Backend, RegionId, RoutingSnapshot};

/// First retry delay after a failed background connect; doubles per failure.
pub const RETRY_BASE: Duration = Duration::from_millis(500);
/// Longest delay between retries of a failing backend.
pub const RETRY_MAX: Duration = Duration::from_secs(30);
/// A pooled socket the backend closed younger than this counts as a failed
/// connect (a backend that accepts and closes at once must not make the pool
/// reconnect in a loop).
pub const YOUNG_CLOSE: Duration = Duration::from_millis(500);

/// One background connect to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub id: Arc<str>,
    pub addr: SocketAddr,
    /// The entry generation that asked; an answer for an entry that was
    /// since dropped or reset is discarded.
    pub epoch: u64,
}

/// Whether `b` is worth warm sockets under `policy` (health and app aside).
pub fn worth_warming(policy: &Policy, b: &Backend, local_region: Option<RegionId>) -> bool {
    if !policy.apps.is_empty() && !policy.apps.iter().any(|a| **a == *b.app) {
        return false;
    }
    match policy.warm {
        Warm::All => true,
        Warm::Remote => local_region != Some(b.region),
        Warm::RttAtLeast(us) => {
            let rtt = b.live.rtt_us();
            rtt != 0 && rtt >= us
        }
    }
}

struct Idle<S> {
    sock: S,
    since: Instant,
}

struct Entry<S> {
    /// The backend's id (the map's key too), for orders.
    id: Arc<str>,
    addr: SocketAddr,
    epoch: u64,
    /// Oldest first; takes pop the newest.
    idle: Vec<Idle<S>>,
    connecting: u32,
    target: u32,
    failures: u32,
    retry_at: Option<Instant>,
    /// It spoke first and the policy excludes such backends.
    excluded: bool,
    /// Generation of the last refresh that kept it.
    seen: u64,
}

/// One shard's pool state. `S` is the socket (a `TcpStream` on a shard).
pub struct Book<S> {
    policy: Arc<Policy>,
    stats: Arc<PoolStats>,
    entries: HashMap<Arc<str>, Entry<S>>,
    generation: u64,
    next_epoch: u64,
    idle_total: u64,
    connecting_total: u64,
}

impl<S> Book<S> {
    pub fn new(policy: Arc<Policy>, stats: Arc<PoolStats>) -> Self {
        Book {
            policy,
            stats,
            entries: HashMap::new(),
            generation: 0,
            next_epoch: 0,
            idle_total: 0,
            connecting_total: 0,
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Idle sockets across backends.
    pub fn idle(&self) -> u64 {
        self.idle_total
    }

    /// Idle sockets of backend `id`.
    pub fn idle_of(&self, id: &str) -> usize {
        self.entries.get(id).map_or(0, |e| e.idle.len())
    }

    /// The current target of backend `id` (0 when not warmed).
    pub fn target_of(&self, id: &str) -> u32 {
        self.entries.get(id).map_or(0, |e| e.target)
    }

    /// Whether backend `id` is warmed (has an entry and is not excluded).
    pub fn warms(&self, id: &str) -> bool {
        self.entries.get(id).is_some_and(|e| !e.excluded)
    }

    /// Follows `snap`: see the module documentation.
    pub fn refresh(&mut self, snap: &RoutingSnapshot, local_region: Option<RegionId>) {
        self.generation += 1;
        let generation = self.generation;
        for b in &snap.backends {
            if !b.healthy || !worth_warming(&self.policy, b, local_region) {
                continue;
            }
            let fresh_epoch = self.next_epoch + 1;
            let entry = self
                .entries
                .entry(Arc::clone(&b.id))
                .or_insert_with(|| Entry {
                    id: Arc::clone(&b.id),
                    addr: b.addr,
                    epoch: fresh_epoch,
                    idle: Vec::new(),
                    connecting: 0,
                    target: 1,
                    failures: 0,
                    retry_at: None,
                    excluded: false,
                    seen: generation,
                });
            if entry.epoch == fresh_epoch {
                self.next_epoch = fresh_epoch;
            } else if entry.addr != b.addr {
                // Moved: what was pooled reaches the old address.
                self.idle_total -= entry.idle.len() as u64;
                self.connecting_total -= u64::from(entry.connecting);
                self.next_epoch += 1;
                *entry = Entry {
                    id: Arc::clone(&b.id),
                    addr: b.addr,
                    epoch: self.next_epoch,
                    idle: Vec::new(),
                    connecting: 0,
                    target: 1,
                    failures: 0,
                    retry_at: None,
                    excluded: false,
                    seen: generation,
                };
            }
            entry.seen = generation;
        }
        let before = self.entries.len();
        let (mut idle_dropped, mut connecting_dropped) = (0u64, 0u64);
        self.entries.retain(|id, e| {
            let keep = e.seen == generation;
            if !keep {
                idle_dropped += e.idle.len() as u64;
                connecting_dropped += u64::from(e.connecting);
                if e.idle.is_empty() {
                    tracing::debug!(backend = %id,
                        "pool: backend no longer warmed (left the table, unhealthy, draining or out of scope)");
                } else {
                    tracing::info!(backend = %id, closed = e.idle.len(),
                        "pool: backend no longer warmed (left the table, unhealthy, draining or out of scope); its warm connections are closed");
                }
            }
            keep
        });
        if self.entries.len() != before {
            self.idle_total -= idle_dropped;
            self.connecting_total -= connecting_dropped;
        }
        self.publish();
    }

    /// A usable pooled socket to backend `id` at `addr`, checked with
    /// `check`, or `None`. Counts a hit or, for a warmed backend, a miss.
    pub fn take(
        &mut self,
        now: Instant,
        id: &str,
        addr: SocketAddr,
        mut check: impl FnMut(&S) -> Health,
    ) -> Option<S> {
        // Copied, not an `Arc` clone: the policy is shared by every shard's
        // book, and its refcount must not bounce between cores per take.
        let (max_age, keep_greeted, max_per_backend) = (
            max_age(&self.policy),
            self.policy.speaks_first == SpeaksFirst::Keep,
            self.policy.max_per_backend,
        );
        let entry = self.entries.get_mut(id)?;
        if entry.excluded || entry.addr != addr {
            return None;
        }
        let mut taken = None;
        while let Some(idle) = entry.idle.pop() {
            self.idle_total -= 1;
            if now.saturating_duration_since(idle.since) >= max_age {
                PoolStats::bump(&self.stats.expired);
                continue;
            }
            match check(&idle.sock) {
                Health::Quiet => {
                    entry.failures = 0;
                    taken = Some(idle.sock);
                    break;
                }
                Health::Spoke if keep_greeted => {
                    taken = Some(idle.sock);
                    break;
                }
                Health::Spoke => {
                    exclude(entry, id, &self.stats, &mut self.idle_total);
                    break;
                }
                Health::Closed => {
                    PoolStats::bump(&self.stats.stale);
                    closed_by_backend(entry, now, idle.since);
                }
            }
        }
        match &taken {
            Some(_) => PoolStats::bump(&self.stats.hits),
            None => {
                PoolStats::bump(&self.stats.misses);
                if !entry.excluded {
                    entry.target = (entry.target + 1).min(max_per_backend);
                }
            }
        }
        self.publish();
        taken
    }

    /// The next background connect to make, if any backend is below its
    /// target and not waiting out a retry delay.
    pub fn poll_connect(&mut self, now: Instant) -> Option<Order> {
        if self.full() {
            return None;
        }
        let entry = self.entries.values_mut().find(|e| e.wants_connect(now))?;
        let order = issue(entry);
        self.connecting_total += 1;
        self.publish();
        Some(order)
    }

    /// Like [`Book::poll_connect`], for backend `id` only: what the
    /// connection path asks after a take (one lookup, not a scan of every
    /// warmed backend).
    pub fn poll_connect_of(&mut self, now: Instant, id: &str) -> Option<Order> {
        if self.full() {
            return None;
        }
        let entry = self.entries.get_mut(id)?;
        if !entry.wants_connect(now) {
            return None;
        }
        let order = issue(entry);
        self.connecting_total += 1;
        self.publish();
        Some(order)
    }

    /// The shard holds `max_sockets` pooled sockets (idle or connecting):
    /// no more connects until one goes. Without that bound the pool took
    /// descriptors the connection limit had promised to clients (QA: under
    /// `ulimit -n 256`, 40 warmed backends held 80, and clients within the
    /// limit were accepted and closed, accepts failed with EMFILE, and
    /// health checks could not run).
    fn full(&self) -> bool {
        self.idle_total + self.connecting_total >= u64::from(self.policy.max_sockets)
    }

    /// `order` connected: `sock` joins the pool, or is dropped (closed) when
    /// its backend is no longer warmed, moved, or needs no more sockets.
    pub fn connected(&mut self, now: Instant, order: &Order, sock: S) {
        PoolStats::bump(&self.stats.connects);
        let Some(entry) = self.live_entry(order) else {
            return;
        };
        // The failure count stays until the socket proves itself (taken by
        // a client, or still open past YOUNG_CLOSE): a backend that accepts
        // and closes at once must back off further each time.
        entry.retry_at = None;
        if !entry.excluded && (entry.idle.len() as u32) < entry.target {
            entry.idle.push(Idle { sock, since: now });
            self.idle_total += 1;
        }
        self.publish();
    }

    /// `order` failed or timed out: that backend waits before the next try.
    pub fn connect_failed(&mut self, now: Instant, order: &Order) {
        PoolStats::bump(&self.stats.connect_failures);
        if let Some(entry) = self.live_entry(order) {
            entry.failures += 1;
            entry.retry_at = Some(now + retry_delay(entry.failures));
        }
        self.publish();
    }

    /// Backend `id` sent bytes on a socket a client had just taken, before
    /// the client's own: under [`SpeaksFirst::Exclude`] it is pooled no more.
    pub fn spoke_first(&mut self, id: &str) {
        if self.policy.speaks_first != SpeaksFirst::Exclude {
            return;
        }
        if let Some(entry) = self.entries.get_mut(id) {
            if !entry.excluded {
                exclude(entry, id, &self.stats, &mut self.idle_total);
            }
        }
        self.publish();
    }

    /// Closes expired sockets and those `check` finds closed (or, when such
    /// backends are excluded, holding a greeting).
    pub fn sweep(&mut self, now: Instant, mut check: impl FnMut(&S) -> Health) {
        let policy = Arc::clone(&self.policy);
        for (id, entry) in self.entries.iter_mut() {
            let mut spoke = false;
            let before = entry.idle.len();
            let mut shrink = 0;
            let mut young_closes = Vec::new();
            let mut lasted = false;
            entry.idle.retain(|idle| {
                let age = now.saturating_duration_since(idle.since);
                if age >= policy.idle_timeout {
                    // Nobody wanted it: one socket fewer from now on.
                    shrink += 1;
                    PoolStats::bump(&self.stats.expired);
                    return false;
                }
                // Too old, though wanted: replaced, same count.
                if age >= policy.max_lifetime {
                    PoolStats::bump(&self.stats.expired);
                    return false;
                }
                match check(&idle.sock) {
                    Health::Quiet => {
                        lasted |= age >= YOUNG_CLOSE;
                        true
                    }
                    Health::Spoke if policy.speaks_first == SpeaksFirst::Keep => true,
                    Health::Spoke => {
                        spoke = true;
                        false
                    }
                    Health::Closed => {
                        PoolStats::bump(&self.stats.stale);
                        young_closes.push(idle.since);
                        false
                    }
                }
            });
            self.idle_total -= (before - entry.idle.len()) as u64;
            if lasted {
                entry.failures = 0;
            }
            for since in young_closes {
                closed_by_backend(entry, now, since);
            }
            if shrink > 0 {
                // Never below one: the first client after a quiet spell is
                // the one a warm socket is for.
                entry.target = entry.target.saturating_sub(shrink).max(1);
            }
            if spoke {
                exclude(entry, id, &self.stats, &mut self.idle_total);
            }
        }
        self.publish();
    }

    /// The earliest instant a pooled socket expires or a retry is due.
    pub fn next_deadline(&self) -> Option<Instant> {
        let max_age = max_age(&self.policy);
        self.entries
            .values()
            .flat_map(|e| {
                // A retry matters only to an entry that still wants a
                // socket; a past one is issued by the next refill (and
                // cleared then), so it never makes the caller spin.
                let retry = e.retry_at.filter(|_| e.below_target());
                e.idle
                    .first()
                    .map(|i| i.since + max_age)
                    .into_iter()
                    .chain(retry)
            })
            .min()
    }

    /// Replaces the policy. Entries the new one no longer warms go at the
    /// next [`Book::refresh`]; targets and idle sockets above a lowered
    /// `max_per_backend` go now (the newest are kept).
    pub fn set_policy(&mut self, policy: Arc<Policy>) {
        let max = policy.max_per_backend;
        self.policy = policy;
        for e in self.entries.values_mut() {
            e.target = e.target.min(max);
            while e.idle.len() as u32 > max {
                e.idle.remove(0);
                self.idle_total -= 1;
            }
        }
        self.publish();
    }

    /// Closes every pooled socket and forgets every backend (the pool was
    /// turned off). Connects in flight are discarded when they finish.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.idle_total = 0;
        self.connecting_total = 0;
        self.publish();
    }

    /// Whether no backend is warmed (the connection path's fast exit).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn live_entry(&mut self, order: &Order) -> Option<&mut Entry<S>> {
        let entry = self
            .entries
            .get_mut(&*order.id)
            .filter(|e| e.epoch == order.epoch)?;
        entry.connecting -= 1;
        self.connecting_total -= 1;
        Some(entry)
    }

    fn publish(&self) {
        self.stats.idle.store(self.idle_total, Ordering::Relaxed);
        self.stats
            .connecting
            .store(self.connecting_total, Ordering::Relaxed);
    }
}

impl<S> Entry<S> {
    fn below_target(&self) -> bool {
        !self.excluded && (self.idle.len() as u32 + self.connecting) < self.target
    }

    fn wants_connect(&self, now: Instant) -> bool {
        self.below_target() && self.retry_at.is_none_or(|t| t <= now)
    }
}

/// Counts one connect in flight for `entry` and describes it.
fn issue<S>(entry: &mut Entry<S>) -> Order {
    entry.connecting += 1;
    // The wait is over; a failure sets the next one.
    entry.retry_at = None;
    Order {
        id: Arc::clone(&entry.id),
        addr: entry.addr,
        epoch: entry.epoch,
    }
}

/// The age at which a pooled socket goes, whichever limit comes first.
fn max_age(policy: &Policy) -> Duration {
    policy.idle_timeout.min(policy.max_lifetime)
}

fn retry_delay(failures: u32) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    RETRY_BASE.saturating_mul(factor).min(RETRY_MAX)
}

/// A socket the backend closed at age `now - since`: a very young one
/// counts as a failed connect (see [`YOUNG_CLOSE`]).
fn closed_by_backend<S>(entry: &mut Entry<S>, now: Instant, since: Instant) {
    if now.saturating_duration_since(since) < YOUNG_CLOSE {
        entry.failures += 1;
        entry.retry_at = Some(now + retry_delay(entry.failures));
    }
}

fn exclude<S>(entry: &mut Entry<S>, id: &str, stats: &PoolStats, idle_total: &mut u64) {
    entry.excluded = true;
    *idle_total -= entry.idle.len() as u64;
    entry.idle.clear();
    PoolStats::bump(&stats.speaks_first_excluded);
    tracing::info!(backend = %id,
        "pool: backend sent bytes before any client did (it speaks first); not pooled any more \
         (pool.speaks_first = \"exclude\")");
}

#[cfg(test)]
mod tests;
