//! A real PostgreSQL server for the tests: a throwaway cluster in a temp
//! dir (Debian's `postgresql`: `initdb`, `pg_ctl`), listening on a free
//! loopback port, run as an unprivileged user (`nobody` when the tests run
//! as root: PostgreSQL refuses root), trust authentication, no Unix socket.
//! Driven with `psql`, as an operator would. Stopped and removed on drop.
//!
//! Fails (never skips) when PostgreSQL is not installed: `.ci/run`
//! installs it.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use super::TempDir;

/// A running cluster.
pub struct PgServer {
    dir: TempDir,
    bin: PathBuf,
    pub port: u16,
    /// (uid, gid) the server runs as, when not the test's own.
    user: Option<(u32, u32)>,
    tls: bool,
}

/// Certificate and key files for a server with TLS.
pub struct ServerTls {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The newest `/usr/lib/postgresql/<version>/bin`.
fn bin_dir() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, bin)| bin)
        .expect("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
}

/// `nobody`'s uid and gid when running as root; `None` otherwise.
fn unprivileged() -> Option<(u32, u32)> {
    // SAFETY: plain libc lookups; the passwd entry is read at once.
    unsafe {
        if libc::geteuid() != 0 {
            return None;
        }
        let pw = libc::getpwnam(c"nobody".as_ptr());
        assert!(!pw.is_null(), "no user 'nobody' to run PostgreSQL as");
        Some(((*pw).pw_uid, (*pw).pw_gid))
    }
}

fn chown(path: &Path, user: Option<(u32, u32)>) {
    if let Some((uid, gid)) = user {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
    }
}

impl PgServer {
    /// Creates and starts a cluster; with `tls`, it accepts only TLS
    /// connections (`hostssl`), with that certificate.
    pub fn start(tag: &str, tls: Option<&ServerTls>) -> PgServer {
        let dir = TempDir::new(tag);
        let user = unprivileged();
        chown(dir.path(), user);
        let server = PgServer {
            bin: bin_dir(),
            port: super::dead_port(),
            user,
            tls: tls.is_some(),
            dir,
        };
        let out = server.run(
            "initdb",
            &[
                "-D",
                server.data().to_str().unwrap(),
                "-U",
                "edgeproxy",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-locale",
            ],
        );
        assert!(out.status.success(), "initdb failed: {}", text(&out));
        let hba = match tls {
            Some(_) => "hostssl all all 127.0.0.1/32 trust\n",
            None => "host all all 127.0.0.1/32 trust\n",
        };
        std::fs::write(server.data().join("pg_hba.conf"), hba).unwrap();
        let mut conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = ''\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n",
            server.port
        );
        if let Some(tls) = tls {
            let cert = server.data().join("server.crt");
            let key = server.data().join("server.key");
            std::fs::write(&cert, &tls.cert_pem).unwrap();
            std::fs::write(&key, &tls.key_pem).unwrap();
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
            chown(&cert, server.user);
            chown(&key, server.user);
            conf.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        }
        let auto = server.data().join("postgresql.auto.conf");
        std::fs::write(&auto, conf).unwrap();
        chown(&auto, server.user);
        chown(&server.data().join("pg_hba.conf"), server.user);
        server.start_again();
        server
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Runs a PostgreSQL program as the server's user.
    fn run(&self, program: &str, args: &[&str]) -> Output {
        let mut cmd = Command::new(self.bin.join(program));
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", self.dir.path())
            .stdin(Stdio::null());
        if let Some((uid, gid)) = self.user {
            cmd.uid(uid).gid(gid);
        }
        cmd.output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
    }

    /// Starts the (stopped) server and waits until it accepts connections.
    pub fn start_again(&self) {
        let log = self.dir.join("postgres.log");
        let out = self.run(
            "pg_ctl",
            &[
                "-D",
                self.data().to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}\n{}",
            text(&out),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// Restarts the server requiring a password (SCRAM) of every role
    /// but the superuser `edgeproxy` that `psql` here connects as.
    pub fn require_passwords(&self) {
        assert!(!self.tls, "not with TLS");
        self.stop();
        let path = self.data().join("pg_hba.conf");
        std::fs::write(
            &path,
            "host all edgeproxy 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n",
        )
        .unwrap();
        chown(&path, self.user);
        self.start_again();
    }

    /// Stops the server (fast shutdown: sessions are disconnected).
    pub fn stop(&self) {
        let out = self.run(
            "pg_ctl",
            &[
                "-D",
                self.data().to_str().unwrap(),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        );
        assert!(out.status.success(), "pg_ctl stop failed: {}", text(&out));
    }

    /// The postmaster and every backend process it runs.
    fn processes(&self) -> Vec<i32> {
        let pid_file = std::fs::read_to_string(self.data().join("postmaster.pid")).unwrap();
        let postmaster: i32 = pid_file.lines().next().unwrap().trim().parse().unwrap();
        let mut pids = vec![postmaster];
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<i32>().ok());
            if ppid == Some(postmaster) {
                pids.push(pid);
            }
        }
        pids
    }

    /// Freezes (`true`) or thaws every server process: the database is
    /// there but answers nothing, as behind a partition.
    pub fn freeze(&self, frozen: bool) {
        let signal = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        for pid in self.processes() {
            // SAFETY: kill(2) on processes this test started.
            unsafe { libc::kill(pid, signal) };
        }
    }

    /// A connection URL for `user` (edgeproxy's own settings may add
    /// `sslmode`).
    pub fn url(&self, user: &str) -> String {
        format!("postgres://{user}@127.0.0.1:{}/postgres", self.port)
    }

    /// Runs `sql` with psql as the superuser; its output (unaligned,
    /// tuples only). Panics if it fails.
    pub fn psql(&self, sql: &str) -> String {
        let out = self.try_psql(sql);
        match out {
            Ok(text) => text,
            Err(e) => panic!("psql failed on {sql:?}: {e}"),
        }
    }

    pub fn try_psql(&self, sql: &str) -> Result<String, String> {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "edgeproxy",
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-q",
                "-A",
                "-t",
                "-c",
                sql,
            ])
            .env("PGSSLMODE", if self.tls { "require" } else { "disable" })
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run psql: {e}"))?;
        match out.status.success() {
            true => Ok(String::from_utf8_lossy(&out.stdout).trim().to_string()),
            false => Err(text(&out)),
        }
    }

    /// Runs `sql` in a psql session that stays open (a transaction holding
    /// a lock, say) until the returned value is dropped, which ends the
    /// session (an open transaction rolls back).
    pub fn hold(&self, sql: &str) -> HeldSession {
        let mut child = Command::new(self.bin.join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "edgeproxy",
                "-d",
                "postgres",
                "-q",
            ])
            .env("PGSSLMODE", if self.tls { "require" } else { "disable" })
            .env("PGAPPNAME", "held-by-test")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run psql: {e}"));
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "{sql}").unwrap();
        stdin.flush().unwrap();
        HeldSession {
            child,
            stdin: Some(stdin),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }
}

/// A psql session left open by [`PgServer::hold`].
pub struct HeldSession {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
}

impl Drop for HeldSession {
    fn drop(&mut self) {
        // End of input: psql quits, and the server ends its session.
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        // Thaw first: a frozen server cannot stop.
        if self.data().join("postmaster.pid").exists() {
            self.freeze(false);
            let _ = self.run(
                "pg_ctl",
                &[
                    "-D",
                    self.data().to_str().unwrap(),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                ],
            );
        }
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The original edgeProxy's PostgreSQL table (its docs' schema).
pub const BACKENDS_TABLE: &str = "CREATE TABLE backends (
    id TEXT PRIMARY KEY,
    app TEXT NOT NULL,
    region TEXT NOT NULL,
    country TEXT NOT NULL,
    wg_ip TEXT NOT NULL,
    port INTEGER NOT NULL,
    healthy INTEGER NOT NULL DEFAULT 1,
    weight INTEGER NOT NULL DEFAULT 1,
    soft_limit INTEGER NOT NULL DEFAULT 100,
    hard_limit INTEGER NOT NULL DEFAULT 150,
    deleted INTEGER NOT NULL DEFAULT 0,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT CURRENT_TIMESTAMP,
    updated_at TIMESTAMP WITH TIME ZONE DEFAULT CURRENT_TIMESTAMP
)";

/// An INSERT of one backend on loopback.
pub fn insert_backend(id: &str, region: &str, port: u16, weight: i64) -> String {
    format!(
        "INSERT INTO backends (id, app, region, country, wg_ip, port, weight) \
         VALUES ('{id}', 'web', '{region}', 'ZZ', '127.0.0.1', {port}, {weight})"
    )
}
