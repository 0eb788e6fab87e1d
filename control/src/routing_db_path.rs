//! Where `routing.db` lives, checked before SQLite is asked to open it.
//!
//! SQLite creates a missing database wherever it is told to, and fails
//! with "unable to open database file" when it cannot, which says neither
//! which directory is missing nor why a file cannot be made. A typo in
//! `routing.db_path` should be an error naming the directory, and a new,
//! empty table (no backends: every connection refused) should never appear
//! silently: it is logged at WARN with its absolute path.

use std::io;
use std::path::{Path, PathBuf};

/// What [`prepare`] found or did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prepared {
    /// The file exists.
    Existing,
    /// It did not; an empty file was created for SQLite to set up.
    Created,
}

/// Why the routing store's path is unusable. Each message names the path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    #[error("routing store {}: directory {} does not exist (a relative routing.db_path is resolved against the config file's directory)", .path.display(), .dir.display())]
    NoDirectory { path: PathBuf, dir: PathBuf },
    #[error("routing store {} is a directory, not a database file", .path.display())]
    IsDirectory { path: PathBuf },
    #[error("cannot create routing store {}: {cause}", .path.display())]
    CannotCreate { path: PathBuf, cause: io::Error },
    #[error("cannot check routing store {}: {cause}", .path.display())]
    Stat { path: PathBuf, cause: io::Error },
}

/// `path` made absolute against the working directory (for messages; the
/// path itself is used as given).
pub fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// What `run` would do with `path`, without doing it: `Ok(true)` when the
/// file exists, `Ok(false)` when it would be created, an error when it
/// could not be (for `check-config`).
pub fn inspect(path: &Path) -> Result<bool, PathError> {
    let abs = absolute(path);
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Err(PathError::IsDirectory { path: abs }),
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let dir = abs.parent().map(Path::to_path_buf).unwrap_or_default();
            if dir.is_dir() {
                Ok(false)
            } else {
                Err(PathError::NoDirectory { path: abs, dir })
            }
        }
        Err(cause) => Err(PathError::Stat { path: abs, cause }),
    }
}

/// Makes sure `path` can be opened by the routing store: an existing file
/// is left alone; a missing one is created empty (SQLite sets it up) and
/// logged at WARN, or the reason it cannot be is returned.
pub fn prepare(path: &Path) -> Result<Prepared, PathError> {
    if inspect(path)? {
        return Ok(Prepared::Existing);
    }
    let abs = absolute(path);
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
    {
        Ok(_) => {
            tracing::warn!(path = %abs.display(),
                "routing store did not exist: created an empty one; no backend is routable until rows are added");
            Ok(Prepared::Created)
        }
        // Created by someone else in between: theirs to fill.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(Prepared::Existing),
        Err(cause) => Err(PathError::CannotCreate { path: abs, cause }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_existing_file_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.db");
        std::fs::write(&path, b"x").unwrap();
        assert_eq!(prepare(&path).unwrap(), Prepared::Existing);
        assert_eq!(std::fs::read(&path).unwrap(), b"x");
    }

    #[test]
    fn a_missing_file_is_created_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.db");
        assert!(!inspect(&path).unwrap());
        assert!(!path.exists(), "inspect creates nothing");
        assert_eq!(prepare(&path).unwrap(), Prepared::Created);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    }

    #[test]
    fn a_missing_directory_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no-such-dir").join("routing.db");
        let err = prepare(&path).unwrap_err();
        assert!(matches!(err, PathError::NoDirectory { .. }), "{err}");
        assert!(
            err.to_string().contains(&format!(
                "directory {} does not exist",
                dir.path().join("no-such-dir").display()
            )),
            "{err}"
        );
        assert!(!path.parent().unwrap().exists());
    }

    #[test]
    fn a_directory_is_not_a_database() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            prepare(dir.path()).unwrap_err(),
            PathError::IsDirectory { .. }
        ));
    }

    #[test]
    fn a_place_where_nothing_can_be_created_is_an_error_with_the_reason() {
        // sysfs refuses new files even to root.
        let err = prepare(Path::new("/sys/edgeproxy-routing.db")).unwrap_err();
        assert!(matches!(err, PathError::CannotCreate { .. }), "{err}");
        assert!(err.to_string().contains("ermission denied"), "{err}");
    }
}
