//! Two engines on the same listening sockets, as an old and a new process
//! are during a binary upgrade: the old one stops accepting while clients
//! keep connecting, and no client is refused, reset or left waiting.
//!
//! The engines run in one process here (the sockets are duplicated rather
//! than passed over a Unix socket); the sockets, the kernel's accept queues
//! and io_uring's exclusive wake-ups are the real ones. The whole upgrade
//! across processes is tested through the binary in the top-level
//! `tests/upgrade.rs`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use engine::listener::adopt_group;
use engine::{BoundListeners, Engine, Knobs};

mod common;
use common::{geo, settings, snapshot_to, spec, tag_backend};

const PATIENCE: Duration = Duration::from_secs(20);

/// One client round trip: greeting, then an echo. `Err` says what failed.
fn round_trip(addr: SocketAddr, n: usize) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, PATIENCE).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut greeting = [0u8; 2];
    s.read_exact(&mut greeting)
        .map_err(|e| format!("greeting: {e}"))?;
    let msg = format!("ping {n}\n");
    s.write_all(msg.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).map_err(|e| format!("echo: {e}"))?;
    if back != msg.as_bytes() {
        return Err(format!("echo differs: {back:?}"));
    }
    Ok(String::from_utf8_lossy(&greeting[..1]).into_owned())
}

/// Runs `clients` threads of back-to-back round trips until `stop`; returns
/// (successes, failures with their reasons).
fn clients(
    addr: SocketAddr,
    clients: usize,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<(usize, Vec<String>)>> {
    (0..clients)
        .map(|c| {
            let stop = Arc::clone(stop);
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0, Vec::new());
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    match round_trip(addr, c * 1_000_000 + n) {
                        Ok(_) => ok += 1,
                        Err(e) => failed.push(e),
                    }
                }
                (ok, failed)
            })
        })
        .collect()
}

/// Hand-overs per test: each is one chance for a connection to be caught
/// between the old engine's last accept and the new one's first.
const HANDOVERS: usize = 6;

/// A chain of engines, each taking over its predecessor's sockets while
/// clients keep connecting; shard counts cycle through `shards`.
fn handover_chain(shards: &[usize]) {
    let backends: Vec<SocketAddr> = (0..=HANDOVERS)
        .map(|i| tag_backend(["0", "1", "2", "3", "4", "5", "6"][i]))
        .collect();
    let mut current = Engine::start(
        settings(shards[0]),
        Knobs::default(),
        &[spec()],
        snapshot_to(backends[0]),
        geo(),
    )
    .unwrap();
    let addr = current.listeners()[0].local_addr;
    let stop = Arc::new(AtomicBool::new(false));
    let running = clients(addr, 4, &stop);
    std::thread::sleep(Duration::from_millis(200));

    for step in 1..=HANDOVERS {
        // The successor takes the same sockets (duplicates, as SCM_RIGHTS
        // would give it) and starts accepting next to the old engine.
        let inherited: Vec<TcpListener> = current.listeners()[0]
            .sockets
            .iter()
            .map(|fd| TcpListener::from(fd.try_clone().unwrap()))
            .collect();
        let new_shards = shards[step % shards.len()];
        let group = adopt_group(inherited, new_shards).unwrap();
        assert_eq!(group.local_addr, addr);
        let next = Engine::start_bound(
            settings(new_shards),
            Knobs::default(),
            BoundListeners::from_groups(new_shards, vec![(spec(), group)]),
            snapshot_to(backends[step]),
            geo(),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(150));
        let mut old = std::mem::replace(&mut current, next);
        old.stop_accepting(PATIENCE)
            .expect("every old shard confirmed the stop");

        // From now on only the new engine may answer.
        let tag = step.to_string();
        for _ in 0..20 {
            match round_trip(addr, 0) {
                Ok(got) => assert_eq!(got, tag, "a stopped engine accepted a connection"),
                Err(e) => panic!("a connection after the stop failed: {e}"),
            }
        }
        std::thread::sleep(Duration::from_millis(100));
        old.shutdown(Duration::from_secs(5));
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    let mut failures = Vec::new();
    for t in running {
        let (ok, failed) = t.join().unwrap();
        total += ok;
        failures.extend(failed);
    }
    assert!(
        failures.is_empty(),
        "{} of {} round trips failed: {:?}",
        failures.len(),
        total + failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        total > 200,
        "only {total} round trips: the test did not load the engines"
    );
    current.shutdown(Duration::from_secs(5));
}

#[test]
fn a_stopped_engine_hands_every_queued_connection_to_its_successor() {
    handover_chain(&[2]);
}

#[test]
fn successors_with_more_or_fewer_shards_serve_every_socket_of_the_group() {
    handover_chain(&[3, 1, 2]);
}
