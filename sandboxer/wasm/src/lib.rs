//! The wasm backend: a container is a wasmtime instance inside the daemon
//! (WASI preview1 modules and preview2 command components). No process is
//! started; the engine, compiled programs and threads are shared by all.

mod containerd;
mod engine;
mod instance;
mod layers;
mod netns;
mod spec;
#[cfg(test)]
mod tests;

use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim_protos::api::ProcessInfo;
use kuasar_protocol::Kind;
use protobuf::well_known_types::any::Any;
use tokio::io::AsyncWriteExt;
use wasmtime::Store;
use wasmtime_wasi::cli::{AsyncStdinStream, AsyncStdoutStream};
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

pub use self::engine::WasmEngine;
use self::engine::{Program, RunningGuard};
use self::instance::{Control, Limiter, Memory, Outcome, State, Supervised};
use kuasar_core::backend::{
    Backend, BackendRecord, Capabilities, Container, ContainerEvent, CreateRequest, EventSink,
    RestoreRequest, Sandbox, SandboxRequest,
};
use kuasar_core::config::WasmConfig;
use kuasar_core::error::{io_context, Error, Result};
use kuasar_host::mount::Rootfs;
use kuasar_host::reaper::Reaper;
use kuasar_host::stats::{self, Stats};
use kuasar_host::stdio::{self, IoTasks};
use kuasar_runc as runc;

/// `containerd.types.Descriptor`, for Pids' info.
#[derive(Clone, PartialEq, prost::Message)]
struct ProgramDescriptor {
    #[prost(string, tag = "1")]
    media_type: String,
    #[prost(string, tag = "2")]
    digest: String,
    #[prost(int64, tag = "3")]
    size: i64,
    #[prost(map = "string, string", tag = "5")]
    annotations: std::collections::HashMap<String, String>,
}

/// Bytes a guest may have queued on stdout or stderr before a write waits.
const OUTPUT_BUDGET: usize = 64 << 10;

/// The engine and what instances share, behind every wasm sandbox.
pub struct Shared {
    root: std::path::PathBuf,
    config: WasmConfig,
    /// Made at the first wasm container: a node that runs none pays
    /// nothing for the engine, its threads or its pools.
    engine: Mutex<Option<Arc<WasmEngine>>>,
    reaper: Arc<Reaper>,
}

pub struct Wasm {
    shared: Arc<Shared>,
    /// Runs the entry points of wasm pods that are not wasm (the pause
    /// container of a CRI pod) as Linux containers, as runwasi does.
    linux: runc::Runc,
}

impl Wasm {
    pub fn new(
        root: &std::path::Path,
        cfg: &WasmConfig,
        reaper: Arc<Reaper>,
        linux: runc::Runc,
    ) -> Result<Wasm> {
        Ok(Wasm {
            shared: Arc::new(Shared::new(root, cfg, reaper)?),
            linux,
        })
    }
}

impl Shared {
    pub fn new(root: &std::path::Path, cfg: &WasmConfig, reaper: Arc<Reaper>) -> Result<Shared> {
        if cfg.max_instances == 0 || cfg.max_memory_mib == 0 || cfg.threads == 0 {
            return Err(Error::InvalidArgument(
                "[wasm] max_instances, max_memory_mib and threads must be at least 1".into(),
            ));
        }
        Ok(Shared {
            root: root.to_path_buf(),
            config: cfg.clone(),
            engine: Mutex::new(None),
            reaper,
        })
    }

    /// The engine, made now if this is the first wasm container.
    pub fn engine(&self) -> Result<Arc<WasmEngine>> {
        let mut engine = self.engine.lock().unwrap();
        if let Some(e) = &*engine {
            return Ok(e.clone());
        }
        let made = Arc::new(WasmEngine::new(&self.root, &self.config)?);
        *engine = Some(made.clone());
        Ok(made)
    }
}

fn wasi_error(what: &str) -> impl FnOnce(wasmtime::Error) -> Error + '_ {
    move |e| Error::InvalidArgument(format!("{what}: {e:#}"))
}

#[async_trait]
impl Backend for Wasm {
    fn kind(&self) -> Kind {
        Kind::Wasm
    }

    fn capabilities(&self) -> Capabilities {
        // Instances live in the daemon's memory: a re-exec would lose them.
        Capabilities {
            survives_reexec: false,
            survives_crash: false,
        }
    }

    async fn create_sandbox(&self, req: SandboxRequest) -> Result<Arc<dyn Sandbox>> {
        Ok(Arc::new(WasmSandbox {
            shared: self.shared.clone(),
            linux: self.linux.sandbox(&req),
        }))
    }

    async fn restore_sandbox(
        &self,
        req: SandboxRequest,
        record: BackendRecord,
        _fds: Vec<std::os::fd::OwnedFd>,
    ) -> Result<Arc<dyn Sandbox>> {
        Ok(Arc::new(WasmSandbox {
            shared: self.shared.clone(),
            linux: self.linux.restored_sandbox(&req, record),
        }))
    }

    async fn cleanup(&self, namespace: &str, id: &str, bundle: Option<&Path>) -> Result<()> {
        // An instance leaves nothing outside the daemon but its rootfs; a
        // Linux container of the pod leaves what runc leaves.
        self.linux.cleanup(namespace, id, bundle).await
    }
}

/// A wasm pod: its wasm containers are instances in the daemon, the rest
/// (its pause container) Linux containers of the pod.
struct WasmSandbox {
    shared: Arc<Shared>,
    linux: Arc<runc::RuncSandbox>,
}

/// The CRI annotation that marks a pod's pause container.
const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";

#[async_trait]
impl Sandbox for WasmSandbox {
    async fn start(&self) -> Result<u32> {
        self.linux.start().await
    }

    async fn stop(&self) -> Result<()> {
        self.linux.stop().await
    }

    fn record(&self) -> BackendRecord {
        self.linux.record()
    }

    async fn create_container(&self, req: CreateRequest) -> Result<Box<dyn Container>> {
        // A wasm container's sockets live in the pod's network namespace,
        // named in its spec.
        self.linux.join_pod(&req.bundle)?;
        let rootfs = Rootfs::mount(&req.rootfs, &req.bundle)?;
        let linux = {
            let bundle = req.bundle.clone();
            tokio::task::spawn_blocking(move || runs_as_linux(&bundle))
                .await
                .unwrap_or(false)
        };
        if linux {
            return self.linux.create_mounted(req, rootfs).await;
        }
        match self.shared.create_instance(req).await {
            Ok(mut c) => {
                c.rootfs = rootfs;
                Ok(Box::new(c))
            }
            Err(e) => {
                let _ = rootfs.unmount();
                Err(e)
            }
        }
    }

    async fn restore_container(&self, req: RestoreRequest) -> Result<Box<dyn Container>> {
        // Only Linux containers survive a re-exec (see `capabilities`).
        self.linux.restore_container(req).await
    }
}

/// Whether a container of a wasm pod is a Linux container: the pod's pause
/// container, or an entry point that is an ELF program, not wasm.
fn runs_as_linux(bundle: &Path) -> bool {
    let Ok(text) = std::fs::read(bundle.join("config.json")) else {
        return false;
    };
    let Ok(spec) = serde_json::from_slice::<serde_json::Value>(&text) else {
        return false;
    };
    if spec["annotations"][CONTAINER_TYPE] == "sandbox" {
        return true;
    }
    let Some(entry) = spec["process"]["args"][0].as_str() else {
        return false;
    };
    let root = spec["root"]["path"].as_str().unwrap_or("rootfs");
    let root = bundle.join(root);
    let path = root.join(entry.trim_start_matches('/'));
    let mut magic = [0u8; 4];
    use std::io::Read;
    std::fs::File::open(&path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .map(|_| &magic == b"\x7fELF")
        .unwrap_or(false)
}

impl Shared {
    /// Not in the rootfs: the program may be a wasm layer of the image.
    async fn program_from_image(
        &self,
        req: &CreateRequest,
        spec: &mut spec::InstanceSpec,
    ) -> Result<Vec<u8>> {
        let not_found = |why: String| {
            Error::NotFound(format!(
                "wasm program {:?} not found in the container's rootfs{why}",
                spec.program_path
            ))
        };
        if req.containerd.is_empty() {
            return Err(not_found(String::new()));
        }
        match layers::program_from_image(
            &req.containerd,
            &req.namespace,
            &req.id,
            &spec.program_path,
        )
        .await
        {
            Ok((from, bytes)) => {
                spec.program_path = from;
                Ok(bytes)
            }
            Err(Error::NotFound(why)) => Err(not_found(format!(", nor as a wasm layer ({why})"))),
            Err(e) => Err(e),
        }
    }

    async fn create_instance(&self, req: CreateRequest) -> Result<WasmContainer> {
        let bundle = req.bundle.clone();
        let (mut spec, bytes) = tokio::task::spawn_blocking(move || spec::load(&bundle))
            .await
            .map_err(|e| Error::Internal(format!("reading the bundle: {e}")))??;
        let bytes = match bytes {
            Some(b) => b,
            None => self.program_from_image(&req, &mut spec).await?,
        };
        let (digest, size) = (engine::digest(&bytes), bytes.len());
        let engine = self.engine()?;
        let program = engine.program(bytes).await?;
        if let Program::Core { module, .. } = &*program {
            match module.get_export(&spec.function) {
                Some(wasmtime::ExternType::Func(_)) => {}
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "{}: the module exports no function {:?}",
                        spec.program_path, spec.function
                    )))
                }
            }
        }

        // A terminal merges both streams, as a tty would.
        let mut paths = req.stdio.clone();
        if paths.terminal {
            paths.stderr = paths.stdout.clone();
        }
        let outputs = stdio::open_outputs(&paths, &req.namespace, &req.id, &self.reaper).await?;
        let mut io = IoTasks::default();
        io.logger = outputs.logger;
        let stdin = if paths.stdin.is_empty() {
            None
        } else {
            let (from, to) = stdio::pipe()?;
            io.copy_stdin(&paths.stdin, to)?;
            Some(from)
        };
        // The end-of-run message goes to stderr after the guest's own
        // writers are gone.
        let notice = outputs
            .stderr
            .try_clone()
            .map_err(io_context("duplicating stderr"))?;

        let memory = Arc::new(Memory::default());
        memory.limit.store(spec.memory_limit, Ordering::SeqCst);
        let control = Arc::new(Control::default());
        let mut wasi = WasiCtxBuilder::new();
        wasi.args(&spec.args).envs(&spec.env).initial_cwd(&spec.cwd);
        for p in &spec.preopens {
            let perms = if p.readonly {
                FsPerms::ReadOnly
            } else {
                FsPerms::ReadWrite
            };
            wasi.preopened_dir(&p.host, &p.guest, perms)
                .map_err(wasi_error(&format!("preopening {}", p.host.display())))?;
        }
        // Sockets only when asked for, and then only in the pod's network
        // namespace, opened now so that a bad one fails Create. No name
        // lookups: the daemon's resolver would read the host's
        // resolv.conf, not the pod's.
        let netns = if spec.network.any() {
            wasi.inherit_network()
                .allow_tcp(spec.network.tcp)
                .allow_udp(spec.network.udp);
            let ns = spec.netns.clone();
            tokio::task::spawn_blocking(move || netns::open(&ns))
                .await
                .map_err(|e| Error::Internal(format!("opening the network namespace: {e}")))??
        } else {
            None
        };
        let store = {
            // Streams register with the reactor of the threads that run
            // the instance.
            let _runtime = engine.handle.enter();
            let out = stdio::writer(outputs.stdout).map_err(io_context("watching stdout"))?;
            let err = stdio::writer(outputs.stderr).map_err(io_context("watching stderr"))?;
            wasi.stdout(AsyncStdoutStream::new(OUTPUT_BUDGET, out))
                .stderr(AsyncStdoutStream::new(OUTPUT_BUDGET, err));
            if let Some(from) = stdin {
                let from = stdio::FdStream::new(from).map_err(io_context("watching stdin"))?;
                wasi.stdin(AsyncStdinStream::new(from));
            }
            let mut store = Store::new(
                &engine.engine,
                State {
                    wasi: wasi.build_p1(),
                    limits: Limiter {
                        memory: memory.clone(),
                        events: req.events.clone(),
                    },
                },
            );
            store.limiter(|s| &mut s.limits);
            store.set_epoch_deadline(1);
            // yield_now puts the instance at the back of its thread's queue:
            // busy instances take turns in order, one tick each.
            let ticked = control.clone();
            store.epoch_deadline_callback(move |_| {
                ticked.tick();
                Ok(wasmtime::UpdateDeadline::YieldCustom(
                    1,
                    Box::pin(tokio::task::yield_now()),
                ))
            });
            store
        };
        tracing::debug!(id = %req.id, program = %spec.program_path,
            component = program.is_component(), "wasm instance created");
        Ok(WasmContainer {
            engine: engine.clone(),
            id: req.id,
            program,
            digest,
            size,
            function: spec.function,
            events: req.events,
            memory,
            control,
            run: Mutex::new(Run::Created {
                store,
                notice,
                netns,
            }),
            io: tokio::sync::Mutex::new(io),
            rootfs: Rootfs::adopt(&req.bundle, false),
        })
    }
}

enum Run {
    Created {
        store: Store<State>,
        notice: OwnedFd,
        /// Where its sockets live, if it has any and not in the daemon's
        /// own network namespace.
        netns: Option<OwnedFd>,
    },
    Started,
    Ended,
}

pub struct WasmContainer {
    engine: Arc<WasmEngine>,
    id: String,
    program: Arc<Program>,
    /// The program's content digest and size.
    digest: engine::ContentDigest,
    size: usize,
    function: String,
    events: EventSink,
    memory: Arc<Memory>,
    control: Arc<Control>,
    run: Mutex<Run>,
    io: tokio::sync::Mutex<IoTasks>,
    /// Set by the sandbox that mounted it.
    rootfs: Rootfs,
}

/// Writes the end-of-run notice, without waiting long on a full FIFO.
async fn write_notice(fd: OwnedFd, text: String) {
    if let Ok(mut w) = stdio::writer(fd) {
        let write = async {
            w.write_all(text.as_bytes()).await?;
            // A regular file's writes complete on flush.
            w.flush().await
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
    }
}

fn finish(events: &EventSink, outcome: &Outcome) {
    let _ = events.send(ContainerEvent::Exit(None, outcome.exit_status()));
}

/// Runs `run` in a task of its own on `handle`: a panic of host code ends
/// that task and comes back as its message.
fn isolated<T: Send + 'static>(
    handle: &tokio::runtime::Handle,
    run: impl std::future::Future<Output = T> + Send + 'static,
) -> impl std::future::Future<Output = netns::Ended<T>> {
    let task = handle.spawn(run);
    async move { task.await.map_err(kuasar_core::error::panic_message) }
}

/// Waits for an instance that runs in a task of its own (so that a panic
/// of host code while running it ends that task, not the daemon), then
/// reports its end: a notice on its stderr where there is one, and its exit
/// status.
fn monitor(
    engine: &WasmEngine,
    run: impl std::future::Future<Output = netns::Ended<Outcome>> + Send + 'static,
    running: RunningGuard,
    notice: OwnedFd,
    events: EventSink,
    id: String,
) {
    engine.handle.spawn(async move {
        let outcome = match run.await {
            Ok(o) => o,
            Err(panic) => Outcome::Trapped(format!("host panic: {panic}")),
        };
        drop(running);
        tracing::debug!(%id, ?outcome, "wasm instance ended");
        if let Some(text) = outcome.message() {
            write_notice(notice, text).await;
        }
        finish(&events, &outcome);
    });
}

#[async_trait]
impl Container for WasmContainer {
    fn pid(&self) -> u32 {
        std::process::id()
    }

    async fn start(&self) -> Result<u32> {
        let already =
            || Error::FailedPrecondition(format!("wasm instance {} was already started", self.id));
        // An instance with sockets gets its thread first: should it fail,
        // the instance is still there to start again or delete.
        let netns = match &*self.run.lock().unwrap() {
            Run::Created { netns, .. } => netns
                .as_ref()
                .map(|ns| ns.try_clone())
                .transpose()
                .map_err(io_context("duplicating the network namespace"))?,
            _ => return Err(already()),
        };
        let thread = match netns {
            Some(ns) => Some(netns::NetThread::start(ns, "wasm-net").await?),
            None => None,
        };
        let (store, notice) = match std::mem::replace(&mut *self.run.lock().unwrap(), Run::Started)
        {
            Run::Created { store, notice, .. } => (store, notice),
            other => {
                *self.run.lock().unwrap() = other;
                return Err(already());
            }
        };
        // An instance on a thread of its own takes no turns on the engine's
        // threads: it does not count among their busy ones.
        let busy = match thread {
            None => self.engine.busy.clone(),
            Some(_) => Arc::default(),
        };
        let run = Supervised::new(
            instance::run(self.program.clone(), self.function.clone(), store),
            self.control.clone(),
            busy,
        );
        let run: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>> = match thread {
            None => Box::pin(isolated(&self.engine.handle, run)),
            Some(thread) => Box::pin(thread.isolated(run)),
        };
        monitor(
            &self.engine,
            run,
            self.engine.running(),
            notice,
            self.events.clone(),
            self.id.clone(),
        );
        Ok(self.pid())
    }

    async fn exec(&self, _exec_id: &str, _spec: &[u8], _stdio: &stdio::StdioPaths) -> Result<u32> {
        Err(Error::Unimplemented(
            "exec is not supported in wasm containers: an instance has one entry point".into(),
        ))
    }

    fn exec_supported(&self) -> Result<()> {
        Err(Error::Unimplemented(
            "exec is not supported in wasm containers: an instance has one entry point".into(),
        ))
    }

    async fn kill(&self, exec_id: Option<&str>, signal: u32, _all: bool) -> Result<()> {
        if let Some(e) = exec_id {
            return Err(Error::NotFound(format!("exec {e} not found")));
        }
        match signal {
            // Signal 0 only checks; the default action of these is to ignore.
            0 | 17 | 23 | 28 => return Ok(()),
            19 | 20 => {
                self.control.pause();
                return Ok(());
            }
            18 => {
                self.control.resume();
                return Ok(());
            }
            _ => {}
        }
        let mut run = self.run.lock().unwrap();
        match std::mem::replace(&mut *run, Run::Ended) {
            // Never started: it ends without running, as runc's init would.
            Run::Created {
                store,
                notice,
                netns,
            } => {
                drop((store, notice, netns));
                finish(&self.events, &Outcome::Killed(signal));
            }
            Run::Started => {
                *run = Run::Started;
                self.control.kill(signal);
            }
            Run::Ended => {}
        }
        Ok(())
    }

    async fn pause(&self) -> Result<()> {
        self.control.pause();
        Ok(())
    }

    async fn resume(&self) -> Result<()> {
        self.control.resume();
        Ok(())
    }

    async fn update(&self, resources: &[u8]) -> Result<()> {
        let r: oci_spec::runtime::LinuxResources = serde_json::from_slice(resources)
            .map_err(|e| Error::InvalidArgument(format!("parsing resources: {e}")))?;
        if let Some(limit) = r.memory().as_ref().and_then(|m| m.limit()) {
            self.memory
                .limit
                .store(if limit > 0 { limit as u64 } else { 0 }, Ordering::SeqCst);
        }
        Ok(())
    }

    async fn stats(&self) -> Result<Any> {
        let used = self.memory.usage.load(Ordering::SeqCst);
        Ok(stats::to_any_for_host(&Stats::counted(
            self.control.cpu_ns.load(Ordering::Relaxed),
            used,
            // Linear memory never shrinks: what is in use is the peak.
            used,
            self.memory.limit.load(Ordering::SeqCst),
        )))
    }

    async fn pids(&self) -> Result<Vec<ProcessInfo>> {
        // Described as a containerd.types.Descriptor of the program: a type
        // every ctr can decode (ctr 2.x knows no google.protobuf wrappers).
        let info = ProgramDescriptor {
            media_type: if self.program.is_component() {
                "application/vnd.bytecodealliance.wasm.component.layer.v0+wasm"
            } else {
                "application/vnd.w3c.wasm.module.v1+wasm"
            }
            .into(),
            digest: format!("sha256:{}", engine::hex(&self.digest)),
            size: self.size as i64,
            annotations: [(
                "io.kuasar.wasm.pid".to_string(),
                format!(
                    "wasm instance {} runs inside kuasar-sandboxer; pid {} is the daemon's",
                    self.id,
                    self.pid()
                ),
            )]
            .into(),
        };
        let mut any = Any::new();
        any.type_url = "containerd.types.Descriptor".into();
        any.value = prost::Message::encode_to_vec(&info);
        let mut p = ProcessInfo::new();
        p.pid = self.pid();
        p.info = Some(any).into();
        Ok(vec![p])
    }

    async fn resize_pty(&self, _exec_id: Option<&str>, _width: u32, _height: u32) -> Result<()> {
        // The guest sees no terminal; there is nothing to resize.
        Ok(())
    }

    async fn close_stdin(&self, exec_id: Option<&str>) -> Result<()> {
        if let Some(e) = exec_id {
            return Err(Error::NotFound(format!("exec {e} not found")));
        }
        self.io.lock().await.close_stdin().await;
        Ok(())
    }

    async fn delete_exec(&self, _exec_id: &str) {}

    async fn delete(&self, force: bool) -> Result<()> {
        if force {
            self.kill(None, 9, true).await?;
        }
        let mut io = std::mem::take(&mut *self.io.lock().await);
        io.close_stdin().await;
        drop(io);
        Ok(self.rootfs.unmount()?)
    }
}
