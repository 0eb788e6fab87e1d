//! Starts the proxy with glibc's `rep movsb` memcpy turned off for large
//! copies, by re-executing this same binary once with `GLIBC_TUNABLES` set.
//!
//! Why: glibc (2.36 here, Debian 12) copies blocks above 2 KiB with
//! `rep movsb`, which on AMD Zen runs at 2–3 GB/s instead of 35–48 GB/s
//! whenever the destination is 1–31 bytes ahead of the source modulo 64
//! (measured on an AMD EPYC; README, "TLS bulk and glibc's memcpy"). TLS
//! termination copies every byte twice in user space (rustls's plaintext
//! queue, then the buffer sent to the backend), at offsets set by record
//! headers, so half of those copies took that slow path: 28–32 % of the
//! proxy's CPU on a TLS upload. With the threshold raised glibc uses its AVX
//! loop for them; TLS upload CPU per GB fell from 1.08–1.11× HAProxy's to
//! 0.68–0.70×, download from 0.78× to 0.63–0.65× (README). On CPUs where
//! `rep movsb` is fast the AVX loop is as fast, so this is not made
//! conditional on the CPU.
//!
//! glibc reads tunables only when a process starts, hence the re-exec. It
//! happens first thing in `run`, before any thread, socket or log exists; the
//! process keeps its pid (systemd, the upgrade handshake and pid files see
//! one process). An operator who sets `GLIBC_TUNABLES` (even empty, e.g. to
//! run under valgrind) keeps exactly what they set: no re-exec then.
//!
//! Executing `/proc/self/exe` names the process "exe" (the kernel takes
//! `comm` from the executed path), which would break `pgrep edgeproxy`,
//! `pkill`, `top` and `ps -C`; the re-executed process therefore renames
//! itself after its `argv[0]`, as the first exec had named it.

use std::ffi::OsString;

/// The tunable: `rep movsb` only from 16 MiB, beyond any buffer the proxy
/// copies (glibc switches to non-temporal stores well before that anyway).
pub const TUNABLE: &str = "glibc.cpu.x86_rep_movsb_threshold=0x1000000";

/// What to do before running the proxy, given `GLIBC_TUNABLES` as found.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Re-execute with `GLIBC_TUNABLES` set to this.
    Reexec(OsString),
    /// Run as is: set by the operator or by our own re-exec, or not glibc on
    /// x86-64.
    Keep,
}

pub fn decide(current: Option<&OsString>) -> Decision {
    if !cfg!(all(
        target_os = "linux",
        target_env = "gnu",
        target_arch = "x86_64"
    )) {
        return Decision::Keep;
    }
    match current {
        Some(_) => Decision::Keep,
        None => Decision::Reexec(TUNABLE.into()),
    }
}

/// Re-executes this binary with the tunable when [`decide`] says so. Returns
/// only when it did not (or the exec failed, which is logged to stderr: the
/// proxy then runs with glibc's defaults).
pub fn apply() {
    let current = std::env::var_os("GLIBC_TUNABLES");
    let Decision::Reexec(value) = decide(current.as_ref()) else {
        if current.is_some_and(|value| value == TUNABLE) {
            restore_process_name();
        }
        return;
    };
    use std::os::unix::process::CommandExt;
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_else(|| "edgeproxy".into());
    // /proc/self/exe: this very file, even if a package upgrade has renamed
    // a new one over its path since.
    let error = std::process::Command::new("/proc/self/exe")
        .arg0(argv0)
        .args(args)
        .env("GLIBC_TUNABLES", value)
        .exec();
    eprintln!(
        "edgeproxy: note: could not re-execute with GLIBC_TUNABLES={TUNABLE} ({error}); \
         running with glibc's default memcpy"
    );
}

/// The name the kernel gave the first exec: `argv[0]`'s last component (the
/// kernel's `comm` is the executed path's, and callers pass that path or its
/// name as `argv[0]`), cut to the 15 bytes `comm` holds.
fn process_name(argv0: &std::ffi::OsStr) -> Option<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    let name = std::path::Path::new(argv0).file_name()?.as_bytes();
    std::ffi::CString::new(&name[..name.len().min(15)]).ok()
}

/// Renames this process after `argv[0]` when the re-exec named it "exe".
fn restore_process_name() {
    let Ok(comm) = std::fs::read_to_string("/proc/self/comm") else {
        return;
    };
    if comm.trim_end() != "exe" {
        return;
    }
    let Some(name) = std::env::args_os()
        .next()
        .and_then(|argv0| process_name(&argv0))
    else {
        return;
    };
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes
    // from the pointer, which `name` keeps alive for the call.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr() as libc::c_ulong, 0, 0, 0) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_operators_setting_is_kept_and_an_unset_one_is_filled() {
        let set = OsString::from("glibc.malloc.arena_max=2");
        assert_eq!(decide(Some(&set)), Decision::Keep);
        assert_eq!(decide(Some(&OsString::new())), Decision::Keep);
        let unset = decide(None);
        if cfg!(all(
            target_os = "linux",
            target_env = "gnu",
            target_arch = "x86_64"
        )) {
            assert_eq!(unset, Decision::Reexec(TUNABLE.into()));
        } else {
            assert_eq!(unset, Decision::Keep);
        }
    }

    #[test]
    fn the_process_is_named_after_argv0s_last_component() {
        let name = |argv0: &str| process_name(argv0.as_ref()).map(|c| c.into_string().unwrap());
        assert_eq!(name("/usr/bin/edgeproxy").as_deref(), Some("edgeproxy"));
        assert_eq!(name("edgeproxy").as_deref(), Some("edgeproxy"));
        assert_eq!(
            name("./edgeproxy-with-a-long-name").as_deref(),
            Some("edgeproxy-with-")
        );
        assert_eq!(name("/"), None);
    }
}
