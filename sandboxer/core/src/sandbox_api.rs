//! containerd 2.x's Sandbox API over the daemon's sandboxes: the gRPC
//! sandbox controller of `[proxy_plugins.NAME] type = "sandbox"` (proxy
//! mode) and the ttrpc Sandbox service at a pod's task address (shim mode).
//! In proxy mode Start returns the pod's task address with its scheme and
//! version 3, so containerd 2.1 talks to the Task API directly and runs no
//! shim binary for the pod's containers.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kuasar_protocol::Kind;
use kuasar_sandbox_api::{
    Controller, CreateSandbox, Metric, Platform, SandboxExit, SandboxReady, SandboxStatus, Status,
    UpdateSandbox, STATE_NOTREADY, STATE_READY, TASK_API_VERSION,
};

use crate::backend::{PodConfig, SandboxResources};
use crate::daemon::{Daemon, Sandbox};
use crate::error::Error;

/// The CRI pod config containerd sends as Create's options
/// (`runtime.v1.PodSandboxConfig`): only what the sandbox itself needs.
#[derive(Clone, PartialEq, prost::Message)]
struct PodSandboxConfig {
    #[prost(string, tag = "2")]
    hostname: String,
    #[prost(map = "string, string", tag = "7")]
    annotations: std::collections::HashMap<String, String>,
    #[prost(message, optional, tag = "8")]
    linux: Option<LinuxPodSandboxConfig>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct LinuxPodSandboxConfig {
    /// The pod's resources (the sum of its containers' and the overhead).
    #[prost(message, optional, tag = "5")]
    resources: Option<LinuxContainerResources>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct LinuxContainerResources {
    #[prost(int64, tag = "1")]
    cpu_period: i64,
    #[prost(int64, tag = "2")]
    cpu_quota: i64,
    #[prost(int64, tag = "4")]
    memory_limit_in_bytes: i64,
}

const POD_CONFIG_TYPE: &str = "runtime.v1.PodSandboxConfig";

/// The daemon as a sandbox controller. In shim mode the call came in on a
/// pod's task socket, whose kind it takes; in proxy mode the kind comes
/// from the runtime type containerd records for the pod.
pub struct SandboxController {
    pub daemon: Arc<Daemon>,
    pub socket_kind: Option<Kind>,
}

impl SandboxController {
    fn sandbox(&self, namespace: &str, id: &str) -> Result<Arc<Sandbox>, Status> {
        Ok(self.daemon.sandbox(namespace, id)?)
    }

    fn kind(&self, req: &CreateSandbox) -> Result<Kind, Status> {
        if let Some(kind) = self.socket_kind {
            return Ok(kind);
        }
        let runtime = req
            .sandbox
            .as_ref()
            .map(|s| s.runtime_name.as_str())
            .unwrap_or_default();
        Kind::ALL
            .into_iter()
            .find(|k| k.runtime_type() == runtime)
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "sandbox {}: runtime {runtime:?} is not a kuasar runtime (io.containerd.kuasar{{runc,wasm,vmm}}.v1)",
                    req.id
                ))
            })
    }

    /// The task address containerd dials for the pod's containers.
    fn task_address(&self, sandbox: &Sandbox) -> String {
        match self.socket_kind {
            // Shim mode: containerd has the address from `shim start`.
            Some(_) => String::new(),
            None => format!("ttrpc+{}", sandbox.address),
        }
    }
}

/// What the Sandbox API says of a pod: its config and what it asks for.
fn pod_config(req: &CreateSandbox) -> Result<(PodConfig, SandboxResources), Status> {
    let config = match &req.options {
        Some(any) if any.type_url.ends_with(POD_CONFIG_TYPE) => {
            <PodSandboxConfig as prost::Message>::decode(any.value.as_slice())
                .map_err(|e| Status::invalid_argument(format!("pod config: {e}")))?
        }
        _ => PodSandboxConfig::default(),
    };
    let r = config.linux.and_then(|l| l.resources).unwrap_or_default();
    let resources = SandboxResources {
        annotations: config.annotations,
        memory_limit_bytes: (r.memory_limit_in_bytes > 0).then_some(r.memory_limit_in_bytes as u64),
        cpus: crate::backend::cpus(Some(r.cpu_quota), Some(r.cpu_period.max(0) as u64)),
    };
    let hostname = config.hostname;
    Ok((
        PodConfig {
            netns: (!req.netns_path.is_empty()).then(|| req.netns_path.clone().into()),
            hostname: (!hostname.is_empty()).then_some(hostname),
        },
        resources,
    ))
}

#[async_trait]
impl Controller for SandboxController {
    async fn create(&self, req: CreateSandbox) -> Result<(), Status> {
        let kind = self.kind(&req)?;
        if !req.netns_path.is_empty() {
            crate::ids::validate_path("netns path", &req.netns_path)?;
        }
        let (pod, resources) = pod_config(&req)?;
        let backend = self.daemon.backend(kind)?;
        let sandbox = self
            .daemon
            .sandbox_for_create(&req.namespace, &req.id, kind)
            .await?;
        let mut sreq = self.daemon.sandbox_request(&req.namespace, &req.id);
        sreq.pod = Some(pod);
        sreq.resources = resources;
        if let Err(e) = sandbox.create_backend(backend.as_ref(), sreq).await {
            // A failed Create leaves nothing (in shim mode the socket stays
            // for containerd's ShutdownSandbox and `shim delete`).
            if self.socket_kind.is_none() && !sandbox.is_explicit() {
                let _ = self.daemon.shutdown_sandbox(&req.namespace, &req.id).await;
            }
            return Err(e.into());
        }
        tracing::info!(namespace = %req.namespace, sandbox = %req.id, %kind, "sandbox created");
        Ok(())
    }

    async fn start(&self, namespace: &str, id: &str) -> Result<SandboxReady, Status> {
        let sandbox = self.sandbox(namespace, id)?;
        let pid = sandbox.start().await?;
        Ok(SandboxReady {
            pid,
            created_at: Some(sandbox.view().created_at),
            address: self.task_address(&sandbox),
            version: TASK_API_VERSION,
            labels: Default::default(),
        })
    }

    async fn platform(&self, namespace: &str, id: &str) -> Result<Platform, Status> {
        self.sandbox(namespace, id)?;
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        };
        Ok(Platform {
            os: "linux".into(),
            architecture: architecture.into(),
            ..Default::default()
        })
    }

    async fn stop(&self, namespace: &str, id: &str, _: Option<Duration>) -> Result<(), Status> {
        // CRI stopped the pod's containers already; what is left to stop
        // is what the sandbox itself holds.
        Ok(self.sandbox(namespace, id)?.stop().await?)
    }

    async fn wait(&self, namespace: &str, id: &str) -> Result<SandboxExit, Status> {
        let exit = self.sandbox(namespace, id)?.wait().await;
        Ok(SandboxExit {
            exit_status: exit.status,
            exited_at: Some(exit.at),
        })
    }

    async fn status(
        &self,
        namespace: &str,
        id: &str,
        verbose: bool,
    ) -> Result<SandboxStatus, Status> {
        let sandbox = self.sandbox(namespace, id)?;
        let view = sandbox.view();
        let mut info = std::collections::HashMap::new();
        if verbose {
            let detail = serde_json::json!({
                "kind": sandbox.kind.as_str(),
                "address": sandbox.address,
                "pid": view.pid,
            });
            info.insert("info".to_string(), detail.to_string());
        }
        Ok(SandboxStatus {
            pid: view.pid,
            state: if view.ready {
                STATE_READY
            } else {
                STATE_NOTREADY
            }
            .into(),
            info,
            created_at: Some(view.created_at),
            exited_at: view.exit.map(|e| e.at),
            extra: None,
            address: self.task_address(&sandbox),
            version: TASK_API_VERSION,
        })
    }

    async fn shutdown(&self, namespace: &str, id: &str) -> Result<(), Status> {
        Ok(self.daemon.shutdown_sandbox(namespace, id).await?)
    }

    async fn metrics(&self, namespace: &str, id: &str) -> Result<Option<Metric>, Status> {
        let sandbox = self.sandbox(namespace, id)?;
        let Some(backend) = sandbox.backend() else {
            return Ok(None);
        };
        Ok(backend.metrics().await?.map(|any| Metric {
            timestamp: Some(std::time::SystemTime::now()),
            id: id.into(),
            data: Some(kuasar_sandbox_api::Any {
                type_url: any.type_url,
                value: any.value,
            }),
        }))
    }

    async fn update(&self, req: UpdateSandbox) -> Result<(), Status> {
        // containerd keeps the record; nothing of the running pod changes.
        self.sandbox(&req.namespace, &req.id)?;
        Ok(())
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        Status::new(e.code(), e.to_string())
    }
}

/// Serves the gRPC sandbox controller on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::UnixListener,
    daemon: Arc<Daemon>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let controller = Arc::new(SandboxController {
        daemon,
        socket_kind: None,
    });
    if let Err(e) = kuasar_sandbox_api::serve_controller(listener, controller, shutdown).await {
        tracing::error!("sandbox controller socket: {e}");
    }
}

#[cfg(test)]
mod tests {
    use kuasar_sandbox_api::{Code, SandboxRecord};

    use super::*;
    use crate::backend::fake::FakeBackend;
    use crate::config::Config;

    fn controller(dir: &std::path::Path) -> SandboxController {
        let config = Config {
            root: dir.join("k"),
            ..Config::default()
        };
        let daemon = Daemon::new(
            config,
            kuasar_host::reaper::Reaper::new(),
            vec![Arc::new(FakeBackend)],
        )
        .unwrap();
        SandboxController {
            daemon,
            socket_kind: None,
        }
    }

    fn create(id: &str, runtime: &str) -> CreateSandbox {
        CreateSandbox {
            namespace: "k8s.io".into(),
            id: id.into(),
            sandbox: Some(SandboxRecord {
                runtime_name: runtime.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_proxied_pod_gets_its_task_address_with_scheme_and_version_3_and_goes_on_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let c = controller(dir.path());
        c.create(create("pod", "io.containerd.kuasarrunc.v1"))
            .await
            .unwrap();
        let ready = c.start("k8s.io", "pod").await.unwrap();
        assert!(
            ready.address.starts_with("ttrpc+unix:///"),
            "{}",
            ready.address
        );
        assert_eq!(ready.version, 3);
        let socket = ready
            .address
            .trim_start_matches("ttrpc+unix://")
            .to_string();
        assert!(std::path::Path::new(&socket).exists());
        let st = c.status("k8s.io", "pod", true).await.unwrap();
        assert_eq!(
            (st.state.as_str(), st.address),
            (STATE_READY, ready.address)
        );
        assert_eq!(c.platform("k8s.io", "pod").await.unwrap().os, "linux");
        c.stop("k8s.io", "pod", None).await.unwrap();
        assert_eq!(c.wait("k8s.io", "pod").await.unwrap().exit_status, 0);
        assert_eq!(
            c.status("k8s.io", "pod", false).await.unwrap().state,
            STATE_NOTREADY
        );
        c.shutdown("k8s.io", "pod").await.unwrap();
        assert!(!std::path::Path::new(&socket).exists());
        let gone = c.status("k8s.io", "pod", false).await.unwrap_err();
        assert_eq!(gone.code, Code::NotFound);
    }

    #[tokio::test]
    async fn bad_sandbox_api_calls_get_clear_codes_and_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let c = controller(dir.path());
        for call in [
            c.start("k8s.io", "nope").await.map(|_| ()),
            c.stop("k8s.io", "nope", None).await,
            c.shutdown("k8s.io", "nope").await,
            c.wait("k8s.io", "nope").await.map(|_| ()),
        ] {
            assert_eq!(call.unwrap_err().code, Code::NotFound);
        }
        let e = c
            .create(create("pod", "io.containerd.runc.v2"))
            .await
            .unwrap_err();
        assert_eq!(e.code, Code::InvalidArgument);
        let e = c
            .create(create("../x", "io.containerd.kuasarrunc.v1"))
            .await
            .unwrap_err();
        assert_eq!(e.code, Code::InvalidArgument);
        c.create(create("pod", "io.containerd.kuasarrunc.v1"))
            .await
            .unwrap();
        let e = c
            .create(create("pod", "io.containerd.kuasarrunc.v1"))
            .await
            .unwrap_err();
        assert_eq!(e.code, Code::AlreadyExists);
        // The pod made first is untouched by the refused second Create.
        assert!(c.start("k8s.io", "pod").await.is_ok());
        c.shutdown("k8s.io", "pod").await.unwrap();
        let sockets: Vec<_> = std::fs::read_dir(dir.path().join("k/t")).unwrap().collect();
        assert!(sockets.is_empty(), "{sockets:?}");
    }

    #[tokio::test]
    async fn sandbox_create_refuses_bad_namespaces_and_netns_paths_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let c = controller(dir.path());
        let mut bad_ns = create("pod", "io.containerd.kuasarrunc.v1");
        bad_ns.namespace = "../etc".into();
        let mut cases = vec![("namespace", bad_ns)];
        for netns in ["netns/cni-1", "/var/run/netns/../../proc/1/ns/net", "/a\0b"] {
            let mut req = create("pod", "io.containerd.kuasarrunc.v1");
            req.netns_path = netns.into();
            cases.push(("netns path", req));
        }
        for (what, req) in cases {
            let e = c.create(req).await.unwrap_err();
            assert_eq!(e.code, Code::InvalidArgument, "{e:?}");
            assert!(e.message.contains(what), "{}", e.message);
        }
        let e = c.status("k8s.io", "pod", false).await.unwrap_err();
        assert_eq!(e.code, Code::NotFound);
        let sockets: Vec<_> = std::fs::read_dir(dir.path().join("k/t")).unwrap().collect();
        assert!(sockets.is_empty(), "{sockets:?}");
    }
}
