//! What the suite reads from `/proc`: CPU time of a process tree, its RSS,
//! machine-wide inter-processor interrupts and load.
//!
//! CPU time comes from two places. `/proc/PID/stat` gives user and system time
//! in clock ticks (10 ms here): the split the report shows. Each thread's
//! `/proc/PID/task/TID/schedstat` gives its time on CPU in nanoseconds: the
//! precise total the per-request figures use. Both are summed over the process
//! and its descendants (nginx workers are children of its master), and over
//! every thread, io_uring kernel workers (`iou-wrk-*`) included.

use std::fs;
use std::time::Duration;

/// Clock ticks per second of `/proc/PID/stat` (USER_HZ).
fn ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// CPU time of a process tree at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuSample {
    /// Time on CPU, all threads, nanoseconds (schedstat).
    pub on_cpu_ns: u64,
    /// User time, nanoseconds (stat, tick resolution).
    pub user_ns: u64,
    /// System time, nanoseconds (stat, tick resolution).
    pub sys_ns: u64,
    /// Voluntary + involuntary context switches.
    pub ctx_switches: u64,
}

impl CpuSample {
    pub fn since(&self, earlier: &CpuSample) -> CpuSample {
        CpuSample {
            on_cpu_ns: self.on_cpu_ns.saturating_sub(earlier.on_cpu_ns),
            user_ns: self.user_ns.saturating_sub(earlier.user_ns),
            sys_ns: self.sys_ns.saturating_sub(earlier.sys_ns),
            ctx_switches: self.ctx_switches.saturating_sub(earlier.ctx_switches),
        }
    }

    /// The best total: schedstat when the kernel has it, else user + system.
    pub fn total(&self) -> Duration {
        if self.on_cpu_ns > 0 {
            Duration::from_nanos(self.on_cpu_ns)
        } else {
            Duration::from_nanos(self.user_ns + self.sys_ns)
        }
    }
}

/// `pid` and all its descendants.
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(p) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(fields) = stat_fields(&format!("/proc/{p}/stat")) {
                if let Some(ppid) = fields.get(1).and_then(|s| s.parse().ok()) {
                    parents.push((p, ppid));
                }
            }
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    tree
}

/// Fields of a stat file after the command name (field 3 onwards, so index 0
/// is the state, 1 the ppid, 11 utime, 12 stime).
fn stat_fields(path: &str) -> Option<Vec<String>> {
    let text = fs::read_to_string(path).ok()?;
    let after = &text[text.rfind(')')? + 1..];
    Some(after.split_whitespace().map(str::to_owned).collect())
}

/// CPU time of `pid` and its descendants.
pub fn cpu(pid: u32) -> CpuSample {
    let tick_ns = 1_000_000_000 / ticks_per_sec();
    let mut s = CpuSample::default();
    for p in process_tree(pid) {
        if let Some(f) = stat_fields(&format!("/proc/{p}/stat")) {
            let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            s.user_ns += n(11) * tick_ns;
            s.sys_ns += n(12) * tick_ns;
        }
        if let Ok(tasks) = fs::read_dir(format!("/proc/{p}/task")) {
            for t in tasks.flatten() {
                let base = t.path();
                if let Ok(text) = fs::read_to_string(base.join("schedstat")) {
                    s.on_cpu_ns += text
                        .split_whitespace()
                        .next()
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0);
                }
                if let Ok(text) = fs::read_to_string(base.join("status")) {
                    for line in text.lines() {
                        if line.starts_with("voluntary_ctxt_switches")
                            || line.starts_with("nonvoluntary_ctxt_switches")
                        {
                            s.ctx_switches += line
                                .split_whitespace()
                                .nth(1)
                                .and_then(|v| v.parse::<u64>().ok())
                                .unwrap_or(0);
                        }
                    }
                }
            }
        }
    }
    s
}

/// Time on CPU (`schedstat`'s first field) summed over the threads of `pid`
/// whose name starts with `prefix`, or `None` if no thread has that name.
pub fn threads_cpu_ns(pid: u32, prefix: &str) -> Option<u64> {
    let threads = named_threads(pid, prefix);
    (!threads.is_empty()).then(|| threads.iter().map(|t| schedstat_field(t, 0)).sum())
}

/// Time spent runnable but waiting for a CPU (`schedstat`'s second field),
/// summed over the threads of `pid` whose name starts with `prefix`: the
/// delay other threads on their cores impose on them.
pub fn threads_wait_ns(pid: u32, prefix: &str) -> u64 {
    named_threads(pid, prefix)
        .iter()
        .map(|t| schedstat_field(t, 1))
        .sum()
}

/// `/proc/PID/task/TID` of the threads whose name starts with `prefix`.
fn named_threads(pid: u32, prefix: &str) -> Vec<std::path::PathBuf> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .map(|t| t.path())
        .filter(|t| fs::read_to_string(t.join("comm")).is_ok_and(|c| c.starts_with(prefix)))
        .collect()
}

fn schedstat_field(task: &std::path::Path, i: usize) -> u64 {
    fs::read_to_string(task.join("schedstat"))
        .ok()
        .and_then(|text| text.split_whitespace().nth(i)?.parse().ok())
        .unwrap_or(0)
}

/// Resident set size of `pid` and its descendants, bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    process_tree(pid)
        .into_iter()
        .map(|p| {
            fs::read_to_string(format!("/proc/{p}/status"))
                .ok()
                .and_then(|text| {
                    text.lines()
                        .find(|l| l.starts_with("VmRSS:"))
                        .and_then(|l| l.split_whitespace().nth(1))
                        .and_then(|v| v.parse::<u64>().ok())
                })
                .unwrap_or(0)
                * 1024
        })
        .sum()
}

/// Inter-processor interrupts so far, all CPUs: rescheduling (RES) and
/// function-call (CAL) interrupts, the ones io_uring completions and wake-ups
/// cause.
pub fn ipis() -> u64 {
    let Ok(text) = fs::read_to_string("/proc/interrupts") else {
        return 0;
    };
    text.lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let (name, rest) = l.split_once(':')?;
            matches!(name, "RES" | "CAL").then(|| {
                rest.split_whitespace()
                    .map_while(|v| v.parse::<u64>().ok())
                    .sum::<u64>()
            })
        })
        .sum()
}

/// Time the hypervisor ran something else while the CPUs of each set had
/// work (the `steal` column of `/proc/stat`), nanoseconds, summed over the
/// set's CPUs; all CPUs for an empty set. One read of `/proc/stat` for all
/// sets. A guest cannot see what ran instead: a stall that no task of this
/// machine caused shows here.
pub fn steal_ns<const N: usize>(sets: [&[usize]; N]) -> [u64; N] {
    let Ok(text) = fs::read_to_string("/proc/stat") else {
        return [0; N];
    };
    let tick_ns = 1_000_000_000 / ticks_per_sec();
    sets.map(|cpus| steal_ns_in(&text, cpus, tick_ns))
}

fn steal_ns_in(stat: &str, cpus: &[usize], tick_ns: u64) -> u64 {
    stat.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let name = f.next()?;
            let cpu = name.strip_prefix("cpu")?;
            let wanted = if cpus.is_empty() {
                cpu.is_empty()
            } else {
                cpu.parse::<usize>().is_ok_and(|c| cpus.contains(&c))
            };
            // user nice system idle iowait irq softirq steal
            wanted.then(|| f.nth(7)?.parse::<u64>().ok()).flatten()
        })
        .sum::<u64>()
        * tick_ns
}

/// The 1-minute load average.
pub fn loadavg() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Online CPUs (of the machine, whatever this thread's affinity).
pub fn cpu_count() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if n > 0 {
        n as usize
    } else {
        1
    }
}

/// Restricts the calling thread (and processes it spawns later) to `cpus`.
pub fn pin_current_thread(cpus: &[usize]) -> std::io::Result<()> {
    if cpus.is_empty() {
        return Ok(());
    }
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes in it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Raises the open-file limit to the hard limit (children inherit it).
pub fn raise_nofile() -> u64 {
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 1024;
        }
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_has_cpu_time_and_rss() {
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        let me = std::process::id();
        assert!(cpu(me).total() > Duration::ZERO);
        assert!(rss_bytes(me) > 0);
        assert!(process_tree(me).contains(&me));
    }

    #[test]
    fn steal_is_the_eighth_value_of_the_named_cpus() {
        let stat = "cpu  10 0 5 100 1 0 2 7 0 0\n\
                    cpu0 5 0 2 50 1 0 1 3 0 0\n\
                    cpu1 5 0 3 50 0 0 1 4 0 0\n\
                    intr 12345\n";
        assert_eq!(steal_ns_in(stat, &[], 10), 70);
        assert_eq!(steal_ns_in(stat, &[1], 10), 40);
        assert_eq!(steal_ns_in(stat, &[0, 1], 10), 70);
        assert_eq!(steal_ns_in(stat, &[2], 10), 0);
    }
}
