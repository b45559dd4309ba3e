//! Side-by-side benchmark of `io.containerd.kuasarrunc.v1` against
//! containerd-shim-runc-v2 on the same throw-away containerd, in one run.
//!
//! Usage: kuasar-bench [--containerd 1.6|2.1] [--serial N] [--parallel N] [--pss 1,10,50]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kuasar_e2e::bench::{ms, percentile, print_table, pss_kb, push_latency_rows, Args, Row};
use kuasar_e2e::{kuasar_bin_dir, processes, run_cmd, Env, Version, KUASAR_RUNC, RUNC_V2};

struct Opts {
    version: Version,
    serial: usize,
    parallel: usize,
    shim_starts: usize,
    pss_counts: Vec<usize>,
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        version: Version::V1_6,
        serial: 20,
        parallel: 30,
        shim_starts: 50,
        pss_counts: vec![1, 10, 50],
    };
    let mut args = Args::from_env(
        "kuasar-bench",
        "[--containerd 1.6|2.1] [--serial N] [--parallel N] [--shim-starts N] [--pss 1,10,50]",
    );
    while let Some(flag) = args.next_flag() {
        match flag.as_str() {
            "--containerd" => o.version = args.version(),
            "--serial" => o.serial = args.number(),
            "--parallel" => o.parallel = args.number(),
            "--shim-starts" => o.shim_starts = args.number(),
            "--pss" => o.pss_counts = args.numbers(),
            _ => args.unknown(),
        }
    }
    o
}

/// Wall time of `<shim> start` for a fresh bundle, as containerd runs it.
fn shim_start_times(env: &Env, runtime: &str, n: usize) -> Vec<f64> {
    let (binary, kuasar) = match runtime {
        KUASAR_RUNC => (kuasar_bin_dir().join("containerd-shim-kuasarrunc-v1"), true),
        _ => (env.version.bin_dir().join("containerd-shim-runc-v2"), false),
    };
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("shim{}{i}", if kuasar { "k" } else { "r" });
        // Bundles live in containerd's state dir (tmpfs), as containerd puts them.
        let bundle = env.dir.join("state/bench-bundles").join(&id);
        std::fs::create_dir_all(&bundle).unwrap();
        std::fs::write(
            bundle.join("config.json"),
            r#"{"ociVersion":"1.0.2","annotations":{}}"#,
        )
        .unwrap();
        let shim = |action: &str| {
            let mut c = Command::new(&binary);
            c.args(["-namespace", "bench", "-address"])
                .arg(env.grpc_socket())
                .arg("-publish-binary")
                .arg(env.version.bin_dir().join("containerd"))
                .args(["-id", &id]);
            if action == "delete" {
                c.arg("-bundle").arg(&bundle);
            }
            c.arg(action)
                .current_dir(&bundle)
                .env("TTRPC_ADDRESS", env.dir.join("c.sock.ttrpc"))
                .env(kuasar_protocol::SOCKET_ENV, env.private_socket());
            c
        };
        let t = Instant::now();
        let o = run_cmd(&mut shim("start"), Duration::from_secs(30));
        times.push(ms(t.elapsed()));
        assert!(o.ok(), "{runtime} shim start: {o}");
        let _ = run_cmd(&mut shim("delete"), Duration::from_secs(10));
        if !kuasar {
            // The runc-v2 shim stays resident until told to go: stop it.
            if let Ok(pid) = std::fs::read_to_string(bundle.join("shim.pid")) {
                if let Ok(pid) = pid.trim().parse::<i32>() {
                    // SAFETY: plain kill(2).
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }
    times
}

fn serial_runs(env: &Env, runtime: &str, n: usize, tag: &str) -> Vec<f64> {
    (0..n)
        .map(|i| {
            let t = Instant::now();
            let o = env.run_rm(runtime, &format!("s{tag}{i}"), &["true"]);
            let elapsed = ms(t.elapsed());
            assert!(o.ok(), "{runtime} serial run: {o}");
            elapsed
        })
        .collect()
}

fn start_many(env: &Env, runtime: &str, ids: &[String]) -> f64 {
    let t = Instant::now();
    std::thread::scope(|s| {
        for id in ids {
            s.spawn(move || env.run_detached(runtime, id, &["sleep", "3600"]));
        }
    });
    ms(t.elapsed())
}

fn remove_all(env: &Env, ids: &[String]) {
    for chunk in ids.chunks(10) {
        std::thread::scope(|s| {
            for id in chunk {
                s.spawn(move || env.remove(id));
            }
        });
    }
}

/// Summed PSS of every management process for `runtime` in this env:
/// shims, plus the sandboxer for kuasar.
fn management_pss_kb(env: &Env, runtime: &str) -> (u64, usize) {
    let marker = env.dir.to_string_lossy().into_owned();
    let mut pids: Vec<u32> = processes()
        .into_iter()
        .filter(|(_, cmd)| {
            cmd.contains(&marker)
                && match runtime {
                    KUASAR_RUNC => cmd.contains("containerd-shim-kuasar"),
                    _ => cmd.contains("containerd-shim-runc-v2"),
                }
        })
        .map(|(pid, _)| pid)
        .collect();
    if runtime == KUASAR_RUNC {
        pids.extend(env.sandboxer_pids());
    }
    (pids.iter().map(|p| pss_kb(*p)).sum(), pids.len())
}

fn main() {
    let opts = parse_opts();
    assert!(
        Path::new("/proc/self/smaps_rollup").exists(),
        "needs /proc/PID/smaps_rollup"
    );
    // The daemon logs at its production level while measured.
    if std::env::var_os("KUASAR_SANDBOXER_LOG").is_none() {
        std::env::set_var("KUASAR_SANDBOXER_LOG", "info");
    }
    let env = Env::start(opts.version);
    let mut rows = Vec::new();
    eprintln!(
        "kuasar-bench: containerd {:?}, binaries in {}",
        opts.version,
        kuasar_bin_dir().display()
    );

    // Warm up both paths (page cache, first image unpack).
    for rt in [RUNC_V2, KUASAR_RUNC] {
        serial_runs(&env, rt, 2, &format!("w{}", rt.len()));
    }

    // What spawning any binary costs through the same harness, for scale.
    let baseline: Vec<f64> = (0..opts.shim_starts)
        .map(|_| {
            let t = Instant::now();
            run_cmd(&mut Command::new("/bin/true"), Duration::from_secs(10));
            ms(t.elapsed())
        })
        .collect();
    eprintln!(
        "  baseline: exec of /bin/true through the harness, median {:.2} ms",
        percentile(baseline.clone(), 0.5)
    );
    let sr = shim_start_times(&env, RUNC_V2, opts.shim_starts);
    let sk = shim_start_times(&env, KUASAR_RUNC, opts.shim_starts);
    push_latency_rows(&mut rows, "shim start", sr, sk);

    // Interleave the serial runs so drift in machine load hits both alike.
    let (mut r, mut k) = (Vec::new(), Vec::new());
    for i in 0..opts.serial {
        r.extend(serial_runs(&env, RUNC_V2, 1, &format!("r{i}-")));
        k.extend(serial_runs(&env, KUASAR_RUNC, 1, &format!("k{i}-")));
    }
    push_latency_rows(&mut rows, "ctr run --rm busybox true", r, k);

    let ids = |p: &str, n: usize| -> Vec<String> { (0..n).map(|i| format!("{p}{i}")).collect() };
    let pr = ids("par-r", opts.parallel);
    let pk = ids("par-k", opts.parallel);
    let tr = start_many(&env, RUNC_V2, &pr);
    remove_all(&env, &pr);
    let tk = start_many(&env, KUASAR_RUNC, &pk);
    remove_all(&env, &pk);
    rows.push(Row {
        metric: format!("{} parallel ctr run -d, wall", opts.parallel),
        runc: tr,
        kuasar: tk,
        unit: "ms",
    });

    for &n in &opts.pss_counts {
        let mut per = [0.0f64; 2];
        for (slot, rt) in [RUNC_V2, KUASAR_RUNC].into_iter().enumerate() {
            let batch = ids(&format!("m{slot}-{n}-"), n);
            start_many(&env, rt, &batch);
            std::thread::sleep(Duration::from_millis(500));
            let (kb, procs) = management_pss_kb(&env, rt);
            eprintln!("  {rt}: {n} running -> {procs} management processes, {kb} kB PSS");
            per[slot] = kb as f64 / 1024.0;
            remove_all(&env, &batch);
        }
        rows.push(Row {
            metric: format!("management PSS, {n} running"),
            runc: per[0],
            kuasar: per[1],
            unit: "MB",
        });
    }

    let ver = opts.version.label();
    println!(
        "\ncontainerd {ver}: containerd-shim-runc-v2 vs kuasarrunc (same containerd, one run)\n"
    );
    print_table("runc-v2", "kuasarrunc", &rows);
    env.assert_clean();
}
