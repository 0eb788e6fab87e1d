//! `perf`: the edgeproxy perf suite. See README, section "Performance".

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use perf::targets::Kind;
use perf::Options;

/// Runs edgeproxy, a direct connection, HAProxy and nginx side by side on
/// this machine and reports throughput, latency percentiles, CPU per request /
/// connection / GB and memory per idle connection.
#[derive(Parser, Debug)]
#[command(name = "perf", version)]
struct Args {
    /// CI smoke settings: short runs, one open-loop rate; under a minute.
    #[arg(long)]
    quick: bool,
    /// Targets, comma-separated: direct,edgeproxy,minimal,haproxy,nginx
    /// (minimal: the bare compio proxy built with this suite), the default
    /// all five; haproxy2 adds a second, identical HAProxy as an A/A control
    /// (its ratio to haproxy, printed beside each goal, is the run's noise).
    #[arg(long, value_delimiter = ',')]
    targets: Option<Vec<String>>,
    /// Scenario letters: a keep-alive, b open loop, o overload (open loop
    /// past each target's own maximum, keep-alive and new connections, the
    /// proxy under a CPU cap), c connection per request, d bulk,
    /// e idle memory, f TLS, g hot reload, p warm backend connections to a
    /// 100 ms-RTT backend (pool on vs off; needs root), s syscall census
    /// (perf stat tracepoints), r rate limiting's cost in c (on vs off),
    /// u where each proxy's CPU goes (kernel, own code, libraries: perf
    /// record through c's and a's loads). Default: all but r and u (quick:
    /// all but r, s and u). b takes its rates
    /// from a; o measures each target's maximum itself.
    #[arg(long)]
    scenarios: Option<String>,
    /// Runs per target per scenario (interleaved). Default 3.
    #[arg(long)]
    runs: Option<usize>,
    /// Measured seconds per run. Default 3 (quick: 0.3).
    #[arg(long)]
    duration: Option<f64>,
    /// Warm-up seconds per run. Default 0.5 (quick: 0.1).
    #[arg(long)]
    warmup: Option<f64>,
    /// Keep-alive connections. Default 50.
    #[arg(long)]
    connections: Option<usize>,
    /// Open-loop rates (b) as fractions of the slowest proxy's closed-loop
    /// keep-alive maximum from (a), so every proxy can serve them on any
    /// host. Default 0.25,0.5,0.75 (quick: 0.5).
    #[arg(long, value_delimiter = ',')]
    rates: Option<Vec<f64>>,
    /// Open-loop rates (b) in requests/s, instead of --rates. A target whose
    /// own maximum is below a rate is flagged over capacity at it.
    #[arg(long, value_delimiter = ',', conflicts_with = "rates")]
    open_rates: Option<Vec<f64>>,
    /// Overload (o): the multiple of each target's own maximum. Default 1.2.
    #[arg(long)]
    overload: Option<f64>,
    /// Overload (o): the share of one CPU each proxy may use during it, set
    /// with a cgroup CPU cap (needs root), so the proxy saturates before the
    /// load generator does; 0: uncapped. Default 0.5. Without root or a cgroup
    /// cpu controller the run goes on uncapped and its report says so.
    #[arg(long)]
    overload_cpu_cap: Option<f64>,
    /// Overload (o): offer every target the same rate, --overload times the
    /// fastest proxy's closed-loop maximum (measured first, under the same
    /// cap), instead of each target its own: which proxy serves more of one
    /// and the same flood, and how fast. Its tables are reported beside the
    /// goal's, not instead of them.
    #[arg(long)]
    overload_same_rate: bool,
    /// TLS bulk at a fixed rate (f): MB/s over all streams, the same for
    /// every target. Default: --tls-paced-share of the slowest target's
    /// closed-loop MB/s in the same run.
    #[arg(long)]
    tls_paced_mbps: Option<f64>,
    /// TLS bulk at a fixed rate (f): the share of the slowest target's
    /// closed-loop MB/s, per direction; 0 skips the paced runs. Default 0.7.
    #[arg(long)]
    tls_paced_share: Option<f64>,
    /// Request/response runs (a, b, c, o, g) whose CPUs lost more than this
    /// share of the window to the hypervisor (steal time, /proc/stat) are
    /// run again, up to --steal-repeats times, and the report notes each
    /// repeat: on a shared VM such a run's tail is the host's. 0: never
    /// repeat. Default 0.01 (quick: 0).
    #[arg(long)]
    max_steal: Option<f64>,
    /// How many times a run may be repeated for steal time (the last
    /// attempt is kept, flagged, whatever its steal). Default 2.
    #[arg(long)]
    steal_repeats: Option<usize>,
    /// Idle connections in the memory scenario. Default 5000 (quick: 500).
    #[arg(long)]
    idle_connections: Option<usize>,
    /// Proxy worker threads/processes (edgeproxy shards, HAProxy threads,
    /// nginx workers). Default 1.
    #[arg(long)]
    workers: Option<usize>,
    /// CPUs for the proxies, e.g. 1 or 0-1. Default: the last CPU.
    #[arg(long)]
    proxy_cpus: Option<String>,
    /// CPUs for the load generator and backends. Default: all but the last.
    #[arg(long)]
    loadgen_cpus: Option<String>,
    /// edgeproxy binary. Default: next to this one, or $EDGEPROXY_BIN.
    #[arg(long)]
    edgeproxy: Option<PathBuf>,
    /// Output directory (report.json, report.txt, *.svg).
    #[arg(long, default_value = "perf-report")]
    out: PathBuf,
    /// Run in the host's network namespace, with its TIME_WAIT table and
    /// congestion control, instead of one of the suite's own where no
    /// socket enters TIME_WAIT and every connection uses CUBIC (README,
    /// "The TIME_WAIT table", "Congestion control on loopback"). Without
    /// root the suite runs in the host's anyway, and its report says so.
    #[arg(long)]
    host_network: bool,
}

fn cpus(s: &str) -> anyhow::Result<Vec<usize>> {
    let mut out = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => out.extend(a.trim().parse::<usize>()?..=b.trim().parse::<usize>()?),
            None => out.push(part.trim().parse()?),
        }
    }
    Ok(out)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // First, while this is the only thread: the namespace is per thread.
    let network = match args.host_network {
        true => perf::netns::Network::Host("--host-network".into()),
        false => perf::netns::isolate()?,
    };
    let mut o = Options::defaults(args.quick);
    o.network = network.describe();
    o.command = std::env::args().collect::<Vec<_>>().join(" ");
    if let Some(t) = args.targets {
        o.targets = t
            .iter()
            .map(|s| Kind::parse(s.trim()).ok_or_else(|| anyhow::anyhow!("unknown target {s:?}")))
            .collect::<anyhow::Result<_>>()?;
    }
    if let Some(s) = args.scenarios {
        o.scenarios = s;
    }
    if let Some(r) = args.runs {
        o.runs = r.max(1);
    }
    if let Some(d) = args.duration {
        o.duration = Duration::from_secs_f64(d);
    }
    if let Some(w) = args.warmup {
        o.warmup = Duration::from_secs_f64(w);
    }
    if let Some(c) = args.connections {
        o.connections = c.max(1);
    }
    if let Some(r) = args.rates {
        o.open_fractions = r;
    }
    if let Some(r) = args.open_rates {
        anyhow::ensure!(
            r.iter().all(|x| x.is_finite() && *x > 0.0),
            "--open-rates: every rate must be a positive number of requests/s"
        );
        o.open_rates = r;
    }
    if let Some(f) = args.overload {
        anyhow::ensure!(
            f.is_finite() && f > 0.0,
            "--overload: a positive multiple of each target's maximum"
        );
        o.overload_factor = f;
    }
    if let Some(share) = args.overload_cpu_cap {
        anyhow::ensure!(
            share.is_finite() && share >= 0.0,
            "--overload-cpu-cap: a share of one CPU (0.5: half a core), or 0 for none"
        );
        o.overload_cpu_cap = (share > 0.0).then_some(share);
    }
    o.overload_same_rate = args.overload_same_rate;
    if let Some(r) = args.tls_paced_mbps {
        anyhow::ensure!(
            r.is_finite() && r > 0.0,
            "--tls-paced-mbps: a positive rate in MB/s over all bulk streams"
        );
        o.tls_paced_mbps = Some(r);
    }
    if let Some(share) = args.tls_paced_share {
        anyhow::ensure!(
            share.is_finite() && share >= 0.0,
            "--tls-paced-share: a share of the slowest target's closed-loop MB/s (0.7), or 0 for no paced runs"
        );
        o.tls_paced_share = share;
    }
    if let Some(share) = args.max_steal {
        anyhow::ensure!(
            share.is_finite() && (0.0..1.0).contains(&share),
            "--max-steal: a share of the run's window below 1 (0.01: 30 ms of a 3 s run), or 0 to never repeat a run"
        );
        o.max_steal_share = (share > 0.0).then_some(share);
    }
    if let Some(n) = args.steal_repeats {
        o.steal_repeats = n;
    }
    if let Some(n) = args.idle_connections {
        o.idle_connections = n;
    }
    if let Some(w) = args.workers {
        o.workers = w.max(1);
    }
    if let Some(c) = args.proxy_cpus {
        o.proxy_cpus = cpus(&c)?;
    }
    if let Some(c) = args.loadgen_cpus {
        o.loadgen_cpus = cpus(&c)?;
    }
    if let Some(e) = args.edgeproxy {
        // Absolute: each target is started from a directory of its own.
        o.edgeproxy_bin =
            std::path::absolute(&e).with_context(|| format!("--edgeproxy {}", e.display()))?;
    }
    o.out_dir = args.out;
    perf::run(&o)?;
    Ok(())
}
