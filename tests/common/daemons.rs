//! Third-party daemons (HAProxy, nginx, Unbound, Prometheus) run in the
//! foreground for one test and killed when dropped; readiness is their port
//! accepting.

use std::net::{Ipv4Addr, TcpStream};
use std::path::Path;
use std::process::{Child, Command};

use super::{eventually, PATIENCE};

/// A daemon run in the foreground for one test, killed when dropped.
pub struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `program` with `args`, its output in `log`; waits until every one
/// of `ports` on loopback accepts a connection. A missing program fails the
/// test naming the Debian `package` (.ci/run installs it).
pub fn daemon(program: &str, package: &str, args: &[&str], log: &Path, ports: &[u16]) -> Daemon {
    let out = std::fs::File::create(log).unwrap();
    let child = Command::new(program)
        .args(args)
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run `{program}` ({e}): install the Debian package {package}")
        });
    let daemon = Daemon(child);
    let up = eventually(PATIENCE, || {
        ports
            .iter()
            .all(|&p| TcpStream::connect((Ipv4Addr::LOCALHOST, p)).is_ok())
    });
    assert!(
        up,
        "{program} did not start listening on {ports:?}:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    daemon
}

/// nginx in the foreground (one process) under `prefix`: Debian's dynamic
/// `modules` loaded (e.g. `ngx_stream_module`; `load_module` must come
/// first), then `body` in the main context after the shared settings.
pub fn nginx(prefix: &Path, modules: &[&str], body: &str, ports: &[u16]) -> Daemon {
    std::fs::create_dir_all(prefix.join("logs")).unwrap();
    let config = prefix.join("nginx.conf");
    let loads: String = modules
        .iter()
        .map(|m| format!("load_module /usr/lib/nginx/modules/{m}.so;\n"))
        .collect();
    std::fs::write(
        &config,
        format!(
            "{loads}daemon off;\nmaster_process off;\nworker_processes 1;\n\
             pid {pid};\nerror_log stderr info;\n\
             events {{ worker_connections 64; }}\n{body}",
            pid = prefix.join("nginx.pid").display(),
        ),
    )
    .unwrap();
    daemon(
        "nginx",
        "nginx (and libnginx-mod-stream)",
        &[
            "-p",
            prefix.to_str().unwrap(),
            "-c",
            config.to_str().unwrap(),
        ],
        &prefix.join("nginx.log"),
        ports,
    )
}
