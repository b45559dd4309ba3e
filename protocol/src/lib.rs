//! The private API between the short-lived `containerd-shim-kuasar*-v1`
//! binaries and the resident `kuasar-sandboxer`, its synchronous client, and
//! the shim command line the three shims share.
//!
//! Wire format: every message is a 4-byte big-endian length followed by a
//! protobuf-encoded [`wire::Request`] or [`wire::Response`]; both carry
//! [`wire::PROTOCOL_VERSION`] so either side can refuse a peer it does not
//! understand.

pub mod cli;
pub mod client;
pub mod error;
pub mod kind;
pub mod shim;
pub mod wire;

pub use client::Client;
pub use error::{Code, Error};
pub use kind::Kind;

/// Socket the shims dial unless `KUASAR_SANDBOXER_SOCKET` names another.
pub const DEFAULT_SOCKET: &str = "/run/kuasar/sandboxer.sock";
/// Environment variable that overrides [`DEFAULT_SOCKET`]; containerd passes
/// its own environment to shims, so setting it on containerd is enough.
pub const SOCKET_ENV: &str = "KUASAR_SANDBOXER_SOCKET";
/// File the sandboxer leaves in a task's bundle so that `shim delete` can
/// clean up without it (runc root and binary).
pub const BUNDLE_RUNTIME_FILE: &str = "kuasar-runtime.json";

/// The socket path the shims use, honouring [`SOCKET_ENV`].
pub fn socket_path() -> std::path::PathBuf {
    std::env::var_os(SOCKET_ENV)
        .filter(|v| !v.is_empty())
        .map(Into::into)
        .unwrap_or_else(|| DEFAULT_SOCKET.into())
}
