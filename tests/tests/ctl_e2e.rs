//! End-to-end: `kuasar-ctl` against a real containerd 1.6.20 and the
//! sandboxer running a runc container (with an exec), a WASI program and a
//! container in a microVM (the guest image of `KUASAR_GUEST_DIR`). What it
//! lists is checked against what ctr says; its health against the
//! daemon's process; its upgrade is refused while the wasm task lives and,
//! once it is gone, re-executes the daemon from the binary newly installed
//! on disk, with the runc and VM tasks running and answering exec.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kuasar_e2e::{kuasar_bin_dir, run_cmd, Env, Out, Version, KUASAR_RUNC};
use serde_json::Value;

const VMM: &str = "io.containerd.kuasarvmm.v1";

fn ctl(env: &Env, args: &[&str]) -> Out {
    run_cmd(
        Command::new(kuasar_bin_dir().join("kuasar-ctl"))
            .arg("--socket")
            .arg(env.private_socket())
            .args(args),
        Duration::from_secs(90),
    )
}

fn ctl_json(env: &Env, args: &[&str]) -> Value {
    let o = ctl(env, args);
    assert!(o.ok(), "kuasar-ctl {args:?}: {o}\n{}", env.log_tails());
    serde_json::from_str(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", o.stdout))
}

/// The PID column of `ctr task ls` for `id`.
fn ctr_pid(env: &Env, id: &str) -> u64 {
    let ls = env.ctr_ok(&["task", "ls"]);
    ls.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.first() == Some(&id))
        .and_then(|f| f.get(1)?.parse().ok())
        .unwrap_or_else(|| panic!("{id} not in ctr task ls:\n{ls}"))
}

/// The pids `ctr task ps` reports for `id`.
fn ctr_ps(env: &Env, id: &str) -> Vec<u64> {
    env.ctr_ok(&["task", "ps", id])
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

fn by_id<'a>(items: &'a Value, id: &str) -> &'a Value {
    items
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["id"] == id)
        .unwrap_or_else(|| panic!("{id} not listed: {items}"))
}

fn backend<'a>(health: &'a Value, kind: &str) -> &'a Value {
    by_kind(&health["backends"], kind)
}

fn by_kind<'a>(items: &'a Value, kind: &str) -> &'a Value {
    items
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["kind"] == kind)
        .unwrap_or_else(|| panic!("backend {kind} not reported: {items}"))
}

fn cmdline(pid: u64) -> String {
    kuasar_e2e::cmdline(pid as u32)
}

/// A copy of the kuasar binaries this test may replace, removed at its end.
struct PrivateBins(PathBuf);

impl PrivateBins {
    /// Copies the binaries and makes the harness use the copies (the only
    /// test of this binary, so nothing else reads the variable meanwhile).
    fn install() -> PrivateBins {
        let dir = PathBuf::from(format!("/tmp/kctl-bin-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let shims = kuasar_protocol::Kind::ALL.map(|k| k.shim_binary());
        // kuasar-wasm-programs: the wasm test image is built from this dir.
        let tools = ["kuasar-sandboxer", "kuasar-ctl", "kuasar-wasm-programs"];
        for name in tools.iter().chain(&shims) {
            std::fs::copy(kuasar_bin_dir().join(name), dir.join(name)).unwrap();
        }
        std::env::set_var("KUASAR_BIN_DIR", &dir);
        PrivateBins(dir)
    }

    /// Installs the daemon anew as an installer does: a new file under the
    /// same name. Returns its inode.
    fn reinstall_sandboxer(&self) -> u64 {
        let path = self.0.join("kuasar-sandboxer");
        let tmp = self.0.join("kuasar-sandboxer.new");
        std::fs::copy(&path, &tmp).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        std::fs::metadata(&path).unwrap().ino()
    }
}

impl Drop for PrivateBins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn ctl_lists_reports_health_and_upgrades_only_when_nothing_would_be_lost() {
    // Dropped after the env, whose daemons run these binaries.
    let bins = PrivateBins::install();
    let env = Env::start(Version::V1_6);
    env.import_wasm_image();
    env.run_detached(KUASAR_RUNC, "c-runc", &["sleep", "600"]);
    env.ctr_ok(&[
        "task",
        "exec",
        "--detach",
        "--exec-id",
        "e1",
        "c-runc",
        "sleep",
        "600",
    ]);
    let o = env.wasm_run(&["-d"], "c-wasm", &["/sleep.wasm"]);
    assert!(o.ok(), "{o}\n{}", env.log_tails());
    env.run_detached(VMM, "c-vmm", &["sleep", "600"]);
    for id in ["c-runc", "c-wasm", "c-vmm"] {
        env.wait_status(id, "RUNNING");
    }
    let sandboxer = u64::from(env.sandboxer_pid().unwrap());

    // list: kinds, states and pids as ctr sees them.
    let list = ctl_json(&env, &["list", "--json"]);
    let tasks = &list["tasks"];
    assert_eq!(tasks.as_array().unwrap().len(), 3, "{list}");
    for (id, kind) in [("c-runc", "runc"), ("c-wasm", "wasm"), ("c-vmm", "vmm")] {
        let t = by_id(tasks, id);
        assert_eq!(t["kind"], kind, "{t}");
        assert_eq!(t["namespace"], "default", "{t}");
        assert_eq!(t["sandbox"], id, "{t}");
        assert_eq!(t["status"], "RUNNING", "{t}");
        assert_eq!(t["pid"].as_u64().unwrap(), ctr_pid(&env, id), "{t}");
        let age = t["age_seconds"].as_u64().expect("a task's age is known");
        assert!(age < 600, "{t}");
        let s = by_id(&list["sandboxes"], id);
        assert_eq!(s["kind"], kind, "{s}");
        assert_eq!(s["state"], "ready", "{s}");
        assert_eq!(s["containers"], serde_json::json!([id]), "{s}");
        let address = s["address"].as_str().unwrap();
        let socket = address.strip_prefix("unix://").unwrap();
        assert!(
            Path::new(socket).starts_with(env.sandboxer_root()),
            "{address}"
        );
    }
    let runc = by_id(tasks, "c-runc");
    assert!(cmdline(runc["pid"].as_u64().unwrap()).starts_with("sleep 600"));
    let execs = runc["execs"].as_array().unwrap();
    assert_eq!(execs.len(), 1, "{runc}");
    assert_eq!(execs[0]["exec_id"], "e1");
    assert_eq!(execs[0]["status"], "RUNNING");
    let exec_pid = execs[0]["pid"].as_u64().unwrap();
    assert!(ctr_ps(&env, "c-runc").contains(&exec_pid), "{runc}");
    // A wasm instance runs inside the daemon: its pid is the daemon's.
    assert_eq!(by_id(tasks, "c-wasm")["pid"].as_u64().unwrap(), sandboxer);
    // A VM's sandbox pid is its qemu.
    let vm = by_id(&list["sandboxes"], "c-vmm")["pid"].as_u64().unwrap();
    assert!(cmdline(vm).contains("qemu-system"), "{}", cmdline(vm));

    // The same as tables.
    let o = ctl(&env, &["list"]);
    assert!(o.ok(), "{o}");
    let row = |id: &str| {
        o.stdout
            .lines()
            .filter(|l| l.split_whitespace().nth(1) == Some(id))
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .collect::<Vec<_>>()
    };
    let rows = row("c-runc");
    assert_eq!(rows.len(), 2, "a sandbox row and a task row:\n{}", o.stdout);
    assert_eq!(rows[1][4], "RUNNING", "{}", o.stdout);
    assert_eq!(rows[1][5], runc["pid"].as_u64().unwrap().to_string());
    assert_eq!(rows[1][6..8], ["1", &format!("({exec_pid})")]);

    // health: this process, its load, what it holds.
    let health = ctl_json(&env, &["health", "--json"]);
    assert_eq!(health["pid"].as_u64().unwrap(), sandboxer, "{health}");
    assert_eq!(health["version"], env!("CARGO_PKG_VERSION"));
    for kind in ["runc", "wasm", "vmm"] {
        assert_eq!(backend(&health, kind)["tasks"], 1, "{health}");
        assert_eq!(backend(&health, kind)["sandboxes"], 1, "{health}");
    }
    let fds = health["open_fds"].as_u64().unwrap();
    let real_fds = std::fs::read_dir(format!("/proc/{sandboxer}/fd"))
        .unwrap()
        .count() as u64;
    assert!(
        fds > 10 && fds.abs_diff(real_fds) < 10,
        "{fds} vs {real_fds}"
    );
    assert!(health["threads"].as_u64().unwrap() >= 2, "{health}");
    let rss = health["rss_bytes"].as_u64().unwrap();
    assert!((1 << 20..1 << 30).contains(&rss), "{health}");
    let pss = health["pss_bytes"].as_u64().unwrap();
    assert!(pss > 0 && pss <= rss, "{health}");
    let started = health["started_at_unix_nanos"].as_i64().unwrap();
    let image = health["image_started_at_unix_nanos"].as_i64().unwrap();
    assert!(started > 0 && started <= image, "{health}");
    assert!(health["uptime_seconds"].as_u64().unwrap() < 600, "{health}");
    assert_eq!(health["upgrade_possible"], false);
    let blockers = health["upgrade_blockers"].as_array().unwrap();
    assert_eq!(blockers.len(), 1, "{health}");
    let blocker = blockers[0].as_str().unwrap();
    assert!(
        blocker.starts_with("1 wasm task lives inside this process")
            && blocker.ends_with("default/c-wasm"),
        "{blocker}"
    );
    let daemon_binary = bins.0.join("kuasar-sandboxer");
    assert_eq!(health["binary"], daemon_binary.display().to_string());

    // upgrade: refused, naming the wasm task, and nothing happens.
    let o = ctl(&env, &["upgrade", "--check"]);
    assert_eq!(o.status, Some(1), "{o}");
    assert!(o.stderr.contains("live upgrade refused"), "{o}");
    assert!(o.stderr.contains(blocker), "{o}");
    let o = ctl(&env, &["upgrade"]);
    assert_eq!(o.status, Some(1), "{o}");
    assert!(o.stderr.contains(blocker), "{o}");
    let again = ctl_json(&env, &["health", "--json"]);
    assert_eq!(again["image_started_at_unix_nanos"], image, "{again}");

    // Once the wasm task is gone, the upgrade runs and is waited for; it
    // runs the binary installed meanwhile, not the one this image came from.
    env.remove("c-wasm");
    let o = ctl(&env, &["upgrade", "--check"]);
    assert!(o.ok(), "{o}");
    assert!(o.stdout.contains("live upgrade possible"), "{o}");
    let installed = bins.reinstall_sandboxer();
    let replaced = ctl_json(&env, &["health", "--json"]);
    assert_eq!(
        replaced["binary"],
        format!("{} (deleted)", daemon_binary.display()),
        "{replaced}"
    );
    let up = ctl_json(&env, &["upgrade", "--json"]);
    assert_eq!(up["pid"].as_u64().unwrap(), sandboxer, "{up}");
    assert_eq!(up["started_at_unix_nanos"], started, "{up}");
    assert!(
        up["image_started_at_unix_nanos"].as_i64().unwrap() > image,
        "{up}"
    );
    assert_eq!(up["upgrades_failed"], 0, "{up}");
    assert_eq!(up["binary"], daemon_binary.display().to_string(), "{up}");
    let running = std::fs::metadata(format!("/proc/{sandboxer}/exe")).unwrap();
    assert_eq!(running.ino(), installed);
    assert_eq!(env.sandboxer_pid().map(u64::from), Some(sandboxer));
    assert!(
        std::fs::read_to_string(env.dir.join("sandboxer.log"))
            .unwrap()
            .contains("live upgrade: took over"),
        "{}",
        env.log_tails()
    );

    // The tasks run on in the new image, as they were, and answer exec.
    let after = ctl_json(&env, &["list", "--json"]);
    for id in ["c-runc", "c-vmm"] {
        let (t0, t1) = (by_id(tasks, id), by_id(&after["tasks"], id));
        assert_eq!(t1["status"], "RUNNING", "{t1}");
        assert_eq!(t1["pid"], t0["pid"], "{t1}");
        assert_eq!(t1["created_at"], t0["created_at"], "{t1}");
        assert_eq!(t1["pid"].as_u64().unwrap(), ctr_pid(&env, id));
        let o = env.ctr(&[
            "task",
            "exec",
            "--exec-id",
            "after",
            id,
            "echo",
            "still here",
        ]);
        assert!(o.ok(), "{o}\n{}", env.log_tails());
        assert_eq!(o.stdout.trim(), "still here");
    }
    assert_eq!(
        by_id(&after["tasks"], "c-runc")["execs"][0]["pid"],
        exec_pid
    );
    assert!(after["tasks"].as_array().unwrap().len() == 2, "{after}");

    env.remove("c-runc");
    env.remove("c-vmm");
    env.assert_clean();
    let list = ctl_json(&env, &["list", "--json"]);
    assert_eq!(list, serde_json::json!({"sandboxes": [], "tasks": []}));

    // The socket is found through the sandboxer's config file; an
    // unreachable daemon and a missing config are named.
    let config = env.dir.join("ctl.toml");
    std::fs::write(
        &config,
        format!(
            "listen = {:?}\n",
            env.private_socket().display().to_string()
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        run_cmd(
            Command::new(kuasar_bin_dir().join("kuasar-ctl")).args(args),
            Duration::from_secs(30),
        )
    };
    let o = run(&["--config", config.to_str().unwrap(), "health", "--json"]);
    assert!(o.ok(), "{o}");
    let h: Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(h["pid"].as_u64(), Some(sandboxer), "{h}");
    assert_eq!(h["upgrade_possible"], true, "{h}");
    let missing = env.dir.join("nothing.sock");
    let o = run(&["--socket", missing.to_str().unwrap(), "list"]);
    assert_eq!(o.status, Some(1), "{o}");
    assert!(
        o.stderr.contains("kuasar sandboxer unreachable at") && o.stderr.contains("nothing.sock"),
        "{o}"
    );
    let o = run(&["--config", "/nonexistent/sandboxer.toml", "list"]);
    assert_eq!(o.status, Some(1), "{o}");
    assert!(o.stderr.contains("/nonexistent/sandboxer.toml"), "{o}");
}
