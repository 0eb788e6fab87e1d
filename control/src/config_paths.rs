//! Relative paths in a config file mean "next to the config file".
//!
//! Under systemd a service's working directory is `/`, so a shipped file
//! saying `db_path = "routing.db"` would otherwise put the routing table at
//! `/routing.db`, or run it from a different table depending on where it was
//! started. Every path written in the file — `routing.db_path` (and its
//! default `routing.db`, when a file is given), `geo.db_path`, TLS
//! certificates and keys, `api.token_file` and `accept_token_file`,
//! `replication.secret_file` and `accept_secret_file`,
//! `upgrade.control_socket`, `mesh.private_key_file`, `postgres.ca_file` —
//! is resolved against the directory of the file, made absolute. Paths from
//! environment variables keep their meaning (the working directory), as does
//! everything when there is no file at all (the original edgeProxy's
//! environment-only mode).

use std::path::{Path, PathBuf};

/// The directory relative paths in `config_file` are resolved against:
/// its parent, canonical (the file was just read, so it exists; `..` and
/// symbolic links resolved), else made absolute against the working
/// directory.
pub fn base_of(config_file: &Path) -> PathBuf {
    let parent = config_file.parent().unwrap_or(Path::new(""));
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    std::fs::canonicalize(parent)
        .or_else(|_| std::path::absolute(parent))
        .unwrap_or_else(|_| parent.to_path_buf())
}

/// Rewrites every relative path in `paths` (read from `config_file`) as
/// `base_of(config_file)/path`. Which paths a file holds is the config's
/// business (`crate::config::resolve_paths` lists them).
pub fn resolve<'a>(paths: impl IntoIterator<Item = &'a mut PathBuf>, config_file: &Path) {
    let base = base_of(config_file);
    for p in paths {
        if p.is_relative() && !p.as_os_str().is_empty() {
            *p = base.join(&*p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{resolve_paths, RawConfig};

    fn resolved(text: &str, file: &str) -> RawConfig {
        let mut raw: RawConfig = toml::from_str(text).unwrap();
        resolve_paths(&mut raw, Path::new(file));
        raw
    }

    #[test]
    fn every_relative_path_is_next_to_the_file() {
        let raw = resolved(
            "[routing]\ndb_path = \"data/routing.db\"\n[geo]\ndb_path = \"geo.mmdb\"\n\
             [api]\ntoken_file = \"api.token\"\naccept_token_file = \"api.next\"\n[replication]\nsecret_file = \"secret\"\naccept_secret_file = \"next\"\n\
             [upgrade]\ncontrol_socket = \"run/ep.sock\"\n[mesh]\nprivate_key_file = \"wg.key\"\n\
             [postgres]\nca_file = \"db-ca.pem\"\n\
             [[listener]]\naddr = \"127.0.0.1:0\"\n[listener.tls]\ncert = \"tls/a.pem\"\nkey = \"tls/a.key\"\n\
             [[listener.tls.sni]]\ncert = \"b.pem\"\nkey = \"b.key\"\n",
            "/etc/edgeproxy/edgeproxy.toml",
        );
        let at = |p: &str| PathBuf::from("/etc/edgeproxy").join(p);
        assert_eq!(raw.routing.db_path, Some(at("data/routing.db")));
        assert_eq!(raw.geo.db_path, Some(at("geo.mmdb")));
        assert_eq!(raw.api.token_file, Some(at("api.token")));
        assert_eq!(raw.api.accept_token_file, Some(at("api.next")));
        assert_eq!(raw.replication.secret_file, Some(at("secret")));
        assert_eq!(raw.replication.accept_secret_file, Some(at("next")));
        // QA: these three were used as given (the working directory: `/`
        // under systemd), so `edgeproxy upgrade --config` run elsewhere
        // looked for the control socket in the wrong place.
        assert_eq!(raw.upgrade.control_socket, Some(at("run/ep.sock")));
        assert_eq!(raw.mesh.private_key_file, Some(at("wg.key")));
        assert_eq!(raw.postgres.ca_file, Some(at("db-ca.pem")));
        let tls = raw.listeners.as_ref().unwrap()[0].tls.as_ref().unwrap();
        assert_eq!(tls.cert, Some(at("tls/a.pem")));
        assert_eq!(tls.key, Some(at("tls/a.key")));
        assert_eq!(tls.sni[0].cert, at("b.pem"));
        assert_eq!(tls.sni[0].key, at("b.key"));
    }

    #[test]
    fn absolute_paths_stay_and_the_default_table_is_next_to_the_file() {
        let raw = resolved(
            "[geo]\ndb_path = \"/var/lib/geo.mmdb\"\n",
            "/srv/ep/edge.toml",
        );
        assert_eq!(raw.geo.db_path, Some(PathBuf::from("/var/lib/geo.mmdb")));
        assert_eq!(
            raw.routing.db_path,
            Some(PathBuf::from("/srv/ep/routing.db"))
        );
    }

    #[test]
    fn a_relative_config_file_is_made_absolute() {
        let raw = resolved("", "edgeproxy.toml");
        let cwd = std::fs::canonicalize(std::env::current_dir().unwrap()).unwrap();
        assert_eq!(raw.routing.db_path, Some(cwd.join("routing.db")));
        let raw = resolved("", "src/../src/lib.rs");
        assert_eq!(
            raw.routing.db_path,
            Some(cwd.join("src").join("routing.db")),
            "`..` resolved"
        );
    }
}
