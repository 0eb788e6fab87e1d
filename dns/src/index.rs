//! Per-snapshot lookup tables for answering: apps, backends and regions by
//! lower-case name, healthy backends only.
//!
//! A [`ZoneIndex`] is derived from one [`RoutingSnapshot`] (and the zone's
//! POPs) and is as immutable as the snapshot: it is rebuilt, once, when a
//! query first sees a new snapshot (see [`IndexCache`]). Live connection
//! counts are not copied: answers read them from the snapshot's backends at
//! query time, as the proxy does.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use engine::snapshot::{BackendIdx, RoutingSnapshot};
use hickory_proto::rr::Name;

use crate::names::{classify, is_servable_app, Target, BACKENDS_LABEL, POPS_LABEL, TCP_LABEL};
use crate::zone::{ZoneConfig, NS_LABEL};

/// One app's healthy backends.
#[derive(Debug, Default)]
pub struct AppEntry {
    /// IPv4 backends, table order: candidates for A answers.
    pub v4: Vec<BackendIdx>,
    /// IPv6 backends, table order: candidates for AAAA answers.
    pub v6: Vec<BackendIdx>,
    /// SRV targets: backends whose id is usable as one DNS label, with their
    /// name `<id>.<app>.<domain>`. A backend whose id holds a dot, a space or
    /// more than 63 bytes has no name and so no SRV record.
    pub srv: Vec<(BackendIdx, Name)>,
    /// Backend by lower-case id (only ids usable as a label).
    ids: HashMap<Box<str>, BackendIdx>,
}

impl AppEntry {
    pub fn backend(&self, id: &str) -> Option<BackendIdx> {
        self.ids.get(id).copied()
    }
}

/// Lookup tables for one snapshot.
#[derive(Debug)]
pub struct ZoneIndex {
    /// Which snapshot this was built from (version and address).
    key: (u64, usize),
    apps: HashMap<Box<str>, AppEntry>,
    /// Healthy backends by lower-case region name.
    regions: HashMap<Box<str>, Vec<BackendIdx>>,
    /// Names (relative, lower case) that exist only because names below them
    /// do ("empty non-terminals"): they answer NODATA, not NXDOMAIN.
    empty_nonterminals: HashSet<Box<str>>,
}

fn key_of(snapshot: &RoutingSnapshot) -> (u64, usize) {
    (
        snapshot.version,
        snapshot as *const RoutingSnapshot as usize,
    )
}

/// True when `text` can be one label of a host-like name.
fn usable_label(text: &str) -> bool {
    (1..=63).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_graphic() && b != b'.')
}

/// `<id>.<app>.<domain>`, the name a backend is answered under, when `id`
/// (lower case) can be one label of it and the name is the backend's (not
/// one of the zone's own, see [`classify`]). Built from the labels' bytes,
/// not parsed from text: a `\` or `"` in a hand-written id is a byte of the
/// label, as in the query names that ask for it, not an escape.
fn backend_name(id: &str, app: &str, domain: &Name) -> Option<Name> {
    if !usable_label(id) || !matches!(classify(&format!("{id}.{app}")), Target::Node(_)) {
        return None;
    }
    let labels = std::iter::once(id).chain(app.split('.')).map(str::as_bytes);
    Name::from_labels(labels).ok()?.append_domain(domain).ok()
}

impl ZoneIndex {
    pub fn build(snapshot: &RoutingSnapshot, zone: &ZoneConfig) -> ZoneIndex {
        let mut apps: HashMap<Box<str>, AppEntry> = HashMap::new();
        let mut regions: HashMap<Box<str>, Vec<BackendIdx>> = HashMap::new();
        for (i, b) in snapshot.backends.iter().enumerate() {
            if !b.healthy || b.app.is_empty() {
                continue;
            }
            let idx = i as BackendIdx;
            regions
                .entry(snapshot.region_name(b.region).into())
                .or_default()
                .push(idx);
            let app_key: Box<str> = b.app.to_ascii_lowercase().into();
            if !is_servable_app(&app_key) {
                continue;
            }
            let entry = apps.entry(app_key.clone()).or_default();
            match b.addr {
                SocketAddr::V4(_) => entry.v4.push(idx),
                SocketAddr::V6(_) => entry.v6.push(idx),
            }
            let id = b.id.to_ascii_lowercase();
            if let Some(target) = backend_name(&id, &app_key, zone.domain()) {
                entry.ids.insert(id.into(), idx);
                entry.srv.push((idx, target));
            }
        }

        // Every name that holds records; their ancestors inside the zone are
        // empty non-terminals unless they hold records themselves.
        let mut names: Vec<String> = vec![NS_LABEL.to_string()];
        for (app, entry) in &apps {
            names.push(app.to_string());
            names.push(format!("_{app}.{TCP_LABEL}"));
            names.extend(entry.ids.keys().map(|id| format!("{id}.{app}")));
        }
        names.extend(regions.keys().map(|r| format!("{r}.{BACKENDS_LABEL}")));
        names.extend(
            zone.pops()
                .iter()
                .map(|p| format!("{}.{POPS_LABEL}", p.region)),
        );
        names.extend(
            snapshot
                .pops
                .iter()
                .filter(|p| usable_label(&p.region))
                .map(|p| format!("{}.{POPS_LABEL}", p.region)),
        );
        let mut empty_nonterminals = HashSet::new();
        for name in &names {
            let mut rest = name.as_str();
            while let Some((_, parent)) = rest.split_once('.') {
                if !apps.contains_key(parent) {
                    empty_nonterminals.insert(Box::from(parent));
                }
                rest = parent;
            }
        }

        ZoneIndex {
            key: key_of(snapshot),
            apps,
            regions,
            empty_nonterminals,
        }
    }

    /// True when this index was built from `snapshot`.
    pub fn is_for(&self, snapshot: &RoutingSnapshot) -> bool {
        self.key == key_of(snapshot)
    }

    pub fn app(&self, name: &str) -> Option<&AppEntry> {
        self.apps.get(name)
    }

    /// Healthy backends of `region` (lower case), table order.
    pub fn region(&self, name: &str) -> Option<&[BackendIdx]> {
        self.regions.get(name).map(Vec::as_slice)
    }

    pub fn is_empty_nonterminal(&self, rel: &str) -> bool {
        self.empty_nonterminals.contains(rel)
    }
}

/// The index of the latest snapshot seen, shared by every task of one
/// server (UDP loop, TCP connections) so each snapshot is indexed once.
#[derive(Debug, Clone, Default)]
pub struct IndexCache(Arc<Mutex<Option<Arc<ZoneIndex>>>>);

impl IndexCache {
    /// The index for `snapshot`, building it if the cached one is older.
    pub fn get(&self, snapshot: &RoutingSnapshot, zone: &ZoneConfig) -> Arc<ZoneIndex> {
        // The lock is never held across an await and the server runs on one
        // thread: it is never contended. A poisoned lock only means a panic
        // while building; the cache is rebuilt below either way.
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match slot.as_ref() {
            Some(index) if index.is_for(snapshot) => Arc::clone(index),
            _ => {
                let index = Arc::new(ZoneIndex::build(snapshot, zone));
                *slot = Some(Arc::clone(&index));
                index
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::snapshot::{BackendRecord, SnapshotBuilder};

    fn rec(id: &str, app: &str, region: &str, ip: &str, healthy: bool) -> BackendRecord {
        BackendRecord {
            id: id.into(),
            app: app.into(),
            region: region.into(),
            country: None,
            ip: ip.into(),
            port: 80,
            healthy,
            weight: 1,
            soft_limit: 10,
            hard_limit: 0,
            deleted: false,
        }
    }

    #[test]
    fn only_healthy_backends_are_indexed_by_lowercase_name() {
        let snap = SnapshotBuilder::new()
            .build(&[
                rec("B1", "Web", "sa", "10.0.0.1", true),
                rec("b2", "web", "eu", "fd00::2", true),
                rec("b3", "web", "eu", "10.0.0.3", false),
                rec("with.dot", "web", "sa", "10.0.0.4", true),
            ])
            .snapshot;
        let zone = ZoneConfig::new("internal", 5, "sa", Vec::new(), Vec::new()).unwrap();
        let index = ZoneIndex::build(&snap, &zone);
        let web = index.app("web").unwrap();
        assert_eq!(web.v4, [0, 3]);
        assert_eq!(web.v6, [1]);
        assert_eq!(web.backend("b1"), Some(0));
        assert_eq!(web.backend("b3"), None);
        let targets: Vec<String> = web.srv.iter().map(|(_, n)| n.to_ascii()).collect();
        assert_eq!(targets, ["b1.web.internal.", "b2.web.internal."]);
        assert_eq!(index.region("eu"), Some(&[1][..]));
        assert_eq!(index.region("sa"), Some(&[0, 3][..]));
        assert!(index.app("Web").is_none());
        assert!(index.is_for(&snap));
    }

    #[test]
    fn apps_named_like_the_zones_own_names_get_no_dns_name_but_stay_in_their_region() {
        let snap = SnapshotBuilder::new()
            .build(&[
                rec("n1", "ns", "sa", "10.0.0.1", true),
                rec("sa", "backends", "sa", "10.0.0.2", true),
                rec("x", "pops", "eu", "10.0.0.3", true),
                rec("w1", "web", "sa", "10.0.0.4", true),
            ])
            .snapshot;
        let zone = ZoneConfig::new("internal", 5, "sa", Vec::new(), Vec::new()).unwrap();
        let index = ZoneIndex::build(&snap, &zone);
        for app in ["ns", "backends", "pops"] {
            assert!(index.app(app).is_none(), "{app}");
        }
        assert_eq!(index.app("web").unwrap().backend("w1"), Some(3));
        assert_eq!(index.region("sa"), Some(&[0, 1, 3][..]));
        assert_eq!(index.region("eu"), Some(&[2][..]));
    }

    #[test]
    fn backend_names_are_built_from_label_bytes_not_parsed() {
        let snap = SnapshotBuilder::new()
            .build(&[
                rec("back\\slash", "a\\b", "sa", "10.0.0.1", true),
                rec("q\"uote", "we\"ird", "sa", "10.0.0.2", true),
            ])
            .snapshot;
        let zone = ZoneConfig::new("internal", 5, "sa", Vec::new(), Vec::new()).unwrap();
        let index = ZoneIndex::build(&snap, &zone);
        for (app, id) in [("a\\b", "back\\slash"), ("we\"ird", "q\"uote")] {
            let entry = index.app(app).unwrap();
            assert!(entry.backend(id).is_some(), "{id}");
            let [(_, target)] = entry.srv.as_slice() else {
                panic!("{app}: {:?}", entry.srv);
            };
            let labels: Vec<&[u8]> = target.iter().collect();
            assert_eq!(labels, [id.as_bytes(), app.as_bytes(), b"internal"]);
        }
    }

    #[test]
    fn ancestors_of_names_are_empty_nonterminals() {
        let snap = SnapshotBuilder::new()
            .build(&[
                rec("b1", "api.v2", "sa", "10.0.0.1", true),
                rec("b2", "v2", "sa", "10.0.0.2", false),
            ])
            .snapshot;
        let zone = ZoneConfig::new("internal", 5, "sa", Vec::new(), Vec::new()).unwrap();
        let index = ZoneIndex::build(&snap, &zone);
        for ent in ["v2", "backends", "_tcp", "v2._tcp", "api.v2"] {
            let expected = ent != "api.v2";
            assert_eq!(index.is_empty_nonterminal(ent), expected, "{ent}");
        }
        assert!(!index.is_empty_nonterminal("pops"), "no POP configured");
    }
}
