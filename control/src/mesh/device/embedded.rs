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

use std::os::unix::fs::PermissionsExt;

use gotatun::device::{self, DefaultDeviceTransports, Peer};
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

pub struct Embedded {
    device: device::Device<DefaultDeviceTransports>,
    interface: String,
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
        let builder = device::build()
            .with_default_udp()
            .create_tun(s.interface)
            .map_err(|e| {
                fail(format!(
                    "{e} (needs /dev/net/tun and CAP_NET_ADMIN; is another process using the name?)"
                ))
            })?;
        let device = builder
            .with_private_key(x25519::StaticSecret::from(*s.private_key.expose()))
            .with_uapi(uapi)
            .build()
            .await
            .map_err(|e| fail(e.to_string()))?;
        // gotatun opens its UDP socket when the port is set on a keyed
        // device (built without peers it has none yet); a port in use
        // fails here, at start.
        device
            .set_listen_port(s.listen_port)
            .await
            .map_err(|e| fail(format!("UDP port {}: {e}", s.listen_port)))?;
        Ok(Embedded {
            device,
            interface: s.interface.to_string(),
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

    pub async fn stop(self) {
        self.device.stop().await;
        let _ = std::fs::remove_file(uapi_socket(&self.interface));
    }
}
