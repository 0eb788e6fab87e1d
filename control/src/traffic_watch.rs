//! Rate-limited summaries of what the data plane refuses or fails at, so an
//! operator hears about it without one log line per connection.
//!
//! Every `[log] summary_interval_secs` a thread reads the shards' counters
//! (they are atomics the shards bump anyway: nothing is added to the hot
//! path) and logs, at WARN, only what moved:
//!
//! - per listener, connections refused for want of a backend, with the
//!   reason the routing table gives (`crate::no_backend_warn`) or, when it
//!   has eligible backends, that every backend tried failed to connect;
//! - backend connect failures per backend, the busiest first, with whether
//!   each is failing now. (Shards log once when a backend starts and stops
//!   failing; this is the running count.)
//!
//! [`Watch`] is the sans-IO core: counters in, what to report out.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{RecvTimeoutError, Sender};
use engine::snapshot::SnapshotHandle;
use engine::{ListenerSummary, StatsView};

/// Backends named in one connect-failure summary line; more are counted.
const NAMED_BACKENDS: usize = 5;

/// Connections refused on one listener during an interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub listener: String,
    pub app: Option<String>,
    pub count: u64,
}

/// Connect failures of one backend during an interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failures {
    pub backend: String,
    pub count: u64,
    /// Its last connect attempt failed.
    pub failing: bool,
}

/// What moved during one interval.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub refused: Vec<Refused>,
    /// Busiest first.
    pub failures: Vec<Failures>,
}

/// Counters as last seen. See the module docs.
#[derive(Debug, Default)]
pub struct Watch {
    refused: HashMap<String, u64>,
    failures: HashMap<String, u64>,
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
            let before = self.refused.get(&l.name).copied().unwrap_or(0);
            let delta = l.no_backend.checked_sub(before).unwrap_or(l.no_backend);
            if delta > 0 {
                report.refused.push(Refused {
                    listener: l.name.clone(),
                    app: l.app.clone(),
                    count: delta,
                });
            }
            refused.insert(l.name.clone(), l.no_backend);
        }
        self.refused = refused;
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
    /// Why each listener has no eligible backend, as of the last check.
    pub reasons: Arc<Mutex<BTreeMap<String, String>>>,
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
                    let report = watch.observe(&sources.stats.listeners(), backends);
                    log(&report, secs, &sources.reasons);
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

fn log(report: &Report, interval_secs: u64, reasons: &Mutex<BTreeMap<String, String>>) {
    for r in &report.refused {
        let reason = reasons
            .lock()
            .ok()
            .and_then(|m| m.get(&r.listener).cloned())
            .unwrap_or_else(|| {
                "its backends were eligible, but every one tried failed to connect".into()
            });
        tracing::warn!(listener = %r.listener, app = r.app.as_deref().unwrap_or("*"),
            refused = r.count, interval_secs, %reason,
            "connections refused for want of a backend");
    }
    if !report.failures.is_empty() {
        let total: u64 = report.failures.iter().map(|f| f.count).sum();
        tracing::warn!(failures = total, interval_secs,
            backends = %failures_text(&report.failures), "backend connect failures");
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
                count: 3
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
    fn a_counter_that_restarted_counts_from_zero() {
        let mut w = Watch::default();
        w.observe(&[listener("a", 10)], [("x".into(), 10, false)]);
        let r = w.observe(&[listener("a", 2)], [("x".into(), 4, false)]);
        assert_eq!(r.refused[0].count, 2);
        assert_eq!(r.failures[0].count, 4);
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
