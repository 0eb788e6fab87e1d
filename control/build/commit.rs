//! Which commit a build comes from, for `edgeproxy --version`. Shared by the
//! build script (`control/build.rs`) and a unit test (`control::version`), so
//! the fallback without git is tested, not assumed.
//!
//! Order: the `EDGEPROXY_BUILD_COMMIT` environment variable (a Docker build
//! or a source tarball names its commit that way), then `git` run in the
//! source directory, then `unknown`. Never fails the build.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The commit and its date, as `--version` shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// Abbreviated hash (12 hex digits), or what the environment said, or
    /// `unknown`.
    pub hash: String,
    /// Commit date (`YYYY-MM-DD`), when git told us.
    pub date: Option<String>,
    /// Files whose change means another commit is checked out: the build
    /// script reruns when they change.
    pub watch: Vec<PathBuf>,
}

pub const UNKNOWN: &str = "unknown";

/// Finds the commit of the source tree at `dir`. `from_env` is the value of
/// `EDGEPROXY_BUILD_COMMIT`, if set.
pub fn find(dir: &Path, from_env: Option<String>) -> Commit {
    if let Some(hash) = from_env
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
    {
        return Commit {
            hash,
            date: None,
            watch: Vec::new(),
        };
    }
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git")
            .args(args)
            .current_dir(dir)
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output()
            .ok()?;
        let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
        (out.status.success() && !text.is_empty()).then_some(text)
    };
    let Some(hash) = git(&["rev-parse", "--short=12", "HEAD"]) else {
        return Commit {
            hash: UNKNOWN.into(),
            date: None,
            watch: Vec::new(),
        };
    };
    let date = git(&["log", "-1", "--format=%cs", "HEAD"]);
    // HEAD lives in the worktree's git directory, the branch it names in
    // the common one (they differ in a `git worktree`).
    let mut watch = Vec::new();
    let absolute = |p: String| {
        let p = PathBuf::from(p);
        if p.is_absolute() {
            p
        } else {
            dir.join(p)
        }
    };
    if let Some(git_dir) = git(&["rev-parse", "--git-dir"]).map(absolute) {
        watch.push(git_dir.join("HEAD"));
    }
    if let Some(common) = git(&["rev-parse", "--git-common-dir"]).map(absolute) {
        if let Some(branch) = git(&["rev-parse", "--symbolic-full-name", "HEAD"]) {
            if branch.starts_with("refs/") {
                watch.push(existing_or_parent(common.join(branch)));
            }
        }
        let packed = common.join("packed-refs");
        if packed.exists() {
            watch.push(packed);
        }
    }
    Commit { hash, date, watch }
}

/// `path` if it exists, else its nearest ancestor that does. Cargo takes a
/// watched path that does not exist as changed on every build, so the build
/// script reran and the crate (and the binary) rebuilt every time in a
/// clone without `packed-refs` or with its branch packed. A branch that is
/// only in `packed-refs` gets its loose file back with the next commit: the
/// directory it appears in is watched (cargo notices a new file in it); a
/// loose branch file that `git pack-refs` removes is a change too.
fn existing_or_parent(path: PathBuf) -> PathBuf {
    let mut at = path.as_path();
    while !at.exists() {
        match at.parent() {
            Some(parent) => at = parent,
            None => break,
        }
    }
    at.to_path_buf()
}
