//! Mutual TLS for the QUIC transport, from the cluster secret alone.
//!
//! Every node derives the same certificate authority: its Ed25519 key comes
//! from the secret (HKDF, see `keys`), its name is fixed, so every node
//! builds an identical trust anchor without any file to distribute. Each node
//! then makes a fresh key pair at start and signs its own leaf certificate
//! with that CA. Both ends of every QUIC connection present their leaf and
//! verify the other's against the CA: only holders of the secret can produce
//! a certificate that verifies, and nothing is skipped (no "accept any
//! certificate" verifier anywhere).
//!
//! What this does not give: revocation (a leaked secret means a new secret
//! for the whole cluster) and per-node authorization (every secret holder is
//! trusted as any node). README states this threat model.

use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ED25519,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::keys::ClusterSecret;

/// The name every node's certificate carries and every client checks.
pub const SERVER_NAME: &str = "node.edgeproxy-cluster";
/// ALPN of the replication protocol: each message is an encoded envelope.
pub const ALPN: &[u8] = b"edgeproxy-replication/1";
/// The same, each message framed and large ones compressed (`frame`).
/// Offered and preferred first; a POP that knows only [`ALPN`] (not yet
/// upgraded) gets that.
pub const ALPN_FRAMED: &[u8] = b"edgeproxy-replication/2";
/// What this node offers and accepts, preferred first.
pub const ALPNS: &[&[u8]] = &[ALPN_FRAMED, ALPN];

/// Keep-alive on idle connections: a connection to each peer stays open, so
/// a change goes out without a handshake first (one round trip saved). A
/// ping every 10 s costs about 5 bytes/s per peer.
const KEEP_ALIVE: Duration = Duration::from_secs(10);
/// A peer silent this long (no packet, not even a keep-alive) is dropped.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    #[error("cannot build the cluster certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("cannot build the TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("cannot build the QUIC TLS configuration: {0}")]
    Quic(String),
}

/// This node's TLS identity in the cluster.
pub struct ClusterPki {
    ca: CertificateDer<'static>,
    /// The CA of a second secret whose holders are trusted too (a secret
    /// being rotated, `replication.accept_secret`).
    accepted_ca: Option<CertificateDer<'static>>,
    leaf: CertificateDer<'static>,
    leaf_key: PrivatePkcs8KeyDer<'static>,
}

/// PKCS#8 v1 (RFC 8410) of an Ed25519 private key: a fixed prefix, then the
/// 32-byte seed.
fn ed25519_pkcs8(seed: &[u8; 32]) -> Vec<u8> {
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend_from_slice(seed);
    der
}

fn ca_params() -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "edgeproxy cluster CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

/// The cluster CA `secret` derives: its certificate and key.
fn cluster_ca(secret: &ClusterSecret) -> Result<(rcgen::Certificate, KeyPair), PkiError> {
    let ca_der = ed25519_pkcs8(&secret.ca_seed());
    let ca_key =
        KeyPair::from_pkcs8_der_and_sign_algo(&PrivatePkcs8KeyDer::from(ca_der), &PKCS_ED25519)?;
    let ca_cert = ca_params()?.self_signed(&ca_key)?;
    Ok((ca_cert, ca_key))
}

impl ClusterPki {
    /// The cluster CA from `secret`, and a new leaf for `node_id` signed by it.
    pub fn new(secret: &ClusterSecret, node_id: &str) -> Result<ClusterPki, PkiError> {
        let (ca_cert, ca_key) = cluster_ca(secret)?;
        let issuer = Issuer::new(ca_params()?, ca_key);

        let leaf_key = KeyPair::generate_for(&PKCS_ED25519)?;
        let mut leaf = CertificateParams::new(vec![SERVER_NAME.to_string()])?;
        leaf.distinguished_name.push(DnType::CommonName, node_id);
        leaf.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let leaf_cert = leaf.signed_by(&leaf_key, &issuer)?;
        Ok(ClusterPki {
            ca: ca_cert.der().clone(),
            accepted_ca: None,
            leaf: leaf_cert.der().clone(),
            leaf_key: PrivatePkcs8KeyDer::from(leaf_key.serialize_der()),
        })
    }

    /// Also trusts the certificates of nodes holding `other` (this node's
    /// own certificate stays signed by its own secret's CA). Both CAs bear
    /// one name: the verifier tries each trust anchor of that name in turn.
    pub fn accepting(mut self, other: &ClusterSecret) -> Result<ClusterPki, PkiError> {
        self.accepted_ca = Some(cluster_ca(other)?.0.der().clone());
        Ok(self)
    }

    fn roots(&self) -> Result<Arc<rustls::RootCertStore>, PkiError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone())?;
        if let Some(accepted) = &self.accepted_ca {
            roots.add(accepted.clone())?;
        }
        Ok(Arc::new(roots))
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// TLS for accepting: our leaf, and a client certificate required and
    /// verified against the cluster CA.
    pub fn server_crypto(&self) -> Result<rustls::ServerConfig, PkiError> {
        self.server_crypto_speaking(ALPNS)
    }

    /// [`ClusterPki::server_crypto`] accepting only `alpns` (tests: a POP
    /// of an earlier version).
    pub(crate) fn server_crypto_speaking(
        &self,
        alpns: &[&[u8]],
    ) -> Result<rustls::ServerConfig, PkiError> {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            self.roots()?,
            Self::provider(),
        )
        .build()
        .map_err(|e| PkiError::Quic(e.to_string()))?;
        let mut config = rustls::ServerConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![self.leaf.clone()],
                PrivateKeyDer::Pkcs8(self.leaf_key.clone_key()),
            )?;
        config.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
        Ok(config)
    }

    /// TLS for connecting: the server verified against the cluster CA, our
    /// leaf as client certificate.
    pub fn client_crypto(&self) -> Result<rustls::ClientConfig, PkiError> {
        self.client_crypto_speaking(ALPNS)
    }

    pub(crate) fn client_crypto_speaking(
        &self,
        alpns: &[&[u8]],
    ) -> Result<rustls::ClientConfig, PkiError> {
        let mut config = rustls::ClientConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(
                vec![self.leaf.clone()],
                PrivateKeyDer::Pkcs8(self.leaf_key.clone_key()),
            )?;
        config.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
        Ok(config)
    }

    fn transport() -> Arc<quinn::TransportConfig> {
        let mut t = quinn::TransportConfig::default();
        t.keep_alive_interval(Some(KEEP_ALIVE));
        t.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(IDLE_TIMEOUT).expect("30 s is a valid idle timeout"),
        ));
        Arc::new(t)
    }

    pub fn quinn_server(&self) -> Result<quinn::ServerConfig, PkiError> {
        self.quinn_server_speaking(ALPNS)
    }

    pub(crate) fn quinn_server_speaking(
        &self,
        alpns: &[&[u8]],
    ) -> Result<quinn::ServerConfig, PkiError> {
        let crypto =
            quinn::crypto::rustls::QuicServerConfig::try_from(self.server_crypto_speaking(alpns)?)
                .map_err(|e| PkiError::Quic(e.to_string()))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(Self::transport());
        Ok(config)
    }

    pub fn quinn_client(&self) -> Result<quinn::ClientConfig, PkiError> {
        self.quinn_client_speaking(ALPNS)
    }

    pub(crate) fn quinn_client_speaking(
        &self,
        alpns: &[&[u8]],
    ) -> Result<quinn::ClientConfig, PkiError> {
        let crypto =
            quinn::crypto::rustls::QuicClientConfig::try_from(self.client_crypto_speaking(alpns)?)
                .map_err(|e| PkiError::Quic(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(Self::transport());
        Ok(config)
    }

    /// The CA certificate (the same on every node of the cluster).
    pub fn ca_der(&self) -> &[u8] {
        &self.ca
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a TLS handshake between two configs in memory; Ok if both
    /// sides accept.
    fn handshake(
        client: rustls::ClientConfig,
        server: rustls::ServerConfig,
    ) -> Result<(), rustls::Error> {
        let mut c = rustls::ClientConnection::new(
            Arc::new(client),
            rustls::pki_types::ServerName::try_from(SERVER_NAME).unwrap(),
        )?;
        let mut s = rustls::ServerConnection::new(Arc::new(server))?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            c.write_tls(&mut buf).unwrap();
            s.read_tls(&mut buf.as_slice()).unwrap();
            s.process_new_packets()?;
            let mut buf = Vec::new();
            s.write_tls(&mut buf).unwrap();
            c.read_tls(&mut buf.as_slice()).unwrap();
            c.process_new_packets()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                // The client's last flight (its certificate) must reach
                // the server too.
                let mut buf = Vec::new();
                c.write_tls(&mut buf).unwrap();
                s.read_tls(&mut buf.as_slice()).unwrap();
                s.process_new_packets()?;
                return Ok(());
            }
        }
        panic!("handshake did not finish");
    }

    #[test]
    fn every_node_derives_the_same_ca_from_the_secret() {
        let secret = ClusterSecret::new("a shared secret of some length");
        let a = ClusterPki::new(&secret, "a").unwrap();
        let b = ClusterPki::new(&secret, "b").unwrap();
        assert_eq!(a.ca_der(), b.ca_der());
        assert_ne!(a.leaf, b.leaf, "each node has its own leaf");
        let other = ClusterPki::new(&ClusterSecret::new("another secret, also long"), "a").unwrap();
        assert_ne!(a.ca_der(), other.ca_der());
    }

    #[test]
    fn nodes_with_the_secret_authenticate_each_other() {
        let secret = ClusterSecret::new("a shared secret of some length");
        let a = ClusterPki::new(&secret, "a").unwrap();
        let b = ClusterPki::new(&secret, "b").unwrap();
        handshake(a.client_crypto().unwrap(), b.server_crypto().unwrap()).unwrap();
    }

    #[test]
    fn a_node_without_the_secret_is_refused_both_ways() {
        let a =
            ClusterPki::new(&ClusterSecret::new("a shared secret of some length"), "a").unwrap();
        let x = ClusterPki::new(&ClusterSecret::new("a guessed secret, quite long"), "x").unwrap();
        // x as client: the server rejects x's certificate.
        let err = handshake(x.client_crypto().unwrap(), a.server_crypto().unwrap()).unwrap_err();
        assert!(format!("{err}").contains("certificate"), "{err}");
        // x as server: the client rejects x's certificate.
        let err = handshake(a.client_crypto().unwrap(), x.server_crypto().unwrap()).unwrap_err();
        assert!(format!("{err}").contains("certificate"), "{err}");
    }

    /// The three steps of a rotation from `old` to `new` without a
    /// partition: (1) sign with old, accept new; (2) sign with new, accept
    /// old; (3) new alone. Nodes one step apart (a rolling change of one
    /// step) authenticate each other both ways; nodes further apart do not,
    /// and a third secret is refused by a node at any step.
    #[test]
    fn nodes_one_rotation_step_apart_authenticate_each_other() {
        let old = ClusterSecret::new("the old secret, long enough");
        let new = ClusterSecret::new("the new secret, long enough");
        let step0 = ClusterPki::new(&old, "a").unwrap();
        let step1 = ClusterPki::new(&old, "b").unwrap().accepting(&new).unwrap();
        let step2 = ClusterPki::new(&new, "c").unwrap().accepting(&old).unwrap();
        let step3 = ClusterPki::new(&new, "d").unwrap();
        let both_ways = |x: &ClusterPki, y: &ClusterPki| {
            handshake(x.client_crypto().unwrap(), y.server_crypto().unwrap())
                .and_then(|()| handshake(y.client_crypto().unwrap(), x.server_crypto().unwrap()))
        };
        for (x, y, what) in [
            (&step0, &step1, "0 and 1"),
            (&step1, &step2, "1 and 2"),
            (&step2, &step3, "2 and 3"),
        ] {
            both_ways(x, y).unwrap_or_else(|e| panic!("steps {what}: {e}"));
        }
        for (x, y) in [(&step0, &step2), (&step1, &step3), (&step0, &step3)] {
            let err = both_ways(x, y).unwrap_err();
            assert!(format!("{err}").contains("certificate"), "{err}");
        }
        let stranger = ClusterPki::new(&ClusterSecret::new("a third secret, long"), "x").unwrap();
        for step in [&step1, &step2] {
            let err = both_ways(step, &stranger).unwrap_err();
            assert!(format!("{err}").contains("certificate"), "{err}");
        }
    }

    #[test]
    fn quinn_accepts_the_configurations() {
        let p =
            ClusterPki::new(&ClusterSecret::new("a shared secret of some length"), "a").unwrap();
        p.quinn_server().unwrap();
        p.quinn_client().unwrap();
    }
}
