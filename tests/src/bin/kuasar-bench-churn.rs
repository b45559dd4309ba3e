//! Hygiene under churn: does the sandboxer give back what a container cost
//! it once the container is gone? For each backend, on a throw-away
//! containerd and sandboxer of its own: warm up, let the daemon settle, take
//! its baseline (open descriptors, threads, PSS, children, and the mounts
//! below the env: bundles' rootfs, VM shares), run N `ctr run --rm` cycles
//! (create, start, wait, delete), read the daemon every `--sample-every`
//! cycles and every 250 ms in the background (for the maximum), then once
//! right after the last cycle and again `--settle` seconds later (tokio lets
//! idle blocking threads go after 2 s).
//!
//! Workloads: runc `busybox true`; wasm `/hello.wasm` of the WASI test
//! image; vmm `busybox true` in a microVM of its own.
//!
//! Usage: kuasar-bench-churn [--containerd 1.6|2.1] [--backends runc,wasm,vmm]
//!        [--cycles N] [--warmup N] [--sample-every N] [--settle SECS]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kuasar_e2e::bench::{ms, percentile, Args};
use kuasar_e2e::hygiene::{fd_diff, fd_kinds, Sample};
use kuasar_e2e::{guest_dir, Env, Out, Version, KUASAR_RUNC};

const VMM: &str = "io.containerd.kuasarvmm.v1";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Backend {
    Runc,
    Wasm,
    Vmm,
}

impl Backend {
    fn parse(s: &str) -> Option<Backend> {
        match s {
            "runc" => Some(Backend::Runc),
            "wasm" => Some(Backend::Wasm),
            "vmm" => Some(Backend::Vmm),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Backend::Runc => "runc",
            Backend::Wasm => "wasm",
            Backend::Vmm => "vmm",
        }
    }

    fn workload(self) -> &'static str {
        match self {
            Backend::Runc => "busybox `true`",
            Backend::Wasm => "WASI `/hello.wasm`",
            Backend::Vmm => "busybox `true` in a microVM",
        }
    }

    /// One create/start/wait/delete cycle: `ctr run --rm`.
    fn cycle(self, env: &Env, id: &str) -> Out {
        match self {
            Backend::Runc => env.run_rm(KUASAR_RUNC, id, &["true"]),
            Backend::Wasm => env.wasm_run(&["--rm"], id, &["/hello.wasm"]),
            Backend::Vmm => env.run_rm(VMM, id, &["true"]),
        }
    }
}

struct Opts {
    version: Version,
    backends: Vec<Backend>,
    cycles: usize,
    warmup: usize,
    sample_every: usize,
    settle: Duration,
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        version: Version::V1_6,
        backends: vec![Backend::Runc, Backend::Wasm, Backend::Vmm],
        cycles: 1000,
        warmup: 20,
        sample_every: 100,
        settle: Duration::from_secs(5),
    };
    let mut args = Args::from_env(
        "kuasar-bench-churn",
        "[--containerd 1.6|2.1] [--backends runc,wasm,vmm] [--cycles N] [--warmup N] \
         [--sample-every N] [--settle SECS]",
    );
    while let Some(flag) = args.next_flag() {
        match flag.as_str() {
            "--containerd" => o.version = args.version(),
            "--backends" => {
                o.backends = args
                    .list()
                    .iter()
                    .map(|b| {
                        Backend::parse(b)
                            .unwrap_or_else(|| args.fail(&format!("unknown backend {b}")))
                    })
                    .collect()
            }
            "--cycles" => o.cycles = args.count(),
            "--warmup" => o.warmup = args.number(),
            "--sample-every" => o.sample_every = args.count(),
            "--settle" => o.settle = Duration::from_secs(args.number() as u64),
            _ => args.unknown(),
        }
    }
    if o.backends.is_empty() {
        args.fail("--backends names none");
    }
    if o.backends.contains(&Backend::Vmm) && guest_dir().is_none() {
        args.fail("the vmm backend needs KUASAR_GUEST_DIR (hack/build-guest-image.sh)");
    }
    o
}

/// What one backend's churn did to the daemon.
struct Report {
    backend: Backend,
    cycles: usize,
    failed: usize,
    baseline: Sample,
    max: Sample,
    after: Sample,
    settled: Sample,
    /// (cycles done, reading) every `--sample-every` cycles.
    series: Vec<(usize, Sample)>,
    cycle_ms: Vec<f64>,
    /// Descriptor kinds whose count differs from the baseline once settled.
    fd_changes: Vec<String>,
}

/// Reads the daemon every 250 ms until told to stop; the maximum.
fn sample_in_background(env: &Env, stop: &AtomicBool) -> Sample {
    let mut max = Sample::default();
    while !stop.load(Ordering::Relaxed) {
        max = max.max(env.sandboxer_sample());
        std::thread::sleep(Duration::from_millis(250));
    }
    max
}

fn churn(o: &Opts, backend: Backend) -> Report {
    let env = Env::start(o.version);
    if backend == Backend::Wasm {
        env.import_wasm_image();
    }
    let pid = env.sandboxer_pid().expect("sandboxer running");
    let name = backend.name();
    let failed = Mutex::new(0usize);
    let run = |id: &str| -> Option<f64> {
        let t = Instant::now();
        let out = backend.cycle(&env, id);
        let took = ms(t.elapsed());
        if out.ok() {
            return Some(took);
        }
        // A long run goes on past a failed cycle (counted, reported); many
        // failures end it.
        eprintln!("  {name}: cycle {id} failed: {out}\n{}", env.log_tails());
        let _ = env.ctr(&["task", "rm", "-f", id]);
        let _ = env.ctr(&["container", "rm", id]);
        let mut f = failed.lock().unwrap();
        *f += 1;
        assert!(*f <= 10, "{name}: more than 10 cycles failed");
        None
    };

    for i in 0..o.warmup {
        run(&format!("{name}-w{i}"));
    }
    std::thread::sleep(o.settle);
    let baseline = env.sandboxer_sample();
    let baseline_fds = fd_kinds(pid);
    eprintln!(
        "  {name}: baseline after {} warm-up cycles: {baseline}",
        o.warmup
    );

    let stop = AtomicBool::new(false);
    let (series, cycle_ms, background_max, after) = std::thread::scope(|s| {
        let sampler = s.spawn(|| sample_in_background(&env, &stop));
        let mut series = Vec::new();
        let mut times = Vec::with_capacity(o.cycles);
        let started = Instant::now();
        for i in 1..=o.cycles {
            times.extend(run(&format!("{name}-{i}")));
            if i % o.sample_every == 0 {
                let now = env.sandboxer_sample();
                eprintln!(
                    "  {name}: {i} cycles ({:.0} s): {now}",
                    started.elapsed().as_secs_f64()
                );
                series.push((i, now));
            }
        }
        let after = env.sandboxer_sample();
        stop.store(true, Ordering::Relaxed);
        (series, times, sampler.join().unwrap(), after)
    });
    std::thread::sleep(o.settle);
    let settled = env.sandboxer_sample();
    let fd_changes = fd_diff(&baseline_fds, &fd_kinds(pid));
    eprintln!(
        "  {name}: right after: {after}; {} s later: {settled}; descriptor kinds changed: {fd_changes:?}",
        o.settle.as_secs()
    );
    env.assert_clean();
    let max = series
        .iter()
        .fold(background_max.max(after), |m, (_, s)| m.max(*s));
    Report {
        backend,
        cycles: o.cycles,
        failed: failed.into_inner().unwrap(),
        baseline,
        max,
        after,
        settled,
        series,
        cycle_ms,
        fd_changes,
    }
}

fn print_reports(o: &Opts, reports: &[Report]) {
    let settle = o.settle.as_secs();
    println!(
        "\nkuasar-bench-churn: containerd {}, {} cores, {} warm-up cycles, then `ctr run --rm` cycles; \
         the sandboxer read before, every 250 ms while cycling (max), right after the last cycle and {settle} s later\n",
        o.version.label(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        o.warmup,
    );
    println!(
        "| backend (workload) | cycles (failed) | metric | baseline | max while cycling | after last cycle | {settle} s later |"
    );
    println!("|---|---:|---|---:|---:|---:|---:|");
    type Field = fn(&Sample) -> u64;
    let fields: [(&str, Field); 5] = [
        ("open fds", |s| s.fds as u64),
        ("threads", |s| s.threads as u64),
        ("PSS (KB)", |s| s.pss_kb),
        ("children", |s| s.children as u64),
        ("mounts", |s| s.mounts as u64),
    ];
    for r in reports {
        for (i, (metric, f)) in fields.iter().enumerate() {
            let (who, n) = if i == 0 {
                (
                    format!("{} ({})", r.backend.name(), r.backend.workload()),
                    format!("{} ({})", r.cycles, r.failed),
                )
            } else {
                (String::new(), String::new())
            };
            println!(
                "| {who} | {n} | {metric} | {} | {} | {} | {} |",
                f(&r.baseline),
                f(&r.max),
                f(&r.after),
                f(&r.settled)
            );
        }
    }
    println!(
        "\nPSS (KB) / open fds / threads every {} cycles:\n",
        o.sample_every
    );
    for r in reports {
        let points: Vec<String> = r
            .series
            .iter()
            .map(|(n, s)| format!("{n}: {} / {} / {}", s.pss_kb, s.fds, s.threads))
            .collect();
        println!("- {}: {}", r.backend.name(), points.join(", "));
    }
    println!();
    for r in reports {
        if !r.cycle_ms.is_empty() {
            println!(
                "- {}: a cycle took {:.1} ms (median), {:.1} ms (p90); descriptor kinds changed once settled: {}",
                r.backend.name(),
                percentile(r.cycle_ms.clone(), 0.5),
                percentile(r.cycle_ms.clone(), 0.9),
                if r.fd_changes.is_empty() {
                    "none".to_string()
                } else {
                    r.fd_changes.join(", ")
                }
            );
        }
    }
}

fn main() {
    let o = parse_opts();
    // The daemon logs at its production level while measured.
    if std::env::var_os("KUASAR_SANDBOXER_LOG").is_none() {
        std::env::set_var("KUASAR_SANDBOXER_LOG", "info");
    }
    eprintln!(
        "kuasar-bench-churn: containerd {}, {} cycles of {}, started at {}",
        o.version.label(),
        o.cycles,
        o.backends
            .iter()
            .map(|b| b.name())
            .collect::<Vec<_>>()
            .join(", "),
        std::process::Command::new("date")
            .args(["-u", "+%F %T UTC"])
            .output()
            .map(|d| String::from_utf8_lossy(&d.stdout).trim().to_string())
            .unwrap_or_default()
    );
    let reports: Vec<Report> = o.backends.iter().map(|b| churn(&o, *b)).collect();
    print_reports(&o, &reports);
}
