//! Several hosts on one machine: network namespaces joined by a bridge, with
//! added latency and loss, and partitions.
//!
//! Layout: one namespace holds a bridge; each host is a namespace with one
//! veth into it, addressed 10.77.0.<i+1>/24. Nothing is reachable from the
//! test's own namespace: the test acts inside a host with [`Net::run_in`]
//! (a thread that enters the namespace) and starts processes there with
//! [`Net::command`] (`ip netns exec`).
//!
//! Latency and loss: this kernel has no `tc netem`, so every packet a host
//! sends goes through an NFQUEUE (`iptables … -j NFQUEUE`), where a thread of
//! the test holds it for the one-way delay and then accepts it, or drops it
//! with the loss probability. Partitions are `iptables` DROP rules.
//!
//! Needs root (CI runs as root) and `iptables` (the nft backend's NFQUEUE
//! target works in namespaces). Everything is removed on drop, also when the
//! test fails; what a killed test process left is removed by the next one.
#![allow(dead_code)]

use std::collections::BinaryHeap;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Fails the test with a clear message when it cannot run here.
pub fn require_root() {
    // SAFETY: plain getter.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "this test builds network namespaces and needs root (CI runs as root): run `sudo -E cargo test`"
    );
    let ok = Command::new("iptables")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "iptables is missing: apt-get install iptables (.ci/run does)"
    );
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One host: a namespace and its address.
#[derive(Debug, Clone)]
pub struct Host {
    pub ns: String,
    pub ip: Ipv4Addr,
}

pub struct Net {
    bridge_ns: String,
    pub hosts: Vec<Host>,
    delayers: Vec<Delayer>,
}

impl Net {
    /// `n` hosts on one bridge, no latency yet.
    pub fn new(n: usize) -> Net {
        require_root();
        static SWEEP: std::sync::Once = std::sync::Once::new();
        SWEEP.call_once(sweep_stale);
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let tag = format!(
            "ep{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let bridge_ns = format!("{tag}-br");
        let mut net = Net {
            bridge_ns: bridge_ns.clone(),
            hosts: Vec::new(),
            delayers: Vec::new(),
        };
        sh(&["ip", "netns", "add", &bridge_ns]);
        sh(&[
            "ip", "-n", &bridge_ns, "link", "add", "br0", "type", "bridge",
        ]);
        sh(&["ip", "-n", &bridge_ns, "link", "set", "br0", "up"]);
        for i in 0..n {
            let ns = format!("{tag}-h{i}");
            let ip = Ipv4Addr::new(10, 77, 0, i as u8 + 1);
            sh(&["ip", "netns", "add", &ns]);
            net.hosts.push(Host { ns: ns.clone(), ip });
            // veth pair created inside the host, its peer moved to the bridge.
            let peer = format!("p{i}");
            sh(&[
                "ip", "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &peer,
                "netns", &bridge_ns,
            ]);
            sh(&[
                "ip", "-n", &bridge_ns, "link", "set", &peer, "master", "br0",
            ]);
            sh(&["ip", "-n", &bridge_ns, "link", "set", &peer, "up"]);
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                "eth0",
            ]);
            sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        }
        net
    }

    pub fn ip(&self, i: usize) -> Ipv4Addr {
        self.hosts[i].ip
    }

    /// Every link between the hosts carries `mtu`-byte packets (jumbo
    /// frames): each host's `eth0`, its port on the bridge, and the bridge.
    pub fn set_mtu(&self, mtu: u32) {
        let mtu = mtu.to_string();
        let set = |ns: &str, link: &str| sh(&["ip", "-n", ns, "link", "set", link, "mtu", &mtu]);
        for (i, h) in self.hosts.iter().enumerate() {
            set(&h.ns, "eth0");
            set(&self.bridge_ns, &format!("p{i}"));
        }
        set(&self.bridge_ns, "br0");
    }

    /// A command run inside host `i`'s namespace.
    pub fn command(&self, i: usize, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.hosts[i].ns, program]);
        cmd
    }

    /// A backend greeting `tag`, listening inside host `i` on its address
    /// (an ephemeral port: bind before [`Net::one_ephemeral_port`] leaves
    /// the host just one, or on a host that keeps its range).
    pub fn tag_backend(&self, i: usize, tag: &'static str) -> super::TagBackend {
        let ip = self.ip(i);
        self.run_in(i, move || {
            super::TagBackend::serve(std::net::TcpListener::bind((ip, 0)).unwrap(), tag)
        })
    }

    /// Leaves host `i` one ephemeral port (40000): a second outgoing
    /// connection to the same destination fails with EADDRNOTAVAIL. Bind
    /// its listeners to fixed ports (a port 0 would take that one).
    pub fn one_ephemeral_port(&self, i: usize) {
        let sysctl = self
            .command(i, "sysctl")
            .args(["-w", "net.ipv4.ip_local_port_range=40000 40000"])
            .output()
            .unwrap();
        assert!(sysctl.status.success(), "{sysctl:?}");
    }

    /// Runs `f` on a thread inside host `i`'s namespace (sockets it
    /// creates belong to that namespace for good).
    pub fn run_in<T: Send + 'static>(&self, i: usize, f: impl FnOnce() -> T + Send + 'static) -> T {
        let ns = self.hosts[i].ns.clone();
        std::thread::spawn(move || {
            enter(&ns);
            f()
        })
        .join()
        .expect("thread inside the namespace panicked")
    }

    /// Every packet each host sends waits `one_way` (so a round trip takes
    /// twice that), and is lost with probability `loss`.
    pub fn impair(&mut self, one_way: Duration, loss: f64) {
        for (i, h) in self.hosts.iter().enumerate() {
            sh(&[
                "ip",
                "netns",
                "exec",
                &h.ns,
                "iptables",
                "-A",
                "OUTPUT",
                "-o",
                "eth0",
                "-j",
                "NFQUEUE",
                "--queue-num",
                "0",
                "--queue-bypass",
            ]);
            self.delayers
                .push(Delayer::start(&h.ns, one_way, loss, i as u64 + 1));
        }
    }

    /// Hosts in `a` and hosts in `b` can no longer reach each other.
    pub fn partition(&self, a: &[usize], b: &[usize]) {
        for &x in a {
            for &y in b {
                for (from, to) in [(x, y), (y, x)] {
                    let to_ip = self.ip(to).to_string();
                    sh(&[
                        "ip",
                        "netns",
                        "exec",
                        &self.hosts[from].ns,
                        "iptables",
                        "-I",
                        "OUTPUT",
                        "1",
                        "-d",
                        &to_ip,
                        "-j",
                        "DROP",
                    ]);
                }
            }
        }
    }

    /// Drops packets host `from` sends to host `to`'s UDP `port` (one path of
    /// one protocol, e.g. the replication transport, while gossip flows).
    pub fn block_udp(&self, from: usize, to: usize, port: u16) {
        let to_ip = self.ip(to).to_string();
        let port = port.to_string();
        sh(&[
            "ip",
            "netns",
            "exec",
            &self.hosts[from].ns,
            "iptables",
            "-I",
            "OUTPUT",
            "1",
            "-d",
            &to_ip,
            "-p",
            "udp",
            "--dport",
            &port,
            "-j",
            "DROP",
        ]);
    }

    /// Removes every partition and block.
    pub fn heal(&self) {
        for h in &self.hosts {
            // Delete DROP rules one by one until none is left.
            loop {
                let out = Command::new("ip")
                    .args(["netns", "exec", &h.ns, "iptables", "-S", "OUTPUT"])
                    .output()
                    .unwrap();
                let rules = String::from_utf8_lossy(&out.stdout).into_owned();
                let Some(rule) = rules.lines().find(|l| l.ends_with("-j DROP")) else {
                    break;
                };
                let mut args: Vec<&str> = vec!["ip", "netns", "exec", &h.ns, "iptables", "-D"];
                args.extend(rule.split_whitespace().skip(1));
                sh(&args);
            }
        }
    }

    /// Bytes host `i` has sent on its link so far.
    pub fn tx_bytes(&self, i: usize) -> u64 {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.hosts[i].ns,
                "cat",
                "/sys/class/net/eth0/statistics/tx_bytes",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for d in &mut self.delayers {
            d.stop();
        }
        for h in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", &h.ns]).output();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.bridge_ns])
            .output();
    }
}

/// Removes what an earlier test process left behind when it was killed (a
/// killed process runs no `Drop`): every `ep<pid>x…` namespace whose process
/// is gone, after killing what still runs inside it (proxies, routing
/// daemons).
fn sweep_stale() {
    let Ok(list) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&list.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let owner = name
            .strip_prefix("ep")
            .and_then(|rest| rest.split_once('x'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok());
        let Some(owner) = owner else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{owner}")).exists() {
            continue;
        }
        if let Ok(pids) = Command::new("ip").args(["netns", "pids", name]).output() {
            let pids = String::from_utf8_lossy(&pids.stdout);
            let pids: Vec<&str> = pids.split_whitespace().collect();
            if !pids.is_empty() {
                let _ = Command::new("kill").arg("-KILL").args(&pids).output();
            }
        }
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        eprintln!("removed namespace {name}, left by test process {owner} (gone)");
    }
}

/// Moves the calling thread into namespace `ns`.
fn enter(ns: &str) {
    let file = std::fs::File::open(format!("/run/netns/{ns}"))
        .unwrap_or_else(|e| panic!("namespace {ns}: {e}"));
    // SAFETY: setns on a valid namespace fd, for this thread only.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {ns}: {}", std::io::Error::last_os_error());
}

/// Holds each queued packet of one namespace for the delay.
struct Delayer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// A packet waiting for its release time.
struct Held {
    at: Instant,
    seq: u64,
    msg: nfq::Message,
}

impl PartialEq for Held {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Held {
    // Earliest first out of a max-heap.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

impl Delayer {
    fn start(ns: &str, delay: Duration, loss: f64, seed: u64) -> Delayer {
        let stop = Arc::new(AtomicBool::new(false));
        let ns = ns.to_string();
        let flag = Arc::clone(&stop);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            enter(&ns);
            let mut q = nfq::Queue::open().expect("nfqueue socket");
            q.bind(0).expect("bind nfqueue 0");
            q.set_nonblocking(true);
            let _ = ready_tx.send(());
            // xorshift: a seeded, dependency-free coin for losses.
            let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut coin = move || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                (rng >> 11) as f64 / (1u64 << 53) as f64
            };
            let mut held = BinaryHeap::new();
            let mut seq = 0;
            while !flag.load(Ordering::Relaxed) {
                let mut got = false;
                while let Ok(mut msg) = q.recv() {
                    got = true;
                    if coin() < loss {
                        msg.set_verdict(nfq::Verdict::Drop);
                        let _ = q.verdict(msg);
                        continue;
                    }
                    seq += 1;
                    held.push(Held {
                        at: Instant::now() + delay,
                        seq,
                        msg,
                    });
                }
                let now = Instant::now();
                while held.peek().is_some_and(|h: &Held| h.at <= now) {
                    let mut h = held.pop().unwrap();
                    h.msg.set_verdict(nfq::Verdict::Accept);
                    let _ = q.verdict(h.msg);
                }
                if !got {
                    let wait = held
                        .peek()
                        .map(|h| h.at.saturating_duration_since(now))
                        .unwrap_or(Duration::from_millis(2))
                        .min(Duration::from_millis(1));
                    std::thread::sleep(wait.max(Duration::from_micros(200)));
                }
            }
            // Let whatever is held go.
            while let Some(mut h) = held.pop() {
                h.msg.set_verdict(nfq::Verdict::Accept);
                let _ = q.verdict(h.msg);
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("delayer did not start");
        Delayer {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
