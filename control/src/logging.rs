//! Log setup: `tracing` to stderr, as text or JSON (`[log] format`).
//! `RUST_LOG` wins over the configured level (and over `DEBUG=1`, which the
//! config maps to "debug").
//!
//! Fields are logged with `Display` (`backend=127.0.0.1:19101`), never as
//! `Debug` renderings of options or structs (`Some(...)`): what is written is
//! what an operator or a log shipper should match on.

use std::io::IsTerminal;

use crate::log_config::{Log, LogFormat};

pub fn init(log: &Log) {
    // A RUST_LOG that does not parse falls back to the configured level,
    // and says so once logging runs (QA: the fallback was silent).
    let (mut filter, bad_rust_log) = match tracing_subscriber::EnvFilter::try_from_default_env() {
        Ok(filter) => (filter, None),
        Err(e) => (
            tracing_subscriber::EnvFilter::new(&log.level),
            std::env::var("RUST_LOG").ok().map(|value| (value, e)),
        ),
    };
    // A bare word that is not a level (`RUST_LOG=verbose`) parses: tracing
    // reads it as a target, and everything else then logs errors only (QA:
    // the proxy fell silent). Such words keep that meaning, but everything
    // else logs at log.level, and the word is said not to be a level.
    let not_levels = std::env::var("RUST_LOG")
        .ok()
        .filter(|_| bad_rust_log.is_none())
        .map(|value| words_not_levels(&value))
        .filter(|(words, _)| !words.is_empty());
    if let (Some((_, false)), Ok(value)) = (&not_levels, std::env::var("RUST_LOG")) {
        filter = tracing_subscriber::EnvFilter::new(format!("{},{value}", log.level));
    }
    // hickory-proto warns about each malformed DNS packet it decodes; the DNS
    // server answers those with FORMERR, so the warnings are noise that a
    // flood of junk packets would turn into a flood of logs. Unless RUST_LOG
    // asks for them.
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("hickory")) {
        filter = filter.add_directive("hickory_proto=error".parse().expect("valid directive"));
    }
    // Access-log lines are written at info whatever the level (they exist
    // only when `[log] access` is on, which SIGHUP may switch), unless
    // RUST_LOG says something about them.
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains(crate::log_config::ACCESS_TARGET)) {
        let directive = format!("{}=info", crate::log_config::ACCESS_TARGET);
        filter = filter.add_directive(directive.parse().expect("valid directive"));
    }
    // rustls warns about what a client sent that it tolerates, once per
    // connection: an IP address as SNI (wrk does it, as does `openssl
    // s_client -servername 127.0.0.1`) was a WARN per handshake (QA: 25,634
    // lines in 30 s of wrk), a log any client could flood. The proxy logs each
    // handshake failure itself (debug) and counts them.
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("rustls")) {
        filter = filter.add_directive("rustls=error".parse().expect("valid directive"));
    }
    // The embedded WireGuard logs every peer change and UAPI connection at
    // info; the mesh logs what matters itself (`mesh: peer added ...`).
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("gotatun")) {
        filter = filter.add_directive("gotatun=warn".parse().expect("valid directive"));
    }
    // defguard_wireguard_rs logs at ERROR what `auto` expects (no kernel
    // module), and the mesh reports every failure of its calls with the
    // cause anyway.
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("defguard")) {
        filter = filter.add_directive(
            "defguard_wireguard_rs=off"
                .parse()
                .expect("valid directive"),
        );
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match log.format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        // One object per line; fields beside `message` at the top level
        // (not nested under "fields"), which is what shippers index.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
    if let Some((words, has_default)) = not_levels {
        let words = words.join(", ");
        if has_default {
            tracing::warn!(rust_log = %words,
                "RUST_LOG: {words} is not a level (off, error, warn, info, debug, trace): read as a target, logged at trace");
        } else {
            tracing::warn!(rust_log = %words, level = %log.level,
                "RUST_LOG: {words} is not a level (off, error, warn, info, debug, trace): read as a target, logged at trace; everything else at log.level");
        }
    }
    if let Some((value, e)) = bad_rust_log {
        tracing::warn!(rust_log = %value, error = %e, level = %log.level,
            "RUST_LOG is not a valid filter; logging at log.level instead");
    }
}

/// The crates of edgeproxy itself: a bare `RUST_LOG=control` names a target
/// on purpose.
const OWN_TARGETS: [&str; 4] = ["edgeproxy", "control", "engine", "dns"];

/// The directives of `rust_log` that are a bare word, neither a level nor
/// one of edgeproxy's own crates (tracing reads them as targets, at trace),
/// and whether `rust_log` sets a default level of its own.
fn words_not_levels(rust_log: &str) -> (Vec<String>, bool) {
    let mut words = Vec::new();
    let mut has_default = false;
    for directive in rust_log.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if directive.contains(['=', '[', '{']) {
            continue;
        }
        if directive
            .parse::<tracing_subscriber::filter::LevelFilter>()
            .is_ok()
        {
            has_default = true;
        } else if !directive.contains("::") && !OWN_TARGETS.contains(&directive) {
            words.push(format!("{directive:?}"));
        }
    }
    (words, has_default)
}

#[cfg(test)]
mod tests {
    use super::words_not_levels;

    #[test]
    fn bare_words_that_are_not_levels_are_found() {
        assert_eq!(
            words_not_levels("verbose"),
            (vec!["\"verbose\"".to_string()], false)
        );
        assert_eq!(
            words_not_levels("info,verbose"),
            (vec!["\"verbose\"".to_string()], true)
        );
        assert_eq!(words_not_levels("INFO"), (vec![], true));
        assert_eq!(words_not_levels("control,engine::rt"), (vec![], false));
        assert_eq!(
            words_not_levels("warn,control=debug,[span]=info"),
            (vec![], true)
        );
    }
}
