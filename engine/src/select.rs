//! Backend selection: which backend a new client connection goes to.
//!
//! # Contract
//!
//! [`pick`] is a pure function of its arguments: it does no I/O, reads no
//! clock and allocates nothing. The live connection count of each backend is
//! injected as a closure (in production `Backend::active`, in tests a fixed
//! table), so selection is deterministic for a given input.
//!
//! Scoring follows the original edgeProxy:
//!
//! ```text
//! score = tier * 100 + (active / soft_limit) / weight      (f64 arithmetic)
//! ```
//!
//! The lowest score wins; equal scores go to the backend that comes first in
//! the `candidates` slice (table order). The [`Tier`] is how close the backend
//! is to the client: same country (0), same region (1), the local POP's region
//! (2), anything else (3). The load term is below 100, so the tier decides,
//! as long as `active < 100 * soft_limit * weight`; a backend loaded past that
//! (a hundred times its soft limit) starts losing to the next tier, exactly as
//! in the original. A backend over its soft limit but in a closer tier still
//! wins: the soft limit only steers load within a tier.
//!
//! A backend is never picked when it is unhealthy, when it is at or above its
//! hard limit (`hard_limit == 0` means no hard limit), or when its index is in
//! the `exclude` slice (backends already tried for this connection).
//!
//! # Backends whose connects fail
//!
//! A backend whose last connect failed is *cooling* until its backoff has
//! passed (1 s after the first failure, doubling per failed probe up to
//! 30 s: see [`crate::backoff`]; read through [`LiveView::cooling`]). A
//! cooling backend loses to every eligible backend that is not cooling,
//! whatever their tiers and loads: a nearer backend that refuses connections
//! is worth less to the client than a farther one that accepts them. Among
//! cooling backends the usual score decides, and one is picked when nothing
//! else is eligible, so a pool that is all dead is still tried (and its
//! recovery noticed). Once the backoff has passed, the backend competes
//! normally again: the next client to pick it probes it. Only on its first
//! attempt, though: a retry counts every failing backend as cooling
//! ([`Atomics::without_probes`]), so a connection probes at most one. An
//! affinity binding to a cooling backend is not honoured (see [`route`]).
//!
//! Without this, a dead backend that scores best would be tried first by
//! every new client until health checks (when configured) took it out; with
//! `connect_attempts` dead backends ahead of a live one, every client failed.
//!
//! [`route`] puts client affinity in front of [`pick`]: a client bound to a
//! backend that is still usable keeps it; otherwise a fresh pick is made and
//! the client is (re)bound to it. See [`route`] for the exact rules.
//!
//! # RTT tie-break
//!
//! [`pick_scored`] and [`route_scored`] add the round-trip time that active
//! health checks measured (an EWMA, read through [`LiveView::rtt_us`]):
//!
//! ```text
//! score += min(rtt_weight * rtt_ms, RTT_TERM_MAX)
//! ```
//!
//! With `rtt_weight` 0 (the default) nothing is added and the result is
//! exactly [`pick`]'s. The term is capped below the distance between tiers,
//! so it only reorders backends within a tier (or across a tier boundary
//! only where load already would). A backend with no measurement (RTT 0)
//! adds nothing. At weight 0.01, 10 ms of RTT weigh as much as a tenth of
//! the soft limit's worth of connections.

use std::net::IpAddr;
use std::time::Instant;

use crate::affinity::AffinityTable;
use crate::snapshot::{Backend, BackendIdx, Country, RegionId, RoutingSnapshot};

/// How close a backend is to the client. Lower is closer and always preferred
/// (see the module documentation for the one exception: extreme overload).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// The backend is in the client's country.
    Country = 0,
    /// The backend is in the client's region.
    Region = 1,
    /// The backend is in the region of this POP.
    LocalPop = 2,
    /// None of the above.
    Fallback = 3,
}

impl Tier {
    /// Every tier, closest first (the order of their discriminants), for
    /// per-tier metrics.
    pub const ALL: [Tier; 4] = [Tier::Country, Tier::Region, Tier::LocalPop, Tier::Fallback];

    /// A short, stable name for logs and metric labels: `"country"`,
    /// `"region"`, `"local"` or `"fallback"`.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Country => "country",
            Tier::Region => "region",
            Tier::LocalPop => "local",
            Tier::Fallback => "fallback",
        }
    }
}

/// The largest score the RTT term adds (see the module documentation): half
/// the distance between two tiers.
pub const RTT_TERM_MAX: f64 = 50.0;

/// How scoring weighs what is not geography or load.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Scoring {
    /// Score added per millisecond of health-check RTT; 0 = off.
    pub rtt_weight: f64,
}

/// The live state selection reads for each backend: its open connections,
/// its measured RTT and whether its connects fail. A plain closure
/// `Fn(&Backend) -> u32` is a view of the connection count alone (RTT
/// unknown, no backend cooling), which is what tests inject; [`Atomics`]
/// reads the shared state in production.
pub trait LiveView {
    /// Open connections to `b` right now.
    fn active(&self, b: &Backend) -> u32;
    /// `b`'s health-check RTT in microseconds; 0 = not measured.
    fn rtt_us(&self, _b: &Backend) -> u32 {
        0
    }
    /// `b`'s connects fail and its backoff has not passed: it goes behind
    /// every backend that is not cooling (see the module documentation).
    fn cooling(&self, _b: &Backend) -> bool {
        false
    }
}

impl<F: Fn(&Backend) -> u32> LiveView for F {
    fn active(&self, b: &Backend) -> u32 {
        self(b)
    }
}

/// The production [`LiveView`]: the backend's shared atomics, with backoffs
/// judged at the instant the caller read for this attempt (selection reads
/// no clock).
#[derive(Clone, Copy, Debug)]
pub struct Atomics {
    now: Instant,
    probes: bool,
}

impl Atomics {
    /// A view of the shared state at `now`, for a connection's first
    /// attempt: a failing backend whose backoff has passed competes
    /// normally (it is probed).
    pub fn at(now: Instant) -> Self {
        Atomics { now, probes: true }
    }

    /// The same for a retry: every failing backend counts as cooling, its
    /// backoff passed or not. A connection probes at most one failing
    /// backend, on its first attempt, so that when the backoffs of several
    /// dead backends end together, one client does not spend all its
    /// attempts probing them.
    pub fn without_probes(self) -> Self {
        Atomics {
            probes: false,
            ..self
        }
    }
}

impl LiveView for Atomics {
    fn active(&self, b: &Backend) -> u32 {
        b.active()
    }

    fn rtt_us(&self, b: &Backend) -> u32 {
        b.live.rtt_us()
    }

    fn cooling(&self, b: &Backend) -> bool {
        match self.probes {
            true => b.live.cooling(self.now),
            false => b.live.is_failing(),
        }
    }
}

/// Where the client is, as far as selection cares.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientGeo {
    /// The client's country, when the geo lookup found one.
    pub country: Option<Country>,
    /// The client's region, already resolved against the snapshot's interned
    /// regions (`None` when unknown or when no backend is in that region).
    pub region: Option<RegionId>,
}

/// The outcome of a selection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Choice {
    /// The chosen backend, an index into [`RoutingSnapshot::backends`].
    pub idx: BackendIdx,
    /// The tier of the chosen backend relative to the client.
    pub tier: Tier,
    /// True when the backend came from an affinity binding rather than from
    /// scoring.
    pub sticky: bool,
}

/// The tier of backend `b` for `client`, served from a POP in `local_region`.
///
/// A backend without a country never matches the country tier, nor does any
/// backend for a client whose country is unknown; likewise for regions.
pub fn tier_of(b: &Backend, client: &ClientGeo, local_region: Option<RegionId>) -> Tier {
    if b.country.is_some() && b.country == client.country {
        Tier::Country
    } else if client.region == Some(b.region) {
        Tier::Region
    } else if local_region == Some(b.region) {
        Tier::LocalPop
    } else {
        Tier::Fallback
    }
}

/// True when `b`, with `active` open connections, may take a new one: it is
/// healthy and below its hard limit (a hard limit of 0 means unlimited).
/// Whether it was already tried for this connection is the caller's concern.
pub fn eligible(b: &Backend, active: u32) -> bool {
    b.healthy && b.under_hard_limit(active)
}

/// The score of `b` in `tier` with `active` open connections; lowest wins.
/// `soft_limit` and `weight` are at least 1 in snapshots built by
/// `SnapshotBuilder`; the `max(1)` only guards hand-built backends against a
/// division by zero.
fn score(b: &Backend, tier: Tier, active: u32) -> f64 {
    let load = f64::from(active) / f64::from(b.soft_limit.max(1));
    f64::from(tier as u8) * 100.0 + load / f64::from(b.weight.max(1))
}

/// The RTT term of the score (see the module documentation).
fn rtt_term(rtt_us: u32, weight: f64) -> f64 {
    (weight * f64::from(rtt_us) / 1000.0).min(RTT_TERM_MAX)
}

/// Picks the best backend among `candidates` for `client`, or `None` when no
/// candidate is eligible.
///
/// Skips candidates that are in `exclude`, unhealthy, or at their hard limit
/// (as counted by `active`), and indices out of range for `snap`. Among the
/// rest, the lowest score wins (see the module documentation) and ties go to
/// the first in `candidates` order. `active` is called at most once per
/// candidate, only for healthy, non-excluded ones. The returned choice is
/// never sticky.
pub fn pick(
    snap: &RoutingSnapshot,
    candidates: &[BackendIdx],
    client: &ClientGeo,
    local_region: Option<RegionId>,
    exclude: &[BackendIdx],
    active: impl Fn(&Backend) -> u32,
) -> Option<Choice> {
    pick_scored(
        snap,
        candidates,
        client,
        local_region,
        exclude,
        Scoring::default(),
        &active,
    )
}

/// [`pick`] with the RTT tie-break of `scoring`, and with cooling backends
/// behind all others (see the module documentation); `live` is read at most
/// once per eligible candidate for its count and whether it cools, and for
/// its RTT only when `scoring.rtt_weight` is positive.
pub fn pick_scored(
    snap: &RoutingSnapshot,
    candidates: &[BackendIdx],
    client: &ClientGeo,
    local_region: Option<RegionId>,
    exclude: &[BackendIdx],
    scoring: Scoring,
    live: &impl LiveView,
) -> Option<Choice> {
    let use_rtt = scoring.rtt_weight > 0.0;
    // The best backend that is not cooling, and the best that is: the
    // second only counts when there is no first.
    let mut best: Option<(f64, Choice)> = None;
    let mut best_cooling: Option<(f64, Choice)> = None;
    for &idx in candidates {
        if exclude.contains(&idx) {
            continue;
        }
        let Some(b) = snap.backends.get(idx as usize) else {
            continue;
        };
        if !b.healthy {
            continue;
        }
        let n = live.active(b);
        if !eligible(b, n) {
            continue;
        }
        let tier = tier_of(b, client, local_region);
        let mut s = score(b, tier, n);
        if use_rtt {
            s += rtt_term(live.rtt_us(b), scoring.rtt_weight);
        }
        let slot = match live.cooling(b) {
            false => &mut best,
            true => &mut best_cooling,
        };
        // Strictly lower: on a tie the earlier candidate stays.
        if slot.as_ref().is_none_or(|(bs, _)| s < *bs) {
            *slot = Some((
                s,
                Choice {
                    idx,
                    tier,
                    sticky: false,
                },
            ));
        }
    }
    best.or(best_cooling).map(|(_, c)| c)
}

/// Selects a backend for a connection from `client_ip`: affinity first, then
/// [`pick`].
///
/// 1. If `affinity` holds a live binding for `client_ip` (which refreshes its
///    sliding TTL, see [`AffinityTable::lookup`]) and the bound backend id
///    still exists in `snap`, is in `candidates`, is not in `exclude`, is
///    [`eligible`] and is not cooling ([`LiveView::cooling`]), that backend
///    is returned with `sticky: true`, even if another backend now scores
///    better.
/// 2. Otherwise a binding that was found is forgotten (it points at a backend
///    that is gone, not serving this listener, unhealthy, full, failing its
///    connects, or that just failed this connection), and [`pick`] chooses
///    (which may choose a cooling backend again, when it is all there is). A successful pick binds
///    `client_ip` to the chosen backend's id, replacing any binding. If pick
///    finds nothing, `None` is returned and the client is left unbound.
///
/// Retries need no special case: the caller passes the backends that already
/// failed for this connection in `exclude`. A binding to one of them is
/// unusable by rule 1, so it is dropped and the client is rebound to the new
/// choice — a backend that failed to connect does not keep the client. A
/// binding to a backend not in `exclude` is still honoured on a retry.
///
/// Affinity is keyed by client address only, not by app: a client using two
/// listeners whose candidate sets do not overlap is rebound on each switch.
///
/// Like [`pick`], this does no I/O and reads no clock (`now` is passed in); it
/// allocates only when the affinity table has to grow.
#[allow(clippy::too_many_arguments)]
pub fn route(
    snap: &RoutingSnapshot,
    candidates: &[BackendIdx],
    client_ip: IpAddr,
    client: &ClientGeo,
    local_region: Option<RegionId>,
    exclude: &[BackendIdx],
    affinity: &mut AffinityTable,
    now: Instant,
    active: impl Fn(&Backend) -> u32,
) -> Option<Choice> {
    route_scored(
        snap,
        candidates,
        client_ip,
        client,
        local_region,
        exclude,
        affinity,
        now,
        Scoring::default(),
        &active,
    )
}

/// [`route`] with [`pick_scored`]'s scoring for fresh picks (a sticky
/// binding is kept whatever its RTT).
#[allow(clippy::too_many_arguments)]
pub fn route_scored(
    snap: &RoutingSnapshot,
    candidates: &[BackendIdx],
    client_ip: IpAddr,
    client: &ClientGeo,
    local_region: Option<RegionId>,
    exclude: &[BackendIdx],
    affinity: &mut AffinityTable,
    now: Instant,
    scoring: Scoring,
    live: &impl LiveView,
) -> Option<Choice> {
    // The bound backend's index, found while the id is borrowed from the
    // table (no refcount traffic on a returning client's path).
    if let Some(bound) = affinity.lookup(client_ip, now).map(|id| snap.find(id)) {
        let usable = bound.filter(|&idx| {
            candidates.contains(&idx) && !exclude.contains(&idx) && {
                let b = snap.backend(idx);
                b.healthy && eligible(b, live.active(b)) && !live.cooling(b)
            }
        });
        if let Some(idx) = usable {
            return Some(Choice {
                idx,
                tier: tier_of(snap.backend(idx), client, local_region),
                sticky: true,
            });
        }
        affinity.forget(client_ip);
    }
    let choice = pick_scored(
        snap,
        candidates,
        client,
        local_region,
        exclude,
        scoring,
        live,
    )?;
    affinity.bind(
        client_ip,
        std::sync::Arc::clone(&snap.backend(choice.idx).id),
        now,
    );
    Some(choice)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::affinity::AffinityTable;
    use crate::snapshot::{BackendRecord, SnapshotBuilder};
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::time::Duration;

    /// A healthy backend record: weight 1, soft limit 100, hard limit 0
    /// (unlimited). Tests adjust fields as needed.
    fn rec(id: &str, app: &str, region: &str, country: Option<&str>) -> BackendRecord {
        BackendRecord {
            id: id.into(),
            app: app.into(),
            region: region.into(),
            country: country.map(Into::into),
            ip: "10.0.0.1".into(),
            port: 8080,
            healthy: true,
            weight: 1,
            soft_limit: 100,
            hard_limit: 0,
            deleted: false,
        }
    }

    fn snap(records: &[BackendRecord]) -> RoutingSnapshot {
        let built = SnapshotBuilder::new().build(records);
        assert!(built.skipped.is_empty(), "{:?}", built.skipped);
        built.snapshot
    }

    /// A load function from `(id, active)` pairs; unlisted backends are idle.
    fn loads<'a>(table: &'a [(&'a str, u32)]) -> impl Fn(&Backend) -> u32 + 'a {
        move |b| {
            table
                .iter()
                .find(|(id, _)| *id == &*b.id)
                .map_or(0, |&(_, n)| n)
        }
    }

    fn idle(_: &Backend) -> u32 {
        0
    }

    fn client(s: &RoutingSnapshot, country: Option<&str>, region: Option<&str>) -> ClientGeo {
        ClientGeo {
            country: country.and_then(Country::parse),
            region: region.and_then(|r| s.region_id(r)),
        }
    }

    fn id_of(s: &RoutingSnapshot, c: Option<Choice>) -> Option<&str> {
        c.map(|c| &*s.backend(c.idx).id)
    }

    /// Picks among all backends of `s` and returns the chosen id.
    fn pick_all<'s>(
        s: &'s RoutingSnapshot,
        geo: &ClientGeo,
        local: Option<&str>,
        exclude: &[BackendIdx],
        active: impl Fn(&Backend) -> u32,
    ) -> Option<&'s str> {
        let local = local.and_then(|r| s.region_id(r));
        id_of(s, pick(s, s.candidates(None), geo, local, exclude, active))
    }

    // ---- tiers ----------------------------------------------------------

    #[test]
    fn tier_of_classifies_country_region_local_and_fallback() {
        let s = snap(&[
            rec("br", "web", "sa", Some("BR")),
            rec("ar", "web", "sa", Some("AR")),
            rec("de", "web", "eu", Some("DE")),
            rec("us", "web", "us", Some("US")),
            rec("nocountry", "web", "us", None),
        ]);
        let geo = client(&s, Some("BR"), Some("sa"));
        let local = s.region_id("eu");
        let tier = |id: &str| tier_of(s.backend(s.find(id).unwrap()), &geo, local);
        assert_eq!(tier("br"), Tier::Country);
        assert_eq!(tier("ar"), Tier::Region);
        assert_eq!(tier("de"), Tier::LocalPop);
        assert_eq!(tier("us"), Tier::Fallback);
        assert_eq!(tier("nocountry"), Tier::Fallback);

        // A client with no known country never lands in the country tier,
        // even next to a backend with no country either.
        let unknown = ClientGeo::default();
        let b = s.backend(s.find("nocountry").unwrap());
        assert_eq!(tier_of(b, &unknown, None), Tier::Fallback);
        assert_eq!(tier_of(b, &unknown, s.region_id("us")), Tier::LocalPop);
    }

    #[test]
    fn country_tier_beats_region_tier_listed_first_and_less_loaded() {
        let s = snap(&[
            rec("region", "web", "sa", Some("AR")),
            rec("country", "web", "sa", Some("BR")),
        ]);
        let geo = client(&s, Some("BR"), Some("sa"));
        let load = loads(&[("region", 0), ("country", 90)]);
        let c = pick(&s, s.candidates(None), &geo, None, &[], load).unwrap();
        assert_eq!(&*s.backend(c.idx).id, "country");
        assert_eq!(c.tier, Tier::Country);
        assert!(!c.sticky);
    }

    #[test]
    fn region_tier_beats_local_pop_tier() {
        let s = snap(&[
            rec("local", "web", "eu", Some("DE")),
            rec("region", "web", "sa", Some("AR")),
        ]);
        let geo = client(&s, Some("BR"), Some("sa"));
        let load = loads(&[("region", 90)]);
        assert_eq!(pick_all(&s, &geo, Some("eu"), &[], load), Some("region"));
    }

    #[test]
    fn local_pop_tier_beats_fallback() {
        let s = snap(&[
            rec("far", "web", "us", Some("US")),
            rec("local", "web", "eu", Some("DE")),
        ]);
        let geo = client(&s, Some("BR"), Some("sa"));
        let load = loads(&[("local", 90)]);
        assert_eq!(pick_all(&s, &geo, Some("eu"), &[], load), Some("local"));
        // Without a local region both are fallback and the idle one wins.
        assert_eq!(
            pick_all(&s, &geo, None, &[], loads(&[("local", 90)])),
            Some("far")
        );
    }

    #[test]
    fn fallback_is_picked_when_nothing_closer_exists() {
        let s = snap(&[rec("far", "web", "us", Some("US"))]);
        let geo = client(&s, Some("BR"), None);
        let c = pick(&s, s.candidates(None), &geo, None, &[], idle).unwrap();
        assert_eq!(c.tier, Tier::Fallback);
    }

    #[test]
    fn overloaded_country_backend_still_beats_idle_region_backend() {
        // Country tier at 150% of its soft limit scores 0 + 1.5; the idle
        // region backend scores 100 + 0.
        let s = snap(&[
            rec("region", "web", "sa", Some("AR")),
            rec("country", "web", "sa", Some("BR")),
        ]);
        let geo = client(&s, Some("BR"), Some("sa"));
        let load = loads(&[("country", 150), ("region", 0)]);
        assert_eq!(pick_all(&s, &geo, None, &[], load), Some("country"));
    }

    #[test]
    fn load_past_a_hundred_soft_limits_lets_the_next_tier_win() {
        // The original formula: 0 + 101 > 100 + 0. Documents the edge of
        // "tier always wins".
        let mut country = rec("country", "web", "sa", Some("BR"));
        country.soft_limit = 1;
        let s = snap(&[country, rec("region", "web", "sa", Some("AR"))]);
        let geo = client(&s, Some("BR"), Some("sa"));
        assert_eq!(
            pick_all(&s, &geo, None, &[], loads(&[("country", 99)])),
            Some("country")
        );
        assert_eq!(
            pick_all(&s, &geo, None, &[], loads(&[("country", 101)])),
            Some("region")
        );
    }

    // ---- load within a tier ----------------------------------------------

    #[test]
    fn lower_load_wins_within_a_tier() {
        let s = snap(&[
            rec("a", "web", "sa", Some("BR")),
            rec("b", "web", "sa", Some("BR")),
        ]);
        let geo = client(&s, Some("BR"), Some("sa"));
        assert_eq!(
            pick_all(&s, &geo, None, &[], loads(&[("a", 10), ("b", 5)])),
            Some("b")
        );
        assert_eq!(
            pick_all(&s, &geo, None, &[], loads(&[("a", 5), ("b", 10)])),
            Some("a")
        );
    }

    #[test]
    fn load_is_relative_to_soft_limit() {
        let mut small = rec("small", "web", "sa", None);
        small.soft_limit = 10;
        let big = rec("big", "web", "sa", None); // soft limit 100
        let s = snap(&[small, big]);
        let geo = ClientGeo::default();
        // small: 5/10 = 0.5; big: 40/100 = 0.4.
        assert_eq!(
            pick_all(&s, &geo, None, &[], loads(&[("small", 5), ("big", 40)])),
            Some("big")
        );
    }

    #[test]
    fn weight_halves_the_load_term() {
        let light = rec("light", "web", "sa", None);
        let mut heavy = rec("heavy", "web", "sa", None);
        let geo = ClientGeo::default();
        // light: 60/100/1 = 0.6; heavy: 100/100/w.
        let load = [("light", 60), ("heavy", 100)];
        let s1 = snap(&[light.clone(), heavy.clone()]);
        assert_eq!(pick_all(&s1, &geo, None, &[], loads(&load)), Some("light"));
        heavy.weight = 2; // 100/100/2 = 0.5 < 0.6
        let s2 = snap(&[light, heavy]);
        assert_eq!(pick_all(&s2, &geo, None, &[], loads(&load)), Some("heavy"));
    }

    #[test]
    fn equal_scores_go_to_the_first_candidate() {
        let s = snap(&[rec("a", "web", "sa", None), rec("b", "web", "sa", None)]);
        let geo = ClientGeo::default();
        let c = |cands: &[BackendIdx]| id_of(&s, pick(&s, cands, &geo, None, &[], idle));
        assert_eq!(c(&[0, 1]), Some("a"));
        assert_eq!(c(&[1, 0]), Some("b"));
    }

    // ---- RTT tie-break ------------------------------------------------------

    /// A view with fixed loads and RTTs (µs) by id.
    struct Fixed<'a>(&'a [(&'a str, u32, u32)]);

    impl LiveView for Fixed<'_> {
        fn active(&self, b: &Backend) -> u32 {
            self.0.iter().find(|r| r.0 == &*b.id).map_or(0, |r| r.1)
        }
        fn rtt_us(&self, b: &Backend) -> u32 {
            self.0.iter().find(|r| r.0 == &*b.id).map_or(0, |r| r.2)
        }
    }

    fn scored(s: &RoutingSnapshot, geo: &ClientGeo, weight: f64, view: &Fixed) -> Option<String> {
        let scoring = Scoring { rtt_weight: weight };
        let c = pick_scored(s, s.candidates(None), geo, None, &[], scoring, view);
        id_of(s, c).map(str::to_string)
    }

    #[test]
    fn rtt_breaks_ties_within_a_tier_only_when_weighted() {
        let s = snap(&[
            rec("slow", "web", "sa", Some("BR")),
            rec("fast", "web", "sa", Some("BR")),
            rec("far", "web", "us", None),
        ]);
        let geo = client(&s, Some("BR"), Some("sa"));
        let view = Fixed(&[("slow", 0, 40_000), ("fast", 0, 2_000), ("far", 0, 1)]);
        // Off: exactly today's scoring (table order on a tie).
        assert_eq!(scored(&s, &geo, 0.0, &view).as_deref(), Some("slow"));
        assert_eq!(
            scored(&s, &geo, 0.0, &view),
            pick_all(&s, &geo, None, &[], idle).map(str::to_string)
        );
        // On: the lower RTT wins the tie.
        assert_eq!(scored(&s, &geo, 0.01, &view).as_deref(), Some("fast"));
        // A weight large enough to cap both terms never lets a far tier
        // (RTT 1 µs) win over a near one.
        assert_eq!(scored(&s, &geo, 1.0, &view).as_deref(), Some("fast"));
        assert_ne!(scored(&s, &geo, 1e9, &view).as_deref(), Some("far"));
    }

    #[test]
    fn rtt_weighs_against_load_by_the_weight() {
        let s = snap(&[
            rec("busy-near", "web", "sa", Some("BR")),
            rec("idle-slow", "web", "sa", Some("BR")),
        ]);
        let geo = client(&s, Some("BR"), Some("sa"));
        // busy-near: load 50/100 = 0.5, RTT 1 ms; idle-slow: load 0, RTT 30 ms.
        let view = Fixed(&[("busy-near", 50, 1_000), ("idle-slow", 0, 30_000)]);
        // 0.01/ms: 0.5 + 0.01 vs 0.3 → idle-slow.
        assert_eq!(scored(&s, &geo, 0.01, &view).as_deref(), Some("idle-slow"));
        // 0.1/ms: 0.5 + 0.1 vs 3.0 → busy-near.
        assert_eq!(scored(&s, &geo, 0.1, &view).as_deref(), Some("busy-near"));
    }

    #[test]
    fn unmeasured_rtt_adds_nothing() {
        assert_eq!(rtt_term(0, 5.0), 0.0);
        assert_eq!(rtt_term(10_000, 0.01), 0.1);
        assert_eq!(rtt_term(u32::MAX, 1.0), RTT_TERM_MAX);
    }

    // ---- exclusions -------------------------------------------------------

    #[test]
    fn unhealthy_backends_are_never_picked() {
        let mut sick = rec("sick", "web", "sa", Some("BR"));
        sick.healthy = false;
        let s = snap(&[sick.clone(), rec("far", "web", "us", None)]);
        let geo = client(&s, Some("BR"), Some("sa"));
        assert_eq!(pick_all(&s, &geo, None, &[], idle), Some("far"));
        let only_sick = snap(&[sick]);
        assert_eq!(pick_all(&only_sick, &geo, None, &[], idle), None);
    }

    #[test]
    fn backend_at_hard_limit_is_excluded_and_one_below_is_not() {
        let mut near = rec("near", "web", "sa", Some("BR"));
        near.hard_limit = 10;
        let s = snap(&[near, rec("far", "web", "us", None)]);
        let geo = client(&s, Some("BR"), Some("sa"));
        assert_eq!(
            pick_all(&s, &geo, None, &[], loads(&[("near", 9)])),
            Some("near")
        );
        assert_eq!(
            pick_all(&s, &geo, None, &[], loads(&[("near", 10)])),
            Some("far")
        );
        assert_eq!(
            pick_all(&s, &geo, None, &[], loads(&[("near", 11)])),
            Some("far")
        );
    }

    #[test]
    fn load_is_read_only_for_healthy_non_excluded_candidates() {
        let mut sick = rec("sick", "web", "sa", None);
        sick.healthy = false;
        let s = snap(&[
            sick,
            rec("tried", "web", "sa", None),
            rec("ok", "web", "sa", None),
        ]);
        let asked = std::cell::RefCell::new(Vec::new());
        let active = |b: &Backend| {
            asked.borrow_mut().push(b.id.to_string());
            0
        };
        let tried = s.find("tried").unwrap();
        let c = pick(
            &s,
            s.candidates(None),
            &ClientGeo::default(),
            None,
            &[tried],
            active,
        );
        assert_eq!(id_of(&s, c), Some("ok"));
        assert_eq!(*asked.borrow(), ["ok"]);
    }

    #[test]
    fn hard_limit_zero_means_unlimited() {
        let s = snap(&[rec("only", "web", "sa", None)]); // hard_limit 0
        let geo = ClientGeo::default();
        assert_eq!(
            pick_all(&s, &geo, None, &[], loads(&[("only", u32::MAX)])),
            Some("only")
        );
    }

    #[test]
    fn eligible_requires_health_and_room_under_the_hard_limit() {
        let mut limited = rec("limited", "web", "sa", None);
        limited.hard_limit = 2;
        let mut sick = rec("sick", "web", "sa", None);
        sick.healthy = false;
        let s = snap(&[limited, sick, rec("free", "web", "sa", None)]);
        let b = |id| s.backend(s.find(id).unwrap());
        assert!(eligible(b("limited"), 1));
        assert!(!eligible(b("limited"), 2));
        assert!(!eligible(b("sick"), 0));
        assert!(eligible(b("free"), u32::MAX));
    }

    #[test]
    fn excluded_indices_are_skipped() {
        let s = snap(&[
            rec("best", "web", "sa", Some("BR")),
            rec("next", "web", "sa", None),
            rec("last", "web", "us", None),
        ]);
        let geo = client(&s, Some("BR"), Some("sa"));
        let best = s.find("best").unwrap();
        let next = s.find("next").unwrap();
        let last = s.find("last").unwrap();
        assert_eq!(pick_all(&s, &geo, None, &[], idle), Some("best"));
        assert_eq!(pick_all(&s, &geo, None, &[best], idle), Some("next"));
        assert_eq!(pick_all(&s, &geo, None, &[best, next], idle), Some("last"));
        assert_eq!(pick_all(&s, &geo, None, &[best, next, last], idle), None);
    }

    #[test]
    fn empty_candidates_yield_none() {
        let s = snap(&[rec("a", "web", "sa", None)]);
        assert_eq!(pick(&s, &[], &ClientGeo::default(), None, &[], idle), None);
        let empty = snap(&[]);
        assert_eq!(
            pick(
                &empty,
                empty.candidates(None),
                &ClientGeo::default(),
                None,
                &[],
                idle
            ),
            None
        );
    }

    #[test]
    fn out_of_range_candidate_is_skipped_not_a_panic() {
        let s = snap(&[rec("a", "web", "sa", None)]);
        let c = pick(&s, &[7, 0], &ClientGeo::default(), None, &[], idle);
        assert_eq!(id_of(&s, c), Some("a"));
    }

    #[test]
    fn candidates_restrict_the_pick_to_one_app() {
        let s = snap(&[
            rec("web-br", "web", "sa", Some("BR")),
            rec("api-us", "api", "us", None),
        ]);
        let geo = client(&s, Some("BR"), Some("sa"));
        let c = pick(&s, s.candidates(Some("api")), &geo, None, &[], idle);
        assert_eq!(id_of(&s, c), Some("api-us"));
        let c = pick(&s, s.candidates(Some("web")), &geo, None, &[], idle);
        assert_eq!(id_of(&s, c), Some("web-br"));
    }

    #[test]
    fn tier_names_and_order() {
        let names: Vec<_> = Tier::ALL.iter().map(|t| t.name()).collect();
        assert_eq!(names, ["country", "region", "local", "fallback"]);
        let discr: Vec<_> = Tier::ALL.iter().map(|&t| t as u8).collect();
        assert_eq!(discr, [0, 1, 2, 3]);
    }

    // ---- backends whose connects fail ---------------------------------------

    /// Records a failed connect to `id` at `at` on its shared live state.
    fn fail(s: &RoutingSnapshot, id: &str, at: Instant) {
        s.backend(s.find(id).unwrap()).live.mark_failing(at, at);
    }

    /// Picks among all backends of `s` as production does, with the live
    /// state (loads, backoffs) judged at `now`.
    fn pick_at<'s>(
        s: &'s RoutingSnapshot,
        geo: &ClientGeo,
        exclude: &[BackendIdx],
        now: Instant,
    ) -> Option<&'s str> {
        let c = pick_scored(
            s,
            s.candidates(None),
            geo,
            None,
            exclude,
            Scoring::default(),
            &Atomics::at(now),
        );
        id_of(s, c)
    }

    /// The QA report: three dead backends ahead of a good one in table order,
    /// `connect_attempts` = 3. Once each has failed a connect, new clients go
    /// to the good one first instead of trying the three dead ones again.
    #[test]
    fn backends_that_failed_to_connect_go_behind_the_one_that_works() {
        let s = snap(&[
            rec("dead1", "web", "sa", None),
            rec("dead2", "web", "sa", None),
            rec("dead3", "web", "sa", None),
            rec("good", "web", "sa", None),
        ]);
        let geo = client(&s, None, Some("sa"));
        let t0 = Instant::now();
        assert_eq!(pick_at(&s, &geo, &[], t0), Some("dead1"), "table order");
        for id in ["dead1", "dead2", "dead3"] {
            fail(&s, id, t0);
        }
        let soon = t0 + Duration::from_millis(10);
        assert_eq!(pick_at(&s, &geo, &[], soon), Some("good"));
    }

    /// A BR client, a backend in its country ("near") and one in another
    /// region ("far").
    fn near_and_far() -> (RoutingSnapshot, ClientGeo) {
        let s = snap(&[
            rec("near", "web", "sa", Some("BR")),
            rec("far", "web", "us", None),
        ]);
        let geo = client(&s, Some("BR"), Some("sa"));
        (s, geo)
    }

    #[test]
    fn a_cooling_backend_loses_to_a_working_one_in_a_farther_tier() {
        let (s, geo) = near_and_far();
        let t0 = Instant::now();
        assert_eq!(pick_at(&s, &geo, &[], t0), Some("near"));
        fail(&s, "near", t0);
        assert_eq!(pick_at(&s, &geo, &[], t0), Some("far"));
        // Even a loaded far backend beats it: it needs working, not idle.
        let busy = |b: &Backend| if &*b.id == "far" { 5_000 } else { 0 };
        struct Busy<'a, F>(&'a F, Instant);
        impl<F: Fn(&Backend) -> u32> LiveView for Busy<'_, F> {
            fn active(&self, b: &Backend) -> u32 {
                (self.0)(b)
            }
            fn cooling(&self, b: &Backend) -> bool {
                b.live.cooling(self.1)
            }
        }
        let c = pick_scored(
            &s,
            s.candidates(None),
            &geo,
            None,
            &[],
            Scoring::default(),
            &Busy(&busy, t0),
        );
        assert_eq!(id_of(&s, c), Some("far"));
    }

    #[test]
    fn a_cooling_backend_is_still_picked_when_nothing_else_is_left() {
        let mut sick = rec("sick", "web", "us", None);
        sick.healthy = false;
        let s = snap(&[
            rec("near", "web", "sa", Some("BR")),
            rec("tried", "web", "sa", None),
            sick,
        ]);
        let geo = client(&s, Some("BR"), Some("sa"));
        let t0 = Instant::now();
        fail(&s, "near", t0);
        let tried = s.find("tried").unwrap();
        // The only other eligible one was tried for this connection, and an
        // unhealthy one is no alternative.
        assert_eq!(pick_at(&s, &geo, &[tried], t0), Some("near"));
        let near = s.find("near").unwrap();
        assert_eq!(pick_at(&s, &geo, &[tried, near], t0), None);
    }

    #[test]
    fn among_cooling_backends_the_score_decides() {
        let s = snap(&[
            rec("far", "web", "us", None),
            rec("near", "web", "sa", Some("BR")),
        ]);
        let geo = client(&s, Some("BR"), Some("sa"));
        let t0 = Instant::now();
        fail(&s, "far", t0);
        fail(&s, "near", t0);
        assert_eq!(pick_at(&s, &geo, &[], t0), Some("near"));
    }

    #[test]
    fn a_cooling_backend_is_picked_again_once_its_backoff_has_passed() {
        use crate::backoff::{backoff, BACKOFF_FIRST};
        let (s, geo) = near_and_far();
        let t0 = Instant::now();
        fail(&s, "near", t0);
        let ms = Duration::from_millis(1);
        assert_eq!(pick_at(&s, &geo, &[], t0 + BACKOFF_FIRST - ms), Some("far"));
        // Backoff over: the next client probes it.
        let probe = t0 + BACKOFF_FIRST;
        assert_eq!(pick_at(&s, &geo, &[], probe), Some("near"));
        // The probe fails too: twice as long this time.
        fail(&s, "near", probe);
        let again = probe + backoff(2);
        assert_eq!(pick_at(&s, &geo, &[], again - ms), Some("far"));
        assert_eq!(pick_at(&s, &geo, &[], again), Some("near"));
        // It connects: no longer failing, first again at once.
        assert!(s.backend(s.find("near").unwrap()).live.mark_connecting());
        fail(&s, "far", again);
        assert_eq!(pick_at(&s, &geo, &[], again), Some("near"));
    }

    #[test]
    fn a_retry_does_not_probe_another_failing_backend() {
        use crate::backoff::BACKOFF_FIRST;
        let s = snap(&[
            rec("dead1", "web", "sa", None),
            rec("dead2", "web", "sa", None),
            rec("good", "web", "sa", None),
        ]);
        let geo = client(&s, None, Some("sa"));
        let t0 = Instant::now();
        fail(&s, "dead1", t0);
        fail(&s, "dead2", t0);
        // Both backoffs end together: the first attempt probes one...
        let t = t0 + BACKOFF_FIRST;
        assert_eq!(pick_at(&s, &geo, &[], t), Some("dead1"));
        // ...and when that fails, the retry goes to the one that works.
        let dead1 = s.find("dead1").unwrap();
        let retry = |exclude: &[BackendIdx]| {
            let c = pick_scored(
                &s,
                s.candidates(None),
                &geo,
                None,
                exclude,
                Scoring::default(),
                &Atomics::at(t).without_probes(),
            );
            id_of(&s, c)
        };
        assert_eq!(retry(&[dead1]), Some("good"));
        // With nothing else left, a retry still tries a failing one.
        let good = s.find("good").unwrap();
        assert_eq!(retry(&[dead1, good]), Some("dead2"));
    }

    #[test]
    fn a_binding_to_a_cooling_backend_is_replaced() {
        let mut e = Env::new(two_web());
        let t = Duration::ZERO;
        e.table.bind(v4(1), "a".into(), e.t0);
        fail(&e.s, "a", e.t0);
        let route_at = |e: &mut Env, at: Duration| {
            let c = route_scored(
                &e.s,
                e.s.candidates(Some("web")),
                v4(1),
                &e.geo,
                None,
                &[],
                &mut e.table,
                e.t0 + at,
                Scoring::default(),
                &Atomics::at(e.t0 + at),
            )?;
            Some((e.s.backend(c.idx).id.to_string(), c.sticky))
        };
        assert_eq!(route_at(&mut e, t), got("b", false));
        assert_eq!(e.bound(v4(1), t).as_deref(), Some("b"));
        // "b" fails too: a cooling binding is dropped even when the only
        // alternative cools as well; the score decides between them.
        fail(&e.s, "b", e.t0);
        assert_eq!(route_at(&mut e, t), got("a", false));
    }

    // ---- route: affinity in front of pick -----------------------------------

    const TTL: Duration = Duration::from_secs(60);

    fn v4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(203, 0, 113, last))
    }

    /// Two BR backends for app "web" and one for "api"; "a" comes first.
    fn two_web() -> RoutingSnapshot {
        snap(&[
            rec("a", "web", "sa", Some("BR")),
            rec("b", "web", "sa", Some("BR")),
            rec("api", "api", "sa", Some("BR")),
        ])
    }

    struct Env {
        s: RoutingSnapshot,
        geo: ClientGeo,
        table: AffinityTable,
        t0: Instant,
    }

    impl Env {
        fn new(s: RoutingSnapshot) -> Self {
            let geo = client(&s, Some("BR"), Some("sa"));
            Env {
                s,
                geo,
                table: AffinityTable::new(TTL),
                t0: Instant::now(),
            }
        }

        fn route(
            &mut self,
            ip: IpAddr,
            app: &str,
            exclude: &[&str],
            at: Duration,
            active: impl Fn(&Backend) -> u32,
        ) -> Option<(String, bool)> {
            let exclude: Vec<BackendIdx> =
                exclude.iter().map(|id| self.s.find(id).unwrap()).collect();
            let c = route(
                &self.s,
                self.s.candidates(Some(app)),
                ip,
                &self.geo,
                None,
                &exclude,
                &mut self.table,
                self.t0 + at,
                active,
            )?;
            Some((self.s.backend(c.idx).id.to_string(), c.sticky))
        }

        fn bound(&mut self, ip: IpAddr, at: Duration) -> Option<String> {
            self.table.lookup(ip, self.t0 + at).map(|id| id.to_string())
        }
    }

    fn got(id: &str, sticky: bool) -> Option<(String, bool)> {
        Some((id.to_string(), sticky))
    }

    #[test]
    fn first_route_picks_and_binds_the_client() {
        let mut e = Env::new(two_web());
        let busy_a = loads(&[("a", 50)]);
        assert_eq!(
            e.route(v4(1), "web", &[], Duration::ZERO, &busy_a),
            got("b", false)
        );
        assert_eq!(e.bound(v4(1), Duration::ZERO).as_deref(), Some("b"));
        assert_eq!(e.table.len(), 1);
    }

    #[test]
    fn bound_client_keeps_its_backend_when_another_is_now_better() {
        let mut e = Env::new(two_web());
        assert_eq!(
            e.route(v4(1), "web", &[], Duration::ZERO, loads(&[("a", 50)])),
            got("b", false)
        );
        // Now "a" is idle and "b" loaded: a fresh pick would take "a".
        let c = e.route(
            v4(1),
            "web",
            &[],
            Duration::from_secs(1),
            loads(&[("b", 50)]),
        );
        assert_eq!(c, got("b", true));
        // Another client is not affected by that binding.
        let c = e.route(
            v4(2),
            "web",
            &[],
            Duration::from_secs(1),
            loads(&[("b", 50)]),
        );
        assert_eq!(c, got("a", false));
    }

    #[test]
    fn sticky_choice_reports_the_bound_backends_tier() {
        let s = snap(&[
            rec("far", "web", "us", None),
            rec("near", "web", "sa", Some("BR")),
        ]);
        let mut e = Env::new(s);
        e.table.bind(v4(1), "far".into(), e.t0);
        let far = e.s.find("far").unwrap();
        let c = route(
            &e.s,
            e.s.candidates(Some("web")),
            v4(1),
            &e.geo,
            None,
            &[],
            &mut e.table,
            e.t0,
            idle,
        );
        assert_eq!(
            c,
            Some(Choice {
                idx: far,
                tier: Tier::Fallback,
                sticky: true
            })
        );
    }

    #[test]
    fn binding_expires_after_ttl_and_a_fresh_pick_rebinds() {
        let mut e = Env::new(two_web());
        e.route(v4(1), "web", &[], Duration::ZERO, loads(&[("a", 50)]));
        let later = TTL + Duration::from_millis(1);
        let c = e.route(v4(1), "web", &[], later, loads(&[("b", 50)]));
        assert_eq!(c, got("a", false));
        assert_eq!(e.bound(v4(1), later).as_deref(), Some("a"));
    }

    #[test]
    fn sticky_hits_slide_the_ttl() {
        let mut e = Env::new(two_web());
        e.route(v4(1), "web", &[], Duration::ZERO, loads(&[("a", 50)]));
        let better_a = loads(&[("b", 50)]);
        // Each hit comes within the TTL of the previous one, but the last is
        // well past the TTL of the first binding.
        let step = TTL - Duration::from_secs(1);
        for k in 1..=3 {
            assert_eq!(
                e.route(v4(1), "web", &[], step * k, &better_a),
                got("b", true)
            );
        }
        let idle_too_long = step * 3 + TTL + Duration::from_millis(1);
        assert_eq!(
            e.route(v4(1), "web", &[], idle_too_long, &better_a),
            got("a", false)
        );
    }

    #[test]
    fn binding_to_an_unhealthy_backend_is_replaced() {
        let mut e = Env::new(two_web());
        e.route(v4(1), "web", &[], Duration::ZERO, loads(&[("a", 50)]));
        let mut b = rec("b", "web", "sa", Some("BR"));
        b.healthy = false;
        e.s = snap(&[rec("a", "web", "sa", Some("BR")), b]);
        let t = Duration::from_secs(1);
        assert_eq!(e.route(v4(1), "web", &[], t, idle), got("a", false));
        assert_eq!(e.bound(v4(1), t).as_deref(), Some("a"));
    }

    #[test]
    fn binding_to_a_backend_at_its_hard_limit_is_replaced() {
        let mut a = rec("a", "web", "sa", Some("BR"));
        a.hard_limit = 10;
        let mut b = rec("b", "web", "sa", Some("BR"));
        b.hard_limit = 10;
        let mut e = Env::new(snap(&[a, b]));
        e.route(v4(1), "web", &[], Duration::ZERO, loads(&[("a", 5)]));
        let t = Duration::from_secs(1);
        // "b" has room: still sticky even though "a" is now idle.
        assert_eq!(
            e.route(v4(1), "web", &[], t, loads(&[("b", 9)])),
            got("b", true)
        );
        // "b" full: fresh pick, rebind.
        assert_eq!(
            e.route(v4(1), "web", &[], t, loads(&[("b", 10)])),
            got("a", false)
        );
        assert_eq!(e.bound(v4(1), t).as_deref(), Some("a"));
    }

    #[test]
    fn binding_to_a_backend_removed_from_the_snapshot_is_replaced() {
        let mut e = Env::new(two_web());
        e.route(v4(1), "web", &[], Duration::ZERO, loads(&[("a", 50)]));
        e.s = snap(&[rec("c", "web", "sa", None), rec("a", "web", "sa", None)]);
        let t = Duration::from_secs(1);
        assert_eq!(
            e.route(v4(1), "web", &[], t, loads(&[("c", 50)])),
            got("a", false)
        );
        assert_eq!(e.bound(v4(1), t).as_deref(), Some("a"));
    }

    #[test]
    fn binding_outside_the_candidates_is_replaced() {
        let mut e = Env::new(two_web());
        e.route(v4(1), "web", &[], Duration::ZERO, loads(&[("a", 50)]));
        let t = Duration::from_secs(1);
        assert_eq!(e.route(v4(1), "api", &[], t, idle), got("api", false));
        assert_eq!(e.bound(v4(1), t).as_deref(), Some("api"));
    }

    #[test]
    fn retry_drops_the_failed_binding_and_rebinds_to_the_new_choice() {
        let mut e = Env::new(two_web());
        let t = Duration::ZERO;
        assert_eq!(
            e.route(v4(1), "web", &[], t, loads(&[("b", 50)])),
            got("a", false)
        );
        // Connecting to "a" failed; the caller retries excluding it.
        assert_eq!(e.route(v4(1), "web", &["a"], t, idle), got("b", false));
        assert_eq!(e.bound(v4(1), t).as_deref(), Some("b"));
        // The next connection sticks to "b", not "a".
        assert_eq!(e.route(v4(1), "web", &[], t, idle), got("b", true));
    }

    #[test]
    fn retry_keeps_a_binding_that_is_not_excluded() {
        let mut e = Env::new(two_web());
        let t = Duration::ZERO;
        e.table.bind(v4(1), "b".into(), e.t0);
        assert_eq!(e.route(v4(1), "web", &["a"], t, idle), got("b", true));
    }

    #[test]
    fn unusable_binding_with_no_alternative_leaves_client_unbound() {
        let mut e = Env::new(two_web());
        let t = Duration::ZERO;
        e.table.bind(v4(1), "a".into(), e.t0);
        assert_eq!(e.route(v4(1), "web", &["a", "b"], t, idle), None);
        assert!(e.table.is_empty());
    }

    #[test]
    fn ttl_zero_disables_affinity_in_route() {
        let mut e = Env::new(two_web());
        e.table = AffinityTable::new(Duration::ZERO);
        let t = Duration::ZERO;
        assert_eq!(
            e.route(v4(1), "web", &[], t, loads(&[("a", 50)])),
            got("b", false)
        );
        assert!(e.table.is_empty());
        assert_eq!(
            e.route(v4(1), "web", &[], t, loads(&[("b", 50)])),
            got("a", false)
        );
    }

    #[test]
    fn ipv4_mapped_client_shares_the_binding_of_its_ipv4_form() {
        let mut e = Env::new(two_web());
        let t = Duration::ZERO;
        let mapped = IpAddr::V6(Ipv4Addr::new(203, 0, 113, 1).to_ipv6_mapped());
        assert_eq!(
            e.route(mapped, "web", &[], t, loads(&[("a", 50)])),
            got("b", false)
        );
        assert_eq!(
            e.route(v4(1), "web", &[], t, loads(&[("b", 50)])),
            got("b", true)
        );
        // A genuine IPv6 client is a different client.
        let v6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));
        assert_eq!(
            e.route(v6, "web", &[], t, loads(&[("b", 50)])),
            got("a", false)
        );
    }
}
