//! Messages between nodes over the QUIC transport, and their encoding.
//!
//! Every message travels in an [`Envelope`] that names the sender's cluster,
//! schema version and node, so a receiver refuses a peer of another cluster
//! or schema before it looks at anything the message carries (never half
//! applied). Encoded with postcard (compact, serde); one message per QUIC
//! stream, at most [`MAX_MESSAGE_BYTES`].

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::version::{NodeId, RowKey, RowVersion, Stamp};

/// Version of this message set; part of every envelope. 2: `SyncVersions`
/// lists [`Stamp`]s (a version and its data's hash) and digests cover the
/// data, so that equal versions with different data converge. 3: row
/// versions and stamps carry their intent (deliberate writes win over
/// verdicts, see `version`).
pub const PROTOCOL: u16 = 3;

/// Largest encoded message accepted. Sync exchanges stay far below it (see
/// `node::limits`); it bounds what a broken or hostile peer can make us
/// buffer.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub cluster: String,
    pub schema: u32,
    pub protocol: u16,
    pub from: NodeId,
    /// Where the sender's transport can be reached (its advertised
    /// address), for replies.
    pub reply_to: SocketAddr,
    pub msg: Msg,
}

/// What nodes say to each other.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Msg {
    /// Rows that just changed (the broadcast path). `hops`: how many more
    /// times a receiver that learns something new from this forwards it.
    Changes { hops: u8, rows: Vec<RowVersion> },
    /// Anti-entropy, step 1 (initiator): my top digest and row count.
    SyncTop { session: u64, top: u64, rows: u64 },
    /// Step 2 (responder), when the digests match: nothing to do.
    SyncEqual { session: u64 },
    /// Step 2 (responder), when they differ: my bucket digests.
    SyncBuckets { session: u64, buckets: Vec<u64> },
    /// Step 3 (initiator): the versions I hold in the buckets that differ,
    /// each with its data's hash.
    /// `buckets` lists the buckets whose versions are all here; a bucket
    /// that did not fit is left for the next exchange.
    SyncVersions {
        session: u64,
        buckets: Vec<u16>,
        versions: Vec<(RowKey, Stamp)>,
    },
    /// Step 4 (responder): rows where mine are newer or you lack them, and
    /// the keys where yours are newer or I lack them. `more`: not everything
    /// fitted; sync again.
    SyncRows {
        session: u64,
        rows: Vec<RowVersion>,
        want: Vec<RowKey>,
        more: bool,
    },
    /// Step 5 (initiator): the rows asked for.
    SyncWanted { session: u64, rows: Vec<RowVersion> },
}

impl Msg {
    /// A label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Msg::Changes { .. } => "changes",
            Msg::SyncTop { .. } => "sync_top",
            Msg::SyncEqual { .. } => "sync_equal",
            Msg::SyncBuckets { .. } => "sync_buckets",
            Msg::SyncVersions { .. } => "sync_versions",
            Msg::SyncRows { .. } => "sync_rows",
            Msg::SyncWanted { .. } => "sync_wanted",
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    #[error("message of {0} bytes is over the {MAX_MESSAGE_BYTES}-byte limit")]
    TooBig(usize),
    #[error("undecodable message: {0}")]
    Decode(#[from] postcard::Error),
}

pub fn encode(envelope: &Envelope) -> Vec<u8> {
    postcard::to_allocvec(envelope).expect("encoding to a Vec cannot fail")
}

pub fn decode(bytes: &[u8]) -> Result<Envelope, WireError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(WireError::TooBig(bytes.len()));
    }
    Ok(postcard::from_bytes(bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::hlc::Hlc;
    use crate::replication::version::{Table, Version};
    use std::sync::Arc;

    #[test]
    fn envelopes_round_trip_and_garbage_is_an_error() {
        let env = Envelope {
            cluster: "edge".into(),
            schema: 3,
            protocol: PROTOCOL,
            from: Arc::from("gru"),
            reply_to: "10.0.0.1:4002".parse().unwrap(),
            msg: Msg::Changes {
                hops: 2,
                rows: vec![RowVersion {
                    key: RowKey::new(Table::Backends, "b1"),
                    version: Version {
                        hlc: Hlc::new(5, 1),
                        origin: Arc::from("gru"),
                    },
                    intent: Some(Version {
                        hlc: Hlc::new(4, 0),
                        origin: Arc::from("fra"),
                    }),
                    data: Some(r#"{"id":"b1"}"#.into()),
                }],
            },
        };
        let bytes = encode(&env);
        assert_eq!(decode(&bytes).unwrap(), env);
        assert!(decode(&bytes[..bytes.len() - 3]).is_err());
        assert!(decode(b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff").is_err());
        assert!(matches!(
            decode(&vec![0; MAX_MESSAGE_BYTES + 1]),
            Err(WireError::TooBig(_))
        ));
    }
}
