//! The agent API served on the port: calls run as tasks of their own and
//! are answered by id; process output, stdin and container events share the
//! channel. Containers are run by the runc backend, as on the host.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kuasar_agent_api::{
    self as api, code, event, frame, request, response, write_frame, Frame, FrameError,
    FrameReader, Status,
};
use kuasar_core::backend::{
    Backend, Container, ContainerEvent, CreateRequest, Sandbox, SandboxRequest,
};
use kuasar_core::error::Error;
use kuasar_host::reaper::Reaper;
use kuasar_host::stdio::{FdStream, StdioPaths};
use protobuf::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};

use crate::init::{self, STATE};

/// The containerd-like namespace runc's state is kept under in the guest.
const NAMESPACE: &str = "vm";
/// How long an exit waits for its process's output to reach the host.
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);

enum Out {
    Frame(Frame),
    /// Written, then nothing more until `Release`.
    Hold(Frame),
    /// Written, then what was held.
    Release(Frame),
    /// Answered once every frame queued before it was written.
    Flush(oneshot::Sender<()>),
}

#[derive(Clone)]
struct Sender(mpsc::UnboundedSender<Out>);

impl Sender {
    fn send(&self, f: Frame) {
        let _ = self.0.send(Out::Frame(f));
    }
}

/// One container: the backend's handle and, per process, when its output
/// has all been sent.
struct Ctr {
    container: Box<dyn Container>,
    bundle: PathBuf,
    outputs: Mutex<HashMap<String, Vec<watch::Receiver<bool>>>>,
}

/// Every process run and not yet deleted, by (container, exec id), for a
/// host that takes the channel over after a crash.
type Processes = Arc<Mutex<BTreeMap<(String, String), api::Process>>>;

struct Agent {
    out: Sender,
    processes: Processes,
    /// The highest stream id the host named.
    max_stream: AtomicU64,
    runc: kuasar_runc::Runc,
    sandbox: tokio::sync::OnceCell<Arc<dyn Sandbox>>,
    containers: Mutex<HashMap<String, Arc<Ctr>>>,
    /// Writers of processes' stdin, by stream id.
    stdin: Mutex<HashMap<u64, mpsc::UnboundedSender<api::Input>>>,
    shutdown: Mutex<Option<oneshot::Sender<()>>>,
}

pub async fn serve(port: OwnedFd) -> Result<(), String> {
    let reaper = Reaper::new();
    tokio::spawn(reaper.clone().run());
    let read_fd = port
        .try_clone()
        .map_err(|e| format!("duplicating the port: {e}"))?;
    let mut reader =
        FrameReader::new(FdStream::new(read_fd).map_err(|e| format!("watching the port: {e}"))?);
    let mut writer = FdStream::new(port).map_err(|e| format!("watching the port: {e}"))?;
    let (tx, mut rx) = mpsc::unbounded_channel::<Out>();
    tokio::spawn(async move {
        let mut held: Option<Vec<Frame>> = None;
        while let Some(out) = rx.recv().await {
            let (frame, then) = match out {
                Out::Frame(f) => match held.as_mut() {
                    Some(h) => {
                        h.push(f);
                        continue;
                    }
                    None => (f, None),
                },
                Out::Hold(f) => (f, Some(true)),
                Out::Release(f) => (f, Some(false)),
                Out::Flush(done) => {
                    let _ = done.send(());
                    continue;
                }
            };
            if let Err(e) = write_frame(&mut writer, &frame).await {
                tracing::error!("writing to the host: {e}");
            }
            match then {
                Some(true) => held = Some(held.take().unwrap_or_default()),
                Some(false) => {
                    for f in held.take().unwrap_or_default() {
                        if let Err(e) = write_frame(&mut writer, &f).await {
                            tracing::error!("writing to the host: {e}");
                        }
                    }
                }
                None => {}
            }
        }
    });
    for dir in ["bundles", "io"] {
        std::fs::create_dir_all(Path::new(STATE).join(dir))
            .map_err(|e| format!("creating {dir}: {e}"))?;
    }
    let (stop_tx, mut stop_rx) = oneshot::channel();
    let agent = Arc::new(Agent {
        out: Sender(tx.clone()),
        processes: Default::default(),
        max_stream: AtomicU64::new(0),
        runc: kuasar_runc::Runc::new(oci_runtime(), Path::new(STATE), reaper),
        sandbox: Default::default(),
        containers: Default::default(),
        stdin: Default::default(),
        shutdown: Mutex::new(Some(stop_tx)),
    });
    tracing::info!("kuasar-agent serving");
    loop {
        let frame = tokio::select! {
            f = reader.next() => f,
            _ = &mut stop_rx => break,
        };
        match frame {
            Ok(f) => agent.dispatch(f),
            // The host is not connected (yet, or any more): wait for it.
            Err(FrameError::Closed) => tokio::time::sleep(Duration::from_millis(50)).await,
            // Not a frame (what a crashed host daemon left cut short, or
            // garbage): the stream is in step at the next delimiter; answer
            // nothing (there is no id to answer).
            Err(e) if e.in_step() => tracing::warn!("dropped from the host: {e}"),
            Err(e) => return Err(format!("reading the port: {e}")),
        }
    }
    // Everything answered so far reaches the host before power-off.
    let (done_tx, done_rx) = oneshot::channel();
    let _ = tx.send(Out::Flush(done_tx));
    let _ = tokio::time::timeout(Duration::from_secs(2), done_rx).await;
    Ok(())
}

/// The guest's OCI runtime: crun where the image has it (a C binary starts
/// far faster than runc's Go runtime under TCG), else runc. Both take
/// runc's command line.
fn oci_runtime() -> String {
    ["/usr/bin/crun", "/usr/sbin/runc"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("runc")
        .to_string()
}

fn status(e: Error) -> Status {
    Status::new(e.code() as u32, e.to_string())
}

fn invalid(m: impl Into<String>) -> Status {
    Status::new(code::INVALID_ARGUMENT, m)
}

fn call_name(call: &request::Call) -> &'static str {
    use request::Call;
    match call {
        Call::Hello(_) => "Hello",
        Call::Create(_) => "Create",
        Call::Start(_) => "Start",
        Call::Exec(_) => "Exec",
        Call::Kill(_) => "Kill",
        Call::Pause(_) => "Pause",
        Call::Resume(_) => "Resume",
        Call::Update(_) => "Update",
        Call::Stats(_) => "Stats",
        Call::Pids(_) => "Pids",
        Call::ResizePty(_) => "ResizePty",
        Call::CloseStdin(_) => "CloseStdin",
        Call::DeleteExec(_) => "DeleteExec",
        Call::Delete(_) => "Delete",
        Call::Shutdown(_) => "Shutdown",
        Call::SetTime(_) => "SetTime",
        Call::Hold(_) => "Hold",
        Call::Release(_) => "Release",
        Call::Resync(_) => "Resync",
    }
}

fn exec_key(exec_id: &str) -> Option<&str> {
    (!exec_id.is_empty()).then_some(exec_id)
}

impl Agent {
    fn dispatch(self: &Arc<Self>, f: Frame) {
        match f.body {
            Some(frame::Body::Request(req)) => {
                let Some(call) = req.call else {
                    self.out.send(Frame::response(
                        req.id,
                        Err(invalid("request without a call")),
                    ));
                    return;
                };
                // Stdin of a new process is registered before any of its
                // input can arrive.
                let stdio = match &call {
                    request::Call::Create(c) => c.stdio.as_ref(),
                    request::Call::Exec(e) => e.stdio.as_ref(),
                    _ => None,
                };
                if let Some(s) = stdio {
                    let highest = s.stdin.max(s.stdout).max(s.stderr);
                    self.max_stream.fetch_max(highest, Ordering::Relaxed);
                }
                let stdin = stdio.map(|s| s.stdin);
                if let Some(sid) = stdin.filter(|s| *s != 0) {
                    if let Err(e) = self.open_stdin(sid) {
                        self.out.send(Frame::response(req.id, Err(status(e))));
                        return;
                    }
                }
                let agent = self.clone();
                tracing::debug!(id = req.id, "call {}", call_name(&call));
                let hold = match &call {
                    request::Call::Hold(_) => Some(true),
                    request::Call::Release(_) | request::Call::Resync(_) => Some(false),
                    _ => None,
                };
                tokio::spawn(async move {
                    let id = req.id;
                    let handled = tokio::spawn({
                        let agent = agent.clone();
                        async move { agent.handle(call).await }
                    })
                    .await;
                    let result = match handled {
                        Ok(r) => r,
                        Err(e) => Err(Status::new(
                            code::INTERNAL,
                            format!(
                                "the agent's handler failed: {}",
                                kuasar_core::error::panic_message(e)
                            ),
                        )),
                    };
                    tracing::debug!(id, ok = result.is_ok(), "answered");
                    let answer = Frame::response(id, result);
                    let _ = agent.out.0.send(match hold {
                        Some(true) => Out::Hold(answer),
                        Some(false) => Out::Release(answer),
                        None => Out::Frame(answer),
                    });
                });
            }
            Some(frame::Body::Input(input)) => {
                let sid = input.stream;
                let mut map = self.stdin.lock().unwrap();
                let eof = input.eof;
                if let Some(w) = map.get(&sid) {
                    let _ = w.send(input);
                }
                if eof {
                    map.remove(&sid);
                }
            }
            other => tracing::warn!("unexpected frame from the host: {other:?}"),
        }
    }

    async fn handle(self: &Arc<Self>, call: request::Call) -> Result<response::Result, Status> {
        use request::Call;
        let done = || Ok(response::Result::Done(api::Empty {}));
        match call {
            Call::Hello(h) => self.hello(h).await,
            // The writer holds and releases the channel around the answer.
            Call::Hold(_) | Call::Release(_) => done(),
            Call::Resync(_) => Ok(response::Result::Processes(api::Processes {
                processes: self.processes.lock().unwrap().values().cloned().collect(),
                max_stream: self.max_stream.load(Ordering::Relaxed),
            })),
            Call::SetTime(t) => {
                init::set_time(t.unix_seconds, t.unix_nanos);
                done()
            }
            Call::Create(c) => self.create(c).await,
            Call::Start(c) => {
                let ctr = self.container(&c.id)?;
                ctr.container
                    .start()
                    .await
                    .map(response::Result::Pid)
                    .map_err(status)
            }
            Call::Exec(e) => self.exec(e).await,
            Call::Kill(k) => {
                let ctr = self.container(&k.id)?;
                ctr.container
                    .kill(exec_key(&k.exec_id), k.signal, k.all)
                    .await
                    .map_err(status)?;
                done()
            }
            Call::Pause(c) => {
                self.container(&c.id)?
                    .container
                    .pause()
                    .await
                    .map_err(status)?;
                done()
            }
            Call::Resume(c) => {
                self.container(&c.id)?
                    .container
                    .resume()
                    .await
                    .map_err(status)?;
                done()
            }
            Call::Update(u) => {
                self.container(&u.id)?
                    .container
                    .update(&u.resources)
                    .await
                    .map_err(status)?;
                done()
            }
            Call::Stats(c) => {
                // Read from the container's cgroup: the guest's OCI runtime
                // may have no `events --stats` (crun).
                let pid = self.container(&c.id)?.container.pid();
                let stats =
                    kuasar_host::stats::read_cgroup_v2(pid).map_err(|e| status(e.into()))?;
                let any = kuasar_host::stats::to_any_for_host(&stats);
                let bytes = any
                    .write_to_bytes()
                    .map_err(|e| Status::new(code::INTERNAL, e.to_string()))?;
                Ok(response::Result::Stats(bytes))
            }
            Call::Pids(c) => {
                let pids = self
                    .container(&c.id)?
                    .container
                    .pids()
                    .await
                    .map_err(status)?;
                Ok(response::Result::Pids(api::Pids {
                    pids: pids.into_iter().map(|p| p.pid).collect(),
                }))
            }
            Call::ResizePty(r) => {
                let ctr = self.container(&r.id)?;
                ctr.container
                    .resize_pty(exec_key(&r.exec_id), r.width, r.height)
                    .await
                    .map_err(status)?;
                done()
            }
            Call::CloseStdin(p) => {
                let ctr = self.container(&p.id)?;
                ctr.container
                    .close_stdin(exec_key(&p.exec_id))
                    .await
                    .map_err(status)?;
                done()
            }
            Call::DeleteExec(p) => {
                let ctr = self.container(&p.id)?;
                ctr.container.delete_exec(&p.exec_id).await;
                ctr.outputs.lock().unwrap().remove(&p.exec_id);
                self.processes
                    .lock()
                    .unwrap()
                    .remove(&(p.id.clone(), p.exec_id.clone()));
                done()
            }
            Call::Delete(d) => {
                let ctr = self.container(&d.id)?;
                ctr.container.delete(d.force).await.map_err(status)?;
                self.containers.lock().unwrap().remove(&d.id);
                self.processes
                    .lock()
                    .unwrap()
                    .retain(|(id, _), _| *id != d.id);
                let _ = std::fs::remove_dir_all(&ctr.bundle);
                done()
            }
            Call::Shutdown(_) => {
                if let Some(stop) = self.shutdown.lock().unwrap().take() {
                    // Answered first; the serve loop then flushes and ends.
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        let _ = stop.send(());
                    });
                }
                done()
            }
        }
    }

    fn container(&self, id: &str) -> Result<Arc<Ctr>, Status> {
        self.containers
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .ok_or_else(|| {
                Status::new(
                    code::NOT_FOUND,
                    format!("container {id} not found in the VM"),
                )
            })
    }

    async fn hello(&self, h: api::Hello) -> Result<response::Result, Status> {
        if h.version != api::VERSION {
            return Err(Status::new(
                code::FAILED_PRECONDITION,
                format!(
                    "the host speaks agent API v{}, this agent v{}",
                    h.version,
                    api::VERSION
                ),
            ));
        }
        if h.unix_seconds > 0 {
            init::set_time(h.unix_seconds, h.unix_nanos);
        }
        if !h.hostname.is_empty() {
            nix::unistd::sethostname(&h.hostname).map_err(|e| {
                Status::new(
                    code::INVALID_ARGUMENT,
                    format!("hostname {:?}: {e}", h.hostname),
                )
            })?;
        }
        self.sandbox
            .get_or_try_init(|| async {
                let sandbox = self
                    .runc
                    .create_sandbox(SandboxRequest {
                        namespace: NAMESPACE.into(),
                        id: "pod".into(),
                        pod: None,
                        state_dir: Path::new(STATE).join("pod"),
                        resources: Default::default(),
                        parking: Default::default(),
                    })
                    .await?;
                sandbox.start().await?;
                Ok::<_, Error>(sandbox)
            })
            .await
            .map_err(status)?;
        let uname =
            nix::sys::utsname::uname().map_err(|e| Status::new(code::INTERNAL, e.to_string()))?;
        Ok(response::Result::Hello(api::HelloReply {
            version: api::VERSION,
            kernel_release: uname.release().to_string_lossy().into_owned(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
        }))
    }

    async fn create(self: &Arc<Self>, c: api::CreateContainer) -> Result<response::Result, Status> {
        let Some(sandbox) = self.sandbox.get().cloned() else {
            return Err(Status::new(
                code::FAILED_PRECONDITION,
                "Create before Hello",
            ));
        };
        if c.id.is_empty() || c.id.contains('/') || c.id.starts_with('.') {
            return Err(invalid(format!("invalid container id {:?}", c.id)));
        }
        if self.containers.lock().unwrap().contains_key(&c.id) {
            return Err(Status::new(
                code::ALREADY_EXISTS,
                format!("container {} exists in the VM", c.id),
            ));
        }
        let mut spec: serde_json::Value = serde_json::from_slice(&c.spec)
            .map_err(|e| invalid(format!("the spec is not valid JSON: {e}")))?;
        let vm_sysctls = crate::spec::adapt(&mut spec).map_err(invalid)?;
        crate::spec::apply_sysctls(&vm_sysctls).map_err(invalid)?;
        let bundle = Path::new(STATE).join("bundles").join(&c.id);
        std::fs::create_dir_all(&bundle)
            .map_err(|e| Status::new(code::INTERNAL, format!("creating the bundle: {e}")))?;
        let written = serde_json::to_vec(&spec)
            .map_err(|e| e.to_string())
            .and_then(|data| {
                std::fs::write(bundle.join("config.json"), data).map_err(|e| e.to_string())
            });
        if let Err(e) = written {
            let _ = std::fs::remove_dir_all(&bundle);
            return Err(Status::new(
                code::INTERNAL,
                format!("writing the bundle: {e}"),
            ));
        }
        let stdio = c.stdio.unwrap_or_default();
        let (paths, outputs, placeholders) = self.open_outputs(&stdio).map_err(status)?;
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let created = sandbox
            .create_container(CreateRequest {
                namespace: NAMESPACE.into(),
                id: c.id.clone(),
                bundle: bundle.clone(),
                rootfs: Vec::new(),
                stdio: paths.clone(),
                events: events_tx,
                containerd: String::new(),
            })
            .await;
        drop(placeholders);
        self.forget_fifos(&stdio);
        let container = match created {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&bundle);
                return Err(status(e));
            }
        };
        let pid = container.pid();
        self.started(&c.id, "", pid);
        let ctr = Arc::new(Ctr {
            container,
            bundle,
            outputs: Mutex::new(HashMap::from([(String::new(), outputs)])),
        });
        self.containers
            .lock()
            .unwrap()
            .insert(c.id.clone(), ctr.clone());
        self.forward_events(c.id, ctr, events_rx);
        Ok(response::Result::Pid(pid))
    }

    async fn exec(&self, e: api::Exec) -> Result<response::Result, Status> {
        let ctr = self.container(&e.id)?;
        if e.exec_id.is_empty() {
            return Err(invalid("exec without an exec id"));
        }
        let stdio = e.stdio.unwrap_or_default();
        let (paths, outputs, placeholders) = self.open_outputs(&stdio).map_err(status)?;
        ctr.outputs
            .lock()
            .unwrap()
            .insert(e.exec_id.clone(), outputs);
        let started = ctr.container.exec(&e.exec_id, &e.process, &paths).await;
        drop(placeholders);
        self.forget_fifos(&stdio);
        match started {
            Ok(pid) => {
                self.started(&e.id, &e.exec_id, pid);
                Ok(response::Result::Pid(pid))
            }
            Err(err) => {
                ctr.outputs.lock().unwrap().remove(&e.exec_id);
                Err(status(err))
            }
        }
    }

    /// Records a process the host asked for (its exit may have been
    /// recorded already: a process that ended at once).
    fn started(&self, id: &str, exec_id: &str, pid: u32) {
        update_process(&self.processes, id, exec_id, |p| p.pid = pid);
    }

    fn fifo(sid: u64) -> PathBuf {
        Path::new(STATE).join("io").join(sid.to_string())
    }

    fn mkfifo(sid: u64) -> Result<PathBuf, Error> {
        let path = Self::fifo(sid);
        let _ = std::fs::remove_file(&path);
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).map_err(
            |e| Error::Sys {
                what: format!("making {}", path.display()),
                source: e,
            },
        )?;
        Ok(path)
    }

    /// Makes the stdin FIFO of stream `sid` and a writer fed by Input
    /// frames. Opened read-write so that it never waits for the process.
    fn open_stdin(&self, sid: u64) -> Result<(), Error> {
        let path = Self::mkfifo(sid)?;
        let mut w = tokio::net::unix::pipe::OpenOptions::new()
            .read_write(true)
            .open_sender(&path)
            .map_err(|e| Error::Io {
                what: format!("opening {}", path.display()),
                source: e,
            })?;
        let (tx, mut rx) = mpsc::unbounded_channel::<api::Input>();
        self.stdin.lock().unwrap().insert(sid, tx);
        tokio::spawn(async move {
            while let Some(input) = rx.recv().await {
                if !input.data.is_empty() && w.write_all(&input.data).await.is_err() {
                    break;
                }
                if input.eof {
                    break;
                }
            }
            // Dropping the writer is the process's end of input.
        });
        Ok(())
    }

    /// Makes the output FIFOs of a process and starts sending what comes
    /// out of them. A placeholder writer on each keeps a reader from seeing
    /// EOF before the process opened its end; the caller drops them once
    /// the process exists.
    #[allow(clippy::type_complexity)]
    fn open_outputs(
        &self,
        stdio: &api::Stdio,
    ) -> Result<
        (
            StdioPaths,
            Vec<watch::Receiver<bool>>,
            Vec<tokio::net::unix::pipe::Sender>,
        ),
        Error,
    > {
        let mut paths = StdioPaths {
            terminal: stdio.terminal,
            ..Default::default()
        };
        if stdio.stdin != 0 {
            paths.stdin = Self::fifo(stdio.stdin).display().to_string();
        }
        let mut dones = Vec::new();
        let mut placeholders = Vec::new();
        // A terminal has one output.
        let stderr = if stdio.terminal { 0 } else { stdio.stderr };
        for (sid, slot) in [
            (stdio.stdout, &mut paths.stdout),
            (stderr, &mut paths.stderr),
        ] {
            if sid == 0 {
                continue;
            }
            let path = Self::mkfifo(sid)?;
            let ioerr = |e| Error::Io {
                what: format!("opening {}", path.display()),
                source: e,
            };
            let mut r = tokio::net::unix::pipe::OpenOptions::new()
                .open_receiver(&path)
                .map_err(ioerr)?;
            let placeholder = tokio::net::unix::pipe::OpenOptions::new()
                .open_sender(&path)
                .map_err(ioerr)?;
            placeholders.push(placeholder);
            *slot = path.display().to_string();
            let (done_tx, done_rx) = watch::channel(false);
            dones.push(done_rx);
            let out = self.out.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; api::IO_CHUNK];
                loop {
                    match r.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => out.send(Frame::output(sid, buf[..n].to_vec(), false)),
                    }
                }
                out.send(Frame::output(sid, Vec::new(), true));
                let _ = done_tx.send(true);
            });
        }
        Ok((paths, dones, placeholders))
    }

    /// The FIFOs' paths are not needed once both ends are open.
    fn forget_fifos(&self, stdio: &api::Stdio) {
        for sid in [stdio.stdin, stdio.stdout, stdio.stderr]
            .into_iter()
            .filter(|s| *s != 0)
        {
            let _ = std::fs::remove_file(Self::fifo(sid));
        }
    }

    /// Sends a container's events to the host; an exit goes after its
    /// process's output (bounded: a child that keeps the output open must
    /// not hold the exit back).
    fn forward_events(
        &self,
        id: String,
        ctr: Arc<Ctr>,
        mut rx: mpsc::UnboundedReceiver<ContainerEvent>,
    ) {
        let out = self.out.clone();
        let processes = self.processes.clone();
        tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                match ev {
                    ContainerEvent::Oom => {
                        out.send(Frame::event(id.clone(), event::Kind::Oom(api::Empty {})))
                    }
                    ContainerEvent::Exit(exec_id, status) => {
                        let key = exec_id.clone().unwrap_or_default();
                        let waits = ctr
                            .outputs
                            .lock()
                            .unwrap()
                            .get(&key)
                            .cloned()
                            .unwrap_or_default();
                        let drained = async {
                            for mut w in waits {
                                let _ = w.wait_for(|done| *done).await;
                            }
                        };
                        let _ = tokio::time::timeout(OUTPUT_DRAIN, drained).await;
                        update_process(&processes, &id, &key, |p| {
                            p.exited = true;
                            p.status = status;
                        });
                        out.send(Frame::event(
                            id.clone(),
                            event::Kind::Exit(api::Exit {
                                exec_id: key,
                                status,
                            }),
                        ));
                    }
                }
            }
        });
    }
}

/// Changes the entry of a process, made if it is not there yet.
fn update_process(
    processes: &Processes,
    id: &str,
    exec_id: &str,
    f: impl FnOnce(&mut api::Process),
) {
    let mut all = processes.lock().unwrap();
    let p = all
        .entry((id.to_string(), exec_id.to_string()))
        .or_insert_with(|| api::Process {
            id: id.to_string(),
            exec_id: exec_id.to_string(),
            ..Default::default()
        });
    f(p);
}
