//! Real BGP routers for the anycast tests: BIRD 2 (`bird`, `birdc`), GoBGP
//! (`gobgpd`, `gobgp`) and FRR (`bgpd`, `vtysh`), each run inside a host of
//! a [`Net`], in the foreground, killed (and their files removed) on drop,
//! also when the test fails. The tests read what the router learned with
//! the router's own CLI (`birdc show route all`, `gobgp global rib`,
//! `vtysh -c "show bgp …"`), the way an operator would.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::netns::Net;
use super::TempDir;

/// Fails the test with a clear message when a router is not installed.
pub fn require(program: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{program} is missing: apt-get install {package} (.ci/run does)"
    );
}

/// One BGP neighbor of a router: the POP at `addr` in `asn`.
pub struct Peer {
    pub name: String,
    pub addr: String,
    pub asn: u32,
    pub hold_secs: u16,
    /// TCP MD5 password (RFC 2385) the router requires of this peer.
    pub password: Option<String>,
    /// The router runs BFD on this session (BIRD: `bfd on`).
    pub bfd: bool,
}

/// BIRD 2 in a namespace.
pub struct Bird {
    child: Child,
    ns: String,
    socket: PathBuf,
    pub log: PathBuf,
    _dir: TempDir,
}

impl Bird {
    /// Starts BIRD as AS `asn` on host `host` of `net`, with one passive
    /// session per peer. Routes carrying GRACEFUL_SHUTDOWN get LOCAL_PREF
    /// 0 (RFC 8326's receiver policy), and the best routes of both families
    /// go into the host's kernel table, so the host forwards by them (an
    /// IPv6 route whose next hop is IPv4-mapped cannot go there: BIRD logs
    /// `Netlink: Invalid argument` and keeps it unused).
    pub fn start(net: &Net, host: usize, asn: u32, peers: &[Peer]) -> Bird {
        Bird::start_with(net, host, asn, peers, "protocol bfd {}")
    }

    /// [`Bird::start`] with `bfd_protocol` as the `protocol bfd` block
    /// (used when a peer has `bfd`).
    pub fn start_with(
        net: &Net,
        host: usize,
        asn: u32,
        peers: &[Peer],
        bfd_protocol: &str,
    ) -> Bird {
        require("bird", "bird2");
        let dir = TempDir::new("bird");
        let socket = dir.join("bird.ctl");
        let log = dir.join("bird.log");
        let mut conf = format!(
            r#"
router id {router_id};
log "{log}" all;
timeformat log "%F %T.%3f";
timeformat protocol "%F %T.%3f";
debug protocols {{ states, events, routes }};
protocol device {{ scan time 10; }}
protocol direct {{ ipv4; }}
protocol kernel {{ ipv4 {{ export filter {{ if source = RTS_BGP then accept; reject; }}; }}; }}
protocol kernel {{ ipv6 {{ export filter {{ if source = RTS_BGP then accept; reject; }}; }}; }}
filter from_pop {{
    if (65535, 0) ~ bgp_community then bgp_local_pref = 0;
    accept;
}}
"#,
            router_id = net.ip(host),
            log = log.display(),
        );
        for p in peers {
            conf.push_str(&format!(
                r#"
protocol bgp {name} {{
    local {local} as {asn};
    neighbor {addr} as {peer_asn};
    passive on;
    hold time {hold};{password}{bfd}
    # After an error (a hold timer expiry) BIRD waits 60 s by default
    # before it takes a session again; a lab restarts faster.
    error wait time 1, 5;
    ipv4 {{ import filter from_pop; export none; }};
    # IPv6 routes over this IPv4 session carry an IPv4-mapped next hop.
    ipv6 {{ import filter from_pop; export none; extended next hop on; }};
}}
"#,
                name = p.name,
                local = net.ip(host),
                addr = p.addr,
                peer_asn = p.asn,
                hold = p.hold_secs,
                password = p
                    .password
                    .as_ref()
                    .map(|pw| format!("\n    password \"{pw}\";"))
                    .unwrap_or_default(),
                bfd = if p.bfd { "\n    bfd on;" } else { "" },
            ));
        }
        if peers.iter().any(|p| p.bfd) {
            // BIRD's defaults: it sends every 100 ms, takes packets 10 ms
            // apart, multiplier 5.
            conf.push_str(&format!("\n{bfd_protocol}\n"));
        }
        let conf_path = dir.join("bird.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = net
            .command(host, "bird")
            .args(["-f", "-c"])
            .arg(&conf_path)
            .arg("-s")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start bird");
        let bird = Bird {
            child,
            ns: net.hosts[host].ns.clone(),
            socket,
            log,
            _dir: dir,
        };
        let up = super::eventually(Duration::from_secs(20), || {
            bird.birdc(&["show", "status"]).contains("Daemon is up")
        });
        assert!(up, "bird did not come up; log:\n{}", bird.log_text());
        bird
    }

    pub fn birdc(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "birdc", "-s"])
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("cannot run birdc");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `birdc show route all for PREFIX` without the banner; empty when the
    /// route is not there.
    pub fn route(&self, prefix: &str) -> String {
        let out = self.birdc(&["show", "route", "all", "for", prefix]);
        let body: Vec<&str> = out
            .lines()
            .filter(|l| !l.starts_with("BIRD ") && !l.starts_with("Table ") && !l.trim().is_empty())
            .collect();
        if body.iter().any(|l| l.contains("Network not found")) {
            return String::new();
        }
        body.join("\n")
    }

    /// Whether BIRD holds a route for exactly `prefix`.
    pub fn has_route(&self, prefix: &str) -> bool {
        self.route(prefix).contains(prefix)
    }

    /// The protocol's state line (`Established`, `Active`, …).
    pub fn protocol_state(&self, name: &str) -> String {
        self.birdc(&["show", "protocols", name])
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GoBGP in a namespace.
pub struct GoBgp {
    child: Child,
    ns: String,
    api_port: u16,
    pub log: PathBuf,
    _dir: TempDir,
}

impl GoBgp {
    /// Starts gobgpd as AS `asn` on host `host`, one passive neighbor per
    /// peer (IPv4 and IPv6 unicast), its gRPC API on `api_port`.
    pub fn start(net: &Net, host: usize, asn: u32, peers: &[Peer], api_port: u16) -> GoBgp {
        require("gobgpd", "gobgpd");
        let dir = TempDir::new("gobgp");
        let log = dir.join("gobgpd.log");
        let mut conf = format!(
            "[global.config]\n  as = {asn}\n  router-id = \"{}\"\n  port = 179\n",
            net.ip(host)
        );
        for p in peers {
            conf.push_str(&format!(
                r#"
[[neighbors]]
  [neighbors.config]
    neighbor-address = "{addr}"
    peer-as = {peer_asn}{password}
  [neighbors.timers.config]
    hold-time = {hold}
    keepalive-interval = {ka}
  [neighbors.transport.config]
    passive-mode = true
  [[neighbors.afi-safis]]
    [neighbors.afi-safis.config]
      afi-safi-name = "ipv4-unicast"
  [[neighbors.afi-safis]]
    [neighbors.afi-safis.config]
      afi-safi-name = "ipv6-unicast"
"#,
                addr = p.addr,
                peer_asn = p.asn,
                hold = p.hold_secs,
                ka = (p.hold_secs / 3).max(1),
                password = p
                    .password
                    .as_ref()
                    .map(|pw| format!("\n    auth-password = \"{pw}\""))
                    .unwrap_or_default(),
            ));
        }
        let conf_path = dir.join("gobgpd.toml");
        std::fs::write(&conf_path, conf).unwrap();
        let logfile = std::fs::File::create(&log).unwrap();
        let child = net
            .command(host, "gobgpd")
            .arg("-f")
            .arg(&conf_path)
            .args(["-t", "toml", "--api-hosts"])
            .arg(format!("127.0.0.1:{api_port}"))
            .stdin(Stdio::null())
            .stdout(logfile.try_clone().unwrap())
            .stderr(logfile)
            .spawn()
            .expect("cannot start gobgpd");
        let g = GoBgp {
            child,
            ns: net.hosts[host].ns.clone(),
            api_port,
            log,
            _dir: dir,
        };
        let up = super::eventually(Duration::from_secs(20), || {
            g.gobgp(&["global"]).contains("AS:")
        });
        assert!(up, "gobgpd did not come up; log:\n{}", g.log_text());
        g
    }

    pub fn gobgp(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "gobgp", "-p"])
            .arg(self.api_port.to_string())
            .args(args)
            .output()
            .expect("cannot run gobgp");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The RIB's line for `prefix` in family `ipv4` / `ipv6` (empty when
    /// absent).
    pub fn route(&self, family: &str, prefix: &str) -> String {
        let out = self.gobgp(&["global", "rib", "-a", family, prefix]);
        if out.contains("Network not in table") {
            return String::new();
        }
        out.lines()
            .filter(|l| l.contains(prefix))
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for GoBgp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// FRR's `bgpd` alone in a namespace: no zebra (`-Z`), so it learns routes
/// but installs none in the kernel; read with `vtysh` over its own socket
/// directory.
pub struct Frr {
    child: Child,
    /// With BFD: zebra and bfdd, which bgpd reaches through zebra's socket.
    helpers: Vec<Child>,
    ns: String,
    vty_dir: PathBuf,
    pub log: PathBuf,
    _dir: TempDir,
}

impl Frr {
    /// Starts bgpd as AS `asn` on host `host`, one passive neighbor per
    /// peer with IPv4 and IPv6 unicast, no policy required on eBGP (FRR
    /// rejects every eBGP route without one by default, RFC 8212).
    pub fn start(net: &Net, host: usize, asn: u32, peers: &[Peer]) -> Frr {
        const BGPD: &str = "/usr/lib/frr/bgpd";
        require(BGPD, "frr");
        require("vtysh", "frr");
        let dir = TempDir::new("frr");
        let log = dir.join("bgpd.log");
        let mut conf = format!(
            "frr defaults traditional\nhostname r{host}\nlog file {log} debugging\n\
             debug bgp neighbor-events\nrouter bgp {asn}\n bgp router-id {id}\n \
             no bgp ebgp-requires-policy\n",
            log = log.display(),
            id = net.ip(host),
        );
        for p in peers {
            conf.push_str(&format!(
                " neighbor {addr} remote-as {peer_asn}\n neighbor {addr} passive\n \
                 neighbor {addr} timers {ka} {hold}\n",
                addr = p.addr,
                peer_asn = p.asn,
                ka = (p.hold_secs / 3).max(1),
                hold = p.hold_secs,
            ));
            if let Some(pw) = &p.password {
                conf.push_str(&format!(" neighbor {} password {pw}\n", p.addr));
            }
            if p.bfd {
                conf.push_str(&format!(" neighbor {} bfd\n", p.addr));
            }
        }
        conf.push_str(" address-family ipv6 unicast\n");
        for p in peers {
            conf.push_str(&format!("  neighbor {} activate\n", p.addr));
        }
        conf.push_str(" exit-address-family\n");
        let conf_path = dir.join("bgpd.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let vty_dir = dir.join("vty");
        std::fs::create_dir_all(&vty_dir).unwrap();
        let zserv = dir.join("zserv.api");
        let mut helpers = Vec::new();
        let bfd = peers.iter().any(|p| p.bfd);
        if bfd {
            // bgpd asks bfdd for its sessions through zebra. Both run as
            // the `frr` user (they refuse root outside the frrvty group):
            // the directory must be theirs to write.
            use std::os::unix::fs::PermissionsExt;
            for d in [dir.path(), vty_dir.as_path()] {
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777)).unwrap();
            }
            for (daemon, extra) in [
                ("zebra", "debug zebra events\n"),
                ("bfdd", "debug bfd peer\n"),
            ] {
                let conf = dir.join(&format!("{daemon}.conf"));
                std::fs::write(
                    &conf,
                    format!(
                        "hostname r{host}\nlog file {} debugging\n{extra}",
                        dir.join(&format!("{daemon}.log")).display()
                    ),
                )
                .unwrap();
                std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o644)).unwrap();
                let mut cmd = net.command(host, &format!("/usr/lib/frr/{daemon}"));
                cmd.arg("-f")
                    .arg(&conf)
                    .arg("-z")
                    .arg(&zserv)
                    .arg("--vty_socket")
                    .arg(&vty_dir)
                    .arg("-i")
                    .arg(dir.join(&format!("{daemon}.pid")));
                if daemon == "bfdd" {
                    cmd.arg("--bfdctl").arg(dir.join("bfdd.sock"));
                }
                let child = cmd
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap_or_else(|e| panic!("cannot start {daemon}: {e}"));
                helpers.push(child);
                if daemon == "zebra" {
                    let up = super::eventually(Duration::from_secs(20), || zserv.exists());
                    assert!(up, "zebra did not come up");
                }
            }
        }
        let mut bgpd = net.command(host, BGPD);
        bgpd.arg("-f").arg(&conf_path);
        if bfd {
            bgpd.arg("-z").arg(&zserv);
        } else {
            // No zebra, no kernel routes.
            bgpd.arg("-Z");
        }
        let child = bgpd
            // No user switch, no TCP vty.
            .args(["-n", "-S", "-P", "0", "--vty_socket"])
            .arg(&vty_dir)
            .arg("-i")
            .arg(dir.join("bgpd.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start bgpd");
        let frr = Frr {
            child,
            helpers,
            ns: net.hosts[host].ns.clone(),
            vty_dir,
            log,
            _dir: dir,
        };
        let up = super::eventually(Duration::from_secs(20), || {
            frr.vtysh("show bgp summary").contains("local AS number")
        });
        assert!(up, "bgpd did not come up; log:\n{}", frr.log_text());
        frr
    }

    /// One `vtysh -c COMMAND`'s output.
    pub fn vtysh(&self, command: &str) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "vtysh", "--vty_socket"])
            .arg(&self.vty_dir)
            .args(["-c", command])
            .output()
            .expect("cannot run vtysh");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `show bgp <family> unicast PREFIX json` (family `ipv4` / `ipv6`):
    /// empty when the route is not there.
    pub fn route_json(&self, family: &str, prefix: &str) -> String {
        let out = self.vtysh(&format!("show bgp {family} unicast {prefix} json"));
        if out.contains("\"paths\"") {
            out
        } else {
            String::new()
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Frr {
    fn drop(&mut self) {
        for child in std::iter::once(&mut self.child).chain(&mut self.helpers) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls `probe` every 20 ms until it is true; returns when it became true
/// (`None`: not within `timeout`).
pub fn when(timeout: Duration, mut probe: impl FnMut() -> bool) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        if probe() {
            return Some(Instant::now());
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
