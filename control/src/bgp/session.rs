//! One BGP session, sans-IO: `rustbgpd-fsm`'s state machine plus what it
//! leaves to its embedder — message framing, timers as deadlines, the
//! Adj-RIB-Out, and restarting after the session falls to Idle.
//!
//! Inputs carry the time: [`Session::handle_connected`],
//! [`handle_connect_failed`](Session::handle_connect_failed),
//! [`handle_bytes`](Session::handle_bytes),
//! [`handle_closed`](Session::handle_closed),
//! [`handle_timeout`](Session::handle_timeout),
//! [`set_advertisement`](Session::set_advertisement),
//! [`stop`](Session::stop) and [`hand_off`](Session::hand_off) (a binary
//! upgrade; [`Session::resume`] is the successor's side). Outputs are
//! polled, in this order, after each input:
//! [`poll_transmit`](Session::poll_transmit) (bytes to write),
//! [`poll_io`](Session::poll_io) (connect / close, after the bytes before
//! them are written: a NOTIFICATION goes out before its close),
//! [`poll_event`](Session::poll_event) (for logs) and
//! [`poll_timeout`](Session::poll_timeout) (the next deadline).
//!
//! The speaker only opens connections (it does not listen on port 179):
//! routers are configured to accept it, which is also what avoids
//! connection collisions. Routes received from the peer are not used;
//! UPDATEs only reset the hold timer. A ROUTE-REFRESH resends the routes of
//! its family (between a BoRR and an EoRR with Enhanced Route Refresh).

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use ipnet::IpNet;
use rustbgpd_fsm::{Action, Event, PeerConfig, SessionState, TimerType};
use rustbgpd_wire::notification::{
    cease_subcode, description, encode_shutdown_communication, open_subcode,
};
use rustbgpd_wire::{
    decode_message, encode_message, Afi, Capability, DecodeError, Message, NotificationCode,
    NotificationMessage, OpenMessage, RouteRefreshMessage, RouteRefreshSubtype, Safi,
    EXTENDED_MAX_MESSAGE_LEN, MAX_MESSAGE_LEN,
};

use super::config::NextHop;
use super::handoff::HandedSession;
use super::routes::{updates, Advertisement, Rib, SessionContext};
use frame::{Frame, Inbound};

mod frame;

/// First wait before restarting a session that fell to Idle; doubles with
/// each fall up to [`IDLE_HOLD_MAX`], back to this after a session that
/// stayed up for [`STABLE_AFTER`].
const IDLE_HOLD_MIN: Duration = Duration::from_secs(1);
const IDLE_HOLD_MAX: Duration = Duration::from_secs(60);
const STABLE_AFTER: Duration = Duration::from_secs(60);

/// Everything a session needs to know about its neighbor.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    /// Name in logs and status.
    pub label: String,
    pub peer: SocketAddr,
    pub peer_asn: u32,
    pub local_asn: u32,
    pub router_id: Ipv4Addr,
    pub hold_time_secs: u16,
    pub connect_retry_secs: u32,
    pub ipv4: bool,
    pub ipv6: bool,
    pub next_hop: NextHop,
    pub med: Option<u32>,
    pub communities: Vec<u32>,
}

/// What the driver must do with the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Io {
    Connect,
    Close,
}

/// Things worth a log line or a counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    State {
        from: SessionState,
        to: SessionState,
    },
    Established {
        hold_time: u16,
        peer_router_id: Ipv4Addr,
        ipv4: bool,
        ipv6: bool,
    },
    /// The session left Established.
    Down {
        reason: String,
    },
    /// `error`: anything but the Cease of a drain or a stop (a refused
    /// OPEN, a hold timer that expired).
    NotificationSent {
        text: String,
        error: bool,
    },
    NotificationReceived(String),
    /// Taken over, established, from the process before a binary upgrade.
    Resumed {
        established_for: Duration,
        hold_time: u16,
    },
    /// UPDATEs were queued for the peer.
    RoutesSent {
        announced: usize,
        withdrawn: usize,
        graceful_shutdown: bool,
        generation: u64,
    },
}

/// What status shows of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub state: SessionState,
    pub established_for: Option<Duration>,
    pub hold_time: Option<u16>,
    pub local_addr: Option<IpAddr>,
    pub prefixes_announced: usize,
    pub graceful_shutdown: bool,
    pub updates_sent: u64,
    pub flaps: u64,
    pub last_error: Option<String>,
}

/// What was negotiated, as this side uses it.
#[derive(Debug, Clone, Copy)]
struct Negotiated {
    ipv4: bool,
    ipv6: bool,
    four_octet_as: bool,
    max_len: u16,
    hold_time: u16,
    /// The peer offered Enhanced Route Refresh (RFC 7313), as we do.
    enhanced_route_refresh: bool,
}

pub struct Session {
    settings: SessionSettings,
    fsm: rustbgpd_fsm::Session,
    /// Deadlines of the FSM's timers: connect-retry, hold, keepalive.
    timers: [Option<Instant>; 3],
    /// When to start again after falling to Idle.
    restart_at: Option<Instant>,
    idle_hold: Duration,
    /// Stopped by [`Session::stop`]: never restarts.
    stopped: bool,
    inbuf: BytesMut,
    transmit: VecDeque<Bytes>,
    io: VecDeque<Io>,
    events: VecDeque<SessionEvent>,
    local_addr: Option<IpAddr>,
    /// This host's IPv6 address on the link of an IPv4 session: the next
    /// hop of its IPv6 routes (else the IPv4-mapped local address).
    link_ipv6: Option<Ipv6Addr>,
    negotiated: Option<Negotiated>,
    advertisement: Advertisement,
    /// Adj-RIB-Out: what the peer holds from us.
    sent: Rib,
    established_at: Option<Instant>,
    updates_sent: u64,
    flaps: u64,
    last_error: Option<String>,
    /// A NOTIFICATION was sent or received on the current connection: its
    /// close follows from it and must not replace its reason in
    /// `last_error` ("connection closed" says less than "Bad Peer AS").
    notified: bool,
    /// Why the peer's last message did not decode, for the NOTIFICATION
    /// that answers it ("Unspecific (2/0)" alone says nothing).
    decode_error: Option<String>,
    /// The OPENs of the current connection (sent, received): what a
    /// binary upgrade hands over for the successor to resume the session.
    local_open: Option<OpenMessage>,
    peer_open: Option<OpenMessage>,
}

fn timer_slot(t: TimerType) -> Option<usize> {
    match t {
        TimerType::ConnectRetry => Some(0),
        TimerType::Hold => Some(1),
        TimerType::Keepalive => Some(2),
        _ => None,
    }
}

/// The AS an OPEN announces: its four-octet AS capability's, else the
/// two-octet field.
fn open_asn(open: &OpenMessage) -> u32 {
    open.capabilities
        .iter()
        .find_map(|c| match c {
            Capability::FourOctetAs { asn } => Some(*asn),
            _ => None,
        })
        .unwrap_or(u32::from(open.my_as))
}

/// RFC 6608 §3: the FSM error subcode for a message that `event` brings
/// in `state` (1 OpenSent, 2 OpenConfirm, 3 Established), so the router
/// logs which message was out of place; 0 (unspecific) for anything else.
fn fsm_error_subcode(state: SessionState, event: &Event) -> u8 {
    let message = matches!(
        event,
        Event::OpenReceived(_)
            | Event::KeepaliveReceived
            | Event::UpdateReceived
            | Event::RouteRefreshReceived { .. }
            | Event::UpdateValidationError(_)
    );
    match state {
        _ if !message => 0,
        SessionState::OpenSent => 1,
        SessionState::OpenConfirm => 2,
        SessionState::Established => 3,
        _ => 0,
    }
}

fn notification_text(n: &NotificationMessage) -> String {
    let mut text = format!(
        "{} ({}/{})",
        description(n.code, n.subcode),
        n.code.as_u8(),
        n.subcode
    );
    if let Some(said) = rustbgpd_wire::notification::decode_shutdown_communication(&n.data)
        .filter(|s| !s.is_empty() && n.code == NotificationCode::Cease)
    {
        text.push_str(&format!(": {said:?}"));
    }
    text
}

impl Session {
    /// A session that starts connecting at once.
    pub fn new(settings: SessionSettings, now: Instant) -> Session {
        let mut session = Session::held(settings);
        session.start(now);
        session
    }

    /// A session that does nothing until [`start`](Session::start) (a
    /// binary upgrade's successor waits for its predecessor's sessions).
    pub fn held(settings: SessionSettings) -> Session {
        let mut config = PeerConfig::new(settings.local_asn, settings.peer_asn, settings.router_id);
        config.hold_time = settings.hold_time_secs;
        config.send_hold_time = rustbgpd_fsm::default_send_hold_time(settings.hold_time_secs);
        config.connect_retry_secs = settings.connect_retry_secs;
        config.families = [
            (settings.ipv4, (Afi::Ipv4, Safi::Unicast)),
            (settings.ipv6, (Afi::Ipv6, Safi::Unicast)),
        ]
        .into_iter()
        .filter_map(|(on, f)| on.then_some(f))
        .collect();
        // An IPv6-only speaker must not fall back to implicit IPv4.
        config.disable_ipv4_unicast = !settings.ipv4;
        Session {
            fsm: rustbgpd_fsm::Session::new(config),
            settings,
            timers: [None; 3],
            restart_at: None,
            idle_hold: IDLE_HOLD_MIN,
            stopped: false,
            inbuf: BytesMut::new(),
            transmit: VecDeque::new(),
            io: VecDeque::new(),
            events: VecDeque::new(),
            local_addr: None,
            link_ipv6: None,
            negotiated: None,
            advertisement: Advertisement::default(),
            sent: Rib::new(),
            established_at: None,
            updates_sent: 0,
            flaps: 0,
            last_error: None,
            notified: false,
            decode_error: None,
            local_open: None,
            peer_open: None,
        }
    }

    /// Starts connecting (a [`held`](Session::held) session).
    pub fn start(&mut self, now: Instant) {
        self.feed(now, Event::ManualStart);
    }

    /// The successor's side of a binary upgrade: `handed` was established
    /// on the connection now at `local`; goes on with it without a word on
    /// the wire. The handshake is replayed into this side's state machine
    /// with the peer's OPEN as it came, and what the replay would have sent
    /// is dropped: the peer saw the real one. Then `advertisement`, what
    /// this process announces, replaces what the peer holds (nothing goes
    /// out when they are the same).
    ///
    /// `Err` (why) when the session cannot go on as the peer agreed to it:
    /// this configuration's OPEN differs from the one the peer accepted
    /// (ASN, router id, hold time, address families), or the peer's OPEN
    /// no longer fits it. End that connection with [`cease`] and start
    /// afresh.
    pub fn resume(
        settings: SessionSettings,
        handed: &HandedSession,
        local: SocketAddr,
        link_ipv6: Option<Ipv6Addr>,
        advertisement: Advertisement,
        now: Instant,
    ) -> Result<Session, String> {
        let mut peer_open = Bytes::copy_from_slice(&handed.peer_open);
        let open = match decode_message(&mut peer_open, MAX_MESSAGE_LEN) {
            Ok(Message::Open(open)) => open,
            Ok(_) => return Err("the handed-over peer OPEN is not an OPEN".into()),
            Err(e) => return Err(format!("the handed-over peer OPEN does not decode: {e}")),
        };
        let mut session = Session::held(settings);
        session.start(now);
        session.set_link_ipv6(link_ipv6);
        session.handle_connected(now, local);
        let ours = session
            .local_open
            .as_ref()
            .and_then(|o| encode_message(&Message::Open(o.clone())).ok());
        if ours.as_deref() != Some(handed.local_open.as_slice()) {
            return Err("this configuration's OPEN differs from the one the peer agreed to".into());
        }
        session.on_message(now, Message::Open(open));
        session.feed(now, Event::KeepaliveReceived);
        if session.state() != SessionState::Established {
            let why = session.last_error.clone();
            return Err(why.unwrap_or_else(|| "the peer's OPEN no longer fits".into()));
        }
        let Some(n) = session.negotiated else {
            return Err("nothing negotiated".into());
        };
        session.transmit.clear();
        session.io.clear();
        session.events.clear();
        let established_for = Duration::from_millis(handed.established_ms);
        session.established_at = Some(now.checked_sub(established_for).unwrap_or(now));
        session.updates_sent = handed.updates_sent;
        session.flaps = handed.flaps;
        session.sent = handed.sent.iter().cloned().collect();
        session.events.push_back(SessionEvent::Resumed {
            established_for,
            hold_time: n.hold_time,
        });
        // Bytes of a message the predecessor had begun to read.
        session.handle_bytes(now, &handed.unread);
        session.set_advertisement(advertisement);
        Ok(session)
    }

    /// A binary upgrade hands this session to the successor: stops it
    /// without a word to the peer (the connection goes on in the successor)
    /// and returns what the successor needs, if the session is established
    /// and everything queued was written (`None`: close the connection; the
    /// successor starts afresh).
    pub fn hand_off(&mut self, now: Instant) -> Option<HandedSession> {
        self.stopped = true;
        self.restart_at = None;
        self.timers = [None; 3];
        let established = self.state() == SessionState::Established && self.transmit.is_empty();
        let (Some(local), Some(peer)) = (&self.local_open, &self.peer_open) else {
            return None;
        };
        if !established {
            return None;
        }
        let local_open = encode_message(&Message::Open(local.clone())).ok()?;
        let peer_open = encode_message(&Message::Open(peer.clone())).ok()?;
        Some(HandedSession {
            peer: self.settings.peer,
            local_open: local_open.to_vec(),
            peer_open: peer_open.to_vec(),
            unread: self.inbuf.to_vec(),
            sent: self.sent.iter().map(|(p, a)| (*p, a.clone())).collect(),
            established_ms: self
                .established_at
                .map_or(0, |t| now.saturating_duration_since(t).as_millis() as u64),
            updates_sent: self.updates_sent,
            flaps: self.flaps,
            bfd: None,
        })
    }

    pub fn settings(&self) -> &SessionSettings {
        &self.settings
    }

    pub fn state(&self) -> SessionState {
        self.fsm.state()
    }

    /// The outbound connection is up.
    pub fn handle_connected(&mut self, now: Instant, local: SocketAddr) {
        self.local_addr = Some(local.ip());
        self.inbuf.clear();
        self.local_open = None;
        self.peer_open = None;
        self.notified = false;
        self.feed(now, Event::TcpConnectionConfirmed);
    }

    /// This host's IPv6 address on the link of the connection about to be
    /// [`handle_connected`](Session::handle_connected) (IPv4 sessions):
    /// the next hop of IPv6 routes, which a router can install (Linux has
    /// no IPv4 gateway for IPv6 routes). `None`: the IPv4-mapped address.
    ///
    /// On an established session a change goes out at once: the routes
    /// already sent carry the old next hop (an address since removed or
    /// deprecated), so they are announced again with the new one.
    pub fn set_link_ipv6(&mut self, addr: Option<Ipv6Addr>) {
        if self.link_ipv6 != addr {
            self.link_ipv6 = addr;
            self.sync_routes();
        }
    }

    /// The next hop of IPv6 routes on this IPv4 session (see
    /// [`Session::set_link_ipv6`]).
    pub fn link_ipv6(&self) -> Option<Ipv6Addr> {
        self.link_ipv6
    }

    pub fn handle_connect_failed(&mut self, now: Instant, error: &str) {
        self.last_error = Some(format!("connect: {error}"));
        self.feed(now, Event::TcpConnectionFails);
    }

    /// A connect attempt the FSM gave up on (its connect-retry timer fired
    /// first, and it started another): no event for the FSM, which has
    /// moved on, but the status says why the session is not up.
    pub fn note_connect_unanswered(&mut self, why: &str) {
        self.last_error = Some(format!("connect: {why}"));
    }

    /// The peer closed the connection, or it broke.
    pub fn handle_closed(&mut self, now: Instant, why: &str) {
        if !std::mem::take(&mut self.notified) {
            self.last_error = Some(format!("connection closed: {why}"));
        }
        self.inbuf.clear();
        self.feed(now, Event::TcpConnectionFails);
    }

    /// The neighbor's BFD session went from up to down: the path or the
    /// router failed faster than the hold timer can tell. An established
    /// session ends with a Cease NOTIFICATION, subcode BFD Down (RFC 9384),
    /// and starts again like after any error.
    pub fn handle_bfd_down(&mut self, now: Instant) {
        if self.fsm.state() != SessionState::Established {
            return;
        }
        self.feed(now, Event::BfdDown);
    }

    /// Bytes read from the connection.
    pub fn handle_bytes(&mut self, now: Instant, data: &[u8]) {
        self.inbuf.extend_from_slice(data);
        loop {
            let max_len = self.negotiated.map_or(MAX_MESSAGE_LEN, |n| n.max_len);
            let len = match frame::next(&self.inbuf, max_len) {
                Frame::Whole(len) => len,
                Frame::Partial => return,
                Frame::Bad { error, why } => return self.on_malformed(now, error, why),
            };
            let message = self.inbuf.split_to(len).freeze();
            match frame::decode(message, max_len) {
                Inbound::Message(m) => self.on_message(now, m),
                Inbound::Ignored => {}
                Inbound::Malformed(e) => return self.on_malformed(now, e, None),
                Inbound::BadRefresh(n) => {
                    self.inbuf.clear();
                    let why = "a ROUTE-REFRESH of the wrong length (RFC 7313 §5)";
                    self.last_error = Some(format!("bad message from the peer: {why}"));
                    self.decode_error = Some(why.into());
                    // Established, the FSM sends it and closes; before,
                    // any ROUTE-REFRESH is out of place (FSM error).
                    self.feed(now, Event::UpdateValidationError(n));
                    self.decode_error = None;
                    return;
                }
            }
        }
    }

    /// The peer's message did not decode (`why`, if not the error's own
    /// words): its NOTIFICATION, and the close.
    fn on_malformed(&mut self, now: Instant, e: DecodeError, why: Option<String>) {
        self.inbuf.clear();
        let why = why.unwrap_or_else(|| e.to_string());
        self.last_error = Some(format!("bad message from the peer: {why}"));
        self.decode_error = Some(why);
        self.feed(now, Event::DecodeError(e));
        self.decode_error = None;
    }

    fn on_message(&mut self, now: Instant, message: Message) {
        let event = match message {
            Message::Open(open) => {
                self.peer_open = Some(open.clone());
                Event::OpenReceived(open)
            }
            Message::Keepalive => Event::KeepaliveReceived,
            Message::Update(_) => Event::UpdateReceived,
            Message::Notification(n) => {
                let text = notification_text(&n);
                self.last_error = Some(format!("peer sent NOTIFICATION {text}"));
                self.notified = true;
                self.events
                    .push_back(SessionEvent::NotificationReceived(text));
                Event::NotificationReceived(n)
            }
            Message::RouteRefresh(r) => {
                let family = r.afi().zip(r.safi());
                if let Some((afi, safi)) = family {
                    self.feed(now, Event::RouteRefreshReceived { afi, safi });
                }
                // A BoRR / EoRR is the peer re-advertising to us (RFC 7313),
                // not a request; unknown subtypes are ignored.
                if let (RouteRefreshSubtype::Normal, Some((afi, Safi::Unicast))) =
                    (r.subtype(), family)
                {
                    self.refresh(afi);
                }
                return;
            }
            _ => return,
        };
        self.feed(now, event);
    }

    /// Fires the timers that are due.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.restart_at.is_some_and(|at| now >= at) {
            self.restart_at = None;
            if !self.stopped && self.fsm.state() == SessionState::Idle {
                self.feed(now, Event::ManualStart);
            }
        }
        let events = [
            Event::ConnectRetryTimerExpires,
            Event::HoldTimerExpires,
            Event::KeepaliveTimerExpires,
        ];
        for (slot, event) in events.into_iter().enumerate() {
            if self.timers[slot].is_some_and(|at| now >= at) {
                self.timers[slot] = None;
                if slot == 1 {
                    self.last_error = Some("hold timer expired".into());
                }
                self.feed(now, event);
            }
        }
    }

    /// What the POP wants announced now; UPDATEs follow if established.
    pub fn set_advertisement(&mut self, advertisement: Advertisement) {
        self.advertisement = advertisement;
        self.sync_routes();
    }

    /// Ends the session for good: a Cease NOTIFICATION (administrative
    /// shutdown, with `reason` as the RFC 9003 shutdown communication) if it
    /// is up, then the close. The peer withdraws what it learned from us.
    pub fn stop(&mut self, now: Instant, reason: &str) {
        self.stopped = true;
        self.restart_at = None;
        let reason = Some(encode_shutdown_communication(reason));
        self.feed(now, Event::ManualStop { reason });
    }

    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        self.transmit.pop_front()
    }

    pub fn poll_io(&mut self) -> Option<Io> {
        self.io.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        self.events.pop_front()
    }

    /// The next deadline (a timer or the restart).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers
            .iter()
            .flatten()
            .chain(self.restart_at.iter())
            .min()
            .copied()
    }

    pub fn snapshot(&self, now: Instant) -> Snapshot {
        Snapshot {
            state: self.fsm.state(),
            established_for: self
                .established_at
                .map(|t| now.saturating_duration_since(t)),
            hold_time: self.negotiated.map(|n| n.hold_time),
            local_addr: self.local_addr,
            prefixes_announced: self.sent.len(),
            graceful_shutdown: self.advertisement.graceful_shutdown && !self.sent.is_empty(),
            updates_sent: self.updates_sent,
            flaps: self.flaps,
            last_error: self.last_error.clone(),
        }
    }

    /// The advertisement generation queued for the peer once the bytes
    /// [`poll_transmit`](Session::poll_transmit) gave are written; `None`
    /// when the session is not established (the peer holds nothing from
    /// us, so there is nothing to wait for).
    pub fn queued_generation(&self) -> Option<u64> {
        (self.fsm.state() == SessionState::Established && self.negotiated.is_some())
            .then_some(self.advertisement.generation)
    }

    fn context(&self, n: &Negotiated) -> SessionContext {
        SessionContext {
            local_asn: self.settings.local_asn,
            peer_asn: self.settings.peer_asn,
            local_addr: self.local_addr.unwrap_or(super::routes::NO_ADDR),
            link_ipv6: self.link_ipv6,
            next_hop: self.settings.next_hop.clone(),
            med: self.settings.med,
            communities: self.settings.communities.clone(),
            ipv4: n.ipv4,
            ipv6: n.ipv6,
            four_octet_as: n.four_octet_as,
        }
    }

    /// The peer asked for family `afi` again (ROUTE-REFRESH, RFC 2918):
    /// every route of it goes again, between a BoRR and an EoRR when the
    /// peer offered Enhanced Route Refresh (RFC 7313 §4: it may then drop
    /// what the EoRR leaves stale). A family not negotiated is ignored.
    fn refresh(&mut self, afi: Afi) {
        let Some(n) = self.negotiated else { return };
        let v6 = match afi {
            Afi::Ipv4 if n.ipv4 => false,
            Afi::Ipv6 if n.ipv6 => true,
            _ => return,
        };
        if self.fsm.state() != SessionState::Established {
            return;
        }
        let marker = |subtype| {
            Message::RouteRefresh(RouteRefreshMessage::new_with_subtype(
                afi,
                Safi::Unicast,
                subtype,
            ))
        };
        if n.enhanced_route_refresh {
            self.send(&marker(RouteRefreshSubtype::BoRR));
        }
        self.sent.retain(|p, _| matches!(p, IpNet::V6(_)) != v6);
        self.sync_routes();
        if n.enhanced_route_refresh {
            self.send(&marker(RouteRefreshSubtype::EoRR));
        }
    }

    /// Sends what takes the peer from what it holds to the advertisement.
    fn sync_routes(&mut self) {
        let Some(n) = self.negotiated else { return };
        if self.fsm.state() != SessionState::Established {
            return;
        }
        let ctx = self.context(&n);
        let want = ctx.routes(&self.advertisement);
        let delta = updates(&self.sent, &want, &ctx);
        if delta.messages.is_empty() {
            return;
        }
        for update in delta.messages {
            match encode_message(&Message::Update(update)) {
                Ok(bytes) => {
                    self.updates_sent += 1;
                    self.transmit.push_back(bytes.freeze());
                }
                // Only an oversized message fails, which the chunking in
                // `routes` rules out; say so rather than panic.
                Err(e) => self.last_error = Some(format!("cannot encode an UPDATE: {e}")),
            }
        }
        self.sent = want;
        self.events.push_back(SessionEvent::RoutesSent {
            announced: delta.announced,
            withdrawn: delta.withdrawn,
            graceful_shutdown: self.advertisement.graceful_shutdown,
            generation: self.advertisement.generation,
        });
    }

    fn send(&mut self, message: &Message) {
        match encode_message(message) {
            Ok(bytes) => self.transmit.push_back(bytes.freeze()),
            Err(e) => self.last_error = Some(format!("cannot encode a message: {e}")),
        }
    }

    fn feed(&mut self, now: Instant, event: Event) {
        let subcode = fsm_error_subcode(self.fsm.state(), &event);
        let actions = self.fsm.handle_event(event);
        for mut action in actions {
            // rustbgpd-fsm sends every FSM error as 5/0, unspecific.
            if let Action::SendNotification(n) = &mut action {
                if n.code == NotificationCode::FsmError && n.subcode == 0 {
                    n.subcode = subcode;
                }
            }
            self.apply(now, action);
        }
    }

    fn apply(&mut self, now: Instant, action: Action) {
        match action {
            Action::SendOpen(open) => {
                self.send(&Message::Open(open.clone()));
                self.local_open = Some(open);
            }
            Action::SendKeepalive => self.send(&Message::Keepalive),
            Action::SendNotification(n) => {
                let mut text = notification_text(&n);
                // Which AS the router said it is: "Bad Peer AS" alone left
                // the operator to guess which side's config was wrong.
                if n.code == NotificationCode::OpenMessage && n.subcode == open_subcode::BAD_PEER_AS
                {
                    if let Some(open) = &self.peer_open {
                        text.push_str(&format!(
                            ": the neighbor's OPEN says AS {}, bgp.neighbor.asn is {}",
                            open_asn(open),
                            self.settings.peer_asn
                        ));
                    }
                }
                if let Some(why) = self.decode_error.take() {
                    text.push_str(&format!(": the neighbor's message did not decode: {why}"));
                }
                // Which hold time the router proposed (RFC 4271 §6.2).
                if n.code == NotificationCode::OpenMessage
                    && n.subcode == open_subcode::UNACCEPTABLE_HOLD_TIME
                {
                    if let Some(open) = &self.peer_open {
                        text.push_str(&format!(
                            ": the neighbor's OPEN proposes {} s; BGP allows 0 or at least 3",
                            open.hold_time
                        ));
                    }
                }
                let error = n.code != NotificationCode::Cease
                    || n.subcode != cease_subcode::ADMINISTRATIVE_SHUTDOWN;
                if error {
                    self.last_error = Some(format!("sent NOTIFICATION {text}"));
                    self.notified = true;
                }
                self.events
                    .push_back(SessionEvent::NotificationSent { text, error });
                self.send(&Message::Notification(n));
            }
            Action::StartTimer(t, secs) => {
                // The FSM doubles the connect-retry wait with every failed
                // connect, up to 300 s. This speaker is the only side that
                // connects (routers are passive towards it), so that wait
                // is how long a router that came back goes without the
                // routes: `connect_retry_secs` is the longest (RFC 4271's
                // ConnectRetryTime), the first misses still retry at 1 s.
                let secs = if t == TimerType::ConnectRetry {
                    secs.min(self.settings.connect_retry_secs)
                } else {
                    secs
                };
                if let Some(slot) = timer_slot(t) {
                    self.timers[slot] = Some(now + Duration::from_secs(u64::from(secs)));
                }
            }
            Action::StopTimer(t) => {
                if let Some(slot) = timer_slot(t) {
                    self.timers[slot] = None;
                }
            }
            Action::InitiateTcpConnection => self.io.push_back(Io::Connect),
            Action::CloseTcpConnection => {
                self.inbuf.clear();
                self.local_addr = None;
                self.io.push_back(Io::Close);
            }
            Action::StateChanged { old, new } => {
                self.events
                    .push_back(SessionEvent::State { from: old, to: new });
                if new == SessionState::Idle {
                    // Nothing of the FSM runs in Idle; a late tick would
                    // only be ignored.
                    self.timers = [None; 3];
                    if !self.stopped {
                        self.restart_at = Some(now + self.idle_hold);
                        self.idle_hold = (self.idle_hold * 2).min(IDLE_HOLD_MAX);
                    }
                }
            }
            Action::SessionEstablished(neg) => {
                let has = |afi| {
                    neg.negotiated_families
                        .iter()
                        .any(|&(a, s)| a == afi && s == Safi::Unicast)
                };
                let n = Negotiated {
                    ipv4: has(Afi::Ipv4),
                    ipv6: has(Afi::Ipv6),
                    four_octet_as: neg.four_octet_as,
                    max_len: if neg.peer_extended_message {
                        EXTENDED_MAX_MESSAGE_LEN
                    } else {
                        MAX_MESSAGE_LEN
                    },
                    hold_time: neg.hold_time,
                    enhanced_route_refresh: neg.peer_enhanced_route_refresh,
                };
                self.negotiated = Some(n);
                self.established_at = Some(now);
                self.last_error = None;
                self.sent.clear();
                self.events.push_back(SessionEvent::Established {
                    hold_time: neg.hold_time,
                    peer_router_id: neg.peer_router_id,
                    ipv4: n.ipv4,
                    ipv6: n.ipv6,
                });
                self.sync_routes();
            }
            Action::SessionDown => {
                let lasted = self
                    .established_at
                    .map(|t| now.saturating_duration_since(t));
                if lasted.is_some_and(|d| d >= STABLE_AFTER) {
                    self.idle_hold = IDLE_HOLD_MIN;
                }
                self.negotiated = None;
                self.established_at = None;
                self.sent.clear();
                self.flaps += 1;
                let reason = self
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "stopped".to_string());
                self.events.push_back(SessionEvent::Down { reason });
            }
            _ => {}
        }
    }
}

/// A Cease NOTIFICATION (`subcode`, with `reason` as the RFC 9003 shutdown
/// communication), encoded: for a connection that no session owns (a
/// handed-over one the successor cannot go on with).
pub fn cease(subcode: u8, reason: &str) -> Option<Bytes> {
    let data = encode_shutdown_communication(reason);
    let n = NotificationMessage::new(NotificationCode::Cease, subcode, data);
    encode_message(&Message::Notification(n))
        .ok()
        .map(BytesMut::freeze)
}

#[cfg(test)]
mod tests;
