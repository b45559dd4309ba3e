//! The seam between the generic layer and what runs the workload. A backend
//! creates sandboxes (pods); a sandbox creates the containers that belong to
//! it. The Task API, the sandbox lifecycle as containerd sees it, events,
//! stdio plumbing and persistence live above this seam; a backend says only
//! how its sandboxes and containers run, and declares what it can do.

/// The core's tests and the fuzz targets drive the daemon with it.
#[doc(hidden)]
pub mod fake;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim_protos::api::{Mount, ProcessInfo};
use kuasar_protocol::Kind;
use protobuf::well_known_types::any::Any;
use tokio::sync::mpsc;

use crate::error::Result;
use kuasar_host::stdio::{IoFds, StdioPaths};

/// An opaque record a backend persists and hands over for one of its
/// sandboxes or containers; the generic layer stores it and gives it back.
pub type BackendRecord = serde_json::Value;

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

/// What a backend declares it can do. The generic layer asks this, never
/// which kind it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Its workloads live outside the daemon's memory, so a re-executed
    /// daemon can take them over (live upgrade).
    pub survives_reexec: bool,
    /// Its workloads can be taken over by a daemon restarted after a crash
    /// (from persisted records and the descriptors the holder kept).
    pub survives_crash: bool,
}

/// What a backend needs to create a sandbox.
#[derive(Clone, Debug, Default)]
pub struct SandboxRequest {
    pub namespace: String,
    pub id: String,
    /// Set for a pod made through containerd's Sandbox API, whose sandbox
    /// holds the pod's namespaces. `None`: its containers bring their own
    /// (a pause container holds them) or use the host's.
    pub pod: Option<PodConfig>,
    /// A directory of the daemon's reserved for this sandbox.
    pub state_dir: PathBuf,
    /// What the pod asks for as a whole (sizes a VM).
    pub resources: SandboxResources,
    /// Where the sandbox keeps descriptors that must outlive a crash of
    /// the daemon, and finds them after one.
    pub parking: Parking,
}

/// A sandbox's corner of the holder's descriptor store: what it parks
/// there outlives a crash of the daemon, and the restarted daemon finds it
/// again by name. Without a holder, parking does nothing and nothing is
/// found.
#[derive(Clone, Default)]
pub struct Parking {
    inner: Option<Arc<ParkingInner>>,
}

struct ParkingInner {
    store: Arc<crate::fdstore::FdStore>,
    prefix: String,
    /// What a crashed predecessor parked, until taken.
    found: std::sync::Mutex<std::collections::HashMap<String, OwnedFd>>,
}

impl std::fmt::Debug for Parking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            Some(i) => write!(f, "Parking({})", i.prefix),
            None => write!(f, "Parking(none)"),
        }
    }
}

impl Parking {
    /// Names under `prefix` in `store`; `found` is what a predecessor
    /// parked there, by name without the prefix.
    pub fn new(
        store: Arc<crate::fdstore::FdStore>,
        prefix: String,
        found: std::collections::HashMap<String, OwnedFd>,
    ) -> Parking {
        Parking {
            inner: Some(Arc::new(ParkingInner {
                store,
                prefix,
                found: std::sync::Mutex::new(found),
            })),
        }
    }

    /// Whether what is parked outlives a crash (a holder keeps it).
    pub fn held(&self) -> bool {
        self.inner.as_ref().is_some_and(|i| i.store.held())
    }

    /// Parks `fd` under `name`, replacing what was parked under it.
    pub fn park(&self, name: &str, fd: std::os::fd::BorrowedFd<'_>) {
        if let Some(i) = &self.inner {
            i.store.store(&format!("{}{name}", i.prefix), &[fd]);
        }
    }

    /// Lets go of what is parked under `name`.
    pub fn unpark(&self, name: &str) {
        if let Some(i) = &self.inner {
            i.store.remove(&format!("{}{name}", i.prefix));
        }
    }

    /// What a crashed predecessor parked under `name`; it stays parked.
    pub fn take(&self, name: &str) -> Option<OwnedFd> {
        self.inner
            .as_ref()
            .and_then(|i| i.found.lock().unwrap().remove(name))
    }

    /// Lets go of everything a predecessor parked that was not taken.
    pub fn unpark_rest(&self) {
        let Some(i) = &self.inner else { return };
        let rest: Vec<String> = i.found.lock().unwrap().drain().map(|(n, _)| n).collect();
        for name in rest {
            self.unpark(&name);
        }
    }
}

/// What a pod asks for as a whole: from the Sandbox API's pod config, or,
/// for a sandbox made at its first container's Create, from that
/// container's spec.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SandboxResources {
    pub annotations: std::collections::HashMap<String, String>,
    pub memory_limit_bytes: Option<u64>,
    /// CPU quota over period.
    pub cpus: Option<f64>,
}

impl SandboxResources {
    /// From an OCI spec: its annotations and `linux.resources`.
    pub fn from_spec(spec: &serde_json::Value) -> SandboxResources {
        let annotations = spec["annotations"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        let r = &spec["linux"]["resources"];
        let memory_limit_bytes = r["memory"]["limit"]
            .as_i64()
            .filter(|l| *l > 0)
            .map(|l| l as u64);
        SandboxResources {
            annotations,
            memory_limit_bytes,
            cpus: cpus(r["cpu"]["quota"].as_i64(), r["cpu"]["period"].as_u64()),
        }
    }
}

/// CPUs from a CFS quota and period (none when either is unset).
pub fn cpus(quota: Option<i64>, period: Option<u64>) -> Option<f64> {
    match (quota, period) {
        (Some(q), Some(p)) if q > 0 && p > 0 => Some(q as f64 / p as f64),
        _ => None,
    }
}

/// What containerd's Sandbox API says of a pod.
#[derive(Clone, Debug, Default)]
pub struct PodConfig {
    /// The network namespace containerd made and configured (CNI); `None`
    /// for host networking.
    pub netns: Option<PathBuf>,
    pub hostname: Option<String>,
}

/// What a sandbox needs to create a container. The bundle holds
/// `config.json`; `rootfs` are the mounts containerd sent, which the
/// backend makes available to the container (and removes on delete).
pub struct CreateRequest {
    pub namespace: String,
    pub id: String,
    pub bundle: PathBuf,
    pub rootfs: Vec<Mount>,
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
    /// What the container's [`Container::record`] said.
    pub record: BackendRecord,
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

    fn capabilities(&self) -> Capabilities;

    /// Creates a sandbox; it holds nothing running until started.
    async fn create_sandbox(&self, req: SandboxRequest) -> Result<Arc<dyn Sandbox>>;

    /// Takes over a sandbox from a predecessor daemon, from what its
    /// [`Sandbox::handover`] said and the descriptors it handed over.
    async fn restore_sandbox(
        &self,
        req: SandboxRequest,
        record: BackendRecord,
        fds: Vec<OwnedFd>,
    ) -> Result<Arc<dyn Sandbox>>;

    /// Releases what a sandbox of a crashed predecessor holds, when its
    /// workloads cannot be taken over (`survives_crash` false): processes,
    /// mounts, files.
    async fn discard_sandbox(&self, _req: SandboxRequest, _record: BackendRecord) -> Result<()> {
        Ok(())
    }

    /// Removes what the backend holds of containers no record names (a
    /// crash between making one and recording it). `known`: every
    /// (namespace, id) recorded.
    async fn reconcile(&self, _known: &[(String, String)]) -> Result<()> {
        Ok(())
    }

    /// Removes whatever is left of a container the daemon no longer tracks
    /// (containerd's `shim delete` after a lost connection or a restart),
    /// its rootfs included when its bundle is known.
    async fn cleanup(&self, namespace: &str, id: &str, bundle: Option<&Path>) -> Result<()>;
}

/// One sandbox (pod) of a backend: what its containers share.
#[async_trait]
pub trait Sandbox: Send + Sync {
    /// Makes the sandbox ready for containers (pins the pod's namespaces,
    /// boots a VM); returns the pid containerd may report for it, 0 where
    /// the sandbox has no process.
    async fn start(&self) -> Result<u32>;

    /// Releases what `start` set up. Its containers are gone by then.
    async fn stop(&self) -> Result<()>;

    /// Metrics of the sandbox as a whole, if it has any of its own.
    async fn metrics(&self) -> Result<Option<Any>> {
        Ok(None)
    }

    /// Creates a container in this sandbox; its init process exists but
    /// has not started. A failure leaves nothing behind.
    async fn create_container(&self, req: CreateRequest) -> Result<Box<dyn Container>>;

    /// Takes over a container from a predecessor daemon, reporting the
    /// exits of its live processes from now on.
    async fn restore_container(&self, req: RestoreRequest) -> Result<Box<dyn Container>>;

    /// What a successor needs to take this sandbox over.
    fn record(&self) -> BackendRecord {
        BackendRecord::Null
    }

    /// The record and the descriptors a successor inherits, for a live
    /// upgrade. Called once no call reaches the sandbox any more; a
    /// sandbox may hold what it runs still here (until
    /// [`Sandbox::handover_aborted`] or the successor takes over).
    async fn handover(&self) -> Result<(BackendRecord, Vec<OwnedFd>)> {
        Ok((self.record(), Vec::new()))
    }

    /// The upgrade failed after [`Sandbox::handover`]: serve on.
    async fn handover_aborted(&self) {}
}

/// One container of a sandbox. `exec_id` `None` means the init process.
#[async_trait]
pub trait Container: Send + Sync {
    /// The pid containerd reports for the init process (0 where the backend
    /// runs no process for it).
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

    /// Removes the container and its rootfs; `force` kills what still runs.
    async fn delete(&self, force: bool) -> Result<()>;

    /// Duplicates of its processes' stdio plumbing, for a live upgrade.
    async fn handover_io(&self) -> Vec<ProcessIoHandover> {
        Vec::new()
    }

    /// What a successor needs besides the generic task record.
    fn record(&self) -> BackendRecord {
        BackendRecord::Null
    }
}
