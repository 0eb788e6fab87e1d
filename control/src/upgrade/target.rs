//! `edgeproxy upgrade --pid N`: SIGUSR2 to N, only if N is a running
//! edgeproxy.
//!
//! SIGUSR2's default action ends a process: sent to one that is not a proxy
//! (a typo, a stale pid file, a pid reused by another program) it would kill
//! it. So before signalling, N must
//! 1. run an edgeproxy binary: `/proc/N/exe` is the file this command runs
//!    from, or names the same path (the running proxy's file was replaced by
//!    the new binary: the link reads `PATH (deleted)`), or a file named
//!    `edgeproxy`;
//! 2. handle SIGUSR2 (`SigCgt` in `/proc/N/status`): an edgeproxy that is
//!    not a running proxy (`edgeproxy backends list`, or a proxy still
//!    starting, before its handler is installed) would be killed by it.
//!
//! The checks and the signal go through one pidfd opened first: if N exits
//! and its number is reused meanwhile, the signal reaches nobody rather than
//! the newcomer.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Why `--pid` was not signalled.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TargetError {
    #[error("--pid {0} is not a process id")]
    BadPid(i32),
    #[error("there is no process {0}")]
    NoProcess(i32),
    #[error("cannot tell what process {pid} ({comm}) is: {cause}; not signalled")]
    Unknown {
        pid: i32,
        comm: String,
        cause: io::Error,
    },
    #[error("process {pid} is not an edgeproxy: it is {comm:?} ({exe}); not signalled")]
    NotEdgeproxy { pid: i32, comm: String, exe: String },
    #[error(
        "process {pid} runs edgeproxy ({exe}) but does not handle SIGUSR2: it is not a running \
         proxy (its command line: {cmdline}) or has not finished starting; not signalled"
    )]
    NotServing {
        pid: i32,
        exe: String,
        cmdline: String,
    },
    #[error("cannot signal process {pid}: {cause}")]
    Signal { pid: i32, cause: io::Error },
}

/// Sends SIGUSR2 to `pid` if it is a running edgeproxy (see the module
/// documentation).
pub fn signal_upgrade(pid: i32) -> Result<(), TargetError> {
    if pid <= 0 {
        return Err(TargetError::BadPid(pid));
    }
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new
    // descriptor we own, or -1.
    let pidfd = match unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } {
        -1 => match io::Error::last_os_error() {
            e if e.raw_os_error() == Some(libc::ESRCH) => return Err(TargetError::NoProcess(pid)),
            // No pidfds (a kernel before 5.3): check, then kill(2) by pid.
            e if e.raw_os_error() == Some(libc::ENOSYS) => None,
            cause => return Err(TargetError::Signal { pid, cause }),
        },
        // SAFETY: a descriptor just returned to us and owned by nobody else.
        fd => Some(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) }),
    };
    check(pid)?;
    // SAFETY: pidfd_send_signal(2) on our pidfd with no siginfo, or kill(2)
    // with a plain signal number.
    let sent = unsafe {
        match &pidfd {
            Some(fd) => libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd.as_raw_fd(),
                libc::SIGUSR2,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            ) as libc::c_int,
            None => libc::kill(pid, libc::SIGUSR2),
        }
    };
    if sent != 0 {
        let cause = io::Error::last_os_error();
        return Err(match cause.raw_os_error() {
            Some(libc::ESRCH) => TargetError::NoProcess(pid),
            _ => TargetError::Signal { pid, cause },
        });
    }
    Ok(())
}

/// Whether `pid` is a running edgeproxy, from `/proc`.
fn check(pid: i32) -> Result<(), TargetError> {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let comm = std::fs::read_to_string(proc.join("comm"))
        .map(|c| c.trim_end().to_string())
        .map_err(|_| TargetError::NoProcess(pid))?;
    let exe = std::fs::read_link(proc.join("exe")).map_err(|cause| TargetError::Unknown {
        pid,
        comm: comm.clone(),
        cause,
    })?;
    let exe_text = exe.display().to_string();
    let same_file = match (
        std::fs::metadata(proc.join("exe")),
        std::fs::metadata("/proc/self/exe"),
    ) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    };
    let ours = std::fs::read_link("/proc/self/exe").ok();
    if !same_file && !is_edgeproxy(&exe, ours.as_deref()) {
        return Err(TargetError::NotEdgeproxy {
            pid,
            comm,
            exe: exe_text,
        });
    }
    let status =
        std::fs::read_to_string(proc.join("status")).map_err(|cause| TargetError::Unknown {
            pid,
            comm: comm.clone(),
            cause,
        })?;
    if catches(&status, libc::SIGUSR2) != Some(true) {
        let cmdline = std::fs::read(proc.join("cmdline"))
            .map(|raw| {
                raw.split(|&b| b == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        return Err(TargetError::NotServing {
            pid,
            exe: exe_text,
            cmdline,
        });
    }
    Ok(())
}

/// Whether the executable `exe` (a `/proc/N/exe` link) is an edgeproxy:
/// named `edgeproxy`, or at the path `ours` (this command's own link) once
/// both lose a ` (deleted)` suffix.
fn is_edgeproxy(exe: &Path, ours: Option<&Path>) -> bool {
    let strip = |p: &Path| -> PathBuf {
        let text = p.as_os_str().to_string_lossy();
        PathBuf::from(text.strip_suffix(" (deleted)").unwrap_or(&text))
    };
    let exe = strip(exe);
    exe.file_name().is_some_and(|n| n == "edgeproxy") || ours.is_some_and(|o| strip(o) == exe)
}

/// Whether a `/proc/N/status` text says the process catches `signal`
/// (`SigCgt`, a hexadecimal mask, bit `signal - 1`); `None` if it does not
/// say.
fn catches(status: &str, signal: libc::c_int) -> Option<bool> {
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())?;
    Some(mask & (1 << (signal - 1)) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_caught_signals_mask() {
        // A proxy's: SIGHUP, SIGINT, SIGUSR2, SIGTERM... (bits 0, 1, 11, 14).
        let status = "Name:\tedgeproxy\nSigBlk:\t0000000000000000\nSigCgt:\t0000000180004803\n";
        assert_eq!(catches(status, libc::SIGUSR2), Some(true));
        assert_eq!(catches(status, libc::SIGUSR1), Some(false));
        assert_eq!(
            catches("SigCgt:\t0000000000000000\n", libc::SIGUSR2),
            Some(false)
        );
        assert_eq!(catches("Name:\tx\n", libc::SIGUSR2), None);
    }

    #[test]
    fn an_edgeproxy_is_named_so_or_at_our_path() {
        let ours = Path::new("/opt/ep/bin/proxy");
        for (exe, yes) in [
            ("/usr/local/bin/edgeproxy", true),
            ("/usr/local/bin/edgeproxy (deleted)", true),
            ("/opt/ep/bin/proxy (deleted)", true),
            ("/opt/ep/bin/proxy", true),
            ("/usr/bin/sleep", false),
            ("/usr/bin/edgeproxy-helper", false),
            ("/usr/bin/not-edgeproxy", false),
        ] {
            assert_eq!(is_edgeproxy(Path::new(exe), Some(ours)), yes, "{exe}");
        }
    }

    #[test]
    fn a_process_that_is_not_an_edgeproxy_is_named_and_not_signalled() {
        let mut sleep = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .unwrap();
        let pid = sleep.id() as i32;
        // Wait for the exec: until then the child still runs this binary.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap() != "sleep\n" {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let e = signal_upgrade(pid).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, TargetError::NotEdgeproxy { .. }), "{text}");
        assert!(text.contains(&format!("process {pid} ")), "{text}");
        assert!(text.contains("\"sleep\""), "{text}");
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(sleep.try_wait().unwrap().is_none(), "sleep was signalled");
        sleep.kill().unwrap();
        sleep.wait().unwrap();
        assert!(matches!(
            signal_upgrade(pid),
            Err(TargetError::NoProcess(p)) if p == pid
        ));
        assert!(matches!(signal_upgrade(0), Err(TargetError::BadPid(0))));
    }
}
