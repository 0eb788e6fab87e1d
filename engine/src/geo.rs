//! Client address → country → region.
//!
//! [`GeoResolver`] answers "which country is this client in, and which region
//! serves that country" for every accepted connection. It is built once at
//! start-up (or on config reload) and does no I/O afterwards: the GeoIP
//! database is either the one compiled into the binary ([`embedded_db`], DB-IP
//! Lite, CC BY 4.0, see `engine/geoip/README.md`) or a file read whole at
//! construction ([`GeoDb::open`], what `EDGEPROXY_GEOIP_PATH` points at).
//!
//! Lookup order for a client address: IPv4-mapped IPv6 (`::ffff:a.b.c.d`) is
//! turned into IPv4 first, then the configured overrides (most specific prefix
//! wins), then the database. Private and loopback ranges are looked up like any
//! other address: a custom database or an override may map them.

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use maxminddb::{MaxMindDbError, Reader};
use serde::Deserialize;

use crate::snapshot::Country;

/// The DB-IP Lite country database compiled into the binary (IPv4 and IPv6).
pub fn embedded_db() -> &'static [u8] {
    include_bytes!("../geoip/dbip-country.mmdb")
}

/// Why a GeoIP database could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GeoError {
    #[error("cannot read GeoIP database {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin} is not a valid MaxMind DB (.mmdb) file")]
    Invalid {
        /// The file path, or "embedded GeoIP database".
        origin: String,
        #[source]
        source: MaxMindDbError,
    },
}

/// A MaxMind DB (`.mmdb`) country database, held in memory.
///
/// Reads both record layouts in use: DB-IP / ip-location-db keep the ISO code
/// at the top level (`country_code`), MaxMind GeoLite2/GeoIP2 under
/// `country.iso_code` (falling back to `registered_country.iso_code` for the
/// networks MaxMind gives no `country`). Strings are decoded borrowed, so a
/// lookup does not allocate.
#[derive(Debug)]
pub struct GeoDb {
    reader: Reader<Cow<'static, [u8]>>,
}

/// The fields of a record that can carry a country code; everything else in
/// the record is skipped without being decoded.
#[derive(Deserialize)]
struct Record<'a> {
    #[serde(borrow)]
    country_code: Option<&'a str>,
    #[serde(borrow)]
    country: Option<IsoCode<'a>>,
    #[serde(borrow)]
    registered_country: Option<IsoCode<'a>>,
}

#[derive(Deserialize)]
struct IsoCode<'a> {
    #[serde(borrow)]
    iso_code: Option<&'a str>,
}

impl GeoDb {
    /// The database compiled into the binary; borrows it, no copy.
    pub fn embedded() -> Result<Self, GeoError> {
        Self::from_source(Cow::Borrowed(embedded_db()), "embedded GeoIP database")
    }

    /// Reads a whole `.mmdb` file into memory.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GeoError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| GeoError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_source(Cow::Owned(bytes), &path.display().to_string())
    }

    /// A database from bytes already in memory.
    pub fn from_bytes(bytes: impl Into<Cow<'static, [u8]>>) -> Result<Self, GeoError> {
        Self::from_source(bytes.into(), "in-memory GeoIP database")
    }

    fn from_source(bytes: Cow<'static, [u8]>, origin: &str) -> Result<Self, GeoError> {
        let reader = Reader::from_source(bytes).map_err(|source| GeoError::Invalid {
            origin: origin.to_string(),
            source,
        })?;
        Ok(GeoDb { reader })
    }

    /// The country the database gives for `ip`, if any. An address the
    /// database does not cover, a record without a usable code, or an IPv6
    /// address in an IPv4-only database all give `None`.
    pub fn country(&self, ip: IpAddr) -> Option<Country> {
        let record: Record<'_> = self.reader.lookup(canonical(ip)).ok()?.decode().ok()??;
        let code = record
            .country_code
            .or_else(|| record.country.and_then(|c| c.iso_code))
            .or_else(|| record.registered_country.and_then(|c| c.iso_code))?;
        Country::parse(code)
    }

    /// The `database_type` from the file's metadata (e.g. "GeoLite2-Country").
    pub fn database_type(&self) -> &str {
        &self.reader.metadata().database_type
    }

    /// When the database was built, in seconds since the Unix epoch.
    pub fn build_epoch(&self) -> u64 {
        self.reader.metadata().build_epoch
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) become plain IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        v4 => v4,
    }
}

/// Slots in [`RegionMap`]'s table: one per pair of letters A–Z.
const SLOTS: usize = 26 * 26;
/// A table slot with no explicit region.
const NO_REGION: u16 = u16::MAX;

fn slot(c: Country) -> Option<usize> {
    let [a, b] = c.0.map(|x| x.to_ascii_uppercase());
    (a.is_ascii_uppercase() && b.is_ascii_uppercase())
        .then(|| (a - b'A') as usize * 26 + (b - b'A') as usize)
}

/// Country → region name; countries not listed go to the default region.
#[derive(Clone, PartialEq, Eq)]
pub struct RegionMap {
    default_region: Box<str>,
    names: Vec<Box<str>>,
    /// Index into `names` per country slot, or [`NO_REGION`].
    table: Box<[u16; SLOTS]>,
}

impl RegionMap {
    /// Builds a map from configuration. The entries replace the whole built-in
    /// table (they are not merged into it). A country listed under two
    /// regions goes to the one listed last.
    pub fn new(
        default_region: &str,
        entries: impl IntoIterator<Item = (String, Vec<Country>)>,
    ) -> Self {
        let mut map = RegionMap {
            default_region: default_region.into(),
            names: Vec::new(),
            table: Box::new([NO_REGION; SLOTS]),
        };
        for (region, countries) in entries {
            let idx = match map.names.iter().position(|n| **n == *region) {
                Some(i) => i,
                None => {
                    map.names.push(region.into_boxed_str());
                    map.names.len() - 1
                }
            };
            // Only a config with over 65534 region names gets here with an
            // index that does not fit; its countries then go to the default.
            let idx = u16::try_from(idx).unwrap_or(NO_REGION);
            for c in countries {
                if let Some(s) = slot(c) {
                    map.table[s] = idx;
                }
            }
        }
        map
    }

    /// The region serving country `c`.
    pub fn region_of(&self, c: Country) -> &str {
        slot(c)
            .map(|s| self.table[s])
            .and_then(|i| self.names.get(i as usize))
            .map_or(&*self.default_region, |n| &**n)
    }

    /// The region of every country not listed.
    pub fn default_region(&self) -> &str {
        &self.default_region
    }

    /// The explicit entries, in country order.
    pub fn entries(&self) -> impl Iterator<Item = (Country, &str)> + '_ {
        self.table.iter().enumerate().filter_map(|(s, &i)| {
            let name = self.names.get(i as usize)?;
            let c = Country([b'A' + (s / 26) as u8, b'A' + (s % 26) as u8]);
            Some((c, &**name))
        })
    }
}

impl Default for RegionMap {
    /// The built-in map, with everything else in us.
    fn default() -> Self {
        RegionMap::builtin("us")
    }
}

impl RegionMap {
    /// The built-in map (sa: South America; us: North America; eu: Europe;
    /// ap: Asia-Pacific), with every other country in `default_region`.
    pub fn builtin(default_region: &str) -> Self {
        const TABLE: [(&str, &[&str]); 4] = [
            (
                "sa",
                &["BR", "AR", "CL", "PE", "CO", "UY", "PY", "BO", "EC"],
            ),
            ("us", &["US", "CA", "MX"]),
            (
                "eu",
                &[
                    "PT", "ES", "FR", "DE", "NL", "IT", "GB", "IE", "BE", "CH", "AT", "PL", "CZ",
                    "SE", "NO", "DK", "FI",
                ],
            ),
            (
                "ap",
                &[
                    "JP", "KR", "TW", "HK", "SG", "MY", "TH", "VN", "ID", "PH", "AU", "NZ",
                ],
            ),
        ];
        RegionMap::new(
            default_region,
            TABLE.iter().map(|(region, codes)| {
                let countries = codes.iter().filter_map(|c| Country::parse(c)).collect();
                (region.to_string(), countries)
            }),
        )
    }
}

impl fmt::Debug for RegionMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut regions: Vec<(&str, String)> = Vec::new();
        for (c, name) in self.entries() {
            let i = match regions.iter().position(|(n, _)| *n == name) {
                Some(i) => i,
                None => {
                    regions.push((name, String::new()));
                    regions.len() - 1
                }
            };
            let list = &mut regions[i].1;
            if !list.is_empty() {
                list.push(' ');
            }
            list.push_str(c.as_str());
        }
        f.debug_struct("RegionMap")
            .field("default_region", &self.default_region)
            .field("regions", &regions)
            .finish()
    }
}

/// Resolves a client address to a country and a region.
#[derive(Debug, Default)]
pub struct GeoResolver {
    /// Sorted most specific prefix first, so the first match wins.
    overrides: Vec<(IpNet, Country)>,
    db: Option<GeoDb>,
    regions: RegionMap,
}

impl GeoResolver {
    /// `overrides` are checked before the database; when several contain an
    /// address the longest prefix wins (equal prefixes: the one listed first).
    pub fn new(overrides: Vec<(IpNet, Country)>, db: Option<GeoDb>, regions: RegionMap) -> Self {
        let mut overrides: Vec<(IpNet, Country)> =
            overrides.into_iter().map(|(n, c)| (n.trunc(), c)).collect();
        overrides.sort_by_key(|(n, _)| std::cmp::Reverse(n.prefix_len()));
        GeoResolver {
            overrides,
            db,
            regions,
        }
    }

    /// The client's country: overrides first, then the database.
    pub fn country(&self, ip: IpAddr) -> Option<Country> {
        let ip = canonical(ip);
        if let Some((_, c)) = self.overrides.iter().find(|(net, _)| net.contains(&ip)) {
            return Some(*c);
        }
        self.db.as_ref()?.country(ip)
    }

    /// The region serving `country`; `None` when the country is unknown.
    pub fn region_for(&self, country: Option<Country>) -> Option<&str> {
        country.map(|c| self.regions.region_of(c))
    }

    /// [`country`](Self::country) and [`region_for`](Self::region_for) in one.
    pub fn locate(&self, ip: IpAddr) -> (Option<Country>, Option<&str>) {
        let country = self.country(ip);
        (country, self.region_for(country))
    }

    pub fn regions(&self) -> &RegionMap {
        &self.regions
    }

    pub fn db(&self) -> Option<&GeoDb> {
        self.db.as_ref()
    }

    /// The overrides, most specific first.
    pub fn overrides(&self) -> &[(IpNet, Country)] {
        &self.overrides
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(code: &str) -> Country {
        Country::parse(code).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn embedded() -> GeoDb {
        GeoDb::embedded().expect("embedded database loads")
    }

    #[test]
    fn embedded_db_maps_known_addresses() {
        let db = embedded();
        assert_eq!(db.country(ip("8.8.8.8")), Some(c("US")));
        assert_eq!(db.country(ip("200.160.2.3")), Some(c("BR")));
        // NIC.br, WIDE (JP) and the RIPE NCC (NL): registries' own networks,
        // unlikely to move.
        assert_eq!(db.country(ip("2001:12ff::1")), Some(c("BR")));
        assert_eq!(db.country(ip("2001:200::1")), Some(c("JP")));
        assert_eq!(db.country(ip("2001:67c:2e8::1")), Some(c("NL")));
        assert_eq!(db.country(ip("127.0.0.1")), None);
        assert_eq!(db.country(ip("::1")), None);
    }

    #[test]
    fn ipv4_mapped_ipv6_is_looked_up_as_ipv4() {
        let db = embedded();
        assert_eq!(db.country(ip("::ffff:200.160.2.3")), Some(c("BR")));
        let r = GeoResolver::new(
            vec![("10.1.0.0/16".parse().unwrap(), c("DE"))],
            None,
            RegionMap::default(),
        );
        assert_eq!(r.country(ip("::ffff:10.1.2.3")), Some(c("DE")));
    }

    #[test]
    fn overrides_beat_the_db_and_longest_prefix_wins() {
        let r = GeoResolver::new(
            vec![
                ("10.0.0.0/16".parse().unwrap(), c("BR")),
                ("10.0.5.0/24".parse().unwrap(), c("JP")),
                ("8.8.8.0/24".parse().unwrap(), c("FR")),
                ("fd00::/8".parse().unwrap(), c("CL")),
            ],
            Some(embedded()),
            RegionMap::default(),
        );
        assert_eq!(r.locate(ip("10.0.5.9")), (Some(c("JP")), Some("ap")));
        assert_eq!(r.locate(ip("10.0.6.9")), (Some(c("BR")), Some("sa")));
        assert_eq!(r.locate(ip("8.8.8.8")), (Some(c("FR")), Some("eu")));
        assert_eq!(r.locate(ip("8.8.4.4")), (Some(c("US")), Some("us")));
        assert_eq!(r.locate(ip("fd12::1")), (Some(c("CL")), Some("sa")));
        assert_eq!(r.locate(ip("127.0.0.1")), (None, None));
        // Listed /24 after /16 on purpose: the order given does not matter.
        assert_eq!(r.overrides()[0].0.prefix_len(), 24);
    }

    #[test]
    fn resolver_is_shareable_between_shards() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<GeoResolver>();
    }

    #[test]
    fn no_db_and_no_override_gives_nothing() {
        let r = GeoResolver::default();
        assert_eq!(r.locate(ip("8.8.8.8")), (None, None));
    }

    #[test]
    fn default_regions() {
        let m = RegionMap::default();
        assert_eq!(m.region_of(c("BR")), "sa");
        assert_eq!(m.region_of(c("EC")), "sa");
        assert_eq!(m.region_of(c("US")), "us");
        assert_eq!(m.region_of(c("MX")), "us");
        assert_eq!(m.region_of(c("DE")), "eu");
        assert_eq!(m.region_of(c("FI")), "eu");
        assert_eq!(m.region_of(c("JP")), "ap");
        assert_eq!(m.region_of(c("NZ")), "ap");
        assert_eq!(m.region_of(c("ZA")), "us");
        assert_eq!(m.region_of(Country(*b"br")), "sa");
        assert_eq!(m.region_of(Country(*b"1!")), "us");
        assert_eq!(m.default_region(), "us");
        assert_eq!(m.entries().count(), 9 + 3 + 17 + 12);
        let r = GeoResolver::default();
        assert_eq!(r.region_for(None), None);
        assert_eq!(r.region_for(Some(c("AR"))), Some("sa"));
    }

    #[test]
    fn custom_region_map_replaces_the_default() {
        let m = RegionMap::new(
            "eu",
            [
                ("latam".to_string(), vec![c("BR"), c("MX")]),
                ("na".to_string(), vec![c("US")]),
                ("latam".to_string(), vec![c("AR")]),
                ("na".to_string(), vec![c("MX")]),
            ],
        );
        assert_eq!(m.region_of(c("BR")), "latam");
        assert_eq!(m.region_of(c("AR")), "latam");
        assert_eq!(m.region_of(c("MX")), "na");
        assert_eq!(m.region_of(c("US")), "na");
        // Not listed: the default, even though the built-in table has it.
        assert_eq!(m.region_of(c("JP")), "eu");
        assert_eq!(m.region_of(c("CL")), "eu");
        let dbg = format!("{m:?}");
        assert!(dbg.contains("\"latam\", \"AR BR\""), "{dbg}");
    }

    #[test]
    fn garbage_file_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("edgeproxy-geo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("garbage.mmdb");
        std::fs::write(&path, b"this is not a MaxMind database").unwrap();
        let err = GeoDb::open(&path).unwrap_err();
        assert!(matches!(err, GeoError::Invalid { .. }), "{err:?}");
        assert!(err.to_string().contains("garbage.mmdb"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);

        let err = GeoDb::open(dir.join("missing.mmdb")).unwrap_err();
        assert!(matches!(err, GeoError::Read { .. }), "{err:?}");
        assert!(matches!(
            GeoDb::from_bytes(&embedded_db()[..1000]),
            Err(GeoError::Invalid { .. })
        ));
        assert!(matches!(
            GeoDb::from_bytes(Vec::new()),
            Err(GeoError::Invalid { .. })
        ));
    }

    /// A GeoLite2/GeoIP2-Country style database: the code under
    /// `country.iso_code`, other fields around it, and one network known
    /// only by `registered_country`.
    fn maxmind_layout_db() -> Vec<u8> {
        use mmdb_writer::{Value, Writer};
        let country = |code: &str, name: &str| {
            Value::map([
                ("geoname_id", Value::from(1_u32)),
                ("iso_code", Value::from(code)),
                ("names", Value::map([("en", Value::from(name))])),
            ])
        };
        let mut w = Writer::new("GeoLite2-Country");
        w.insert_value(
            "203.0.113.0/24".parse::<IpNet>().unwrap(),
            Value::map([
                (
                    "continent",
                    Value::map([
                        ("code", Value::from("OC")),
                        ("geoname_id", Value::from(6_u32)),
                    ]),
                ),
                ("country", country("NZ", "New Zealand")),
                ("registered_country", country("AU", "Australia")),
            ]),
        )
        .unwrap();
        w.insert_value(
            "2001:db8::/32".parse::<IpNet>().unwrap(),
            Value::map([("country", country("SE", "Sweden"))]),
        )
        .unwrap();
        w.insert_value(
            "198.51.100.0/24".parse::<IpNet>().unwrap(),
            Value::map([("registered_country", country("PT", "Portugal"))]),
        )
        .unwrap();
        w.to_bytes().unwrap()
    }

    #[test]
    fn reads_the_maxmind_country_layout_from_a_file() {
        let dir = std::env::temp_dir().join(format!("edgeproxy-geo-mm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("GeoLite2-Country.mmdb");
        std::fs::write(&path, maxmind_layout_db()).unwrap();
        let db = GeoDb::open(&path).unwrap();
        let _ = std::fs::remove_dir_all(&dir);

        assert_eq!(db.database_type(), "GeoLite2-Country");
        assert_eq!(db.country(ip("203.0.113.7")), Some(c("NZ")));
        assert_eq!(db.country(ip("::ffff:203.0.113.7")), Some(c("NZ")));
        assert_eq!(db.country(ip("2001:db8::1")), Some(c("SE")));
        assert_eq!(db.country(ip("198.51.100.1")), Some(c("PT")));
        assert_eq!(db.country(ip("192.0.2.1")), None);
        let r = GeoResolver::new(Vec::new(), Some(db), RegionMap::default());
        assert_eq!(r.locate(ip("203.0.113.7")), (Some(c("NZ")), Some("ap")));
    }

    #[test]
    fn reads_the_top_level_country_code_layout() {
        use mmdb_writer::{Value, Writer};
        let mut w = Writer::new("dbip-country");
        w.insert_value(
            "192.0.2.0/24".parse::<IpNet>().unwrap(),
            Value::map([("country_code", Value::from("uy"))]),
        )
        .unwrap();
        // A record whose code is not two letters gives no country.
        w.insert_value(
            "198.51.100.0/24".parse::<IpNet>().unwrap(),
            Value::map([("country_code", Value::from("??"))]),
        )
        .unwrap();
        let db = GeoDb::from_bytes(w.to_bytes().unwrap()).unwrap();
        assert_eq!(db.country(ip("192.0.2.9")), Some(c("UY")));
        assert_eq!(db.country(ip("198.51.100.9")), None);
    }
}
