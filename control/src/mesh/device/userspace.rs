//! `wireguard-go` as the WireGuard device: a child process in the
//! foreground (`wireguard-go -f <interface>`), configured over its UAPI
//! socket with defguard_wireguard_rs's client.
//!
//! The child gets `PR_SET_PDEATHSIG`: if edgeproxy dies, even by SIGKILL,
//! the kernel sends it SIGTERM and the interface goes with it. On a
//! graceful stop the child is sent SIGTERM and waited for. A child that
//! exits on its own (killed) is seen by [`WireguardGo::exited`]; the driver
//! then starts another one. Calls to the
//! UAPI socket block (a few ms), so they run on the blocking pool.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use defguard_wireguard_rs::{host::Host, key::Key, Userspace, WGApi, WireguardInterfaceApi};

use super::{
    configure, defguard_peer, read_peers, DeviceError, DeviceSettings, PeerSpec, PeerStatus,
};
use crate::mesh::keys::PublicKey;

const IMPLEMENTATION: &str = "wireguard-go";
/// How long `wireguard-go` gets to create its socket.
const START_PATIENCE: Duration = Duration::from_secs(10);

pub struct WireguardGo {
    api: Arc<WGApi<Userspace>>,
    child: Arc<Mutex<Child>>,
    socket: PathBuf,
}

impl WireguardGo {
    pub async fn create(s: &DeviceSettings<'_>) -> Result<WireguardGo, DeviceError> {
        let fail = |cause: String| DeviceError::Create {
            interface: s.interface.to_string(),
            implementation: IMPLEMENTATION,
            cause,
        };
        let socket = super::embedded::uapi_socket(s.interface);
        // A socket left by a killed run would make us talk to nobody.
        let _ = std::fs::remove_file(&socket);
        let child = spawn(s.wireguard_go, s.interface).map_err(|e| {
            fail(format!(
                "cannot run {}: {e} (apt-get install wireguard-go, or set mesh.wireguard_go)",
                s.wireguard_go.display()
            ))
        })?;
        let child = Arc::new(Mutex::new(child));
        let deadline = Instant::now() + START_PATIENCE;
        while !socket.exists() {
            if let Ok(Some(status)) = child.lock().expect("not poisoned").try_wait() {
                return Err(fail(format!("wireguard-go exited at start: {status}")));
            }
            if Instant::now() > deadline {
                kill(&child);
                return Err(fail(format!(
                    "wireguard-go did not create {} within {START_PATIENCE:?}",
                    socket.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let api = Arc::new(WGApi::<Userspace>::new(s.interface).map_err(|e| fail(e.to_string()))?);
        let host = Host::new(s.listen_port, Key::new(*s.private_key.expose()));
        let a = Arc::clone(&api);
        let written = tokio::task::spawn_blocking(move || a.write_host(&host))
            .await
            .map_err(|e| fail(e.to_string()))?;
        if let Err(e) = written {
            kill(&child);
            return Err(fail(format!(
                "cannot set the key and port {}: {e}",
                s.listen_port
            )));
        }
        Ok(WireguardGo { api, child, socket })
    }

    pub async fn peers(&self) -> Result<Vec<PeerStatus>, DeviceError> {
        let api = Arc::clone(&self.api);
        read_peers(IMPLEMENTATION, move || api.read_host()).await
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

    /// How the child ended, if it has (reaped here; asking again gives
    /// the same answer).
    pub fn exited(&self) -> Option<std::process::ExitStatus> {
        self.child
            .lock()
            .expect("not poisoned")
            .try_wait()
            .ok()
            .flatten()
    }

    pub async fn stop(self) {
        let child = Arc::clone(&self.child);
        let _ = tokio::task::spawn_blocking(move || kill(&child)).await;
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn spawn(program: &Path, interface: &str) -> std::io::Result<Child> {
    let mut cmd = Command::new(program);
    cmd.arg("-f")
        .arg(interface)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        // Its own logging is at error level unless asked for.
        .env("LOG_LEVEL", "error");
    // SAFETY: prctl is async-signal-safe; nothing else runs in the child
    // between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// SIGTERM, then SIGKILL after 2 s; reaps the child.
fn kill(child: &Mutex<Child>) {
    let mut child = child.lock().expect("not poisoned");
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}
