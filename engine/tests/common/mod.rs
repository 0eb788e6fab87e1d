//! What the engine's integration tests share: a backend that says which it
//! is, a routing table of one backend, and one engine's settings.

#![allow(dead_code)] // each test file uses some of these

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use engine::geo::{GeoResolver, RegionMap};
use engine::snapshot::{BackendRecord, SnapshotBuilder, SnapshotHandle};
use engine::{EngineSettings, ListenerSpec};

/// A backend on loopback that greets every connection with `tag\n`, then
/// echoes until EOF.
pub fn tag_backend(tag: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                if stream.write_all(format!("{tag}\n").as_bytes()).is_err() {
                    return;
                }
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// A healthy backend `id` of `app` in `sa`, at `addr`.
pub fn record(id: &str, app: &str, addr: SocketAddr) -> BackendRecord {
    BackendRecord {
        id: id.into(),
        app: app.into(),
        region: "sa".into(),
        country: None,
        ip: addr.ip().to_string(),
        port: addr.port().into(),
        healthy: true,
        weight: 1,
        soft_limit: 1000,
        hard_limit: 0,
        deleted: false,
    }
}

/// A routing table of one healthy backend, `b` of app `web` in `sa`.
pub fn snapshot_to(backend: SocketAddr) -> SnapshotHandle {
    let record = record("b", "web", backend);
    SnapshotHandle::new(SnapshotBuilder::new().build(&[record]).snapshot)
}

/// `shards` unpinned shards with small buffers, no splice.
pub fn settings(shards: usize) -> EngineSettings {
    EngineSettings {
        shards,
        pin_cores: false,
        buffer_count: 16,
        buffer_size: 4096,
        splice_bulk: false,
        local_region: Arc::from("sa"),
        client_table_capacity: 1024,
    }
}

/// A plain TCP listener on a free loopback port, for any app.
pub fn spec() -> ListenerSpec {
    ListenerSpec {
        name: Arc::from("main"),
        addr: "127.0.0.1:0".parse().unwrap(),
        app: None,
        accept_proxy_protocol: false,
        send_proxy_protocol: false,
        tls: None,
    }
}

/// No GeoIP database: every client is unlocated.
pub fn geo() -> Arc<GeoResolver> {
    Arc::new(GeoResolver::new(Vec::new(), None, RegionMap::default()))
}
