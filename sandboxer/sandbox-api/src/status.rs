//! The error of a [`crate::Controller`] call and its mapping onto each wire.

use std::fmt;

use kuasar_protocol::Code;

/// A refused or failed call: a gRPC code and a message. containerd turns the
/// code into its errdefs kind (NotFound, AlreadyExists, Unavailable, ...),
/// which decides what it does next (see the crate docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub code: Code,
    pub message: String,
}

impl Status {
    pub fn new(code: Code, message: impl Into<String>) -> Status {
        Status {
            code,
            message: message.into(),
        }
    }

    pub fn not_found(message: impl Into<String>) -> Status {
        Status::new(Code::NotFound, message)
    }

    pub fn invalid_argument(message: impl Into<String>) -> Status {
        Status::new(Code::InvalidArgument, message)
    }

    pub fn already_exists(message: impl Into<String>) -> Status {
        Status::new(Code::AlreadyExists, message)
    }

    pub fn failed_precondition(message: impl Into<String>) -> Status {
        Status::new(Code::FailedPrecondition, message)
    }

    pub fn unimplemented(message: impl Into<String>) -> Status {
        Status::new(Code::Unimplemented, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Status {
        Status::new(Code::Unavailable, message)
    }

    pub fn internal(message: impl Into<String>) -> Status {
        Status::new(Code::Internal, message)
    }

    /// The status as a ttrpc response carries it.
    pub fn to_ttrpc(&self) -> ttrpc::proto::Status {
        let mut status = ttrpc::proto::Status::new();
        status.code = protobuf::EnumOrUnknown::from_i32(self.code as i32);
        status.message = self.message.clone();
        status
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

impl std::error::Error for Status {}

impl From<Status> for tonic::Status {
    fn from(s: Status) -> tonic::Status {
        tonic::Status::new(tonic::Code::from_i32(s.code as i32), s.message)
    }
}

impl From<tonic::Status> for Status {
    fn from(s: tonic::Status) -> Status {
        Status::new(Code::from_i32(s.code() as i32), s.message())
    }
}
