//! End-to-end: real containerd (1.6.20 and 2.1.9), real ctr, real qemu
//! (TCG unless `KUASAR_VMM_ACCEL` says otherwise) booting the guest image
//! of `hack/build-guest-image.sh` (`KUASAR_GUEST_DIR`), through
//! `io.containerd.kuasarvmm.v1`. Each container of `ctr run` gets a VM of
//! its own. Every test ends by checking that no qemu, mount, socket or
//! state file is left.

use std::process::Command;
use std::time::{Duration, Instant};

use kuasar_e2e::{guest_dir, run_cmd, Env, Version};

const VMM: &str = "io.containerd.kuasarvmm.v1";

kuasar_e2e::both_versions!(
    the_guest_kernel_runs_the_container_with_output_and_exit_codes,
    exec_with_and_without_terminal_stdin_and_kill,
    log_uri_file_receives_the_guests_output,
    qemu_killed_mid_run_ends_every_task_with_137_and_leaks_nothing,
    bad_input_gets_clear_errors_and_the_daemon_serves_on,
    the_vm_is_sized_by_annotations_and_limits,
    a_guest_that_does_not_boot_fails_create_clearly_in_bounded_time,
    auto_accel_probes_kvm_once_and_runs_the_container,
    a_live_upgrade_keeps_running_vms_their_output_and_exits,
    an_oom_kill_in_the_guest_reaches_containerd,
);

fn guest_release() -> String {
    let dir = guest_dir().expect("KUASAR_GUEST_DIR names the guest image (hack/test.sh sets it)");
    std::fs::read_to_string(dir.join("kernel.release"))
        .expect("kernel.release in the guest image")
        .trim()
        .to_string()
}

/// qemu processes of this env.
fn qemu_pids(env: &Env) -> Vec<i32> {
    kuasar_e2e::env_processes(&env.dir, "qemu-system")
        .into_iter()
        .map(|p| p as i32)
        .collect()
}

fn the_guest_kernel_runs_the_container_with_output_and_exit_codes(v: Version) {
    let env = Env::start(v);
    let host = String::from_utf8(Command::new("uname").arg("-r").output().unwrap().stdout).unwrap();
    let o = env.run_rm(VMM, "u1", &["uname", "-r"]);
    assert!(o.ok(), "{o}\n{}", env.log_tails());
    assert_eq!(o.stdout.trim(), guest_release(), "{o}");
    assert_ne!(o.stdout.trim(), host.trim());
    let o = env.run_rm(VMM, "u2", &["sh", "-c", "echo out; echo err >&2; exit 7"]);
    assert_eq!(o.status, Some(7), "{o}\n{}", env.log_tails());
    assert_eq!(o.stdout.trim(), "out");
    assert_eq!(o.stderr.trim(), "err");
    env.assert_clean();
}

fn exec_with_and_without_terminal_stdin_and_kill(v: Version) {
    let env = Env::start(v);
    env.run_detached(
        VMM,
        "x1",
        &[
            "sh",
            "-c",
            "trap 'exit 42' TERM; while true; do sleep 0.1; done",
        ],
    );
    env.wait_status("x1", "RUNNING");
    let o = env.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        "x1",
        "sh",
        "-c",
        "echo in-exec; uname -r; exit 3",
    ]);
    assert_eq!(o.status, Some(3), "{o}\n{}", env.log_tails());
    assert!(o.stdout.starts_with("in-exec"), "{o}");
    assert!(o.stdout.contains(&guest_release()), "{o}");
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
    assert!(o.ok(), "{o}\n{}", env.log_tails());
    assert!(
        o.stdout.contains("/dev/pts/"),
        "exec did not get a terminal: {o}"
    );
    assert!(o.stdout.contains("tty-ok"), "{o}");
    // Stdin reaches an exec in the guest and its EOF ends it.
    let (status, out) = env.exec_with_stdin("e3", "x1", &["cat"], b"through stdin into the VM\n");
    assert!(status.success(), "{status:?}");
    assert_eq!(out.trim(), "through stdin into the VM");
    // Pids are the guest's; the init process is one of them.
    let ps = env.ctr_ok(&["task", "ps", "x1"]);
    assert!(ps.lines().count() >= 2, "{ps}");
    let metrics = env.ctr_ok(&["task", "metrics", "x1"]);
    assert!(metrics.contains("memory"), "{metrics}");
    // SIGTERM reaches the init process in the guest: the trap exits 42.
    env.ctr_ok(&["task", "kill", "x1"]);
    env.wait_status("x1", "STOPPED");
    let ls = env.ctr_ok(&["task", "ls"]);
    assert!(ls.contains("x1"), "{ls}");
    env.remove("x1");
    // SIGKILL: 137, learned by a foreground ctr.
    let mut fg = env.run_command(&["--rm"], VMM, "x2", &["sleep", "600"]);
    let waiter = std::thread::spawn(move || run_cmd(&mut fg, Duration::from_secs(120)));
    env.wait_status("x2", "RUNNING");
    env.ctr_ok(&["task", "kill", "-s", "KILL", "x2"]);
    let o = waiter.join().unwrap();
    assert_eq!(o.status, Some(137), "{o}");
    env.assert_clean();
}

fn log_uri_file_receives_the_guests_output(v: Version) {
    let env = Env::start(v);
    let log = env.dir.join("vm-out.log");
    let uri = format!("file://{}", log.display());
    let o = env.run_with(
        &["--rm", "--log-uri", &uri],
        VMM,
        "l1",
        &["sh", "-c", "echo to-log; echo err-log >&2"],
    );
    assert!(o.ok(), "{o}\n{}", env.log_tails());
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("to-log") && text.contains("err-log"),
        "{text:?}"
    );
    env.assert_clean();
}

fn qemu_killed_mid_run_ends_every_task_with_137_and_leaks_nothing(v: Version) {
    let env = Env::start(v);
    let mut fg = env.run_command(&["--rm"], VMM, "q1", &["sleep", "600"]);
    let waiter = std::thread::spawn(move || run_cmd(&mut fg, Duration::from_secs(120)));
    env.wait_status("q1", "RUNNING");
    let pids = qemu_pids(&env);
    assert_eq!(pids.len(), 1, "one VM for one container: {pids:?}");
    // SAFETY: plain kill(2) of a qemu this test's daemon started.
    assert_eq!(unsafe { libc::kill(pids[0], libc::SIGKILL) }, 0);
    let started = Instant::now();
    let o = waiter.join().unwrap();
    assert_eq!(o.status, Some(137), "{o}\n{}", env.log_tails());
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the exit took {:?}",
        started.elapsed()
    );
    // The daemon serves on: a new VM runs.
    let o = env.run_rm(VMM, "q2", &["echo", "after"]);
    assert!(o.ok(), "{o}\n{}", env.log_tails());
    assert_eq!(o.stdout.trim(), "after");
    env.assert_clean();
}

fn bad_input_gets_clear_errors_and_the_daemon_serves_on(v: Version) {
    let env = Env::start(v);
    // A program the image does not have: the guest's OCI runtime says so.
    let o = env.run_rm(VMM, "b1", &["/no/such/program"]);
    assert!(!o.ok(), "{o}");
    let text = format!("{}{}", o.stdout, o.stderr);
    assert!(text.contains("/no/such/program"), "{o}");
    // A bind mount whose source does not exist on the host.
    let o = env.run_with(
        &[
            "--rm",
            "--mount",
            "type=bind,src=/nonexistent/kuasar-src,dst=/x,options=rbind",
        ],
        VMM,
        "b2",
        &["true"],
    );
    assert!(!o.ok(), "{o}");
    assert!(
        format!("{}{}", o.stdout, o.stderr).contains("/nonexistent/kuasar-src"),
        "{o}"
    );
    let o = env.run_rm(VMM, "b3", &["echo", "still-serving"]);
    assert!(o.ok(), "{o}\n{}", env.log_tails());
    assert_eq!(o.stdout.trim(), "still-serving");
    env.assert_clean();
}

fn mem_total_kb(text: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal in {text:?}"))
}

fn the_vm_is_sized_by_annotations_and_limits(v: Version) {
    let env = Env::start(v);
    let probe = ["sh", "-c", "nproc; grep MemTotal /proc/meminfo"];
    let o = env.run_rm(VMM, "s0", &probe);
    assert!(o.ok(), "{o}\n{}", env.log_tails());
    assert_eq!(o.stdout.lines().next(), Some("1"), "{o}");
    let default_kb = mem_total_kb(&o.stdout);
    let o = env.run_with(
        &[
            "--rm",
            "--annotation",
            "io.kuasar.vmm.vcpus=2",
            "--annotation",
            "io.kuasar.vmm.memory_mib=320",
        ],
        VMM,
        "s1",
        &probe,
    );
    assert!(o.ok(), "{o}\n{}", env.log_tails());
    assert_eq!(o.stdout.lines().next(), Some("2"), "{o}");
    let big_kb = mem_total_kb(&o.stdout);
    assert!(
        big_kb > default_kb + 150 * 1024,
        "320 MiB VM: {big_kb} kB, default: {default_kb} kB"
    );
    // A container's memory limit sizes its VM (limit + the guest's share).
    let o = env.run_with(&["--rm", "--memory-limit", "268435456"], VMM, "s2", &probe);
    assert!(o.ok(), "{o}\n{}", env.log_tails());
    assert!(mem_total_kb(&o.stdout) > default_kb + 150 * 1024, "{o}");
    // More than the config allows: refused before any VM starts.
    let o = env.run_with(
        &["--rm", "--annotation", "io.kuasar.vmm.memory_mib=99999999"],
        VMM,
        "s3",
        &["true"],
    );
    assert!(!o.ok(), "{o}");
    assert!(
        format!("{}{}", o.stdout, o.stderr).contains("max_memory_mib"),
        "{o}"
    );
    // No VM was started for it (the others power off after their delete).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !qemu_pids(&env).is_empty() {
        assert!(
            Instant::now() < deadline,
            "a VM stayed: {:?}",
            qemu_pids(&env)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    env.assert_clean();
}

fn a_guest_that_does_not_boot_fails_create_clearly_in_bounded_time(v: Version) {
    // The kernel finds no init: it panics, and qemu ends (-no-reboot).
    let env = Env::start_with_vmm(v, &[("kernel_params", "\"rdinit=/no/init\"")]);
    let started = Instant::now();
    let o = env.run_rm(VMM, "nb1", &["true"]);
    assert!(!o.ok(), "{o}");
    let text = format!("{}{}", o.stdout, o.stderr);
    assert!(text.contains("booting the sandbox VM"), "{o}");
    assert!(
        text.contains("console"),
        "the error carries the console's tail: {o}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    env.assert_clean();
    // A guest that hangs: a boot timeout far below what booting takes.
    let env = Env::start_with_vmm(v, &[("boot_timeout_ms", "300")]);
    let started = Instant::now();
    let o = env.run_rm(VMM, "nb2", &["true"]);
    assert!(!o.ok(), "{o}");
    assert!(
        format!("{}{}", o.stdout, o.stderr).contains("did not come up within"),
        "{o}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    env.assert_clean();
}

fn auto_accel_probes_kvm_once_and_runs_the_container(v: Version) {
    let env = Env::start_with_vmm(v, &[("accel", "\"auto\""), ("probe_timeout_ms", "2000")]);
    for id in ["a1", "a2"] {
        let o = env.run_rm(VMM, id, &["uname", "-r"]);
        assert!(o.ok(), "{o}\n{}", env.log_tails());
        assert_eq!(o.stdout.trim(), guest_release());
    }
    let log = std::fs::read_to_string(env.dir.join("sandboxer.log")).unwrap();
    let chosen: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("sandbox VMs run on"))
        .collect();
    assert_eq!(
        chosen.len(),
        1,
        "the accelerator is chosen once: {chosen:?}"
    );
    assert!(
        chosen[0].contains("run on kvm") || chosen[0].contains("run on tcg"),
        "{chosen:?}"
    );
    // The probe's VM left nothing.
    let probe = env.sandboxer_root().join("vmm");
    let left: Vec<_> = std::fs::read_dir(&probe)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    env.assert_clean();
}

fn a_live_upgrade_keeps_running_vms_their_output_and_exits(v: Version) {
    let mut env = Env::start(v);
    env.run_detached(VMM, "lu1", &["sleep", "600"]);
    env.wait_status("lu1", "RUNNING");
    // A foreground container counting while the daemon re-executes: every
    // line and the exit code reach ctr.
    let mut fg = env.run_command(
        &["--rm"],
        VMM,
        "lu2",
        &[
            "sh",
            "-c",
            "sleep 2; for i in 1 2 3 4 5 6 7 8 9 10; do echo line-$i; sleep 0.3; done; exit 3",
        ],
    );
    let counting = std::thread::spawn(move || run_cmd(&mut fg, Duration::from_secs(120)));
    env.wait_status("lu2", "RUNNING");
    let vms = {
        let mut p = qemu_pids(&env);
        p.sort();
        p
    };
    assert_eq!(vms.len(), 2, "{vms:?}");
    std::thread::sleep(Duration::from_secs(3));
    env.upgrade_sandboxer();
    let o = counting.join().unwrap();
    assert_eq!(o.status, Some(3), "{o}\n{}", env.log_tails());
    let lines: Vec<&str> = o.stdout.lines().collect();
    let want: Vec<String> = (1..=10).map(|i| format!("line-{i}")).collect();
    assert_eq!(lines, want, "{o}");
    // The running VM is the same qemu and still serves calls.
    assert!(qemu_pids(&env).contains(&vms[0]) || qemu_pids(&env).contains(&vms[1]));
    let o = env.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "after",
        "lu1",
        "sh",
        "-c",
        "echo after-upgrade; exit 5",
    ]);
    assert_eq!(o.status, Some(5), "{o}\n{}", env.log_tails());
    assert_eq!(o.stdout.trim(), "after-upgrade");
    // A second upgrade, then its exit reaches containerd.
    env.upgrade_sandboxer();
    env.ctr_ok(&["task", "kill", "-s", "KILL", "lu1"]);
    env.wait_status("lu1", "STOPPED");
    env.remove("lu1");
    env.assert_clean();
}

fn an_oom_kill_in_the_guest_reaches_containerd(v: Version) {
    let env = Env::start(v);
    let events = env.subscribe_events();
    // 32 MiB for the container (its VM gets the default 128 MiB): the
    // guest's OOM killer ends the shell that keeps doubling a string.
    let o = env.run_with(
        &["--rm", "--memory-limit", "33554432"],
        VMM,
        "oom1",
        &["sh", "-c", "x=0123456789; while true; do x=$x$x; done"],
    );
    assert_eq!(o.status, Some(137), "{o}\n{}", env.log_tails());
    let lines = events.collect_until(Duration::from_secs(10), |l| {
        l.contains("/tasks/oom") && l.contains("oom1")
    });
    assert!(
        lines
            .iter()
            .any(|l| l.contains("/tasks/oom") && l.contains("oom1")),
        "no /tasks/oom:\n{}",
        lines.join("\n")
    );
    env.assert_clean();
}
