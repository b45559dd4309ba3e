//! The host toolkit: what every backend that runs processes on a Linux host
//! needs, and nothing of the daemon: one SIGCHLD reaper, one spawn helper,
//! stdio plumbing, rootfs mounts, OOM watch, pod namespaces, cgroup stats
//! and runc's command line. A guest agent reuses it without linking an
//! engine or a gRPC stack.

pub mod console;
pub mod error;
pub mod mount;
pub mod oom;
pub mod podns;
pub mod reaper;
pub mod runc;
pub mod spawn;
pub mod stats;
pub mod stdio;

use protobuf::well_known_types::any::Any;
use protobuf::MessageDyn;

pub use error::{Error, Result};

/// Wraps `msg` in an Any whose type URL is the bare message name:
/// containerd 1.6 rejects the `type.googleapis.com/` prefix.
pub fn to_any(msg: &dyn MessageDyn) -> Any {
    let mut any = Any::new();
    any.type_url = msg.descriptor_dyn().full_name().to_string();
    any.value = msg.write_to_bytes_dyn().unwrap_or_default();
    any
}
