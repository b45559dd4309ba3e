//! The daemon's registry: sandboxes (one task socket each) and tasks, keyed
//! by (namespace, id), and the two requests of the private API.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};

use kuasar_protocol::{wire, Kind};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::backend::{self, Backend, ProcessIoHandover, SandboxRequest};
use crate::config::Config;
use crate::error::{io_context, Error, Result};
use crate::events::Publisher;
use crate::fdstore::FdStore;
use crate::ids;
use crate::rpc;
use crate::rpc::server::{ConnHandover, ConnScope, Registry};
use crate::state::{Record, StateStore};
use crate::task::{service::TaskService, ExitInfo, Task, TaskRecord};
use crate::upgrade::{SandboxHandover, SandboxState};
use kuasar_host::reaper::Reaper;
use std::time::SystemTime;

/// Exit status reported for a task containerd gave up on (128 + SIGKILL).
const KILLED: u32 = 137;
/// How long a deleted task's exit is kept for containerd's `shim delete`.
const DELETED_TTL: std::time::Duration = std::time::Duration::from_secs(60);
/// Longest `unix://` address containerd can dial.
const MAX_ADDRESS: usize = 106;

pub type Key = (String, String);

/// A pod: its task socket, its backend's side, its lifecycle as
/// containerd's Sandbox API sees it, and the containers that belong to it.
pub struct Sandbox {
    pub namespace: String,
    pub id: String,
    pub kind: Kind,
    pub socket: PathBuf,
    pub address: String,
    /// containerd's ttrpc socket, for this sandbox's events.
    pub ttrpc_address: Mutex<String>,
    /// containerd's gRPC socket, to read images from its content store.
    pub grpc_address: Mutex<String>,
    /// Containers resolved to this sandbox and not yet deleted.
    members: Mutex<HashSet<String>>,
    listener: Mutex<Option<JoinHandle<()>>>,
    /// The listening socket, kept apart from the accept task so that the
    /// socket outlives it across a live upgrade.
    listen_fd: OwnedFd,
    life: Mutex<Lifecycle>,
    /// Serialises create, start and stop.
    transition: tokio::sync::Mutex<()>,
    exited: watch::Sender<Option<ExitInfo>>,
    state: StateStore,
    /// Forgotten by the daemon: no record is written any more.
    released: std::sync::atomic::AtomicBool,
}

/// The descriptor-store name of a process's parked stderr.
pub fn stderr_name(namespace: &str, id: &str, exec_id: &str) -> String {
    match exec_id {
        "" => format!("e/{namespace}/{id}"),
        e => format!("e/{namespace}/{id}/{e}"),
    }
}

/// The stdio descriptors of a process the daemon holds and parks (see
/// [`Daemon::park_io`]), by the field of [`ProcessIoHandover`] they fill.
pub const IO_FIELDS: [&str; 4] = ["master", "stdin_from", "stdin_to", "output_to"];

/// The descriptor-store name of one stdio descriptor of a process.
pub fn io_name(namespace: &str, id: &str, exec_id: &str, field: &str) -> String {
    match exec_id {
        "" => format!("io/{namespace}/{id}/i/{field}"),
        e => format!("io/{namespace}/{id}/e/{e}/{field}"),
    }
}

/// The descriptor-store name of a sandbox's listening socket.
pub fn listener_name(namespace: &str, id: &str) -> String {
    format!("l/{namespace}/{id}")
}

/// The prefix of what a sandbox's backend parks in the descriptor store.
pub fn parking_prefix(namespace: &str, id: &str) -> String {
    format!("b/{namespace}/{id}/")
}

/// Where a sandbox stands.
struct Lifecycle {
    /// What the backend runs for the pod, once created.
    backend: Option<Arc<dyn backend::Sandbox>>,
    /// Made through the Sandbox API: it lives until Shutdown, not until
    /// its last container leaves.
    explicit: bool,
    ready: bool,
    pid: u32,
    created_at: SystemTime,
}

/// A sandbox's state for the Sandbox API.
pub struct SandboxView {
    pub ready: bool,
    pub pid: u32,
    pub created_at: SystemTime,
    pub exit: Option<ExitInfo>,
}

impl Sandbox {
    pub fn ttrpc_address(&self) -> String {
        self.ttrpc_address.lock().unwrap().clone()
    }

    pub fn grpc_address(&self) -> String {
        self.grpc_address.lock().unwrap().clone()
    }

    pub fn add_member(&self, id: &str) {
        self.members.lock().unwrap().insert(id.to_string());
    }

    /// The backend's sandbox, if it was created.
    pub fn backend(&self) -> Option<Arc<dyn backend::Sandbox>> {
        self.life.lock().unwrap().backend.clone()
    }

    pub fn is_explicit(&self) -> bool {
        self.life.lock().unwrap().explicit
    }

    /// Containers resolved to it and not yet deleted.
    pub fn members(&self) -> Vec<String> {
        self.members.lock().unwrap().iter().cloned().collect()
    }

    pub fn view(&self) -> SandboxView {
        let life = self.life.lock().unwrap();
        SandboxView {
            ready: life.ready,
            pid: life.pid,
            created_at: life.created_at,
            exit: *self.exited.borrow(),
        }
    }

    /// The backend's sandbox, ready for containers. A pod whose containers
    /// arrive without a Sandbox API call first (a pause container, a
    /// container of no pod) is created and started here.
    /// `bundle` is the first container's: its spec says what the pod asks
    /// for.
    pub async fn ready_backend(
        &self,
        daemon: &Daemon,
        bundle: &std::path::Path,
    ) -> Result<Arc<dyn backend::Sandbox>> {
        let _t = self.transition.lock().await;
        let (backend, ready) = {
            let life = self.life.lock().unwrap();
            (life.backend.clone(), life.ready)
        };
        match backend {
            Some(b) if ready => Ok(b),
            Some(_) => Err(Error::FailedPrecondition(format!(
                "sandbox {} is not ready",
                self.id
            ))),
            None => {
                let mut req = daemon.sandbox_request(&self.namespace, &self.id);
                if let Ok(spec) = std::fs::read(bundle.join("config.json")) {
                    if let Ok(spec) = serde_json::from_slice(&spec) {
                        req.resources = backend::SandboxResources::from_spec(&spec);
                    }
                }
                let b = daemon.backend(self.kind)?.create_sandbox(req).await?;
                let pid = b.start().await?;
                {
                    let mut life = self.life.lock().unwrap();
                    life.backend = Some(b.clone());
                    life.ready = true;
                    life.pid = pid;
                }
                self.persist();
                Ok(b)
            }
        }
    }

    /// Sandbox API Create: the backend's sandbox, made with what containerd
    /// prepared for the pod.
    pub async fn create_backend(&self, backend: &dyn Backend, req: SandboxRequest) -> Result<()> {
        let _t = self.transition.lock().await;
        if self.life.lock().unwrap().backend.is_some() {
            return Err(Error::AlreadyExists(format!(
                "sandbox {} already exists",
                self.id
            )));
        }
        let b = backend.create_sandbox(req).await?;
        {
            let mut life = self.life.lock().unwrap();
            life.backend = Some(b);
            life.explicit = true;
            life.created_at = SystemTime::now();
        }
        self.persist();
        Ok(())
    }

    /// Sandbox API Start; returns the sandbox's pid (0: none).
    pub async fn start(&self) -> Result<u32> {
        let _t = self.transition.lock().await;
        let backend = self.backend().ok_or_else(|| {
            Error::FailedPrecondition(format!("sandbox {} was not created", self.id))
        })?;
        if self.exited.borrow().is_some() {
            return Err(Error::FailedPrecondition(format!(
                "sandbox {} has stopped",
                self.id
            )));
        }
        if self.life.lock().unwrap().ready {
            return Ok(self.life.lock().unwrap().pid);
        }
        let pid = backend.start().await?;
        {
            let mut life = self.life.lock().unwrap();
            life.ready = true;
            life.pid = pid;
        }
        self.persist();
        Ok(pid)
    }

    /// Releases what the backend set up for the pod and wakes every Wait;
    /// idempotent.
    pub async fn stop(&self) -> Result<()> {
        let _t = self.transition.lock().await;
        if self.exited.borrow().is_some() {
            return Ok(());
        }
        if let Some(b) = self.backend() {
            b.stop().await?;
        }
        self.life.lock().unwrap().ready = false;
        self.exited.send_replace(Some(ExitInfo {
            status: 0,
            at: SystemTime::now(),
        }));
        self.persist();
        Ok(())
    }

    /// Waits until the sandbox has stopped.
    pub async fn wait(&self) -> ExitInfo {
        let mut rx = self.exited.subscribe();
        loop {
            if let Some(exit) = *rx.borrow_and_update() {
                return exit;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    fn handover_state(&self) -> SandboxState {
        let life = self.life.lock().unwrap();
        SandboxState {
            // Pods of earlier versions had no lifecycle: their backend side
            // existed, ready, whenever they had a container.
            created: life.backend.is_some(),
            explicit: life.explicit,
            ready: life.ready,
            pid: life.pid,
            created_at_nanos: crate::task::nanos(life.created_at),
            exited_at_nanos: self.exited.borrow().map(|e| crate::task::nanos(e.at)),
        }
    }

    /// What is persisted of the sandbox: what a live upgrade hands over,
    /// without descriptors (a restart after a crash takes those from the
    /// holder).
    fn record(&self) -> SandboxHandover {
        SandboxHandover {
            namespace: self.namespace.clone(),
            id: self.id.clone(),
            kind: self.kind.as_str().into(),
            socket: self.socket.clone(),
            address: self.address.clone(),
            ttrpc_address: self.ttrpc_address(),
            grpc_address: self.grpc_address(),
            members: self.members.lock().unwrap().iter().cloned().collect(),
            backend: self.backend().map(|b| b.record()).unwrap_or_default(),
            state: self.handover_state(),
            fd: -1,
            fds: Vec::new(),
        }
    }

    /// Writes the sandbox's record (after every change of its lifecycle).
    pub fn persist(&self) {
        if self.released.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        if let Err(e) = self
            .state
            .save(Record::Sandbox, &self.namespace, &self.id, &self.record())
        {
            tracing::warn!("persisting sandbox {}: {e}", self.id);
        }
    }
}

pub struct Daemon {
    pub config: Config,
    pub reaper: Arc<Reaper>,
    pub publisher: Arc<Publisher>,
    backends: HashMap<Kind, Arc<dyn Backend>>,
    state: StateStore,
    socket_dir: PathBuf,
    sandboxes: Mutex<HashMap<Key, Arc<Sandbox>>>,
    /// Held while a sandbox is made, so that one id gets one sandbox.
    creating: tokio::sync::Mutex<()>,
    tasks: Mutex<HashMap<Key, Arc<Task>>>,
    /// Tasks deleted and cleaned up a moment ago, with their exit. containerd
    /// runs `shim delete` after every task delete: this answers it without
    /// another runc call on the path of every container.
    deleted: Mutex<HashMap<Key, (wire::DeleteResponse, std::time::Instant)>>,
    /// Every accepted task connection, for a live upgrade.
    pub conns: Arc<Registry>,
    /// Private-API requests being handled, which a live upgrade waits for.
    pub control_calls: AtomicUsize,
    /// Where listeners and connections are parked to outlive a crash.
    pub store: Arc<FdStore>,
    allowed_uids: Arc<Vec<u32>>,
    /// stderr write ends parked in the holder (see `park_stderr`).
    parked: Mutex<HashSet<String>>,
    /// What `kuasar-ctl health` reports of this image.
    pub image: crate::inspect::ImageLog,
    /// `kuasar-ctl upgrade` asks the daemon's main loop for a live upgrade,
    /// as SIGUSR2 does (a permit is kept until the loop takes it).
    pub upgrade_requested: tokio::sync::Notify,
}

fn key(namespace: &str, id: &str) -> Key {
    (namespace.to_string(), id.to_string())
}

/// A short, stable file name for a sandbox's socket: sun_path is 108 bytes.
fn socket_name(namespace: &str, id: &str) -> String {
    // FNV-1a, 64 bit.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in namespace.bytes().chain([0]).chain(id.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}.sock")
}

impl Daemon {
    pub fn new(
        config: Config,
        reaper: Arc<Reaper>,
        backends: Vec<Arc<dyn Backend>>,
    ) -> Result<Arc<Daemon>> {
        Daemon::with_store(config, reaper, backends, Arc::new(FdStore::none()))
    }

    /// A daemon that parks its listeners and connections in `store`.
    pub fn with_store(
        config: Config,
        reaper: Arc<Reaper>,
        backends: Vec<Arc<dyn Backend>>,
        store: Arc<FdStore>,
    ) -> Result<Arc<Daemon>> {
        let root = config.root.clone();
        let socket_dir = root.join("t");
        for dir in [&root, &socket_dir] {
            std::fs::create_dir_all(dir)
                .map_err(io_context(format!("creating {}", dir.display())))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
                .map_err(io_context(format!("securing {}", dir.display())))?;
        }
        let longest = format!("unix://{}", socket_dir.join(socket_name("", "")).display());
        if longest.len() >= MAX_ADDRESS {
            return Err(Error::InvalidArgument(format!(
                "root {} is too long: task addresses like {longest} exceed {MAX_ADDRESS} bytes",
                root.display()
            )));
        }
        Ok(Arc::new(Daemon {
            allowed_uids: Arc::new(config.allowed_uids.clone()),
            store,
            parked: Mutex::default(),
            state: StateStore::new(root.join("state")),
            socket_dir,
            config,
            reaper,
            // Before anything can publish: what an earlier process spooled
            // goes first.
            publisher: Arc::new(Publisher::new(root.join("events"))),
            backends: backends.into_iter().map(|b| (b.kind(), b)).collect(),
            sandboxes: Mutex::new(HashMap::new()),
            creating: tokio::sync::Mutex::new(()),
            tasks: Mutex::new(HashMap::new()),
            deleted: Mutex::new(HashMap::new()),
            conns: Arc::new(Registry::default()),
            control_calls: AtomicUsize::new(0),
            image: Default::default(),
            upgrade_requested: tokio::sync::Notify::new(),
        }))
    }

    pub fn backend(&self, kind: Kind) -> Result<Arc<dyn Backend>> {
        self.backends.get(&kind).cloned().ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "the {kind} backend is not enabled in this kuasar-sandboxer"
            ))
        })
    }

    pub fn task(&self, namespace: &str, id: &str) -> Result<Arc<Task>> {
        self.tasks
            .lock()
            .unwrap()
            .get(&key(namespace, id))
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("task {id} not found in namespace {namespace}")))
    }

    pub fn sandbox(&self, namespace: &str, id: &str) -> Result<Arc<Sandbox>> {
        self.sandboxes
            .lock()
            .unwrap()
            .get(&key(namespace, id))
            .cloned()
            .ok_or_else(|| {
                Error::NotFound(format!("sandbox {id} not found in namespace {namespace}"))
            })
    }

    /// Every sandbox, at this moment.
    pub fn sandboxes(&self) -> Vec<Arc<Sandbox>> {
        self.sandboxes.lock().unwrap().values().cloned().collect()
    }

    /// Every task, at this moment.
    pub fn tasks(&self) -> Vec<Arc<Task>> {
        self.tasks.lock().unwrap().values().cloned().collect()
    }

    /// The kinds whose backend is enabled.
    pub fn enabled_kinds(&self) -> Vec<Kind> {
        Kind::ALL
            .into_iter()
            .filter(|k| self.backends.contains_key(k))
            .collect()
    }

    pub fn has_task(&self, namespace: &str, id: &str) -> bool {
        self.tasks.lock().unwrap().contains_key(&key(namespace, id))
    }

    pub fn insert_task(&self, task: Arc<Task>) -> Result<()> {
        let mut tasks = self.tasks.lock().unwrap();
        let k = key(&task.namespace, &task.id);
        if tasks.contains_key(&k) {
            return Err(Error::AlreadyExists(format!(
                "task {} already exists",
                task.id
            )));
        }
        // A new task of a reused id: an old tombstone no longer speaks for it.
        self.deleted.lock().unwrap().remove(&k);
        tasks.insert(k, task);
        Ok(())
    }

    pub fn save_task(&self, task: &Task) {
        let removed = task.persisted.lock().unwrap();
        if *removed {
            return;
        }
        if let Err(e) = self
            .state
            .save(Record::Task, &task.namespace, &task.id, &task.record())
        {
            tracing::warn!("persisting task {}: {e}", task.id);
        }
    }

    /// Drops a deleted task and, with its last container, its sandbox.
    pub fn remove_task(&self, namespace: &str, id: &str) -> Option<Arc<Task>> {
        let task = self.tasks.lock().unwrap().remove(&key(namespace, id));
        match &task {
            Some(t) => {
                let mut removed = t.persisted.lock().unwrap();
                *removed = true;
                self.state.remove(Record::Task, namespace, id);
                let view = t.init.view();
                let now = std::time::SystemTime::now();
                let tombstone = wire::DeleteResponse {
                    pid: view.pid,
                    exit_status: view.exit.map(|e| e.status).unwrap_or(KILLED),
                    exited_at_nanos: crate::task::nanos(view.exit.map(|e| e.at).unwrap_or(now)),
                };
                let mut deleted = self.deleted.lock().unwrap();
                deleted.retain(|_, (_, at)| at.elapsed() < DELETED_TTL);
                deleted.insert(key(namespace, id), (tombstone, std::time::Instant::now()));
                // Whatever of its stdio is still parked goes with it.
                let execs: Vec<String> = t.execs.lock().unwrap().keys().cloned().collect();
                for exec in std::iter::once("").chain(execs.iter().map(String::as_str)) {
                    self.unpark_io(namespace, id, exec);
                }
            }
            None => self.state.remove(Record::Task, namespace, id),
        }
        let sandbox_id = task.as_ref().map(|t| t.sandbox_id.clone());
        self.leave_sandbox(namespace, id, sandbox_id.as_deref());
        task
    }

    fn save_sandbox(&self, sandbox: &Sandbox) {
        sandbox.persist();
    }

    /// Removes `id` from its sandbox; the last one out closes the socket.
    /// Connections already accepted stay open until containerd closes them.
    fn leave_sandbox(&self, namespace: &str, id: &str, sandbox_id: Option<&str>) {
        let sandboxes = self.sandboxes.lock().unwrap();
        let found = match sandbox_id {
            Some(s) => sandboxes.get(&key(namespace, s)).cloned(),
            None => sandboxes
                .values()
                .find(|s| s.namespace == namespace && s.members.lock().unwrap().contains(id))
                .cloned(),
        };
        let Some(sandbox) = found else { return };
        let empty = {
            let mut m = sandbox.members.lock().unwrap();
            m.remove(id);
            m.is_empty()
        };
        let busy = !empty
            || sandbox.is_explicit()
            || self
                .tasks
                .lock()
                .unwrap()
                .values()
                .any(|t| t.namespace == namespace && t.sandbox_id == sandbox.id);
        drop(sandboxes);
        if busy {
            self.save_sandbox(&sandbox);
            return;
        }
        self.release_sandbox(&sandbox);
        tokio::spawn(async move {
            if let Err(e) = sandbox.stop().await {
                tracing::warn!(sandbox = %sandbox.id, "stopping the sandbox: {e}");
            }
        });
    }

    fn parse_kind(&self, kind: &str) -> Result<Kind> {
        let kind: Kind = kind.parse().map_err(Error::InvalidArgument)?;
        self.backend(kind)?;
        Ok(kind)
    }

    /// `shim start`: the address of the sandbox `req` belongs to, creating
    /// the sandbox (and its listening socket) on first use.
    pub async fn resolve(self: &Arc<Self>, req: &wire::ResolveRequest) -> Result<String> {
        let kind = self.parse_kind(&req.kind)?;
        ids::validate("namespace", &req.namespace)?;
        ids::validate("id", &req.id)?;
        let sandbox_id = if req.group.is_empty() {
            &req.id
        } else {
            &req.group
        };
        ids::validate("sandbox id", sandbox_id)?;
        if !req.bundle.is_empty() {
            ids::validate_path("bundle", &req.bundle)?;
        }
        for (what, address) in [
            ("ttrpc address", &req.ttrpc_address),
            ("grpc address", &req.grpc_address),
        ] {
            if !address.is_empty() {
                ids::validate_address(what, address)?;
            }
        }
        let sandbox = match self.find_sandbox(&req.namespace, sandbox_id, kind)? {
            Some(s) => s,
            None => self.open_implicit(&req.namespace, sandbox_id, kind).await?,
        };
        if !req.ttrpc_address.is_empty() {
            *sandbox.ttrpc_address.lock().unwrap() = req.ttrpc_address.clone();
        }
        if !req.grpc_address.is_empty() {
            *sandbox.grpc_address.lock().unwrap() = req.grpc_address.clone();
        }
        sandbox.add_member(&req.id);
        self.save_sandbox(&sandbox);
        tracing::info!(namespace = %req.namespace, id = %req.id, sandbox = %sandbox.id, "resolved");
        Ok(sandbox.address.clone())
    }

    /// The sandbox `id`, if it exists and runs `kind`.
    fn find_sandbox(&self, namespace: &str, id: &str, kind: Kind) -> Result<Option<Arc<Sandbox>>> {
        match self.sandboxes.lock().unwrap().get(&key(namespace, id)) {
            Some(s) if s.kind != kind => Err(Error::FailedPrecondition(format!(
                "sandbox {id} runs the {} backend, not {kind}",
                s.kind
            ))),
            found => Ok(found.cloned()),
        }
    }

    /// The task socket of a pod not known yet (`shim start` of its first
    /// container, or of the sandbox in containerd 2.x's shim mode). The
    /// backend's side is made at the first Task or Sandbox API Create.
    async fn open_implicit(
        self: &Arc<Self>,
        namespace: &str,
        id: &str,
        kind: Kind,
    ) -> Result<Arc<Sandbox>> {
        // One sandbox is made at a time: two shims of one new pod race here,
        // and both must get the one socket.
        let _creating = self.creating.lock().await;
        if let Some(s) = self.find_sandbox(namespace, id, kind)? {
            return Ok(s);
        }
        let sandbox = self.open_sandbox(namespace, id, kind)?;
        self.register_sandbox(&sandbox)?;
        Ok(sandbox)
    }

    /// Makes a sandbox known and serves its task socket.
    fn register_sandbox(self: &Arc<Self>, sandbox: &Arc<Sandbox>) -> Result<()> {
        if let Err(e) = self.start_listener(sandbox) {
            let _ = std::fs::remove_file(&sandbox.socket);
            return Err(e);
        }
        self.store.store(
            &listener_name(&sandbox.namespace, &sandbox.id),
            &[sandbox.listen_fd.as_fd()],
        );
        self.sandboxes
            .lock()
            .unwrap()
            .insert(key(&sandbox.namespace, &sandbox.id), sandbox.clone());
        tracing::info!(namespace = %sandbox.namespace, sandbox = %sandbox.id, kind = %sandbox.kind, "sandbox opened");
        Ok(())
    }

    pub fn sandbox_request(&self, namespace: &str, id: &str) -> SandboxRequest {
        self.sandbox_request_with(namespace, id, HashMap::new())
    }

    /// A request whose parking holds what a crashed predecessor parked.
    pub fn sandbox_request_with(
        &self,
        namespace: &str,
        id: &str,
        parked: HashMap<String, OwnedFd>,
    ) -> SandboxRequest {
        SandboxRequest {
            namespace: namespace.into(),
            id: id.into(),
            pod: None,
            state_dir: self.state.sandbox_dir(namespace, id),
            resources: Default::default(),
            parking: crate::backend::Parking::new(
                self.store.clone(),
                parking_prefix(namespace, id),
                parked,
            ),
        }
    }

    /// Binds a sandbox's task socket; nothing serves it until it is
    /// registered.
    fn open_sandbox(
        self: &Arc<Self>,
        namespace: &str,
        id: &str,
        kind: Kind,
    ) -> Result<Arc<Sandbox>> {
        let socket = self.socket_dir.join(socket_name(namespace, id));
        let _ = std::fs::remove_file(&socket);
        let listener = std::os::unix::net::UnixListener::bind(&socket).map_err(io_context(
            format!("binding task socket {}", socket.display()),
        ))?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
            .map_err(io_context(format!("securing {}", socket.display())))?;
        Ok(Arc::new(Sandbox {
            namespace: namespace.into(),
            id: id.into(),
            kind,
            address: format!("unix://{}", socket.display()),
            socket,
            ttrpc_address: Mutex::new(self.config.containerd.ttrpc_address.clone()),
            grpc_address: Mutex::new(self.config.containerd.address.clone()),
            members: Mutex::new(HashSet::new()),
            listener: Mutex::new(None),
            listen_fd: OwnedFd::from(listener),
            life: Mutex::new(Lifecycle {
                backend: None,
                explicit: false,
                ready: false,
                pid: 0,
                created_at: SystemTime::now(),
            }),
            transition: tokio::sync::Mutex::new(()),
            exited: watch::channel(None).0,
            state: self.state.clone(),
            released: Default::default(),
        }))
    }

    /// Sandbox API Create of a pod containerd has not resolved through a
    /// shim (proxy mode): its task socket is made now.
    pub async fn sandbox_for_create(
        self: &Arc<Self>,
        namespace: &str,
        id: &str,
        kind: Kind,
    ) -> Result<Arc<Sandbox>> {
        ids::validate("namespace", namespace)?;
        ids::validate("sandbox id", id)?;
        self.backend(kind)?;
        self.open_implicit(namespace, id, kind).await
    }

    /// Sandbox API Shutdown: stops the sandbox if it still runs and forgets
    /// it, with its socket and state. Containers still in it are left to
    /// their own deletes.
    pub async fn shutdown_sandbox(&self, namespace: &str, id: &str) -> Result<()> {
        let sandbox = self.sandbox(namespace, id)?;
        sandbox.stop().await?;
        self.release_sandbox(&sandbox);
        Ok(())
    }

    /// Forgets a sandbox: its socket and record go; connections already
    /// accepted stay open until containerd closes them.
    fn release_sandbox(&self, sandbox: &Arc<Sandbox>) {
        self.sandboxes
            .lock()
            .unwrap()
            .remove(&key(&sandbox.namespace, &sandbox.id));
        if let Some(h) = sandbox.listener.lock().unwrap().take() {
            h.abort();
        }
        sandbox
            .released
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.store
            .remove(&listener_name(&sandbox.namespace, &sandbox.id));
        let _ = std::fs::remove_file(&sandbox.socket);
        self.state
            .remove(Record::Sandbox, &sandbox.namespace, &sandbox.id);
        tracing::info!(namespace = %sandbox.namespace, sandbox = %sandbox.id, "sandbox released");
    }

    fn handler(self: &Arc<Self>, sandbox: &Arc<Sandbox>) -> Arc<dyn rpc::Handler> {
        Arc::new(TaskService::new(self.clone(), sandbox.clone()))
    }

    /// Starts accepting on the sandbox's socket (a duplicate of its fd).
    fn start_listener(self: &Arc<Self>, sandbox: &Arc<Sandbox>) -> Result<()> {
        let std = sandbox
            .listen_fd
            .try_clone()
            .map(std::os::unix::net::UnixListener::from)
            .map_err(io_context("duplicating the task socket"))?;
        std.set_nonblocking(true)
            .map_err(io_context("configuring the task socket"))?;
        let listener = tokio::net::UnixListener::from_std(std)
            .map_err(io_context("watching the task socket"))?;
        let scope = ConnScope {
            registry: self.conns.clone(),
            sandbox: key(&sandbox.namespace, &sandbox.id),
            store: self.store.clone(),
            allowed_uids: self.allowed_uids.clone(),
        };
        let handler = self.handler(sandbox);
        *sandbox.listener.lock().unwrap() = Some(tokio::spawn(rpc::server::serve_listener(
            listener, handler, scope,
        )));
        Ok(())
    }

    /// Stops accepting on every task socket; connections wait in the
    /// sockets' backlogs. Returns once no accept task runs any more.
    pub async fn stop_listeners(&self) {
        let handles: Vec<JoinHandle<()>> = self
            .sandboxes
            .lock()
            .unwrap()
            .values()
            .filter_map(|s| s.listener.lock().unwrap().take())
            .collect();
        for h in handles {
            h.abort();
            let _ = h.await;
        }
    }

    /// Accepts again on every task socket (a failed upgrade).
    pub fn restart_listeners(self: &Arc<Self>) {
        let sandboxes: Vec<Arc<Sandbox>> =
            self.sandboxes.lock().unwrap().values().cloned().collect();
        for s in sandboxes {
            if let Err(e) = self.start_listener(&s) {
                tracing::error!(sandbox = %s.id, "task socket not served again: {e}");
            }
        }
    }

    /// What a successor needs of each sandbox; `fd` is the raw listening
    /// socket, valid while `self` lives.
    /// Every sandbox as handed over, with the descriptors its backend
    /// hands over (kept open by the caller until the exec).
    pub async fn sandbox_handovers(&self) -> Result<(Vec<SandboxHandover>, Vec<OwnedFd>)> {
        let sandboxes: Vec<Arc<Sandbox>> =
            self.sandboxes.lock().unwrap().values().cloned().collect();
        let (mut out, mut kept) = (Vec::new(), Vec::new());
        for s in sandboxes {
            let (backend, fds) = match s.backend() {
                Some(b) => b.handover().await?,
                None => (Default::default(), Vec::new()),
            };
            out.push(SandboxHandover {
                namespace: s.namespace.clone(),
                id: s.id.clone(),
                kind: s.kind.as_str().into(),
                socket: s.socket.clone(),
                address: s.address.clone(),
                ttrpc_address: s.ttrpc_address(),
                grpc_address: s.grpc_address(),
                members: s.members.lock().unwrap().iter().cloned().collect(),
                backend,
                state: s.handover_state(),
                fd: s.listen_fd.as_raw_fd(),
                fds: fds.iter().map(|f| f.as_raw_fd()).collect(),
            });
            kept.extend(fds);
        }
        Ok((out, kept))
    }

    /// A live upgrade failed after [`Daemon::sandbox_handovers`].
    pub async fn handovers_aborted(&self) {
        let sandboxes: Vec<Arc<Sandbox>> =
            self.sandboxes.lock().unwrap().values().cloned().collect();
        for s in sandboxes {
            if let Some(b) = s.backend() {
                b.handover_aborted().await;
            }
        }
    }

    /// Takes over a sandbox (and its listening socket) from a predecessor.
    /// `parked`: what the backend parked before a crash, by name.
    pub async fn adopt_sandbox(
        self: &Arc<Self>,
        h: SandboxHandover,
        listen_fd: OwnedFd,
        fds: Vec<OwnedFd>,
        parked: HashMap<String, OwnedFd>,
    ) -> Result<()> {
        let kind = self.parse_kind(&h.kind)?;
        let view = h.state.clone();
        let backend = match view.created {
            true => Some(
                self.backend(kind)?
                    .restore_sandbox(
                        self.sandbox_request_with(&h.namespace, &h.id, parked),
                        h.backend,
                        fds,
                    )
                    .await?,
            ),
            false => None,
        };
        let sandbox = Arc::new(Sandbox {
            namespace: h.namespace,
            id: h.id,
            kind,
            socket: h.socket,
            address: h.address,
            ttrpc_address: Mutex::new(h.ttrpc_address),
            grpc_address: Mutex::new(h.grpc_address),
            members: Mutex::new(h.members.into_iter().collect()),
            listener: Mutex::new(None),
            listen_fd,
            life: Mutex::new(Lifecycle {
                backend,
                explicit: view.explicit,
                ready: view.ready,
                pid: view.pid,
                created_at: crate::task::from_nanos(view.created_at_nanos),
            }),
            transition: tokio::sync::Mutex::new(()),
            exited: watch::channel(view.exited_at_nanos.map(|at| ExitInfo {
                status: 0,
                at: crate::task::from_nanos(at),
            }))
            .0,
            state: self.state.clone(),
            released: Default::default(),
        });
        self.start_listener(&sandbox)?;
        self.sandboxes
            .lock()
            .unwrap()
            .insert(key(&sandbox.namespace, &sandbox.id), sandbox);
        Ok(())
    }

    /// Tasks that exist only in this process (their backend's workloads do
    /// not survive a re-exec), by kind.
    pub fn tasks_in_process(&self) -> Vec<(Kind, usize)> {
        let mut held: HashMap<Kind, usize> = HashMap::new();
        for t in self.tasks.lock().unwrap().values() {
            let survives = self
                .backends
                .get(&t.kind)
                .is_some_and(|b| b.capabilities().survives_reexec);
            if !survives {
                *held.entry(t.kind).or_default() += 1;
            }
        }
        held.into_iter().collect()
    }

    /// Every task as persisted, with current statuses.
    pub fn task_records(&self) -> Vec<TaskRecord> {
        self.tasks
            .lock()
            .unwrap()
            .values()
            .map(|t| t.record())
            .collect()
    }

    /// Takes over a task from a predecessor: its container is rebuilt by its
    /// backend from the recorded pids.
    pub async fn adopt_task(
        self: &Arc<Self>,
        record: TaskRecord,
        io: Vec<ProcessIoHandover>,
    ) -> Result<()> {
        let kind = self.parse_kind(&record.kind)?;
        if kind != self.sandbox(&record.namespace, &record.sandbox_id)?.kind {
            return Err(Error::InvalidArgument(format!(
                "task {} is of another kind than its sandbox",
                record.id
            )));
        }
        let sandbox = self.sandbox(&record.namespace, &record.sandbox_id)?;
        let task = crate::task::service::restore_task(self, &sandbox, record, io, None).await?;
        self.insert_task(task.clone())?;
        // The new image's parking: the names are the predecessor's.
        self.park_io(&task, None).await;
        Ok(())
    }

    /// Takes over a task of a crashed predecessor; `lost` says why its
    /// workload is gone, if it is, and `parked` are the stderr write ends
    /// kept for its processes (by exec id, empty for init).
    /// `io`: the stdio plumbing parked for its processes (see
    /// [`Daemon::park_io`]).
    pub async fn adopt_task_after_crash(
        self: &Arc<Self>,
        record: TaskRecord,
        lost: Option<&str>,
        parked: HashMap<String, OwnedFd>,
        io: Vec<ProcessIoHandover>,
    ) -> Result<()> {
        let sandbox = self.sandbox(&record.namespace, &record.sandbox_id)?;
        let (ns, id) = (record.namespace.clone(), record.id.clone());
        let execs: Vec<String> = parked.keys().cloned().collect();
        let task = crate::task::service::restore_task(
            self,
            &sandbox,
            record,
            io,
            lost.map(|l| (l, parked)),
        )
        .await?;
        for exec in execs {
            self.store.remove(&stderr_name(&ns, &id, &exec));
        }
        self.insert_task(task.clone())?;
        self.park_io(&task, None).await;
        Ok(())
    }

    /// For a process whose workload lives in this daemon's memory, keeps a
    /// write end of its stderr FIFO in the holder while it runs, so that
    /// after a crash the restarted daemon can say there why it ended (the
    /// reader has not seen the end of the stream yet).
    pub fn park_stderr(&self, kind: Kind, ns: &str, id: &str, exec_id: &str, stderr: &str) {
        if !self.store.held()
            || self
                .backends
                .get(&kind)
                .is_some_and(|b| b.capabilities().survives_crash)
            || stderr.is_empty()
            || stderr.contains("://") && !stderr.starts_with("fifo://")
        {
            return;
        }
        use std::os::unix::fs::OpenOptionsExt;
        let path = stderr.strip_prefix("fifo://").unwrap_or(stderr);
        let Ok(f) = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
        else {
            return;
        };
        let name = stderr_name(ns, id, exec_id);
        self.store.store(&name, &[f.as_fd()]);
        self.parked.lock().unwrap().insert(name);
    }

    /// For a process whose workload outlives the daemon, parks the stdio
    /// plumbing the daemon holds for it (the terminal master, the ends of
    /// the stdin copy, where terminal output goes), so that after a crash
    /// the restarted daemon restarts its copies: the terminal is not hung
    /// up and stdin sees no end. The stdin ends are let go when the copy
    /// ends (its end then reaches the process), the rest when the process
    /// exits. Call once the process runs (`exec_id` `None`: every running
    /// process of the task, after it was taken over).
    pub async fn park_io(self: &Arc<Self>, task: &Task, exec_id: Option<&str>) {
        if !self.store.held() || !self.survives_crash(task.kind.as_str()) {
            return;
        }
        for h in task.container.handover_io().await {
            let label = h.exec_id.clone().unwrap_or_default();
            let wanted = match exec_id {
                Some(e) => e == label,
                None => task.process_running(h.exec_id.as_deref()),
            };
            if !wanted {
                continue;
            }
            let fds = [
                h.master.as_ref(),
                h.fds.stdin_from.as_ref(),
                h.fds.stdin_to.as_ref(),
                h.fds.output_to.as_ref(),
            ];
            for (field, fd) in IO_FIELDS.iter().zip(fds) {
                if let Some(fd) = fd {
                    let name = io_name(&task.namespace, &task.id, &label, field);
                    self.store.store(&name, &[fd.as_fd()]);
                    self.parked.lock().unwrap().insert(name);
                }
            }
            if let Some(mut end) = h.fds.stdin_end {
                let daemon = Arc::downgrade(self);
                let names: Vec<String> = ["stdin_from", "stdin_to"]
                    .iter()
                    .map(|f| io_name(&task.namespace, &task.id, &label, f))
                    .collect();
                tokio::spawn(async move {
                    while end.changed().await.is_ok() {}
                    let Some(daemon) = daemon.upgrade() else {
                        return;
                    };
                    for name in names {
                        if daemon.parked.lock().unwrap().remove(&name) {
                            daemon.store.remove(&name);
                        }
                    }
                });
            }
        }
    }

    /// The process ended: its parked stdio plumbing is let go.
    pub fn unpark_io(&self, ns: &str, id: &str, exec_id: &str) {
        for field in IO_FIELDS {
            let name = io_name(ns, id, exec_id, field);
            if self.parked.lock().unwrap().remove(&name) {
                self.store.remove(&name);
            }
        }
    }

    /// Names parked by a crashed predecessor that this daemon lets go of
    /// when their process ends.
    pub fn keep_parked(&self, name: String) {
        self.parked.lock().unwrap().insert(name);
    }

    /// The process ended (or never started): its stderr is let go.
    pub fn unpark_stderr(&self, ns: &str, id: &str, exec_id: &str) {
        let name = stderr_name(ns, id, exec_id);
        if self.parked.lock().unwrap().remove(&name) {
            self.store.remove(&name);
        }
    }

    /// The persisted records.
    pub fn state(&self) -> &StateStore {
        &self.state
    }

    pub fn backends(&self) -> Vec<Arc<dyn Backend>> {
        self.backends.values().cloned().collect()
    }

    /// The backend of a kind named in a record.
    pub fn backend_named(&self, kind: &str) -> Result<Arc<dyn Backend>> {
        self.backend(self.parse_kind(kind)?)
    }

    /// Whether a crashed daemon's workloads of `kind` can be taken over.
    pub fn survives_crash(&self, kind: &str) -> bool {
        self.backend_named(kind)
            .is_ok_and(|b| b.capabilities().survives_crash)
    }

    /// Takes over a sandbox of a crashed predecessor whose listening socket
    /// no holder kept: its socket is bound again at the same path (the
    /// address containerd has in the bundle's `address` file).
    pub async fn reopen_sandbox(
        self: &Arc<Self>,
        mut h: SandboxHandover,
        parked: HashMap<String, OwnedFd>,
    ) -> Result<()> {
        if h.socket.parent() != Some(self.socket_dir.as_path()) {
            return Err(Error::InvalidArgument(format!(
                "sandbox record names socket {} outside {}",
                h.socket.display(),
                self.socket_dir.display()
            )));
        }
        let _ = std::fs::remove_file(&h.socket);
        let listener = std::os::unix::net::UnixListener::bind(&h.socket).map_err(io_context(
            format!("binding task socket {}", h.socket.display()),
        ))?;
        std::fs::set_permissions(&h.socket, std::fs::Permissions::from_mode(0o600))
            .map_err(io_context(format!("securing {}", h.socket.display())))?;
        let fd = OwnedFd::from(listener);
        self.store
            .store(&listener_name(&h.namespace, &h.id), &[fd.as_fd()]);
        h.fd = -1;
        self.adopt_sandbox(h, fd, Vec::new(), parked).await
    }

    /// Removes task sockets no sandbox serves; returns how many.
    pub fn remove_stale_sockets(&self) -> usize {
        let served: HashSet<PathBuf> = self
            .sandboxes
            .lock()
            .unwrap()
            .values()
            .map(|s| s.socket.clone())
            .collect();
        let mut removed = 0;
        if let Ok(entries) = std::fs::read_dir(&self.socket_dir) {
            for e in entries.flatten() {
                let path = e.path();
                if !served.contains(&path) && std::fs::remove_file(&path).is_ok() {
                    removed += 1;
                }
            }
        }
        removed
    }

    /// The stdio plumbing of every task's processes, duplicated.
    pub async fn io_handovers(&self) -> Vec<(Key, ProcessIoHandover)> {
        let tasks: Vec<Arc<Task>> = self.tasks.lock().unwrap().values().cloned().collect();
        let mut out = Vec::new();
        for t in tasks {
            for h in t.container.handover_io().await {
                out.push((key(&t.namespace, &t.id), h));
            }
        }
        out
    }

    /// Serves a connection handed over by a predecessor (or by this process
    /// after a failed upgrade).
    pub fn adopt_connection(self: &Arc<Self>, conn: ConnHandover) -> Result<()> {
        let sandbox = self.sandbox(&conn.sandbox.0, &conn.sandbox.1)?;
        let handler = self.handler(&sandbox);
        rpc::server::adopt_connection(
            conn,
            handler,
            self.conns.clone(),
            self.store.clone(),
            self.allowed_uids.clone(),
        )
        .map_err(io_context("serving a handed-over connection"))
    }

    /// `shim delete`: containerd has given up on this task (a dropped
    /// connection, a failed reconnect, or the tail of a normal delete).
    /// Kills and removes only this id; idempotent.
    pub async fn shim_delete(&self, req: &wire::DeleteRequest) -> Result<wire::DeleteResponse> {
        let kind = self.parse_kind(&req.kind)?;
        ids::validate("namespace", &req.namespace)?;
        ids::validate("id", &req.id)?;
        // Its rootfs is unmounted: an empty bundle names none.
        let bundle = (!req.bundle.is_empty()).then(|| Path::new(&req.bundle));
        if bundle.is_some() {
            ids::validate_path("bundle", &req.bundle)?;
        }
        let now = crate::task::nanos(std::time::SystemTime::now());
        let Some(task) = self
            .tasks
            .lock()
            .unwrap()
            .get(&key(&req.namespace, &req.id))
            .cloned()
        else {
            // Deleted and cleaned up a moment ago: report how it ended.
            if let Some((reply, _)) = self
                .deleted
                .lock()
                .unwrap()
                .remove(&key(&req.namespace, &req.id))
            {
                self.leave_sandbox(&req.namespace, &req.id, None);
                return Ok(reply);
            }
            // Not tracked: make sure the backend holds nothing and the
            // rootfs is unmounted, as containerd-shim-runc-v2 does.
            self.backend(kind)?
                .cleanup(&req.namespace, &req.id, bundle)
                .await?;
            self.leave_sandbox(&req.namespace, &req.id, None);
            return Ok(wire::DeleteResponse {
                pid: 0,
                exit_status: KILLED,
                exited_at_nanos: now,
            });
        };
        let view = task.init.view();
        if view.exit.is_none() {
            let _ = task.container.kill(None, libc::SIGKILL as u32, true).await;
        }
        task.container.delete(true).await?;
        self.remove_task(&req.namespace, &req.id);
        let exit = task.init.view().exit;
        Ok(wire::DeleteResponse {
            pid: view.pid,
            exit_status: exit.map(|e| e.status).unwrap_or(KILLED),
            exited_at_nanos: exit.map(|e| crate::task::nanos(e.at)).unwrap_or(now),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::socket_name;

    #[test]
    fn socket_names_are_short_and_distinct_per_namespace() {
        let a = socket_name("default", "pod");
        assert_eq!(a.len(), 21);
        assert_ne!(a, socket_name("k8s.io", "pod"));
        assert_ne!(socket_name("a", "bc"), socket_name("ab", "c"));
        assert_eq!(a, socket_name("default", "pod"));
    }
}
