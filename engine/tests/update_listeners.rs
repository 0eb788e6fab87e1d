//! Listeners given new settings on their own sockets
//! (`Engine::update_listeners`): two listeners swap their names and apps in
//! one update, keep their addresses, and serve the new apps; an update that
//! cannot apply whole changes nothing.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::snapshot::{SnapshotBuilder, SnapshotHandle};
use engine::{Engine, EngineError, Knobs, ListenerSpec};

mod common;
use common::{geo, record, settings, tag_backend};

const PATIENCE: Duration = Duration::from_secs(20);

fn listener(name: &str, app: &str, addr: SocketAddr) -> ListenerSpec {
    ListenerSpec {
        name: Arc::from(name),
        addr,
        app: Some(Arc::from(app)),
        accept_proxy_protocol: false,
        send_proxy_protocol: false,
        tls: None,
    }
}

/// The greeting of the backend a new connection to `addr` reaches.
fn greeting(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut tag = [0u8; 2];
    s.read_exact(&mut tag).unwrap();
    String::from_utf8_lossy(&tag[..1]).into_owned()
}

/// Names and addresses of the running listeners, sorted by name.
fn running(engine: &Engine) -> Vec<(String, SocketAddr)> {
    let mut all: Vec<_> = engine
        .listeners()
        .iter()
        .map(|l| (l.spec.name.to_string(), l.local_addr))
        .collect();
    all.sort();
    all
}

#[test]
fn two_listeners_swap_names_and_apps_on_their_own_sockets() {
    let snapshot = SnapshotBuilder::new()
        .build(&[
            record("w", "web", tag_backend("w")),
            record("a", "api", tag_backend("a")),
        ])
        .snapshot;
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut engine = Engine::start(
        settings(2),
        Knobs::default(),
        &[listener("one", "web", any), listener("two", "api", any)],
        SnapshotHandle::new(snapshot),
        geo(),
    )
    .unwrap();
    let [(_, one), (_, two)] = running(&engine)[..] else {
        panic!("{:?}", running(&engine))
    };
    assert_eq!((greeting(one), greeting(two)), ("w".into(), "a".into()));

    // Refused whole: an unknown listener, another address, a name taken.
    let before = running(&engine);
    let err = engine
        .update_listeners(vec![
            ("one".into(), listener("one", "api", one)),
            ("three".into(), listener("three", "web", two)),
        ])
        .unwrap_err();
    assert!(
        matches!(err, EngineError::NoSuchListener(ref n) if n == "three"),
        "{err}"
    );
    let err = engine
        .update_listeners(vec![("one".into(), listener("one", "api", two))])
        .unwrap_err();
    assert!(matches!(err, EngineError::AddressChanged { .. }), "{err}");
    let err = engine
        .update_listeners(vec![("one".into(), listener("two", "api", one))])
        .unwrap_err();
    assert!(
        matches!(err, EngineError::DuplicateListener(ref n) if n == "two"),
        "{err}"
    );
    assert_eq!(running(&engine), before);
    assert_eq!((greeting(one), greeting(two)), ("w".into(), "a".into()));

    // Swapped in one update: each address keeps its sockets, under the
    // other name, serving the other app.
    engine
        .update_listeners(vec![
            ("one".into(), listener("two", "api", one)),
            ("two".into(), listener("one", "web", two)),
        ])
        .unwrap();
    assert_eq!(
        running(&engine),
        vec![("one".to_string(), two), ("two".to_string(), one)]
    );
    // The shards take the change from their command queue: wait until
    // twenty connections in a row to each address meet the new app.
    let deadline = Instant::now() + PATIENCE;
    while (0..20).any(|_| greeting(one) != "a" || greeting(two) != "w") {
        assert!(
            Instant::now() < deadline,
            "the shards kept the old settings"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    engine.shutdown(Duration::ZERO);
}
