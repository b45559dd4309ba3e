//! containerd 2.x's Sandbox API, served over a [`Controller`] trait.
//!
//! CRI on containerd 2.x hands each pod to the sandbox controller named by
//! its runtime handler's `sandboxer` setting. Two kinds reach this crate:
//! - **proxy mode**, `sandboxer = "NAME"` with `[proxy_plugins.NAME]
//!   type = "sandbox"`: containerd dials the gRPC service
//!   `containerd.services.sandbox.v1.Controller` on that unix socket
//!   ([`serve_controller`]; containerd's client is
//!   `core/sandbox/proxy/controller.go`). Only the Controller is proxied:
//!   containerd keeps the sandbox Store itself
//!   (`cmd/containerd/server/server.go` LoadPlugins). containerd's own
//!   Controller API forwards `ctr`'s calls here too
//!   (`plugins/services/sandbox/controller_service.go`).
//! - **shim mode**, `sandboxer = "shim"`: containerd runs the shim binary's
//!   `start -id <sandbox id>` and calls the ttrpc service
//!   `containerd.runtime.sandbox.v1.Sandbox` at the printed address
//!   ([`handle_ttrpc`]; containerd's client is `plugins/sandbox/controller.go`).
//!
//! Every call carries the containerd namespace: gRPC metadata
//! `containerd-namespace`, ttrpc metadata `containerd-namespace-ttrpc`.
//! containerd maps error codes to its errdefs kinds (`errgrpc.ToNative`).
//!
//! # What containerd v2.1.9 sends and reads
//! Paths are in containerd's tree at v2.1.9.
//!
//! **Create**: CRI `RunPodSandbox` (`internal/cri/server/sandbox_run.go`),
//! after it has stored the sandbox record, made the netns and run CNI.
//! - `options`: the pod config, an Any of type `runtime.v1.PodSandboxConfig`
//!   (bare name, gogo-protobuf encoding of cri-api v0.32), in both modes.
//! - `netns_path`: the netns CRI made and CNI configured,
//!   `/var/run/netns/cni-<uuid>` (under CRI's state dir with
//!   `netns_mounts_under_state_dir`), empty for host-network pods. Same
//!   value in both modes.
//! - `rootfs` and `annotations`: empty from CRI; shim mode never forwards
//!   annotations.
//! - proxy mode only, `sandbox` (the record, `core/sandbox/helpers.go`
//!   ToProto): `runtime.name` is the handler's runtime_type (e.g.
//!   `io.containerd.kuasarrunc.v1`, i.e. which backend); `runtime.options` is
//!   its `options` table as `runtimeoptions.v1.Options` (absent without one);
//!   no `spec`; label `name` = CRI's pod name; `extensions["metadata"]` is an
//!   Any `github.com/containerd/cri/pkg/store/sandbox/Metadata` holding JSON
//!   `{"Version":"v1","Metadata":{ID,Name,Config,NetNSPath,IP,...}}`, the pod
//!   IP included; `sandboxer` = the proxy's name, as in the request.
//! - shim mode only, `bundle_path`:
//!   `<state>/io.containerd.sandbox.controller.v1.shim/<ns>/<id>`, a bundle
//!   without config.json; the runtime options went to `start` on stdin. On an
//!   error containerd sends ShutdownSandbox and runs `shim delete`.
//!
//! **Start**: CRI keeps `pid` and `created_at` as the pod's, reads label
//! `selinux_label`, and saves `address`/`version` as the pod's Task API
//! endpoint if `address` is non-empty. For each container CRI then passes
//! them to `ShimManager.Start` (`core/runtime/v2/shim_manager.go`), which
//! splits `address` at the first `+` (no `+`: StartContainer fails) and,
//! with `version` >= 3 ([`TASK_API_VERSION`]), writes `bootstrap.json` and
//! dials the address instead of running the shim binary: return
//! `ttrpc+unix:///abs/path.sock` and 3. An empty address makes containerd
//! look for a shim process of the sandbox, which proxy mode does not have.
//! In shim mode only `pid` and `created_at` are read; address and version
//! come from the shim's `start` output (a plain address means version 2, so
//! containers still run `start`).
//!
//! **Wait**: sent right after Start and again after a containerd restart,
//! on a context without deadline. Any error but Unavailable counts as the
//! pod's exit (status 255); the proxy retries Unavailable with backoff.
//! When it returns, CRI marks the pod NOTREADY with `exit_status` and
//! `exited_at`.
//!
//! **Status**: `state` must be exactly [`STATE_READY`] or
//! [`STATE_NOTREADY`] (`internal/cri/server/sandbox_status.go`
//! toCRISandboxStatus; other strings read as NOTREADY). PodSandboxStatus also
//! reads `created_at` (zero: falls back to the record's) and, when verbose,
//! `info` (conventionally `{"info": <JSON>}`, as the podsandbox controller
//! does); NotFound gives NOTREADY. CreateContainer reads `pid`: the
//! container's network, IPC and UTS namespaces are `/proc/<pid>/ns/*`
//! (`internal/cri/opts/spec_opts.go` WithPodNamespaces), so it must be a live
//! process holding the pod's namespaces. After a restart containerd re-reads
//! `address`/`version` from Status (`internal/cri/server/restart.go`). The
//! proxy ignores the reply's `sandbox_id`; shim mode passes it to CRI as the
//! containers' sandbox id, so [`handle_ttrpc`] echoes the request's.
//!
//! **Platform**: every CreateContainer and every ListContainerStats, per
//! pod. `os` must be `linux` ("unsupported spec platform" otherwise); an
//! error fails the whole stats listing. Only os, architecture and variant
//! are read.
//!
//! **Stop**: StopPodSandbox, after CRI stopped the containers, only while
//! the pod is READY or UNKNOWN, with `timeout_secs` 0 (none); then CRI tears
//! down CNI and removes the netns. NotFound is tolerated; shim mode also
//! tolerates Unavailable.
//!
//! **Shutdown**: RemovePodSandbox, after the containers are removed;
//! NotFound is tolerated. Shim mode then closes the connection and runs
//! `shim delete`.
//!
//! **Metrics**, **Update**: not sent by CRI in 2.1.9; only through
//! containerd's Controller API. Update carries no `sandboxer`.
//! **PingSandbox** (ttrpc): never sent by 2.1.9.

mod controller;
mod convert;
mod proxy;
mod shim;
mod status;
mod types;

pub use controller::Controller;
pub use kuasar_protocol::Code;
pub use proxy::{serve_controller, MAX_MESSAGE, NAMESPACE_HEADER};
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
