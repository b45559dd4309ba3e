//! Pods through CRI, side by side on one throw-away containerd (with CRI, a
//! CNI bridge and a private registry: `CriEnv`), as ratios to containerd's
//! own runc-v2 handler (`runc`):
//!  - pod start = RunPodSandbox + CreateContainer + StartContainer of busybox
//!    `sleep 3600` (a WASI program that sleeps, for kuasar-wasm), images
//!    pulled beforehand: serial (interleaved handler by handler, after warm-up
//!    rounds) and N in parallel (wall time until every pod started);
//!  - management PSS with 1, 10 and 50 running pods: summed `Pss` of every
//!    shim process of the handler, plus the kuasar-sandboxer for kuasar;
//!  - shim execs per pod, counted exactly with a private ftrace instance
//!    (`sched_process_exec` of containerd and its descendants).
//!
//! Handlers: `runc` (baseline) and `kuasar-runc` / `kuasar-wasm` in every
//! sandbox mode the containerd offers. containerd 1.6: pause containers.
//! containerd 2.1: the env's `podsandbox` handlers, plus handlers this
//! benchmark adds to the same containerd's config: `kuasar-runc-proxy` and
//! `kuasar-wasm-proxy` (`sandboxer = 'kuasar'`, the sandboxer's gRPC sandbox
//! controller as a proxy plugin) and `kuasar-runc-shim` (`sandboxer =
//! 'shim'`). A handler whose pods fail is dropped from the run and reported
//! with the error.
//!
//! Usage: kuasar-bench-pods [--containerd 1.6|2.1] [--serial N] [--warmup N]
//!        [--parallel 10,30] [--parallel-reps N] [--pss 1,10,50] [--execs N]
//!        [--handlers runc,kuasar-runc,...] [--keep-logs DIR]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use kuasar_e2e::bench::{ms, percentile, print_table, pss_kb, Args, Row};
use kuasar_e2e::cri::Cri;
use kuasar_e2e::cri_env::{CriEnv, SandboxMode, KUASAR_RUNC, KUASAR_WASM, RUNC};
use kuasar_e2e::{processes, Version};

// ---- options ---------------------------------------------------------------

struct Opts {
    version: Version,
    serial: usize,
    warmup: usize,
    parallel: Vec<usize>,
    parallel_reps: usize,
    pss_counts: Vec<usize>,
    exec_pods: usize,
    handlers: Option<Vec<String>>,
    keep_logs: Option<PathBuf>,
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        version: Version::V1_6,
        serial: 20,
        warmup: 3,
        parallel: vec![10, 30],
        parallel_reps: 3,
        pss_counts: vec![1, 10, 50],
        exec_pods: 3,
        handlers: None,
        keep_logs: None,
    };
    let mut args = Args::from_env(
        "kuasar-bench-pods",
        "[--containerd 1.6|2.1] [--serial N] [--warmup N] [--parallel 10,30] \
         [--parallel-reps N] [--pss 1,10,50] [--execs N] \
         [--handlers runc,kuasar-runc,...] [--keep-logs DIR]",
    );
    while let Some(flag) = args.next_flag() {
        match flag.as_str() {
            "--containerd" => o.version = args.version(),
            "--serial" => o.serial = args.number().max(1),
            "--warmup" => o.warmup = args.number(),
            "--parallel" => o.parallel = args.numbers(),
            "--parallel-reps" => o.parallel_reps = args.number().max(1),
            "--pss" => o.pss_counts = args.numbers(),
            "--execs" => o.exec_pods = args.number(),
            "--handlers" => o.handlers = Some(args.list()),
            "--keep-logs" => o.keep_logs = Some(args.value().into()),
            _ => args.unknown(),
        }
    }
    o
}

// ---- handlers --------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    RuncV2,
    KuasarRunc,
    KuasarWasm,
}

struct Handler {
    /// The CRI runtime handler name.
    name: &'static str,
    kind: Kind,
    /// How containerd runs the pod's sandbox.
    mode: &'static str,
}

impl Handler {
    fn label(&self) -> String {
        match self.kind {
            Kind::RuncV2 => "runc-v2".into(),
            Kind::KuasarRunc => format!("kuasar-runc ({})", self.mode),
            Kind::KuasarWasm => format!("kuasar-wasm ({})", self.mode),
        }
    }

    fn is_wasm(&self) -> bool {
        self.kind == Kind::KuasarWasm
    }
}

/// Handlers the benchmark adds to a 2.1 env's containerd (name, runtime
/// type, `sandboxer`); `kuasar` is the proxy plugin of the sandboxer's
/// gRPC sandbox controller.
const EXTRA_2_1: [(&str, &str, &str); 3] = [
    ("kuasar-runc-proxy", "io.containerd.kuasarrunc.v1", "kuasar"),
    ("kuasar-runc-shim", "io.containerd.kuasarrunc.v1", "shim"),
    ("kuasar-wasm-proxy", "io.containerd.kuasarwasm.v1", "kuasar"),
];

fn handlers(version: Version) -> Vec<Handler> {
    let pause = match version {
        Version::V1_6 => "pause",
        Version::V2_1 => "podsandbox",
    };
    let mut hs = vec![
        Handler {
            name: RUNC,
            kind: Kind::RuncV2,
            mode: pause,
        },
        Handler {
            name: KUASAR_RUNC,
            kind: Kind::KuasarRunc,
            mode: pause,
        },
    ];
    if version == Version::V2_1 {
        hs.push(Handler {
            name: EXTRA_2_1[0].0,
            kind: Kind::KuasarRunc,
            mode: "proxy",
        });
        hs.push(Handler {
            name: EXTRA_2_1[1].0,
            kind: Kind::KuasarRunc,
            mode: "shim",
        });
    }
    hs.push(Handler {
        name: KUASAR_WASM,
        kind: Kind::KuasarWasm,
        mode: pause,
    });
    if version == Version::V2_1 {
        hs.push(Handler {
            name: EXTRA_2_1[2].0,
            kind: Kind::KuasarWasm,
            mode: "proxy",
        });
    }
    hs
}

/// Adds the proxy- and shim-mode handlers to a 2.1 env's containerd config
/// and restarts containerd (no pod exists yet).
fn add_sandbox_mode_handlers(env: &mut CriEnv) {
    let path = env.dir.join("containerd.toml");
    let mut cfg = std::fs::read_to_string(&path).unwrap();
    cfg.push_str("\n# Added by kuasar-bench-pods: the other sandbox modes.\n");
    for (name, ty, sandboxer) in EXTRA_2_1 {
        // No options table (containerd issue 12986).
        cfg.push_str(&format!(
            "[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.{name}]\n  \
             runtime_type = '{ty}'\n  sandboxer = '{sandboxer}'\n"
        ));
    }
    cfg.push_str(&format!(
        "[proxy_plugins.kuasar]\n  type = 'sandbox'\n  address = '{}'\n",
        env.sandboxer_root().join("sandbox.sock").display()
    ));
    std::fs::write(&path, cfg).unwrap();
    env.restart_containerd();
}

// ---- pods ------------------------------------------------------------------

/// What every pod runs: busybox `sleep 3600`, or the WASI `/sleep.wasm`
/// (waits in poll_oneoff for an hour at a time) for kuasar-wasm.
struct Workload {
    wasm_image: String,
}

static POD_SEQ: AtomicU32 = AtomicU32::new(0);

/// A started pod: its id and how long RunPodSandbox took (ms).
struct Pod {
    id: String,
    run_ms: f64,
}

/// A started pod, or how far it got (the pod's id) and why it failed.
type Started = Result<Pod, (Option<String>, String)>;

/// RunPodSandbox + CreateContainer + StartContainer through `h`.
fn start_pod(cri: &Cri, env: &CriEnv, w: &Workload, h: &Handler, tag: &str) -> Started {
    let name = format!("{tag}-{}", POD_SEQ.fetch_add(1, Ordering::Relaxed));
    let pod = env.pod_config(&name);
    let t = Instant::now();
    let pod_id = cri
        .run_pod_sandbox(&pod, h.name)
        .map_err(|e| (None, format!("RunPodSandbox: {}", e.message())))?;
    let run_ms = ms(t.elapsed());
    let mut cfg = if h.is_wasm() {
        let mut c = env.container_config(&pod, "c", &["/sleep.wasm"]);
        c.image.as_mut().unwrap().image = w.wasm_image.clone();
        c
    } else {
        env.container_config(&pod, "c", &["sleep", "3600"])
    };
    cfg.log_path = "c.log".into();
    let fail =
        |what: &str, e: tonic::Status| (Some(pod_id.clone()), format!("{what}: {}", e.message()));
    let cid = cri
        .create_container(&pod_id, &cfg, &pod)
        .map_err(|e| fail("CreateContainer", e))?;
    cri.start_container(&cid)
        .map_err(|e| fail("StartContainer", e))?;
    Ok(Pod { id: pod_id, run_ms })
}

/// StopPodSandbox + RemovePodSandbox (the pod's containers go with it).
fn remove_pod(cri: &Cri, id: &str) -> Result<(), String> {
    cri.stop_pod_sandbox(id)
        .map_err(|e| format!("StopPodSandbox {id}: {}", e.message()))?;
    cri.remove_pod_sandbox(id)
        .map_err(|e| format!("RemovePodSandbox {id}: {}", e.message()))
}

/// Removes `ids`, 8 at a time; returns the errors.
fn remove_pods(env: &CriEnv, ids: &[String]) -> Vec<String> {
    let next = AtomicUsize::new(0);
    let errors = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..ids.len().min(8) {
            s.spawn(|| {
                let cri = env.new_cri();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(id) = ids.get(i) else { break };
                    if let Err(e) = remove_pod(&cri, id) {
                        errors.lock().unwrap().push(e);
                    }
                }
            });
        }
    });
    errors.into_inner().unwrap()
}

/// Starts `n` pods through `h` at once, each from a thread with a CRI
/// connection of its own. Returns the wall time from the common start until
/// the last pod started, the pods (to remove) and the errors.
fn start_parallel(
    env: &CriEnv,
    w: &Workload,
    h: &Handler,
    n: usize,
    tag: &str,
) -> (f64, Vec<String>, Vec<String>) {
    let barrier = Barrier::new(n + 1);
    let results: Mutex<Vec<(Started, Instant)>> = Mutex::new(Vec::new());
    let mut t0 = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..n {
            s.spawn(|| {
                let cri = env.new_cri();
                barrier.wait();
                let r = start_pod(&cri, env, w, h, tag);
                results.lock().unwrap().push((r, Instant::now()));
            });
        }
        barrier.wait();
        t0 = Instant::now();
    });
    let results = results.into_inner().unwrap();
    let end = results.iter().map(|(_, t)| *t).max().unwrap_or(t0);
    let (mut ids, mut errors) = (Vec::new(), Vec::new());
    for (r, _) in results {
        match r {
            Ok(pod) => ids.push(pod.id),
            Err((id, e)) => {
                ids.extend(id);
                errors.push(e);
            }
        }
    }
    (ms(end - t0), ids, errors)
}

/// Starts `n` pods, 10 at a time (not timed).
fn start_many(
    env: &CriEnv,
    w: &Workload,
    h: &Handler,
    n: usize,
    tag: &str,
) -> (Vec<String>, Vec<String>) {
    let (mut ids, mut errors) = (Vec::new(), Vec::new());
    let mut left = n;
    while left > 0 && errors.is_empty() {
        check_abort();
        let k = left.min(10);
        let (_, i, e) = start_parallel(env, w, h, k, tag);
        ids.extend(i);
        errors.extend(e);
        left -= k;
    }
    (ids, errors)
}

// ---- management PSS ----------------------------------------------------------

/// (summed PSS in kB, processes counted) of `h`'s management processes in
/// this env: containerd-shim-runc-v2 processes for runc; live kuasar shims
/// plus the sandboxer for kuasar.
fn management_pss(env: &CriEnv, h: &Handler) -> (u64, usize) {
    let marker = env.dir.to_string_lossy().into_owned();
    let shim = match h.kind {
        Kind::RuncV2 => "containerd-shim-runc-v2",
        _ => "containerd-shim-kuasar",
    };
    let mut pids: Vec<u32> = processes()
        .into_iter()
        .filter(|(_, cmd)| cmd.contains(shim) && cmd.contains(&marker))
        .map(|(pid, _)| pid)
        .collect();
    if h.kind != Kind::RuncV2 {
        pids.extend(env.sandboxer_pids());
    }
    (pids.iter().map(|p| pss_kb(*p)).sum(), pids.len())
}

// ---- shim execs (ftrace) ---------------------------------------------------

/// A private ftrace instance that records every exec of a
/// `containerd-shim*` binary by containerd or its descendants, and their
/// exits: exact counts, with no cost to the processes traced.
struct ExecTrace {
    instance: PathBuf,
    /// tracefs mounted by us (unmounted on drop).
    mounted: Option<PathBuf>,
}

#[derive(Debug)]
struct ExecEvent {
    ts: f64,
    pid: u32,
    filename: String,
}

impl ExecTrace {
    fn start(containerd_pid: u32) -> Result<ExecTrace, String> {
        let mut mounted = None;
        let tracefs = if Path::new("/sys/kernel/tracing/instances").exists() {
            PathBuf::from("/sys/kernel/tracing")
        } else {
            let dir = PathBuf::from(format!("/tmp/kbp-tracefs-{}", std::process::id()));
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            let o = kuasar_e2e::run_cmd(
                std::process::Command::new("mount")
                    .args(["-t", "tracefs", "nodev"])
                    .arg(&dir),
                Duration::from_secs(10),
            );
            if !o.ok() {
                let _ = std::fs::remove_dir(&dir);
                return Err(format!("mounting tracefs: {o}"));
            }
            mounted = Some(dir.clone());
            dir
        };
        let instance = tracefs
            .join("instances")
            .join(format!("kuasar-bench-pods-{}", std::process::id()));
        let mut t = ExecTrace {
            instance: instance.clone(),
            mounted,
        };
        if let Err(e) = std::fs::create_dir(&instance) {
            t.instance = PathBuf::new();
            return Err(format!("creating {}: {e}", instance.display()));
        }
        let tids: Vec<String> = std::fs::read_dir(format!("/proc/{containerd_pid}/task"))
            .map_err(|e| e.to_string())?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let set = |f: &str, v: &str| {
            std::fs::write(instance.join(f), v).map_err(|e| format!("writing {v:?} to {f}: {e}"))
        };
        set("trace_clock", "mono")?;
        set("options/event-fork", "1")?;
        set("set_event_pid", &tids.join(" "))?;
        set(
            "events/sched/sched_process_exec/filter",
            "filename ~ \"*containerd-shim*\"",
        )?;
        set(
            "events/sched/sched_process_exit/filter",
            "comm == \"containerd-shim\"",
        )?;
        set("events/sched/sched_process_exec/enable", "1")?;
        set("events/sched/sched_process_exit/enable", "1")?;
        set("tracing_on", "1")?;
        Ok(t)
    }

    fn clear(&self) {
        let _ = std::fs::write(self.instance.join("trace"), "");
    }

    /// (execs, exits by pid with their time) recorded since the last clear.
    fn read(&self) -> (Vec<ExecEvent>, BTreeMap<u32, f64>) {
        let text = std::fs::read_to_string(self.instance.join("trace")).unwrap_or_default();
        let (mut execs, mut exits) = (Vec::new(), BTreeMap::new());
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((head, rest)) = line.split_once(": sched_process_") else {
                continue;
            };
            let Some(ts) = head
                .split_whitespace()
                .last()
                .and_then(|t| t.trim_end_matches(':').parse::<f64>().ok())
            else {
                continue;
            };
            let field = |name: &str| {
                rest.split_whitespace()
                    .find_map(|f| f.strip_prefix(name))
                    .map(str::to_string)
            };
            let pid = field("pid=").and_then(|p| p.parse().ok()).unwrap_or(0);
            if rest.starts_with("exec:") {
                execs.push(ExecEvent {
                    ts,
                    pid,
                    filename: field("filename=").unwrap_or_default(),
                });
            } else if rest.starts_with("exit:") {
                exits.insert(pid, ts);
            }
        }
        (execs, exits)
    }
}

impl Drop for ExecTrace {
    fn drop(&mut self) {
        if !self.instance.as_os_str().is_empty() {
            let _ = std::fs::write(self.instance.join("tracing_on"), "0");
            let _ = std::fs::write(self.instance.join("events/enable"), "0");
            let _ = std::fs::remove_dir(&self.instance);
        }
        if let Some(dir) = self.mounted.take() {
            if let Ok(c) = std::ffi::CString::new(dir.to_string_lossy().as_bytes()) {
                // SAFETY: c is a valid path.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
            let _ = std::fs::remove_dir(&dir);
        }
    }
}

/// Shim execs of one handler, over `pods` pods.
struct ExecCount {
    pods: usize,
    start: usize,
    teardown: usize,
    /// Shim processes exec'd while starting that still lived when the pod ran.
    resident: usize,
    /// Lives (ms) of the shim processes that came and went while starting
    /// and while stopping and removing.
    start_lives: Vec<f64>,
    teardown_lives: Vec<f64>,
    binaries: Vec<String>,
}

fn containerd_pid(env: &CriEnv) -> Option<u32> {
    let config = env.dir.join("containerd.toml").display().to_string();
    processes()
        .into_iter()
        .find(|(_, cmd)| {
            cmd.split_whitespace()
                .next()
                .is_some_and(|exe| exe.ends_with("/containerd"))
                && cmd.contains(&config)
        })
        .map(|(pid, _)| pid)
}

fn count_execs(
    env: &CriEnv,
    trace: &ExecTrace,
    w: &Workload,
    h: &Handler,
    pods: usize,
) -> Result<ExecCount, String> {
    let cri = env.cri();
    let mut c = ExecCount {
        pods,
        start: 0,
        teardown: 0,
        resident: 0,
        start_lives: Vec::new(),
        teardown_lives: Vec::new(),
        binaries: Vec::new(),
    };
    for _ in 0..pods {
        check_abort();
        trace.clear();
        let started = start_pod(cri, env, w, h, "x");
        // Let a forked runc-v2 shim daemon finish its exec.
        std::thread::sleep(Duration::from_millis(200));
        let (execs, exits) = trace.read();
        let id = match started {
            Ok(pod) => pod.id,
            Err((id, e)) => {
                if let Some(id) = id {
                    let _ = remove_pod(cri, &id);
                }
                return Err(e);
            }
        };
        c.start += execs.len();
        // Exec'd while starting and not gone when the pod ran: resident.
        let resident: Vec<u32> = execs
            .iter()
            .filter(|e| !exits.contains_key(&e.pid))
            .map(|e| e.pid)
            .collect();
        c.resident += resident.len();
        remove_pod(cri, &id)?;
        std::thread::sleep(Duration::from_millis(200));
        let (all, exits) = trace.read();
        c.teardown += all.len() - execs.len();
        for e in &all {
            if let Some(end) = exits.get(&e.pid).filter(|_| !resident.contains(&e.pid)) {
                let life = (end - e.ts) * 1000.0;
                if execs.iter().any(|s| s.pid == e.pid) {
                    c.start_lives.push(life);
                } else {
                    c.teardown_lives.push(life);
                }
            }
            let bin = Path::new(&e.filename)
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default();
            if !c.binaries.contains(&bin) {
                c.binaries.push(bin);
            }
        }
    }
    Ok(c)
}

// ---- the run ---------------------------------------------------------------

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Per handler: what was measured, or why it failed.
#[derive(Default)]
struct Results {
    serial: Vec<f64>,
    /// Of each serial start: RunPodSandbox, and CreateContainer+StartContainer.
    run_pod: Vec<f64>,
    containers: Vec<f64>,
    teardown: Vec<f64>,
    parallel: BTreeMap<usize, Vec<f64>>,
    pss: BTreeMap<usize, (f64, usize)>,
    execs: Option<ExecCount>,
    failure: Option<String>,
}

/// Set when SIGINT, SIGTERM or SIGHUP arrived: the run stops at the next
/// pod and unwinds, so that the env's drop removes everything.
static ABORT: AtomicBool = AtomicBool::new(false);

/// Blocks SIGINT, SIGTERM and SIGHUP in every thread (call before any other
/// thread exists; children get an empty mask from `Command`) and takes them
/// on a thread of their own: the first sets [`ABORT`], a second exits.
fn take_signals() {
    // SAFETY: sigset_t is plain data; it is initialised by sigemptyset
    // before use, and pthread_sigmask changes only this thread's mask.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::spawn(move || loop {
        let mut sig = 0;
        // SAFETY: `set` is an initialised sigset_t, `sig` a valid out pointer.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            continue;
        }
        if ABORT.swap(true, Ordering::SeqCst) {
            eprintln!("kuasar-bench-pods: signal {sig} again: exiting without cleaning up");
            std::process::exit(128 + sig);
        }
        eprintln!("kuasar-bench-pods: signal {sig}: stopping at the next pod and cleaning up");
    });
}

/// Unwinds (dropping the env, which removes every pod) once a signal came.
fn check_abort() {
    if ABORT.load(Ordering::SeqCst) {
        panic!("interrupted by a signal");
    }
}

fn main() {
    let opts = parse_opts();
    assert!(
        Path::new("/proc/self/smaps_rollup").exists(),
        "needs /proc/PID/smaps_rollup"
    );
    // The sandboxer logs at its production level while measured (RUST_LOG
    // overrides the env's debug config). Set while no other thread runs.
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", "info");
    }
    take_signals();
    let t_run = Instant::now();
    let load_before = loadavg();
    let ver = opts.version;
    let mut hs = handlers(ver);
    if let Some(names) = &opts.handlers {
        hs.retain(|h| h.kind == Kind::RuncV2 || names.iter().any(|n| n == h.name));
    }
    eprintln!(
        "kuasar-bench-pods: containerd {}, handlers {}; load average {load_before}",
        ver.label(),
        hs.iter().map(|h| h.name).collect::<Vec<_>>().join(", ")
    );

    let mut env = CriEnv::start_with(ver, SandboxMode::PodSandbox);
    if ver == Version::V2_1 {
        add_sandbox_mode_handlers(&mut env);
    }
    env.pull_busybox();
    let w = Workload {
        wasm_image: if hs.iter().any(Handler::is_wasm) {
            let image = env.push_wasm_image();
            env.cri()
                .pull_image(&image, None)
                .unwrap_or_else(|e| panic!("PullImage {image}: {e}"));
            image
        } else {
            String::new()
        },
    };
    let mut res: BTreeMap<&str, Results> =
        hs.iter().map(|h| (h.name, Results::default())).collect();
    let idle_pss = env.sandboxer_pids().into_iter().map(pss_kb).sum::<u64>();
    eprintln!("  kuasar-sandboxer idle, before any pod: {idle_pss} kB PSS");

    let fail = |res: &mut BTreeMap<&str, Results>, h: &Handler, what: &str, e: String| {
        let r = res.get_mut(h.name).unwrap();
        if r.failure.is_none() {
            eprintln!("  {} FAILED in {what}: {e}", h.label());
            r.failure = Some(format!("{what}: {e}"));
        }
    };
    let alive = |res: &BTreeMap<&str, Results>, h: &Handler| res[h.name].failure.is_none();

    // 1. Probe (and warm up) each handler with one pod; management PSS.
    // Handlers without wasm first, so that their PSS is measured before the
    // first wasm container makes the daemon's wasm engine.
    for wasm in [false, true] {
        let group: Vec<&Handler> = hs.iter().filter(|h| h.is_wasm() == wasm).collect();
        for h in &group {
            check_abort();
            let t = Instant::now();
            match start_pod(env.cri(), &env, &w, h, "probe") {
                Ok(Pod { id, .. }) => {
                    eprintln!(
                        "  {}: probe pod started in {:.0} ms",
                        h.label(),
                        ms(t.elapsed())
                    );
                    if let Err(e) = remove_pod(env.cri(), &id) {
                        fail(&mut res, h, "probe teardown", e);
                    }
                }
                Err((id, e)) => {
                    if let Some(id) = id {
                        let _ = remove_pod(env.cri(), &id);
                    }
                    fail(&mut res, h, "probe", e);
                }
            }
        }
        for &n in &opts.pss_counts {
            for h in &group {
                if !alive(&res, h) {
                    continue;
                }
                let (ids, errors) = start_many(&env, &w, h, n, "pss");
                if errors.is_empty() {
                    std::thread::sleep(Duration::from_secs(1));
                    let (kb, procs) = management_pss(&env, h);
                    eprintln!(
                        "  {}: {n} running pods -> {procs} management processes, {kb} kB PSS",
                        h.label()
                    );
                    res.get_mut(h.name)
                        .unwrap()
                        .pss
                        .insert(n, (kb as f64 / 1024.0, procs));
                } else {
                    fail(
                        &mut res,
                        h,
                        &format!("starting {n} pods for PSS"),
                        errors[0].clone(),
                    );
                }
                let errors = remove_pods(&env, &ids);
                if let Some(e) = errors.first() {
                    fail(&mut res, h, "removing pods", e.clone());
                }
            }
        }
    }
    let after_pss = env.sandboxer_pids().into_iter().map(pss_kb).sum::<u64>();
    eprintln!(
        "  PSS phase done at {:.0} s; kuasar-sandboxer now {after_pss} kB PSS",
        t_run.elapsed().as_secs_f64()
    );

    // 2. Serial pod starts, interleaved handler by handler; the order turns
    // each round so that no handler always follows the same one.
    for round in 0..opts.warmup + opts.serial {
        for k in 0..hs.len() {
            let h = &hs[(round + k) % hs.len()];
            if !alive(&res, h) {
                continue;
            }
            check_abort();
            let t = Instant::now();
            let started = start_pod(env.cri(), &env, &w, h, "s");
            let took = ms(t.elapsed());
            match started {
                Ok(pod) => {
                    let t = Instant::now();
                    let removed = remove_pod(env.cri(), &pod.id);
                    let down = ms(t.elapsed());
                    if round >= opts.warmup {
                        let r = res.get_mut(h.name).unwrap();
                        r.serial.push(took);
                        r.run_pod.push(pod.run_ms);
                        r.containers.push(took - pod.run_ms);
                        r.teardown.push(down);
                    }
                    if let Err(e) = removed {
                        fail(&mut res, h, "serial teardown", e);
                    }
                }
                Err((id, e)) => {
                    if let Some(id) = id {
                        let _ = remove_pod(env.cri(), &id);
                    }
                    fail(&mut res, h, "serial start", e);
                }
            }
        }
    }
    eprintln!(
        "  serial phase done at {:.0} s",
        t_run.elapsed().as_secs_f64()
    );

    // 3. Pods started at once, handler after handler, pods removed between.
    for rep in 0..opts.parallel_reps {
        for &n in &opts.parallel {
            for k in 0..hs.len() {
                let h = &hs[(rep + k) % hs.len()];
                if !alive(&res, h) {
                    continue;
                }
                check_abort();
                let (wall, ids, errors) = start_parallel(&env, &w, h, n, "p");
                if errors.is_empty() {
                    eprintln!("  {}: {n} pods in parallel: {wall:.0} ms", h.label());
                    res.get_mut(h.name)
                        .unwrap()
                        .parallel
                        .entry(n)
                        .or_default()
                        .push(wall);
                } else {
                    fail(
                        &mut res,
                        h,
                        &format!("{n} parallel pods"),
                        errors[0].clone(),
                    );
                }
                if let Some(e) = remove_pods(&env, &ids).first() {
                    fail(&mut res, h, "removing pods", e.clone());
                }
            }
        }
    }
    eprintln!(
        "  parallel phase done at {:.0} s",
        t_run.elapsed().as_secs_f64()
    );

    // 4. Shim execs per pod, exactly (ftrace), after the timed phases.
    let mut trace_error = None;
    if opts.exec_pods > 0 {
        match containerd_pid(&env)
            .ok_or_else(|| "containerd's pid not found".to_string())
            .and_then(ExecTrace::start)
        {
            Ok(trace) => {
                for h in &hs {
                    if !alive(&res, h) {
                        continue;
                    }
                    match count_execs(&env, &trace, &w, h, opts.exec_pods) {
                        Ok(c) => res.get_mut(h.name).unwrap().execs = Some(c),
                        Err(e) => fail(&mut res, h, "exec count", e),
                    }
                }
            }
            Err(e) => {
                eprintln!("  shim execs not counted: {e}");
                trace_error = Some(e);
            }
        }
    }

    let left = env.leftovers();
    if let Some(dir) = &opts.keep_logs {
        std::fs::create_dir_all(dir).unwrap();
        for f in [
            "containerd.log",
            "sandboxer.log",
            "containerd.toml",
            "sandboxer.toml",
        ] {
            let _ = std::fs::copy(env.dir.join(f), dir.join(f));
        }
    }
    let load_after = loadavg();
    let elapsed = t_run.elapsed().as_secs_f64();

    // ---- report ------------------------------------------------------------
    let base = &res[RUNC];
    let mode_note = match ver {
        Version::V1_6 => "pause containers (1.6 has no Sandbox API)",
        Version::V2_1 => "sandboxer = podsandbox / kuasar (gRPC proxy plugin) / shim, per handler",
    };
    println!(
        "\ncontainerd {}: CRI pods, containerd-shim-runc-v2 (`runc`) vs kuasar handlers on one containerd, one run; {mode_note}",
        ver.label()
    );
    println!(
        "load average before {load_before}, after {load_after}; run took {elapsed:.0} s; \
         serial = median/p90 of {} per handler after {} warm-up rounds, interleaved; \
         parallel = wall time until all pods started ({} rep(s))",
        opts.serial, opts.warmup, opts.parallel_reps
    );
    let med = |v: &[f64]| {
        if v.is_empty() {
            f64::NAN
        } else {
            percentile(v.to_vec(), 0.5)
        }
    };
    let p90 = |v: &[f64]| {
        if v.is_empty() {
            f64::NAN
        } else {
            percentile(v.to_vec(), 0.9)
        }
    };
    for h in hs.iter().filter(|h| h.kind != Kind::RuncV2) {
        let r = &res[h.name];
        println!("\n### {} vs runc-v2 (handler `{}`)\n", h.label(), h.name);
        let mut rows = Vec::new();
        if !r.serial.is_empty() && !base.serial.is_empty() {
            rows.push(Row {
                metric: format!("pod start, serial, median of {}", r.serial.len()),
                runc: med(&base.serial),
                kuasar: med(&r.serial),
                unit: "ms",
            });
            rows.push(Row {
                metric: "pod start, serial, p90".into(),
                runc: p90(&base.serial),
                kuasar: p90(&r.serial),
                unit: "ms",
            });
            rows.push(Row {
                metric: "of which RunPodSandbox, median".into(),
                runc: med(&base.run_pod),
                kuasar: med(&r.run_pod),
                unit: "ms",
            });
            rows.push(Row {
                metric: "of which CreateContainer+StartContainer, median".into(),
                runc: med(&base.containers),
                kuasar: med(&r.containers),
                unit: "ms",
            });
        }
        for (&n, v) in &r.parallel {
            if let Some(b) = base.parallel.get(&n) {
                rows.push(Row {
                    metric: format!("{n} pods in parallel, wall"),
                    runc: med(b),
                    kuasar: med(v),
                    unit: "ms",
                });
            }
        }
        for (&n, &(mb, _)) in &r.pss {
            if let Some(&(b, _)) = base.pss.get(&n) {
                rows.push(Row {
                    metric: format!("management PSS, {n} running pods"),
                    runc: b,
                    kuasar: mb,
                    unit: "MB",
                });
            }
        }
        if !r.teardown.is_empty() && !base.teardown.is_empty() {
            rows.push(Row {
                metric: "pod stop+remove, serial, median (info)".into(),
                runc: med(&base.teardown),
                kuasar: med(&r.teardown),
                unit: "ms",
            });
        }
        if rows.is_empty() {
            println!("(nothing measured)");
        } else {
            print_table("runc-v2", &h.label(), &rows);
        }
        if let Some(f) = &r.failure {
            println!("\n**FAILED** ({}): {f}", h.label());
        }
    }
    if let Some(f) = &base.failure {
        println!("\n**runc-v2 FAILED**: {f}");
    }

    println!("\n### Targets\n");
    println!(
        "| handler | serial pod start median, ratio | target | PSS at 50 pods | target 10 MB |"
    );
    println!("|---|---:|---:|---:|---:|");
    for h in hs.iter().filter(|h| h.kind == Kind::KuasarRunc) {
        let r = &res[h.name];
        let ratio = med(&r.serial) / med(&base.serial);
        // The targets: pause containers 0.8x, the sandbox proxy
        // 0.6x; none for shim mode.
        let target = match h.mode {
            "proxy" => Some(0.6),
            "shim" => None,
            _ => Some(0.8),
        };
        let pss50 = r.pss.get(&50).map(|p| p.0);
        println!(
            "| {} | {} | {} | {} | {} |",
            h.label(),
            match (ratio.is_nan(), target) {
                (true, _) => "–".into(),
                (false, None) => format!("{ratio:.3}x"),
                (false, Some(t)) =>
                    format!("{ratio:.3}x {}", if ratio <= t { "met" } else { "MISSED" }),
            },
            target.map_or("none".into(), |t| format!("≤ {t}x")),
            pss50.map_or("–".into(), |p| format!("{p:.2} MB")),
            pss50.map_or("–", |p| if p <= 10.0 { "met" } else { "MISSED" }),
        );
    }

    println!("\n### Shim execs per pod (ftrace: every exec of a containerd-shim* binary by containerd or its descendants)\n");
    if let Some(e) = &trace_error {
        println!("not counted: {e}");
    } else {
        println!(
            "| handler | pods | shim execs per pod: start (RunPodSandbox+CreateContainer+StartContainer) | \
             stop+remove | shims resident per running pod | life of a transient shim, start: median / max | \
             stop+remove: median / max | binaries |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---|");
        for h in &hs {
            if let Some(c) = &res[h.name].execs {
                let per = |x: usize| x as f64 / c.pods.max(1) as f64;
                let lives = |v: &[f64]| {
                    if v.is_empty() {
                        "–".to_string()
                    } else {
                        format!(
                            "{:.1} / {:.1} ms",
                            percentile(v.to_vec(), 0.5),
                            percentile(v.to_vec(), 1.0)
                        )
                    }
                };
                println!(
                    "| {} | {} | {:.1} | {:.1} | {:.1} | {} | {} | {} |",
                    h.label(),
                    c.pods,
                    per(c.start),
                    per(c.teardown),
                    per(c.resident),
                    lives(&c.start_lives),
                    lives(&c.teardown_lives),
                    if c.binaries.is_empty() {
                        "none".into()
                    } else {
                        c.binaries.join(", ")
                    }
                );
            }
        }
    }
    let failures: Vec<_> = hs
        .iter()
        .filter_map(|h| res[h.name].failure.as_ref().map(|f| (h, f)))
        .collect();
    if !failures.is_empty() {
        println!("\n### Failures\n");
        for (h, f) in failures {
            println!("- {} (handler `{}`): {f}", h.label(), h.name);
        }
    }
    if !left.is_empty() {
        println!("\nleft behind after the last phase (the env's drop removes it): {left:?}");
    }
    println!(
        "\nkuasar-sandboxer PSS idle before any pod: {:.2} MB",
        idle_pss as f64 / 1024.0
    );
}
