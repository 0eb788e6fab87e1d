//! The TLS certificate every proxy target serves in scenario (f), and how
//! edgeproxy's config names it. Apart from the scenario (`crate::tls`) so
//! that the targets, which write their configs with it, need nothing of the
//! scenario.

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The certificate every proxy serves, and a client that trusts it.
#[derive(Debug)]
pub struct TlsMaterial {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Certificate and key in one file (HAProxy's `crt`).
    pub combined: PathBuf,
    pub client: Arc<rustls::ClientConfig>,
}

impl TlsMaterial {
    pub fn generate(dir: &Path) -> anyhow::Result<TlsMaterial> {
        std::fs::create_dir_all(dir)?;
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
        let (cert_pem, key_pem) = (ck.cert.pem(), ck.signing_key.serialize_pem());
        let (cert, key, combined) = (
            dir.join("cert.pem"),
            dir.join("key.pem"),
            dir.join("combined.pem"),
        );
        std::fs::write(&cert, &cert_pem)?;
        std::fs::write(&key, &key_pem)?;
        std::fs::write(&combined, format!("{cert_pem}{key_pem}"))?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ck.cert.der().clone())?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        // Every connection pays a full handshake.
        client.resumption = rustls::client::Resumption::disabled();
        Ok(TlsMaterial {
            cert,
            key,
            combined,
            client: Arc::new(client),
        })
    }
}

/// A listener with TLS terminated by edgeproxy, as its config spells it.
pub fn edgeproxy_listener(name: &str, app: &str, m: &TlsMaterial) -> String {
    format!(
        "\n[[listener]]\nname = \"{name}\"\naddr = \"127.0.0.1:0\"\napp = \"{app}\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n",
        m.cert.display(),
        m.key.display()
    )
}
