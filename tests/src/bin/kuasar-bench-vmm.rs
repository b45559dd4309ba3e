//! Benchmark of `io.containerd.kuasarvmm.v1`: a container in a VM of its
//! own against containerd-shim-runc-v2 on the same throw-away containerd,
//! in one run. Boot-to-running-container latency (`ctr run -d` returns once
//! the task runs) serially and N at once; the PSS of the sandboxer and of
//! each qemu at 1, 5 and 10 idle VMs, beside runc-v2's shims.
//!
//! Usage: kuasar-bench-vmm [--containerd 1.6|2.1] [--serial N] [--parallel N] [--idle 1,5,10]

use std::time::{Duration, Instant};

use kuasar_e2e::bench::{ms, percentile, print_table, pss_kb, Args, Row};
use kuasar_e2e::{env_processes, run_cmd, Env, Version, RUNC_V2};

const VMM: &str = "io.containerd.kuasarvmm.v1";

struct Opts {
    version: Version,
    serial: usize,
    parallel: usize,
    idle: Vec<usize>,
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        version: Version::V1_6,
        serial: 10,
        parallel: 5,
        idle: vec![1, 5, 10],
    };
    let mut args = Args::from_env(
        "kuasar-bench-vmm",
        "[--containerd 1.6|2.1] [--serial N] [--parallel N] [--idle 1,5,10]",
    );
    while let Some(flag) = args.next_flag() {
        match flag.as_str() {
            "--containerd" => o.version = args.version(),
            "--serial" => o.serial = args.count(),
            "--parallel" => o.parallel = args.count(),
            "--idle" => o.idle = args.numbers(),
            _ => args.unknown(),
        }
    }
    if o.idle.is_empty() {
        args.fail("--idle takes at least one number");
    }
    o
}

/// `ctr run -d … sleep 600`: returns once the task runs.
fn start(env: &Env, runtime: &str, id: &str) -> Duration {
    let t = Instant::now();
    let o = run_cmd(
        &mut env.run_command(&["-d"], runtime, id, &["sleep", "600"]),
        Duration::from_secs(120),
    );
    let took = t.elapsed();
    assert!(o.ok(), "ctr run -d {id}: {o}\n{}", env.log_tails());
    took
}

fn remove_all(env: &Env, ids: &[String]) {
    std::thread::scope(|s| {
        for id in ids {
            s.spawn(move || env.remove(id));
        }
    });
}

fn serial(env: &Env, runtime: &str, tag: &str, n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| {
            let id = format!("{tag}-s{i}");
            let took = start(env, runtime, &id);
            env.remove(&id);
            ms(took)
        })
        .collect()
}

/// Wall time of `n` containers started at once.
fn parallel(env: &Env, runtime: &str, tag: &str, n: usize) -> f64 {
    let ids: Vec<String> = (0..n).map(|i| format!("{tag}-p{i}")).collect();
    let t = Instant::now();
    std::thread::scope(|s| {
        for id in &ids {
            s.spawn(move || start(env, runtime, id));
        }
    });
    let wall = ms(t.elapsed());
    remove_all(env, &ids);
    wall
}

/// (sandboxer PSS, mean PSS per qemu / per runc-v2 shim) with `n` idle
/// containers, in kB.
fn idle_pss(env: &Env, runtime: &str, tag: &str, n: usize) -> (u64, u64) {
    let ids: Vec<String> = (0..n).map(|i| format!("{tag}-i{n}-{i}")).collect();
    for id in &ids {
        start(env, runtime, id);
    }
    // Let the guests settle (boot work done, caches warm).
    std::thread::sleep(Duration::from_secs(5));
    let program = if runtime == VMM {
        "qemu-system"
    } else {
        "containerd-shim-runc-v2"
    };
    let per: Vec<u64> = env_processes(&env.dir, program)
        .into_iter()
        .map(pss_kb)
        .collect();
    let sandboxer = env.sandboxer_pids().into_iter().map(pss_kb).sum::<u64>();
    remove_all(env, &ids);
    let mean = if per.is_empty() {
        0
    } else {
        per.iter().sum::<u64>() / per.len() as u64
    };
    (sandboxer, mean)
}

fn main() {
    let o = parse_opts();
    let env = Env::start(o.version);
    let accel = {
        // The first VM chooses the accelerator and logs it.
        start(&env, VMM, "warm");
        env.remove("warm");
        let log = std::fs::read_to_string(env.dir.join("sandboxer.log")).unwrap_or_default();
        if log.contains("run on kvm") {
            "KVM"
        } else {
            "TCG"
        }
    };
    start(&env, RUNC_V2, "warm-runc");
    env.remove("warm-runc");
    let mut rows = Vec::new();
    let (mut rs, mut ks) = (Vec::new(), Vec::new());
    // Interleaved, so both see the same machine.
    for i in 0..o.serial {
        rs.extend(serial(&env, RUNC_V2, &format!("r{i}"), 1));
        ks.extend(serial(&env, VMM, &format!("k{i}"), 1));
    }
    for (what, p) in [("median", 0.5), ("p90", 0.9)] {
        rows.push(Row {
            metric: format!("boot to running container, serial {what} of {}", o.serial),
            runc: percentile(rs.clone(), p),
            kuasar: percentile(ks.clone(), p),
            unit: "ms",
        });
    }
    rows.push(Row {
        metric: format!("{} at once, wall", o.parallel),
        runc: parallel(&env, RUNC_V2, "r", o.parallel),
        kuasar: parallel(&env, VMM, "k", o.parallel),
        unit: "ms",
    });
    let mut marginal = Vec::new();
    for &n in &o.idle {
        let (_, r_shim) = idle_pss(&env, RUNC_V2, "r", n);
        let (k_sb, k_qemu) = idle_pss(&env, VMM, "k", n);
        rows.push(Row {
            metric: format!("PSS per container's process (runc-v2 shim / qemu), {n} idle"),
            runc: r_shim as f64 / 1024.0,
            kuasar: k_qemu as f64 / 1024.0,
            unit: "MB",
        });
        rows.push(Row {
            metric: format!("management PSS ({n} shims / the sandboxer), {n} idle"),
            runc: (r_shim * n as u64) as f64 / 1024.0,
            kuasar: k_sb as f64 / 1024.0,
            unit: "MB",
        });
        marginal.push((n, k_sb));
    }
    println!(
        "\nkuasar-bench-vmm: containerd {}, accelerator {accel}, {} cores, load {}\n",
        o.version.label(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .next()
            .unwrap_or("?"),
    );
    print_table("runc-v2", "kuasar-vmm", &rows);
    if let (Some((n0, p0)), Some((n1, p1))) = (marginal.first(), marginal.last()) {
        if n1 > n0 {
            println!(
                "\nsandboxer marginal PSS per VM ({n0} → {n1} idle VMs): {:.0} KB",
                (*p1 as f64 - *p0 as f64) / (*n1 - *n0) as f64
            );
        }
    }
    env.assert_clean();
}
