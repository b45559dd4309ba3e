//! The runc backend: containers run by the `runc` binary, with the daemon
//! as their subreaper.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim_protos::api::ProcessInfo;
use kuasar_protocol::shim::BundleRuntime;
use kuasar_protocol::Kind;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use protobuf::well_known_types::any::Any;
use tokio::sync::Mutex;

use kuasar_core::backend::{
    Backend, BackendRecord, Capabilities, Container, ContainerEvent, CreateRequest, EventSink,
    PodConfig, ProcessIoHandover, RestoreRequest, Sandbox, SandboxRequest,
};
use kuasar_core::error::{io_context, Error, Result};
use kuasar_host::console::{self, ConsoleSocket};
use kuasar_host::mount::Rootfs;
use kuasar_host::podns::PodNamespaces;
use kuasar_host::reaper::Reaper;
use kuasar_host::runc::{RuncCli, RuncStdio};
use kuasar_host::stats;
use kuasar_host::stdio::{self, IoTasks, StdioPaths};

/// What every sandbox and container of the backend shares.
struct Shared {
    cli: Arc<RuncCli>,
    /// Console sockets are created here (short paths: sun_path is 108 bytes).
    console_dir: PathBuf,
}

pub struct Runc {
    shared: Arc<Shared>,
}

impl Runc {
    pub fn new(binary: String, root: &Path, reaper: Arc<Reaper>) -> Runc {
        Runc {
            shared: Arc::new(Shared {
                cli: Arc::new(RuncCli {
                    binary,
                    root: root.join("runc"),
                    reaper,
                }),
                console_dir: root.join("c"),
            }),
        }
    }

    /// A sandbox of this backend, for another backend whose pods also hold
    /// Linux containers (a wasm pod's pause container).
    pub fn sandbox(&self, req: &SandboxRequest) -> Arc<RuncSandbox> {
        Arc::new(RuncSandbox {
            shared: self.shared.clone(),
            namespace: req.namespace.clone(),
            id: req.id.clone(),
            pod: req.pod.clone(),
            state_dir: req.state_dir.clone(),
            namespaces: std::sync::Mutex::new(None),
        })
    }

    /// A sandbox a predecessor daemon ran, with the namespaces it pinned.
    pub fn restored_sandbox(
        &self,
        req: &SandboxRequest,
        record: BackendRecord,
    ) -> Arc<RuncSandbox> {
        let s = self.sandbox(req);
        if let Ok(SandboxRecord { namespaces }) = serde_json::from_value(record) {
            *s.namespaces.lock().unwrap() = namespaces;
        }
        s
    }
}

#[async_trait]
impl Backend for Runc {
    fn kind(&self) -> Kind {
        Kind::Runc
    }

    fn capabilities(&self) -> Capabilities {
        // Containers are runc's processes; a re-executed daemon adopts them.
        Capabilities {
            survives_reexec: true,
            survives_crash: true,
        }
    }

    async fn create_sandbox(&self, req: SandboxRequest) -> Result<Arc<dyn Sandbox>> {
        Ok(self.sandbox(&req))
    }

    async fn restore_sandbox(
        &self,
        req: SandboxRequest,
        record: BackendRecord,
        _fds: Vec<std::os::fd::OwnedFd>,
    ) -> Result<Arc<dyn Sandbox>> {
        Ok(self.restored_sandbox(&req, record))
    }

    async fn reconcile(&self, known: &[(String, String)]) -> Result<()> {
        let cli = &self.shared.cli;
        let Ok(namespaces) = std::fs::read_dir(&cli.root) else {
            return Ok(());
        };
        for ns in namespaces.flatten() {
            let Some(namespace) = ns.file_name().to_str().map(String::from) else {
                continue;
            };
            let Ok(containers) = std::fs::read_dir(ns.path()) else {
                continue;
            };
            for c in containers.flatten() {
                let Some(id) = c.file_name().to_str().map(String::from) else {
                    continue;
                };
                if known.iter().any(|(n, i)| *n == namespace && *i == id) {
                    continue;
                }
                tracing::warn!(%namespace, %id, "removing a runc container no record names");
                if let Err(e) = cli.run(&namespace, &["delete", "--force", &id]).await {
                    tracing::warn!(%namespace, %id, "{e}");
                }
            }
        }
        Ok(())
    }

    async fn cleanup(&self, namespace: &str, id: &str, bundle: Option<&Path>) -> Result<()> {
        match self
            .shared
            .cli
            .run(namespace, &["delete", "--force", id])
            .await
            .map_err(Error::from)
        {
            Ok(_) | Err(Error::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        match bundle {
            Some(bundle) => Ok(Rootfs::adopt(bundle, true).unmount()?),
            None => Ok(()),
        }
    }
}

/// A pod whose containers runc runs on the host.
pub struct RuncSandbox {
    shared: Arc<Shared>,
    namespace: String,
    id: String,
    /// Set when the sandbox holds the pod's namespaces (Sandbox API).
    pod: Option<PodConfig>,
    state_dir: PathBuf,
    namespaces: std::sync::Mutex<Option<PodNamespaces>>,
}

/// What a successor needs of a runc sandbox.
#[derive(serde::Serialize, serde::Deserialize)]
struct SandboxRecord {
    namespaces: Option<PodNamespaces>,
}

/// What a successor needs of a runc container besides the task record.
#[derive(serde::Serialize, serde::Deserialize)]
struct ContainerRecord {
    /// Records of earlier versions lack it; containerd always sends mounts.
    #[serde(default = "mounted_by_default")]
    rootfs_mounted: bool,
}

fn mounted_by_default() -> bool {
    true
}

#[async_trait]
impl Sandbox for RuncSandbox {
    async fn start(&self) -> Result<u32> {
        if let Some(pod) = &self.pod {
            let (dir, pod) = (self.state_dir.join("ns"), pod.clone());
            let pinned = tokio::task::spawn_blocking(move || {
                PodNamespaces::pin(&dir, pod.netns, pod.hostname)
            })
            .await
            .map_err(|e| Error::Internal(format!("pinning the pod's namespaces: {e}")))??;
            *self.namespaces.lock().unwrap() = Some(pinned);
        }
        // No process holds the pod: a pause container does, or the pinned
        // namespaces.
        Ok(0)
    }

    async fn stop(&self) -> Result<()> {
        if let Some(ns) = self.namespaces.lock().unwrap().take() {
            ns.release();
            // The sandbox's directory, and the one of all sandboxes of the
            // namespace once it is empty.
            let _ = std::fs::remove_dir_all(&self.state_dir);
            if let Some(parent) = self.state_dir.parent() {
                let _ = std::fs::remove_dir(parent);
            }
        }
        tracing::debug!(namespace = %self.namespace, sandbox = %self.id, "runc sandbox stopped");
        Ok(())
    }

    fn record(&self) -> BackendRecord {
        serde_json::to_value(SandboxRecord {
            namespaces: self.namespaces.lock().unwrap().clone(),
        })
        .unwrap_or_default()
    }

    async fn create_container(&self, req: CreateRequest) -> Result<Box<dyn Container>> {
        let rootfs = Rootfs::mount(&req.rootfs, &req.bundle)?;
        self.create_mounted(req, rootfs).await
    }

    async fn restore_container(&self, req: RestoreRequest) -> Result<Box<dyn Container>> {
        let cli = &self.shared.cli;
        let record: ContainerRecord =
            serde_json::from_value(req.record.clone()).unwrap_or(ContainerRecord {
                rootfs_mounted: true,
            });
        // Exits that happened while the daemon re-executed are zombies the
        // reaper collects now; subscribing finds them either way.
        let mut oom = None;
        if req.init_live {
            watch_exit(&cli.reaper, req.pid, None, &req.events);
            oom = watch_oom(req.pid, &req.id, &req.events);
        }
        let mut ios: HashMap<Option<String>, ProcessIoHandover> =
            req.io.into_iter().map(|h| (h.exec_id.clone(), h)).collect();
        let mut execs = HashMap::new();
        for (exec_id, pid, live) in req.execs {
            if live {
                watch_exit(&cli.reaper, pid, Some(exec_id.clone()), &req.events);
            }
            let io = ios
                .remove(&Some(exec_id.clone()))
                .map(|h| adopt_io(&cli.reaper, h))
                .unwrap_or_default();
            execs.insert(exec_id, (pid, io));
        }
        let init = ios
            .remove(&None)
            .map(|h| adopt_io(&cli.reaper, h))
            .unwrap_or_default();
        Ok(Box::new(RuncContainer {
            cli: cli.clone(),
            console_dir: self.shared.console_dir.clone(),
            namespace: req.namespace,
            rootfs: Rootfs::adopt(&req.bundle, record.rootfs_mounted),
            id: req.id,
            bundle: req.bundle,
            pid: req.pid,
            events: req.events,
            oom,
            init: Mutex::new(init),
            execs: Mutex::new(execs),
        }))
    }
}

impl RuncSandbox {
    /// Creates a container whose rootfs is already mounted; a failure
    /// removes what runc made and unmounts the rootfs.
    pub async fn create_mounted(
        &self,
        req: CreateRequest,
        rootfs: Rootfs,
    ) -> Result<Box<dyn Container>> {
        let created = match self.join_pod(&req.bundle) {
            Ok(()) => self.create_in(&req, &rootfs).await,
            Err(e) => Err(e),
        };
        match created {
            Ok(c) => Ok(Box::new(c)),
            Err(e) => {
                let cli = &self.shared.cli;
                let _ = cli
                    .run(&req.namespace, &["delete", "--force", &req.id])
                    .await;
                if let Err(u) = rootfs.unmount() {
                    tracing::warn!(id = %req.id, "rootfs left mounted: {u}");
                }
                Err(e)
            }
        }
    }

    /// Points the container's spec at the namespaces the sandbox holds, if
    /// it holds any.
    pub fn join_pod(&self, bundle: &Path) -> Result<()> {
        match &*self.namespaces.lock().unwrap() {
            Some(ns) => Ok(ns.join(bundle)?),
            None => Ok(()),
        }
    }

    /// `runc create` of a container whose rootfs is ready.
    async fn create_in(&self, req: &CreateRequest, rootfs: &Rootfs) -> Result<RuncContainer> {
        let cli = &self.shared.cli;
        // Lets `shim delete` clean up with runc even when the daemon is down.
        let runtime = BundleRuntime {
            runc_binary: cli.binary.clone(),
            runc_root: cli.root_for(&req.namespace).display().to_string(),
        };
        let runtime_file = req.bundle.join(kuasar_protocol::BUNDLE_RUNTIME_FILE);
        kuasar_protocol::shim::write_atomic(
            &runtime_file,
            &serde_json::to_vec(&runtime).unwrap_or_default(),
        )
        .map_err(io_context(format!("writing {}", runtime_file.display())))?;

        let bundle = req.bundle.display().to_string();
        let pid_file = req.bundle.join("init.pid");
        let args = vec![
            "create".to_string(),
            "--bundle".into(),
            bundle,
            "--pid-file".into(),
            pid_file.display().to_string(),
        ];
        let launched = launch(
            cli,
            &self.shared.console_dir,
            &req.namespace,
            &req.id,
            args,
            &req.stdio,
            &pid_file,
            &req.bundle.join("log.json"),
        )
        .await?;
        watch_exit(&cli.reaper, launched.pid, None, &req.events);
        Ok(RuncContainer {
            cli: cli.clone(),
            console_dir: self.shared.console_dir.clone(),
            namespace: req.namespace.clone(),
            id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: Rootfs::adopt(&req.bundle, rootfs.is_mounted()),
            pid: launched.pid,
            events: req.events.clone(),
            oom: watch_oom(launched.pid, &req.id, &req.events),
            init: Mutex::new(launched.process),
            execs: Mutex::new(HashMap::new()),
        })
    }
}

/// Publishes the container's OOM kills; a cgroup that cannot be watched is
/// logged, not fatal.
fn watch_oom(pid: u32, id: &str, events: &EventSink) -> Option<tokio::task::JoinHandle<()>> {
    let sink = events.clone();
    kuasar_host::oom::watch(pid, move || {
        let _ = sink.send(ContainerEvent::Oom);
    })
    .map_err(|e| tracing::warn!(%id, "no OOM notifications: {e}"))
    .ok()
}

/// Restarts the copies of a process a predecessor ran (live upgrade). A
/// copy that cannot restart is logged: only that stream stops flowing.
fn adopt_io(reaper: &Arc<Reaper>, h: ProcessIoHandover) -> ProcessIo {
    let mut p = ProcessIo::default();
    p.io.logger = h
        .logger_pid
        .map(|pid| stdio::Logger::adopt(pid, reaper.clone()));
    if let (Some(master), Some(to)) = (&h.master, h.fds.output_to) {
        let copied = master
            .try_clone()
            .map_err(io_context("duplicating the terminal"))
            .and_then(|from| Ok(p.io.copy_output(from, to)?));
        if let Err(e) = copied {
            tracing::warn!("terminal output not taken over: {e}");
        }
    }
    if let Some(to) = h.fds.stdin_to {
        let copied = match h.fds.stdin_from {
            Some(from) => p.io.adopt_stdin(from, to),
            None if !h.stdin_path.is_empty() => p.io.copy_stdin(&h.stdin_path, to),
            None => Ok(()),
        };
        if let Err(e) = copied {
            tracing::warn!("stdin not taken over: {e}");
        }
    }
    p.master = h.master;
    p
}

/// The pieces a running process owns besides its pid.
#[derive(Default)]
struct ProcessIo {
    io: IoTasks,
    /// The terminal master, kept for ResizePty.
    master: Option<OwnedFd>,
}

struct Launched {
    pid: u32,
    process: ProcessIo,
}

/// Runs `runc create` or `runc exec --detach` with the process's stdio and
/// reads the new process's pid.
#[allow(clippy::too_many_arguments)]
async fn launch(
    cli: &RuncCli,
    console_dir: &Path,
    namespace: &str,
    id: &str,
    mut args: Vec<String>,
    paths: &StdioPaths,
    pid_file: &Path,
    log: &Path,
) -> Result<Launched> {
    let outputs = stdio::open_outputs(paths, namespace, id, &cli.reaper).await?;
    let mut process = ProcessIo::default();
    process.io.logger = outputs.logger;
    if paths.terminal {
        let console = ConsoleSocket::bind(console_dir)?;
        args.push("--console-socket".into());
        args.push(console.path().display().to_string());
        args.push(id.into());
        let receive = tokio::spawn(console.receive());
        let null = || {
            std::fs::File::open("/dev/null")
                .map(OwnedFd::from)
                .map_err(io_context("opening /dev/null"))
        };
        let ran = cli
            .run_with_stdio(
                namespace,
                &args,
                RuncStdio {
                    stdin: null()?,
                    stdout: null()?,
                    stderr: null()?,
                },
                log,
            )
            .await;
        if let Err(e) = ran {
            receive.abort();
            return Err(e.into());
        }
        let master = receive
            .await
            .map_err(|e| Error::Internal(format!("console task: {e}")))??;
        let dup = |fd: &OwnedFd| {
            fd.try_clone()
                .map_err(io_context("duplicating the terminal"))
        };
        if !paths.stdin.is_empty() {
            process.io.copy_stdin(&paths.stdin, dup(&master)?)?;
        }
        process.io.copy_output(dup(&master)?, outputs.stdout)?;
        process.master = Some(master);
    } else {
        args.push(id.into());
        let stdin = if paths.stdin.is_empty() {
            std::fs::File::open("/dev/null")
                .map(OwnedFd::from)
                .map_err(io_context("opening /dev/null"))?
        } else {
            let (r, w) = stdio::pipe()?;
            process.io.copy_stdin(&paths.stdin, w)?;
            r
        };
        cli.run_with_stdio(
            namespace,
            &args,
            RuncStdio {
                stdin,
                stdout: outputs.stdout,
                stderr: outputs.stderr,
            },
            log,
        )
        .await?;
    }
    let pid = read_pid(pid_file)?;
    Ok(Launched { pid, process })
}

fn read_pid(path: &Path) -> Result<u32> {
    let text =
        std::fs::read_to_string(path).map_err(io_context(format!("reading {}", path.display())))?;
    text.trim()
        .parse()
        .map_err(|_| Error::Internal(format!("{} holds no pid: {text:?}", path.display())))
}

/// Forwards the exit of `pid` to the task layer.
fn watch_exit(reaper: &Reaper, pid: u32, exec_id: Option<String>, events: &EventSink) {
    let rx = reaper.subscribe(pid as i32);
    let events = events.clone();
    tokio::spawn(async move {
        if let Ok(code) = rx.await {
            let _ = events.send(ContainerEvent::Exit(exec_id, code));
        }
    });
}

struct RuncContainer {
    cli: Arc<RuncCli>,
    console_dir: PathBuf,
    namespace: String,
    id: String,
    bundle: PathBuf,
    rootfs: Rootfs,
    pid: u32,
    events: EventSink,
    /// The OOM watcher, ended with the container.
    oom: Option<tokio::task::JoinHandle<()>>,
    init: Mutex<ProcessIo>,
    execs: Mutex<HashMap<String, (u32, ProcessIo)>>,
}

impl RuncContainer {
    async fn runc(&self, args: &[&str]) -> Result<Vec<u8>> {
        Ok(self.cli.run(&self.namespace, args).await?)
    }

    fn exec_file(&self, exec_id: &str, ext: &str) -> PathBuf {
        self.bundle.join(format!("exec-{exec_id}.{ext}"))
    }
}

#[async_trait]
impl Container for RuncContainer {
    fn pid(&self) -> u32 {
        self.pid
    }

    async fn start(&self) -> Result<u32> {
        self.runc(&["start", &self.id]).await?;
        Ok(self.pid)
    }

    async fn exec(&self, exec_id: &str, spec: &[u8], paths: &StdioPaths) -> Result<u32> {
        let mut process: serde_json::Value = serde_json::from_slice(spec).map_err(|e| {
            Error::InvalidArgument(format!("exec process spec is not valid JSON: {e}"))
        })?;
        if let Some(obj) = process.as_object_mut() {
            obj.insert("terminal".into(), paths.terminal.into());
        }
        let spec_file = self.exec_file(exec_id, "json");
        kuasar_protocol::shim::write_atomic(
            &spec_file,
            &serde_json::to_vec(&process).unwrap_or_default(),
        )
        .map_err(io_context(format!("writing {}", spec_file.display())))?;
        let pid_file = self.exec_file(exec_id, "pid");
        let args = vec![
            "exec".to_string(),
            "--detach".into(),
            "--pid-file".into(),
            pid_file.display().to_string(),
            "--process".into(),
            spec_file.display().to_string(),
        ];
        let launched = launch(
            &self.cli,
            &self.console_dir,
            &self.namespace,
            &self.id,
            args,
            paths,
            &pid_file,
            &self.exec_file(exec_id, "log"),
        )
        .await?;
        watch_exit(
            &self.cli.reaper,
            launched.pid,
            Some(exec_id.to_string()),
            &self.events,
        );
        self.execs
            .lock()
            .await
            .insert(exec_id.to_string(), (launched.pid, launched.process));
        Ok(launched.pid)
    }

    async fn kill(&self, exec_id: Option<&str>, signal: u32, all: bool) -> Result<()> {
        let (pid, what) = match exec_id {
            None if all => {
                // Every process of the container: runc knows its cgroup.
                let sig = signal.to_string();
                return self
                    .runc(&["kill", "--all", self.id.as_str(), sig.as_str()])
                    .await
                    .map(|_| ());
            }
            // The init process is signalled directly, as fast as a shim of
            // its own would: a `runc kill` (tens of milliseconds under load)
            // can outlast the exit it causes, and containerd closes the
            // task's connection once the exit is seen. The pid cannot be
            // reused while unreaped, and the daemon is its reaper.
            None => (self.pid, "the init process".to_string()),
            Some(exec_id) => (
                self.execs
                    .lock()
                    .await
                    .get(exec_id)
                    .map(|(pid, _)| *pid)
                    .ok_or_else(|| Error::NotFound(format!("exec {exec_id} not found")))?,
                format!("exec {exec_id}"),
            ),
        };
        let sig = Signal::try_from(signal as i32)
            .map_err(|_| Error::InvalidArgument(format!("invalid signal {signal}")))?;
        nix::sys::signal::kill(Pid::from_raw(pid as i32), sig).map_err(|e| match e {
            nix::errno::Errno::ESRCH => Error::NotFound(format!("process {pid} already finished")),
            e => Error::Sys {
                what: format!("signalling {what}"),
                source: e,
            },
        })
    }

    async fn pause(&self) -> Result<()> {
        self.runc(&["pause", &self.id]).await.map(|_| ())
    }

    async fn resume(&self) -> Result<()> {
        self.runc(&["resume", &self.id]).await.map(|_| ())
    }

    async fn update(&self, resources: &[u8]) -> Result<()> {
        let file = self.bundle.join("update-resources.json");
        kuasar_protocol::shim::write_atomic(&file, resources)
            .map_err(io_context(format!("writing {}", file.display())))?;
        let file_arg = file.display().to_string();
        let result = self
            .runc(&["update", "--resources", &file_arg, &self.id])
            .await;
        let _ = std::fs::remove_file(&file);
        result.map(|_| ())
    }

    async fn stats(&self) -> Result<Any> {
        let out = self.runc(&["events", "--stats", &self.id]).await?;
        Ok(stats::to_any_for_host(&stats::parse(&out)?))
    }

    async fn pids(&self) -> Result<Vec<ProcessInfo>> {
        let out = self.runc(&["ps", "--format", "json", &self.id]).await?;
        let pids: Vec<u32> = serde_json::from_slice::<Option<Vec<u32>>>(&out)
            .map_err(|e| Error::Internal(format!("parsing runc ps: {e}")))?
            .unwrap_or_default();
        Ok(pids
            .into_iter()
            .map(|pid| {
                let mut p = ProcessInfo::new();
                p.pid = pid;
                p
            })
            .collect())
    }

    async fn resize_pty(&self, exec_id: Option<&str>, width: u32, height: u32) -> Result<()> {
        let resize = |p: &ProcessIo| match &p.master {
            Some(m) => Ok(console::resize(m, width, height)?),
            None => Err(Error::FailedPrecondition("process has no terminal".into())),
        };
        match exec_id {
            None => resize(&*self.init.lock().await),
            Some(e) => match self.execs.lock().await.get(e) {
                Some((_, p)) => resize(p),
                None => Err(Error::NotFound(format!("exec {e} not found"))),
            },
        }
    }

    async fn close_stdin(&self, exec_id: Option<&str>) -> Result<()> {
        match exec_id {
            None => self.init.lock().await.io.close_stdin().await,
            Some(e) => match self.execs.lock().await.get_mut(e) {
                Some((_, p)) => p.io.close_stdin().await,
                None => return Err(Error::NotFound(format!("exec {e} not found"))),
            },
        }
        Ok(())
    }

    async fn delete_exec(&self, exec_id: &str) {
        if let Some((_, mut p)) = self.execs.lock().await.remove(exec_id) {
            p.io.drain().await;
        }
        for ext in ["json", "pid", "log"] {
            let _ = std::fs::remove_file(self.exec_file(exec_id, ext));
        }
    }

    async fn handover_io(&self) -> Vec<ProcessIoHandover> {
        let export = |exec_id: Option<String>, p: &ProcessIo| ProcessIoHandover {
            exec_id,
            master: p.master.as_ref().and_then(|m| m.try_clone().ok()),
            fds: p.io.handover(),
            logger_pid: p.io.logger.as_ref().map(|l| l.pid()),
            stdin_path: String::new(),
        };
        let mut out = vec![export(None, &*self.init.lock().await)];
        for (exec_id, (_, p)) in self.execs.lock().await.iter() {
            out.push(export(Some(exec_id.clone()), p));
        }
        out
    }

    async fn delete(&self, force: bool) -> Result<()> {
        let mut args = vec!["delete"];
        if force {
            args.push("--force");
        }
        args.push(&self.id);
        match self.runc(&args).await {
            Ok(_) | Err(Error::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        if let Some(oom) = &self.oom {
            oom.abort();
        }
        // Dropping the process io ends its copies and stops its log driver.
        let mut init = std::mem::take(&mut *self.init.lock().await);
        init.io.drain().await;
        drop(init);
        self.execs.lock().await.clear();
        for f in ["init.pid", "log.json", kuasar_protocol::BUNDLE_RUNTIME_FILE] {
            let _ = std::fs::remove_file(self.bundle.join(f));
        }
        Ok(self.rootfs.unmount()?)
    }

    fn record(&self) -> BackendRecord {
        serde_json::to_value(ContainerRecord {
            rootfs_mounted: self.rootfs.is_mounted(),
        })
        .unwrap_or_default()
    }
}
