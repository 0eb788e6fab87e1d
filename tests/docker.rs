//! `config/Dockerfile`: checked as text always, built and run when a
//! container engine answers (never required: CI machines without one, like
//! this project's, run the static checks only and say so).
//!
//! Static: a multi-stage build whose runtime stage is not the toolchain,
//! every file it copies exists, its build context keeps what the build needs
//! (Cargo.lock, the embedded GeoIP database) and leaves out `target/`, the
//! runtime stage copies the binary the `dist` profile built, and the
//! shipped config with the image's environment passes `check-config`.
//! With an engine: the image builds, `/ready` answers 200 on the published
//! metrics port, the demo backend answers through the proxy, and `docker
//! stop` drains and exits 0.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn dockerfile() -> String {
    std::fs::read_to_string(Path::new(ROOT).join("config/Dockerfile")).unwrap()
}

/// Instructions (first word, rest), continuation lines joined.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        current.push_str(line.trim_end_matches('\\'));
        current.push(' ');
        if !line.ends_with('\\') {
            let (word, rest) = current
                .trim()
                .split_once(' ')
                .unwrap_or((current.trim(), ""));
            out.push((word.to_ascii_uppercase(), rest.trim().to_string()));
            current.clear();
        }
    }
    out
}

/// `KEY=value` pairs of every ENV instruction.
fn env_of(ins: &[(String, String)]) -> Vec<(String, String)> {
    ins.iter()
        .filter(|(w, _)| w == "ENV")
        .flat_map(|(_, rest)| {
            rest.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn the_dockerfile_is_multi_stage_and_copies_what_exists() {
    let ins = instructions(&dockerfile());
    let froms: Vec<&String> = ins
        .iter()
        .filter(|(w, _)| w == "FROM")
        .map(|(_, r)| r)
        .collect();
    assert_eq!(froms.len(), 2, "{froms:?}");
    assert!(
        froms[0].starts_with("rust:") && froms[0].ends_with(" AS build"),
        "{froms:?}"
    );
    assert!(
        !froms[1].contains("rust"),
        "the runtime carries the toolchain: {froms:?}"
    );
    let runtime_start = ins.iter().rposition(|(w, _)| w == "FROM").unwrap();
    let runtime = &ins[runtime_start..];
    // Files copied from the context exist; the config lands where CMD reads it.
    let mut config_dest = None;
    for (_, rest) in ins.iter().filter(|(w, _)| w == "COPY") {
        if rest.starts_with("--from") {
            continue;
        }
        let parts: Vec<&str> = rest.split_whitespace().collect();
        for src in &parts[..parts.len() - 1] {
            assert!(Path::new(ROOT).join(src).exists(), "COPY {src}: missing");
        }
        if parts[0] == "config/edgeproxy.toml" {
            config_dest = Some(parts[parts.len() - 1].to_string());
        }
    }
    let config_dest = config_dest.expect("the shipped config is copied");
    let cmd = runtime
        .iter()
        .find(|(w, _)| w == "CMD")
        .expect("CMD")
        .1
        .clone();
    assert!(cmd.contains(&format!("\"{config_dest}\"")), "{cmd}");
    // Not root at run time.
    let user = runtime
        .iter()
        .find(|(w, _)| w == "USER")
        .expect("USER")
        .1
        .clone();
    assert!(user != "root" && user != "0", "{user}");
    // Published ports are the ones the environment makes it listen on.
    let env = env_of(runtime);
    let exposed: Vec<String> = runtime
        .iter()
        .filter(|(w, _)| w == "EXPOSE")
        .flat_map(|(_, r)| r.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .collect();
    for var in ["EDGEPROXY_LISTEN_ADDR", "EDGEPROXY_METRICS_LISTEN_ADDR"] {
        let addr = &env
            .iter()
            .find(|(k, _)| k == var)
            .unwrap_or_else(|| panic!("{var}"))
            .1;
        assert!(
            addr.starts_with("0.0.0.0:"),
            "{var}={addr}: unreachable from outside"
        );
        let port = addr.rsplit(':').next().unwrap();
        assert!(
            exposed.iter().any(|p| p == port),
            "{var} port {port} not in EXPOSE {exposed:?}"
        );
    }
}

/// The image ships the binary its build stage built, with the `dist`
/// profile (whole-program LTO, README "Build profiles"), which Cargo.toml
/// defines: a profile renamed on one side only would copy a stale or
/// missing file, or fail the build with "profile `dist` is not defined".
#[test]
fn the_image_ships_the_binary_built_with_the_dist_profile() {
    let ins = instructions(&dockerfile());
    let build = ins
        .iter()
        .find(|(w, r)| w == "RUN" && r.contains("cargo build"))
        .expect("a RUN cargo build")
        .1
        .clone();
    let words: Vec<&str> = build.split_whitespace().collect();
    let profile = words
        .windows(2)
        .find(|w| w[0] == "--profile")
        .map(|w| w[1])
        .unwrap_or_else(|| panic!("the build names no --profile: {build}"));
    assert_eq!(profile, "dist", "{build}");
    let manifest = std::fs::read_to_string(Path::new(ROOT).join("Cargo.toml")).unwrap();
    let section = manifest
        .split("[profile.dist]")
        .nth(1)
        .unwrap_or_else(|| panic!("Cargo.toml defines no [profile.dist]"));
    let section = section.split("\n[").next().unwrap();
    for setting in [
        "inherits = \"release\"",
        "lto = \"fat\"",
        "codegen-units = 1",
    ] {
        assert!(section.contains(setting), "[profile.dist] lacks {setting}");
    }
    let built = format!("target/{profile}/edgeproxy");
    assert!(
        build.contains(&format!("strip --strip-debug {built}")),
        "{build}"
    );
    let copied = ins
        .iter()
        .find(|(w, r)| w == "COPY" && r.starts_with("--from=build"))
        .expect("the runtime stage copies from the build stage")
        .1
        .clone();
    assert!(
        copied.contains(&format!("/src/{built} ")),
        "copies {copied}, built {built}"
    );
}

#[test]
fn the_build_context_keeps_the_sources_and_leaves_out_target() {
    let ignore = std::fs::read_to_string(Path::new(ROOT).join("config/Dockerfile.dockerignore"))
        .expect("config/Dockerfile.dockerignore");
    let patterns: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert!(patterns.contains(&"**/target"), "{patterns:?}");
    assert!(patterns.contains(&".git"), "{patterns:?}");
    for needed in [
        "Cargo.lock",
        "Cargo.toml",
        "engine",
        "control",
        "engine/geoip/dbip-country.mmdb",
    ] {
        assert!(
            !patterns
                .iter()
                .any(|p| needed.starts_with(p.trim_end_matches('*'))),
            "{needed} is left out of the build context by {patterns:?}"
        );
        assert!(Path::new(ROOT).join(needed).exists());
    }
}

/// The shipped config, with the environment the image sets, is valid (the
/// image's own start would fail otherwise).
#[test]
fn the_shipped_config_checks_with_the_images_environment() {
    let env = env_of(&instructions(&dockerfile()));
    let dir = TempDir::new("docker-env");
    let db = dir.join("routing.db");
    let mut vars: Vec<(&str, &str)> = env
        .iter()
        .filter(|(k, _)| {
            k.starts_with("EDGEPROXY_") && k != "EDGEPROXY_DB_PATH" && k != "EDGEPROXY_BUILD_COMMIT"
        })
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    vars.push(("EDGEPROXY_DB_PATH", db.to_str().unwrap()));
    let config = format!("{ROOT}/config/edgeproxy.toml");
    let (status, stdout, stderr) =
        run_to_end(&["check-config", "--no-bind", "--config", &config], &vars);
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("addr = \"0.0.0.0:8080\""), "{stdout}");
    assert!(
        stdout.contains("listen_addr = \"0.0.0.0:9090\""),
        "{stdout}"
    );
}

/// The container engine's CLI, if one answers.
fn engine() -> Option<&'static str> {
    for cli in ["docker", "podman"] {
        let answered = Command::new(cli)
            .args(["info", "--format", "{{.ServerVersion}}"])
            .output()
            .is_ok_and(|o| o.status.success());
        if answered {
            return Some(cli);
        }
    }
    None
}

fn run(cli: &str, args: &[&str]) -> Output {
    let out = Command::new(cli)
        .args(args)
        .current_dir(ROOT)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{cli} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Removes the container and image however the test ends.
struct Cleanup<'a> {
    cli: &'a str,
    container: String,
    image: String,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let _ = Command::new(self.cli)
            .args(["rm", "-f", &self.container])
            .output();
        let _ = Command::new(self.cli)
            .args(["rmi", "-f", &self.image])
            .output();
    }
}

#[test]
fn the_image_builds_and_serves_when_a_container_engine_answers() {
    let Some(cli) = engine() else {
        eprintln!("no container engine answers (docker/podman info): image not built");
        return;
    };
    let tag = format!("edgeproxy-test:{}", std::process::id());
    let name = format!("edgeproxy-test-{}", std::process::id());
    let _cleanup = Cleanup {
        cli,
        container: name.clone(),
        image: tag.clone(),
    };
    run(cli, &["build", "-f", "config/Dockerfile", "-t", &tag, "."]);
    run(
        cli,
        &[
            "run",
            "-d",
            "--name",
            &name,
            "--security-opt",
            "seccomp=unconfined",
            "-p",
            "127.0.0.1::8080",
            "-p",
            "127.0.0.1::9090",
            &tag,
        ],
    );
    let port = |inner: &str| -> String {
        let out = run(cli, &["port", &name, inner]);
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .next()
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .trim()
            .to_string()
    };
    let (proxy, metrics) = (port("8080/tcp"), port("9090/tcp"));
    let get = |port: &str, path: &str| -> Option<(u16, String)> {
        let mut resp = ureq::get(format!("http://127.0.0.1:{port}{path}"))
            .config()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .call()
            .ok()?;
        Some((
            resp.status().as_u16(),
            resp.body_mut().read_to_string().ok()?,
        ))
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while get(&metrics, "/ready").map(|r| r.0) != Some(200) {
        assert!(
            Instant::now() < deadline,
            "never ready: {}",
            String::from_utf8_lossy(&run(cli, &["logs", &name]).stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, body) = get(&proxy, "/").expect("the proxy answers");
    assert_eq!(status, 200);
    assert!(body.starts_with("hello from demo-"), "{body}");
    run(cli, &["stop", "--time", "35", &name]);
    let code = run(cli, &["inspect", "--format", "{{.State.ExitCode}}", &name]);
    assert_eq!(String::from_utf8_lossy(&code.stdout).trim(), "0");
}
