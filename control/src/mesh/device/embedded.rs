//! Userspace WireGuard in this process: gotatun on a TUN device.
//!
//! The device's tasks (TUN reader, encryption, UDP I/O, timers) run on the
//! runtime that creates it: the mesh thread's own, never the control
//! thread's or a shard's. Peers change through gotatun's typed API, which
//! adds, modifies and removes one peer without rebinding the UDP socket or
//! touching the other peers' sessions (its UAPI `set` would re-create a
//! changed peer, dropping that peer's session).
//!
//! A UAPI socket at `/var/run/wireguard/<interface>.sock` (mode 0600, root
//! only: a `get` returns the private key) makes the device visible to
//! `wg show` like any WireGuard interface.
//!
//! Across a binary upgrade ([`crate::upgrade`]) the TUN device moves to the
//! new process: its descriptor is registered as [`TUN_ENTRY`] and handed
//! over with the sockets, so the interface, its addresses and routes stay
//! while both processes hold it. The new process builds its device on it
//! suspended (no TUN read, no UDP socket) and [`Embedded::resume`]s it once
//! the old one has [`Embedded::release`]d its own: never two readers of the
//! one TUN device, and the UDP port free when the new one binds it.

use std::os::fd::{AsFd, AsRawFd, IntoRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;

use gotatun::device::{self, DefaultDeviceTransports, Peer};
use gotatun::tun::tun_async_device::TunDevice;
use gotatun::x25519;
use ipnet::IpNet;

use super::{DeviceError, DeviceSettings, PeerSpec, PeerStatus};
use crate::mesh::keys::PublicKey;

const IMPLEMENTATION: &str = "embedded";
/// How long an added peer's handshake initiation may take to be sent.
const INITIATE_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

/// The largest packet the device carries, and so the largest MTU its
/// interface may have: gotatun reads each packet from the TUN device into a
/// 4096-byte buffer (`PacketBufPool`'s default, not configurable), and a
/// longer one is cut short and lost without a word. Measured: with the
/// interface at 8920, pings of up to 4096 bytes crossed, 4097 did not, and
/// TCP stalled at its first full-size segment.
pub const MAX_MTU: u16 = 4096;

/// The UAPI socket path `wg` looks for.
pub fn uapi_socket(interface: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("/var/run/wireguard/{interface}.sock"))
}

/// The registry entry of the TUN device's descriptor (see
/// [`crate::upgrade::sockets`]).
pub const TUN_ENTRY: &str = "mesh-tun";

pub struct Embedded {
    device: device::Device<DefaultDeviceTransports>,
    interface: String,
    listen_port: u16,
    /// Built on a TUN device taken over from a previous process, suspended
    /// until that one releases it.
    adopted: bool,
}

/// The interface name a TUN descriptor is attached to (`TUNGETIFF`).
fn tun_name(fd: &OwnedFd) -> Result<String, String> {
    // struct ifreq: the name, then the flags (the rest is padding).
    let mut ifreq = [0u8; 40];
    // SAFETY: TUNGETIFF writes at most a struct ifreq (40 bytes) into the
    // buffer; on anything but a TUN descriptor it fails and writes nothing.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), TUNGETIFF, ifreq.as_mut_ptr()) };
    if r < 0 {
        return Err(format!(
            "not a TUN device: {}",
            std::io::Error::last_os_error()
        ));
    }
    let end = ifreq[..libc::IFNAMSIZ]
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(libc::IFNAMSIZ);
    Ok(String::from_utf8_lossy(&ifreq[..end]).into_owned())
}

/// `_IOR('T', 210, unsigned int)`.
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;

/// The TUN device of `interface` a previous process handed over, if any.
fn take_inherited(interface: &str) -> Option<OwnedFd> {
    crate::upgrade::sockets::take_device(TUN_ENTRY, |fd| match tun_name(fd)? {
        name if name == interface => Ok(()),
        name => Err(format!("the TUN device of {name}, configured {interface}")),
    })
}

/// Opens the TUN device: the inherited descriptor, or a new device named
/// `interface`. Registers a duplicate for the next upgrade.
fn open_tun(interface: &str, inherited: Option<OwnedFd>) -> Result<TunDevice, String> {
    let mut config = gotatun::tun::tun::Configuration::default();
    config.tun_name(interface);
    if let Some(fd) = inherited {
        config.raw_fd(fd.into_raw_fd()).close_fd_on_drop(true);
    }
    let tun = gotatun::tun::tun::create_as_async(&config).map_err(|e| {
        format!("{e} (needs /dev/net/tun and CAP_NET_ADMIN; is another process using the name?)")
    })?;
    // SAFETY: the descriptor is open for as long as `tun`, which outlives
    // this borrow; the registry keeps a duplicate of its own.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(tun.as_raw_fd()) };
    if let Err(e) = crate::upgrade::sockets::register(TUN_ENTRY, &[fd.as_fd()]) {
        tracing::warn!(error = %e,
            "mesh: cannot keep the TUN device for a binary upgrade; an upgrade will fail");
    }
    TunDevice::from_tun_device(tun).map_err(|e| e.to_string())
}

fn to_ipnetwork(net: &IpNet) -> ipnetwork::IpNetwork {
    ipnetwork::IpNetwork::new(net.addr(), net.prefix_len()).expect("a valid prefix stays valid")
}

fn from_ipnetwork(net: &ipnetwork::IpNetwork) -> Option<IpNet> {
    IpNet::new(net.ip(), net.prefix()).ok()
}

impl Embedded {
    pub async fn create(s: &DeviceSettings<'_>) -> Result<Embedded, DeviceError> {
        let fail = |cause: String| DeviceError::Create {
            interface: s.interface.to_string(),
            implementation: IMPLEMENTATION,
            cause,
        };
        let uapi = device::uapi::UapiServer::default_unix_socket(s.interface, None, None)
            .map_err(|e| fail(format!("UAPI socket: {e:#}")))?;
        let socket = uapi_socket(s.interface);
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| fail(format!("chmod {}: {e}", socket.display())))?;
        let inherited = take_inherited(s.interface);
        let adopted = inherited.is_some();
        let tun = open_tun(s.interface, inherited).map_err(fail)?;
        let device = device::build()
            .with_default_udp()
            .with_ip(tun)
            .with_private_key(x25519::StaticSecret::from(*s.private_key.expose()))
            .with_uapi(uapi)
            .suspended(adopted)
            .build()
            .await
            .map_err(|e| fail(e.to_string()))?;
        // gotatun opens its UDP socket when the port is set on a keyed
        // device (built without peers it has none yet); a port in use
        // fails here, at start. Adopted, the port is the previous
        // process's until it releases it: set on resume.
        if !adopted {
            device
                .set_listen_port(s.listen_port)
                .await
                .map_err(|e| fail(format!("UDP port {}: {e}", s.listen_port)))?;
        }
        Ok(Embedded {
            device,
            interface: s.interface.to_string(),
            listen_port: s.listen_port,
            adopted,
        })
    }

    pub async fn peers(&self) -> Vec<PeerStatus> {
        self.device
            .peers()
            .await
            .into_iter()
            .map(|p| PeerStatus {
                public_key: PublicKey(*p.peer.public_key.as_bytes()),
                endpoint: p.peer.endpoint,
                allowed_ips: p
                    .peer
                    .allowed_ips
                    .iter()
                    .filter_map(from_ipnetwork)
                    .collect(),
                keepalive: p.peer.keepalive.filter(|k| *k > 0),
                last_handshake: p.stats.last_handshake,
                rx_bytes: p.stats.rx_bytes as u64,
                tx_bytes: p.stats.tx_bytes as u64,
            })
            .collect()
    }

    pub async fn upsert_peer(&mut self, spec: &PeerSpec) -> Result<(), DeviceError> {
        let key = x25519::PublicKey::from(spec.public_key.0);
        let allowed = to_ipnetwork(&IpNet::V6(spec.allowed));
        let (endpoint, keepalive) = (spec.endpoint, spec.keepalive);
        let configure = |e: gotatun::device::Error| DeviceError::Configure {
            implementation: IMPLEMENTATION,
            peer: spec.public_key,
            cause: e.to_string(),
        };
        let modified = self
            .device
            .modify_peer(&key, |p| {
                p.set_endpoint(Some(endpoint));
                p.set_keepalive(keepalive);
                p.clear_allowed_ips();
                p.add_allowed_ip(allowed);
            })
            .await
            .map_err(configure)?;
        if !modified {
            let mut peer = Peer::new(key)
                .with_endpoint(endpoint)
                .with_allowed_ip(allowed);
            peer.keepalive = keepalive;
            self.device.add_peer(peer).await.map_err(configure)?;
        }
        self.initiate(&key).await;
        Ok(())
    }

    /// Sends a handshake initiation to a peer without a session now,
    /// instead of at its first packet. Two POPs add each other a few
    /// hundred ms apart; the first one's initiation reaches a POP that does
    /// not know it yet and is dropped, and WireGuard retries only after
    /// REKEY_TIMEOUT (5 s). The second one's initiation, sent here, meets
    /// a peer that knows it: the tunnel is up one round trip later. (The
    /// kernel module and wireguard-go do the same by themselves: they send
    /// a keepalive when a peer gets a persistent keepalive.) Only the send
    /// is waited for (it happens at the first poll unless the peer is
    /// locked), not the answer.
    async fn initiate(&self, key: &x25519::PublicKey) {
        // A timeout is the normal case: the answer is not waited for.
        if let Ok(Err(e)) =
            tokio::time::timeout(INITIATE_WAIT, self.device.force_handshake(key)).await
        {
            tracing::debug!(error = %e, "mesh: no handshake initiation");
        }
    }

    pub async fn remove_peer(&mut self, key: &PublicKey) -> Result<(), DeviceError> {
        self.device
            .remove_peer(&x25519::PublicKey::from(key.0))
            .await
            .map(|_| ())
            .map_err(|e| DeviceError::Configure {
                implementation: IMPLEMENTATION,
                peer: *key,
                cause: e.to_string(),
            })
    }

    /// Whether it waits for a previous process to release the TUN device
    /// (see [`Embedded::resume`]).
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// Starts the device built suspended on an inherited TUN device: binds
    /// the UDP port, reads the TUN device, and sends each peer a handshake
    /// initiation (sessions start afresh, with the same keys).
    pub async fn resume(&mut self) -> Result<(), DeviceError> {
        // Resumed, gotatun binds its UDP socket only if the device has
        // peers (on the port it had: 0, never set while suspended); setting
        // the port binds it either way. Without it, a device that had no
        // peer yet when resumed never bound one, peers added later or not:
        // seen in 2 runs of 5 of the upgrade test, the successor's 6PN dead.
        let started = match self.device.resume().await {
            Ok(()) => self.device.set_listen_port(self.listen_port).await,
            Err(e) => Err(e),
        };
        if let Err(e) = started {
            // Suspended again, the next resume tries again.
            self.device.suspend().await;
            return Err(DeviceError::Create {
                interface: self.interface.clone(),
                implementation: IMPLEMENTATION,
                cause: format!(
                    "cannot start on the TUN device taken over (UDP port {}): {e}",
                    self.listen_port
                ),
            });
        }
        self.adopted = false;
        for p in self.device.peers().await {
            self.initiate(&p.peer.public_key).await;
        }
        Ok(())
    }

    /// Stops the device for a successor that took over the TUN device: the
    /// UDP socket closes and nothing reads the TUN device any more, but
    /// the interface stays (the successor holds it) and so does the UAPI
    /// socket's path (the successor's now).
    pub async fn release(self) {
        self.device.stop().await;
    }

    pub async fn stop(self) {
        self.device.stop().await;
        let _ = std::fs::remove_file(uapi_socket(&self.interface));
    }
}
