//! `edgeproxy run` re-executes itself once with glibc's `rep movsb`
//! threshold raised (see control/src/memcpy_tuning.rs and README, "TLS bulk
//! and glibc's memcpy"): the running proxy (same pid) has the tunable in its
//! environment and serves; an operator's own `GLIBC_TUNABLES` is kept as set.

mod common;

use common::*;

const TUNABLE: &str = "glibc.cpu.x86_rep_movsb_threshold=0x1000000";

fn tunables_of(pid: u32) -> Option<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    environ
        .split(|&b| b == 0)
        .filter_map(|var| std::str::from_utf8(var).ok())
        .find_map(|var| var.strip_prefix("GLIBC_TUNABLES="))
        .map(str::to_string)
}

/// Starts a proxy routing app `web` to a tag backend, with `env`; returns
/// it once it answered through its listener.
fn serving_proxy(tag: &str, env: &[(&str, &str)]) -> (Proxy, TagBackend, TempDir) {
    let dir = TempDir::new(tag);
    let backend = TagBackend::start(tag);
    let db = Db::create(dir.join("routing.db"));
    db.upsert(&Row::new(tag, "web", "sa", backend.port()));
    let path = dir.join("edgeproxy.toml");
    std::fs::write(&path, config(&db.path, "")).unwrap();
    let proxy = Proxy::start(&["--config", path.to_str().unwrap()], env);
    let addr = proxy.addr();
    assert_eq!(which_backend(addr), tag);
    (proxy, backend, dir)
}

#[test]
fn the_running_proxy_has_the_memcpy_tunable_and_serves() {
    let (proxy, _backend, _dir) = serving_proxy("mt1", &[]);
    let expected = cfg!(all(
        target_os = "linux",
        target_env = "gnu",
        target_arch = "x86_64"
    ))
    .then(|| TUNABLE.to_string());
    assert_eq!(tunables_of(proxy.pid()), expected, "{}", proxy.log_text());
    // The re-exec goes through /proc/self/exe; the process must still be
    // named after its binary, or `pgrep edgeproxy` and `top` lose it.
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", proxy.pid())).unwrap();
    assert_eq!(comm.trim_end(), "edgeproxy");
}

#[test]
fn an_operators_glibc_tunables_are_kept_as_set() {
    let own = "glibc.malloc.arena_max=2";
    let (proxy, _backend, _dir) = serving_proxy("mt2", &[("GLIBC_TUNABLES", own)]);
    assert_eq!(tunables_of(proxy.pid()).as_deref(), Some(own));
}
