//! The seed corpus (`corpus/<target>/seed-*`): a few valid inputs per
//! target, made here so that they follow the messages as they change.
//! Inputs the fuzzer found are kept beside them as `regression-*`.

use std::path::PathBuf;

use containerd_shim_protos::api;
use containerd_shim_protos::sandbox_api;
use kuasar_agent_api as agent;
use kuasar_core::rpc::frame::{Header, TYPE_REQUEST};
use kuasar_protocol::wire::{self, request, response, Request, Response};
use protobuf::well_known_types::any::Any;
use protobuf::Message;

use crate::task_api::{self, SANDBOX, SANDBOX_ID, TASK_V2, TASK_V3};

/// A fuzz target's body: one input.
pub type Target = fn(&[u8]);

/// Each target by name, with its body.
pub const TARGETS: [(&str, Target); 4] = [
    ("wire_decode", crate::wire_decode::run),
    ("ttrpc_frame", crate::ttrpc_frame::run),
    ("task_api", crate::task_api::run),
    ("agent_frame", crate::agent_frame::run),
];

pub fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}

/// The stored inputs of `target`, by name.
pub fn read(target: &str) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(corpus_dir(target))
        .map(|dir| {
            dir.map(|e| {
                let e = e.expect("listing the corpus");
                let name = e.file_name().to_string_lossy().into_owned();
                (name, std::fs::read(e.path()).expect("reading a seed"))
            })
            .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Replaces the stored seeds with the generated ones.
pub fn write() {
    for (target, _) in TARGETS {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, _) in read(target) {
            if name.starts_with("seed-") {
                std::fs::remove_file(dir.join(name)).unwrap();
            }
        }
        for (name, data) in generate(target) {
            std::fs::write(dir.join(name), data).unwrap();
        }
    }
}

/// The seeds of `target`, sorted by name.
pub fn generate(target: &str) -> Vec<(String, Vec<u8>)> {
    let mut seeds = match target {
        "wire_decode" => wire_seeds(),
        "ttrpc_frame" => ttrpc_seeds(),
        "task_api" => task_seeds(),
        "agent_frame" => agent_seeds(),
        other => panic!("no target {other}"),
    };
    for (name, _) in &mut seeds {
        *name = format!("seed-{name}");
    }
    seeds.sort();
    seeds
}

fn planned(plan: u8, parts: &[Vec<u8>]) -> Vec<u8> {
    let mut out = vec![plan];
    for p in parts {
        out.extend(p);
    }
    out
}

fn resolve(id: &str, group: &str) -> Request {
    Request::new(request::Body::Resolve(wire::ResolveRequest {
        kind: "runc".into(),
        namespace: "default".into(),
        id: id.into(),
        bundle: format!("/run/containerd/io.containerd.runtime.v2.task/default/{id}"),
        group: group.into(),
        ttrpc_address: "/run/containerd/containerd.sock.ttrpc".into(),
        grpc_address: "/run/containerd/containerd.sock".into(),
        publish_binary: "/usr/bin/containerd".into(),
        debug: false,
    }))
}

fn shim_delete(id: &str) -> Request {
    Request::new(request::Body::Delete(wire::DeleteRequest {
        kind: "runc".into(),
        namespace: "default".into(),
        id: id.into(),
        bundle: format!("/run/containerd/io.containerd.runtime.v2.task/default/{id}"),
    }))
}

fn frame(msg: &impl prost::Message) -> Vec<u8> {
    wire::encode_frame(msg).unwrap()
}

fn wire_seeds() -> Vec<(String, Vec<u8>)> {
    let mut other_version = resolve("c1", "");
    other_version.version = 2;
    let answers = [
        frame(&Response::new(response::Body::Resolve(
            wire::ResolveResponse {
                address: "unix:///run/kuasar/t/0123456789abcdef.sock".into(),
            },
        ))),
        frame(&Response::error(
            kuasar_protocol::Code::NotFound,
            "no such task",
        )),
    ];
    vec![
        ("resolve".into(), planned(0, &[frame(&resolve("c1", ""))])),
        (
            "resolve-in-small-chunks".into(),
            planned(3, &[frame(&resolve("c1", ""))]),
        ),
        (
            "pod-then-delete".into(),
            planned(
                9,
                &[
                    frame(&resolve("pod", "")),
                    frame(&resolve("c2", "pod")),
                    frame(&shim_delete("c2")),
                ],
            ),
        ),
        ("delete".into(), planned(0, &[frame(&shim_delete("c1"))])),
        ("other-version".into(), planned(0, &[frame(&other_version)])),
        (
            "no-body".into(),
            planned(
                0,
                &[frame(&Request {
                    version: 1,
                    body: None,
                })],
            ),
        ),
        (
            "oversized".into(),
            planned(0, &[(wire::MAX_FRAME as u32 + 1).to_be_bytes().to_vec()]),
        ),
        ("answers".into(), planned(0, &answers)),
    ]
}

fn ttrpc_request(service: &str, method: &str, payload: Vec<u8>) -> Vec<u8> {
    let mut req = ttrpc::proto::Request::new();
    req.service = service.into();
    req.method = method.into();
    req.payload = payload;
    req.timeout_nano = 5_000_000_000;
    let mut kv = ttrpc::proto::KeyValue::new();
    kv.key = "containerd-namespace-ttrpc".into();
    kv.value = "default".into();
    req.metadata.push(kv);
    req.write_to_bytes().unwrap()
}

fn ttrpc_frame(stream_id: u32, length: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Header {
        length,
        stream_id,
        kind: TYPE_REQUEST,
        flags: 0,
    }
    .encode()
    .to_vec();
    out.extend(payload);
    out
}

fn ttrpc_seeds() -> Vec<(String, Vec<u8>)> {
    let mut state = api::StateRequest::new();
    state.id = "c1".into();
    let state = ttrpc_request(TASK_V3, "State", state.write_to_bytes().unwrap());
    let mut wait = api::WaitRequest::new();
    wait.id = "c1".into();
    let wait = ttrpc_request(TASK_V2, "Wait", wait.write_to_bytes().unwrap());
    let f = |id, p: &Vec<u8>| ttrpc_frame(id, p.len() as u32, p);
    vec![
        ("state".into(), planned(0, &[f(1, &state)])),
        (
            "two-in-chunks".into(),
            planned(7, &[f(1, &wait), f(3, &state)]),
        ),
        (
            "oversized-then-state".into(),
            planned(
                0,
                &[ttrpc_frame(1, (4 << 20) + 1, b"cut short"), f(3, &state)],
            ),
        ),
    ]
}

fn agent_frame(f: agent::Frame) -> Vec<u8> {
    agent::encode_frame(&f).unwrap()
}

fn agent_seeds() -> Vec<(String, Vec<u8>)> {
    use agent::{event, request, response};
    let hello = agent_frame(agent::Frame::request(
        1,
        request::Call::Hello(agent::Hello {
            version: agent::VERSION,
            hostname: "pod".into(),
            unix_seconds: 1_700_000_000,
            unix_nanos: 5,
        }),
    ));
    let from_guest = [
        agent_frame(agent::Frame::response(1, Ok(response::Result::Pid(42)))),
        agent_frame(agent::Frame::output(3, b"hello\n".to_vec(), false)),
        agent_frame(agent::Frame::event(
            "c1".into(),
            event::Kind::Exit(agent::Exit {
                exec_id: String::new(),
                status: 0,
            }),
        )),
        agent_frame(agent::Frame::response(
            2,
            Err(agent::Status::new(
                agent::code::NOT_FOUND,
                "no such container",
            )),
        )),
    ];
    vec![
        ("hello".into(), planned(0, std::slice::from_ref(&hello))),
        ("from-the-guest-in-chunks".into(), planned(5, &from_guest)),
        (
            "undecodable-then-output".into(),
            planned(0, &[vec![0x05, 0xff, 0xff, 0], from_guest[1].clone()]),
        ),
        (
            "cut-by-a-crash-then-whole".into(),
            planned(
                3,
                &[
                    hello[..hello.len() / 2].to_vec(),
                    vec![agent::DELIMITER],
                    hello.clone(),
                ],
            ),
        ),
        ("padding".into(), planned(0, &[vec![0, 0], hello, vec![0]])),
    ]
}

/// The index `calls` reads for a method.
fn method(service: &str, name: &str) -> u8 {
    task_api::methods()
        .iter()
        .position(|(s, m, _)| *s == service && *m == name)
        .unwrap_or_else(|| panic!("no method /{service}/{name}")) as u8
}

fn task_seeds() -> Vec<(String, Vec<u8>)> {
    let lifecycle = |svc: &str| {
        let mut create = api::CreateTaskRequest::new();
        create.id = "c1".into();
        create.bundle = "/run/containerd/io.containerd.runtime.v2.task/ns/c1".into();
        create.stdout = "/run/containerd/fifo/1/c1-stdout".into();
        create.stderr = "/run/containerd/fifo/1/c1-stderr".into();
        let mut start = api::StartRequest::new();
        start.id = "c1".into();
        let mut state = api::StateRequest::new();
        state.id = "c1".into();
        let mut pids = api::PidsRequest::new();
        pids.id = "c1".into();
        let mut pause = api::PauseRequest::new();
        pause.id = "c1".into();
        let mut resume = api::ResumeRequest::new();
        resume.id = "c1".into();
        let mut update = api::UpdateTaskRequest::new();
        update.id = "c1".into();
        let mut resources = Any::new();
        resources.value = br#"{"memory":{"limit":1048576}}"#.to_vec();
        update.resources = Some(resources).into();
        let mut stats = api::StatsRequest::new();
        stats.id = "c1".into();
        let mut connect = api::ConnectRequest::new();
        connect.id = "c1".into();
        let mut kill = api::KillRequest::new();
        kill.id = "c1".into();
        kill.signal = 9;
        let mut wait = api::WaitRequest::new();
        wait.id = "c1".into();
        let mut delete = api::DeleteRequest::new();
        delete.id = "c1".into();
        let shutdown = api::ShutdownRequest::new();
        let b = |m: &dyn protobuf::MessageDyn| m.write_to_bytes_dyn().unwrap();
        let c = |name: &str, payload: Vec<u8>| (method(svc, name), 0u8, payload);
        task_api::encode(&[
            c("Create", b(&create)),
            c("State", b(&state)),
            c("Start", b(&start)),
            c("Pids", b(&pids)),
            c("Pause", b(&pause)),
            c("Resume", b(&resume)),
            c("Update", b(&update)),
            c("Stats", b(&stats)),
            c("Connect", b(&connect)),
            c("Kill", b(&kill)),
            c("Wait", b(&wait)),
            c("Delete", b(&delete)),
            c("Shutdown", b(&shutdown)),
        ])
    };
    let exec = {
        let mut create = api::CreateTaskRequest::new();
        create.id = "c1".into();
        create.bundle = "/run/containerd/io.containerd.runtime.v2.task/ns/c1".into();
        let mut start = api::StartRequest::new();
        start.id = "c1".into();
        let mut exec = api::ExecProcessRequest::new();
        exec.id = "c1".into();
        exec.exec_id = "e1".into();
        exec.stdin = "/run/containerd/fifo/2/e1-stdin".into();
        exec.terminal = true;
        let mut spec = Any::new();
        spec.type_url = "types.containerd.io/opencontainers/runtime-spec/1/Process".into();
        spec.value = br#"{"args":["sh"],"cwd":"/","terminal":true}"#.to_vec();
        exec.spec = Some(spec).into();
        let mut start_exec = api::StartRequest::new();
        start_exec.id = "c1".into();
        start_exec.exec_id = "e1".into();
        let mut resize = api::ResizePtyRequest::new();
        resize.id = "c1".into();
        resize.exec_id = "e1".into();
        resize.width = 80;
        resize.height = 24;
        let mut close = api::CloseIORequest::new();
        close.id = "c1".into();
        close.exec_id = "e1".into();
        close.stdin = true;
        let mut kill = api::KillRequest::new();
        kill.id = "c1".into();
        kill.exec_id = "e1".into();
        kill.signal = 15;
        let mut wait = api::WaitRequest::new();
        wait.id = "c1".into();
        wait.exec_id = "e1".into();
        let mut delete = api::DeleteRequest::new();
        delete.id = "c1".into();
        delete.exec_id = "e1".into();
        let mut checkpoint = api::CheckpointTaskRequest::new();
        checkpoint.id = "c1".into();
        let b = |m: &dyn protobuf::MessageDyn| m.write_to_bytes_dyn().unwrap();
        let c = |name: &str, ns: u8, payload: Vec<u8>| (method(TASK_V3, name), ns, payload);
        task_api::encode(&[
            c("Create", 1, b(&create)),
            c("Start", 0, b(&start)),
            c("Exec", 0, b(&exec)),
            c("Start", 0, b(&start_exec)),
            c("ResizePty", 0, b(&resize)),
            c("CloseIO", 0, b(&close)),
            c("Kill", 0, b(&kill)),
            c("Wait", 0, b(&wait)),
            c("Delete", 0, b(&delete)),
            c("Checkpoint", 0, b(&checkpoint)),
        ])
    };
    let sandbox = {
        let mut create = sandbox_api::CreateSandboxRequest::new();
        create.sandbox_id = SANDBOX_ID.into();
        create.bundle_path =
            "/run/containerd/io.containerd.sandbox.controller.v1.shim/ns/c1".into();
        create.netns_path = "/var/run/netns/cni-1".into();
        let id = SANDBOX_ID.to_string();
        let mut start = sandbox_api::StartSandboxRequest::new();
        start.sandbox_id = id.clone();
        let mut platform = sandbox_api::PlatformRequest::new();
        platform.sandbox_id = id.clone();
        let mut status = sandbox_api::SandboxStatusRequest::new();
        status.sandbox_id = id.clone();
        status.verbose = true;
        let mut ping = sandbox_api::PingRequest::new();
        ping.sandbox_id = id.clone();
        let mut metrics = sandbox_api::SandboxMetricsRequest::new();
        metrics.sandbox_id = id.clone();
        let mut stop = sandbox_api::StopSandboxRequest::new();
        stop.sandbox_id = id.clone();
        let mut wait = sandbox_api::WaitSandboxRequest::new();
        wait.sandbox_id = id.clone();
        let mut shutdown = sandbox_api::ShutdownSandboxRequest::new();
        shutdown.sandbox_id = id;
        let b = |m: &dyn protobuf::MessageDyn| m.write_to_bytes_dyn().unwrap();
        let c = |name: &str, payload: Vec<u8>| (method(SANDBOX, name), 0u8, payload);
        task_api::encode(&[
            c("CreateSandbox", b(&create)),
            c("StartSandbox", b(&start)),
            c("Platform", b(&platform)),
            c("SandboxStatus", b(&status)),
            c("PingSandbox", b(&ping)),
            c("SandboxMetrics", b(&metrics)),
            c("StopSandbox", b(&stop)),
            c("WaitSandbox", b(&wait)),
            c("ShutdownSandbox", b(&shutdown)),
        ])
    };
    let refused = {
        let mut create = api::CreateTaskRequest::new();
        create.id = "../c1".into();
        create.bundle = "bundle".into();
        let mut other = create.clone();
        other.id = "c1".into();
        other.stdin = "../stdin".into();
        let b = |m: &dyn protobuf::MessageDyn| m.write_to_bytes_dyn().unwrap();
        task_api::encode(&[
            (method(TASK_V3, "Create"), 0, b(&create)),
            (method(TASK_V2, "Create"), 3, b(&other)),
            (method(TASK_V3, "Frobnicate"), 0, vec![0xff]),
            (method("containerd.task.v9.Task", "State"), 4, vec![]),
        ])
    };
    vec![
        ("lifecycle-v3".into(), lifecycle(TASK_V3)),
        ("lifecycle-v2".into(), lifecycle(TASK_V2)),
        ("exec".into(), exec),
        ("sandbox".into(), sandbox),
        ("refused".into(), refused),
    ]
}
