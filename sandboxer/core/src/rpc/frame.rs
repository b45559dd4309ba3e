//! ttrpc framing: a 10-byte header (length, stream id, type, flags, all big
//! endian) followed by a protobuf `Request` or `Response`.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const HEADER_LEN: usize = 10;
/// ttrpc's limit on one message.
pub const MAX_MESSAGE: usize = 4 << 20;
pub const TYPE_REQUEST: u8 = 1;
pub const TYPE_RESPONSE: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub length: u32,
    pub stream_id: u32,
    pub kind: u8,
    pub flags: u8,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&self.length.to_be_bytes());
        b[4..8].copy_from_slice(&self.stream_id.to_be_bytes());
        b[8] = self.kind;
        b[9] = self.flags;
        b
    }

    pub fn decode(b: &[u8; HEADER_LEN]) -> Header {
        Header {
            length: u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            stream_id: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            kind: b[8],
            flags: b[9],
        }
    }
}

/// One message read off the wire. An oversized payload is read and thrown
/// away so the connection stays in step; `payload` is then `None`.
pub struct Frame {
    pub header: Header,
    pub payload: Option<Vec<u8>>,
}

pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Frame> {
    let mut hb = [0u8; HEADER_LEN];
    r.read_exact(&mut hb).await?;
    let header = Header::decode(&hb);
    let len = header.length as usize;
    if len > MAX_MESSAGE {
        let skipped = tokio::io::copy(&mut r.take(len as u64), &mut tokio::io::sink()).await?;
        if skipped < len as u64 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        return Ok(Frame {
            header,
            payload: None,
        });
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok(Frame {
        header,
        payload: Some(payload),
    })
}

/// Frames parsed out of bytes read off a connection. Reading into the
/// buffer is cancel safe, so a connection can stop between any two reads
/// and hand what it holds (unparsed bytes, an oversized message half
/// skipped) to whoever serves it next.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FrameBuf {
    pub buf: Vec<u8>,
    /// Bytes of an oversized message still to be thrown away.
    pub skip: u64,
}

impl FrameBuf {
    /// The next complete frame, if the buffer holds one. An oversized
    /// message yields a frame without payload as soon as its header is in;
    /// its body is then discarded as it arrives.
    pub fn next_frame(&mut self) -> Option<Frame> {
        if self.skip > 0 {
            let n = self
                .buf
                .len()
                .min(usize::try_from(self.skip).unwrap_or(usize::MAX));
            self.buf.drain(..n);
            self.skip -= n as u64;
            if self.skip > 0 {
                return None;
            }
        }
        if self.buf.len() < HEADER_LEN {
            return None;
        }
        let mut hb = [0u8; HEADER_LEN];
        hb.copy_from_slice(&self.buf[..HEADER_LEN]);
        let header = Header::decode(&hb);
        let len = header.length as usize;
        if len > MAX_MESSAGE {
            self.buf.drain(..HEADER_LEN);
            self.skip = len as u64;
            // Drop what of the body is already here.
            let n = self.buf.len().min(len);
            self.buf.drain(..n);
            self.skip -= n as u64;
            return Some(Frame {
                header,
                payload: None,
            });
        }
        if self.buf.len() < HEADER_LEN + len {
            return None;
        }
        let payload = self.buf[HEADER_LEN..HEADER_LEN + len].to_vec();
        self.buf.drain(..HEADER_LEN + len);
        Some(Frame {
            header,
            payload: Some(payload),
        })
    }
}

pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    stream_id: u32,
    kind: u8,
    payload: &[u8],
) -> io::Result<()> {
    let header = Header {
        length: payload.len() as u32,
        stream_id,
        kind,
        flags: 0,
    };
    let mut buf = Vec::with_capacity(HEADER_LEN + payload.len());
    buf.extend_from_slice(&header.encode());
    buf.extend_from_slice(payload);
    w.write_all(&buf).await?;
    w.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_big_endian() {
        let h = Header {
            length: 0x01020304,
            stream_id: 7,
            kind: TYPE_RESPONSE,
            flags: 0,
        };
        let b = h.encode();
        assert_eq!(&b[..4], &[1, 2, 3, 4]);
        assert_eq!(Header::decode(&b), h);
    }

    #[tokio::test]
    async fn oversized_message_is_skipped_and_the_next_one_read() {
        let mut data = Header {
            length: (MAX_MESSAGE + 1) as u32,
            stream_id: 1,
            kind: TYPE_REQUEST,
            flags: 0,
        }
        .encode()
        .to_vec();
        data.extend(std::iter::repeat_n(0u8, MAX_MESSAGE + 1));
        let mut next = Vec::new();
        write_frame(&mut next, 3, TYPE_REQUEST, b"ok")
            .await
            .unwrap();
        data.extend(next);
        let mut r = data.as_slice();
        let f = read_frame(&mut r).await.unwrap();
        assert!(f.payload.is_none());
        let f = read_frame(&mut r).await.unwrap();
        assert_eq!(f.header.stream_id, 3);
        assert_eq!(f.payload.unwrap(), b"ok");
    }

    fn encoded(stream_id: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = Header {
            length: payload.len() as u32,
            stream_id,
            kind: TYPE_REQUEST,
            flags: 0,
        }
        .encode()
        .to_vec();
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn frame_buf_waits_for_partial_frames_byte_by_byte() {
        let mut data = encoded(1, b"first");
        data.extend(encoded(3, b""));
        data.extend(encoded(5, b"third"));
        let mut fb = FrameBuf::default();
        let mut got = Vec::new();
        for b in data {
            fb.buf.push(b);
            while let Some(f) = fb.next_frame() {
                got.push((f.header.stream_id, f.payload.unwrap()));
            }
        }
        assert_eq!(
            got,
            vec![(1, b"first".to_vec()), (3, vec![]), (5, b"third".to_vec())]
        );
        assert!(fb.buf.is_empty());
    }

    #[test]
    fn frame_buf_skips_an_oversized_message_across_reads() {
        let len = MAX_MESSAGE + 1;
        let mut fb = FrameBuf {
            buf: Header {
                length: len as u32,
                stream_id: 1,
                kind: TYPE_REQUEST,
                flags: 0,
            }
            .encode()
            .to_vec(),
            skip: 0,
        };
        fb.buf.extend(std::iter::repeat_n(0u8, 100));
        let f = fb.next_frame().unwrap();
        assert!(f.payload.is_none());
        assert_eq!(fb.skip, (len - 100) as u64);
        assert!(fb.next_frame().is_none());
        fb.buf.extend(std::iter::repeat_n(0u8, len - 100));
        fb.buf.extend(encoded(7, b"ok"));
        let f = fb.next_frame().unwrap();
        assert_eq!(f.header.stream_id, 7);
        assert_eq!(f.payload.unwrap(), b"ok");
        assert_eq!(fb.skip, 0);
    }
}
