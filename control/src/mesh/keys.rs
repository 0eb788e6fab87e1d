//! The POP's WireGuard key pair.
//!
//! The private key lives in `mesh.private_key_file`, in `wg genkey`'s format
//! (base64 of 32 bytes and a newline, so `wg pubkey < FILE` works on it). It
//! is generated on the first start, written with mode 0600 into a file that
//! did not exist (`O_EXCL`), and never printed: [`PrivateKey`]'s `Debug`
//! hides it and nothing formats it. A key file that group or others can read
//! is refused, as ssh refuses such keys. The public key is what other POPs
//! see (the replicated `pops.wg_public_key`).

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

/// What went wrong with the key file. The key itself is never in a message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    #[error("mesh: cannot read the WireGuard private key {}: {cause}", .path.display())]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error(
        "mesh: the WireGuard private key {} is readable by others (mode {mode:o}); \
         run `chmod 600 {}`",
        .path.display(), .path.display()
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error(
        "mesh: {} is not a WireGuard private key: {reason} \
         (expected base64 of 32 bytes, as `wg genkey` writes)",
        .path.display()
    )]
    Malformed { path: PathBuf, reason: &'static str },
    #[error("mesh: cannot create the WireGuard private key {}: {cause}", .path.display())]
    Create {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("mesh: no randomness from the system for a new WireGuard key")]
    NoRandomness,
}

/// A Curve25519 private key. `Debug` hides it; its bytes are wiped on drop.
pub struct PrivateKey([u8; 32]);

impl PrivateKey {
    /// A fresh key from the system's randomness, clamped as `wg genkey` does.
    pub fn generate() -> Result<PrivateKey, KeyError> {
        let mut bytes = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
            .map_err(|_| KeyError::NoRandomness)?;
        bytes[0] &= 248;
        bytes[31] &= 127;
        bytes[31] |= 64;
        Ok(PrivateKey(bytes))
    }

    pub fn from_bytes(bytes: [u8; 32]) -> PrivateKey {
        PrivateKey(bytes)
    }

    pub fn public_key(&self) -> PublicKey {
        let secret = gotatun::x25519::StaticSecret::from(self.0);
        PublicKey(*gotatun::x25519::PublicKey::from(&secret).as_bytes())
    }

    /// The raw bytes, for handing to the WireGuard implementation only.
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

impl Clone for PrivateKey {
    fn clone(&self) -> Self {
        PrivateKey(self.0)
    }
}

impl Drop for PrivateKey {
    fn drop(&mut self) {
        // Volatile writes: the compiler may not drop them as dead stores.
        for b in self.0.iter_mut() {
            // SAFETY: `b` is a valid, aligned, exclusive reference.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

/// A Curve25519 public key; displayed in base64 as WireGuard tools do.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// From base64 (the `pops.wg_public_key` column, `wg show` output).
    pub fn parse(text: &str) -> Option<PublicKey> {
        let bytes = BASE64.decode(text.trim()).ok()?;
        Some(PublicKey(bytes.try_into().ok()?))
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&BASE64.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// Whether [`load_or_create`] found the key or made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Loaded,
    Created,
}

/// Reads the private key at `path`, or creates one there (and its
/// directory, mode 0700) when the file does not exist.
pub fn load_or_create(path: &Path) -> Result<(PrivateKey, Origin), KeyError> {
    match std::fs::metadata(path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(KeyError::Exposed {
                    path: path.to_path_buf(),
                    mode,
                });
            }
            let text = std::fs::read_to_string(path).map_err(|cause| KeyError::Read {
                path: path.to_path_buf(),
                cause,
            })?;
            Ok((parse_private(path, &text)?, Origin::Loaded))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = PrivateKey::generate()?;
            write_new(path, &key)?;
            Ok((key, Origin::Created))
        }
        Err(cause) => Err(KeyError::Read {
            path: path.to_path_buf(),
            cause,
        }),
    }
}

/// What `check-config` verifies: an existing key file is private and
/// well-formed (a missing one is fine: the first start creates it).
pub fn check(path: &Path) -> Result<(), KeyError> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        _ => load_or_create(path).map(|_| ()),
    }
}

fn parse_private(path: &Path, text: &str) -> Result<PrivateKey, KeyError> {
    let malformed = |reason| KeyError::Malformed {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = BASE64
        .decode(text.trim())
        .map_err(|_| malformed("not base64"))?;
    let bytes: [u8; 32] = bytes.try_into().map_err(|_| malformed("not 32 bytes"))?;
    Ok(PrivateKey(bytes))
}

fn write_new(path: &Path, key: &PrivateKey) -> Result<(), KeyError> {
    let create = |cause| KeyError::Create {
        path: path.to_path_buf(),
        cause,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(create)?;
        }
    }
    // O_EXCL: never overwrite (a key another process just wrote, or a
    // symlink someone planted), and mode 0600 from the first byte on.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(create)?;
    let mut text = BASE64.encode(key.0);
    text.push('\n');
    let written = file
        .write_all(text.as_bytes())
        .and_then(|_| file.sync_all());
    // Wipe the encoded copy too.
    // SAFETY: overwriting ASCII with ASCII keeps the String valid UTF-8.
    unsafe { text.as_bytes_mut().fill(b'0') };
    if let Err(cause) = written {
        let _ = std::fs::remove_file(path);
        return Err(create(cause));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_key_is_written_0600_and_read_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/mesh.key");
        let (a, origin) = load_or_create(&path).unwrap();
        assert_eq!(origin, Origin::Created);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dmode, 0o700);
        let (b, origin) = load_or_create(&path).unwrap();
        assert_eq!(origin, Origin::Loaded);
        assert_eq!(a.public_key(), b.public_key());
        // The file is what `wg genkey` writes: 44 base64 characters.
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.trim_end().len(), 44);
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn public_keys_match_wireguards_rfc7748_vector() {
        // RFC 7748 section 6.1: Alice's private and public keys.
        let hex = |s: &str| -> [u8; 32] {
            (0..32)
                .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
                .collect::<Vec<_>>()
                .try_into()
                .unwrap()
        };
        let private = PrivateKey::from_bytes(hex(
            "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
        ));
        assert_eq!(
            private.public_key().0,
            hex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
        );
    }

    #[test]
    fn an_exposed_or_broken_key_file_is_refused_with_its_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, "not a key\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = load_or_create(&path).unwrap_err().to_string();
        assert!(err.contains("not base64"), "{err}");
        std::fs::write(&path, format!("{}\n", BASE64.encode([1u8; 16]))).unwrap();
        let err = load_or_create(&path).unwrap_err().to_string();
        assert!(err.contains("not 32 bytes"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_or_create(&path).unwrap_err().to_string();
        assert!(
            err.contains("readable by others") && err.contains("chmod 600"),
            "{err}"
        );
    }

    #[test]
    fn the_private_key_is_never_formatted() {
        let k = PrivateKey::generate().unwrap();
        let b64 = BASE64.encode(k.expose());
        assert!(!format!("{k:?}").contains(&b64));
        assert_eq!(format!("{k:?}"), "PrivateKey(<redacted>)");
    }

    #[test]
    fn public_keys_round_trip_through_base64() {
        let k = PrivateKey::generate().unwrap().public_key();
        assert_eq!(PublicKey::parse(&k.to_string()), Some(k));
        assert_eq!(PublicKey::parse("short"), None);
    }
}
