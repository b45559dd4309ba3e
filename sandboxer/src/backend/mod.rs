//! The seam between the generic task layer and what runs the workload.
//! A backend says only how to run a container of its kind; the Task API,
//! events, stdio plumbing, rootfs mounts and persistence live above it.

pub mod runc;
pub mod stats;
pub mod wasm;

use std::os::fd::OwnedFd;
use std::path::PathBuf;

use async_trait::async_trait;
use containerd_shim_protos::api::ProcessInfo;
use kuasar_protocol::Kind;
use protobuf::well_known_types::any::Any;
use tokio::sync::mpsc;

use crate::error::Result;
use crate::stdio::{IoFds, StdioPaths};

/// What a container reports to the task layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerEvent {
    /// A process ended: exec id (`None` for init) and exit status in
    /// containerd's convention.
    Exit(Option<String>, u32),
    /// The container ran out of memory.
    Oom,
}

/// Where a container reports its events.
pub type EventSink = mpsc::UnboundedSender<ContainerEvent>;

/// What a backend needs to create a container. The bundle holds
/// `config.json`, and its `rootfs` is already mounted.
pub struct CreateRequest {
    pub namespace: String,
    pub id: String,
    pub bundle: PathBuf,
    pub stdio: StdioPaths,
    pub events: EventSink,
    /// containerd's gRPC socket (empty if unknown), where its images are.
    pub containerd: String,
}

/// A container a predecessor daemon ran (live upgrade): what is known of
/// it, and which of its processes still live.
pub struct RestoreRequest {
    pub namespace: String,
    pub id: String,
    pub bundle: PathBuf,
    pub pid: u32,
    /// The init process has not exited yet.
    pub init_live: bool,
    /// Started exec processes: exec id, pid, not exited yet.
    pub execs: Vec<(String, u32, bool)>,
    /// The stdio plumbing of its processes, as handed over.
    pub io: Vec<ProcessIoHandover>,
    pub events: EventSink,
}

/// What a live upgrade hands over of one process's stdio plumbing.
#[derive(Debug, Default)]
pub struct ProcessIoHandover {
    /// `None` for the init process.
    pub exec_id: Option<String>,
    /// The terminal master.
    pub master: Option<OwnedFd>,
    pub fds: IoFds,
    /// A `binary://` log driver.
    pub logger_pid: Option<i32>,
    /// The stdin FIFO, reopened if the copy had not opened it yet.
    pub stdin_path: String,
}

#[async_trait]
pub trait Backend: Send + Sync {
    fn kind(&self) -> Kind;

    /// Creates the container; its init process exists but has not started.
    async fn create(&self, req: CreateRequest) -> Result<Box<dyn Container>>;

    /// Removes whatever is left of a container the daemon no longer tracks
    /// (containerd's `shim delete` after a lost connection or a restart).
    async fn cleanup(&self, namespace: &str, id: &str) -> Result<()>;

    /// Takes over a container from a predecessor daemon, reporting the
    /// exits of its live processes from now on.
    async fn restore(&self, req: RestoreRequest) -> Result<Box<dyn Container>> {
        Err(crate::error::Error::Unimplemented(format!(
            "the {} backend cannot take over container {}",
            self.kind(),
            req.id
        )))
    }
}

/// One container of a backend. `exec_id` `None` means the init process.
#[async_trait]
pub trait Container: Send + Sync {
    /// The init process's pid (0 where a backend has no host process).
    fn pid(&self) -> u32;

    async fn start(&self) -> Result<u32>;

    /// Whether Exec can add processes to this container.
    fn exec_supported(&self) -> Result<()> {
        Ok(())
    }

    /// Starts a process added with Exec; `spec` is the OCI process as JSON.
    async fn exec(&self, exec_id: &str, spec: &[u8], stdio: &StdioPaths) -> Result<u32>;

    async fn kill(&self, exec_id: Option<&str>, signal: u32, all: bool) -> Result<()>;

    async fn pause(&self) -> Result<()>;

    async fn resume(&self) -> Result<()>;

    /// `resources` is an OCI `LinuxResources` as JSON.
    async fn update(&self, resources: &[u8]) -> Result<()>;

    /// An Any of `io.containerd.cgroups.v1.Metrics` or `...v2.Metrics`.
    async fn stats(&self) -> Result<Any>;

    async fn pids(&self) -> Result<Vec<ProcessInfo>>;

    async fn resize_pty(&self, exec_id: Option<&str>, width: u32, height: u32) -> Result<()>;

    async fn close_stdin(&self, exec_id: Option<&str>) -> Result<()>;

    /// Releases an exited exec process's resources.
    async fn delete_exec(&self, exec_id: &str);

    /// Removes the container; `force` kills what still runs.
    async fn delete(&self, force: bool) -> Result<()>;

    /// Duplicates of its processes' stdio plumbing, for a live upgrade.
    async fn handover_io(&self) -> Vec<ProcessIoHandover> {
        Vec::new()
    }
}
