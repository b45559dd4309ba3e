//! Kubernetes' view, end to end: a real CRI client against real containerd
//! (1.6.20 and 2.1.9 with their CRI plugins), real CNI (bridge, host-local,
//! portmap), real runc, images pulled from a real registry on 127.0.0.1.
//! Pods run in pause-container mode through the `kuasar-runc` handler; the
//! `runc` handler (containerd-shim-runc-v2) runs the same scenario as the
//! baseline where that is cheap. Every test ends with nothing of its pods
//! left on the host.
//!
//! Test names: `<handler>::<containerd version>::<what it proves>`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use kuasar_e2e::cri::api::{
    ContainerState, LinuxContainerResources, NamespaceMode, PodSandboxConfig, PodSandboxState,
    PortMapping, Protocol,
};
use kuasar_e2e::cri::Cri;
use kuasar_e2e::cri_env::{CriEnv, SandboxMode, KUASAR_RUNC, KUASAR_VMM, KUASAR_WASM, PAUSE_IMAGE};
use kuasar_e2e::Version;
use tonic::Code;

/// Declares `<module>::v1_6::NAME` and `<module>::v2_1::NAME` tests that run
/// scenario `NAME(version, handler)`.
macro_rules! scenarios {
    ($module:ident, $handler:expr, [$($name:ident),* $(,)?]) => {
        mod $module {
            mod v1_6 {
                $( #[test] fn $name() { super::super::$name(kuasar_e2e::Version::V1_6, $handler) } )*
            }
            mod v2_1 {
                $( #[test] fn $name() { super::super::$name(kuasar_e2e::Version::V2_1, $handler) } )*
            }
        }
    };
}

scenarios!(
    kuasar_runc,
    kuasar_e2e::cri_env::KUASAR_RUNC,
    [
        pod_lifecycle_pull_exec_logs_stats_update_stop_remove_leaves_nothing,
        two_containers_of_a_pod_share_its_netns_and_one_task_address,
        shared_pid_namespace_shows_siblings_and_pause_reaps_orphans,
        container_over_its_memory_limit_is_reported_oomkilled,
        container_reaches_a_listener_in_another_pod_by_its_ip,
        host_port_mapping_reaches_the_container_from_the_host,
        host_network_pod_uses_the_hosts_network_namespace,
        ten_pods_started_in_parallel_all_run_and_clean_up,
        pods_keep_running_across_a_containerd_restart_and_stop_afterwards,
        bad_requests_fail_clearly_and_leave_nothing_behind,
    ]
);

// The baseline: containerd's own shim through the same scenarios.
scenarios!(
    runc_baseline,
    kuasar_e2e::cri_env::RUNC,
    [
        pod_lifecycle_pull_exec_logs_stats_update_stop_remove_leaves_nothing,
        shared_pid_namespace_shows_siblings_and_pause_reaps_orphans,
        container_over_its_memory_limit_is_reported_oomkilled,
        container_reaches_a_listener_in_another_pod_by_its_ip,
    ]
);

/// A kuasar shim process that lived this long was resident, not a
/// `start`/`delete` exec (those take milliseconds).
const RESIDENT: Duration = Duration::from_secs(2);

fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn exec_out(cri: &Cri, id: &str, cmd: &[&str]) -> String {
    let r = cri
        .exec_sync(id, cmd, 20)
        .unwrap_or_else(|e| panic!("ExecSync {cmd:?} in {id}: {e}"));
    assert_eq!(
        r.exit_code,
        0,
        "ExecSync {cmd:?}: stdout {} stderr {}",
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );
    String::from_utf8_lossy(&r.stdout).into_owned()
}

fn pod_ip(env: &CriEnv, pod_id: &str) -> String {
    env.cri()
        .pod_sandbox_status(pod_id)
        .unwrap()
        .network
        .map(|n| n.ip)
        .unwrap_or_default()
}

/// Stops and removes a pod the way kubelet does, asserting each step.
/// `shareProcessNamespace: true`: one PID namespace for the whole pod.
fn share_pid_namespace(pod: &mut PodSandboxConfig) {
    let sc = pod
        .linux
        .as_mut()
        .unwrap()
        .security_context
        .as_mut()
        .unwrap();
    sc.namespace_options.as_mut().unwrap().pid = NamespaceMode::Pod as i32;
}

fn stop_and_remove_pod(env: &CriEnv, pod_id: &str) {
    let cri = env.cri();
    cri.stop_pod_sandbox(pod_id)
        .unwrap_or_else(|e| panic!("StopPodSandbox: {e}\n{}", env.log_tails()));
    let st = cri.pod_sandbox_status(pod_id).unwrap();
    assert_eq!(st.state, PodSandboxState::SandboxNotready as i32);
    cri.remove_pod_sandbox(pod_id)
        .unwrap_or_else(|e| panic!("RemovePodSandbox: {e}\n{}", env.log_tails()));
    let e = cri.pod_sandbox_status(pod_id).unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
}

/// A busybox web server on `port` answering `body` for `/`.
fn httpd(body: &str, port: u16) -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        format!(
            "mkdir -p /www && echo {body} > /www/index.html && exec httpd -f -p {port} -h /www"
        ),
    ]
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// `GET /` from the host; the body, once something answers.
fn http_get(addr: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn pod_lifecycle_pull_exec_logs_stats_update_stop_remove_leaves_nothing(v: Version, handler: &str) {
    let env = CriEnv::start(v);
    let shims = env.sample_shims();
    let cri = env.cri();

    let pod = env.pod_config("life");
    let pod_id = env.run_pod(&pod, handler);
    let st = cri.pod_sandbox_status(&pod_id).unwrap();
    assert_eq!(st.state, PodSandboxState::SandboxReady as i32);
    let ip = st.network.map(|n| n.ip).unwrap_or_default();
    assert!(
        ip.starts_with("10.241."),
        "pod IP from the env's bridge: {ip:?}"
    );
    // The sandbox image is ours, and pinned where CRI knows pinning (2.x):
    // kubelet never removes it.
    let pause = cri.image_status(PAUSE_IMAGE).unwrap().expect("pause image");
    assert!(
        pause.pinned || v == Version::V1_6,
        "pause image not pinned: {pause:?}"
    );

    // PullImage: busybox comes from the env's registry, nowhere else.
    assert!(cri.image_status(env.busybox()).unwrap().is_none());
    let image_ref = env.pull_busybox();
    assert!(image_ref.starts_with("sha256:"), "{image_ref}");
    let image = cri.image_status(env.busybox()).unwrap().expect("pulled");
    assert!(
        image.repo_tags.iter().any(|t| t == env.busybox()),
        "{image:?}"
    );

    // PID 1 is `sleep`, which ignores SIGTERM: StopContainer must escalate.
    let cfg = env.container_config(
        &pod,
        "main",
        &["sh", "-c", "echo started in $(hostname); exec sleep 600"],
    );
    let cid = env.run_container(&pod_id, &pod, &cfg);
    let st = cri.container_status(&cid).unwrap();
    assert_eq!(st.state, ContainerState::ContainerRunning as i32);
    assert!(
        st.started_at >= st.created_at && st.created_at > 0,
        "{st:?}"
    );
    // The pulled image, by id (2.x) or by its registry digest (1.6).
    assert!(
        st.image_ref == image_ref || image.repo_digests.contains(&st.image_ref),
        "{st:?}\n{image:?}"
    );

    // ExecSync: stdout, stderr and the exit code, separately.
    let r = cri
        .exec_sync(&cid, &["sh", "-c", "echo out; echo err >&2; exit 3"], 10)
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&r.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&r.stderr), "err\n");
    assert_eq!(r.exit_code, 3);
    // A readiness probe whose command outlives its timeout fails at the
    // timeout, and its process is killed.
    let t = Instant::now();
    let e = cri
        .exec_sync(&cid, &["sleep", "37"], 1)
        .expect_err("ExecSync past its timeout must fail");
    let took = t.elapsed();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e}");
    assert!(e.message().contains("timeout"), "{e}");
    assert!(took < Duration::from_secs(10), "the timeout took {took:?}");
    let ps = exec_out(cri, &cid, &["ps", "-o", "args"]);
    assert!(
        !ps.contains("sleep 37"),
        "the timed-out exec still runs:\n{ps}"
    );

    // The container's output reached the log file CRI writes.
    let log = env.dir.join("logs/life/main.log");
    let text = wait_until("the container log", Duration::from_secs(10), || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|t| t.contains("started in life"))
    });
    assert!(
        text.contains(" stdout F started in life"),
        "CRI log format: {text}"
    );

    // Stats of the running container, alone and in the node's list.
    let stats = cri.container_stats(&cid).unwrap();
    assert_eq!(stats.attributes.as_ref().unwrap().id, cid);
    let mem = stats
        .memory
        .as_ref()
        .and_then(|m| m.working_set_bytes)
        .map(|v| v.value);
    assert!(mem.unwrap_or(0) > 0, "memory working set: {stats:?}");
    let cpu = stats
        .cpu
        .as_ref()
        .and_then(|c| c.usage_core_nano_seconds)
        .map(|v| v.value);
    assert!(cpu.unwrap_or(0) > 0, "cpu usage: {stats:?}");
    let all = cri.list_container_stats().unwrap();
    assert!(
        all.iter()
            .any(|s| s.attributes.as_ref().is_some_and(|a| a.id == cid)),
        "ListContainerStats lacks {cid}: {all:?}"
    );

    // UpdateContainerResources reaches the container's cgroup.
    cri.update_container_resources(
        &cid,
        LinuxContainerResources {
            memory_limit_in_bytes: 96 << 20,
            cpu_shares: 512,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("UpdateContainerResources: {e}\n{}", env.log_tails()));
    let limit = exec_out(
        cri,
        &cid,
        &[
            "sh",
            "-c",
            "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max",
        ],
    );
    assert_eq!(limit.trim(), (96u64 << 20).to_string());

    // StopContainer: SIGTERM is ignored, SIGKILL after the 2 s grace.
    let t = Instant::now();
    cri.stop_container(&cid, 2)
        .unwrap_or_else(|e| panic!("StopContainer: {e}\n{}", env.log_tails()));
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(15),
        "stop took {took:?}: the grace period was not honoured"
    );
    let st = cri.container_status(&cid).unwrap();
    assert_eq!(st.state, ContainerState::ContainerExited as i32);
    assert_eq!(st.exit_code, 137, "{st:?}");
    assert_eq!(st.reason, "Error", "{st:?}");
    assert!(st.finished_at > st.started_at, "{st:?}");

    cri.remove_container(&cid).unwrap();
    let e = cri.container_status(&cid).unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    stop_and_remove_pod(&env, &pod_id);
    env.assert_clean();
    shims.assert_none_resident(RESIDENT);
}

fn two_containers_of_a_pod_share_its_netns_and_one_task_address(v: Version, handler: &str) {
    let env = CriEnv::start(v);
    let shims = env.sample_shims();
    let cri = env.cri();
    env.pull_busybox();
    let pod = env.pod_config("pair");
    let pod_id = env.run_pod(&pod, handler);
    let a = env.run_container(
        &pod_id,
        &pod,
        &env.container_config(&pod, "a", &["sleep", "600"]),
    );
    let b = env.run_container(
        &pod_id,
        &pod,
        &env.container_config(&pod, "b", &["sleep", "600"]),
    );

    let net_a = exec_out(cri, &a, &["readlink", "/proc/self/ns/net"]);
    let net_b = exec_out(cri, &b, &["readlink", "/proc/self/ns/net"]);
    assert_eq!(net_a, net_b, "containers of one pod in different netns");
    let host = std::fs::read_link("/proc/self/ns/net").unwrap();
    assert_ne!(
        net_a.trim(),
        host.to_string_lossy(),
        "pod in the host's netns"
    );
    // Both see the pod's IP on their interface.
    let ip = pod_ip(&env, &pod_id);
    assert!(exec_out(cri, &b, &["ip", "-4", "addr"]).contains(&ip));

    // One task address for the pod: the pause container's and both
    // containers' bundles name the same socket.
    let addr = env.bundle_address(&pod_id);
    assert_eq!(env.bundle_address(&a), addr);
    assert_eq!(env.bundle_address(&b), addr);
    if handler == KUASAR_RUNC {
        let root = env.sandboxer_root().display().to_string();
        assert!(
            addr.starts_with(&format!("unix://{root}/")),
            "not a sandboxer task socket: {addr}"
        );
    }

    // StopPodSandbox stops both containers with it.
    stop_and_remove_pod(&env, &pod_id);
    env.assert_clean();
    shims.assert_none_resident(RESIDENT);
}

fn shared_pid_namespace_shows_siblings_and_pause_reaps_orphans(v: Version, handler: &str) {
    let env = CriEnv::start(v);
    let cri = env.cri();
    env.pull_busybox();
    let mut pod = env.pod_config("pidns");
    share_pid_namespace(&mut pod);
    let pod_id = env.run_pod(&pod, handler);
    env.run_container(
        &pod_id,
        &pod,
        &env.container_config(&pod, "a", &["sleep", "4242"]),
    );
    let b = env.run_container(
        &pod_id,
        &pod,
        &env.container_config(&pod, "b", &["sleep", "600"]),
    );

    let ps = exec_out(cri, &b, &["ps", "-o", "pid,args"]);
    assert!(ps.contains("sleep 4242"), "sibling not visible:\n{ps}");
    let init = ps
        .lines()
        .find(|l| l.split_whitespace().next() == Some("1"));
    assert!(
        init.is_some_and(|l| l.contains("/pause")),
        "PID 1 of the pod is not the pause process:\n{ps}"
    );
    // An orphan is reparented to the pod's PID 1, which must reap it.
    exec_out(cri, &b, &["sh", "-c", "sleep 1 >/dev/null 2>&1 & exit 0"]);
    std::thread::sleep(Duration::from_millis(1500));
    let ps = exec_out(cri, &b, &["ps", "-o", "pid,stat,args"]);
    let zombies: Vec<&str> = ps
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|s| s.starts_with('Z'))
        })
        .collect();
    assert!(zombies.is_empty(), "unreaped orphans:\n{ps}");

    stop_and_remove_pod(&env, &pod_id);
    env.assert_clean();
}

fn container_over_its_memory_limit_is_reported_oomkilled(v: Version, handler: &str) {
    let env = CriEnv::start(v);
    let cri = env.cri();
    env.pull_busybox();
    let pod = env.pod_config("oom");
    let pod_id = env.run_pod(&pod, handler);
    // tail buffers a newline-free /dev/zero until the limit is hit.
    let mut cfg = env.container_config(&pod, "hog", &["tail", "/dev/zero"]);
    cfg.linux.as_mut().unwrap().resources = Some(LinuxContainerResources {
        memory_limit_in_bytes: 32 << 20,
        ..Default::default()
    });
    let cid = env.run_container(&pod_id, &pod, &cfg);
    let st = wait_until("the hog to die", Duration::from_secs(60), || {
        cri.container_status(&cid)
            .ok()
            .filter(|s| s.state == ContainerState::ContainerExited as i32)
    });
    assert_eq!(st.exit_code, 137, "{st:?}");
    assert_eq!(st.reason, "OOMKilled", "{st:?}\n{}", env.log_tails());

    stop_and_remove_pod(&env, &pod_id);
    env.assert_clean();
}

fn container_reaches_a_listener_in_another_pod_by_its_ip(v: Version, handler: &str) {
    let env = CriEnv::start(v);
    let cri = env.cri();
    env.pull_busybox();
    let server = env.pod_config("server");
    let server_id = env.run_pod(&server, handler);
    let web = httpd("pong-from-server", 8080);
    env.run_container(
        &server_id,
        &server,
        &env.container_config(&server, "web", &strs(&web)),
    );
    let client = env.pod_config("client");
    let client_id = env.run_pod(&client, handler);
    let c = env.run_container(
        &client_id,
        &client,
        &env.container_config(&client, "c", &["sleep", "600"]),
    );

    let ip = pod_ip(&env, &server_id);
    assert_ne!(ip, pod_ip(&env, &client_id));
    let url = format!("http://{ip}:8080/");
    // (busybox's wget -T crashes: the ExecSync timeout bounds it instead.)
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        let r = cri
            .exec_sync(&c, &["wget", "-q", "-O", "-", &url], 5)
            .unwrap_or_else(|e| panic!("ExecSync wget: {e}"));
        if r.exit_code == 0 {
            break String::from_utf8_lossy(&r.stdout).into_owned();
        }
        assert!(
            Instant::now() < deadline,
            "wget {url} from the client pod: exit {}: {}",
            r.exit_code,
            String::from_utf8_lossy(&r.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(body.trim(), "pong-from-server");

    stop_and_remove_pod(&env, &client_id);
    stop_and_remove_pod(&env, &server_id);
    env.assert_clean();
}

fn host_port_mapping_reaches_the_container_from_the_host(v: Version, handler: &str) {
    let env = CriEnv::start(v);
    env.pull_busybox();
    let port = free_port();
    let mut pod = env.pod_config("hostport");
    pod.port_mappings = vec![PortMapping {
        protocol: Protocol::Tcp as i32,
        container_port: 8080,
        host_port: port as i32,
        host_ip: String::new(),
    }];
    let pod_id = env.run_pod(&pod, handler);
    let web = httpd("pong-via-hostport", 8080);
    env.run_container(
        &pod_id,
        &pod,
        &env.container_config(&pod, "web", &strs(&web)),
    );

    let addr = format!("127.0.0.1:{port}");
    let body = wait_until(
        &format!("the pod at {addr}"),
        Duration::from_secs(20),
        || http_get(&addr),
    );
    assert_eq!(body.trim(), "pong-via-hostport");

    stop_and_remove_pod(&env, &pod_id);
    env.assert_clean();
    assert!(http_get(&addr).is_none(), "the host port still answers");
}

fn host_network_pod_uses_the_hosts_network_namespace(v: Version, handler: &str) {
    let env = CriEnv::start(v);
    let cri = env.cri();
    env.pull_busybox();
    let mut pod = env.pod_config("hostnet");
    // As kubelet: no hostname of its own in the host's UTS namespace.
    pod.hostname.clear();
    let sc = pod
        .linux
        .as_mut()
        .unwrap()
        .security_context
        .as_mut()
        .unwrap();
    sc.namespace_options.as_mut().unwrap().network = NamespaceMode::Node as i32;
    let pod_id = env.run_pod(&pod, handler);
    let port = free_port();
    let web = httpd("pong-from-hostnet", port);
    let cid = env.run_container(
        &pod_id,
        &pod,
        &env.container_config(&pod, "web", &strs(&web)),
    );

    let net = exec_out(cri, &cid, &["readlink", "/proc/self/ns/net"]);
    let host = std::fs::read_link("/proc/self/ns/net").unwrap();
    assert_eq!(net.trim(), host.to_string_lossy());
    assert!(
        env.netns_files().is_empty(),
        "a netns was made for a host-network pod"
    );
    // The server listens on the host itself.
    let addr = format!("127.0.0.1:{port}");
    let body = wait_until(
        &format!("the pod at {addr}"),
        Duration::from_secs(20),
        || http_get(&addr),
    );
    assert_eq!(body.trim(), "pong-from-hostnet");

    stop_and_remove_pod(&env, &pod_id);
    env.assert_clean();
}

fn ten_pods_started_in_parallel_all_run_and_clean_up(v: Version, handler: &str) {
    let env = CriEnv::start(v);
    let shims = env.sample_shims();
    env.pull_busybox();
    let t = Instant::now();
    let pods: Vec<(String, String)> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..10)
            .map(|i| {
                let env = &env;
                s.spawn(move || {
                    let cri = env.new_cri();
                    let pod = env.pod_config(&format!("par{i}"));
                    let pod_id = cri
                        .run_pod_sandbox(&pod, handler)
                        .unwrap_or_else(|e| panic!("RunPodSandbox par{i}: {e}"));
                    let cfg = env.container_config(&pod, "c", &["sleep", "600"]);
                    let cid = cri
                        .create_container(&pod_id, &cfg, &pod)
                        .unwrap_or_else(|e| panic!("CreateContainer par{i}: {e}"));
                    cri.start_container(&cid)
                        .unwrap_or_else(|e| panic!("StartContainer par{i}: {e}"));
                    (pod_id, cid)
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    eprintln!(
        "10 pods with a container each, in parallel: {:?}",
        t.elapsed()
    );
    let cri = env.cri();
    let mut ips: Vec<String> = pods.iter().map(|(p, _)| pod_ip(&env, p)).collect();
    for (_, c) in &pods {
        let st = cri.container_status(c).unwrap();
        assert_eq!(st.state, ContainerState::ContainerRunning as i32, "{st:?}");
    }
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 10, "pod IPs not distinct: {ips:?}");

    std::thread::scope(|s| {
        for (pod_id, _) in &pods {
            let env = &env;
            s.spawn(move || {
                let cri = env.new_cri();
                cri.stop_pod_sandbox(pod_id).unwrap();
                cri.remove_pod_sandbox(pod_id).unwrap();
            });
        }
    });
    assert!(cri.list_pod_sandbox().unwrap().is_empty());
    env.assert_clean();
    shims.assert_none_resident(RESIDENT);
}

fn pods_keep_running_across_a_containerd_restart_and_stop_afterwards(v: Version, handler: &str) {
    let mut env = CriEnv::start(v);
    env.pull_busybox();
    let pod = env.pod_config("survivor");
    let pod_id = env.run_pod(&pod, handler);
    let cid = env.run_container(
        &pod_id,
        &pod,
        &env.container_config(&pod, "c", &["sleep", "600"]),
    );
    let ip = pod_ip(&env, &pod_id);
    let shims = env.sample_shims();

    env.restart_containerd();
    let cri = env.cri();
    let st = cri.pod_sandbox_status(&pod_id).unwrap();
    assert_eq!(
        st.state,
        PodSandboxState::SandboxReady as i32,
        "{st:?}\n{}",
        env.log_tails()
    );
    assert_eq!(st.network.map(|n| n.ip).unwrap_or_default(), ip);
    let c = cri.container_status(&cid).unwrap();
    assert_eq!(
        c.state,
        ContainerState::ContainerRunning as i32,
        "{c:?}\n{}",
        env.log_tails()
    );
    assert_eq!(
        exec_out(cri, &cid, &["echo", "still", "here"]),
        "still here\n"
    );

    cri.stop_container(&cid, 0)
        .unwrap_or_else(|e| panic!("StopContainer after the restart: {e}\n{}", env.log_tails()));
    assert_eq!(cri.container_status(&cid).unwrap().exit_code, 137);
    stop_and_remove_pod(&env, &pod_id);
    env.assert_clean();
    shims.assert_none_resident(RESIDENT);
}

fn bad_requests_fail_clearly_and_leave_nothing_behind(v: Version, handler: &str) {
    let env = CriEnv::start(v);
    let cri = env.cri();
    env.pull_busybox();

    for (what, e) in [
        (
            "PodSandboxStatus",
            cri.pod_sandbox_status("no-such-pod").unwrap_err(),
        ),
        (
            "ContainerStatus",
            cri.container_status("no-such-container").unwrap_err(),
        ),
        (
            "ExecSync",
            cri.exec_sync("no-such-container", &["true"], 5)
                .unwrap_err(),
        ),
        (
            "StartContainer",
            cri.start_container("no-such-container").unwrap_err(),
        ),
    ] {
        assert_eq!(e.code(), Code::NotFound, "{what} of an unknown id: {e}");
    }
    // Removing what is not there is idempotent, as kubelet expects.
    cri.remove_pod_sandbox("no-such-pod").unwrap();
    cri.remove_container("no-such-container").unwrap();
    let e = cri.stop_pod_sandbox("no-such-pod");
    match v {
        // containerd 1.6.20's own bug (fixed in 2.x): NotFound.
        Version::V1_6 => assert_eq!(e.unwrap_err().code(), Code::NotFound),
        Version::V2_1 => e.unwrap(),
    }

    let pod = env.pod_config("dup");
    let pod_id = env.run_pod(&pod, handler);
    // The same name and uid again: refused, and nothing half-made stays.
    let e = cri.run_pod_sandbox(&pod, handler).unwrap_err();
    assert!(e.message().contains("reserved"), "duplicate pod: {e}");
    // An unknown runtime handler: refused by name.
    let other = env.pod_config("other");
    let e = cri.run_pod_sandbox(&other, "no-such-handler").unwrap_err();
    assert!(
        e.message().contains("no-such-handler"),
        "unknown handler: {e}"
    );
    let pods = cri.list_pod_sandbox().unwrap();
    assert_eq!(pods.len(), 1, "{pods:?}");
    assert_eq!(env.netns_files().len(), 1, "{:?}", env.netns_files());

    // A container for a pod that is gone.
    stop_and_remove_pod(&env, &pod_id);
    let cfg = env.container_config(&pod, "late", &["sleep", "600"]);
    let e = cri.create_container(&pod_id, &cfg, &pod).unwrap_err();
    assert_eq!(
        e.code(),
        Code::NotFound,
        "CreateContainer in a removed pod: {e}"
    );
    assert!(cri.list_containers(None).unwrap().is_empty());
    env.assert_clean();
}

// ---- containerd 2.1's other sandbox modes ------------------------------------

/// The shim and proxy-plugin configs are valid for containerd 2.1: its CRI
/// comes up ready with them.
#[test]
fn v2_1_accepts_the_shim_and_proxy_sandbox_mode_configs() {
    for mode in [SandboxMode::Shim, SandboxMode::Proxy] {
        let env = CriEnv::start_with(Version::V2_1, mode);
        let v = env.cri().version().unwrap();
        assert_eq!(v.runtime_name, "containerd", "{mode:?}");
        env.assert_clean();
    }
}

/// A pod and two containers in a Sandbox API mode; returns the kuasar
/// shim execs containerd made for them.
fn sandbox_mode_pod_runs_and_cleans_up(mode: SandboxMode) -> Vec<String> {
    let env = CriEnv::start_counting_shim_execs(Version::V2_1, mode);
    let shims = env.sample_shims();
    let cri = env.cri();
    env.pull_busybox();
    let pod: PodSandboxConfig = env.pod_config("mode");
    let pod_id = env.run_pod(&pod, KUASAR_RUNC);
    assert!(pod_ip(&env, &pod_id).starts_with("10.241."));
    let cid = env.run_container(
        &pod_id,
        &pod,
        &env.container_config(&pod, "c", &["sleep", "600"]),
    );
    assert_eq!(exec_out(cri, &cid, &["echo", "hi"]), "hi\n");
    let second = env.run_container(
        &pod_id,
        &pod,
        &env.container_config(&pod, "d", &["sleep", "600"]),
    );
    assert_eq!(
        exec_out(cri, &second, &["hostname"]),
        exec_out(cri, &cid, &["hostname"])
    );
    // One pod, one network namespace: both containers see the pod's IP.
    let ip = pod_ip(&env, &pod_id);
    for c in [&cid, &second] {
        assert!(exec_out(cri, c, &["ip", "-4", "addr"]).contains(&ip), "{c}");
    }
    stop_and_remove_pod(&env, &pod_id);
    env.assert_clean();
    shims.assert_none_resident(RESIDENT);
    env.shim_execs()
}

#[test]
fn v2_1_shim_sandbox_mode_pod_runs_and_cleans_up() {
    let execs = sandbox_mode_pod_runs_and_cleans_up(SandboxMode::Shim);
    // containerd runs `start` and `delete` for the sandbox; its containers
    // get the pod's address from `start` too (a plain address is version 2).
    assert!(execs.iter().any(|e| e.ends_with(" start")), "{execs:?}");
}

#[test]
fn v2_1_proxy_sandbox_mode_pod_runs_and_cleans_up_without_any_shim_exec() {
    let execs = sandbox_mode_pod_runs_and_cleans_up(SandboxMode::Proxy);
    assert!(execs.is_empty(), "containerd ran kuasar shims: {execs:?}");
}

/// hack/config's snippets parse in the containerd they are for, and name
/// the kuasar runtimes under the CRI handler names the RuntimeClasses use.
#[test]
fn hack_config_snippets_parse_in_their_containerd_with_both_handlers() {
    let dir = kuasar_e2e::workspace().join("hack/config");
    for (file, v, modes) in [
        ("containerd-1.6.toml", Version::V1_6, None),
        (
            "containerd-2.x.toml",
            Version::V2_1,
            Some("sandboxer = 'podsandbox'"),
        ),
        (
            "containerd-2.x-shim.toml",
            Version::V2_1,
            Some("sandboxer = 'shim'"),
        ),
        (
            "containerd-2.x-proxy.toml",
            Version::V2_1,
            Some("sandboxer = 'kuasar'"),
        ),
    ] {
        let o = kuasar_e2e::run_cmd(
            std::process::Command::new(v.bin_dir().join("containerd"))
                .arg("--config")
                .arg(dir.join(file))
                .args(["config", "dump"]),
            Duration::from_secs(30),
        );
        assert!(o.ok(), "{file}: {o}");
        for (handler, ty) in [
            ("kuasar-runc", "io.containerd.kuasarrunc.v1"),
            ("kuasar-wasm", "io.containerd.kuasarwasm.v1"),
            ("kuasar-vmm", "io.containerd.kuasarvmm.v1"),
        ] {
            assert!(
                o.stdout.contains(&format!("runtimes.{handler}]")),
                "{file}: no {handler}"
            );
            assert!(o.stdout.contains(ty), "{file}: no {ty}");
        }
        if let Some(m) = modes {
            assert!(o.stdout.contains(m), "{file}: not {m}");
        }
        let class =
            |h: &str| std::fs::read_to_string(dir.join(format!("runtimeclass-{h}.yaml"))).unwrap();
        for h in ["kuasar-runc", "kuasar-wasm", "kuasar-vmm"] {
            let y = class(h);
            assert!(y.contains("kind: RuntimeClass") && y.contains(&format!("handler: {h}\n")));
        }
    }
}

/// The harness itself: an env dropped by a panicking test with pods running
/// (one with a host port, so portmap made rules) leaves nothing on the host.
#[test]
fn cri_env_dropped_by_a_panicking_test_leaves_nothing_behind() {
    type Seen = (std::path::PathBuf, String, String, String, Vec<u32>);
    let seen: std::sync::Mutex<Option<Seen>> = std::sync::Mutex::new(None);
    let result = std::panic::catch_unwind(|| {
        let env = CriEnv::start(Version::V1_6);
        env.pull_busybox();
        let mut pod = env.pod_config("doomed");
        pod.port_mappings = vec![PortMapping {
            protocol: Protocol::Tcp as i32,
            container_port: 8080,
            host_port: free_port() as i32,
            host_ip: String::new(),
        }];
        let pod_id = env.run_pod(&pod, KUASAR_RUNC);
        env.run_container(
            &pod_id,
            &pod,
            &env.container_config(&pod, "c", &["sleep", "600"]),
        );
        assert!(!env.netns_files().is_empty());
        let marker = env.dir.display().to_string();
        let pids: Vec<u32> = kuasar_e2e::processes()
            .into_iter()
            .filter(|(_, cmd)| cmd.contains(&marker))
            .map(|(pid, _)| pid)
            .chain(kuasar_e2e::cgroup::procs(&env.name()))
            .collect();
        assert!(
            pids.len() >= 4,
            "registry, sandboxer, containerd, pod: {pids:?}"
        );
        *seen.lock().unwrap() = Some((
            env.dir.clone(),
            env.name(),
            env.net_name(),
            env.bridge(),
            pids,
        ));
        panic!("deliberate panic with a pod running");
    });
    assert!(result.is_err());
    let (dir, cg, net, bridge, pids) = seen.lock().unwrap().take().expect("env started");
    for pid in pids {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie_or_gone = state
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().next())
            .is_none_or(|s| s == "Z");
        assert!(zombie_or_gone, "pid {pid} survived the env: {state}");
    }
    assert!(kuasar_e2e::cgroup::dirs(&cg).is_empty());
    assert!(kuasar_e2e::mounts_under(&dir).is_empty());
    assert!(!dir.exists(), "{} not removed", dir.display());
    assert!(
        !std::path::Path::new("/sys/class/net")
            .join(&bridge)
            .exists(),
        "bridge {bridge} not removed"
    );
    let nat = kuasar_e2e::run_cmd(
        std::process::Command::new("iptables-save").args(["-t", "nat"]),
        Duration::from_secs(20),
    );
    assert!(
        !nat.stdout.contains(&format!("\\\"{net}\\\"")),
        "{}",
        nat.stdout
    );
}

/// A WASI program as a Kubernetes pod: the pod runs through the
/// `kuasar-wasm` handler, its image is pulled from the registry, and the
/// program's output reaches the container log.
fn wasm_pod_runs_a_wasi_program_pulled_from_the_registry(v: Version, mode: SandboxMode) {
    let env = CriEnv::start_with(v, mode);
    let shims = env.sample_shims();
    let cri = env.cri();
    let image = env.push_wasm_image();
    cri.pull_image(&image, None)
        .unwrap_or_else(|e| panic!("PullImage {image}: {e}"));
    let pod = env.pod_config("wasm");
    let pod_id = env.run_pod(&pod, KUASAR_WASM);
    let mut cfg = env.container_config(&pod, "hello", &["/hello.wasm"]);
    cfg.image.as_mut().unwrap().image = image;
    let cid = env.run_container(&pod_id, &pod, &cfg);
    let st = wait_until("the program to exit", Duration::from_secs(30), || {
        cri.container_status(&cid)
            .ok()
            .filter(|s| s.state == ContainerState::ContainerExited as i32)
    });
    assert_eq!(
        (st.exit_code, st.reason.as_str()),
        (0, "Completed"),
        "{st:?}"
    );
    let log = std::fs::read_to_string(env.dir.join("logs/wasm/hello.log")).unwrap();
    assert!(log.contains(" stdout F hello from wasm"), "{log}");
    assert!(log.contains(" stderr F hello on stderr"), "{log}");
    stop_and_remove_pod(&env, &pod_id);
    env.assert_clean();
    shims.assert_none_resident(RESIDENT);
}

#[test]
fn kuasar_wasm_v1_6_wasm_pod_runs_a_wasi_program_pulled_from_the_registry() {
    wasm_pod_runs_a_wasi_program_pulled_from_the_registry(Version::V1_6, SandboxMode::PodSandbox);
}

#[test]
fn kuasar_wasm_v2_1_wasm_pod_runs_a_wasi_program_pulled_from_the_registry() {
    wasm_pod_runs_a_wasi_program_pulled_from_the_registry(Version::V2_1, SandboxMode::PodSandbox);
}

#[test]
fn kuasar_wasm_v2_1_proxy_mode_wasm_pod_runs_a_wasi_program_with_no_pause_container() {
    wasm_pod_runs_a_wasi_program_pulled_from_the_registry(Version::V2_1, SandboxMode::Proxy);
}

/// Bad input in proxy mode: a pod-wide PID namespace needs a process to
/// hold it, which a sandbox without a pause container does not have. The
/// container is refused with an error that says so; the pod stays usable
/// and removing it leaves nothing behind. Sandbox API calls for a pod that
/// does not exist are clear errors too.
#[test]
fn v2_1_proxy_mode_refuses_a_pod_wide_pid_namespace_clearly_and_leaves_nothing() {
    let env = CriEnv::start_with(Version::V2_1, SandboxMode::Proxy);
    let cri = env.cri();
    env.pull_busybox();
    let mut pod = env.pod_config("pidns-proxy");
    share_pid_namespace(&mut pod);
    let pod_id = env.run_pod(&pod, KUASAR_RUNC);
    let cfg = env.container_config(&pod, "a", &["sleep", "600"]);
    let err = match cri.create_container(&pod_id, &cfg, &pod) {
        Ok(id) => cri
            .start_container(&id)
            .err()
            .unwrap_or_else(|| panic!("a pod-wide PID namespace ran in proxy mode ({id})")),
        Err(e) => e,
    };
    let text = format!("{err:?}");
    assert!(text.contains("pause-container mode"), "{text}");
    assert!(cri.pod_sandbox_status(&pod_id).is_ok());
    assert!(cri.pod_sandbox_status("no-such-pod").is_err());
    stop_and_remove_pod(&env, &pod_id);
    env.assert_clean();
}

/// qemu processes of a CRI env.
fn qemu_count(env: &CriEnv) -> usize {
    kuasar_e2e::env_processes(&env.dir, "qemu-system").len()
}

/// A pod through the `kuasar-vmm` handler: one VM holds all its
/// containers (1.6: the pause container runs in the VM, no pause process
/// on the host; 2.1 proxy mode: no pause container and no shim exec). The
/// containers run on the guest kernel, share the VM's network and the pod's
/// hostname, ExecSync and logs work, and stopping the pod stops the VM.
fn vmm_pod_runs_its_containers_in_one_vm(v: Version, mode: SandboxMode) {
    let Some(guest) = kuasar_e2e::guest_dir() else {
        panic!("KUASAR_GUEST_DIR names the guest image (hack/test.sh sets it)");
    };
    let release = std::fs::read_to_string(guest.join("kernel.release")).unwrap();
    let env = CriEnv::start_counting_shim_execs(v, mode);
    let cri = env.cri();
    env.pull_busybox();
    let pod = env.pod_config("vmpod");
    let pod_id = env.run_pod(&pod, KUASAR_VMM);
    let server = env.container_config(
        &pod,
        "server",
        &[
            "sh",
            "-c",
            "echo served-in-vm > /tmp/index.html; echo server-up; exec httpd -f -p 8080 -h /tmp",
        ],
    );
    let sid = env.run_container(&pod_id, &pod, &server);
    let client = env.container_config(&pod, "client", &["sleep", "600"]);
    let cid = env.run_container(&pod_id, &pod, &client);
    assert_eq!(
        qemu_count(&env),
        1,
        "one VM for the pod\n{}",
        env.log_tails()
    );
    for id in [&sid, &cid] {
        assert_eq!(exec_out(cri, id, &["uname", "-r"]).trim(), release.trim());
        assert_eq!(exec_out(cri, id, &["hostname"]).trim(), "vmpod");
    }
    let page = wait_until("the server in the VM", Duration::from_secs(30), || {
        cri.exec_sync(
            &cid,
            &["wget", "-qO-", "http://127.0.0.1:8080/index.html"],
            10,
        )
        .ok()
        .filter(|r| r.exit_code == 0)
    });
    assert_eq!(String::from_utf8_lossy(&page.stdout).trim(), "served-in-vm");
    let r = cri
        .exec_sync(&cid, &["sh", "-c", "echo out; echo err >&2; exit 3"], 10)
        .unwrap();
    assert_eq!(r.exit_code, 3);
    assert_eq!(String::from_utf8_lossy(&r.stdout).trim(), "out");
    assert_eq!(String::from_utf8_lossy(&r.stderr).trim(), "err");
    let log = wait_until("the server's log", Duration::from_secs(10), || {
        std::fs::read_to_string(env.dir.join("logs/vmpod/server.log"))
            .ok()
            .filter(|l| l.contains("server-up"))
    });
    assert!(log.contains(" stdout F server-up"), "{log}");
    cri.stop_container(&cid, 2).unwrap();
    let st = cri.container_status(&cid).unwrap();
    assert_eq!(st.state, ContainerState::ContainerExited as i32, "{st:?}");
    stop_and_remove_pod(&env, &pod_id);
    // The VM powers off as the pod's last task is deleted.
    wait_until("the VM to power off", Duration::from_secs(10), || {
        (qemu_count(&env) == 0).then_some(())
    });
    env.assert_clean();
    if mode == SandboxMode::Proxy {
        assert_eq!(
            env.shim_execs(),
            Vec::<String>::new(),
            "proxy mode execs no shim"
        );
    }
}

#[test]
fn kuasar_vmm_v1_6_pod_runs_its_containers_in_one_vm() {
    vmm_pod_runs_its_containers_in_one_vm(Version::V1_6, SandboxMode::PodSandbox);
}

#[test]
fn kuasar_vmm_v2_1_proxy_mode_pod_runs_its_containers_in_one_vm() {
    vmm_pod_runs_its_containers_in_one_vm(Version::V2_1, SandboxMode::Proxy);
}

// ---- containerd restarts with pods of every backend ----------------------------

/// A pod of every backend (runc, wasm, a microVM) in `mode`, through two
/// containerd restarts: after each, every pod is still ready, every
/// container still running with the same pid (2.1's leak check at its
/// restart keeps them), exec works in the runc and VM containers; then
/// every container stops with its exit status and nothing is left.
fn pods_of_every_backend_survive_two_containerd_restarts(v: Version, mode: SandboxMode) {
    assert!(
        kuasar_e2e::guest_dir().is_some(),
        "KUASAR_GUEST_DIR names the guest image (hack/test.sh sets it)"
    );
    let mut env = CriEnv::start_counting_shim_execs(v, mode);
    env.pull_busybox();
    let wasm_image = env.push_wasm_image();
    env.cri()
        .pull_image(&wasm_image, None)
        .unwrap_or_else(|e| panic!("PullImage {wasm_image}: {e}"));
    let mut pods = Vec::new();
    for (name, handler) in [("r", KUASAR_RUNC), ("w", KUASAR_WASM), ("v", KUASAR_VMM)] {
        let pod = env.pod_config(&format!("restart-{name}"));
        let pod_id = env.run_pod(&pod, handler);
        let cfg = if handler == KUASAR_WASM {
            let mut cfg = env.container_config(&pod, "c", &["/sleep.wasm"]);
            cfg.image.as_mut().unwrap().image = wasm_image.clone();
            cfg
        } else {
            env.container_config(&pod, "c", &["sleep", "600"])
        };
        let cid = env.run_container(&pod_id, &pod, &cfg);
        pods.push((handler, pod_id, cid));
    }
    let pids = |env: &CriEnv| -> Vec<String> {
        pods.iter()
            .map(|(_, _, cid)| {
                let out = env.ctr_ok(&["task", "ls"]);
                out.lines()
                    .find(|l| l.starts_with(cid.as_str()))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .unwrap_or_else(|| panic!("{cid} not in ctr task ls: {out}"))
                    .to_string()
            })
            .collect()
    };
    let before = pids(&env);
    for round in 1..=2 {
        env.restart_containerd();
        let cri = env.cri();
        for (handler, pod_id, cid) in &pods {
            let st = cri.pod_sandbox_status(pod_id).unwrap();
            assert_eq!(
                st.state,
                PodSandboxState::SandboxReady as i32,
                "{handler} pod after restart {round}: {st:?}\n{}",
                env.log_tails()
            );
            let c = cri.container_status(cid).unwrap();
            assert_eq!(
                c.state,
                ContainerState::ContainerRunning as i32,
                "{handler} container after restart {round}: {c:?}\n{}",
                env.log_tails()
            );
            if *handler != KUASAR_WASM {
                assert_eq!(
                    exec_out(cri, cid, &["echo", "still", "here"]),
                    "still here\n",
                    "{handler}"
                );
            }
        }
        assert_eq!(pids(&env), before, "task pids after restart {round}");
    }
    let cri = env.cri();
    for (handler, pod_id, cid) in &pods {
        cri.stop_container(cid, 0)
            .unwrap_or_else(|e| panic!("StopContainer {handler}: {e}\n{}", env.log_tails()));
        let st = cri.container_status(cid).unwrap();
        assert_eq!(
            (st.state, st.exit_code),
            (ContainerState::ContainerExited as i32, 137),
            "{handler}: {st:?}"
        );
        stop_and_remove_pod(&env, pod_id);
    }
    wait_until("the VM to power off", Duration::from_secs(10), || {
        (qemu_count(&env) == 0).then_some(())
    });
    env.assert_clean();
    if mode == SandboxMode::Proxy {
        // No `start` ever. A task containerd re-loaded at its restart is
        // closed with its own dead-shim cleanup once deleted (containerd
        // execs `<shim> delete` then, for containerd-shim-runc-v2 too):
        // one `delete` per such container, nothing else.
        let execs = env.shim_execs();
        assert_eq!(execs.len(), pods.len(), "{execs:?}");
        for (_, _, cid) in &pods {
            assert!(
                execs
                    .iter()
                    .any(|e| e.ends_with(" delete") && e.contains(&format!("-id {cid} "))),
                "{cid}: {execs:?}"
            );
        }
    }
}

#[test]
fn every_backend_v1_6_pods_survive_two_containerd_restarts() {
    pods_of_every_backend_survive_two_containerd_restarts(Version::V1_6, SandboxMode::PodSandbox);
}

#[test]
fn every_backend_v2_1_pods_survive_two_containerd_restarts() {
    pods_of_every_backend_survive_two_containerd_restarts(Version::V2_1, SandboxMode::PodSandbox);
}

#[test]
fn every_backend_v2_1_shim_mode_pods_survive_two_containerd_restarts() {
    pods_of_every_backend_survive_two_containerd_restarts(Version::V2_1, SandboxMode::Shim);
}

#[test]
fn every_backend_v2_1_proxy_mode_pods_survive_two_containerd_restarts() {
    pods_of_every_backend_survive_two_containerd_restarts(Version::V2_1, SandboxMode::Proxy);
}
