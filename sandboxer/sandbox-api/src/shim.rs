//! The ttrpc `containerd.runtime.sandbox.v1.Sandbox` service containerd 2.x
//! calls at a shim's address when a runtime has `sandboxer = "shim"`.

use std::time::Duration;

use containerd_shim_protos::sandbox_api as api;
use protobuf::Message;

use crate::convert::*;
use crate::types::CreateSandbox;
use crate::{Controller, Status};

/// The ttrpc service name to route to [`handle_ttrpc`].
pub const TTRPC_SERVICE: &str = "containerd.runtime.sandbox.v1.Sandbox";

fn decode<M: Message>(method: &str, payload: &[u8]) -> Result<M, Status> {
    M::parse_from_bytes(payload)
        .map_err(|e| Status::invalid_argument(format!("malformed {method} request: {e}")))
}

fn encode<M: Message>(msg: &M) -> Result<Vec<u8>, Status> {
    msg.write_to_bytes()
        .map_err(|e| Status::internal(format!("encoding reply: {e}")))
}

fn check(namespace: &str, sandbox_id: &str) -> Result<(), Status> {
    if namespace.is_empty() {
        return Err(Status::invalid_argument(
            "a containerd namespace is required",
        ));
    }
    if sandbox_id.is_empty() {
        return Err(Status::invalid_argument("sandbox_id is required"));
    }
    Ok(())
}

/// Serves one call of [`TTRPC_SERVICE`]: decodes `payload` for `method`,
/// calls `controller` and returns the encoded reply. `namespace` is the
/// call's `containerd-namespace-ttrpc` metadata.
pub async fn handle_ttrpc(
    controller: &dyn Controller,
    namespace: &str,
    method: &str,
    payload: &[u8],
) -> Result<Vec<u8>, Status> {
    match method {
        "CreateSandbox" => {
            let r: api::CreateSandboxRequest = decode(method, payload)?;
            check(namespace, &r.sandbox_id)?;
            controller
                .create(CreateSandbox {
                    namespace: namespace.to_string(),
                    id: r.sandbox_id,
                    rootfs: r.rootfs.into_iter().map(from_pb_mount).collect(),
                    options: from_pb_any(r.options),
                    netns_path: r.netns_path,
                    annotations: r.annotations,
                    sandbox: None,
                    sandboxer: String::new(),
                    bundle_path: r.bundle_path,
                })
                .await?;
            encode(&api::CreateSandboxResponse::new())
        }
        "StartSandbox" => {
            let r: api::StartSandboxRequest = decode(method, payload)?;
            check(namespace, &r.sandbox_id)?;
            let ready = controller.start(namespace, &r.sandbox_id).await?;
            // containerd takes address and version from the shim's bootstrap
            // here, not from the reply.
            let mut resp = api::StartSandboxResponse::new();
            resp.pid = ready.pid;
            resp.created_at = to_pb_time(ready.created_at);
            encode(&resp)
        }
        "Platform" => {
            let r: api::PlatformRequest = decode(method, payload)?;
            check(namespace, &r.sandbox_id)?;
            let platform = controller.platform(namespace, &r.sandbox_id).await?;
            let mut resp = api::PlatformResponse::new();
            resp.platform = protobuf::MessageField::some(to_pb_platform(platform));
            encode(&resp)
        }
        "StopSandbox" => {
            let r: api::StopSandboxRequest = decode(method, payload)?;
            check(namespace, &r.sandbox_id)?;
            let timeout = match r.timeout_secs {
                0 => None,
                s => Some(Duration::from_secs(s.into())),
            };
            controller.stop(namespace, &r.sandbox_id, timeout).await?;
            encode(&api::StopSandboxResponse::new())
        }
        "WaitSandbox" => {
            let r: api::WaitSandboxRequest = decode(method, payload)?;
            check(namespace, &r.sandbox_id)?;
            let exit = controller.wait(namespace, &r.sandbox_id).await?;
            let mut resp = api::WaitSandboxResponse::new();
            resp.exit_status = exit.exit_status;
            resp.exited_at = to_pb_time(exit.exited_at);
            encode(&resp)
        }
        "SandboxStatus" => {
            let r: api::SandboxStatusRequest = decode(method, payload)?;
            check(namespace, &r.sandbox_id)?;
            let s = controller
                .status(namespace, &r.sandbox_id, r.verbose)
                .await?;
            let mut resp = api::SandboxStatusResponse::new();
            // containerd's shim controller hands this id to CRI, which
            // labels the pod's containers with it.
            resp.sandbox_id = r.sandbox_id;
            resp.pid = s.pid;
            resp.state = s.state;
            resp.info = s.info;
            resp.created_at = to_pb_time(s.created_at);
            resp.exited_at = to_pb_time(s.exited_at);
            resp.extra = to_pb_any(s.extra);
            encode(&resp)
        }
        "PingSandbox" => {
            let r: api::PingRequest = decode(method, payload)?;
            check(namespace, &r.sandbox_id)?;
            controller.ping(namespace, &r.sandbox_id).await?;
            encode(&api::PingResponse::new())
        }
        "ShutdownSandbox" => {
            let r: api::ShutdownSandboxRequest = decode(method, payload)?;
            check(namespace, &r.sandbox_id)?;
            controller.shutdown(namespace, &r.sandbox_id).await?;
            encode(&api::ShutdownSandboxResponse::new())
        }
        "SandboxMetrics" => {
            let r: api::SandboxMetricsRequest = decode(method, payload)?;
            check(namespace, &r.sandbox_id)?;
            let mut resp = api::SandboxMetricsResponse::new();
            if let Some(m) = controller.metrics(namespace, &r.sandbox_id).await? {
                // The Metric type itself is private to containerd-shim-protos.
                let out = resp.metrics.mut_or_insert_default();
                out.timestamp = to_pb_time(m.timestamp);
                out.id = m.id;
                out.data = to_pb_any(m.data);
            }
            encode(&resp)
        }
        _ => Err(Status::unimplemented(format!(
            "/{TTRPC_SERVICE}/{method} is not implemented"
        ))),
    }
}
