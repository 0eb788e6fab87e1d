//! What the stoppable accept (`engine::rt::AcceptGate`, needed for binary
//! upgrades) costs per accepted connection, against compio's plain
//! `accept`: both loops run on a shard-like runtime (io_uring, single
//! issuer, deferred task running), the accepting thread's own CPU time is
//! read around a batch of accepts (`CLOCK_THREAD_CPUTIME_ID`), and the two
//! variants alternate batch by batch so that the machine's noise hits both.
//!
//! A third variant takes, after each gated accept, what is already queued
//! with plain `accept(2)` calls (up to 16), as HAProxy's `maxaccept` does;
//! measured and not adopted by the shards (README, "New connections and
//! multishot accept").
//!
//! `cargo bench --bench accept_gate` prints CPU ns per accept for each and
//! the ratios of their medians.

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use engine::rt;

const BATCH: usize = 4000;
const ROUNDS: usize = 9;

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Clients connecting and closing back to back until `stop`.
fn clients(addr: SocketAddr, stop: &Arc<AtomicBool>) -> Vec<std::thread::JoinHandle<()>> {
    (0..2)
        .map(|_| {
            let stop = Arc::clone(stop);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(s) = TcpStream::connect(addr) {
                        drop(s);
                    } else {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            })
        })
        .collect()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let addr = std_listener.local_addr().unwrap();
    let runtime = rt::build_runtime(16, 4096).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let load = clients(addr, &stop);
    let ([mut plain, mut gated, mut batched], from_queue) = runtime.block_on(async move {
        let listener = rt::listener_from_std(std_listener).unwrap();
        let gate = rt::AcceptGate::new();
        let mut per_variant: [Vec<f64>; 3] = Default::default();
        let (mut batched_total, mut from_queue) = (0usize, 0usize);
        for round in 0..(ROUNDS + 1) * 3 {
            let variant = round % 3;
            let t0 = thread_cpu_ns();
            let mut taken = 0;
            while taken < BATCH {
                let accepted = match variant {
                    0 => listener.accept().await,
                    _ => gate.accept(&listener).await.expect("gate open"),
                };
                drop(accepted.expect("accept"));
                taken += 1;
                if variant == 2 {
                    for _ in 0..16 {
                        match rt::accept_now(&listener).expect("accept") {
                            Some(conn) => drop(conn),
                            None => break,
                        }
                        taken += 1;
                        from_queue += 1;
                    }
                }
            }
            if variant == 2 {
                batched_total += taken;
            }
            let per = (thread_cpu_ns() - t0) as f64 / taken as f64;
            // The first round of each warms up.
            if round >= 3 {
                per_variant[variant].push(per);
            }
        }
        (per_variant, from_queue as f64 / batched_total as f64)
    });
    stop.store(true, Ordering::Relaxed);
    for t in load {
        let _ = t.join();
    }
    let (p, g, b) = (median(&mut plain), median(&mut gated), median(&mut batched));
    println!(
        "accept CPU on the accepting thread, ns per connection (median of {ROUNDS} batches of {BATCH}, interleaved):"
    );
    println!(
        "  plain compio accept: {p:.0} (min {:.0}, max {:.0})",
        plain[0],
        plain[plain.len() - 1]
    );
    println!(
        "  AcceptGate:          {g:.0} (min {:.0}, max {:.0})",
        gated[0],
        gated[gated.len() - 1]
    );
    println!(
        "  AcceptGate, then up to 16 queued with accept(2): {b:.0} (min {:.0}, max {:.0})",
        batched[0],
        batched[batched.len() - 1]
    );
    println!(
        "    ({:.0} % of its connections came from accept(2))",
        from_queue * 100.0
    );
    println!("  gate / plain: {:.3}", g / p);
    println!("  gate with accept(2) batches / gate: {:.3}", b / g);
}
