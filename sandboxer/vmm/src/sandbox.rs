//! A VM sandbox and its containers: every Task API call is forwarded to
//! the guest agent; stdio flows between containerd's FIFOs and the guest
//! over the agent channel.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim_protos::api::ProcessInfo;
use kuasar_agent_api::{self as api, request, response};
use kuasar_core::backend::{Container, CreateRequest, RestoreRequest, Sandbox, SandboxRequest};
use kuasar_core::error::{io_context, Error, Result};
use kuasar_host::stdio::{self, FdStream, IoTasks, StdioPaths};
use protobuf::well_known_types::any::Any;
use protobuf::Message;
use tokio::io::AsyncReadExt;
use tokio::sync::Mutex;

use crate::agent::Agent;
use crate::share::Share;
use crate::vm::{self, BootRequest, Vm};
use crate::Shared;

/// How long an ordinary call may take in the guest.
const CALL: Duration = Duration::from_secs(30);
/// Create and Exec run runc in the guest (slow under TCG).
const LAUNCH: Duration = Duration::from_secs(40);

pub struct VmSandbox {
    shared: Arc<Shared>,
    req: SandboxRequest,
    vm: std::sync::Mutex<Option<Arc<Vm>>>,
}

impl VmSandbox {
    pub fn new(shared: Arc<Shared>, req: SandboxRequest) -> VmSandbox {
        VmSandbox {
            shared,
            req,
            vm: std::sync::Mutex::new(None),
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
        *self.vm.lock().unwrap() = Some(Arc::new(vm));
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
        Ok(Box::new(VmContainer {
            shared: self.shared.clone(),
            vm,
            id: req.id,
            namespace: req.namespace,
            pid,
            share,
            init: Mutex::new(io),
            execs: Mutex::new(HashMap::new()),
        }))
    }

    async fn restore_container(&self, req: RestoreRequest) -> Result<Box<dyn Container>> {
        Err(Error::Unimplemented(format!(
            "container {}: a VM's containers are not taken over by a new daemon",
            req.id
        )))
    }
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
struct ProcessIo {
    io: IoTasks,
    streams: Vec<u64>,
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
    let mut io = ProcessIo {
        io: IoTasks::default(),
        streams: Vec::new(),
    };
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
        let (agent, sid) = (Arc::downgrade(agent), streams.stdin);
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
    }
    Ok((pid, io))
}

struct VmContainer {
    shared: Arc<Shared>,
    vm: Arc<Vm>,
    id: String,
    namespace: String,
    pid: u32,
    share: Share,
    init: Mutex<ProcessIo>,
    execs: Mutex<HashMap<String, ProcessIo>>,
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
        if let Some(p) = self.execs.lock().await.remove(exec_id) {
            for s in p.streams {
                self.vm.agent.drop_output(s);
            }
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
        Ok(())
    }
}
