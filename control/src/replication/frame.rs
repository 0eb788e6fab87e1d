//! How one transport message travels on a connection that negotiated
//! [`super::pki::ALPN_FRAMED`]: a one-byte header, then the encoded
//! envelope as is or compressed with zstd (sans-IO).
//!
//! Why: a catch-up after a partition or a long stop moves whole batches of
//! rows (up to 512 KB per message), and over a long lossy WAN link the
//! bytes are the bottleneck (QA: ~150 KB/s is what QUIC's congestion
//! control makes of 100 ms with 1 % loss). Rows are JSON with the same
//! columns over and over; zstd at a low level costs about a millisecond
//! per batch. Small messages (broadcasts of a few rows, the steps of an
//! exchange) are sent as they are: they would hardly shrink.
//!
//! Connections that negotiated the older [`super::pki::ALPN`] (a POP not
//! yet upgraded, on either side) carry the envelope alone, unframed, as
//! before: a rolling upgrade never splits the cluster.

/// Messages shorter than this are sent uncompressed.
pub const COMPRESS_FROM: usize = 2048;
/// zstd's level: the fastest levels already take repetitive rows to a
/// fraction; higher ones cost CPU on the control thread for little more.
const LEVEL: i32 = 3;

const PLAIN: u8 = 0;
const ZSTD: u8 = 1;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    #[error("empty message")]
    Empty,
    #[error("unknown message framing {0}")]
    UnknownHeader(u8),
    #[error("compressed message does not decompress within {limit} bytes: {reason}")]
    Decompress { limit: usize, reason: String },
}

/// The frame for `message` (an encoded envelope).
pub fn encode(message: &[u8]) -> Vec<u8> {
    if message.len() >= COMPRESS_FROM {
        if let Ok(compressed) = zstd::bulk::compress(message, LEVEL) {
            if compressed.len() < message.len() {
                let mut frame = Vec::with_capacity(1 + compressed.len());
                frame.push(ZSTD);
                frame.extend_from_slice(&compressed);
                return frame;
            }
        }
    }
    let mut frame = Vec::with_capacity(1 + message.len());
    frame.push(PLAIN);
    frame.extend_from_slice(message);
    frame
}

/// The message in `frame`, at most `limit` bytes once decompressed (a
/// small frame from a broken or hostile peer must not make us allocate
/// gigabytes).
pub fn decode(mut frame: Vec<u8>, limit: usize) -> Result<Vec<u8>, FrameError> {
    match frame.first().copied() {
        None => Err(FrameError::Empty),
        Some(PLAIN) => {
            frame.remove(0);
            Ok(frame)
        }
        Some(ZSTD) => {
            zstd::bulk::decompress(&frame[1..], limit).map_err(|e| FrameError::Decompress {
                limit,
                reason: e.to_string(),
            })
        }
        Some(other) => Err(FrameError::UnknownHeader(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize) -> Vec<u8> {
        (0..n)
            .map(|k| {
                format!(
                    r#"{{"id":"b-{k}","app":"web","region":"eu","wg_ip":"10.78.{}.{}","port":80,"weight":1}}"#,
                    k / 250,
                    k % 250
                )
            })
            .collect::<String>()
            .into_bytes()
    }

    #[test]
    fn large_messages_shrink_and_come_back_whole() {
        let message = rows(2000);
        let frame = encode(&message);
        assert_eq!(frame[0], ZSTD);
        assert!(
            frame.len() * 4 < message.len(),
            "{} of {}",
            frame.len(),
            message.len()
        );
        assert_eq!(decode(frame, 1 << 20).unwrap(), message);
    }

    #[test]
    fn small_or_incompressible_messages_go_as_they_are() {
        let small = rows(3);
        assert!(small.len() < COMPRESS_FROM);
        let frame = encode(&small);
        assert_eq!(frame[0], PLAIN);
        assert_eq!(decode(frame, 1 << 20).unwrap(), small);
        // Random bytes do not shrink.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let noise: Vec<u8> = (0..8192)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let frame = encode(&noise);
        assert_eq!(frame[0], PLAIN);
        assert_eq!(decode(frame, 1 << 20).unwrap(), noise);
    }

    #[test]
    fn a_frame_that_decompresses_beyond_the_limit_or_is_garbage_is_an_error() {
        // 16 MB of zeros compress to a few hundred bytes.
        let bomb = encode(&vec![0; 16 << 20]);
        assert!(bomb.len() < 4096);
        assert!(matches!(
            decode(bomb, 1 << 20),
            Err(FrameError::Decompress { .. })
        ));
        assert_eq!(decode(Vec::new(), 10), Err(FrameError::Empty));
        assert_eq!(decode(vec![7, 1, 2], 10), Err(FrameError::UnknownHeader(7)));
        assert!(matches!(
            decode(vec![ZSTD, 1, 2, 3, 4], 10),
            Err(FrameError::Decompress { .. })
        ));
    }
}
