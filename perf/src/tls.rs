//! (f) TLS handshakes/s and TLS bulk.
//!
//! Not measured yet: the scenario first asks the edgeproxy binary whether it
//! accepts a TLS listener (`check-config` on a config with one), and reports
//! why not. To enable it once the suite has a TLS client: implement
//! [`measure`] (handshakes with a rustls client against each target's TLS
//! front, bulk over TLS) and give HAProxy (`bind … ssl crt`) and nginx
//! (`listen … ssl`) the same certificate.

use std::process::Command;

use crate::report::Variant;
use crate::targets::Setup;
use crate::Options;

/// A listener with TLS terminated by edgeproxy, as its config spells it.
pub const TLS_LISTENER_TOML: &str = r#"
[[listener]]
name = "tls"
addr = "127.0.0.1:0"
tls = { self_signed = true }
"#;

/// Whether `edgeproxy check-config` accepts a TLS listener.
pub fn edgeproxy_has_tls(setup: &Setup) -> Result<(), String> {
    let dir = setup.work_dir.join("tls-probe");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let path = dir.join("edgeproxy.toml");
    let toml = format!(
        "[routing]\ndb_path = \"{}\"\n[demo]\nbackends = 0\n{TLS_LISTENER_TOML}",
        dir.join("routing.db").display()
    );
    std::fs::write(&path, toml).map_err(|e| e.to_string())?;
    let out = Command::new(&setup.edgeproxy_bin)
        .arg("check-config")
        .arg("--config")
        .arg(&path)
        .env_clear()
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or("")
            .to_string())
    }
}

pub fn scenario(_opts: &Options, setup: &Setup) -> Variant {
    let mut v = Variant::new("f_tls", "(f) TLS handshakes/s and TLS bulk", &[]);
    match edgeproxy_has_tls(setup) {
        Err(why) => v
            .notes
            .push(format!("TLS: not available in this build ({why})")),
        Ok(()) => v.notes.push(
            "TLS: this edgeproxy build accepts TLS listeners, but the suite's TLS client is not \
             written yet (perf/src/tls.rs): not measured"
                .into(),
        ),
    }
    v
}
