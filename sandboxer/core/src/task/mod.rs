//! The generic task layer: a container of any backend, its processes, their
//! lifecycle and the events that go with it. Written once for every kind.

mod lost;
pub mod service;

/// The exit status of a process whose workload died with a crashed daemon.
pub use lost::EXIT_STATUS as LOST_EXIT_STATUS;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use containerd_shim_protos::api::Status;
use containerd_shim_protos::events::task::{TaskExecStarted, TaskExit, TaskStart};
use kuasar_protocol::Kind;
use protobuf::well_known_types::timestamp::Timestamp;
use protobuf::MessageDyn;
use tokio::sync::watch;

use crate::backend::{BackendRecord, Container};
use crate::events::Publisher;
use kuasar_host::stdio::StdioPaths;

pub const TOPIC_CREATE: &str = "/tasks/create";
pub const TOPIC_START: &str = "/tasks/start";
pub const TOPIC_EXIT: &str = "/tasks/exit";
pub const TOPIC_DELETE: &str = "/tasks/delete";
pub const TOPIC_EXEC_ADDED: &str = "/tasks/exec-added";
pub const TOPIC_EXEC_STARTED: &str = "/tasks/exec-started";
pub const TOPIC_OOM: &str = "/tasks/oom";
pub const TOPIC_PAUSED: &str = "/tasks/paused";
pub const TOPIC_RESUMED: &str = "/tasks/resumed";

pub fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut ts = Timestamp::new();
    ts.seconds = d.as_secs() as i64;
    ts.nanos = d.subsec_nanos() as i32;
    ts
}

pub fn timestamp_now() -> Timestamp {
    timestamp(SystemTime::now())
}

pub fn nanos(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

#[derive(Clone, Copy, Debug)]
pub struct ExitInfo {
    pub status: u32,
    pub at: SystemTime,
}

/// Where a task's events go: the containerd that created it.
#[derive(Clone)]
pub struct EventTarget {
    pub publisher: Arc<Publisher>,
    pub address: String,
    pub namespace: String,
}

impl EventTarget {
    pub fn publish(&self, topic: &str, event: &dyn MessageDyn) {
        self.publisher
            .publish(&self.address, &self.namespace, topic, event);
    }
}

#[derive(Debug)]
struct ProcState {
    status: Status,
    pid: u32,
    exit: Option<ExitInfo>,
    /// The start event went out; an exit before it is held until then, so
    /// containerd sees Start before Exit.
    start_published: bool,
    exit_held: bool,
}

/// The init process (`exec_id` empty) or an exec process of a task.
pub struct Process {
    pub container_id: String,
    pub exec_id: String,
    pub stdio: StdioPaths,
    /// The OCI process spec (JSON) of an exec process.
    pub spec: Vec<u8>,
    state: Mutex<ProcState>,
    exited: watch::Sender<Option<ExitInfo>>,
}

/// A snapshot of a process for State and friends.
pub struct ProcessView {
    pub status: Status,
    pub pid: u32,
    pub exit: Option<ExitInfo>,
}

impl Process {
    pub fn new(
        container_id: &str,
        exec_id: &str,
        stdio: StdioPaths,
        spec: Vec<u8>,
        pid: u32,
    ) -> Process {
        Process {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            stdio,
            spec,
            state: Mutex::new(ProcState {
                status: Status::CREATED,
                pid,
                exit: None,
                start_published: false,
                exit_held: false,
            }),
            exited: watch::channel(None).0,
        }
    }

    /// A process as a predecessor recorded it (live upgrade).
    #[allow(clippy::too_many_arguments)]
    pub fn restore(
        container_id: &str,
        exec_id: &str,
        spec: Vec<u8>,
        rec: &ProcessRecord,
    ) -> Process {
        let p = Process::new(container_id, exec_id, rec.stdio.clone(), spec, rec.pid);
        let exit = rec.exit_status.map(|status| ExitInfo {
            status,
            at: from_nanos(rec.exited_at_nanos.unwrap_or(0)),
        });
        let started = rec.started;
        {
            let mut st = p.state.lock().unwrap();
            st.status = if exit.is_some() {
                Status::STOPPED
            } else {
                parse_status(&rec.status)
            };
            st.exit = exit;
            st.start_published = started;
            st.exit_held = exit.is_some() && !started;
        }
        p.exited.send_replace(exit);
        p
    }

    /// What is persisted of this process, read under one lock.
    pub fn record(&self) -> ProcessRecord {
        let st = self.state.lock().unwrap();
        ProcessRecord {
            pid: st.pid,
            status: format!("{:?}", st.status),
            exit_status: st.exit.map(|e| e.status),
            exited_at_nanos: st.exit.map(|e| nanos(e.at)),
            stdio: self.stdio.clone(),
            started: st.start_published,
        }
    }

    pub fn view(&self) -> ProcessView {
        let st = self.state.lock().unwrap();
        ProcessView {
            status: st.status,
            pid: st.pid,
            exit: st.exit,
        }
    }

    pub fn is_init(&self) -> bool {
        self.exec_id.is_empty()
    }

    fn exit_event(&self, pid: u32, exit: ExitInfo) -> TaskExit {
        let mut e = TaskExit::new();
        e.container_id = self.container_id.clone();
        e.id = if self.is_init() {
            self.container_id.clone()
        } else {
            self.exec_id.clone()
        };
        e.pid = pid;
        e.exit_status = exit.status;
        e.exited_at = Some(timestamp(exit.at)).into();
        e
    }

    /// Records a successful start and publishes it (then any held exit).
    pub fn started(&self, pid: u32, events: &EventTarget) {
        let mut st = self.state.lock().unwrap();
        st.pid = pid;
        if st.exit.is_none() {
            st.status = Status::RUNNING;
        }
        if self.is_init() {
            let mut e = TaskStart::new();
            e.container_id = self.container_id.clone();
            e.pid = pid;
            events.publish(TOPIC_START, &e);
        } else {
            let mut e = TaskExecStarted::new();
            e.container_id = self.container_id.clone();
            e.exec_id = self.exec_id.clone();
            e.pid = pid;
            events.publish(TOPIC_EXEC_STARTED, &e);
        }
        st.start_published = true;
        if st.exit_held {
            st.exit_held = false;
            if let Some(exit) = st.exit {
                events.publish(TOPIC_EXIT, &self.exit_event(pid, exit));
            }
        }
    }

    /// Records the exit, wakes every Wait and publishes `/tasks/exit`
    /// (held until the start event has gone out).
    pub fn set_exited(&self, status: u32, events: &EventTarget) {
        let exit = ExitInfo {
            status,
            at: SystemTime::now(),
        };
        {
            let mut st = self.state.lock().unwrap();
            if st.exit.is_some() {
                return;
            }
            st.status = Status::STOPPED;
            st.exit = Some(exit);
            if st.start_published {
                events.publish(TOPIC_EXIT, &self.exit_event(st.pid, exit));
            } else {
                st.exit_held = true;
            }
        }
        self.exited.send_replace(Some(exit));
    }

    pub fn set_status(&self, status: Status) {
        let mut st = self.state.lock().unwrap();
        if st.exit.is_none() {
            st.status = status;
        }
    }

    /// Waits for the exit; returns at once if it already happened.
    pub async fn wait(&self) -> ExitInfo {
        let mut rx = self.exited.subscribe();
        loop {
            if let Some(exit) = *rx.borrow_and_update() {
                return exit;
            }
            if rx.changed().await.is_err() {
                // The sender lives as long as the process; unreachable.
                std::future::pending::<()>().await;
            }
        }
    }
}

/// A container of any backend, as the Task API sees it.
pub struct Task {
    pub namespace: String,
    pub id: String,
    pub sandbox_id: String,
    pub kind: Kind,
    pub bundle: PathBuf,
    pub container: Box<dyn Container>,
    pub init: Arc<Process>,
    pub execs: Mutex<HashMap<String, Arc<Process>>>,
    pub events: EventTarget,
    /// Serialises writes of the task's state file; `true` once removed, so
    /// a late write cannot resurrect it.
    pub persisted: Mutex<bool>,
    /// When Create made it (the Unix epoch: not known).
    pub created_at: SystemTime,
}

/// What is persisted of a task, keyed by (namespace, id).
#[derive(serde::Serialize, serde::Deserialize, Debug)]
pub struct TaskRecord {
    pub namespace: String,
    pub id: String,
    pub sandbox_id: String,
    pub kind: String,
    pub bundle: PathBuf,
    /// What the backend said of its container.
    #[serde(default)]
    pub backend: BackendRecord,
    /// The init process.
    #[serde(flatten)]
    pub init: ProcessRecord,
    /// Exec processes not yet deleted.
    #[serde(default)]
    pub execs: Vec<ExecRecord>,
    /// 0: recorded by a version that did not keep it.
    #[serde(default)]
    pub created_at_nanos: i64,
}

/// What is persisted of an exec process.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ExecRecord {
    pub exec_id: String,
    /// The OCI process spec (JSON text).
    pub spec: String,
    #[serde(flatten)]
    pub process: ProcessRecord,
}

/// What is persisted of any process, init or exec.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ProcessRecord {
    pub pid: u32,
    pub status: String,
    pub exit_status: Option<u32>,
    pub exited_at_nanos: Option<i64>,
    pub stdio: StdioPaths,
    /// The start event went out (a live upgrade must not send it again).
    #[serde(default)]
    pub started: bool,
}

/// The status names `format!("{:?}")` writes, read back.
pub fn parse_status(s: &str) -> Status {
    match s {
        "CREATED" => Status::CREATED,
        "RUNNING" => Status::RUNNING,
        "STOPPED" => Status::STOPPED,
        "PAUSED" => Status::PAUSED,
        "PAUSING" => Status::PAUSING,
        _ => Status::UNKNOWN,
    }
}

pub fn from_nanos(n: i64) -> SystemTime {
    UNIX_EPOCH + std::time::Duration::from_nanos(u64::try_from(n).unwrap_or(0))
}

impl Task {
    pub fn record(&self) -> TaskRecord {
        TaskRecord {
            namespace: self.namespace.clone(),
            id: self.id.clone(),
            sandbox_id: self.sandbox_id.clone(),
            kind: self.kind.as_str().into(),
            bundle: self.bundle.clone(),
            backend: self.container.record(),
            init: self.init.record(),
            execs: self
                .execs
                .lock()
                .unwrap()
                .values()
                .map(|p| ExecRecord {
                    exec_id: p.exec_id.clone(),
                    spec: String::from_utf8_lossy(&p.spec).into_owned(),
                    process: p.record(),
                })
                .collect(),
            created_at_nanos: nanos(self.created_at),
        }
    }

    /// The process named by `exec_id` (empty: init).
    pub fn process(&self, exec_id: &str) -> Option<Arc<Process>> {
        if exec_id.is_empty() {
            Some(self.init.clone())
        } else {
            self.execs.lock().unwrap().get(exec_id).cloned()
        }
    }

    /// Applies an exit reported by the backend.
    /// Whether the process (`None`: the init process) was started and has
    /// not exited.
    pub fn process_running(&self, exec_id: Option<&str>) -> bool {
        let process = match exec_id {
            None => Some(self.init.clone()),
            Some(e) => self.execs.lock().unwrap().get(e).cloned(),
        };
        process.is_some_and(|p| {
            let v = p.view();
            v.exit.is_none() && v.status != Status::CREATED
        })
    }

    pub fn on_exit(&self, exec_id: Option<&str>, status: u32) {
        let process = match exec_id {
            None => Some(self.init.clone()),
            Some(e) => self.execs.lock().unwrap().get(e).cloned(),
        };
        if let Some(p) = process {
            p.set_exited(status, &self.events);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> EventTarget {
        EventTarget {
            // No address: nothing is spooled there.
            publisher: Arc::new(Publisher::new(
                std::env::temp_dir().join("kuasar-no-events"),
            )),
            address: String::new(),
            namespace: "ns".into(),
        }
    }

    #[tokio::test]
    async fn wait_returns_after_exit_and_again_at_once() {
        let p = Arc::new(Process::new("c", "", StdioPaths::default(), vec![], 10));
        let ev = target();
        p.started(10, &ev);
        let waiter = tokio::spawn({
            let p = p.clone();
            async move { p.wait().await.status }
        });
        tokio::task::yield_now().await;
        p.set_exited(137, &ev);
        assert_eq!(waiter.await.unwrap(), 137);
        assert_eq!(p.wait().await.status, 137);
        assert_eq!(p.view().status, Status::STOPPED);
    }

    #[tokio::test]
    async fn exit_before_start_is_held_and_status_stays_stopped() {
        let p = Process::new("c", "", StdioPaths::default(), vec![], 10);
        let ev = target();
        p.set_exited(0, &ev);
        assert!(p.state.lock().unwrap().exit_held);
        p.started(10, &ev);
        let st = p.state.lock().unwrap();
        assert!(!st.exit_held);
        assert_eq!(st.status, Status::STOPPED);
    }

    #[test]
    fn creation_time_is_recorded_and_missing_in_old_records_reads_as_unknown() {
        let rec = TaskRecord {
            namespace: "ns".into(),
            id: "c".into(),
            sandbox_id: "c".into(),
            kind: "runc".into(),
            bundle: "/b".into(),
            backend: Default::default(),
            init: Process::new("c", "", StdioPaths::default(), vec![], 1).record(),
            execs: vec![],
            created_at_nanos: 1_700_000_000_123_456_789,
        };
        let text = serde_json::to_string(&rec).unwrap();
        let back: TaskRecord = serde_json::from_str(&text).unwrap();
        assert_eq!(back.created_at_nanos, rec.created_at_nanos);
        assert_eq!(
            nanos(from_nanos(rec.created_at_nanos)),
            rec.created_at_nanos
        );
        let mut old: serde_json::Value = serde_json::from_str(&text).unwrap();
        old.as_object_mut().unwrap().remove("created_at_nanos");
        let back: TaskRecord = serde_json::from_value(old).unwrap();
        assert_eq!(back.created_at_nanos, 0);
        assert_eq!(from_nanos(0), UNIX_EPOCH);
    }

    #[test]
    fn exited_at_is_never_zero() {
        let p = Process::new("c", "e1", StdioPaths::default(), vec![], 0);
        p.set_exited(7, &target());
        let ts = timestamp(p.view().exit.unwrap().at);
        assert!(ts.seconds > 0);
    }
}
