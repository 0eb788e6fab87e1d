//! How replication's cost grows with the cluster: N nodes (default 10, 25,
//! 50, 100) on the simulated network of `control::replication::sim` (50 ms
//! one way, 5 ms jitter, 1 % loss, the shipped intervals), each fed a
//! series of single-row changes at random nodes.
//!
//! For each N: the time until every node holds a change (p50, max), bytes
//! each node sends per change (mean and the busiest node), and idle bytes per
//! second per node (membership and anti-entropy with nothing to do).
//! Simulated time: the figures do not depend on this machine's speed.
//!
//! ```sh
//! cargo run --release -p perf --bin repl-sim -- [N ...] [--changes 20] [--seed 1]
//! ```

use std::time::Duration;

use control::replication::sim::{Sim, SimConfig};

fn main() {
    let mut sizes = Vec::new();
    let mut changes = 20usize;
    let mut seed = 1u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--changes" => {
                changes = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--changes N")
            }
            "--seed" => seed = args.next().and_then(|v| v.parse().ok()).expect("--seed N"),
            "-h" | "--help" => {
                println!("usage: repl-sim [N ...] [--changes 20] [--seed 1]");
                return;
            }
            n => sizes.push(n.parse::<usize>().expect("a node count")),
        }
    }
    if sizes.is_empty() {
        sizes = vec![10, 25, 50, 100];
    }
    println!(
        "{:>5} {:>13} {:>13} {:>15} {:>12} {:>15} {:>14} {:>6}",
        "nodes",
        "converge p50",
        "converge max",
        "bcast B/node/chg",
        "busiest/chg",
        "all B/node/chg",
        "idle B/s/node",
        "ln N"
    );
    for n in sizes {
        let r = run(n, changes, seed);
        println!(
            "{:>5} {:>10.0} ms {:>10.0} ms {:>15.0} {:>12.0} {:>15.0} {:>14.0} {:>6.2}",
            n,
            r.p50.as_secs_f64() * 1000.0,
            r.max.as_secs_f64() * 1000.0,
            r.bytes_per_node_per_change,
            r.busiest_per_change,
            r.all_traffic_per_node_per_change,
            r.idle_per_node_per_sec,
            (n as f64).ln()
        );
    }
}

struct Result {
    p50: Duration,
    max: Duration,
    /// Broadcast bytes (the change itself, forwards included).
    bytes_per_node_per_change: f64,
    busiest_per_change: f64,
    /// Everything sent minus the same window's idle traffic (noisy: SWIM's
    /// own traffic varies from window to window).
    all_traffic_per_node_per_change: f64,
    idle_per_node_per_sec: f64,
}

fn totals(sim: &Sim) -> Vec<u64> {
    (0..sim.nodes.len()).map(|i| sim.bytes_sent(i)).collect()
}

/// Bytes of change broadcasts (local changes and forwards) each node sent:
/// traffic that exists only because rows changed.
fn broadcast(sim: &Sim) -> Vec<u64> {
    sim.nodes
        .iter()
        .map(|n| n.stats.broadcast_bytes_sent)
        .collect()
}

fn run(n: usize, changes: usize, seed: u64) -> Result {
    let mut sim = Sim::new(SimConfig::wan(n, seed));
    assert!(
        sim.run_until(Duration::from_secs(300), Sim::membership_complete),
        "{n} nodes: membership did not complete"
    );
    sim.run_for(Duration::from_secs(10));

    // Idle: a window of the same length as the changes' run, nothing written.
    let spacing = Duration::from_secs(2);
    let window = spacing * changes as u32;
    let a = totals(&sim);
    sim.run_for(window);
    let b = totals(&sim);
    let idle: Vec<u64> = a.iter().zip(&b).map(|(x, y)| y - x).collect();

    let mut times = Vec::new();
    let c0 = totals(&sim);
    let b0 = broadcast(&sim);
    for k in 0..changes {
        let start = sim.elapsed();
        let writer = (k * 7919 + 13) % n;
        let pk = format!("change-{k}");
        sim.write(writer, &pk, Some("x"));
        let done = sim.run_until(start + spacing, |s| s.everyone_has(&pk, Some("x")));
        assert!(
            done,
            "{n} nodes: change {k} did not converge within {spacing:?}"
        );
        times.push(sim.elapsed() - start);
        sim.run_until(start + spacing, |_| false);
    }
    let c1 = totals(&sim);
    let b1 = broadcast(&sim);
    let per_node: Vec<f64> = (0..n)
        .map(|i| (b1[i] - b0[i]) as f64 / changes as f64)
        .collect();
    let total_extra: f64 = (0..n)
        .map(|i| (c1[i] - c0[i]) as f64 - idle[i] as f64)
        .sum::<f64>()
        / changes as f64
        / n as f64;
    times.sort();
    Result {
        p50: times[times.len() / 2],
        max: *times.last().unwrap(),
        bytes_per_node_per_change: per_node.iter().sum::<f64>() / n as f64,
        busiest_per_change: per_node.iter().cloned().fold(0.0, f64::max),
        all_traffic_per_node_per_change: total_extra,
        idle_per_node_per_sec: idle.iter().sum::<u64>() as f64 / n as f64 / window.as_secs_f64(),
    }
}
