//! Rate-limited summaries of what the data plane refuses or fails at, so an
//! operator hears about it without one log line per connection.
//!
//! Every `[log] summary_interval_secs` a thread reads the shards' counters
//! (they are atomics the shards bump anyway: nothing is added to the hot
//! path) and logs, at WARN, only what moved:
//!
//! - per listener, connections refused for want of a backend, with the
//!   reason: those refused after every backend tried failed to connect say
//!   so (the shards count them apart); the rest, refused with no backend to
//!   try, get the reason the routing table gives for that listener when the
//!   line is written (`crate::no_backend_warn`), not the one of the last
//!   reload;
//! - backend connect failures per backend, the busiest first, with whether
//!   each is failing now. (Shards log once when a backend starts and stops
//!   failing; this is the running count.)
//! - per listener, connections refused by the per-client limits
//!   (`[rate_limit]`), naming the clients refused most with their counts
//!   and how many distinct clients were refused, so one abusive client
//!   tells itself apart from a wide flood. (QA: 265,000 refused in 10 s by
//!   `wrk` from one client left no line in the log, only a counter; then a
//!   line that did not say which client.) The shards keep those per
//!   interval in fixed memory, written on refusals only
//!   (`engine::refused_clients`).
//!
//! [`Watch`] is the sans-IO core: counters in, what to report out.

use std::collections::HashMap;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{RecvTimeoutError, Sender};
use engine::refused_clients::{Distinct, Interval, Offender};
use engine::snapshot::SnapshotHandle;
use engine::{ListenerSummary, StatsView};

use crate::no_backend_warn::{Reason, SharedCoverage};

/// Backends named in one connect-failure summary line; more are counted.
const NAMED_BACKENDS: usize = 5;
/// Clients named in one per-client-limit summary line.
const NAMED_CLIENTS: usize = 5;

/// Connections refused on one listener during an interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub listener: String,
    pub app: Option<String>,
    pub count: u64,
    /// Of `count`, those refused after every backend tried failed to
    /// connect (the rest found none to try).
    pub after_failures: u64,
}

impl Refused {
    /// Why these connections were refused. `gap_now` is why the listener
    /// has no eligible backend now (`None`: it has one).
    pub fn reason(&self, gap_now: Option<&Reason>) -> String {
        const FAILED: &str = "every backend tried failed to connect";
        let none_tried = self.count.saturating_sub(self.after_failures);
        let no_backend = match gap_now {
            Some(gap) => gap.to_string(),
            None => "no backend was eligible when they came, though one is now (at its hard \
                     limit, or out of rotation, for a while)"
                .to_string(),
        };
        match (none_tried, self.after_failures) {
            (_, 0) => no_backend,
            (0, _) => FAILED.to_string(),
            (n, m) => format!("{n} found no backend to try ({no_backend}); {m}: {FAILED}"),
        }
    }
}

/// Connect failures of one backend during an interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failures {
    pub backend: String,
    pub count: u64,
    /// Its last connect attempt failed.
    pub failing: bool,
}

/// Connections one listener refused by a per-client limit (rate or open
/// connections) during an interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    pub listener: String,
    pub count: u64,
    /// The clients refused most, heaviest first (at most
    /// [`NAMED_CLIENTS`]); see [`Report::name_clients`].
    pub top: Vec<Offender>,
    /// Distinct clients refused.
    pub clients: Option<Distinct>,
}

/// What moved during one interval.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub refused: Vec<Refused>,
    /// Busiest first.
    pub failures: Vec<Failures>,
    pub limited: Vec<Limited>,
}

/// Counters as last seen. See the module docs.
#[derive(Debug, Default)]
pub struct Watch {
    /// (refused, of which after failed connects), by listener.
    refused: HashMap<String, (u64, u64)>,
    failures: HashMap<String, u64>,
    /// Refused by a per-client limit, by listener.
    limited: HashMap<String, u64>,
}

impl Watch {
    /// Compares the counters now with the last look. `backends` are (id,
    /// connect failures so far, failing now). Counters that went down (a
    /// listener or backend removed and added again) count from zero.
    pub fn observe(
        &mut self,
        listeners: &[ListenerSummary],
        backends: impl IntoIterator<Item = (String, u64, bool)>,
    ) -> Report {
        let mut report = Report::default();
        let mut refused = HashMap::with_capacity(listeners.len());
        for l in listeners {
            let (before, before_failed) = self.refused.get(&l.name).copied().unwrap_or((0, 0));
            let now = (l.no_backend, l.no_backend_after_failures);
            let (delta, delta_failed) =
                match (now.0.checked_sub(before), now.1.checked_sub(before_failed)) {
                    (Some(d), Some(f)) => (d, f),
                    _ => now,
                };
            if delta > 0 {
                report.refused.push(Refused {
                    listener: l.name.clone(),
                    app: l.app.clone(),
                    count: delta,
                    after_failures: delta_failed.min(delta),
                });
            }
            refused.insert(l.name.clone(), now);
        }
        self.refused = refused;
        let mut limited = HashMap::with_capacity(listeners.len());
        for l in listeners {
            let before = self.limited.get(&l.name).copied().unwrap_or(0);
            let now = l.rejected_client_limit;
            let delta = now.checked_sub(before).unwrap_or(now);
            if delta > 0 {
                report.limited.push(Limited {
                    listener: l.name.clone(),
                    count: delta,
                    top: Vec::new(),
                    clients: None,
                });
            }
            limited.insert(l.name.clone(), now);
        }
        self.limited = limited;
        let mut failures = HashMap::new();
        for (id, count, failing) in backends {
            let before = self.failures.get(&id).copied().unwrap_or(0);
            let delta = count.checked_sub(before).unwrap_or(count);
            if delta > 0 {
                report.failures.push(Failures {
                    backend: id.clone(),
                    count: delta,
                    failing,
                });
            }
            failures.insert(id, count);
        }
        self.failures = failures;
        report.failures.sort_by(|a, b| {
            b.count
                .cmp(&a.count)
                .then_with(|| a.backend.cmp(&b.backend))
        });
        report
    }
}

impl Report {
    /// Names the clients behind each listener's per-client-limit refusals,
    /// from the interval the shards just ended (see
    /// `engine::StatsView::take_refused_clients`).
    pub fn name_clients(&mut self, intervals: Vec<(String, Interval)>) {
        for (listener, interval) in intervals {
            if let Some(l) = self.limited.iter_mut().find(|l| l.listener == listener) {
                l.top = interval.top(NAMED_CLIENTS);
                l.clients = Some(interval.distinct());
            }
        }
    }
}

/// `203.0.113.9: 4512, 198.51.100.7: at least 12`: a count is exact unless
/// the client took the slot of another (a flood of many sources), then it
/// is what it was refused at least.
pub fn clients_text(top: &[Offender]) -> String {
    top.iter()
        .map(|o| match o.floor {
            0 => format!("{}: {}", o.ip, o.count),
            _ => format!("{}: at least {}", o.ip, o.at_least()),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `b1: 5 (failing), b2: 3, and 4 more`.
pub fn failures_text(failures: &[Failures]) -> String {
    let mut parts: Vec<String> = failures
        .iter()
        .take(NAMED_BACKENDS)
        .map(|f| match f.failing {
            true => format!("{}: {} (failing)", f.backend, f.count),
            false => format!("{}: {}", f.backend, f.count),
        })
        .collect();
    if failures.len() > NAMED_BACKENDS {
        parts.push(format!("and {} more", failures.len() - NAMED_BACKENDS));
    }
    parts.join(", ")
}

/// What the watch thread reads.
pub struct Sources {
    pub stats: StatsView,
    pub snapshot: SnapshotHandle,
    /// The routing table's rows and the listeners, to say why a listener
    /// has no eligible backend at the moment a line is written.
    pub coverage: SharedCoverage,
}

/// The running watch thread; stops when dropped.
pub struct WatchThread {
    stop: Sender<()>,
    join: Option<JoinHandle<()>>,
}

impl WatchThread {
    pub fn start(sources: Sources, interval: Duration) -> std::io::Result<WatchThread> {
        let (stop, stopped) = crossbeam_channel::bounded::<()>(1);
        let join = std::thread::Builder::new()
            .name("traffic-watch".into())
            .spawn(move || {
                let mut watch = Watch::default();
                let secs = interval.as_secs();
                loop {
                    match stopped.recv_timeout(interval) {
                        Err(RecvTimeoutError::Timeout) => {}
                        _ => return,
                    }
                    let snap = sources.snapshot.load_full();
                    let backends = snap.backends.iter().map(|b| {
                        (
                            b.id.to_string(),
                            b.live
                                .connect_failures
                                .load(std::sync::atomic::Ordering::Relaxed),
                            b.live.is_failing(),
                        )
                    });
                    let mut report = watch.observe(&sources.stats.listeners(), backends);
                    // Every interval, moved or not: this ends the shards'.
                    report.name_clients(sources.stats.take_refused_clients());
                    log(&report, secs, |listener| {
                        sources.coverage.gap(listener, &sources.snapshot.load())
                    });
                }
            })?;
        Ok(WatchThread {
            stop,
            join: Some(join),
        })
    }
}

impl Drop for WatchThread {
    fn drop(&mut self) {
        let _ = self.stop.try_send(());
        if let Some(join) = self.join.take() {
            let _ = join.join();
        }
    }
}

/// Logs `report`; `gap_now` says why a listener has no eligible backend
/// now (`None`: it has one).
fn log(report: &Report, interval_secs: u64, gap_now: impl Fn(&str) -> Option<Reason>) {
    for r in &report.refused {
        let reason = r.reason(gap_now(&r.listener).as_ref());
        tracing::warn!(listener = %r.listener, app = r.app.as_deref().unwrap_or("*"),
            refused = r.count, interval_secs, %reason,
            "connections refused for want of a backend");
    }
    if !report.failures.is_empty() {
        let total: u64 = report.failures.iter().map(|f| f.count).sum();
        tracing::warn!(failures = total, interval_secs,
            backends = %failures_text(&report.failures), "backend connect failures");
    }
    for l in &report.limited {
        let clients = l.clients.map_or_else(|| "?".to_string(), |d| d.to_string());
        tracing::warn!(listener = %l.listener, refused = l.count, interval_secs,
            %clients, top_clients = ?clients_text(&l.top),
            "connections refused by the per-client limits ([rate_limit]: rate or open connections per client IP)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener(name: &str, no_backend: u64) -> ListenerSummary {
        ListenerSummary {
            name: name.into(),
            app: Some("web".into()),
            no_backend,
            ..Default::default()
        }
    }

    #[test]
    fn only_what_moved_is_reported() {
        let mut w = Watch::default();
        let r = w.observe(
            &[listener("a", 3), listener("b", 0)],
            [("x".into(), 0, false)],
        );
        assert_eq!(
            r.refused,
            [Refused {
                listener: "a".into(),
                app: Some("web".into()),
                count: 3,
                after_failures: 0,
            }]
        );
        assert!(r.failures.is_empty());
        // Nothing new: nothing to say.
        let r = w.observe(
            &[listener("a", 3), listener("b", 0)],
            [("x".into(), 0, false)],
        );
        assert_eq!(r, Report::default());
        let r = w.observe(
            &[listener("a", 5), listener("b", 1)],
            [("x".into(), 2, true), ("y".into(), 7, false)],
        );
        assert_eq!(
            r.refused.iter().map(|r| r.count).collect::<Vec<_>>(),
            [2, 1]
        );
        assert_eq!(
            failures_text(&r.failures),
            "y: 7, x: 2 (failing)",
            "busiest first"
        );
    }

    #[test]
    fn per_client_limit_refusals_are_reported_once_per_interval_they_moved() {
        let mut w = Watch::default();
        let limited = |name: &str, n: u64| ListenerSummary {
            rejected_client_limit: n,
            ..listener(name, 0)
        };
        let r = w.observe(&[limited("a", 0), limited("b", 0)], []);
        assert_eq!(r, Report::default());
        let r = w.observe(&[limited("a", 264_886), limited("b", 0)], []);
        assert_eq!(
            r.limited,
            [Limited {
                listener: "a".into(),
                count: 264_886,
                top: Vec::new(),
                clients: None,
            }]
        );
        assert!(r.refused.is_empty(), "not refused for want of a backend");
        let r = w.observe(&[limited("a", 264_886), limited("b", 0)], []);
        assert_eq!(r, Report::default(), "nothing new: nothing to say");
        let r = w.observe(&[limited("a", 264_890), limited("b", 2)], []);
        assert_eq!(
            r.limited.iter().map(|l| l.count).collect::<Vec<_>>(),
            [4, 2]
        );
    }

    #[test]
    fn per_client_limit_lines_name_the_heaviest_clients_and_count_them_all() {
        let mut w = Watch::default();
        let limited = |name: &str, n: u64| ListenerSummary {
            rejected_client_limit: n,
            ..listener(name, 0)
        };
        w.observe(&[limited("a", 0), limited("b", 0)], []);
        let mut r = w.observe(&[limited("a", 47), limited("b", 0)], []);
        let shard = engine::refused_clients::RefusedClients::default();
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        for _ in 0..40 {
            shard.record(ip("203.0.113.9"));
        }
        for n in 1..=7 {
            shard.record(ip(&format!("198.51.100.{n}")));
        }
        // b's interval is empty and its counter did not move: no line.
        r.name_clients(vec![
            ("a".into(), shard.take()),
            ("b".into(), Interval::default()),
        ]);
        assert_eq!(r.limited.len(), 1);
        let a = &r.limited[0];
        assert_eq!(a.clients, Some(Distinct::About(8)));
        assert_eq!(
            clients_text(&a.top),
            "203.0.113.9: 40, 198.51.100.1: 1, 198.51.100.2: 1, 198.51.100.3: 1, 198.51.100.4: 1"
        );
    }

    #[test]
    fn an_inexact_count_says_at_least() {
        let o = Offender {
            ip: "10.0.0.1".parse().unwrap(),
            count: 30,
            floor: 12,
        };
        assert_eq!(clients_text(&[o]), "10.0.0.1: at least 18");
    }

    #[test]
    fn a_counter_that_restarted_counts_from_zero() {
        let mut w = Watch::default();
        w.observe(&[listener("a", 10)], [("x".into(), 10, false)]);
        let r = w.observe(&[listener("a", 2)], [("x".into(), 4, false)]);
        assert_eq!(r.refused[0].count, 2);
        assert_eq!(r.failures[0].count, 4);
    }

    /// With several listeners, each line's reason is that listener's: the
    /// refusals after failed connects say so whatever the table says, the
    /// rest get the listener's reason now. (Before, every line read the
    /// reasons of the last reload's check: a listener whose backends were
    /// dead was said to be at its hard limit, and one that had backends at
    /// the reload was said to have failed to connect when it had none.)
    #[test]
    fn each_listeners_refusals_get_their_own_reason() {
        let mut w = Watch::default();
        let summary = |name: &str, no_backend: u64, after_failures: u64| ListenerSummary {
            no_backend_after_failures: after_failures,
            ..listener(name, no_backend)
        };
        w.observe(
            &[
                summary("full", 0, 0),
                summary("dead", 0, 0),
                summary("both", 0, 0),
            ],
            [],
        );
        let r = w.observe(
            &[
                summary("full", 4, 0),
                summary("dead", 3, 3),
                summary("both", 5, 2),
            ],
            [],
        );
        let at_limit = {
            let mut counts = std::collections::BTreeMap::new();
            counts.insert(crate::no_backend_warn::RowState::AtHardLimit, 1);
            Reason::NoneEligible(counts)
        };
        let gap_now = |listener: &str| match listener {
            "dead" => None,
            _ => Some(at_limit.clone()),
        };
        let reasons: Vec<(String, String)> = r
            .refused
            .iter()
            .map(|r| (r.listener.clone(), r.reason(gap_now(&r.listener).as_ref())))
            .collect();
        assert_eq!(
            reasons,
            [
                (
                    "full".into(),
                    "its only backend is at the hard limit".into()
                ),
                (
                    "dead".into(),
                    "every backend tried failed to connect".into()
                ),
                (
                    "both".into(),
                    "3 found no backend to try (its only backend is at the hard limit); \
                     2: every backend tried failed to connect"
                        .into()
                ),
            ]
        );
        // Refused with none to try, but one is eligible by the time the line
        // is written: not "failed to connect".
        let r = w.observe(
            &[
                summary("full", 5, 0),
                summary("dead", 3, 3),
                summary("both", 5, 2),
            ],
            [],
        );
        assert_eq!(r.refused.len(), 1);
        assert!(
            r.refused[0]
                .reason(None)
                .starts_with("no backend was eligible when they came"),
            "{}",
            r.refused[0].reason(None)
        );
    }

    #[test]
    fn long_lists_name_the_busiest_and_count_the_rest() {
        let failures: Vec<Failures> = (0..8)
            .map(|i| Failures {
                backend: format!("b{i}"),
                count: 8 - i,
                failing: false,
            })
            .collect();
        assert_eq!(
            failures_text(&failures),
            "b0: 8, b1: 7, b2: 6, b3: 5, b4: 4, and 3 more"
        );
    }
}
