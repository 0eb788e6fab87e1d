//! BFD Control packets (RFC 5880 §4.1, the mandatory section alone: no
//! authentication is configured, so a packet that carries some is refused),
//! with the checks of §6.8.6 that need no session (sans-IO).

use serde::{Deserialize, Serialize};

/// The protocol version this speaks (RFC 5880).
pub const VERSION: u8 = 1;
/// A Control packet without authentication, in bytes.
pub const LEN: usize = 24;

/// `bfd.SessionState` (RFC 5880 §4.1, the Sta field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    AdminDown = 0,
    Down = 1,
    Init = 2,
    Up = 3,
}

impl State {
    fn from_bits(bits: u8) -> State {
        match bits & 0b11 {
            0 => State::AdminDown,
            1 => State::Down,
            2 => State::Init,
            _ => State::Up,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            State::AdminDown => "admin_down",
            State::Down => "down",
            State::Init => "init",
            State::Up => "up",
        }
    }
}

/// Diagnostic codes (RFC 5880 §4.1): why the sender's session last left Up.
pub mod diag {
    pub const NONE: u8 = 0;
    pub const DETECTION_TIME_EXPIRED: u8 = 1;
    pub const NEIGHBOR_SIGNALED_DOWN: u8 = 3;
    pub const ADMIN_DOWN: u8 = 7;

    /// For logs: what a diagnostic code means.
    pub fn describe(code: u8) -> &'static str {
        match code {
            0 => "no diagnostic",
            1 => "control detection time expired",
            2 => "echo function failed",
            3 => "neighbor signaled session down",
            4 => "forwarding plane reset",
            5 => "path down",
            6 => "concatenated path down",
            7 => "administratively down",
            8 => "reverse concatenated path down",
            _ => "unknown diagnostic",
        }
    }
}

const POLL: u8 = 0x20;
const FINAL: u8 = 0x10;
const CPI: u8 = 0x08;
const AUTH: u8 = 0x04;
const DEMAND: u8 = 0x02;
const MULTIPOINT: u8 = 0x01;

/// One Control packet, its intervals in microseconds as on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Control {
    pub diag: u8,
    pub state: State,
    pub poll: bool,
    pub final_: bool,
    /// Control Plane Independent: this side's BFD does not share fate with
    /// its control plane. Never set here: the control plane runs it.
    pub cpi: bool,
    pub demand: bool,
    pub detect_mult: u8,
    pub my_discr: u32,
    pub your_discr: u32,
    pub desired_min_tx_us: u32,
    pub required_min_rx_us: u32,
    pub required_min_echo_rx_us: u32,
}

/// Why a received packet is discarded (RFC 5880 §6.8.6).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    #[error("{0} bytes, shorter than a Control packet ({LEN})")]
    Short(usize),
    #[error("version {0}, not {VERSION}")]
    Version(u8),
    #[error("length field {field} with {got} bytes received")]
    Length { field: u8, got: usize },
    #[error("authenticated, but no authentication is configured")]
    Authenticated,
    #[error("detect multiplier 0")]
    DetectMultZero,
    #[error("multipoint bit set")]
    Multipoint,
    #[error("my discriminator 0")]
    MyDiscrZero,
    #[error("your discriminator 0 in state {0:?}")]
    YourDiscrZero(State),
}

impl Control {
    /// Parses `bytes` (a UDP payload) with the session-independent checks.
    pub fn parse(bytes: &[u8]) -> Result<Control, ParseError> {
        if bytes.len() < LEN {
            return Err(ParseError::Short(bytes.len()));
        }
        let version = bytes[0] >> 5;
        if version != VERSION {
            return Err(ParseError::Version(version));
        }
        let flags = bytes[1];
        let length = bytes[3];
        if usize::from(length) < LEN || usize::from(length) > bytes.len() {
            return Err(ParseError::Length {
                field: length,
                got: bytes.len(),
            });
        }
        if flags & AUTH != 0 {
            return Err(ParseError::Authenticated);
        }
        let word = |at: usize| {
            u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let c = Control {
            diag: bytes[0] & 0x1f,
            state: State::from_bits(flags >> 6),
            poll: flags & POLL != 0,
            final_: flags & FINAL != 0,
            cpi: flags & CPI != 0,
            demand: flags & DEMAND != 0,
            detect_mult: bytes[2],
            my_discr: word(4),
            your_discr: word(8),
            desired_min_tx_us: word(12),
            required_min_rx_us: word(16),
            required_min_echo_rx_us: word(20),
        };
        if c.detect_mult == 0 {
            return Err(ParseError::DetectMultZero);
        }
        if flags & MULTIPOINT != 0 {
            return Err(ParseError::Multipoint);
        }
        if c.my_discr == 0 {
            return Err(ParseError::MyDiscrZero);
        }
        if c.your_discr == 0 && !matches!(c.state, State::Down | State::AdminDown) {
            return Err(ParseError::YourDiscrZero(c.state));
        }
        Ok(c)
    }

    pub fn encode(&self) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        b[0] = (VERSION << 5) | (self.diag & 0x1f);
        b[1] = ((self.state as u8) << 6)
            | if self.poll { POLL } else { 0 }
            | if self.final_ { FINAL } else { 0 }
            | if self.cpi { CPI } else { 0 }
            | if self.demand { DEMAND } else { 0 };
        b[2] = self.detect_mult;
        b[3] = LEN as u8;
        b[4..8].copy_from_slice(&self.my_discr.to_be_bytes());
        b[8..12].copy_from_slice(&self.your_discr.to_be_bytes());
        b[12..16].copy_from_slice(&self.desired_min_tx_us.to_be_bytes());
        b[16..20].copy_from_slice(&self.required_min_rx_us.to_be_bytes());
        b[20..24].copy_from_slice(&self.required_min_echo_rx_us.to_be_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up() -> Control {
        Control {
            diag: diag::NONE,
            state: State::Up,
            poll: true,
            final_: false,
            cpi: false,
            demand: false,
            detect_mult: 3,
            my_discr: 0x0102_0304,
            your_discr: 0xa0b0_c0d0,
            desired_min_tx_us: 100_000,
            required_min_rx_us: 50_000,
            required_min_echo_rx_us: 0,
        }
    }

    #[test]
    fn a_packet_survives_encoding_and_parsing() {
        let c = up();
        assert_eq!(Control::parse(&c.encode()), Ok(c));
        let down = Control {
            state: State::Down,
            poll: false,
            final_: true,
            your_discr: 0,
            diag: diag::DETECTION_TIME_EXPIRED,
            ..c
        };
        assert_eq!(Control::parse(&down.encode()), Ok(down));
    }

    /// The bytes of RFC 5880 §4.1's layout, written out by hand: version 1,
    /// diag 3, state Up with Poll, multiplier 5.
    #[test]
    fn the_wire_layout_is_rfc_5880s() {
        let c = Control {
            diag: diag::NEIGHBOR_SIGNALED_DOWN,
            detect_mult: 5,
            ..up()
        };
        let b = c.encode();
        assert_eq!(&b[..4], &[0x23, 0xe0, 5, 24]);
        assert_eq!(&b[4..12], &[1, 2, 3, 4, 0xa0, 0xb0, 0xc0, 0xd0]);
        assert_eq!(&b[12..16], &100_000u32.to_be_bytes());
    }

    #[test]
    fn packets_rfc_5880_says_to_discard_are_refused() {
        let good = up().encode();
        let with = |at: usize, value: u8| {
            let mut b = good;
            b[at] = value;
            Control::parse(&b)
        };
        assert_eq!(Control::parse(&good[..23]), Err(ParseError::Short(23)));
        assert_eq!(with(0, 0x40), Err(ParseError::Version(2)));
        assert!(matches!(with(3, 23), Err(ParseError::Length { .. })));
        assert!(matches!(with(3, 30), Err(ParseError::Length { .. })));
        assert_eq!(with(1, 0xc4), Err(ParseError::Authenticated));
        assert_eq!(with(2, 0), Err(ParseError::DetectMultZero));
        assert_eq!(with(1, 0xc1), Err(ParseError::Multipoint));
        let mut no_mine = good;
        no_mine[4..8].fill(0);
        assert_eq!(Control::parse(&no_mine), Err(ParseError::MyDiscrZero));
        let mut no_yours = good;
        no_yours[8..12].fill(0);
        assert_eq!(
            Control::parse(&no_yours),
            Err(ParseError::YourDiscrZero(State::Up))
        );
        // Trailing bytes past the length field are ignored.
        let mut longer = good.to_vec();
        longer.extend_from_slice(&[0; 4]);
        assert_eq!(Control::parse(&longer), Ok(up()));
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_parser() {
        bolero::check!().for_each(|bytes: &[u8]| {
            if let Ok(c) = Control::parse(bytes) {
                assert_eq!(Control::parse(&c.encode()), Ok(c));
            }
        });
    }
}
