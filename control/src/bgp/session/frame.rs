//! Framing what the router sends, with the checks RFC 4271 §6.1 and
//! RFC 7313 §5 make before a message's body means anything.
//!
//! `rustbgpd-wire` checks the marker, the 19..=max length and the type in
//! the header, but each type's own length only once the whole body is in,
//! and answers that with an error of the body (fuzzing found: an OPEN
//! Message Error to a 20-byte NOTIFICATION, a Bad Message Length without
//! the length the RFC puts in its data, a KEEPALIVE claiming 4096 bytes
//! waited for). And it reads RFC 5291 ORF entries after any ROUTE-REFRESH,
//! so one of an unknown subtype, which RFC 7313 §5 says to ignore, reset
//! the session when what followed was not ORF.

use bytes::Bytes;
use rustbgpd_wire::{
    decode_message, peek_message_length, DecodeError, Message, NotificationCode,
    NotificationMessage,
};

const OPEN: u8 = 1;
const UPDATE: u8 = 2;
const NOTIFICATION: u8 = 3;
const KEEPALIVE: u8 = 4;
const ROUTE_REFRESH: u8 = 5;
/// Marker, length and type.
const HEADER_LEN: usize = 19;
/// AFI, subtype and SAFI (RFC 2918 §3, RFC 7313 §3).
const REFRESH_LEN: usize = HEADER_LEN + 4;
/// RFC 7313 §5 "Invalid Message Length", of ROUTE-REFRESH Message Error.
const INVALID_MESSAGE_LENGTH: u8 = 1;

/// What the front of the router's bytes holds.
#[derive(Debug, PartialEq)]
pub(super) enum Frame {
    /// Not a whole header, or not a whole message yet.
    Partial,
    /// A whole message of this many bytes, its header sound.
    Whole(usize),
    /// A header RFC 4271 §6.1 refuses: the session answers with the
    /// NOTIFICATION of this error and closes. `why` for the log, when
    /// the error's own words would mislead.
    Bad {
        error: DecodeError,
        why: Option<String>,
    },
}

/// The shortest message of a type (RFC 4271 §4.2, §4.3, §4.5; a
/// KEEPALIVE is exactly a header; ROUTE-REFRESH: RFC 2918 §3).
fn min_len(kind: u8) -> usize {
    match kind {
        OPEN => 29,
        UPDATE => 23,
        NOTIFICATION => 21,
        ROUTE_REFRESH => REFRESH_LEN,
        _ => HEADER_LEN,
    }
}

fn type_name(kind: u8) -> &'static str {
    match kind {
        OPEN => "OPEN",
        UPDATE => "UPDATE",
        NOTIFICATION => "NOTIFICATION",
        KEEPALIVE => "KEEPALIVE",
        _ => "ROUTE-REFRESH",
    }
}

/// The first message in `buf`, decided as soon as its header is in.
pub(super) fn next(buf: &[u8], max_len: u16) -> Frame {
    let len = match peek_message_length(buf, max_len) {
        Ok(None) => return Frame::Partial,
        Ok(Some(len)) => len,
        Err(error) => return Frame::Bad { error, why: None },
    };
    let kind = buf[HEADER_LEN - 1];
    let size = usize::from(len);
    // §6.1: "Bad Message Length. The Data field contains the erroneous
    // Length field", which the decoder's `InvalidLength` carries.
    if size < min_len(kind) || (kind == KEEPALIVE && size != HEADER_LEN) {
        // The error's words ("must be 19..=4096") say nothing of this.
        let why = match kind {
            KEEPALIVE => format!("a KEEPALIVE of {size} bytes (exactly {HEADER_LEN})"),
            _ => format!(
                "a {} of {size} bytes (at least {})",
                type_name(kind),
                min_len(kind)
            ),
        };
        return Frame::Bad {
            error: DecodeError::InvalidLength { length: len },
            why: Some(why),
        };
    }
    if buf.len() < size {
        return Frame::Partial;
    }
    Frame::Whole(size)
}

/// What one whole message (a [`Frame::Whole`]) is to the session.
#[derive(Debug)]
pub(super) enum Inbound {
    Message(Message),
    /// RFC 7313 §5: a ROUTE-REFRESH of a subtype other than 0, 1 and 2
    /// "MUST" be ignored.
    Ignored,
    /// Does not decode: the NOTIFICATION of this error.
    Malformed(DecodeError),
    /// A ROUTE-REFRESH that does not frame: RFC 7313 §5's ROUTE-REFRESH
    /// Message Error, Invalid Message Length, the message as its data.
    BadRefresh(NotificationMessage),
}

pub(super) fn decode(message: Bytes, max_len: u16) -> Inbound {
    let refresh = message.get(HEADER_LEN - 1) == Some(&ROUTE_REFRESH);
    if refresh {
        // Subtype: after the AFI (`next` saw the whole body).
        match message[HEADER_LEN + 2] {
            0 => {}
            // A BoRR or an EoRR is exactly AFI, subtype, SAFI.
            1 | 2 if message.len() == REFRESH_LEN => {}
            1 | 2 => return Inbound::BadRefresh(invalid_refresh(message)),
            _ => return Inbound::Ignored,
        }
    }
    match decode_message(&mut message.clone(), max_len) {
        Ok(m) => Inbound::Message(m),
        // ORF entries (RFC 5291, never negotiated: this speaker offers no
        // ORF capability) whose lengths run past the message.
        Err(_) if refresh => Inbound::BadRefresh(invalid_refresh(message)),
        Err(e) => Inbound::Malformed(e),
    }
}

/// Most of a message a NOTIFICATION carries: the NOTIFICATION itself must
/// fit in 4096 bytes (RFC 8654 §5 lets its data be cut short).
const MAX_DATA: usize = 4096 - HEADER_LEN - 2;

fn invalid_refresh(mut message: Bytes) -> NotificationMessage {
    message.truncate(MAX_DATA);
    NotificationMessage::new(
        NotificationCode::RouteRefreshMessage,
        INVALID_MESSAGE_LENGTH,
        message,
    )
}
