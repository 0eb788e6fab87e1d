//! Writing a command's answer to stdout when the reader may go away.
//!
//! Rust ignores SIGPIPE, so `println!` panics when stdout is a pipe whose
//! reader has exited (`edgeproxy backends --json list | head`). A command
//! line tool should stop quietly then, as `cat` or `git log` do (they die of
//! SIGPIPE; we exit 0: everything the reader wanted, it got). Never used by
//! the proxy itself, which writes only logs, to stderr.

use std::io::{self, Write};

/// Writes `text` to stdout and flushes it. A reader that has gone away
/// (`EPIPE`) is not an error: the rest of the output is dropped.
pub fn print(text: &str) -> io::Result<()> {
    write_quietly(&mut io::stdout().lock(), text)
}

/// [`print`] on any writer, for tests.
pub fn write_quietly(out: &mut impl Write, text: &str) -> io::Result<()> {
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Gone;
    impl Write for Gone {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_reader_that_went_away_is_not_an_error_but_a_full_disk_is() {
        assert!(write_quietly(&mut Gone, "x\n").is_ok());
        let mut full = io::Cursor::new([0u8; 2]);
        let err = write_quietly(&mut full, "abc").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WriteZero);
    }
}
