//! TLS termination settings: certificate choice by SNI and the rustls server
//! configuration a TLS listener uses.
//!
//! A listener holds a [`TlsTermination`]: the current `ServerConfig` behind an
//! `ArcSwap`. Rotating certificates swaps in a new config; each handshake
//! loads the config once, so sessions already established keep theirs and new
//! handshakes use the new certificates — no connection is dropped.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

/// A certificate and the names it serves.
#[derive(Debug, Clone)]
pub struct CertEntry {
    /// DNS names, lower case; `*.example.com` matches one label.
    pub names: Vec<String>,
    pub key: Arc<CertifiedKey>,
}

/// Picks a certificate by the client's SNI name: an exact name first, then a
/// wildcard for the parent domain, then the default.
#[derive(Debug)]
pub struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the part after `*.`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl SniResolver {
    /// Later entries do not replace a name claimed by an earlier one.
    pub fn new(default: Arc<CertifiedKey>, entries: &[CertEntry]) -> Self {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for entry in entries {
            for name in &entry.names {
                let name = name.trim_end_matches('.').to_ascii_lowercase();
                match name.strip_prefix("*.") {
                    Some(parent) => wildcard
                        .entry(parent.to_string())
                        .or_insert_with(|| Arc::clone(&entry.key)),
                    None => exact.entry(name).or_insert_with(|| Arc::clone(&entry.key)),
                };
            }
        }
        SniResolver {
            exact,
            wildcard,
            default,
        }
    }

    pub fn choose(&self, sni: Option<&str>) -> &Arc<CertifiedKey> {
        let Some(name) = sni else {
            return &self.default;
        };
        let name = name.trim_end_matches('.');
        // SNI names are ASCII (IDNs arrive as punycode); compare without
        // allocating when the client already sent lower case.
        let lower;
        let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = name.to_ascii_lowercase();
            lower.as_str()
        } else {
            name
        };
        if let Some(key) = self.exact.get(name) {
            return key;
        }
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(key) = self.wildcard.get(parent) {
                return key;
            }
        }
        &self.default
    }
}

thread_local! {
    /// The server name of the last ClientHello this thread's resolver saw.
    /// rustls's unbuffered connection, which the shards drive, does not keep
    /// it; a shard runs one connection's TLS processing at a time and never
    /// across an await, so the session takes it right after the call that
    /// ran the resolver ([`take_resolved_sni`]).
    static RESOLVED_SNI: std::cell::Cell<Option<String>> = const { std::cell::Cell::new(None) };
}

/// The server name the resolver last saw on this thread, if any (and
/// forgets it).
pub(crate) fn take_resolved_sni() -> Option<String> {
    RESOLVED_SNI.try_with(std::cell::Cell::take).ok().flatten()
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let _ = RESOLVED_SNI.try_with(|sni| sni.set(hello.server_name().map(str::to_owned)));
        Some(Arc::clone(self.choose(hello.server_name())))
    }
}

/// A rustls server config for TLS 1.3 and 1.2 only, with the ring provider.
pub fn server_config(
    resolver: SniResolver,
    alpn: Vec<Vec<u8>>,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = alpn;
    Ok(Arc::new(config))
}

/// What a TLS listener needs at accept time.
#[derive(Debug, Clone)]
pub struct TlsTermination {
    config: Arc<ArcSwap<ServerConfig>>,
    /// A handshake not done by then is abandoned (slowloris guard).
    pub handshake_timeout: Duration,
}

impl TlsTermination {
    pub fn new(config: Arc<ServerConfig>, handshake_timeout: Duration) -> Self {
        TlsTermination {
            config: Arc::new(ArcSwap::new(config)),
            handshake_timeout,
        }
    }

    /// New handshakes use `config` from now on.
    pub fn rotate(&self, config: Arc<ServerConfig>) {
        self.config.store(config);
    }

    pub fn current(&self) -> Arc<ServerConfig> {
        self.config.load_full()
    }
}

/// Two terminations are the same when they share the swappable config.
impl PartialEq for TlsTermination {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.config, &other.config)
            && self.handshake_timeout == other.handshake_timeout
    }
}

impl Eq for TlsTermination {}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

    fn key_for(name: &str) -> Arc<CertifiedKey> {
        // A distinct certificate per name; the bytes only need to differ.
        let provider = rustls::crypto::ring::default_provider();
        let signing = provider
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                TEST_KEY_PKCS8.to_vec(),
            )))
            .unwrap();
        Arc::new(CertifiedKey::new(
            vec![CertificateDer::from(name.as_bytes().to_vec())],
            signing,
        ))
    }

    /// A P-256 PKCS#8 key, test-only (`openssl genpkey -algorithm EC
    /// -pkeyopt ec_paramgen_curve:P-256`, then `openssl pkcs8 -topk8 -nocrypt
    /// -outform DER`).
    const TEST_KEY_PKCS8: &[u8] = include_bytes!("../tests/data/test-key.p8");

    fn served(r: &SniResolver, sni: Option<&str>) -> Vec<u8> {
        r.choose(sni).cert[0].to_vec()
    }

    #[test]
    fn sni_picks_exact_then_wildcard_then_default() {
        let r = SniResolver::new(
            key_for("default"),
            &[
                CertEntry {
                    names: vec!["api.example.com".into()],
                    key: key_for("api"),
                },
                CertEntry {
                    names: vec!["*.example.com".into(), "Example.org".into()],
                    key: key_for("wild"),
                },
            ],
        );
        assert_eq!(served(&r, Some("api.example.com")), b"api");
        assert_eq!(served(&r, Some("API.Example.COM.")), b"api");
        assert_eq!(served(&r, Some("www.example.com")), b"wild");
        assert_eq!(served(&r, Some("example.org")), b"wild");
        // A wildcard covers one label only.
        assert_eq!(served(&r, Some("a.b.example.com")), b"default");
        assert_eq!(served(&r, Some("example.com")), b"default");
        assert_eq!(served(&r, None), b"default");
    }

    #[test]
    fn first_entry_keeps_a_name_claimed_twice() {
        let r = SniResolver::new(
            key_for("default"),
            &[
                CertEntry {
                    names: vec!["x.test".into()],
                    key: key_for("first"),
                },
                CertEntry {
                    names: vec!["x.test".into()],
                    key: key_for("second"),
                },
            ],
        );
        assert_eq!(served(&r, Some("x.test")), b"first");
    }
}
