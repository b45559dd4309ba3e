//! The API between the sandboxer and the guest agent, defined once for both
//! sides: the messages (`proto/agent.proto`) and their framing on the
//! channel (a virtio-serial port).
//!
//! A frame on the wire is COBS-encoded (so it holds no zero byte) and ends
//! with a zero byte; what it encodes is a big-endian `u32` length, then one
//! encoded [`Frame`]. The delimiter is what lets a daemon restarted after a
//! crash resume a channel its predecessor may have left in the middle of a
//! frame in either direction: it sends a zero byte first, which ends
//! whatever was cut short (the other side drops that as malformed), and
//! every frame after it is read whole. Empty frames are padding and are
//! skipped. A run of bytes over [`MAX_ENCODED`] without a delimiter is
//! refused before more is buffered, and skipped up to the next delimiter.

use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[allow(clippy::all)]
mod pb {
    include!(concat!(env!("OUT_DIR"), "/kuasar.agent.v1.rs"));
}
pub use pb::*;

/// The API version this build speaks. A host and an agent of different
/// versions refuse each other at `Hello`.
pub const VERSION: u32 = 2;

/// The largest frame either side accepts (stdio is sent in chunks far
/// below this; a spec or a stats reply fits easily).
pub const MAX_FRAME: usize = 4 << 20;

/// The longest run of bytes a frame may take on the wire: the length
/// prefix and the frame, COBS-encoded (one byte in 254 added, and the
/// first).
pub const MAX_ENCODED: usize = 4 + MAX_FRAME + (4 + MAX_FRAME) / 254 + 1;

/// The frame delimiter; sent alone, it ends whatever frame a predecessor
/// left unfinished on the channel.
pub const DELIMITER: u8 = 0;

/// The size of stdio chunks: small enough that one busy stream cannot hold
/// the channel for long.
pub const IO_CHUNK: usize = 32 << 10;

/// How much a reader asks of its channel at once.
const READ_CHUNK: usize = 64 << 10;

/// gRPC codes the agent answers with (google.rpc.Code).
pub mod code {
    pub const UNKNOWN: u32 = 2;
    pub const INVALID_ARGUMENT: u32 = 3;
    pub const DEADLINE_EXCEEDED: u32 = 4;
    pub const NOT_FOUND: u32 = 5;
    pub const ALREADY_EXISTS: u32 = 6;
    pub const FAILED_PRECONDITION: u32 = 9;
    pub const UNIMPLEMENTED: u32 = 12;
    pub const INTERNAL: u32 = 13;
    pub const UNAVAILABLE: u32 = 14;
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("channel closed")]
    Closed,
    /// More than [`MAX_ENCODED`] bytes without a delimiter: skipped up to
    /// the next one. The stream stays in step.
    #[error("frame of over {0} bytes is over the limit of {MAX_ENCODED}")]
    TooLarge(usize),
    /// The bytes between two delimiters are not a frame (cut short by a
    /// crashed peer, or garbage). The stream stays in step.
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
    #[error("malformed frame: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("channel: {0}")]
    Io(#[from] std::io::Error),
}

impl FrameError {
    /// Whether reading can go on after this error (the next frame is
    /// whole).
    pub fn in_step(&self) -> bool {
        matches!(
            self,
            FrameError::TooLarge(_) | FrameError::Malformed(_) | FrameError::Decode(_)
        )
    }
}

/// COBS: every zero byte becomes the distance to the next one.
fn cobs_encode(data: &[u8], out: &mut Vec<u8>) {
    let mut code_at = out.len();
    out.push(0);
    let mut code = 1u8;
    for &b in data {
        if b != 0 {
            out.push(b);
            code += 1;
        }
        if b == 0 || code == 0xff {
            out[code_at] = code;
            code_at = out.len();
            out.push(0);
            code = 1;
        }
    }
    out[code_at] = code;
}

fn cobs_decode(enc: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(enc.len());
    let mut i = 0;
    while i < enc.len() {
        let code = enc[i] as usize;
        if code == 0 {
            return None;
        }
        let end = i + code;
        if end > enc.len() {
            return None;
        }
        out.extend_from_slice(&enc[i + 1..end]);
        i = end;
        if code < 0xff && i < enc.len() {
            out.push(0);
        }
    }
    Some(out)
}

/// Decodes the bytes between two delimiters; `None` for padding.
pub fn decode_frame(encoded: &[u8]) -> Result<Option<Frame>, FrameError> {
    if encoded.is_empty() {
        return Ok(None);
    }
    if encoded.len() > MAX_ENCODED {
        return Err(FrameError::TooLarge(encoded.len()));
    }
    let body = cobs_decode(encoded).ok_or(FrameError::Malformed("not COBS"))?;
    let Some((prefix, frame)) = body.split_first_chunk::<4>() else {
        return Err(FrameError::Malformed("shorter than its length"));
    };
    if u32::from_be_bytes(*prefix) as usize != frame.len() {
        return Err(FrameError::Malformed("cut short or padded"));
    }
    Ok(Some(Frame::decode(frame)?))
}

/// Reads frames from a channel.
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    /// Where the next frame starts in `buf`.
    start: usize,
    /// Bytes from `start` known to hold no delimiter.
    scanned: usize,
    /// Dropping bytes up to the next delimiter (after an oversized run).
    skipping: bool,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> FrameReader<R> {
        FrameReader {
            inner,
            buf: Vec::new(),
            start: 0,
            scanned: 0,
            skipping: false,
        }
    }

    /// The next frame. `Closed` at the end of the stream (bytes of an
    /// unfinished frame before it are dropped); after an error for which
    /// [`FrameError::in_step`] holds, the next call reads the next frame.
    pub async fn next(&mut self) -> Result<Frame, FrameError> {
        loop {
            let from = self.start + self.scanned;
            match self.buf[from..].iter().position(|&b| b == DELIMITER) {
                Some(at) => {
                    let end = from + at;
                    let (start, skipped) = (self.start, std::mem::take(&mut self.skipping));
                    self.start = end + 1;
                    self.scanned = 0;
                    if skipped {
                        continue;
                    }
                    match decode_frame(&self.buf[start..end]) {
                        Ok(None) => continue,
                        Ok(Some(f)) => return Ok(f),
                        Err(e) => return Err(e),
                    }
                }
                None => {
                    let pending = self.buf.len() - self.start;
                    if pending > MAX_ENCODED {
                        // Refused before more is buffered; dropped up to
                        // the next delimiter.
                        self.buf.clear();
                        self.start = 0;
                        self.scanned = 0;
                        let reported = !std::mem::replace(&mut self.skipping, true);
                        if reported {
                            return Err(FrameError::TooLarge(pending));
                        }
                        continue;
                    }
                    self.scanned = pending;
                }
            }
            // Room for more: what was consumed goes first.
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            let len = self.buf.len();
            self.buf.resize(len + READ_CHUNK, 0);
            let n = match self.inner.read(&mut self.buf[len..]).await {
                Ok(n) => n,
                Err(e) => {
                    self.buf.truncate(len);
                    return Err(e.into());
                }
            };
            self.buf.truncate(len + n);
            if n == 0 {
                return Err(FrameError::Closed);
            }
        }
    }

    /// Bytes read and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }
}

/// Encodes one frame with its delimiter.
pub fn encode_frame(frame: &Frame) -> Result<Vec<u8>, FrameError> {
    let len = frame.encoded_len();
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = Vec::with_capacity(4 + len);
    body.extend_from_slice(&(len as u32).to_be_bytes());
    frame
        .encode(&mut body)
        .map_err(|e| FrameError::Io(std::io::Error::other(e)))?;
    let mut out = Vec::with_capacity(body.len() + body.len() / 254 + 2);
    cobs_encode(&body, &mut out);
    out.push(DELIMITER);
    Ok(out)
}

/// Writes one frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    frame: &Frame,
) -> Result<(), FrameError> {
    let buf = encode_frame(frame)?;
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

impl Frame {
    pub fn request(id: u64, call: request::Call) -> Frame {
        Frame {
            body: Some(frame::Body::Request(Request {
                id,
                call: Some(call),
            })),
        }
    }

    pub fn response(id: u64, result: Result<response::Result, Status>) -> Frame {
        let (error, result) = match result {
            Ok(r) => (None, Some(r)),
            Err(s) => (Some(s), None),
        };
        Frame {
            body: Some(frame::Body::Response(Response { id, error, result })),
        }
    }

    pub fn output(stream: u64, data: Vec<u8>, eof: bool) -> Frame {
        Frame {
            body: Some(frame::Body::Output(Output { stream, data, eof })),
        }
    }

    pub fn input(stream: u64, data: Vec<u8>, eof: bool) -> Frame {
        Frame {
            body: Some(frame::Body::Input(Input { stream, data, eof })),
        }
    }

    pub fn event(id: String, kind: event::Kind) -> Frame {
        Frame {
            body: Some(frame::Body::Event(Event {
                id,
                kind: Some(kind),
            })),
        }
    }
}

impl Status {
    pub fn new(code: u32, message: impl Into<String>) -> Status {
        Status {
            code,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Frame> {
        vec![
            Frame::request(
                7,
                request::Call::Hello(Hello {
                    version: VERSION,
                    ..Default::default()
                }),
            ),
            Frame::output(3, b"hello".to_vec(), true),
            // Long runs without a zero, and zeros, inside the frame.
            Frame::output(4, vec![0xab; 1000], false),
            Frame::input(5, vec![0; 600], false),
            Frame::response(7, Err(Status::new(code::NOT_FOUND, "no such container"))),
        ]
    }

    #[test]
    fn cobs_round_trips_every_shape_and_never_holds_a_zero() {
        let mut cases: Vec<Vec<u8>> = vec![vec![], vec![0], vec![0, 0], vec![1]];
        for n in [253, 254, 255, 508, 509, 1000] {
            cases.push(vec![7; n]);
            let mut v = vec![7; n];
            v.push(0);
            cases.push(v);
            cases.push((0..n).map(|i| (i % 256) as u8).collect());
        }
        for data in cases {
            let mut enc = Vec::new();
            cobs_encode(&data, &mut enc);
            assert!(!enc.contains(&0), "{data:?}");
            assert_eq!(cobs_decode(&enc).as_deref(), Some(&data[..]), "{data:?}");
        }
    }

    #[tokio::test]
    async fn frames_round_trip_in_order() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let sent = sample();
        let writer = tokio::spawn(async move {
            for f in &sample() {
                write_frame(&mut a, f).await.unwrap();
            }
        });
        let mut r = FrameReader::new(b);
        for f in &sent {
            assert_eq!(&r.next().await.unwrap(), f);
        }
        writer.await.unwrap();
        assert!(matches!(r.next().await, Err(FrameError::Closed)));
    }

    #[tokio::test]
    async fn a_frame_cut_short_by_a_crashed_writer_is_dropped_at_the_delimiter() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        for f in sample() {
            let whole = encode_frame(&f).unwrap();
            // The predecessor wrote part of a frame and died; its successor
            // starts with a delimiter, then sends whole frames.
            for cut in [1, whole.len() / 2, whole.len() - 1] {
                a.write_all(&whole[..cut]).await.unwrap();
                a.write_all(&[DELIMITER]).await.unwrap();
                a.write_all(&whole).await.unwrap();
            }
        }
        drop(a);
        let mut r = FrameReader::new(b);
        for f in sample() {
            for _ in 0..2 {
                let e = r.next().await.unwrap_err();
                assert!(e.in_step(), "{e}");
                assert_eq!(r.next().await.unwrap(), f);
            }
            // Only the delimiter was missing: the frame was whole, and is
            // read once the successor's delimiter ends it.
            assert_eq!(r.next().await.unwrap(), f);
            assert_eq!(r.next().await.unwrap(), f);
        }
        assert!(matches!(r.next().await, Err(FrameError::Closed)));
    }

    #[tokio::test]
    async fn padding_is_skipped() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let f = Frame::output(1, b"x".to_vec(), false);
        a.write_all(&[0, 0, 0]).await.unwrap();
        a.write_all(&encode_frame(&f).unwrap()).await.unwrap();
        a.write_all(&[0]).await.unwrap();
        drop(a);
        let mut r = FrameReader::new(b);
        assert_eq!(r.next().await.unwrap(), f);
        assert!(matches!(r.next().await, Err(FrameError::Closed)));
    }

    #[tokio::test]
    async fn an_oversized_run_is_refused_before_it_is_buffered_and_skipped() {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let f = Frame::output(1, b"after".to_vec(), false);
        let writer = tokio::spawn(async move {
            let junk = vec![0x55u8; 1 << 20];
            for _ in 0..6 {
                a.write_all(&junk).await.unwrap();
            }
            a.write_all(&[DELIMITER]).await.unwrap();
            a.write_all(&encode_frame(&f).unwrap()).await.unwrap();
        });
        let mut r = FrameReader::new(b);
        match r.next().await {
            Err(FrameError::TooLarge(n)) => {
                assert!(n > MAX_ENCODED && n <= MAX_ENCODED + READ_CHUNK)
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert!(r.buffered() <= READ_CHUNK);
        assert_eq!(
            r.next().await.unwrap(),
            Frame::output(1, b"after".to_vec(), false)
        );
        writer.await.unwrap();
    }

    #[test]
    fn garbage_and_wrong_lengths_are_malformed() {
        assert!(matches!(
            decode_frame(&[0x05, 1, 2, 3]),
            Err(FrameError::Malformed(_))
        ));
        let mut enc = Vec::new();
        cobs_encode(&[0, 0, 0, 9, 1, 2], &mut enc);
        assert!(matches!(decode_frame(&enc), Err(FrameError::Malformed(_))));
        enc.clear();
        cobs_encode(&[0, 0, 0, 2, 0xff, 0xff], &mut enc);
        assert!(matches!(decode_frame(&enc), Err(FrameError::Decode(_))));
        assert!(matches!(decode_frame(&[]), Ok(None)));
    }
}
