//! The shim-v2 Task API (served as both `containerd.task.v2.Task` and
//! `containerd.task.v3.Task`) over any backend.

use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim_protos::api::*;
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskIO, TaskOOM, TaskPaused, TaskResumed,
};
use protobuf::Message;

use super::{
    timestamp, EventTarget, Process, Task, TaskRecord, TOPIC_CREATE, TOPIC_DELETE,
    TOPIC_EXEC_ADDED, TOPIC_OOM, TOPIC_PAUSED, TOPIC_RESUMED,
};
use crate::backend::{ContainerEvent, CreateRequest, ProcessIoHandover, RestoreRequest};
use crate::daemon::{Daemon, Sandbox};
use crate::error::{Error, Result};
use crate::ids;
use crate::rpc::{Handler, RequestContext};
use crate::sandbox_api::SandboxController;
use kuasar_host::stdio::StdioPaths;

pub const SERVICES: [&str; 2] = ["containerd.task.v2.Task", "containerd.task.v3.Task"];

/// The Task API as served on one sandbox's socket.
pub struct TaskService {
    daemon: Arc<Daemon>,
    sandbox: Arc<Sandbox>,
}

fn decode<M: Message>(payload: &[u8]) -> Result<M> {
    M::parse_from_bytes(payload)
        .map_err(|e| Error::InvalidArgument(format!("malformed request: {e}")))
}

fn encode(msg: &impl Message) -> Result<Vec<u8>> {
    msg.write_to_bytes()
        .map_err(|e| Error::Internal(format!("encoding response: {e}")))
}

#[async_trait]
impl Handler for TaskService {
    async fn handle(
        &self,
        ctx: RequestContext,
        service: &str,
        method: &str,
        payload: &[u8],
    ) -> Result<Vec<u8>> {
        let ns = ctx
            .namespace
            .unwrap_or_else(|| self.sandbox.namespace.clone());
        ids::validate("namespace", &ns)?;
        tracing::Span::current().record("namespace", ns.as_str());
        if service == kuasar_sandbox_api::TTRPC_SERVICE {
            // containerd 2.x's shim mode: the Sandbox API at the pod's address.
            let controller = SandboxController {
                daemon: self.daemon.clone(),
                socket_kind: Some(self.sandbox.kind),
            };
            return kuasar_sandbox_api::handle_ttrpc(&controller, &ns, method, payload)
                .await
                .map_err(|s| Error::from_code(s.code, s.message));
        }
        if !SERVICES.contains(&service) {
            return Err(Error::Unimplemented(format!(
                "service {service} is not served here"
            )));
        }
        macro_rules! call {
            ($f:ident, $req:ty) => {{
                let req: $req = decode(payload)?;
                // The call's span (see rpc::server) names the task.
                tracing::Span::current().record("id", req.id.as_str());
                encode(&self.$f(&ns, req).await?)
            }};
        }
        match method {
            "Create" => call!(create, CreateTaskRequest),
            "Start" => call!(start, StartRequest),
            "Delete" => call!(delete, DeleteRequest),
            "Pids" => call!(pids, PidsRequest),
            "Pause" => call!(pause, PauseRequest),
            "Resume" => call!(resume, ResumeRequest),
            "Checkpoint" => call!(checkpoint, CheckpointTaskRequest),
            "Kill" => call!(kill, KillRequest),
            "Exec" => call!(exec, ExecProcessRequest),
            "ResizePty" => call!(resize_pty, ResizePtyRequest),
            "CloseIO" => call!(close_io, CloseIORequest),
            "Update" => call!(update, UpdateTaskRequest),
            "Wait" => call!(wait, WaitRequest),
            "Stats" => call!(stats, StatsRequest),
            "Connect" => call!(connect, ConnectRequest),
            "Shutdown" => call!(shutdown, ShutdownRequest),
            "State" => call!(state, StateRequest),
            other => Err(Error::Unimplemented(format!(
                "/{service}/{other} is not implemented"
            ))),
        }
    }
}

/// Container events flow into the task for as long as it lives.
fn forward_events(
    daemon: &Arc<Daemon>,
    task: &Arc<Task>,
    mut events_rx: tokio::sync::mpsc::UnboundedReceiver<ContainerEvent>,
) {
    let weak = Arc::downgrade(task);
    let daemon = daemon.clone();
    tokio::spawn(async move {
        while let Some(event) = events_rx.recv().await {
            let Some(task) = weak.upgrade() else { break };
            match event {
                ContainerEvent::Exit(exec_id, status) => {
                    daemon.unpark_stderr(
                        &task.namespace,
                        &task.id,
                        exec_id.as_deref().unwrap_or(""),
                    );
                    daemon.unpark_io(&task.namespace, &task.id, exec_id.as_deref().unwrap_or(""));
                    task.on_exit(exec_id.as_deref(), status);
                    // An exec's too: a restart after a crash must not take
                    // it for running.
                    daemon.save_task(&task);
                }
                ContainerEvent::Oom => {
                    let mut ev = TaskOOM::new();
                    ev.container_id = task.id.clone();
                    task.events.publish(TOPIC_OOM, &ev);
                }
            }
        }
    });
}

/// Rebuilds a task a predecessor daemon ran (live upgrade, or a restart
/// after a crash) from its record. `lost`: its workload died with the
/// predecessor (a backend whose workloads live in the daemon's memory):
/// the task is kept for containerd to learn how it ended, with `lost` as
/// the reason, written to its stderr.
pub async fn restore_task(
    daemon: &Arc<Daemon>,
    sandbox: &Sandbox,
    rec: TaskRecord,
    mut io: Vec<ProcessIoHandover>,
    lost: Option<(
        &str,
        std::collections::HashMap<String, std::os::fd::OwnedFd>,
    )>,
) -> Result<Arc<Task>> {
    let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
    for h in &mut io {
        h.stdin_path = match &h.exec_id {
            None => rec.init.stdio.stdin.clone(),
            Some(e) => rec
                .execs
                .iter()
                .find(|x| &x.exec_id == e)
                .map(|x| x.process.stdio.stdin.clone())
                .unwrap_or_default(),
        };
    }
    let container: Box<dyn crate::backend::Container> = match lost {
        Some((reason, mut parked)) => {
            let live = rec
                .init
                .exit_status
                .is_none()
                .then_some(None)
                .into_iter()
                .chain(
                    rec.execs
                        .iter()
                        .filter(|e| e.process.pid != 0 && e.process.exit_status.is_none())
                        .map(|e| Some(e.exec_id.clone())),
                );
            for exec in live {
                let stderr = match &exec {
                    None => &rec.init.stdio.stderr,
                    Some(e) => rec
                        .execs
                        .iter()
                        .find(|x| &x.exec_id == e)
                        .map(|x| &x.process.stdio.stderr)
                        .unwrap_or(&rec.init.stdio.stderr),
                };
                let label = exec.clone().unwrap_or_default();
                super::lost::tell(parked.remove(&label), stderr, reason);
                let _ = events_tx.send(ContainerEvent::Exit(exec, super::lost::EXIT_STATUS));
            }
            Box::new(super::lost::LostContainer {
                backend: daemon.backend(sandbox.kind)?,
                namespace: rec.namespace.clone(),
                id: rec.id.clone(),
                bundle: rec.bundle.clone(),
                pid: rec.init.pid,
                reason: reason.to_string(),
            })
        }
        None => {
            let backend = sandbox.backend().ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "sandbox {} was handed over without its backend",
                    sandbox.id
                ))
            })?;
            backend
                .restore_container(RestoreRequest {
                    namespace: rec.namespace.clone(),
                    id: rec.id.clone(),
                    bundle: rec.bundle.clone(),
                    pid: rec.init.pid,
                    init_live: rec.init.exit_status.is_none(),
                    execs: rec
                        .execs
                        .iter()
                        .filter(|e| e.process.pid != 0)
                        .map(|e| {
                            (
                                e.exec_id.clone(),
                                e.process.pid,
                                e.process.exit_status.is_none(),
                            )
                        })
                        .collect(),
                    io,
                    events: events_tx,
                    record: rec.backend,
                })
                .await?
        }
    };
    let init = Process::restore(&rec.id, "", Vec::new(), &rec.init);
    let execs = rec
        .execs
        .into_iter()
        .map(|e| {
            let p = Process::restore(&rec.id, &e.exec_id, e.spec.into_bytes(), &e.process);
            (e.exec_id, Arc::new(p))
        })
        .collect();
    let task = Arc::new(Task {
        namespace: rec.namespace.clone(),
        id: rec.id,
        sandbox_id: rec.sandbox_id,
        kind: sandbox.kind,
        bundle: rec.bundle,
        container,
        init: Arc::new(init),
        execs: std::sync::Mutex::new(execs),
        events: EventTarget {
            publisher: daemon.publisher.clone(),
            address: sandbox.ttrpc_address(),
            namespace: rec.namespace,
        },
        persisted: Default::default(),
        created_at: super::from_nanos(rec.created_at_nanos),
    });
    forward_events(daemon, &task, events_rx);
    Ok(task)
}

/// How a process is named in messages: its exec id, or "init".
fn process_label(exec_id: &str) -> &str {
    if exec_id.is_empty() {
        "init"
    } else {
        exec_id
    }
}

fn not_running(task: &Task, what: &str) -> Error {
    Error::FailedPrecondition(format!("cannot {what}: task {} is not running", task.id))
}

impl TaskService {
    pub fn new(daemon: Arc<Daemon>, sandbox: Arc<Sandbox>) -> TaskService {
        TaskService { daemon, sandbox }
    }

    fn process(&self, task: &Task, exec_id: &str) -> Result<Arc<Process>> {
        task.process(exec_id)
            .ok_or_else(|| Error::NotFound(format!("exec {exec_id} not found in task {}", task.id)))
    }

    async fn create(&self, ns: &str, req: CreateTaskRequest) -> Result<CreateTaskResponse> {
        ids::validate("id", &req.id)?;
        if !req.checkpoint.is_empty() {
            return Err(Error::Unimplemented(
                "restoring from a checkpoint is not supported".into(),
            ));
        }
        if self.daemon.has_task(ns, &req.id) {
            return Err(Error::AlreadyExists(format!(
                "task {} already exists",
                req.id
            )));
        }
        ids::validate_path("bundle", &req.bundle)?;
        let bundle = std::path::PathBuf::from(&req.bundle);
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        ids::validate_stdio(&stdio)?;
        let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
        let container = self
            .sandbox
            .ready_backend(&self.daemon, &bundle)
            .await?
            .create_container(CreateRequest {
                namespace: ns.into(),
                id: req.id.clone(),
                bundle: bundle.clone(),
                rootfs: req.rootfs.to_vec(),
                stdio: stdio.clone(),
                events: events_tx,
                containerd: self.sandbox.grpc_address(),
            })
            .await?;
        let pid = container.pid();
        self.sandbox.add_member(&req.id);
        let task = Arc::new(Task {
            namespace: ns.into(),
            id: req.id.clone(),
            sandbox_id: self.sandbox.id.clone(),
            kind: self.sandbox.kind,
            bundle,
            container,
            init: Arc::new(Process::new(&req.id, "", stdio, Vec::new(), pid)),
            execs: Default::default(),
            events: EventTarget {
                publisher: self.daemon.publisher.clone(),
                address: self.sandbox.ttrpc_address(),
                namespace: ns.into(),
            },
            persisted: Default::default(),
            created_at: std::time::SystemTime::now(),
        });
        if let Err(e) = self.daemon.insert_task(task.clone()) {
            let _ = task.container.delete(true).await;
            return Err(e);
        }
        forward_events(&self.daemon, &task, events_rx);
        self.daemon.save_task(&task);

        let mut ev = TaskCreate::new();
        ev.container_id = req.id.clone();
        ev.bundle = req.bundle.clone();
        ev.rootfs = req.rootfs.clone();
        let mut io = TaskIO::new();
        io.stdin = req.stdin.clone();
        io.stdout = req.stdout.clone();
        io.stderr = req.stderr.clone();
        io.terminal = req.terminal;
        ev.io = Some(io).into();
        ev.checkpoint = req.checkpoint.clone();
        ev.pid = pid;
        task.events.publish(TOPIC_CREATE, &ev);

        let mut resp = CreateTaskResponse::new();
        resp.pid = pid;
        Ok(resp)
    }

    async fn start(&self, ns: &str, req: StartRequest) -> Result<StartResponse> {
        let task = self.daemon.task(ns, &req.id)?;
        let process = self.process(&task, &req.exec_id)?;
        let view = process.view();
        if view.status != Status::CREATED && view.pid != 0 {
            // Started already: a Start dispatched again after a crash of
            // the daemon (its answer was not written) gets the answer it
            // would have had.
            let mut resp = StartResponse::new();
            resp.pid = view.pid;
            return Ok(resp);
        }
        if view.status != Status::CREATED {
            return Err(Error::FailedPrecondition(format!(
                "process {} of task {} was already started",
                process_label(&req.exec_id),
                req.id
            )));
        }
        if !process.is_init() && task.init.view().exit.is_some() {
            return Err(not_running(&task, "start an exec"));
        }
        // Before the process runs: its exit lets go of it.
        self.daemon
            .park_stderr(task.kind, ns, &req.id, &req.exec_id, &process.stdio.stderr);
        let started = if process.is_init() {
            task.container.start().await
        } else {
            task.container
                .exec(&req.exec_id, &process.spec, &process.stdio)
                .await
        };
        let pid = match started {
            Ok(pid) => pid,
            Err(e) => {
                self.daemon.unpark_stderr(ns, &req.id, &req.exec_id);
                return Err(e);
            }
        };
        process.started(pid, &task.events);
        // An exec's too: a restart after a crash takes it over.
        self.daemon.save_task(&task);
        self.daemon.park_io(&task, Some(&req.exec_id)).await;
        let mut resp = StartResponse::new();
        resp.pid = pid;
        Ok(resp)
    }

    async fn delete(&self, ns: &str, req: DeleteRequest) -> Result<DeleteResponse> {
        let task = self.daemon.task(ns, &req.id)?;
        let process = self.process(&task, &req.exec_id)?;
        let view = process.view();
        if matches!(view.status, Status::RUNNING | Status::PAUSED) {
            return Err(Error::FailedPrecondition(format!(
                "cannot delete a running process ({} of task {})",
                process_label(&req.exec_id),
                req.id
            )));
        }
        let exit_at = view
            .exit
            .map(|e| e.at)
            .unwrap_or_else(std::time::SystemTime::now);
        let exit_status = view.exit.map(|e| e.status).unwrap_or(0);
        if process.is_init() {
            task.container
                .delete(view.status == Status::CREATED)
                .await?;
            self.daemon.remove_task(ns, &req.id);
            let mut ev = TaskDelete::new();
            ev.container_id = req.id.clone();
            ev.id = req.id.clone();
            ev.pid = view.pid;
            ev.exit_status = exit_status;
            ev.exited_at = Some(timestamp(exit_at)).into();
            task.events.publish(TOPIC_DELETE, &ev);
        } else {
            task.container.delete_exec(&req.exec_id).await;
            task.execs.lock().unwrap().remove(&req.exec_id);
            self.daemon.save_task(&task);
        }
        let mut resp = DeleteResponse::new();
        resp.pid = view.pid;
        resp.exit_status = exit_status;
        resp.exited_at = Some(timestamp(exit_at)).into();
        Ok(resp)
    }

    async fn pids(&self, ns: &str, req: PidsRequest) -> Result<PidsResponse> {
        let task = self.daemon.task(ns, &req.id)?;
        let mut resp = PidsResponse::new();
        if task.init.view().exit.is_none() {
            resp.processes = task.container.pids().await?;
        }
        Ok(resp)
    }

    async fn pause(&self, ns: &str, req: PauseRequest) -> Result<Empty> {
        let task = self.daemon.task(ns, &req.id)?;
        if task.init.view().status != Status::RUNNING {
            return Err(not_running(&task, "pause"));
        }
        task.container.pause().await?;
        task.init.set_status(Status::PAUSED);
        let mut ev = TaskPaused::new();
        ev.container_id = req.id.clone();
        task.events.publish(TOPIC_PAUSED, &ev);
        Ok(Empty::new())
    }

    async fn resume(&self, ns: &str, req: ResumeRequest) -> Result<Empty> {
        let task = self.daemon.task(ns, &req.id)?;
        if task.init.view().status != Status::PAUSED {
            return Err(Error::FailedPrecondition(format!(
                "cannot resume: task {} is not paused",
                req.id
            )));
        }
        task.container.resume().await?;
        task.init.set_status(Status::RUNNING);
        let mut ev = TaskResumed::new();
        ev.container_id = req.id.clone();
        task.events.publish(TOPIC_RESUMED, &ev);
        Ok(Empty::new())
    }

    async fn checkpoint(&self, ns: &str, req: CheckpointTaskRequest) -> Result<Empty> {
        self.daemon.task(ns, &req.id)?;
        Err(Error::Unimplemented(format!(
            "checkpoint is not supported by the kuasar {} backend",
            self.sandbox.kind
        )))
    }

    async fn kill(&self, ns: &str, req: KillRequest) -> Result<Empty> {
        let task = self.daemon.task(ns, &req.id)?;
        let process = self.process(&task, &req.exec_id)?;
        if process.view().exit.is_some() {
            return Err(Error::NotFound(format!(
                "process {} of task {} already finished",
                process_label(&req.exec_id),
                req.id
            )));
        }
        if process.view().status == Status::CREATED && !process.is_init() {
            return Err(Error::FailedPrecondition(format!(
                "exec {} has not started",
                req.exec_id
            )));
        }
        let exec = (!req.exec_id.is_empty()).then_some(req.exec_id.as_str());
        task.container.kill(exec, req.signal, req.all).await?;
        Ok(Empty::new())
    }

    async fn exec(&self, ns: &str, req: ExecProcessRequest) -> Result<Empty> {
        let task = self.daemon.task(ns, &req.id)?;
        ids::validate("exec id", &req.exec_id)?;
        if task.init.view().exit.is_some() {
            return Err(not_running(&task, "exec"));
        }
        task.container.exec_supported()?;
        let spec =
            req.spec.as_ref().map(|a| a.value.clone()).ok_or_else(|| {
                Error::InvalidArgument("exec request carries no process spec".into())
            })?;
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        ids::validate_stdio(&stdio)?;
        {
            let mut execs = task.execs.lock().unwrap();
            if execs.contains_key(&req.exec_id) {
                return Err(Error::AlreadyExists(format!(
                    "exec {} already exists",
                    req.exec_id
                )));
            }
            execs.insert(
                req.exec_id.clone(),
                Arc::new(Process::new(&req.id, &req.exec_id, stdio, spec, 0)),
            );
        }
        let mut ev = TaskExecAdded::new();
        ev.container_id = req.id.clone();
        ev.exec_id = req.exec_id.clone();
        task.events.publish(TOPIC_EXEC_ADDED, &ev);
        Ok(Empty::new())
    }

    async fn resize_pty(&self, ns: &str, req: ResizePtyRequest) -> Result<Empty> {
        let task = self.daemon.task(ns, &req.id)?;
        self.process(&task, &req.exec_id)?;
        let exec = (!req.exec_id.is_empty()).then_some(req.exec_id.as_str());
        task.container
            .resize_pty(exec, req.width, req.height)
            .await?;
        Ok(Empty::new())
    }

    async fn close_io(&self, ns: &str, req: CloseIORequest) -> Result<Empty> {
        let task = self.daemon.task(ns, &req.id)?;
        self.process(&task, &req.exec_id)?;
        if req.stdin {
            let exec = (!req.exec_id.is_empty()).then_some(req.exec_id.as_str());
            task.container.close_stdin(exec).await?;
        }
        Ok(Empty::new())
    }

    async fn update(&self, ns: &str, req: UpdateTaskRequest) -> Result<Empty> {
        let task = self.daemon.task(ns, &req.id)?;
        let resources = req
            .resources
            .as_ref()
            .map(|a| a.value.clone())
            .ok_or_else(|| Error::InvalidArgument("update request carries no resources".into()))?;
        serde_json::from_slice::<serde_json::Value>(&resources)
            .map_err(|e| Error::InvalidArgument(format!("resources are not valid JSON: {e}")))?;
        task.container.update(&resources).await?;
        Ok(Empty::new())
    }

    async fn wait(&self, ns: &str, req: WaitRequest) -> Result<WaitResponse> {
        let task = self.daemon.task(ns, &req.id)?;
        let process = self.process(&task, &req.exec_id)?;
        drop(task);
        let exit = process.wait().await;
        let mut resp = WaitResponse::new();
        resp.exit_status = exit.status;
        resp.exited_at = Some(timestamp(exit.at)).into();
        Ok(resp)
    }

    async fn stats(&self, ns: &str, req: StatsRequest) -> Result<StatsResponse> {
        let task = self.daemon.task(ns, &req.id)?;
        if task.init.view().exit.is_some() {
            return Err(not_running(&task, "collect stats"));
        }
        let mut resp = StatsResponse::new();
        resp.stats = Some(task.container.stats().await?).into();
        Ok(resp)
    }

    async fn connect(&self, ns: &str, req: ConnectRequest) -> Result<ConnectResponse> {
        let mut resp = ConnectResponse::new();
        resp.shim_pid = std::process::id();
        match self.daemon.task(ns, &req.id) {
            Ok(task) => resp.task_pid = task.init.view().pid,
            // A sandbox without a task of its own (containerd 2.x) is fine.
            Err(_) if req.id == self.sandbox.id => {}
            Err(e) => return Err(e),
        }
        Ok(resp)
    }

    async fn shutdown(&self, _ns: &str, _req: ShutdownRequest) -> Result<Empty> {
        // containerd sends Shutdown after every task delete; the daemon
        // serves every sandbox on the node and never exits because of it.
        Ok(Empty::new())
    }

    async fn state(&self, ns: &str, req: StateRequest) -> Result<StateResponse> {
        let task = self.daemon.task(ns, &req.id)?;
        let process = self.process(&task, &req.exec_id)?;
        let v = process.view();
        let mut resp = StateResponse::new();
        resp.id = req.id.clone();
        resp.exec_id = req.exec_id.clone();
        resp.bundle = task.bundle.display().to_string();
        resp.pid = v.pid;
        resp.status = v.status.into();
        resp.stdin = process.stdio.stdin.clone();
        resp.stdout = process.stdio.stdout.clone();
        resp.stderr = process.stdio.stderr.clone();
        resp.terminal = process.stdio.terminal;
        if let Some(exit) = v.exit {
            resp.exit_status = exit.status;
            resp.exited_at = Some(timestamp(exit.at)).into();
        }
        Ok(resp)
    }
}

#[cfg(test)]
#[path = "service_tests.rs"]
mod tests;
