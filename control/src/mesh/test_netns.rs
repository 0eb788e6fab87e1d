//! For tests that need a network namespace of their own (TUN devices,
//! routes, ports): root only, as the mesh's integration tests.

/// One such test at a time: the upgrade registry (a TUN device handed
/// over) is the process's.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `f` on a thread of its own in a new network namespace with its
/// loopback up, on a current-thread Tokio runtime. Needs root (CI runs as
/// root).
pub fn in_own_network_namespace<F>(f: impl FnOnce() -> F + Send + 'static)
where
    F: std::future::Future<Output = ()>,
{
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test works in a network namespace of its own and needs root (CI runs as root)"
    );
    std::thread::spawn(move || {
        // SAFETY: unshare affects only this thread, which nothing else uses;
        // the threads and processes it starts share its namespace.
        let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "unshare: {}", std::io::Error::last_os_error());
        ip(&["link", "set", "lo", "up"]);
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f());
    })
    .join()
    .expect("the test thread");
}

/// Runs `ip` with `args` in the calling thread's namespace; fails the test
/// if it fails.
pub fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Feeds `commands` to `ip -batch -`.
pub fn ip_batch(commands: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("ip")
        .args(["-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("ip (iproute2)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(commands.as_bytes())
        .expect("write to ip");
    assert!(child.wait().expect("ip").success(), "ip -batch failed");
}
