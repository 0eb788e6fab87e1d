//! The drain after a stop signal, with the control thread still serving.
//!
//! SIGTERM or SIGINT stops accepting and lets open connections finish for up
//! to `limits.shutdown_grace_secs`. The shards do that on their own threads
//! (`Engine::shutdown`, run on a thread of its own here); meanwhile the
//! control runtime keeps answering: the metrics listener (`/metrics`,
//! `/ready` = 503 `draining`, `/live` = 200), the DNS server, and the
//! discovery API, whose `/health` says 503 `draining` and whose other calls
//! are refused with 503 (nothing is written to the routing table while the
//! process goes away). Before, the control thread blocked in the drain and
//! every one of those sockets hung.
//!
//! A second SIGTERM or SIGINT during the drain stops at once, like nginx's
//! fast stop: the shards close what is still open and the process exits.

use serde_json::json;
use tokio::signal::unix::Signal;
use tokio::sync::oneshot;

use crate::api::ops::Reply;

/// The stop signals the drain listens to (SIGHUP and SIGUSR2 are ignored,
/// with a word).
pub struct DrainSignals<'a> {
    pub term: &'a mut Signal,
    pub int: &'a mut Signal,
    pub hup: &'a mut Signal,
    pub usr2: &'a mut Signal,
}

/// Serves the control side until `done` fires (the engine's shutdown
/// finished). A second stop signal triggers `fast`.
pub async fn serve_until_done(
    mut done: oneshot::Receiver<()>,
    signals: DrainSignals<'_>,
    fast: engine::FastStop,
    mut api: Option<crate::api::Server>,
) {
    let DrainSignals {
        term,
        int,
        hup,
        usr2,
    } = signals;
    let mut fast_stopped = false;
    let mut fast_stop = |signal: &str| {
        if !fast_stopped {
            fast_stopped = true;
            tracing::warn!(
                signal,
                "second stop signal during the drain: closing open connections now"
            );
            fast.trigger();
        }
    };
    loop {
        tokio::select! {
            _ = &mut done => return,
            _ = term.recv() => fast_stop("SIGTERM"),
            _ = int.recv() => fast_stop("SIGINT"),
            _ = hup.recv() => tracing::info!("SIGHUP ignored: shutting down"),
            _ = usr2.recv() => tracing::info!("SIGUSR2 ignored: shutting down"),
            cmd = crate::api::next_command(&mut api) => {
                let _ = cmd.reply.send(Reply::error(
                    503,
                    "edgeproxy is shutting down (draining)",
                    json!({}),
                ));
            }
        }
    }
}
