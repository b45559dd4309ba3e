//! The microVM agent channel: frames read with the API's `read_frame` from
//! a channel that delivers the input in arbitrary chunks, against a plain
//! reading of the rules. Rules: a length over the limit is refused from
//! its prefix; a cut frame reads as a closed channel; a frame that does
//! not decode leaves the stream in step; a decoded frame encodes back to
//! itself.

use kuasar_agent_api::{encode_frame, read_frame, Frame, FrameError, MAX_FRAME};
use prost::Message;

use crate::Peer;

/// What reading one frame from `b` gives, and the bytes after it.
enum Expect {
    Frame,
    Decode,
    TooLarge(usize),
    Closed,
}

fn next(b: &mut &[u8]) -> Expect {
    let Some((prefix, rest)) = b.split_first_chunk::<4>() else {
        return Expect::Closed;
    };
    let len = u32::from_be_bytes(*prefix) as usize;
    if len > MAX_FRAME {
        return Expect::TooLarge(len);
    }
    if rest.len() < len {
        return Expect::Closed;
    }
    let ok = Frame::decode(&rest[..len]).is_ok();
    *b = &rest[len..];
    if ok {
        Expect::Frame
    } else {
        Expect::Decode
    }
}

pub fn run(data: &[u8]) {
    let (plan, bytes) = crate::split(data);
    let rt = crate::runtime();
    rt.block_on(async {
        let mut peer = Peer::new(plan, bytes);
        let mut rest = bytes;
        loop {
            let got = read_frame(&mut peer).await;
            match (next(&mut rest), got) {
                (Expect::Frame, Ok(f)) => {
                    let frame = encode_frame(&f).expect("a frame read fits in one");
                    assert_eq!(Frame::decode(&frame[4..]).unwrap(), f);
                }
                // The guest agent reads on after one that does not decode.
                (Expect::Decode, Err(FrameError::Decode(_))) => {}
                (Expect::TooLarge(n), Err(FrameError::TooLarge(m))) => {
                    assert_eq!(n, m);
                    break;
                }
                (Expect::Closed, Err(FrameError::Closed)) => break,
                (_, got) => panic!("read_frame gave {got:?} where the rules say otherwise"),
            }
        }
    });
}
