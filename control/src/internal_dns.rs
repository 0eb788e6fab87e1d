//! Starts the internal DNS server (`dns` crate) from configuration.
//!
//! [`bind`] runs during startup, before `edgeproxy ready`: it binds both
//! sockets, so a bad or busy address stops the process like a proxy listener
//! would, and logs `dns listening udp=ADDR tcp=ADDR`. [`Bound::serve`] then
//! serves TCP on the control thread's Tokio runtime and UDP on threads of
//! its own (`dns-udp-N`) for the life of the process, answering from the
//! routing snapshot it is given.
//! With `[geodns] name` set the same server answers that public zone too.

use std::net::IpAddr;
use std::sync::Arc;

use anyhow::Context;
use dns::server::{DnsServer, ServerSettings};
use dns::{Answerer, GeoZone, PopEntry, ZoneConfig};
use engine::geo::GeoResolver;
use engine::snapshot::SnapshotHandle;

use crate::config::Config;

/// Sockets bound, not yet served.
pub struct Bound {
    server: DnsServer,
    answerer: Answerer,
}

/// Binds the DNS server if `[dns] enabled`; `None` when disabled.
pub fn bind(config: &Config, geo: Arc<GeoResolver>) -> anyhow::Result<Option<Bound>> {
    let c = &config.dns;
    if !c.enabled {
        return Ok(None);
    }
    let pops: Vec<PopEntry> = c
        .pops
        .iter()
        .map(|p| PopEntry {
            name: p.name.clone(),
            region: p.region.clone(),
            addr: p.addr,
        })
        .collect();
    // `ns.<domain>` is this POP: its own entry in the POP list, else the
    // listen address when it is a concrete one.
    let mut ns_addrs: Vec<IpAddr> = c
        .pops
        .iter()
        .filter(|p| p.name == config.pop.name)
        .map(|p| p.addr)
        .collect();
    if ns_addrs.is_empty() && !c.listen_addr.ip().is_unspecified() {
        ns_addrs.push(c.listen_addr.ip());
    }
    let zone = ZoneConfig::new(&c.domain, c.ttl_secs, &config.pop.region, pops, ns_addrs)
        .context("invalid [dns] configuration")?;
    let settings = ServerSettings {
        listen: c.listen_addr,
        tcp_idle_timeout: c.tcp_idle_timeout,
        tcp_max_connections: c.tcp_max_connections.get() as usize,
        udp_workers: c.udp_workers as usize,
        udp_batch_scheduling: c.udp_batch_scheduling,
    };
    let server = match inherited_sockets(c.listen_addr) {
        Some((udp, tcp)) => DnsServer::from_sockets(udp, tcp, settings)?,
        None => DnsServer::bind(settings)?,
    };
    let (udp_fds, tcp_fd) = server.sockets();
    crate::upgrade::sockets::register("dns-udp", &udp_fds)
        .and_then(|()| crate::upgrade::sockets::register("dns-tcp", &[tcp_fd]))
        .context("dns: cannot register sockets for upgrades")?;
    let udp = server.udp_addr().context("dns udp socket")?;
    let tcp = server.tcp_addr().context("dns tcp listener")?;
    tracing::info!(%udp, %tcp, domain = %c.domain, ttl_secs = c.ttl_secs, pops = c.pops.len(),
        udp_workers = c.udp_workers, udp_batch_scheduling = c.udp_batch_scheduling, "dns listening");
    let mut answerer = Answerer::new(Arc::new(zone), geo);
    if let Some(name) = &config.geodns.name {
        let zone = GeoZone::new(
            name,
            config.geodns.ttl_secs,
            config.geodns.answers,
            config.pop.public_addrs.clone(),
        )
        .context("invalid [geodns] configuration")?;
        if config.pop.public_addrs.is_empty() {
            tracing::warn!("geodns: [pop] public_addrs is empty: other POPs answer this one at its replication address");
        }
        tracing::info!(zone = %name, ttl_secs = config.geodns.ttl_secs, answers = config.geodns.answers,
            "geodns: answering the nearest POPs that take traffic");
        answerer = answerer.with_geodns(zone);
    }
    Ok(Some(Bound { server, answerer }))
}

/// Both DNS sockets, when a binary upgrade handed them over (`dns-udp` on
/// the configured address, `dns-tcp` on the port UDP has).
fn inherited_sockets(
    listen: std::net::SocketAddr,
) -> Option<(Vec<std::net::UdpSocket>, std::net::TcpListener)> {
    let udp = crate::upgrade::sockets::take_udp_sockets("dns-udp", listen)?;
    let at = udp.first()?.local_addr().ok()?;
    let tcp = crate::upgrade::sockets::take_tcp_listener("dns-tcp", at)?;
    Some((udp, tcp))
}

impl Bound {
    /// Serves until `stop` turns true (after a binary upgrade handed the
    /// sockets on) or the runtime stops, answering from `snapshot`. Spawn it
    /// on the control runtime.
    pub async fn serve(self, snapshot: SnapshotHandle, stop: tokio::sync::watch::Receiver<bool>) {
        if let Err(e) = self.server.run_until(self.answerer, snapshot, stop).await {
            tracing::error!(error = %e, "dns server stopped");
        }
    }
}
