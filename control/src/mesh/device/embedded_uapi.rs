//! The embedded device's UAPI socket, `/var/run/wireguard/<interface>.sock`,
//! through which `wg show` reads it like any WireGuard interface.
//!
//! gotatun's own `UapiServer::default_unix_socket` spawns an accept loop
//! that never ends: every device stopped (an interface deleted by hand and
//! built again, each failed start while the old device still held the UDP
//! port) left a listening socket and a task behind for the life of the
//! process. Here the accept loop belongs to the device and ends with it.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use gotatun::device::uapi::{UapiClient, UapiServer};

/// Where `wg` looks for an interface's UAPI socket.
pub fn path(interface: &str) -> PathBuf {
    PathBuf::from(format!("/var/run/wireguard/{interface}.sock"))
}

/// The listening socket and its accept loop; dropped, the loop ends and the
/// socket closes (the path stays: a successor may have bound it already).
pub struct UapiSocket {
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for UapiSocket {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl UapiSocket {
    /// Binds the socket (mode 0600, root only: a `get` returns the private
    /// key), replacing whatever was at the path, and serves each connection
    /// on a thread of its own (gotatun's blocking protocol handler) through
    /// the returned server, which the device answers.
    pub fn bind(interface: &str) -> Result<(UapiSocket, UapiServer), String> {
        let path = path(interface);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(format!("removing the old {}: {e}", path.display()));
            }
            _ => {}
        }
        let listener = tokio::net::UnixListener::bind(&path)
            .map_err(|e| format!("binding {}: {e}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("chmod {}: {e}", path.display()))?;
        let (client, server) = UapiServer::new();
        let accept = tokio::spawn(accept_loop(listener, client));
        Ok((UapiSocket { accept }, server))
    }
}

async fn accept_loop(listener: tokio::net::UnixListener, client: UapiClient) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, most likely: `wg show` fails until
                // some are free; the device itself is not affected.
                tracing::warn!(error = %e, "mesh: cannot accept a UAPI connection");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "mesh: UAPI connection unusable");
                continue;
            }
        };
        // gotatun's handler reads and writes blocking, on its own thread.
        if let Err(e) = stream.set_nonblocking(false) {
            tracing::warn!(error = %e, "mesh: UAPI connection unusable");
            continue;
        }
        client.clone().wrap_read_write(stream);
    }
}
