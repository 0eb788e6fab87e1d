//! (u) Where each proxy's CPU goes: the kernel, the proxy's own code, and
//! the libraries it calls (libc's system-call wrappers and `memcpy`,
//! OpenSSL), per new connection and per keep-alive request.
//!
//! Why a scenario of its own: on these machines ~85–90 % of every proxy's
//! CPU per connection is the kernel's TCP, and the kernel's share moves by
//! several per cent from one run to the next with batching and the host, so
//! the suite's totals cannot tell apart proxies whose own code differs by a
//! microsecond (README, "Where edgeproxy's extra CPU per new connection
//! goes"). A profile can: `perf record -e cpu-clock` samples the proxy
//! through each measured window, and the share of its samples in each
//! object, times the run's CPU per connection, is what that object cost.
//! A proxy's own code is the executable `/proc/PID/exe` names (edgeproxy,
//! `minimal-proxy`, haproxy, nginx). Sampling at 4,999 Hz costs every
//! target the same small interrupt load, so this scenario's CPU totals sit
//! a little above (a)'s and (c)'s and are not the goals' figures.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::loadgen::Pace;
use crate::procfs;
use crate::report::{col, Sample, Variant};
use crate::scenarios::{rr_sample_around, spec};
use crate::targets::Running;
use crate::Options;

/// Samples per second and CPU: high enough for ~50,000 samples in a 10 s
/// window, below the kernel's default cap (`perf_event_max_sample_rate`).
const FREQUENCY: &str = "4999";

/// What share of a process's samples fell in each kind of object.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shares {
    pub kernel: f64,
    pub own: f64,
    pub libraries: f64,
}

/// The shares in `report`, the text of `perf report --sort dso --stdio`
/// (lines `  84.68%  [kernel.kallsyms]`), where `own` is the executable's
/// file name. `None` when no line parses (an empty profile).
pub fn shares(report: &str, own: &str) -> Option<Shares> {
    let mut s = Shares {
        kernel: 0.0,
        own: 0.0,
        libraries: 0.0,
    };
    let mut any = false;
    for line in report.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let Some((percent, dso)) = line.split_once('%') else {
            continue;
        };
        let Ok(percent) = percent.trim().parse::<f64>() else {
            continue;
        };
        let share = percent / 100.0;
        let dso = dso.trim();
        any = true;
        if dso.starts_with("[kernel") {
            s.kernel += share;
        } else if dso == own {
            s.own += share;
        } else {
            s.libraries += share;
        }
    }
    any.then_some(s)
}

/// Whether `perf record` can sample a process here (the binary is there and
/// the kernel lets this user profile).
fn perf_record_works(dir: &Path) -> bool {
    let out = dir.join(format!("perf-probe-{}.data", std::process::id()));
    let ok = Command::new("perf")
        .args(["record", "-q", "-e", "cpu-clock", "-o"])
        .arg(&out)
        .args(["--", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let _ = std::fs::remove_file(&out);
    ok
}

/// How long `perf` may take to come up or to answer a command.
const PERF_PATIENCE: Duration = Duration::from_secs(10);

/// A `perf record` process and the files it works with (its output, its
/// log, its control FIFOs): on drop the process is stopped, if it still
/// runs, and the files removed, whichever stage it got to.
struct PerfProcess {
    child: Child,
    files: Vec<PathBuf>,
}

impl Drop for PerfProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for file in &self.files {
            let _ = std::fs::remove_file(file);
        }
    }
}

/// A `perf record` attached to a process tree with sampling off, turned on
/// and off through its control FIFO (`--control`), which acknowledges each
/// command: the samples are exactly the measured window's, whatever perf's
/// own start-up time.
struct Recording {
    perf: PerfProcess,
    ctl: File,
    ack: File,
    out: PathBuf,
    /// perf's standard error, quoted in errors.
    log: PathBuf,
}

/// The last lines perf wrote to `log`, for an error message.
fn perf_said(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    match lines.len() {
        0 => "perf said nothing".into(),
        n => format!("perf said: {}", lines[n.saturating_sub(5)..].join(" | ")),
    }
}

impl Recording {
    fn attach(tree: &[u32], out: PathBuf) -> anyhow::Result<Recording> {
        let fifos = [out.with_extension("ctl"), out.with_extension("ack")];
        for fifo in &fifos {
            let _ = std::fs::remove_file(fifo);
            let path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes())?;
            // SAFETY: mkfifo(3) on a NUL-terminated path we own.
            if unsafe { libc::mkfifo(path.as_ptr(), 0o600) } != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("mkfifo {}", fifo.display()));
            }
        }
        let pids: Vec<String> = tree.iter().map(u32::to_string).collect();
        let log = out.with_extension("log");
        let child = Command::new("perf")
            .args([
                "record",
                "-q",
                "-F",
                FREQUENCY,
                "-e",
                "cpu-clock",
                "-D",
                "-1",
            ])
            .arg(format!(
                "--control=fifo:{},{}",
                fifos[0].display(),
                fifos[1].display()
            ))
            .arg("-o")
            .arg(&out)
            .args(["-p", &pids.join(",")])
            .stdout(Stdio::null())
            .stderr(File::create(&log)?)
            .spawn()
            .context("perf record")?;
        let [ctl_fifo, ack_fifo] = fifos;
        let mut perf = PerfProcess {
            child,
            files: vec![out.clone(), log.clone(), ctl_fifo.clone(), ack_fifo.clone()],
        };
        // The control FIFO opens for writing once perf holds it: that is
        // perf being up (ENXIO until then).
        let deadline = Instant::now() + PERF_PATIENCE;
        let ctl = loop {
            match OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&ctl_fifo)
            {
                Ok(f) => break f,
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                    if let Some(status) = perf.child.try_wait()? {
                        anyhow::bail!(
                            "perf record exited before attaching: {status}; {}",
                            perf_said(&log)
                        );
                    }
                    if Instant::now() >= deadline {
                        anyhow::bail!(
                            "perf record did not attach within {PERF_PATIENCE:?}; {}",
                            perf_said(&log)
                        );
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e).context("perf's control FIFO"),
            }
        };
        let ack = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&ack_fifo)
            .context("perf's acknowledgement FIFO")?;
        Ok(Recording {
            perf,
            ctl,
            ack,
            out,
            log,
        })
    }

    /// Sends `command` (`enable`, `disable`) and waits for perf's `ack`.
    fn command(&mut self, command: &str) -> anyhow::Result<()> {
        self.command_acked(command)
            .with_context(|| perf_said(&self.log))
    }

    fn command_acked(&mut self, command: &str) -> anyhow::Result<()> {
        self.ctl.write_all(format!("{command}\n").as_bytes())?;
        let mut got = Vec::new();
        let deadline = Instant::now() + PERF_PATIENCE;
        // perf 6.1 writes "ack\n" and a NUL.
        while !got.contains(&b'\n') {
            let left = deadline.saturating_duration_since(Instant::now());
            anyhow::ensure!(!left.is_zero(), "perf did not acknowledge {command:?}");
            let mut fd = libc::pollfd {
                fd: self.ack.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll(2) on one pollfd we own.
            unsafe { libc::poll(&mut fd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
            let mut buf = [0u8; 16];
            match self.ack.read(&mut buf) {
                Ok(0) => anyhow::bail!("perf closed its acknowledgement FIFO"),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
        }
        let answer: Vec<u8> = got.iter().copied().skip_while(|&b| b == 0).collect();
        anyhow::ensure!(
            answer.starts_with(b"ack\n"),
            "perf answered {command:?} with {:?}",
            String::from_utf8_lossy(&got)
        );
        Ok(())
    }

    /// Ends the recording (SIGINT: perf writes its file and exits) and
    /// returns the shares of its samples, `own` being the executable.
    fn finish(mut self, own: &str) -> anyhow::Result<Shares> {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.perf.child.id() as i32, libc::SIGINT) };
        self.perf.child.wait()?;
        let report = Command::new("perf")
            .args(["report", "--no-children", "--sort", "dso", "--stdio", "-i"])
            .arg(&self.out)
            .stderr(Stdio::null())
            .output()?;
        let text = String::from_utf8_lossy(&report.stdout);
        shares(&text, own).ok_or_else(|| anyhow::anyhow!("perf recorded no sample"))
    }
}

/// One load of (u): its table's id, title and keys, and how it loads.
struct Load {
    id: &'static str,
    what: &'static str,
    rate_key: &'static str,
    cpu_key: &'static str,
    keepalive: bool,
}

const LOADS: [Load; 2] = [
    Load {
        id: "u_connections",
        what: "new connection per request (as (c))",
        rate_key: "cps",
        cpu_key: "cpu_us_per_conn",
        keepalive: false,
    },
    Load {
        id: "u_keepalive",
        what: "keep-alive requests (as (a))",
        rate_key: "rps",
        cpu_key: "cpu_us_per_req",
        keepalive: true,
    },
];

/// (u): both loads, every proxy target, `runs` interleaved runs each.
pub fn scenarios(opts: &Options, targets: &mut [Running], work_dir: &Path) -> Vec<Variant> {
    let usable = perf_record_works(work_dir);
    LOADS
        .iter()
        .map(|load| split(opts, targets, work_dir, load, usable))
        .collect()
}

fn split(
    opts: &Options,
    targets: &mut [Running],
    work_dir: &Path,
    load: &Load,
    perf_usable: bool,
) -> Variant {
    let conns = match load.keepalive {
        true => opts.connections,
        false => opts.connect_concurrency,
    };
    let mut v = Variant::new(
        load.id,
        format!(
            "(u) where the proxy's CPU goes, {}: {conns} connections, `perf record` at {FREQUENCY} Hz, {} runs × {:?} (totals include the sampling: not the goals' figures)",
            load.what, opts.runs, opts.duration
        ),
        &[
            col(load.rate_key, "rate/s", false),
            col(load.cpu_key, "CPU µs", true),
            col("kernel_us", "kernel µs", true),
            col("own_us", "own code µs", true),
            col("libraries_us", "libraries µs", true),
        ],
    );
    if !perf_usable {
        v.notes.push(
            "`perf record` is not usable here (missing, or not allowed): not measured".into(),
        );
        return v;
    }
    for run in 0..opts.runs {
        for t in targets.iter_mut().filter(|t| t.kind.is_proxy()) {
            match profiled_run(opts, t, run, work_dir, load, conns) {
                Ok(sample) => v.samples.push(sample),
                Err(e) => v
                    .notes
                    .push(format!("{} run {}: failed: {e:#}", t.kind.name(), run + 1)),
            }
        }
    }
    v.finish();
    v
}

fn profiled_run(
    opts: &Options,
    t: &Running,
    run: usize,
    work_dir: &Path,
    load: &Load,
    conns: usize,
) -> anyhow::Result<Sample> {
    let pid = t.pid().ok_or_else(|| anyhow::anyhow!("no process"))?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))?;
    let own = exe
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tree = procfs::process_tree(pid);
    let out = work_dir.join(format!("perf-u-{}-{pid}-{run}.data", load.id));
    let recording = std::cell::RefCell::new(Recording::attach(&tree, out)?);
    let failed = std::cell::RefCell::new(None::<anyhow::Error>);
    let command = |what: &str| {
        if let Err(e) = recording.borrow_mut().command(what) {
            failed.borrow_mut().get_or_insert(e);
        }
    };
    let s = spec(opts, t.fronts.http, Pace::Closed, load.keepalive, conns);
    let mut sample = rr_sample_around(
        opts,
        t,
        run,
        s,
        (load.rate_key, load.cpu_key),
        || command("enable"),
        || command("disable"),
    )?;
    if let Some(e) = failed.into_inner() {
        return Err(e);
    }
    let shares = recording.into_inner().finish(&own)?;
    // Without root, perf_event_paranoid 2 lets perf sample user space only:
    // a split without the kernel would be wrong, not partial.
    anyhow::ensure!(
        shares.kernel > 0.0,
        "no sample in the kernel: profiling it is not allowed here (kernel.perf_event_paranoid > 1 without root)"
    );
    let cpu = *sample
        .metrics
        .get(load.cpu_key)
        .ok_or_else(|| anyhow::anyhow!("no CPU figure"))?;
    sample.metrics.insert("kernel_us", shares.kernel * cpu);
    sample.metrics.insert("own_us", shares.own * cpu);
    sample
        .metrics
        .insert("libraries_us", shares.libraries * cpu);
    // Only what this table shows: the run's latency is the profiler's too.
    sample.metrics.retain(|k, _| {
        [
            load.rate_key,
            load.cpu_key,
            "kernel_us",
            "own_us",
            "libraries_us",
        ]
        .contains(k)
    });
    sample.latency = None;
    Ok(sample)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `perf report --sort dso --stdio` as perf 6.1 prints it.
    const REPORT: &str = "\
# To display the perf.data header info, please use --header/--header-only options.
#
#
# Total Lost Samples: 0
#
# Samples: 59K of event 'cpu-clock:pppH'
# Event count (approx.): 11997600000
#
# Overhead  Shared Object
# ........  .................
#
    84.68%  [kernel.kallsyms]
     8.60%  edgeproxy
     6.62%  libc.so.6
     0.10%  [vdso]
";

    #[test]
    fn samples_split_into_kernel_own_code_and_libraries() {
        let s = shares(REPORT, "edgeproxy").unwrap();
        assert!((s.kernel - 0.8468).abs() < 1e-9, "{s:?}");
        assert!((s.own - 0.0860).abs() < 1e-9, "{s:?}");
        assert!((s.libraries - 0.0672).abs() < 1e-9, "{s:?}");
    }

    #[test]
    fn another_executable_is_a_library_and_an_empty_report_is_none() {
        let s = shares(REPORT, "haproxy").unwrap();
        assert_eq!(s.own, 0.0);
        assert!((s.libraries - 0.1532).abs() < 1e-9, "{s:?}");
        assert_eq!(shares("# nothing\n", "edgeproxy"), None);
    }
}
