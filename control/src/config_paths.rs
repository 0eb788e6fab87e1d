//! Relative paths in a config file mean "next to the config file".
//!
//! Under systemd a service's working directory is `/`, so a shipped file
//! saying `db_path = "routing.db"` would otherwise put the routing table at
//! `/routing.db`, or run it from a different table depending on where it was
//! started. Every path written in the file — `routing.db_path` (and its
//! default `routing.db`, when a file is given), `geo.db_path`, TLS
//! certificates and keys, `api.token_file`, `replication.secret_file` — is
//! resolved against the directory of the file, made absolute. Paths from
//! environment variables keep their meaning (the working directory), as does
//! everything when there is no file at all (the original edgeProxy's
//! environment-only mode).

use std::path::{Path, PathBuf};

use crate::config::{defaults, RawConfig};

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

/// Rewrites every relative path of `raw` (read from `config_file`) as
/// `base_of(config_file)/path`, and sets the default routing table there.
pub fn resolve(raw: &mut RawConfig, config_file: &Path) {
    let base = base_of(config_file);
    let fix = |p: &mut PathBuf| {
        if p.is_relative() && !p.as_os_str().is_empty() {
            *p = base.join(&*p);
        }
    };
    let db = raw
        .routing
        .db_path
        .get_or_insert_with(|| PathBuf::from(defaults::DB_PATH));
    fix(db);
    if let Some(p) = raw.geo.db_path.as_mut() {
        fix(p);
    }
    if let Some(p) = raw.api.token_file.as_mut() {
        fix(p);
    }
    if let Some(p) = raw.replication.secret_file.as_mut() {
        fix(p);
    }
    for l in raw.listeners.iter_mut().flatten() {
        if let Some(tls) = l.tls.as_mut() {
            tls.cert.as_mut().map(fix);
            tls.key.as_mut().map(fix);
            for sni in &mut tls.sni {
                fix(&mut sni.cert);
                fix(&mut sni.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolved(text: &str, file: &str) -> RawConfig {
        let mut raw: RawConfig = toml::from_str(text).unwrap();
        resolve(&mut raw, Path::new(file));
        raw
    }

    #[test]
    fn every_relative_path_is_next_to_the_file() {
        let raw = resolved(
            "[routing]\ndb_path = \"data/routing.db\"\n[geo]\ndb_path = \"geo.mmdb\"\n\
             [api]\ntoken_file = \"api.token\"\n[replication]\nsecret_file = \"secret\"\n\
             [[listener]]\naddr = \"127.0.0.1:0\"\n[listener.tls]\ncert = \"tls/a.pem\"\nkey = \"tls/a.key\"\n\
             [[listener.tls.sni]]\ncert = \"b.pem\"\nkey = \"b.key\"\n",
            "/etc/edgeproxy/edgeproxy.toml",
        );
        let at = |p: &str| PathBuf::from("/etc/edgeproxy").join(p);
        assert_eq!(raw.routing.db_path, Some(at("data/routing.db")));
        assert_eq!(raw.geo.db_path, Some(at("geo.mmdb")));
        assert_eq!(raw.api.token_file, Some(at("api.token")));
        assert_eq!(raw.replication.secret_file, Some(at("secret")));
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
