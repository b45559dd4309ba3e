use std::time::Duration;

use async_trait::async_trait;

use crate::types::{
    CreateSandbox, Metric, Platform, SandboxExit, SandboxReady, SandboxStatus, UpdateSandbox,
};
use crate::Status;

/// A sandbox controller in the sense of containerd 2.x
/// (`core/sandbox/controller.go`): owns the lifecycle of sandboxes (pods),
/// each keyed by containerd namespace and sandbox id. Both transports call
/// it; namespace and id are never empty here.
#[async_trait]
pub trait Controller: Send + Sync + 'static {
    /// Prepares a sandbox. AlreadyExists if the id is taken in the namespace.
    async fn create(&self, req: CreateSandbox) -> Result<(), Status>;

    /// Starts a created sandbox; it is ready for containers once this returns.
    async fn start(&self, namespace: &str, id: &str) -> Result<SandboxReady, Status>;

    /// The platform containers of the sandbox are built for.
    async fn platform(&self, namespace: &str, id: &str) -> Result<Platform, Status>;

    /// Stops the sandbox, forcibly once `timeout` has passed (`None`: the
    /// controller's choice). Pending `wait` calls then return. NotFound is
    /// tolerated by containerd.
    async fn stop(
        &self,
        namespace: &str,
        id: &str,
        timeout: Option<Duration>,
    ) -> Result<(), Status>;

    /// Blocks until the sandbox has stopped; returns at once if it has. Must
    /// not fail while the sandbox runs: containerd takes any error but
    /// Unavailable as the sandbox's exit. The future is dropped when the
    /// caller goes away or the server shuts down.
    async fn wait(&self, namespace: &str, id: &str) -> Result<SandboxExit, Status>;

    /// The sandbox's state; `verbose` asks for `info`. NotFound makes CRI
    /// report the pod NOTREADY.
    async fn status(
        &self,
        namespace: &str,
        id: &str,
        verbose: bool,
    ) -> Result<SandboxStatus, Status>;

    /// Liveness check (ttrpc `PingSandbox`; containerd 2.1 never sends it).
    async fn ping(&self, namespace: &str, id: &str) -> Result<(), Status> {
        self.status(namespace, id, false).await.map(|_| ())
    }

    /// Releases everything the sandbox holds and forgets it. NotFound is
    /// tolerated by containerd.
    async fn shutdown(&self, namespace: &str, id: &str) -> Result<(), Status>;

    /// A metrics sample, if the controller keeps any.
    async fn metrics(&self, namespace: &str, id: &str) -> Result<Option<Metric>, Status>;

    /// Applies a change to containerd's record of the sandbox (gRPC only).
    async fn update(&self, req: UpdateSandbox) -> Result<(), Status>;
}
