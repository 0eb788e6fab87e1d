//! `EDGEPROXY_GEOIP_PATH` replaces the embedded database, and every client
//! address is looked up in it — loopback included: an operator's own mmdb may
//! well map private ranges, and routing must follow it.

mod common;

use common::*;
use mmdb_writer::{Value, Writer};

/// A GeoLite2-Country-layout database that puts 127.0.0.0/8 in Germany.
fn loopback_is_germany() -> Vec<u8> {
    let mut w = Writer::new("GeoLite2-Country");
    w.insert_value(
        "127.0.0.0/8".parse::<ipnet::IpNet>().unwrap(),
        Value::map([(
            "country",
            Value::map([
                ("geoname_id", Value::from(2921044_u32)),
                ("iso_code", Value::from("DE")),
                ("names", Value::map([("en", Value::from("Germany"))])),
            ]),
        )]),
    )
    .unwrap();
    w.to_bytes().unwrap()
}

#[test]
fn a_custom_database_routes_loopback_clients_by_its_countries() {
    let dir = TempDir::new("custom-geoip");
    let mmdb = dir.join("GeoLite2-Country.mmdb");
    std::fs::write(&mmdb, loopback_is_germany()).unwrap();
    let de = TagBackend::start("de");
    let us = TagBackend::start("us");
    let db = Db::create(dir.join("routing.db"));
    // The US backend comes first and is in this POP's region: without the
    // custom database (127.0.0.1 is in no country) it would win.
    db.upsert(&Row::new("us", "web", "sa", us.port()).country("US"));
    db.upsert(&Row::new("de", "web", "eu", de.port()).country("DE"));
    let listen = format!("127.0.0.1:{}", dead_port());
    let proxy = Proxy::start(
        &[],
        &[
            ("EDGEPROXY_LISTEN_ADDR", listen.as_str()),
            ("EDGEPROXY_DB_PATH", db.path.to_str().unwrap()),
            ("EDGEPROXY_REGION", "sa"),
            ("EDGEPROXY_GEOIP_PATH", mmdb.to_str().unwrap()),
        ],
    );
    for _ in 0..5 {
        assert_eq!(which_backend(proxy.addr()), "de");
    }
}
