//! Log setup: `tracing` to stderr. `RUST_LOG` wins over the configured level
//! (and over `DEBUG=1`, which the config maps to "debug").

use std::io::IsTerminal;

pub fn init(level: &str) {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // hickory-proto warns about each malformed DNS packet it decodes; the DNS
    // server answers those with FORMERR, so the warnings are noise that a
    // flood of junk packets would turn into a flood of logs. Unless RUST_LOG
    // asks for them.
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("hickory")) {
        filter = filter.add_directive("hickory_proto=error".parse().expect("valid directive"));
    }
    // The embedded WireGuard logs every peer change and UAPI connection at
    // info; the mesh logs what matters itself (`mesh: peer added ...`).
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("gotatun")) {
        filter = filter.add_directive("gotatun=warn".parse().expect("valid directive"));
    }
    // defguard_wireguard_rs logs at ERROR what `auto` expects (no kernel
    // module), and the mesh reports every failure of its calls with the
    // cause anyway.
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("defguard")) {
        filter = filter.add_directive(
            "defguard_wireguard_rs=off"
                .parse()
                .expect("valid directive"),
        );
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}
