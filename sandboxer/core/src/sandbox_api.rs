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
    let allowed_uids = controller.daemon.config.allowed_uids.clone();
    if let Err(e) =
        kuasar_sandbox_api::serve_controller(listener, controller, allowed_uids, shutdown).await
    {
        tracing::error!("sandbox controller socket: {e}");
    }
}

#[cfg(test)]
mod tests {
    use kuasar_sandbox_api::{Code, SandboxRecord};

    use super::*;

    fn controller(dir: &std::path::Path) -> SandboxController {
        let daemon = crate::backend::fake::daemon(&dir.join("k"));
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

    mod grpc {
        use std::os::unix::fs::PermissionsExt;
        use std::sync::Arc;

        use kuasar_sandbox_api::proto::containerd::services::sandbox::v1 as api;
        use kuasar_sandbox_api::NAMESPACE_HEADER;
        use tonic::codegen::http::uri::PathAndQuery;
        use tonic::transport::{Channel, Endpoint};
        use tonic_prost::ProstCodec;

        use crate::control::tests::{connect_as_nobody, open_up, refused_by_its_mode};
        use crate::daemon::Daemon;

        struct Fixture {
            dir: tempfile::TempDir,
            daemon: Arc<Daemon>,
            socket: std::path::PathBuf,
        }

        /// The daemon's sandbox controller on a socket bound as the daemon
        /// binds it.
        fn fixture() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let daemon = crate::backend::fake::daemon(&dir.path().join("k"));
            let socket = dir.path().join("run/sandbox.sock");
            let listener = crate::control::bind(&socket).unwrap();
            tokio::spawn(super::super::serve(
                listener,
                daemon.clone(),
                std::future::pending(),
            ));
            Fixture {
                dir,
                daemon,
                socket,
            }
        }

        async fn channel(path: &std::path::Path) -> Channel {
            Endpoint::from_shared(format!("unix://{}", path.display()))
                .unwrap()
                .connect()
                .await
                .unwrap()
        }

        async fn call<Q, R>(ch: &Channel, method: &str, req: Q) -> Result<R, tonic::Status>
        where
            Q: prost::Message + 'static,
            R: prost::Message + Default + 'static,
        {
            let mut grpc = tonic::client::Grpc::new(ch.clone());
            grpc.ready()
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            let mut req = tonic::Request::new(req);
            req.metadata_mut()
                .insert(NAMESPACE_HEADER, "k8s.io".parse().unwrap());
            let path = PathAndQuery::from_maybe_shared(format!(
                "/containerd.services.sandbox.v1.Controller/{method}"
            ))
            .unwrap();
            grpc.unary(req, path, ProstCodec::default())
                .await
                .map(|r| r.into_inner())
        }

        fn create(id: &str) -> api::ControllerCreateRequest {
            api::ControllerCreateRequest {
                sandbox_id: id.into(),
                sandbox: Some(kuasar_sandbox_api::proto::containerd::types::Sandbox {
                    sandbox_id: id.into(),
                    runtime: Some(
                        kuasar_sandbox_api::proto::containerd::types::sandbox::Runtime {
                            name: "io.containerd.kuasarrunc.v1".into(),
                            options: None,
                        },
                    ),
                    ..Default::default()
                }),
                ..Default::default()
            }
        }

        /// A root-only socket whose one connection is relayed over
        /// `conn`, so that a gRPC client in this process speaks with the
        /// credentials `conn` was made with.
        async fn relay(dir: &std::path::Path, conn: std::os::unix::net::UnixStream) -> Channel {
            let path = dir.join("relay.sock");
            let listener = tokio::net::UnixListener::bind(&path).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            conn.set_nonblocking(true).unwrap();
            let mut conn = tokio::net::UnixStream::from_std(conn).unwrap();
            tokio::spawn(async move {
                let (mut client, _) = listener.accept().await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut client, &mut conn).await;
            });
            channel(&path).await
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_peer_of_another_uid_is_refused_by_the_socket_mode_and_by_its_credentials() {
            let f = fixture();
            refused_by_its_mode(&f.socket).await;
            open_up(f.dir.path(), &f.socket);
            let socket = f.socket.clone();
            let conn = tokio::task::spawn_blocking(move || connect_as_nobody(&socket))
                .await
                .unwrap()
                .unwrap();
            let nobody = relay(f.dir.path(), conn).await;
            for method in ["Create", "Platform"] {
                let err = call::<_, api::ControllerCreateResponse>(&nobody, method, create("pod"))
                    .await
                    .unwrap_err();
                assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
                assert!(err.message().contains("uid 65534"), "{err:?}");
            }
            assert!(f.daemon.sandbox("k8s.io", "pod").is_err());
            // Root is served on the same socket.
            let root = channel(&f.socket).await;
            call::<_, api::ControllerCreateResponse>(&root, "Create", create("pod"))
                .await
                .unwrap();
            assert!(f.daemon.sandbox("k8s.io", "pod").is_ok());
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn an_oversized_request_is_refused_and_the_controller_serves_on() {
            let f = fixture();
            let ch = channel(&f.socket).await;
            let mut big = create("pod");
            big.annotations
                .insert("filler".into(), "x".repeat(kuasar_sandbox_api::MAX_MESSAGE));
            let err = call::<_, api::ControllerCreateResponse>(&ch, "Create", big)
                .await
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
            assert!(f.daemon.sandbox("k8s.io", "pod").is_err());
            call::<_, api::ControllerCreateResponse>(&ch, "Create", create("pod"))
                .await
                .unwrap();
            assert!(f.daemon.sandbox("k8s.io", "pod").is_ok());
        }
    }
}
