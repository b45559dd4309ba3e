//! The gRPC `containerd.services.sandbox.v1.Controller` service a containerd
//! 2.x `[proxy_plugins.NAME] type = "sandbox"` dials.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response};

use crate::convert::*;
use crate::proto::containerd::services::sandbox::v1 as api;
use crate::proto::containerd::types as grpc_types;
use crate::types::{CreateSandbox, UpdateSandbox};
use crate::{Controller, Status};

/// gRPC metadata key containerd puts the namespace of every call under
/// (`pkg/namespaces/grpc.go`).
pub const NAMESPACE_HEADER: &str = "containerd-namespace";

/// The largest request accepted, as containerd's own gRPC servers; a
/// longer one is refused from its length prefix, before it is buffered.
pub const MAX_MESSAGE: usize = 4 << 20;

/// Serves the sandbox controller on `listener` until `shutdown` completes.
/// Only peers whose uid is in `allowed_uids` are served; any other gets
/// PermissionDenied before its request is read. On `shutdown` it stops
/// accepting, answers pending Wait calls with Unavailable (the proxy retries
/// those, so a restarted daemon picks them up), and returns once the
/// remaining calls have been answered.
pub async fn serve_controller(
    listener: UnixListener,
    controller: Arc<dyn Controller>,
    allowed_uids: Vec<u32>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let (closing_tx, closing) = watch::channel(false);
    let service = api::controller_server::ControllerServer::new(GrpcController {
        controller,
        closing,
    })
    .max_decoding_message_size(MAX_MESSAGE);
    let service = InterceptedService::new(service, move |req: Request<()>| {
        check_peer(&req, &allowed_uids)?;
        Ok(req)
    });
    let signal = async move {
        shutdown.await;
        let _ = closing_tx.send(true);
    };
    tonic::transport::Server::builder()
        .serve_with_incoming_shutdown(service, UnixListenerStream::new(listener), signal)
        .await
        .map_err(io::Error::other)
}

/// Refuses a peer whose uid is not allowed (or unknown).
fn check_peer(req: &Request<()>, allowed_uids: &[u32]) -> Result<(), tonic::Status> {
    let uid = req
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|info| info.peer_cred)
        .map(|cred| cred.uid());
    match uid {
        Some(uid) if allowed_uids.contains(&uid) => Ok(()),
        Some(uid) => Err(tonic::Status::permission_denied(format!(
            "uid {uid} may not use the kuasar sandbox controller"
        ))),
        None => Err(tonic::Status::permission_denied(
            "the peer's credentials are unknown",
        )),
    }
}

struct GrpcController {
    controller: Arc<dyn Controller>,
    closing: watch::Receiver<bool>,
}

/// The namespace of the call and the sandbox id, both required.
fn target<T>(req: &Request<T>, sandbox_id: &str) -> Result<(String, String), Status> {
    let namespace = req
        .metadata()
        .get(NAMESPACE_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if namespace.is_empty() {
        return Err(Status::invalid_argument(format!(
            "{NAMESPACE_HEADER} metadata is required"
        )));
    }
    if sandbox_id.is_empty() {
        return Err(Status::invalid_argument("sandbox_id is required"));
    }
    Ok((namespace.to_string(), sandbox_id.to_string()))
}

type GrpcResult<T> = Result<Response<T>, tonic::Status>;

#[tonic::async_trait]
impl api::controller_server::Controller for GrpcController {
    async fn create(
        &self,
        req: Request<api::ControllerCreateRequest>,
    ) -> GrpcResult<api::ControllerCreateResponse> {
        let (namespace, id) = target(&req, &req.get_ref().sandbox_id)?;
        let r = req.into_inner();
        self.controller
            .create(CreateSandbox {
                namespace,
                id: id.clone(),
                rootfs: r.rootfs.into_iter().map(from_grpc_mount).collect(),
                options: r.options.map(from_prost_any),
                netns_path: r.netns_path,
                annotations: r.annotations,
                sandbox: r.sandbox.map(from_grpc_sandbox),
                sandboxer: r.sandboxer,
                bundle_path: String::new(),
            })
            .await?;
        Ok(Response::new(api::ControllerCreateResponse {
            sandbox_id: id,
        }))
    }

    async fn start(
        &self,
        req: Request<api::ControllerStartRequest>,
    ) -> GrpcResult<api::ControllerStartResponse> {
        let (namespace, id) = target(&req, &req.get_ref().sandbox_id)?;
        let ready = self.controller.start(&namespace, &id).await?;
        Ok(Response::new(api::ControllerStartResponse {
            sandbox_id: id,
            pid: ready.pid,
            created_at: to_prost_time(ready.created_at),
            labels: ready.labels,
            address: ready.address,
            version: ready.version,
        }))
    }

    async fn platform(
        &self,
        req: Request<api::ControllerPlatformRequest>,
    ) -> GrpcResult<api::ControllerPlatformResponse> {
        let (namespace, id) = target(&req, &req.get_ref().sandbox_id)?;
        let platform = self.controller.platform(&namespace, &id).await?;
        Ok(Response::new(api::ControllerPlatformResponse {
            platform: Some(to_grpc_platform(platform)),
        }))
    }

    async fn stop(
        &self,
        req: Request<api::ControllerStopRequest>,
    ) -> GrpcResult<api::ControllerStopResponse> {
        let (namespace, id) = target(&req, &req.get_ref().sandbox_id)?;
        // containerd sends 0 when it gives no timeout.
        let timeout = match req.get_ref().timeout_secs {
            0 => None,
            s => Some(Duration::from_secs(s.into())),
        };
        self.controller.stop(&namespace, &id, timeout).await?;
        Ok(Response::new(api::ControllerStopResponse {}))
    }

    async fn wait(
        &self,
        req: Request<api::ControllerWaitRequest>,
    ) -> GrpcResult<api::ControllerWaitResponse> {
        let (namespace, id) = target(&req, &req.get_ref().sandbox_id)?;
        let mut closing = self.closing.clone();
        let exit = tokio::select! {
            r = self.controller.wait(&namespace, &id) => r?,
            _ = closing.wait_for(|c| *c) => {
                return Err(Status::unavailable("sandboxer shutting down").into())
            }
        };
        Ok(Response::new(api::ControllerWaitResponse {
            exit_status: exit.exit_status,
            exited_at: to_prost_time(exit.exited_at),
        }))
    }

    async fn status(
        &self,
        req: Request<api::ControllerStatusRequest>,
    ) -> GrpcResult<api::ControllerStatusResponse> {
        let (namespace, id) = target(&req, &req.get_ref().sandbox_id)?;
        let s = self
            .controller
            .status(&namespace, &id, req.get_ref().verbose)
            .await?;
        Ok(Response::new(api::ControllerStatusResponse {
            sandbox_id: id,
            pid: s.pid,
            state: s.state,
            info: s.info,
            created_at: to_prost_time(s.created_at),
            exited_at: to_prost_time(s.exited_at),
            extra: s.extra.map(to_prost_any),
            address: s.address,
            version: s.version,
        }))
    }

    async fn shutdown(
        &self,
        req: Request<api::ControllerShutdownRequest>,
    ) -> GrpcResult<api::ControllerShutdownResponse> {
        let (namespace, id) = target(&req, &req.get_ref().sandbox_id)?;
        self.controller.shutdown(&namespace, &id).await?;
        Ok(Response::new(api::ControllerShutdownResponse {}))
    }

    async fn metrics(
        &self,
        req: Request<api::ControllerMetricsRequest>,
    ) -> GrpcResult<api::ControllerMetricsResponse> {
        let (namespace, id) = target(&req, &req.get_ref().sandbox_id)?;
        let metric = self.controller.metrics(&namespace, &id).await?;
        Ok(Response::new(api::ControllerMetricsResponse {
            metrics: metric.map(|m| grpc_types::Metric {
                timestamp: to_prost_time(m.timestamp),
                id: m.id,
                data: m.data.map(to_prost_any),
            }),
        }))
    }

    async fn update(
        &self,
        req: Request<api::ControllerUpdateRequest>,
    ) -> GrpcResult<api::ControllerUpdateResponse> {
        let (namespace, id) = target(&req, &req.get_ref().sandbox_id)?;
        let r = req.into_inner();
        self.controller
            .update(UpdateSandbox {
                namespace,
                id,
                sandbox: r.sandbox.map(from_grpc_sandbox),
                fields: r.fields,
            })
            .await?;
        Ok(Response::new(api::ControllerUpdateResponse {}))
    }
}
