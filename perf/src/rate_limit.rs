//! (r) What per-client rate limiting costs per new connection: scenario (c)
//! (a new connection per request, closed loop) through two edgeproxy
//! processes started for this scenario, one with `[rate_limit]` off and one
//! with it on — token bucket and per-client cap both active, with limits so
//! high that nothing is refused, so every connection pays the whole admit
//! and release path. Runs alternate between the two (off, on, on, off, ...)
//! so drift of the machine falls on both; the figure is the median over
//! runs of each adjacent pair's ratio of CPU per connection.

use crate::backends::Backends;
use crate::loadgen::Pace;
use crate::report::{col, Sample, Variant};
use crate::scenarios::{rr_sample, spec};
use crate::targets::{self, Kind};
use crate::Options;

/// Limits that never refuse a connection of the load generator.
const ON: &str = "\n[rate_limit]\nenabled = true\nmax_requests = 1000000000\nburst = 1000000000\n\
                  max_connections_per_client = 1000000\n";

pub fn cost(opts: &Options, setup: &targets::Setup, backends: &Backends) -> Variant {
    let conns = opts.connect_concurrency;
    let mut v = Variant::new(
        "r_rate_limit",
        format!(
            "(r) rate limiting's cost in (c): connection per request, {conns} concurrent, \
             edgeproxy with [rate_limit] off vs on (never refusing), {} run pairs × {:?}",
            opts.runs, opts.duration
        ),
        &[
            col("off_cpu_us_per_conn", "off CPU µs/conn", true),
            col("on_cpu_us_per_conn", "on CPU µs/conn", true),
            col("pair_ratio", "on ÷ off", true),
            col("on_errors", "on errors", true),
        ],
    );
    let start = |tag: &str, extra: &str| {
        let edge = targets::EdgeOptions {
            extra_toml: extra.to_string(),
            ..Default::default()
        };
        targets::start(Kind::Edgeproxy, setup, backends, tag, &edge)
    };
    let (off, on) = match (start("rl-off", ""), start("rl-on", ON)) {
        (Ok(off), Ok(on)) => (off, on),
        (Err(e), _) | (_, Err(e)) => {
            v.notes.push(format!("cannot start edgeproxy: {e:#}"));
            return v;
        }
    };
    for run in 0..opts.runs {
        let order = if run % 2 == 0 {
            [&off, &on]
        } else {
            [&on, &off]
        };
        let mut cpu = [None, None];
        let mut on_errors = 0.0;
        for t in order {
            let s = spec(opts, t.fronts.http, Pace::Closed, false, conns);
            match rr_sample(opts, t, run, s, "cps", "cpu_us_per_conn") {
                Ok(sample) => {
                    let is_on = std::ptr::eq(t, &on);
                    cpu[usize::from(is_on)] = sample.metrics.get("cpu_us_per_conn").copied();
                    if is_on {
                        on_errors = sample.metrics.get("errors").copied().unwrap_or(0.0);
                    }
                }
                Err(e) => v.notes.push(format!("run {}: {e:#}", run + 1)),
            }
        }
        let mut m = std::collections::BTreeMap::new();
        if let [Some(off_cpu), Some(on_cpu)] = cpu {
            m.insert("off_cpu_us_per_conn", off_cpu);
            m.insert("on_cpu_us_per_conn", on_cpu);
            m.insert("pair_ratio", on_cpu / off_cpu);
            m.insert("on_errors", on_errors);
        }
        v.samples.push(Sample {
            target: Kind::Edgeproxy,
            run,
            metrics: m,
            latency: None,
        });
    }
    v.finish();
    v
}
