//! The Task API handlers (and the Sandbox service served beside them on a
//! pod's socket), called as the ttrpc server calls them, on a daemon over
//! the fake backend. The input is a sequence of calls, each
//! `[method][namespace][length: u16 LE][payload]`. Rules: no handler
//! panics; every call but a Wait answers (a Wait still waiting once the
//! runtime is idle is dropped); an answer decodes as the
//! method's response; a refusal is a typed error, never a failure inside
//! the daemon (Internal) or an unexplained one (Unknown).

use std::future::{poll_fn, Future};
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use containerd_shim_protos::api;
use containerd_shim_protos::sandbox_api;
use kuasar_core::rpc::{Handler, RequestContext};
use kuasar_core::task::service::TaskService;
use kuasar_protocol::{wire, Code};
use protobuf::Message;

type Decodes = fn(&[u8]) -> bool;

fn decodes<M: Message>(bytes: &[u8]) -> bool {
    M::parse_from_bytes(bytes).is_ok()
}

pub const TASK_V2: &str = "containerd.task.v2.Task";
pub const TASK_V3: &str = "containerd.task.v3.Task";
pub const SANDBOX: &str = "containerd.runtime.sandbox.v1.Sandbox";

const TASK_METHODS: [(&str, Decodes); 17] = [
    ("Create", decodes::<api::CreateTaskResponse>),
    ("Start", decodes::<api::StartResponse>),
    ("Delete", decodes::<api::DeleteResponse>),
    ("Pids", decodes::<api::PidsResponse>),
    ("Pause", decodes::<api::Empty>),
    ("Resume", decodes::<api::Empty>),
    ("Checkpoint", decodes::<api::Empty>),
    ("Kill", decodes::<api::Empty>),
    ("Exec", decodes::<api::Empty>),
    ("ResizePty", decodes::<api::Empty>),
    ("CloseIO", decodes::<api::Empty>),
    ("Update", decodes::<api::Empty>),
    ("Wait", decodes::<api::WaitResponse>),
    ("Stats", decodes::<api::StatsResponse>),
    ("Connect", decodes::<api::ConnectResponse>),
    ("Shutdown", decodes::<api::Empty>),
    ("State", decodes::<api::StateResponse>),
];

const SANDBOX_METHODS: [(&str, Decodes); 9] = [
    (
        "CreateSandbox",
        decodes::<sandbox_api::CreateSandboxResponse>,
    ),
    ("StartSandbox", decodes::<sandbox_api::StartSandboxResponse>),
    ("Platform", decodes::<sandbox_api::PlatformResponse>),
    ("StopSandbox", decodes::<sandbox_api::StopSandboxResponse>),
    ("WaitSandbox", decodes::<sandbox_api::WaitSandboxResponse>),
    (
        "SandboxStatus",
        decodes::<sandbox_api::SandboxStatusResponse>,
    ),
    ("PingSandbox", decodes::<sandbox_api::PingResponse>),
    (
        "ShutdownSandbox",
        decodes::<sandbox_api::ShutdownSandboxResponse>,
    ),
    (
        "SandboxMetrics",
        decodes::<sandbox_api::SandboxMetricsResponse>,
    ),
];

/// Every (service, method) a call can pick: the Task API under both of its
/// names, the Sandbox service, and names not served.
pub fn methods() -> Vec<(&'static str, &'static str, Decodes)> {
    let mut all = Vec::new();
    for service in [TASK_V3, TASK_V2] {
        all.extend(TASK_METHODS.iter().map(|(m, d)| (service, *m, *d)));
    }
    all.extend(SANDBOX_METHODS.iter().map(|(m, d)| (SANDBOX, *m, *d)));
    all.push((TASK_V3, "Frobnicate", decodes::<api::Empty> as Decodes));
    all.push((
        "containerd.task.v9.Task",
        "State",
        decodes::<api::StateResponse>,
    ));
    all
}

/// The namespace metadata a call carries (`None`: none sent).
pub const NAMESPACES: [Option<&str>; 5] =
    [Some("ns"), None, Some("default"), Some("../ns"), Some("")];

/// The sandbox the calls arrive at, as `shim start` resolved it.
pub const SANDBOX_ID: &str = "c1";

/// Calls that may block until something else happens.
fn may_block(method: &str) -> bool {
    matches!(method, "Wait" | "WaitSandbox")
}

/// The call's answer, or `None` once it still waits after everything else
/// the runtime had to do has run: it waits for something no later call of
/// this input may bring (the fake backend does all its work in memory).
async fn answer_unless_blocked<T>(call: impl Future<Output = T>) -> Option<T> {
    let mut call = pin!(call);
    for _ in 0..64 {
        if let Poll::Ready(answer) = poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx))).await {
            return Some(answer);
        }
        tokio::task::yield_now().await;
    }
    None
}

/// One call of an input.
pub struct Call<'a> {
    pub method: u8,
    pub namespace: u8,
    pub payload: &'a [u8],
}

/// The calls of an input, up to the first cut short.
pub fn calls(mut data: &[u8]) -> Vec<Call<'_>> {
    let mut out = Vec::new();
    while let Some((head, rest)) = data.split_first_chunk::<4>() {
        let len = u16::from_le_bytes([head[2], head[3]]) as usize;
        let len = len.min(rest.len());
        out.push(Call {
            method: head[0],
            namespace: head[1],
            payload: &rest[..len],
        });
        data = &rest[len..];
    }
    out
}

/// Encodes calls as [`calls`] reads them.
pub fn encode(calls: &[(u8, u8, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (method, namespace, payload) in calls {
        out.extend([*method, *namespace]);
        out.extend((payload.len() as u16).to_le_bytes());
        out.extend(payload);
    }
    out
}

pub fn run(data: &[u8]) {
    outcomes(data);
}

/// How a call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Answered,
    Refused(Code),
    /// A Wait still waiting.
    Waiting,
}

/// Runs the calls of `data`, checking the rules; how each ended.
pub fn outcomes(data: &[u8]) -> Vec<(&'static str, Outcome)> {
    let methods = methods();
    let mut seen = Vec::new();
    let (_dir, daemon) = crate::daemon();
    let rt = crate::runtime();
    rt.block_on(async {
        daemon
            .resolve(&wire::ResolveRequest {
                kind: "runc".into(),
                namespace: "ns".into(),
                id: SANDBOX_ID.into(),
                ..Default::default()
            })
            .await
            .expect("resolving the sandbox");
        let sandbox = daemon.sandbox("ns", SANDBOX_ID).unwrap();
        let service = TaskService::new(daemon.clone(), sandbox);
        for call in calls(data) {
            let (svc, method, answer_decodes) = methods[call.method as usize % methods.len()];
            let ctx = RequestContext {
                namespace: NAMESPACES[call.namespace as usize % NAMESPACES.len()].map(String::from),
                timeout: None,
            };
            let handled = service.handle(ctx, svc, method, call.payload);
            let answered = if may_block(method) {
                answer_unless_blocked(handled).await
            } else {
                let answered = tokio::time::timeout(Duration::from_secs(10), handled).await;
                Some(answered.unwrap_or_else(|_| panic!("/{svc}/{method} never answered")))
            };
            let outcome = match answered {
                None => Outcome::Waiting,
                Some(Ok(answer)) => {
                    assert!(
                        answer_decodes(&answer),
                        "/{svc}/{method} answered what does not decode as its response"
                    );
                    Outcome::Answered
                }
                Some(Err(e)) => {
                    assert!(
                        !matches!(e.code(), Code::Internal | Code::Unknown),
                        "/{svc}/{method} failed inside the daemon: {e}"
                    );
                    Outcome::Refused(e.code())
                }
            };
            seen.push((method, outcome));
            // Let exits and events the call caused run before the next.
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
        }
    });
    seen
}
