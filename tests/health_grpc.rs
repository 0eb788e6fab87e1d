//! gRPC health checks against a real gRPC health server (`tonic-health`,
//! `grpc.health.v1.Health`): NOT_SERVING takes the backend out, SERVING
//! brings it back.

mod common;

use common::*;
use tonic_health::ServingStatus;

/// A gRPC health server on loopback, on a runtime of its own; returns its
/// address and the reporter that sets the status of `service`.
fn grpc_health_server(
    service: &'static str,
) -> (
    std::net::SocketAddr,
    tonic_health::server::HealthReporter,
    tokio::runtime::Runtime,
) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (reporter, health) = tonic_health::server::health_reporter();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.block_on(reporter.set_service_status(service, ServingStatus::Serving));
    rt.spawn(async move {
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(incoming)
            .await
            .unwrap();
    });
    (addr, reporter, rt)
}

#[test]
fn grpc_not_serving_takes_the_backend_out_and_serving_brings_it_back() {
    let (addr, reporter, rt) = grpc_health_server("edge.Echo");
    let other = TagBackend::start("other");
    let dir = TempDir::new("health-grpc");
    let db = Db::create(dir.join("routing.db"));
    let mut grpc = Row::new("g", "api", "sa", addr.port());
    grpc.weight = 100;
    db.upsert(&grpc);
    db.upsert(&Row::new("other", "api", "sa", other.port()));
    let proxy = Proxy::with_config(
        &dir,
        &config(
            &db.path,
            "[health.apps.api]\nenabled = true\ntype = \"grpc\"\ngrpc_service = \"edge.Echo\"\n\
             interval_ms = 200\ntimeout_ms = 1000\nunhealthy_threshold = 2\nhealthy_threshold = 2\n",
        ),
    );
    let is = |needle: &str, mark: usize| {
        proxy.wait_for_log_where(
            mark,
            |l| l.contains(needle) && field(l, "backend").as_deref() == Some("g"),
            PATIENCE,
        )
    };
    let mark = proxy.log_mark();
    rt.block_on(reporter.set_service_status("edge.Echo", ServingStatus::NotServing));
    let line = is("health checks failed", mark).expect("NOT_SERVING takes g out");
    assert!(line.contains("NOT_SERVING"), "{line}");
    let mark = proxy.log_mark();
    rt.block_on(reporter.set_service_status("edge.Echo", ServingStatus::Serving));
    is("health checks pass again", mark).expect("SERVING brings g back");
}

/// A gRPC backend that takes connections and never answers (listening,
/// nothing accepts) is taken out by the check's timeout, which says where
/// the check stood: the check's own timeout bounds gRPC checks, as every
/// other kind, with no timeout of tonic's beside it.
#[test]
fn a_grpc_backend_that_never_answers_is_out_by_the_checks_timeout() {
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = TempDir::new("health-grpc-hung");
    let db = Db::create(dir.join("routing.db"));
    db.upsert(&Row::new(
        "hung",
        "api",
        "sa",
        hung.local_addr().unwrap().port(),
    ));
    let proxy = Proxy::with_config(
        &dir,
        &config(
            &db.path,
            "[health.apps.api]\nenabled = true\ntype = \"grpc\"\n\
             interval_ms = 300\ntimeout_ms = 200\nunhealthy_threshold = 2\n",
        ),
    );
    let line = proxy
        .wait_for_log_where(
            0,
            |l| {
                l.contains("health checks failed") && field(l, "backend").as_deref() == Some("hung")
            },
            PATIENCE,
        )
        .unwrap_or_else(|| panic!("hung not out; log:\n{}", proxy.log_text()));
    println!("{line}");
    assert!(
        line.contains("timed out after 200 ms waiting for the gRPC answer"),
        "{line}"
    );
}
