//! Task API semantics over a fake backend: the rules containerd relies on
//! (Wait blocks until exit, Kill of an exited process is NotFound, a running
//! task cannot be deleted, events in order with bare type URLs), checked
//! through the real ttrpc dispatch and a fake containerd events service.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim_protos::api::*;
use containerd_shim_protos::shim::events::ForwardRequest;
use kuasar_protocol::{wire, Code};
use protobuf::well_known_types::any::Any;
use protobuf::Message;

use super::TaskService;
use crate::error::Result;
use crate::rpc::{Handler, RequestContext};

use crate::backend::fake::INIT_PID;

/// A containerd events service that records (topic, type URL).
#[derive(Default)]
struct Events(Mutex<Vec<(String, String)>>);

#[async_trait]
impl Handler for Events {
    async fn handle(
        &self,
        _: RequestContext,
        service: &str,
        method: &str,
        payload: &[u8],
    ) -> Result<Vec<u8>> {
        assert_eq!(
            (service, method),
            ("containerd.services.events.ttrpc.v1.Events", "Forward")
        );
        let req = ForwardRequest::parse_from_bytes(payload).unwrap();
        assert!(req.envelope.timestamp.seconds > 0);
        self.0.lock().unwrap().push((
            req.envelope.topic.clone(),
            req.envelope.event.type_url.clone(),
        ));
        Ok(Empty::new().write_to_bytes().unwrap())
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    service: TaskService,
    events: Arc<Events>,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let daemon = crate::backend::fake::daemon(&dir.path().join("k"));
    let events = Arc::new(Events::default());
    let events_sock = dir.path().join("events.sock");
    let listener = tokio::net::UnixListener::bind(&events_sock).unwrap();
    tokio::spawn(crate::rpc::server::serve_listener(
        listener,
        events.clone(),
        crate::rpc::server::ConnScope::unparked(),
    ));
    daemon
        .resolve(&wire::ResolveRequest {
            kind: "runc".into(),
            namespace: "ns".into(),
            id: "c1".into(),
            ttrpc_address: events_sock.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap();
    let sandbox = daemon.sandbox("ns", "c1").unwrap();
    Fixture {
        _dir: dir,
        service: TaskService::new(daemon, sandbox),
        events,
    }
}

impl Fixture {
    async fn call<Req: Message, Resp: Message>(&self, method: &str, req: Req) -> Result<Resp> {
        let ctx = RequestContext {
            namespace: Some("ns".into()),
            timeout: None,
        };
        let payload = req.write_to_bytes().unwrap();
        let out = self
            .service
            .handle(ctx, "containerd.task.v3.Task", method, &payload)
            .await?;
        Ok(Resp::parse_from_bytes(&out).unwrap())
    }

    async fn create(&self, id: &str) {
        let mut req = CreateTaskRequest::new();
        req.id = id.into();
        req.bundle = self._dir.path().join(id).display().to_string();
        let resp: CreateTaskResponse = self.call("Create", req).await.unwrap();
        assert_eq!(resp.pid, INIT_PID);
    }

    async fn topics(&self, n: usize) -> Vec<(String, String)> {
        for _ in 0..200 {
            if self.events.0.lock().unwrap().len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.events.0.lock().unwrap().clone()
    }
}

fn start(id: &str, exec: &str) -> StartRequest {
    let mut r = StartRequest::new();
    r.id = id.into();
    r.exec_id = exec.into();
    r
}

fn kill(id: &str, exec: &str) -> KillRequest {
    let mut r = KillRequest::new();
    r.id = id.into();
    r.exec_id = exec.into();
    r.signal = 9;
    r
}

fn wait(id: &str, exec: &str) -> WaitRequest {
    let mut r = WaitRequest::new();
    r.id = id.into();
    r.exec_id = exec.into();
    r
}

fn delete(id: &str, exec: &str) -> DeleteRequest {
    let mut r = DeleteRequest::new();
    r.id = id.into();
    r.exec_id = exec.into();
    r
}

fn state(id: &str) -> StateRequest {
    let mut r = StateRequest::new();
    r.id = id.into();
    r
}

fn code<T>(r: Result<T>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(e) => e.code(),
    }
}

#[tokio::test]
async fn lifecycle_follows_containerds_rules_and_events_come_in_order() {
    let f = Arc::new(fixture().await);
    f.create("c1").await;
    // Wait blocks on a created task (ctr run waits before it starts).
    let waiter = tokio::spawn({
        let f = f.clone();
        async move { f.call::<_, WaitResponse>("Wait", wait("c1", "")).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiter.is_finished());
    let st: StateResponse = f.call("State", state("c1")).await.unwrap();
    assert_eq!(st.status.enum_value(), Ok(Status::CREATED));

    let resp: StartResponse = f.call("Start", start("c1", "")).await.unwrap();
    assert_eq!(resp.pid, INIT_PID);
    // Again (a Start dispatched again after a crash): the same answer, and
    // nothing started twice.
    let again: StartResponse = f.call("Start", start("c1", "")).await.unwrap();
    assert_eq!(again.pid, INIT_PID);
    assert_eq!(
        code(
            f.call::<_, DeleteResponse>("Delete", delete("c1", ""))
                .await
        ),
        Code::FailedPrecondition
    );

    f.call::<_, Empty>("Kill", kill("c1", "")).await.unwrap();
    let exit = waiter.await.unwrap().unwrap();
    assert_eq!(exit.exit_status, 137);
    assert!(exit.exited_at.seconds > 0);
    // After the exit: Wait returns at once, Kill is NotFound, State stopped.
    let again: WaitResponse = f.call("Wait", wait("c1", "")).await.unwrap();
    assert_eq!(again.exit_status, 137);
    assert_eq!(
        code(f.call::<_, Empty>("Kill", kill("c1", "")).await),
        Code::NotFound
    );
    let st: StateResponse = f.call("State", state("c1")).await.unwrap();
    assert_eq!(st.status.enum_value(), Ok(Status::STOPPED));
    assert_eq!(st.exit_status, 137);

    let del: DeleteResponse = f.call("Delete", delete("c1", "")).await.unwrap();
    assert_eq!((del.pid, del.exit_status), (INIT_PID, 137));
    assert_eq!(
        code(f.call::<_, StateResponse>("State", state("c1")).await),
        Code::NotFound
    );
    // containerd's `shim delete` after a normal delete learns how it ended;
    // asked again, it gets the idempotent answer for an unknown task.
    let req = wire::DeleteRequest {
        kind: "runc".into(),
        namespace: "ns".into(),
        id: "c1".into(),
        bundle: String::new(),
    };
    let first = f.service.daemon.shim_delete(&req).await.unwrap();
    assert_eq!((first.pid, first.exit_status), (INIT_PID, 137));
    let again = f.service.daemon.shim_delete(&req).await.unwrap();
    assert_eq!((again.pid, again.exit_status), (0, 137));
    let topics = f.topics(4).await;
    assert_eq!(
        topics,
        vec![
            (
                "/tasks/create".to_string(),
                "containerd.events.TaskCreate".to_string()
            ),
            ("/tasks/start".into(), "containerd.events.TaskStart".into()),
            ("/tasks/exit".into(), "containerd.events.TaskExit".into()),
            (
                "/tasks/delete".into(),
                "containerd.events.TaskDelete".into()
            ),
        ]
    );
}

#[tokio::test]
async fn exec_processes_have_their_own_lifecycle() {
    let f = fixture().await;
    f.create("c1").await;
    f.call::<_, StartResponse>("Start", start("c1", ""))
        .await
        .unwrap();
    let mut exec = ExecProcessRequest::new();
    exec.id = "c1".into();
    exec.exec_id = "e1".into();
    assert_eq!(
        code(f.call::<_, Empty>("Exec", exec.clone()).await),
        Code::InvalidArgument,
        "no spec"
    );
    let mut spec = Any::new();
    spec.type_url = "types.containerd.io/opencontainers/runtime-spec/1/Process".into();
    spec.value = br#"{"args":["true"],"cwd":"/"}"#.to_vec();
    exec.spec = Some(spec).into();
    f.call::<_, Empty>("Exec", exec.clone()).await.unwrap();
    assert_eq!(
        code(f.call::<_, Empty>("Exec", exec).await),
        Code::AlreadyExists
    );
    let resp: StartResponse = f.call("Start", start("c1", "e1")).await.unwrap();
    assert_eq!(resp.pid, INIT_PID + 1);
    f.call::<_, Empty>("Kill", kill("c1", "e1")).await.unwrap();
    let exit: WaitResponse = f.call("Wait", wait("c1", "e1")).await.unwrap();
    assert_eq!(exit.exit_status, 137);
    let del: DeleteResponse = f.call("Delete", delete("c1", "e1")).await.unwrap();
    assert_eq!(del.exit_status, 137);
    assert_eq!(
        code(f.call::<_, WaitResponse>("Wait", wait("c1", "e1")).await),
        Code::NotFound
    );
    // The init process is untouched by its exec's end.
    let st: StateResponse = f.call("State", state("c1")).await.unwrap();
    assert_eq!(st.status.enum_value(), Ok(Status::RUNNING));
    let topics: Vec<String> = f.topics(5).await.into_iter().map(|t| t.0).collect();
    assert_eq!(
        topics,
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exec-added",
            "/tasks/exec-started",
            "/tasks/exit"
        ]
    );
}

#[tokio::test]
async fn unknown_ids_methods_and_services_get_clear_codes() {
    let f = fixture().await;
    assert_eq!(
        code(f.call::<_, StateResponse>("State", state("nope")).await),
        Code::NotFound
    );
    assert_eq!(
        code(f.call::<_, Empty>("Frobnicate", state("nope")).await),
        Code::Unimplemented
    );
    let ctx = RequestContext {
        namespace: Some("ns".into()),
        timeout: None,
    };
    assert_eq!(
        code(
            f.service
                .handle(ctx.clone(), "containerd.task.v9.Task", "State", &[])
                .await
        ),
        Code::Unimplemented
    );
    assert_eq!(
        code(
            f.service
                .handle(ctx, "containerd.task.v2.Task", "State", &[0xff, 0xff])
                .await
        ),
        Code::InvalidArgument
    );
    let mut bad = CreateTaskRequest::new();
    bad.id = "../escape".into();
    bad.bundle = "/tmp/x".into();
    assert_eq!(
        code(f.call::<_, CreateTaskResponse>("Create", bad).await),
        Code::InvalidArgument
    );
    // Connect answers for the sandbox id even without a task of that name,
    // and Shutdown never stops the daemon.
    let mut c = ConnectRequest::new();
    c.id = "c1".into();
    let resp: ConnectResponse = f.call("Connect", c).await.unwrap();
    assert_eq!(resp.shim_pid, std::process::id());
    f.call::<_, Empty>("Shutdown", ShutdownRequest::new())
        .await
        .unwrap();
    f.create("c1").await;
    let mut c = ConnectRequest::new();
    c.id = "c1".into();
    let resp: ConnectResponse = f.call("Connect", c).await.unwrap();
    assert_eq!(resp.task_pid, INIT_PID);
}

#[tokio::test]
async fn create_refuses_relative_or_climbing_bundles_and_stdio_paths_and_keeps_nothing() {
    let f = fixture().await;
    let good = f._dir.path().join("c1").display().to_string();
    let request = |bundle: &str, stdin: &str, stdout: &str, stderr: &str| {
        let mut r = CreateTaskRequest::new();
        r.id = "c1".into();
        r.bundle = bundle.into();
        r.stdin = stdin.into();
        r.stdout = stdout.into();
        r.stderr = stderr.into();
        r
    };
    for (what, req) in [
        ("bundle", request("", "", "", "")),
        ("bundle", request("bundle/c1", "", "", "")),
        ("bundle", request(&format!("{good}/../../c1"), "", "", "")),
        ("stdio path", request(&good, "c1-stdin", "", "")),
        (
            "stdio path",
            request(&good, "", "/run/fifo/../../etc/passwd", ""),
        ),
        ("stdio path", request(&good, "", "/run/fifo/out", "../err")),
        (
            "stdio path",
            request(&good, "", "file://var/log/c1.log", ""),
        ),
        (
            "stdio path",
            request(&good, "", "binary:///bin/../tmp/driver", ""),
        ),
        ("STDIO scheme", request(&good, "", "tcp://10.0.0.1:514", "")),
    ] {
        let err = f
            .call::<_, CreateTaskResponse>("Create", req.clone())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{req:?}: {err}");
        assert!(err.to_string().contains(what), "{req:?}: {err}");
        assert!(!f.service.daemon.has_task("ns", "c1"));
    }
    f.create("c1").await;
}

#[tokio::test]
async fn exec_refuses_bad_exec_ids_and_stdio_paths_and_keeps_nothing() {
    let f = fixture().await;
    f.create("c1").await;
    f.call::<_, StartResponse>("Start", start("c1", ""))
        .await
        .unwrap();
    let mut spec = Any::new();
    spec.value = br#"{"args":["true"],"cwd":"/"}"#.to_vec();
    let request = |exec_id: &str, stdout: &str| {
        let mut r = ExecProcessRequest::new();
        r.id = "c1".into();
        r.exec_id = exec_id.into();
        r.stdout = stdout.into();
        r.spec = Some(spec.clone()).into();
        r
    };
    for (what, req) in [
        ("exec id", request("", "")),
        ("exec id", request("../e1", "")),
        ("exec id", request("e1/x", "")),
        ("exec id", request(&"e".repeat(77), "")),
        ("stdio path", request("e1", "e1-stdout")),
        ("stdio path", request("e1", "/run/fifo/../../etc/shadow")),
    ] {
        let err = f.call::<_, Empty>("Exec", req.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{req:?}: {err}");
        assert!(err.to_string().contains(what), "{req:?}: {err}");
        let task = f.service.daemon.task("ns", "c1").unwrap();
        assert!(task.execs.lock().unwrap().is_empty());
    }
    f.call::<_, Empty>("Exec", request("e1", "/run/fifo/e1-stdout"))
        .await
        .unwrap();
}

#[tokio::test]
async fn shim_requests_refuse_climbing_bundles_and_relative_containerd_addresses() {
    let f = fixture().await;
    let resolve = |bundle: &str, ttrpc: &str, grpc: &str| wire::ResolveRequest {
        kind: "runc".into(),
        namespace: "ns".into(),
        id: "c2".into(),
        bundle: bundle.into(),
        ttrpc_address: ttrpc.into(),
        grpc_address: grpc.into(),
        ..Default::default()
    };
    for (what, req) in [
        ("bundle", resolve("b/c2", "", "")),
        ("bundle", resolve("/run/b/../../etc", "", "")),
        (
            "ttrpc address",
            resolve("/b/c2", "containerd.sock.ttrpc", ""),
        ),
        ("ttrpc address", resolve("/b/c2", "unix://../c.sock", "")),
        ("grpc address", resolve("/b/c2", "", "/run/../tmp/c.sock")),
    ] {
        let err = f.service.daemon.resolve(&req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{req:?}: {err}");
        assert!(err.to_string().contains(what), "{req:?}: {err}");
        assert!(f.service.daemon.sandbox("ns", "c2").is_err());
    }
    f.service
        .daemon
        .resolve(&resolve(
            "/b/c2",
            "unix:///run/containerd/containerd.sock.ttrpc",
            "/run/containerd/containerd.sock",
        ))
        .await
        .unwrap();
    // `shim delete` unmounts `<bundle>/rootfs`: only an absolute bundle
    // that does not climb is accepted.
    for bundle in ["rootfs/..", "b", "/b/../.."] {
        let err = f
            .service
            .daemon
            .shim_delete(&wire::DeleteRequest {
                kind: "runc".into(),
                namespace: "ns".into(),
                id: "c2".into(),
                bundle: bundle.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bundle:?}: {err}");
    }
}
