//! Start after a crash: the daemon reads what its predecessor persisted
//! (sandbox and task records), takes the descriptors the holder kept
//! (listening sockets, containerd's connections and their journals), and
//! serves on as a live upgrade would. Workloads that live outside the
//! daemon (runc containers) are taken over: their processes are now the
//! holder's children, whose exits it reports, and are watched by pidfd.
//! VMs are taken over by their backend from what it parked (the agent
//! channel, the processes' stdio) and what it wrote down. Workloads that
//! died with the daemon (wasm instances), and those a backend could not
//! take over, are reported exited with status 255 and the reason on their
//! stderr where it was kept; what they held is released. What no record
//! names (a crash half-way through a create) is removed.

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::ProcessIoHandover;
use crate::daemon::{listener_name, parking_prefix, Daemon, IO_FIELDS};
use crate::error::Result;
use crate::fdstore::Inherited;
use crate::rpc::server::{parse_conn_name, ConnHandover};
use crate::state::Record;
use crate::task::TaskRecord;
use crate::upgrade::SandboxHandover;

/// How long a process that ended waits for the holder's report of its
/// status before it is reported unknown.
const STATUS_GRACE: Duration = Duration::from_secs(2);

/// What the restart found and did, for the log.
#[derive(Debug, Default)]
pub struct Recovery {
    pub sandboxes: usize,
    pub tasks: usize,
    pub lost_tasks: usize,
    pub connections: usize,
    pub dropped_connections: usize,
    pub removed: usize,
}

/// Whether anything was persisted or parked: a fresh start has nothing.
pub fn needed(daemon: &Daemon, inherited: &Inherited) -> bool {
    !inherited.is_empty()
        || !daemon.state().list(Record::Sandbox).is_empty()
        || !daemon.state().list(Record::Task).is_empty()
}

pub async fn recover(daemon: &Arc<Daemon>, inherited: &mut Inherited) -> Result<Recovery> {
    let mut report = Recovery::default();
    let state = daemon.state();
    let mut sandboxes: Vec<SandboxHandover> = Vec::new();
    for (ns, id, data) in state.list(Record::Sandbox) {
        match serde_json::from_slice::<SandboxHandover>(&data) {
            Ok(s) if s.namespace == ns && s.id == id => sandboxes.push(s),
            Ok(_) | Err(_) => {
                tracing::warn!(namespace = %ns, sandbox = %id, "unreadable sandbox record removed");
                state.remove(Record::Sandbox, &ns, &id);
            }
        }
    }
    let mut tasks: Vec<TaskRecord> = Vec::new();
    for (ns, id, data) in state.list(Record::Task) {
        match serde_json::from_slice::<TaskRecord>(&data) {
            Ok(t) if t.namespace == ns && t.id == id => tasks.push(t),
            Ok(_) | Err(_) => {
                tracing::warn!(namespace = %ns, task = %id, "unreadable task record removed");
                state.remove(Record::Task, &ns, &id);
            }
        }
    }
    let known: Vec<(String, String)> = tasks
        .iter()
        .map(|t| (t.namespace.clone(), t.id.clone()))
        .collect();
    for b in daemon.backends() {
        if let Err(e) = b.reconcile(&known).await {
            tracing::warn!(kind = %b.kind(), "reconciling: {e}");
        }
    }

    let mut alive: HashSet<(String, String)> = HashSet::new();
    // Sandboxes whose workloads are gone: their tasks are reported lost.
    let mut lost_sandboxes: HashSet<(String, String)> = HashSet::new();
    for mut s in sandboxes {
        let key = (s.namespace.clone(), s.id.clone());
        let listener = inherited
            .take(&listener_name(&s.namespace, &s.id))
            .and_then(|mut v| v.pop());
        let prefix = parking_prefix(&s.namespace, &s.id);
        let parked: HashMap<String, OwnedFd> = inherited
            .names(&prefix)
            .into_iter()
            .filter_map(|name| {
                let fd = inherited.take(&name)?.pop()?;
                Some((name[prefix.len()..].to_string(), fd))
            })
            .collect();
        let parked_names: Vec<String> = parked.keys().map(|n| format!("{prefix}{n}")).collect();
        let survives = daemon.survives_crash(&s.kind);
        if !survives && s.state.created {
            discard(daemon, &mut s).await;
            lost_sandboxes.insert(key.clone());
        }
        let spare = listener.as_ref().and_then(|fd| fd.try_clone().ok());
        let mut adopted = adopt(daemon, s.clone(), listener, parked).await;
        if let Err(e) = &adopted {
            if s.state.created {
                // The backend could not take its workload over (its VM
                // died with the daemon, or nothing was parked): released,
                // as a workload that died with the daemon is.
                tracing::warn!(namespace = %key.0, sandbox = %key.1, "the sandbox's workload is not taken over after the crash, released: {e}");
                discard(daemon, &mut s).await;
                lost_sandboxes.insert(key.clone());
                adopted = adopt(daemon, s, spare, HashMap::new()).await;
            }
        }
        if lost_sandboxes.contains(&key) {
            for name in &parked_names {
                daemon.store.remove(name);
            }
        }
        match adopted {
            Ok(()) => {
                report.sandboxes += 1;
                alive.insert(key);
            }
            Err(e) => {
                tracing::error!(namespace = %key.0, sandbox = %key.1, "sandbox not taken over after the crash: {e}");
                state.remove(Record::Sandbox, &key.0, &key.1);
            }
        }
    }

    for t in tasks {
        let (ns, id) = (t.namespace.clone(), t.id.clone());
        if !alive.contains(&(ns.clone(), t.sandbox_id.clone())) {
            tracing::warn!(namespace = %ns, task = %id, "task of a sandbox that is gone: removed");
            if let Ok(b) = daemon.backend_named(&t.kind) {
                let _ = b.cleanup(&ns, &id, Some(&t.bundle)).await;
            }
            state.remove(Record::Task, &ns, &id);
            report.removed += 1;
            continue;
        }
        let lost = (!daemon.survives_crash(&t.kind)
            || lost_sandboxes.contains(&(ns.clone(), t.sandbox_id.clone())))
        .then(|| {
            format!(
                "the {} workload of this task died with the sandboxer (it crashed and was restarted)",
                t.kind
            )
        });
        if lost.is_none() {
            // No longer our children: their exits come from the holder,
            // and a pidfd says when they end.
            let pids = std::iter::once(&t.init)
                .chain(t.execs.iter().map(|e| &e.process))
                .filter(|p| p.pid != 0 && p.exit_status.is_none())
                .map(|p| p.pid as i32);
            for pid in pids {
                daemon
                    .reaper
                    .watch_foreign(pid, STATUS_GRACE, crate::task::LOST_EXIT_STATUS);
            }
        } else {
            report.lost_tasks += 1;
        }
        let mut parked = std::collections::HashMap::new();
        for name in inherited.names(&format!("e/{ns}/{id}")) {
            let exec = match name.strip_prefix(&format!("e/{ns}/{id}")) {
                Some("") => String::new(),
                Some(rest) => match rest.strip_prefix('/') {
                    Some(e) => e.to_string(),
                    None => continue,
                },
                None => continue,
            };
            if let Some(fd) = inherited.take(&name).and_then(|mut v| v.pop()) {
                parked.insert(exec, fd);
            }
        }
        let io = match lost {
            None => parked_io(daemon, inherited, &t),
            Some(_) => Vec::new(),
        };
        match daemon
            .adopt_task_after_crash(t, lost.as_deref(), parked, io)
            .await
        {
            Ok(()) => report.tasks += 1,
            Err(e) => {
                tracing::error!(namespace = %ns, task = %id, "task not taken over after the crash: {e}");
            }
        }
    }

    for name in inherited.names("c/") {
        let fds = inherited.take(&name).unwrap_or_default();
        let adopted = (|| {
            let (_, sandbox) = parse_conn_name(&name).ok_or_else(|| {
                crate::error::Error::InvalidArgument(format!("parked connection {name}"))
            })?;
            let mut fds = fds.into_iter();
            let (Some(sock), Some(journal)) = (fds.next(), fds.next()) else {
                return Err(crate::error::Error::InvalidArgument(format!(
                    "parked connection {name} lacks its socket or journal"
                )));
            };
            let conn = ConnHandover::from_journal(sock, journal, sandbox, name.clone(), None)
                .map_err(crate::error::io_context("taking over a task connection"))?;
            daemon.adopt_connection(conn)
        })();
        match adopted {
            Ok(()) => report.connections += 1,
            Err(e) => {
                // Closing it is today's behaviour after a crash: containerd
                // sees a dead shim for that task.
                tracing::error!(connection = %name, "task connection closed after the crash: {e}");
                daemon.store.remove(&name);
                report.dropped_connections += 1;
            }
        }
    }
    for name in inherited.names("e/") {
        inherited.take(&name);
        daemon.store.remove(&name);
    }
    for name in inherited.names("io/") {
        inherited.take(&name);
        daemon.store.remove(&name);
    }
    for name in inherited.names("b/") {
        tracing::warn!(name = %name, "parked descriptor of a sandbox no record names: closed");
        inherited.take(&name);
        daemon.store.remove(&name);
    }
    for name in inherited.names("l/") {
        tracing::warn!(listener = %name, "parked listener of a sandbox no record names: closed");
        inherited.take(&name);
        daemon.store.remove(&name);
    }
    report.removed += daemon.remove_stale_sockets();
    tracing::info!(
        sandboxes = report.sandboxes,
        tasks = report.tasks,
        lost_tasks = report.lost_tasks,
        connections = report.connections,
        dropped_connections = report.dropped_connections,
        removed = report.removed,
        "restart after a crash: took over"
    );
    Ok(report)
}

/// Releases what a sandbox of the crashed predecessor held; it is then
/// taken over as one that has exited.
async fn discard(daemon: &Arc<Daemon>, s: &mut SandboxHandover) {
    let req = daemon.sandbox_request(&s.namespace, &s.id);
    if let Ok(backend) = daemon.backend_named(&s.kind) {
        if let Err(e) = backend.discard_sandbox(req, s.backend.clone()).await {
            tracing::warn!(sandbox = %s.id, "releasing a sandbox that died with the daemon: {e}");
        }
    }
    s.state.created = false;
    s.state.ready = false;
    s.state.exited_at_nanos = Some(crate::task::nanos(std::time::SystemTime::now()));
}

/// Serves a sandbox again on its parked listener, or on its socket bound
/// anew.
async fn adopt(
    daemon: &Arc<Daemon>,
    s: SandboxHandover,
    listener: Option<OwnedFd>,
    parked: HashMap<String, OwnedFd>,
) -> Result<()> {
    match listener {
        Some(fd) => daemon.adopt_sandbox(s, fd, Vec::new(), parked).await,
        None => daemon.reopen_sandbox(s, parked).await,
    }
}

/// The stdio plumbing parked for a task's processes (see
/// [`Daemon::park_io`]); it stays parked until each process ends. A stdin
/// copy whose FIFO was not open yet opens it again by path.
fn parked_io(daemon: &Daemon, inherited: &mut Inherited, t: &TaskRecord) -> Vec<ProcessIoHandover> {
    let prefix = format!("io/{}/{}/", t.namespace, t.id);
    let mut by_exec: HashMap<String, ProcessIoHandover> = HashMap::new();
    for name in inherited.names(&prefix) {
        let rest = &name[prefix.len()..];
        let (exec, field) = match rest.split_once('/') {
            Some(("i", field)) => ("", field),
            Some(("e", rest)) => match rest.rsplit_once('/') {
                Some(parts) => parts,
                None => continue,
            },
            _ => continue,
        };
        if !IO_FIELDS.contains(&field) {
            continue;
        }
        let Some(fd) = inherited.take(&name).and_then(|mut v| v.pop()) else {
            continue;
        };
        let h = by_exec.entry(exec.to_string()).or_insert_with(|| {
            let stdio = match exec {
                "" => Some(&t.init.stdio),
                e => t
                    .execs
                    .iter()
                    .find(|x| x.exec_id == e)
                    .map(|x| &x.process.stdio),
            };
            ProcessIoHandover {
                exec_id: (!exec.is_empty()).then(|| exec.to_string()),
                stdin_path: stdio.map(|s| s.stdin.clone()).unwrap_or_default(),
                ..Default::default()
            }
        });
        match field {
            "master" => h.master = Some(fd),
            "stdin_from" => h.fds.stdin_from = Some(fd),
            "stdin_to" => h.fds.stdin_to = Some(fd),
            _ => h.fds.output_to = Some(fd),
        }
        daemon.keep_parked(name);
    }
    by_exec.into_values().collect()
}
