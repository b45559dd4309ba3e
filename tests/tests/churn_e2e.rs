//! End-to-end: after many create/start/wait/delete cycles (`ctr run --rm`
//! on real containerd 1.6.20) of each backend — runc containers, wasm
//! instances, microVMs (qemu, TCG unless `KUASAR_VMM_ACCEL` says otherwise)
//! — the sandboxer holds exactly the descriptors it held before, no more
//! threads than before plus its runtime's worker count, no child and no
//! mount, and nothing is left behind (state files, sockets, cgroups, runc
//! state, qemu). Time and memory are not asserted: `hack/bench-churn.sh`
//! measures them.

use std::time::{Duration, Instant};

use kuasar_e2e::hygiene::{children, fd_diff, fd_kinds};
use kuasar_e2e::{cmdline, guest_dir, Env, Version, KUASAR_RUNC};

const VMM: &str = "io.containerd.kuasarvmm.v1";

/// Longer than tokio's 2 s keep-alive of idle blocking threads.
const SETTLE: Duration = Duration::from_secs(3);

/// How long the daemon may take to give back what the last cycle cost: a
/// VM is powered off after its container is deleted, within the
/// sandboxer's 3 s shutdown timeout.
const GIVE_BACK: Duration = Duration::from_secs(20);

#[test]
fn v1_6_churn_of_each_backend_leaks_no_descriptor_thread_child_or_mount() {
    assert!(
        guest_dir().is_some(),
        "KUASAR_GUEST_DIR names the guest image (hack/test.sh sets it)"
    );
    let env = Env::start(Version::V1_6);
    env.import_wasm_image();
    let pid = env.sandboxer_pid().expect("sandboxer running");
    // Every backend once, so that what stays for the daemon's life is
    // there before the baseline: the wasm engine and its threads, the
    // accelerator probe, the events connection to containerd.
    cycles(&env, "runc", 3);
    cycles(&env, "wasm", 3);
    cycles(&env, "vmm", 1);
    std::thread::sleep(SETTLE);
    let baseline = env.sandboxer_sample();
    let baseline_fds = fd_kinds(pid);
    assert_eq!(baseline.children, 0, "{baseline}");
    assert_eq!(baseline.mounts, 0, "{baseline}");
    // Threads come and go with load (tokio's blocking pool, the wasm
    // engine's runtime); once idle the daemon is back at its baseline, but a
    // pool thread that served the last call lives 2 s more. The bound: the
    // baseline plus the runtime's worker count (one per core).
    let workers = std::thread::available_parallelism().unwrap().get();

    for (backend, n) in [("runc", 100), ("wasm", 100), ("vmm", 5)] {
        cycles(&env, backend, n);
        let deadline = Instant::now() + GIVE_BACK;
        let after = loop {
            let s = env.sandboxer_sample();
            let given_back = s.fds == baseline.fds
                && s.threads <= baseline.threads + workers
                && s.children == 0
                && s.mounts == 0;
            if given_back || Instant::now() > deadline {
                break s;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let kids: Vec<String> = children(pid)
            .into_iter()
            .map(|c| format!("{c} {}", cmdline(c)))
            .collect();
        let why = format!(
            "after {n} {backend} cycles: baseline {baseline}, now {after}; descriptor kinds \
             changed: {:?}; children {kids:?}; mounts {:?}\n{}",
            fd_diff(&baseline_fds, &fd_kinds(pid)),
            env.mounts(),
            env.log_tails()
        );
        assert_eq!(after.fds, baseline.fds, "{why}");
        assert!(after.threads <= baseline.threads + workers, "{why}");
        assert_eq!(after.children, 0, "{why}");
        assert_eq!(after.mounts, 0, "{why}");
        env.assert_clean();
    }
}

/// `n` cycles of `ctr run --rm` through `backend`, each checked.
fn cycles(env: &Env, backend: &str, n: usize) {
    static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    for _ in 0..n {
        let id = format!(
            "{backend}-{}",
            SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let o = match backend {
            "runc" => env.run_rm(KUASAR_RUNC, &id, &["true"]),
            "wasm" => env.wasm_run(&["--rm"], &id, &["/hello.wasm"]),
            _ => env.run_rm(VMM, &id, &["true"]),
        };
        assert!(o.ok(), "{backend} cycle {id}: {o}\n{}", env.log_tails());
        if backend == "wasm" {
            assert_eq!(o.stdout, "hello from wasm\n", "{o}");
        }
    }
}

/// The reading itself: a daemon that holds a container's resources is seen
/// holding them (the container is its child, the task socket adds
/// descriptors, the rootfs is mounted), so the churn test can fail.
#[test]
fn v1_6_a_running_container_shows_in_the_daemons_sample() {
    let env = Env::start(Version::V1_6);
    std::thread::sleep(SETTLE);
    let idle = env.sandboxer_sample();
    env.run_detached(KUASAR_RUNC, "held", &["sleep", "600"]);
    env.wait_status("held", "RUNNING");
    let running = env.sandboxer_sample();
    assert!(running.fds > idle.fds, "idle {idle}, running {running}");
    assert_eq!(
        running.children,
        idle.children + 1,
        "idle {idle}, running {running}"
    );
    assert!(
        running.mounts > idle.mounts,
        "idle {idle}, running {running}"
    );
    env.remove("held");
    env.assert_clean();
}
