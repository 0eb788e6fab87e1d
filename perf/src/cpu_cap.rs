//! A CPU bandwidth cap for one proxy at a time (CFS bandwidth control in a
//! cgroup of its own), so that the proxy, not the load generator, is what
//! saturates in the overload scenario (o).
//!
//! Why: on a 2-core machine the proxy has one core and the load generator and
//! backends share the other. Both sides cost about the same per request, so
//! uncapped, an open loop past the proxy's maximum saturates the generator's
//! core too, and (o) measured the generator as much as the proxy (README,
//! "Overload"). Capped at half a core, the proxy saturates at about half its
//! rate while the generator keeps headroom, and what (o) reports is how the
//! proxy itself degrades past its maximum.
//!
//! Works with cgroup v2 (`cpu.max`) and with the v1 `cpu` controller
//! (`cpu.cfs_quota_us`); the group is made at the hierarchy's root (v2's
//! root is exempt from the no-internal-processes rule). Needs root. A
//! process is moved in with its threads (`cgroup.procs`), each descendant
//! (nginx's workers) on its own, and moved back to the cgroup this suite
//! runs in afterwards.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// CFS period of the cap. Short, so a capped proxy stalls for at most a few
/// milliseconds at a time (the kernel's minimum is 1 ms).
const PERIOD_US: u64 = 10_000;

/// A cgroup with a CPU cap; removed on drop.
pub struct CpuCap {
    dir: PathBuf,
    /// `cgroup.procs` of the cgroup this suite runs in: where capped
    /// processes go back to.
    home_procs: PathBuf,
    /// The share of one CPU it allows.
    pub share: f64,
}

impl CpuCap {
    /// A new cgroup allowing `share` of one CPU (0 < share).
    pub fn create(share: f64) -> anyhow::Result<CpuCap> {
        anyhow::ensure!(share > 0.0, "a CPU cap must be a positive share");
        let quota_us = ((share * PERIOD_US as f64).round() as u64).max(1000);
        // One cgroup per cap, not per process: two suites run by one process
        // (the smoke tests, in parallel) must not share one, or the first
        // to finish removes the other's.
        static CAPS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = CAPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("edgeproxy-perf-{}-{n}", std::process::id());
        let v2_root = Path::new("/sys/fs/cgroup");
        let v1_root = Path::new("/sys/fs/cgroup/cpu");
        let (dir, home_procs) = if fs::read_to_string(v2_root.join("cgroup.controllers"))
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "cpu"))
        {
            // The root's children get the cpu controller only when the root
            // hands it down.
            let subtree = v2_root.join("cgroup.subtree_control");
            if !fs::read_to_string(&subtree).is_ok_and(|c| c.split_whitespace().any(|c| c == "cpu"))
            {
                fs::write(&subtree, "+cpu")
                    .with_context(|| format!("enabling cpu in {}", subtree.display()))?;
            }
            let dir = v2_root.join(&name);
            make_dir(&dir)?;
            write(&dir.join("cpu.max"), &format!("{quota_us} {PERIOD_US}"))?;
            (dir, v2_root.join(own_cgroup("0::")?).join("cgroup.procs"))
        } else if v1_root.join("cpu.cfs_quota_us").exists() {
            let dir = v1_root.join(&name);
            make_dir(&dir)?;
            write(&dir.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
            write(&dir.join("cpu.cfs_quota_us"), &quota_us.to_string())?;
            let home = own_v1_cpu_cgroup()?;
            (dir, v1_root.join(home).join("cgroup.procs"))
        } else {
            anyhow::bail!("no cgroup cpu controller (neither v2 cpu.max nor v1 cpu.cfs_quota_us)");
        };
        Ok(CpuCap {
            dir,
            home_procs,
            share: quota_us as f64 / PERIOD_US as f64,
        })
    }

    /// Moves `pid` and its descendants under the cap.
    pub fn enter(&self, pid: u32) -> anyhow::Result<()> {
        let procs = self.dir.join("cgroup.procs");
        for p in crate::procfs::process_tree(pid) {
            write(&procs, &p.to_string())?;
        }
        Ok(())
    }

    /// Moves `pid` and its descendants back to the suite's own cgroup.
    pub fn leave(&self, pid: u32) -> anyhow::Result<()> {
        for p in crate::procfs::process_tree(pid) {
            write(&self.home_procs, &p.to_string())?;
        }
        Ok(())
    }

    /// The processes under the cap now.
    pub fn members(&self) -> Vec<u32> {
        fs::read_to_string(self.dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Drop for CpuCap {
    fn drop(&mut self) {
        // A cgroup is removed only once empty: whatever is still in it
        // (a leave() that failed) goes home first.
        for p in self.members() {
            let _ = fs::write(&self.home_procs, p.to_string());
        }
        if let Err(e) = fs::remove_dir(&self.dir) {
            eprintln!("perf: cannot remove cgroup {}: {e}", self.dir.display());
        }
    }
}

fn make_dir(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir(dir).with_context(|| format!("creating cgroup {}", dir.display()))
}

fn write(path: &Path, value: &str) -> anyhow::Result<()> {
    fs::write(path, value).with_context(|| format!("writing {value:?} to {}", path.display()))
}

/// This process's cgroup path (relative to the hierarchy's root) from the
/// `/proc/self/cgroup` line starting with `prefix`.
fn own_cgroup(prefix: &str) -> anyhow::Result<String> {
    let text = fs::read_to_string("/proc/self/cgroup")?;
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .map(|p| p.trim_start_matches('/').to_string())
        .with_context(|| format!("no {prefix} line in /proc/self/cgroup"))
}

/// This process's cgroup in the v1 hierarchy that has the `cpu` controller
/// (its line reads `N:cpu:/path` or `N:cpu,cpuacct:/path`).
fn own_v1_cpu_cgroup() -> anyhow::Result<String> {
    let text = fs::read_to_string("/proc/self/cgroup")?;
    text.lines()
        .find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            controllers
                .split(',')
                .any(|c| c == "cpu")
                .then(|| path.trim_start_matches('/').to_string())
        })
        .context("no cpu controller line in /proc/self/cgroup")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// A busy child under a cap of 0.2 CPU gets about that, goes back to
    /// this process's cgroup, and the cgroup is removed afterwards. Needs
    /// root (CI runs as root); elsewhere it says so and checks nothing.
    #[test]
    fn a_capped_process_gets_its_share_and_leaves_no_cgroup_behind() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: cgroups need root");
            return;
        }
        struct Busy(std::process::Child);
        impl Drop for Busy {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let busy = Busy(
            std::process::Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .spawn()
                .expect("sh"),
        );
        let pid = busy.0.id();
        let own = fs::read_to_string("/proc/self/cgroup").unwrap();
        let cap = CpuCap::create(0.2).expect("cgroup");
        let dir = cap.dir.clone();
        cap.enter(pid).unwrap();
        assert_eq!(cap.members(), vec![pid]);
        let before = crate::procfs::cpu(pid).total();
        let start = Instant::now();
        std::thread::sleep(Duration::from_millis(1500));
        let used = crate::procfs::cpu(pid).total() - before;
        let share = used.as_secs_f64() / start.elapsed().as_secs_f64();
        assert!(share < 0.3, "capped at 0.2 CPU, used {share:.2}");
        cap.leave(pid).unwrap();
        assert!(cap.members().is_empty());
        assert_eq!(
            fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap(),
            own,
            "not back in the suite's cgroup"
        );
        drop(cap);
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}
