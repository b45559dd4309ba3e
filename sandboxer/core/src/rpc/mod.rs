//! ttrpc, the protocol containerd speaks to shims: framing, a server whose
//! listeners and connections are plain descriptors the daemon owns (so they
//! can outlive a re-executed daemon), and the small client used for events.

pub mod client;
pub mod frame;
pub mod journal;
pub mod server;

pub use server::{Handler, RequestContext};
