//! The hand-off protocol between an old process and its successor, without
//! sockets: what each message says, how it is encoded, and what a receiver
//! must check. [`super::channel`] moves the bytes and the descriptors.
//!
//! One message per `SOCK_SEQPACKET` datagram, JSON-encoded (small, rare,
//! and readable in a packet dump). The old process (parent) sends one or more
//! [`ToSuccessor::Sockets`] messages, each carrying descriptors as
//! `SCM_RIGHTS`, then [`ToSuccessor::Done`]. The successor (child) answers
//! once: [`FromSuccessor::Ready`] when it serves, or
//! [`FromSuccessor::Failed`] when it gives up. The first message names the
//! protocol version; a successor that speaks another refuses with `Failed`.
//! After `Ready` the parent hands over what only one process may run at a
//! time, each once it has stopped it: its BGP sessions, one
//! [`ToSuccessor::BgpSession`] each (the connection's descriptor carried
//! beside it) then [`ToSuccessor::BgpDone`]; and, with `[replication]`,
//! [`ToSuccessor::Replication`] (so the two never run the same member on
//! the same sockets).
//!
//! A batch lists `(name, count)` pairs that say which of the datagram's
//! descriptors belong to which registry entry, in order; an entry may span
//! batches (the kernel passes at most [`MAX_FDS_PER_MESSAGE`] descriptors in
//! one datagram).

use serde::{Deserialize, Serialize};

use crate::bgp::handoff::HandedSession;

/// Bumped when a message changes meaning.
pub const PROTOCOL: u32 = 1;

/// Descriptors per datagram: the kernel's `SCM_MAX_FD` is 253.
pub const MAX_FDS_PER_MESSAGE: usize = 250;

/// Largest encoded message accepted, in bytes. Names are short; this bounds
/// what a receiver allocates for a message it has not checked yet.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Longest registry name.
pub const MAX_NAME_LEN: usize = 256;

/// Parent → successor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToSuccessor {
    /// Descriptors of the datagram, by entry: `entries[i] = (name, n)` means
    /// the next `n` descriptors belong to `name`.
    Sockets {
        protocol: u32,
        entries: Vec<(String, u32)>,
    },
    /// Every socket was sent.
    Done,
    /// After `Ready`, with `[replication]`: the parent stopped its
    /// replication member (without leaving the cluster); the successor runs
    /// it from now on, as the same member (`generation`, the SWIM identity's
    /// start time; `None`: the parent's replication was not running).
    Replication { generation: Option<u64> },
    /// After `Ready`: one established BGP session, its connection the one
    /// descriptor carried.
    BgpSession { session: HandedSession },
    /// After the `BgpSession`s: the parent's speaker has stopped (every
    /// session it had is handed over or closed).
    BgpDone,
    /// After `Ready`, with the mesh: the parent stopped its WireGuard
    /// device (it no longer reads the TUN device it handed over, and its
    /// UDP port is free); the successor starts its own on them.
    Mesh,
}

/// Successor → parent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromSuccessor {
    /// The successor serves on every socket it took: the parent may stop.
    Ready { pid: u32 },
    /// The successor will not serve; `reason` is for the operator.
    Failed { reason: String },
}

/// Why a received message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    #[error("message of {0} bytes is larger than {MAX_MESSAGE_BYTES}")]
    TooLarge(usize),
    #[error("undecodable message: {0}")]
    Decode(String),
    #[error("protocol version {got}, this binary speaks {PROTOCOL}")]
    Version { got: u32 },
    #[error("bad entry name {0:?}")]
    BadName(String),
    #[error("message lists {listed} descriptors but carried {carried}")]
    FdCount { listed: u64, carried: usize },
}

impl ToSuccessor {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("plain data always serializes")
    }

    /// Decodes a message that arrived with `fds` descriptors, checking the
    /// version, the names and that the counts add up.
    pub fn decode(bytes: &[u8], fds: usize) -> Result<ToSuccessor, WireError> {
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(WireError::TooLarge(bytes.len()));
        }
        let msg: ToSuccessor =
            serde_json::from_slice(bytes).map_err(|e| WireError::Decode(e.to_string()))?;
        let listed = match &msg {
            ToSuccessor::Sockets { protocol, entries } => {
                if *protocol != PROTOCOL {
                    return Err(WireError::Version { got: *protocol });
                }
                for (name, _) in entries {
                    if !valid_name(name) {
                        return Err(WireError::BadName(name.clone()));
                    }
                }
                entries.iter().map(|(_, n)| u64::from(*n)).sum()
            }
            ToSuccessor::BgpSession { .. } => 1,
            ToSuccessor::Done
            | ToSuccessor::Replication { .. }
            | ToSuccessor::BgpDone
            | ToSuccessor::Mesh => 0,
        };
        if listed != fds as u64 {
            return Err(WireError::FdCount {
                listed,
                carried: fds,
            });
        }
        Ok(msg)
    }
}

impl FromSuccessor {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("plain data always serializes")
    }

    /// Decodes an answer; answers carry no descriptors.
    pub fn decode(bytes: &[u8], fds: usize) -> Result<FromSuccessor, WireError> {
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(WireError::TooLarge(bytes.len()));
        }
        if fds != 0 {
            return Err(WireError::FdCount {
                listed: 0,
                carried: fds,
            });
        }
        serde_json::from_slice(bytes).map_err(|e| WireError::Decode(e.to_string()))
    }
}

/// Registry names: printable ASCII without spaces, 1..=[`MAX_NAME_LEN`]
/// bytes (`listener:<name>`, `api`, `dns-udp`, ...).
pub fn valid_name(name: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_graphic())
}

/// Splits `entries` (name, descriptor count) into datagrams of at most
/// [`MAX_FDS_PER_MESSAGE`] descriptors: for each datagram, the
/// `(name, count)` list and how many descriptors it carries. An entry with
/// no descriptors still travels, so the successor knows it exists.
pub fn batches(entries: &[(String, usize)]) -> Vec<Vec<(String, u32)>> {
    let mut out = vec![Vec::new()];
    let mut in_current = 0;
    for (name, count) in entries {
        let mut left = *count;
        loop {
            let room = MAX_FDS_PER_MESSAGE - in_current;
            if room == 0 {
                out.push(Vec::new());
                in_current = 0;
                continue;
            }
            let take = left.min(room);
            out.last_mut()
                .expect("never empty")
                .push((name.clone(), take as u32));
            in_current += take;
            left -= take;
            if left == 0 {
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let m = ToSuccessor::Sockets {
            protocol: PROTOCOL,
            entries: vec![("listener:web".into(), 2), ("api".into(), 1)],
        };
        assert_eq!(ToSuccessor::decode(&m.encode(), 3).unwrap(), m);
        assert_eq!(
            ToSuccessor::decode(&ToSuccessor::Done.encode(), 0).unwrap(),
            ToSuccessor::Done
        );
        for generation in [Some(1_796_272_627_165), None] {
            let m = ToSuccessor::Replication { generation };
            assert_eq!(ToSuccessor::decode(&m.encode(), 0).unwrap(), m);
            // It carries no descriptors.
            assert!(ToSuccessor::decode(&m.encode(), 1).is_err());
        }
        let m = ToSuccessor::Mesh;
        assert_eq!(ToSuccessor::decode(&m.encode(), 0).unwrap(), m);
        assert!(ToSuccessor::decode(&m.encode(), 1).is_err());
        for m in [
            FromSuccessor::Ready { pid: 42 },
            FromSuccessor::Failed {
                reason: "bad config".into(),
            },
        ] {
            assert_eq!(FromSuccessor::decode(&m.encode(), 0).unwrap(), m);
        }
    }

    #[test]
    fn a_count_that_does_not_match_the_descriptors_is_refused() {
        let m = ToSuccessor::Sockets {
            protocol: PROTOCOL,
            entries: vec![("api".into(), 1)],
        };
        assert_eq!(
            ToSuccessor::decode(&m.encode(), 0),
            Err(WireError::FdCount {
                listed: 1,
                carried: 0
            })
        );
        // u32::MAX twice must not overflow the sum.
        let m = ToSuccessor::Sockets {
            protocol: PROTOCOL,
            entries: vec![("a".into(), u32::MAX), ("b".into(), u32::MAX)],
        };
        assert!(matches!(
            ToSuccessor::decode(&m.encode(), 2),
            Err(WireError::FdCount { .. })
        ));
        assert!(matches!(
            FromSuccessor::decode(&FromSuccessor::Ready { pid: 1 }.encode(), 1),
            Err(WireError::FdCount { .. })
        ));
    }

    #[test]
    fn another_protocol_version_and_bad_names_are_refused() {
        let m = ToSuccessor::Sockets {
            protocol: PROTOCOL + 1,
            entries: vec![],
        };
        assert_eq!(
            ToSuccessor::decode(&m.encode(), 0),
            Err(WireError::Version { got: PROTOCOL + 1 })
        );
        for bad in ["", "has space", &"x".repeat(MAX_NAME_LEN + 1)] {
            let m = ToSuccessor::Sockets {
                protocol: PROTOCOL,
                entries: vec![(bad.to_string(), 0)],
            };
            assert!(
                matches!(
                    ToSuccessor::decode(&m.encode(), 0),
                    Err(WireError::BadName(_))
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            ToSuccessor::decode(b"{\"type\":\"launch\"}", 0),
            Err(WireError::Decode(_))
        ));
        assert!(matches!(
            ToSuccessor::decode(&vec![b' '; MAX_MESSAGE_BYTES + 1], 0),
            Err(WireError::TooLarge(_))
        ));
    }

    #[test]
    fn batches_respect_the_kernel_limit_and_keep_order() {
        let entries = vec![
            ("listener:a".to_string(), 200usize),
            ("listener:b".to_string(), 120),
            ("api".to_string(), 1),
            ("empty".to_string(), 0),
        ];
        let b = batches(&entries);
        assert_eq!(
            b,
            vec![
                vec![("listener:a".into(), 200), ("listener:b".into(), 50)],
                vec![
                    ("listener:b".into(), 70),
                    ("api".into(), 1),
                    ("empty".into(), 0)
                ],
            ]
        );
        for batch in &b {
            let n: u32 = batch.iter().map(|(_, n)| n).sum();
            assert!(n as usize <= MAX_FDS_PER_MESSAGE);
        }
        assert_eq!(batches(&[]), vec![Vec::<(String, u32)>::new()]);
    }
}
