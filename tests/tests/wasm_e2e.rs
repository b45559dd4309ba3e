//! End-to-end: real containerd (1.6.20 and 2.1.9) and real ctr run WASI
//! programs through `io.containerd.kuasarwasm.v1`: wasmtime instances inside
//! the kuasar-sandboxer. The image (platform wasip1/wasm) holds the
//! repository's WAT programs, compiled with the `wat` crate, and third-party
//! WASI programs from PyPI. Every test ends by checking that no
//! shim process stayed and nothing was left behind.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use kuasar_e2e::{run_cmd, Env, Version};

kuasar_e2e::both_versions!(
    output_exit_codes_and_traps_reach_ctr,
    a_spinning_module_is_killed_and_a_task_api_round_works,
    memory_limit_ends_the_instance_and_publishes_an_oom,
    stdin_files_and_mounts,
    fifty_instances_at_once_without_a_shim_process,
    a_third_party_wasi_program_runs,
    programs_as_wasm_layers_of_an_image,
    sockets_in_the_pods_network_namespace_when_asked,
);

/// Runs `cmd` with `input` on its stdin (then EOF): status, stdout, stderr.
fn with_stdin(cmd: &mut Command, input: &[u8]) -> (Option<i32>, String, String) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn env(v: Version) -> Env {
    let env = Env::start(v);
    env.import_wasm_image();
    env
}

fn output_exit_codes_and_traps_reach_ctr(v: Version) {
    let env = env(v);
    let o = env.wasm_run(&["--rm"], "w-hello", &["/hello.wasm"]);
    assert!(o.ok(), "{o}\n{}", env.log_tails());
    assert_eq!(o.stdout, "hello from wasm\n");
    assert_eq!(o.stderr, "hello on stderr\n");

    let o = env.wasm_run(&["--rm"], "w-exit", &["/exit7.wasm"]);
    assert_eq!(o.status, Some(7), "{o}");

    let o = env.wasm_run(&["--rm"], "w-trap", &["/trap.wasm"]);
    assert_eq!(o.status, Some(134), "{o}");
    assert_eq!(o.stdout, "about to trap\n");
    assert!(o.stderr.contains("wasm instance trapped"), "{o}");
    assert!(o.stderr.contains("unreachable"), "{o}");

    let o = env.wasm_run(
        &["--rm", "--env", "GREETING=hi there"],
        "w-echo",
        &["/echo.wasm", "one", "two words"],
    );
    assert!(o.ok(), "{o}");
    let (args, environ) = o.stdout.split_once("--\n").expect("echo prints --");
    assert_eq!(args, "/echo.wasm\none\ntwo words\n");
    assert!(environ.lines().any(|l| l == "GREETING=hi there"), "{o}");

    let o = env.wasm_run(&["--rm"], "w-component", &["/component.wasm"]);
    assert!(o.ok(), "{o}");
    assert_eq!(o.stdout, "hello from a wasm component\n");

    // Errors at create are clear and leave nothing behind.
    let o = env.wasm_run(&["--rm"], "w-missing", &["/nope.wasm"]);
    assert!(!o.ok());
    assert!(o.stderr.contains("\"/nope.wasm\" not found"), "{o}");
    let o = env.wasm_run(&["--rm"], "w-tmp", &["/tmp"]);
    assert!(!o.ok());
    assert!(o.stderr.contains("not a regular file"), "{o}");
    env.ctr(&["container", "rm", "w-missing", "w-tmp"]);
    env.assert_clean();
}

fn a_spinning_module_is_killed_and_a_task_api_round_works(v: Version) {
    let env = env(v);
    // A foreground ctr learns the end from Wait: SIGKILL gives 137.
    let mut fg = env.wasm_run_command(&["--rm"], "w-spin", &["/spin.wasm"]);
    let waiter = std::thread::spawn(move || run_cmd(&mut fg, Duration::from_secs(60)));
    env.wait_status("w-spin", "RUNNING");
    let ps = env.ctr_ok(&["task", "ps", "w-spin"]);
    assert!(ps.contains("runs inside kuasar-sandboxer"), "{ps}");
    let metrics = env.ctr_ok(&["task", "metrics", "w-spin"]);
    assert!(
        metrics.contains("memory.usage_in_bytes    65536"),
        "{metrics}"
    );
    env.ctr_ok(&["task", "pause", "w-spin"]);
    env.wait_status("w-spin", "PAUSED");
    env.ctr_ok(&["task", "resume", "w-spin"]);
    env.wait_status("w-spin", "RUNNING");
    let o = env.ctr(&["task", "exec", "--exec-id", "x", "w-spin", "/hello.wasm"]);
    assert!(!o.ok());
    assert!(
        o.stderr
            .contains("exec is not supported in wasm containers"),
        "{o}"
    );
    env.ctr_ok(&["task", "kill", "-s", "KILL", "w-spin"]);
    let o = waiter.join().unwrap();
    assert_eq!(o.status, Some(137), "{o}");
    assert_eq!(o.stdout, "spinning\n");

    // SIGTERM ends it too, with 143.
    let mut fg = env.wasm_run_command(&["--rm"], "w-term", &["/spin.wasm"]);
    let waiter = std::thread::spawn(move || run_cmd(&mut fg, Duration::from_secs(60)));
    env.wait_status("w-term", "RUNNING");
    env.ctr_ok(&["task", "kill", "w-term"]);
    assert_eq!(waiter.join().unwrap().status, Some(143));
    env.assert_clean();
}

fn memory_limit_ends_the_instance_and_publishes_an_oom(v: Version) {
    let env = env(v);
    let events = env.subscribe_events();
    let o = env.wasm_run(
        &["--rm", "--memory-limit", "8388608"],
        "w-hog",
        &["/memhog.wasm"],
    );
    assert_eq!(o.status, Some(137), "{o}");
    assert!(
        o.stderr.contains("memory limit of 8388608 bytes exceeded"),
        "{o}"
    );
    let lines = events.collect_until(Duration::from_secs(10), |l| {
        l.contains("/tasks/oom") && l.contains("w-hog")
    });
    assert!(
        lines.iter().any(|l| l.contains("/tasks/oom")),
        "no /tasks/oom:\n{}",
        lines.join("\n")
    );
    // The daemon serves on.
    let o = env.wasm_run(&["--rm"], "w-after", &["/hello.wasm"]);
    assert!(o.ok(), "{o}");
    env.assert_clean();
}

fn stdin_files_and_mounts(v: Version) {
    let env = env(v);
    let mut cat = env.wasm_run_command(&["--rm"], "w-cat", &["/cat.wasm"]);
    let (status, stdout, stderr) = with_stdin(&mut cat, b"through stdin\nand a second line\n");
    assert_eq!(status, Some(0), "{stderr}");
    assert_eq!(stdout, "through stdin\nand a second line\n");

    // The rootfs is the instance's "/": it writes there and reads back.
    let o = env.wasm_run(&["--rm"], "w-files", &["/files.wasm", "written-in-rootfs"]);
    assert!(o.ok(), "{o}");
    assert_eq!(o.stdout, "written-in-rootfs\n");
    // A read-write bind mount is preopened where the spec puts it.
    let host = env.dir.join("shared");
    std::fs::create_dir_all(&host).unwrap();
    let rw = format!(
        "type=bind,src={},dst=/data,options=rbind:rw",
        host.display()
    );
    let o = env.wasm_run(
        &["--rm", "--mount", &rw],
        "w-mount",
        &["/files.wasm", "on-the-host"],
    );
    assert!(o.ok(), "{o}");
    assert_eq!(
        std::fs::read_to_string(host.join("kuasar.txt")).unwrap(),
        "on-the-host\n"
    );
    // Read-only is honoured.
    std::fs::remove_file(host.join("kuasar.txt")).unwrap();
    let ro = format!(
        "type=bind,src={},dst=/data,options=rbind:ro",
        host.display()
    );
    let o = env.wasm_run(&["--rm", "--mount", &ro], "w-ro", &["/files.wasm", "x"]);
    assert_eq!(o.status, Some(2), "{o}");
    assert!(o.stderr.contains("cannot create kuasar.txt"), "{o}");
    assert!(!host.join("kuasar.txt").exists());
    env.assert_clean();
}

fn fifty_instances_at_once_without_a_shim_process(v: Version) {
    let env = env(v);
    let ids: Vec<String> = (0..50).map(|i| format!("w-many-{i}")).collect();
    std::thread::scope(|s| {
        for chunk in ids.chunks(10) {
            let env = &env;
            s.spawn(move || {
                for id in chunk {
                    let o = env.wasm_run(&["-d"], id, &["/sleep.wasm"]);
                    assert!(o.ok(), "{id}: {o}\n{}", env.log_tails());
                }
            });
        }
    });
    let ls = env.ctr_ok(&["task", "ls"]);
    let running = ls
        .lines()
        .filter(|l| l.contains("w-many-") && l.contains("RUNNING"))
        .count();
    assert_eq!(running, 50, "{ls}");
    assert!(
        env.shim_processes().is_empty(),
        "{:?}",
        env.shim_processes()
    );
    // Each ran its own instance: all report the daemon's pid.
    let pid = env.sandboxer_pid().unwrap().to_string();
    assert!(
        ls.lines()
            .filter(|l| l.contains("w-many-"))
            .all(|l| l.contains(&pid)),
        "{ls}"
    );
    for id in &ids {
        env.ctr_ok(&["task", "kill", "-s", "KILL", id]);
    }
    for id in &ids {
        env.wait_status(id, "STOPPED");
        env.remove(id);
    }
    env.assert_clean();
}

/// Boolector, an SMT solver built for WASI by the YoWASP project and
/// shipped on PyPI (hack/fetch-wasi-programs.sh): its version, and a
/// problem read from stdin, solved, with its model.
fn a_third_party_wasi_program_runs(v: Version) {
    let env = env(v);
    let o = env.wasm_run(
        &["--rm"],
        "w-boolector-v",
        &["/boolector.wasm", "--version"],
    );
    assert!(
        o.ok(),
        "{o}\n(boolector.wasm comes from hack/fetch-wasi-programs.sh)\n{}",
        env.log_tails()
    );
    assert_eq!(o.stdout.trim(), "3.2.3");

    let mut solve = env.wasm_run_command(
        &["--rm"],
        "w-boolector",
        &["/boolector.wasm", "--smt2", "-m"],
    );
    let (status, stdout, stderr) = with_stdin(
        &mut solve,
        b"(set-logic QF_BV)\n(declare-fun x () (_ BitVec 8))\n\
          (assert (= (bvmul x #x03) #x0f))\n(check-sat)\n(get-value (x))\n",
    );
    // Boolector's exit status for "sat" is 10.
    assert_eq!(status, Some(10), "{stdout}{stderr}");
    assert!(stdout.starts_with("sat\n"), "{stdout}");
    assert!(stdout.contains("((x #b00000101))"), "{stdout}");
    env.assert_clean();
}

/// Images whose one layer is the program itself (a wasm artifact, not a
/// tar). containerd 1.6 cannot unpack them (its own error, before any
/// runtime is asked); containerd 2.1 makes an empty rootfs and kuasar reads
/// the program from the image's layer in containerd's content store.
fn programs_as_wasm_layers_of_an_image(v: Version) {
    let env = env(v);
    for program in ["hello", "component"] {
        let (tar, reference) = kuasar_e2e::wasm_artifact_image(program);
        let import = env.ctr(&["image", "import", "--all-platforms", tar.to_str().unwrap()]);
        let id = format!("w-layer-{program}");
        let mut run = env.ctr_command();
        run.args([
            "run",
            "--rm",
            "--platform",
            "wasip1/wasm",
            "--runtime",
            kuasar_e2e::KUASAR_WASM,
        ])
        .args([reference.as_str(), id.as_str(), &format!("{program}.wasm")]);
        let o = run_cmd(&mut run, Duration::from_secs(60));
        match v {
            Version::V1_6 => {
                let text = format!("{import}{o}");
                assert!(
                    text.contains("mismatched image rootfs and manifest layers"),
                    "{text}"
                );
                assert!(!o.ok());
                let _ = env.ctr(&["container", "rm", &id]);
            }
            Version::V2_1 => {
                assert!(import.ok(), "{import}");
                assert!(o.ok(), "{o}\n{}", env.log_tails());
                let want = match program {
                    "hello" => "hello from wasm\n",
                    _ => "hello from a wasm component\n",
                };
                assert_eq!(o.stdout, want);
            }
        }
    }
    env.assert_clean();
}

fn sockets_in_the_pods_network_namespace_when_asked(v: Version) {
    let env = env(v);
    // A pod network namespace as CNI leaves it, one per containerd version
    // (the two run at once), with a listener of the pod inside.
    let pod = kuasar_e2e::netns::Netns::add(&format!("kuasar-e2e-{}", v.label()));
    let received = pod.listen_tcp(7007);
    let with_ns = format!("network:{}", pod.path().display());
    let run = |id: &str, annotation: Option<&str>| {
        let mut flags = vec!["--rm", "--with-ns", &with_ns];
        let a;
        if let Some(value) = annotation {
            a = format!("io.kuasar.wasm.network={value}");
            flags.extend(["--annotation", &a]);
        }
        env.wasm_run(&flags, id, &["/tcp-client.wasm"])
    };

    // Not asked for: no sockets, though the pod's listener is there.
    let o = run("w-net-denied", None);
    assert_eq!(o.status, Some(1), "{o}");
    // Asked for: connected inside the pod's namespace.
    let o = run("w-net-tcp", Some("tcp"));
    assert!(o.ok(), "{o}\n{}", env.log_tails());
    let line = received.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(line, "hello from a wasm socket\n");
    // Without --with-ns the instance gets a namespace of its own, where
    // nothing listens.
    let o = env.wasm_run(
        &["--rm", "--annotation", "io.kuasar.wasm.network=tcp"],
        "w-net-own",
        &["/tcp-client.wasm"],
    );
    assert_eq!(o.status, Some(1), "{o}");
    // One connection reached the pod: the one that was allowed.
    assert!(received.try_recv().is_err());

    let o = run("w-net-bad", Some("icmp"));
    assert!(
        !o.ok() && o.stderr.contains("expected none, tcp, udp"),
        "{o}"
    );
    env.assert_clean();
}
