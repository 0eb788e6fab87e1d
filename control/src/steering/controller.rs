//! The steering controller: one task on the control runtime that judges,
//! every [`POLL_BGP`] (or [`POLL_IDLE`] without BGP), whether this POP can
//! serve, and carries the judgement out: this POP's row of `pops`
//! (`draining`, `serving`) for the other POPs' GeoDNS, and the BGP
//! announcement through the [`Policy`].
//!
//! Call order: [`start`] after the data plane is up and before replication
//! starts (so this POP's row holds a real verdict before it first
//! replicates); [`Handle::drain`] / [`Handle::undrain`] from the API;
//! [`Handle::shutdown`] when a stop signal arrives, before the listeners
//! close: it returns once the routes are withdrawn (soft drain first) and
//! the withdrawal is on the wire, plus `[bgp] withdraw_grace_ms`.
//!
//! With replication on, a start neither writes this POP's row nor
//! announces until replication has written it with the cluster's word on
//! its drain (`crate::own_row_gate`): `routing.db` may be older than the
//! cluster's copy (a new POP, the file wiped or restored from a backup).
//!
//! The judgement reads the published routing snapshot: backend health
//! (drains, heartbeat expiry, health checks) reaches it there, so a
//! failure confirmed there is withdrawn within one poll.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use dns::geodns::{self, Standing};
use engine::failure_streak::FailureStreak;
use engine::snapshot::{PopView, SnapshotHandle};
use engine::StatsView;
use tokio::sync::{mpsc, oneshot};

use super::pop_row::{PopRowWriter, PopState};
use super::status::PopStatus;
use super::verdict::{judge, serving_listeners, want, ServingListener, Verdict};
use crate::bgp::driver::Inherited;
use crate::bgp::handoff::Handed;
use crate::bgp::policy::{Phase, Policy};
use crate::bgp::Speaker;
use crate::config::Config;
use crate::own_row_gate::OwnRowGate;
use crate::reload_thread::SharedReloader;
use crate::store::PopRow;

/// How often the POP is judged with BGP on: a health failure confirmed in
/// the snapshot is withdrawn within this (the goal is 100 ms).
pub const POLL_BGP: Duration = Duration::from_millis(20);
/// Without BGP only the `pops` row depends on it.
pub const POLL_IDLE: Duration = Duration::from_millis(250);
/// How often this POP's row is read back for edits made by another writer
/// (see `Controller::follow_row`).
const ROW_READ_EVERY: Duration = Duration::from_secs(1);
/// How long a shutdown waits for the withdrawal to be written.
const WITHDRAW_WRITE_PATIENCE: Duration = Duration::from_secs(2);
/// How long a binary upgrade waits for the sessions to stop.
const HAND_OFF_PATIENCE: Duration = Duration::from_secs(2);
/// A row write that keeps failing (disk full, read-only file system, a
/// lock held) is tried again every `ROW_READ_EVERY`, but said at most this
/// often.
const RECORD_ERROR_EVERY: Duration = Duration::from_secs(10);
/// How much longer than replication's own longest wait (see
/// `Replication::own_row_longest_wait`) a starting POP waits for
/// replication to write its row before writing it here: only if
/// replication could not (its database write failed).
const OWN_ROW_MARGIN: Duration = Duration::from_secs(5);

enum Command {
    Drain(bool, oneshot::Sender<PopStatus>),
    /// The listeners changed (SIGHUP): the serving ones again.
    Listeners(Vec<ServingListener>),
    Shutdown(oneshot::Sender<bool>),
    /// A binary upgrade's successor owns this POP's row now: stop without
    /// writing it, and hand the BGP sessions over.
    HandOver(oneshot::Sender<Vec<Handed>>),
}

/// The running controller. Cheap to clone.
#[derive(Clone)]
pub struct Handle {
    commands: mpsc::UnboundedSender<Command>,
    status: Arc<ArcSwap<PopStatus>>,
    bgp: Option<crate::bgp::status::StatusHandle>,
    withdraw_grace: Duration,
}

impl Handle {
    pub fn status(&self) -> PopStatus {
        (**self.status.load()).clone()
    }

    pub fn bgp_status(&self) -> Option<crate::bgp::status::BgpStatus> {
        self.bgp.as_ref().map(|b| b.get())
    }

    /// Drains this POP (`true`) or ends the drain (`false`): recorded in its
    /// `pops` row, announced through BGP. Returns the state once recorded.
    pub async fn drain(&self, on: bool) -> anyhow::Result<PopStatus> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Drain(on, tx))
            .map_err(|_| anyhow::anyhow!("the steering controller has stopped"))?;
        rx.await
            .map_err(|_| anyhow::anyhow!("the steering controller has stopped"))
    }

    /// The listeners changed (SIGHUP): judges from the new serving set.
    pub fn set_listeners(&self, config: &Config) {
        let _ = self.commands.send(Command::Listeners(serving_of(config)));
    }

    /// After a binary upgrade: the successor judges and writes this POP's
    /// row from now on, so this controller stops at once without marking
    /// the POP "not serving" (which would replicate to every POP), and
    /// without withdrawing anything: returns the established BGP sessions,
    /// stopped without a word to their peers, each with its connection,
    /// for the successor to go on with.
    pub async fn hand_over(&self) -> Vec<Handed> {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::HandOver(tx)).is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// The shutdown's part: stops announcing (soft drain, then withdrawal)
    /// and returns when the withdrawal is written, plus the grace for
    /// connections on their way; then ends the BGP sessions. Returns at
    /// once when nothing was announced.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Shutdown(tx)).is_err() {
            return;
        }
        if let Ok(true) = rx.await {
            tokio::time::sleep(self.withdraw_grace).await;
        }
    }
}

/// Starts the controller (inside the control runtime). `inherited`: this
/// process is a binary upgrade's successor, the predecessor's BGP sessions
/// to come (see [`Speaker::start`]). `own_row`: closed while replication
/// has not written this POP's row yet (see `crate::own_row_gate`).
pub fn start(
    config: &Config,
    snapshot: SnapshotHandle,
    listeners: StatsView,
    reloader: SharedReloader,
    inherited: Option<Inherited>,
    own_row: OwnRowGate,
) -> anyhow::Result<Handle> {
    let bgp = &config.bgp;
    let serving = serving_of(config);
    let node_id = config.replication.node_id.clone();
    let identity = PopRow {
        node_id: node_id.clone(),
        name: config.pop.name.clone(),
        region: config.pop.region.clone(),
        country: config.pop.country.clone(),
        public_addrs: config
            .pop
            .public_addrs
            .iter()
            .map(IpAddr::to_string)
            .collect::<Vec<_>>()
            .join(","),
        serving: false,
        ..PopRow::default()
    };
    let awaiting = !own_row.is_open();
    let (rows, found) = PopRowWriter::open(&config.routing.db_path, &identity, awaiting)?;
    let awaiting_row = if awaiting {
        let patience = config.replication.own_row_longest_wait();
        tracing::info!(node = %node_id, patience_ms = patience.as_millis() as u64,
            "pop: not announced until replication has the cluster's copy of this POP's row, which says whether it is drained \
             (routing.db may be older than it)");
        Some(Instant::now() + patience + OWN_ROW_MARGIN)
    } else {
        if found.is_some_and(|found| found.draining) {
            warn_drained(&node_id, "since before this start");
        }
        None
    };
    let found = found.unwrap_or(PopState {
        draining: false,
        serving: false,
    });
    if !config.replication.enabled {
        // No cluster: the snapshot's POP list is this POP alone (GeoDNS
        // answers it while it can serve).
        let alive: crate::routing::Liveness = Default::default();
        alive.store(Arc::new(std::collections::HashSet::from([node_id.clone()])));
        reloader.lock().set_pops_input(crate::routing::PopsInput {
            local_id: node_id.clone(),
            alive,
            down: Default::default(),
        });
    }
    let speaker = bgp.enabled.then(|| Speaker::start(bgp, inherited));
    let status = Arc::new(ArcSwap::from_pointee(PopStatus::default()));
    let (commands, command_rx) = mpsc::unbounded_channel();
    let handle = Handle {
        commands,
        status: Arc::clone(&status),
        bgp: speaker.as_ref().map(Speaker::status),
        withdraw_grace: bgp.withdraw_grace,
    };
    tracing::info!(listeners = %serving.iter().map(|l| l.name.as_str()).collect::<Vec<_>>().join(","),
        bgp = bgp.enabled, "pop: judging whether this POP can serve from these listeners");
    if serving.is_empty() {
        warn_none_reachable();
    }
    let store_writable = reloader.lock().store_mut().writable_flag();
    let mut controller = Controller {
        snapshot,
        listeners,
        serving,
        reloader,
        rows,
        written: found,
        operator_drained: found.draining,
        awaiting_row,
        own_row,
        asked_while_awaiting: None,
        shutting_down: false,
        verdict: None,
        policy: Policy::new(bgp.drain_delay),
        speaker,
        status,
        identity,
        shutdown_waiter: None,
        announced_at_shutdown: false,
        pending_row: None,
        record_failing: FailureStreak::new(RECORD_ERROR_EVERY),
        record_retry_at: None,
        bgp_enabled: bgp.enabled,
        poll: if bgp.enabled { POLL_BGP } else { POLL_IDLE },
        store_writable,
    };
    // The first judgement now, not at the task's first turn: the row holds
    // a real verdict (and the snapshot its POP list) before the proxy says
    // it is up, so no reload of this POP's own making comes later at an
    // arbitrary time. The listeners are bound already (`Engine::start`).
    controller.evaluate(Instant::now());
    controller.record();
    if let Err(e) = controller.rows.wait_briefly_for_locks() {
        tracing::warn!(error = %e, "pop: cannot shorten the wait for routing.db's locks");
    }
    tokio::spawn(controller.run(command_rx));
    Ok(handle)
}

fn warn_drained(node_id: &str, since: &str) {
    tracing::warn!(node = %node_id, since,
        "pop: this POP is drained: not announced, left out of GeoDNS; `edgeproxy undrain` to serve again");
}

/// Says why a POP whose listeners are all off its anycast prefixes and
/// public addresses will not announce.
fn warn_none_reachable() {
    tracing::warn!(
        "pop: no listener is reachable at the anycast prefixes or [pop] public_addrs: \
         this POP cannot serve until one is (bind a listener to 0.0.0.0, [::], \
         an anycast address or a public address)"
    );
}

/// The serving listeners of `config` (see `verdict`).
fn serving_of(config: &Config) -> Vec<ServingListener> {
    let anycast = if config.bgp.enabled {
        config.bgp.announce.clone()
    } else {
        Vec::new()
    };
    let configured: Vec<(String, std::net::SocketAddr, Option<String>)> = config
        .listeners
        .iter()
        .map(|l| (l.name.clone(), l.addr, l.app.clone()))
        .collect();
    serving_listeners(&configured, &anycast, &config.pop.public_addrs)
}

struct Controller {
    snapshot: SnapshotHandle,
    listeners: StatsView,
    serving: Vec<ServingListener>,
    reloader: SharedReloader,
    rows: PopRowWriter,
    /// The row's state as last written (or found).
    written: PopState,
    operator_drained: bool,
    /// Until replication has written this POP's row with the cluster's
    /// copy's drain (`own_row` opens), or this instant passes, nothing is
    /// announced and no row written.
    awaiting_row: Option<Instant>,
    own_row: OwnRowGate,
    /// A drain or undrain asked for meanwhile: it wins over the row's.
    asked_while_awaiting: Option<bool>,
    shutting_down: bool,
    verdict: Option<Verdict>,
    policy: Policy,
    speaker: Option<Speaker>,
    status: Arc<ArcSwap<PopStatus>>,
    identity: PopRow,
    shutdown_waiter: Option<oneshot::Sender<bool>>,
    announced_at_shutdown: bool,
    /// The row's state as judged by the last evaluation, to record.
    pending_row: Option<PopState>,
    /// Row writes failing since the last success, and how often that is
    /// said: QA, a full disk logged one ERROR per evaluation (4 a second,
    /// 50 with BGP) for as long as it lasted.
    record_failing: FailureStreak,
    /// After a failed write, the next is not tried before this: each may
    /// block the control thread for `pop_row::BUSY_WAIT` on a held lock.
    record_retry_at: Option<Instant>,
    bgp_enabled: bool,
    poll: Duration,
    /// False while the routing store reads routing.db as it is because the
    /// disk refuses writes (`RoutingStore::writable_flag`): the row is not
    /// tried then (the store said why, once) and is recorded once it is
    /// writable again.
    store_writable: Arc<std::sync::atomic::AtomicBool>,
}

impl Controller {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut tick = tokio::time::interval(self.poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut row_read_at = Instant::now();
        loop {
            if row_read_at.elapsed() >= ROW_READ_EVERY {
                row_read_at = Instant::now();
                self.follow_row();
            }
            self.evaluate(Instant::now());
            tokio::task::yield_now().await;
            self.record();
            let wake = self
                .policy
                .poll_timeout()
                .map(tokio::time::Instant::from_std)
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                _ = tick.tick() => {}
                _ = tokio::time::sleep_until(wake) => {}
                cmd = commands.recv() => match cmd {
                    Some(Command::Drain(on, reply)) => {
                        // The command is judged against the row as it is
                        // now, not as last read (up to `ROW_READ_EVERY`
                        // ago): a drain replicated from another POP in
                        // between, then `undrain` here, left the row
                        // unwritten (the undrain matched the stale copy)
                        // and the POP followed the older drain.
                        self.follow_row();
                        if self.awaiting_row.is_some() {
                            self.asked_while_awaiting = Some(on);
                        }
                        if on != self.operator_drained {
                            self.operator_drained = on;
                            if on {
                                tracing::warn!("pop: drained by the operator: leaving GeoDNS answers{}",
                                    if self.speaker.is_some() { ", soft-draining the anycast routes" } else { "" });
                            } else {
                                tracing::info!("pop: drain ended by the operator");
                            }
                        }
                        self.evaluate(Instant::now());
                        tokio::task::yield_now().await;
                        self.record();
                        let _ = reply.send(self.status.load().as_ref().clone());
                    }
                    Some(Command::Listeners(serving)) => {
                        if serving.is_empty() {
                            warn_none_reachable();
                        }
                        if serving != self.serving {
                            tracing::info!(listeners = %serving.iter().map(|l| l.name.as_str()).collect::<Vec<_>>().join(","),
                                "pop: the listeners changed; judging from these now");
                            self.serving = serving;
                        }
                    }
                    Some(Command::Shutdown(reply)) => {
                        self.shutting_down = true;
                        if self.bgp_enabled {
                            self.announced_at_shutdown = self.policy.phase().graceful_shutdown().is_some();
                            self.shutdown_waiter = Some(reply);
                        } else {
                            // Nothing announced to wait for: the row says
                            // "not serving" at the next evaluation.
                            let _ = reply.send(false);
                        }
                    }
                    Some(Command::HandOver(reply)) => {
                        let handed = match self.speaker.take() {
                            Some(mut speaker) => speaker.hand_off(HAND_OFF_PATIENCE).await,
                            None => Vec::new(),
                        };
                        let _ = reply.send(handed);
                        return;
                    }
                    None => return,
                },
            }
        }
    }

    /// Follows an edit of this POP's row made by another writer: an
    /// operator's sqlite3 here, or one at another POP, replicated. QA: such
    /// an edit of `draining` was ignored (the row was only written, never
    /// read) until the next start, which then drained (or undrained) the
    /// POP by surprise. The row's `draining` is the operator's persisted
    /// decision, so the POP follows it now, as a start would; its
    /// `serving` is this POP's own verdict, written again at once if the
    /// edit changed it.
    fn follow_row(&mut self) {
        if self.awaiting_row.is_some() {
            // The cluster's copy, persisted by replication: adopted by
            // `await_row`, not an edit.
            return;
        }
        match self.rows.read() {
            Ok(Some(row)) if row != self.written => {
                if row.draining != self.operator_drained {
                    tracing::warn!(draining = row.draining,
                        "pop: this POP's row in the pops table was edited outside `edgeproxy drain`/`undrain` (here or at another POP): following it");
                    self.operator_drained = row.draining;
                }
                self.written = row;
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "pop: cannot read this POP's row"),
        }
    }

    /// Until replication has written this POP's row: adopts it once
    /// written, or writes it after [`OWN_ROW_MARGIN`] more than
    /// replication's wait.
    fn await_row(&mut self, now: Instant) {
        let Some(give_up_at) = self.awaiting_row else {
            return;
        };
        let written_by_replication = match self.own_row.is_open() {
            true => self.rows.read(),
            false if now >= give_up_at => Ok(None),
            false => return,
        };
        let found = match written_by_replication {
            Ok(Some(row)) => row,
            Ok(None) => match self.rows.ensure(&self.identity) {
                Ok(row) => {
                    // The line below says the row is written: a streak of
                    // failed writes ends without a line of its own.
                    let _ = self.record_failing.succeeded();
                    tracing::warn!("pop: replication did not write this POP's row in time; written here, without the cluster's copy");
                    row
                }
                Err(e) => {
                    // Said like any failed write of the row (QA: once a
                    // second while a lock or a full disk lasted).
                    if let Some(left_out) = self.record_failing.failed(now) {
                        tracing::error!(error = %e, left_out,
                            "pop: cannot write this POP's row; trying again every second (said at most every 10 s)");
                    }
                    self.awaiting_row = Some(now + ROW_READ_EVERY);
                    return;
                }
            },
            Err(e) => {
                tracing::debug!(error = %e, "pop: cannot read this POP's row");
                return;
            }
        };
        self.awaiting_row = None;
        self.written = found;
        self.operator_drained = self.asked_while_awaiting.take().unwrap_or(found.draining);
        if self.operator_drained {
            warn_drained(&self.identity.node_id, "the cluster's copy of its row");
        }
    }

    /// Judges, records, announces, publishes.
    fn evaluate(&mut self, now: Instant) {
        self.await_row(now);
        let running: Vec<String> = self
            .listeners
            .listeners()
            .into_iter()
            .map(|l| l.name)
            .collect();
        let verdict = judge(&self.snapshot.load(), &self.serving, &running);
        if self.verdict.as_ref() != Some(&verdict) {
            if verdict.is_serving() {
                tracing::info!("pop: can serve");
            } else {
                tracing::warn!(reason = %verdict.describe(), "pop: cannot serve");
            }
            self.verdict = Some(verdict.clone());
        }
        let want = want(self.operator_drained, self.shutting_down, &verdict);
        // Awaiting its row, the POP stays withdrawn as it started.
        if self.awaiting_row.is_none() {
            if let Some(before) = self.policy.step(now, want) {
                self.log_phase(before);
            }
        }
        let generation = self
            .speaker
            .as_ref()
            .map(|s| s.advertise(&self.policy.phase()));
        let withdrawn = matches!(self.policy.phase(), Phase::Withdrawn(_));
        if let Some(reply) = self.shutdown_waiter.take_if(|_| withdrawn) {
            let was_announced = self.announced_at_shutdown;
            match (self.speaker.take(), generation) {
                (Some(mut speaker), Some(generation)) => {
                    tokio::spawn(async move {
                        if !speaker
                            .wait_synced(generation, WITHDRAW_WRITE_PATIENCE)
                            .await
                        {
                            tracing::warn!("bgp: the withdrawal could not be written to every neighbor in time");
                        }
                        let _ = reply.send(was_announced);
                        speaker
                            .stop("edgeproxy shutting down", Duration::from_secs(1))
                            .await;
                    });
                }
                _ => {
                    let _ = reply.send(false);
                }
            }
        }
        let row = self.publish(now, &verdict);
        // Awaiting its row (see `awaiting_row`), the POP writes none.
        self.pending_row = self.awaiting_row.is_none().then_some(row);
    }

    /// Writes this POP's row if its state changed. Separate from
    /// [`evaluate`](Controller::evaluate), and after a yield, so that the
    /// session tasks write an UPDATE before this waits on SQLite (the
    /// control runtime has one thread).
    fn record(&mut self) {
        if !self
            .store_writable
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        let Some(state) = self.pending_row.take() else {
            return;
        };
        let now = Instant::now();
        if self.record_retry_at.is_some_and(|at| now < at) {
            return;
        }
        if state != self.written {
            match self.rows.write(state) {
                Ok(_) => {
                    self.written = state;
                    self.record_retry_at = None;
                    if let Some(failures) = self.record_failing.succeeded() {
                        tracing::info!(failures, "pop: this POP's state recorded again");
                    }
                    // This POP's GeoDNS answers from the snapshot too.
                    self.reloader.reload_soon();
                }
                Err(e) => {
                    self.record_retry_at = Some(now + ROW_READ_EVERY);
                    if let Some(left_out) = self.record_failing.failed(now) {
                        tracing::error!(error = %e, left_out,
                            "pop: cannot record this POP's state; other POPs keep the old one \
                             (tried again every second, said at most every 10 s while it lasts)");
                    }
                }
            }
        }
    }

    fn log_phase(&self, before: Phase) {
        if self.speaker.is_none() {
            return;
        }
        let now = self.policy.phase();
        if now.name() == before.name() {
            return; // only the cause changed
        }
        match now {
            Phase::Announced => tracing::info!("bgp: announcing the anycast prefixes"),
            Phase::Draining { withdraw_at, .. } => tracing::info!(
                reason = now.reason().unwrap_or(""),
                withdraw_in_ms = withdraw_at
                    .saturating_duration_since(Instant::now())
                    .as_millis() as u64,
                "bgp: soft drain: routes tagged GRACEFUL_SHUTDOWN until the withdrawal"
            ),
            Phase::Withdrawn(_) => tracing::warn!(
                reason = now.reason().unwrap_or(""),
                "bgp: withdrawing the anycast prefixes"
            ),
        }
    }

    /// Publishes the status; returns the row it is judged with, to record.
    fn publish(&self, now: Instant, verdict: &Verdict) -> PopState {
        let phase = self.policy.phase();
        let bgp = self.bgp_enabled;
        // Without BGP there is no route to withdraw: no countdown either
        // (a drain said `withdraw_in_ms: 5000` beside `announcement: null`).
        let withdraw_in_ms = match phase {
            Phase::Draining { withdraw_at, .. } if bgp => {
                Some(withdraw_at.saturating_duration_since(now).as_millis() as u64)
            }
            _ => None,
        };
        let row = PopState {
            draining: self.operator_drained,
            serving: verdict.is_serving() && !self.shutting_down,
        };
        // Awaiting its row, the POP is in no table GeoDNS answers from.
        let geodns = match self.awaiting_row {
            Some(_) => Standing::LeftOut,
            None => geodns_standing(&self.snapshot.load().pops, row),
        };
        let status = PopStatus {
            node_id: self.identity.node_id.clone(),
            name: self.identity.name.clone(),
            region: self.identity.region.clone(),
            draining: self.operator_drained,
            awaiting_own_row: self.awaiting_row.is_some(),
            shutting_down: self.shutting_down,
            serving: verdict.is_serving(),
            verdict: verdict.describe(),
            geodns: geodns != Standing::LeftOut,
            geodns_fallback: geodns == Standing::Fallback,
            listeners: self.serving.iter().map(|l| l.name.clone()).collect(),
            announcement: bgp.then(|| phase.name().to_string()),
            announcement_reason: bgp
                .then(|| announcement_reason(&phase, self.awaiting_row.is_some()).map(String::from))
                .flatten(),
            withdraw_in_ms,
        };
        if let Some(speaker) = &self.speaker {
            speaker.status().update(|s| {
                s.phase = status.announcement.clone().unwrap_or_default();
                s.reason = status.announcement_reason.clone();
                s.withdraw_in_ms = withdraw_in_ms;
            });
        }
        if **self.status.load() != status {
            self.status.store(Arc::new(status));
        }
        row
    }
}

/// Why the anycast prefixes are not announced (`None`: they are), for
/// the status: the phase's own reason, except while the POP awaits the
/// cluster's copy of its row, which is what holds a start back then.
fn announcement_reason(phase: &Phase, awaiting_row: bool) -> Option<&'static str> {
    match (phase, awaiting_row) {
        (Phase::Withdrawn(_), true) => Some(
            "starting: waiting for the cluster's copy of this POP's row (whether it is drained)",
        ),
        _ => phase.reason(),
    }
}

/// How GeoDNS stands towards this POP once `row` is written: GeoDNS's own
/// rule ([`geodns::standing`]) over the cluster's POPs in the snapshot, this
/// POP's entry taken as `row` says (the snapshot may hold the row before
/// it). Not in the table yet (before the first reload): left out.
fn geodns_standing(pops: &[PopView], row: PopState) -> Standing {
    let mut pops = pops.to_vec();
    let Some(local) = pops.iter_mut().find(|p| p.local) else {
        return Standing::LeftOut;
    };
    local.draining = row.draining;
    local.can_serve = row.serving;
    let local = local.clone();
    geodns::standing(&pops, &local)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn pop(id: &str, local: bool, can_serve: bool) -> PopView {
        PopView {
            node_id: Arc::from(id),
            name: Arc::from(id),
            region: Arc::from("sa"),
            country: None,
            addrs: vec!["203.0.113.10".parse().unwrap()],
            alive: true,
            draining: false,
            can_serve,
            local,
            mesh: Default::default(),
        }
    }

    #[test]
    fn a_start_awaiting_its_row_says_so_in_the_status() {
        let starting = Phase::Withdrawn(crate::bgp::policy::WithdrawCause::Starting);
        assert_eq!(
            announcement_reason(&starting, false),
            Some("starting: not yet able to serve")
        );
        assert!(announcement_reason(&starting, true)
            .is_some_and(|r| r.contains("the cluster's copy of this POP's row")));
        assert_eq!(announcement_reason(&Phase::Announced, false), None);
    }

    /// The status follows the row about to be written, not the snapshot's
    /// older copy of it, by GeoDNS's rule: a lone POP that cannot serve is
    /// still answered (the fallback); drained it is left out.
    #[test]
    fn geodns_standing_is_judged_with_the_row_to_write() {
        let cannot = PopState {
            draining: false,
            serving: false,
        };
        let solo = [pop("me", true, true)];
        assert_eq!(geodns_standing(&solo, cannot), Standing::Fallback);
        let drained = PopState {
            draining: true,
            serving: true,
        };
        assert_eq!(geodns_standing(&solo, drained), Standing::LeftOut);
        let serving = PopState {
            draining: false,
            serving: true,
        };
        assert_eq!(
            geodns_standing(&[pop("me", true, false)], serving),
            Standing::Answered
        );
        // Another POP can serve: this one, unable, is left out.
        let two = [pop("me", true, true), pop("other", false, true)];
        assert_eq!(geodns_standing(&two, cannot), Standing::LeftOut);
        // Not in the table yet.
        assert_eq!(
            geodns_standing(&[pop("other", false, true)], serving),
            Standing::LeftOut
        );
    }
}
