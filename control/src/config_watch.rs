//! Config watching: the original edgeProxy's `EDGEPROXY_CONFIG_WATCH_ENABLED`
//! and `EDGEPROXY_CONFIG_WATCH_INTERVAL_SECS` (documented there, never
//! started), and `[config_watch]` in the file. When enabled, the config file
//! is checked every interval and a change is applied exactly as SIGHUP
//! applies it (the control loop runs the same code for both); an invalid
//! new file is refused with an error and the running configuration stays.
//!
//! The first check is at once, against the stamp taken before the file
//! was loaded: an edit made while the process started (a binary upgrade's
//! new process, between reading its file and ready) is applied as soon as
//! it serves. Then one check per interval.
//!
//! A check is a `stat(2)` of the path (following symlinks, so a
//! Kubernetes-style `..data` symlink swap counts): device, inode, size and
//! modification time. An editor's save (write in place, or a new file
//! renamed over the old) changes at least one of them. A file that
//! disappears is reported once and changes nothing; when it comes back it
//! is applied. Polling rather than inotify: one `stat` every few seconds
//! costs nothing, and it sees through symlinks and replaced directories,
//! where an inotify watch stays on the old inode.
//!
//! [`Observer`] is the decision, without I/O (tested with made-up stamps);
//! [`ConfigWatch`] is the timer and the `stat` around it.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::config_env::{env_bool, env_parse, invalid, ConfigError, Env};

pub mod defaults {
    /// The original's default.
    pub const INTERVAL_SECS: u64 = 5;
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfigWatch {
    pub enabled: Option<bool>,
    pub interval_secs: Option<u64>,
}

/// The effective `[config_watch]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConfigWatchSettings {
    /// Env: `EDGEPROXY_CONFIG_WATCH_ENABLED`.
    pub enabled: bool,
    /// Env: `EDGEPROXY_CONFIG_WATCH_INTERVAL_SECS`.
    #[serde(rename = "interval_secs", serialize_with = "ser_secs")]
    pub interval: Duration,
}

fn ser_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs())
}

pub(crate) fn from_raw(
    raw: RawConfigWatch,
    env: &dyn Env,
) -> Result<ConfigWatchSettings, ConfigError> {
    let enabled = env_bool(env, "EDGEPROXY_CONFIG_WATCH_ENABLED")?
        .or(raw.enabled)
        .unwrap_or(false);
    let secs = env_parse::<u64>(env, "EDGEPROXY_CONFIG_WATCH_INTERVAL_SECS")?
        .or(raw.interval_secs)
        .unwrap_or(defaults::INTERVAL_SECS);
    if !(1..=3600).contains(&secs) {
        return Err(invalid(
            "config_watch.interval_secs",
            "must be between 1 second and 1 hour",
        ));
    }
    Ok(ConfigWatchSettings {
        enabled,
        interval: Duration::from_secs(secs),
    })
}

/// What identifies one version of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub dev: u64,
    pub ino: u64,
    pub len: u64,
    pub modified: Option<SystemTime>,
}

impl Stamp {
    /// The stamp of what `path` names now (following symlinks).
    pub fn of(path: &Path) -> std::io::Result<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        Ok(Stamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            modified: m.modified().ok(),
        })
    }
}

/// What one check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    Unchanged,
    /// A new version of the file: apply it.
    Changed,
    /// The file is gone (reported once per disappearance).
    Missing(String),
}

/// The decision of each check, from the stamp seen (or why there is none).
#[derive(Debug, Default)]
pub struct Observer {
    last: Option<Stamp>,
    missing: bool,
}

impl Observer {
    /// Starts from the file as it is now (the configuration just loaded).
    pub fn new(initial: Option<Stamp>) -> Observer {
        Observer {
            last: initial,
            missing: initial.is_none(),
        }
    }

    pub fn observe(&mut self, now: std::io::Result<Stamp>) -> Observation {
        match now {
            Ok(stamp) if Some(stamp) == self.last => {
                self.missing = false;
                Observation::Unchanged
            }
            Ok(stamp) => {
                self.last = Some(stamp);
                self.missing = false;
                Observation::Changed
            }
            Err(e) => {
                // The last version stays what "unchanged" means: a file put
                // back as it was is no change.
                if self.missing {
                    Observation::Unchanged
                } else {
                    self.missing = true;
                    Observation::Missing(e.to_string())
                }
            }
        }
    }

    /// The file was (re)loaded by other means (SIGHUP): this version is
    /// the current one.
    pub fn seen(&mut self, now: Option<Stamp>) {
        if now.is_some() {
            self.last = now;
            self.missing = false;
        }
    }
}

/// The watch the control loop polls.
pub struct ConfigWatch {
    path: Option<PathBuf>,
    settings: ConfigWatchSettings,
    observer: Observer,
    /// Created at the first poll (it needs the runtime).
    ticker: Option<tokio::time::Interval>,
}

impl ConfigWatch {
    /// The file's stamp now: take it *before* loading the configuration,
    /// so that a save between the load and the start of watching is seen.
    pub fn stamp(path: Option<&Path>) -> Option<Stamp> {
        path.and_then(|p| Stamp::of(p).ok())
    }

    /// Watches `path` (the `--config` file; nothing to watch without one),
    /// starting from `initial` (see [`ConfigWatch::stamp`]).
    pub fn new(
        path: Option<&Path>,
        settings: &ConfigWatchSettings,
        initial: Option<Stamp>,
    ) -> ConfigWatch {
        let path = path.map(Path::to_path_buf);
        if settings.enabled {
            match &path {
                Some(p) => {
                    tracing::info!(path = %p.display(), interval_secs = settings.interval.as_secs(),
                    "watching the config file for changes")
                }
                None => tracing::warn!(
                    "config watching is enabled but no config file was given; nothing to watch"
                ),
            }
        }
        ConfigWatch {
            path,
            settings: settings.clone(),
            observer: Observer::new(initial),
            ticker: None,
        }
    }

    /// Resolves when the file changed; never while disabled or without a
    /// file.
    pub async fn changed(&mut self) {
        let Some(path) = self.path.clone().filter(|_| self.settings.enabled) else {
            return std::future::pending().await;
        };
        let interval = self.settings.interval;
        let ticker = self.ticker.get_or_insert_with(|| ticker(interval));
        loop {
            ticker.tick().await;
            match self.observer.observe(Stamp::of(&path)) {
                Observation::Unchanged => {}
                Observation::Changed => return,
                Observation::Missing(why) => tracing::warn!(path = %path.display(), error = %why,
                    "watched config file is missing; keeping the running configuration"),
            }
        }
    }

    /// The file was just loaded by other means (SIGHUP): not a change.
    pub fn seen(&mut self) {
        let now = self.path.as_deref().and_then(|p| Stamp::of(p).ok());
        self.observer.seen(now);
    }

    /// Applies new `[config_watch]` settings (from a reloaded file).
    pub fn reconfigure(&mut self, settings: &ConfigWatchSettings) {
        if *settings == self.settings {
            return;
        }
        if settings.enabled != self.settings.enabled || settings.interval != self.settings.interval
        {
            tracing::info!(
                enabled = settings.enabled,
                interval_secs = settings.interval.as_secs(),
                "config watching changed"
            );
        }
        self.settings = settings.clone();
        self.ticker = None;
    }
}

fn ticker(interval: Duration) -> tokio::time::Interval {
    // The first check comes at once: the file may have changed since the
    // stamp was taken before loading it. A binary upgrade's new process
    // loads its file, then may take seconds to be ready (a slow PostgreSQL
    // source, a large routing table); an edit meanwhile was applied one
    // interval after it was ready (QA), while the old process, which may
    // have applied it already (a new listener), had stopped serving.
    let mut t = tokio::time::interval(interval);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(ino: u64, len: u64, secs: u64) -> Stamp {
        Stamp {
            dev: 1,
            ino,
            len,
            modified: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs)),
        }
    }

    fn gone() -> std::io::Result<Stamp> {
        Err(std::io::Error::from(std::io::ErrorKind::NotFound))
    }

    #[test]
    fn every_kind_of_save_is_one_change() {
        let mut o = Observer::new(Some(stamp(1, 10, 100)));
        assert_eq!(o.observe(Ok(stamp(1, 10, 100))), Observation::Unchanged);
        // Written in place: new time.
        assert_eq!(o.observe(Ok(stamp(1, 10, 101))), Observation::Changed);
        assert_eq!(o.observe(Ok(stamp(1, 10, 101))), Observation::Unchanged);
        // Same time (coarse clock), new size.
        assert_eq!(o.observe(Ok(stamp(1, 12, 101))), Observation::Changed);
        // A new file renamed over it (or a symlink swapped): new inode.
        assert_eq!(o.observe(Ok(stamp(2, 12, 101))), Observation::Changed);
        assert_eq!(o.observe(Ok(stamp(2, 12, 101))), Observation::Unchanged);
    }

    #[test]
    fn a_missing_file_is_reported_once_and_applied_when_back() {
        let mut o = Observer::new(Some(stamp(1, 10, 100)));
        assert!(matches!(o.observe(gone()), Observation::Missing(_)));
        assert_eq!(o.observe(gone()), Observation::Unchanged);
        // Put back exactly as it was: nothing to apply.
        assert_eq!(o.observe(Ok(stamp(1, 10, 100))), Observation::Unchanged);
        assert!(matches!(o.observe(gone()), Observation::Missing(_)));
        // Back as a new file.
        assert_eq!(o.observe(Ok(stamp(3, 10, 200))), Observation::Changed);
        // A watch that started without the file applies it once it exists.
        let mut o = Observer::new(None);
        assert_eq!(o.observe(gone()), Observation::Unchanged);
        assert_eq!(o.observe(Ok(stamp(1, 1, 1))), Observation::Changed);
    }

    #[test]
    fn a_version_loaded_by_sighup_is_not_applied_again() {
        let mut o = Observer::new(Some(stamp(1, 10, 100)));
        o.seen(Some(stamp(1, 11, 105)));
        assert_eq!(o.observe(Ok(stamp(1, 11, 105))), Observation::Unchanged);
        // seen() without a file keeps what was known.
        o.seen(None);
        assert_eq!(o.observe(Ok(stamp(1, 11, 105))), Observation::Unchanged);
    }

    #[test]
    fn stamps_follow_a_rename_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "a").unwrap();
        let mut o = Observer::new(Stamp::of(&path).ok());
        assert_eq!(o.observe(Stamp::of(&path)), Observation::Unchanged);
        let tmp = dir.path().join("c.toml.new");
        std::fs::write(&tmp, "a").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert_eq!(o.observe(Stamp::of(&path)), Observation::Changed);
    }

    const NO_ENV: [(&str, &str); 0] = [];

    fn watch(text: &str, env: &dyn Env) -> Result<ConfigWatchSettings, ConfigError> {
        let raw = crate::config::parse_toml(Path::new("t.toml"), text)?;
        crate::config::Config::from_raw(raw, env).map(|c| c.config_watch)
    }

    #[test]
    fn off_by_default_every_five_seconds_env_over_file() {
        let w = watch("", &NO_ENV).unwrap();
        assert!(!w.enabled);
        assert_eq!(w.interval, Duration::from_secs(5));
        let text = "[config_watch]\nenabled = true\ninterval_secs = 30\n";
        let w = watch(text, &NO_ENV).unwrap();
        assert!(w.enabled);
        assert_eq!(w.interval, Duration::from_secs(30));
        let env = [
            ("EDGEPROXY_CONFIG_WATCH_ENABLED", "false"),
            ("EDGEPROXY_CONFIG_WATCH_INTERVAL_SECS", "2"),
        ];
        let w = watch(text, &env).unwrap();
        assert!(!w.enabled);
        assert_eq!(w.interval, Duration::from_secs(2));
    }

    #[test]
    fn bad_values_are_named() {
        for (text, key) in [
            (
                "[config_watch]\ninterval_secs = 0\n",
                "config_watch.interval_secs",
            ),
            (
                "[config_watch]\ninterval_secs = 3601\n",
                "config_watch.interval_secs",
            ),
            ("[config_watch]\ninterval = 5\n", "interval"),
        ] {
            let err = watch(text, &NO_ENV).unwrap_err();
            assert!(err.to_string().contains(key), "{text}: {err}");
        }
        for (var, value) in [
            ("EDGEPROXY_CONFIG_WATCH_ENABLED", "sometimes"),
            ("EDGEPROXY_CONFIG_WATCH_INTERVAL_SECS", "-1"),
        ] {
            let err = watch("", &[(var, value)]).unwrap_err();
            assert!(err.to_string().contains(var), "{err}");
        }
    }
}
