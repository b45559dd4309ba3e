//! Benchmark of `io.containerd.kuasarwasm.v1`, in one run:
//!  1. in the daemon's own code (the wasm backend, no containerd): instance
//!     start cold (compiling a program never seen) and warm (cached), p50/p99;
//!  2. `ctr run --rm` of the WASI hello through kuasarwasm against
//!     `ctr run --rm busybox true` through kuasarrunc and runc-v2, on the
//!     same throw-away containerd, interleaved;
//!  3. the sandboxer's PSS with 1, 100 and 500 idle wasm instances.
//!
//! Usage: kuasar-bench-wasm [--containerd 1.6|2.1] [--starts N] [--serial N] [--idle 1,100,500]

use std::path::Path;
use std::time::{Duration, Instant};

use kuasar_core::backend::{Backend, ContainerEvent, CreateRequest, Sandbox, SandboxRequest};
use kuasar_core::config::WasmConfig;
use kuasar_e2e::bench::{ms, percentile, pss_kb, Args};
use kuasar_e2e::{Env, Version, KUASAR_RUNC, RUNC_V2};
use kuasar_host::stdio::StdioPaths;
use kuasar_runc::Runc;
use kuasar_wasm::Wasm;

struct Opts {
    version: Version,
    starts: usize,
    serial: usize,
    idle: Vec<usize>,
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        version: Version::V1_6,
        starts: 200,
        serial: 30,
        idle: vec![1, 100, 500],
    };
    let mut args = Args::from_env(
        "kuasar-bench-wasm",
        "[--containerd 1.6|2.1] [--starts N] [--serial N] [--idle 1,100,500]",
    );
    while let Some(flag) = args.next_flag() {
        match flag.as_str() {
            "--containerd" => o.version = args.version(),
            "--starts" => o.starts = args.number(),
            "--serial" => o.serial = args.count(),
            "--idle" => o.idle = args.numbers(),
            _ => args.unknown(),
        }
    }
    o
}

/// The hello program with a custom section naming `n`: the same code under
/// a content digest never seen before.
fn hello_variant(hello: &[u8], n: usize) -> Vec<u8> {
    let name = b"kuasar-bench";
    let payload = n.to_le_bytes();
    let mut out = hello.to_vec();
    out.push(0); // custom section
    out.push((1 + name.len() + payload.len()) as u8);
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.extend_from_slice(&payload);
    out
}

/// A bundle running `program`; with `netns`, given TCP in that namespace.
fn bundle(dir: &Path, id: &str, program: &[u8], netns: Option<&Path>) -> std::path::PathBuf {
    let b = dir.join(id);
    std::fs::create_dir_all(b.join("rootfs")).unwrap();
    std::fs::write(b.join("rootfs/hello.wasm"), program).unwrap();
    let mut config = serde_json::json!({
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs"},
        "process": {"args": ["/hello.wasm"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
    });
    if let Some(ns) = netns {
        config["annotations"] = serde_json::json!({"io.kuasar.wasm.network": "tcp"});
        config["linux"] = serde_json::json!({"namespaces": [
            {"type": "network", "path": ns.display().to_string()}
        ]});
    }
    std::fs::write(b.join("config.json"), config.to_string()).unwrap();
    b
}

/// (create+start, create+start+exit) of one instance, in ms.
async fn one_start(wasm: &dyn Sandbox, bundle: &Path) -> (f64, f64) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let req = CreateRequest {
        namespace: "bench".into(),
        id: bundle.file_name().unwrap().to_string_lossy().into(),
        bundle: bundle.to_path_buf(),
        stdio: StdioPaths::default(),
        rootfs: Vec::new(),
        events: tx,
        containerd: String::new(),
    };
    let t = Instant::now();
    let c = wasm.create_container(req).await.expect("create");
    c.start().await.expect("start");
    let started = ms(t.elapsed());
    loop {
        match rx.recv().await {
            Some(ContainerEvent::Exit(None, 0)) => break,
            Some(ContainerEvent::Exit(_, s)) => panic!("hello exited {s}"),
            Some(_) => {}
            None => panic!("no exit"),
        }
    }
    let ended = ms(t.elapsed());
    c.delete(false).await.unwrap();
    (started, ended)
}

fn in_daemon(starts: usize) {
    let dir = std::env::temp_dir().join(format!("kuasar-bench-wasm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let hello = wat_hello();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cfg = WasmConfig {
            enabled: true,
            ..Default::default()
        };
        let reaper = kuasar_host::reaper::Reaper::new();
        let root = dir.join("root");
        let linux = Runc::new("runc".into(), &root, reaper.clone());
        let backend = Wasm::new(&root, &cfg, reaper, linux).unwrap();
        let wasm = backend
            .create_sandbox(SandboxRequest {
                namespace: "bench".into(),
                id: "bench".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let wasm = wasm.as_ref();
        let cold_n = starts.min(50);
        let (mut cold, mut warm, mut warm_exit) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..cold_n {
            let b = bundle(&dir, &format!("cold{i}"), &hello_variant(&hello, i), None);
            cold.push(one_start(wasm, &b).await.0);
        }
        let b = bundle(&dir, "warm", &hello, None);
        one_start(wasm, &b).await; // compiles it once
        for _ in 0..starts {
            let (s, e) = one_start(wasm, &b).await;
            warm.push(s);
            warm_exit.push(e);
        }
        // With sockets: a thread of its own that joins the pod's netns.
        let pod = kuasar_e2e::netns::Netns::add(&format!("kuasar-bench-{}", std::process::id()));
        let b = bundle(&dir, "net", &hello, Some(&pod.path()));
        let mut net = Vec::new();
        for _ in 0..starts {
            net.push(one_start(wasm, &b).await.0);
        }
        println!("\nin-daemon instance start (wasm backend, WASI hello, no containerd)\n");
        println!("| metric | p50 | p99 |");
        println!("|---|---:|---:|");
        let row = |what: &str, v: &Vec<f64>| {
            println!(
                "| {what} | {:.3} ms | {:.3} ms |",
                percentile(v.clone(), 0.5),
                percentile(v.clone(), 0.99)
            )
        };
        row(
            &format!("cold: create+start, compiling ({cold_n} programs)"),
            &cold,
        );
        row(&format!("warm: create+start, cached ({starts})"), &warm);
        row(&format!("warm: create+start+exit ({starts})"), &warm_exit);
        row(
            &format!("warm: create+start with sockets, in a pod netns ({starts})"),
            &net,
        );
    });
    rt.shutdown_background();
    let _ = std::fs::remove_dir_all(&dir);
}

fn wat_hello() -> Vec<u8> {
    let src = kuasar_e2e::workspace().join("tests/wasm");
    let out = std::env::temp_dir().join(format!("kuasar-bench-programs-{}", std::process::id()));
    kuasar_e2e::wasm::compile_all(&src, &out).unwrap();
    let bytes = std::fs::read(out.join("hello.wasm")).unwrap();
    let _ = std::fs::remove_dir_all(&out);
    bytes
}

fn through_containerd(opts: &Opts) {
    if std::env::var_os("KUASAR_SANDBOXER_LOG").is_none() {
        std::env::set_var("KUASAR_SANDBOXER_LOG", "info");
    }
    let env = Env::start(opts.version);
    env.import_wasm_image();
    let busybox = |rt: &str, id: String| {
        let t = Instant::now();
        let o = env.run_rm(rt, &id, &["true"]);
        assert!(o.ok(), "{rt}: {o}");
        ms(t.elapsed())
    };
    let wasm = |id: String| {
        let t = Instant::now();
        let o = env.wasm_run(&["--rm"], &id, &["/hello.wasm"]);
        assert!(o.ok() && o.stdout == "hello from wasm\n", "{o}");
        ms(t.elapsed())
    };
    // Warm up every path (page cache, image unpack, compiled program, a
    // fresh containerd's own first-run costs).
    for i in 0..5 {
        busybox(RUNC_V2, format!("wu-r{i}"));
        busybox(KUASAR_RUNC, format!("wu-k{i}"));
        wasm(format!("wu-w{i}"));
    }
    let (mut r, mut k, mut w) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..opts.serial {
        r.push(busybox(RUNC_V2, format!("r{i}")));
        k.push(busybox(KUASAR_RUNC, format!("k{i}")));
        w.push(wasm(format!("w{i}")));
    }
    let ver = opts.version.label();
    println!(
        "\ncontainerd {ver}: ctr run --rm, interleaved, {} runs each\n",
        opts.serial
    );
    println!("| workload | median | p90 | vs runc-v2 busybox |");
    println!("|---|---:|---:|---:|");
    let base = percentile(r.clone(), 0.5);
    for (what, v) in [
        ("runc-v2: busybox true", &r),
        ("kuasarrunc: busybox true", &k),
        ("kuasarwasm: WASI hello", &w),
    ] {
        let p50 = percentile(v.clone(), 0.5);
        println!(
            "| {what} | {p50:.2} ms | {:.2} ms | {:.3}x |",
            percentile(v.clone(), 0.9),
            p50 / base
        );
    }

    // PSS of the sandboxer with idle instances.
    let pid = env.sandboxer_pid().expect("sandboxer pid");
    std::thread::sleep(Duration::from_millis(300));
    let before = pss_kb(pid);
    println!("\nkuasar-sandboxer PSS with idle wasm instances (containerd {ver})\n");
    println!("| idle instances | sandboxer PSS | per instance above the previous row |");
    println!("|---:|---:|---:|");
    println!("| 0 | {:.2} MB | |", before as f64 / 1024.0);
    let mut started: Vec<String> = Vec::new();
    let (mut prev_n, mut prev_kb) = (0usize, before);
    for &n in &opts.idle {
        let new: Vec<String> = (started.len()..n).map(|i| format!("idle{i}")).collect();
        for chunk in new.chunks(10) {
            std::thread::scope(|s| {
                for id in chunk {
                    let env = &env;
                    s.spawn(move || {
                        let o = env.wasm_run(&["-d"], id, &["/sleep.wasm"]);
                        assert!(o.ok(), "{id}: {o}");
                    });
                }
            });
        }
        started.extend(new);
        std::thread::sleep(Duration::from_millis(500));
        let kb = pss_kb(pid);
        let per = (kb as f64 - prev_kb as f64) / (n - prev_n).max(1) as f64;
        println!("| {n} | {:.2} MB | {per:.0} kB |", kb as f64 / 1024.0);
        (prev_n, prev_kb) = (n, kb);
    }
    let ids: Vec<String> = started;
    for chunk in ids.chunks(20) {
        std::thread::scope(|s| {
            for id in chunk {
                let env = &env;
                s.spawn(move || env.remove(id));
            }
        });
    }
    env.assert_clean();
}

fn main() {
    let opts = parse_opts();
    eprintln!("kuasar-bench-wasm: containerd {:?}", opts.version);
    in_daemon(opts.starts);
    through_containerd(&opts);
}
