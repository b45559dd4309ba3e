//! Messages and framing of the private shim <-> sandboxer API.

use std::io::{self, Read, Write};

use prost::Message;

use crate::error::{Code, Error};

/// Bumped on any incompatible change; peers refuse other versions.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest frame either side accepts; requests are a few hundred bytes.
pub const MAX_FRAME: usize = 64 * 1024;

#[derive(Clone, PartialEq, Message)]
pub struct Request {
    #[prost(uint32, tag = "1")]
    pub version: u32,
    #[prost(oneof = "request::Body", tags = "2, 3")]
    pub body: Option<request::Body>,
}

pub mod request {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Body {
        #[prost(message, tag = "2")]
        Resolve(super::ResolveRequest),
        #[prost(message, tag = "3")]
        Delete(super::DeleteRequest),
    }
}

/// "Which task address serves this container?" — sent by `shim start`.
#[derive(Clone, PartialEq, Message)]
pub struct ResolveRequest {
    /// Backend kind (`runc`, `wasm`, `vmm`); a string so that the daemon, not
    /// the decoder, refuses unknown kinds with a clear message.
    #[prost(string, tag = "1")]
    pub kind: String,
    #[prost(string, tag = "2")]
    pub namespace: String,
    #[prost(string, tag = "3")]
    pub id: String,
    #[prost(string, tag = "4")]
    pub bundle: String,
    /// The sandbox (pod) this container joins, from its grouping annotations;
    /// empty when it is a sandbox of its own.
    #[prost(string, tag = "5")]
    pub group: String,
    /// containerd's ttrpc socket (`TTRPC_ADDRESS`), where events go.
    #[prost(string, tag = "6")]
    pub ttrpc_address: String,
    /// containerd's gRPC socket (`-address` / `GRPC_ADDRESS`).
    #[prost(string, tag = "7")]
    pub grpc_address: String,
    #[prost(string, tag = "8")]
    pub publish_binary: String,
    #[prost(bool, tag = "9")]
    pub debug: bool,
}

/// "containerd gave up on this task" — sent by `shim delete`.
#[derive(Clone, PartialEq, Message)]
pub struct DeleteRequest {
    #[prost(string, tag = "1")]
    pub kind: String,
    #[prost(string, tag = "2")]
    pub namespace: String,
    #[prost(string, tag = "3")]
    pub id: String,
    #[prost(string, tag = "4")]
    pub bundle: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct Response {
    #[prost(uint32, tag = "1")]
    pub version: u32,
    #[prost(oneof = "response::Body", tags = "2, 3, 4")]
    pub body: Option<response::Body>,
}

pub mod response {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Body {
        #[prost(message, tag = "2")]
        Resolve(super::ResolveResponse),
        #[prost(message, tag = "3")]
        Delete(super::DeleteResponse),
        #[prost(message, tag = "4")]
        Error(super::ErrorResponse),
    }
}

#[derive(Clone, PartialEq, Message)]
pub struct ResolveResponse {
    /// `unix:///absolute/path` of the sandbox's task socket, already listening.
    #[prost(string, tag = "1")]
    pub address: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct DeleteResponse {
    #[prost(uint32, tag = "1")]
    pub pid: u32,
    #[prost(uint32, tag = "2")]
    pub exit_status: u32,
    /// Nanoseconds since the Unix epoch.
    #[prost(int64, tag = "3")]
    pub exited_at_nanos: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct ErrorResponse {
    /// A gRPC status code ([`Code`]).
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
}

impl Request {
    pub fn new(body: request::Body) -> Self {
        Request {
            version: PROTOCOL_VERSION,
            body: Some(body),
        }
    }
}

impl Response {
    pub fn new(body: response::Body) -> Self {
        Response {
            version: PROTOCOL_VERSION,
            body: Some(body),
        }
    }

    pub fn error(code: Code, message: impl Into<String>) -> Self {
        Response::new(response::Body::Error(ErrorResponse {
            code: code as i32,
            message: message.into(),
        }))
    }
}

/// Encodes `msg` as one frame: length prefix, then the protobuf bytes.
pub fn encode_frame(msg: &impl Message) -> Result<Vec<u8>, Error> {
    let len = msg.encoded_len();
    if len > MAX_FRAME {
        return Err(Error::FrameTooLarge(len));
    }
    let mut buf = Vec::with_capacity(4 + len);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    msg.encode(&mut buf).expect("vector has capacity");
    Ok(buf)
}

/// Parses a frame's length prefix, refusing oversized frames before any
/// allocation.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, Error> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(Error::FrameTooLarge(len));
    }
    Ok(len)
}

/// Decodes a frame body and checks its version.
pub fn decode_request(body: &[u8]) -> Result<Request, Error> {
    let req = Request::decode(body)?;
    if req.version != PROTOCOL_VERSION {
        return Err(Error::Version { peer: req.version });
    }
    Ok(req)
}

pub fn write_frame(w: &mut impl Write, msg: &impl Message) -> Result<(), Error> {
    w.write_all(&encode_frame(msg)?)?;
    Ok(())
}

pub fn read_frame<M: Message + Default>(r: &mut impl Read) -> Result<M, Error> {
    let mut prefix = [0u8; 4];
    r.read_exact(&mut prefix)?;
    let len = frame_len(prefix)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Error::Io(io::Error::new(e.kind(), "connection closed mid-message"))
        } else {
            Error::Io(e)
        }
    })?;
    Ok(M::decode(body.as_slice())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trip_keeps_every_field() {
        let req = Request::new(request::Body::Resolve(ResolveRequest {
            kind: "runc".into(),
            namespace: "default".into(),
            id: "c1".into(),
            bundle: "/b".into(),
            group: "pod".into(),
            ttrpc_address: "/t".into(),
            grpc_address: "/g".into(),
            publish_binary: "/p".into(),
            debug: true,
        }));
        let frame = encode_frame(&req).unwrap();
        let got: Request = read_frame(&mut frame.as_slice()).unwrap();
        assert_eq!(got, req);
        assert_eq!(decode_request(&frame[4..]).unwrap(), req);
    }

    #[test]
    fn oversized_length_prefix_is_refused_before_reading() {
        let prefix = ((MAX_FRAME + 1) as u32).to_be_bytes();
        assert!(matches!(frame_len(prefix), Err(Error::FrameTooLarge(_))));
    }

    #[test]
    fn other_protocol_version_is_refused() {
        let mut req = Request::new(request::Body::Delete(DeleteRequest::default()));
        req.version = 99;
        let body = req.encode_to_vec();
        assert!(matches!(
            decode_request(&body),
            Err(Error::Version { peer: 99 })
        ));
    }
}
