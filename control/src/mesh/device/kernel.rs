//! The kernel's WireGuard, over netlink (defguard_wireguard_rs).
//!
//! **Not exercised by this repository's tests**: the machines it is built
//! and tested on have no WireGuard module, so `implementation = "auto"`
//! falls back to the embedded device there, and `"kernel"` fails at start
//! with the kernel's answer. The calls are defguard's, the same ones its
//! own tests run against the module.
//!
//! An interface of that name left by an earlier run is reused (its peers
//! are reconciled like any others); a graceful stop deletes it.

use std::sync::Arc;

use defguard_wireguard_rs::{
    key::Key, InterfaceConfiguration, Kernel as KernelApi, WGApi, WireguardInterfaceApi,
};

use super::{
    configure, defguard_peer, read_peers, DeviceError, DeviceSettings, PeerSpec, PeerStatus,
};
use crate::mesh::keys::PublicKey;

const IMPLEMENTATION: &str = "kernel";

pub struct Kernel {
    api: Arc<WGApi<KernelApi>>,
}

impl Kernel {
    pub async fn create(s: &DeviceSettings<'_>) -> Result<Kernel, DeviceError> {
        let fail = |cause: String| DeviceError::Create {
            interface: s.interface.to_string(),
            implementation: IMPLEMENTATION,
            cause,
        };
        let mut api = WGApi::<KernelApi>::new(s.interface).map_err(|e| fail(e.to_string()))?;
        let exists = std::path::Path::new("/sys/class/net")
            .join(s.interface)
            .exists();
        if !exists {
            api.create_interface().map_err(|e| {
                fail(format!(
                    "{e} (is the wireguard module loaded? `modprobe wireguard`)"
                ))
            })?;
        }
        // Key and port only: addresses and routes are the mesh's netlink
        // module's, peers come from reconciliation.
        let config = InterfaceConfiguration {
            name: s.interface.to_string(),
            prvkey: base64_key(s.private_key.expose()),
            addresses: Vec::new(),
            port: s.listen_port,
            peers: Vec::new(),
            mtu: None,
            fwmark: None,
        };
        if let Err(e) = api.configure_interface(&config) {
            if !exists {
                let _ = api.remove_interface();
            }
            return Err(fail(e.to_string()));
        }
        Ok(Kernel { api: Arc::new(api) })
    }

    pub async fn peers(&self) -> Result<Vec<PeerStatus>, DeviceError> {
        let api = Arc::clone(&self.api);
        read_peers(IMPLEMENTATION, move || api.read_interface_data()).await
    }

    pub async fn upsert_peer(&mut self, spec: &PeerSpec) -> Result<(), DeviceError> {
        let api = Arc::clone(&self.api);
        let peer = defguard_peer(spec);
        configure(IMPLEMENTATION, spec.public_key, move || {
            api.configure_peer(&peer)
        })
        .await
    }

    pub async fn remove_peer(&mut self, key: &PublicKey) -> Result<(), DeviceError> {
        let api = Arc::clone(&self.api);
        let k = Key::new(key.0);
        configure(IMPLEMENTATION, *key, move || api.remove_peer(&k)).await
    }

    pub async fn stop(self) {
        let api = Arc::clone(&self.api);
        let _ = tokio::task::spawn_blocking(move || api.remove_interface()).await;
    }
}

fn base64_key(bytes: &[u8; 32]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
