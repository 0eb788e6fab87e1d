//! What can still be read of a query that does not decode as a whole: its
//! question and whether it carried an OPT record.
//!
//! A FORMERR must say what it can. RFC 6891 §7: a responder includes an OPT
//! record in its response when the request had one; a FORMERR *without* one
//! is how a server that does not speak EDNS answers, and a resolver that sees
//! it may stop sending EDNS to this server (smaller UDP replies, no ECS). The
//! common cause here is one bad option value (an ECS option with an unknown
//! family or a prefix longer than its address, RFC 7871 §7.1.1), which makes
//! hickory reject the whole message. The question is echoed when it reads,
//! as Knot and BIND do.
//!
//! [`find_opt`] is the raw walk to the OPT record, also used on queries that
//! do decode: hickory drops what it does not read of an option (see
//! [`crate::ecs`]).

use hickory_proto::op::{Edns, Query};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};

/// The readable parts of an undecodable query.
#[derive(Debug, Default)]
pub struct Salvaged {
    /// The question, when the header counts exactly one and it reads.
    pub question: Option<Query>,
    /// An OPT record's payload size and DO bit, when the additional section
    /// holds one (its options are not read: they may be what is malformed).
    pub edns: Option<Edns>,
}

/// OPT's record type (RFC 6891 §6.1.1).
const OPT: u16 = 41;
/// The DO bit in the OPT record's TTL field (RFC 3225).
const DNSSEC_OK: u32 = 0x8000;

/// Reads what it can of `query` (a message of at least 12 bytes). Never
/// fails; whatever does not read is left out.
pub fn salvage(query: &[u8]) -> Salvaged {
    let mut found = Salvaged::default();
    if query.len() < 12 {
        return found;
    }
    let qd = u16::from_be_bytes([query[4], query[5]]);
    if qd == 1 {
        let mut decoder = BinDecoder::new(query);
        if decoder.read_slice(12).is_ok() {
            found.question = Query::read(&mut decoder).ok();
        }
    }
    if let Some(opt) = find_opt(query) {
        let mut edns = Edns::new();
        edns.set_max_payload(opt.class);
        edns.set_version(((opt.ttl >> 16) & 0xff) as u8);
        edns.set_dnssec_ok(opt.ttl & DNSSEC_OK != 0);
        found.edns = Some(edns);
    }
    found
}

/// The first OPT record of a message's additional section, as raw fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawOpt<'a> {
    /// The CLASS field: the requestor's UDP payload size.
    pub class: u16,
    /// The TTL field: extended RCODE, version, DO bit.
    pub ttl: u32,
    /// The RDATA: the options, as sent. `None` when RDLENGTH runs past the
    /// message.
    pub rdata: Option<&'a [u8]>,
}

/// Finds the first OPT record in the additional section of `message` by
/// walking the records' raw framing (no decoding of their contents), or
/// `None` when there is none or the framing before it does not read.
pub fn find_opt(message: &[u8]) -> Option<RawOpt<'_>> {
    let count = |at: usize| {
        message
            .get(at..at + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
    };
    let (qd, an, ns, ar) = (count(4)?, count(6)?, count(8)?, count(10)?);
    let mut at = 12;
    for _ in 0..qd {
        at = skip_name(message, at)?.checked_add(4)?;
    }
    for index in 0..an + ns + ar {
        let fixed = skip_name(message, at)?;
        let header = message.get(fixed..fixed + 10)?;
        let rtype = u16::from_be_bytes([header[0], header[1]]);
        let class = u16::from_be_bytes([header[2], header[3]]);
        let ttl = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
        let rdlength = u16::from_be_bytes([header[8], header[9]]) as usize;
        let start = fixed + 10;
        if index >= an + ns && rtype == OPT {
            let rdata = message.get(start..start + rdlength);
            return Some(RawOpt { class, ttl, rdata });
        }
        at = start + rdlength;
    }
    None
}

/// The offset just past the name starting at `at`, or `None` when it runs
/// past the message or holds a label type other than a length or a pointer.
fn skip_name(message: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *message.get(at)?;
        match len & 0xc0 {
            0x00 if len == 0 => return Some(at + 1),
            0x00 => at += 1 + len as usize,
            // A compression pointer ends the name where it stands.
            0xc0 => return (at + 2 <= message.len()).then_some(at + 2),
            _ => return None,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use hickory_proto::op::{Message, MessageType, OpCode};
    use hickory_proto::rr::{Name, RecordType};

    /// A query for `web.internal. A` with an OPT record (payload 1232, DO
    /// set) whose one option is `option`, as raw bytes (also what the ECS
    /// tests send).
    pub(crate) fn query_with_option(option: &[u8]) -> Vec<u8> {
        let mut msg = Message::new(7, MessageType::Query, OpCode::Query);
        msg.add_query(Query::query(
            Name::from_ascii("web.internal.").unwrap(),
            RecordType::A,
        ));
        let mut bytes = msg.to_vec().unwrap();
        bytes[11] = 1; // ARCOUNT
        bytes.push(0); // root owner
        bytes.extend_from_slice(&OPT.to_be_bytes());
        bytes.extend_from_slice(&1232u16.to_be_bytes());
        bytes.extend_from_slice(&DNSSEC_OK.to_be_bytes());
        bytes.extend_from_slice(&(option.len() as u16).to_be_bytes());
        bytes.extend_from_slice(option);
        bytes
    }

    /// ECS (option 8) with family 3, which RFC 7871 does not define.
    const ECS_UNKNOWN_FAMILY: [u8; 8] = [0, 8, 0, 4, 0, 3, 24, 0];

    #[test]
    fn a_query_with_an_undecodable_option_keeps_its_question_and_opt() {
        let query = query_with_option(&ECS_UNKNOWN_FAMILY);
        assert!(
            Message::from_vec(&query).is_err(),
            "the option must be what hickory refuses"
        );
        let found = salvage(&query);
        let question = found.question.expect("question");
        assert_eq!(question.name().to_ascii(), "web.internal.");
        assert_eq!(question.query_type(), RecordType::A);
        let edns = found.edns.expect("OPT");
        assert_eq!(edns.max_payload(), 1232);
        assert!(edns.flags().dnssec_ok);
    }

    #[test]
    fn a_query_without_opt_salvages_none() {
        let mut msg = Message::new(7, MessageType::Query, OpCode::Query);
        msg.add_query(Query::query(Name::root(), RecordType::NS));
        let found = salvage(&msg.to_vec().unwrap());
        assert!(found.question.is_some());
        assert!(found.edns.is_none());
    }

    #[test]
    fn truncated_or_looping_messages_salvage_what_reads_and_never_panic() {
        let query = query_with_option(&ECS_UNKNOWN_FAMILY);
        for cut in 0..query.len() {
            let _ = salvage(&query[..cut]);
        }
        // A question whose name points at itself: no question, no OPT.
        let mut looping = query[..12].to_vec();
        looping.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        let found = salvage(&looping);
        assert!(found.question.is_none());
        assert!(found.edns.is_none());
        // Counts far beyond the bytes: stops at the end.
        let mut claims = query.clone();
        claims[6..12].copy_from_slice(&[0xff; 6]);
        assert!(salvage(&claims).edns.is_none());
    }
}
