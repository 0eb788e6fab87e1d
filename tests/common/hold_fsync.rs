//! A fault for the proxy's process: `fsync` of `routing.db` held until the
//! test lets it go, to see what waits on it (the slow disk of a loaded host,
//! made deterministic).
//!
//! An `LD_PRELOAD` library, compiled here with `cc`, wraps `fsync` and
//! `fdatasync`. Once the file `armed` exists in its control directory, a
//! sync of a file named `routing.db` (the main file, not `-wal` or `-shm`)
//! creates `holding` there and waits until `release` exists.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const SOURCE: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int exists(const char *dir, const char *name) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    return access(path, F_OK) == 0;
}

static void hold(int fd) {
    const char *dir = getenv("HOLD_FSYNC_DIR");
    if (!dir || !exists(dir, "armed") || exists(dir, "release")) return;
    char link[64], target[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, target, sizeof target - 1);
    if (n < 11) return;
    target[n] = 0;
    if (strcmp(target + n - 11, "/routing.db") != 0) return;
    char path[4096];
    snprintf(path, sizeof path, "%s/holding", dir);
    int f = open(path, O_CREAT | O_WRONLY, 0644);
    if (f >= 0) close(f);
    while (!exists(dir, "release")) {
        struct timespec pause = {0, 5 * 1000 * 1000};
        nanosleep(&pause, NULL);
    }
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    hold(fd);
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    hold(fd);
    return real(fd);
}
"#;

pub struct HoldFsync {
    lib: PathBuf,
    control: PathBuf,
}

impl HoldFsync {
    /// Builds the library in `dir`.
    pub fn build(dir: &Path) -> HoldFsync {
        let source = dir.join("hold_fsync.c");
        let lib = dir.join("hold_fsync.so");
        let control = dir.join("hold-fsync");
        std::fs::write(&source, SOURCE).unwrap();
        std::fs::create_dir_all(&control).unwrap();
        let status = Command::new("cc")
            .args(["-shared", "-fPIC", "-O1", "-o"])
            .arg(&lib)
            .arg(&source)
            .arg("-ldl")
            .status()
            .expect("cc (the Rust toolchain's linker) is needed to build the fsync fault");
        assert!(status.success(), "cc failed on the fsync fault");
        HoldFsync { lib, control }
    }

    /// The variables that load it into a process.
    pub fn env(&self) -> [(&'static str, &str); 2] {
        [
            ("LD_PRELOAD", self.lib.to_str().unwrap()),
            ("HOLD_FSYNC_DIR", self.control.to_str().unwrap()),
        ]
    }

    /// From now on the next sync of `routing.db` is held.
    pub fn arm(&self) {
        std::fs::write(self.control.join("armed"), "").unwrap();
    }

    /// Waits until a sync is held; false if none was within `patience`.
    pub fn wait_holding(&self, patience: Duration) -> bool {
        let holding = self.control.join("holding");
        super::eventually(patience, || holding.exists())
    }

    /// Lets the held sync, and every later one, go.
    pub fn release(&self) {
        std::fs::write(self.control.join("release"), "").unwrap();
    }
}

impl Drop for HoldFsync {
    /// A failing test must not leave the proxy stuck in `fsync`.
    fn drop(&mut self) {
        let _ = std::fs::write(self.control.join("release"), "");
    }
}
