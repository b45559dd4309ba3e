//! The API between the sandboxer and the guest agent, defined once for both
//! sides: the messages (`proto/agent.proto`) and their framing on the
//! channel (a virtio-serial port): a big-endian `u32` length, then one
//! encoded [`Frame`]. A length over [`MAX_FRAME`] is refused before anything
//! is allocated for it.

use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[allow(clippy::all)]
mod pb {
    include!(concat!(env!("OUT_DIR"), "/kuasar.agent.v1.rs"));
}
pub use pb::*;

/// The API version this build speaks. A host and an agent of different
/// versions refuse each other at `Hello`.
pub const VERSION: u32 = 1;

/// The largest frame either side accepts (stdio is sent in chunks far
/// below this; a spec or a stats reply fits easily).
pub const MAX_FRAME: usize = 4 << 20;

/// The size of stdio chunks: small enough that one busy stream cannot hold
/// the channel for long.
pub const IO_CHUNK: usize = 32 << 10;

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
    #[error("frame of {0} bytes is over the limit of {MAX_FRAME}")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("channel: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads one frame. `Closed` at a clean end of stream between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Frame, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => FrameError::Closed,
        _ => e.into(),
    })?;
    Ok(Frame::decode(buf.as_slice())?)
}

/// Encodes one frame with its length prefix.
pub fn encode_frame(frame: &Frame) -> Result<Vec<u8>, FrameError> {
    let len = frame.encoded_len();
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut buf = Vec::with_capacity(4 + len);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    frame
        .encode(&mut buf)
        .map_err(|e| FrameError::Io(std::io::Error::other(e)))?;
    Ok(buf)
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

    #[tokio::test]
    async fn frames_round_trip_in_order() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let sent = vec![
            Frame::request(
                7,
                request::Call::Hello(Hello {
                    version: VERSION,
                    ..Default::default()
                }),
            ),
            Frame::output(3, b"hello".to_vec(), true),
            Frame::response(7, Err(Status::new(code::NOT_FOUND, "no such container"))),
        ];
        for f in &sent {
            write_frame(&mut a, f).await.unwrap();
        }
        drop(a);
        for f in &sent {
            assert_eq!(&read_frame(&mut b).await.unwrap(), f);
        }
        assert!(matches!(read_frame(&mut b).await, Err(FrameError::Closed)));
    }

    #[tokio::test]
    async fn an_oversized_length_is_refused_before_allocation() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        match read_frame(&mut b).await {
            Err(FrameError::TooLarge(n)) => assert_eq!(n, u32::MAX as usize),
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn garbage_is_a_decode_error_and_a_cut_frame_is_closed() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff]).await.unwrap();
        assert!(matches!(
            read_frame(&mut b).await,
            Err(FrameError::Decode(_))
        ));
        a.write_all(&[0, 0, 0, 10, 1, 2]).await.unwrap();
        drop(a);
        assert!(matches!(read_frame(&mut b).await, Err(FrameError::Closed)));
    }
}
