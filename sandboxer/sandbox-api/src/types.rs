//! The requests and replies of [`crate::Controller`]: plain Rust, so that the
//! daemon implementing it does not depend on either wire format.

use std::collections::HashMap;
use std::time::SystemTime;

/// `SandboxStatus::state` of a sandbox that can run containers. CRI maps the
/// string to its pod state; anything but these two reads as NOTREADY.
pub const STATE_READY: &str = "SANDBOX_READY";
/// `SandboxStatus::state` of a stopped (or never started) sandbox.
pub const STATE_NOTREADY: &str = "SANDBOX_NOTREADY";

/// Task API version to return with an address: 3 makes containerd 2.1 dial
/// the address directly for the pod's containers instead of running the shim
/// binary's `start`.
pub const TASK_API_VERSION: u32 = 3;

/// A `google.protobuf.Any`: a type URL and the encoded value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Any {
    pub type_url: String,
    pub value: Vec<u8>,
}

/// A mount in the form of mount(2).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mount {
    /// The filesystem type (`type` on the wire).
    pub kind: String,
    pub source: String,
    pub target: String,
    pub options: Vec<String>,
}

/// containerd's metadata record of a sandbox (`containerd.types.Sandbox`, its
/// Sandbox store entry), as the proxy sends it with Create and Update.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SandboxRecord {
    /// The runtime_type of the CRI runtime handler, e.g.
    /// `io.containerd.kuasarrunc.v1`: tells which backend owns the pod.
    pub runtime_name: String,
    /// The runtime's `options` table, if it has one.
    pub runtime_options: Option<Any>,
    /// A runtime spec; CRI sends none.
    pub spec: Option<Any>,
    pub labels: HashMap<String, String>,
    /// Opaque blobs by name; CRI stores its pod metadata under `metadata`.
    pub extensions: HashMap<String, Any>,
    /// The name of the controller that owns the sandbox.
    pub sandboxer: String,
    pub created_at: Option<SystemTime>,
    pub updated_at: Option<SystemTime>,
}

/// Create a sandbox (gRPC `Controller.Create`, ttrpc `CreateSandbox`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CreateSandbox {
    pub namespace: String,
    pub id: String,
    pub rootfs: Vec<Mount>,
    /// CRI: the pod's `runtime.v1.PodSandboxConfig`.
    pub options: Option<Any>,
    /// The pod's network namespace, made by CRI; empty for host networking.
    pub netns_path: String,
    pub annotations: HashMap<String, String>,
    /// The store record (gRPC only; `None` over ttrpc).
    pub sandbox: Option<SandboxRecord>,
    /// The controller name the request was sent to (gRPC only).
    pub sandboxer: String,
    /// The bundle containerd made for the sandbox (ttrpc only).
    pub bundle_path: String,
}

/// A started sandbox (reply to Start).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SandboxReady {
    /// A process whose `/proc/<pid>/ns/*` CRI joins the pod's containers to.
    pub pid: u32,
    pub created_at: Option<SystemTime>,
    /// Task API endpoint of the pod, `ttrpc+unix:///path` (gRPC only).
    pub address: String,
    /// [`TASK_API_VERSION`] (gRPC only).
    pub version: u32,
    /// CRI reads `selinux_label` (gRPC only).
    pub labels: HashMap<String, String>,
}

/// The OS and architecture the sandbox runs containers for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Platform {
    /// Must be `linux` for CRI to build a container spec.
    pub os: String,
    pub architecture: String,
    pub variant: String,
    pub os_version: String,
}

/// How a sandbox ended (reply to Wait).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SandboxExit {
    pub exit_status: u32,
    pub exited_at: Option<SystemTime>,
}

/// A sandbox's state (reply to Status). The transport fills in the sandbox
/// id from the request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SandboxStatus {
    pub pid: u32,
    /// [`STATE_READY`] or [`STATE_NOTREADY`].
    pub state: String,
    /// Verbose details; CRI shows it as PodSandboxStatus `info` (key `info`,
    /// a JSON document by convention).
    pub info: HashMap<String, String>,
    pub created_at: Option<SystemTime>,
    pub exited_at: Option<SystemTime>,
    pub extra: Option<Any>,
    /// As in [`SandboxReady`]: containerd re-reads them after its restart
    /// (gRPC only).
    pub address: String,
    pub version: u32,
}

/// A sandbox metrics sample (reply to Metrics).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Metric {
    pub timestamp: Option<SystemTime>,
    pub id: String,
    pub data: Option<Any>,
}

/// A change to containerd's record of the sandbox (gRPC `Controller.Update`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpdateSandbox {
    pub namespace: String,
    pub id: String,
    pub sandbox: Option<SandboxRecord>,
    /// The record fields that changed (`labels`, `extensions`, ...).
    pub fields: Vec<String>,
}
