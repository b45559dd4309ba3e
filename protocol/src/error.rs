use std::io;

/// gRPC status codes, the numbering containerd and ttrpc use. The private
/// API carries them too, so a refusal keeps its meaning all the way to
/// containerd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum Code {
    Ok = 0,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
}

impl Code {
    pub fn from_i32(v: i32) -> Code {
        match v {
            0 => Code::Ok,
            3 => Code::InvalidArgument,
            4 => Code::DeadlineExceeded,
            5 => Code::NotFound,
            6 => Code::AlreadyExists,
            7 => Code::PermissionDenied,
            8 => Code::ResourceExhausted,
            9 => Code::FailedPrecondition,
            12 => Code::Unimplemented,
            13 => Code::Internal,
            14 => Code::Unavailable,
            _ => Code::Unknown,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kuasar sandboxer unreachable at {path}: {source}")]
    Unreachable { path: String, source: io::Error },
    #[error("talking to the kuasar sandboxer: {0}")]
    Io(#[from] io::Error),
    #[error("message of {len} bytes exceeds the {max} byte limit")]
    FrameTooLarge { len: usize, max: usize },
    #[error("malformed message: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("protocol version {peer} not supported (this side speaks {ours})", ours = crate::wire::PROTOCOL_VERSION)]
    Version { peer: u32 },
    #[error("unexpected reply from the kuasar sandboxer")]
    UnexpectedReply,
    #[error("kuasar sandboxer: {message}")]
    Remote { code: Code, message: String },
}

impl Error {
    /// The gRPC code this error stands for.
    pub fn code(&self) -> Code {
        match self {
            Error::Remote { code, .. } => *code,
            Error::Unreachable { .. } => Code::Unavailable,
            Error::FrameTooLarge { .. } => Code::ResourceExhausted,
            Error::Decode(_) | Error::Version { .. } => Code::InvalidArgument,
            Error::Io(_) | Error::UnexpectedReply => Code::Unknown,
        }
    }
}
