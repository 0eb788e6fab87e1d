//! Anycast over BGP with real routers: edgeproxy POPs, each in its own
//! network namespace, peer with BIRD 2 (and GoBGP) in a router namespace;
//! a client in another namespace reaches the anycast address through the
//! router, which forwards by the routes it learned (BIRD exports its best
//! IPv4 routes to the router's kernel table).
//!
//! Layout (one bridge, 10.77.0.0/24): host 0 is the router (AS 65000),
//! hosts 1..=n the POPs (AS 65010, anycast 198.51.100.1 on their loopback,
//! a backend of their own answering `pop-<i>`), the last host the client
//! (198.51.100.0/24 via the router). The router neither sends nor honours
//! ICMP redirects, so client traffic keeps going through it.
//!
//! What is read where: routes with `birdc show route all` / `gobgp global
//! rib` / FRR's `vtysh -c "show bgp …"`, the POP's actions from its log (`bgp: routes withdrawn`), the
//! client's experience by connecting. Needs root (network namespaces),
//! `bird2`, `gobgpd` and `frr` (`.ci/run` installs them).

mod common;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::netns::Net;
use common::routers::{when, Bird, Frr, GoBgp, Peer};
use common::{read_line, Db, Proxy, Row, TagBackend, TempDir};

/// One lab at a time: each runs routers and POPs on a 2-core machine.
static SERIAL: Mutex<()> = Mutex::new(());

const PREFIX4: &str = "198.51.100.0/24";
const PREFIX6: &str = "2001:db8:100::/48";
const ANYCAST: &str = "198.51.100.1";
const ROUTER_ASN: u32 = 65000;
const POP_ASN: u32 = 65010;
/// Generous: a loaded 2-core machine, routers that retry on their own
/// schedule.
const PATIENCE: Duration = Duration::from_secs(40);

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

struct Lab {
    net: Net,
    dir: TempDir,
    n_pops: usize,
    pops: Vec<Option<Proxy>>,
    _backends: Vec<TagBackend>,
    /// Per POP: extra `[bgp]` lines.
    bgp_extra: Vec<String>,
    /// Per POP: extra sections after the rest (e.g. `[health]`).
    sections: Vec<String>,
    /// Per POP: the address of its one listener.
    listen: Vec<String>,
    /// Per POP: the prefixes it announces.
    announce: Vec<Vec<&'static str>>,
    hold_secs: u16,
    /// Per POP: extra lines in its `[[bgp.neighbor]]` (the router).
    neighbor_extra: Vec<String>,
}

fn sh(net: &Net, host: usize, args: &[&str]) {
    let out = net
        .command(host, args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} in host {host}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Gives each `(host, address/len)` that IPv6 address on its `eth0`
/// (no duplicate address detection: usable at once).
fn add_ipv6(lab: &Lab, addrs: &[(usize, &str)]) {
    for (host, addr) in addrs {
        sh(
            &lab.net,
            *host,
            &["ip", "-6", "addr", "add", addr, "dev", "eth0", "nodad"],
        );
    }
}

impl Lab {
    /// The hosts, wired; no POP started.
    fn new(n_pops: usize, hold_secs: u16) -> Lab {
        let net = Net::new(n_pops + 2);
        let router = 0;
        let client = n_pops + 1;
        for key in [
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.send_redirects=0",
            "net.ipv4.conf.eth0.send_redirects=0",
        ] {
            sh(&net, router, &["sysctl", "-qw", key]);
        }
        for key in [
            "net.ipv4.conf.all.accept_redirects=0",
            "net.ipv4.conf.eth0.accept_redirects=0",
        ] {
            sh(&net, client, &["sysctl", "-qw", key]);
        }
        let via = net.ip(router).to_string();
        sh(&net, client, &["ip", "route", "add", PREFIX4, "via", &via]);
        let dir = TempDir::new("bgp");
        let mut backends = Vec::new();
        for i in 1..=n_pops {
            sh(
                &net,
                i,
                &["ip", "addr", "add", &format!("{ANYCAST}/32"), "dev", "lo"],
            );
            let listener = net.run_in(i, || TcpListener::bind("127.0.0.1:0").unwrap());
            let backend = TagBackend::serve(listener, &format!("pop-{i}"));
            let db = Db::create(dir.join(&format!("routing-{i}.db")));
            db.upsert(&Row::new(&format!("web-{i}"), "web", "sa", backend.port()));
            backends.push(backend);
        }
        Lab {
            net,
            dir,
            n_pops,
            pops: (0..=n_pops).map(|_| None).collect(),
            _backends: backends,
            bgp_extra: vec![String::new(); n_pops + 1],
            sections: vec![String::new(); n_pops + 1],
            listen: vec!["0.0.0.0:8080".to_string(); n_pops + 1],
            announce: vec![vec![PREFIX4, PREFIX6]; n_pops + 1],
            hold_secs,
            neighbor_extra: vec![String::new(); n_pops + 1],
        }
    }

    fn client(&self) -> usize {
        self.n_pops + 1
    }

    fn db(&self, i: usize) -> Db {
        Db::open(self.dir.join(&format!("routing-{i}.db")))
    }

    fn peers(&self) -> Vec<Peer> {
        (1..=self.n_pops)
            .map(|i| Peer {
                name: format!("pop{i}"),
                addr: self.net.ip(i).to_string(),
                asn: POP_ASN,
                hold_secs: self.hold_secs,
                password: None,
                bfd: false,
            })
            .collect()
    }

    fn config(&self, i: usize) -> String {
        format!(
            r#"
[pop]
name = "pop-{i}"
region = "sa"
[routing]
db_path = "{db}"
reload_interval_ms = 100
[runtime]
shards = 1
[limits]
shutdown_grace_secs = 2
[[listener]]
addr = "{listen}"
[api]
enabled = true
listen_addr = "127.0.0.1:8081"
[bgp]
enabled = true
local_asn = {POP_ASN}
local_address = "{ip}"
announce = {announce:?}
drain_delay_secs = 2
withdraw_grace_ms = 1500
{extra}
[[bgp.neighbor]]
address = "{router}"
asn = {ROUTER_ASN}
hold_time_secs = {hold}
{neighbor_extra}
{sections}
"#,
            db = self.dir.join(&format!("routing-{i}.db")).display(),
            ip = self.net.ip(i),
            router = self.net.ip(0),
            extra = self.bgp_extra[i],
            hold = self.hold_secs,
            sections = self.sections[i],
            neighbor_extra = self.neighbor_extra[i],
            listen = self.listen[i],
            announce = self.announce[i],
        )
    }

    /// Writes POP `i`'s config file (read at launch and on SIGHUP).
    fn write_config(&self, i: usize) -> std::path::PathBuf {
        let path = self.dir.join(&format!("pop-{i}.toml"));
        std::fs::write(&path, self.config(i)).unwrap();
        path
    }

    /// Starts POP `i` and waits until it is ready.
    fn launch(&mut self, i: usize) {
        let path = self.write_config(i);
        let proxy = Proxy::spawn_in_netns(
            &self.net.hosts[i].ns,
            &["--config", path.to_str().unwrap()],
            &[],
        )
        .ready();
        self.pops[i] = Some(proxy);
    }

    fn pop(&self, i: usize) -> &Proxy {
        self.pops[i].as_ref().expect("POP not running")
    }

    /// Runs `edgeproxy ARGS` inside POP `i` (its API is on its loopback).
    fn cli(&self, i: usize, args: &[&str]) -> String {
        let out = self
            .net
            .command(i, common::BIN)
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "edgeproxy {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Which POP answers a new connection from the client to the anycast
    /// address (`Err`: the connection failed, and how).
    fn ask_anycast(&self) -> Result<String, String> {
        self.net.run_in(self.client(), || {
            let addr: SocketAddr = format!("{ANYCAST}:8080").parse().unwrap();
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .map_err(|e| format!("connect: {e}"))?;
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            read_line(&s).ok_or_else(|| "no answer".to_string())
        })
    }

    /// Whether POP `i`'s listener accepts, reached on its own address.
    fn accepts(&self, i: usize) -> bool {
        let addr: SocketAddr = format!("{}:8080", self.net.ip(i)).parse().unwrap();
        self.net.run_in(self.client(), move || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
        })
    }
}

/// The time of a log line (tracing's RFC 3339 timestamp, UTC).
fn log_time(line: &str) -> f64 {
    let stamp = line.split_whitespace().next().unwrap_or("");
    let time = stamp.split('T').nth(1).unwrap_or("").trim_end_matches('Z');
    let mut parts = time.split(':');
    let h: f64 = parts
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(f64::NAN);
    let m: f64 = parts
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(f64::NAN);
    let s: f64 = parts
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(f64::NAN);
    h * 3600.0 + m * 60.0 + s
}

fn bird_lab(n_pops: usize, hold_secs: u16) -> (Lab, Bird) {
    let lab = Lab::new(n_pops, hold_secs);
    let bird = Bird::start(&lab.net, 0, ROUTER_ASN, &lab.peers());
    (lab, bird)
}

fn wait_route(bird: &Bird, prefix: &str, present: bool, what: &str) -> Instant {
    when(PATIENCE, || bird.has_route(prefix) == present).unwrap_or_else(|| {
        panic!(
            "{what}: route {prefix} {} BIRD; table:\n{}\nBIRD log:\n{}",
            if present {
                "never reached"
            } else {
                "never left"
            },
            bird.birdc(&["show", "route", "all"]),
            bird.log_text()
        )
    })
}

#[test]
fn bird_learns_the_prefixes_and_a_drain_tags_then_withdraws_them() {
    let _serial = serial();
    let (mut lab, bird) = bird_lab(1, 9);
    lab.launch(1);
    wait_route(&bird, PREFIX4, true, "announce");
    let route = bird.route(PREFIX4);
    assert!(route.contains("via 10.77.0.2"), "next hop self:\n{route}");
    assert!(
        route.contains(&format!("BGP.as_path: {POP_ASN}")),
        "{route}"
    );
    assert!(
        !route.contains("(65535,0)"),
        "no GRACEFUL_SHUTDOWN yet:\n{route}"
    );
    // IPv6 over the IPv4 session, next hop IPv4-mapped.
    let v6 = when(PATIENCE, || bird.route(PREFIX6).contains(PREFIX6));
    assert!(
        v6.is_some(),
        "IPv6 prefix missing; table:\n{}",
        bird.birdc(&["show", "route", "all", "table", "master6"])
    );
    // The client reaches the POP through the router.
    assert_eq!(lab.ask_anycast().as_deref(), Ok("pop-1"));
    let status = lab.cli(1, &["bgp", "status"]);
    assert!(status.contains("announcement: announced"), "{status}");
    assert!(status.contains("established"), "{status}");

    let mark = lab.pop(1).log_mark();
    let drained_at = Instant::now();
    let out = lab.cli(1, &["drain"]);
    assert!(out.contains("drained:   yes"), "{out}");
    when(PATIENCE, || bird.route(PREFIX4).contains("(65535,0)"))
        .unwrap_or_else(|| panic!("no GRACEFUL_SHUTDOWN community:\n{}", bird.route(PREFIX4)));
    // Still served while tagged: the drain refuses nothing.
    assert_eq!(lab.ask_anycast().as_deref(), Ok("pop-1"));
    let gone = wait_route(&bird, PREFIX4, false, "drain");
    assert!(
        gone.duration_since(drained_at) >= Duration::from_secs(2),
        "withdrawn before the 2 s drain delay"
    );
    wait_route(&bird, PREFIX6, false, "drain (IPv6)");
    let soft = lab
        .pop(1)
        .wait_for_log_after(mark, "bgp: soft drain", PATIENCE)
        .expect("soft drain logged");
    let withdrawn = lab
        .pop(1)
        .wait_for_log_after(mark, "bgp: routes withdrawn", PATIENCE)
        .expect("withdrawal logged");
    // The drain's deadline: when the soft drain was logged plus what it
    // said was left.
    let left: f64 = common::field(&soft, "withdraw_in_ms")
        .unwrap()
        .parse()
        .unwrap();
    let late_ms = (log_time(&withdrawn) - log_time(&soft)) * 1000.0 - left;
    println!("figure: withdraw UPDATE written {late_ms:.1} ms after the 2 s drain delay ended");
    assert!(
        late_ms > -1.0,
        "withdrawn before the delay ended: {late_ms} ms"
    );
    // The listener still accepts: a drain is not a shutdown.
    assert!(lab.accepts(1));

    // Undrain: announced again, without the tag.
    lab.cli(1, &["undrain"]);
    wait_route(&bird, PREFIX4, true, "undrain");
    assert!(!bird.route(PREFIX4).contains("(65535,0)"));
}

/// A binary upgrade hands the BGP session over, TCP MD5 key and all: BIRD
/// sees one session throughout (no state change, no route removed and added again), the new
/// process keeps it alive past the hold time on its own, withdraws what its
/// configuration no longer announces, and answers a drain.
#[test]
fn a_binary_upgrade_hands_the_session_over_and_bird_keeps_the_routes() {
    let _serial = serial();
    // Hold time 3 s: a session nobody keeps alive is gone within it.
    let mut lab = Lab::new(1, 3);
    // With TCP MD5: the key lives on the handed-over socket, so the new
    // process's keepalives are signed too (BIRD drops unsigned segments,
    // and the session would die at the hold time).
    let mut peers = lab.peers();
    peers[0].password = Some("upgrade-md5".into());
    let bird = Bird::start(&lab.net, 0, ROUTER_ASN, &peers);
    lab.neighbor_extra[1] = "password = \"upgrade-md5\"".into();
    // One more IPv4 prefix, which the new process's configuration drops.
    let extra = "203.0.113.0/24";
    lab.announce[1] = vec![PREFIX4, extra, PREFIX6];
    lab.launch(1);
    wait_route(&bird, PREFIX4, true, "announce");
    wait_route(&bird, extra, true, "announce (second prefix)");
    wait_route(&bird, PREFIX6, true, "announce (IPv6)");
    // When BIRD last saw the session change state, in seconds of the day.
    // BIRD keeps it on its monotonic clock and shows it converted to wall
    // time, so two readings of one stamp may differ by a millisecond; a
    // session that restarted at an upgrade would be hundreds of ms later.
    let since = || -> (f64, String) {
        let out = bird.birdc(&["show", "protocols", "pop1"]);
        let line = out
            .lines()
            .find(|l| l.starts_with("pop1"))
            .unwrap_or_default()
            .to_string();
        assert!(line.contains("Established"), "{out}");
        let stamp = line
            .split_whitespace()
            .find(|w| w.len() > 8 && w.as_bytes()[2] == b':' && w.contains('.'))
            .unwrap_or_else(|| panic!("no time in {line:?}"));
        let secs: Vec<f64> = stamp.split(':').map(|p| p.parse().unwrap()).collect();
        (secs[0] * 3600.0 + secs[1] * 60.0 + secs[2], line)
    };
    let same_session = |before: &(f64, String), after: &(f64, String)| {
        assert!(
            (after.0 - before.0).abs() < 0.02,
            "the session restarted at BIRD: {:?} then {:?}",
            before.1,
            after.1
        );
    };
    // BIRD stamps the protocol again a few ms after it comes up (its
    // channels): the stamp to compare is the one it settles on (and the
    // upgrade comes well after it).
    let mut before = since();
    when(PATIENCE, || {
        std::thread::sleep(Duration::from_millis(200));
        let now = since();
        let settled = (now.0 - before.0).abs() < 0.002;
        before = now;
        settled
    })
    .expect("BIRD's session stamp never settled");
    let bird_mark = bird.log_text().len();
    // The new process's configuration announces one prefix less (the same
    // address families: a change of those is a new session).
    lab.announce[1] = vec![PREFIX4, PREFIX6];
    lab.write_config(1);

    let mark = lab.pop(1).log_mark();
    lab.pop(1).signal(12); // SIGUSR2
    let ready = lab
        .pop(1)
        .wait_for_log_after(mark, "upgrade: new process is ready", PATIENCE)
        .unwrap_or_else(|| panic!("no successor; log:\n{}", lab.pop(1).log_text()));
    let new: u32 = common::field(&ready, "pid").unwrap().parse().unwrap();
    let _successor = common::KillOnDrop(new);
    let handed = lab
        .pop(1)
        .wait_for_log_after(
            mark,
            "bgp: session handed over to the new process",
            PATIENCE,
        )
        .unwrap_or_else(|| panic!("not handed over; log:\n{}", lab.pop(1).log_text()));
    let taken = lab
        .pop(1)
        .wait_for_log_after(
            mark,
            "bgp: session taken over from the previous process",
            PATIENCE,
        )
        .unwrap_or_else(|| panic!("not taken over; log:\n{}", lab.pop(1).log_text()));
    println!(
        "figure: BGP session without an owner during the upgrade (old process stopped it → new process runs it): {:.1} ms",
        (log_time(&taken) - log_time(&handed)) * 1000.0
    );
    // The new process withdraws what it no longer announces, on the
    // session it took over.
    wait_route(
        &bird,
        extra,
        false,
        "prefix dropped by the new configuration",
    );
    // The old process drains (grace 2 s) and exits.
    assert!(
        lab.pops[1].as_mut().unwrap().wait_exit(PATIENCE).is_some(),
        "the old process did not exit"
    );
    // Twice the hold time with only the new process keeping the session.
    std::thread::sleep(Duration::from_secs(6));
    let after = since();
    same_session(&before, &after);
    let log = bird.log_text();
    let during = &log[bird_mark..];
    for sign in ["State changed", "Down", "Received: ", "Hold timer expired"] {
        assert!(
            !during.contains(sign),
            "BIRD saw the session change ({sign:?}):\n{during}"
        );
    }
    // (The pattern below finds a removal: the dropped prefix's.)
    assert!(
        during
            .lines()
            .any(|l| l.contains(extra) && l.contains("removed")),
        "no removal of {extra} logged:\n{during}"
    );
    for kept in [PREFIX4, PREFIX6] {
        assert!(
            !during
                .lines()
                .any(|l| l.contains(kept) && l.contains("removed")),
            "BIRD removed {kept}:\n{during}"
        );
    }
    assert!(bird.has_route(PREFIX4));
    assert!(bird.route(PREFIX6).contains(PREFIX6));
    assert_eq!(lab.ask_anycast().as_deref(), Ok("pop-1"));
    println!("BIRD's session across the upgrade: {}", after.1);

    // Upgraded again: a session that was itself taken over is handed on.
    let mark = lab.pop(1).log_mark();
    let bird_mark = bird.log_text().len();
    common::signal_pid(new, 12);
    let ready = lab
        .pop(1)
        .wait_for_log_after(mark, "upgrade: new process is ready", PATIENCE)
        .unwrap_or_else(|| panic!("no second successor; log:\n{}", lab.pop(1).log_text()));
    let third: u32 = common::field(&ready, "pid").unwrap().parse().unwrap();
    let _third = common::KillOnDrop(third);
    lab.pop(1)
        .wait_for_log_after(
            mark,
            "bgp: session taken over from the previous process",
            PATIENCE,
        )
        .unwrap_or_else(|| panic!("not taken over again; log:\n{}", lab.pop(1).log_text()));
    // Past the hold time again, the second process gone after its drain.
    std::thread::sleep(Duration::from_secs(6));
    same_session(&before, &since());
    let log = bird.log_text();
    let during = &log[bird_mark..];
    for sign in ["State changed", "Down", "Received: ", "removed"] {
        assert!(
            !during.contains(sign),
            "BIRD saw a change across the second upgrade ({sign:?}):\n{during}"
        );
    }

    // The newest process owns the session: its drain withdraws.
    let out = lab.cli(1, &["drain"]);
    assert!(out.contains("drained:   yes"), "{out}");
    wait_route(&bird, PREFIX4, false, "drain after the upgrade");
}

#[test]
fn sigterm_withdraws_before_the_listener_closes() {
    let _serial = serial();
    let (mut lab, bird) = bird_lab(1, 9);
    lab.launch(1);
    wait_route(&bird, PREFIX4, true, "announce");
    let mark = lab.pop(1).log_mark();
    lab.pop(1).signal(common::SIGTERM);
    when(PATIENCE, || bird.route(PREFIX4).contains("(65535,0)"))
        .expect("GRACEFUL_SHUTDOWN during the shutdown's drain");
    wait_route(&bird, PREFIX4, false, "shutdown");
    // The route is gone and the listener still accepts (the withdrawal is
    // followed by withdraw_grace_ms, 1.5 s here, before it closes).
    assert!(
        lab.accepts(1),
        "the listener closed before the withdrawal reached the router"
    );
    let pop = lab.pops[1].as_mut().unwrap();
    assert!(pop.wait_exit(PATIENCE).is_some(), "did not exit");
    let lines = pop.log_lines();
    let at = |needle: &str| {
        lines
            .iter()
            .skip(mark)
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("{needle:?} not logged:\n{}", lines.join("\n")))
    };
    assert!(
        at("bgp: routes withdrawn") < at("stopped accepting"),
        "withdrawn after the listeners closed"
    );
    // Then the session ends with a Cease, which BIRD logs.
    assert!(
        when(PATIENCE, || bird.log_text().contains("shutting down")).is_some(),
        "no Cease with a shutdown communication in BIRD's log:\n{}",
        bird.log_text()
    );
}

#[test]
fn a_crashed_pop_is_gone_within_the_hold_time_and_back_when_restarted() {
    let _serial = serial();
    // Hold time 3 s (the minimum): BIRD notices the silence within it.
    let (mut lab, bird) = bird_lab(1, 3);
    lab.launch(1);
    wait_route(&bird, PREFIX4, true, "announce");
    let status = lab.cli(1, &["bgp", "status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(v["neighbors"][0]["hold_time_secs"], 3, "{status}");

    // kill -9 of the process alone: its kernel closes the connection, and
    // the router drops the routes at once.
    let killed = Instant::now();
    lab.pop(1).signal(9);
    let gone = wait_route(&bird, PREFIX4, false, "kill -9");
    println!(
        "figure: kill -9 (the POP's kernel closes the session) to the route gone from BIRD: {:.2} s",
        gone.duration_since(killed).as_secs_f64()
    );
    lab.pops[1].take();
    lab.launch(1);
    wait_route(&bird, PREFIX4, true, "restart after kill -9");
    assert_eq!(lab.ask_anycast().as_deref(), Ok("pop-1"));

    // A crash: the POP falls silent (nothing it sends arrives any more,
    // not even its kernel's FIN), then dies. Only the hold timer can tell.
    lab.net.partition(&[1], &[0]);
    let crashed = Instant::now();
    lab.pop(1).signal(9);
    let gone = wait_route(&bird, PREFIX4, false, "crash");
    let took = gone.duration_since(crashed);
    println!(
        "figure: crashed POP (silent) to the route gone from BIRD: {:.2} s (negotiated hold time 3 s)",
        took.as_secs_f64()
    );
    assert!(
        bird.log_text().contains("Hold timer expired"),
        "BIRD dropped it for another reason:\n{}",
        bird.log_text()
    );
    assert!(
        took < Duration::from_secs(3 + 10),
        "far beyond the hold time: {took:?}"
    );
    lab.net.heal();
    lab.pops[1].take();
    lab.launch(1);
    wait_route(&bird, PREFIX4, true, "restart after the crash");
    assert_eq!(lab.ask_anycast().as_deref(), Ok("pop-1"));
}

/// A POP stopped past the hold time (SIGSTOP: a hung host, a VM paused to
/// be migrated): BIRD's hold timer drops the session and the route; once
/// the POP runs again, with the router's NOTIFICATION and its own expired
/// timers waiting at once, it opens a new session and announces again,
/// and serves.
#[test]
fn a_pop_stopped_past_the_hold_time_announces_again_when_it_runs() {
    let _serial = serial();
    let (mut lab, bird) = bird_lab(1, 3);
    lab.launch(1);
    wait_route(&bird, PREFIX4, true, "announce");
    lab.pop(1).signal(libc::SIGSTOP);
    let stopped = Instant::now();
    let gone = wait_route(&bird, PREFIX4, false, "SIGSTOP");
    println!(
        "figure: stopped POP to the route gone from BIRD: {:.2} s (hold time 3 s)",
        gone.duration_since(stopped).as_secs_f64()
    );
    assert!(
        bird.log_text().contains("Hold timer expired"),
        "BIRD dropped it for another reason:\n{}",
        bird.log_text()
    );
    let mark = lab.pop(1).log_mark();
    lab.pop(1).signal(libc::SIGCONT);
    let resumed = Instant::now();
    let back = wait_route(&bird, PREFIX4, true, "SIGCONT");
    println!(
        "figure: resumed POP to the route back in BIRD: {:.2} s",
        back.duration_since(resumed).as_secs_f64()
    );
    assert_eq!(lab.ask_anycast().as_deref(), Ok("pop-1"));
    for line in lab.pop(1).log_lines_after(mark, "WARN") {
        println!("resumed POP: {line}");
    }
    let errors = lab.pop(1).log_lines_after(mark, "ERROR");
    assert!(errors.is_empty(), "{errors:#?}");
}

/// A lab whose router runs BFD on its session with POP 1 (BIRD's
/// defaults: it asks for packets 10 ms apart, sends every 100 ms,
/// multiplier 5), and the POP `bfd = true` (100 ms, multiplier 3: BIRD
/// declares it down after 300 ms of silence). Hold time 9 s, so that the
/// hold timer cannot be what drops a session within a second or two.
fn bfd_lab() -> (Lab, Bird) {
    let (lab, bird) = pop_with_bfd_towards_bird(Some("protocol bfd {}"));
    wait_bfd_up(&lab, &bird, "start");
    (lab, bird)
}

/// Upgrades POP 1's process (SIGUSR2) and waits for the new one to be
/// ready. Returns the log mark from before the signal and the new process
/// (killed when dropped).
fn upgrade_pop1(lab: &Lab) -> (usize, common::KillOnDrop) {
    let mark = lab.pop(1).log_mark();
    lab.pop(1).signal(12); // SIGUSR2
    let ready = lab
        .pop(1)
        .wait_for_log_after(mark, "upgrade: new process is ready", PATIENCE)
        .unwrap_or_else(|| panic!("no successor; log:\n{}", lab.pop(1).log_text()));
    let new: u32 = common::field(&ready, "pid").unwrap().parse().unwrap();
    (mark, common::KillOnDrop(new))
}

/// POP 1's first neighbor as `bgp status --json` shows it.
fn first_neighbor(lab: &Lab) -> serde_json::Value {
    let status = lab.cli(1, &["bgp", "status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    v["neighbors"][0].clone()
}

/// A lab whose POP 1 has `bfd = true` towards a BIRD started with
/// `bfd_protocol` (`None`: BIRD runs no BFD for the session), up and
/// announcing, its metrics on [`BFD_METRICS`].
fn pop_with_bfd_towards_bird(bfd_protocol: Option<&str>) -> (Lab, Bird) {
    let mut lab = Lab::new(1, 9);
    let mut peers = lab.peers();
    peers[0].bfd = bfd_protocol.is_some();
    let bird = Bird::start_with(
        &lab.net,
        0,
        ROUTER_ASN,
        &peers,
        bfd_protocol.unwrap_or_default(),
    );
    lab.neighbor_extra[1] = "bfd = true".into();
    lab.sections[1] = format!("[metrics]\nenabled = true\nlisten_addr = \"{BFD_METRICS}\"");
    lab.launch(1);
    wait_route(&bird, PREFIX4, true, "announce");
    (lab, bird)
}

/// POP 1's metrics listener (in its namespace).
const BFD_METRICS: &str = "127.0.0.1:9090";

fn pop_metrics(lab: &Lab) -> String {
    lab.net.run_in(1, || {
        common::http_get(BFD_METRICS.parse().unwrap(), "/metrics").1
    })
}

/// Until both BIRD and the POP say the BFD session is up.
fn wait_bfd_up(lab: &Lab, bird: &Bird, what: &str) {
    let up = when(PATIENCE, || {
        first_neighbor(lab)["bfd"] == "up" && bird_bfd_up(bird)
    });
    assert!(
        up.is_some(),
        "BFD not up ({what}): BIRD says\n{}\nthe POP says\n{}\nPOP log:\n{}",
        bird.birdc(&["show", "bfd", "sessions"]),
        lab.cli(1, &["bgp", "status", "--json"]),
        lab.pop(1).log_text()
    );
}

/// `birdc show bfd sessions` lists the POP's session as Up.
fn bird_bfd_up(bird: &Bird) -> bool {
    bird.birdc(&["show", "bfd", "sessions"])
        .lines()
        .any(|l| l.contains("10.77.0.2") && l.split_whitespace().any(|w| w == "Up"))
}

/// With BFD, a POP that stops answering (SIGSTOP: a hung host, a paused
/// VM) loses its route within BFD's detection time, not the hold time:
/// BIRD's BFD declares it down and takes the BGP session with it. Once the
/// POP runs again, BFD and the session come back and the route with them.
#[test]
fn with_bfd_a_stopped_pop_is_withdrawn_within_a_second_not_the_hold_time() {
    let _serial = serial();
    let (lab, bird) = bfd_lab();
    let bird_mark = bird.log_text().len();
    lab.pop(1).signal(libc::SIGSTOP);
    let stopped = Instant::now();
    let gone = wait_route(&bird, PREFIX4, false, "SIGSTOP with BFD");
    let took = gone.duration_since(stopped);
    println!(
        "figure: stopped POP to the route gone from BIRD with BFD (100 ms × 3; hold time 9 s): {:.2} s",
        took.as_secs_f64()
    );
    let log = bird.log_text()[bird_mark..].to_string();
    assert!(
        log.contains("BFD session down") && !log.contains("Hold timer expired"),
        "BIRD dropped it for another reason:\n{log}"
    );
    // Far under the 9 s hold time (300 ms of detection, and a loaded
    // 2-core machine's scheduling on top).
    assert!(took < Duration::from_secs(4), "{took:?}");

    let mark = lab.pop(1).log_mark();
    lab.pop(1).signal(libc::SIGCONT);
    wait_route(&bird, PREFIX4, true, "SIGCONT");
    wait_bfd_up(&lab, &bird, "after SIGCONT");
    assert_eq!(lab.ask_anycast().as_deref(), Ok("pop-1"));
    let errors = lab.pop(1).log_lines_after(mark, "ERROR");
    assert!(errors.is_empty(), "{errors:#?}");
}

/// A POP with `bfd = true` whose router runs no BFD for the session: the
/// BGP session is up and stays up (BFD never came up, so nothing went
/// down), and the POP says once, after 10 s, what it is missing.
#[test]
fn with_bfd_on_the_pop_only_bgp_stays_up_and_a_warning_says_why() {
    let _serial = serial();
    let (lab, bird) = pop_with_bfd_towards_bird(None);
    let warned = "bfd: no BFD packet from the neighbor yet";
    let warn = established_after_warning(&lab, warned);
    assert!(warn.contains("bfd on"), "{warn}");
    let n = first_neighbor(&lab);
    assert_eq!(n["bfd"], "down", "{n}");
    assert_eq!(n["flaps"], 0, "{n}");
    assert!(bird.has_route(PREFIX4));
    assert_eq!(lab.pop(1).log_lines_after(0, "bfd: no BFD packet").len(), 1);
}

/// Waits for the POP's log line containing `warning`, checks that its BGP
/// session is still established, and returns the line.
fn established_after_warning(lab: &Lab, warning: &str) -> String {
    let warn = lab
        .pop(1)
        .wait_for_log_after(0, warning, PATIENCE)
        .unwrap_or_else(|| panic!("no {warning:?}; log:\n{}", lab.pop(1).log_text()));
    let n = first_neighbor(lab);
    assert_eq!(n["state"], "established", "{n}");
    warn
}

/// A router that authenticates its BFD packets (BIRD `authentication keyed
/// sha1`): this side does not support it and discards them, and says so
/// once, naming the reason, instead of only "no BFD packet yet"; the BGP
/// session is unaffected.
#[test]
fn with_bfd_a_router_that_authenticates_bfd_is_named_and_bgp_stays_up() {
    let _serial = serial();
    let (lab, _bird) = pop_with_bfd_towards_bird(Some(
        "protocol bfd { interface \"*\" { authentication keyed sha1; password \"bfd-secret\"; }; }",
    ));
    let warned = "bfd: the neighbor's BFD packets are discarded";
    let warn = established_after_warning(&lab, warned);
    assert!(warn.contains("authentication is not supported"), "{warn}");
    let n = first_neighbor(&lab);
    assert_ne!(n["bfd"], "up", "{n}");
    assert_eq!(lab.pop(1).log_lines_after(0, warned).len(), 1);
}

/// Port 3784 held by another BFD daemon on the POP's host: an ERROR that
/// says so, and the BGP session goes on without BFD.
#[test]
fn with_bfd_port_3784_taken_is_an_error_and_bgp_goes_on() {
    let _serial = serial();
    let mut lab = Lab::new(1, 9);
    let bird = Bird::start(&lab.net, 0, ROUTER_ASN, &lab.peers());
    let _squatter = lab
        .net
        .run_in(1, || std::net::UdpSocket::bind("0.0.0.0:3784").unwrap());
    lab.neighbor_extra[1] = "bfd = true".into();
    lab.launch(1);
    wait_route(&bird, PREFIX4, true, "announce without BFD");
    let error = lab
        .pop(1)
        .wait_for_log_after(0, "bfd: cannot start", PATIENCE)
        .unwrap_or_else(|| panic!("no error; log:\n{}", lab.pop(1).log_text()));
    assert!(error.contains("another BFD daemon"), "{error}");
    let n = first_neighbor(&lab);
    assert_eq!(n["state"], "established", "{n}");
    assert_eq!(n["bfd"], serde_json::Value::Null, "{n}");
}

/// The other way: the path to the router breaks both ways. The POP's BFD
/// session goes down within BIRD's detection time (its 100 ms × 5) and the
/// POP resets its BGP session at once (Cease, BFD Down) instead of
/// waiting out the hold time; the status and the metrics count it. Healed,
/// both come back.
#[test]
fn with_bfd_a_cut_path_resets_the_pops_bgp_session_and_it_comes_back() {
    let _serial = serial();
    let (lab, bird) = bfd_lab();
    let mark = lab.pop(1).log_mark();
    lab.net.partition(&[1], &[0]);
    let cut = Instant::now();
    let down = lab
        .pop(1)
        .wait_for_log_after(mark, "bfd: session down", PATIENCE)
        .unwrap_or_else(|| panic!("no BFD down; log:\n{}", lab.pop(1).log_text()));
    let took = cut.elapsed();
    println!(
        "figure: path cut to the POP's BFD session down (BIRD's 100 ms × 5): {:.2} s",
        took.as_secs_f64()
    );
    assert!(down.contains("control detection time expired"), "{down}");
    let mut reset = serde_json::Value::Null;
    when(PATIENCE, || {
        reset = first_neighbor(&lab);
        reset["state"] != "established" && reset["bfd_downs"] == 1
    })
    .unwrap_or_else(|| panic!("BGP not reset ({reset}); log:\n{}", lab.pop(1).log_text()));
    assert!(
        reset["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("BFD Down")),
        "{reset}"
    );
    // Long before the hold time (9 s) could have said anything.
    assert!(took < Duration::from_secs(4), "{took:?}");
    let metrics = pop_metrics(&lab);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("edgeproxy_bgp_bfd_session_downs_total{") && l.ends_with(" 1")),
        "{metrics}"
    );

    lab.net.heal();
    wait_route(&bird, PREFIX4, true, "healed");
    wait_bfd_up(&lab, &bird, "healed");
    let metrics = pop_metrics(&lab);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("edgeproxy_bgp_bfd_up{") && l.ends_with(" 1")),
        "{metrics}"
    );
    assert_eq!(lab.ask_anycast().as_deref(), Ok("pop-1"));
}

/// A binary upgrade hands the BFD session over with the BGP session: the
/// router's BFD never sees it go down (BIRD 2.0 would take the BGP session
/// down with it, and the route), and the new process runs it.
#[test]
fn with_bfd_a_binary_upgrade_keeps_the_bfd_session_up_at_the_router() {
    let _serial = serial();
    let (mut lab, bird) = bfd_lab();
    let bird_mark = bird.log_text().len();
    let (mark, _successor) = upgrade_pop1(&lab);
    lab.pop(1)
        .wait_for_log_after(
            mark,
            "bfd: going on with the previous process's session",
            PATIENCE,
        )
        .unwrap_or_else(|| panic!("BFD not taken over; log:\n{}", lab.pop(1).log_text()));
    // The old process drains and exits; the new one alone runs BFD for
    // longer than BIRD's detection time, many times over.
    assert!(
        lab.pops[1].as_mut().unwrap().wait_exit(PATIENCE).is_some(),
        "the old process did not exit"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        bird_bfd_up(&bird),
        "{}",
        bird.birdc(&["show", "bfd", "sessions"])
    );
    let log = bird.log_text()[bird_mark..].to_string();
    assert!(
        !log.contains("BFD session down") && !log.contains("Down"),
        "BIRD saw the session go down during the upgrade:\n{log}"
    );
    assert!(bird.has_route(PREFIX4));
    let n = first_neighbor(&lab);
    assert_eq!(n["bfd"], "up", "{n}");
    assert_eq!(n["bfd_downs"], 0, "{n}");
}

#[test]
fn backends_all_unhealthy_withdraw_and_healthy_again_announces() {
    let _serial = serial();
    let (mut lab, bird) = bird_lab(1, 9);
    lab.launch(1);
    wait_route(&bird, PREFIX4, true, "announce");
    let mark = lab.pop(1).log_mark();
    lab.db(1).exec("UPDATE backends SET healthy = 0");
    wait_route(&bird, PREFIX4, false, "no healthy backend");
    let pop = lab.pop(1);
    let reloaded = pop
        .wait_for_log_after(mark, "routing table reloaded", PATIENCE)
        .unwrap();
    let withdrawn = pop
        .wait_for_log_after(mark, "bgp: routes withdrawn", PATIENCE)
        .unwrap();
    let ms = (log_time(&withdrawn) - log_time(&reloaded)) * 1000.0;
    println!("figure: no healthy backend published to withdraw UPDATE written: {ms:.1} ms");
    assert!(
        pop.log_lines()
            .iter()
            .skip(mark)
            .any(|l| l.contains("pop: cannot serve") && l.contains("no healthy backend")),
        "the reason is logged"
    );
    let status = lab.cli(1, &["pop", "status"]);
    assert!(status.contains("no healthy backend for *"), "{status}");
    // The listener stays open: a health problem is not a shutdown.
    assert!(lab.accepts(1));
    lab.db(1).exec("UPDATE backends SET healthy = 1");
    wait_route(&bird, PREFIX4, true, "healthy again");
}

/// "Listeners down": a SIGHUP moves the POP's only listener off the
/// anycast prefix (to loopback, where no client can reach it). Announcing
/// would draw clients to a port nobody accepts on, so the routes go;
/// moving it back announces them again and the client is served.
#[test]
fn a_sighup_moving_the_listener_off_the_anycast_prefix_withdraws_and_back_announces() {
    let _serial = serial();
    let (mut lab, bird) = bird_lab(1, 9);
    lab.launch(1);
    wait_route(&bird, PREFIX4, true, "announce");
    assert!(
        when(PATIENCE, || lab.ask_anycast().as_deref() == Ok("pop-1")).is_some(),
        "{:?}",
        lab.ask_anycast()
    );

    let mark = lab.pop(1).log_mark();
    lab.listen[1] = "127.0.0.1:8080".into();
    lab.write_config(1);
    lab.pop(1).signal(common::SIGHUP);
    wait_route(&bird, PREFIX4, false, "listener moved to loopback");
    wait_route(&bird, PREFIX6, false, "listener moved to loopback");
    let pop = lab.pop(1);
    assert!(
        pop.wait_for_log_after(
            mark,
            "no listener is reachable at the anycast prefixes",
            PATIENCE
        )
        .is_some(),
        "{}",
        pop.log_text()
    );
    assert!(
        pop.log_lines()
            .iter()
            .skip(mark)
            .any(|l| l.contains("pop: cannot serve") && l.contains("serving listeners are down")),
        "the reason is logged:\n{}",
        pop.log_text()
    );
    let status = lab.cli(1, &["pop", "status"]);
    assert!(status.contains("serving listeners are down"), "{status}");

    lab.listen[1] = "0.0.0.0:8080".into();
    lab.write_config(1);
    lab.pop(1).signal(common::SIGHUP);
    wait_route(
        &bird,
        PREFIX4,
        true,
        "listener back on the wildcard address",
    );
    assert!(
        when(PATIENCE, || lab.ask_anycast().as_deref() == Ok("pop-1")).is_some(),
        "{:?}",
        lab.ask_anycast()
    );
}

#[test]
fn a_failing_health_check_withdraws_and_a_passing_one_announces_again() {
    let _serial = serial();
    let (mut lab, bird) = bird_lab(1, 9);
    // The POP's own active checks (a script, so the test can fail them
    // without touching the backend): down after 2 failures 100 ms apart.
    let down_flag = lab.dir.join("backend-down");
    lab.sections[1] = format!(
        "[health]\nenabled = true\ntype = \"script\"\ncommand = \"test ! -e {}\"\n\
         interval_ms = 100\ntimeout_ms = 90\njitter_percent = 0\n\
         unhealthy_threshold = 2\nhealthy_threshold = 1\n",
        down_flag.display()
    );
    lab.launch(1);
    wait_route(&bird, PREFIX4, true, "announce");
    let mark = lab.pop(1).log_mark();
    std::fs::write(&down_flag, "").unwrap();
    wait_route(&bird, PREFIX4, false, "health checks failing");
    let pop = lab.pop(1);
    let failed = pop
        .wait_for_log_after(mark, "health checks failed", PATIENCE)
        .expect("the health failure is logged");
    let withdrawn = pop
        .wait_for_log_after(mark, "bgp: routes withdrawn", PATIENCE)
        .expect("the withdrawal is logged");
    let ms = (log_time(&withdrawn) - log_time(&failed)) * 1000.0;
    println!(
        "figure: health failure confirmed (active checks) to withdraw UPDATE written: {ms:.1} ms"
    );
    assert!(ms < 1000.0, "withdrawn {ms} ms after the failure");
    // The listener stays open: a health problem is not a shutdown.
    assert!(lab.accepts(1));
    std::fs::remove_file(&down_flag).unwrap();
    wait_route(&bird, PREFIX4, true, "health checks passing again");
    assert_eq!(lab.ask_anycast().as_deref(), Ok("pop-1"));
}

#[test]
fn two_pops_soft_drain_moves_the_client_without_a_failed_connection() {
    let _serial = serial();
    let (mut lab, bird) = bird_lab(2, 9);
    lab.bgp_extra[1] = "drain_prepend = 2".into();
    lab.bgp_extra[2] = "drain_prepend = 2".into();
    lab.launch(1);
    lab.launch(2);
    assert!(
        when(PATIENCE, || bird
            .route(PREFIX4)
            .matches("via 10.77.0.")
            .count()
            == 2)
        .is_some(),
        "BIRD does not hold both paths:\n{}",
        bird.route(PREFIX4)
    );
    let first = lab.ask_anycast().expect("the client reaches a POP");
    let serving: usize = first.trim_start_matches("pop-").parse().unwrap();
    let other = 3 - serving;

    // A client connecting in a loop (one connection every 10 ms) for the
    // whole drain and a second after the withdrawal.
    let mark = lab.pop(serving).log_mark();
    let drained_at = Instant::now();
    lab.cli(serving, &["drain"]);
    let mut answers: Vec<(f64, Result<String, String>)> = Vec::new();
    let mut withdrawn_at = None;
    while withdrawn_at.is_none_or(|t: Instant| t.elapsed() < Duration::from_secs(1)) {
        let r = lab.ask_anycast();
        answers.push((drained_at.elapsed().as_secs_f64(), r));
        if withdrawn_at.is_none()
            && !bird
                .route(PREFIX4)
                .contains(&format!("via {}", lab.net.ip(serving)))
        {
            withdrawn_at = Some(Instant::now());
        }
        assert!(drained_at.elapsed() < PATIENCE, "never withdrawn");
        std::thread::sleep(Duration::from_millis(10));
    }
    let failed: Vec<&(f64, Result<String, String>)> =
        answers.iter().filter(|(_, r)| r.is_err()).collect();
    let moved = answers
        .iter()
        .position(|(_, r)| r.as_deref() == Ok(&format!("pop-{other}")))
        .expect("the client never reached the other POP");
    println!(
        "figure: soft drain with two POPs: {} connections, {} failed, client moved to pop-{other} after {:.0} ms (drain delay 2 s)",
        answers.len(),
        failed.len(),
        answers[moved].0 * 1000.0
    );
    assert!(failed.is_empty(), "failed connections: {failed:?}");
    // Traffic moved while the drained POP still announced (tagged): before
    // the withdrawal.
    assert!(
        answers[moved].0 < 2.0,
        "moved only at the withdrawal ({:.2} s)",
        answers[moved].0
    );
    assert!(
        answers[moved..]
            .iter()
            .all(|(_, r)| r.as_deref() == Ok(&format!("pop-{other}"))),
        "the client went back to the drained POP"
    );
    let path = bird.route(PREFIX4);
    assert!(
        !path.contains("(65535,0)"),
        "the other POP's route is not tagged:\n{path}"
    );
    assert!(lab
        .pop(serving)
        .wait_for_log_after(mark, "bgp: routes withdrawn", PATIENCE)
        .is_some());
}

#[test]
fn gobgp_learns_the_prefixes_sees_the_drain_and_loses_them() {
    let _serial = serial();
    let mut lab = Lab::new(1, 9);
    let gobgp = GoBgp::start(&lab.net, 0, ROUTER_ASN, &lab.peers(), 50051);
    lab.launch(1);
    let route = |family: &str, prefix: &str| gobgp.route(family, prefix);
    when(PATIENCE, || route("ipv4", PREFIX4).contains(PREFIX4)).unwrap_or_else(|| {
        panic!(
            "GoBGP never learned {PREFIX4}: {}\nneighbors:\n{}\nlog:\n{}",
            gobgp.gobgp(&["global", "rib"]),
            gobgp.gobgp(&["neighbor"]),
            gobgp.log_text()
        )
    });
    let line = route("ipv4", PREFIX4);
    assert!(line.contains("10.77.0.2"), "next hop: {line}");
    assert!(line.contains(&POP_ASN.to_string()), "AS path: {line}");
    when(PATIENCE, || route("ipv6", PREFIX6).contains(PREFIX6)).unwrap_or_else(|| {
        panic!(
            "no IPv6 route: {}",
            gobgp.gobgp(&["global", "rib", "-a", "ipv6"])
        )
    });

    lab.cli(1, &["drain"]);
    // GoBGP names 65535:0 by its draft name, "planned-shut"; its JSON
    // has the number (0xFFFF0000).
    when(PATIENCE, || {
        gobgp
            .gobgp(&["global", "rib", "-a", "ipv4", PREFIX4, "-j"])
            .contains("4294901760")
    })
    .unwrap_or_else(|| panic!("no GRACEFUL_SHUTDOWN: {}", route("ipv4", PREFIX4)));
    assert!(route("ipv4", PREFIX4).contains("planned-shut"));
    when(PATIENCE, || route("ipv4", PREFIX4).is_empty())
        .unwrap_or_else(|| panic!("never withdrawn: {}", route("ipv4", PREFIX4)));
    when(PATIENCE, || route("ipv6", PREFIX6).is_empty()).expect("IPv6 never withdrawn");
    lab.cli(1, &["undrain"]);
    when(PATIENCE, || route("ipv4", PREFIX4).contains(PREFIX4)).expect("re-announced");
    // kill -9: the session closes with the process; GoBGP drops the routes.
    lab.pop(1).signal(9);
    when(PATIENCE, || route("ipv4", PREFIX4).is_empty()).expect("gone after the hold time");
}

/// FRR (bgpd 8.x), the third implementation: learns both families with
/// the POP as next hop and AS path, sees the drain's GRACEFUL_SHUTDOWN,
/// loses the routes at the withdrawal, gets them back at the undrain, and
/// drops them when the POP dies (the session closes with the process).
#[test]
fn frr_learns_the_prefixes_sees_the_drain_and_loses_them() {
    let _serial = serial();
    let mut lab = Lab::new(1, 9);
    let frr = Frr::start(&lab.net, 0, ROUTER_ASN, &lab.peers());
    lab.launch(1);
    let route = |family: &str, prefix: &str| frr.route_json(family, prefix);
    when(PATIENCE, || !route("ipv4", PREFIX4).is_empty()).unwrap_or_else(|| {
        panic!(
            "FRR never learned {PREFIX4}:\n{}\nlog:\n{}",
            frr.vtysh("show bgp summary"),
            frr.log_text()
        )
    });
    let json = route("ipv4", PREFIX4);
    assert!(
        json.contains(&format!("\"{}\"", lab.net.ip(1))),
        "next hop: {json}"
    );
    assert!(json.contains(&POP_ASN.to_string()), "AS path: {json}");
    when(PATIENCE, || !route("ipv6", PREFIX6).is_empty())
        .unwrap_or_else(|| panic!("no IPv6 route:\n{}", frr.vtysh("show bgp ipv6 unicast")));

    lab.cli(1, &["drain"]);
    // FRR names 65535:0 "graceful-shutdown" (RFC 8326's well-known name).
    when(PATIENCE, || {
        let j = route("ipv4", PREFIX4);
        j.contains("graceful-shutdown") || j.contains("gracefulShutdown")
    })
    .unwrap_or_else(|| panic!("no GRACEFUL_SHUTDOWN: {}", route("ipv4", PREFIX4)));
    when(PATIENCE, || route("ipv4", PREFIX4).is_empty())
        .unwrap_or_else(|| panic!("never withdrawn: {}", route("ipv4", PREFIX4)));
    when(PATIENCE, || route("ipv6", PREFIX6).is_empty()).expect("IPv6 never withdrawn");
    lab.cli(1, &["undrain"]);
    when(PATIENCE, || !route("ipv4", PREFIX4).is_empty()).expect("re-announced");
    assert!(
        !route("ipv4", PREFIX4).contains("graceful-shutdown"),
        "the community is gone once serving again: {}",
        route("ipv4", PREFIX4)
    );
    lab.pop(1).signal(9);
    when(PATIENCE, || route("ipv4", PREFIX4).is_empty()).expect("gone after the POP died");
}

/// The number after `"key":` in FRR's JSON (its first occurrence).
fn frr_count(json: &str, key: &str) -> u64 {
    let pattern = format!("\"{key}\":");
    json.find(&pattern)
        .map(|at| &json[at + pattern.len()..])
        .map(|rest| rest.trim_start())
        .and_then(|rest| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .unwrap_or_else(|| panic!("no {key:?} in {json}"))
}

/// FRR asking for the routes again (`clear bgp ipv4 unicast X soft in`:
/// a ROUTE-REFRESH; FRR and the POP both offer Enhanced Route Refresh)
/// gets them again between a BoRR and an EoRR, on the same session: a real
/// router's side of the ROUTE-REFRESH handling that fuzzing reworked (RFC
/// 7313 §5's checks in `bgp::session::frame`).
/// Whether FRR's BGP session with `pop` is established.
fn frr_established(frr: &Frr, pop: &str) -> bool {
    frr.vtysh(&format!("show bgp neighbors {pop} json"))
        .contains("\"bgpState\":\"Established\"")
}

/// Until FRR's BGP session with `pop` is down, after a BFD Down; how long
/// that took from `since`.
fn frr_drops_with_bfd(frr: &Frr, pop: &str, since: Instant) -> Duration {
    when(PATIENCE, || !frr_established(frr, pop)).expect("FRR kept the session");
    let took = since.elapsed();
    assert!(
        frr.log_text().contains("BFD Down"),
        "FRR dropped it for another reason:\n{}",
        frr.log_text()
    );
    took
}

/// BFD with FRR's bfdd (bgpd `neighbor X bfd`, through zebra; FRR's
/// timers: 300 ms × 3): the session comes up, a stopped POP's BGP session
/// is taken down by FRR within a second or two (Cease, BFD Down) though
/// the hold time is 9 s, it comes back once the POP runs, and a binary
/// upgrade leaves FRR's BFD session up throughout.
#[test]
fn frr_with_bfd_drops_a_stopped_pop_at_once_and_keeps_it_through_an_upgrade() {
    let _serial = serial();
    let mut lab = Lab::new(1, 9);
    let mut peers = lab.peers();
    peers[0].bfd = true;
    let frr = Frr::start(&lab.net, 0, ROUTER_ASN, &peers);
    lab.neighbor_extra[1] = "bfd = true".into();
    lab.launch(1);
    let pop = lab.net.ip(1).to_string();
    let bfd_peer = || frr.vtysh(&format!("show bfd peer {pop} json"));
    let wait_up = |what: &str| {
        when(PATIENCE, || {
            bfd_peer().contains("\"status\":\"up\"") && frr_established(&frr, &pop)
        })
        .unwrap_or_else(|| {
            panic!(
                "BFD and BGP not both up at FRR ({what}):\n{}\n{}\nPOP log:\n{}",
                bfd_peer(),
                frr.vtysh("show bgp summary"),
                lab.pop(1).log_text()
            )
        });
    };
    wait_up("start");
    let ours = lab.cli(1, &["bgp", "status"]);
    assert!(
        ours.lines()
            .any(|l| l.starts_with("10.77.0.1") && l.contains(" up ")),
        "{ours}"
    );

    lab.pop(1).signal(libc::SIGSTOP);
    let took = frr_drops_with_bfd(&frr, &pop, Instant::now());
    println!(
        "figure: stopped POP to FRR's BGP session down with BFD (300 ms × 3; hold time 9 s): {:.2} s",
        took.as_secs_f64()
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    lab.pop(1).signal(libc::SIGCONT);
    wait_up("after SIGCONT");

    // The upgrade: FRR's BFD session never leaves up (its uptime goes on).
    let uptime = || -> u64 {
        let v: serde_json::Value = serde_json::from_str(&bfd_peer()).unwrap();
        v["uptime"].as_u64().unwrap_or(0)
    };
    let before = uptime();
    let (_, _successor) = upgrade_pop1(&lab);
    assert!(
        lab.pops[1].as_mut().unwrap().wait_exit(PATIENCE).is_some(),
        "the old process did not exit"
    );
    // Past FRR's 900 ms detection time, many times over, with the new
    // process alone.
    std::thread::sleep(Duration::from_secs(3));
    let peer = bfd_peer();
    assert!(peer.contains("\"status\":\"up\""), "{peer}");
    assert!(
        uptime() >= before + 3,
        "FRR's BFD session restarted: {peer}"
    );
    assert!(
        frr_established(&frr, &pop),
        "{}",
        frr.vtysh("show bgp summary")
    );
}

/// Two BFD sessions from one POP, one per address family: BIRD over IPv4
/// and FRR over IPv6 (hop limit 255 checked on IPv6 as TTL is on IPv4).
/// Both come up, and a stopped POP is dropped by both routers.
#[test]
fn bfd_to_bird_over_ipv4_and_frr_over_ipv6_at_once() {
    let _serial = serial();
    let mut lab = Lab::new(1, 9);
    let (pop, frr_host) = (1, 2);
    add_ipv6(&lab, &[(pop, "fd77::2/64"), (frr_host, "fd77::3/64")]);
    let mut peers = lab.peers();
    peers[0].bfd = true;
    let bird = Bird::start(&lab.net, 0, ROUTER_ASN, &peers);
    let frr = Frr::start(
        &lab.net,
        frr_host,
        65001,
        &[Peer {
            name: "pop1".into(),
            addr: "fd77::2".into(),
            asn: POP_ASN,
            hold_secs: 9,
            password: None,
            bfd: true,
        }],
    );
    lab.bgp_extra[pop] = format!(
        "next_hop = [\"{}\"]\n\n[[bgp.neighbor]]\naddress = \"fd77::3\"\nasn = 65001\nlocal_address = \"fd77::2\"\nbfd = true",
        lab.net.ip(pop)
    );
    lab.neighbor_extra[pop] = "bfd = true".into();
    lab.launch(pop);
    let frr_bfd = || frr.vtysh("show bfd peer fd77::2 json");
    when(PATIENCE, || {
        let v: serde_json::Value =
            serde_json::from_str(&lab.cli(pop, &["bgp", "status", "--json"])).unwrap();
        v["neighbors"][0]["bfd"] == "up"
            && v["neighbors"][1]["bfd"] == "up"
            && bird_bfd_up(&bird)
            && frr_bfd().contains("\"status\":\"up\"")
            && frr_established(&frr, "fd77::2")
    })
    .unwrap_or_else(|| {
        panic!(
            "not every BFD session up:\nPOP: {}\nBIRD: {}\nFRR: {}\nPOP log:\n{}",
            lab.cli(pop, &["bgp", "status"]),
            bird.birdc(&["show", "bfd", "sessions"]),
            frr_bfd(),
            lab.pop(pop).log_text()
        )
    });
    wait_route(&bird, PREFIX4, true, "announce");

    lab.pop(pop).signal(libc::SIGSTOP);
    let stopped = Instant::now();
    wait_route(&bird, PREFIX4, false, "SIGSTOP (BIRD, IPv4 BFD)");
    let took = frr_drops_with_bfd(&frr, "fd77::2", stopped);
    println!(
        "figure: stopped POP dropped by both routers (BIRD over IPv4, FRR over IPv6, hold time 9 s): {:.2} s",
        took.as_secs_f64()
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    lab.pop(pop).signal(libc::SIGCONT);
}

#[test]
fn frr_asking_for_the_routes_again_gets_them_on_the_same_session() {
    let _serial = serial();
    let mut lab = Lab::new(1, 9);
    let frr = Frr::start(&lab.net, 0, ROUTER_ASN, &lab.peers());
    lab.launch(1);
    when(PATIENCE, || !frr.route_json("ipv4", PREFIX4).is_empty()).unwrap_or_else(|| {
        panic!(
            "FRR never learned {PREFIX4}:\n{}\nlog:\n{}",
            frr.vtysh("show bgp summary"),
            frr.log_text()
        )
    });
    let pop = lab.net.ip(1).to_string();
    let stats = || frr.vtysh(&format!("show bgp neighbors {pop} json"));
    let before = stats();
    assert!(before.contains("\"bgpState\":\"Established\""), "{before}");
    let mark = lab.pop(1).log_mark();
    frr.vtysh(&format!("clear bgp ipv4 unicast {pop} soft in"));
    when(PATIENCE, || {
        frr_count(&stats(), "updatesRecv") > frr_count(&before, "updatesRecv")
    })
    .unwrap_or_else(|| panic!("no UPDATE after the refresh:\n{}", stats()));
    let after = stats();
    assert!(
        frr_count(&after, "routeRefreshSent") > frr_count(&before, "routeRefreshSent"),
        "{after}"
    );
    // The BoRR and the EoRR around the UPDATE.
    assert!(
        frr_count(&after, "routeRefreshRecv") >= frr_count(&before, "routeRefreshRecv") + 2,
        "no BoRR/EoRR: {after}"
    );
    for key in ["opensRecv", "notificationsSent", "notificationsRecv"] {
        assert_eq!(
            frr_count(&after, key),
            frr_count(&before, key),
            "{key}: {after}"
        );
    }
    assert!(after.contains("\"bgpState\":\"Established\""), "{after}");
    assert!(!frr.route_json("ipv4", PREFIX4).is_empty());
    let log = lab.pop(1).log_text();
    let since: String = log.lines().skip(mark).collect::<Vec<_>>().join("\n");
    assert!(!since.contains("NOTIFICATION"), "{since}");
}

#[test]
fn two_neighbors_bird_over_ipv4_and_gobgp_over_ipv6_with_med_and_communities() {
    let _serial = serial();
    let mut lab = Lab::new(1, 9);
    // GoBGP on the client's host, reached over IPv6.
    let (pop, gobgp_host) = (1, 2);
    add_ipv6(&lab, &[(pop, "fd77::2/64"), (gobgp_host, "fd77::3/64")]);
    let bird = Bird::start(&lab.net, 0, ROUTER_ASN, &lab.peers());
    let gobgp = GoBgp::start(
        &lab.net,
        gobgp_host,
        65001,
        &[Peer {
            name: "pop1".into(),
            addr: "fd77::2".into(),
            asn: POP_ASN,
            hold_secs: 9,
            password: None,
            bfd: false,
        }],
        50052,
    );
    lab.bgp_extra[pop] = format!(
        "next_hop = [\"{}\"]\ncommunities = [\"65010:100\"]\nmed = 50\n\n[[bgp.neighbor]]\naddress = \"fd77::3\"\nasn = 65001\nlocal_address = \"fd77::2\"\nmed = 7\ncommunities = [\"65001:42\"]\ndescription = \"gobgp over ipv6\"",
        lab.net.ip(pop)
    );
    lab.launch(pop);
    wait_route(&bird, PREFIX4, true, "BIRD over IPv4");
    let route = bird.route(PREFIX4);
    assert!(route.contains("BGP.med: 50"), "{route}");
    assert!(route.contains("(65010,100)"), "{route}");
    let json =
        |prefix: &str, family: &str| gobgp.gobgp(&["global", "rib", "-a", family, prefix, "-j"]);
    when(PATIENCE, || json(PREFIX6, "ipv6").contains("fd77::2")).unwrap_or_else(|| {
        panic!(
            "GoBGP: no IPv6 route via fd77::2: {}\n{}",
            json(PREFIX6, "ipv6"),
            gobgp.log_text()
        )
    });
    let v4 = json(PREFIX4, "ipv4");
    assert!(v4.contains("10.77.0.2"), "explicit IPv4 next hop: {v4}");
    // MED 7 for this neighbor, communities 65010:100 and 65001:42.
    assert!(v4.contains("\"metric\":7"), "{v4}");
    for c in [65010u32 << 16 | 100, 65001 << 16 | 42] {
        assert!(v4.contains(&c.to_string()), "community {c} missing: {v4}");
    }
    let status = lab.cli(pop, &["bgp", "status"]);
    assert!(status.contains("sessions: 2 of 2 established"), "{status}");
    // One drain, both neighbors.
    lab.cli(pop, &["drain", "--wait"]);
    assert!(!bird.has_route(PREFIX4));
    assert!(!json(PREFIX4, "ipv4").contains(PREFIX4));
    assert!(!json(PREFIX6, "ipv6").contains(PREFIX6));
}

/// A router that requires TCP MD5 signatures (RFC 2385) drops every SYN
/// without the right one, silently. BIRD with `password` for the POP:
/// without a password, and with a wrong one (from a file), the session
/// never comes up and the POP says a TCP MD5 mismatch may be why; with the
/// same password BIRD learns the prefixes. The password shows nowhere: not
/// in the log, `bgp status` or `check-config`.
#[test]
fn bird_requiring_tcp_md5_takes_the_session_only_with_the_same_password() {
    const PASSWORD: &str = "lab-md5 s3cret";
    let _serial = serial();
    let mut lab = Lab::new(1, 9);
    let mut peers = lab.peers();
    peers[0].password = Some(PASSWORD.into());
    let bird = Bird::start(&lab.net, 0, ROUTER_ASN, &peers);
    let wrong = lab.dir.join("wrong-md5");
    std::fs::write(&wrong, "lab-md5 s3cre7\n").unwrap();
    let right = lab.dir.join("right-md5");
    std::fs::write(&right, format!("{PASSWORD}\n")).unwrap();

    for (what, extra, hint) in [
        (
            "no password",
            String::new(),
            "the neighbor requires a TCP MD5 password",
        ),
        (
            "wrong password",
            format!("password_file = {:?}", wrong.display().to_string()),
            "the neighbor's TCP MD5 password differs",
        ),
    ] {
        lab.neighbor_extra[1] = extra;
        lab.launch(1);
        let line = lab
            .pop(1)
            .wait_for_log("bgp: cannot connect to the neighbor", PATIENCE)
            .unwrap_or_else(|| {
                panic!(
                    "{what}: no connect failure logged; log:\n{}\nBIRD log:\n{}",
                    lab.pop(1).log_text(),
                    bird.log_text()
                )
            });
        assert!(line.contains(hint), "{what}: {line}");
        // BIRD retries nothing (it is passive); give the POP a few more
        // attempts.
        std::thread::sleep(Duration::from_secs(6));
        assert!(!bird.has_route(PREFIX4), "{what}: BIRD has the route");
        let status = lab.cli(1, &["bgp", "status"]);
        assert!(
            status.contains("sessions: 0 of 1 established"),
            "{what}: {status}"
        );
        assert!(status.contains("TCP MD5"), "{what}: {status}");
        lab.pops[1] = None;
    }

    lab.neighbor_extra[1] = format!("password = {PASSWORD:?}");
    lab.launch(1);
    wait_route(&bird, PREFIX4, true, "same password");
    let status = lab.cli(1, &["bgp", "status"]);
    assert!(status.contains("sessions: 1 of 1 established"), "{status}");
    // The neighbor's row says the session is signed (and only that).
    let row = status
        .lines()
        .find(|l| l.contains(" established "))
        .unwrap_or_default();
    assert!(row.contains(" on "), "MD5 not shown as on: {status}");
    let check = lab.cli(
        1,
        &[
            "check-config",
            "--no-bind",
            "--config",
            lab.write_config(1).to_str().unwrap(),
        ],
    );
    for (what, text) in [
        ("log", lab.pop(1).log_text()),
        ("status", status),
        ("check-config", check),
    ] {
        assert!(!text.contains("s3cre"), "password in the {what}:\n{text}");
    }
    lab.pops[1] = None;
    wait_route(&bird, PREFIX4, false, "POP killed: BIRD's hold time");

    // The same, from a file.
    lab.neighbor_extra[1] = format!("password_file = {:?}", right.display().to_string());
    lab.launch(1);
    wait_route(&bird, PREFIX4, true, "same password from a file");
}

/// The same against FRR (`neighbor X password Y`): a wrong password never
/// gets the session up; the right one does, and FRR learns the prefixes.
#[test]
fn frr_requiring_tcp_md5_takes_the_session_only_with_the_same_password() {
    let _serial = serial();
    let mut lab = Lab::new(1, 9);
    let mut peers = lab.peers();
    peers[0].password = Some("frr-md5-s3cret".into());
    let frr = Frr::start(&lab.net, 0, ROUTER_ASN, &peers);
    let route = |family: &str, prefix: &str| frr.route_json(family, prefix);

    lab.neighbor_extra[1] = "password = \"frr-md5-wrong\"".into();
    lab.launch(1);
    let line = lab
        .pop(1)
        .wait_for_log("bgp: cannot connect to the neighbor", PATIENCE)
        .unwrap_or_else(|| panic!("no connect failure logged:\n{}", lab.pop(1).log_text()));
    assert!(line.contains("TCP MD5 password differs"), "{line}");
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        route("ipv4", PREFIX4).is_empty(),
        "FRR took a wrong password"
    );
    lab.pops[1] = None;

    lab.neighbor_extra[1] = "password = \"frr-md5-s3cret\"".into();
    lab.launch(1);
    when(PATIENCE, || !route("ipv4", PREFIX4).is_empty()).unwrap_or_else(|| {
        panic!(
            "FRR never learned {PREFIX4}:\n{}\nlog:\n{}",
            frr.vtysh("show bgp summary"),
            frr.log_text()
        )
    });
    assert!(!lab.pop(1).log_text().contains("s3cret"));
}

/// One counter of the kernel of host `host` (`nstat -az`), e.g.
/// `TcpExtTCPMD5Failure`.
fn kernel_counter(net: &common::netns::Net, host: usize, name: &str) -> u64 {
    let out = net.command(host, "nstat").arg("-az").output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some(name)).then(|| words.next()?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no {name} in nstat"))
}

/// The same against GoBGP (`auth-password`): without a password and with
/// a wrong one the session never comes up — GoBGP's kernel drops the SYNs
/// (it counts them as unsigned, then as failing the signature) — and the
/// POP says a TCP MD5 mismatch may be why; with the same password GoBGP
/// takes the session and learns the prefixes, and the password shows
/// nowhere.
#[test]
fn gobgp_requiring_tcp_md5_takes_the_session_only_with_the_same_password() {
    const PASSWORD: &str = "gobgp-md5 s3cret";
    let _serial = serial();
    let mut lab = Lab::new(1, 9);
    let mut peers = lab.peers();
    peers[0].password = Some(PASSWORD.into());
    let gobgp = GoBgp::start(&lab.net, 0, ROUTER_ASN, &peers, 50053);
    let route = |family: &str, prefix: &str| gobgp.route(family, prefix);
    let pop = lab.net.ip(1).to_string();
    let peer_state = || {
        gobgp
            .gobgp(&["neighbor"])
            .lines()
            .find(|l| l.starts_with(&pop))
            .unwrap_or_default()
            .to_string()
    };

    for (what, extra, hint, counter) in [
        (
            "no password",
            String::new(),
            "the neighbor requires a TCP MD5 password",
            "TcpExtTCPMD5NotFound",
        ),
        (
            "wrong password",
            "password = \"gobgp-md5 s3cre7\"".to_string(),
            "the neighbor's TCP MD5 password differs",
            "TcpExtTCPMD5Failure",
        ),
    ] {
        let dropped = kernel_counter(&lab.net, 0, counter);
        lab.neighbor_extra[1] = extra;
        lab.launch(1);
        let line = lab
            .pop(1)
            .wait_for_log("bgp: cannot connect to the neighbor", PATIENCE)
            .unwrap_or_else(|| {
                panic!(
                    "{what}: no connect failure logged; log:\n{}\nGoBGP log:\n{}",
                    lab.pop(1).log_text(),
                    gobgp.log_text()
                )
            });
        assert!(line.contains(hint), "{what}: {line}");
        // GoBGP's kernel dropped the POP's SYNs for their signature.
        assert!(
            kernel_counter(&lab.net, 0, counter) > dropped,
            "{what}: {counter} did not grow at GoBGP's host"
        );
        // A few more attempts: never up.
        std::thread::sleep(Duration::from_secs(4));
        assert!(
            route("ipv4", PREFIX4).is_empty(),
            "{what}: GoBGP has the route"
        );
        assert!(!peer_state().contains("Establ"), "{what}: {}", peer_state());
        let status = lab.cli(1, &["bgp", "status"]);
        assert!(
            status.contains("sessions: 0 of 1 established"),
            "{what}: {status}"
        );
        lab.pops[1] = None;
    }

    lab.neighbor_extra[1] = format!("password = {PASSWORD:?}");
    lab.launch(1);
    when(PATIENCE, || route("ipv4", PREFIX4).contains(PREFIX4)).unwrap_or_else(|| {
        panic!(
            "GoBGP never learned {PREFIX4} with the same password: {}\nlog:\n{}",
            gobgp.gobgp(&["neighbor"]),
            gobgp.log_text()
        )
    });
    assert!(peer_state().contains("Establ"), "{}", peer_state());
    when(PATIENCE, || route("ipv6", PREFIX6).contains(PREFIX6))
        .expect("IPv6 over the signed session");
    let status = lab.cli(1, &["bgp", "status"]);
    assert!(status.contains("sessions: 1 of 1 established"), "{status}");
    for (what, text) in [("log", lab.pop(1).log_text()), ("status", status)] {
        assert!(!text.contains("s3cret"), "password in the {what}:\n{text}");
    }
}

/// What GoBGP holds from the POP and what it negotiated with it, read
/// with its own CLI: 4-octet AS, both families, route refresh; no
/// graceful restart (a POP that dies must lose its routes, not leave them
/// stale); next hop the POP's address (IPv4-mapped for the IPv6 prefix on
/// this IPv4 session), AS path the POP's AS, origin IGP.
#[test]
fn gobgp_sees_the_pops_capabilities_and_attributes() {
    let _serial = serial();
    let mut lab = Lab::new(1, 9);
    let gobgp = GoBgp::start(&lab.net, 0, ROUTER_ASN, &lab.peers(), 50054);
    lab.launch(1);
    let pop = lab.net.ip(1).to_string();
    when(PATIENCE, || gobgp.route("ipv6", PREFIX6).contains(PREFIX6)).unwrap_or_else(|| {
        panic!(
            "GoBGP never learned {PREFIX6}: {}\n{}",
            gobgp.gobgp(&["neighbor"]),
            gobgp.log_text()
        )
    });
    let neighbor = gobgp.gobgp(&["neighbor", &pop]);
    for cap in [
        "ipv4-unicast:\tadvertised and received",
        "ipv6-unicast:\tadvertised and received",
        "route-refresh:\tadvertised and received",
        "4-octet-as:\tadvertised and received",
    ] {
        assert!(
            neighbor.contains(cap),
            "{cap:?} not negotiated:\n{neighbor}"
        );
    }
    assert!(
        !neighbor.contains("graceful-restart"),
        "the POP offers graceful restart:\n{neighbor}"
    );
    assert!(neighbor.contains("Hold time is 9"), "{neighbor}");

    let adj_in = |family: &str| gobgp.gobgp(&["neighbor", &pop, "adj-in", "-a", family, "-j"]);
    let v4 = adj_in("ipv4");
    assert!(v4.contains(PREFIX4), "{v4}");
    assert!(
        v4.contains(&format!("\"nexthop\":\"{pop}\"")),
        "next hop: {v4}"
    );
    let v6 = adj_in("ipv6");
    assert!(v6.contains(PREFIX6), "{v6}");
    // GoBGP prints ::ffff:a.b.c.d as a.b.c.d; the MP_REACH_NLRI (type 14)
    // carries it.
    assert!(
        v6.contains(&format!("\"type\":14,\"nexthop\":\"{pop}\"")),
        "IPv6 next hop: {v6}"
    );
    for json in [&v4, &v6] {
        assert!(
            json.contains("{\"type\":1,\"value\":0}"),
            "origin IGP: {json}"
        );
        assert!(
            json.contains(&format!(
                "\"segment_type\":2,\"num\":1,\"asns\":[{POP_ASN}]"
            )),
            "AS path: {json}"
        );
    }
    // Best in GoBGP's RIB.
    let rib = gobgp.gobgp(&["global", "rib", "-a", "ipv4", PREFIX4, "-j"]);
    assert!(rib.contains("\"best\":true"), "{rib}");
}

/// The router restarts (killed, 20 s down, started again): the POP, the
/// only side that connects, keeps trying every `connect_retry_secs` (1 s
/// here) and re-announces as soon as GoBGP is back. Until 2026-12-06 the
/// waits doubled with every refused connect (1, 2, 4, 8, 16 s … up to
/// 300 s) and GoBGP got the routes back 14 s after it returned.
#[test]
fn a_restarted_gobgp_gets_the_routes_back_within_connect_retry_secs() {
    let _serial = serial();
    let mut lab = Lab::new(1, 9);
    lab.bgp_extra[1] = "connect_retry_secs = 1".into();
    let gobgp = GoBgp::start(&lab.net, 0, ROUTER_ASN, &lab.peers(), 50055);
    lab.launch(1);
    when(PATIENCE, || gobgp.route("ipv4", PREFIX4).contains(PREFIX4)).expect("announced");
    let mark = lab.pop(1).log_mark();
    drop(gobgp); // kill -9
    lab.pop(1)
        .wait_for_log_after(mark, "bgp: session down", PATIENCE)
        .expect("the POP saw the session go");
    std::thread::sleep(Duration::from_secs(20));
    let gobgp = GoBgp::start(&lab.net, 0, ROUTER_ASN, &lab.peers(), 50055);
    let back = Instant::now();
    when(PATIENCE, || gobgp.route("ipv4", PREFIX4).contains(PREFIX4)).unwrap_or_else(|| {
        panic!(
            "never re-announced: {}\nPOP log:\n{}",
            gobgp.gobgp(&["neighbor"]),
            lab.pop(1).log_text()
        )
    });
    let took = back.elapsed();
    println!(
        "figure: router back after 20 s down to the routes re-announced: {:.2} s (connect_retry_secs 1)",
        took.as_secs_f64()
    );
    assert!(
        took < Duration::from_secs(6),
        "routes back {took:?} after the router (connect_retry_secs = 1)"
    );
    when(PATIENCE, || gobgp.route("ipv6", PREFIX6).contains(PREFIX6)).expect("IPv6 re-announced");
}

/// One POP and BIRD over IPv4, both with an IPv6 address on their link
/// (`fd77::1`, and the POP's `fd77::2`), the POP's IPv6 anycast address on
/// its loopback; `more_pop_addrs` runs before the POP starts, to add
/// addresses to its link.
fn ipv6_link_lab(more_pop_addrs: impl FnOnce(&Net)) -> (Lab, Bird) {
    let mut lab = Lab::new(1, 9);
    for (host, addr) in [(0, "fd77::1/64"), (1, "fd77::2/64")] {
        sh(
            &lab.net,
            host,
            &["ip", "-6", "addr", "add", addr, "dev", "eth0", "nodad"],
        );
    }
    sh(
        &lab.net,
        1,
        &[
            "ip",
            "-6",
            "addr",
            "add",
            "2001:db8:100::1/128",
            "dev",
            "lo",
        ],
    );
    more_pop_addrs(&lab.net);
    let bird = Bird::start(&lab.net, 0, ROUTER_ASN, &lab.peers());
    lab.launch(1);
    wait_route(&bird, PREFIX4, true, "announce");
    when(PATIENCE, || bird.route(PREFIX6).contains(PREFIX6)).unwrap_or_else(|| {
        panic!(
            "no IPv6 route: {}",
            bird.birdc(&["show", "route", "all", "table", "master6"])
        )
    });
    (lab, bird)
}

/// Waits until the router's kernel forwards the IPv6 anycast prefix via
/// `hop`.
fn wait_kernel_route_via(lab: &Lab, bird: &Bird, hop: &str) {
    let kernel = || {
        let out = lab
            .net
            .command(0, "ip")
            .args(["-6", "route", "show", PREFIX6])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    when(PATIENCE, || kernel().contains(&format!("via {hop}"))).unwrap_or_else(|| {
        panic!(
            "not via {hop} in the router's kernel: {:?}\nBIRD log:\n{}",
            kernel(),
            bird.log_text()
        )
    });
}

/// IPv6 prefixes over an IPv4 session, the POP with an IPv6 address on the
/// session's link (and its IPv6 anycast address on its loopback): the next
/// hop is that link address, which the router reaches and installs. QA:
/// it was always the IPv4-mapped `::ffff:10.77.0.2`, which BIRD took
/// (with `extended next hop on`) but could not put in its kernel ("Netlink:
/// Invalid argument"; Linux has no IPv4 gateway for IPv6 routes), so the
/// router learned the IPv6 anycast prefix and never forwarded to it.
#[test]
fn ipv6_prefixes_over_an_ipv4_session_take_the_pops_ipv6_link_address_as_next_hop() {
    let _serial = serial();
    let (lab, bird) = ipv6_link_lab(|_| {});
    let route = bird.route(PREFIX6);
    assert!(
        route.contains("BGP.next_hop: fd77::2"),
        "next hop not the POP's IPv6 link address:\n{route}"
    );
    // In the router's kernel: it forwards to the POP.
    wait_kernel_route_via(&lab, &bird, "fd77::2");
    // The IPv4 route keeps the IPv4 address.
    assert!(bird.route(PREFIX4).contains("via 10.77.0.2"));
}

/// The POP's link also holds a deprecated address (`preferred_lft 0`, as
/// when its prefix is renumbered away) and one whose duplicate address
/// detection failed (the router holds it too), both listed before the
/// preferred `fd77::2` (the kernel lists the newest first): the next hop
/// the router sees is `fd77::2`. QA: the first address listed was taken,
/// here the deprecated `fd77::5`.
#[test]
fn ipv6_next_hop_is_a_preferred_address_not_a_deprecated_or_dadfailed_one_listed_first() {
    let _serial = serial();
    let (lab, bird) = ipv6_link_lab(|net| {
        // A duplicate of the router's: DAD marks it tentative, then failed.
        sh(
            net,
            0,
            &[
                "ip",
                "-6",
                "addr",
                "add",
                "fd77::9/64",
                "dev",
                "eth0",
                "nodad",
            ],
        );
        sh(
            net,
            1,
            &["ip", "-6", "addr", "add", "fd77::9/64", "dev", "eth0"],
        );
        sh(
            net,
            1,
            &[
                "ip",
                "-6",
                "addr",
                "add",
                "fd77::5/64",
                "dev",
                "eth0",
                "nodad",
                "preferred_lft",
                "0",
            ],
        );
        // The case at hand: the deprecated address is listed first.
        let out = net
            .command(1, "ip")
            .args(["-6", "addr", "show", "dev", "eth0", "scope", "global"])
            .output()
            .unwrap();
        let listed = String::from_utf8_lossy(&out.stdout).into_owned();
        let first = listed.find("inet6 ").map(|i| &listed[i..]).unwrap_or("");
        assert!(
            first.starts_with("inet6 fd77::5/64") && first.contains("deprecated"),
            "the deprecated address is not listed first:\n{listed}"
        );
    });
    let route = bird.route(PREFIX6);
    assert!(
        route.contains("BGP.next_hop: fd77::2"),
        "next hop not the POP's preferred IPv6 address:\n{route}"
    );
    wait_kernel_route_via(&lab, &bird, "fd77::2");
    let log = lab.pop(1).log_text();
    assert!(
        !log.contains("IPv6 address on the session's interface is deprecated"),
        "no fallback to a deprecated address, so no WARN about one:\n{log}"
    );
}

/// FRR asks for the IPv4 routes again (`clear bgp ipv4 unicast X soft
/// in`, a ROUTE-REFRESH) on a session where both offered Enhanced Route
/// Refresh: the POP answers BoRR, the routes, EoRR (RFC 7313 §4), which
/// FRR logs, and FRR keeps the routes (the EoRR purges only what was not
/// sent again). QA: the POP sent the routes of both families and no BoRR
/// or EoRR.
#[test]
fn frr_soft_in_gets_the_routes_between_borr_and_eorr() {
    let _serial = serial();
    let mut lab = Lab::new(1, 9);
    let frr = Frr::start(&lab.net, 0, ROUTER_ASN, &lab.peers());
    lab.launch(1);
    let route = |family: &str, prefix: &str| frr.route_json(family, prefix);
    when(PATIENCE, || !route("ipv4", PREFIX4).is_empty()).unwrap_or_else(|| {
        panic!(
            "FRR never learned {PREFIX4}:\n{}\nlog:\n{}",
            frr.vtysh("show bgp summary"),
            frr.log_text()
        )
    });
    when(PATIENCE, || !route("ipv6", PREFIX6).is_empty()).expect("IPv6 learned");
    let pop = lab.net.ip(1).to_string();
    let neighbor = frr.vtysh(&format!("show bgp neighbors {pop}"));
    assert!(
        neighbor.contains("Enhanced Route Refresh: advertised and received"),
        "{neighbor}"
    );
    let mark = lab.pop(1).log_mark();
    frr.vtysh(&format!("clear bgp ipv4 unicast {pop} soft in"));
    let log = || frr.log_text();
    when(PATIENCE, || log().contains("rcvd route-refresh (EoRR)")).unwrap_or_else(|| {
        panic!(
            "no EoRR at FRR; log:\n{}\nPOP log:\n{}",
            log(),
            lab.pop(1).log_text()
        )
    });
    let log = log();
    assert!(log.contains("rcvd route-refresh (BoRR)"), "{log}");
    assert!(!log.contains("whereas no BoRR received"), "{log}");
    // The IPv4 route once more, the IPv6 one not.
    let resent = lab
        .pop(1)
        .wait_for_log_after(mark, "bgp: routes announced", PATIENCE)
        .expect("the refresh resent the routes");
    assert!(resent.contains("prefixes=1"), "{resent}");
    assert!(!route("ipv4", PREFIX4).is_empty(), "FRR dropped the route");
    assert!(
        !route("ipv6", PREFIX6).is_empty(),
        "FRR dropped the IPv6 route"
    );
}

/// The POP renumbered under a running session: a new address added to its
/// link leaves the routes as they are (the next hop in use still works);
/// the old one removed, the IPv6 route comes again with the new next hop,
/// which BIRD installs. QA: the next hop was chosen once, at connect, and
/// stayed the removed address (unreachable for the router) until the
/// session restarted.
#[test]
fn a_next_hop_removed_from_the_link_is_replaced_under_a_running_session() {
    let _serial = serial();
    let (lab, bird) = ipv6_link_lab(|_| {});
    wait_kernel_route_via(&lab, &bird, "fd77::2");
    let mark = lab.pop(1).log_mark();
    sh(
        &lab.net,
        1,
        &[
            "ip",
            "-6",
            "addr",
            "add",
            "fd77::7/64",
            "dev",
            "eth0",
            "nodad",
        ],
    );
    sh(
        &lab.net,
        1,
        &["ip", "-6", "addr", "del", "fd77::2/64", "dev", "eth0"],
    );
    wait_kernel_route_via(&lab, &bird, "fd77::7");
    let route = bird.route(PREFIX6);
    assert!(route.contains("BGP.next_hop: fd77::7"), "{route}");
    let said = lab
        .pop(1)
        .wait_for_log_after(mark, "bgp: the IPv6 next hop changed", PATIENCE)
        .expect("the change logged");
    assert!(said.contains("fd77::7"), "{said}");
    // Still the same session: no reconnect was needed.
    assert!(
        lab.pop(1)
            .log_lines_after(mark, "bgp: session established")
            .is_empty(),
        "the session restarted:\n{}",
        lab.pop(1).log_text()
    );
}

/// The POP's only address on its link is deprecated: it is still the next
/// hop (better than an IPv4-mapped one the router cannot install), and the
/// POP says so with a WARN.
#[test]
fn a_deprecated_link_address_is_the_next_hop_only_when_alone_with_a_warn() {
    let _serial = serial();
    let (lab, bird) = ipv6_link_lab(|net| {
        sh(
            net,
            1,
            &[
                "ip",
                "-6",
                "addr",
                "change",
                "fd77::2/64",
                "dev",
                "eth0",
                "nodad",
                "preferred_lft",
                "0",
            ],
        );
    });
    let route = bird.route(PREFIX6);
    assert!(
        route.contains("BGP.next_hop: fd77::2"),
        "next hop not the POP's deprecated IPv6 address:\n{route}"
    );
    wait_kernel_route_via(&lab, &bird, "fd77::2");
    let warned = lab.pop(1).log_lines().into_iter().find(|l| {
        l.contains("WARN") && l.contains("IPv6 address on the session's interface is deprecated")
    });
    let warned = warned.unwrap_or_else(|| panic!("no WARN:\n{}", lab.pop(1).log_text()));
    assert!(warned.contains("next_hop=fd77::2"), "{warned}");
}
