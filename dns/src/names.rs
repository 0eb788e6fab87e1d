//! What a query name asks for, relative to the zone's domain.
//!
//! Names are compared case-insensitively: [`relative`] lower-cases the labels
//! left of the domain into a caller-owned buffer (no allocation once the
//! buffer has grown), and [`classify`] maps that text to a [`Target`].
//!
//! | name (relative to `<domain>`) | target |
//! |---|---|
//! | (the apex itself) | [`Target::Apex`] |
//! | `ns` | [`Target::NsHost`] |
//! | `<region>.backends` | [`Target::RegionBackends`] |
//! | `<region>.pops` | [`Target::RegionPops`] |
//! | `_<app>._tcp` | [`Target::Srv`] |
//! | anything else | [`Target::Node`]: an app (`web`, `api.v2`), a backend (`<id>.<app>`) or nothing |

use hickory_proto::rr::Name;

use crate::zone::NS_LABEL;

/// Label of the per-region backend lists.
pub const BACKENDS_LABEL: &str = "backends";
/// Label of the per-region POP lists.
pub const POPS_LABEL: &str = "pops";
/// Protocol label of SRV names.
pub const TCP_LABEL: &str = "_tcp";

/// What a name inside the zone refers to. Text is lower case and relative to
/// the domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    Apex,
    NsHost,
    RegionBackends(&'a str),
    RegionPops(&'a str),
    /// `_<app>._tcp`: the app's name without the underscore.
    Srv(&'a str),
    /// Any other name: the whole relative name, labels joined by dots.
    Node(&'a str),
}

/// Where a query name is, as [`relative`] found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Not the domain nor below it.
    Outside,
    /// Below the domain, but a label holds a dot or a byte that is not
    /// printable ASCII: it matches nothing we serve (NXDOMAIN).
    Unusable,
    /// Below the domain; the relative text was written.
    Inside,
}

/// Writes the labels of `qname` left of `domain`, lower-cased and joined by
/// dots, into `out` (cleared first; empty for the apex).
pub fn relative(qname: &Name, domain: &Name, out: &mut String) -> Placement {
    out.clear();
    if !domain.zone_of(qname) {
        return Placement::Outside;
    }
    let own = qname.num_labels().saturating_sub(domain.num_labels()) as usize;
    for (i, label) in qname.iter().take(own).enumerate() {
        if i > 0 {
            out.push('.');
        }
        for &b in label {
            if !b.is_ascii_graphic() || b == b'.' {
                return Placement::Unusable;
            }
            out.push(b.to_ascii_lowercase() as char);
        }
    }
    Placement::Inside
}

/// Maps a relative, lower-case name (as written by [`relative`]) to what it
/// refers to.
pub fn classify(rel: &str) -> Target<'_> {
    if rel.is_empty() {
        return Target::Apex;
    }
    if rel == NS_LABEL {
        return Target::NsHost;
    }
    if let Some((first, rest)) = rel.split_once('.') {
        if rest == BACKENDS_LABEL {
            return Target::RegionBackends(first);
        }
        if rest == POPS_LABEL {
            return Target::RegionPops(first);
        }
    }
    if let Some(service) = rel
        .strip_suffix(TCP_LABEL)
        .and_then(|s| s.strip_suffix('.'))
    {
        if let Some(app) = service.strip_prefix('_').filter(|a| !a.is_empty()) {
            return Target::Srv(app);
        }
    }
    Target::Node(rel)
}

/// True when an app named `app` (relative, lower case) can be served: its
/// own name and the names of backends below it classify as
/// [`Target::Node`], not as one of the zone's own names. `ns`, `backends`
/// and `pops` (and `<x>.backends`, `<x>.pops`) cannot: `ns.<domain>` is the
/// POP's name server and `<id>.backends.<domain>` a region's list, so their
/// SRV targets would name something else. The discovery API refuses such
/// apps; a row written to routing.db by hand with one is proxied but has no
/// DNS name.
pub fn is_servable_app(app: &str) -> bool {
    !app.is_empty()
        && classify(app) == Target::Node(app)
        && matches!(classify(&format!("backend.{app}")), Target::Node(_))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(q: &str) -> Option<String> {
        let domain = Name::from_ascii("internal.").unwrap();
        let mut out = String::new();
        match relative(&Name::from_ascii(q).unwrap(), &domain, &mut out) {
            Placement::Inside => Some(out),
            Placement::Outside => None,
            Placement::Unusable => panic!("unusable: {q}"),
        }
    }

    #[test]
    fn names_are_lowercased_relative_to_the_domain() {
        assert_eq!(rel("WeB.InTeRnAl."), Some("web".into()));
        assert_eq!(rel("a.B.internal."), Some("a.b".into()));
        assert_eq!(rel("INTERNAL."), Some(String::new()));
        assert_eq!(rel("web.example."), None);
        assert_eq!(rel("internal.example."), None);
        assert_eq!(rel("."), None);
    }

    #[test]
    fn labels_with_dots_or_binary_bytes_match_nothing() {
        let domain = Name::from_ascii("internal.").unwrap();
        let mut out = String::new();
        let dotted = Name::from_labels([&b"a.b"[..], b"internal"]).unwrap();
        assert_eq!(relative(&dotted, &domain, &mut out), Placement::Unusable);
        let binary = Name::from_labels([&b"a\x00"[..], b"internal"]).unwrap();
        assert_eq!(relative(&binary, &domain, &mut out), Placement::Unusable);
    }

    #[test]
    fn classification() {
        assert_eq!(classify(""), Target::Apex);
        assert_eq!(classify("ns"), Target::NsHost);
        assert_eq!(classify("sa.backends"), Target::RegionBackends("sa"));
        assert_eq!(classify("eu.pops"), Target::RegionPops("eu"));
        assert_eq!(classify("_web._tcp"), Target::Srv("web"));
        assert_eq!(classify("_api.v2._tcp"), Target::Srv("api.v2"));
        assert_eq!(classify("web"), Target::Node("web"));
        assert_eq!(classify("backends"), Target::Node("backends"));
        assert_eq!(classify("x.sa.backends"), Target::Node("x.sa.backends"));
        assert_eq!(classify("_._tcp"), Target::Node("_._tcp"));
        assert_eq!(classify("web._tcp"), Target::Node("web._tcp"));
        assert_eq!(classify("b1.web"), Target::Node("b1.web"));
    }

    #[test]
    fn apps_named_like_the_zones_own_names_cannot_be_served() {
        for app in [
            "ns",
            "backends",
            "pops",
            "sa.backends",
            "eu.pops",
            "_web._tcp",
            "",
        ] {
            assert!(!is_servable_app(app), "{app:?}");
        }
        for app in [
            "web",
            "api.v2",
            "nsx",
            "backends-eu",
            "a.b.backends",
            "_tcp",
        ] {
            assert!(is_servable_app(app), "{app:?}");
        }
    }
}
