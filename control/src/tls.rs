//! TLS listeners on the control side: the `tls` table of a `[[listener]]`,
//! loading certificates (PEM files or a generated self-signed one), and
//! rotating them when their files change or on SIGHUP.
//!
//! A certificate that fails to load at start is a startup error. At rotation a
//! broken file keeps the old certificate and logs why; connections already
//! established are never touched (see `engine::tls`).
//!
//! An expired certificate loads, but is only served where there is nothing
//! to keep: at a start that is not an upgrade, or on a listener new to this
//! process, with a warning. Where certificates already serve (rotation,
//! SIGHUP, and the previous process during a binary upgrade) it is refused
//! like a broken file, so a wrong file renamed into place cannot replace a
//! valid certificate with one every client rejects. At an upgrade, a
//! certificate file the previous process itself serves expired (it had no
//! other at its start) replaces nothing valid: it is served with the
//! warning, so an expired certificate never blocks a binary upgrade (the
//! previous process says which, [`PREDECESSOR_EXPIRED_VAR`]).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use engine::tls::{CertEntry, SniResolver, TlsTermination};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use crate::config_env::ConfigError;

/// `[listener.tls]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// PEM certificate chain of the default certificate.
    pub cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of the default certificate.
    pub key: Option<PathBuf>,
    /// Generate a self-signed default certificate at start.
    pub self_signed: Option<bool>,
    /// Names in the self-signed certificate (default: localhost).
    pub self_signed_names: Option<Vec<String>>,
    /// Further certificates, chosen by SNI.
    #[serde(default)]
    pub sni: Vec<RawSniCert>,
    pub alpn: Option<Vec<String>>,
    pub handshake_timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSniCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Names served; default: the certificate's DNS subject alternative names.
    pub names: Option<Vec<String>>,
}

/// Validated TLS settings of one listener. Serializes with the keys of
/// `[listener.tls]`, so `check-config` prints a table that reads back.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TlsSettings {
    #[serde(flatten)]
    pub default: CertSource,
    pub sni: Vec<SniCert>,
    pub alpn: Vec<String>,
    #[serde(rename = "handshake_timeout_ms", serialize_with = "ser_ms")]
    pub handshake_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub enum CertSource {
    Files { cert: PathBuf, key: PathBuf },
    SelfSigned { self_signed_names: Vec<String> },
}

/// `cert` + `key`, or `self_signed = true` + `self_signed_names`.
impl Serialize for CertSource {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(2))?;
        match self {
            CertSource::Files { cert, key } => {
                map.serialize_entry("cert", cert)?;
                map.serialize_entry("key", key)?;
            }
            CertSource::SelfSigned { self_signed_names } => {
                map.serialize_entry("self_signed", &true)?;
                map.serialize_entry("self_signed_names", self_signed_names)?;
            }
        }
        map.end()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SniCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub names: Option<Vec<String>>,
}

fn ser_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

pub const DEFAULT_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// The original edgeProxy's TLS port.
pub const DEFAULT_TLS_LISTEN_ADDR: &str = "0.0.0.0:8443";

impl RawTls {
    /// Validates; `key` names the table in errors (`listener[1].tls`).
    pub fn validate(self, key: &str) -> Result<TlsSettings, ConfigError> {
        let invalid = |k: &str, reason: String| ConfigError::Invalid {
            key: format!("{key}.{k}"),
            reason,
        };
        let self_signed = self.self_signed.unwrap_or(false);
        if self.self_signed_names.is_some() && !self_signed {
            // QA: taken and ignored next to cert and key.
            return Err(invalid(
                "self_signed_names",
                "is set but self_signed is not: the names are those of a generated certificate"
                    .into(),
            ));
        }
        let default = match (self.cert, self.key, self_signed) {
            (Some(cert), Some(key), false) => CertSource::Files { cert, key },
            (None, None, true) => CertSource::SelfSigned {
                self_signed_names: match self.self_signed_names {
                    None => vec!["localhost".into()],
                    Some(names) => {
                        check_names(&names).map_err(|r| invalid("self_signed_names", r))?;
                        names
                    }
                },
            },
            (Some(_), Some(_), true) => {
                return Err(invalid(
                    "self_signed",
                    "set either cert and key, or self_signed = true, not both".into(),
                ))
            }
            (Some(_), None, _) => return Err(invalid("key", "cert is set but key is not".into())),
            (None, Some(_), _) => return Err(invalid("cert", "key is set but cert is not".into())),
            (None, None, false) => {
                return Err(invalid(
                    "cert",
                    "a TLS listener needs cert and key, or self_signed = true".into(),
                ))
            }
        };
        for (i, sni) in self.sni.iter().enumerate() {
            if let Some(names) = &sni.names {
                check_names(names).map_err(|r| invalid(&format!("sni[{i}].names"), r))?;
            }
        }
        let alpn = self.alpn.unwrap_or_default();
        if let Some(bad) = alpn.iter().find(|p| p.is_empty() || p.len() > 255) {
            return Err(invalid("alpn", format!("{bad:?} must be 1..=255 bytes")));
        }
        let ms = self
            .handshake_timeout_ms
            .unwrap_or(DEFAULT_HANDSHAKE_TIMEOUT_MS);
        if !(1..=600_000).contains(&ms) {
            return Err(invalid(
                "handshake_timeout_ms",
                "must be between 1 ms and 10 minutes".into(),
            ));
        }
        Ok(TlsSettings {
            default,
            sni: self
                .sni
                .into_iter()
                .map(|s| SniCert {
                    cert: s.cert,
                    key: s.key,
                    names: s.names,
                })
                .collect(),
            alpn,
            handshake_timeout: Duration::from_millis(ms),
        })
    }
}

/// Names a certificate serves, as the SNI resolver matches them: a DNS
/// name, or `*.` and one (`*.example.com`); a trailing dot is ignored.
/// QA: `[]`, `""`, `"a b"` and `"*.*.com"` were taken, names no client can
/// send (an SNI entry with them is never chosen).
fn check_names(names: &[String]) -> Result<(), String> {
    if names.is_empty() {
        return Err("is empty: the certificate would serve no name \
                    (leave `names` out for the certificate's own DNS names)"
            .into());
    }
    for name in names {
        let name = name.trim_end_matches('.');
        let host = name.strip_prefix("*.").unwrap_or(name);
        let label_ok = |l: &str| {
            (1..=63).contains(&l.len())
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
        };
        if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
            return Err(format!(
                "{name:?} is not a DNS name (labels of letters, digits, - or _) \
                 or a wildcard (*.example.com)"
            ));
        }
    }
    Ok(())
}

/// Why certificates could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsLoadError {
    #[error("cannot read certificate {path}: {reason}")]
    Cert { path: PathBuf, reason: String },
    #[error("cannot read private key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("key {key} does not match certificate {cert}: {reason}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("certificate {path} expired on {not_after}")]
    Expired { path: PathBuf, not_after: String },
    #[error("cannot generate a self-signed certificate: {0}")]
    SelfSigned(String),
    // Not `#[from]`: that would make the rustls error a `source` as well,
    // printed twice by `{:#}` chains.
    #[error("invalid TLS configuration: {0}")]
    Config(rustls::Error),
}

impl From<rustls::Error> for TlsLoadError {
    fn from(e: rustls::Error) -> Self {
        TlsLoadError::Config(e)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads a PEM chain and key and checks they belong together.
pub fn load_pair(
    cert: &Path,
    key: &Path,
) -> Result<(Arc<CertifiedKey>, Vec<String>), TlsLoadError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsLoadError::Cert {
            path: cert.to_owned(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsLoadError::Cert {
            path: cert.to_owned(),
            reason: "no CERTIFICATE block in the file".into(),
        });
    }
    let names = dns_names(&chain[0]).map_err(|reason| TlsLoadError::Cert {
        path: cert.to_owned(),
        reason,
    })?;
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsLoadError::Key {
        path: key.to_owned(),
        reason: key_reason(key, e),
    })?;
    let certified = CertifiedKey::from_der(chain, private, &provider()).map_err(|e| {
        TlsLoadError::Mismatch {
            cert: cert.to_owned(),
            key: key.to_owned(),
            reason: e.to_string(),
        }
    })?;
    Ok((Arc::new(certified), names))
}

/// Why a key file gave no key, in an operator's words: the PEM reader's
/// "no items found" said nothing of the usual cause, a key encrypted with a
/// passphrase.
fn key_reason(path: &Path, e: rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error;
    if matches!(e, Error::Io(_)) {
        return e.to_string();
    }
    let text = std::fs::read(path).unwrap_or_default();
    let has = |needle: &[u8]| text.windows(needle.len()).any(|w| w == needle);
    // PKCS#8 (`ENCRYPTED PRIVATE KEY`) or OpenSSL's traditional format
    // (headers inside the block, which the reader fails to decode).
    if has(b"ENCRYPTED PRIVATE KEY") || has(b"Proc-Type: 4,ENCRYPTED") {
        "the key is encrypted (passphrase-protected), which edgeproxy cannot read: \
         store it decrypted (openssl pkey -in KEY -out PLAIN), readable by edgeproxy only"
            .into()
    } else if matches!(e, Error::NoItemsFound) {
        "no private key in the file (a PEM block BEGIN PRIVATE KEY, RSA PRIVATE KEY \
         or EC PRIVATE KEY)"
            .into()
    } else {
        e.to_string()
    }
}

/// DNS names of a certificate: its subject alternative names, else its CN.
fn dns_names(cert: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    use x509_parser::extensions::GeneralName;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(n) = name {
                names.push(n.to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        if let Some(cn) = parsed
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
        {
            names.push(cn.to_ascii_lowercase());
        }
    }
    Ok(names)
}

/// Organization of generated certificates: what an operator inspecting one
/// (`openssl s_client`, a browser) sees issued it.
pub const SELF_SIGNED_ORGANIZATION: &str = "edgeproxy";

/// A fresh self-signed certificate (the original's behaviour when TLS is on
/// and no certificate is given). Its subject is CN = the first of `names`,
/// O = [`SELF_SIGNED_ORGANIZATION`] (rcgen's default subject would say
/// "rcgen self signed cert"), its DNS SANs are `names`.
pub fn self_signed(names: &[String]) -> Result<Arc<CertifiedKey>, TlsLoadError> {
    let fail = |e: &dyn std::fmt::Display| TlsLoadError::SelfSigned(e.to_string());
    let mut params = rcgen::CertificateParams::new(names.to_vec()).map_err(|e| fail(&e))?;
    let mut subject = rcgen::DistinguishedName::new();
    if let Some(first) = names.first() {
        subject.push(rcgen::DnType::CommonName, first.as_str());
    }
    subject.push(rcgen::DnType::OrganizationName, SELF_SIGNED_ORGANIZATION);
    params.distinguished_name = subject;
    let signing_key = rcgen::KeyPair::generate().map_err(|e| fail(&e))?;
    let cert = params.self_signed(&signing_key).map_err(|e| fail(&e))?;
    let key = PrivateKeyDer::try_from(signing_key.serialize_der()).map_err(|e| fail(&e))?;
    let certified =
        CertifiedKey::from_der(vec![cert.der().clone()], key, &provider()).map_err(|e| fail(&e))?;
    Ok(Arc::new(certified))
}

/// The end of validity of the certificate in `key`.
fn not_after(key: &CertifiedKey) -> Option<x509_parser::time::ASN1Time> {
    let leaf = key.end_entity_cert().ok()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    Some(parsed.validity().not_after)
}

/// [`TlsLoadError::Expired`] if the certificate `key` was read from `path`
/// is past its end of validity.
fn expired(path: &Path, key: &CertifiedKey) -> Option<TlsLoadError> {
    let not_after = not_after(key)?;
    (not_after < x509_parser::time::ASN1Time::now()).then(|| TlsLoadError::Expired {
        path: path.to_owned(),
        not_after: not_after.to_string(),
    })
}

/// The variable a binary upgrade's successor is started with: what the
/// previous process serves ([`Predecessor`], JSON).
pub const PREDECESSOR_EXPIRED_VAR: &str = "EDGEPROXY_UPGRADE_TLS_EXPIRED";

/// The certificates the previous process of a binary upgrade serves, as it
/// told its successor.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Predecessor {
    /// Each of its TLS listeners, with the certificate files it serves
    /// that have expired. `None`: it did not say (a binary from before
    /// this): every certificate it serves is taken as valid.
    pub listeners: Option<BTreeMap<String, Vec<PathBuf>>>,
}

impl Predecessor {
    /// Reads (and removes, so that nothing this process starts sees it)
    /// [`PREDECESSOR_EXPIRED_VAR`]; unset or unreadable, the previous
    /// process's certificates are taken as valid.
    pub fn from_env() -> Predecessor {
        let value = std::env::var(PREDECESSOR_EXPIRED_VAR).ok();
        std::env::remove_var(PREDECESSOR_EXPIRED_VAR);
        value
            .and_then(|v| serde_json::from_str(&v).ok())
            .unwrap_or_default()
    }

    /// The value of [`PREDECESSOR_EXPIRED_VAR`] for a successor.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("plain data always serializes")
    }

    /// Whether the previous process served `listener` with TLS (`true`
    /// when it did not say).
    fn served(&self, listener: &str) -> bool {
        self.listeners
            .as_ref()
            .is_none_or(|l| l.contains_key(listener))
    }

    /// Whether the previous process serves a certificate on `listener`
    /// that a certificate loaded from `cert` would replace and that is
    /// valid: everything it serves, unless it said `cert` was expired
    /// there too, or it did not serve `listener` at all.
    fn served_valid(&self, listener: &str, cert: &Path) -> bool {
        match &self.listeners {
            None => true,
            Some(l) => l
                .get(listener)
                .is_some_and(|expired| !expired.iter().any(|p| p == cert)),
        }
    }
}

/// When one served certificate file stops being valid, for
/// `edgeproxy_tls_certificate_expiry_timestamp_seconds`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertExpiry {
    pub listener: String,
    /// The certificate file.
    pub cert: PathBuf,
    /// Its end of validity, seconds since the Unix epoch.
    pub not_after: i64,
}

/// Certificates served now and when each expires: shared with the metrics
/// endpoint, replaced whenever a listener's certificates load or rotate.
pub type ExpiryView = Arc<arc_swap::ArcSwap<Vec<CertExpiry>>>;

/// One listener's rustls server config as built from its settings.
pub struct Built {
    pub config: Arc<rustls::ServerConfig>,
    /// Certificates in it that have expired ([`TlsLoadError::Expired`]):
    /// the caller decides whether to serve them.
    pub stale: Vec<TlsLoadError>,
    /// Each certificate file's end of validity (Unix seconds); a
    /// generated self-signed certificate is left out.
    pub not_after: Vec<(PathBuf, i64)>,
}

/// Builds the rustls server config for one listener's settings.
pub fn build(settings: &TlsSettings) -> Result<Built, TlsLoadError> {
    let mut stale = Vec::new();
    let mut validity = Vec::new();
    let mut note = |path: &Path, key: &CertifiedKey| {
        stale.extend(expired(path, key));
        if let Some(at) = not_after(key) {
            validity.push((path.to_owned(), at.timestamp()));
        }
    };
    let default = match &settings.default {
        CertSource::Files { cert, key } => {
            let key = load_pair(cert, key)?.0;
            note(cert, &key);
            key
        }
        CertSource::SelfSigned { self_signed_names } => self_signed(self_signed_names)?,
    };
    let mut entries = Vec::with_capacity(settings.sni.len());
    for sni in &settings.sni {
        let (key, names) = load_pair(&sni.cert, &sni.key)?;
        note(&sni.cert, &key);
        entries.push(CertEntry {
            names: sni.names.clone().unwrap_or(names),
            key,
        });
    }
    let alpn = settings
        .alpn
        .iter()
        .map(|p| p.as_bytes().to_vec())
        .collect();
    let config = engine::tls::server_config(SniResolver::new(default, &entries), alpn)?;
    Ok(Built {
        config,
        stale,
        not_after: validity,
    })
}

/// Identity of a file at one moment; a change means "reload".
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp(Option<(SystemTime, u64, u64)>);

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    Stamp(std::fs::metadata(path).ok().map(|m| {
        (
            m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            m.len(),
            m.ino(),
        )
    }))
}

fn files(settings: &TlsSettings) -> Vec<PathBuf> {
    let mut files = Vec::new();
    if let CertSource::Files { cert, key } = &settings.default {
        files.push(cert.clone());
        files.push(key.clone());
    }
    for sni in &settings.sni {
        files.push(sni.cert.clone());
        files.push(sni.key.clone());
    }
    files
}

struct Entry {
    settings: TlsSettings,
    termination: TlsTermination,
    stamps: Vec<Stamp>,
    /// The served certificates' ends of validity (see [`Built::not_after`]).
    not_after: Vec<(PathBuf, i64)>,
}

/// The TLS state of every TLS listener, by listener name.
#[derive(Default)]
pub struct TlsListeners {
    entries: HashMap<String, Entry>,
    /// Expired certificates served for want of another (see the module
    /// docs), for `check-config` to print.
    warnings: Vec<String>,
    /// A successor of a binary upgrade, until [`TlsListeners::started`]:
    /// the previous process serves its listeners, so an expired certificate
    /// that would replace a valid one is refused (the upgrade fails, and
    /// that process keeps its certificates).
    successor: Option<Predecessor>,
    /// What the entries serve, published for the metrics endpoint.
    expiry: ExpiryView,
}

impl TlsListeners {
    /// The termination for `listener`: the existing one if its settings are
    /// unchanged, else a new one built from `settings`. An expired
    /// certificate is refused if the listener already serves certificates,
    /// else served with a warning.
    pub fn termination_for(
        &mut self,
        listener: &str,
        settings: &TlsSettings,
    ) -> Result<TlsTermination, TlsLoadError> {
        if let Some(entry) = self.entries.get(listener) {
            if entry.settings == *settings {
                return Ok(entry.termination.clone());
            }
        }
        let stamps = files(settings).iter().map(|p| stamp(p)).collect();
        let Built {
            config,
            mut stale,
            not_after,
        } = build(settings)?;
        let serves = self.entries.contains_key(listener);
        let predecessor = self.successor.as_ref();
        let replaces_valid = |e: &TlsLoadError| match e {
            TlsLoadError::Expired { path, .. } => {
                serves || predecessor.is_some_and(|p| p.served_valid(listener, path))
            }
            _ => true,
        };
        if let Some(i) = stale.iter().position(replaces_valid) {
            return Err(stale.swap_remove(i));
        } else {
            for e in stale {
                let why = match predecessor.is_some_and(|p| p.served(listener)) {
                    true => "serving an expired certificate (the previous process served it expired too): clients will refuse it",
                    false => "serving an expired certificate (no other to keep): clients will refuse it",
                };
                tracing::warn!(listener = %listener, error = %e, "{why}");
                self.warnings.push(format!(
                    "listener {listener:?}: {e}: clients will refuse it"
                ));
            }
        }
        let termination = TlsTermination::new(config, settings.handshake_timeout);
        self.entries.insert(
            listener.to_string(),
            Entry {
                settings: settings.clone(),
                termination: termination.clone(),
                stamps,
                not_after,
            },
        );
        self.publish_expiry();
        Ok(termination)
    }

    /// The certificates served and their ends of validity, kept current.
    pub fn expiry(&self) -> ExpiryView {
        Arc::clone(&self.expiry)
    }

    fn publish_expiry(&self) {
        let mut all: Vec<CertExpiry> = self
            .entries
            .iter()
            .flat_map(|(listener, e)| {
                e.not_after.iter().map(|(cert, at)| CertExpiry {
                    listener: listener.clone(),
                    cert: cert.clone(),
                    not_after: *at,
                })
            })
            .collect();
        all.sort_by(|a, b| (&a.listener, &a.cert).cmp(&(&b.listener, &b.cert)));
        self.expiry.store(Arc::new(all));
    }

    /// The TLS state of a successor of a binary upgrade, which refuses
    /// expired certificates that replace a valid one of `predecessor` (see
    /// the module docs).
    pub fn for_successor(predecessor: Predecessor) -> TlsListeners {
        TlsListeners {
            successor: Some(predecessor),
            ..TlsListeners::default()
        }
    }

    /// The listeners at start are loaded: from now on a successor is a
    /// process like any other (a listener that a reload adds has nothing
    /// to keep).
    pub fn started(&mut self) {
        self.successor = None;
    }

    /// What a successor is told this process serves: each TLS listener
    /// with the certificate files it serves that have expired by now.
    pub fn served_expired(&self) -> Predecessor {
        let now = x509_parser::time::ASN1Time::now().timestamp();
        let listeners = self
            .entries
            .iter()
            .map(|(name, e)| {
                let expired = e
                    .not_after
                    .iter()
                    .filter(|(_, at)| *at < now)
                    .map(|(cert, _)| cert.clone())
                    .collect();
                (name.clone(), expired)
            })
            .collect();
        Predecessor {
            listeners: Some(listeners),
        }
    }

    /// The warnings about expired certificates said so far, for
    /// `check-config` (which has no log).
    pub fn take_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }

    /// No listener terminates TLS.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Forgets listeners that no longer exist.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.entries.retain(|name, _| keep(name));
        self.publish_expiry();
    }

    /// Reloads the certificates of listeners whose files changed (or all, when
    /// `force`: SIGHUP). A broken file, or an expired certificate, keeps the
    /// old certificate. Returns the number of listeners rotated.
    pub fn refresh(&mut self, force: bool) -> usize {
        let mut rotated = 0;
        for (name, entry) in &mut self.entries {
            let stamps: Vec<Stamp> = files(&entry.settings).iter().map(|p| stamp(p)).collect();
            if !force && stamps == entry.stamps {
                continue;
            }
            // Remember what was seen so a broken file is reported once, not
            // on every tick.
            entry.stamps = stamps;
            if files(&entry.settings).is_empty() {
                // Self-signed only: nothing on disk to reload.
                continue;
            }
            match build(&entry.settings).and_then(|built| match built.stale.into_iter().next() {
                Some(e) => Err(e),
                None => Ok((built.config, built.not_after)),
            }) {
                Ok((config, not_after)) => {
                    entry.termination.rotate(config);
                    entry.not_after = not_after;
                    rotated += 1;
                    tracing::info!(listener = %name, "tls certificates reloaded");
                }
                Err(e) => tracing::error!(listener = %name, error = %e,
                    "cannot reload tls certificates; keeping the previous ones"),
            }
        }
        if rotated > 0 {
            self.publish_expiry();
        }
        rotated
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn load_errors_name_their_cause_once() {
        use std::error::Error;
        let e = TlsLoadError::from(rustls::Error::General("bad".into()));
        assert!(e.source().is_none(), "{e}");
        assert_eq!(
            format!("{:#}", anyhow::Error::new(e)),
            "invalid TLS configuration: unexpected error: bad"
        );
    }

    use super::*;

    fn raw(toml_text: &str) -> RawTls {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn needs_cert_and_key_or_self_signed() {
        let err = raw("").validate("listener[0].tls").unwrap_err();
        assert!(err.to_string().contains("listener[0].tls.cert"), "{err}");
        let err = raw("cert = \"a.pem\"").validate("l.tls").unwrap_err();
        assert!(err.to_string().contains("l.tls.key"), "{err}");
        let err = raw("cert = \"a\"\nkey = \"b\"\nself_signed = true")
            .validate("l.tls")
            .unwrap_err();
        assert!(err.to_string().contains("l.tls.self_signed"), "{err}");
        let ok = raw("self_signed = true").validate("l.tls").unwrap();
        assert_eq!(
            ok.default,
            CertSource::SelfSigned {
                self_signed_names: vec!["localhost".into()]
            }
        );
        assert_eq!(ok.handshake_timeout, Duration::from_secs(10));
    }

    #[test]
    fn names_are_dns_names_and_self_signed_names_need_self_signed() {
        let ok = raw(
            "cert = \"a\"\nkey = \"b\"\n[[sni]]\ncert = \"c\"\nkey = \"d\"\n\
             names = [\"Api.Example.com.\", \"*.example.com\", \"x_1\"]\n",
        )
        .validate("l.tls");
        assert!(ok.is_ok(), "{ok:?}");
        for (names, why) in [
            ("[]", "is empty"),
            ("[\"\"]", "is not a DNS name"),
            ("[\"*\"]", "is not a DNS name"),
            ("[\"a b\"]", "is not a DNS name"),
            ("[\"*.*.com\"]", "is not a DNS name"),
            ("[\"a.*.com\"]", "is not a DNS name"),
            ("[\"a..com\"]", "is not a DNS name"),
        ] {
            let err = raw(&format!(
                "cert = \"a\"\nkey = \"b\"\n[[sni]]\ncert = \"c\"\nkey = \"d\"\nnames = {names}\n"
            ))
            .validate("l.tls")
            .unwrap_err()
            .to_string();
            assert!(err.contains("l.tls.sni[0].names"), "{names}: {err}");
            assert!(err.contains(why), "{names}: {err}");
            let err = raw(&format!(
                "self_signed = true\nself_signed_names = {names}\n"
            ))
            .validate("l.tls")
            .unwrap_err()
            .to_string();
            assert!(err.contains("l.tls.self_signed_names"), "{names}: {err}");
        }
        let err = raw("cert = \"a\"\nkey = \"b\"\nself_signed_names = [\"x\"]\n")
            .validate("l.tls")
            .unwrap_err()
            .to_string();
        assert!(err.contains("self_signed is not"), "{err}");
    }

    #[test]
    fn self_signed_config_builds() {
        let settings = raw("self_signed = true\nalpn = [\"http/1.1\"]")
            .validate("t")
            .unwrap();
        let built = build(&settings).unwrap();
        assert!(built.stale.is_empty());
        assert!(built.not_after.is_empty(), "self-signed: no file");
        assert_eq!(built.config.alpn_protocols, vec![b"http/1.1".to_vec()]);
    }

    #[test]
    fn pem_files_load_and_names_come_from_the_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let generated =
            rcgen::generate_simple_self_signed(vec!["a.example".into(), "b.example".into()])
                .unwrap();
        let cert = dir.path().join("c.pem");
        let key = dir.path().join("k.pem");
        std::fs::write(&cert, generated.cert.pem()).unwrap();
        std::fs::write(&key, generated.signing_key.serialize_pem()).unwrap();
        let (_, names) = load_pair(&cert, &key).unwrap();
        assert_eq!(
            names,
            vec!["a.example".to_string(), "b.example".to_string()]
        );

        // A key from another certificate is refused.
        let other = rcgen::generate_simple_self_signed(vec!["x".into()]).unwrap();
        std::fs::write(&key, other.signing_key.serialize_pem()).unwrap();
        let err = load_pair(&cert, &key).unwrap_err();
        assert!(matches!(err, TlsLoadError::Mismatch { .. }), "{err}");

        // A key file without a usable key says what it lacks, not "no items
        // found" (QA: what an encrypted key, the common case, got).
        let generated_key = generated.signing_key.serialize_pem();
        let encrypted = generated_key.replace("PRIVATE KEY", "ENCRYPTED PRIVATE KEY");
        std::fs::write(&key, encrypted).unwrap();
        let err = load_pair(&cert, &key).unwrap_err().to_string();
        assert!(err.contains("k.pem"), "{err}");
        assert!(err.contains("encrypted"), "{err}");
        std::fs::write(&key, generated.cert.pem()).unwrap();
        let err = load_pair(&cert, &key).unwrap_err().to_string();
        assert!(err.contains("no private key"), "{err}");

        // Garbage is refused with the path in the message.
        std::fs::write(&cert, "not a pem").unwrap();
        let err = load_pair(&cert, &key).unwrap_err();
        assert!(err.to_string().contains("c.pem"), "{err}");
    }
}
