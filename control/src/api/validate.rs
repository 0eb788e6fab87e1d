//! Registration requests: JSON body in, a routing record or the first bad
//! field out. Pure: no I/O, no clock.
//!
//! The fields and defaults are the original edgeProxy's `RegisterRequest`
//! (`id, app, region, country?, ip, port, weight = 2, soft_limit = 100,
//! hard_limit = 150`), plus `health_check`. A field of another name that
//! misspells one of those is refused, naming it: the original ignored it,
//! so `"wieght": 5` registered a backend of weight 2 and the agent never
//! heard of its typo. Any other unknown field is ignored, as the original
//! does (a 400 there would break agents that send extras and got a 201),
//! and listed in the reply's `ignored_fields` ([`ignored_fields`]). It
//! is stricter about values the original accepted and then did not route as asked:
//! weight or soft limit 0 (which it, and the loader here for rows written by
//! hand, reads as 1: a weight of 0 still takes traffic; see
//! `engine::snapshot::RecordNote`), a hard limit below the soft limit, an
//! address that cannot be connected to, an id or app that cannot appear in a
//! URL path or in the internal DNS (`<id>.<app>.internal`: each must be one
//! DNS label, or the backend is routed but invisible in DNS).

use std::borrow::Cow;
use std::net::IpAddr;

use engine::own_listeners::OwnListeners;
use engine::snapshot::{BackendRecord, Country};
use serde_json::{Map, Value};

pub const DEFAULT_WEIGHT: i64 = 2;
pub const DEFAULT_SOFT_LIMIT: i64 = 100;
pub const DEFAULT_HARD_LIMIT: i64 = 150;
/// Longest id or app name, in bytes: one DNS label.
pub const MAX_LABEL_LEN: usize = 63;
/// Longest region name, in bytes.
pub const MAX_REGION_LEN: usize = 32;

/// Every field a registration may carry, in the order they are checked.
pub const FIELDS: [&str; 10] = [
    "id",
    "app",
    "region",
    "country",
    "ip",
    "port",
    "weight",
    "soft_limit",
    "hard_limit",
    "health_check",
];

/// The first problem found in a request body: which field (`"body"` for the
/// document itself, the key as sent for an unknown one) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: Cow<'static, str>,
    pub reason: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

fn bad(field: &'static str, reason: impl Into<String>) -> FieldError {
    FieldError {
        field: Cow::Borrowed(field),
        reason: reason.into(),
    }
}

/// Refuses the first key of `obj` that is not one of [`FIELDS`] but
/// misspells one the body lacks (see [`misspelt`]), naming it.
fn misspelt_fields(obj: &Map<String, Value>) -> Result<(), FieldError> {
    let Some((key, known)) = obj.keys().find_map(|k| Some((k, misspelt(obj, k)?))) else {
        return Ok(());
    };
    Err(FieldError {
        field: Cow::Owned(key.clone()),
        reason: format!(
            "unknown field; did you mean `{known}`? (a registration takes {}; nothing was registered)",
            FIELDS.join(", ")
        ),
    })
}

/// The known field that `key`, a key of `obj` of no known name, misspells:
/// the [`closest_field`] to it, if `obj` lacks that field. With the field
/// there too, `key` is an extra of the agent's own (QA: `pid` next to
/// `id`, `vip` next to `ip`, `api` next to `app` were refused).
fn misspelt(obj: &Map<String, Value>, key: &str) -> Option<&'static str> {
    if FIELDS.contains(&key) {
        return None;
    }
    closest_field(key).filter(|known| !obj.contains_key(*known))
}

/// Refuses a body in which one object names a field twice
/// (`{"id":"a",...,"id":"b"}`), naming the first such field. A JSON value
/// keeps only the last of them, so a registration templated twice, or
/// patched by appending, registered whichever came last without a word;
/// the original edgeProxy (serde's derived `Deserialize`) refused it with
/// `duplicate field`. Keys inside a field's value (`health_check`) count
/// too; an extra the API ignores may repeat, as the original ignored it.
fn duplicate_fields(body: &[u8]) -> Result<(), FieldError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    // Malformed JSON is reported by the parse that comes first.
    let found = serde::de::DeserializeSeed::deserialize(DuplicateKeys, &mut de).unwrap_or_default();
    let Some((field, path)) = found.into_iter().find_map(|path| {
        let field = path
            .split(['.', '['])
            .next()
            .unwrap_or_default()
            .to_string();
        FIELDS.contains(&field.as_str()).then_some((field, path))
    }) else {
        return Ok(());
    };
    Err(FieldError {
        field: Cow::Owned(field),
        reason: format!(
            "{path} appears more than once in the body: which one was meant is ambiguous; \
             nothing was registered"
        ),
    })
}

/// Walks a JSON document for every key an object names twice, as paths
/// (`id`, `health_check.path`), in document order.
struct DuplicateKeys;

impl<'de> serde::de::DeserializeSeed<'de> for DuplicateKeys {
    type Value = Vec<String>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for DuplicateKeys {
    type Value = Vec<String>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut found = Vec::new();
        let mut i = 0usize;
        while let Some(inner) = seq.next_element_seed(DuplicateKeys)? {
            found.extend(inner.iter().map(|p| format!("[{i}]{}", dotted(p))));
            i += 1;
        }
        Ok(found)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut seen = std::collections::HashSet::new();
        let mut found = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            let inner = map.next_value_seed(DuplicateKeys)?;
            found.extend(inner.iter().map(|p| format!("{key}{}", dotted(p))));
            if !seen.insert(key.clone()) {
                found.push(key);
            }
        }
        Ok(found)
    }
}

/// `p` appended to a path: `.p` for a key, as is for an index.
fn dotted(p: &str) -> String {
    if p.starts_with('[') {
        p.to_string()
    } else {
        format!(".{p}")
    }
}

/// The keys of a registration `body` that are none of [`FIELDS`] and
/// misspell none (those are refused): ignored, as the original ignores
/// them, and listed in the reply. Empty for a body that is not a JSON
/// object.
pub fn ignored_fields(body: &[u8]) -> Vec<String> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(obj)) => obj
            .keys()
            .filter(|k| !FIELDS.contains(&k.as_str()) && misspelt(&obj, k).is_none())
            .cloned()
            .collect(),
        _ => Vec::new(),
    }
}

/// The known field `key` most likely misspells: at most two edits away
/// (a swap of neighbours is one), case aside, and closer than half its
/// length; the first in [`FIELDS`] order on a tie.
fn closest_field(key: &str) -> Option<&'static str> {
    let key = key.to_ascii_lowercase();
    FIELDS
        .iter()
        .map(|f| (edits(&key, f), *f))
        .filter(|&(d, f)| d <= 2 && d * 2 < f.len().max(key.len()))
        .min_by_key(|&(d, _)| d)
        .map(|(_, f)| f)
}

/// Edits between `a` and `b`: insertions, deletions, substitutions and
/// swaps of neighbours (optimal string alignment distance), by byte.
fn edits(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = v;
        }
    }
    d[a.len()][b.len()]
}

/// Parses and validates a `POST /api/v1/register` body. A field not in
/// [`FIELDS`] that misspells one is reported first (other unknown fields
/// are ignored); then fields are checked in the order `id,
/// app, region, country, ip, port, weight, soft_limit, hard_limit`; the
/// first bad one is reported. The record comes out healthy
/// and not deleted.
pub fn registration(body: &[u8]) -> Result<BackendRecord, FieldError> {
    registration_with(body, None)
}

/// [`registration`], where a missing `ip` is allocated by `allocate` (this
/// POP's 6PN allocator, given the backend's id) when there is one.
pub fn registration_with(
    body: &[u8],
    allocate: Option<&dyn Fn(&str) -> IpAddr>,
) -> Result<BackendRecord, FieldError> {
    let doc: Value =
        serde_json::from_slice(body).map_err(|e| bad("body", format!("malformed JSON: {e}")))?;
    let Value::Object(obj) = doc else {
        return Err(bad("body", "must be a JSON object"));
    };
    duplicate_fields(body)?;
    misspelt_fields(&obj)?;

    let id = required_str(&obj, "id")?;
    dns_label("id", id)?;
    let app = required_str(&obj, "app")?;
    dns_label("app", app)?;
    if !dns::names::is_servable_app(app) {
        return Err(bad(
            "app",
            format!(
                "{app:?} is a name the internal DNS zone keeps for itself (ns, backends, pops): \
                 its backends could not be named there; pick another app name"
            ),
        ));
    }

    let region = required_str(&obj, "region")?;
    if !is_region(region) {
        return Err(bad(
            "region",
            format!("must be up to {MAX_REGION_LEN} letters, digits, - or _ (e.g. \"sa\")"),
        ));
    }

    let country = match obj.get("country") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(
            Country::parse(s)
                .filter(|_| s.trim() == s)
                .ok_or_else(|| bad("country", format!("{s:?} is not a two-letter country code")))?
                .to_string(),
        ),
        Some(other) => {
            return Err(bad(
                "country",
                format!("must be a string, not {}", kind(other)),
            ))
        }
    };

    let ip_text = match (obj.get("ip"), allocate) {
        (None | Some(Value::Null), Some(allocate)) => allocate(id).to_string(),
        (None | Some(Value::Null), None) => {
            return Err(bad(
                "ip",
                "is required (this POP runs no 6PN mesh to allocate one from)",
            ))
        }
        _ => required_str(&obj, "ip")?.to_string(),
    };
    let ip: IpAddr = ip_text
        .parse()
        .map_err(|_| bad("ip", format!("{ip_text:?} is not an IPv4 or IPv6 address")))?;
    if let Some(why) = engine::snapshot::not_unicast(ip) {
        return Err(bad(
            "ip",
            format!("{ip} is {why}: a backend needs a unicast address, one host's"),
        ));
    }

    let port = integer(&obj, "port", None, 1, 65_535)?;
    let weight = integer(&obj, "weight", Some(DEFAULT_WEIGHT), 1, 255)?;
    let soft_limit = integer(
        &obj,
        "soft_limit",
        Some(DEFAULT_SOFT_LIMIT),
        1,
        u32::MAX as i64,
    )?;
    let hard_limit = integer(
        &obj,
        "hard_limit",
        Some(DEFAULT_HARD_LIMIT),
        1,
        u32::MAX as i64,
    )?;
    if hard_limit < soft_limit {
        return Err(bad(
            "hard_limit",
            format!("{hard_limit} is below soft_limit {soft_limit}"),
        ));
    }

    Ok(BackendRecord {
        id: id.to_string(),
        app: app.to_string(),
        region: region.to_ascii_lowercase(),
        country,
        ip: ip.to_string(),
        port,
        healthy: true,
        weight,
        soft_limit,
        hard_limit,
        deleted: false,
    })
}

/// Whether `region` is a region name as backends and POPs carry it: 1 to
/// [`MAX_REGION_LEN`] letters, digits, `-` or `_` (it is matched between
/// the two, and served as `<region>.pops.<domain>` and
/// `<region>.backends.<domain>`).
pub fn is_region(region: &str) -> bool {
    !region.is_empty()
        && region.len() <= MAX_REGION_LEN
        && region
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
}

/// Refuses a backend at one of the proxy's own listeners (`own`, as they
/// are bound): every connection routed there would come back in as a new
/// client and be routed there again, until the connection limit is full of
/// one client's hops. `local` says whether an IP is this host's (asked only
/// for a listener bound to `0.0.0.0` or `::`; see `engine::own_listeners`
/// for what is and is not caught). The snapshot builder leaves such rows
/// out too, whichever way they were written.
pub fn not_own_listener(
    rec: &BackendRecord,
    own: &OwnListeners,
    local: &mut dyn FnMut(IpAddr) -> bool,
) -> Result<(), FieldError> {
    let Ok(ip) = rec.ip.parse::<IpAddr>() else {
        return Ok(());
    };
    let Ok(port) = u16::try_from(rec.port) else {
        return Ok(());
    };
    let addr = std::net::SocketAddr::new(ip, port);
    match own.reached_by(addr, local) {
        None => Ok(()),
        Some(listener) => Err(bad(
            "port",
            format!(
                "{addr} is this proxy's own listener {listener}: every connection routed there \
                 would loop back into the proxy; register the backend's own address"
            ),
        )),
    }
}

/// Checks that `value` is one DNS label as host names use them (RFC 1123):
/// 1 to 63 lower-case letters, digits and hyphens, not starting or ending
/// with a hyphen. Ids and apps are served as `<id>.<app>.<domain>` and
/// `_<app>._tcp.<domain>`: a dot would split the name (NXDOMAIN), a space or
/// an underscore is no host name, and upper case would make two ids that
/// DNS cannot tell apart.
pub fn dns_label(field: &'static str, value: &str) -> Result<(), FieldError> {
    let rule = "must be one DNS label: 1 to 63 lower-case letters, digits or hyphens, \
                not starting or ending with a hyphen";
    if value.len() > MAX_LABEL_LEN {
        return Err(bad(
            field,
            format!("{value:.20?}… is longer than {MAX_LABEL_LEN} bytes: {rule}"),
        ));
    }
    let allowed = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-';
    if !value.bytes().all(allowed) || value.starts_with('-') || value.ends_with('-') {
        return Err(bad(field, format!("{value:?} {rule}")));
    }
    Ok(())
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn required_str<'a>(
    obj: &'a Map<String, Value>,
    field: &'static str,
) -> Result<&'a str, FieldError> {
    match obj.get(field) {
        None | Some(Value::Null) => Err(bad(field, "is required")),
        Some(Value::String(s)) if s.is_empty() => Err(bad(field, "must not be empty")),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(bad(field, format!("must be a string, not {}", kind(other)))),
    }
}

/// An integer field in `min..=max`; `default` when absent or null (`None`:
/// required).
fn integer(
    obj: &Map<String, Value>,
    field: &'static str,
    default: Option<i64>,
    min: i64,
    max: i64,
) -> Result<i64, FieldError> {
    let range = || format!("must be an integer in {min}..={max}");
    match obj.get(field) {
        None | Some(Value::Null) => default.ok_or_else(|| bad(field, "is required")),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(v) if (min..=max).contains(&v) => Ok(v),
            Some(v) => Err(bad(field, format!("{v} is out of range: {}", range()))),
            None if n.is_u64() => Err(bad(field, format!("{n} is out of range: {}", range()))),
            None => Err(bad(field, format!("{n} is not an integer: {}", range()))),
        },
        Some(other) => Err(bad(field, format!("{}, not {}", range(), kind(other)))),
    }
}

/// The optional `health_check` object of a registration: the backend's own
/// check settings over its app's (`health::spec::CheckOverride`: `type`,
/// `path`, `interval_ms`, ...; unknown keys refused). Returned as canonical
/// JSON text for the store; `None` when absent or null.
pub fn health_check(body: &[u8]) -> Result<Option<String>, FieldError> {
    let doc: Value =
        serde_json::from_slice(body).map_err(|e| bad("body", format!("malformed JSON: {e}")))?;
    let check = match doc.get("health_check") {
        None | Some(Value::Null) => return Ok(None),
        Some(v @ Value::Object(_)) => v.clone(),
        Some(_) => return Err(bad("health_check", "must be an object")),
    };
    let layer: crate::health::spec::CheckOverride =
        serde_json::from_value(check).map_err(|e| bad("health_check", e.to_string()))?;
    // Bounds as far as they can be judged without the app's own layer.
    let mut probe = layer.clone();
    probe.enabled = Some(true);
    crate::health::spec::CheckSettings::default()
        .layered(&probe, "health_check")
        .map_err(|e| bad("health_check", e))?;
    serde_json::to_string(&layer)
        .map(Some)
        .map_err(|e| bad("health_check", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(body: &str) -> BackendRecord {
        registration(body.as_bytes()).unwrap_or_else(|e| panic!("{body}: {e}"))
    }

    fn field_of(body: &str) -> String {
        match registration(body.as_bytes()) {
            Ok(r) => panic!("{body} was accepted: {r:?}"),
            Err(e) => e.field.into_owned(),
        }
    }

    const MIN: &str = r#""id":"b1","app":"myapp","region":"eu","ip":"10.50.1.1","port":8080"#;

    fn with(extra: &str) -> String {
        format!("{{{MIN}{extra}}}")
    }

    #[test]
    fn a_field_given_twice_is_refused_not_the_last_one_taken() {
        // QA: `{"id":"x1",...,"id":"x2"}` registered x2 with a 201.
        let e = registration(with(r#","id":"b2""#).as_bytes()).unwrap_err();
        assert_eq!(e.field, "id");
        assert!(e.reason.contains("more than once"), "{e}");
        // The value that would have won is a valid one: still refused.
        assert_eq!(field_of(&with(r#","weight":5,"weight":7"#)), "weight");
        let e = registration(with(r#","health_check":{"path":"/a","path":"/b"}"#).as_bytes())
            .unwrap_err();
        assert_eq!(e.field, "health_check");
        assert!(e.reason.starts_with("health_check.path appears"), "{e}");
        // An extra the API ignores may repeat (the original ignored it),
        // and does not hide a known field given twice after it.
        ok(&with(r#","tag":1,"tag":2"#));
        assert_eq!(field_of(&with(r#","tag":1,"tag":2,"port":9"#)), "port");
        // One key in two different objects is no duplicate.
        ok(&with(r#","health_check":{"path":"/id"},"meta":{"id":"x"}"#));
        ok(&with(r#","meta":[{"a":1},{"a":2}]"#));
    }

    #[test]
    fn the_originals_defaults_apply() {
        let r = ok(&with(""));
        assert_eq!(
            r,
            BackendRecord {
                id: "b1".into(),
                app: "myapp".into(),
                region: "eu".into(),
                country: None,
                ip: "10.50.1.1".into(),
                port: 8080,
                healthy: true,
                weight: 2,
                soft_limit: 100,
                hard_limit: 150,
                deleted: false,
            }
        );
    }

    #[test]
    fn the_originals_documented_example_is_accepted() {
        let r = ok(r#"{
            "id": "backend-eu-1", "app": "myapp", "region": "eu", "country": "DE",
            "ip": "10.50.1.1", "port": 8080, "weight": 2, "soft_limit": 100, "hard_limit": 150
        }"#);
        assert_eq!(r.country.as_deref(), Some("DE"));
        assert_eq!((r.weight, r.soft_limit, r.hard_limit), (2, 100, 150));
    }

    #[test]
    fn optional_values_are_normalised() {
        let r = ok(&with(r#","country":"br","weight":null"#));
        assert_eq!(r.country.as_deref(), Some("BR"));
        assert_eq!(r.weight, 2);
        let r = ok(r#"{"id":"x","app":"a","region":"SA","ip":"fd00::1","port":1,"country":""}"#);
        assert_eq!(
            (r.region.as_str(), r.ip.as_str(), r.country),
            ("sa", "fd00::1", None)
        );
        let r = ok(&with(r#","soft_limit":10,"hard_limit":10"#));
        assert_eq!((r.soft_limit, r.hard_limit), (10, 10));
    }

    #[test]
    fn malformed_documents_are_body_errors() {
        for body in [
            "",
            "{",
            "not json",
            "[1,2]",
            "\"x\"",
            "null",
            "{\"id\":\"a\",}",
        ] {
            assert_eq!(field_of(body), "body", "{body:?}");
        }
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases: &[(&str, &str)] = &[
            (
                r#"{"app":"a","region":"eu","ip":"10.0.0.1","port":1}"#,
                "id",
            ),
            (
                r#"{"id":"","app":"a","region":"eu","ip":"10.0.0.1","port":1}"#,
                "id",
            ),
            (
                r#"{"id":"a/b","app":"a","region":"eu","ip":"10.0.0.1","port":1}"#,
                "id",
            ),
            (
                r#"{"id":" a","app":"a","region":"eu","ip":"10.0.0.1","port":1}"#,
                "id",
            ),
            (
                r#"{"id":7,"app":"a","region":"eu","ip":"10.0.0.1","port":1}"#,
                "id",
            ),
            (
                r#"{"id":"a","region":"eu","ip":"10.0.0.1","port":1}"#,
                "app",
            ),
            (
                r#"{"id":"a","app":" a","region":"eu","ip":"10.0.0.1","port":1}"#,
                "app",
            ),
            (r#"{"id":"a","app":"a","ip":"10.0.0.1","port":1}"#, "region"),
            (
                r#"{"id":"a","app":"a","region":"e u","ip":"10.0.0.1","port":1}"#,
                "region",
            ),
            (
                r#"{"id":"a","app":"a","region":"eu","country":"Germany","ip":"10.0.0.1","port":1}"#,
                "country",
            ),
            (
                r#"{"id":"a","app":"a","region":"eu","country":1,"ip":"10.0.0.1","port":1}"#,
                "country",
            ),
            (r#"{"id":"a","app":"a","region":"eu","port":1}"#, "ip"),
            (
                r#"{"id":"a","app":"a","region":"eu","ip":"10.0.0.300","port":1}"#,
                "ip",
            ),
            (
                r#"{"id":"a","app":"a","region":"eu","ip":"10.0.0.1:80","port":1}"#,
                "ip",
            ),
            (
                r#"{"id":"a","app":"a","region":"eu","ip":"0.0.0.0","port":1}"#,
                "ip",
            ),
            (
                r#"{"id":"a","app":"a","region":"eu","ip":"224.0.0.1","port":1}"#,
                "ip",
            ),
            (
                r#"{"id":"a","app":"a","region":"eu","ip":"255.255.255.255","port":1}"#,
                "ip",
            ),
            (
                r#"{"id":"a","app":"a","region":"eu","ip":"::","port":1}"#,
                "ip",
            ),
            (
                r#"{"id":"a","app":"a","region":"eu","ip":"ff02::1","port":1}"#,
                "ip",
            ),
            (
                r#"{"id":"a","app":"a","region":"eu","ip":"::ffff:255.255.255.255","port":1}"#,
                "ip",
            ),
            (
                r#"{"id":"a","app":"a","region":"eu","ip":"example.com","port":1}"#,
                "ip",
            ),
            (
                r#"{"id":"a","app":"a","region":"eu","ip":"10.0.0.1"}"#,
                "port",
            ),
            (
                r#"{"id":"a","app":"a","region":"eu","ip":"10.0.0.1","port":0}"#,
                "port",
            ),
            (
                r#"{"id":"a","app":"a","region":"eu","ip":"10.0.0.1","port":65536}"#,
                "port",
            ),
            (
                r#"{"id":"a","app":"a","region":"eu","ip":"10.0.0.1","port":-1}"#,
                "port",
            ),
            (
                r#"{"id":"a","app":"a","region":"eu","ip":"10.0.0.1","port":80.5}"#,
                "port",
            ),
            (
                r#"{"id":"a","app":"a","region":"eu","ip":"10.0.0.1","port":"80"}"#,
                "port",
            ),
            (
                r#"{"id":"a","app":"a","region":"eu","ip":"10.0.0.1","port":18446744073709551615}"#,
                "port",
            ),
            (
                r#"{"id":"a","app":"a","region":"eu","ip":"10.0.0.1","port":1,"weight":0}"#,
                "weight",
            ),
            (
                r#"{"id":"a","app":"a","region":"eu","ip":"10.0.0.1","port":1,"weight":256}"#,
                "weight",
            ),
            (
                r#"{"id":"a","app":"a","region":"eu","ip":"10.0.0.1","port":1,"soft_limit":0}"#,
                "soft_limit",
            ),
            (
                r#"{"id":"a","app":"a","region":"eu","ip":"10.0.0.1","port":1,"hard_limit":99}"#,
                "hard_limit",
            ),
            (
                r#"{"id":"a","app":"a","region":"eu","ip":"10.0.0.1","port":1,"soft_limit":10,"hard_limit":9}"#,
                "hard_limit",
            ),
        ];
        for (body, field) in cases {
            assert_eq!(field_of(body), *field, "{body}");
        }
    }

    #[test]
    fn long_names_are_refused() {
        let longest = "a".repeat(MAX_LABEL_LEN);
        ok(&format!(
            r#"{{"id":"{longest}","app":"{longest}","region":"eu","ip":"10.0.0.1","port":1}}"#
        ));
        let long = "a".repeat(MAX_LABEL_LEN + 1);
        let body = format!(r#"{{"id":"{long}","app":"a","region":"eu","ip":"10.0.0.1","port":1}}"#);
        assert_eq!(field_of(&body), "id");
        let body = format!(r#"{{"id":"a","app":"{long}","region":"eu","ip":"10.0.0.1","port":1}}"#);
        assert_eq!(field_of(&body), "app");
    }

    /// Ids and apps are DNS labels: `api.v2` as an id was routed but
    /// answered NXDOMAIN as `api.v2.web.internal` and left out of SRV
    /// answers; `Web App` was accepted as an app.
    #[test]
    fn ids_and_apps_must_be_dns_labels() {
        for good in ["a", "b1", "backend-eu-1", "0", "x-0-y"] {
            ok(&format!(
                r#"{{"id":"{good}","app":"{good}","region":"eu","ip":"10.0.0.1","port":1}}"#
            ));
        }
        for bad_label in [
            "api.v2", "Web App", "Web", "a_b", "-a", "a-", "a:b", "a/b", "é", " a", "a\\n",
        ] {
            let id = format!(
                r#"{{"id":{},"app":"web","region":"eu","ip":"10.0.0.1","port":1}}"#,
                serde_json::to_string(bad_label).unwrap()
            );
            assert_eq!(field_of(&id), "id", "{bad_label:?}");
            let app = format!(
                r#"{{"id":"b1","app":{},"region":"eu","ip":"10.0.0.1","port":1}}"#,
                serde_json::to_string(bad_label).unwrap()
            );
            assert_eq!(field_of(&app), "app", "{bad_label:?}");
        }
        let e = dns_label("app", "Web App").unwrap_err();
        assert_eq!(
            e.to_string(),
            "app: \"Web App\" must be one DNS label: 1 to 63 lower-case letters, digits or \
             hyphens, not starting or ending with a hyphen"
        );
    }

    /// `ns`, `backends` and `pops` were accepted as apps, and DNS answered
    /// `ns.internal` with the name server and `_backends._tcp.internal`'s
    /// targets `<id>.backends.internal` with region lists.
    #[test]
    fn apps_the_dns_zone_keeps_for_itself_are_refused() {
        for reserved in ["ns", "backends", "pops"] {
            let body = format!(
                r#"{{"id":"b1","app":"{reserved}","region":"eu","ip":"10.0.0.1","port":1}}"#
            );
            let e = registration(body.as_bytes()).unwrap_err();
            assert_eq!(e.field, "app", "{reserved}");
            assert!(e.reason.contains("keeps for itself"), "{e}");
        }
        for near in ["nsx", "backends-eu", "pop"] {
            ok(&format!(
                r#"{{"id":"b1","app":"{near}","region":"eu","ip":"10.0.0.1","port":1}}"#
            ));
        }
    }

    /// `"wieght": 5` registered a backend of weight 2 (the default) with a
    /// 201: the typo was ignored and the agent never heard of it. Other
    /// unknown fields are ignored, as the original ignores them.
    #[test]
    fn misspelt_fields_are_refused_and_other_unknown_ones_ignored() {
        let e = registration(with(r#","wieght":5"#).as_bytes()).unwrap_err();
        assert_eq!(e.field, "wieght");
        assert!(
            e.reason.starts_with("unknown field; did you mean `weight`? (a registration takes id, app, region, country, ip, port, weight, soft_limit, hard_limit, health_check;"),
            "{e}"
        );
        for (key, meant) in [
            ("Weight", Some("weight")),
            ("hardlimit", Some("hard_limit")),
            ("soft-limit", Some("soft_limit")),
            ("contry", Some("country")),
            // `port` is there too: an extra, not a typo.
            ("prot", None),
            ("healthcheck", Some("health_check")),
            ("metadata", None),
            ("x", None),
            ("tags", None),
        ] {
            let body = with(&format!(r#","{key}":1"#));
            match meant {
                Some(f) => {
                    let e = registration(body.as_bytes()).unwrap_err();
                    assert_eq!(e.field, key);
                    assert!(e.reason.contains(&format!("did you mean `{f}`?")), "{e}");
                }
                None => {
                    ok(&body);
                    assert_eq!(ignored_fields(body.as_bytes()), [key]);
                }
            }
        }
        assert!(ignored_fields(with("").as_bytes()).is_empty());
        // Close to a field the body has: an extra of the agent's own.
        for key in ["pid", "uid", "vip", "api"] {
            let body = with(&format!(r#","{key}":1"#));
            ok(&body);
            assert_eq!(ignored_fields(body.as_bytes()), [key]);
        }
        // `Port` with no `port`: a typo, refused.
        let e = registration(br#"{"id":"a","app":"a","region":"eu","ip":"10.0.0.1","Port":1}"#)
            .unwrap_err();
        assert_eq!(e.field, "Port");
        assert!(ignored_fields(b"[1]").is_empty());
        // Refused before anything else: a misspelt required field is named
        // as such, not as missing.
        let e = registration(br#"{"id":"a","app":"a","region":"eu","ip":"10.0.0.1","prot":1}"#)
            .unwrap_err();
        assert_eq!(e.field, "prot");
        // Every known field (health_check is checked on its own).
        ok(&with(
            r#","country":"DE","weight":3,"soft_limit":5,"hard_limit":6,"health_check":null"#,
        ));
    }

    #[test]
    fn a_backend_at_an_own_listener_is_refused() {
        let own = OwnListeners::new([
            "127.0.0.1:18380".parse().unwrap(),
            "0.0.0.0:8080".parse().unwrap(),
        ]);
        let mut local = |ip: IpAddr| ip.is_loopback() || ip.to_string() == "10.0.0.5";
        let at = |ip: &str, port: u16| {
            registration(
                format!(r#"{{"id":"a","app":"a","region":"eu","ip":"{ip}","port":{port}}}"#)
                    .as_bytes(),
            )
            .unwrap()
        };
        let e = not_own_listener(&at("127.0.0.1", 18380), &own, &mut local).unwrap_err();
        assert_eq!(e.field, "port");
        assert!(e.reason.contains("own listener 127.0.0.1:18380"), "{e}");
        assert!(not_own_listener(&at("10.0.0.5", 8080), &own, &mut local).is_err());
        assert!(not_own_listener(&at("127.0.0.1", 18381), &own, &mut local).is_ok());
        assert!(not_own_listener(&at("10.0.0.6", 8080), &own, &mut local).is_ok());
    }

    #[test]
    fn errors_read_as_field_and_reason() {
        let e = registration(br#"{"id":"a","app":"a","region":"eu","ip":"10.0.0.1","port":0}"#)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "port: 0 is out of range: must be an integer in 1..=65535"
        );
    }
}
