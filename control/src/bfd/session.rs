//! One BFD session in asynchronous mode (RFC 5880 §6.8), sans-IO: the state
//! machine, the transmit and detection timers as deadlines, Poll Sequences.
//! The driver feeds it received packets and the time, and sends what it
//! asks to; tests drive it with simulated time.
//!
//! What is left out: demand mode (this side never sets the D bit and
//! ignores a peer's: it keeps sending periodically and expects the same;
//! BIRD and FRR do not use demand mode unless told to), the echo function
//! (RFC 5881 echo packets loop through the peer's forwarding plane; a
//! process cannot offer that) and authentication.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::packet::{diag, Control, State};

/// RFC 5880 §6.8.3: while a session is not Up, a system sends no faster
/// than once a second.
const SLOW_TX: Duration = Duration::from_secs(1);

/// A session's configured timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timers {
    /// `bfd.DesiredMinTxInterval` once Up.
    pub desired_min_tx: Duration,
    /// `bfd.RequiredMinRxInterval`.
    pub required_min_rx: Duration,
    /// `bfd.DetectMult`.
    pub detect_mult: u8,
}

/// A change of state, for logs, the status and the BGP session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: State,
    pub to: State,
    /// Why, when the session went Down: a [`diag`] code.
    pub diag: u8,
}

/// What a binary upgrade's successor needs to go on with a session the
/// peer believes is Up, without a word of Down on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandedBfd {
    pub my_discr: u32,
    pub your_discr: u32,
    pub state: State,
    pub remote_state: State,
    pub remote_min_rx_us: u32,
    pub remote_desired_min_tx_us: u32,
    pub remote_detect_mult: u8,
    /// The UDP source port of the session's packets (RFC 5881 §4: the same
    /// for all of a session's packets).
    pub source_port: u16,
}

#[derive(Debug)]
pub struct Session {
    timers: Timers,
    state: State,
    local_diag: u8,
    my_discr: u32,
    /// `bfd.RemoteDiscr`: 0 until the peer is heard.
    your_discr: u32,
    remote_state: State,
    remote_min_rx_us: u32,
    remote_desired_min_tx_us: u32,
    remote_detect_mult: u8,
    /// A Poll Sequence of ours is under way: packets carry P until an F.
    polling: bool,
    /// The peer polled: answer with F at once.
    owe_final: bool,
    next_tx: Instant,
    last_rx: Option<Instant>,
    transitions: Vec<Transition>,
    rng: fastrand::Rng,
}

impl Session {
    /// A new session, Down, sending its first packet at `now`.
    pub fn new(timers: Timers, my_discr: u32, now: Instant) -> Session {
        Session {
            timers,
            state: State::Down,
            local_diag: diag::NONE,
            my_discr,
            your_discr: 0,
            remote_state: State::Down,
            // RFC 5880 §6.8.1: 1 until the peer says otherwise.
            remote_min_rx_us: 1,
            remote_desired_min_tx_us: 0,
            remote_detect_mult: 0,
            polling: false,
            owe_final: false,
            next_tx: now,
            last_rx: None,
            transitions: Vec::new(),
            rng: fastrand::Rng::with_seed(u64::from(my_discr)),
        }
    }

    /// Goes on with a predecessor's session: same discriminators and state,
    /// its detection timer started afresh at `now` and a packet due at once.
    pub fn resume(timers: Timers, handed: &HandedBfd, now: Instant) -> Session {
        let mut s = Session::new(timers, handed.my_discr, now);
        s.your_discr = handed.your_discr;
        s.state = handed.state;
        s.remote_state = handed.remote_state;
        s.remote_min_rx_us = handed.remote_min_rx_us;
        s.remote_desired_min_tx_us = handed.remote_desired_min_tx_us;
        s.remote_detect_mult = handed.remote_detect_mult;
        s.last_rx = Some(now);
        s
    }

    pub fn hand_off(&self, source_port: u16) -> HandedBfd {
        HandedBfd {
            my_discr: self.my_discr,
            your_discr: self.your_discr,
            state: self.state,
            remote_state: self.remote_state,
            remote_min_rx_us: self.remote_min_rx_us,
            remote_desired_min_tx_us: self.remote_desired_min_tx_us,
            remote_detect_mult: self.remote_detect_mult,
            source_port,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn my_discr(&self) -> u32 {
        self.my_discr
    }

    /// The peer's discriminator; 0 until it is heard.
    pub fn your_discr(&self) -> u32 {
        self.your_discr
    }

    /// The diagnostic this side sends: why it last left Up.
    pub fn local_diag(&self) -> u8 {
        self.local_diag
    }

    /// How long without a packet before this side declares the peer down
    /// (RFC 5880 §6.8.4, asynchronous mode); `None` before it is heard.
    pub fn detection_time(&self) -> Option<Duration> {
        if self.remote_detect_mult == 0 {
            return None;
        }
        let interval = self
            .timers
            .required_min_rx
            .max(Duration::from_micros(u64::from(
                self.remote_desired_min_tx_us,
            )));
        Some(interval * u32::from(self.remote_detect_mult))
    }

    /// `bfd.DesiredMinTxInterval` as sent: never below a second while not
    /// Up (§6.8.3).
    fn desired_min_tx(&self) -> Duration {
        match self.state {
            State::Up => self.timers.desired_min_tx,
            _ => self.timers.desired_min_tx.max(SLOW_TX),
        }
    }

    /// The periodic transmit interval before jitter: the slower of what
    /// this side wants and what the peer can take (§6.8.2); `None` while
    /// the peer asks for no packets (a Required Min RX of 0).
    fn tx_interval(&self) -> Option<Duration> {
        if self.remote_min_rx_us == 0 {
            return None;
        }
        Some(
            self.desired_min_tx()
                .max(Duration::from_micros(u64::from(self.remote_min_rx_us))),
        )
    }

    /// §6.8.7: each interval is reduced by a random 0–25 % (10–25 % with a
    /// multiplier of 1), so that peers do not send in lockstep.
    fn jittered(&mut self, interval: Duration) -> Duration {
        let min_cut = if self.timers.detect_mult == 1 { 10 } else { 0 };
        let cut = self.rng.u32(min_cut..=25);
        interval * (100 - cut) / 100
    }

    /// A received Control packet (already parsed and matched to this
    /// session), RFC 5880 §6.8.6.
    pub fn handle_packet(&mut self, now: Instant, p: &Control) {
        self.your_discr = p.my_discr;
        self.remote_state = p.state;
        self.remote_min_rx_us = p.required_min_rx_us;
        self.remote_desired_min_tx_us = p.desired_min_tx_us;
        self.remote_detect_mult = p.detect_mult;
        if p.final_ && self.polling {
            self.polling = false;
        }
        if p.poll {
            self.owe_final = true;
        }
        if self.state == State::AdminDown {
            return;
        }
        self.last_rx = Some(now);
        if p.state == State::AdminDown {
            if self.state != State::Down {
                self.go(State::Down, diag::NEIGHBOR_SIGNALED_DOWN, now);
            }
            return;
        }
        match (self.state, p.state) {
            (State::Down, State::Down) => self.go(State::Init, diag::NONE, now),
            (State::Down, State::Init) => self.go(State::Up, diag::NONE, now),
            (State::Init, State::Init | State::Up) => self.go(State::Up, diag::NONE, now),
            (State::Up, State::Down) => self.go(State::Down, diag::NEIGHBOR_SIGNALED_DOWN, now),
            _ => {}
        }
    }

    /// Timers: the detection time, and nothing else (transmissions are
    /// [`poll_transmit`](Session::poll_transmit)'s).
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(deadline) = self.detection_deadline() {
            if now >= deadline {
                // §6.8.1: the peer's discriminator is forgotten, and its
                // Required Min RX back to 1 (send slowly until heard).
                self.your_discr = 0;
                self.remote_state = State::Down;
                self.remote_min_rx_us = 1;
                self.remote_detect_mult = 0;
                self.last_rx = None;
                self.go(State::Down, diag::DETECTION_TIME_EXPIRED, now);
            }
        }
    }

    fn detection_deadline(&self) -> Option<Instant> {
        match self.state {
            State::Init | State::Up => Some(self.last_rx? + self.detection_time()?),
            State::Down | State::AdminDown => None,
        }
    }

    fn go(&mut self, to: State, why: u8, now: Instant) {
        let from = self.state;
        if from == to {
            return;
        }
        self.state = to;
        if to == State::Down {
            self.local_diag = why;
        }
        // Going Up lowers the interval sent from a second to the configured
        // one: a change of timers announced with a Poll Sequence (§6.8.3).
        self.polling = to == State::Up && self.timers.desired_min_tx < SLOW_TX;
        // A change of state is sent at once, not at the next tick.
        self.next_tx = now;
        self.transitions.push(Transition {
            from,
            to,
            diag: why,
        });
    }

    /// The packet to send now, if one is due: the periodic one or an
    /// answer to the peer's Poll (at once, §6.8.7). Schedules the next.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Control> {
        let final_ = std::mem::take(&mut self.owe_final);
        let due = now >= self.next_tx;
        if due && self.tx_interval().is_none() {
            // The peer asked for silence: look again in a second.
            self.next_tx = now + SLOW_TX;
        }
        let periodic = due && self.tx_interval().is_some();
        if !final_ && !periodic {
            return None;
        }
        if periodic {
            let interval = self.tx_interval().unwrap_or(SLOW_TX);
            self.next_tx = now + self.jittered(interval);
        }
        Some(Control {
            diag: self.local_diag,
            state: self.state,
            // Never P and F in one packet (§6.8.7): the F goes now, the
            // Poll with the next periodic packet.
            poll: self.polling && !final_,
            final_,
            cpi: false,
            demand: false,
            detect_mult: self.timers.detect_mult,
            my_discr: self.my_discr,
            your_discr: self.your_discr,
            desired_min_tx_us: duration_us(self.desired_min_tx()),
            required_min_rx_us: duration_us(self.timers.required_min_rx),
            required_min_echo_rx_us: 0,
        })
    }

    /// When [`handle_timeout`](Session::handle_timeout) or
    /// [`poll_transmit`](Session::poll_transmit) has something to do.
    pub fn poll_timeout(&self) -> Instant {
        match self.detection_deadline() {
            Some(d) => d.min(self.next_tx),
            None => self.next_tx,
        }
    }

    /// Changes of state since the last call, oldest first.
    pub fn take_transitions(&mut self) -> Vec<Transition> {
        std::mem::take(&mut self.transitions)
    }
}

fn duration_us(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMERS: Timers = Timers {
        desired_min_tx: Duration::from_millis(100),
        required_min_rx: Duration::from_millis(100),
        detect_mult: 3,
    };

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Two sessions talking to each other over a lossless wire, in
    /// simulated time, until `until`; `deliver` decides which direction
    /// still arrives. Returns the time reached.
    fn run(
        a: &mut Session,
        b: &mut Session,
        mut now: Instant,
        until: Instant,
        deliver: impl Fn(bool) -> bool,
    ) -> Instant {
        fn step(x: &mut Session, y: &mut Session, now: Instant, arrives: bool) {
            x.handle_timeout(now);
            while let Some(p) = x.poll_transmit(now) {
                let p = Control::parse(&p.encode()).unwrap();
                if arrives {
                    y.handle_packet(now, &p);
                }
            }
        }
        while now < until {
            step(a, b, now, deliver(true));
            step(b, a, now, deliver(false));
            now += ms(1);
        }
        now
    }

    /// A packet from a peer (discriminator 9) that has not heard us yet.
    fn from_peer(poll: bool, required_min_rx_us: u32) -> Control {
        Control {
            diag: 0,
            state: State::Down,
            poll,
            final_: false,
            cpi: false,
            demand: false,
            detect_mult: 3,
            my_discr: 9,
            your_discr: 0,
            desired_min_tx_us: 1_000_000,
            required_min_rx_us,
            required_min_echo_rx_us: 0,
        }
    }

    fn pair(now: Instant) -> (Session, Session) {
        (
            Session::new(TIMERS, 0x1111, now),
            Session::new(TIMERS, 0x2222, now),
        )
    }

    #[test]
    fn two_sessions_come_up_through_init_and_poll_down_to_the_fast_rate() {
        let t0 = Instant::now();
        let (mut a, mut b) = pair(t0);
        let now = run(&mut a, &mut b, t0, t0 + ms(3000), |_| true);
        assert_eq!((a.state(), b.state()), (State::Up, State::Up));
        let steps = |s: &mut Session| -> Vec<(State, State)> {
            s.take_transitions()
                .iter()
                .map(|t| (t.from, t.to))
                .collect()
        };
        // a spoke first: b heard Down (→ Init), a then heard Init (→ Up),
        // b heard Up (→ Up).
        assert_eq!(steps(&mut a), [(State::Down, State::Up)]);
        assert_eq!(
            steps(&mut b),
            [(State::Down, State::Init), (State::Init, State::Up)]
        );
        assert_eq!(a.your_discr(), 0x2222);
        assert_eq!(b.your_discr(), 0x1111);
        // Up: the Poll Sequence ended, and packets go every 75–100 ms.
        assert!(!a.polling && !b.polling);
        let mut sent = 0;
        let mut t = now;
        while t < now + ms(1000) {
            if a.poll_transmit(t).is_some() {
                sent += 1;
            }
            t += ms(1);
        }
        assert!((10..=14).contains(&sent), "{sent} packets in a second");
        assert_eq!(a.detection_time(), Some(ms(300)));
    }

    #[test]
    fn while_down_a_session_sends_once_a_second_at_most() {
        let t0 = Instant::now();
        let mut a = Session::new(TIMERS, 7, t0);
        let mut sent = Vec::new();
        let mut t = t0;
        while t < t0 + ms(5000) {
            if let Some(p) = a.poll_transmit(t) {
                assert_eq!((p.state, p.your_discr), (State::Down, 0));
                assert_eq!(p.desired_min_tx_us, 1_000_000);
                sent.push(t);
            }
            t += ms(1);
        }
        assert!((5..=7).contains(&sent.len()), "{}", sent.len());
        assert!(sent.windows(2).all(|w| w[1] - w[0] >= ms(750)));
    }

    #[test]
    fn silence_for_the_detection_time_takes_the_session_down() {
        let t0 = Instant::now();
        let (mut a, mut b) = pair(t0);
        let up = run(&mut a, &mut b, t0, t0 + ms(3000), |_| true);
        a.take_transitions();
        // b falls silent (a's packets still reach it).
        let end = run(&mut a, &mut b, up, up + ms(400), |from_a| from_a);
        assert_eq!(a.state(), State::Down);
        let t = a.take_transitions();
        assert_eq!(t.len(), 1);
        assert_eq!(
            (t[0].from, t[0].to, t[0].diag),
            (State::Up, State::Down, diag::DETECTION_TIME_EXPIRED)
        );
        assert_eq!(a.your_discr(), 0);
        // And says so: b, still hearing a, follows with "neighbor
        // signaled down".
        let _ = run(&mut a, &mut b, end, end + ms(50), |from_a| from_a);
        assert_eq!(b.state(), State::Down);
        assert_eq!(b.local_diag(), diag::NEIGHBOR_SIGNALED_DOWN);
    }

    #[test]
    fn the_detection_time_does_not_fire_early() {
        let t0 = Instant::now();
        let (mut a, mut b) = pair(t0);
        let up = run(&mut a, &mut b, t0, t0 + ms(3000), |_| true);
        // b's last packet came at most 100 ms before `up`: 190 ms more of
        // silence stays under the 300 ms detection time.
        let _ = run(&mut a, &mut b, up, up + ms(190), |from_a| from_a);
        assert_eq!(a.state(), State::Up, "300 ms detection time");
    }

    #[test]
    fn a_poll_is_answered_at_once_with_final_and_never_both_bits() {
        let t0 = Instant::now();
        let mut a = Session::new(TIMERS, 5, t0);
        let _ = a.poll_transmit(t0);
        a.handle_packet(t0 + ms(10), &from_peer(true, 100_000));
        let answer = a.poll_transmit(t0 + ms(10)).expect("F at once");
        assert!(answer.final_ && !answer.poll);
        assert_eq!(answer.your_discr, 9);
    }

    #[test]
    fn admin_down_from_the_peer_takes_the_session_down_but_is_not_a_timeout() {
        let t0 = Instant::now();
        let (mut a, mut b) = pair(t0);
        let up = run(&mut a, &mut b, t0, t0 + ms(3000), |_| true);
        a.take_transitions();
        let p = Control {
            state: State::AdminDown,
            diag: diag::ADMIN_DOWN,
            ..b.poll_transmit(up + ms(200)).unwrap()
        };
        a.handle_packet(up + ms(200), &p);
        let t = a.take_transitions();
        assert_eq!(
            (t[0].from, t[0].to, t[0].diag),
            (State::Up, State::Down, diag::NEIGHBOR_SIGNALED_DOWN)
        );
    }

    #[test]
    fn a_resumed_session_is_up_at_once_and_the_peer_notices_nothing() {
        let t0 = Instant::now();
        let (mut a, mut b) = pair(t0);
        let up = run(&mut a, &mut b, t0, t0 + ms(3000), |_| true);
        b.take_transitions();
        let handed = a.hand_off(50000);
        // 100 ms of silence while the process changes (under b's 300 ms).
        let later = up + ms(100);
        let mut a2 = Session::resume(TIMERS, &handed, later);
        assert_eq!(a2.state(), State::Up);
        let first = a2.poll_transmit(later).expect("a packet at once");
        assert_eq!((first.state, first.your_discr), (State::Up, 0x2222));
        let _ = run(&mut a2, &mut b, later, later + ms(2000), |_| true);
        assert_eq!((a2.state(), b.state()), (State::Up, State::Up));
        assert!(b.take_transitions().is_empty());
    }

    #[test]
    fn a_peer_that_asks_for_no_packets_gets_none() {
        let t0 = Instant::now();
        let mut a = Session::new(TIMERS, 5, t0);
        a.handle_packet(t0, &from_peer(false, 0));
        a.take_transitions();
        let sent = (0..3000)
            .filter(|i| a.poll_transmit(t0 + ms(*i)).is_some())
            .count();
        assert_eq!(sent, 0);
    }
}
