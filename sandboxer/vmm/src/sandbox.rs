//! A VM sandbox and its containers: every Task API call is forwarded to
//! the guest agent; stdio flows between containerd's FIFOs and the guest
//! over the agent channel.
//!
//! A running sandbox writes down what it holds (`vm.json` in its
//! directory: qemu's pid, the containers, their processes and streams) at
//! every change of its containers, and parks the agent channel and the
//! outputs in the holder; a daemon restarted after a crash takes the VM
//! over from both (see [`VmSandbox::restore`]).

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim_protos::api::ProcessInfo;
use kuasar_agent_api::{self as api, request, response};
use kuasar_core::backend::{
    BackendRecord, Container, CreateRequest, RestoreRequest, Sandbox, SandboxRequest,
};
use kuasar_core::error::{io_context, Error, Result};
use kuasar_host::stdio::{self, FdStream, IoTasks, StdioPaths};
use protobuf::well_known_types::any::Any;
use protobuf::Message;
use tokio::io::AsyncReadExt;
use tokio::sync::Mutex;

use crate::agent::{Agent, AgentRecord};
use crate::share::{Share, ShareRecord};
use crate::vm::{self, BootRequest, Guest, Vm};
use crate::Shared;

/// How long an ordinary call may take in the guest.
const CALL: Duration = Duration::from_secs(30);
/// Create and Exec run the OCI runtime in the guest (slow under TCG).
const LAUNCH: Duration = Duration::from_secs(40);

/// The containers of a sandbox: what each keeps on the host, shared by its
/// task and the sandbox (which hands it over in a live upgrade).
type Containers = Arc<std::sync::Mutex<HashMap<String, Arc<ContainerState>>>>;

pub struct VmSandbox {
    shared: Arc<Shared>,
    req: SandboxRequest,
    vm: std::sync::Mutex<Option<Arc<Vm>>>,
    containers: Containers,
    ledger: Arc<Ledger>,
}

/// `vm.json`: the sandbox's record, rewritten (atomically) at every change
/// of its containers, for a restart after a crash.
struct Ledger {
    path: PathBuf,
    /// Serialises writes: the last to take it writes the newest state.
    writing: Mutex<()>,
}

impl Ledger {
    async fn save(&self, vm: &Vm, containers: &Containers) {
        let _w = self.writing.lock().await;
        let record = match snapshot(vm, containers, None).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("recording the VM: {e}");
                return;
            }
        };
        let written = serde_json::to_vec(&record)
            .map_err(std::io::Error::other)
            .and_then(|data| kuasar_protocol::shim::write_atomic(&self.path, &data));
        if let Err(e) = written {
            tracing::warn!("recording the VM in {}: {e}", self.path.display());
        }
    }

    fn read(&self) -> Option<Result<SandboxRecord>> {
        let data = std::fs::read(&self.path).ok()?;
        Some(
            serde_json::from_slice(&data)
                .map_err(|e| Error::Internal(format!("{}: {e}", self.path.display()))),
        )
    }

    fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What a successor daemon needs of a running VM sandbox. The handed-over
/// descriptors are the agent channel, the output streams of
/// `agent.outputs`, then the stdin FIFOs the processes name by index.
#[derive(serde::Serialize, serde::Deserialize)]
struct SandboxRecord {
    pid: i32,
    kernel_release: String,
    agent: AgentRecord,
    containers: Vec<ContainerRecord>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ContainerRecord {
    id: String,
    namespace: String,
    pid: u32,
    share: ShareRecord,
    processes: Vec<ProcessRecord>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ProcessRecord {
    /// Empty for the init process.
    exec_id: String,
    streams: Vec<u64>,
    stdin: Option<Stdin>,
    /// Index of the opened stdin FIFO among the handed-over descriptors.
    stdin_fd: Option<usize>,
}

/// A process's stdin: its stream and containerd's FIFO.
#[derive(serde::Serialize, serde::Deserialize, Clone)]
struct Stdin {
    sid: u64,
    path: String,
}

impl VmSandbox {
    pub fn new(shared: Arc<Shared>, req: SandboxRequest) -> VmSandbox {
        let ledger = Arc::new(Ledger {
            path: req.state_dir.join("vm.json"),
            writing: Mutex::new(()),
        });
        VmSandbox {
            shared,
            req,
            vm: std::sync::Mutex::new(None),
            containers: Default::default(),
            ledger,
        }
    }

    /// A sandbox a predecessor daemon ran, from its record and descriptors.
    pub async fn restore(
        shared: Arc<Shared>,
        req: SandboxRequest,
        record: BackendRecord,
        fds: Vec<OwnedFd>,
    ) -> Result<VmSandbox> {
        let sandbox = VmSandbox::new(shared, req);
        if record.is_null() {
            // A live upgrade hands over a running VM's record; a restart
            // after a crash finds it written down.
            return match sandbox.ledger.read() {
                None => Ok(sandbox),
                Some(rec) => {
                    sandbox.resume(rec?).await?;
                    Ok(sandbox)
                }
            };
        }
        let rec: SandboxRecord = serde_json::from_value(record)
            .map_err(|e| Error::Internal(format!("the VM's handover record: {e}")))?;
        let mut fds = fds.into_iter();
        let channel = fds
            .next()
            .ok_or_else(|| Error::Internal("the VM's agent channel was not handed over".into()))?;
        let outputs: Vec<OwnedFd> = fds.by_ref().take(rec.agent.outputs.len()).collect();
        let mut rest: Vec<Option<OwnedFd>> = fds.map(Some).collect();
        let agent = Agent::adopt(channel, &rec.agent, outputs, sandbox.req.parking.clone())?;
        let guest = Guest {
            kernel_release: rec.kernel_release,
            boot_time: Duration::ZERO,
        };
        let vm = Vm::watch(
            rec.pid,
            agent.clone(),
            guest,
            &sandbox.req.state_dir,
            &sandbox.shared.reaper,
        );
        vm.keep_time();
        sandbox.adopt_containers(&agent, rec.containers, |i| {
            i.and_then(|i| rest.get_mut(i).and_then(Option::take))
        });
        *sandbox.vm.lock().unwrap() = Some(Arc::new(vm));
        // The agent sends what it held since the predecessor's Hold; exits
        // wait for their tasks in the agent's unrouted events.
        agent
            .call(request::Call::Release(api::Empty {}), CALL)
            .await?;
        Ok(sandbox)
    }

    /// Takes over the VM a crashed predecessor wrote down in `rec`: its
    /// qemu (no longer this daemon's child), the agent channel and the
    /// outputs it parked; stdin FIFOs are opened again by path. The agent
    /// then says what happened meanwhile: exits are reported, processes no
    /// record names (a create or exec cut short by the crash) are removed.
    async fn resume(&self, rec: SandboxRecord) -> Result<()> {
        let dir = &self.req.state_dir;
        if !Vm::is_ours(rec.pid, dir) {
            return Err(Error::Unavailable(format!(
                "qemu (pid {}) of the VM is gone",
                rec.pid
            )));
        }
        let parking = &self.req.parking;
        let channel = parking.take("agent").ok_or_else(|| {
            Error::Unavailable(
                "the agent channel was not parked (the daemon ran without its holder)".into(),
            )
        })?;
        let outputs = rec
            .agent
            .outputs
            .iter()
            .filter_map(|&sid| parking.take(&format!("out/{sid}")).map(|fd| (sid, fd)))
            .collect();
        let live = rec
            .agent
            .live
            .iter()
            .map(|(id, execs)| (id.clone(), execs.iter().cloned().collect()))
            .collect();
        let agent = Agent::resume(
            channel,
            parking.clone(),
            outputs,
            live,
            rec.agent.next_stream,
        )?;
        let guest = Guest {
            kernel_release: rec.kernel_release,
            boot_time: Duration::ZERO,
        };
        let vm = Vm::watch_foreign(rec.pid, agent.clone(), guest, dir, &self.shared.reaper);
        let recorded: HashMap<String, Vec<String>> = rec
            .containers
            .iter()
            .map(|c| {
                let execs = c.processes.iter().map(|p| p.exec_id.clone()).collect();
                (c.id.clone(), execs)
            })
            .collect();
        self.adopt_containers(&agent, rec.containers, |_| None);
        let vm = Arc::new(vm);
        *self.vm.lock().unwrap() = Some(vm.clone());
        let processes = match agent.resync(CALL).await {
            Ok(p) => p,
            Err(e) => {
                *self.vm.lock().unwrap() = None;
                return Err(e);
            }
        };
        vm.keep_time();
        for p in processes {
            let known = recorded
                .get(&p.id)
                .is_some_and(|execs| execs.contains(&p.exec_id));
            if known {
                continue;
            }
            tracing::info!(sandbox = %self.req.id, container = %p.id, exec = %p.exec_id, "removing a process the crash cut short");
            let removed = if recorded.contains_key(&p.id) {
                let _ = agent
                    .call(
                        request::Call::Kill(api::Kill {
                            id: p.id.clone(),
                            exec_id: p.exec_id.clone(),
                            signal: 9,
                            all: false,
                        }),
                        CALL,
                    )
                    .await;
                agent
                    .call(
                        request::Call::DeleteExec(api::ProcessRef {
                            id: p.id.clone(),
                            exec_id: p.exec_id.clone(),
                        }),
                        CALL,
                    )
                    .await
            } else {
                agent
                    .call(
                        request::Call::Delete(api::Delete {
                            id: p.id.clone(),
                            force: true,
                        }),
                        CALL,
                    )
                    .await
            };
            if let Err(e) = removed {
                tracing::warn!(sandbox = %self.req.id, container = %p.id, "{e}");
            }
        }
        parking.unpark_rest();
        self.ledger.save(&vm, &self.containers).await;
        tracing::info!(
            namespace = %self.req.namespace,
            sandbox = %self.req.id,
            pid = vm.pid,
            containers = self.containers.lock().unwrap().len(),
            "sandbox VM taken over after a crash"
        );
        Ok(())
    }

    /// Rebuilds the containers of a record; `stdin_from` gives the opened
    /// stdin FIFO a process's record points at, if one was handed over.
    fn adopt_containers(
        &self,
        agent: &Arc<Agent>,
        containers: Vec<ContainerRecord>,
        mut stdin_from: impl FnMut(Option<usize>) -> Option<OwnedFd>,
    ) {
        for c in containers {
            let mut init = None;
            let mut execs = HashMap::new();
            for p in c.processes {
                let from = stdin_from(p.stdin_fd);
                let io = adopt_process(agent, p.streams, p.stdin, from);
                match p.exec_id.as_str() {
                    "" => init = Some(io),
                    e => {
                        execs.insert(e.to_string(), io);
                    }
                }
            }
            let state = ContainerState {
                id: c.id.clone(),
                namespace: c.namespace,
                pid: c.pid,
                share: Share::adopt(c.share),
                init: Mutex::new(init.unwrap_or_default()),
                execs: Mutex::new(execs),
            };
            self.containers
                .lock()
                .unwrap()
                .insert(c.id, Arc::new(state));
        }
    }

    fn vm(&self) -> Result<Arc<Vm>> {
        self.vm.lock().unwrap().clone().ok_or_else(|| {
            Error::FailedPrecondition(format!("the VM of sandbox {} is not running", self.req.id))
        })
    }

    fn shared_dir(&self) -> PathBuf {
        self.req.state_dir.join("shared")
    }
}

#[async_trait]
impl Sandbox for VmSandbox {
    async fn start(&self) -> Result<u32> {
        if let Some(vm) = self.vm.lock().unwrap().as_ref() {
            return Ok(vm.pid as u32);
        }
        let config = &self.shared.config;
        let size = crate::size::size(config, &self.req.resources, crate::size::host_memory_mib())?;
        let accel = self.shared.accel().await;
        let pod = self.req.pod.clone();
        let t = vm::now();
        let hello = api::Hello {
            version: api::VERSION,
            hostname: pod
                .as_ref()
                .and_then(|p| p.hostname.clone())
                .unwrap_or_default(),
            unix_seconds: t.unix_seconds,
            unix_nanos: t.unix_nanos,
        };
        let vm = Vm::boot(
            BootRequest {
                config,
                accel,
                vcpus: size.vcpus,
                memory_mib: size.memory_mib,
                dir: &self.req.state_dir,
                hello,
                timeout: Duration::from_millis(config.boot_timeout_ms),
                parking: self.req.parking.clone(),
            },
            &self.shared.reaper,
        )
        .await
        .inspect_err(|_| self.remove_dir())?;
        tracing::info!(
            namespace = %self.req.namespace,
            sandbox = %self.req.id,
            pid = vm.pid,
            accel = accel.as_str(),
            vcpus = size.vcpus,
            memory_mib = size.memory_mib,
            kernel = %vm.guest.kernel_release,
            boot_ms = vm.guest.boot_time.as_millis() as u64,
            "sandbox VM up"
        );
        vm.keep_time();
        let pid = vm.pid as u32;
        let vm = Arc::new(vm);
        *self.vm.lock().unwrap() = Some(vm.clone());
        self.ledger.save(&vm, &self.containers).await;
        Ok(pid)
    }

    async fn stop(&self) -> Result<()> {
        let vm = self.vm.lock().unwrap().take();
        if let Some(vm) = vm {
            vm.shutdown(Duration::from_millis(
                self.shared.config.shutdown_timeout_ms,
            ))
            .await;
        }
        self.ledger.remove();
        self.remove_dir();
        Ok(())
    }

    async fn create_container(&self, req: CreateRequest) -> Result<Box<dyn Container>> {
        let vm = self.vm()?;
        let config = req.bundle.join("config.json");
        let text =
            std::fs::read(&config).map_err(io_context(format!("reading {}", config.display())))?;
        let mut spec: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| Error::InvalidArgument(format!("{}: {e}", config.display())))?;
        let share = Share::prepare(
            &self.shared_dir(),
            &req.id,
            &req.bundle,
            &req.rootfs,
            &mut spec,
        )?;
        let spec = serde_json::to_vec(&spec).map_err(|e| Error::Internal(e.to_string()))?;
        let agent = vm.agent.clone();
        agent.add_container(&req.id, req.events.clone());
        let launched = launch(
            &self.shared,
            &agent,
            &req.namespace,
            &req.id,
            &req.stdio,
            |stdio| {
                request::Call::Create(api::CreateContainer {
                    id: req.id.clone(),
                    spec,
                    stdio: Some(stdio),
                })
            },
        )
        .await;
        let (pid, io) = match launched {
            Ok(l) => l,
            Err(e) => {
                agent.remove_container(&req.id);
                share.release();
                return Err(e);
            }
        };
        agent.process_started(&req.id, "");
        let state = Arc::new(ContainerState {
            id: req.id.clone(),
            namespace: req.namespace,
            pid,
            share,
            init: Mutex::new(io),
            execs: Mutex::new(HashMap::new()),
        });
        self.containers
            .lock()
            .unwrap()
            .insert(req.id, state.clone());
        self.ledger.save(&vm, &self.containers).await;
        Ok(Box::new(VmContainer {
            shared: self.shared.clone(),
            vm,
            state,
            containers: self.containers.clone(),
            ledger: self.ledger.clone(),
        }))
    }

    async fn restore_container(&self, req: RestoreRequest) -> Result<Box<dyn Container>> {
        let vm = self.vm()?;
        let state = self
            .containers
            .lock()
            .unwrap()
            .get(&req.id)
            .cloned()
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "container {} was not handed over with its VM",
                    req.id
                ))
            })?;
        vm.agent.add_container(&req.id, req.events);
        Ok(Box::new(VmContainer {
            shared: self.shared.clone(),
            vm,
            state,
            containers: self.containers.clone(),
            ledger: self.ledger.clone(),
        }))
    }

    async fn handover(&self) -> Result<(BackendRecord, Vec<OwnedFd>)> {
        let Some(vm) = self.vm.lock().unwrap().clone() else {
            return Ok((BackendRecord::Null, Vec::new()));
        };
        if vm.agent.is_dead() {
            return Err(Error::FailedPrecondition(format!(
                "the VM of sandbox {} is gone",
                self.req.id
            )));
        }
        // From its answer on the agent sends nothing: the channel is at a
        // frame boundary for the successor.
        vm.agent
            .call(request::Call::Hold(api::Empty {}), CALL)
            .await?;
        let mut fds = Vec::new();
        let record = snapshot(&vm, &self.containers, Some(&mut fds)).await?;
        let record = serde_json::to_value(record).map_err(|e| Error::Internal(e.to_string()))?;
        Ok((record, fds))
    }

    async fn handover_aborted(&self) {
        let vm = self.vm.lock().unwrap().clone();
        if let Some(vm) = vm {
            if let Err(e) = vm
                .agent
                .call(request::Call::Release(api::Empty {}), CALL)
                .await
            {
                tracing::warn!(sandbox = %self.req.id, "releasing the agent after a failed upgrade: {e}");
            }
        }
    }
}

/// Restarts a process's stdio on the host from what a predecessor handed
/// over: output streams are the agent's already; stdin is read again from
/// the FIFO (opened, or by path if the copy had not opened it yet).
fn adopt_process(
    agent: &Arc<Agent>,
    streams: Vec<u64>,
    stdin: Option<Stdin>,
    from: Option<OwnedFd>,
) -> ProcessIo {
    let mut p = ProcessIo {
        streams,
        stdin: stdin.clone(),
        ..Default::default()
    };
    if let Some(Stdin { sid, path }) = stdin {
        let piped = stdio::pipe().map_err(Error::from).and_then(|(r, w)| {
            match from {
                Some(from) => p.io.adopt_stdin(from, w)?,
                None => p.io.copy_stdin(&path, w)?,
            }
            pump_stdin(agent, sid, r)
        });
        if let Err(e) = piped {
            tracing::warn!("stdin not taken over: {e}");
        }
    }
    p
}

/// Sends what is read from `from` to the guest as stream `sid`, then its
/// end.
fn pump_stdin(agent: &Arc<Agent>, sid: u64, from: OwnedFd) -> Result<()> {
    let agent = Arc::downgrade(agent);
    let mut from = FdStream::new(from).map_err(io_context("watching stdin"))?;
    tokio::spawn(async move {
        let mut buf = vec![0u8; api::IO_CHUNK];
        loop {
            let n = from.read(&mut buf).await.unwrap_or(0);
            let Some(agent) = agent.upgrade() else { return };
            agent.input(sid, buf[..n].to_vec(), n == 0);
            if n == 0 {
                return;
            }
        }
    });
    Ok(())
}

impl VmSandbox {
    fn remove_dir(&self) {
        // Only empty directories: shares are released by their containers.
        let _ = std::fs::remove_dir(self.shared_dir());
        for f in ["console.log", "qemu.log"] {
            let _ = std::fs::remove_file(self.req.state_dir.join(f));
        }
        let _ = std::fs::remove_dir(&self.req.state_dir);
        if let Some(parent) = self.req.state_dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// A process's stdio on the host: stream ids and the copies feeding them.
#[derive(Default)]
struct ProcessIo {
    io: IoTasks,
    streams: Vec<u64>,
    stdin: Option<Stdin>,
}

/// Sets up a process's stdio and sends the call `make` builds with its
/// streams; returns the pid the agent answers with.
async fn launch(
    shared: &Shared,
    agent: &Arc<Agent>,
    namespace: &str,
    id: &str,
    paths: &StdioPaths,
    make: impl FnOnce(api::Stdio) -> request::Call,
) -> Result<(u32, ProcessIo)> {
    let outputs = stdio::open_outputs(paths, namespace, id, &shared.reaper).await?;
    let mut io = ProcessIo::default();
    io.io.logger = outputs.logger;
    let mut streams = api::Stdio {
        terminal: paths.terminal,
        ..Default::default()
    };
    streams.stdout = agent.stream_id();
    agent.add_output(streams.stdout, outputs.stdout)?;
    io.streams.push(streams.stdout);
    if !paths.terminal {
        streams.stderr = agent.stream_id();
        agent.add_output(streams.stderr, outputs.stderr)?;
        io.streams.push(streams.stderr);
    }
    let mut stdin_from = None;
    if !paths.stdin.is_empty() {
        streams.stdin = agent.stream_id();
        let (r, w) = stdio::pipe()?;
        io.io.copy_stdin(&paths.stdin, w)?;
        io.stdin = Some(Stdin {
            sid: streams.stdin,
            path: paths.stdin.clone(),
        });
        stdin_from = Some(r);
    }
    let answered = agent.call(make(streams), LAUNCH).await;
    let pid = match answered {
        Ok(response::Result::Pid(pid)) => pid,
        other => {
            for s in &io.streams {
                agent.drop_output(*s);
            }
            return Err(match other {
                Ok(r) => Error::Internal(format!("the guest agent answered with {r:?}")),
                Err(e) => e,
            });
        }
    };
    // Input flows once the process exists in the guest.
    if let Some(from) = stdin_from {
        pump_stdin(agent, streams.stdin, from)?;
    }
    Ok((pid, io))
}

/// What a container of a VM keeps on the host.
struct ContainerState {
    id: String,
    namespace: String,
    pid: u32,
    share: Share,
    init: Mutex<ProcessIo>,
    execs: Mutex<HashMap<String, ProcessIo>>,
}

struct VmContainer {
    shared: Arc<Shared>,
    vm: Arc<Vm>,
    state: Arc<ContainerState>,
    containers: Containers,
    ledger: Arc<Ledger>,
}

impl std::ops::Deref for VmContainer {
    type Target = ContainerState;

    fn deref(&self) -> &ContainerState {
        &self.state
    }
}

impl VmContainer {
    async fn call(&self, call: request::Call) -> Result<response::Result> {
        self.vm.agent.call(call, CALL).await
    }

    fn process(&self, exec_id: Option<&str>) -> api::ProcessRef {
        api::ProcessRef {
            id: self.id.clone(),
            exec_id: exec_id.unwrap_or_default().to_string(),
        }
    }

    fn container(&self) -> api::ContainerRef {
        api::ContainerRef {
            id: self.id.clone(),
        }
    }
}

#[async_trait]
impl Container for VmContainer {
    fn pid(&self) -> u32 {
        self.pid
    }

    async fn start(&self) -> Result<u32> {
        match self
            .vm
            .agent
            .call(request::Call::Start(self.container()), LAUNCH)
            .await?
        {
            response::Result::Pid(pid) => Ok(pid),
            r => Err(Error::Internal(format!(
                "the guest agent answered Start with {r:?}"
            ))),
        }
    }

    async fn exec(&self, exec_id: &str, spec: &[u8], paths: &StdioPaths) -> Result<u32> {
        let agent = &self.vm.agent;
        let (pid, io) = launch(
            &self.shared,
            agent,
            &self.namespace,
            &self.id,
            paths,
            |stdio| {
                request::Call::Exec(api::Exec {
                    id: self.id.clone(),
                    exec_id: exec_id.to_string(),
                    process: spec.to_vec(),
                    stdio: Some(stdio),
                })
            },
        )
        .await?;
        agent.process_started(&self.id, exec_id);
        self.execs.lock().await.insert(exec_id.to_string(), io);
        self.ledger.save(&self.vm, &self.containers).await;
        Ok(pid)
    }

    async fn kill(&self, exec_id: Option<&str>, signal: u32, all: bool) -> Result<()> {
        if self.vm.agent.is_dead() {
            return Err(Error::NotFound(format!(
                "container {}: its VM is gone, the process already finished",
                self.id
            )));
        }
        self.call(request::Call::Kill(api::Kill {
            id: self.id.clone(),
            exec_id: exec_id.unwrap_or_default().to_string(),
            signal,
            all,
        }))
        .await
        .map(|_| ())
    }

    async fn pause(&self) -> Result<()> {
        self.call(request::Call::Pause(self.container()))
            .await
            .map(|_| ())
    }

    async fn resume(&self) -> Result<()> {
        self.call(request::Call::Resume(self.container()))
            .await
            .map(|_| ())
    }

    async fn update(&self, resources: &[u8]) -> Result<()> {
        self.call(request::Call::Update(api::Update {
            id: self.id.clone(),
            resources: resources.to_vec(),
        }))
        .await
        .map(|_| ())
    }

    async fn stats(&self) -> Result<Any> {
        match self.call(request::Call::Stats(self.container())).await? {
            response::Result::Stats(bytes) => Any::parse_from_bytes(&bytes)
                .map_err(|e| Error::Internal(format!("the guest's stats do not decode: {e}"))),
            r => Err(Error::Internal(format!(
                "the guest agent answered Stats with {r:?}"
            ))),
        }
    }

    async fn pids(&self) -> Result<Vec<ProcessInfo>> {
        match self.call(request::Call::Pids(self.container())).await? {
            response::Result::Pids(p) => Ok(p
                .pids
                .into_iter()
                .map(|pid| {
                    let mut info = ProcessInfo::new();
                    info.pid = pid;
                    info
                })
                .collect()),
            r => Err(Error::Internal(format!(
                "the guest agent answered Pids with {r:?}"
            ))),
        }
    }

    async fn resize_pty(&self, exec_id: Option<&str>, width: u32, height: u32) -> Result<()> {
        self.call(request::Call::ResizePty(api::ResizePty {
            id: self.id.clone(),
            exec_id: exec_id.unwrap_or_default().to_string(),
            width,
            height,
        }))
        .await
        .map(|_| ())
    }

    async fn close_stdin(&self, exec_id: Option<&str>) -> Result<()> {
        // Ending the host's copy sends the end of input to the guest.
        match exec_id {
            None => self.init.lock().await.io.close_stdin().await,
            Some(e) => match self.execs.lock().await.get_mut(e) {
                Some(p) => p.io.close_stdin().await,
                None => return Err(Error::NotFound(format!("exec {e} not found"))),
            },
        }
        Ok(())
    }

    async fn delete_exec(&self, exec_id: &str) {
        let removed = self.execs.lock().await.remove(exec_id);
        if let Some(p) = removed {
            for s in p.streams {
                self.vm.agent.drop_output(s);
            }
            self.ledger.save(&self.vm, &self.containers).await;
        }
        if !self.vm.agent.is_dead() {
            let _ = self
                .call(request::Call::DeleteExec(self.process(Some(exec_id))))
                .await;
        }
    }

    async fn delete(&self, force: bool) -> Result<()> {
        let agent = &self.vm.agent;
        if !agent.is_dead() {
            match self
                .call(request::Call::Delete(api::Delete {
                    id: self.id.clone(),
                    force,
                }))
                .await
            {
                Ok(_) | Err(Error::NotFound(_)) => {}
                // The VM died during the call: nothing is left in it.
                Err(_) if agent.is_dead() => {}
                Err(e) => return Err(e),
            }
        }
        agent.remove_container(&self.id);
        for s in self.init.lock().await.streams.drain(..) {
            agent.drop_output(s);
        }
        self.share.release();
        self.containers.lock().unwrap().remove(&self.id);
        self.ledger.save(&self.vm, &self.containers).await;
        Ok(())
    }
}

/// Releases the VM of a sandbox whose daemon crashed: its qemu (found by
/// the sandbox's directory on its command line: the console log lives
/// there) is killed, the shares under the directory are unmounted, and the
/// directory goes once nothing is mounted in it.
pub async fn discard(state_dir: &std::path::Path) -> Result<()> {
    let mut killed = Vec::new();
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            if Vm::is_ours(pid, state_dir) {
                let pid = nix::unistd::Pid::from_raw(pid);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                killed.push(pid);
            }
        }
    }
    // Its parent (the holder, after the crash) reaps it; wait until gone.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while killed
        .iter()
        .any(|&pid| nix::sys::signal::kill(pid, None).is_ok())
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let shared = state_dir.join("shared");
    let mut mounted = false;
    if let Ok(entries) = std::fs::read_dir(&shared) {
        for e in entries.flatten() {
            let dir = e.path();
            let mut targets: Vec<PathBuf> = std::fs::read_to_string("/proc/self/mountinfo")
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.split(' ').nth(4).map(PathBuf::from))
                .filter(|t| t.starts_with(&dir))
                .collect();
            // Deepest first.
            targets.sort_by_key(|t| std::cmp::Reverse(t.components().count()));
            for t in targets {
                if let Err(e) = kuasar_host::mount::unmount_all(&t) {
                    tracing::warn!("{e}");
                    mounted = true;
                }
            }
        }
    }
    if mounted {
        return Err(Error::Internal(format!(
            "{} still holds mounts: left in place",
            shared.display()
        )));
    }
    let _ = std::fs::remove_dir_all(state_dir);
    if let Some(parent) = state_dir.parent() {
        let _ = std::fs::remove_dir(parent);
    }
    tracing::info!(dir = %state_dir.display(), vms = killed.len(), "discarded the VM of a crashed daemon");
    Ok(())
}

/// The record of a running sandbox. With `fds`, for a live upgrade: the
/// agent channel, the outputs and the opened stdin FIFOs are duplicated
/// into it, in the order the record names them.
async fn snapshot(
    vm: &Vm,
    containers: &Containers,
    mut fds: Option<&mut Vec<OwnedFd>>,
) -> Result<SandboxRecord> {
    let agent = match fds.as_deref_mut() {
        Some(fds) => {
            let (agent, exported) = vm.agent.export()?;
            fds.extend(exported);
            agent
        }
        None => vm.agent.record(),
    };
    let handed = fds.as_ref().map_or(0, |f| f.len());
    let mut records = Vec::new();
    let states: Vec<Arc<ContainerState>> = containers.lock().unwrap().values().cloned().collect();
    for c in states {
        let mut processes = Vec::new();
        let mut export = |exec_id: &str, p: &ProcessIo| {
            let stdin_fd = fds.as_deref_mut().and_then(|fds| {
                let fd = p.io.handover().stdin_from?;
                fds.push(fd);
                Some(fds.len() - 1 - handed)
            });
            processes.push(ProcessRecord {
                exec_id: exec_id.to_string(),
                streams: p.streams.clone(),
                stdin: p.stdin.clone(),
                stdin_fd,
            });
        };
        export("", &*c.init.lock().await);
        for (e, p) in c.execs.lock().await.iter() {
            export(e, p);
        }
        records.push(ContainerRecord {
            id: c.id.clone(),
            namespace: c.namespace.clone(),
            pid: c.pid,
            share: c.share.record(),
            processes,
        });
    }
    Ok(SandboxRecord {
        pid: vm.pid,
        kernel_release: vm.guest.kernel_release.clone(),
        agent,
        containers: records,
    })
}
