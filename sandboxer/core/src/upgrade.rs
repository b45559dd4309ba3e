//! Live upgrade: on SIGUSR2 the daemon re-executes itself (same pid, same
//! argv) and the new image takes over the listening sockets, containerd's
//! accepted task connections (with their unparsed bytes and unanswered
//! requests) and the tasks, so containerd notices nothing (DESIGN.md
//! section 3, "Never drop a connection while tasks live").
//!
//! Terminal masters, stdin copies (the FIFO once opened, and the pipe or
//! terminal it feeds) and terminal output copies are handed over as
//! descriptors and their copies restarted; bytes a copy had read but not
//! yet written are lost. `binary://` log drivers are handed over by pid.
//! Events still queued are in the event spool: forwarding stops before the
//! exec and the new image sends them first.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use tokio::task::JoinHandle;

use crate::backend::ProcessIoHandover;
use crate::daemon::Daemon;
use crate::error::{io_context, sys_context, Error, Result};
use crate::rpc::frame::FrameBuf;
use crate::rpc::server::ConnHandover;
use crate::task::TaskRecord;
use kuasar_host::stdio::IoFds;

/// The environment variable naming the handover file for the new image.
pub const HANDOVER_ENV: &str = "KUASAR_HANDOVER";
/// How long connections get to finish their calls (other than Wait).
const COLLECT_LIMIT: Duration = Duration::from_secs(6);
/// Time for exits already reaped to reach their tasks before the snapshot.
const SETTLE: Duration = Duration::from_millis(200);

#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SandboxHandover {
    pub namespace: String,
    pub id: String,
    pub kind: String,
    pub socket: PathBuf,
    pub address: String,
    pub ttrpc_address: String,
    #[serde(default)]
    pub grpc_address: String,
    pub members: Vec<String>,
    /// What the backend said of its sandbox.
    #[serde(default)]
    pub backend: crate::backend::BackendRecord,
    #[serde(default)]
    pub state: SandboxState,
    /// The listening socket.
    pub fd: RawFd,
    /// Descriptors the backend hands over, in its order.
    #[serde(default)]
    pub fds: Vec<RawFd>,
}

/// A sandbox's lifecycle, as handed over.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SandboxState {
    /// The backend's side exists.
    pub created: bool,
    pub explicit: bool,
    pub ready: bool,
    pub pid: u32,
    pub created_at_nanos: i64,
    pub exited_at_nanos: Option<i64>,
}

impl Default for SandboxState {
    /// A sandbox of an earlier version: made and ready with its first
    /// container.
    fn default() -> Self {
        SandboxState {
            created: true,
            explicit: false,
            ready: true,
            pid: 0,
            created_at_nanos: 0,
            exited_at_nanos: None,
        }
    }
}

#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PendingRecord {
    pub stream_id: u32,
    /// The raw ttrpc `Request`, hex.
    pub request: String,
}

#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ConnRecord {
    pub fd: RawFd,
    pub namespace: String,
    pub sandbox: String,
    /// Bytes read but not yet parsed, hex.
    pub buffered: String,
    /// Bytes of an oversized message still to be skipped.
    pub skip: u64,
    pub pending: Vec<PendingRecord>,
    /// Its name in the descriptor store and its journal (see
    /// `rpc/journal.rs`), when a holder keeps it.
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub journal_fd: Option<RawFd>,
}

/// The stdio plumbing of one process: descriptors its copies use.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct IoRecord {
    pub namespace: String,
    pub id: String,
    /// Empty for the init process.
    pub exec_id: String,
    pub master: Option<RawFd>,
    pub stdin_from: Option<RawFd>,
    pub stdin_to: Option<RawFd>,
    pub output_to: Option<RawFd>,
    pub logger_pid: Option<i32>,
}

impl IoRecord {
    fn fds(&self) -> impl Iterator<Item = RawFd> {
        [self.master, self.stdin_from, self.stdin_to, self.output_to]
            .into_iter()
            .flatten()
    }
}

/// The handover file.
#[derive(serde::Serialize, serde::Deserialize, Debug)]
pub struct Handover {
    pub control_fd: RawFd,
    pub sandboxes: Vec<SandboxHandover>,
    pub tasks: Vec<TaskRecord>,
    pub connections: Vec<ConnRecord>,
    #[serde(default)]
    pub io: Vec<IoRecord>,
}

impl Handover {
    /// Every descriptor the file names.
    fn fds(&self) -> Vec<RawFd> {
        let mut fds = vec![self.control_fd];
        fds.extend(self.sandboxes.iter().map(|s| s.fd));
        fds.extend(self.sandboxes.iter().flat_map(|s| s.fds.iter().copied()));
        fds.extend(self.connections.iter().map(|c| c.fd));
        fds.extend(self.connections.iter().filter_map(|c| c.journal_fd));
        fds.extend(self.io.iter().flat_map(|i| i.fds()));
        fds
    }
}

pub fn to_hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(DIGITS[(x >> 4) as usize] as char);
        s.push(DIGITS[(x & 15) as usize] as char);
    }
    s
}

pub fn from_hex(s: &str) -> Result<Vec<u8>> {
    let bad = || Error::InvalidArgument("handover file: malformed hex".into());
    if !s.len().is_multiple_of(2) {
        return Err(bad());
    }
    s.as_bytes()
        .chunks(2)
        .map(|pair| {
            let text = std::str::from_utf8(pair).map_err(|_| bad())?;
            u8::from_str_radix(text, 16).map_err(|_| bad())
        })
        .collect()
}

fn handover_path(daemon: &Daemon) -> PathBuf {
    daemon.config.root.join("handover.json")
}

fn set_cloexec(fd: RawFd, on: bool) -> Result<()> {
    let flags = if on {
        FdFlag::FD_CLOEXEC
    } else {
        FdFlag::empty()
    };
    fcntl(fd, FcntlArg::F_SETFD(flags))
        .map(|_| ())
        .map_err(sys_context(format!("setting close-on-exec of fd {fd}")))
}

fn cstring(b: &[u8]) -> Result<CString> {
    CString::new(b).map_err(|_| Error::Internal("argument holds a NUL byte".into()))
}

/// The executable a live upgrade runs: the file now at the path this image
/// was started from. An install replaces that file with a new one, and
/// `/proc/self/exe` then still names the old, deleted one; without a file
/// there, this image again.
fn successor_binary() -> PathBuf {
    let this = PathBuf::from("/proc/self/exe");
    let Ok(link) = std::fs::read_link(&this) else {
        return this;
    };
    let bytes = link.as_os_str().as_bytes();
    let path = match bytes.strip_suffix(b" (deleted)") {
        Some(b) => PathBuf::from(std::ffi::OsStr::from_bytes(b)),
        None => link,
    };
    if path.is_file() {
        path
    } else {
        this
    }
}

/// Re-executes the daemon's binary with the same argv; returns only on
/// failure.
fn reexec(handover: &Path, holder: Option<RawFd>) -> Error {
    let result = (|| -> Result<std::convert::Infallible> {
        let exe = cstring(successor_binary().as_os_str().as_bytes())?;
        let argv = std::env::args_os()
            .map(|a| cstring(a.as_bytes()))
            .collect::<Result<Vec<_>>>()?;
        let mut env = std::env::vars_os()
            .filter(|(k, _)| k != HANDOVER_ENV && k != crate::fdstore::HOLDER_FD_ENV)
            .map(|(k, v)| {
                let mut kv = k.as_bytes().to_vec();
                kv.push(b'=');
                kv.extend_from_slice(v.as_bytes());
                cstring(&kv)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut var = format!("{HANDOVER_ENV}=").into_bytes();
        var.extend_from_slice(handover.as_os_str().as_bytes());
        env.push(cstring(&var)?);
        if let Some(fd) = holder {
            env.push(cstring(
                format!("{}={fd}", crate::fdstore::HOLDER_FD_ENV).as_bytes(),
            )?);
        }
        // A second SIGUSR2 between execve and the new process installing its
        // handler would kill the daemon: ignored dispositions survive execve.
        // SAFETY: sigaction with valid pointers; the old action is restored
        // below if execve returns.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: as above: both actions are valid for the call.
        unsafe {
            let mut ignore: libc::sigaction = std::mem::zeroed();
            ignore.sa_sigaction = libc::SIG_IGN;
            libc::sigaction(libc::SIGUSR2, &ignore, &mut old);
        }
        let err =
            nix::unistd::execve(&exe, &argv, &env).map_err(sys_context("re-executing the daemon"));
        // SAFETY: restores the action saved above.
        unsafe { libc::sigaction(libc::SIGUSR2, &old, std::ptr::null_mut()) };
        err
    })();
    match result {
        Err(e) => e,
        Ok(never) => match never {},
    }
}

/// Hands everything over to a new image of the daemon. The control accept
/// task must already be stopped. Returns only if the upgrade failed; the
/// daemon then serves on as before (the reaper is left stopped for the
/// caller to restart).
pub async fn upgrade(
    daemon: &Arc<Daemon>,
    control_fd: RawFd,
    reaper_task: &mut JoinHandle<()>,
) -> Error {
    let held = daemon.tasks_in_process();
    if !held.is_empty() {
        let what: Vec<String> = held.iter().map(|(k, n)| format!("{n} {k}")).collect();
        return Error::FailedPrecondition(format!(
            "live upgrade refused: {} task(s) live inside this process and would be lost",
            what.join(", ")
        ));
    }
    tracing::info!("live upgrade: quiescing");
    daemon.conns.quiesce();
    daemon.stop_listeners().await;
    let conns = daemon.conns.collect(COLLECT_LIMIT).await;
    // Shim requests under way (a `shim delete` kills and removes a task)
    // finish here; new ones wait in the private socket's backlog.
    let deadline = tokio::time::Instant::now() + COLLECT_LIMIT;
    while daemon.control_calls.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // No exit is collected from here on: the new image reaps what ends now.
    reaper_task.abort();
    let _ = reaper_task.await;
    tokio::time::sleep(SETTLE).await;
    // Duplicates, kept open until the exec.
    let io = daemon.io_handovers().await;
    let (sandboxes, sandbox_fds) = match daemon.sandbox_handovers().await {
        Ok(h) => h,
        Err(e) => {
            daemon.handovers_aborted().await;
            daemon.conns.resume();
            daemon.restart_listeners();
            for c in conns {
                if let Err(e) = daemon.adopt_connection(c) {
                    tracing::error!("task connection lost: {e}");
                }
            }
            return Error::FailedPrecondition(format!("live upgrade refused: {e}"));
        }
    };
    // Nothing is sent from here on; later events are only spooled.
    daemon.publisher.stop_forwarding().await;
    let handover = Handover {
        io: io
            .iter()
            .map(|((namespace, id), h)| IoRecord {
                namespace: namespace.clone(),
                id: id.clone(),
                exec_id: h.exec_id.clone().unwrap_or_default(),
                master: h.master.as_ref().map(|f| f.as_raw_fd()),
                stdin_from: h.fds.stdin_from.as_ref().map(|f| f.as_raw_fd()),
                stdin_to: h.fds.stdin_to.as_ref().map(|f| f.as_raw_fd()),
                output_to: h.fds.output_to.as_ref().map(|f| f.as_raw_fd()),
                logger_pid: h.logger_pid,
            })
            .collect(),
        control_fd,
        sandboxes,
        tasks: daemon.task_records(),
        connections: conns
            .iter()
            .map(|c| ConnRecord {
                fd: c.fd.as_raw_fd(),
                namespace: c.sandbox.0.clone(),
                sandbox: c.sandbox.1.clone(),
                buffered: to_hex(&c.frames.buf),
                skip: c.frames.skip,
                pending: c
                    .pending
                    .iter()
                    .map(|(id, p)| PendingRecord {
                        stream_id: *id,
                        request: to_hex(p),
                    })
                    .collect(),
                name: c.name.clone(),
                journal_fd: c.journal.as_ref().map(|j| j.fd().as_raw_fd()),
            })
            .collect(),
    };
    let path = handover_path(daemon);
    let mut fds = handover.fds();
    // The holder's socket goes on to the new image (named in its
    // environment, taken by `FdStore::from_env`).
    let holder = daemon.store.raw_fd();
    fds.extend(holder);
    let err = match write_handover(&path, &handover) {
        Ok(()) => {
            let cleared = fds.iter().try_for_each(|&fd| set_cloexec(fd, false));
            match cleared {
                Ok(()) => {
                    tracing::info!(
                        sandboxes = handover.sandboxes.len(),
                        tasks = handover.tasks.len(),
                        connections = handover.connections.len(),
                        "live upgrade: re-executing"
                    );
                    reexec(&path, holder)
                }
                Err(e) => e,
            }
        }
        Err(e) => e,
    };
    // Still here: serve on in this image (the duplicates are dropped).
    drop(io);
    drop(sandbox_fds);
    daemon.handovers_aborted().await;
    daemon.publisher.resume_forwarding();
    let _ = std::fs::remove_file(&path);
    for fd in fds {
        if let Err(e) = set_cloexec(fd, true) {
            tracing::warn!("{e}");
        }
    }
    daemon.conns.resume();
    daemon.restart_listeners();
    for c in conns {
        if let Err(e) = daemon.adopt_connection(c) {
            tracing::error!("task connection lost: {e}");
        }
    }
    err
}

fn write_handover(path: &Path, handover: &Handover) -> Result<()> {
    let data = serde_json::to_vec(handover)
        .map_err(|e| Error::Internal(format!("encoding the handover: {e}")))?;
    kuasar_protocol::shim::write_atomic(path, &data)
        .map_err(io_context(format!("writing {}", path.display())))
}

pub fn read_handover(path: &Path) -> Result<Handover> {
    let data = std::fs::read(path).map_err(io_context(format!("reading {}", path.display())))?;
    serde_json::from_slice(&data)
        .map_err(|e| Error::InvalidArgument(format!("handover file {}: {e}", path.display())))
}

/// Takes ownership of an inherited descriptor named in the handover file,
/// once it is known to be open; it is closed on exec again.
fn take_fd(fd: RawFd, seen: &mut HashSet<RawFd>) -> Result<OwnedFd> {
    if fd < 0 || !seen.insert(fd) {
        return Err(Error::InvalidArgument(format!(
            "handover file names fd {fd} twice or invalidly"
        )));
    }
    fcntl(fd, FcntlArg::F_GETFD).map_err(sys_context(format!("inherited fd {fd}")))?;
    set_cloexec(fd, true)?;
    // SAFETY: the fd is open, inherited across execve for us alone, and
    // named once in the file (checked above), so nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn adopt_io(r: &IoRecord, seen: &mut HashSet<RawFd>) -> Result<ProcessIoHandover> {
    let mut take = |fd: Option<RawFd>| fd.map(|fd| take_fd(fd, seen)).transpose();
    Ok(ProcessIoHandover {
        exec_id: (!r.exec_id.is_empty()).then(|| r.exec_id.clone()),
        master: take(r.master)?,
        fds: IoFds {
            stdin_from: take(r.stdin_from)?,
            stdin_to: take(r.stdin_to)?,
            output_to: take(r.output_to)?,
            stdin_end: None,
        },
        logger_pid: r.logger_pid,
        stdin_path: String::new(),
    })
}

/// Takes over what the predecessor handed over (in the new image). Returns
/// the control listener. Whatever cannot be taken over is logged and
/// dropped: containerd then sees that task's connection close.
pub async fn adopt(daemon: &Arc<Daemon>, path: &Path) -> Result<OwnedFd> {
    let handover = read_handover(path);
    let _ = std::fs::remove_file(path);
    let handover = handover?;
    let mut seen = HashSet::new();
    let control = take_fd(handover.control_fd, &mut seen)?;
    for s in handover.sandboxes {
        let id = s.id.clone();
        let fds: Result<Vec<OwnedFd>> = s.fds.iter().map(|&fd| take_fd(fd, &mut seen)).collect();
        let adopted = match (take_fd(s.fd, &mut seen), fds) {
            (Ok(fd), Ok(fds)) => daemon.adopt_sandbox(s, fd, fds, HashMap::new()).await,
            (Err(e), _) | (_, Err(e)) => Err(e),
        };
        if let Err(e) = adopted {
            tracing::error!(sandbox = %id, "sandbox not taken over: {e}");
        }
    }
    let mut ios: HashMap<(String, String), Vec<ProcessIoHandover>> = HashMap::new();
    for r in handover.io {
        match adopt_io(&r, &mut seen) {
            Ok(h) => ios
                .entry((r.namespace.clone(), r.id.clone()))
                .or_default()
                .push(h),
            Err(e) => tracing::error!(task = %r.id, "stdio not taken over: {e}"),
        }
    }
    let tasks = handover.tasks.len();
    for t in handover.tasks {
        let id = t.id.clone();
        let io = ios
            .remove(&(t.namespace.clone(), t.id.clone()))
            .unwrap_or_default();
        if let Err(e) = daemon.adopt_task(t, io).await {
            tracing::error!(task = %id, "task not taken over: {e}");
        }
    }
    let connections = handover.connections.len();
    for c in handover.connections {
        let adopted = (|| {
            let fd = take_fd(c.fd, &mut seen)?;
            let frames = FrameBuf {
                buf: from_hex(&c.buffered)?,
                skip: c.skip,
            };
            let sandbox = (c.namespace.clone(), c.sandbox.clone());
            let conn = match c.journal_fd {
                Some(j) => {
                    let journal = take_fd(j, &mut seen)?;
                    ConnHandover::from_journal(fd, journal, sandbox, c.name.clone(), Some(frames))
                        .map_err(io_context("reading a connection's journal"))?
                }
                None => {
                    let mut pending = Vec::with_capacity(c.pending.len());
                    for p in &c.pending {
                        pending.push((p.stream_id, from_hex(&p.request)?));
                    }
                    ConnHandover {
                        fd,
                        sandbox,
                        frames,
                        pending,
                        replies: Vec::new(),
                        name: c.name.clone(),
                        journal: None,
                    }
                }
            };
            daemon.adopt_connection(conn)
        })();
        if let Err(e) = adopted {
            tracing::error!(sandbox = %c.sandbox, "task connection not taken over: {e}");
        }
    }
    tracing::info!(tasks, connections, "live upgrade: took over");
    Ok(control)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::{ExecRecord, ProcessRecord};
    use kuasar_host::stdio::StdioPaths;

    #[test]
    fn hex_round_trips_and_rejects_garbage() {
        let data: Vec<u8> = (0..=255).collect();
        assert_eq!(from_hex(&to_hex(&data)).unwrap(), data);
        assert!(from_hex("abc").is_err());
        assert!(from_hex("zz").is_err());
        assert!(from_hex("é1").is_err());
    }

    #[test]
    fn handover_file_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("handover.json");
        let h = Handover {
            control_fd: 3,
            sandboxes: vec![SandboxHandover {
                namespace: "ns".into(),
                id: "pod".into(),
                kind: "runc".into(),
                socket: "/run/k/t/x.sock".into(),
                address: "unix:///run/k/t/x.sock".into(),
                ttrpc_address: "/run/containerd/containerd.sock.ttrpc".into(),
                grpc_address: "/run/containerd/containerd.sock".into(),
                members: vec!["pod".into(), "c1".into()],
                backend: serde_json::json!({"pinned": ["net"]}),
                state: SandboxState::default(),
                fd: 4,
                fds: vec![9, 10],
            }],
            tasks: vec![TaskRecord {
                namespace: "ns".into(),
                id: "c1".into(),
                sandbox_id: "pod".into(),
                kind: "runc".into(),
                bundle: "/b".into(),
                backend: serde_json::json!({"rootfs_mounted": true}),
                init: ProcessRecord {
                    pid: 42,
                    status: "RUNNING".into(),
                    exit_status: None,
                    exited_at_nanos: None,
                    stdio: StdioPaths::default(),
                    started: true,
                },
                execs: vec![ExecRecord {
                    exec_id: "e1".into(),
                    spec: r#"{"args":["true"]}"#.into(),
                    process: ProcessRecord {
                        pid: 43,
                        status: "STOPPED".into(),
                        exit_status: Some(7),
                        exited_at_nanos: Some(1_700_000_000_000_000_000),
                        stdio: StdioPaths::default(),
                        started: true,
                    },
                }],
                created_at_nanos: 1_600_000_000_000_000_000,
            }],
            connections: vec![ConnRecord {
                fd: 5,
                namespace: "ns".into(),
                sandbox: "pod".into(),
                buffered: to_hex(b"\x00\x00\x00\x05partial"),
                skip: 0,
                pending: vec![PendingRecord {
                    stream_id: 9,
                    request: to_hex(b"wait request"),
                }],
                name: "c/3/ns/pod".into(),
                journal_fd: Some(11),
            }],
            io: vec![IoRecord {
                namespace: "ns".into(),
                id: "c1".into(),
                master: Some(6),
                stdin_to: Some(7),
                ..Default::default()
            }],
        };
        write_handover(&path, &h).unwrap();
        let got = read_handover(&path).unwrap();
        assert_eq!(got.fds(), vec![3, 4, 9, 10, 5, 11, 6, 7]);
        assert_eq!(got.io, h.io);
        assert_eq!(got.sandboxes, h.sandboxes);
        assert_eq!(got.connections, h.connections);
        assert_eq!(got.tasks[0].execs, h.tasks[0].execs);
        assert_eq!(got.tasks[0].init.pid, 42);
        assert_eq!(
            from_hex(&got.connections[0].pending[0].request).unwrap(),
            b"wait request"
        );
    }

    #[test]
    fn old_task_records_without_execs_still_parse() {
        let rec: TaskRecord = serde_json::from_str(
            r#"{"namespace":"n","id":"c","sandbox_id":"c","kind":"runc","bundle":"/b",
                "pid":1,"status":"RUNNING","exit_status":null,"exited_at_nanos":null,
                "stdio":{"stdin":"","stdout":"","stderr":"","terminal":false},
                "rootfs_mounted":false}"#,
        )
        .unwrap();
        assert!(rec.execs.is_empty());
        assert!(!rec.init.started);
        assert_eq!(rec.init.pid, 1);
    }

    #[test]
    fn a_handed_over_fd_is_taken_once_and_must_be_valid() {
        let mut seen = HashSet::new();
        let (r, _w) = kuasar_host::stdio::pipe().unwrap();
        let raw = r.as_raw_fd();
        set_cloexec(raw, false).unwrap();
        std::mem::forget(r);
        let owned = take_fd(raw, &mut seen).unwrap();
        let flags = fcntl(raw, FcntlArg::F_GETFD).unwrap();
        assert!(FdFlag::from_bits_truncate(flags).contains(FdFlag::FD_CLOEXEC));
        assert!(take_fd(raw, &mut seen).is_err());
        assert!(take_fd(-1, &mut seen).is_err());
        drop(owned);
    }
}
