//! The toolkit's one error type. It carries no gRPC code: the daemon maps
//! it, with its own errors, in one place.

use std::io;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(String),
    /// What was asked for does not exist (a container runc does not know).
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unavailable(String),
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

/// What a task that did not finish says: its panic's message, or why it was
/// cancelled.
pub fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into()),
        Err(e) => e.to_string(),
    }
}
