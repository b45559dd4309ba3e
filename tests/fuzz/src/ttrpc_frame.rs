//! ttrpc framing as the task sockets read it: `FrameBuf` fed the input in
//! arbitrary chunks, and the events client's `read_frame`, both against a
//! plain reading of the rules; then each payload parsed as the server
//! parses a request. Rules: the same frames in the same order however the
//! bytes arrive; an oversized message yields its header alone and its body
//! is skipped; the buffer never holds more than one message.

use kuasar_core::rpc::frame::{self, FrameBuf, Header, HEADER_LEN, MAX_MESSAGE};
use protobuf::Message;

use crate::{Chunks, Peer};

/// A frame's header and its payload, `None` when over the limit.
type Parsed = (Header, Option<Vec<u8>>);

/// The frames in `bytes`, read straight from the rules; `true` when the
/// last one is an oversized message cut short.
fn expected(mut b: &[u8]) -> (Vec<Parsed>, bool) {
    let mut out = Vec::new();
    while b.len() >= HEADER_LEN {
        let header = Header {
            length: u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            stream_id: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            kind: b[8],
            flags: b[9],
        };
        let len = header.length as usize;
        let body = &b[HEADER_LEN..];
        if len > MAX_MESSAGE {
            out.push((header, None));
            if body.len() < len {
                return (out, true);
            }
            b = &body[len..];
            continue;
        }
        if body.len() < len {
            break;
        }
        out.push((header, Some(body[..len].to_vec())));
        b = &body[len..];
    }
    (out, false)
}

pub fn run(data: &[u8]) {
    let (plan, bytes) = crate::split(data);
    let (want, cut) = expected(bytes);

    let mut frames = FrameBuf::default();
    let mut got: Vec<Parsed> = Vec::new();
    for chunk in Chunks::new(plan, bytes) {
        frames.buf.extend_from_slice(chunk);
        while let Some(f) = frames.next_frame() {
            got.push((f.header, f.payload));
        }
        assert!(
            frames.buf.len() < HEADER_LEN + MAX_MESSAGE,
            "{} bytes buffered",
            frames.buf.len()
        );
    }
    assert_eq!(got, want, "FrameBuf");

    // The async reader yields an oversized message only once skipped whole.
    let whole = if cut {
        &want[..want.len() - 1]
    } else {
        &want[..]
    };
    let rt = crate::runtime();
    let read: Vec<Parsed> = rt.block_on(async {
        let mut peer = Peer::new(plan, bytes);
        let mut read = Vec::new();
        while let Ok(f) = frame::read_frame(&mut peer).await {
            read.push((f.header, f.payload));
        }
        read
    });
    assert_eq!(read, whole, "read_frame");

    for payload in got.iter().filter_map(|(_, p)| p.as_deref()) {
        if let Ok(req) = ttrpc::proto::Request::parse_from_bytes(payload) {
            let again = req.write_to_bytes().expect("re-encoding a request");
            let back = ttrpc::proto::Request::parse_from_bytes(&again).expect("re-reading it");
            assert_eq!(back, req);
        }
    }
}
