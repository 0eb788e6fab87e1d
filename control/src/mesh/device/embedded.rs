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

use gotatun::device::{self, DefaultDeviceTransports, Peer};
use gotatun::tun::tun_async_device::TunDevice;
use gotatun::x25519;
use ipnet::IpNet;

use super::embedded_uapi::UapiSocket;
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
pub use super::embedded_uapi::path as uapi_socket;

/// The registry entry of the TUN device's descriptor (see
/// [`crate::upgrade::sockets`]).
pub const TUN_ENTRY: &str = "mesh-tun";

pub struct Embedded {
    device: device::Device<DefaultDeviceTransports>,
    /// Its accept loop ends when the device is dropped.
    _uapi_socket: UapiSocket,
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
/// `interface`. Also returns a duplicate of its descriptor, to register for
/// the next upgrade once the device runs (registered earlier, a device that
/// then failed to start would leave the registry holding the TUN device, its
/// name taken until the process ends: every later start failed with EBUSY).
fn open_tun(interface: &str, inherited: Option<OwnedFd>) -> Result<(TunDevice, OwnedFd), Start> {
    let mut config = gotatun::tun::tun::Configuration::default();
    config.tun_name(interface);
    if let Some(fd) = inherited {
        config.raw_fd(fd.into_raw_fd()).close_fd_on_drop(true);
    }
    let tun = gotatun::tun::tun::create_as_async(&config).map_err(|e| {
        let busy = matches!(&e, gotatun::tun::tun::Error::Io(io)
            if io.raw_os_error() == Some(libc::EBUSY));
        let cause = format!(
            "{e} (needs /dev/net/tun and CAP_NET_ADMIN; is another process using the name?)"
        );
        if busy {
            Start::Busy(cause)
        } else {
            Start::Failed(cause)
        }
    })?;
    // SAFETY: the descriptor is open for as long as `tun`, which outlives
    // this borrow.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(tun.as_raw_fd()) };
    let dup = fd
        .try_clone_to_owned()
        .map_err(|e| Start::Failed(format!("duplicating the TUN descriptor: {e}")))?;
    let tun = TunDevice::from_tun_device(tun).map_err(|e| Start::Failed(e.to_string()))?;
    Ok((tun, dup))
}

/// Why one attempt to start the device failed.
enum Start {
    /// The interface name or the UDP port is still held, maybe by the
    /// device just stopped (see [`RELEASE_WAIT`]).
    Busy(String),
    Failed(String),
}

/// How long a start waits for the interface name and the UDP port to be
/// free. A device stopped to be replaced (its interface deleted by hand)
/// lets go of them a moment after its `stop` returns: gotatun aborts its
/// buffered TUN and UDP tasks without waiting for them, and their
/// descriptors close when the runtime drops those tasks. Seen under load:
/// the replacement's bind failed with "Address already in use" 2 ms after
/// the stop.
const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
const RELEASE_POLL: std::time::Duration = std::time::Duration::from_millis(20);

fn to_ipnetwork(net: &IpNet) -> ipnetwork::IpNetwork {
    ipnetwork::IpNetwork::new(net.addr(), net.prefix_len()).expect("a valid prefix stays valid")
}

fn from_ipnetwork(net: &ipnetwork::IpNetwork) -> Option<IpNet> {
    IpNet::new(net.ip(), net.prefix()).ok()
}

impl Embedded {
    pub async fn create(s: &DeviceSettings<'_>) -> Result<Embedded, DeviceError> {
        let mut inherited = take_inherited(s.interface);
        let adopted = inherited.is_some();
        let deadline = std::time::Instant::now() + RELEASE_WAIT;
        loop {
            let cause = match Self::start(s, inherited.take()).await {
                Ok(embedded) => return Ok(embedded),
                // An inherited TUN device is consumed by the attempt.
                Err(Start::Busy(cause)) if !adopted && std::time::Instant::now() < deadline => {
                    tracing::debug!(
                        cause,
                        "mesh: interface name or UDP port not free yet; trying again"
                    );
                    tokio::time::sleep(RELEASE_POLL).await;
                    continue;
                }
                Err(Start::Busy(cause) | Start::Failed(cause)) => cause,
            };
            return Err(DeviceError::Create {
                interface: s.interface.to_string(),
                implementation: IMPLEMENTATION,
                cause,
            });
        }
    }

    /// One attempt to build and start the device. A device that fails is
    /// stopped before this returns, and nothing of it stays registered.
    async fn start(s: &DeviceSettings<'_>, inherited: Option<OwnedFd>) -> Result<Embedded, Start> {
        let adopted = inherited.is_some();
        let (uapi_socket, uapi) = UapiSocket::bind(s.interface)
            .map_err(|e| Start::Failed(format!("UAPI socket: {e}")))?;
        let (tun, tun_fd) = open_tun(s.interface, inherited)?;
        let device = device::build()
            .with_default_udp()
            .with_ip(tun)
            .with_private_key(x25519::StaticSecret::from(*s.private_key.expose()))
            .with_uapi(uapi)
            .suspended(adopted)
            .build()
            .await
            .map_err(|e| Start::Failed(e.to_string()))?;
        // gotatun opens its UDP socket when the port is set on a keyed
        // device (built without peers it has none yet); a port in use
        // fails here, at start. Adopted, the port is the previous
        // process's until it releases it: set on resume. The port is
        // remembered even when its bind fails (a second set of the same
        // port would bind nothing): a retry builds a new device.
        if !adopted {
            if let Err(e) = device.set_listen_port(s.listen_port).await {
                let busy = matches!(&e, device::Error::Bind(io, _)
                    if io.kind() == std::io::ErrorKind::AddrInUse);
                device.stop().await;
                let cause = format!("UDP port {}: {e}", s.listen_port);
                return Err(if busy {
                    Start::Busy(cause)
                } else {
                    Start::Failed(cause)
                });
            }
        }
        if let Err(e) = crate::upgrade::sockets::register(TUN_ENTRY, &[tun_fd.as_fd()]) {
            tracing::warn!(error = %e,
                "mesh: cannot keep the TUN device for a binary upgrade; an upgrade will fail");
        }
        Ok(Embedded {
            device,
            _uapi_socket: uapi_socket,
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
            // Suspended again, the next resume tries again. gotatun keeps
            // a port whose bind failed as the device's port, and setting
            // the same port again binds nothing: without a reset, the next
            // resume of a device without peers said it was running with no
            // UDP socket at all. Suspended, the reset only stores 0.
            self.device.suspend().await;
            let _ = self.device.set_listen_port(0).await;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::test_netns::in_own_network_namespace;

    /// A start that fails at its UDP port (another program holds it) must
    /// leave nothing behind: the next start, with the port free, gets the
    /// interface name. Until 2026-12-06 the failed start left its TUN
    /// device registered for upgrades, its name taken: every later start
    /// failed with "Device or resource busy" and the POP's 6PN stayed dead
    /// (CI, after an interface deleted by hand whose replacement met the
    /// old device's port not yet released).
    #[test]
    fn a_start_that_fails_on_its_port_leaves_the_interface_name_free() {
        in_own_network_namespace(|| async {
            let key = crate::mesh::keys::PrivateKey::generate().expect("a key");
            let interface = format!("ept{}", std::process::id() % 1_000_000);
            let port = 51_999;
            let settings = DeviceSettings {
                interface: &interface,
                private_key: &key,
                listen_port: port,
                wireguard_go: std::path::Path::new("wireguard-go"),
            };
            // Dual-stack: IPv4 and IPv6 binds of the port both fail.
            let taken = std::net::UdpSocket::bind(("::", port)).expect("bind the port");
            let refused = Embedded::create(&settings)
                .await
                .err()
                .expect("the port is taken");
            assert!(
                refused.to_string().contains("Address already in use"),
                "{refused}"
            );
            drop(taken);
            let device = Embedded::create(&settings)
                .await
                .unwrap_or_else(|e| panic!("after a failed start: {e}"));
            assert_eq!(uapi_listeners(&interface), 1, "the device's own");
            device.stop().await;
            // The accept loops end when the runtime drops their tasks.
            let deadline = std::time::Instant::now() + RELEASE_WAIT;
            while uapi_listeners(&interface) > 0 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{} UAPI sockets left listening after every device stopped",
                    uapi_listeners(&interface)
                );
                tokio::time::sleep(RELEASE_POLL).await;
            }
        });
    }

    /// Unix sockets bound to the interface's UAPI path, open in this
    /// network namespace (`/proc/net/unix` still names a socket whose path
    /// was removed or bound again).
    fn uapi_listeners(interface: &str) -> usize {
        let path = uapi_socket(interface);
        let path = path.to_str().expect("a UTF-8 path");
        std::fs::read_to_string("/proc/thread-self/net/unix")
            .expect("/proc/thread-self/net/unix")
            .lines()
            .filter(|line| line.ends_with(path))
            .count()
    }

    /// A device built on an inherited TUN device (a binary upgrade) whose
    /// first resume fails because the previous process still holds the
    /// UDP port: once that one lets go, the next resume binds the port.
    /// Until 2026-12-06 it returned Ok without binding anything when the
    /// device had no peer yet (gotatun kept the port of the failed bind, and
    /// setting the same port again was a no-op): the POP's 6PN dead.
    #[test]
    fn a_resume_that_met_the_port_taken_binds_it_on_the_next_try() {
        in_own_network_namespace(|| async {
            let key = crate::mesh::keys::PrivateKey::generate().expect("a key");
            let interface = format!("epu{}", std::process::id() % 1_000_000);
            let port = 51_998;
            let settings = DeviceSettings {
                interface: &interface,
                private_key: &key,
                listen_port: port,
                wireguard_go: std::path::Path::new("wireguard-go"),
            };
            let old = Embedded::create(&settings).await.expect("the first device");
            // What a binary upgrade hands over: the TUN device.
            let handed = crate::upgrade::sockets::registered()
                .expect("duplicates")
                .into_iter()
                .filter(|(name, _)| name == TUN_ENTRY)
                .collect();
            crate::upgrade::sockets::set_inherited(handed);
            let mut new = Embedded::create(&settings).await.expect("the successor");
            assert!(new.adopted());
            let refused = new
                .resume()
                .await
                .expect_err("the old device holds the port");
            assert!(
                refused.to_string().contains("Address already in use"),
                "{refused}"
            );
            old.release().await;
            let deadline = std::time::Instant::now() + RELEASE_WAIT;
            while let Err(e) = new.resume().await {
                assert!(std::time::Instant::now() < deadline, "{e}");
                tokio::time::sleep(RELEASE_POLL).await;
            }
            let bound = std::net::UdpSocket::bind(("::", port));
            assert!(
                bound
                    .as_ref()
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::AddrInUse),
                "the resumed device does not hold UDP port {port}: {bound:?}"
            );
            new.stop().await;
        });
    }
}
