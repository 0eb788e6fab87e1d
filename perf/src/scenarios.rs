//! The scenarios. Each runs every target `runs` times, interleaved
//! (direct, edgeproxy, haproxy, nginx, direct, …), and returns one
//! [`Variant`] per table (an open-loop rate, a bulk direction).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::backends::{bulk_command, Backends};
use crate::cpu_cap::CpuCap;
use crate::loadgen::{self, LoadSpec, Pace};
use crate::procfs::{self, CpuSample};
use crate::report::{col, Column, Sample, Variant};
use crate::targets::{self, Kind, Running};
use crate::Options;

/// Proxy CPU and machine IPIs at one instant.
#[derive(Clone, Copy, Default)]
struct Probe {
    cpu: CpuSample,
    ipis: u64,
    /// This suite's own load generator and backend threads: time on CPU and
    /// time runnable but waiting for a CPU, ns.
    loadgen_cpu: u64,
    loadgen_wait: u64,
    backend_cpu: u64,
    /// Steal time of the proxy's CPUs (all CPUs when unpinned), ns.
    proxy_cpus_steal: u64,
    /// Steal time of every CPU the run uses, ns.
    run_cpus_steal: u64,
}

fn probe(pid: Option<u32>, opts: &Options) -> Probe {
    let me = std::process::id();
    let [proxy_cpus_steal, run_cpus_steal] = procfs::steal_ns([&opts.proxy_cpus, &run_cpus(opts)]);
    Probe {
        proxy_cpus_steal,
        run_cpus_steal,
        cpu: pid.map(procfs::cpu).unwrap_or_default(),
        ipis: procfs::ipis(),
        loadgen_cpu: procfs::threads_cpu_ns(me, "perf-load").unwrap_or(0),
        loadgen_wait: procfs::threads_wait_ns(me, "perf-load"),
        backend_cpu: procfs::threads_cpu_ns(me, "perf-backend").unwrap_or(0),
    }
}

/// The CPUs a run uses: the proxy's and the load generator's, or none
/// (meaning all) when either set is unpinned.
fn run_cpus(opts: &Options) -> Vec<usize> {
    if opts.proxy_cpus.is_empty() || opts.loadgen_cpus.is_empty() {
        return Vec::new();
    }
    let mut cpus: Vec<usize> = opts
        .proxy_cpus
        .iter()
        .chain(&opts.loadgen_cpus)
        .copied()
        .collect();
    cpus.sort_unstable();
    cpus.dedup();
    cpus
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

/// Latency and CPU metrics of a request/response run.
pub(crate) fn rr_sample(
    opts: &Options,
    target: &Running,
    run: usize,
    spec: LoadSpec,
    rate_key: &'static str,
    cpu_key: &'static str,
) -> anyhow::Result<Sample> {
    rr_sample_around(opts, target, run, spec, (rate_key, cpu_key), || {}, || {})
}

/// [`rr_sample`], calling `started` right after the measured window's first
/// probe and `ending` right after its last (a profiler attached for the
/// window: see `cpu_split`).
pub(crate) fn rr_sample_around(
    opts: &Options,
    target: &Running,
    run: usize,
    spec: LoadSpec,
    (rate_key, cpu_key): (&'static str, &'static str),
    mut started: impl FnMut(),
    mut ending: impl FnMut(),
) -> anyhow::Result<Sample> {
    let pid = target.pid();
    let (mut p0, mut p1) = (Probe::default(), Probe::default());
    let (res, elapsed) = loadgen::run_window(
        spec,
        &opts.loadgen_cpus,
        opts.warmup,
        opts.duration,
        || {
            p0 = probe(pid, opts);
            started();
        },
        || {
            p1 = probe(pid, opts);
            ending();
        },
    )?;
    let n = res.completed.max(1) as f64;
    let h = &res.latency;
    let mut m = std::collections::BTreeMap::new();
    m.insert(rate_key, res.completed as f64 / elapsed.as_secs_f64());
    m.insert("p50_us", us(h.value_at_quantile(0.50)));
    m.insert("p90_us", us(h.value_at_quantile(0.90)));
    m.insert("p99_us", us(h.value_at_quantile(0.99)));
    m.insert("p999_us", us(h.value_at_quantile(0.999)));
    m.insert("max_us", us(h.max()));
    m.insert("errors", res.errors as f64);
    m.insert(
        "steal_ms",
        p1.run_cpus_steal.saturating_sub(p0.run_cpus_steal) as f64 / 1e6,
    );
    m.insert("ipi_per_req", (p1.ipis - p0.ipis) as f64 / n);
    // The other side of every request: where the load generator's core
    // goes (it also runs the backends), for telling which one saturates.
    let window_ns = elapsed.as_nanos() as f64;
    let loadgen = p1.loadgen_cpu.saturating_sub(p0.loadgen_cpu) as f64;
    let backends = p1.backend_cpu.saturating_sub(p0.backend_cpu) as f64;
    m.insert("loadgen_us_per_req", loadgen / 1000.0 / n);
    m.insert("loadgen_wakeups_per_req", res.wakeups as f64 / n);
    m.insert(
        "loadgen_events_per_wakeup",
        res.events as f64 / res.wakeups.max(1) as f64,
    );
    m.insert("backend_us_per_req", backends / 1000.0 / n);
    m.insert("loadgen_util", loadgen / window_ns);
    m.insert(
        "loadgen_wait_share",
        p1.loadgen_wait.saturating_sub(p0.loadgen_wait) as f64 / window_ns,
    );
    if pid.is_some() {
        let cpu = p1.cpu.since(&p0.cpu);
        m.insert(cpu_key, cpu.total().as_nanos() as f64 / 1000.0 / n);
        m.insert("user_us", cpu.user_ns as f64 / 1000.0 / n);
        m.insert("sys_us", cpu.sys_ns as f64 / 1000.0 / n);
        m.insert("ctx_switches_per_req", cpu.ctx_switches as f64 / n);
        m.insert(
            "proxy_cpu_util",
            cpu.total().as_secs_f64() / elapsed.as_secs_f64(),
        );
        // Where a tail comes from when it is not the proxy's own work: time
        // the hypervisor took the proxy's core.
        m.insert(
            "proxy_cpus_steal_ms",
            p1.proxy_cpus_steal.saturating_sub(p0.proxy_cpus_steal) as f64 / 1e6,
        );
    }
    if res.completed == 0 {
        anyhow::bail!("no request completed ({} errors)", res.errors);
    }
    Ok(Sample {
        target: target.kind,
        run,
        metrics: m,
        latency: Some(res.latency),
    })
}

/// One open-loop keep-alive run at `rate` requests/s over
/// `opts.connections` connections (scenario b).
fn open_keepalive(opts: &Options, t: &Running, run: usize, rate: f64) -> anyhow::Result<Sample> {
    let s = spec(
        opts,
        t.fronts.http,
        Pace::Open(rate),
        true,
        opts.connections,
    );
    rr_sample(opts, t, run, s, "rps", "cpu_us_per_req")
}

pub(crate) fn spec(
    opts: &Options,
    to: SocketAddr,
    pace: Pace,
    keepalive: bool,
    conns: usize,
) -> LoadSpec {
    LoadSpec {
        target: to,
        connections: conns,
        pace,
        keepalive,
        sources: loadgen::loopback_sources(opts.sources),
    }
}

/// Runs `f` for every target, `runs` times, interleaved; a run the host
/// stole from is repeated (see [`unless_stolen`]).
fn interleaved(
    opts: &Options,
    targets: &mut [Running],
    v: &mut Variant,
    mut f: impl FnMut(&mut Running, usize) -> anyhow::Result<Sample>,
) {
    for run in 0..opts.runs {
        for t in targets.iter_mut() {
            let kind = t.kind;
            let sample = unless_stolen(opts, kind, run, &mut v.notes, || f(t, run));
            match sample {
                Ok(s) => v.samples.push(s),
                Err(e) => v.notes.push(format!(
                    "{} run {}: failed: {e:#}{}",
                    t.kind.name(),
                    run + 1,
                    if t.alive() {
                        String::new()
                    } else {
                        format!("\n{}", t.log_tail())
                    }
                )),
            }
        }
    }
    v.finish();
}

/// Runs `f` again while its sample's CPUs lost more than
/// `opts.max_steal_share` of the window to the hypervisor (`steal_ms`), at
/// most `opts.steal_repeats` times, noting each repeat; the last attempt is
/// kept whatever its steal, and flagged. The criterion is the host's, not
/// the target's (its latency is never looked at), and the same for every
/// target.
fn unless_stolen(
    opts: &Options,
    kind: Kind,
    run: usize,
    notes: &mut Vec<String>,
    mut f: impl FnMut() -> anyhow::Result<Sample>,
) -> anyhow::Result<Sample> {
    let Some(share) = opts.max_steal_share else {
        return f();
    };
    let limit_ms = share * opts.duration.as_secs_f64() * 1000.0;
    let mut attempt = 0;
    loop {
        let sample = f()?;
        let stolen = sample.metrics.get("steal_ms").copied().unwrap_or(0.0);
        if stolen <= limit_ms {
            return Ok(sample);
        }
        let p99 = sample
            .metrics
            .get("p99_us")
            .map_or(String::new(), |p| format!(", p99 {p:.0} µs"));
        if attempt == opts.steal_repeats {
            notes.push(format!(
                "{} run {}: KEPT with {stolen:.0} ms of steal after {attempt} repeats (limit {limit_ms:.0} ms){p99}",
                kind.name(),
                run + 1
            ));
            return Ok(sample);
        }
        attempt += 1;
        notes.push(format!(
            "{} run {}: repeated: the hypervisor took {stolen:.0} ms of its CPUs (limit {limit_ms:.0} ms){p99}",
            kind.name(),
            run + 1
        ));
    }
}

const RR_COLUMNS: &[Column] = &[
    col("rps", "req/s", false),
    col("p50_us", "p50 µs", true),
    col("p99_us", "p99 µs", true),
    col("p999_us", "p99.9 µs", true),
    col("cpu_us_per_req", "CPU µs/req", true),
    col("ipi_per_req", "IPI/req", true),
];

/// (a) keep-alive request/response, closed loop.
pub fn keepalive(opts: &Options, targets: &mut [Running]) -> Variant {
    let mut v = Variant::new(
        "a_keepalive",
        format!(
            "(a) keep-alive request/response, closed loop: {} connections, {} runs × {:?}",
            opts.connections, opts.runs, opts.duration
        ),
        RR_COLUMNS,
    );
    interleaved(opts, targets, &mut v, |t, run| {
        let s = spec(opts, t.fronts.http, Pace::Closed, true, opts.connections);
        rr_sample(opts, t, run, s, "rps", "cpu_us_per_req")
    });
    v
}

/// Each target's closed-loop keep-alive maximum (req/s, median of (a)).
#[derive(Debug, Clone, Default)]
pub struct Capacity(BTreeMap<Kind, f64>);

impl Capacity {
    pub fn from_keepalive(a: &Variant) -> Capacity {
        Capacity(
            Kind::ALL
                .iter()
                .filter_map(|&k| Some((k, a.median(k, "rps")?)))
                .collect(),
        )
    }

    pub fn of(&self, kind: Kind) -> Option<f64> {
        self.0.get(&kind).copied()
    }

    /// The proxy target with the lowest maximum: a rate below it is one
    /// every proxy can serve.
    pub fn slowest_proxy(&self) -> Option<(Kind, f64)> {
        self.0
            .iter()
            .filter(|(k, _)| k.is_proxy())
            .map(|(&k, &r)| (k, r))
            .min_by(|a, b| a.1.total_cmp(&b.1))
    }

    /// One line: every target's maximum.
    pub fn describe(&self) -> String {
        let each: Vec<String> = self
            .0
            .iter()
            .map(|(k, r)| format!("{} {r:.0}", k.name()))
            .collect();
        format!("closed-loop maxima from (a), req/s: {}", each.join(", "))
    }
}

/// (b) open loop at `rate` requests/s. A target whose own maximum (from
/// (a)) is below `rate` is flagged over capacity: its latency is the
/// queue it cannot drain, not comparable with the others', so it gets no
/// added p99.
pub fn open_loop(
    opts: &Options,
    targets: &mut [Running],
    rate: f64,
    label: &str,
    capacity: &Capacity,
) -> Variant {
    let mut v = Variant::new(
        match label.split_once('%') {
            Some((percent, _)) => format!("b_open_{}", percent.trim()),
            None => format!("b_open_{rate:.0}rps"),
        },
        format!(
            "(b) open loop at {:.0} req/s ({label}), {} connections, latency from the scheduled time",
            rate, opts.connections
        ),
        &[
            col("rps", "req/s", false),
            col("p50_us", "p50 µs", true),
            col("p99_us", "p99 µs", true),
            col("p999_us", "p99.9 µs", true),
            col("added_p99_us", "added p99 µs", true),
            col("cpu_us_per_req", "CPU µs/req", true),
            col("steal_ms", "steal ms", true),
        ],
    );
    interleaved(opts, targets, &mut v, |t, run| {
        open_keepalive(opts, t, run, rate)
    });
    let over: Vec<Kind> = targets
        .iter()
        .map(|t| t.kind)
        .filter(|&k| capacity.of(k).is_some_and(|max| rate > max))
        .collect();
    if !capacity.0.is_empty() {
        v.notes.push(capacity.describe());
    }
    for &k in &over {
        v.notes.push(format!(
            "{} is OVER CAPACITY at this rate (its max {:.0} req/s): its latency is queueing, not comparable",
            k.name(),
            capacity.of(k).unwrap_or_default()
        ));
    }
    // Added latency: each proxy's p99 minus direct's median p99.
    if let Some(direct) = v.median(Kind::Direct, "p99_us") {
        for s in v.samples.iter_mut() {
            if s.target.is_proxy() && !over.contains(&s.target) {
                if let Some(p) = s.metrics.get("p99_us").copied() {
                    s.metrics.insert("added_p99_us", p - direct);
                }
            }
        }
        v.finish();
    }
    v
}

/// What the overload scenario offers past each target's maximum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OverloadLoad {
    /// Requests on `connections` keep-alive connections: one request in
    /// flight per connection, the rest wait in the generator, so the proxy
    /// sees a steady set of busy connections.
    KeepAlive,
    /// A new connection per request, up to `overload_sessions` at once (the
    /// closed-loop maximum is measured with as many, the depth at which a
    /// proxy batches most): a flood of connections the proxy must accept
    /// while serving the ones it has.
    NewConnections,
}

/// (o) overload: for each target and run, its closed-loop maximum measured
/// right then, then an open loop at `overload_factor` × that maximum, so
/// every target is past saturation by the same share (a maximum taken from
/// (a) minutes earlier drifted with the host, and a target whose (a) ran
/// fast was pushed harder than the others). Proxies run under a CPU cap
/// (`overload_cpu_cap`, see `cpu_cap`) so that they, not the load
/// generator's core, saturate. Reports the latency (from the scheduled
/// time) and the share of the offered requests served within the window.
pub fn overload(opts: &Options, targets: &mut [Running], load: OverloadLoad) -> Variant {
    let factor = opts.overload_factor;
    let same_rate = opts.overload_same_rate;
    let cap = opts
        .overload_cpu_cap
        .map(|share| CpuCap::create(share).map_err(|e| (share, e)));
    let capped = match &cap {
        Some(Ok(cap)) => format!(", proxies capped at {:.2} CPU", cap.share),
        _ => String::new(),
    };
    let (id, what) = match load {
        OverloadLoad::KeepAlive => (
            "o_overload",
            format!("{} keep-alive connections", opts.connections),
        ),
        OverloadLoad::NewConnections => (
            "o_overload_connections",
            format!(
                "a new connection per request, up to {} at once (the maximum too)",
                opts.overload_sessions
            ),
        ),
    };
    let (id, offered) = if same_rate {
        (
            format!("{id}_same_rate"),
            format!(
                "open loop at {factor}× the highest proxy's closed-loop maximum (measured in a first pass), the same rate for every target"
            ),
        )
    } else {
        (
            id.to_string(),
            format!(
                "open loop at {factor}× each target's own closed-loop maximum measured just before"
            ),
        )
    };
    let mut v = Variant::new(
        id,
        format!("(o) overload: {offered}{capped}; {what}"),
        &[
            col("max_rps", "own max req/s", false),
            col("offered_rps", "offered req/s", false),
            col("rps", "served req/s", false),
            col("served_share", "served share", false),
            col("p50_us", "p50 µs", true),
            col("p99_us", "p99 µs", true),
            col("errors", "errors", true),
            col("cpu_us_per_req", "CPU µs/req", true),
            col("proxy_cpu_util", "proxy CPU busy", false),
            col("loadgen_us_per_req", "generator µs/req", true),
            col("loadgen_wakeups_per_req", "generator wake-ups/req", true),
            col("loadgen_events_per_wakeup", "events/wake-up", false),
            col("backend_us_per_req", "backends µs/req", true),
            col("loadgen_util", "generator busy", false),
            col("loadgen_wait_share", "generator waiting", true),
        ],
    );
    let cap = match cap {
        Some(Ok(cap)) => Some(cap),
        Some(Err((share, e))) => {
            v.notes.push(format!(
                "proxies NOT capped at {share} CPU ({e:#}): the load generator's core may saturate before the proxy's"
            ));
            None
        }
        None => None,
    };
    // A cgroup that takes no process (a host that delegates cgroups
    // differently) leaves that run uncapped, said in a note, never failed.
    let cap_notes = std::cell::RefCell::new(Vec::new());
    let under_cap = |t: &Running, run: usize, f: &mut dyn FnMut() -> anyhow::Result<Sample>| {
        let pid = t.pid().filter(|_| t.kind.is_proxy());
        let capped = match (&cap, pid) {
            (Some(cap), Some(pid)) => match cap.enter(pid) {
                Ok(()) => Some((cap, pid)),
                Err(e) => {
                    cap_notes.borrow_mut().push(format!(
                        "{} run {}: NOT capped ({e:#})",
                        t.kind.name(),
                        run + 1
                    ));
                    let _ = cap.leave(pid);
                    None
                }
            },
            _ => None,
        };
        let sample = f();
        if let Some((cap, pid)) = capped {
            // Else the cap's drop, at the end of this scenario, moves it.
            if let Err(e) = cap.leave(pid) {
                cap_notes.borrow_mut().push(format!(
                    "{} run {}: still capped after its run ({e:#})",
                    t.kind.name(),
                    run + 1
                ));
            }
        }
        sample
    };
    // Same rate: every target's maximum first (interleaved, under the same
    // cap), then one rate for all, from the fastest proxy's median maximum,
    // so that each serves what it can of one and the same flood.
    let common_rate = if same_rate {
        let mut maxima: BTreeMap<Kind, Vec<f64>> = BTreeMap::new();
        for run in 0..opts.runs {
            for t in targets.iter_mut() {
                match under_cap(t, run, &mut || {
                    let closed = overload_specs(opts, t, load).0;
                    rr_sample(opts, t, run, closed, "rps", "cpu_us_per_req")
                }) {
                    Ok(s) => maxima
                        .entry(t.kind)
                        .or_default()
                        .push(s.metrics.get("rps").copied().unwrap_or_default()),
                    Err(e) => v.notes.push(format!(
                        "{} maximum, run {}: failed: {e:#}",
                        t.kind.name(),
                        run + 1
                    )),
                }
            }
        }
        let highest = targets
            .iter()
            .filter(|t| t.kind.is_proxy())
            .filter_map(|t| maxima.get(&t.kind).map(|m| (t.kind, median(m))))
            .max_by(|a, b| a.1.total_cmp(&b.1));
        match highest {
            Some((kind, max)) => {
                v.notes.push(format!(
                    "offered {:.0} req/s to every target: {factor}× {}'s median maximum, {max:.0} req/s",
                    max * factor,
                    kind.name()
                ));
                Some((max * factor, maxima))
            }
            None => {
                v.notes
                    .push("no proxy's maximum was measured: nothing offered".into());
                v.finish();
                v.notes.extend(cap_notes.into_inner());
                return v;
            }
        }
    } else {
        None
    };
    interleaved(opts, targets, &mut v, |t, run| {
        under_cap(t, run, &mut || match &common_rate {
            Some((rate, maxima)) => {
                let own = maxima
                    .get(&t.kind)
                    .and_then(|m| m.get(run))
                    .copied()
                    .unwrap_or_default();
                overload_open(opts, t, run, load, *rate, own)
            }
            None => overload_run(opts, t, run, factor, load),
        })
    });
    v.notes.extend(cap_notes.into_inner());
    v
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// The closed-loop spec that measures a target's maximum under `load`, and
/// the open loop's sessions and keep-alive.
fn overload_specs(opts: &Options, t: &Running, load: OverloadLoad) -> (LoadSpec, usize, bool) {
    let to = t.fronts.http;
    match load {
        OverloadLoad::KeepAlive => (
            spec(opts, to, Pace::Closed, true, opts.connections),
            opts.connections,
            true,
        ),
        OverloadLoad::NewConnections => (
            spec(opts, to, Pace::Closed, false, opts.overload_sessions),
            opts.overload_sessions,
            false,
        ),
    }
}

/// One (o) run: the closed-loop maximum, then the open loop past it.
fn overload_run(
    opts: &Options,
    t: &Running,
    run: usize,
    factor: f64,
    load: OverloadLoad,
) -> anyhow::Result<Sample> {
    let closed = overload_specs(opts, t, load).0;
    let max = rr_sample(opts, t, run, closed, "rps", "cpu_us_per_req")?
        .metrics
        .get("rps")
        .copied()
        .unwrap_or_default();
    overload_open(opts, t, run, load, max * factor, max)
}

/// The open loop of an (o) run at `rate`, for a target whose own maximum is
/// `max`.
fn overload_open(
    opts: &Options,
    t: &Running,
    run: usize,
    load: OverloadLoad,
    rate: f64,
    max: f64,
) -> anyhow::Result<Sample> {
    let (_, open_sessions, keepalive) = overload_specs(opts, t, load);
    let open = spec(
        opts,
        t.fronts.http,
        Pace::Open(rate),
        keepalive,
        open_sessions,
    );
    let mut sample = rr_sample(opts, t, run, open, "rps", "cpu_us_per_req")?;
    let served = sample.metrics.get("rps").copied().unwrap_or_default();
    sample.metrics.insert("max_rps", max);
    sample.metrics.insert("offered_rps", rate);
    sample.metrics.insert("served_share", served / rate);
    Ok(sample)
}

/// (c) a new connection per request, closed loop.
pub fn connection_per_request(opts: &Options, targets: &mut [Running]) -> Variant {
    let conns = opts.connect_concurrency;
    let mut v = Variant::new(
        "c_connections",
        format!(
            "(c) new connection per request (Connection: close; server closes first), {conns} concurrent, {} runs × {:?}",
            opts.runs, opts.duration
        ),
        &[
            col("cps", "conn/s", false),
            col("p50_us", "p50 µs", true),
            col("p99_us", "p99 µs", true),
            col("cpu_us_per_conn", "CPU µs/conn", true),
            col("errors", "errors", true),
        ],
    );
    interleaved(opts, targets, &mut v, |t, run| {
        let s = spec(opts, t.fronts.http, Pace::Closed, false, conns);
        rr_sample(opts, t, run, s, "cps", "cpu_us_per_conn")
    });
    v
}

/// (d) bulk transfer in one direction.
pub fn bulk(opts: &Options, targets: &mut [Running], backends: &Backends, upload: bool) -> Variant {
    let dir = if upload {
        "upload (client → backend)"
    } else {
        "download (backend → client)"
    };
    let mut v = Variant::new(
        if upload {
            "d_bulk_upload"
        } else {
            "d_bulk_download"
        },
        format!(
            "(d) bulk {dir}: {} streams, {} runs × {:?}",
            opts.bulk_streams, opts.runs, opts.duration
        ),
        &[
            col("mbps", "MB/s", false),
            col("cpu_ms_per_gb", "CPU ms/GB", true),
            col("proxy_cpu_util", "proxy CPU %/100", true),
        ],
    );
    interleaved(opts, targets, &mut v, |t, run| {
        bulk_sample(opts, t, run, backends, upload)
    });
    v
}

fn bulk_sample(
    opts: &Options,
    target: &Running,
    run: usize,
    backends: &Backends,
    upload: bool,
) -> anyhow::Result<Sample> {
    let stop = Arc::new(AtomicBool::new(false));
    let downloaded = Arc::new(AtomicU64::new(0));
    let sources = loadgen::loopback_sources(opts.sources);
    let mut threads = Vec::new();
    for i in 0..opts.bulk_streams.max(1) {
        let stream =
            loadgen::connect_blocking(target.fronts.bulk, Some(sources[i % sources.len()]))
                .context("bulk connect")?;
        let (stop, downloaded) = (Arc::clone(&stop), Arc::clone(&downloaded));
        let cpus = opts.loadgen_cpus.clone();
        threads.push(std::thread::spawn(move || {
            let _ = procfs::pin_current_thread(&cpus);
            let _ = bulk_client(stream, upload, &stop, &downloaded);
        }));
    }
    let counter = || {
        if upload {
            backends.bulk_received.load(Ordering::Relaxed)
        } else {
            downloaded.load(Ordering::Relaxed)
        }
    };
    let pid = target.pid();
    std::thread::sleep(opts.warmup);
    let (b0, p0, t0) = (counter(), probe(pid, opts), Instant::now());
    std::thread::sleep(opts.duration);
    let (b1, p1, elapsed) = (counter(), probe(pid, opts), t0.elapsed());
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let bytes = (b1 - b0) as f64;
    if bytes == 0.0 {
        anyhow::bail!("no byte moved");
    }
    let mut m = std::collections::BTreeMap::new();
    m.insert("mbps", bytes / 1e6 / elapsed.as_secs_f64());
    if pid.is_some() {
        let cpu = p1.cpu.since(&p0.cpu);
        m.insert(
            "cpu_ms_per_gb",
            cpu.total().as_secs_f64() * 1000.0 / (bytes / 1e9),
        );
        m.insert(
            "proxy_cpu_util",
            cpu.total().as_secs_f64() / elapsed.as_secs_f64(),
        );
    }
    Ok(Sample {
        target: target.kind,
        run,
        metrics: m,
        latency: None,
    })
}

fn bulk_client(
    mut s: std::net::TcpStream,
    upload: bool,
    stop: &AtomicBool,
    downloaded: &AtomicU64,
) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_millis(100)))?;
    s.set_write_timeout(Some(Duration::from_millis(100)))?;
    let op = if upload { b'U' } else { b'D' };
    s.write_all(&bulk_command(op, u64::MAX / 2))?;
    let mut buf = vec![0u8; 256 * 1024];
    while !stop.load(Ordering::Relaxed) {
        let r = if upload {
            s.write(&buf)
        } else {
            s.read(&mut buf)
        };
        match r {
            Ok(0) => break,
            Ok(n) => {
                if !upload {
                    downloaded.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// (e) RSS per 1,000 idle proxied connections; a fresh proxy per run.
pub fn idle_memory(
    opts: &Options,
    kinds: &[Kind],
    setup: &targets::Setup,
    backends: &Backends,
) -> Variant {
    let n = opts.idle_connections;
    let mut v = Variant::new(
        "e_idle_memory",
        format!(
            "(e) memory: RSS growth per 1,000 idle proxied connections ({n} open, each echoed one byte), fresh proxy per run"
        ),
        &[
            col("rss_mb_per_1k", "MB per 1k conns", true),
            col("rss_before_mb", "RSS before MB", true),
            col("rss_after_mb", "RSS after MB", true),
        ],
    );
    v.notes
        .push("direct has no proxy process: not applicable".into());
    for run in 0..opts.runs {
        for &kind in kinds.iter().filter(|k| k.is_proxy()) {
            match idle_sample(opts, kind, setup, backends, run) {
                Ok(s) => v.samples.push(s),
                Err(e) => v
                    .notes
                    .push(format!("{} run {}: failed: {e:#}", kind.name(), run + 1)),
            }
        }
    }
    v.finish();
    v
}

fn ping(s: &mut std::net::TcpStream) -> std::io::Result<()> {
    s.write_all(b"x")?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)
}

fn idle_sample(
    opts: &Options,
    kind: Kind,
    setup: &targets::Setup,
    backends: &Backends,
    run: usize,
) -> anyhow::Result<Sample> {
    let target = targets::start(
        kind,
        setup,
        backends,
        &format!("mem{run}"),
        &Default::default(),
    )?;
    let pid = target.pid().context("no pid")?;
    let sources = loadgen::loopback_sources(opts.sources);
    let settle = if opts.quick {
        Duration::from_millis(200)
    } else {
        Duration::from_millis(500)
    };
    // Warm up: the first connections allocate what every later one shares.
    for i in 0..32 {
        let mut s =
            loadgen::connect_blocking(target.fronts.echo, Some(sources[i % sources.len()]))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        ping(&mut s)?;
    }
    std::thread::sleep(settle);
    let before = procfs::rss_bytes(pid);
    let mut held = Vec::with_capacity(opts.idle_connections);
    for i in 0..opts.idle_connections {
        let mut s = loadgen::connect_blocking(target.fronts.echo, Some(sources[i % sources.len()]))
            .with_context(|| format!("connection {i}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        ping(&mut s).with_context(|| format!("echo on connection {i}"))?;
        held.push(s);
    }
    std::thread::sleep(settle);
    let after = procfs::rss_bytes(pid);
    drop(held);
    let n = opts.idle_connections.max(1) as f64;
    let mut m = std::collections::BTreeMap::new();
    m.insert(
        "rss_mb_per_1k",
        (after as f64 - before as f64) / n * 1000.0 / 1e6,
    );
    m.insert("rss_before_mb", before as f64 / 1e6);
    m.insert("rss_after_mb", after as f64 / 1e6);
    Ok(Sample {
        target: kind,
        run,
        metrics: m,
        latency: None,
    })
}

/// (g) edgeproxy latency while the routing table changes every 100 ms,
/// interleaved with the same load on an unchanging table. Connection per
/// request, open loop: every request reads the routing snapshot.
///
/// Twice `--runs` pairs of adjacent runs (edgeproxy is the only target, so
/// it can afford them). A single run's p99 here swings by 2× and more with
/// the shared VM's background load, and now and then one run meets a stall
/// of tens of milliseconds: the goal is judged on the median over pairs of
/// each pair's p99 ratio (adjacent runs share their background; the median
/// ignores the odd stalled run). All runs pooled into one histogram per kind
/// are reported too.
pub fn hot_reload(
    opts: &Options,
    setup: &targets::Setup,
    backends: &Backends,
) -> anyhow::Result<(Variant, crate::report::Series)> {
    let rows = 100;
    let edge = targets::EdgeOptions {
        reload_interval_ms: 50,
        rows_per_app: rows,
        ..Default::default()
    };
    let mut target = targets::start(Kind::Edgeproxy, setup, backends, "reload", &edge)?;
    let rate = opts.reload_rate;
    let mut v = Variant::new(
        "g_hot_reload",
        format!(
            "(g) hot reload: open loop {rate:.0} conn/s (connection per request) through edgeproxy, {rows} routing rows; \
             'reload' runs change a row every 100 ms (reload interval 50 ms), 'steady' runs change nothing"
        ),
        &[
            col("steady_p50_us", "steady p50 µs", true),
            col("steady_p99_us", "steady p99 µs", true),
            col("reload_p50_us", "reload p50 µs", true),
            col("reload_p99_us", "reload p99 µs", true),
            col("reload_p999_us", "reload p99.9 µs", true),
            col("reloads", "reloads/run", false),
            col("control_us_per_reload", "reload CPU µs/reload", true),
            col("steady_shard_wait_ms_per_s", "steady shard wait ms/s", true),
            col("reload_shard_wait_ms_per_s", "reload shard wait ms/s", true),
        ],
    );
    // How long the shards sat runnable while something else had their core:
    // the delay a reload imposes, measured by the kernel per thread.
    let shard_wait = |t: &targets::Running| {
        t.pid()
            .map(|pid| procfs::threads_wait_ns(pid, "shard-"))
            .unwrap_or(0)
    };
    // The CPU a reload costs (its ticks included), which unlike a p99 barely
    // moves with noise: edgeproxy's `routing-reload` thread, or in builds
    // without it the control thread (the process's main thread, named after
    // the binary).
    let control_cpu = |t: &targets::Running| {
        t.pid()
            .and_then(|pid| {
                procfs::threads_cpu_ns(pid, "routing-reload")
                    .or_else(|| procfs::threads_cpu_ns(pid, "edgeproxy"))
            })
            .unwrap_or(0)
    };
    let db = target.routing_db.clone().context("routing db")?;
    let mut steady_h = loadgen::new_histogram();
    let mut reload_h = loadgen::new_histogram();
    // The same pairs against `direct` (no proxy; the writer still writes):
    // how much of a pair's difference is the machine and the harness.
    let direct = targets::start(Kind::Direct, setup, backends, "reload-direct", &edge)?;
    // p99 reloading ÷ p99 steady of each pair of adjacent runs, per target.
    let mut pair_ratios: std::collections::BTreeMap<Kind, Vec<f64>> = Default::default();
    let mut steal_notes = Vec::new();
    for run in 0..opts.runs * 2 {
        for t in [&direct, &target] {
            let mut steady_p99 = None;
            for reloading in [false, true] {
                let stop = Arc::new(AtomicBool::new(false));
                let writer = reloading.then(|| {
                    let stop = Arc::clone(&stop);
                    let db = db.clone();
                    std::thread::spawn(move || table_writer(&db, rows, &stop))
                });
                let reloads0 = t.reloads.load(Ordering::Relaxed);
                let control0 = control_cpu(t);
                let wait0 = shard_wait(t);
                let started = Instant::now();
                // A run the host stole from is repeated, as in the other
                // request/response scenarios: a pair's ratio is otherwise
                // the steal's (run 35: pair ratios 0.39–2.55×).
                let res = unless_stolen(opts, t.kind, run, &mut steal_notes, || {
                    let s = spec(
                        opts,
                        t.fronts.http,
                        Pace::Open(rate),
                        false,
                        opts.connect_concurrency,
                    );
                    rr_sample(opts, t, run, s, "cps", "cpu_us_per_conn")
                });
                stop.store(true, Ordering::Relaxed);
                let changes = writer.map(|w| w.join().unwrap_or(0));
                let reloads = t.reloads.load(Ordering::Relaxed) - reloads0;
                let control_ns = control_cpu(t).saturating_sub(control0);
                let wait_ns = shard_wait(t).saturating_sub(wait0);
                let wall = started.elapsed();
                match res {
                    Ok(mut s) => {
                        let h = s.latency.take().unwrap_or_else(loadgen::new_histogram);
                        let prefix = if reloading { "reload" } else { "steady" };
                        let mut m = std::collections::BTreeMap::new();
                        for (key, q) in [("p50_us", 0.5), ("p99_us", 0.99), ("p999_us", 0.999)] {
                            let name: &'static str = match (prefix, key) {
                                ("steady", "p50_us") => "steady_p50_us",
                                ("steady", "p99_us") => "steady_p99_us",
                                ("steady", _) => "steady_p999_us",
                                (_, "p50_us") => "reload_p50_us",
                                (_, "p99_us") => "reload_p99_us",
                                _ => "reload_p999_us",
                            };
                            m.insert(name, us(h.value_at_quantile(q)));
                        }
                        let p99 = us(h.value_at_quantile(0.99));
                        match (reloading, steady_p99) {
                            (false, _) => steady_p99 = Some(p99),
                            (true, Some(steady)) if steady > 0.0 => {
                                pair_ratios.entry(t.kind).or_default().push(p99 / steady)
                            }
                            _ => {}
                        }
                        if let Some(c) = s.metrics.get("cpu_us_per_conn") {
                            m.insert(
                                if reloading {
                                    "reload_cpu_us_per_conn"
                                } else {
                                    "steady_cpu_us_per_conn"
                                },
                                *c,
                            );
                        }
                        m.insert(
                            if reloading {
                                "reload_shard_wait_ms_per_s"
                            } else {
                                "steady_shard_wait_ms_per_s"
                            },
                            wait_ns as f64 / 1e6 / wall.as_secs_f64(),
                        );
                        if t.kind != Kind::Edgeproxy {
                            // Only latency means anything without a proxy.
                            m.retain(|k, _| k.ends_with("_us"));
                        } else if reloading {
                            m.insert("reloads", reloads as f64);
                            if reloads > 0 {
                                m.insert(
                                    "control_us_per_reload",
                                    control_ns as f64 / 1e3 / reloads as f64,
                                );
                            }
                            m.insert("changes", changes.unwrap_or(0) as f64);
                            let _ = reload_h.add(&h);
                        } else {
                            let _ = steady_h.add(&h);
                        }
                        s.metrics = m;
                        v.samples.push(s);
                    }
                    Err(e) => {
                        v.notes
                            .push(format!("{} run {}: failed: {e:#}", t.kind.name(), run + 1))
                    }
                }
            }
        }
    }
    v.finish();
    if !steady_h.is_empty() && !reload_h.is_empty() {
        for (name, h) in [("steady", &steady_h), ("reload", &reload_h)] {
            for (key, q) in [("p50_us", 0.5), ("p99_us", 0.99), ("p999_us", 0.999)] {
                v.pooled
                    .insert(format!("{name}_{key}"), us(h.value_at_quantile(q)));
            }
        }
        for (kind, ratios) in &pair_ratios {
            let Some(median) = crate::report::Stat::of(ratios).map(|s| s.median) else {
                continue;
            };
            let key = match kind {
                Kind::Edgeproxy => "p99_ratio_median_of_pairs".to_string(),
                other => format!("{}_p99_ratio_median_of_pairs", other.name()),
            };
            v.pooled.insert(key, median);
            v.notes.push(format!(
                "{}: p99 with the writer ÷ without, per pair of adjacent runs: {} (median {median:.2}×)",
                kind.name(),
                ratios
                    .iter()
                    .map(|r| format!("{r:.2}×"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let p = |k: &str| v.pooled[k];
        v.notes.push(format!(
            "all runs pooled: steady p50 {:.1} / p99 {:.1} / p99.9 {:.1} µs; reloading p50 {:.1} / p99 {:.1} / p99.9 {:.1} µs; p99 reloading ÷ steady = {:.2}×",
            p("steady_p50_us"),
            p("steady_p99_us"),
            p("steady_p999_us"),
            p("reload_p50_us"),
            p("reload_p99_us"),
            p("reload_p999_us"),
            p("reload_p99_us") / p("steady_p99_us"),
        ));
    }
    v.notes.extend(steal_notes);
    if !target.alive() {
        v.notes
            .push(format!("edgeproxy died:\n{}", target.log_tail()));
    }
    Ok((
        v,
        vec![
            ("steady".into(), steady_h),
            ("reload every 100 ms".into(), reload_h),
        ],
    ))
}

/// Changes one routing row every 100 ms until `stop`; returns the number of
/// changes made.
fn table_writer(db: &std::path::Path, rows: usize, stop: &AtomicBool) -> u64 {
    let Ok(conn) = rusqlite::Connection::open(db) else {
        return 0;
    };
    let _ = conn.busy_timeout(Duration::from_secs(1));
    // The writer stands in for an operator's tool and shares the load
    // generator's core: it must not delay the load generator's own
    // measurements. So: no fsync per commit (only edgeproxy's reads are under
    // test), and the lowest scheduling priority.
    let _ = conn.execute_batch("PRAGMA synchronous = OFF");
    // SAFETY: setpriority on this thread's own id.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19) };
    // Numbered across runs, so that every write really changes the table
    // (rewriting a row with the values it has changes nothing).
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let row = (k as usize * 7919) % rows;
        let weight = 2 + (k % 97) as i64;
        if conn
            .execute(
                "UPDATE backends SET weight = ?1 WHERE id = ?2",
                rusqlite::params![weight, format!("http-{row}")],
            )
            .is_ok()
        {
            n += 1;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    n
}

/// Tracepoints counted by the syscall census, and their metric names.
const CENSUS_EVENTS: [(&str, &str); 3] = [
    ("raw_syscalls:sys_enter", "syscalls_per_req"),
    ("io_uring:io_uring_submit_req", "uring_ops_per_req"),
    ("irq:softirq_entry", "softirqs_per_req"),
];

/// (s) Syscall census: one extra keep-alive run per proxy with `perf stat`
/// counting tracepoints on the proxy's process for the measured window:
/// syscalls, io_uring operations and softirqs per request. Separate from (a)
/// because tracepoints cost a little per event, and a proxy making more
/// syscalls would pay more: its CPU figures stay in (a).
pub fn syscall_census(opts: &Options, targets: &mut [Running]) -> Variant {
    let mut v = Variant::new(
        "s_syscall_census",
        format!(
            "(s) syscall census: keep-alive closed loop, {} connections, `perf stat` tracepoints on the proxy, {:?}",
            opts.connections, opts.duration
        ),
        &[
            col("rps", "req/s", false),
            col("syscalls_per_req", "syscalls/req", true),
            col("uring_ops_per_req", "io_uring ops/req", true),
            col("softirqs_per_req", "softirqs/req", true),
        ],
    );
    let probe = std::process::Command::new("perf")
        .args(["stat", "-x,", "-e", CENSUS_EVENTS[0].0, "--", "true"])
        .output();
    if !matches!(&probe, Ok(o) if o.status.success()) {
        v.notes
            .push("`perf stat` with tracepoints is not usable here: not measured".into());
        return v;
    }
    for t in targets.iter().filter(|t| t.kind.is_proxy()) {
        let Some(pid) = t.pid() else { continue };
        let out = std::env::temp_dir().join(format!("perf-census-{}-{pid}", std::process::id()));
        let child: std::cell::RefCell<Option<std::process::Child>> = Default::default();
        let events: Vec<&str> = CENSUS_EVENTS.iter().map(|(e, _)| *e).collect();
        // The whole tree: nginx's workers are children of its master.
        let tree: Vec<String> = procfs::process_tree(pid)
            .iter()
            .map(|p| p.to_string())
            .collect();
        let tree = tree.join(",");
        let s = spec(opts, t.fronts.http, Pace::Closed, true, opts.connections);
        let run = loadgen::run_window(
            s,
            &opts.loadgen_cpus,
            opts.warmup,
            opts.duration,
            || {
                *child.borrow_mut() = std::process::Command::new("perf")
                    .args(["stat", "-x,", "-o"])
                    .arg(&out)
                    .args(["-e", &events.join(","), "-p", &tree])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .ok();
            },
            || {
                if let Some(c) = child.borrow_mut().as_mut() {
                    // SAFETY: kill(2) on our own child.
                    unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
                    let _ = c.wait();
                }
            },
        );
        let (res, elapsed) = match run {
            Ok(r) => r,
            Err(e) => {
                v.notes.push(format!("{}: failed: {e}", t.kind.name()));
                continue;
            }
        };
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        let _ = std::fs::remove_file(&out);
        let n = res.completed.max(1) as f64;
        let mut m = std::collections::BTreeMap::new();
        m.insert("rps", res.completed as f64 / elapsed.as_secs_f64());
        for (event, key) in CENSUS_EVENTS {
            let count = text.lines().find_map(|l| {
                let mut f = l.split(',');
                let value = f.next()?;
                (f.nth(1)? == event).then(|| value.parse::<f64>().ok())?
            });
            if let Some(c) = count {
                m.insert(key, c / n);
            }
        }
        v.samples.push(Sample {
            target: t.kind,
            run: 0,
            metrics: m,
            latency: None,
        });
    }
    v.finish();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sample that lost `steal_ms` to the hypervisor.
    fn stolen(steal_ms: f64) -> Sample {
        Sample {
            target: Kind::Edgeproxy,
            run: 0,
            metrics: [("steal_ms", steal_ms), ("p99_us", 100.0)].into(),
            latency: None,
        }
    }

    /// Runs `unless_stolen` over samples with these steal times, in order.
    fn attempts(opts: &Options, steals: &[f64]) -> (f64, usize, Vec<String>) {
        let mut notes = Vec::new();
        let mut calls = 0;
        let kept = unless_stolen(opts, Kind::Edgeproxy, 0, &mut notes, || {
            calls += 1;
            Ok(stolen(steals[calls - 1]))
        })
        .unwrap();
        (kept.metrics["steal_ms"], calls, notes)
    }

    #[test]
    fn a_run_the_host_stole_from_is_repeated_until_one_is_clean() {
        // 1 % of a 3 s window: 30 ms.
        let opts = Options::defaults(false);
        assert_eq!(opts.duration, Duration::from_secs(3));
        let (kept, calls, notes) = attempts(&opts, &[120.0, 40.0, 30.0]);
        assert_eq!((kept, calls), (30.0, 3));
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[0].contains("took 120 ms") && notes[0].contains("limit 30 ms"));
    }

    #[test]
    fn the_last_attempt_is_kept_and_flagged() {
        let opts = Options::defaults(false);
        let (kept, calls, notes) = attempts(&opts, &[50.0, 60.0, 70.0, 0.0]);
        assert_eq!((kept, calls), (70.0, 3));
        assert!(
            notes.last().unwrap().contains("KEPT with 70 ms"),
            "{notes:?}"
        );
    }

    #[test]
    fn without_a_limit_every_run_counts_as_it_came() {
        let mut opts = Options::defaults(false);
        opts.max_steal_share = None;
        let (kept, calls, notes) = attempts(&opts, &[500.0]);
        assert_eq!((kept, calls, notes.len()), (500.0, 1, 0));
        // And the quick (CI smoke) settings never repeat.
        assert_eq!(Options::defaults(true).max_steal_share, None);
    }
}
