//! systemd's `Type=notify` protocol (`sd_notify(3)`), through the
//! maintained `sd-notify` crate: `READY=1` once every listener is up,
//! `RELOADING=1` (with `MONOTONIC_USEC`) then `READY=1` around a SIGHUP,
//! `STOPPING=1` when a drain starts, `MAINPID=` naming a binary upgrade's
//! new process, and a `STATUS=` line an operator sees in `systemctl
//! status`. Without `NOTIFY_SOCKET` (not started by systemd)
//! every call does nothing. A failed notification is logged, never fatal:
//! the proxy serves whether or not its supervisor listens.

use sd_notify::NotifyState;

fn send(what: &str, states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, notification = what, "cannot notify the service manager (NOTIFY_SOCKET)");
    }
}

/// The proxy is up.
pub fn ready(status: &str) {
    send("READY", &[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A SIGHUP is being handled; [`ready`] follows when it is done.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(
            "RELOADING",
            &[
                NotifyState::Reloading,
                now,
                NotifyState::Status("reloading configuration"),
            ],
        ),
        Err(_) => send(
            "RELOADING",
            &[
                NotifyState::Reloading,
                NotifyState::Status("reloading configuration"),
            ],
        ),
    }
}

/// A drain started (stopped accepting).
pub fn stopping(status: &str) {
    send(
        "STOPPING",
        &[NotifyState::Stopping, NotifyState::Status(status)],
    );
}

/// A binary upgrade's new process serves: it is the service's main process
/// from now on. Sent by the old one, the main process until now (the only
/// one `NotifyAccess=main` listens to), so systemd does not take its exit
/// for the service's.
pub fn main_pid(pid: u32) {
    send("MAINPID", &[NotifyState::MainPid(pid)]);
}
