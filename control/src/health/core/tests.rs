//! The checker under a simulated clock: no sockets, no sleeps.

use super::*;
use crate::health::spec::CheckSettings;

fn settings(interval_ms: u64) -> Arc<CheckSettings> {
    Arc::new(CheckSettings {
        enabled: true,
        interval: Duration::from_millis(interval_ms),
        timeout: Duration::from_millis(interval_ms / 2),
        ..CheckSettings::default()
    })
}

fn target(id: &str, app: &str, s: &Arc<CheckSettings>) -> Target {
    Target {
        id: Arc::from(id),
        app: Arc::from(app),
        addr: "127.0.0.1:9".parse().unwrap(),
        settings: Arc::clone(s),
        live: Arc::new(BackendLive::default()),
    }
}

fn params(max_concurrent: usize) -> CheckerParams {
    CheckerParams {
        max_concurrent,
        jitter_percent: 10,
        circuit: Some(CircuitParams {
            failure_threshold: 2,
            success_threshold: 2,
            timeout: Duration::from_secs(10),
            max_timeout: Duration::from_secs(60),
        }),
        max_ejection_percent: 50,
    }
}

fn ok() -> CheckOutcome {
    CheckOutcome {
        ok: true,
        rtt: Some(Duration::from_millis(1)),
        error: None,
        local: false,
    }
}

fn fail() -> CheckOutcome {
    CheckOutcome {
        ok: false,
        rtt: None,
        error: Some("connection refused".into()),
        local: false,
    }
}

fn drain(c: &mut Checker) -> Vec<(String, Change)> {
    std::iter::from_fn(|| c.poll_transition())
        .map(|t| (t.id.to_string(), t.change))
        .collect()
}

#[test]
fn first_checks_spread_over_one_interval_and_later_ones_keep_their_jitter() {
    let t0 = Instant::now();
    let s = settings(5000);
    let mut c = Checker::new(params(100_000), 7);
    c.set_targets(
        t0,
        (0..10_000)
            .map(|i| target(&format!("b{i}"), "web", &s))
            .collect(),
    );
    // Per 500 ms slice of the first interval, about a tenth start: no burst.
    let mut per_slice = Vec::new();
    for slice in 1..=10u32 {
        let now = t0 + Duration::from_millis(500) * slice;
        let mut n = 0;
        while let Some(order) = c.poll_check(now) {
            c.on_result(now, &order.id, ok());
            n += 1;
        }
        per_slice.push(n);
    }
    assert_eq!(per_slice.iter().sum::<usize>(), 10_000, "{per_slice:?}");
    assert!(
        per_slice.iter().all(|&n| (800..=1200).contains(&n)),
        "{per_slice:?}"
    );
    // Nothing is due again before interval × (1 - jitter) after its check.
    let next = c.poll_timeout().unwrap();
    assert!(next >= t0 + Duration::from_millis(500) + Duration::from_millis(4500));
}

#[test]
fn concurrency_is_bounded_and_results_free_slots() {
    let t0 = Instant::now();
    let s = settings(1000);
    let mut c = Checker::new(params(8), 1);
    c.set_targets(
        t0,
        (0..100)
            .map(|i| target(&format!("b{i}"), "web", &s))
            .collect(),
    );
    let late = t0 + Duration::from_secs(2);
    let orders: Vec<_> = std::iter::from_fn(|| c.poll_check(late)).collect();
    assert_eq!(orders.len(), 8);
    assert_eq!(c.in_flight(), 8);
    assert!(c.poll_check(late).is_none());
    c.on_result(late, &orders[0].id, ok());
    assert!(c.poll_check(late).is_some());
    assert!(c.poll_check(late).is_none());
}

#[test]
fn passive_failure_jumps_the_queue_and_one_failed_check_confirms_it() {
    let t0 = Instant::now();
    let s = settings(5000);
    let mut c = Checker::new(params(4), 3);
    c.set_targets(t0, vec![target("a", "web", &s), target("b", "web", &s)]);
    // Just after start nothing is due yet (random offsets in 5 s)...
    let now = t0 + Duration::from_millis(1);
    while let Some(o) = c.poll_check(now) {
        c.on_result(now, &o.id, ok());
    }
    // ...but a client's failed connect asks for a check of "a" now.
    c.on_passive(now, "a", true, now);
    let order = c.poll_check(now).expect("an immediate check");
    assert_eq!(&*order.id, "a");
    c.on_result(now, &order.id, fail());
    assert_eq!(drain(&mut c), [("a".to_string(), Change::Down)]);
    let mut records = vec![record("a"), record("b")];
    c.apply(&mut records);
    assert_eq!((records[0].healthy, records[1].healthy), (false, true));
}

#[test]
fn a_failure_during_a_check_in_flight_asks_for_another_after_it() {
    let t0 = Instant::now();
    let s = settings(1000);
    let mut c = Checker::new(params(4), 3);
    c.set_targets(t0, vec![target("a", "web", &s)]);
    let later = t0 + Duration::from_secs(1);
    let o = c.poll_check(later).unwrap();
    c.on_passive(later, "a", true, later);
    assert!(
        c.poll_check(later).is_none(),
        "one check of a backend at a time"
    );
    c.on_result(later, &o.id, ok());
    assert_eq!(
        c.poll_check(later).map(|o| o.id.to_string()).as_deref(),
        Some("a")
    );
}

#[test]
fn a_flapping_backend_produces_no_transition() {
    let t0 = Instant::now();
    let s = settings(1000);
    let mut c = Checker::new(params(4), 9);
    c.set_targets(t0, vec![target("flap", "web", &s)]);
    let mut now = t0;
    for i in 0..200 {
        now += Duration::from_millis(1100);
        while let Some(o) = c.poll_check(now) {
            c.on_result(now, &o.id, if i % 2 == 0 { fail() } else { ok() });
        }
    }
    assert!(c.checks >= 150);
    assert!(drain(&mut c).is_empty());
}

#[test]
fn ejection_cap_keeps_half_the_app_in_rotation() {
    let t0 = Instant::now();
    let s = Arc::new(CheckSettings::default()); // active checks off
    let mut c = Checker::new(params(4), 5);
    let mut targets: Vec<_> = (0..4)
        .map(|i| target(&format!("w{i}"), "web", &s))
        .collect();
    targets.push(target("api0", "api", &s));
    c.set_targets(t0, targets);
    for id in ["w0", "w1", "w2", "w3", "api0"] {
        c.on_passive(t0, id, true, t0);
        c.on_passive(t0, id, true, t0);
    }
    let changes = drain(&mut c);
    let ejected: Vec<_> = changes
        .iter()
        .filter(|(_, ch)| matches!(ch, Change::Ejected(_)))
        .map(|(id, _)| id.as_str())
        .collect();
    // 50 % of web's 4 = 2; api's single backend may go (at least one).
    assert_eq!(ejected, ["w0", "w1", "api0"]);
    let capped: Vec<_> = changes
        .iter()
        .filter(|(_, ch)| *ch == Change::EjectionCapped)
        .map(|(id, _)| id.as_str())
        .collect();
    assert_eq!(capped, ["w2", "w3"]);
    // Nothing scheduled while checks are off, except the ejection timers.
    assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(10)));
}

#[test]
fn circuit_timer_half_opens_and_successes_close_with_probe_limit_in_between() {
    let t0 = Instant::now();
    let s = Arc::new(CheckSettings::default());
    let mut c = Checker::new(params(4), 5);
    let a = target("a", "web", &s);
    let live = Arc::clone(&a.live);
    c.set_targets(t0, vec![a, target("b", "web", &s)]);
    c.on_passive(t0, "a", true, t0);
    assert!(
        live.successes_watched(),
        "after a failure, successes matter"
    );
    c.on_passive(t0, "a", true, t0);
    assert!(matches!(drain(&mut c)[..], [(_, Change::Ejected(_))]));
    let t1 = t0 + Duration::from_secs(10);
    c.on_timers(t1 - Duration::from_millis(1));
    assert!(drain(&mut c).is_empty());
    c.on_timers(t1);
    assert_eq!(drain(&mut c), [("a".to_string(), Change::HalfOpen)]);
    let mut records = vec![record("a")];
    c.apply(&mut records);
    assert!(records[0].healthy);
    assert_eq!(
        records[0].hard_limit, 2,
        "probing: success_threshold connections"
    );
    c.on_passive(t1, "a", false, t1);
    c.on_passive(t1, "a", false, t1);
    assert_eq!(drain(&mut c), [("a".to_string(), Change::Closed)]);
    assert!(!live.successes_watched());
    let mut records = vec![record("a")];
    c.apply(&mut records);
    assert_eq!(records[0].hard_limit, 0);
}

/// QA: a connection opened before the ejection that ended while the
/// circuit was half-open decided it (a success closed it, a reset would
/// have reopened it). Only connections opened since the half-open do.
#[test]
fn only_connections_opened_since_the_half_open_decide_it() {
    let t0 = Instant::now();
    let s = Arc::new(CheckSettings::default());
    let mut c = Checker::new(params(4), 5);
    c.set_targets(t0, vec![target("a", "web", &s), target("b", "web", &s)]);
    let old = t0 - Duration::from_secs(60);
    c.on_passive(t0, "a", true, t0);
    c.on_passive(t0, "a", true, t0);
    assert!(matches!(drain(&mut c)[..], [(_, Change::Ejected(_))]));
    let t1 = t0 + Duration::from_secs(10);
    c.on_timers(t1);
    assert_eq!(drain(&mut c), [("a".to_string(), Change::HalfOpen)]);
    let later = t1 + Duration::from_secs(1);
    // Old connections end, well or badly: nothing changes.
    for failure in [false, false, true] {
        c.on_passive(later, "a", failure, old);
        c.on_passive(later, "a", failure, t0);
    }
    assert!(drain(&mut c).is_empty());
    assert_eq!(c.health("a").unwrap().0.circuit, CircuitState::HalfOpen);
    // Two probes opened since the half-open close it.
    c.on_passive(later, "a", false, t1);
    c.on_passive(later, "a", false, later);
    assert_eq!(drain(&mut c), [("a".to_string(), Change::Closed)]);
}

#[test]
fn forgotten_backends_release_their_slots_and_results_are_ignored() {
    let t0 = Instant::now();
    let s = settings(1000);
    let mut c = Checker::new(params(1), 2);
    c.set_targets(t0, vec![target("a", "web", &s), target("b", "web", &s)]);
    let later = t0 + Duration::from_secs(1);
    let o = c.poll_check(later).unwrap();
    c.set_targets(
        later,
        vec![target(if &*o.id == "a" { "b" } else { "a" }, "web", &s)],
    );
    assert_eq!(c.in_flight(), 0);
    c.on_result(later, &o.id, fail());
    assert_eq!(c.checks, 0);
    assert!(c.poll_check(later + Duration::from_secs(2)).is_some());
}

#[test]
fn rtt_reaches_the_backends_live_state() {
    let t0 = Instant::now();
    let s = settings(1000);
    let mut c = Checker::new(params(1), 2);
    let a = target("a", "web", &s);
    let live = Arc::clone(&a.live);
    c.set_targets(t0, vec![a]);
    let later = t0 + Duration::from_secs(1);
    let o = c.poll_check(later).unwrap();
    c.on_result(
        later,
        &o.id,
        CheckOutcome {
            ok: true,
            rtt: Some(Duration::from_micros(1500)),
            error: None,
            local: false,
        },
    );
    assert_eq!(live.rtt_us(), 1500);
}

/// QA: a backend down by its checks stayed excluded once its checks were
/// turned off (nothing would check it again), and a check in flight when
/// they were turned off could still take it down.
#[test]
fn turning_checks_off_brings_a_down_backend_back_and_ignores_checks_in_flight() {
    let t0 = Instant::now();
    let s = Arc::new(CheckSettings {
        unhealthy_threshold: 1,
        ..(*settings(1000)).clone()
    });
    let off = Arc::new(CheckSettings {
        enabled: false,
        ..(*s).clone()
    });
    let mut c = Checker::new(params(4), 5);
    c.set_targets(t0, vec![target("a", "web", &s)]);
    let later = t0 + Duration::from_secs(1);
    let o = c.poll_check(later).unwrap();
    c.on_result(later, &o.id, fail());
    assert_eq!(drain(&mut c), [("a".to_string(), Change::Down)]);

    c.set_targets(later, vec![target("a", "web", &off)]);
    assert_eq!(drain(&mut c), [("a".to_string(), Change::Up)]);
    let mut records = vec![record("a")];
    c.apply(&mut records);
    assert!(records[0].healthy);
    assert!(c.poll_check(later + Duration::from_secs(10)).is_none());

    // On again, a check starts, and they are turned off while it runs.
    c.set_targets(later, vec![target("a", "web", &s)]);
    let o = c.poll_check(later + Duration::from_secs(2)).unwrap();
    c.set_targets(later, vec![target("a", "web", &off)]);
    c.on_result(later + Duration::from_secs(2), &o.id, fail());
    assert!(drain(&mut c).is_empty());
    assert_eq!(c.in_flight(), 0);
    assert_eq!(c.overlay("a", 1), None);
}

/// QA: health was kept by id across an address change, so a backend
/// registered again at a new address (a replacement instance) stayed
/// ejected for what its predecessor did, for up to `max_timeout`, and its
/// ejection count (the backoff's multiplier) carried over.
#[test]
fn a_backend_that_moves_starts_its_health_over() {
    let t0 = Instant::now();
    let s = settings(1000);
    let mut c = Checker::new(params(4), 11);
    c.set_targets(t0, vec![target("a", "web", &s), target("b", "web", &s)]);
    c.on_passive(t0, "a", true, t0);
    c.on_passive(t0, "a", true, t0);
    assert!(matches!(
        drain(&mut c).as_slice(),
        [(id, Change::Ejected(_))] if id == "a"
    ));
    assert_eq!(c.overlay("a", 2), Some(Overlay::Excluded));

    let mut moved = target("a", "web", &s);
    moved.addr = "127.0.0.1:10".parse().unwrap();
    c.set_targets(t0, vec![moved, target("b", "web", &s)]);
    assert_eq!(drain(&mut c), [("a".to_string(), Change::Up)]);
    assert_eq!(c.overlay("a", 2), None);
    let (h, _) = c.health("a").unwrap();
    assert_eq!((h.ejections, h.passive_failures), (0, 0));
    // The same address again changes nothing.
    let mut same = target("a", "web", &s);
    same.addr = "127.0.0.1:10".parse().unwrap();
    c.on_passive(t0, "a", true, t0);
    c.set_targets(t0, vec![same, target("b", "web", &s)]);
    assert!(drain(&mut c).is_empty());
    assert_eq!(c.health("a").unwrap().0.passive_failures, 1);
}

/// QA: a client's failed connect while a check was in flight marked that
/// check as the confirming one; it had started before the failure and
/// passed, and the check asked for after it then counted as one failure of
/// `unhealthy_threshold`: the backend stayed in rotation for two more
/// intervals instead of leaving at once.
#[test]
fn a_check_that_started_before_a_passive_failure_does_not_use_up_its_confirmation() {
    let t0 = Instant::now();
    let s = settings(1000);
    let mut c = Checker::new(params(4), 3);
    c.set_targets(t0, vec![target("a", "web", &s)]);
    let later = t0 + Duration::from_secs(1);
    let o = c.poll_check(later).unwrap();
    c.on_passive(later, "a", true, later);
    c.on_result(later, &o.id, ok());
    assert!(drain(&mut c).is_empty());
    let again = c
        .poll_check(later)
        .expect("the check asked for after the failure");
    c.on_result(later, &again.id, fail());
    assert_eq!(drain(&mut c), [("a".to_string(), Change::Down)]);

    // A check in flight that fails confirms the failure itself.
    let mut c = Checker::new(params(4), 3);
    c.set_targets(t0, vec![target("a", "web", &s)]);
    let o = c.poll_check(later).unwrap();
    c.on_passive(later, "a", true, later);
    c.on_result(later, &o.id, fail());
    assert_eq!(drain(&mut c), [("a".to_string(), Change::Down)]);
}

fn record(id: &str) -> BackendRecord {
    BackendRecord {
        id: id.into(),
        app: "web".into(),
        region: "sa".into(),
        country: None,
        ip: "127.0.0.1".into(),
        port: 9,
        healthy: true,
        weight: 1,
        soft_limit: 100,
        hard_limit: 0,
        deleted: false,
    }
}

/// QA: a check that could not run on this host (no local port, descriptor
/// or memory) counted as the backend's failure, so a proxy short of
/// descriptors took healthy backends down. It now counts for nothing: the
/// backend's health stays, the next check runs on its schedule and decides.
#[test]
fn a_check_that_could_not_run_here_says_nothing_of_the_backend() {
    let t0 = Instant::now();
    let s = Arc::new(CheckSettings {
        unhealthy_threshold: 1,
        ..(*settings(1000)).clone()
    });
    let mut c = Checker::new(params(4), 13);
    c.set_targets(t0, vec![target("a", "web", &s)]);
    let mut now = t0 + Duration::from_secs(1);
    for _ in 0..5 {
        let o = c.poll_check(now).unwrap();
        c.on_result(
            now,
            &o.id,
            CheckOutcome {
                ok: false,
                rtt: None,
                error: Some("connect: Cannot assign requested address (os error 99)".into()),
                local: true,
            },
        );
        assert!(drain(&mut c).is_empty(), "a check not run took it down");
        assert_eq!(c.overlay("a", 1), None);
        // On its schedule, not at once.
        assert!(c.poll_check(now).is_none());
        now = c.poll_timeout().unwrap();
    }
    assert_eq!((c.checks, c.check_failures, c.checks_not_run), (0, 0, 5));
    assert_eq!(c.last_not_run.as_ref().map(|(id, _)| &**id), Some("a"));
    // A check that runs and fails still counts.
    let o = c.poll_check(now).unwrap();
    c.on_result(now, &o.id, fail());
    assert_eq!(drain(&mut c), [("a".to_string(), Change::Down)]);
}
