//! edgeproxy's perf suite: on one machine, by itself, it starts its own
//! backends on loopback, starts the proxies under test (edgeproxy, a direct
//! connection, HAProxy and nginx when installed), runs the scenarios with
//! interleaved runs and writes a report: a terminal table, `report.json` with
//! every figure, and a latency-percentile SVG per scenario.
//!
//! Entry point: [`run`] with [`Options`] (the `perf` binary parses them from
//! the command line; `tests/perf_smoke.rs` builds them by hand).

pub mod backends;
pub mod byte_pace;
pub mod cpu_cap;
pub mod cpu_split;
pub mod loadgen;
pub mod netns;
pub mod plot;
pub mod pool;
pub mod procfs;
pub mod rate_limit;
pub mod report;
pub mod scenarios;
pub mod targets;
pub mod tls;
pub mod tls_material;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use crate::report::{Goal, PeerStatus, Report, Variant};
use crate::targets::{Kind, Running};

/// Scenarios by letter, as in the README (`s`, the syscall census, is not
/// in the quick set; `r` and `u` run only when asked for).
pub const SCENARIOS: &str = "abocdefgps";

#[derive(Clone, Debug)]
pub struct Options {
    pub quick: bool,
    /// Targets to run; missing peers among them are reported as missing.
    pub targets: Vec<Kind>,
    /// Scenario letters (`a`..`g`).
    pub scenarios: String,
    /// Runs per target per scenario (interleaved).
    pub runs: usize,
    /// Measured time per run (after the warm-up).
    pub duration: Duration,
    pub warmup: Duration,
    /// Keep-alive connections (scenarios a, b).
    pub connections: usize,
    /// Sessions in flight in the connection-per-request scenarios (c, g).
    pub connect_concurrency: usize,
    /// Open-loop rates (b) as fractions of the slowest proxy's closed-loop
    /// keep-alive maximum from (a): a rate every proxy can serve means the
    /// same on any host, however much faster `direct` is.
    pub open_fractions: Vec<f64>,
    /// Open-loop rates (b) in requests/s, instead of the fractions.
    pub open_rates: Vec<f64>,
    /// The slowest proxy's maximum when (a) did not run.
    pub fallback_rate: f64,
    /// Overload (o): open loop at this multiple of each target's own
    /// closed-loop maximum.
    pub overload_factor: f64,
    /// Overload (o): the share of one CPU each proxy may use during it
    /// (a cgroup CPU cap), so the proxy saturates before the load
    /// generator; `None`: uncapped.
    pub overload_cpu_cap: Option<f64>,
    /// Overload (o): offer every target the same rate (the factor times the
    /// fastest proxy's maximum, measured in a first pass) instead of each
    /// its own maximum times the factor.
    pub overload_same_rate: bool,
    /// Overload (o) with new connections: sessions in flight at most (the
    /// generator's slots; more wait in its queue).
    pub overload_sessions: usize,
    /// Connection rate of the hot-reload scenario.
    pub reload_rate: f64,
    pub bulk_streams: usize,
    /// TLS bulk at a fixed rate (f): MB/s over all streams; `None`: a share
    /// of the slowest proxy's closed-loop MB/s in the same run
    /// (`tls_paced_share`).
    pub tls_paced_mbps: Option<f64>,
    /// TLS bulk at a fixed rate (f): the share of the slowest proxy's
    /// closed-loop MB/s, per direction; 0 skips the paced runs.
    pub tls_paced_share: f64,
    /// Client threads in the TLS handshake scenario.
    pub tls_threads: usize,
    pub idle_connections: usize,
    /// Proxy worker threads/processes.
    pub workers: usize,
    pub proxy_cpus: Vec<usize>,
    pub loadgen_cpus: Vec<usize>,
    /// Loopback source addresses the load generator spreads over.
    pub sources: usize,
    /// A request/response run whose CPUs lost more than this share of its
    /// window to the hypervisor (steal time, summed over the run's CPUs) is
    /// run again, at most `steal_repeats` times: on a shared VM such a run's
    /// tail is the host's, not the target's (README, "Steal time").
    /// `None`: never repeated.
    pub max_steal_share: Option<f64>,
    pub steal_repeats: usize,
    pub edgeproxy_bin: PathBuf,
    /// The `minimal` target's binary (built with this crate).
    pub minimal_bin: PathBuf,
    pub haproxy_bin: String,
    pub nginx_bin: String,
    pub out_dir: PathBuf,
    /// The command line, for the report.
    pub command: String,
    /// Print the report to stdout as well.
    pub print: bool,
    /// Which network namespace the suite runs in ([`netns::Network`]'s
    /// line), for the report.
    pub network: String,
}

impl Options {
    /// Defaults for a full run (`quick` = the CI smoke settings). On a
    /// machine with two or more CPUs the proxy gets the last CPU and the load
    /// generator and backends the others.
    pub fn defaults(quick: bool) -> Options {
        let cpus = procfs::cpu_count();
        let (proxy_cpus, loadgen_cpus) = if cpus >= 2 {
            (vec![cpus - 1], (0..cpus - 1).collect())
        } else {
            (vec![], vec![])
        };
        Options {
            quick,
            targets: Kind::DEFAULT.to_vec(),
            scenarios: if quick {
                "abocdefgp".into()
            } else {
                SCENARIOS.into()
            },
            runs: 3,
            duration: if quick {
                Duration::from_millis(300)
            } else {
                Duration::from_secs(3)
            },
            warmup: if quick {
                Duration::from_millis(100)
            } else {
                Duration::from_millis(500)
            },
            connections: 50,
            connect_concurrency: 16,
            open_fractions: if quick {
                vec![0.5]
            } else {
                vec![0.25, 0.5, 0.75]
            },
            open_rates: Vec::new(),
            fallback_rate: 10_000.0,
            overload_factor: 1.2,
            overload_cpu_cap: Some(0.5),
            overload_same_rate: false,
            // A flood deep enough to fill a backlog, yet short enough for a
            // quick run's window (each waits sessions ÷ rate in the proxy).
            overload_sessions: if quick { 64 } else { 512 },
            reload_rate: if quick { 1000.0 } else { 2000.0 },
            bulk_streams: 2,
            tls_paced_mbps: None,
            tls_paced_share: 0.7,
            tls_threads: 2,
            idle_connections: if quick { 500 } else { 5000 },
            workers: 1,
            proxy_cpus,
            loadgen_cpus,
            sources: 8,
            // A quick run's window (0.3 s) is shorter than the steal
            // counter's tick resolution allows judging.
            max_steal_share: (!quick).then_some(0.01),
            steal_repeats: 2,
            edgeproxy_bin: default_edgeproxy_bin(),
            minimal_bin: std::env::current_exe()
                .ok()
                .and_then(|exe| Some(exe.parent()?.join("minimal-proxy")))
                .unwrap_or_else(|| PathBuf::from("minimal-proxy")),
            haproxy_bin: "haproxy".into(),
            nginx_bin: "nginx".into(),
            out_dir: PathBuf::from("perf-report"),
            command: String::new(),
            print: true,
            network: "network: the host's namespace (the suite's library, not its binary)".into(),
        }
    }
}

/// `edgeproxy` next to the running executable (`target/release/` when run
/// with `cargo run --release -p perf`), or `EDGEPROXY_BIN`.
pub fn default_edgeproxy_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("EDGEPROXY_BIN") {
        return p.into();
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("edgeproxy")))
        .unwrap_or_else(|| PathBuf::from("edgeproxy"))
}

/// Runs the suite and writes the report files into `opts.out_dir`.
pub fn run(opts: &Options) -> anyhow::Result<Report> {
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let load_before = procfs::loadavg();
    procfs::raise_nofile();
    // The suite's own threads (and so the load generator) stay off the
    // proxy's CPUs.
    let _ = procfs::pin_current_thread(&opts.loadgen_cpus);
    std::fs::create_dir_all(&opts.out_dir)
        .with_context(|| format!("cannot create {}", opts.out_dir.display()))?;
    // One directory per run: two suites run by one process (the smoke
    // tests, in parallel) must not share one, or the first to finish
    // removes the other's routing.db and configs.
    static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let work_dir = std::env::temp_dir().join(format!("edgeproxy-perf-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&work_dir)?;
    let setup = targets::Setup {
        workers: opts.workers.max(1),
        cpus: opts.proxy_cpus.clone(),
        edgeproxy_bin: opts.edgeproxy_bin.clone(),
        minimal_bin: opts.minimal_bin.clone(),
        haproxy_bin: opts.haproxy_bin.clone(),
        nginx_bin: opts.nginx_bin.clone(),
        work_dir: work_dir.clone(),
        tls: None,
    };
    let result = run_in(opts, &setup, started_unix, load_before);
    let _ = std::fs::remove_dir_all(&work_dir);
    result
}

fn run_in(
    opts: &Options,
    setup: &targets::Setup,
    started_unix: u64,
    load_before: f64,
) -> anyhow::Result<Report> {
    let backends = backends::Backends::start(&opts.loadgen_cpus)?;
    let mut peers = BTreeMap::new();
    let mut kinds = Vec::new();
    for kind in Kind::ALL {
        if !opts.targets.contains(&kind) {
            peers.insert(kind, PeerStatus::NotSelected);
            continue;
        }
        match targets::availability(kind, setup) {
            Ok(version) => {
                peers.insert(kind, PeerStatus::Available(version));
                kinds.push(kind);
            }
            Err(why) => {
                if kind == Kind::Edgeproxy {
                    anyhow::bail!(
                        "edgeproxy binary not usable ({why}); build it first: cargo build --release"
                    );
                }
                peers.insert(kind, PeerStatus::Missing(why));
            }
        }
    }
    // TLS (f): measured when this edgeproxy build has TLS listeners.
    let has = |c: char| opts.scenarios.contains(c);
    let mut setup = setup.clone();
    let tls_unavailable = if !has('f') {
        None
    } else if !kinds.contains(&Kind::Edgeproxy) {
        Some("edgeproxy not selected".to_string())
    } else {
        match tls::edgeproxy_has_tls(&setup) {
            Err(why) => Some(why),
            Ok(()) => match tls_material::TlsMaterial::generate(&setup.work_dir.join("tls")) {
                Ok(m) => {
                    setup.tls = Some(std::sync::Arc::new(m));
                    None
                }
                Err(e) => Some(format!("cannot make a test certificate: {e:#}")),
            },
        }
    };
    let setup = &setup;
    let missing: BTreeMap<Kind, String> = peers
        .iter()
        .filter_map(|(k, s)| match s {
            PeerStatus::Missing(why) => Some((*k, why.clone())),
            _ => None,
        })
        .collect();
    let mut running: Vec<Running> = Vec::new();
    for &kind in &kinds {
        running.push(
            targets::start(kind, setup, &backends, "main", &Default::default())
                .with_context(|| format!("cannot start {}", kind.name()))?,
        );
    }
    let mut variants: Vec<Variant> = Vec::new();
    let mut plots: Vec<(usize, report::Series)> = Vec::new();
    let progress = |v: &Variant| {
        if opts.print {
            eprint!("{}", v.render());
        }
    };

    // Each target's closed-loop maximum (a): what the open-loop rates are
    // based on and checked against.
    let mut capacity = scenarios::Capacity::default();
    if has('a') {
        let v = scenarios::keepalive(opts, &mut running);
        capacity = scenarios::Capacity::from_keepalive(&v);
        progress(&v);
        variants.push(v);
    }
    if has('b') {
        for (rate, label) in open_loop_rates(opts, &capacity) {
            let v = scenarios::open_loop(opts, &mut running, rate, &label, &capacity);
            progress(&v);
            variants.push(v);
        }
    }
    if has('o') {
        for load in [
            scenarios::OverloadLoad::KeepAlive,
            scenarios::OverloadLoad::NewConnections,
        ] {
            let v = scenarios::overload(opts, &mut running, load);
            progress(&v);
            variants.push(v);
        }
    }
    if has('c') {
        let v = scenarios::connection_per_request(opts, &mut running);
        progress(&v);
        variants.push(v);
    }
    if has('d') {
        for upload in [false, true] {
            let v = scenarios::bulk(opts, &mut running, &backends, upload);
            progress(&v);
            variants.push(v);
        }
    }
    if has('s') {
        let v = scenarios::syscall_census(opts, &mut running);
        progress(&v);
        variants.push(v);
    }
    if has('u') {
        for v in cpu_split::scenarios(opts, &mut running, &setup.work_dir) {
            progress(&v);
            variants.push(v);
        }
    }
    if has('f') {
        for v in tls::scenarios(opts, setup, &mut running, &backends, tls_unavailable) {
            progress(&v);
            variants.push(v);
        }
    }
    drop(running);
    if has('e') {
        let v = scenarios::idle_memory(opts, &kinds, setup, &backends);
        progress(&v);
        variants.push(v);
    }
    if has('r') && kinds.contains(&Kind::Edgeproxy) {
        let v = rate_limit::cost(opts, setup, &backends);
        progress(&v);
        variants.push(v);
    }
    if has('g') && kinds.contains(&Kind::Edgeproxy) {
        match scenarios::hot_reload(opts, setup, &backends) {
            Ok((v, hists)) => {
                progress(&v);
                plots.push((variants.len(), hists));
                variants.push(v);
            }
            Err(e) => {
                let mut v = Variant::new("g_hot_reload", "(g) hot reload", &[]);
                v.notes.push(format!("failed: {e:#}"));
                variants.push(v);
            }
        }
    }
    if has('p') && kinds.contains(&Kind::Edgeproxy) {
        let v = pool::far_backend(opts, setup);
        progress(&v);
        variants.push(v);
    }
    for v in variants.iter_mut() {
        for (k, why) in &missing {
            v.missing.insert(*k, why.clone());
        }
    }

    // Plots: one per scenario with latencies.
    for (i, v) in variants.iter_mut().enumerate() {
        let mut series: report::Series = Vec::new();
        if let Some((_, hists)) = plots.iter().find(|(j, _)| *j == i) {
            series = hists.clone();
        } else {
            for &k in &kinds {
                if let Some(h) = v.merged_latency(k) {
                    series.push((k.name().to_string(), h));
                }
            }
        }
        if series.iter().all(|(_, h)| h.is_empty()) {
            continue;
        }
        let refs: Vec<(String, &hdrhistogram::Histogram<u64>)> =
            series.iter().map(|(n, h)| (n.clone(), h)).collect();
        let name = format!("{}.svg", v.id);
        std::fs::write(
            opts.out_dir.join(&name),
            plot::percentile_svg(&v.title, &refs),
        )?;
        v.plot = Some(opts.out_dir.join(&name).display().to_string());
    }

    let goals = goals(&variants);
    let report = Report {
        started_unix,
        command: opts.command.clone(),
        machine: report::machine(),
        setup: serde_json::json!({
            "quick": opts.quick,
            "runs": opts.runs,
            "duration_ms": opts.duration.as_millis() as u64,
            "warmup_ms": opts.warmup.as_millis() as u64,
            "connections": opts.connections,
            "connect_concurrency": opts.connect_concurrency,
            "open_fractions": opts.open_fractions,
            "bulk_streams": opts.bulk_streams,
            "tls_paced_mbps": opts.tls_paced_mbps,
            "tls_paced_share": opts.tls_paced_share,
            "idle_connections": opts.idle_connections,
            "workers": opts.workers,
            "proxy_cpus": opts.proxy_cpus,
            "loadgen_cpus": opts.loadgen_cpus,
            "sources": opts.sources,
            "edgeproxy_bin": opts.edgeproxy_bin,
            "network": opts.network,
        }),
        peers,
        variants,
        goals,
        load_before,
        load_after: procfs::loadavg(),
        notes: vec![
            "CPU figures are the proxy process's time on CPU (schedstat, all threads and children) per request / connection / GB".into(),
            "ratios are medians of this run divided by medians of the other target in the same run".into(),
            opts.network.clone(),
        ],
    };
    std::fs::write(
        opts.out_dir.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    let text = report.render();
    std::fs::write(opts.out_dir.join("report.txt"), &text)?;
    if opts.print {
        println!("{text}");
        println!("report: {}", opts.out_dir.join("report.json").display());
    }
    Ok(report)
}

/// The open-loop rates of (b) and their labels: `--open-rates` as given,
/// else fractions of the slowest proxy's maximum (the label names which).
fn open_loop_rates(opts: &Options, capacity: &scenarios::Capacity) -> Vec<(f64, String)> {
    if !opts.open_rates.is_empty() {
        return opts
            .open_rates
            .iter()
            .map(|&r| (r, format!("{r:.0} req/s as asked")))
            .collect();
    }
    let (base, of) = match capacity.slowest_proxy() {
        Some((kind, max)) => (max, format!("{}'s max, the slowest proxy", kind.name())),
        None => (opts.fallback_rate, format!("{:.0}", opts.fallback_rate)),
    };
    opts.open_fractions
        .iter()
        .map(|&f| (base * f, format!("{:.0}% of {of}", f * 100.0)))
        .collect()
}

/// The A/A control's ratio to the HAProxy it copies, for `key` in `v`.
fn control_ratio(v: &Variant, key: &str) -> Option<f64> {
    Some(v.median(Kind::Haproxy2, key)? / v.median(Kind::Haproxy, key)?)
}

/// The goals (perf round 2's, and round 1's that were met and must stay
/// so), checked against this run's medians. Where the run had the A/A
/// control (`haproxy2`), each comparison with HAProxy also gives what the
/// same comparison gives between two identical HAProxies.
fn goals(variants: &[Variant]) -> Vec<Goal> {
    let find = |id: &str| variants.iter().find(|v| v.id == id);
    let ratio_to = |id: &str, key: &str, other: Kind| -> Option<f64> {
        let v = find(id)?;
        Some(v.median(Kind::Edgeproxy, key)? / v.median(other, key)?)
    };
    let mut out = Vec::new();
    let at_most = |goal: &str, r: Option<f64>, limit: f64, what: &str| Goal {
        goal: goal.into(),
        met: r.map(|r| r <= limit),
        detail: match r {
            Some(r) => format!("{what} = {r:.2}× (limit {limit}×)"),
            None => "not measured".into(),
        },
    };
    if let Some(v) = find("p_pool_far_backend") {
        out.push(at_most(
            "new connection to a 100 ms-RTT backend: p50 with the pool ≤ 0.55× without (p)",
            v.median(Kind::Edgeproxy, "p50_ratio"),
            0.55,
            "pool/fresh p50, median of runs",
        ));
    }
    if let Some(v) = find("r_rate_limit") {
        out.push(at_most(
            "rate limiting costs ≤ 3 % CPU per new connection (c)",
            v.median(Kind::Edgeproxy, "pair_ratio"),
            1.03,
            "on/off, median of pairs",
        ));
    }
    let checks: [(&str, &str, &str, Kind, f64); 13] = [
        (
            "(a) CPU per keep-alive request ≤ 0.95× HAProxy's",
            "a_keepalive",
            "cpu_us_per_req",
            Kind::Haproxy,
            0.95,
        ),
        (
            "(a) CPU per keep-alive request ≤ 1.0× minimal's",
            "a_keepalive",
            "cpu_us_per_req",
            Kind::Minimal,
            1.0,
        ),
        (
            "(a) p99 ≤ HAProxy's",
            "a_keepalive",
            "p99_us",
            Kind::Haproxy,
            1.0,
        ),
        (
            "(c) CPU per new connection ≤ 1.02× minimal's",
            "c_connections",
            "cpu_us_per_conn",
            Kind::Minimal,
            1.02,
        ),
        (
            "(c) CPU per new connection ≤ 1.0× HAProxy's",
            "c_connections",
            "cpu_us_per_conn",
            Kind::Haproxy,
            1.0,
        ),
        (
            "(c) p99 ≤ HAProxy's",
            "c_connections",
            "p99_us",
            Kind::Haproxy,
            1.0,
        ),
        (
            "(d) CPU per GB of bulk (download) ≤ 0.5× HAProxy's",
            "d_bulk_download",
            "cpu_ms_per_gb",
            Kind::Haproxy,
            0.5,
        ),
        (
            "(d) CPU per GB of bulk (upload) ≤ 0.5× HAProxy's",
            "d_bulk_upload",
            "cpu_ms_per_gb",
            Kind::Haproxy,
            0.5,
        ),
        (
            "(f) TLS bulk CPU per GB (download) ≤ 0.8× HAProxy's",
            "f_tls_bulk",
            "cpu_ms_per_gb",
            Kind::Haproxy,
            0.8,
        ),
        (
            "(f) TLS bulk CPU per GB (upload) ≤ 0.8× HAProxy's",
            "f_tls_upload",
            "cpu_ms_per_gb",
            Kind::Haproxy,
            0.8,
        ),
        (
            "(f) TLS bulk CPU per GB at a fixed rate (download) ≤ 0.8× HAProxy's",
            "f_tls_bulk_paced",
            "cpu_ms_per_gb",
            Kind::Haproxy,
            0.8,
        ),
        (
            "(f) TLS bulk CPU per GB at a fixed rate (upload) ≤ 0.8× HAProxy's",
            "f_tls_upload_paced",
            "cpu_ms_per_gb",
            Kind::Haproxy,
            0.8,
        ),
        (
            "(f) TLS handshake CPU ≤ 0.65× HAProxy's",
            "f_tls_handshakes",
            "cpu_us_per_handshake",
            Kind::Haproxy,
            0.65,
        ),
    ];
    for (goal, id, key, other, limit) in checks {
        let mut g = at_most(
            goal,
            ratio_to(id, key, other),
            limit,
            &format!("edgeproxy/{}", other.name()),
        );
        if let Some(v) = find(id) {
            // A cost: the ratio of each target's cheapest run too.
            let best = |k: Kind| Some(v.min(k, key)? / v.min(other, key)?);
            let is_cost = key.starts_with("cpu_");
            if let (true, Some(b)) = (is_cost, best(Kind::Edgeproxy)) {
                g.detail.push_str(&format!("; best runs {b:.2}×"));
            }
            if let (Kind::Haproxy, Some(c)) = (other, control_ratio(v, key)) {
                g.detail
                    .push_str(&format!("; A/A haproxy2/haproxy = {c:.2}×"));
                if let (true, Some(b)) = (is_cost, best(Kind::Haproxy2)) {
                    g.detail.push_str(&format!(" (best runs {b:.2}×)"));
                }
            }
        }
        out.push(g);
    }
    // (b): at every rate both can serve (not flagged over capacity).
    let open: Vec<&Variant> = variants
        .iter()
        .filter(|v| v.id.starts_with("b_open"))
        .collect();
    let pairs: Vec<(f64, f64, Option<f64>)> = open
        .iter()
        .filter_map(|v| {
            Some((
                v.median(Kind::Edgeproxy, "added_p99_us")?,
                v.median(Kind::Haproxy, "added_p99_us")?,
                v.median(Kind::Haproxy2, "added_p99_us"),
            ))
        })
        .collect();
    out.push(Goal {
        goal: "(b) added p99 ≤ HAProxy's at every rate both can serve".into(),
        met: (!pairs.is_empty()).then(|| pairs.iter().all(|(e, h, _)| e <= h)),
        detail: if pairs.is_empty() {
            "not measured".into()
        } else {
            pairs
                .iter()
                .map(|(e, h, c)| {
                    // Signed: below direct's p99 (a stall that hit direct's
                    // run) prints as −, not "+-".
                    let control = c.map_or(String::new(), |c| format!(" (haproxy2 {c:+.1})"));
                    format!("{e:+.1} vs {h:+.1} µs{control}")
                })
                .collect::<Vec<_>>()
                .join(", ")
        },
    });
    // Overload (o), both loads: no worse than HAProxy past saturation.
    for (id, load) in [
        ("o_overload", "keep-alive"),
        ("o_overload_connections", "new connections"),
    ] {
        let over = |k: Kind, key: &str| find(id).and_then(|v| v.median(k, key));
        let tail = over(Kind::Edgeproxy, "p99_us").zip(over(Kind::Haproxy, "p99_us"));
        let served = over(Kind::Edgeproxy, "served_share").zip(over(Kind::Haproxy, "served_share"));
        out.push(Goal {
            goal: format!("(o) overload, {load}: p99 ≤ HAProxy's and served share ≥ HAProxy's"),
            met: tail
                .zip(served)
                .map(|((e, h), (es, hs))| e <= h && es >= hs),
            detail: match tail.zip(served) {
                Some(((e, h), (es, hs))) => {
                    let control = over(Kind::Haproxy2, "p99_us")
                        .zip(over(Kind::Haproxy2, "served_share"))
                        .map_or(String::new(), |(c, cs)| {
                            format!(" (A/A: haproxy2 p99 {c:.0} µs, served {:.1} %)", cs * 100.0)
                        });
                    format!(
                        "p99 {e:.0} vs {h:.0} µs, served {:.1} % vs {:.1} %{control}",
                        es * 100.0,
                        hs * 100.0
                    )
                }
                None => "not measured".into(),
            },
        });
    }
    let mem = |k: Kind| find("e_idle_memory").and_then(|v| v.median(k, "rss_mb_per_1k"));
    out.push(Goal {
        goal: "RSS per 1,000 idle connections ≤ HAProxy's".into(),
        met: mem(Kind::Edgeproxy)
            .zip(mem(Kind::Haproxy))
            .map(|(e, h)| e <= h),
        detail: match (mem(Kind::Edgeproxy), mem(Kind::Haproxy)) {
            (Some(e), Some(h)) => {
                let control = mem(Kind::Haproxy2)
                    .map_or(String::new(), |c| format!(" (A/A: haproxy2 {c:.2} MB)"));
                format!("edgeproxy {e:.2} MB, haproxy {h:.2} MB{control}")
            }
            _ => "not measured".into(),
        },
    });
    // The median over pairs of adjacent runs (see `scenarios::hot_reload`).
    let reload = find("g_hot_reload").and_then(|v| {
        Some((
            *v.pooled.get("p99_ratio_median_of_pairs")?,
            *v.pooled.get("reload_p99_us")?,
            *v.pooled.get("steady_p99_us")?,
        ))
    });
    out.push(Goal {
        goal: "p99 during hot reload within 10% of steady".into(),
        met: reload.map(|(ratio, _, _)| ratio <= 1.1),
        detail: reload.map_or("not measured".into(), |(ratio, r, s)| {
            format!(
                "median over run pairs {ratio:.2}× (all runs pooled: reload {r:.1} µs vs steady {s:.1} µs = {:.2}×)",
                r / s
            )
        }),
    });
    if let Some(v) = find("p_pool_far_backend") {
        let errors = v
            .samples
            .iter()
            .filter_map(|s| s.metrics.get("client_errors"))
            .sum::<f64>();
        out.push(Goal {
            goal: "zero client errors with the pool (p)".into(),
            met: (!v.samples.is_empty()).then_some(errors == 0.0),
            detail: match v.samples.is_empty() {
                true => "not measured".into(),
                false => format!(
                    "{errors} errors over {} runs (stale sockets met: {})",
                    v.samples.len(),
                    v.samples
                        .iter()
                        .filter_map(|s| s.metrics.get("stale"))
                        .sum::<f64>()
                ),
            },
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use report::{col, Sample};

    fn keepalive(cpu: &[(Kind, f64)]) -> Variant {
        let mut v = Variant::new(
            "a_keepalive",
            "a",
            &[col("cpu_us_per_req", "CPU µs/req", true)],
        );
        for (run, &(target, x)) in cpu.iter().enumerate() {
            v.samples.push(Sample {
                target,
                run,
                metrics: [("cpu_us_per_req", x)].into_iter().collect(),
                latency: None,
            });
        }
        v.finish();
        v
    }

    fn goals_of(v: &Variant) -> Vec<Goal> {
        goals(std::slice::from_ref(v))
    }

    fn detail(goals: &[Goal], starts: &str) -> String {
        goals
            .iter()
            .find(|g| g.goal.starts_with(starts))
            .expect("goal listed")
            .detail
            .clone()
    }

    #[test]
    fn goals_against_haproxy_give_the_a_a_control_when_it_ran() {
        // Runs as a noisy host gives them: each target one cheap run and
        // two dearer ones (medians 10.3, 10.0, 10.5; best 9.9, 9.0, 9.9).
        let with = keepalive(&[
            (Kind::Edgeproxy, 10.3),
            (Kind::Edgeproxy, 9.9),
            (Kind::Edgeproxy, 12.0),
            (Kind::Haproxy, 10.0),
            (Kind::Haproxy, 9.0),
            (Kind::Haproxy, 11.0),
            (Kind::Haproxy2, 10.5),
            (Kind::Haproxy2, 9.9),
            (Kind::Haproxy2, 13.0),
        ]);
        let d = detail(
            &goals_of(&with),
            "(a) CPU per keep-alive request ≤ 0.95× HAProxy's",
        );
        assert!(d.contains("edgeproxy/haproxy = 1.03×"), "{d}");
        assert!(d.contains("A/A haproxy2/haproxy = 1.05×"), "{d}");
        assert!(d.contains("; best runs 1.10×"), "{d}");
        assert!(d.contains("= 1.05× (best runs 1.10×)"), "{d}");

        let without = keepalive(&[(Kind::Edgeproxy, 10.3), (Kind::Haproxy, 10.0)]);
        let d = detail(
            &goals_of(&without),
            "(a) CPU per keep-alive request ≤ 0.95× HAProxy's",
        );
        assert!(!d.contains("A/A"), "{d}");
    }

    #[test]
    fn the_control_row_is_compared_with_haproxy_in_the_text_report() {
        let v = keepalive(&[(Kind::Haproxy, 10.0), (Kind::Haproxy2, 10.5)]);
        assert!(v.render().contains("÷haproxy: CPU µs/req 1.05×"));
    }
}
