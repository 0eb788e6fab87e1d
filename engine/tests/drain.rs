//! A drain whose grace period is past what an `Instant` can hold (an
//! embedder passing `Duration::MAX` for "forever"; edgeproxy's own
//! configuration bounds it): the shards wait for their connections, or for
//! a fast stop, instead of panicking on `Instant + Duration` and cutting
//! every connection at once.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use engine::{Engine, Knobs};

mod common;
use common::{geo, settings, snapshot_to, spec, tag_backend};

const PATIENCE: Duration = Duration::from_secs(20);

fn engine(backend: SocketAddr) -> Engine {
    Engine::start(
        settings(1),
        Knobs::default(),
        &[spec()],
        snapshot_to(backend),
        geo(),
    )
    .unwrap()
}

fn echo(mut s: &TcpStream, msg: &str) -> Result<(), String> {
    s.write_all(msg.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).map_err(|e| format!("read: {e}"))?;
    match back == msg.as_bytes() {
        true => Ok(()),
        false => Err(format!("echo differs: {back:?}")),
    }
}

#[test]
fn a_grace_period_past_what_an_instant_holds_drains_until_a_fast_stop() {
    let engine = engine(tag_backend("b"));
    let addr = engine.listeners()[0].local_addr;
    let held = TcpStream::connect(addr).unwrap();
    held.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut greeting = [0u8; 2];
    (&held).read_exact(&mut greeting).unwrap();
    echo(&held, "before\n").unwrap();

    let fast = engine.fast_stop();
    let (done, finished) = std::sync::mpsc::channel();
    let stopping = std::thread::spawn(move || {
        engine.shutdown(Duration::MAX);
        let _ = done.send(());
    });
    // Nothing tells when the shard starts draining; what must hold is that
    // for as long as we watch, the connection is served and the drain goes
    // on (it used to panic within milliseconds of the stop).
    for i in 0..10 {
        echo(&held, &format!("draining {i}\n"))
            .unwrap_or_else(|e| panic!("the drain cut the open connection: {e}"));
        assert!(
            finished.try_recv().is_err(),
            "shutdown ended with a connection open and no fast stop"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    fast.trigger();
    finished
        .recv_timeout(PATIENCE)
        .expect("shutdown did not end at the fast stop");
    stopping.join().unwrap();
    // The fast stop closed it.
    let mut buf = [0u8; 1];
    assert!(matches!((&held).read(&mut buf), Ok(0) | Err(_)));
}
