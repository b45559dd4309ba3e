//! Fault injection under load, on real containerd 1.6.20 and 2.1.9: 50
//! running containers and a client loop (create, start, exec, state, kill,
//! delete) while the sandboxer is live-upgraded 20 times; the same load
//! while containerd is restarted twice. Every client call must succeed,
//! every task must still be there with its pid, containers that exit
//! during an upgrade must have their exit codes delivered, and nothing may
//! be left behind.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kuasar_e2e::{run_cmd, CtrClient, Env, Version, KUASAR_RUNC};

kuasar_e2e::both_versions!(
    fifty_containers_and_a_busy_client_through_twenty_upgrades,
    containerd_restarted_twice_under_load,
);

const RUNNING: usize = 50;

/// A client doing what kubelet and operators do, until `stop`: each round
/// creates a container, starts it, execs in a long-running one, asks for
/// state, kills and deletes it. Failures are collected with what failed.
fn busy_client(ctr: CtrClient, stop: Arc<AtomicBool>, errors: Arc<Mutex<Vec<String>>>) -> usize {
    let mut rounds = 0;
    let fail = |what: String| errors.lock().unwrap().push(what);
    while !stop.load(Ordering::SeqCst) {
        let id = format!("loop-{rounds}");
        let o = ctr.run_kuasar(&["-d"], &id, &["sleep", "600"]);
        if !o.ok() {
            fail(format!("run {id}: {o}"));
        }
        let target = format!("r{}", rounds % RUNNING);
        let o = ctr.run(&[
            "task",
            "exec",
            "--exec-id",
            &format!("x{rounds}"),
            &target,
            "echo",
            "ok",
        ]);
        if !o.ok() || o.stdout.trim() != "ok" {
            fail(format!("exec in {target}: {o}"));
        }
        let o = ctr.run(&["task", "ls"]);
        if !o.ok() || !o.stdout.contains(&id) {
            fail(format!("task ls (want {id}): {o}"));
        }
        let o = ctr.run(&["task", "ps", &target]);
        if !o.ok() {
            fail(format!("task ps {target}: {o}"));
        }
        let o = ctr.run(&["task", "kill", "-s", "KILL", &id]);
        if !o.ok() {
            fail(format!("kill {id}: {o}"));
        }
        // The exit reaches containerd; then delete.
        let mut stopped = false;
        for _ in 0..100 {
            let o = ctr.run(&["task", "ls"]);
            if o.stdout
                .lines()
                .any(|l| l.starts_with(&format!("{id} ")) && l.contains("STOPPED"))
            {
                stopped = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if !stopped {
            fail(format!("{id} never reported STOPPED"));
        }
        let o = ctr.run(&["task", "rm", &id]);
        if !o.ok() {
            fail(format!("task rm {id}: {o}"));
        }
        let o = ctr.run(&["container", "rm", &id]);
        if !o.ok() {
            fail(format!("container rm {id}: {o}"));
        }
        rounds += 1;
    }
    rounds
}

/// Runs [`busy_client`] for `for_how_long`; returns its rounds and errors.
fn busy_for(env: &Env, for_how_long: Duration) -> (usize, Arc<Mutex<Vec<String>>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(Mutex::new(Vec::new()));
    let client = std::thread::spawn({
        let (ctr, stop, errors) = (env.ctr_client(), stop.clone(), errors.clone());
        move || busy_client(ctr, stop, errors)
    });
    std::thread::sleep(for_how_long);
    stop.store(true, Ordering::SeqCst);
    (client.join().unwrap(), errors)
}

/// Foreground containers that exit, one after the other, while faults are
/// injected: `ctr run` must return each one's own exit code.
fn exiting(
    env: &Env,
    n: usize,
    every_ms: u64,
) -> Vec<std::thread::JoinHandle<(i32, kuasar_e2e::Out)>> {
    (0..n)
        .map(|i| {
            let code = 20 + i as i32;
            let script = format!(
                "sleep {}; echo done-{i}; exit {code}",
                (every_ms * (i as u64 + 1)) as f64 / 1000.0
            );
            let mut cmd = env.run_command(
                &["--rm"],
                KUASAR_RUNC,
                &format!("x{i}"),
                &["sh", "-c", &script],
            );
            std::thread::spawn(move || (code, run_cmd(&mut cmd, Duration::from_secs(300))))
        })
        .collect()
}

fn start_running(env: &Env) -> Vec<(String, String, String)> {
    for i in 0..RUNNING {
        env.run_detached(KUASAR_RUNC, &format!("r{i}"), &["sleep", "600"]);
    }
    let before = env.tasks();
    assert_eq!(before.len(), RUNNING, "{before:?}");
    before
}

fn check_and_clean(
    env: &Env,
    before: &[(String, String, String)],
    exits: Vec<std::thread::JoinHandle<(i32, kuasar_e2e::Out)>>,
    errors: &Mutex<Vec<String>>,
    rounds: usize,
) {
    let errors = errors.lock().unwrap();
    assert!(
        errors.is_empty(),
        "{} client error(s) in {rounds} rounds:\n{}\n{}",
        errors.len(),
        errors.join("\n"),
        env.log_tails()
    );
    assert!(rounds > 0, "the client loop ran no round");
    for h in exits {
        let (code, o) = h.join().unwrap();
        assert_eq!(o.status, Some(code), "{o}\n{}", env.log_tails());
        assert!(o.stdout.starts_with("done-"), "{o}");
    }
    let after = env.tasks();
    for t in before {
        assert!(after.contains(t), "task {t:?} lost or changed: {after:?}");
    }
    eprintln!(
        "{rounds} client rounds, 0 errors, {} tasks kept",
        before.len()
    );
    for t in before {
        env.remove(&t.0);
    }
    assert!(env.tasks().is_empty(), "{:?}", env.tasks());
    env.assert_clean();
}

fn fifty_containers_and_a_busy_client_through_twenty_upgrades(v: Version) {
    let mut env = Env::start(v);
    let before = start_running(&env);
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(Mutex::new(Vec::new()));
    let client = std::thread::spawn({
        let (ctr, stop, errors) = (env.ctr_client(), stop.clone(), errors.clone());
        move || busy_client(ctr, stop, errors)
    });
    let exits = exiting(&env, 5, 1500);
    for _ in 0..20 {
        env.upgrade_sandboxer();
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::SeqCst);
    let rounds = client.join().unwrap();
    check_and_clean(&env, &before, exits, &errors, rounds);
}

fn containerd_restarted_twice_under_load(v: Version) {
    let mut env = Env::start(v);
    let before = start_running(&env);
    for round in 0..2 {
        // Exits while containerd is down: containerd learns them after.
        let ending = format!("end{round}");
        env.run_detached(KUASAR_RUNC, &ending, &["sh", "-c", "sleep 1; exit 7"]);
        // Calls made while containerd is down fail (containerd is down,
        // not the runtime): the client runs between the restarts.
        let (rounds, errors) = busy_for(&env, Duration::from_secs(2));
        let errs = errors.lock().unwrap();
        assert!(
            errs.is_empty(),
            "{rounds} rounds: {errs:?}\n{}",
            env.log_tails()
        );
        drop(errs);
        env.stop_containerd();
        std::thread::sleep(Duration::from_secs(2));
        env.start_containerd();
        // 1.6 lists it STOPPED; 2.1's restart finds no live process
        // (`Pids` empty) and deletes the task itself.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            match env.task_status(&ending).as_deref() {
                Some("STOPPED") | None => break,
                other => assert!(
                    std::time::Instant::now() < deadline,
                    "{ending} after containerd's restart: {other:?}\n{}",
                    env.log_tails()
                ),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        env.remove(&ending);
        let after = env.tasks();
        for t in &before {
            assert!(
                after.contains(t),
                "task {t:?} lost over a containerd restart: {after:?}"
            );
        }
    }
    let (rounds, errors) = busy_for(&env, Duration::from_secs(2));
    check_and_clean(&env, &before, Vec::new(), &errors, rounds);
}
