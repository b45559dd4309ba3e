//! The daemon's one error type, and the one place it becomes a gRPC status.

use std::io;

use kuasar_host::Error as HostError;
use kuasar_protocol::Code;

pub use kuasar_host::error::panic_message;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("{what}: {source}")]
    Sys { what: String, source: nix::Error },
    /// A runtime command (runc) failed; `message` is its own error text.
    #[error("{command}: {message}")]
    Runtime { command: String, message: String },
    #[error("{0}")]
    Internal(String),
}

/// The toolkit's errors keep their meaning as the daemon's.
impl From<HostError> for Error {
    fn from(e: HostError) -> Error {
        match e {
            HostError::InvalidArgument(m) => Error::InvalidArgument(m),
            HostError::NotFound(m) => Error::NotFound(m),
            HostError::Unavailable(m) => Error::Unavailable(m),
            HostError::Io { what, source } => Error::Io { what, source },
            HostError::Sys { what, source } => Error::Sys { what, source },
            HostError::Runtime { command, message } => Error::Runtime { command, message },
            HostError::Internal(m) => Error::Internal(m),
        }
    }
}

impl Error {
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::Unimplemented(_) => Code::Unimplemented,
            Error::Unavailable(_) => Code::Unavailable,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            // A file or binary missing inside the daemon is its own failure:
            // containerd reads NotFound as "the task is gone".
            Error::Io { .. } | Error::Sys { .. } | Error::Runtime { .. } => Code::Unknown,
            Error::Internal(_) => Code::Internal,
        }
    }

    /// An error refused with `code` elsewhere (the Sandbox API layer), kept
    /// with its meaning.
    pub fn from_code(code: Code, message: String) -> Error {
        match code {
            Code::InvalidArgument => Error::InvalidArgument(message),
            Code::NotFound => Error::NotFound(message),
            Code::AlreadyExists => Error::AlreadyExists(message),
            Code::FailedPrecondition => Error::FailedPrecondition(message),
            Code::Unimplemented => Error::Unimplemented(message),
            Code::Unavailable => Error::Unavailable(message),
            Code::ResourceExhausted => Error::ResourceExhausted(message),
            Code::DeadlineExceeded => Error::DeadlineExceeded(message),
            _ => Error::Internal(message),
        }
    }

    /// The ttrpc status containerd receives for this error.
    pub fn to_status(&self) -> ttrpc::proto::Status {
        let mut s = ttrpc::proto::Status::new();
        s.code = protobuf::EnumOrUnknown::from_i32(self.code() as i32);
        s.message = self.to_string();
        s
    }
}

/// Wraps an I/O error with what was being done.
pub fn io_context(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Wraps a system-call error with what was being done.
pub fn sys_context(what: impl Into<String>) -> impl FnOnce(nix::Error) -> Error {
    let what = what.into();
    move |source| Error::Sys { what, source }
}
