//! End-to-end: real containerd (1.6.20 and 2.1.9), real ctr, real runc,
//! through `io.containerd.kuasarrunc.v1` and the kuasar-sandboxer. Every
//! test runs against both containerd versions and ends by checking that no
//! shim process stayed and nothing was left behind.
//!
//! `KUASAR_E2E_RUNTIME=io.containerd.runc.v2` runs the same scenarios
//! through containerd's own shim, to check the suite itself; the scenarios
//! that only make sense with the sandboxer then skip what does not apply.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use kuasar_e2e::{is_kuasar, run_cmd, runtime_under_test, Env, Version};
use kuasar_protocol::{wire, Client, Code, Error};

macro_rules! both_versions {
    ($($name:ident),* $(,)?) => {
        mod v1_6 { $( #[test] fn $name() { super::$name(kuasar_e2e::Version::V1_6) } )* }
        mod v2_1 { $( #[test] fn $name() { super::$name(kuasar_e2e::Version::V2_1) } )* }
    };
}

both_versions!(
    output_is_captured_and_no_shim_stays,
    exit_codes_0_7_and_137_reach_ctr,
    exec_with_and_without_terminal,
    kill_ps_pause_resume_and_metrics,
    log_uri_file_and_binary_receive_output,
    twenty_concurrent_containers_run_and_clean_up,
    containerd_restart_keeps_tasks_waitable_and_killable,
    sandboxer_down_fails_start_clearly_and_leaks_nothing,
    hostile_input_on_private_socket_is_refused_and_daemon_keeps_serving,
);

fn output_is_captured_and_no_shim_stays(v: Version) {
    let env = Env::start(v);
    let o = env.run_rm(KUASAR_RUNC, "c1", &["echo", "hello", "kuasar"]);
    assert!(o.ok(), "{o}\n{}", env.log_tails());
    assert_eq!(o.stdout.trim(), "hello kuasar");
    let o = env.run_rm(KUASAR_RUNC, "c2", &["sh", "-c", "echo out; echo err >&2"]);
    assert!(o.ok(), "{o}");
    assert_eq!(o.stdout.trim(), "out");
    assert_eq!(o.stderr.trim(), "err");
    env.assert_clean();
}

fn exit_codes_0_7_and_137_reach_ctr(v: Version) {
    let env = Env::start(v);
    assert_eq!(env.run_rm(KUASAR_RUNC, "e0", &["true"]).status, Some(0));
    assert_eq!(
        env.run_rm(KUASAR_RUNC, "e7", &["sh", "-c", "exit 7"])
            .status,
        Some(7)
    );
    // A foreground ctr learns a SIGKILL of the init process from Wait.
    let mut fg = env.ctr_command();
    fg.args([
        "run",
        "--rm",
        "--runtime",
        KUASAR_RUNC,
        IMAGE,
        "e137",
        "sleep",
        "600",
    ]);
    let waiter = std::thread::spawn(move || run_cmd(&mut fg, Duration::from_secs(60)));
    let mut tries = 0;
    while env.task_status("e137").as_deref() != Some("RUNNING") {
        tries += 1;
        assert!(tries < 400, "e137 never ran");
        std::thread::sleep(Duration::from_millis(25));
    }
    env.ctr_ok(&["task", "kill", "-s", "KILL", "e137"]);
    let o = waiter.join().unwrap();
    assert_eq!(o.status, Some(137), "{o}");
    env.assert_clean();
}

fn exec_with_and_without_terminal(v: Version) {
    let env = Env::start(v);
    env.run_detached(KUASAR_RUNC, "x1", &["sleep", "600"]);
    let o = env.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        "x1",
        "sh",
        "-c",
        "echo in-exec; exit 3",
    ]);
    assert_eq!(o.status, Some(3), "{o}");
    assert_eq!(o.stdout.trim(), "in-exec");
    // ctr -t needs a terminal on its own stdin: run it under script(1).
    let ctr = format!(
        "{} --address {} task exec -t --exec-id e2 x1 sh -c 'tty; echo tty-ok'",
        env.version.bin_dir().join("ctr").display(),
        env.grpc_socket().display()
    );
    let o = run_cmd(
        Command::new("script").args(["-qec", &ctr, "/dev/null"]),
        Duration::from_secs(60),
    );
    assert!(o.ok(), "{o}");
    assert!(
        o.stdout.contains("/dev/pts/"),
        "exec did not get a terminal: {o}"
    );
    assert!(o.stdout.contains("tty-ok"), "{o}");
    // Stdin reaches an exec and its EOF ends it.
    let mut cat = env.ctr_command();
    cat.args(["task", "exec", "--exec-id", "e3", "x1", "cat"]);
    let mut child = cat
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"through stdin\n")
        .unwrap();
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(out.trim(), "through stdin");
    env.remove("x1");
    env.assert_clean();
}

fn kill_ps_pause_resume_and_metrics(v: Version) {
    let env = Env::start(v);
    env.run_detached(
        KUASAR_RUNC,
        "k1",
        &[
            "sh",
            "-c",
            "trap 'exit 42' TERM; while true; do sleep 0.1; done",
        ],
    );
    env.wait_status("k1", "RUNNING");
    let ps = env.ctr_ok(&["task", "ps", "k1"]);
    let pid_line = ps.lines().nth(1).expect("ps lists the init process");
    assert!(
        pid_line
            .split_whitespace()
            .next()
            .unwrap()
            .parse::<u32>()
            .unwrap()
            > 1,
        "{ps}"
    );
    env.ctr_ok(&["task", "pause", "k1"]);
    env.wait_status("k1", "PAUSED");
    env.ctr_ok(&["task", "resume", "k1"]);
    env.wait_status("k1", "RUNNING");
    let metrics = env.ctr_ok(&["task", "metrics", "k1"]);
    assert!(
        metrics.contains("memory.usage_in_bytes") || metrics.contains("memory.usage"),
        "{metrics}"
    );
    assert!(metrics.contains("pids.current"), "{metrics}");
    env.ctr_ok(&["task", "kill", "k1"]);
    env.wait_status("k1", "STOPPED");
    // Killing an exited task is NotFound in containerd's eyes.
    let o = env.ctr(&["task", "kill", "k1"]);
    assert!(!o.ok(), "{o}");
    assert!(o.stderr.contains("already finished"), "{o}");
    let o = env.ctr(&["task", "rm", "k1"]);
    assert!(o.ok(), "{o}");
    env.ctr_ok(&["container", "rm", "k1"]);
    env.assert_clean();
}

fn log_uri_file_and_binary_receive_output(v: Version) {
    let env = Env::start(v);
    let log = env.dir.join("logs/out.log");
    let uri = format!("file://{}", log.display());
    let o = env.ctr(&[
        "run",
        "--rm",
        "--log-uri",
        &uri,
        "--runtime",
        KUASAR_RUNC,
        IMAGE,
        "l1",
        "sh",
        "-c",
        "echo to-file; echo err-file >&2",
    ]);
    assert!(o.ok(), "{o}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("to-file") && text.contains("err-file"),
        "{text:?}"
    );

    let driver = env.dir.join("logger.sh");
    let out = env.dir.join("bin-out.txt");
    let err = env.dir.join("bin-err.txt");
    std::fs::write(
        &driver,
        format!(
            "#!/bin/sh\n[ \"$CONTAINER_ID\" = l2 ] || exit 9\nexec 5>&-\ncat <&3 > {} &\ncat <&4 > {} &\nwait\n",
            out.display(),
            err.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&driver, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let uri = format!("binary://{}", driver.display());
    let o = env.ctr(&[
        "run",
        "--rm",
        "--log-uri",
        &uri,
        "--runtime",
        KUASAR_RUNC,
        IMAGE,
        "l2",
        "sh",
        "-c",
        "echo to-bin; echo err-bin >&2",
    ]);
    assert!(o.ok(), "{o}");
    for _ in 0..100 {
        if std::fs::read_to_string(&err)
            .unwrap_or_default()
            .contains("err-bin")
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(std::fs::read_to_string(&out).unwrap().trim(), "to-bin");
    assert_eq!(std::fs::read_to_string(&err).unwrap().trim(), "err-bin");
    env.assert_clean();
}

fn twenty_concurrent_containers_run_and_clean_up(v: Version) {
    let env = Env::start(v);
    let ids: Vec<String> = (0..20).map(|i| format!("p{i}")).collect();
    std::thread::scope(|s| {
        for id in &ids {
            let env = &env;
            s.spawn(move || env.run_detached(KUASAR_RUNC, id, &["sleep", "600"]));
        }
    });
    for id in &ids {
        assert_eq!(env.task_status(id).as_deref(), Some("RUNNING"), "{id}");
    }
    // While they run, containerd, the sandboxer and the containers are all
    // there is: no shim process per container.
    assert!(
        env.shim_processes().is_empty(),
        "{:?}",
        env.shim_processes()
    );
    std::thread::scope(|s| {
        for id in &ids {
            let env = &env;
            s.spawn(move || env.remove(id));
        }
    });
    env.assert_clean();
}

fn containerd_restart_keeps_tasks_waitable_and_killable(v: Version) {
    let mut env = Env::start(v);
    env.run_detached(KUASAR_RUNC, "r1", &["sleep", "600"]);
    env.run_detached(KUASAR_RUNC, "r2", &["sleep", "600"]);
    env.restart_containerd();
    assert_eq!(
        env.task_status("r1").as_deref(),
        Some("RUNNING"),
        "{}",
        env.log_tails()
    );
    assert_eq!(env.task_status("r2").as_deref(), Some("RUNNING"));
    // attach waits on the task (Task.Wait) and reports its exit status.
    let mut attach = env.ctr_command();
    attach.args(["task", "attach", "r1"]);
    let waiter = std::thread::spawn(move || run_cmd(&mut attach, Duration::from_secs(60)));
    std::thread::sleep(Duration::from_millis(500));
    env.ctr_ok(&["task", "kill", "-s", "KILL", "r1"]);
    let o = waiter.join().unwrap();
    assert_eq!(o.status, Some(137), "{o}");
    env.remove("r1");
    env.remove("r2");
    env.assert_clean();
}

fn sandboxer_down_fails_start_clearly_and_leaks_nothing(v: Version) {
    let mut env = Env::start(v);
    env.stop_sandboxer();
    let o = env.run_rm(KUASAR_RUNC, "d1", &["true"]);
    assert!(!o.ok(), "{o}");
    assert!(o.stderr.contains("kuasar sandboxer unreachable"), "{o}");
    let _ = env.ctr(&["container", "rm", "d1"]);
    assert!(!env.ctr_ok(&["container", "ls", "-q"]).contains("d1"));
    assert!(env.shim_processes().is_empty());
    assert!(env.leftovers().is_empty(), "{:?}", env.leftovers());
    // Back up, everything works again.
    env.start_sandboxer();
    let o = env.run_rm(KUASAR_RUNC, "d2", &["echo", "back"]);
    assert!(o.ok() && o.stdout.trim() == "back", "{o}");
    env.assert_clean();
}

fn resolve(kind: &str, id: &str) -> wire::ResolveRequest {
    wire::ResolveRequest {
        kind: kind.into(),
        namespace: "default".into(),
        id: id.into(),
        bundle: "/nonexistent/bundle".into(),
        ..Default::default()
    }
}

fn hostile_input_on_private_socket_is_refused_and_daemon_keeps_serving(v: Version) {
    let mut env = Env::start(v);
    let sock = env.private_socket();
    let raw = |bytes: &[u8]| -> Vec<u8> {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        s.write_all(bytes).unwrap();
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut reply = Vec::new();
        let _ = s.read_to_end(&mut reply);
        reply
    };
    let error_reply = |reply: &[u8]| -> Option<(i32, String)> {
        let mut r = reply;
        let resp: wire::Response = wire::read_frame(&mut r).ok()?;
        match resp.body? {
            wire::response::Body::Error(e) => Some((e.code, e.message)),
            _ => None,
        }
    };
    // Garbage: read as a huge length prefix, refused.
    let (code, msg) = error_reply(&raw(b"GET / HTTP/1.1\r\n\r\n")).expect("error reply to garbage");
    assert_eq!(code, Code::ResourceExhausted as i32, "{msg}");
    // Oversized frame.
    let (_, msg) =
        error_reply(&raw(&u32::MAX.to_be_bytes())).expect("error reply to oversized frame");
    assert!(msg.contains("exceeds"), "{msg}");
    // A valid length with undecodable protobuf.
    let mut bad = 8u32.to_be_bytes().to_vec();
    bad.extend_from_slice(&[0xff; 8]);
    let (code, _) = error_reply(&raw(&bad)).expect("error reply to malformed protobuf");
    assert_eq!(code, Code::InvalidArgument as i32);
    // Truncated frame then close: the daemon just drops the connection.
    let mut trunc = 100u32.to_be_bytes().to_vec();
    trunc.extend_from_slice(b"abc");
    assert!(raw(&trunc).is_empty());

    let refused = |req: wire::ResolveRequest| -> (Code, String) {
        let mut c = Client::connect(&sock, Duration::from_secs(10)).unwrap();
        match c.resolve(req) {
            Err(Error::Remote { code, message }) => (code, message),
            other => panic!("expected a refusal, got {other:?}"),
        }
    };
    let (code, msg) = refused(resolve("nosuch", "x"));
    assert_eq!(code, Code::InvalidArgument);
    assert!(msg.contains("unknown sandbox kind"), "{msg}");
    for id in ["../x", "a/b", "", &"y".repeat(10_000)] {
        let (code, _) = refused(resolve("runc", id));
        assert_eq!(
            code,
            Code::InvalidArgument,
            "id {:?}",
            &id[..id.len().min(10)]
        );
    }
    let mut bad_group = resolve("runc", "ok");
    bad_group.group = "../../etc".into();
    assert_eq!(refused(bad_group).0, Code::InvalidArgument);
    for kind in ["wasm", "vmm"] {
        let (code, msg) = refused(resolve(kind, "ok"));
        assert_eq!(code, Code::FailedPrecondition);
        assert!(msg.contains("not enabled"), "{msg}");
    }
    let mut c = Client::connect(&sock, Duration::from_secs(10)).unwrap();
    let reply = c
        .delete(wire::DeleteRequest {
            kind: "runc".into(),
            namespace: "default".into(),
            id: "never-existed".into(),
            bundle: String::new(),
        })
        .expect("delete of an unknown id is idempotent");
    assert_eq!(reply.exit_status, 137);
    assert!(reply.exited_at_nanos > 0);

    assert!(env.sandboxer_alive(), "{}", env.log_tails());
    let o = env.run_rm(KUASAR_RUNC, "h1", &["echo", "ok"]);
    assert!(o.ok() && o.stdout.trim() == "ok", "{o}");
    env.assert_clean();
}
