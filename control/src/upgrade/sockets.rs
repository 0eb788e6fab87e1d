//! The sockets a binary upgrade hands over, by name, on both sides.
//!
//! **Old process.** Whoever binds a socket that must outlive the process
//! across an upgrade registers a duplicate of it here under a stable name
//! ([`register`]); at upgrade time every entry, plus the data plane's
//! listeners (taken from the engine), is sent to the successor. Names in
//! use: `listener:<name>` (one socket per shard, in `SO_REUSEPORT` group
//! order), `api`, `metrics`, `dns-udp` (one per UDP worker), `dns-tcp`,
//! `control` (the upgrade control socket), `replication-gossip`,
//! `replication-transport`, `mesh-tun` (the embedded mesh's TUN device, not
//! a socket). Add an entry for any new socket with the same
//! two calls: `register` after binding, `take_*` instead of binding when
//! inherited.
//!
//! **Successor.** What arrived is kept until a component claims it with
//! the `take_*` function of its kind, checked against the address it would
//! bind (a socket on another address, or of another kind, is closed and the
//! component binds afresh). [`release_unclaimed`] closes what no component
//! claimed, e.g. a listener the new configuration removed.
//!
//! Both tables are process-wide, like the environment a process inherits:
//! sockets are bound in several modules that otherwise share nothing.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use socket2::{SockRef, Type};

type Table = BTreeMap<String, Vec<OwnedFd>>;

static REGISTERED: Mutex<Table> = Mutex::new(BTreeMap::new());
static INHERITED: Mutex<Table> = Mutex::new(BTreeMap::new());

fn lock(table: &'static Mutex<Table>) -> MutexGuard<'static, Table> {
    table.lock().unwrap_or_else(|p| p.into_inner())
}

/// Registers duplicates of `sockets` under `name` (replacing an earlier
/// entry), to be handed to a successor.
pub fn register(name: &str, sockets: &[BorrowedFd<'_>]) -> std::io::Result<()> {
    let dups = sockets
        .iter()
        .map(|s| s.try_clone_to_owned())
        .collect::<std::io::Result<Vec<_>>>()?;
    lock(&REGISTERED).insert(name.to_string(), dups);
    Ok(())
}

/// Forgets `name` (its socket is closed or no longer to be handed over).
pub fn unregister(name: &str) {
    lock(&REGISTERED).remove(name);
}

/// Duplicates of every registered socket, for a hand-off.
pub(crate) fn registered() -> std::io::Result<Vec<(String, Vec<OwnedFd>)>> {
    lock(&REGISTERED)
        .iter()
        .map(|(name, fds)| {
            let dups = fds
                .iter()
                .map(|fd| fd.try_clone())
                .collect::<std::io::Result<Vec<_>>>()?;
            Ok((name.clone(), dups))
        })
        .collect()
}

/// Stores what a predecessor handed over.
pub(crate) fn set_inherited(entries: Table) {
    *lock(&INHERITED) = entries;
}

/// Whether anything inherited is still unclaimed.
pub fn has_inherited() -> bool {
    !lock(&INHERITED).is_empty()
}

/// `bound` is what `wanted` asks for: the same address, or any port on the
/// same IP when `wanted` asks for port 0.
fn addr_matches(bound: SocketAddr, wanted: SocketAddr) -> bool {
    bound == wanted || (wanted.port() == 0 && bound.ip() == wanted.ip())
}

/// Takes entry `name` if every socket in it passes `fits`; else closes it
/// (with a warning naming why) and returns `None`.
fn take_checked(name: &str, fits: impl Fn(&OwnedFd) -> Result<(), String>) -> Option<Vec<OwnedFd>> {
    let fds = lock(&INHERITED).remove(name)?;
    if fds.is_empty() {
        return None;
    }
    match fds.iter().try_for_each(&fits) {
        Ok(()) => {
            tracing::debug!(
                name,
                sockets = fds.len(),
                "upgrade: took over inherited socket"
            );
            Some(fds)
        }
        Err(why) => {
            tracing::warn!(name, %why, "upgrade: inherited socket does not fit the new configuration; closed, binding afresh");
            None
        }
    }
}

fn check_kind(fd: &OwnedFd, kind: Type, listening: bool) -> Result<SocketAddr, String> {
    let socket = SockRef::from(fd);
    let got = socket.r#type().map_err(|e| format!("not a socket: {e}"))?;
    if got != kind {
        return Err(format!("a {got:?} socket, not {kind:?}"));
    }
    if listening && !socket.is_listener().map_err(|e| e.to_string())? {
        return Err("not listening".into());
    }
    socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .ok_or_else(|| "not an IP socket".to_string())
}

fn check_addr(fd: &OwnedFd, kind: Type, listening: bool, wanted: SocketAddr) -> Result<(), String> {
    let bound = check_kind(fd, kind, listening)?;
    if addr_matches(bound, wanted) {
        Ok(())
    } else {
        Err(format!("bound to {bound}, configured {wanted}"))
    }
}

/// A listening TCP socket inherited as `name` on `addr`.
pub fn take_tcp_listener(name: &str, addr: SocketAddr) -> Option<TcpListener> {
    take_tcp_listeners(name, addr)?.into_iter().next()
}

/// Every listening TCP socket inherited as `name` on `addr`, in order.
pub fn take_tcp_listeners(name: &str, addr: SocketAddr) -> Option<Vec<TcpListener>> {
    let fds = take_checked(name, |fd| check_addr(fd, Type::STREAM, true, addr))?;
    Some(fds.into_iter().map(TcpListener::from).collect())
}

/// The sockets of data-plane listener `listener` on `addr`: the entry
/// `listener:<listener>`, or else the one `listener:*` entry on exactly
/// that address (the listener was renamed, its socket is still the one).
pub fn take_listener_group(listener: &str, addr: SocketAddr) -> Option<Vec<TcpListener>> {
    let name = format!("listener:{listener}");
    if lock(&INHERITED).contains_key(&name) {
        return take_tcp_listeners(&name, addr);
    }
    if addr.port() == 0 {
        return None;
    }
    let renamed = lock(&INHERITED)
        .iter()
        .find(|(n, fds)| {
            n.starts_with("listener:")
                && fds
                    .first()
                    .is_some_and(|fd| check_addr(fd, Type::STREAM, true, addr).is_ok())
        })
        .map(|(n, _)| n.clone())?;
    take_tcp_listeners(&renamed, addr)
}

/// Every UDP socket inherited as `name` on `addr`, in order.
pub fn take_udp_sockets(name: &str, addr: SocketAddr) -> Option<Vec<UdpSocket>> {
    let fds = take_checked(name, |fd| check_addr(fd, Type::DGRAM, false, addr))?;
    Some(fds.into_iter().map(UdpSocket::from).collect())
}

/// A listening Unix socket inherited as `name`, bound to `path`.
pub fn take_unix_listener(name: &str, path: &Path) -> Option<UnixListener> {
    let fds = take_checked(name, |fd| {
        let socket = SockRef::from(fd);
        if !socket.is_listener().map_err(|e| e.to_string())? {
            return Err("not listening".into());
        }
        let bound = socket.local_addr().map_err(|e| e.to_string())?;
        match bound.as_pathname() {
            Some(p) if p == path => Ok(()),
            other => Err(format!("bound to {other:?}, configured {}", path.display())),
        }
    })?;
    fds.into_iter().next().map(UnixListener::from)
}

/// A descriptor inherited as `name` that is not a socket (the mesh's TUN
/// device), if `fits` accepts it; else it is closed.
pub fn take_device(name: &str, fits: impl Fn(&OwnedFd) -> Result<(), String>) -> Option<OwnedFd> {
    take_checked(name, fits)?.into_iter().next()
}

/// Closes every inherited socket nothing claimed; returns their names.
pub fn release_unclaimed() -> Vec<String> {
    let left = std::mem::take(&mut *lock(&INHERITED));
    for (name, fds) in &left {
        tracing::info!(
            name,
            sockets = fds.len(),
            "upgrade: inherited socket not used by this configuration; closed"
        );
    }
    left.into_keys().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    // The tables are process-wide: one test drives them all, in order.
    #[test]
    fn inherited_sockets_are_taken_by_kind_and_address_and_the_rest_released() {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp_addr = tcp.local_addr().unwrap();
        let other = TcpListener::bind("127.0.0.1:0").unwrap();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let udp_addr = udp.local_addr().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let unix = UnixListener::bind(&path).unwrap();

        let mut table = Table::new();
        let dup = |fd: BorrowedFd<'_>| vec![fd.try_clone_to_owned().unwrap()];
        table.insert("listener:web".into(), dup(tcp.as_fd()));
        table.insert("listener:old-name".into(), dup(other.as_fd()));
        table.insert("api".into(), dup(tcp.as_fd()));
        table.insert("dns-udp".into(), dup(udp.as_fd()));
        table.insert("dns-tcp".into(), dup(udp.as_fd()));
        table.insert("control".into(), dup(unix.as_fd()));
        table.insert("gone".into(), dup(udp.as_fd()));
        set_inherited(table);
        assert!(has_inherited());

        // Wrong address: refused (and closed), the caller binds afresh.
        assert!(take_tcp_listener("api", "127.0.0.1:1".parse().unwrap()).is_none());
        assert!(
            take_tcp_listener("api", tcp_addr).is_none(),
            "already closed"
        );
        // Right name and address, or port 0 on the same IP.
        let got = take_listener_group("web", "127.0.0.1:0".parse().unwrap()).unwrap();
        assert_eq!(got[0].local_addr().unwrap(), tcp_addr);
        // A renamed listener is found by its address.
        let renamed = take_listener_group("new-name", other.local_addr().unwrap()).unwrap();
        assert_eq!(
            renamed[0].local_addr().unwrap(),
            other.local_addr().unwrap()
        );
        // Kinds are checked: a UDP socket is no TCP listener.
        assert!(take_tcp_listener("dns-tcp", udp_addr).is_none());
        assert_eq!(take_udp_sockets("dns-udp", udp_addr).unwrap().len(), 1);
        assert!(take_unix_listener("control", &dir.path().join("other.sock")).is_none());
        assert!(take_unix_listener("missing", &path).is_none());

        assert_eq!(release_unclaimed(), vec!["gone".to_string()]);
        assert!(!has_inherited());
    }

    #[test]
    fn registered_sockets_are_duplicates_that_outlive_the_original() {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = udp.local_addr().unwrap();
        register("test-registry-entry", &[udp.as_fd()]).unwrap();
        drop(udp);
        let all = registered().unwrap();
        let (_, fds) = all
            .into_iter()
            .find(|(n, _)| n == "test-registry-entry")
            .unwrap();
        let socket = UdpSocket::from(fds.into_iter().next().unwrap());
        assert_eq!(socket.local_addr().unwrap(), addr);
        unregister("test-registry-entry");
        assert!(registered()
            .unwrap()
            .iter()
            .all(|(n, _)| n != "test-registry-entry"));
    }
}
