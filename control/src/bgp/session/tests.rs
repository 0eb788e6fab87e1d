//! The session against a peer that is `rustbgpd-fsm` itself (the state
//! machine the daemon that publishes it runs against BIRD, FRR and GoBGP),
//! over an in-memory pipe, with simulated time.

use super::*;
use rustbgpd_wire::nlri::Prefix as WirePrefix;
use rustbgpd_wire::peek_message_length;
use rustbgpd_wire::{PathAttribute, UpdateMessage};

const US: u32 = 65010;
const THEM: u32 = 65000;

fn settings() -> SessionSettings {
    SessionSettings {
        label: "10.0.0.1".into(),
        peer: "10.0.0.1:179".parse().unwrap(),
        peer_asn: THEM,
        local_asn: US,
        router_id: Ipv4Addr::new(10, 0, 0, 2),
        hold_time_secs: 9,
        connect_retry_secs: 5,
        ipv4: true,
        ipv6: true,
        next_hop: NextHop::default(),
        med: None,
        communities: Vec::new(),
    }
}

/// The router: a bare FSM that records what it receives.
struct Peer {
    fsm: rustbgpd_fsm::Session,
    inbuf: BytesMut,
    out: VecDeque<Bytes>,
    updates: Vec<UpdateMessage>,
    notifications: Vec<NotificationMessage>,
    closed: bool,
}

impl Peer {
    fn new() -> Peer {
        Peer::with_asn(THEM)
    }

    /// A router of AS `asn` (which may not be the one configured).
    fn with_asn(asn: u32) -> Peer {
        let mut config = PeerConfig::new(asn, US, Ipv4Addr::new(10, 0, 0, 1));
        config.families = vec![(Afi::Ipv4, Safi::Unicast), (Afi::Ipv6, Safi::Unicast)];
        config.hold_time = 90;
        let mut peer = Peer {
            fsm: rustbgpd_fsm::Session::new(config),
            inbuf: BytesMut::new(),
            out: VecDeque::new(),
            updates: Vec::new(),
            notifications: Vec::new(),
            closed: false,
        };
        peer.feed(Event::ManualStart);
        peer.out.clear();
        peer.feed(Event::TcpConnectionAcknowledged);
        peer
    }

    fn feed(&mut self, event: Event) {
        for action in self.fsm.handle_event(event) {
            let message = match action {
                Action::SendOpen(o) => Message::Open(o),
                Action::SendKeepalive => Message::Keepalive,
                Action::SendNotification(n) => Message::Notification(n),
                Action::CloseTcpConnection => {
                    self.closed = true;
                    continue;
                }
                _ => continue,
            };
            self.out
                .push_back(encode_message(&message).unwrap().freeze());
        }
    }

    fn receive(&mut self, bytes: &[u8]) {
        self.inbuf.extend_from_slice(bytes);
        while let Ok(Some(len)) = peek_message_length(&self.inbuf, MAX_MESSAGE_LEN) {
            if self.inbuf.len() < usize::from(len) {
                break;
            }
            let mut m = self.inbuf.split_to(usize::from(len)).freeze();
            let event = match decode_message(&mut m, MAX_MESSAGE_LEN).unwrap() {
                Message::Open(o) => Event::OpenReceived(o),
                Message::Keepalive => Event::KeepaliveReceived,
                Message::Update(u) => {
                    self.updates.push(u);
                    Event::UpdateReceived
                }
                Message::Notification(n) => {
                    self.notifications.push(n.clone());
                    Event::NotificationReceived(n)
                }
                _ => continue,
            };
            self.feed(event);
        }
    }

    /// Prefixes (announced, withdrawn) and attributes of the UPDATEs since
    /// the last call.
    fn take_updates(&mut self) -> (Vec<String>, Vec<String>, Vec<PathAttribute>) {
        let mut out = (Vec::new(), Vec::new(), Vec::new());
        let text = |p: &WirePrefix| match p {
            WirePrefix::V4(p) => p.to_string(),
            WirePrefix::V6(p) => p.to_string(),
        };
        for u in self.updates.drain(..) {
            let parsed = u.parse(true, false, &[]).unwrap();
            out.0
                .extend(parsed.announced.iter().map(|e| e.prefix.to_string()));
            out.1
                .extend(parsed.withdrawn.iter().map(|e| e.prefix.to_string()));
            for a in parsed.attributes {
                match &a {
                    PathAttribute::MpReachNlri(r) => {
                        out.0.extend(r.announced.iter().map(|e| text(&e.prefix)))
                    }
                    PathAttribute::MpUnreachNlri(r) => {
                        out.1.extend(r.withdrawn.iter().map(|e| text(&e.prefix)))
                    }
                    _ => out.2.push(a),
                }
            }
        }
        out
    }
}

/// Moves bytes both ways until neither side has anything to say. Returns
/// the I/O requests the session made.
fn pump(s: &mut Session, peer: &mut Peer, now: Instant) -> Vec<Io> {
    let mut io = Vec::new();
    loop {
        let mut moved = false;
        while let Some(b) = s.poll_transmit() {
            moved = true;
            if !peer.closed {
                peer.receive(&b);
            }
        }
        while let Some(b) = peer.out.pop_front() {
            moved = true;
            s.handle_bytes(now, &b);
        }
        while let Some(r) = s.poll_io() {
            moved = true;
            io.push(r);
        }
        if !moved {
            return io;
        }
    }
}

fn events(s: &mut Session) -> Vec<SessionEvent> {
    std::iter::from_fn(|| s.poll_event()).collect()
}

fn established(t0: Instant) -> (Session, Peer) {
    let mut s = Session::new(settings(), t0);
    assert_eq!(s.poll_io(), Some(Io::Connect), "starts by connecting");
    s.handle_connected(t0, "10.0.0.2:40000".parse().unwrap());
    let mut peer = Peer::new();
    pump(&mut s, &mut peer, t0);
    assert_eq!(s.state(), SessionState::Established);
    assert_eq!(peer.fsm.state(), SessionState::Established);
    (s, peer)
}

fn ad(prefixes: &[&str], graceful: bool, generation: u64) -> Advertisement {
    Advertisement {
        prefixes: prefixes.iter().map(|p| p.parse().unwrap()).collect(),
        graceful_shutdown: graceful,
        prepend: 0,
        generation,
    }
}

/// QA: with `bgp.neighbor.asn` wrong, the POP refused the router's OPEN
/// at every retry with "NOTIFICATION sent … Bad Peer AS (2/2)" at INFO,
/// naming neither AS.
#[test]
fn a_router_of_another_as_is_refused_naming_both_ases() {
    let t0 = Instant::now();
    let mut s = Session::new(settings(), t0);
    assert_eq!(s.poll_io(), Some(Io::Connect));
    s.handle_connected(t0, "10.0.0.2:40000".parse().unwrap());
    // A four-octet AS, so that the capability is what is read.
    let mut peer = Peer::with_asn(4_200_000_001);
    pump(&mut s, &mut peer, t0);
    assert_ne!(s.state(), SessionState::Established);
    let ev = events(&mut s);
    let said =
        "Bad Peer AS (2/2): the neighbor's OPEN says AS 4200000001, bgp.neighbor.asn is 65000";
    assert!(
        ev.iter().any(|e| matches!(e,
            SessionEvent::NotificationSent { text, error: true } if text == said)),
        "{ev:?}"
    );
    assert_eq!(
        s.snapshot(t0).last_error.as_deref(),
        Some(format!("sent NOTIFICATION {said}").as_str())
    );
    // The close that follows keeps the reason for `bgp status` (QA: it
    // said "connection closed: the peer closed it").
    s.handle_closed(t0, "the peer closed it");
    assert_eq!(
        s.snapshot(t0).last_error.as_deref(),
        Some(format!("sent NOTIFICATION {said}").as_str())
    );
    // A later close without a NOTIFICATION is its own reason again.
    s.handle_connected(t0, "10.0.0.2:40001".parse().unwrap());
    s.handle_closed(t0, "reset by peer");
    assert_eq!(
        s.snapshot(t0).last_error.as_deref(),
        Some("connection closed: reset by peer")
    );
}

/// QA: a router proposing a hold time of 1 or 2 s (RFC 4271 §6.2: 0 or
/// at least 3) was refused with "Unacceptable Hold Time (2/6)" alone, not
/// saying what it proposed. Refused, never established, and said.
#[test]
fn a_router_proposing_a_hold_time_of_1_or_2_s_is_refused_saying_so() {
    for hold in [1u16, 2] {
        let t0 = Instant::now();
        let mut s = Session::new(settings(), t0);
        assert_eq!(s.poll_io(), Some(Io::Connect));
        s.handle_connected(t0, "10.0.0.2:40000".parse().unwrap());
        let open = OpenMessage {
            version: 4,
            my_as: THEM as u16,
            hold_time: hold,
            bgp_identifier: Ipv4Addr::new(10, 0, 0, 1),
            capabilities: vec![
                Capability::MultiProtocol {
                    afi: Afi::Ipv4,
                    safi: Safi::Unicast,
                },
                Capability::FourOctetAs { asn: THEM },
            ],
        };
        let bytes = encode_message(&Message::Open(open)).unwrap();
        s.handle_bytes(t0, &bytes);
        assert_ne!(s.state(), SessionState::Established);
        let sent: Vec<Bytes> = std::iter::from_fn(|| s.poll_transmit()).collect();
        let mut last = sent.last().unwrap().clone();
        let Message::Notification(n) = decode_message(&mut last, MAX_MESSAGE_LEN).unwrap() else {
            panic!("not a NOTIFICATION")
        };
        assert_eq!((n.code, n.subcode), (NotificationCode::OpenMessage, 6));
        assert!(std::iter::from_fn(|| s.poll_io()).any(|io| io == Io::Close));
        let said = format!(
            "Unacceptable Hold Time (2/6): the neighbor's OPEN proposes {hold} s; BGP allows 0 or at least 3"
        );
        let ev = events(&mut s);
        assert!(
            ev.iter().any(|e| matches!(e,
                SessionEvent::NotificationSent { text, error: true } if *text == said)),
            "{ev:?}"
        );
    }
}

#[test]
fn establishes_and_announces_then_drains_and_withdraws() {
    let t0 = Instant::now();
    let (mut s, mut peer) = established(t0);
    let ev = events(&mut s);
    assert!(
        ev.iter().any(|e| matches!(
            e,
            SessionEvent::Established {
                hold_time: 9,
                ipv4: true,
                ipv6: true,
                ..
            }
        )),
        "{ev:?}"
    );
    assert_eq!(s.queued_generation(), Some(0));

    s.set_advertisement(ad(&["198.51.100.0/24", "2001:db8:100::/48"], false, 1));
    pump(&mut s, &mut peer, t0);
    let (announced, withdrawn, attrs) = peer.take_updates();
    assert_eq!(announced, ["198.51.100.0/24", "2001:db8:100::/48"]);
    assert!(withdrawn.is_empty());
    assert!(attrs.contains(&PathAttribute::NextHop("10.0.0.2".parse().unwrap())));
    assert!(!attrs
        .iter()
        .any(|a| matches!(a, PathAttribute::Communities(_))));
    assert_eq!(s.snapshot(t0).prefixes_announced, 2);
    assert_eq!(s.queued_generation(), Some(1));

    s.set_advertisement(ad(&["198.51.100.0/24", "2001:db8:100::/48"], true, 2));
    pump(&mut s, &mut peer, t0);
    let (announced, _, attrs) = peer.take_updates();
    assert_eq!(announced.len(), 2, "re-announced with the tag");
    assert!(attrs.contains(&PathAttribute::Communities(vec![
        super::super::config::GRACEFUL_SHUTDOWN
    ])));
    assert!(s.snapshot(t0).graceful_shutdown);

    s.set_advertisement(ad(&[], false, 3));
    pump(&mut s, &mut peer, t0);
    let (announced, withdrawn, _) = peer.take_updates();
    assert!(announced.is_empty());
    assert_eq!(withdrawn, ["198.51.100.0/24", "2001:db8:100::/48"]);
    assert_eq!(s.snapshot(t0).prefixes_announced, 0);
    let sent: Vec<SessionEvent> = events(&mut s)
        .into_iter()
        .filter(|e| matches!(e, SessionEvent::RoutesSent { .. }))
        .collect();
    assert_eq!(sent.len(), 3, "{sent:?}");
}

#[test]
fn routes_set_before_the_session_is_up_go_out_when_it_is() {
    let t0 = Instant::now();
    let mut s = Session::new(settings(), t0);
    s.set_advertisement(ad(&["198.51.100.0/24"], false, 7));
    assert_eq!(s.poll_transmit(), None, "nothing to send before OPEN");
    assert_eq!(s.queued_generation(), None);
    assert_eq!(s.poll_io(), Some(Io::Connect));
    s.handle_connected(t0, "10.0.0.2:40000".parse().unwrap());
    let mut peer = Peer::new();
    pump(&mut s, &mut peer, t0);
    assert_eq!(peer.take_updates().0, ["198.51.100.0/24"]);
    assert_eq!(s.queued_generation(), Some(7));
}

#[test]
fn keepalives_keep_it_up_and_silence_ends_it_after_the_hold_time() {
    let t0 = Instant::now();
    let (mut s, mut peer) = established(t0);
    events(&mut s);
    // Keepalives every hold/3 = 3 s; the peer answers each.
    let mut now = t0;
    for _ in 0..5 {
        let due = s.poll_timeout().unwrap();
        assert!(due <= now + Duration::from_secs(3), "keepalive every 3 s");
        now = due;
        s.handle_timeout(now);
        peer.feed(Event::KeepaliveTimerExpires);
        pump(&mut s, &mut peer, now);
        assert_eq!(s.state(), SessionState::Established);
    }
    // The peer goes silent (crashed): after 9 s without a word, down.
    let silent_from = now;
    let mut closed = false;
    while s.state() == SessionState::Established {
        let due = s.poll_timeout().unwrap();
        now = due;
        s.handle_timeout(now);
        while s.poll_transmit().is_some() {}
        closed |= std::iter::from_fn(|| s.poll_io()).any(|io| io == Io::Close);
    }
    let took = now - silent_from;
    assert!(
        took <= Duration::from_secs(9) && took > Duration::from_secs(6),
        "{took:?}"
    );
    assert!(closed);
    let ev = events(&mut s);
    assert!(
        ev.iter()
            .any(|e| matches!(e, SessionEvent::Down { reason } if reason.contains("hold timer"))),
        "{ev:?}"
    );
    assert!(ev
        .iter()
        .any(|e| matches!(e, SessionEvent::NotificationSent { text, error: true } if text.contains("Hold"))));
    // It tries again one second later.
    assert_eq!(s.state(), SessionState::Idle);
    assert_eq!(s.poll_timeout(), Some(now + Duration::from_secs(1)));
    s.handle_timeout(now + Duration::from_secs(1));
    assert_eq!(s.poll_io(), Some(Io::Connect));
    assert_eq!(s.snapshot(now).flaps, 1);
}

#[test]
fn a_peer_notification_ends_the_session_and_restarts_back_off() {
    let t0 = Instant::now();
    let (mut s, mut peer) = established(t0);
    let mut now = t0;
    let mut waits = Vec::new();
    for round in 0..3 {
        peer.feed(Event::ManualStop {
            reason: Some(encode_shutdown_communication("maintenance")),
        });
        let io = pump(&mut s, &mut peer, now);
        assert!(io.contains(&Io::Close), "round {round}: {io:?}");
        let ev = events(&mut s);
        assert!(
            ev.iter().any(
                |e| matches!(e, SessionEvent::NotificationReceived(t) if t.contains("maintenance"))
            ),
            "{ev:?}"
        );
        let restart = s.poll_timeout().unwrap();
        waits.push(restart - now);
        now = restart;
        s.handle_timeout(now);
        assert_eq!(s.poll_io(), Some(Io::Connect));
        s.handle_connected(now, "10.0.0.2:40001".parse().unwrap());
        peer = Peer::new();
        pump(&mut s, &mut peer, now);
        assert_eq!(s.state(), SessionState::Established);
    }
    assert_eq!(
        waits,
        [1, 2, 4].map(Duration::from_secs),
        "a flapping peer is retried less and less often"
    );
}

#[test]
fn bfd_down_ends_an_established_session_with_cease_bfd_down_and_it_restarts() {
    let t0 = Instant::now();
    let (mut s, mut peer) = established(t0);
    s.handle_bfd_down(t0);
    let io = pump(&mut s, &mut peer, t0);
    assert_eq!(io, [Io::Close]);
    let n = peer.notifications.last().expect("a NOTIFICATION");
    assert_eq!(
        (n.code, n.subcode),
        (NotificationCode::Cease, cease_subcode::BFD_DOWN)
    );
    assert_eq!(s.state(), SessionState::Idle);
    assert!(
        s.snapshot(t0)
            .last_error
            .is_some_and(|e| e.contains("BFD Down")),
        "{:?}",
        s.snapshot(t0).last_error
    );
    let restart = s.poll_timeout().expect("starts again");
    s.handle_timeout(restart);
    assert_eq!(s.poll_io(), Some(Io::Connect));
    // Not established: nothing to end.
    s.handle_bfd_down(restart);
    assert_eq!(s.poll_io(), None);
}

#[test]
fn stop_sends_cease_and_never_restarts() {
    let t0 = Instant::now();
    let (mut s, mut peer) = established(t0);
    s.set_advertisement(ad(&["198.51.100.0/24"], false, 1));
    pump(&mut s, &mut peer, t0);
    s.stop(t0, "edgeproxy shutting down");
    let io = pump(&mut s, &mut peer, t0);
    assert_eq!(io, [Io::Close]);
    let n = peer.notifications.last().expect("a NOTIFICATION");
    assert_eq!(n.code, NotificationCode::Cease);
    assert_eq!(n.subcode, cease_subcode::ADMINISTRATIVE_SHUTDOWN);
    assert_eq!(s.state(), SessionState::Idle);
    assert_eq!(s.poll_timeout(), None, "no restart after a stop");
}

#[test]
fn connect_failures_retry_on_the_connect_retry_timer() {
    let t0 = Instant::now();
    let mut s = Session::new(settings(), t0);
    assert_eq!(s.poll_io(), Some(Io::Connect));
    s.handle_connect_failed(t0, "connection refused");
    assert_eq!(s.state(), SessionState::Active);
    let retry = s.poll_timeout().unwrap();
    assert_eq!(
        retry - t0,
        Duration::from_secs(1),
        "first misses retry fast"
    );
    s.handle_timeout(retry);
    assert_eq!(s.poll_io(), Some(Io::Connect));
    assert!(s
        .snapshot(retry)
        .last_error
        .unwrap()
        .contains("connection refused"));
}

/// QA: a router down for 100 s (GoBGP killed, then started again) got the
/// POP back 59 s after it returned: `rustbgpd-fsm` doubles the connect-retry
/// wait with every refused connect (5, 10, 20 … up to 300 s), and the
/// speaker is the only side that connects. Refused or unanswered, a
/// neighbor is tried again at least every `connect_retry_secs`.
#[test]
fn a_neighbor_that_stays_down_is_retried_every_connect_retry_secs() {
    let t0 = Instant::now();
    let mut s = Session::new(settings(), t0);
    let mut now = t0;
    let limit = Duration::from_secs(u64::from(settings().connect_retry_secs));
    for attempt in 0..40 {
        let io: Vec<Io> = std::iter::from_fn(|| s.poll_io()).collect();
        assert!(io.contains(&Io::Connect), "attempt {attempt}: {io:?}");
        // Refused at once, or (every third attempt) no answer at all: the
        // connect-retry timer overtakes it.
        if attempt % 3 != 2 {
            s.handle_connect_failed(now, "connection refused");
        }
        let next = s.poll_timeout().expect("a retry is scheduled");
        assert!(
            next - now <= limit,
            "attempt {attempt}: next try {:?} later, connect_retry_secs is {limit:?}",
            next - now
        );
        now = next;
        s.handle_timeout(now);
    }
    assert!(now - t0 <= limit * 40);
}

#[test]
fn garbage_from_the_peer_gets_a_notification_and_a_close() {
    let t0 = Instant::now();
    let (mut s, _peer) = established(t0);
    events(&mut s);
    s.handle_bytes(t0, &[0u8; 19]);
    let sent: Vec<Bytes> = std::iter::from_fn(|| s.poll_transmit()).collect();
    let mut last = sent.last().unwrap().clone();
    let Message::Notification(n) = decode_message(&mut last, MAX_MESSAGE_LEN).unwrap() else {
        panic!("not a NOTIFICATION")
    };
    assert_eq!(n.code, NotificationCode::MessageHeader);
    assert_eq!(s.poll_io(), Some(Io::Close));
    assert_eq!(s.state(), SessionState::Idle);
}

/// QA: a router whose OPEN did not decode (a capability running past its
/// parameters) was refused with "NOTIFICATION sent … OPEN Message Error:
/// Unspecific (2/0)" alone, in the log and in `bgp status`: why the OPEN
/// was bad was dropped. The NOTIFICATION's line says what did not decode.
#[test]
fn an_open_that_does_not_decode_is_refused_saying_why() {
    let t0 = Instant::now();
    let mut s = Session::new(settings(), t0);
    assert_eq!(s.poll_io(), Some(Io::Connect));
    s.handle_connected(t0, "10.0.0.2:40000".parse().unwrap());
    // OPEN: version 4, AS 65000, hold 9, id 10.0.0.1, one optional
    // parameter (capabilities, 6 bytes) whose capability says 40 bytes.
    let mut open = vec![0xffu8; 16];
    let body = [4, 0xfd, 0xe8, 0, 9, 10, 0, 0, 1, 8, 2, 6, 1, 40, 0, 1, 0, 1];
    open.extend_from_slice(&((19 + body.len()) as u16).to_be_bytes());
    open.push(1);
    open.extend_from_slice(&body);
    s.handle_bytes(t0, &open);
    assert_ne!(s.state(), SessionState::Established);
    assert!(std::iter::from_fn(|| s.poll_io()).any(|io| io == Io::Close));
    let ev = events(&mut s);
    let text = ev
        .iter()
        .find_map(|e| match e {
            SessionEvent::NotificationSent { text, error: true } => Some(text.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no NOTIFICATION: {ev:?}"));
    assert!(
        text.starts_with("OPEN Message Error") && text.contains(": the neighbor's message"),
        "{text}"
    );
    let status = s.snapshot(t0).last_error.unwrap();
    assert!(status.contains("the neighbor's message"), "{status}");
}

#[test]
fn a_route_refresh_resends_every_route() {
    let t0 = Instant::now();
    let (mut s, mut peer) = established(t0);
    s.set_advertisement(ad(&["198.51.100.0/24"], false, 1));
    pump(&mut s, &mut peer, t0);
    peer.take_updates();
    let refresh = rustbgpd_wire::RouteRefreshMessage::new(Afi::Ipv4, Safi::Unicast);
    let bytes = encode_message(&Message::RouteRefresh(refresh)).unwrap();
    s.handle_bytes(t0, &bytes);
    pump(&mut s, &mut peer, t0);
    assert_eq!(peer.take_updates().0, ["198.51.100.0/24"]);
}

/// QA: FRR (which, like this speaker, offers Enhanced Route Refresh)
/// asking for IPv4 again (`clear bgp ipv4 unicast X soft in`) got both
/// families resent and no BoRR/EoRR, which RFC 7313 §4 requires around
/// the re-advertisement; a BoRR or EoRR from the peer (it re-advertising,
/// not a request) resent everything too. Now: BoRR, the asked family
/// only, EoRR; a demarcation from the peer sends nothing.
#[test]
fn a_route_refresh_resends_the_asked_family_between_borr_and_eorr() {
    use rustbgpd_wire::{RouteRefreshMessage, RouteRefreshSubtype};
    let t0 = Instant::now();
    let (mut s, mut peer) = established(t0);
    s.set_advertisement(ad(&["198.51.100.0/24", "2001:db8:100::/48"], false, 1));
    pump(&mut s, &mut peer, t0);
    peer.take_updates();
    let read = |s: &mut Session| -> Vec<String> {
        std::iter::from_fn(|| s.poll_transmit())
            .map(
                |mut b| match decode_message(&mut b, MAX_MESSAGE_LEN).unwrap() {
                    Message::RouteRefresh(r) => format!("{:?} {:?}", r.subtype(), r.afi()),
                    Message::Update(u) => {
                        let p = u.parse(true, false, &[]).unwrap();
                        let mut text: Vec<String> =
                            p.announced.iter().map(|e| e.prefix.to_string()).collect();
                        for a in &p.attributes {
                            if let PathAttribute::MpReachNlri(r) = a {
                                text.extend(r.announced.iter().map(|e| match e.prefix {
                                    WirePrefix::V4(p) => p.to_string(),
                                    WirePrefix::V6(p) => p.to_string(),
                                }));
                            }
                        }
                        format!("UPDATE {}", text.join(","))
                    }
                    other => format!("{other:?}"),
                },
            )
            .collect()
    };
    let send = |s: &mut Session, r: RouteRefreshMessage| {
        let bytes = encode_message(&Message::RouteRefresh(r)).unwrap();
        s.handle_bytes(t0, &bytes);
    };
    send(&mut s, RouteRefreshMessage::new(Afi::Ipv4, Safi::Unicast));
    assert_eq!(
        read(&mut s),
        [
            "BoRR Some(Ipv4)",
            "UPDATE 198.51.100.0/24",
            "EoRR Some(Ipv4)"
        ]
    );
    send(&mut s, RouteRefreshMessage::new(Afi::Ipv6, Safi::Unicast));
    assert_eq!(
        read(&mut s),
        [
            "BoRR Some(Ipv6)",
            "UPDATE 2001:db8:100::/48",
            "EoRR Some(Ipv6)"
        ]
    );
    for subtype in [RouteRefreshSubtype::BoRR, RouteRefreshSubtype::EoRR] {
        send(
            &mut s,
            RouteRefreshMessage::new_with_subtype(Afi::Ipv4, Safi::Unicast, subtype),
        );
        assert!(read(&mut s).is_empty(), "{subtype:?} is not a request");
    }
    assert_eq!(s.state(), SessionState::Established);
    // Withdrawn: a refresh sends the markers around nothing.
    s.set_advertisement(ad(&[], false, 2));
    read(&mut s);
    send(&mut s, RouteRefreshMessage::new(Afi::Ipv4, Safi::Unicast));
    assert_eq!(read(&mut s), ["BoRR Some(Ipv4)", "EoRR Some(Ipv4)"]);
}

/// What the session wrote since the last call, decoded; and whether it
/// asked for the connection to close.
fn written(s: &mut Session) -> (Vec<Message>, bool) {
    let sent = std::iter::from_fn(|| s.poll_transmit())
        .map(|mut b| decode_message(&mut b, MAX_MESSAGE_LEN).unwrap())
        .collect();
    let closed = std::iter::from_fn(|| s.poll_io()).any(|io| io == Io::Close);
    (sent, closed)
}

/// A message of `kind` whose length field says `len`, `body` after it.
fn raw_message(kind: u8, len: u16, body: &[u8]) -> Vec<u8> {
    let mut m = vec![0xffu8; 16];
    m.extend_from_slice(&len.to_be_bytes());
    m.push(kind);
    m.extend_from_slice(body);
    m
}

/// Fuzzing (tests/fuzz_bgp.rs): a NOTIFICATION of 20 bytes got "OPEN
/// Message Error (2/0)", an OPEN of 28 bytes too, an UPDATE of 22 an
/// UPDATE Message Error, a KEEPALIVE of 20 a Bad Message Length without
/// the length, and a KEEPALIVE claiming 4096 bytes was waited for. RFC
/// 4271 §6.1: each is a Bad Message Length (1/2) whose data is the length,
/// known from the header.
#[test]
fn a_length_wrong_for_its_type_is_a_bad_message_length_from_the_header() {
    let t0 = Instant::now();
    for (kind, len) in [(1u8, 28u16), (2, 22), (3, 19), (3, 20), (4, 20), (4, 4096)] {
        let (mut s, _peer) = established(t0);
        written(&mut s);
        // The header alone.
        s.handle_bytes(t0, &raw_message(kind, len, &[]));
        let (sent, closed) = written(&mut s);
        let what = format!("type {kind}, length {len}: {sent:?}");
        let Some(Message::Notification(n)) = sent.last() else {
            panic!("no NOTIFICATION: {what}")
        };
        assert_eq!(
            (n.code, n.subcode, n.data.as_ref()),
            (NotificationCode::MessageHeader, 2, &len.to_be_bytes()[..]),
            "{what}"
        );
        assert!(closed, "{what}");
        assert_eq!(s.state(), SessionState::Idle, "{what}");
        // Not the decoder's "must be 19..=4096", which 20 is.
        let status = s.snapshot(t0).last_error.unwrap();
        assert!(status.contains(&format!(" of {len} bytes")), "{status}");
    }
}

/// Fuzzing: a ROUTE-REFRESH of subtype 244 followed by three bytes reset
/// the session with "Bad Message Length (1/2)" (the decoder read the bytes
/// as ORF entries). RFC 7313 §5: a subtype other than 0, 1 and 2 "MUST" be
/// ignored.
#[test]
fn a_route_refresh_of_an_unknown_subtype_is_ignored() {
    let t0 = Instant::now();
    let (mut s, _peer) = established(t0);
    written(&mut s);
    for body in [
        &[0, 1, 244, 1, 240, 155, 12][..],
        &[0, 1, 3, 1],
        &[0, 2, 255, 1, 0],
    ] {
        s.handle_bytes(t0, &raw_message(5, 19 + body.len() as u16, body));
        assert_eq!(written(&mut s), (vec![], false), "{body:?}");
        assert_eq!(s.state(), SessionState::Established);
    }
}

/// Fuzzing: a BoRR with a byte more was taken as a demarcation, an EoRR
/// with three more reset the session with a Bad Message Length, and a
/// refresh request whose ORF entries ran past the message too. RFC 7313
/// §5: ROUTE-REFRESH Message Error, Invalid Message Length (7/1), the
/// message as its data.
#[test]
fn a_route_refresh_that_does_not_frame_gets_invalid_message_length() {
    let t0 = Instant::now();
    for body in [
        &[0, 1, 1, 1, 0][..],
        &[0, 2, 2, 1, 1, 2, 3],
        // When-to-refresh, then an ORF of type 64 said to be 9 bytes.
        &[0, 1, 0, 1, 1, 64, 0, 9],
    ] {
        let (mut s, _peer) = established(t0);
        written(&mut s);
        let message = raw_message(5, 19 + body.len() as u16, body);
        s.handle_bytes(t0, &message);
        let (sent, closed) = written(&mut s);
        let Some(Message::Notification(n)) = sent.last() else {
            panic!("no NOTIFICATION to {body:?}: {sent:?}")
        };
        assert_eq!(
            (n.code, n.subcode, n.data.as_ref()),
            (NotificationCode::RouteRefreshMessage, 1, &message[..]),
            "{body:?}"
        );
        assert!(closed && s.state() == SessionState::Idle, "{body:?}");
    }
}

/// A binary upgrade: the session is handed off and resumed by another
/// `Session` on the same connection (here, the same peer): the peer sees
/// nothing — no OPEN, no NOTIFICATION, no UPDATE — and the session goes on.
#[test]
fn a_handed_off_session_resumes_without_a_word_to_the_peer() {
    let t0 = Instant::now();
    let (mut old, mut peer) = established(t0);
    let routes = ad(&["198.51.100.0/24", "2001:db8:100::/48"], false, 1);
    old.set_advertisement(routes.clone());
    pump(&mut old, &mut peer, t0);
    assert_eq!(peer.take_updates().0.len(), 2);
    events(&mut old);

    let t1 = t0 + Duration::from_secs(5);
    let handed = old
        .hand_off(t1)
        .expect("an established session is handed off");
    assert_eq!(old.poll_transmit(), None, "the old side says nothing");
    assert_eq!(old.poll_io(), None, "and does not close the connection");
    assert_eq!(old.poll_timeout(), None, "and keeps no timer");
    assert_eq!(handed.sent.len(), 2);
    assert_eq!(handed.established_ms, 5000);

    // Through serde, as it crosses the upgrade channel.
    let handed: HandedSession =
        serde_json::from_str(&serde_json::to_string(&handed).unwrap()).unwrap();
    let local = "10.0.0.2:40000".parse().unwrap();
    let mut new = Session::resume(settings(), &handed, local, None, routes.clone(), t1).unwrap();
    assert_eq!(new.state(), SessionState::Established);
    assert_eq!(new.poll_transmit(), None, "same routes: nothing to send");
    assert_eq!(new.poll_io(), None);
    let ev = events(&mut new);
    assert!(
        matches!(ev.as_slice(), [SessionEvent::Resumed { hold_time: 9, .. }]),
        "{ev:?}"
    );
    assert_eq!(new.snapshot(t1).prefixes_announced, 2);
    assert!(new.snapshot(t1).established_for >= Some(Duration::from_secs(5)));

    // It goes on: keepalives on its own timer, and the peer's accepted.
    let due = new.poll_timeout().expect("a keepalive is due");
    new.handle_timeout(due);
    pump(&mut new, &mut peer, due);
    assert_eq!(peer.fsm.state(), SessionState::Established);
    assert!(peer.notifications.is_empty(), "{:?}", peer.notifications);
    // A change of announcement goes out from the new side only.
    new.set_advertisement(ad(&["198.51.100.0/24"], false, 2));
    pump(&mut new, &mut peer, due);
    let (announced, withdrawn, _) = peer.take_updates();
    assert!(announced.is_empty());
    assert_eq!(withdrawn, ["2001:db8:100::/48"]);
}

/// The successor announces less than its predecessor did: the difference
/// is withdrawn at once, the rest untouched.
#[test]
fn a_resumed_session_sends_only_the_difference() {
    let t0 = Instant::now();
    let (mut old, mut peer) = established(t0);
    old.set_advertisement(ad(&["198.51.100.0/24", "2001:db8:100::/48"], false, 1));
    pump(&mut old, &mut peer, t0);
    peer.take_updates();
    let handed = old.hand_off(t0).unwrap();
    let local = "10.0.0.2:40000".parse().unwrap();
    let mut new = Session::resume(
        settings(),
        &handed,
        local,
        None,
        ad(&["198.51.100.0/24"], false, 1),
        t0,
    )
    .unwrap();
    pump(&mut new, &mut peer, t0);
    let (announced, withdrawn, _) = peer.take_updates();
    assert!(announced.is_empty(), "{announced:?}");
    assert_eq!(withdrawn, ["2001:db8:100::/48"]);
}

/// A configuration that changes what the session negotiated cannot take
/// the session over: the peer agreed to another OPEN.
#[test]
fn a_changed_hold_time_or_asn_refuses_to_resume() {
    let t0 = Instant::now();
    let (mut old, _peer) = established(t0);
    let handed = old.hand_off(t0).unwrap();
    let local = "10.0.0.2:40000".parse().unwrap();
    let mut longer = settings();
    longer.hold_time_secs = 30;
    let err = Session::resume(longer, &handed, local, None, ad(&[], false, 0), t0).err();
    assert!(err.is_some_and(|e| e.contains("OPEN differs")));
    let mut other_peer_asn = settings();
    other_peer_asn.peer_asn = 65099;
    assert!(Session::resume(other_peer_asn, &handed, local, None, ad(&[], false, 0), t0).is_err());
    // And the unchanged one can.
    assert!(Session::resume(settings(), &handed, local, None, ad(&[], false, 0), t0).is_ok());
}

/// Only an established session with nothing left to write is handed off.
#[test]
fn a_session_not_established_is_not_handed_off() {
    let t0 = Instant::now();
    let mut s = Session::new(settings(), t0);
    assert_eq!(s.poll_io(), Some(Io::Connect));
    s.handle_connected(t0, "10.0.0.2:40000".parse().unwrap());
    assert_eq!(s.state(), SessionState::OpenSent);
    assert!(s.hand_off(t0).is_none());
    assert_eq!(s.poll_timeout(), None, "stopped all the same");
}

/// The Cease a successor sends on a connection it cannot take over.
#[test]
fn cease_encodes_a_notification_with_its_reason() {
    let bytes = cease(cease_subcode::OTHER_CONFIGURATION_CHANGE, "upgrade").unwrap();
    let mut m = bytes.clone();
    match decode_message(&mut m, MAX_MESSAGE_LEN).unwrap() {
        Message::Notification(n) => {
            assert_eq!(n.code, NotificationCode::Cease);
            assert_eq!(n.subcode, cease_subcode::OTHER_CONFIGURATION_CHANGE);
        }
        other => panic!("{other:?}"),
    }
}

/// The IPv6 next hop of the MP_REACH_NLRI in the UPDATEs since the last
/// call, with the prefixes each announced.
fn v6_next_hops(peer: &mut Peer) -> Vec<(std::net::IpAddr, Vec<String>)> {
    let mut out = Vec::new();
    for u in peer.updates.drain(..) {
        for a in u.parse(true, false, &[]).unwrap().attributes {
            if let PathAttribute::MpReachNlri(r) = a {
                let prefixes = r
                    .announced
                    .iter()
                    .map(|e| match &e.prefix {
                        WirePrefix::V4(p) => p.to_string(),
                        WirePrefix::V6(p) => p.to_string(),
                    })
                    .collect();
                out.push((r.next_hop, prefixes));
            }
        }
    }
    out
}

/// QA: the IPv6 next hop was chosen once, when the session connected. An
/// address removed from (or deprecated on) the interface afterwards stayed
/// the next hop of every IPv6 route, unreachable for the router, until the
/// session restarted. A new choice on an established session announces
/// the IPv6 routes again with it, at once; the same choice sends nothing.
#[test]
fn a_changed_ipv6_next_hop_is_announced_again_at_once() {
    let t0 = Instant::now();
    let (mut s, mut peer) = established(t0);
    s.set_link_ipv6(Some("fd77::5".parse().unwrap()));
    s.set_advertisement(ad(&["198.51.100.0/24", "2001:db8:1::/48"], false, 1));
    pump(&mut s, &mut peer, t0);
    assert_eq!(
        v6_next_hops(&mut peer),
        [(
            "fd77::5".parse().unwrap(),
            vec!["2001:db8:1::/48".to_string()]
        )]
    );
    s.set_link_ipv6(Some("fd77::5".parse().unwrap()));
    pump(&mut s, &mut peer, t0);
    assert!(peer.updates.is_empty(), "nothing changed, nothing sent");
    s.set_link_ipv6(Some("fd77::2".parse().unwrap()));
    pump(&mut s, &mut peer, t0);
    assert_eq!(
        v6_next_hops(&mut peer),
        [(
            "fd77::2".parse().unwrap(),
            vec!["2001:db8:1::/48".to_string()]
        )],
        "the IPv6 route again, with the new next hop (the IPv4 one untouched)"
    );
    assert_eq!(s.link_ipv6(), Some("fd77::2".parse().unwrap()));
}

/// From the helpers' doubts: every FSM error went out as "Finite State
/// Machine Error (5/0)", unspecific. RFC 6608 §3 names the state the
/// unexpected message arrived in: 1 in OpenSent, 2 in OpenConfirm, 3 in
/// Established, so the router's log says which message was out of place.
#[test]
fn an_unexpected_message_gets_the_fsm_error_subcode_of_its_state() {
    let t0 = Instant::now();
    let keepalive = raw_message(4, 19, &[]);
    let update = raw_message(2, 23, &[0, 0, 0, 0]);
    let router_open = || Peer::new().out.pop_front().unwrap();
    let connected = || {
        let mut s = Session::new(settings(), t0);
        assert_eq!(s.poll_io(), Some(Io::Connect));
        s.handle_connected(t0, "10.0.0.2:40000".parse().unwrap());
        written(&mut s);
        assert_eq!(s.state(), SessionState::OpenSent);
        s
    };
    let open_sent = connected();
    let mut open_confirm = connected();
    open_confirm.handle_bytes(t0, &router_open());
    written(&mut open_confirm);
    assert_eq!(open_confirm.state(), SessionState::OpenConfirm);
    let (mut established, _peer) = established(t0);
    written(&mut established);
    for (mut s, state, message, subcode) in [
        (open_sent, "OpenSent", keepalive.clone(), 1),
        (open_confirm, "OpenConfirm", update, 2),
        (established, "Established", router_open().to_vec(), 3),
    ] {
        s.handle_bytes(t0, &message);
        let (sent, closed) = written(&mut s);
        let Some(Message::Notification(n)) = sent.last() else {
            panic!("no NOTIFICATION in {state}: {sent:?}")
        };
        assert_eq!(
            (n.code, n.subcode),
            (NotificationCode::FsmError, subcode),
            "{state}"
        );
        assert!(closed && s.state() == SessionState::Idle, "{state}");
        let status = s.snapshot(t0).last_error.unwrap();
        assert!(status.contains(&format!("in {state} State")), "{status}");
    }
}
