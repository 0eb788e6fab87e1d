//! What `edgeproxy --version` prints: the version, the commit it was built
//! from, how it was built, and what the binary can do (like `haproxy -vv`),
//! so a bug report or an inventory of POPs can say exactly what runs.
//!
//! The commit comes from the build script (`control/build/commit.rs`):
//! `git` at build time, `EDGEPROXY_BUILD_COMMIT` where there is no git (a
//! Docker build context), else `unknown`.

use std::sync::OnceLock;

/// The package version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The commit the binary was built from (12 hex digits), or `unknown`.
pub const COMMIT: &str = env!("EDGEPROXY_COMMIT");
/// The commit's date (`YYYY-MM-DD`), or empty.
pub const COMMIT_DATE: &str = env!("EDGEPROXY_COMMIT_DATE");

/// What this build supports, one entry each, in the order `--version` lists
/// them.
pub fn features() -> Vec<String> {
    vec![
        "io_uring (compio, provided buffers, thread per core)".into(),
        "tls (rustls with ring: TLS 1.3, TLS 1.2; SNI, ALPN, rotation)".into(),
        "splice (bulk flows without copies)".into(),
        "reuseport-steering (cBPF: one client IP, one shard)".into(),
        "proxy-protocol (v1, v2; in and out)".into(),
        format!("sqlite {} (bundled)", rusqlite::version()),
        "geoip (embedded DB-IP Lite; MaxMind DB files)".into(),
        "dns (internal .internal zone)".into(),
        "discovery-api".into(),
        "health-checks (tcp, http, https, grpc, command; circuit breaker; per-client rate limits)"
            .into(),
        "pool (warm backend connections)".into(),
        "replication (SWIM membership, QUIC transport, between POPs)".into(),
        "mesh (WireGuard 6PN: kernel, wireguard-go, userspace)".into(),
        "bgp (anycast speaker)".into(),
        "geodns".into(),
        "postgres (routing source)".into(),
        "hitless-upgrade".into(),
        "prometheus-metrics".into(),
        "systemd-notify".into(),
        "log-formats (text, json)".into(),
    ]
}

/// `--version`'s text (clap prefixes the binary's name).
pub fn long() -> &'static str {
    static TEXT: OnceLock<String> = OnceLock::new();
    TEXT.get_or_init(|| {
        let date = match COMMIT_DATE {
            "" => String::new(),
            d => format!(" ({d})"),
        };
        format!(
            "{VERSION}\ncommit: {COMMIT}{date}\nbuilt: {} profile, {}, {}\nfeatures:\n  {}",
            env!("EDGEPROXY_PROFILE"),
            env!("EDGEPROXY_RUSTC"),
            env!("EDGEPROXY_TARGET"),
            features().join("\n  ")
        )
    })
}

#[cfg(test)]
#[path = "../build/commit.rs"]
mod commit;

#[cfg(test)]
mod tests {
    use super::commit;
    use std::process::Command;

    fn git(dir: &std::path::Path, args: &[&str]) -> String {
        let out = Command::new("git")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("git is installed");
        assert!(out.status.success(), "git {args:?}: {:?}", out);
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    #[test]
    fn without_git_the_commit_is_unknown_and_the_build_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let found = commit::find(dir.path(), None);
        assert_eq!(found.hash, commit::UNKNOWN);
        assert!(found.watch.is_empty());
    }

    #[test]
    fn the_environment_names_the_commit_when_there_is_no_git() {
        let dir = tempfile::tempdir().unwrap();
        let found = commit::find(dir.path(), Some(" 0123456789ab \n".into()));
        assert_eq!(found.hash, "0123456789ab");
        assert_eq!(commit::find(dir.path(), Some("  ".into())).hash, "unknown");
    }

    #[test]
    fn in_a_git_tree_the_commit_is_heads_and_its_files_are_watched() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        git(d, &["init", "-q", "-b", "main"]);
        std::fs::write(d.join("f"), "x").unwrap();
        git(d, &["add", "f"]);
        git(
            d,
            &[
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@example.com",
                "commit",
                "-q",
                "-m",
                "one",
            ],
        );
        let found = commit::find(d, None);
        assert_eq!(found.hash, git(d, &["rev-parse", "--short=12", "HEAD"]));
        assert_eq!(found.hash.len(), 12);
        let date = found.date.expect("a date");
        assert_eq!(date.len(), 10, "{date}");
        assert!(found.watch.iter().any(|p| p.ends_with(".git/HEAD")));
        assert!(found.watch.iter().any(|p| p.ends_with("refs/heads/main")));
        // Cargo reruns the build script (and rebuilds the crate) on every
        // build while a watched path is missing: no `packed-refs` yet here.
        assert!(!d.join(".git/packed-refs").exists());
        for path in &found.watch {
            assert!(path.exists(), "watched but missing: {}", path.display());
        }

        // The branch only in `packed-refs`: its loose file is gone, and the
        // directory its next commit writes it to is watched instead.
        git(d, &["pack-refs", "--all", "--prune"]);
        assert!(!d.join(".git/refs/heads/main").exists());
        let found = commit::find(d, None);
        for path in &found.watch {
            assert!(path.exists(), "watched but missing: {}", path.display());
        }
        assert!(found.watch.iter().any(|p| p.ends_with("packed-refs")));
        assert!(found.watch.iter().any(|p| p.ends_with(".git/refs/heads")));
    }

    #[test]
    fn long_version_names_commit_build_and_features() {
        let text = super::long();
        assert!(text.starts_with(super::VERSION), "{text}");
        assert!(
            text.contains(&format!("commit: {}", super::COMMIT)),
            "{text}"
        );
        assert!(text.contains("rustc "), "{text}");
        assert!(text.contains("sqlite 3."), "{text}");
        assert!(text.contains("io_uring"), "{text}");
        // What README's sections describe is listed too (replication, the
        // mesh, BGP, GeoDNS, health checks, the pool, PostgreSQL and the
        // upgrade were missing).
        for feature in [
            "health-checks",
            "pool",
            "replication",
            "mesh",
            "bgp",
            "geodns",
            "postgres",
            "hitless-upgrade",
        ] {
            assert!(
                text.contains(&format!("\n  {feature}")),
                "{feature}: {text}"
            );
        }
    }
}
