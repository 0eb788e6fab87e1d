//! Keys derived from the cluster secret.
//!
//! One secret, shared by every POP of a cluster, authenticates both channels:
//! HKDF-SHA256 (RFC 5869) expands it into a ChaCha20-Poly1305 key for gossip
//! datagrams and into the seed of the cluster's certificate authority, which
//! signs each node's QUIC certificate (see `pki`). Different `info` labels
//! keep the two keys independent: knowing one says nothing about the other.

use ring::hkdf;

/// The HKDF salt: a fixed, versioned label. Changing it changes every key,
/// so it is part of the protocol.
const SALT: &[u8] = b"edgeproxy replication v1";
const GOSSIP_INFO: &[u8] = b"gossip datagrams: chacha20-poly1305";
const CA_INFO: &[u8] = b"cluster certificate authority: ed25519 seed";

/// The secret the operator gave (`replication.secret` or `secret_file`),
/// or, with `insecure = true`, a well-known stand-in. Its `Debug` hides it.
#[derive(Clone)]
pub struct ClusterSecret(Vec<u8>);

impl ClusterSecret {
    pub fn new(bytes: impl Into<Vec<u8>>) -> ClusterSecret {
        ClusterSecret(bytes.into())
    }

    /// The stand-in for `insecure = true`: anyone can compute it, so it
    /// authenticates nothing; it only lets the same code run.
    pub fn insecure(cluster: &str) -> ClusterSecret {
        ClusterSecret(format!("edgeproxy insecure cluster {cluster}").into_bytes())
    }

    /// Key for gossip datagrams.
    pub fn gossip_key(&self) -> [u8; 32] {
        self.expand(GOSSIP_INFO)
    }

    /// Seed of the cluster CA's Ed25519 key.
    pub fn ca_seed(&self) -> [u8; 32] {
        self.expand(CA_INFO)
    }

    /// 32 bytes for `info`: independent of every other label's (the 6PN
    /// global ID is derived this way, see `crate::mesh::addressing`).
    pub fn expand(&self, info: &[u8]) -> [u8; 32] {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, SALT).extract(&self.0);
        let mut out = [0u8; 32];
        prk.expand(&[info], Len32)
            .and_then(|okm| okm.fill(&mut out))
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        out
    }
}

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(<redacted>)")
    }
}

struct Len32;

impl hkdf::KeyType for Len32 {
    fn len(&self) -> usize {
        32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_depend_on_the_secret_and_are_independent() {
        let a = ClusterSecret::new("correct horse battery staple");
        let b = ClusterSecret::new("correct horse battery stapler");
        assert_eq!(a.gossip_key(), a.clone().gossip_key(), "deterministic");
        assert_ne!(a.gossip_key(), b.gossip_key());
        assert_ne!(a.ca_seed(), b.ca_seed());
        assert_ne!(a.gossip_key(), a.ca_seed());
        assert!(!format!("{a:?}").contains("horse"));
    }
}
