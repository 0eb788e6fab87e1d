//! The metrics every Prometheus client library exports for its process
//! (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
//! `process_virtual_memory_bytes`, `process_open_fds`, `process_max_fds`,
//! `process_start_time_seconds`, `process_threads`), read from
//! `/proc/self` with the `procfs` crate at scrape time (CPU time from the
//! process CPU clock: `/proc`'s tick counts read 0 for a process that has run
//! less than 10 ms), and
//! `edgeproxy_build_info{version,commit} 1` to tell which build runs where.
//!
//! [`render`] appends the text-format families; a value that cannot be read
//! is left out (and logged at debug level), never a failed scrape.

use std::fmt::Write as _;

/// One scrape's worth of process figures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    pub start_time_seconds: Option<f64>,
    pub threads: i64,
}

/// Reads this process's figures.
pub fn read() -> procfs::ProcResult<ProcessStats> {
    let me = procfs::process::Process::myself()?;
    let stat = me.stat()?;
    let ticks = procfs::ticks_per_second() as f64;
    let page = procfs::page_size();
    let open_fds = me.fd_count().ok().map(|n| n as u64);
    let max_fds = me
        .limits()
        .ok()
        .and_then(|l| match l.max_open_files.soft_limit {
            procfs::process::LimitValue::Value(v) => Some(v),
            procfs::process::LimitValue::Unlimited => None,
        });
    let start_time_seconds = procfs::boot_time_secs()
        .ok()
        .map(|boot| boot as f64 + stat.starttime as f64 / ticks);
    Ok(ProcessStats {
        cpu_seconds: cpu_seconds(),
        resident_bytes: stat.rss * page,
        virtual_bytes: stat.vsize,
        open_fds,
        max_fds,
        start_time_seconds,
        threads: stat.num_threads,
    })
}

/// User plus system CPU time of the whole process, in nanoseconds' precision.
fn cpu_seconds() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

fn family(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    let _ = writeln!(out, "{name} {value}");
}

/// Appends the process families (see the module docs) for `stats`.
pub fn render_stats(out: &mut String, stats: &ProcessStats) {
    family(
        out,
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
        stats.cpu_seconds,
    );
    family(
        out,
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
        stats.resident_bytes,
    );
    family(
        out,
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory size in bytes.",
        stats.virtual_bytes,
    );
    if let Some(n) = stats.open_fds {
        family(
            out,
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            n,
        );
    }
    if let Some(n) = stats.max_fds {
        family(
            out,
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            n,
        );
    }
    if let Some(t) = stats.start_time_seconds {
        family(
            out,
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            t,
        );
    }
    family(
        out,
        "process_threads",
        "gauge",
        "Number of OS threads in the process.",
        stats.threads,
    );
}

/// Appends `edgeproxy_build_info` and the process families.
pub fn render(out: &mut String) {
    let _ = writeln!(
        out,
        "# HELP edgeproxy_build_info The running build: version and commit (always 1)."
    );
    let _ = writeln!(out, "# TYPE edgeproxy_build_info gauge");
    let _ = writeln!(
        out,
        "edgeproxy_build_info{{version=\"{}\",commit=\"{}\"}} 1",
        crate::version::VERSION,
        crate::version::COMMIT
    );
    match read() {
        Ok(stats) => render_stats(out, &stats),
        Err(e) => tracing::debug!(error = %e, "cannot read /proc/self for process metrics"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_measured() {
        let before = read().unwrap();
        // Burn a little CPU and hold some memory: the figures follow.
        let mut v = vec![0u8; 8 << 20];
        let t0 = std::time::Instant::now();
        while t0.elapsed() < std::time::Duration::from_millis(50) {
            for (i, b) in v.iter_mut().enumerate().step_by(4096) {
                *b = b.wrapping_add(i as u8);
            }
        }
        let after = read().unwrap();
        assert!(
            after.cpu_seconds > before.cpu_seconds,
            "{before:?} {after:?}"
        );
        assert!(after.resident_bytes >= 8 << 20, "{after:?}");
        assert!(after.virtual_bytes >= after.resident_bytes);
        assert!(after.open_fds.unwrap() >= 3);
        assert!(after.max_fds.unwrap() >= after.open_fds.unwrap());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let started = after.start_time_seconds.unwrap();
        assert!(
            started <= now && started > now - 86_400.0,
            "{started} vs {now}"
        );
        assert!(after.threads >= 1);
        drop(v);
    }

    #[test]
    fn families_render_with_help_and_type() {
        let mut out = String::new();
        render(&mut out);
        for name in [
            "edgeproxy_build_info",
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_max_fds",
            "process_start_time_seconds",
        ] {
            assert!(out.contains(&format!("# TYPE {name} ")), "{name}:\n{out}");
        }
        assert!(out.contains(&format!("commit=\"{}\"", crate::version::COMMIT)));
    }
}
