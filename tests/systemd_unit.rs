//! The shipped systemd unit (`config/edgeproxy.service`): systemd itself
//! accepts it (`systemd-analyze verify`), and its system-call filter allows
//! every system call the real binary makes while it starts, proxies, reloads
//! and drains (recorded with strace), so the hardening does not kill the
//! proxy with SIGSYS (or EPERM) in production.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use common::*;

const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/edgeproxy.service");

/// The unit with ExecStart pointing at the binary under test (verify checks
/// that the program exists).
fn unit_for_test(dir: &TempDir) -> std::path::PathBuf {
    let text = std::fs::read_to_string(UNIT).unwrap();
    assert!(
        text.contains("ExecStart=/usr/local/bin/edgeproxy "),
        "{text}"
    );
    let path = dir.join("edgeproxy.service");
    std::fs::write(&path, text.replace("/usr/local/bin/edgeproxy", BIN)).unwrap();
    path
}

#[test]
fn systemd_accepts_the_unit() {
    let dir = TempDir::new("unit-verify");
    let unit = unit_for_test(&dir);
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze is installed (Debian package systemd)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Unknown keys and groups are only warnings to systemd: none allowed.
    assert!(stderr.trim().is_empty(), "{stderr}");
    let text = std::fs::read_to_string(UNIT).unwrap();
    for must in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "DynamicUser=yes",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "LimitNOFILE=",
        "LimitNICE=+0",
        "StateDirectory=edgeproxy",
    ] {
        assert!(text.contains(must), "{must} missing from the unit");
    }
}

/// The names in a syscall group, sub-groups expanded.
fn expand(group: &str, seen: &mut BTreeSet<String>, out: &mut BTreeSet<String>) {
    if !seen.insert(group.to_string()) {
        return;
    }
    let listed = Command::new("systemd-analyze")
        .args(["syscall-filter", group])
        .output()
        .expect("systemd-analyze is installed");
    assert!(listed.status.success(), "unknown group {group}");
    for line in String::from_utf8_lossy(&listed.stdout).lines().skip(1) {
        let name = line.trim();
        if name.is_empty() || name.starts_with('#') {
            continue;
        }
        if name.starts_with('@') {
            expand(name, seen, out);
        } else {
            out.insert(name.to_string());
        }
    }
}

/// Allowed and denied system calls of the unit's SystemCallFilter lines.
fn unit_filter() -> (BTreeSet<String>, BTreeSet<String>) {
    let text = std::fs::read_to_string(UNIT).unwrap();
    let (mut allowed, mut denied) = (BTreeSet::new(), BTreeSet::new());
    for line in text.lines() {
        let Some(value) = line.strip_prefix("SystemCallFilter=") else {
            continue;
        };
        let (deny, value) = match value.strip_prefix('~') {
            Some(v) => (true, v),
            None => (false, value),
        };
        let set = if deny { &mut denied } else { &mut allowed };
        for item in value.split_whitespace() {
            if item.starts_with('@') {
                expand(item, &mut BTreeSet::new(), set);
            } else {
                set.insert(item.to_string());
            }
        }
    }
    assert!(!allowed.is_empty(), "no allow-list in the unit");
    (allowed, denied)
}

extern "C" {
    fn geteuid() -> u32;
}

/// System call names in an strace log (`-f`: lines start with a pid).
fn traced_calls(log: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(log).unwrap();
    text.lines()
        .filter_map(|line| {
            let rest = line.split_once(' ').map_or(line, |(_, r)| r).trim_start();
            let rest = rest.strip_prefix("<... ").unwrap_or(rest);
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            (!name.is_empty() && !rest.starts_with("+++") && !rest.starts_with("---"))
                .then_some(name)
        })
        .collect()
}

#[test]
fn the_units_syscall_filter_allows_what_edgeproxy_calls() {
    let (allowed, denied) = unit_filter();
    let dir = TempDir::new("unit-syscalls");
    let backend = TagBackend::start("s1");
    let db = Db::create(dir.join("routing.db"));
    db.upsert(&Row::new("s1", "web", "sa", backend.port()));
    let path = dir.join("edgeproxy.toml");
    std::fs::write(
        &path,
        config(
            &db.path,
            "[metrics]\nenabled = true\nlisten_addr = \"127.0.0.1:0\"\n\
             [api]\nenabled = true\nlisten_addr = \"127.0.0.1:0\"\n\
             [dns]\nenabled = true\nlisten_addr = \"127.0.0.1:0\"\n",
        ),
    )
    .unwrap();
    let trace = dir.join("strace.log");
    // The unit runs the proxy as an unprivileged DynamicUser: trace it as
    // one (as root, SQLite also chowns its journal files, which the unit
    // rightly forbids and which never happens under it).
    let mut cmd = if unsafe { geteuid() } == 0 {
        use std::os::unix::fs::PermissionsExt;
        for p in [dir.path(), db.path.as_path()] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "strace"]);
        c
    } else {
        Command::new("strace")
    };
    cmd.args(["-f", "-qq", "-o"]).arg(&trace).arg(BIN);
    let proxy = Proxy::spawn_command(
        cmd,
        &["--config", path.to_str().unwrap()],
        &[],
        Some("info"),
    )
    .ready();
    // Traffic (plain and bulk, so splice runs), a scrape, a reload, a drain.
    let (name, mut s) = connect_tagged(proxy.addr());
    assert_eq!(name, "s1");
    use std::io::{Read, Write};
    let bulk = vec![7u8; 1 << 20];
    let writer = {
        let mut w = s.try_clone().unwrap();
        std::thread::spawn(move || {
            w.write_all(&bulk).unwrap();
            w.shutdown(std::net::Shutdown::Write).unwrap();
        })
    };
    let mut echoed = Vec::new();
    s.read_to_end(&mut echoed).unwrap();
    writer.join().unwrap();
    assert_eq!(echoed.len(), 1 << 20);
    let metrics: std::net::SocketAddr = field(
        &proxy.wait_for_log("metrics listening", PATIENCE).unwrap(),
        "addr",
    )
    .unwrap()
    .parse()
    .unwrap();
    let scraped = ureq::get(format!("http://{metrics}/metrics"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    assert!(scraped.contains("edgeproxy_connections_active"));
    // Signals go to the proxy itself, strace's child.
    let traced: u32 = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", proxy.pid()))
        .unwrap()
        .split_whitespace()
        .next()
        .expect("strace has a child")
        .parse()
        .unwrap();
    let mark = proxy.log_mark();
    signal_pid(traced, SIGHUP);
    proxy
        .wait_for_log_after(mark, "routing table reloaded", PATIENCE)
        .unwrap_or_else(|| panic!("{}", proxy.log_text()));
    let mut proxy = proxy;
    signal_pid(traced, SIGTERM);
    // strace exits when the proxy does.
    assert!(proxy.wait_exit(PATIENCE).is_some(), "{}", proxy.log_text());

    let called = traced_calls(&trace);
    assert!(called.contains("io_uring_enter"), "{called:?}");
    let refused: Vec<&String> = called
        .iter()
        .filter(|c| !allowed.contains(*c) || denied.contains(*c))
        .collect();
    assert!(
        refused.is_empty(),
        "the unit's SystemCallFilter refuses {refused:?} (called: {called:?})"
    );
}
