//! Records the commit the binary is built from (`edgeproxy --version`), and
//! the compiler and target. See `build/commit.rs` for where the commit comes
//! from; without git (a source tarball, a Docker build context without
//! `.git`) the build goes on and says `unknown`.

#[path = "build/commit.rs"]
mod commit;

use std::path::Path;
use std::process::Command;

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    println!("cargo:rerun-if-env-changed=EDGEPROXY_BUILD_COMMIT");
    println!("cargo:rerun-if-changed=build/commit.rs");
    let found = commit::find(
        Path::new(&dir),
        std::env::var("EDGEPROXY_BUILD_COMMIT").ok(),
    );
    for path in &found.watch {
        // Cargo reruns the script when a watched file appears, changes or
        // goes away; `packed-refs` may not exist yet, which is fine.
        println!("cargo:rerun-if-changed={}", path.display());
    }
    println!("cargo:rustc-env=EDGEPROXY_COMMIT={}", found.hash);
    println!(
        "cargo:rustc-env=EDGEPROXY_COMMIT_DATE={}",
        found.date.unwrap_or_default()
    );
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let rustc_version = Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| "rustc (unknown version)".into());
    println!("cargo:rustc-env=EDGEPROXY_RUSTC={rustc_version}");
    println!(
        "cargo:rustc-env=EDGEPROXY_TARGET={}",
        std::env::var("TARGET").unwrap_or_default()
    );
    println!(
        "cargo:rustc-env=EDGEPROXY_PROFILE={}",
        std::env::var("PROFILE").unwrap_or_default()
    );
}
