//! The harness itself: a test that panics with containers running (one of
//! them paused) must still leave nothing behind once its `Env` is dropped.

use std::path::PathBuf;
use std::sync::Mutex;

use kuasar_e2e::{cgroup, mounts_under, processes, runtime_under_test, Env, Version};

fn alive(pid: u32) -> bool {
    // Gone, or a zombie waiting for init to reap it, counts as dead.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z"),
        Err(_) => false,
    }
}

#[test]
fn env_dropped_by_a_panicking_test_kills_and_removes_everything() {
    let rt = runtime_under_test();
    let seen: Mutex<Option<(PathBuf, String, Vec<u32>)>> = Mutex::new(None);
    let result = std::panic::catch_unwind(|| {
        let env = Env::start(Version::V1_6);
        env.run_detached(&rt, "a", &["sleep", "600"]);
        env.run_detached(&rt, "b", &["sleep", "600"]);
        env.ctr_ok(&["task", "pause", "b"]);
        env.wait_status("b", "PAUSED");
        let mut pids: Vec<u32> = env
            .ctr_ok(&["task", "ls"])
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
            .collect();
        pids.extend(env.sandboxer_pids());
        assert_eq!(pids.len(), 4, "two containers, the holder and the daemon");
        *seen.lock().unwrap() = Some((env.dir.clone(), env.cgroup_name(), pids));
        panic!("deliberate panic with containers running");
    });
    assert!(result.is_err());
    let (dir, cg, pids) = seen.lock().unwrap().take().expect("env started");
    for pid in pids {
        assert!(!alive(pid), "pid {pid} survived the env");
    }
    let marker = dir.to_string_lossy().into_owned();
    let left: Vec<_> = processes()
        .into_iter()
        .filter(|(pid, cmd)| cmd.contains(&marker) && alive(*pid))
        .collect();
    assert!(left.is_empty(), "processes of the env survived: {left:?}");
    assert!(cgroup::procs(&cg).is_empty());
    assert!(cgroup::dirs(&cg).is_empty(), "{:?}", cgroup::dirs(&cg));
    assert!(mounts_under(&dir).is_empty(), "{:?}", mounts_under(&dir));
    assert!(!dir.exists(), "{} not removed", dir.display());
}
