//! Can this POP serve? A pure judgement over the routing snapshot and the
//! running listeners, and what it means for the announcement.
//!
//! The **serving listeners** are those clients reach through traffic
//! steering: bound to a wildcard address, to an address inside an anycast
//! prefix, or to one of `[pop] public_addrs`. With neither anycast prefixes
//! nor public addresses configured, nothing says how clients arrive, so
//! every listener counts. The POP can serve when at least one serving
//! listener is running and the app it carries (every app, for a listener
//! without `app`) has a healthy backend in the snapshot.
//!
//! When anycast prefixes or public addresses are configured and no listener
//! is reachable at them (say a SIGHUP moved the only one to a loopback
//! address), the POP cannot serve: announcing the prefix would draw clients
//! to a port nobody accepts on.
//!
//! "At least one", not "every": backends are shared by every POP, so an app
//! whose backends are all down is down everywhere, and withdrawing every
//! POP for it would take every other app down with it. A POP whose own
//! view of the backends fails (its private network is cut) sees them all
//! unhealthy and withdraws, which is the case this guards against.

use std::net::{IpAddr, SocketAddr};

use engine::snapshot::RoutingSnapshot;
use ipnet::IpNet;

use crate::bgp::policy::{DrainCause, FailCause, Want};

/// A listener whose health decides whether the POP can serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServingListener {
    pub name: String,
    /// `None`: every app.
    pub app: Option<String>,
}

/// Which listeners count, from their addresses: see the module docs.
pub fn serving_listeners(
    listeners: &[(String, SocketAddr, Option<String>)],
    anycast: &[IpNet],
    public_addrs: &[IpAddr],
) -> Vec<ServingListener> {
    let reached = |addr: &SocketAddr| {
        let ip = addr.ip();
        ip.is_unspecified() || anycast.iter().any(|p| p.contains(&ip)) || public_addrs.contains(&ip)
    };
    let mut out: Vec<ServingListener> = listeners
        .iter()
        .filter(|(_, addr, _)| reached(addr))
        .map(|(name, _, app)| ServingListener {
            name: name.clone(),
            app: app.clone(),
        })
        .collect();
    if out.is_empty() && anycast.is_empty() && public_addrs.is_empty() {
        out = listeners
            .iter()
            .map(|(name, _, app)| ServingListener {
                name: name.clone(),
                app: app.clone(),
            })
            .collect();
    }
    out
}

/// The judgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Serving,
    /// No serving listener is running.
    ListenersDown,
    /// The running serving listeners' apps (`*`: every app) have no healthy
    /// backend.
    NoHealthyBackend {
        apps: Vec<String>,
    },
}

impl Verdict {
    pub fn is_serving(&self) -> bool {
        *self == Verdict::Serving
    }

    pub fn describe(&self) -> String {
        match self {
            Verdict::Serving => "serving".into(),
            Verdict::ListenersDown => "the serving listeners are down".into(),
            Verdict::NoHealthyBackend { apps } => {
                format!("no healthy backend for {}", apps.join(", "))
            }
        }
    }
}

/// Judges from `snapshot` and the names of the listeners running now.
pub fn judge(
    snapshot: &RoutingSnapshot,
    listeners: &[ServingListener],
    running: &[String],
) -> Verdict {
    let up: Vec<&ServingListener> = listeners
        .iter()
        .filter(|l| running.contains(&l.name))
        .collect();
    if up.is_empty() {
        return Verdict::ListenersDown;
    }
    let healthy = |app: Option<&str>| {
        snapshot
            .candidates(app)
            .iter()
            .any(|&i| snapshot.backend(i).healthy)
    };
    if up.iter().any(|l| healthy(l.app.as_deref())) {
        return Verdict::Serving;
    }
    let mut apps: Vec<String> = up
        .iter()
        .map(|l| l.app.clone().unwrap_or_else(|| "*".into()))
        .collect();
    apps.sort();
    apps.dedup();
    Verdict::NoHealthyBackend { apps }
}

/// What the POP wants from its announcement: a failure withdraws at once
/// whatever else is asked; a shutdown or an operator's drain is soft.
pub fn want(operator_drained: bool, shutting_down: bool, verdict: &Verdict) -> Want {
    match verdict {
        Verdict::ListenersDown => Want::Fail(FailCause::ListenersDown),
        Verdict::NoHealthyBackend { .. } => Want::Fail(FailCause::NoHealthyBackend),
        Verdict::Serving if shutting_down => Want::Drain(DrainCause::Shutdown),
        Verdict::Serving if operator_drained => Want::Drain(DrainCause::Operator),
        Verdict::Serving => Want::Serve,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::snapshot::{BackendRecord, SnapshotBuilder};

    fn rec(id: &str, app: &str, healthy: bool) -> BackendRecord {
        BackendRecord {
            id: id.into(),
            app: app.into(),
            region: "sa".into(),
            country: None,
            ip: "10.0.0.1".into(),
            port: 80,
            healthy,
            weight: 1,
            soft_limit: 10,
            hard_limit: 0,
            deleted: false,
        }
    }

    fn listener(name: &str, app: Option<&str>) -> ServingListener {
        ServingListener {
            name: name.into(),
            app: app.map(String::from),
        }
    }

    fn running(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn serving_while_one_serving_listener_has_a_healthy_backend() {
        let snap = SnapshotBuilder::new()
            .build(&[rec("w1", "web", false), rec("a1", "api", true)])
            .snapshot;
        let ls = [listener("web", Some("web")), listener("api", Some("api"))];
        assert_eq!(
            judge(&snap, &ls, &running(&["web", "api"])),
            Verdict::Serving
        );
        // Only the listener whose app is down runs: cannot serve.
        assert_eq!(
            judge(&snap, &ls, &running(&["web"])),
            Verdict::NoHealthyBackend {
                apps: vec!["web".into()]
            }
        );
        // A listener for every app is served by any healthy backend.
        assert_eq!(
            judge(&snap, &[listener("all", None)], &running(&["all"])),
            Verdict::Serving
        );
    }

    #[test]
    fn all_backends_unhealthy_or_none_at_all_cannot_serve() {
        let down = SnapshotBuilder::new()
            .build(&[rec("w1", "web", false), rec("w2", "web", false)])
            .snapshot;
        let ls = [listener("default", None)];
        assert_eq!(
            judge(&down, &ls, &running(&["default"])),
            Verdict::NoHealthyBackend {
                apps: vec!["*".into()]
            }
        );
        let empty = SnapshotBuilder::new().build(&[]).snapshot;
        assert!(!judge(&empty, &ls, &running(&["default"])).is_serving());
    }

    #[test]
    fn listeners_not_running_are_down() {
        let snap = SnapshotBuilder::new()
            .build(&[rec("w1", "web", true)])
            .snapshot;
        let ls = [listener("web", Some("web"))];
        assert_eq!(
            judge(&snap, &ls, &running(&["other"])),
            Verdict::ListenersDown
        );
        assert_eq!(
            Verdict::ListenersDown.describe(),
            "the serving listeners are down"
        );
    }

    #[test]
    fn serving_listeners_are_those_clients_reach() {
        let all = [
            ("any".to_string(), "0.0.0.0:80".parse().unwrap(), None),
            (
                "anycast".to_string(),
                "198.51.100.1:443".parse().unwrap(),
                Some("web".to_string()),
            ),
            (
                "public".to_string(),
                "203.0.113.10:80".parse().unwrap(),
                None,
            ),
            ("admin".to_string(), "127.0.0.1:9000".parse().unwrap(), None),
        ];
        let anycast = ["198.51.100.0/24".parse().unwrap()];
        let public = ["203.0.113.10".parse().unwrap()];
        let names: Vec<String> = serving_listeners(&all, &anycast, &public)
            .into_iter()
            .map(|l| l.name)
            .collect();
        assert_eq!(names, ["any", "anycast", "public"]);
        // Nothing configured says how clients arrive: every listener counts.
        let local = [("admin".to_string(), "127.0.0.1:9000".parse().unwrap(), None)];
        assert_eq!(serving_listeners(&local, &[], &[]).len(), 1);
        // Anycast (or public addresses) configured but no listener there:
        // none serves, so the POP withdraws instead of announcing a port
        // nobody accepts on.
        assert!(serving_listeners(&local, &anycast, &[]).is_empty());
        assert!(serving_listeners(&local, &[], &public).is_empty());
        let snap = SnapshotBuilder::new()
            .build(&[rec("w1", "web", true)])
            .snapshot;
        assert_eq!(
            judge(&snap, &[], &running(&["admin"])),
            Verdict::ListenersDown
        );
    }

    #[test]
    fn failures_withdraw_whatever_else_is_asked_and_drains_are_soft() {
        let no = Verdict::NoHealthyBackend { apps: vec![] };
        assert_eq!(
            want(true, true, &no),
            Want::Fail(FailCause::NoHealthyBackend)
        );
        assert_eq!(
            want(false, false, &Verdict::ListenersDown),
            Want::Fail(FailCause::ListenersDown)
        );
        assert_eq!(
            want(true, true, &Verdict::Serving),
            Want::Drain(DrainCause::Shutdown)
        );
        assert_eq!(
            want(true, false, &Verdict::Serving),
            Want::Drain(DrainCause::Operator)
        );
        assert_eq!(want(false, false, &Verdict::Serving), Want::Serve);
    }
}
