//! Answering one DNS query: bytes in, bytes out, no I/O.
//!
//! [`Answerer::answer`] takes the query exactly as received, the client's
//! address, the transport and the routing snapshot to answer from, and writes
//! the reply into a caller-owned buffer. It never fails: a query it cannot
//! decode gets FORMERR, and one too short to carry a message ID (or that is a
//! response, not a query) gets no reply at all, as RFC 1035 servers do.
//!
//! # Semantics
//!
//! - A name outside the zone: REFUSED (we are authoritative only, no
//!   recursion), without the AA bit.
//! - A name in the zone with no records of any type: NXDOMAIN, the SOA in the
//!   authority section (negative caching, RFC 2308).
//! - A name with records, but none of the type asked: NOERROR with no answer
//!   ("NODATA"), the SOA in the authority section.
//! - Opcodes other than QUERY: NOTIMP. Zone transfers (AXFR, IXFR): REFUSED.
//!   Classes other than IN (and ANY): REFUSED. QDCOUNT other than 1, several
//!   OPT records, a malformed ECS option: FORMERR. EDNS version above 0:
//!   BADVERS.
//! - Over UDP a reply is at most 512 bytes without EDNS, else the client's
//!   advertised size clamped to `512..=MAX_UDP_PAYLOAD`. A reply over that
//!   first loses its additional section (glue is optional), then, if still
//!   too large, everything but the question and OPT, with TC set, so the
//!   client retries over TCP. Over TCP (64 KiB), where TC would leave the
//!   client nowhere to go, a list too long for that is cut to the records
//!   that fit, without TC.
//! - An RRset holds at most [`MAX_RRSET_RECORDS`] records (what BIND
//!   resolvers accept): a longer list is cut, in its order (SRV: nearest
//!   tier first).
//! - A query that does not decode as a whole gets FORMERR with what can be
//!   read of it: its question, and an OPT record if it had one (see
//!   [`crate::salvage`]).
//!
//! # Records
//!
//! `<app>` answers A or AAAA with the one backend the proxy would pick for
//! this client (`engine::select::pick`: same tiers, same load score; the
//! client located by ECS or else by its address). Other names: see
//! [`crate::names`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::geo::GeoResolver;
use engine::select::{pick, tier_of, ClientGeo};
use engine::snapshot::{BackendIdx, RoutingSnapshot};
use hickory_proto::op::{
    emit_message_parts, Edns, Message, MessageType, Metadata, OpCode, Query, ResponseCode,
};
use hickory_proto::rr::rdata::{A, AAAA, SRV};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::BinEncoder;

use crate::ecs::{client_location, ClientLocation, Scope};
use crate::geodns::{self, ClientPlace, GeoZone};
use crate::index::{IndexCache, ZoneIndex};
use crate::names::{classify, relative, Placement, Target};
use crate::salvage::salvage;
use crate::zone::ZoneConfig;

/// The largest UDP reply we send, whatever the client advertises: 1232 bytes
/// avoids IP fragmentation on any path with a 1280-byte IPv6 MTU (the DNS
/// Flag Day 2020 recommendation).
pub const MAX_UDP_PAYLOAD: u16 = 1232;

/// How long a reply may be reused for the same query bytes from the same
/// country ([`Answerer::answer_at`]). Routing changes are not delayed by it
/// (a new snapshot empties the cache); only the live connection counts that
/// tilt the choice between equally close backends are up to this old.
pub const REPLY_CACHE_TTL: Duration = Duration::from_millis(200);
/// Replies kept at most; the cache is emptied when full (random names
/// cannot grow it without bound).
const REPLY_CACHE_ENTRIES: usize = 8192;
/// Bytes of keys and replies kept at most (per answerer: each UDP worker
/// and TCP connection has its own): the cache is emptied past it. Without
/// it, 8,192 entries of the largest queries and TCP replies could hold
/// hundreds of megabytes.
pub const REPLY_CACHE_BYTES: usize = 2 << 20;
/// Only queries up to this long are cached: a real query for one name is
/// far smaller, and garbage (which gets FORMERR) must not fill the cache.
const MAX_CACHED_QUERY: usize = 512;

/// What [`Answerer::emit_bare`] is given for errors found before the
/// query's ECS option was read: no option is echoed.
const NO_ECS: ClientLocation = ClientLocation::Source;

/// A reply's size limit without EDNS (RFC 1035).
const CLASSIC_UDP_PAYLOAD: u16 = 512;

/// The most records answered in one RRset (a region's backends or POPs of
/// one address family, an app's SRV records). BIND 9.18.28 and later (the
/// CVE-2024-1737 fix) refuse to cache an RRset of more than 100 records
/// (`max-records-per-type`, default 100) and answer their clients
/// SERVFAIL: a region of 120 backends was unresolvable through Debian 12's
/// `named` as a forwarder, while a partial list is what a client of a
/// longer one can use.
pub const MAX_RRSET_RECORDS: usize = 100;

/// How the query arrived; decides the reply size limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// What happened to one query, for logs and counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answered {
    pub rcode: ResponseCode,
    /// TC was set (UDP only).
    pub truncated: bool,
}

/// Answers queries for one zone. Cheap to clone: clones share the
/// per-snapshot index; each keeps its own scratch space, so give each task
/// its own clone.
#[derive(Debug, Clone)]
pub struct Answerer {
    zone: Arc<ZoneConfig>,
    /// The public GeoDNS zone, when configured (see `crate::geodns`).
    geodns: Option<Arc<GeoZone>>,
    geo: Arc<GeoResolver>,
    cache: IndexCache,
    /// Scratch: the query name relative to the zone.
    rel: String,
    /// Scratch: the reply being built (its vectors keep their capacity).
    reply: Message,
    replies: ReplyCache,
}

/// Encoded replies by query bytes (all but the ID), client country and
/// transport, for one snapshot.
#[derive(Debug, Default)]
struct ReplyCache {
    /// The snapshot the entries were computed from (version and address).
    snapshot: (u64, usize),
    entries: HashMap<Vec<u8>, (Instant, Answered, Vec<u8>)>,
    /// Bytes of keys and replies in `entries`.
    bytes: usize,
    /// Scratch: the key being looked up.
    key: Vec<u8>,
}

impl Clone for ReplyCache {
    /// A clone starts empty: each task keeps its own replies.
    fn clone(&self) -> Self {
        ReplyCache::default()
    }
}

impl Answerer {
    pub fn new(zone: Arc<ZoneConfig>, geo: Arc<GeoResolver>) -> Self {
        Answerer {
            zone,
            geodns: None,
            geo,
            cache: IndexCache::default(),
            rel: String::new(),
            reply: Message::new(0, MessageType::Response, OpCode::Query),
            replies: ReplyCache::default(),
        }
    }

    /// [`answer`](Self::answer), reusing the reply computed for the same
    /// query bytes (ID aside), client country and transport within
    /// [`REPLY_CACHE_TTL`] of `now` and from the same snapshot. This is what
    /// the server calls: encoding dominates the cost of an answer, and a
    /// handful of names make most of the traffic.
    pub fn answer_at(
        &mut self,
        query: &[u8],
        client: IpAddr,
        transport: Transport,
        snapshot: &RoutingSnapshot,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Option<Answered> {
        if query.len() < 12 || query[2] & 0x80 != 0 {
            out.clear();
            return None;
        }
        let snap_key = (
            snapshot.version,
            snapshot as *const RoutingSnapshot as usize,
        );
        let cache = &mut self.replies;
        if cache.snapshot != snap_key
            || cache.entries.len() >= REPLY_CACHE_ENTRIES
            || cache.bytes >= REPLY_CACHE_BYTES
        {
            cache.entries.clear();
            // Give back what a burst of large entries took.
            if cache.entries.capacity() > REPLY_CACHE_ENTRIES {
                cache.entries.shrink_to(REPLY_CACHE_ENTRIES);
            }
            cache.bytes = 0;
            cache.snapshot = snap_key;
        }
        cache.key.clear();
        cache.key.extend_from_slice(&query[2..]);
        let country = self.geo.country(client).map_or([0, 0], |c| c.0);
        cache.key.extend_from_slice(&country);
        cache.key.push(transport as u8);
        // GeoDNS spreads clients over equally near POPs by their address
        // (the resolver's, without ECS): a reply is reused for that address
        // only. (With ECS the subnet is in the query bytes already.)
        if self.geodns.is_some() {
            match client {
                IpAddr::V4(a) => cache.key.extend_from_slice(&a.octets()),
                IpAddr::V6(a) => cache.key.extend_from_slice(&a.octets()),
            }
        }
        if let Some((at, answered, bytes)) = cache.entries.get(cache.key.as_slice()) {
            if now.saturating_duration_since(*at) < REPLY_CACHE_TTL {
                out.clear();
                out.extend_from_slice(bytes);
                out[..2].copy_from_slice(&query[..2]);
                return Some(*answered);
            }
        }
        let answered = self.answer(query, client, transport, snapshot, out)?;
        // Worth keeping: answers for names (not errors, which cost little
        // to compute and are what garbage gets), for queries of sane size.
        let cacheable = query.len() <= MAX_CACHED_QUERY
            && matches!(
                answered.rcode,
                ResponseCode::NoError | ResponseCode::NXDomain
            );
        if cacheable {
            let key = self.replies.key.clone();
            self.replies.bytes += key.len() + out.len();
            if let Some(old) = self
                .replies
                .entries
                .insert(key, (now, answered, out.clone()))
            {
                self.replies.bytes -= self.replies.key.len() + old.2.len();
            }
        }
        Some(answered)
    }

    pub fn zone(&self) -> &ZoneConfig {
        &self.zone
    }

    /// Answers the GeoDNS zone too. Its name must not overlap the internal
    /// zone's (configuration checks that).
    pub fn with_geodns(mut self, zone: GeoZone) -> Self {
        self.geodns = Some(Arc::new(zone));
        self
    }

    /// Answers `query` from `client` into `out` (cleared first). `None`: send
    /// nothing (`out` is then empty).
    pub fn answer(
        &mut self,
        query: &[u8],
        client: IpAddr,
        transport: Transport,
        snapshot: &RoutingSnapshot,
        out: &mut Vec<u8>,
    ) -> Option<Answered> {
        out.clear();
        // ID (2 bytes), then QR in the top bit of byte 2. Without a full
        // header there is no ID to answer to; a response is never answered
        // (that is how reflection loops between servers start).
        if query.len() < 12 || query[2] & 0x80 != 0 {
            return None;
        }
        let decoded = match counts_fit(query) {
            true => Message::from_vec(query).map_err(|_| ()),
            false => Err(()),
        };
        let request = match decoded {
            Ok(m) => m,
            Err(()) => {
                let id = u16::from_be_bytes([query[0], query[1]]);
                let op_code = OpCode::from_u8((query[2] >> 3) & 0x0f);
                let mut meta = Metadata::new(id, MessageType::Response, op_code);
                meta.recursion_desired = query[2] & 0x01 != 0;
                meta.response_code = ResponseCode::FormErr;
                let found = salvage(query);
                let (question, edns) = (found.question.as_ref(), found.edns.as_ref());
                return Some(self.emit_bare(meta, question, edns, &NO_ECS, transport, out));
            }
        };
        let mut meta = Metadata::response_from_request(&request.metadata);
        let query_edns = request.edns.as_ref();
        if request.metadata.op_code != OpCode::Query {
            meta.response_code = ResponseCode::NotImp;
            let q = request.queries.first();
            return Some(self.emit_bare(meta, q, query_edns, &NO_ECS, transport, out));
        }
        let [question] = request.queries.as_slice() else {
            meta.response_code = ResponseCode::FormErr;
            return Some(self.emit_bare(meta, None, query_edns, &NO_ECS, transport, out));
        };
        if let Some(edns) = query_edns {
            if edns.version() > 0 {
                meta.response_code = ResponseCode::BADVERS;
                let q = Some(question);
                return Some(self.emit_bare(meta, q, query_edns, &NO_ECS, transport, out));
            }
        }
        let location = match client_location(query_edns, query) {
            Ok(l) => l,
            Err(_) => {
                meta.response_code = ResponseCode::FormErr;
                let q = Some(question);
                return Some(self.emit_bare(meta, q, query_edns, &NO_ECS, transport, out));
            }
        };
        if !matches!(question.query_class(), DNSClass::IN | DNSClass::ANY)
            || matches!(question.query_type(), RecordType::AXFR | RecordType::IXFR)
        {
            meta.response_code = ResponseCode::Refused;
            let q = Some(question);
            return Some(self.emit_bare(meta, q, query_edns, &location, transport, out));
        }
        let mut placement = relative(question.name(), self.zone.domain(), &mut self.rel);
        let geodns = match (&self.geodns, placement) {
            (Some(g), Placement::Outside) => {
                placement = relative(question.name(), g.name(), &mut self.rel);
                Some(Arc::clone(g))
            }
            _ => None,
        };
        if placement == Placement::Outside {
            meta.response_code = ResponseCode::Refused;
            let q = Some(question);
            return Some(self.emit_bare(meta, q, query_edns, &location, transport, out));
        }

        meta.authoritative = true;
        self.reply.metadata = meta;
        self.reply.queries.clear();
        self.reply.queries.push(question.clone());
        self.reply.answers.clear();
        self.reply.authorities.clear();
        self.reply.additionals.clear();
        let limit = size_limit(transport, query_edns);

        let found = match placement {
            Placement::Inside => match &geodns {
                Some(zone) => {
                    let client = ClientPlace::locate(&self.geo, location.geo_address(client));
                    geodns::lookup(
                        zone,
                        &self.rel,
                        question.name(),
                        question.query_type(),
                        &client,
                        snapshot,
                        &mut self.reply,
                    )
                }
                None => {
                    let index = self.cache.get(snapshot, &self.zone);
                    let geo_ip = location.geo_address(client);
                    let mut lookup = Lookup {
                        zone: &self.zone,
                        geo: &self.geo,
                        snapshot,
                        index: &index,
                        qname: question.name(),
                        qtype: question.query_type(),
                        geo_ip,
                        max_answers: (usize::from(limit) - 12) / 12,
                        reply: &mut self.reply,
                        added: [0; 2],
                        scope: Scope::Everyone,
                    };
                    lookup.run(&self.rel).then_some(lookup.scope)
                }
            },
            _ => None,
        };
        if found.is_none() {
            self.reply.metadata.response_code = ResponseCode::NXDomain;
        }
        // Only an answer chosen by the client's location is scoped to its
        // subnet; NXDOMAIN and the rest hold for everyone (`crate::ecs`).
        let scope = found.unwrap_or_default();
        self.reply.edns = reply_edns(query_edns, &location, scope);
        if self.reply.answers.is_empty() {
            let soa = match &geodns {
                Some(zone) => zone.soa(serial(snapshot)),
                None => self.zone.soa(serial(snapshot)),
            };
            self.reply.authorities.push(soa);
        }
        Some(self.emit_reply(query_edns, transport, out))
    }

    /// A reply with no records: errors, refusals. `location`: the query's
    /// valid ECS option, echoed with scope 0 (a refusal is the same for
    /// every client); errors found before it was read echo none.
    fn emit_bare(
        &mut self,
        meta: Metadata,
        question: Option<&Query>,
        query_edns: Option<&Edns>,
        location: &ClientLocation,
        transport: Transport,
        out: &mut Vec<u8>,
    ) -> Answered {
        self.reply.metadata = meta;
        self.reply.queries.clear();
        self.reply.queries.extend(question.cloned());
        self.reply.answers.clear();
        self.reply.authorities.clear();
        self.reply.additionals.clear();
        self.reply.edns = reply_edns(query_edns, location, Scope::Everyone);
        self.emit_reply(query_edns, transport, out)
    }

    /// Encodes `self.reply` within the transport's size limit, shedding
    /// sections (see the module documentation) when it does not fit.
    fn emit_reply(
        &mut self,
        query_edns: Option<&Edns>,
        transport: Transport,
        out: &mut Vec<u8>,
    ) -> Answered {
        let limit = size_limit(transport, query_edns);
        let rcode = self.reply.metadata.response_code;
        // Every record takes at least 12 bytes (a compressed owner name and
        // the fixed fields): skip encodings that cannot fit (a region's list
        // of hundreds of backends over UDP) instead of trying them.
        let at_least = |records: usize| 12 + 12 * records;
        let needed = self.reply.answers.len() + self.reply.authorities.len();
        let hopeless = at_least(needed) > usize::from(limit);
        if !hopeless {
            let extra = self.reply.additionals.len();
            if at_least(needed + extra) <= usize::from(limit) && encode(&self.reply, limit, out) {
                return Answered {
                    rcode,
                    truncated: false,
                };
            }
            // Glue and other additional data are optional (RFC 2181 §9).
            if extra > 0 {
                self.reply.additionals.clear();
                if encode(&self.reply, limit, out) {
                    return Answered {
                        rcode,
                        truncated: false,
                    };
                }
            }
        }
        // Over TCP there is no larger transport to retry on: TC there is a
        // dead end (resolvers answer SERVFAIL). A list this zone makes up
        // (a region's backends, an app's SRV targets) is sent as long as it
        // fits instead.
        if transport == Transport::Tcp && self.fit_answers(limit, out) {
            return Answered {
                rcode,
                truncated: false,
            };
        }
        self.reply.answers.clear();
        self.reply.authorities.clear();
        self.reply.additionals.clear();
        self.reply.metadata.truncation = true;
        // Header, one question (≤ 259 bytes) and an OPT with one ECS option
        // always fit in 512 bytes.
        encode(&self.reply, limit, out);
        Answered {
            rcode,
            truncated: true,
        }
    }

    /// Keeps the longest prefix of the reply's answers that encodes within
    /// `limit` (found by bisection: each try encodes once), with the
    /// additional section already dropped. False when not even one answer
    /// fits.
    fn fit_answers(&mut self, limit: u16, out: &mut Vec<u8>) -> bool {
        let all = std::mem::take(&mut self.reply.answers);
        self.reply.authorities.clear();
        let (mut fits, mut too_many) = (0, all.len());
        while too_many - fits > 1 {
            let mid = fits + (too_many - fits) / 2;
            self.reply.answers.clear();
            self.reply.answers.extend_from_slice(&all[..mid]);
            if encode(&self.reply, limit, out) {
                fits = mid;
            } else {
                too_many = mid;
            }
        }
        self.reply.answers.clear();
        self.reply.answers.extend_from_slice(&all[..fits]);
        fits > 0 && encode(&self.reply, limit, out)
    }
}

/// The largest reply `transport` allows for a query with `query_edns`.
fn size_limit(transport: Transport, query_edns: Option<&Edns>) -> u16 {
    match (transport, query_edns) {
        (Transport::Tcp, _) => u16::MAX,
        (Transport::Udp, None) => CLASSIC_UDP_PAYLOAD,
        (Transport::Udp, Some(e)) => e.max_payload().clamp(CLASSIC_UDP_PAYLOAD, MAX_UDP_PAYLOAD),
    }
}

/// Whether the header's section counts fit in the message at all: a
/// question takes at least 5 bytes (root name, type, class), a record 11.
///
/// Checked before hickory decodes anything: its decoder reserves room for
/// as many questions as the header claims (`Vec::with_capacity(qdcount)`),
/// so a 12-byte datagram claiming 65,535 questions made it allocate
/// megabytes per packet. Found by `tests/bounded_memory.rs`: 5,000 garbage
/// datagrams a round grew resident memory round after round, the allocator
/// keeping the large blocks. A message that fails this check is malformed
/// anyway (FORMERR).
fn counts_fit(query: &[u8]) -> bool {
    let count = |at: usize| u16::from_be_bytes([query[at], query[at + 1]]) as usize;
    let body = query.len().saturating_sub(12);
    let (qd, an, ns, ar) = (count(4), count(6), count(8), count(10));
    qd * 5 + (an + ns + ar) * 11 <= body
}

/// The SOA serial: the snapshot version (it bumps on every routing change).
fn serial(snapshot: &RoutingSnapshot) -> u32 {
    snapshot.version as u32
}

/// The reply's OPT record: present when the query had one (RFC 6891),
/// advertising our own UDP limit, DO copied (RFC 3225), ECS echoed with
/// `scope`.
fn reply_edns(query_edns: Option<&Edns>, location: &ClientLocation, scope: Scope) -> Option<Edns> {
    let q = query_edns?;
    let mut edns = Edns::new();
    edns.set_max_payload(MAX_UDP_PAYLOAD);
    edns.set_version(0);
    edns.set_dnssec_ok(q.flags().dnssec_ok);
    if let Some(option) = location.reply_option(scope) {
        edns.options_mut().insert(option);
    }
    Some(edns)
}

/// Encodes `msg` into `out` (cleared first) with at most `limit` bytes.
/// Returns false when something did not fit (the bytes are then unusable).
fn encode(msg: &Message, limit: u16, out: &mut Vec<u8>) -> bool {
    out.clear();
    let mut encoder = BinEncoder::new(out);
    encoder.set_max_size(limit);
    let result = emit_message_parts(
        &msg.metadata,
        &mut msg.queries.iter(),
        &mut msg.answers.iter(),
        &mut msg.authorities.iter(),
        &mut msg.additionals.iter(),
        msg.edns.as_ref(),
        None,
        &mut encoder,
    );
    match result {
        Ok(header) => msg.metadata.truncation || !header.truncation,
        Err(_) => false,
    }
}

/// One in-zone lookup: fills the reply's sections.
struct Lookup<'a> {
    zone: &'a ZoneConfig,
    geo: &'a GeoResolver,
    snapshot: &'a RoutingSnapshot,
    index: &'a ZoneIndex,
    qname: &'a Name,
    qtype: RecordType,
    geo_ip: Option<IpAddr>,
    /// More answers than this cannot fit the reply (12 bytes each at least):
    /// past it, building more records is wasted work, the reply will be
    /// truncated whatever they are.
    max_answers: usize,
    reply: &'a mut Message,
    /// A and AAAA records added so far (each RRset is capped at
    /// [`MAX_RRSET_RECORDS`]).
    added: [usize; 2],
    /// Whether a record was chosen or ordered by the client's location.
    scope: Scope,
}

impl Lookup<'_> {
    /// Adds the records for `rel` (the query name relative to the zone);
    /// returns whether the name exists.
    fn run(&mut self, rel: &str) -> bool {
        match classify(rel) {
            Target::Apex => {
                if self.wants(RecordType::SOA) {
                    let soa = self.zone.soa(serial(self.snapshot));
                    self.reply.answers.push(soa);
                }
                if self.wants(RecordType::NS) {
                    self.reply.answers.push(self.zone.ns());
                    let ns = self.zone.ns_name().clone();
                    for &ip in self.zone.ns_addrs() {
                        self.reply
                            .additionals
                            .push(address_record(&ns, self.zone.ttl(), ip));
                    }
                }
                true
            }
            Target::NsHost => {
                for &ip in self.zone.ns_addrs() {
                    self.add_address(ip);
                }
                true
            }
            Target::RegionBackends(region) => {
                let Some(list) = self.index.region(region) else {
                    return false;
                };
                let mut seen: Vec<IpAddr> = Vec::new();
                for &idx in list {
                    if self.reply.answers.len() > self.max_answers || self.rrsets_full() {
                        break;
                    }
                    let ip = self.snapshot.backend(idx).addr.ip();
                    // Backends sharing an address (different ports) give one
                    // record: an RRset holds no duplicates.
                    if !seen.contains(&ip) {
                        seen.push(ip);
                        self.add_address(ip);
                    }
                }
                true
            }
            Target::RegionPops(region) => {
                // The configured POPs, then the cluster's (replicated `pops`
                // table) that are alive and not draining; one record per
                // address.
                let mut seen: Vec<IpAddr> = Vec::new();
                let mut any = false;
                for pop in self.zone.pops_in(region) {
                    any = true;
                    if !seen.contains(&pop.addr) {
                        seen.push(pop.addr);
                        self.add_address(pop.addr);
                    }
                }
                let snapshot = self.snapshot;
                for pop in snapshot.pops.iter().filter(|p| &*p.region == region) {
                    any = true;
                    if !pop.serving() {
                        continue;
                    }
                    for &ip in &pop.addrs {
                        if !seen.contains(&ip) {
                            seen.push(ip);
                            self.add_address(ip);
                        }
                    }
                }
                any
            }
            Target::Srv(app) => {
                let Some(entry) = self.index.app(app) else {
                    return self.index.is_empty_nonterminal(rel);
                };
                if self.wants(RecordType::SRV) {
                    self.add_srv(&entry.srv);
                }
                true
            }
            Target::Node(rel) => self.node(rel),
        }
    }

    /// An app, `<id>.<app>`, or an empty non-terminal.
    fn node(&mut self, rel: &str) -> bool {
        if let Some(entry) = self.index.app(rel) {
            let client = self.client_geo();
            let local = self.snapshot.region_id(self.zone.local_region());
            for (qtype, candidates) in [(RecordType::A, &entry.v4), (RecordType::AAAA, &entry.v6)] {
                if !self.wants(qtype) {
                    continue;
                }
                let choice = pick(self.snapshot, candidates, &client, local, &[], |b| {
                    b.active()
                });
                if let Some(choice) = choice {
                    let ip = self.snapshot.backend(choice.idx).addr.ip();
                    self.add_address(ip);
                    self.scope = Scope::Located;
                }
            }
            return true;
        }
        if let Some((id, app)) = rel.split_once('.') {
            if let Some(idx) = self.index.app(app).and_then(|e| e.backend(id)) {
                let ip = self.snapshot.backend(idx).addr.ip();
                self.add_address(ip);
                return true;
            }
        }
        self.index.is_empty_nonterminal(rel)
    }

    /// SRV records for every healthy backend of the app that has a name:
    /// priority is the backend's geo tier for this client (closest first, as
    /// the proxy prefers), weight the backend's weight; glue in additional.
    fn add_srv(&mut self, targets: &[(BackendIdx, Name)]) {
        let client = self.client_geo();
        let local = self.snapshot.region_id(self.zone.local_region());
        let mut records: Vec<(u16, Record, Record)> = targets
            .iter()
            .map(|(idx, target)| {
                let b = self.snapshot.backend(*idx);
                let tier = tier_of(b, &client, local) as u16;
                let weight = u16::try_from(b.weight).unwrap_or(u16::MAX);
                let srv = SRV::new(tier, weight, b.addr.port(), target.clone());
                let ttl = self.zone.ttl();
                (
                    tier,
                    Record::from_rdata(self.qname.clone(), ttl, RData::SRV(srv)),
                    address_record(target, ttl, b.addr.ip()),
                )
            })
            .collect();
        records.sort_by_key(|(tier, _, _)| *tier);
        records.truncate(MAX_RRSET_RECORDS);
        // Priorities (and which records a long list keeps) are the
        // client's tiers.
        if !records.is_empty() {
            self.scope = Scope::Located;
        }
        for (_, srv, glue) in records {
            self.reply.answers.push(srv);
            self.reply.additionals.push(glue);
        }
    }

    fn client_geo(&self) -> ClientGeo {
        let Some(ip) = self.geo_ip else {
            return ClientGeo::default();
        };
        let (country, region) = self.geo.locate(ip);
        ClientGeo {
            country,
            region: region.and_then(|r| self.snapshot.region_id(r)),
        }
    }

    fn wants(&self, t: RecordType) -> bool {
        self.qtype == t || self.qtype == RecordType::ANY
    }

    /// An A or AAAA answer at the query name, if that type was asked and
    /// its RRset is not full.
    fn add_address(&mut self, ip: IpAddr) {
        let (t, family) = match ip {
            IpAddr::V4(_) => (RecordType::A, 0),
            IpAddr::V6(_) => (RecordType::AAAA, 1),
        };
        if self.wants(t) && self.added[family] < MAX_RRSET_RECORDS {
            self.added[family] += 1;
            let record = address_record(self.qname, self.zone.ttl(), ip);
            self.reply.answers.push(record);
        }
    }

    /// Whether every address RRset asked for holds [`MAX_RRSET_RECORDS`]
    /// records: a longer list adds nothing more.
    fn rrsets_full(&self) -> bool {
        [RecordType::A, RecordType::AAAA]
            .iter()
            .zip(self.added)
            .all(|(&t, n)| !self.wants(t) || n >= MAX_RRSET_RECORDS)
    }
}

fn address_record(name: &Name, ttl: u32, ip: IpAddr) -> Record {
    let rdata = match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    };
    Record::from_rdata(name.clone(), ttl, rdata)
}

#[cfg(test)]
mod tests;
