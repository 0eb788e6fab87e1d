//! Results: per-run samples, medians with min–max, ratios against direct and
//! against each peer, and their rendering as a terminal table and JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::targets::Kind;

/// Named latency histograms, one line each in a plot.
pub type Series = Vec<(String, Histogram<u64>)>;

/// One measured run of one target.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub target: Kind,
    pub run: usize,
    pub metrics: BTreeMap<&'static str, f64>,
    #[serde(skip)]
    pub latency: Option<Histogram<u64>>,
}

/// Median and range over runs.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: usize,
}

impl Stat {
    pub fn of(values: &[f64]) -> Option<Stat> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Stat {
            median,
            min: v[0],
            max: v[n - 1],
            runs: n,
        })
    }
}

/// How a metric is shown.
#[derive(Debug, Clone, Copy)]
pub struct Column {
    pub key: &'static str,
    pub header: &'static str,
    /// Lower is better (latency, CPU, memory).
    pub lower_is_better: bool,
}

pub const fn col(key: &'static str, header: &'static str, lower_is_better: bool) -> Column {
    Column {
        key,
        header,
        lower_is_better,
    }
}

/// A scenario, or one variant of it (an open-loop rate, a direction).
#[derive(Debug, Clone, Serialize)]
pub struct Variant {
    pub id: String,
    pub title: String,
    pub samples: Vec<Sample>,
    /// target → metric → median/min/max.
    pub summary: BTreeMap<Kind, BTreeMap<&'static str, Stat>>,
    /// target → metric → other target → ratio of medians (this / other).
    pub ratios: BTreeMap<Kind, BTreeMap<&'static str, BTreeMap<Kind, f64>>>,
    /// Targets asked for but not run, with the reason.
    pub missing: BTreeMap<Kind, String>,
    pub notes: Vec<String>,
    #[serde(skip)]
    pub columns: Vec<Column>,
    /// Name of the plot file, if one was drawn.
    pub plot: Option<String>,
    /// Figures over all runs pooled into one histogram (scenario g), by name.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub pooled: BTreeMap<String, f64>,
}

impl Variant {
    pub fn new(id: impl Into<String>, title: impl Into<String>, columns: &[Column]) -> Variant {
        Variant {
            id: id.into(),
            title: title.into(),
            samples: Vec::new(),
            summary: BTreeMap::new(),
            ratios: BTreeMap::new(),
            missing: BTreeMap::new(),
            notes: Vec::new(),
            columns: columns.to_vec(),
            plot: None,
            pooled: BTreeMap::new(),
        }
    }

    /// Computes medians and ratios from the samples.
    pub fn finish(&mut self) {
        let mut by: BTreeMap<Kind, BTreeMap<&'static str, Vec<f64>>> = BTreeMap::new();
        for s in &self.samples {
            for (k, v) in &s.metrics {
                by.entry(s.target)
                    .or_default()
                    .entry(k)
                    .or_default()
                    .push(*v);
            }
        }
        self.summary = by
            .into_iter()
            .map(|(t, m)| {
                (
                    t,
                    m.into_iter()
                        .filter_map(|(k, v)| Some((k, Stat::of(&v)?)))
                        .collect(),
                )
            })
            .collect();
        self.ratios.clear();
        for (t, metrics) in &self.summary {
            for (k, stat) in metrics {
                for (other, om) in &self.summary {
                    if other == t {
                        continue;
                    }
                    if let Some(os) = om.get(k) {
                        if os.median != 0.0 {
                            self.ratios
                                .entry(*t)
                                .or_default()
                                .entry(k)
                                .or_default()
                                .insert(*other, stat.median / os.median);
                        }
                    }
                }
            }
        }
    }

    pub fn median(&self, target: Kind, key: &str) -> Option<f64> {
        self.summary.get(&target)?.get(key).map(|s| s.median)
    }

    /// The lowest of a target's runs: for a cost (CPU per unit of work),
    /// which interference from the rest of the host only ever raises, the
    /// run that met the least of it.
    pub fn min(&self, target: Kind, key: &str) -> Option<f64> {
        self.summary.get(&target)?.get(key).map(|s| s.min)
    }

    /// Merged latency histogram of a target over its runs.
    pub fn merged_latency(&self, target: Kind) -> Option<Histogram<u64>> {
        let mut merged: Option<Histogram<u64>> = None;
        for s in self.samples.iter().filter(|s| s.target == target) {
            if let Some(h) = &s.latency {
                match merged.as_mut() {
                    None => merged = Some(h.clone()),
                    Some(m) => {
                        let _ = m.add(h);
                    }
                }
            }
        }
        merged
    }

    /// The terminal table.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "\n{}", self.title);
        let targets: Vec<Kind> = self.summary.keys().copied().collect();
        let mut rows: Vec<Vec<String>> = Vec::new();
        let mut header = vec!["target".to_string()];
        header.extend(self.columns.iter().map(|c| c.header.to_string()));
        rows.push(header);
        for t in &targets {
            let mut row = vec![t.name().to_string()];
            for c in &self.columns {
                row.push(match self.summary[t].get(c.key) {
                    None => "-".into(),
                    Some(s) if s.runs == 1 || fmt(s.min) == fmt(s.max) => fmt(s.median),
                    Some(s) => format!("{} ({}–{})", fmt(s.median), fmt(s.min), fmt(s.max)),
                });
            }
            rows.push(row);
        }
        let widths: Vec<usize> = (0..rows[0].len())
            .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
            .collect();
        for (n, row) in rows.iter().enumerate() {
            let line: Vec<String> = row
                .iter()
                .enumerate()
                .map(|(i, cell)| {
                    if i == 0 {
                        format!("{cell:<w$}", w = widths[i])
                    } else {
                        format!("{cell:>w$}", w = widths[i])
                    }
                })
                .collect();
            let _ = writeln!(out, "  {}", line.join("  "));
            if n == 0 {
                let total: usize = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
                let _ = writeln!(out, "  {}", "-".repeat(total));
            }
        }
        // Ratios: every proxy against direct; edgeproxy against every peer
        // too, and the A/A control against the HAProxy it copies
        // (report.json has every pair).
        let shown = |t: Kind, other: Kind| {
            other != t
                && (t == Kind::Edgeproxy
                    || other == Kind::Direct
                    || (t, other) == (Kind::Haproxy2, Kind::Haproxy))
        };
        for t in targets.iter().filter(|t| t.is_proxy()) {
            let Some(r) = self.ratios.get(t) else {
                continue;
            };
            let mut parts = Vec::new();
            for other in &targets {
                if !shown(*t, *other) {
                    continue;
                }
                let cells: Vec<String> = self
                    .columns
                    .iter()
                    .filter_map(|c| {
                        let v = r.get(c.key)?.get(other)?;
                        Some(format!("{} {:.2}×", c.header, v))
                    })
                    .collect();
                if !cells.is_empty() {
                    parts.push(format!("÷{}: {}", other.name(), cells.join(", ")));
                }
            }
            for p in parts {
                let _ = writeln!(out, "  {:<10} {}", t.name(), p);
            }
        }
        for (t, why) in &self.missing {
            let _ = writeln!(out, "  {}: MISSING — {}", t.name(), why);
        }
        for n in &self.notes {
            let _ = writeln!(out, "  note: {n}");
        }
        if let Some(p) = &self.plot {
            let _ = writeln!(out, "  plot: {p}");
        }
        out
    }
}

/// Three significant digits, thousands kept whole.
pub fn fmt(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub started_unix: u64,
    pub command: String,
    pub machine: Machine,
    pub setup: serde_json::Value,
    pub peers: BTreeMap<Kind, PeerStatus>,
    pub variants: Vec<Variant>,
    pub goals: Vec<Goal>,
    pub load_before: f64,
    pub load_after: f64,
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub kernel: String,
    pub cpu_model: String,
    pub mem_total_kb: u64,
}

#[derive(Debug, Clone, Serialize)]
pub enum PeerStatus {
    Available(String),
    Missing(String),
    NotSelected,
}

/// One of the goals, checked against this run.
#[derive(Debug, Clone, Serialize)]
pub struct Goal {
    pub goal: String,
    /// `None` when it could not be checked (peer missing, scenario skipped).
    pub met: Option<bool>,
    pub detail: String,
}

impl Report {
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "edgeproxy perf suite — {} CPUs ({}), kernel {}, load avg {:.2} → {:.2}",
            self.machine.cpus,
            self.machine.cpu_model,
            self.machine.kernel,
            self.load_before,
            self.load_after
        );
        let _ = writeln!(out, "command: {}", self.command);
        for (k, s) in &self.peers {
            let text = match s {
                PeerStatus::Available(v) => format!("available ({v})"),
                PeerStatus::Missing(why) => format!("MISSING: {why}"),
                PeerStatus::NotSelected => "not selected".into(),
            };
            let _ = writeln!(out, "  {:<10} {}", k.name(), text);
        }
        for v in &self.variants {
            out.push_str(&v.render());
        }
        if !self.goals.is_empty() {
            let _ = writeln!(out, "\nGoals");
            for g in &self.goals {
                let mark = match g.met {
                    Some(true) => "MET    ",
                    Some(false) => "NOT MET",
                    None => "n/a    ",
                };
                let _ = writeln!(out, "  [{mark}] {} — {}", g.goal, g.detail);
            }
        }
        for n in &self.notes {
            let _ = writeln!(out, "note: {n}");
        }
        out
    }
}

pub fn machine() -> Machine {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    let mem_total_kb = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    Machine {
        cpus: crate::procfs::cpu_count(),
        kernel,
        cpu_model,
        mem_total_kb,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_even_and_odd_counts() {
        assert_eq!(Stat::of(&[3.0, 1.0, 2.0]).unwrap().median, 2.0);
        assert_eq!(Stat::of(&[4.0, 1.0, 2.0, 3.0]).unwrap().median, 2.5);
        assert!(Stat::of(&[]).is_none());
    }

    #[test]
    fn ratios_compare_medians_of_every_pair() {
        let mut v = Variant::new("x", "x", &[col("rps", "req/s", false)]);
        for (t, x) in [
            (Kind::Direct, 100.0),
            (Kind::Edgeproxy, 80.0),
            (Kind::Haproxy, 40.0),
        ] {
            let mut m = BTreeMap::new();
            m.insert("rps", x);
            v.samples.push(Sample {
                target: t,
                run: 0,
                metrics: m,
                latency: None,
            });
        }
        v.finish();
        assert_eq!(v.ratios[&Kind::Edgeproxy]["rps"][&Kind::Direct], 0.8);
        assert_eq!(v.ratios[&Kind::Edgeproxy]["rps"][&Kind::Haproxy], 2.0);
        assert!(v.render().contains("÷haproxy"));
    }
}
