//! The `edgeproxy` binary; everything lives in the `control` crate.

fn main() -> std::process::ExitCode {
    control::cli::main()
}
