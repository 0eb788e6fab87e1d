//! The PROXY protocol against real peers: HAProxy in front of edgeproxy
//! (`send-proxy` and `send-proxy-v2`), nginx behind it (a stream server
//! with `listen ... proxy_protocol`). The client's address must cross both
//! hops: HAProxy writes it, edgeproxy reads it and writes it again, nginx
//! reads it and sends it back.
//!
//! `haproxy` and `nginx` (with its stream module) come from Debian; a
//! missing one fails the test, it never skips it.

mod common;

use std::net::{Ipv4Addr, SocketAddr, TcpStream};

use common::daemons::{daemon, nginx, Daemon};
use common::*;

/// nginx as a backend that reads a PROXY header (v1 or v2) and answers with
/// the address it carried, then closes.
fn nginx_reporting_the_proxy_protocol_address(dir: &TempDir) -> (Daemon, u16) {
    let port = dead_port();
    let daemon = nginx(
        &dir.join("nginx"),
        &["ngx_stream_module"],
        &format!(
            "stream {{\n  server {{\n    listen 127.0.0.1:{port} proxy_protocol;\n    \
             return \"$proxy_protocol_addr $proxy_protocol_port\\n\";\n  }}\n}}\n"
        ),
        &[port],
    );
    (daemon, port)
}

/// HAProxy forwarding two ports to `edgeproxy`: the first with a PROXY v1
/// header (`send-proxy`), the second with v2 (`send-proxy-v2`).
fn haproxy_sending_proxy_headers_to(dir: &TempDir, edgeproxy: SocketAddr) -> (Daemon, u16, u16) {
    let (v1, v2) = (dead_port(), dead_port());
    let config = dir.join("haproxy.cfg");
    std::fs::write(
        &config,
        format!(
            "global\n  maxconn 64\n\
             defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend v1\n  bind 127.0.0.1:{v1}\n  default_backend edgeproxy_v1\n\
             frontend v2\n  bind 127.0.0.1:{v2}\n  default_backend edgeproxy_v2\n\
             backend edgeproxy_v1\n  server ep {edgeproxy} send-proxy\n\
             backend edgeproxy_v2\n  server ep {edgeproxy} send-proxy-v2\n"
        ),
    )
    .unwrap();
    let daemon = daemon(
        "haproxy",
        "haproxy",
        &["-db", "-f", config.to_str().unwrap()],
        &dir.join("haproxy.log"),
        &[v1, v2],
    );
    (daemon, v1, v2)
}

/// Connects to `port` on loopback from `source` (any 127/8 address is
/// local), so the address that must travel differs from every proxy's own.
fn connect_from(source: Ipv4Addr, port: u16) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.bind(&SocketAddr::from((source, 0)).into()).unwrap();
    socket
        .connect(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)).into())
        .unwrap();
    let stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream
}

#[test]
fn the_client_address_crosses_haproxy_edgeproxy_and_nginx() {
    let dir = TempDir::new("pp-peers");
    let (_nginx, nginx_port) = nginx_reporting_the_proxy_protocol_address(&dir);
    let db = Db::create(dir.join("routing.db"));
    db.upsert(&Row::new("nginx", "web", "sa", nginx_port));
    let proxy = Proxy::with_config(
        &dir,
        &config(
            &db.path,
            "[[listener]]\nname = \"behind-lb\"\naddr = \"127.0.0.1:0\"\n\
             accept_proxy_protocol = true\nsend_proxy_protocol = true\n",
        ),
    );
    let listener = proxy.listener("behind-lb");
    let (_haproxy, v1, v2) = haproxy_sending_proxy_headers_to(&dir, listener);

    for (header, port, source) in [
        ("v1", v1, Ipv4Addr::new(127, 0, 0, 2)),
        ("v2", v2, Ipv4Addr::new(127, 0, 0, 3)),
    ] {
        let client = connect_from(source, port);
        let me = client.local_addr().unwrap();
        assert_eq!(
            read_line(&client),
            Some(format!("{} {}", me.ip(), me.port())),
            "HAProxy {header} header -> edgeproxy -> nginx"
        );
    }

    // Straight to edgeproxy without a header: closed, never passed on.
    let direct = connect_from(Ipv4Addr::new(127, 0, 0, 4), listener.port());
    std::io::Write::write_all(&mut &direct, b"GET / HTTP/1.0\r\n\r\n").unwrap();
    assert_eq!(read_line(&direct), None);
}
