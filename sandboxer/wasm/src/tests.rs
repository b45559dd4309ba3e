//! The wasm backend with the real engine, driven without containerd: the
//! repository's WAT programs in throw-away bundles, outputs to plain files.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedReceiver;

use super::*;
use kuasar_core::backend::CreateRequest;
use kuasar_host::stdio::StdioPaths;

fn wat(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/wasm")
        .join(format!("{name}.wat"));
    wat::parse_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn backend(root: &Path) -> Shared {
    let cfg = WasmConfig {
        enabled: true,
        max_instances: 250,
        ..Default::default()
    };
    Shared::new(root, &cfg, kuasar_host::reaper::Reaper::new()).unwrap()
}

struct Bundle {
    dir: PathBuf,
}

impl Bundle {
    /// A bundle whose rootfs holds `program` as /app.wasm, run with `args`.
    fn new(
        parent: &Path,
        name: &str,
        program: &[u8],
        args: &[&str],
        extra: serde_json::Value,
    ) -> Bundle {
        let dir = parent.join(name);
        std::fs::create_dir_all(dir.join("rootfs")).unwrap();
        std::fs::write(dir.join("rootfs/app.wasm"), program).unwrap();
        let mut argv = vec!["/app.wasm".to_string()];
        argv.extend(args.iter().map(|s| s.to_string()));
        let mut config = serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "process": {"args": argv, "env": ["GREETING=hi", "PATH=/bin"], "cwd": "/",
                        "user": {"uid": 0, "gid": 0}},
        });
        merge(&mut config, extra);
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        std::fs::write(dir.join("stdout"), b"").unwrap();
        std::fs::write(dir.join("stderr"), b"").unwrap();
        Bundle { dir }
    }

    fn request(&self, events: EventSink) -> CreateRequest {
        CreateRequest {
            namespace: "test".into(),
            id: self.dir.file_name().unwrap().to_string_lossy().into(),
            bundle: self.dir.clone(),
            stdio: StdioPaths {
                stdin: String::new(),
                stdout: self.dir.join("stdout").display().to_string(),
                stderr: self.dir.join("stderr").display().to_string(),
                terminal: false,
            },
            events,
            containerd: String::new(),
            rootfs: Vec::new(),
        }
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.join("stdout")).unwrap()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap()
    }
}

fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
    if let (Some(a), serde_json::Value::Object(b)) = (a.as_object_mut(), b) {
        for (k, v) in b {
            match a.get_mut(&k) {
                Some(existing) if existing.is_object() && v.is_object() => merge(existing, v),
                _ => {
                    a.insert(k, v);
                }
            }
        }
    }
}

async fn exit_of(rx: &mut UnboundedReceiver<ContainerEvent>) -> u32 {
    loop {
        match tokio::time::timeout(Duration::from_secs(20), rx.recv()).await {
            Ok(Some(ContainerEvent::Exit(None, code))) => return code,
            Ok(Some(_)) => continue,
            other => panic!("no exit: {other:?}"),
        }
    }
}

/// Creates and starts `bundle`; returns the container and its events.
async fn start(
    wasm: &Shared,
    bundle: &Bundle,
) -> (WasmContainer, UnboundedReceiver<ContainerEvent>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let c = wasm.create_instance(bundle.request(tx)).await.unwrap();
    assert_eq!(c.start().await.unwrap(), std::process::id());
    (c, rx)
}

async fn run(wasm: &Shared, bundle: &Bundle) -> u32 {
    let (_c, mut rx) = start(wasm, bundle).await;
    exit_of(&mut rx).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_modules_run_with_their_outputs_and_exit_statuses() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = backend(&dir.path().join("root"));
    let hello = Bundle::new(
        dir.path(),
        "hello",
        &wat("hello"),
        &[],
        serde_json::json!({}),
    );
    assert_eq!(run(&wasm, &hello).await, 0);
    assert_eq!(hello.stdout(), "hello from wasm\n");
    assert_eq!(hello.stderr(), "hello on stderr\n");

    let exit = Bundle::new(
        dir.path(),
        "exit",
        &wat("exit7"),
        &[],
        serde_json::json!({}),
    );
    assert_eq!(run(&wasm, &exit).await, 7);

    let trap = Bundle::new(dir.path(), "trap", &wat("trap"), &[], serde_json::json!({}));
    assert_eq!(run(&wasm, &trap).await, instance::EXIT_TRAP);
    assert_eq!(trap.stdout(), "about to trap\n");
    assert!(
        trap.stderr().contains("wasm instance trapped"),
        "{}",
        trap.stderr()
    );
    assert!(trap.stderr().contains("unreachable"), "{}", trap.stderr());

    let echo = Bundle::new(
        dir.path(),
        "echo",
        &wat("echo"),
        &["a b", "c"],
        serde_json::json!({}),
    );
    assert_eq!(run(&wasm, &echo).await, 0);
    assert_eq!(
        echo.stdout(),
        "/app.wasm\na b\nc\n--\nGREETING=hi\nPATH=/bin\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_runs_wasi_cli_run() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = backend(&dir.path().join("root"));
    let b = Bundle::new(
        dir.path(),
        "component",
        &wat("component"),
        &[],
        serde_json::json!({}),
    );
    assert_eq!(run(&wasm, &b).await, 0, "stderr: {}", b.stderr());
    assert_eq!(b.stdout(), "hello from a wasm component\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_ends_a_spinning_module_and_pause_holds_it() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = backend(&dir.path().join("root"));
    for (signal, status) in [(9, 137), (15, 143)] {
        let b = Bundle::new(
            dir.path(),
            &format!("spin{signal}"),
            &wat("spin"),
            &[],
            serde_json::json!({}),
        );
        let (c, mut rx) = start(&wasm, &b).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = Instant::now();
        c.kill(None, signal, false).await.unwrap();
        assert_eq!(exit_of(&mut rx).await, status);
        eprintln!(
            "signal {signal}: the spinning module ended {:?} after kill",
            t.elapsed()
        );
        assert_eq!(b.stdout(), "spinning\n");
    }

    // Paused, it uses no CPU; resumed, it spins again.
    let b = Bundle::new(
        dir.path(),
        "paused",
        &wat("spin"),
        &[],
        serde_json::json!({}),
    );
    let (c, mut rx) = start(&wasm, &b).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let busy = || wasm.engine().unwrap().busy.load(Ordering::Relaxed);
    assert_eq!(busy(), 1, "a spinning instance wants the CPU");
    c.pause().await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let cpu = |c: &WasmContainer| c.control.cpu_ns.load(Ordering::Relaxed);
    let held = cpu(&c);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(cpu(&c), held, "a paused instance ran");
    assert_eq!(busy(), 0, "a paused instance is not busy");
    c.resume().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(cpu(&c) > held, "a resumed instance did not run");
    c.pause().await.unwrap();
    c.kill(None, 9, false).await.unwrap();
    assert_eq!(exit_of(&mut rx).await, 137, "kill ends a paused instance");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_waiting_in_the_host_is_killed_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = backend(&dir.path().join("root"));
    let b = Bundle::new(
        dir.path(),
        "sleep",
        &wat("sleep"),
        &[],
        serde_json::json!({}),
    );
    let (c, mut rx) = start(&wasm, &b).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let pids = c.pids().await.unwrap();
    assert_eq!(pids.len(), 1);
    assert_eq!(pids[0].info.type_url, "containerd.types.Descriptor");
    assert!(String::from_utf8_lossy(&pids[0].info.value).contains("inside kuasar-sandboxer"));
    let stats = c.stats().await.unwrap();
    assert!(
        stats.type_url.starts_with("io.containerd.cgroups.v"),
        "{}",
        stats.type_url
    );
    assert!(c.exec_supported().is_err());
    assert!(c.kill(None, 0, false).await.is_ok());
    c.kill(None, 15, false).await.unwrap();
    assert_eq!(exit_of(&mut rx).await, 143);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_limit_ends_the_instance_with_an_oom() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = backend(&dir.path().join("root"));
    let limit = serde_json::json!({"linux": {"resources": {"memory": {"limit": 8 << 20}}}});
    let b = Bundle::new(dir.path(), "hog", &wat("memhog"), &[], limit);
    let (c, mut rx) = start(&wasm, &b).await;
    let mut oom = false;
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(20), rx.recv()).await {
            Ok(Some(ContainerEvent::Oom)) => oom = true,
            Ok(Some(ContainerEvent::Exit(None, s))) => break s,
            other => panic!("{other:?}"),
        }
    };
    assert!(oom, "no OOM event");
    assert_eq!(status, 137);
    assert!(
        b.stderr()
            .contains("memory limit of 8388608 bytes exceeded"),
        "{}",
        b.stderr()
    );
    let used = c.memory.usage.load(Ordering::SeqCst);
    assert!((7 << 20..=8 << 20).contains(&used), "{used}");

    // Update raises the limit of a running instance.
    let b = Bundle::new(
        dir.path(),
        "sleeper",
        &wat("sleep"),
        &[],
        serde_json::json!({}),
    );
    let (c, mut rx) = start(&wasm, &b).await;
    c.update(br#"{"memory": {"limit": 1048576}}"#)
        .await
        .unwrap();
    assert_eq!(c.memory.limit.load(Ordering::SeqCst), 1 << 20);
    assert!(c.update(b"not json").await.is_err());
    c.kill(None, 9, false).await.unwrap();
    assert_eq!(exit_of(&mut rx).await, 137);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preopens_follow_the_spec() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = backend(&dir.path().join("root"));
    let b = Bundle::new(
        dir.path(),
        "rw",
        &wat("files"),
        &["mine"],
        serde_json::json!({}),
    );
    assert_eq!(run(&wasm, &b).await, 0, "{}", b.stderr());
    assert_eq!(b.stdout(), "mine\n");
    assert_eq!(
        std::fs::read_to_string(b.dir.join("rootfs/kuasar.txt")).unwrap(),
        "mine\n"
    );

    let ro = Bundle::new(
        dir.path(),
        "ro",
        &wat("files"),
        &[],
        serde_json::json!({"root": {"readonly": true}}),
    );
    assert_eq!(run(&wasm, &ro).await, 2, "{}", ro.stderr());

    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mount = |opts: &[&str]| {
        serde_json::json!({"mounts": [{"destination": "/data", "type": "bind",
            "source": data, "options": opts}]})
    };
    let m = Bundle::new(
        dir.path(),
        "mount",
        &wat("files"),
        &["shared"],
        mount(&["rbind", "rw"]),
    );
    assert_eq!(run(&wasm, &m).await, 0, "{}", m.stderr());
    assert_eq!(
        std::fs::read_to_string(data.join("kuasar.txt")).unwrap(),
        "shared\n"
    );
    std::fs::remove_file(data.join("kuasar.txt")).unwrap();
    let m = Bundle::new(
        dir.path(),
        "mount-ro",
        &wat("files"),
        &[],
        mount(&["rbind", "ro"]),
    );
    assert_eq!(run(&wasm, &m).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compiled_programs_are_cached_in_memory_and_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let bytes = wat("hello");
    let key = engine::digest(&bytes);
    let path;
    {
        let wasm = backend(&root);
        assert!(!wasm.engine().unwrap().is_cached(&key));
        let b = Bundle::new(dir.path(), "one", &bytes, &[], serde_json::json!({}));
        assert_eq!(run(&wasm, &b).await, 0);
        assert!(wasm.engine().unwrap().is_cached(&key));
        path = wasm.engine().unwrap().precompiled_path(&key);
        assert!(path.exists());
    }
    let written = std::fs::metadata(&path).unwrap().modified().unwrap();
    // A new engine (a daemon restart) loads the precompiled file.
    let wasm = backend(&root);
    let b = Bundle::new(dir.path(), "two", &bytes, &[], serde_json::json!({}));
    assert_eq!(run(&wasm, &b).await, 0);
    assert_eq!(
        std::fs::metadata(&path).unwrap().modified().unwrap(),
        written
    );
    drop(wasm);
    // A damaged file is compiled again. (Replaced, not rewritten in place:
    // the engine maps these files, as the daemon only ever renames them.)
    kuasar_protocol::shim::write_atomic(&path, b"garbage").unwrap();
    let wasm = backend(&root);
    let b = Bundle::new(dir.path(), "three", &bytes, &[], serde_json::json!({}));
    assert_eq!(run(&wasm, &b).await, 0);
    assert_ne!(std::fs::read(&path).unwrap(), b"garbage");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_programs_are_refused_at_create() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = backend(&dir.path().join("root"));
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let cases: [(&str, Vec<u8>, &str); 3] = [
        (
            "elf",
            b"\x7fELF\x02\x01\x01\0".to_vec(),
            "not a WebAssembly binary",
        ),
        (
            "import",
            wat::parse_str(r#"(module (import "env" "f" (func)) (func (export "_start")))"#)
                .unwrap(),
            "env::f",
        ),
        (
            "noentry",
            wat::parse_str("(module)").unwrap(),
            "exports no function",
        ),
    ];
    for (name, bytes, want) in cases {
        let b = Bundle::new(dir.path(), name, &bytes, &[], serde_json::json!({}));
        let e = wasm
            .create_instance(b.request(tx.clone()))
            .await
            .err()
            .expect(name);
        assert!(e.to_string().contains(want), "{name}: {e}");
    }
    let b = Bundle::new(
        dir.path(),
        "missing",
        &wat("hello"),
        &[],
        serde_json::json!({}),
    );
    std::fs::remove_file(b.dir.join("rootfs/app.wasm")).unwrap();
    let e = wasm
        .create_instance(b.request(tx.clone()))
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), kuasar_protocol::Code::NotFound, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_panic_ends_only_its_instance() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = backend(&dir.path().join("root"));
    let engine = wasm.engine().unwrap();
    // On the engine's threads, and on a thread of its own (an instance
    // with sockets; here in the daemon's own network namespace).
    let own_ns: OwnedFd = std::fs::File::open("/proc/self/ns/net").unwrap().into();
    let thread = netns::NetThread::start(own_ns, "wasm-net").await.unwrap();
    let runs: [std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>>; 2] = [
        Box::pin(isolated(&engine.handle, async {
            panic!("host code failed")
        })),
        Box::pin(thread.isolated(async { panic!("host code failed") })),
    ];
    for (i, run) in runs.into_iter().enumerate() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let notice = dir.path().join(format!("notice{i}"));
        let fd: OwnedFd = std::fs::File::create(&notice).unwrap().into();
        monitor(&engine, run, engine.running(), fd, tx, "p".into());
        assert_eq!(exit_of(&mut rx).await, instance::EXIT_TRAP);
        let text = std::fs::read_to_string(&notice).unwrap();
        assert!(text.contains("host panic: host code failed"), "{text}");
    }
    // The instance threads serve on.
    let b = Bundle::new(
        dir.path(),
        "after",
        &wat("hello"),
        &[],
        serde_json::json!({}),
    );
    assert_eq!(run(&wasm, &b).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_instances_see_only_their_own_files_and_output() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = backend(&dir.path().join("root"));
    let program = wat("files");
    let bundles: Vec<Bundle> = (0..200)
        .map(|i| {
            Bundle::new(
                dir.path(),
                &format!("c{i}"),
                &program,
                &[&format!("instance-{i}")],
                serde_json::json!({}),
            )
        })
        .collect();
    let mut running = Vec::new();
    for b in &bundles {
        running.push(start(&wasm, b).await);
    }
    for (i, (b, (_c, rx))) in bundles.iter().zip(running.iter_mut()).enumerate() {
        assert_eq!(exit_of(rx).await, 0, "{}", b.stderr());
        assert_eq!(b.stdout(), format!("instance-{i}\n"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_stdio_means_dev_null() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = backend(&dir.path().join("root"));
    let b = Bundle::new(
        dir.path(),
        "null",
        &wat("hello"),
        &[],
        serde_json::json!({}),
    );
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut req = b.request(tx);
    req.stdio = StdioPaths::default();
    let c = wasm.create_instance(req).await.unwrap();
    c.start().await.unwrap();
    assert_eq!(exit_of(&mut rx).await, 0);
}

/// A listener on 127.0.0.1:7007 in a network namespace of its own: the
/// namespace's path, and the lines its clients send, one per connection.
fn listener_in_a_new_netns() -> (PathBuf, std::sync::mpsc::Receiver<String>) {
    let (path_tx, path_rx) = std::sync::mpsc::channel();
    let (line_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        netns::loopback_up().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:7007").unwrap();
        let tid = nix::unistd::gettid();
        path_tx
            .send(PathBuf::from(format!("/proc/self/task/{tid}/ns/net")))
            .unwrap();
        for conn in listener.incoming() {
            let mut line = String::new();
            std::io::Read::read_to_string(&mut conn.unwrap(), &mut line).unwrap();
            if line_tx.send(line).is_err() {
                return;
            }
        }
    });
    (path_rx.recv().unwrap(), lines)
}

fn netns_spec(annotation: Option<&str>, path: Option<&Path>) -> serde_json::Value {
    let mut ns = serde_json::json!({"type": "network"});
    if let Some(p) = path {
        ns["path"] = p.display().to_string().into();
    }
    let mut spec = serde_json::json!({"linux": {"namespaces": [ns]}});
    if let Some(a) = annotation {
        spec["annotations"] = serde_json::json!({ spec::NETWORK_ANNOTATION: a });
    }
    spec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_only_when_asked_and_only_in_the_pods_network_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = backend(&dir.path().join("root"));
    let (pod_netns, lines) = listener_in_a_new_netns();
    let client = wat("tcp-client");
    let case = |name: &str, extra| Bundle::new(dir.path(), name, &client, &[], extra);

    // Not asked for: no socket at all, though the pod's listener is there.
    let denied = case("denied", netns_spec(None, Some(&pod_netns)));
    assert_eq!(run(&wasm, &denied).await, 1);
    // UDP only: no TCP either.
    let udp = case("udp", netns_spec(Some("udp"), Some(&pod_netns)));
    assert_eq!(run(&wasm, &udp).await, 1);
    // A namespace of its own: its loopback is up, and nothing listens there.
    let own = case("own", netns_spec(Some("tcp"), None));
    assert_eq!(run(&wasm, &own).await, 1);
    // Asked for, in the pod's namespace: connected to the pod's listener,
    // and first (none of the above reached it).
    let pod = case("pod", netns_spec(Some("tcp,udp"), Some(&pod_netns)));
    assert_eq!(run(&wasm, &pod).await, 0, "{}", pod.stderr());
    let line = lines.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(line, "hello from a wasm socket\n");
    assert!(lines.try_recv().is_err());

    // What cannot be honoured fails Create, clearly.
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let bad = case("bad-value", netns_spec(Some("tcp,icmp"), None));
    let e = wasm
        .create_instance(bad.request(tx.clone()))
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), kuasar_protocol::Code::InvalidArgument, "{e}");
    assert!(e.to_string().contains("expected none, tcp, udp"), "{e}");
    let not_net = case(
        "not-netns",
        netns_spec(Some("tcp"), Some(Path::new("/proc/self/ns/mnt"))),
    );
    let e = wasm
        .create_instance(not_net.request(tx.clone()))
        .await
        .err()
        .unwrap();
    assert!(e.to_string().contains("is not a network namespace"), "{e}");
    let missing = case(
        "missing-netns",
        netns_spec(Some("tcp"), Some(&dir.path().join("nope"))),
    );
    let e = wasm
        .create_instance(missing.request(tx))
        .await
        .err()
        .unwrap();
    assert!(e.to_string().contains("opening network namespace"), "{e}");
}

#[test]
fn the_network_annotation_and_namespace_are_read_from_the_spec() {
    let dir = tempfile::tempdir().unwrap();
    let spec_of = |name: &str, extra| {
        let b = Bundle::new(dir.path(), name, &wat("hello"), &[], extra);
        spec::load(&b.dir).unwrap().0
    };
    let s = spec_of("plain", serde_json::json!({}));
    assert!(!s.network.any());
    assert_eq!(s.netns, spec::NetNs::Host);
    let s = spec_of(
        "tcp",
        netns_spec(Some("tcp"), Some(Path::new("/run/netns/p"))),
    );
    assert_eq!(
        s.network,
        spec::Network {
            tcp: true,
            udp: false
        }
    );
    assert_eq!(s.netns, spec::NetNs::Path("/run/netns/p".into()));
    let s = spec_of("none", netns_spec(Some("none"), None));
    assert!(!s.network.any());
    assert_eq!(s.netns, spec::NetNs::New);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_is_seen_within_100_ms_among_a_hundred_spinning_modules() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = backend(&dir.path().join("root"));
    let program = wat("spin");
    let mut spinning = Vec::new();
    for i in 0..110 {
        let b = Bundle::new(
            dir.path(),
            &format!("busy{i}"),
            &program,
            &[],
            serde_json::json!({}),
        );
        spinning.push(start(&wasm, &b).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let busy = wasm.engine().unwrap().busy.load(Ordering::Relaxed);
    assert!(busy > 100, "{busy} instances counted busy");
    // Ten kills while at least a hundred others keep spinning.
    let mut took = Vec::new();
    for (c, mut rx) in spinning.drain(..10) {
        let t = Instant::now();
        c.kill(None, 9, false).await.unwrap();
        assert_eq!(exit_of(&mut rx).await, 137);
        took.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    took.sort();
    eprintln!("kills among 100 spinning modules: {took:?}");
    assert!(took[9] < Duration::from_millis(100), "{took:?}");
    for (c, _) in &spinning {
        c.kill(None, 9, false).await.unwrap();
    }
    for (_, mut rx) in spinning {
        assert_eq!(exit_of(&mut rx).await, 137);
    }
    wait_until(|| wasm.engine().unwrap().busy.load(Ordering::Relaxed) == 0).await;
}

async fn wait_until(f: impl Fn() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(10), "condition not met");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn the_tick_shortens_while_many_instances_want_the_cpu() {
    use engine::{tick_for, EPOCH_TICK};
    assert_eq!(tick_for(0, 2), EPOCH_TICK);
    assert_eq!(tick_for(10, 2), EPOCH_TICK);
    assert_eq!(tick_for(20, 2), Duration::from_millis(5));
    assert_eq!(tick_for(100, 2), Duration::from_millis(1));
    assert_eq!(tick_for(1000, 2), Duration::from_millis(1));
    assert_eq!(tick_for(100, 0), Duration::from_millis(1));
}
