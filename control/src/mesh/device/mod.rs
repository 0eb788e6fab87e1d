//! The WireGuard device, whichever implementation runs it.
//!
//! Three implementations behind one enum (static dispatch, no boxing):
//! - [`embedded`]: gotatun (Mullvad's maintained boringtun successor) in
//!   this process, on a TUN device, on the mesh thread's runtime. The UAPI
//!   socket `/var/run/wireguard/<interface>.sock` (mode 0600) lets `wg show`
//!   read it.
//! - [`userspace`]: a `wireguard-go` child process, configured over its
//!   UAPI socket (defguard_wireguard_rs's requests; the answers read by
//!   [`uapi`]).
//! - [`kernel`]: the kernel module over netlink (defguard_wireguard_rs).
//!
//! Every change is per peer: adding, updating or removing one peer never
//! touches the interface or the other peers' sessions (no `replace_peers`
//! after creation, no socket rebind).

pub mod embedded;
mod embedded_uapi;
pub mod kernel;
pub mod uapi;
pub mod userspace;

use std::net::SocketAddr;
use std::time::Duration;

use ipnet::{IpNet, Ipv6Net};

use super::config::Implementation;
use super::keys::{PrivateKey, PublicKey};

/// What went wrong creating or configuring the device.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    #[error("mesh: cannot create WireGuard interface {interface} ({implementation}): {cause}")]
    Create {
        interface: String,
        implementation: &'static str,
        cause: String,
    },
    #[error("mesh: WireGuard ({implementation}) refused a change to peer {peer}: {cause}")]
    Configure {
        implementation: &'static str,
        peer: PublicKey,
        cause: String,
    },
    #[error("mesh: cannot read the WireGuard device ({implementation}): {cause}")]
    Read {
        implementation: &'static str,
        cause: String,
    },
}

/// The settings a device is created with.
pub struct DeviceSettings<'a> {
    pub interface: &'a str,
    pub private_key: &'a PrivateKey,
    pub listen_port: u16,
    /// For `wireguard-go`.
    pub wireguard_go: &'a std::path::Path,
}

/// One peer as the mesh wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    pub public_key: PublicKey,
    pub endpoint: SocketAddr,
    /// The peer POP's 6PN /64: the only source it may send from, and where
    /// traffic for it goes.
    pub allowed: Ipv6Net,
    /// Seconds; `None`: off.
    pub keepalive: Option<u16>,
}

/// One peer as the device has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    pub public_key: PublicKey,
    /// Where it was last heard from (WireGuard roams), else as configured.
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    pub keepalive: Option<u16>,
    /// Time since the last completed handshake.
    pub last_handshake: Option<Duration>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// A running WireGuard device.
pub enum Device {
    Embedded(embedded::Embedded),
    Userspace(userspace::WireguardGo),
    Kernel(kernel::Kernel),
}

impl Device {
    /// Creates the interface with `implementation` (`Auto`: the kernel
    /// module when it works here, else embedded). Must run on the mesh
    /// runtime (the embedded device spawns its tasks there).
    pub async fn create(
        implementation: Implementation,
        settings: &DeviceSettings<'_>,
    ) -> Result<Device, DeviceError> {
        match implementation {
            Implementation::Embedded => Ok(Device::Embedded(
                embedded::Embedded::create(settings).await?,
            )),
            Implementation::WireguardGo => Ok(Device::Userspace(
                userspace::WireguardGo::create(settings).await?,
            )),
            Implementation::Kernel => Ok(Device::Kernel(kernel::Kernel::create(settings).await?)),
            Implementation::Auto => match kernel::Kernel::create(settings).await {
                Ok(k) => Ok(Device::Kernel(k)),
                Err(e) => {
                    tracing::info!(reason = %e,
                        "mesh: no kernel WireGuard here; running the embedded userspace implementation");
                    Ok(Device::Embedded(
                        embedded::Embedded::create(settings).await?,
                    ))
                }
            },
        }
    }

    /// The interface's MTU for `configured` (`mesh.mtu`): the same, unless
    /// the device cannot carry packets that long (the embedded one: see
    /// [`embedded::MAX_MTU`]); then its largest, and `true`.
    pub fn interface_mtu(&self, configured: u16) -> (u16, bool) {
        let most = match self {
            Device::Embedded(_) => embedded::MAX_MTU,
            Device::Userspace(_) | Device::Kernel(_) => u16::MAX,
        };
        (configured.min(most), configured > most)
    }

    pub fn implementation(&self) -> Implementation {
        match self {
            Device::Embedded(_) => Implementation::Embedded,
            Device::Userspace(_) => Implementation::WireguardGo,
            Device::Kernel(_) => Implementation::Kernel,
        }
    }

    /// Whether the device is gone on its own, and how: a `wireguard-go`
    /// child that exited (killed, crashed) or no longer answers on its UAPI
    /// socket (stopped, hung). The others live in this process or the
    /// kernel: `None`.
    pub fn gone(&self) -> Option<String> {
        match self {
            Device::Userspace(d) => d.gone(),
            Device::Embedded(_) | Device::Kernel(_) => None,
        }
    }

    /// [`Device::gone`], waiting up to `limit` for it: a `wireguard-go`
    /// killed takes its interface with it, and the kernel lists the
    /// interface as gone a moment before the process can be reaped (seen
    /// in about 1 run in 12 of the test of a killed one). The others:
    /// `None` at once.
    pub async fn gone_within(&self, limit: Duration) -> Option<String> {
        let Device::Userspace(d) = self else {
            return None;
        };
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(how) = d.gone() {
                return Some(how);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every peer with its endpoint, allowed IPs, handshake and counters.
    pub async fn peers(&self) -> Result<Vec<PeerStatus>, DeviceError> {
        match self {
            Device::Embedded(d) => Ok(d.peers().await),
            Device::Userspace(d) => d.peers().await,
            Device::Kernel(d) => d.peers().await,
        }
    }

    /// Adds `peer`, or updates it in place (its session survives).
    pub async fn upsert_peer(&mut self, peer: &PeerSpec) -> Result<(), DeviceError> {
        match self {
            Device::Embedded(d) => d.upsert_peer(peer).await,
            Device::Userspace(d) => d.upsert_peer(peer).await,
            Device::Kernel(d) => d.upsert_peer(peer).await,
        }
    }

    pub async fn remove_peer(&mut self, key: &PublicKey) -> Result<(), DeviceError> {
        match self {
            Device::Embedded(d) => d.remove_peer(key).await,
            Device::Userspace(d) => d.remove_peer(key).await,
            Device::Kernel(d) => d.remove_peer(key).await,
        }
    }

    /// Built on a TUN device a previous process handed over, and waiting
    /// (suspended) until that process releases it: see [`Device::resume`].
    pub fn adopted(&self) -> bool {
        match self {
            Device::Embedded(d) => d.adopted(),
            Device::Userspace(_) | Device::Kernel(_) => false,
        }
    }

    /// Starts an [`Device::adopted`] device once the previous process has
    /// released the TUN device; the others run already.
    pub async fn resume(&mut self) -> Result<(), DeviceError> {
        match self {
            Device::Embedded(d) => d.resume().await,
            Device::Userspace(_) | Device::Kernel(_) => Ok(()),
        }
    }

    /// Stops the device for the successor of a binary upgrade: the
    /// embedded one leaves its interface (the successor holds the TUN
    /// device) and its UAPI socket's path (the successor's now) in place.
    /// `wireguard-go` cannot be handed over (it dies with the process that
    /// started it, `PR_SET_PDEATHSIG`): it is stopped, and the successor
    /// starts its own.
    pub async fn release(self) {
        match self {
            Device::Embedded(d) => d.release().await,
            Device::Userspace(d) => d.stop().await,
            Device::Kernel(_) => {}
        }
    }

    /// Takes the interface down for good (process shutdown).
    pub async fn stop(self) {
        match self {
            Device::Embedded(d) => d.stop().await,
            Device::Userspace(d) => d.stop().await,
            Device::Kernel(d) => d.stop().await,
        }
    }
}

/// Runs one of defguard's blocking calls (netlink or UAPI socket I/O) off
/// the mesh runtime; the error as text, for [`DeviceError`].
async fn off_runtime<T, E>(f: impl FnOnce() -> Result<T, E> + Send + 'static) -> Result<T, String>
where
    T: Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
}

/// The peers defguard reads (userspace and kernel share it).
async fn read_peers<E>(
    implementation: &'static str,
    read: impl FnOnce() -> Result<defguard_wireguard_rs::host::Host, E> + Send + 'static,
) -> Result<Vec<PeerStatus>, DeviceError>
where
    E: std::fmt::Display + Send + 'static,
{
    let host = off_runtime(read).await.map_err(|cause| DeviceError::Read {
        implementation,
        cause,
    })?;
    Ok(host.peers.values().map(from_defguard).collect())
}

/// One change to `peer` through defguard (userspace and kernel share it).
async fn configure<E>(
    implementation: &'static str,
    peer: PublicKey,
    change: impl FnOnce() -> Result<(), E> + Send + 'static,
) -> Result<(), DeviceError>
where
    E: std::fmt::Display + Send + 'static,
{
    off_runtime(change)
        .await
        .map_err(|cause| DeviceError::Configure {
            implementation,
            peer,
            cause,
        })
}

/// defguard's peer from ours (userspace and kernel share it).
fn defguard_peer(peer: &PeerSpec) -> defguard_wireguard_rs::peer::Peer {
    let mut p = defguard_wireguard_rs::peer::Peer::new(defguard_wireguard_rs::key::Key::new(
        peer.public_key.0,
    ));
    p.endpoint = Some(peer.endpoint);
    p.persistent_keepalive_interval = peer.keepalive;
    p.allowed_ips = vec![defguard_wireguard_rs::net::IpAddrMask::new(
        peer.allowed.addr().into(),
        peer.allowed.prefix_len(),
    )];
    p
}

/// Our view of defguard's peer.
fn from_defguard(p: &defguard_wireguard_rs::peer::Peer) -> PeerStatus {
    PeerStatus {
        public_key: PublicKey(p.public_key.as_array()),
        endpoint: p.endpoint,
        allowed_ips: p
            .allowed_ips
            .iter()
            .filter_map(|a| IpNet::new(a.address, a.cidr).ok())
            .collect(),
        keepalive: p.persistent_keepalive_interval.filter(|k| *k > 0),
        last_handshake: p
            .last_handshake
            .filter(|t| *t > std::time::UNIX_EPOCH)
            .and_then(|t| t.elapsed().ok()),
        rx_bytes: p.rx_bytes,
        tx_bytes: p.tx_bytes,
    }
}
