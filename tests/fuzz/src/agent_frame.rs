//! The microVM agent channel: frames read with the API's `FrameReader`
//! from a channel that delivers the input in arbitrary chunks, against a
//! plain reading of the rules. Rules: frames end at a zero byte; empty
//! frames are padding; what lies between two delimiters is one frame or
//! one error after which reading goes on in step (what a crashed peer
//! left cut short); bytes after the last delimiter read as a closed
//! channel; a decoded frame encodes back to itself.

use kuasar_agent_api::{decode_frame, encode_frame, FrameError, FrameReader, DELIMITER};

use crate::Peer;

pub fn run(data: &[u8]) {
    let (plan, bytes) = crate::split(data);
    let rt = crate::runtime();
    rt.block_on(async {
        let mut reader = FrameReader::new(Peer::new(plan, bytes));
        let mut segments = bytes.split(|&b| b == DELIMITER).peekable();
        while let Some(segment) = segments.next() {
            if segments.peek().is_none() {
                // Not ended by a delimiter: the channel closes inside it.
                break;
            }
            let expected = decode_frame(segment);
            if matches!(expected, Ok(None)) {
                continue;
            }
            match (expected, reader.next().await) {
                (Ok(Some(want)), Ok(got)) => {
                    assert_eq!(want, got);
                    let again = encode_frame(&got).expect("a frame read fits in one");
                    assert_eq!(again.last(), Some(&DELIMITER));
                    let back = decode_frame(&again[..again.len() - 1]).unwrap();
                    assert_eq!(back, Some(got));
                }
                (Err(_), Err(e)) if e.in_step() => {}
                (want, got) => panic!("FrameReader gave {got:?} where the rules say {want:?}"),
            }
        }
        match reader.next().await {
            Err(FrameError::Closed) => {}
            other => panic!("expected the channel closed, got {other:?}"),
        }
    });
}
