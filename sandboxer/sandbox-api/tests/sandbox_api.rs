//! Both transports against a fake controller: gRPC through a real unix
//! socket with a tonic client, ttrpc through `handle_ttrpc` with the
//! containerd-shim-protos messages containerd's shim-mode client sends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use kuasar_sandbox_api::proto::containerd::services::sandbox::v1 as api;
use kuasar_sandbox_api::proto::containerd::types as pb;
use kuasar_sandbox_api::*;

// ---------------------------------------------------------------- the fake

#[derive(Clone, Debug, PartialEq)]
enum Call {
    Create(CreateSandbox),
    Start(String, String),
    Platform(String, String),
    Stop(String, String, Option<Duration>),
    Wait(String, String),
    Status(String, String, bool),
    Ping(String, String),
    Shutdown(String, String),
    Metrics(String, String),
    Update(UpdateSandbox),
}

/// Sandbox `missing` is NotFound everywhere, creating `taken` is
/// AlreadyExists, waiting on `forever` never returns; every other call
/// succeeds with the canned replies below.
#[derive(Default)]
struct Fake {
    calls: Mutex<Vec<Call>>,
}

impl Fake {
    fn record(&self, id: &str, call: Call) -> Result<(), Status> {
        self.calls.lock().unwrap().push(call);
        if id == "missing" {
            return Err(Status::not_found(format!("sandbox {id} not found")));
        }
        Ok(())
    }

    fn last(&self) -> Call {
        self.calls.lock().unwrap().last().cloned().expect("a call")
    }
}

fn at(secs: u64, nanos: u32) -> SystemTime {
    UNIX_EPOCH + Duration::new(secs, nanos)
}

fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

const ADDRESS: &str = "ttrpc+unix:///run/kuasar/s/k8s.io/pod1.sock";

fn ready() -> SandboxReady {
    SandboxReady {
        pid: 4242,
        created_at: Some(at(1_700_000_000, 5)),
        address: ADDRESS.into(),
        version: TASK_API_VERSION,
        labels: labels(&[("selinux_label", "system_u:system_r:container_t:s0")]),
    }
}

fn platform() -> Platform {
    Platform {
        os: "linux".into(),
        architecture: "amd64".into(),
        variant: String::new(),
        os_version: String::new(),
    }
}

fn exit() -> SandboxExit {
    SandboxExit {
        exit_status: 137,
        exited_at: Some(at(1_700_000_100, 7)),
    }
}

fn status() -> SandboxStatus {
    SandboxStatus {
        pid: 4242,
        state: STATE_READY.into(),
        info: labels(&[("info", "{\"pid\":4242}")]),
        created_at: Some(at(1_700_000_000, 5)),
        exited_at: None,
        extra: Some(Any {
            type_url: "kuasar.Extra".into(),
            value: vec![1, 2, 3],
        }),
        address: ADDRESS.into(),
        version: TASK_API_VERSION,
    }
}

fn metric() -> Metric {
    Metric {
        timestamp: Some(at(1_700_000_050, 0)),
        id: "pod1".into(),
        data: Some(Any {
            type_url: "io.containerd.cgroups.v1.Metrics".into(),
            value: vec![9],
        }),
    }
}

#[async_trait]
impl Controller for Fake {
    async fn create(&self, req: CreateSandbox) -> Result<(), Status> {
        let id = req.id.clone();
        self.record(&id, Call::Create(req))?;
        if id == "taken" {
            return Err(Status::already_exists(format!("sandbox {id} exists")));
        }
        Ok(())
    }

    async fn start(&self, ns: &str, id: &str) -> Result<SandboxReady, Status> {
        self.record(id, Call::Start(ns.into(), id.into()))?;
        Ok(ready())
    }

    async fn platform(&self, ns: &str, id: &str) -> Result<Platform, Status> {
        self.record(id, Call::Platform(ns.into(), id.into()))?;
        Ok(platform())
    }

    async fn stop(&self, ns: &str, id: &str, timeout: Option<Duration>) -> Result<(), Status> {
        self.record(id, Call::Stop(ns.into(), id.into(), timeout))
    }

    async fn wait(&self, ns: &str, id: &str) -> Result<SandboxExit, Status> {
        self.record(id, Call::Wait(ns.into(), id.into()))?;
        if id == "forever" {
            std::future::pending::<()>().await;
        }
        Ok(exit())
    }

    async fn status(&self, ns: &str, id: &str, verbose: bool) -> Result<SandboxStatus, Status> {
        self.record(id, Call::Status(ns.into(), id.into(), verbose))?;
        Ok(status())
    }

    async fn ping(&self, ns: &str, id: &str) -> Result<(), Status> {
        self.record(id, Call::Ping(ns.into(), id.into()))
    }

    async fn shutdown(&self, ns: &str, id: &str) -> Result<(), Status> {
        self.record(id, Call::Shutdown(ns.into(), id.into()))
    }

    async fn metrics(&self, ns: &str, id: &str) -> Result<Option<Metric>, Status> {
        self.record(id, Call::Metrics(ns.into(), id.into()))?;
        Ok(Some(metric()))
    }

    async fn update(&self, req: UpdateSandbox) -> Result<(), Status> {
        let id = req.id.clone();
        self.record(&id, Call::Update(req))
    }
}

// ---------------------------------------------------------------- gRPC

mod proxy {
    use super::*;

    use tokio::net::UnixListener;
    use tokio::sync::oneshot;
    use tonic::codegen::http::uri::PathAndQuery;
    use tonic::transport::{Channel, Endpoint};
    use tonic_prost::ProstCodec;

    struct Server {
        fake: Arc<Fake>,
        channel: Channel,
        stop: Option<oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<std::io::Result<()>>,
        _dir: tempfile::TempDir,
    }

    async fn server() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sandboxer.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let fake = Arc::new(Fake::default());
        let (stop, stopped) = oneshot::channel::<()>();
        // This process's uid: the owner of the directory it just made.
        let uid = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(dir.path()).unwrap());
        let task = tokio::spawn(serve_controller(
            listener,
            fake.clone(),
            vec![uid],
            async move {
                let _ = stopped.await;
            },
        ));
        let channel = Endpoint::from_shared(format!("unix://{}", path.display()))
            .unwrap()
            .connect()
            .await
            .unwrap();
        Server {
            fake,
            channel,
            stop: Some(stop),
            task,
            _dir: dir,
        }
    }

    /// One unary call the way containerd's proxy makes it.
    async fn call<Q, R>(
        ch: &Channel,
        namespace: Option<&str>,
        method: &str,
        req: Q,
    ) -> Result<R, tonic::Status>
    where
        Q: prost::Message + 'static,
        R: prost::Message + Default + 'static,
    {
        let mut grpc = tonic::client::Grpc::new(ch.clone());
        grpc.ready()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let mut req = tonic::Request::new(req);
        if let Some(ns) = namespace {
            req.metadata_mut()
                .insert(NAMESPACE_HEADER, ns.parse().unwrap());
        }
        let path = PathAndQuery::from_maybe_shared(format!(
            "/containerd.services.sandbox.v1.Controller/{method}"
        ))
        .unwrap();
        grpc.unary(req, path, ProstCodec::default())
            .await
            .map(|r| r.into_inner())
    }

    fn ts(secs: i64, nanos: i32) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp {
            seconds: secs,
            nanos,
        })
    }

    fn pany(type_url: &str, value: &[u8]) -> prost_types::Any {
        prost_types::Any {
            type_url: type_url.into(),
            value: value.to_vec(),
        }
    }

    #[tokio::test]
    async fn every_method_maps_fields_both_ways() {
        let s = server().await;
        let ns = Some("k8s.io");

        // Create, as CRI sends it through the proxy.
        let req = api::ControllerCreateRequest {
            sandbox_id: "pod1".into(),
            rootfs: vec![pb::Mount {
                r#type: "overlay".into(),
                source: "overlay".into(),
                target: "/".into(),
                options: vec!["lowerdir=/l".into()],
            }],
            options: Some(pany("runtime.v1.PodSandboxConfig", b"cfg")),
            netns_path: "/var/run/netns/cni-1234".into(),
            annotations: labels(&[("a", "b")]),
            sandbox: Some(pb::Sandbox {
                sandbox_id: "pod1".into(),
                runtime: Some(pb::sandbox::Runtime {
                    name: "io.containerd.kuasarrunc.v1".into(),
                    options: Some(pany("runtimeoptions.v1.Options", b"opts")),
                }),
                spec: None,
                labels: labels(&[("name", "pod1_default_uid_0")]),
                created_at: ts(1_700_000_000, 1),
                updated_at: ts(1_700_000_001, 2),
                extensions: [(
                    "metadata".to_string(),
                    pany(
                        "github.com/containerd/cri/pkg/store/sandbox/Metadata",
                        b"{}",
                    ),
                )]
                .into(),
                sandboxer: "kuasar".into(),
            }),
            sandboxer: "kuasar".into(),
        };
        let resp: api::ControllerCreateResponse =
            call(&s.channel, ns, "Create", req).await.unwrap();
        assert_eq!(resp.sandbox_id, "pod1");
        let Call::Create(c) = s.fake.last() else {
            panic!("not a create: {:?}", s.fake.last())
        };
        assert_eq!((c.namespace.as_str(), c.id.as_str()), ("k8s.io", "pod1"));
        assert_eq!(
            c.rootfs,
            vec![Mount {
                kind: "overlay".into(),
                source: "overlay".into(),
                target: "/".into(),
                options: vec!["lowerdir=/l".into()],
            }]
        );
        assert_eq!(
            c.options,
            Some(Any {
                type_url: "runtime.v1.PodSandboxConfig".into(),
                value: b"cfg".to_vec()
            })
        );
        assert_eq!(c.netns_path, "/var/run/netns/cni-1234");
        assert_eq!(c.annotations, labels(&[("a", "b")]));
        assert_eq!(c.sandboxer, "kuasar");
        assert_eq!(c.bundle_path, "");
        let rec = c.sandbox.expect("record");
        assert_eq!(rec.runtime_name, "io.containerd.kuasarrunc.v1");
        assert_eq!(
            rec.runtime_options.unwrap().type_url,
            "runtimeoptions.v1.Options"
        );
        assert_eq!(rec.spec, None);
        assert_eq!(rec.labels, labels(&[("name", "pod1_default_uid_0")]));
        assert_eq!(rec.extensions["metadata"].value, b"{}");
        assert_eq!(rec.sandboxer, "kuasar");
        assert_eq!(rec.created_at, Some(at(1_700_000_000, 1)));
        assert_eq!(rec.updated_at, Some(at(1_700_000_001, 2)));

        let resp: api::ControllerStartResponse = call(
            &s.channel,
            ns,
            "Start",
            api::ControllerStartRequest {
                sandbox_id: "pod1".into(),
                sandboxer: "kuasar".into(),
            },
        )
        .await
        .unwrap();
        assert_eq!(s.fake.last(), Call::Start("k8s.io".into(), "pod1".into()));
        assert_eq!(resp.sandbox_id, "pod1");
        assert_eq!(resp.pid, 4242);
        assert_eq!(resp.created_at, ts(1_700_000_000, 5));
        assert_eq!(resp.address, ADDRESS);
        assert_eq!(resp.version, 3);
        assert_eq!(resp.labels, ready().labels);

        let resp: api::ControllerPlatformResponse = call(
            &s.channel,
            ns,
            "Platform",
            api::ControllerPlatformRequest {
                sandbox_id: "pod1".into(),
                sandboxer: "kuasar".into(),
            },
        )
        .await
        .unwrap();
        assert_eq!(
            s.fake.last(),
            Call::Platform("k8s.io".into(), "pod1".into())
        );
        let p = resp.platform.unwrap();
        assert_eq!((p.os.as_str(), p.architecture.as_str()), ("linux", "amd64"));

        for (secs, want) in [(0, None), (30, Some(Duration::from_secs(30)))] {
            let _: api::ControllerStopResponse = call(
                &s.channel,
                ns,
                "Stop",
                api::ControllerStopRequest {
                    sandbox_id: "pod1".into(),
                    timeout_secs: secs,
                    sandboxer: "kuasar".into(),
                },
            )
            .await
            .unwrap();
            assert_eq!(
                s.fake.last(),
                Call::Stop("k8s.io".into(), "pod1".into(), want)
            );
        }

        let resp: api::ControllerWaitResponse = call(
            &s.channel,
            ns,
            "Wait",
            api::ControllerWaitRequest {
                sandbox_id: "pod1".into(),
                sandboxer: "kuasar".into(),
            },
        )
        .await
        .unwrap();
        assert_eq!(s.fake.last(), Call::Wait("k8s.io".into(), "pod1".into()));
        assert_eq!(resp.exit_status, 137);
        assert_eq!(resp.exited_at, ts(1_700_000_100, 7));

        let resp: api::ControllerStatusResponse = call(
            &s.channel,
            ns,
            "Status",
            api::ControllerStatusRequest {
                sandbox_id: "pod1".into(),
                verbose: true,
                sandboxer: "kuasar".into(),
            },
        )
        .await
        .unwrap();
        assert_eq!(
            s.fake.last(),
            Call::Status("k8s.io".into(), "pod1".into(), true)
        );
        assert_eq!(resp.sandbox_id, "pod1");
        assert_eq!(resp.pid, 4242);
        assert_eq!(resp.state, "SANDBOX_READY");
        assert_eq!(resp.info, status().info);
        assert_eq!(resp.created_at, ts(1_700_000_000, 5));
        assert_eq!(resp.exited_at, None);
        assert_eq!(resp.extra, Some(pany("kuasar.Extra", &[1, 2, 3])));
        assert_eq!(resp.address, ADDRESS);
        assert_eq!(resp.version, 3);

        let resp: api::ControllerMetricsResponse = call(
            &s.channel,
            ns,
            "Metrics",
            api::ControllerMetricsRequest {
                sandbox_id: "pod1".into(),
                sandboxer: "kuasar".into(),
            },
        )
        .await
        .unwrap();
        assert_eq!(s.fake.last(), Call::Metrics("k8s.io".into(), "pod1".into()));
        let m = resp.metrics.unwrap();
        assert_eq!(m.timestamp, ts(1_700_000_050, 0));
        assert_eq!(m.id, "pod1");
        assert_eq!(m.data, Some(pany("io.containerd.cgroups.v1.Metrics", &[9])));

        let _: api::ControllerUpdateResponse = call(
            &s.channel,
            ns,
            "Update",
            api::ControllerUpdateRequest {
                sandbox_id: "pod1".into(),
                sandboxer: String::new(),
                sandbox: Some(pb::Sandbox {
                    sandbox_id: "pod1".into(),
                    labels: labels(&[("k", "v")]),
                    ..Default::default()
                }),
                fields: vec!["labels".into()],
            },
        )
        .await
        .unwrap();
        let Call::Update(u) = s.fake.last() else {
            panic!("not an update: {:?}", s.fake.last())
        };
        assert_eq!((u.namespace.as_str(), u.id.as_str()), ("k8s.io", "pod1"));
        assert_eq!(u.fields, vec!["labels".to_string()]);
        assert_eq!(u.sandbox.unwrap().labels, labels(&[("k", "v")]));

        let _: api::ControllerShutdownResponse = call(
            &s.channel,
            ns,
            "Shutdown",
            api::ControllerShutdownRequest {
                sandbox_id: "pod1".into(),
                sandboxer: "kuasar".into(),
            },
        )
        .await
        .unwrap();
        assert_eq!(
            s.fake.last(),
            Call::Shutdown("k8s.io".into(), "pod1".into())
        );
    }

    #[tokio::test]
    async fn error_codes_reach_the_client() {
        let s = server().await;

        let err = call::<_, api::ControllerStatusResponse>(
            &s.channel,
            Some("k8s.io"),
            "Status",
            api::ControllerStatusRequest {
                sandbox_id: "missing".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
        assert!(err.message().contains("missing"), "{err:?}");

        let err = call::<_, api::ControllerCreateResponse>(
            &s.channel,
            Some("k8s.io"),
            "Create",
            api::ControllerCreateRequest {
                sandbox_id: "taken".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::AlreadyExists);

        let calls = s.fake.calls.lock().unwrap().len();
        let err = call::<_, api::ControllerStartResponse>(
            &s.channel,
            None,
            "Start",
            api::ControllerStartRequest {
                sandbox_id: "pod1".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains(NAMESPACE_HEADER), "{err:?}");

        let err = call::<_, api::ControllerStartResponse>(
            &s.channel,
            Some("k8s.io"),
            "Start",
            api::ControllerStartRequest::default(),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        // Refused before reaching the controller.
        assert_eq!(s.fake.calls.lock().unwrap().len(), calls);

        // The Store service is containerd's own, never served here.
        let err = call::<_, api::ControllerStartResponse>(
            &s.channel,
            Some("k8s.io"),
            "NoSuchMethod",
            api::ControllerStartRequest::default(),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unimplemented);
    }

    #[tokio::test]
    async fn shutdown_answers_pending_waits_with_unavailable() {
        let mut s = server().await;
        let channel = s.channel.clone();
        let waiting = tokio::spawn(async move {
            call::<_, api::ControllerWaitResponse>(
                &channel,
                Some("k8s.io"),
                "Wait",
                api::ControllerWaitRequest {
                    sandbox_id: "forever".into(),
                    ..Default::default()
                },
            )
            .await
        });
        while !s
            .fake
            .calls
            .lock()
            .unwrap()
            .contains(&Call::Wait("k8s.io".into(), "forever".into()))
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(!waiting.is_finished());

        s.stop.take().unwrap().send(()).unwrap();
        let err = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("wait answered")
            .unwrap()
            .unwrap_err();
        // containerd's proxy retries Wait on Unavailable.
        assert_eq!(err.code(), tonic::Code::Unavailable);
        drop(s.channel);
        tokio::time::timeout(Duration::from_secs(10), s.task)
            .await
            .expect("server returned")
            .unwrap()
            .unwrap();
    }
}

// ---------------------------------------------------------------- ttrpc

mod shim {
    use super::*;

    use containerd_shim_protos::sandbox_api as sb;
    use containerd_shim_protos::types::mount::Mount as PbMount;
    use protobuf::well_known_types::any::Any as PbAny;
    use protobuf::well_known_types::timestamp::Timestamp as PbTimestamp;
    use protobuf::{Message, MessageField};

    async fn call<Q: Message, R: Message>(fake: &Fake, method: &str, req: &Q) -> Result<R, Status> {
        let payload = req.write_to_bytes().unwrap();
        let out = handle_ttrpc(fake, "k8s.io", method, &payload).await?;
        Ok(R::parse_from_bytes(&out).expect("a well-formed reply"))
    }

    fn ts(secs: i64, nanos: i32) -> MessageField<PbTimestamp> {
        let mut t = PbTimestamp::new();
        t.seconds = secs;
        t.nanos = nanos;
        MessageField::some(t)
    }

    #[test]
    fn service_name_is_containerds() {
        assert_eq!(TTRPC_SERVICE, "containerd.runtime.sandbox.v1.Sandbox");
    }

    #[tokio::test]
    async fn every_method_maps_fields_both_ways() {
        let fake = Fake::default();

        // CreateSandbox, as containerd's shim controller sends it.
        let mut req = sb::CreateSandboxRequest::new();
        req.sandbox_id = "pod1".into();
        req.bundle_path =
            "/run/containerd/io.containerd.sandbox.controller.v1.shim/k8s.io/pod1".into();
        let mut m = PbMount::new();
        m.type_ = "bind".into();
        m.source = "/src".into();
        m.target = "/dst".into();
        m.options = vec!["rbind".into()];
        req.rootfs = vec![m];
        let mut any = PbAny::new();
        any.type_url = "runtime.v1.PodSandboxConfig".into();
        any.value = b"cfg".to_vec();
        req.options = MessageField::some(any);
        req.netns_path = "/var/run/netns/cni-1234".into();
        req.annotations = labels(&[("a", "b")]);
        let _: sb::CreateSandboxResponse = call(&fake, "CreateSandbox", &req).await.unwrap();
        assert_eq!(
            fake.last(),
            Call::Create(CreateSandbox {
                namespace: "k8s.io".into(),
                id: "pod1".into(),
                rootfs: vec![Mount {
                    kind: "bind".into(),
                    source: "/src".into(),
                    target: "/dst".into(),
                    options: vec!["rbind".into()],
                }],
                options: Some(Any {
                    type_url: "runtime.v1.PodSandboxConfig".into(),
                    value: b"cfg".to_vec(),
                }),
                netns_path: "/var/run/netns/cni-1234".into(),
                annotations: labels(&[("a", "b")]),
                sandbox: None,
                sandboxer: String::new(),
                bundle_path: req.bundle_path.clone(),
            })
        );

        let mut req = sb::StartSandboxRequest::new();
        req.sandbox_id = "pod1".into();
        let resp: sb::StartSandboxResponse = call(&fake, "StartSandbox", &req).await.unwrap();
        assert_eq!(fake.last(), Call::Start("k8s.io".into(), "pod1".into()));
        assert_eq!(resp.pid, 4242);
        assert_eq!(resp.created_at, ts(1_700_000_000, 5));

        let mut req = sb::PlatformRequest::new();
        req.sandbox_id = "pod1".into();
        let resp: sb::PlatformResponse = call(&fake, "Platform", &req).await.unwrap();
        assert_eq!(fake.last(), Call::Platform("k8s.io".into(), "pod1".into()));
        assert_eq!(resp.platform.os, "linux");
        assert_eq!(resp.platform.architecture, "amd64");

        let mut req = sb::StopSandboxRequest::new();
        req.sandbox_id = "pod1".into();
        req.timeout_secs = 10;
        let _: sb::StopSandboxResponse = call(&fake, "StopSandbox", &req).await.unwrap();
        assert_eq!(
            fake.last(),
            Call::Stop(
                "k8s.io".into(),
                "pod1".into(),
                Some(Duration::from_secs(10))
            )
        );
        req.timeout_secs = 0;
        let _: sb::StopSandboxResponse = call(&fake, "StopSandbox", &req).await.unwrap();
        assert_eq!(
            fake.last(),
            Call::Stop("k8s.io".into(), "pod1".into(), None)
        );

        let mut req = sb::WaitSandboxRequest::new();
        req.sandbox_id = "pod1".into();
        let resp: sb::WaitSandboxResponse = call(&fake, "WaitSandbox", &req).await.unwrap();
        assert_eq!(fake.last(), Call::Wait("k8s.io".into(), "pod1".into()));
        assert_eq!(resp.exit_status, 137);
        assert_eq!(resp.exited_at, ts(1_700_000_100, 7));

        let mut req = sb::SandboxStatusRequest::new();
        req.sandbox_id = "pod1".into();
        req.verbose = true;
        let resp: sb::SandboxStatusResponse = call(&fake, "SandboxStatus", &req).await.unwrap();
        assert_eq!(
            fake.last(),
            Call::Status("k8s.io".into(), "pod1".into(), true)
        );
        assert_eq!(resp.sandbox_id, "pod1");
        assert_eq!(resp.pid, 4242);
        assert_eq!(resp.state, "SANDBOX_READY");
        assert_eq!(resp.info, status().info);
        assert_eq!(resp.created_at, ts(1_700_000_000, 5));
        assert!(resp.exited_at.is_none());
        assert_eq!(resp.extra.type_url, "kuasar.Extra");
        assert_eq!(resp.extra.value, vec![1, 2, 3]);

        let mut req = sb::PingRequest::new();
        req.sandbox_id = "pod1".into();
        let _: sb::PingResponse = call(&fake, "PingSandbox", &req).await.unwrap();
        assert_eq!(fake.last(), Call::Ping("k8s.io".into(), "pod1".into()));

        let mut req = sb::SandboxMetricsRequest::new();
        req.sandbox_id = "pod1".into();
        let resp: sb::SandboxMetricsResponse = call(&fake, "SandboxMetrics", &req).await.unwrap();
        assert_eq!(fake.last(), Call::Metrics("k8s.io".into(), "pod1".into()));
        assert_eq!(resp.metrics.timestamp, ts(1_700_000_050, 0));
        assert_eq!(resp.metrics.id, "pod1");
        assert_eq!(
            resp.metrics.data.type_url,
            "io.containerd.cgroups.v1.Metrics"
        );

        let mut req = sb::ShutdownSandboxRequest::new();
        req.sandbox_id = "pod1".into();
        let _: sb::ShutdownSandboxResponse = call(&fake, "ShutdownSandbox", &req).await.unwrap();
        assert_eq!(fake.last(), Call::Shutdown("k8s.io".into(), "pod1".into()));
    }

    #[tokio::test]
    async fn refusals_carry_their_codes() {
        let fake = Fake::default();

        // Not a StatusRequest: field 2 (verbose, a bool) sent as a
        // length-delimited field with a length past the end.
        let err = handle_ttrpc(&fake, "k8s.io", "SandboxStatus", &[0x12, 0x7f, 0x01])
            .await
            .unwrap_err();
        assert_eq!(err.code, Code::InvalidArgument, "{err}");

        let err = handle_ttrpc(&fake, "k8s.io", "UpdateSandbox", &[])
            .await
            .unwrap_err();
        assert_eq!(err.code, Code::Unimplemented, "{err}");

        let mut req = sb::StartSandboxRequest::new();
        req.sandbox_id = "pod1".into();
        let payload = req.write_to_bytes().unwrap();
        let err = handle_ttrpc(&fake, "", "StartSandbox", &payload)
            .await
            .unwrap_err();
        assert_eq!(err.code, Code::InvalidArgument, "{err}");

        let empty = sb::StartSandboxRequest::new().write_to_bytes().unwrap();
        let err = handle_ttrpc(&fake, "k8s.io", "StartSandbox", &empty)
            .await
            .unwrap_err();
        assert_eq!(err.code, Code::InvalidArgument, "{err}");
        assert!(fake.calls.lock().unwrap().is_empty());

        let mut req = sb::WaitSandboxRequest::new();
        req.sandbox_id = "missing".into();
        let err = call::<_, sb::WaitSandboxResponse>(&fake, "WaitSandbox", &req)
            .await
            .unwrap_err();
        assert_eq!(err.code, Code::NotFound, "{err}");

        let mut req = sb::CreateSandboxRequest::new();
        req.sandbox_id = "taken".into();
        let err = call::<_, sb::CreateSandboxResponse>(&fake, "CreateSandbox", &req)
            .await
            .unwrap_err();
        assert_eq!(err.code, Code::AlreadyExists, "{err}");
    }

    #[test]
    fn status_maps_onto_both_wires() {
        let s = Status::not_found("sandbox pod1 not found");
        let t = s.to_ttrpc();
        assert_eq!(t.code.value(), 5);
        assert_eq!(t.message, "sandbox pod1 not found");
        let g: tonic::Status = s.clone().into();
        assert_eq!(g.code(), tonic::Code::NotFound);
        assert_eq!(Status::from(g), s);
        for code in [
            Code::InvalidArgument,
            Code::AlreadyExists,
            Code::FailedPrecondition,
            Code::Unimplemented,
            Code::Unavailable,
            Code::Internal,
        ] {
            let g: tonic::Status = Status::new(code, "x").into();
            assert_eq!(g.code() as i32, code as i32);
            assert_eq!(Status::new(code, "x").to_ttrpc().code.value(), code as i32);
        }
    }
}
