//! The private shim <-> sandboxer protocol: frames read by either side, and
//! a daemon's control connection fed the same bytes. Rules: every message
//! read encodes back to itself; the daemon answers every whole frame with a
//! well-formed response until the first one it cannot use, then closes.

use std::fmt::Debug;

use kuasar_core::control::{self, Limits};
use kuasar_protocol::wire::{self, Request, Response, MAX_FRAME, PROTOCOL_VERSION};

use crate::Peer;

pub fn run(data: &[u8]) {
    let (plan, bytes) = crate::split(data);
    framing(bytes);
    control_connection(plan, bytes);
}

/// The bytes as frames, read as the daemon reads requests and as a shim
/// reads answers.
fn framing(bytes: &[u8]) {
    let mut r = bytes;
    while let Ok(req) = wire::read_frame::<Request>(&mut r) {
        round_trips(&req);
    }
    let mut r = bytes;
    while let Ok(resp) = wire::read_frame::<Response>(&mut r) {
        round_trips(&resp);
    }
}

fn round_trips<M: prost::Message + Default + PartialEq + Debug>(msg: &M) {
    let frame = wire::encode_frame(msg).expect("a message read from a frame fits in one");
    let len = wire::frame_len(frame[..4].try_into().unwrap()).unwrap();
    assert_eq!(len, frame.len() - 4);
    assert_eq!(&M::decode(&frame[4..]).unwrap(), msg);
}

/// How many answers a daemon owes for `bytes`: one per whole frame, up to
/// and including the first it cannot use (oversized, malformed, another
/// version).
fn answers_owed(mut bytes: &[u8]) -> usize {
    let mut n = 0;
    loop {
        let Some((prefix, rest)) = bytes.split_first_chunk::<4>() else {
            return n;
        };
        let len = u32::from_be_bytes(*prefix) as usize;
        if len > MAX_FRAME {
            return n + 1;
        }
        if rest.len() < len {
            return n;
        }
        n += 1;
        if wire::decode_request(&rest[..len]).is_err() {
            return n;
        }
        bytes = &rest[len..];
    }
}

fn control_connection(plan: u8, bytes: &[u8]) {
    let (_dir, daemon) = crate::daemon();
    let rt = crate::runtime();
    let written = rt.block_on(async {
        let mut peer = Peer::new(plan, bytes);
        control::serve_stream(&mut peer, &daemon, 0, Limits::default())
            .await
            .expect("serving a peer that reads everything fails");
        peer.written
    });
    drop(rt);
    let mut out = written.as_slice();
    let mut answered = 0;
    while !out.is_empty() {
        let resp: Response =
            wire::read_frame(&mut out).expect("the daemon wrote a malformed frame");
        assert_eq!(resp.version, PROTOCOL_VERSION);
        assert!(resp.body.is_some(), "an answer without a body");
        answered += 1;
    }
    assert_eq!(answered, answers_owed(bytes), "answers written");
}
