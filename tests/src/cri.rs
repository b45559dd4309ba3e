//! A synchronous CRI v1 client (tonic code generated from k8s.io/cri-api's
//! api.proto by build.rs), so that tests read like kubelet's calls:
//! `cri.run_pod_sandbox(&cfg, "kuasar-runc")`. Each client owns a tokio
//! current-thread runtime; threads that talk CRI at once make a client each.

use std::path::Path;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tonic::Status;

pub mod api {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("runtime.v1");
}

use api::image_service_client::ImageServiceClient;
use api::runtime_service_client::RuntimeServiceClient;
use api::*;

/// What a call may take unless it says otherwise: RunPodSandbox and
/// PullImage are the slow ones, a few seconds here.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

pub type Result<T> = std::result::Result<T, Status>;

pub struct Cri {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    image: ImageServiceClient<Channel>,
}

impl Cri {
    /// A client of the CRI plugin on containerd's gRPC socket.
    pub fn connect(socket: &Path) -> std::result::Result<Cri, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let channel = rt
            .block_on(async {
                Endpoint::from_shared(format!("unix://{}", socket.display()))?
                    .connect_timeout(Duration::from_secs(5))
                    .connect()
                    .await
            })
            .map_err(|e| format!("connecting to {}: {e}", socket.display()))?;
        Ok(Cri {
            rt,
            runtime: RuntimeServiceClient::new(channel.clone()),
            image: ImageServiceClient::new(channel),
        })
    }

    /// Runs one call with a deadline, sent to the server as well.
    fn call<T, F>(&self, timeout: Duration, f: F) -> Result<T>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>>>,
    {
        self.rt.block_on(async {
            match tokio::time::timeout(timeout, f).await {
                Ok(r) => r.map(tonic::Response::into_inner),
                Err(_) => Err(Status::deadline_exceeded(format!(
                    "no answer within {timeout:?}"
                ))),
            }
        })
    }

    fn req<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(timeout);
        r
    }

    pub fn version(&self) -> Result<VersionResponse> {
        let mut c = self.runtime.clone();
        self.call(CALL_TIMEOUT, async move {
            c.version(Self::req(VersionRequest::default(), CALL_TIMEOUT))
                .await
        })
    }

    /// The runtime's conditions (RuntimeReady, NetworkReady).
    pub fn status(&self) -> Result<StatusResponse> {
        let mut c = self.runtime.clone();
        self.call(CALL_TIMEOUT, async move {
            c.status(Self::req(StatusRequest::default(), CALL_TIMEOUT))
                .await
        })
    }

    /// RunPodSandbox through `handler` (a runtime name of containerd's CRI
    /// config); returns the pod sandbox id.
    pub fn run_pod_sandbox(&self, config: &PodSandboxConfig, handler: &str) -> Result<String> {
        let mut c = self.runtime.clone();
        let msg = RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.into(),
        };
        self.call(CALL_TIMEOUT, async move {
            c.run_pod_sandbox(Self::req(msg, CALL_TIMEOUT)).await
        })
        .map(|r| r.pod_sandbox_id)
    }

    pub fn stop_pod_sandbox(&self, id: &str) -> Result<()> {
        let mut c = self.runtime.clone();
        let msg = StopPodSandboxRequest {
            pod_sandbox_id: id.into(),
        };
        self.call(CALL_TIMEOUT, async move {
            c.stop_pod_sandbox(Self::req(msg, CALL_TIMEOUT)).await
        })
        .map(drop)
    }

    pub fn remove_pod_sandbox(&self, id: &str) -> Result<()> {
        let mut c = self.runtime.clone();
        let msg = RemovePodSandboxRequest {
            pod_sandbox_id: id.into(),
        };
        self.call(CALL_TIMEOUT, async move {
            c.remove_pod_sandbox(Self::req(msg, CALL_TIMEOUT)).await
        })
        .map(drop)
    }

    pub fn pod_sandbox_status(&self, id: &str) -> Result<PodSandboxStatus> {
        let mut c = self.runtime.clone();
        let msg = PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: false,
        };
        self.call(CALL_TIMEOUT, async move {
            c.pod_sandbox_status(Self::req(msg, CALL_TIMEOUT)).await
        })
        .and_then(|r| r.status.ok_or_else(|| Status::internal("no status")))
    }

    pub fn list_pod_sandbox(&self) -> Result<Vec<PodSandbox>> {
        let mut c = self.runtime.clone();
        self.call(CALL_TIMEOUT, async move {
            c.list_pod_sandbox(Self::req(ListPodSandboxRequest::default(), CALL_TIMEOUT))
                .await
        })
        .map(|r| r.items)
    }

    /// CreateContainer in pod `pod_id` (whose config is `pod`); returns the
    /// container id.
    pub fn create_container(
        &self,
        pod_id: &str,
        config: &ContainerConfig,
        pod: &PodSandboxConfig,
    ) -> Result<String> {
        let mut c = self.runtime.clone();
        let msg = CreateContainerRequest {
            pod_sandbox_id: pod_id.into(),
            config: Some(config.clone()),
            sandbox_config: Some(pod.clone()),
        };
        self.call(CALL_TIMEOUT, async move {
            c.create_container(Self::req(msg, CALL_TIMEOUT)).await
        })
        .map(|r| r.container_id)
    }

    pub fn start_container(&self, id: &str) -> Result<()> {
        let mut c = self.runtime.clone();
        let msg = StartContainerRequest {
            container_id: id.into(),
        };
        self.call(CALL_TIMEOUT, async move {
            c.start_container(Self::req(msg, CALL_TIMEOUT)).await
        })
        .map(drop)
    }

    /// StopContainer: SIGTERM (the image's stop signal), SIGKILL after
    /// `grace_secs`.
    pub fn stop_container(&self, id: &str, grace_secs: i64) -> Result<()> {
        let mut c = self.runtime.clone();
        let msg = StopContainerRequest {
            container_id: id.into(),
            timeout: grace_secs,
        };
        self.call(CALL_TIMEOUT, async move {
            c.stop_container(Self::req(msg, CALL_TIMEOUT)).await
        })
        .map(drop)
    }

    pub fn remove_container(&self, id: &str) -> Result<()> {
        let mut c = self.runtime.clone();
        let msg = RemoveContainerRequest {
            container_id: id.into(),
        };
        self.call(CALL_TIMEOUT, async move {
            c.remove_container(Self::req(msg, CALL_TIMEOUT)).await
        })
        .map(drop)
    }

    pub fn list_containers(&self, pod_id: Option<&str>) -> Result<Vec<Container>> {
        let mut c = self.runtime.clone();
        let msg = ListContainersRequest {
            filter: pod_id.map(|p| ContainerFilter {
                pod_sandbox_id: p.into(),
                ..Default::default()
            }),
        };
        self.call(CALL_TIMEOUT, async move {
            c.list_containers(Self::req(msg, CALL_TIMEOUT)).await
        })
        .map(|r| r.containers)
    }

    pub fn container_status(&self, id: &str) -> Result<ContainerStatus> {
        self.container_status_verbose(id, false).map(|(s, _)| s)
    }

    /// ContainerStatus with the runtime's verbose info (its `info` JSON has
    /// the task's pid, the OCI spec, ...).
    pub fn container_status_verbose(
        &self,
        id: &str,
        verbose: bool,
    ) -> Result<(ContainerStatus, std::collections::HashMap<String, String>)> {
        let mut c = self.runtime.clone();
        let msg = ContainerStatusRequest {
            container_id: id.into(),
            verbose,
        };
        self.call(CALL_TIMEOUT, async move {
            c.container_status(Self::req(msg, CALL_TIMEOUT)).await
        })
        .and_then(|r| match r.status {
            Some(s) => Ok((s, r.info)),
            None => Err(Status::internal("no status")),
        })
    }

    pub fn update_container_resources(
        &self,
        id: &str,
        linux: LinuxContainerResources,
    ) -> Result<()> {
        let mut c = self.runtime.clone();
        let msg = UpdateContainerResourcesRequest {
            container_id: id.into(),
            linux: Some(linux),
            ..Default::default()
        };
        self.call(CALL_TIMEOUT, async move {
            c.update_container_resources(Self::req(msg, CALL_TIMEOUT))
                .await
        })
        .map(drop)
    }

    /// ExecSync of `cmd` in container `id`, which the runtime must end
    /// after `timeout_secs` (0: no limit).
    pub fn exec_sync(&self, id: &str, cmd: &[&str], timeout_secs: i64) -> Result<ExecSyncResponse> {
        let mut c = self.runtime.clone();
        let msg = ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: timeout_secs,
        };
        self.call(CALL_TIMEOUT, async move {
            c.exec_sync(Self::req(msg, CALL_TIMEOUT)).await
        })
    }

    pub fn container_stats(&self, id: &str) -> Result<ContainerStats> {
        let mut c = self.runtime.clone();
        let msg = ContainerStatsRequest {
            container_id: id.into(),
        };
        self.call(CALL_TIMEOUT, async move {
            c.container_stats(Self::req(msg, CALL_TIMEOUT)).await
        })
        .and_then(|r| r.stats.ok_or_else(|| Status::internal("no stats")))
    }

    pub fn list_container_stats(&self) -> Result<Vec<ContainerStats>> {
        let mut c = self.runtime.clone();
        self.call(CALL_TIMEOUT, async move {
            c.list_container_stats(Self::req(
                ListContainerStatsRequest::default(),
                CALL_TIMEOUT,
            ))
            .await
        })
        .map(|r| r.stats)
    }

    /// PullImage; returns the image reference (its id) the runtime reports.
    pub fn pull_image(&self, image: &str, pod: Option<&PodSandboxConfig>) -> Result<String> {
        let mut c = self.image.clone();
        let msg = PullImageRequest {
            image: Some(ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            auth: None,
            sandbox_config: pod.cloned(),
        };
        self.call(CALL_TIMEOUT, async move {
            c.pull_image(Self::req(msg, CALL_TIMEOUT)).await
        })
        .map(|r| r.image_ref)
    }

    /// ImageStatus: `None` when the runtime does not have the image.
    pub fn image_status(&self, image: &str) -> Result<Option<Image>> {
        let mut c = self.image.clone();
        let msg = ImageStatusRequest {
            image: Some(ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            verbose: false,
        };
        self.call(CALL_TIMEOUT, async move {
            c.image_status(Self::req(msg, CALL_TIMEOUT)).await
        })
        .map(|r| r.image)
    }
}
