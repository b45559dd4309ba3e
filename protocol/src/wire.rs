//! Messages and framing of the private shim <-> sandboxer API.

use std::io::{self, Read, Write};

use prost::Message;

use crate::error::{Code, Error};

/// Bumped on any incompatible change; peers refuse other versions. New
/// requests are new oneof variants: a daemon that does not know one answers
/// "request has no body", and older shims never send them.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest request either side accepts, and largest reply a shim reads;
/// those are a few hundred bytes.
pub const MAX_FRAME: usize = 64 * 1024;
/// Largest reply `kuasar-ctl` reads: a listing of every sandbox and task
/// on a busy node (about 300 bytes per task).
pub const MAX_REPLY_FRAME: usize = 16 << 20;

#[derive(Clone, PartialEq, Message)]
pub struct Request {
    #[prost(uint32, tag = "1")]
    pub version: u32,
    #[prost(oneof = "request::Body", tags = "2, 3, 4, 5, 6")]
    pub body: Option<request::Body>,
}

pub mod request {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Body {
        #[prost(message, tag = "2")]
        Resolve(super::ResolveRequest),
        #[prost(message, tag = "3")]
        Delete(super::DeleteRequest),
        #[prost(message, tag = "4")]
        List(super::ListRequest),
        #[prost(message, tag = "5")]
        Health(super::HealthRequest),
        #[prost(message, tag = "6")]
        Upgrade(super::UpgradeRequest),
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
    #[prost(oneof = "response::Body", tags = "2, 3, 4, 5, 6, 7")]
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
        #[prost(message, tag = "5")]
        List(super::ListResponse),
        #[prost(message, tag = "6")]
        Health(super::HealthResponse),
        #[prost(message, tag = "7")]
        Upgrade(super::UpgradeResponse),
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

/// "Every sandbox and task you hold" — sent by `kuasar-ctl list`.
#[derive(Clone, PartialEq, Message)]
pub struct ListRequest {}

#[derive(Clone, PartialEq, Message)]
pub struct ListResponse {
    #[prost(message, repeated, tag = "1")]
    pub sandboxes: Vec<SandboxInfo>,
    #[prost(message, repeated, tag = "2")]
    pub tasks: Vec<TaskInfo>,
}

#[derive(Clone, PartialEq, Message)]
pub struct SandboxInfo {
    #[prost(string, tag = "1")]
    pub namespace: String,
    #[prost(string, tag = "2")]
    pub id: String,
    #[prost(string, tag = "3")]
    pub kind: String,
    /// `resolved` (a shim has its address, its backend side is not made
    /// yet), `created`, `ready` or `stopped`.
    #[prost(string, tag = "4")]
    pub state: String,
    /// The sandbox's own process (a VM's qemu); 0 when it has none.
    #[prost(uint32, tag = "5")]
    pub pid: u32,
    /// The task address containerd dials.
    #[prost(string, tag = "6")]
    pub address: String,
    /// Nanoseconds since the Unix epoch.
    #[prost(int64, tag = "7")]
    pub created_at_nanos: i64,
    /// Containers resolved to it and not yet deleted.
    #[prost(string, repeated, tag = "8")]
    pub members: Vec<String>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TaskInfo {
    #[prost(string, tag = "1")]
    pub namespace: String,
    #[prost(string, tag = "2")]
    pub id: String,
    #[prost(string, tag = "3")]
    pub sandbox: String,
    #[prost(string, tag = "4")]
    pub kind: String,
    /// As containerd's State says it: CREATED, RUNNING, STOPPED, PAUSED.
    #[prost(string, tag = "5")]
    pub status: String,
    #[prost(uint32, tag = "6")]
    pub pid: u32,
    #[prost(uint32, optional, tag = "7")]
    pub exit_status: Option<u32>,
    #[prost(message, repeated, tag = "8")]
    pub execs: Vec<ExecInfo>,
    /// Nanoseconds since the Unix epoch; 0 when unknown (a task handed
    /// over by a version that did not record it).
    #[prost(int64, tag = "9")]
    pub created_at_nanos: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct ExecInfo {
    #[prost(string, tag = "1")]
    pub exec_id: String,
    #[prost(string, tag = "2")]
    pub status: String,
    #[prost(uint32, tag = "3")]
    pub pid: u32,
}

/// "How are you?" — sent by `kuasar-ctl health`, and while it waits for an
/// upgraded daemon.
#[derive(Clone, PartialEq, Message)]
pub struct HealthRequest {}

#[derive(Clone, PartialEq, Message)]
pub struct HealthResponse {
    #[prost(uint32, tag = "1")]
    pub pid: u32,
    #[prost(string, tag = "2")]
    pub version: String,
    /// When the process started (it keeps its pid across live upgrades),
    /// nanoseconds since the Unix epoch.
    #[prost(int64, tag = "3")]
    pub started_at_nanos: i64,
    /// When the running image started: the last live upgrade, or the
    /// process start.
    #[prost(int64, tag = "4")]
    pub image_started_at_nanos: i64,
    /// The daemon's clock when it answered.
    #[prost(int64, tag = "5")]
    pub now_nanos: i64,
    /// Per enabled backend.
    #[prost(message, repeated, tag = "6")]
    pub backends: Vec<BackendHealth>,
    #[prost(uint32, tag = "7")]
    pub open_fds: u32,
    #[prost(uint32, tag = "8")]
    pub threads: u32,
    #[prost(uint64, tag = "9")]
    pub rss_bytes: u64,
    #[prost(uint64, tag = "10")]
    pub pss_bytes: u64,
    /// What would refuse a live upgrade now; empty: it is possible.
    #[prost(string, repeated, tag = "11")]
    pub upgrade_blockers: Vec<String>,
    /// Live upgrades this image tried and came back from, and why the last
    /// one failed.
    #[prost(uint32, tag = "12")]
    pub upgrades_failed: u32,
    #[prost(string, tag = "13")]
    pub last_upgrade_error: String,
    /// The executable this image runs, as `/proc/self/exe` names it: with
    /// " (deleted)" once the file was replaced on disk (a live upgrade runs
    /// the new one).
    #[prost(string, tag = "14")]
    pub binary: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct BackendHealth {
    #[prost(string, tag = "1")]
    pub kind: String,
    #[prost(uint32, tag = "2")]
    pub sandboxes: u32,
    #[prost(uint32, tag = "3")]
    pub tasks: u32,
}

/// "Upgrade yourself" (or, with `check`, "what would stop you?") — sent by
/// `kuasar-ctl upgrade`.
#[derive(Clone, PartialEq, Message)]
pub struct UpgradeRequest {
    #[prost(bool, tag = "1")]
    pub check: bool,
}

#[derive(Clone, PartialEq, Message)]
pub struct UpgradeResponse {
    /// The upgrade was set off (never with `check`).
    #[prost(bool, tag = "1")]
    pub started: bool,
    /// What refuses it; empty when it is possible.
    #[prost(string, repeated, tag = "2")]
    pub blockers: Vec<String>,
    /// The image answering, so that a caller can tell its successor.
    #[prost(int64, tag = "3")]
    pub image_started_at_nanos: i64,
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
    encode_frame_within(msg, MAX_FRAME)
}

/// [`encode_frame`] for a reply of up to `max` bytes.
pub fn encode_frame_within(msg: &impl Message, max: usize) -> Result<Vec<u8>, Error> {
    let len = msg.encoded_len();
    if len > max {
        return Err(Error::FrameTooLarge { len, max });
    }
    let mut buf = Vec::with_capacity(4 + len);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    msg.encode(&mut buf).expect("vector has capacity");
    Ok(buf)
}

/// Parses a frame's length prefix, refusing oversized frames before any
/// allocation.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, Error> {
    frame_len_within(prefix, MAX_FRAME)
}

fn frame_len_within(prefix: [u8; 4], max: usize) -> Result<usize, Error> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > max {
        return Err(Error::FrameTooLarge { len, max });
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
    read_frame_within(r, MAX_FRAME)
}

/// [`read_frame`] of a message of up to `max` bytes.
pub fn read_frame_within<M: Message + Default>(r: &mut impl Read, max: usize) -> Result<M, Error> {
    let mut prefix = [0u8; 4];
    r.read_exact(&mut prefix)?;
    let len = frame_len_within(prefix, max)?;
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
        assert!(matches!(
            frame_len(prefix),
            Err(Error::FrameTooLarge { max: MAX_FRAME, .. })
        ));
    }

    #[test]
    fn a_listing_larger_than_a_request_frame_is_carried_in_a_reply_frame() {
        let task = TaskInfo {
            namespace: "k8s.io".into(),
            id: "c".repeat(64),
            sandbox: "p".repeat(64),
            kind: "runc".into(),
            status: "RUNNING".into(),
            pid: 12345,
            exit_status: None,
            execs: vec![],
            created_at_nanos: 1_700_000_000_000_000_000,
        };
        let resp = Response::new(response::Body::List(ListResponse {
            sandboxes: vec![],
            tasks: vec![task; 1000],
        }));
        assert!(matches!(
            encode_frame(&resp),
            Err(Error::FrameTooLarge { .. })
        ));
        let frame = encode_frame_within(&resp, MAX_REPLY_FRAME).unwrap();
        assert!(frame.len() > MAX_FRAME);
        assert!(read_frame::<Response>(&mut frame.as_slice()).is_err());
        let got: Response = read_frame_within(&mut frame.as_slice(), MAX_REPLY_FRAME).unwrap();
        assert_eq!(got, resp);
    }

    #[test]
    fn requests_a_daemon_does_not_know_decode_without_a_body() {
        // What a daemon of before `list` makes of one: a request it can
        // refuse, not a decode error that closes the connection.
        #[derive(Clone, PartialEq, Message)]
        struct OldRequest {
            #[prost(uint32, tag = "1")]
            version: u32,
            #[prost(message, optional, tag = "2")]
            resolve: Option<ResolveRequest>,
            #[prost(message, optional, tag = "3")]
            delete: Option<DeleteRequest>,
        }
        let new = Request::new(request::Body::Upgrade(UpgradeRequest { check: true }));
        let old = OldRequest::decode(new.encode_to_vec().as_slice()).unwrap();
        assert_eq!(old.version, PROTOCOL_VERSION);
        assert!(old.resolve.is_none() && old.delete.is_none());
        // And the other way: a shim's request reads the same to a new daemon.
        let resolve = ResolveRequest {
            kind: "runc".into(),
            id: "c1".into(),
            ..Default::default()
        };
        let shim = OldRequest {
            version: PROTOCOL_VERSION,
            resolve: Some(resolve.clone()),
            delete: None,
        };
        let got = decode_request(&shim.encode_to_vec()).unwrap();
        assert_eq!(got.body, Some(request::Body::Resolve(resolve)));
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
