//! containerd 2.x's Sandbox API, served over a [`Controller`] trait.
//!
//! - proxy mode: gRPC `containerd.services.sandbox.v1.Controller`
//!   ([`serve_controller`]);
//! - shim mode: ttrpc `containerd.runtime.sandbox.v1.Sandbox`
//!   ([`handle_ttrpc`]).

mod controller;
mod convert;
mod proxy;
mod shim;
mod status;
mod types;

pub use controller::Controller;
pub use kuasar_protocol::Code;
pub use proxy::{serve_controller, NAMESPACE_HEADER};
pub use shim::{handle_ttrpc, TTRPC_SERVICE};
pub use status::Status;
pub use types::*;

/// containerd's gRPC messages (prost), for clients such as tests.
pub mod proto {
    pub mod containerd {
        pub mod types {
            include!(concat!(env!("OUT_DIR"), "/containerd.types.rs"));
        }
        pub mod services {
            pub mod sandbox {
                pub mod v1 {
                    include!(concat!(
                        env!("OUT_DIR"),
                        "/containerd.services.sandbox.v1.rs"
                    ));
                }
            }
        }
    }
}
