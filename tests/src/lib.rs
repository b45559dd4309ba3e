//! Test harness: a throw-away containerd (1.6 or 2.1) next to a private
//! kuasar-sandboxer, in a private directory, with everything stopped,
//! unmounted and removed on drop — also when a test panics.

pub mod bench;
pub mod cgroup;
pub mod cmd;
pub mod cri;
pub mod cri_env;
pub mod hygiene;
pub mod netns;
pub mod wasm;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use cmd::{run_cmd, Out};

pub const IMAGE: &str = "docker.io/library/busybox:latest";
pub const KUASAR_RUNC: &str = "io.containerd.kuasarrunc.v1";
pub const RUNC_V2: &str = "io.containerd.runc.v2";
pub const KUASAR_WASM: &str = "io.containerd.kuasarwasm.v1";
/// The WASI test image (platform wasip1/wasm) hack/build-wasm-image.sh builds.
pub const WASM_IMAGE: &str = "docker.io/kuasar/wasm-test:latest";

/// The runtime the e2e suite drives: `KUASAR_E2E_RUNTIME`, else
/// `io.containerd.kuasarrunc.v1`. Set it to `io.containerd.runc.v2` to check
/// the suite itself against containerd's own shim.
pub fn runtime_under_test() -> String {
    std::env::var("KUASAR_E2E_RUNTIME")
        .ok()
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| KUASAR_RUNC.to_string())
}

/// Whether `runtime` goes through the kuasar shims and sandboxer.
pub fn is_kuasar(runtime: &str) -> bool {
    runtime.starts_with("io.containerd.kuasar")
}

/// Declares a `#[test]` per containerd version for each scenario `fn(Version)`:
/// `v1_6::name` and `v2_1::name`.
#[macro_export]
macro_rules! both_versions {
    ($($name:ident),* $(,)?) => {
        mod v1_6 { $( #[test] fn $name() { super::$name($crate::Version::V1_6) } )* }
        mod v2_1 { $( #[test] fn $name() { super::$name($crate::Version::V2_1) } )* }
    };
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V1_6,
    V2_1,
}

impl Version {
    /// `1.6` or `2.1`, as the benchmarks' `--containerd` flag spells it.
    pub fn parse(s: &str) -> Option<Version> {
        match s {
            "1.6" => Some(Version::V1_6),
            "2.1" => Some(Version::V2_1),
            _ => None,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Version::V1_6 => "1.6",
            Version::V2_1 => "2.1",
        }
    }

    /// Directory holding containerd, ctr and containerd-shim-runc-v2.
    pub fn bin_dir(self) -> PathBuf {
        match self {
            Version::V1_6 => PathBuf::from("/usr/bin"),
            Version::V2_1 => std::env::var_os("KUASAR_CONTAINERD2_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/opt/kuasar-deps/containerd-2/usr/bin")),
        }
    }

    fn config(self, dir: &Path) -> String {
        let d = dir.display();
        match self {
            Version::V1_6 => format!(
                "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{d}/c.sock\"\n[ttrpc]\n  address = \"{d}/c.sock.ttrpc\"\n"
            ),
            Version::V2_1 => format!(
                "version = 3\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\", \"io.containerd.cri.v1.images\", \"io.containerd.cri.v1.runtime\"]\n\
                 [grpc]\n  address = \"{d}/c.sock\"\n[ttrpc]\n  address = \"{d}/c.sock.ttrpc\"\n"
            ),
        }
    }
}

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Where the kuasar binaries are: `KUASAR_BIN_DIR`, else target/release,
/// else target/debug.
pub fn kuasar_bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KUASAR_BIN_DIR") {
        return d.into();
    }
    let release = workspace().join("target/release");
    if release.join("kuasar-sandboxer").exists() {
        return release;
    }
    workspace().join("target/debug")
}

/// An image archive: `$env_var`, else built by `hack/$script` into
/// target/kuasar-images/`file`.
pub(crate) fn built_image(
    cell: &'static OnceLock<PathBuf>,
    env_var: &str,
    file: &str,
    script: &str,
) -> PathBuf {
    cell.get_or_init(|| {
        if let Some(p) = std::env::var_os(env_var) {
            return p.into();
        }
        // Built once per test process, so that it always holds the current
        // programs; under a private name, then renamed, as another test
        // binary may be building it at the same moment.
        let out = workspace().join("target/kuasar-images").join(file);
        std::fs::create_dir_all(out.parent().unwrap()).unwrap();
        let mut cmd = Command::new("bash");
        cmd.arg(workspace().join("hack").join(script))
            .env("KUASAR_BIN_DIR", kuasar_bin_dir());
        let tmp = out.with_extension(format!("tar.{}", std::process::id()));
        let o = run_cmd(cmd.arg(&tmp), Duration::from_secs(120));
        assert!(o.ok(), "building {file} with {script}: {o}");
        std::fs::rename(&tmp, &out).expect("installing the image");
        out
    })
    .clone()
}

/// The busybox image archive: `KUASAR_BUSYBOX_IMAGE`, else built by
/// hack/build-busybox-image.sh.
pub fn busybox_image() -> PathBuf {
    static IMAGE_TAR: OnceLock<PathBuf> = OnceLock::new();
    built_image(
        &IMAGE_TAR,
        "KUASAR_BUSYBOX_IMAGE",
        "busybox.tar",
        "build-busybox-image.sh",
    )
}

/// The WASI test image archive: `KUASAR_WASM_IMAGE`, else built by
/// hack/build-wasm-image.sh from the WAT programs (and the third-party
/// WASI programs hack/fetch-wasi-programs.sh installed).
pub fn wasm_image() -> PathBuf {
    static IMAGE_TAR: OnceLock<PathBuf> = OnceLock::new();
    built_image(
        &IMAGE_TAR,
        "KUASAR_WASM_IMAGE",
        "wasm-test.tar",
        "build-wasm-image.sh",
    )
}

/// A wasm artifact image of the WAT program `name` (hello, component...):
/// the compiled program is the image's one layer, not a file in a tar
/// (hack/build-wasm-image.sh --artifact). Returns the archive and the
/// image's name.
pub fn wasm_artifact_image(name: &str) -> (PathBuf, String) {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let unique = format!(
        "{}.{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let dir = workspace().join("target/kuasar-images");
    let programs = dir.join(format!("programs.{unique}"));
    wasm::compile_all(&workspace().join("tests/wasm"), &programs)
        .expect("compiling the WAT programs");
    let reference = format!("docker.io/kuasar/wasm-artifact-{name}:latest");
    let out = dir.join(format!("wasm-artifact-{name}.tar"));
    let tmp = out.with_extension(format!("tar.{unique}"));
    let mut cmd = Command::new("bash");
    cmd.arg(workspace().join("hack/build-wasm-image.sh"))
        .arg("--artifact")
        .arg(&tmp)
        .arg(&reference)
        .arg(programs.join(format!("{name}.wasm")));
    let o = run_cmd(&mut cmd, Duration::from_secs(60));
    let _ = std::fs::remove_dir_all(&programs);
    assert!(o.ok(), "building the {name} artifact image: {o}");
    std::fs::rename(&tmp, &out).expect("installing the image");
    (out, reference)
}

/// `ctr events` of an env, subscribed: see [`Env::subscribe_events`].
pub struct EventStream {
    child: Option<Child>,
    lines: std::sync::mpsc::Receiver<String>,
}

impl EventStream {
    /// Event lines until one satisfies `last` (included) or `timeout`.
    pub fn collect_until(
        &self,
        timeout: Duration,
        mut last: impl FnMut(&str) -> bool,
    ) -> Vec<String> {
        let mut lines = Vec::new();
        let deadline = Instant::now() + timeout;
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            let done = last(&line);
            lines.push(line);
            if done {
                break;
            }
        }
        lines
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The guest image the vmm tests boot (`hack/build-guest-image.sh`).
pub fn guest_dir() -> Option<PathBuf> {
    std::env::var_os("KUASAR_GUEST_DIR").map(PathBuf::from)
}

/// The sandboxer's `[vmm]` table: the guest image under test, on TCG
/// unless `KUASAR_VMM_ACCEL` says otherwise, with `KUASAR_VMM_KERNEL_PARAMS`
/// added to the guest's command line.
pub fn vmm_config() -> String {
    vmm_config_with(&[])
}

/// [`vmm_config`] with keys set to the given TOML values.
pub fn vmm_config_with(overrides: &[(&str, &str)]) -> String {
    let Some(dir) = guest_dir() else {
        return "[vmm]\nenabled = false\n".into();
    };
    let quoted = |v: String| format!("{v:?}");
    let mut keys: Vec<(String, String)> = vec![
        (
            "kernel".into(),
            quoted(format!("{}/vmlinux", dir.display())),
        ),
        (
            "initrd".into(),
            quoted(format!("{}/initramfs.cpio", dir.display())),
        ),
        (
            "accel".into(),
            quoted(std::env::var("KUASAR_VMM_ACCEL").unwrap_or_else(|_| "tcg".into())),
        ),
        // Debugging a guest: e.g. KUASAR_AGENT_LOG=debug (the kernel passes
        // unknown parameters to init as environment).
        (
            "kernel_params".into(),
            quoted(std::env::var("KUASAR_VMM_KERNEL_PARAMS").unwrap_or_default()),
        ),
    ];
    for (k, v) in overrides {
        keys.retain(|(key, _)| key != k);
        keys.push((k.to_string(), v.to_string()));
    }
    let mut out = String::from("[vmm]\n");
    for (k, v) in keys {
        out.push_str(&format!("{k} = {v}\n"));
    }
    out
}

/// Directories of an env that get their own tmpfs.
pub(crate) const OWN_TMPFS: [&str; 2] = ["state", "k"];

pub struct Env {
    pub version: Version,
    pub dir: PathBuf,
    containerd: Option<Child>,
    sandboxer: Option<Child>,
}

fn new_dir() -> PathBuf {
    new_dir_named("kx")
}

/// A fresh `/tmp/PREFIX-<pid>-<n>`.
pub(crate) fn new_dir_named(prefix: &str) -> PathBuf {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    // Short: unix socket paths must stay under 108 bytes.
    let dir = PathBuf::from(format!(
        "/tmp/{prefix}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "{what} did not come up within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Env {
    /// containerd of `version` with a kuasar-sandboxer, busybox imported.
    pub fn start(version: Version) -> Env {
        Env::start_with_vmm(version, &[])
    }

    /// [`Env::start`] with `[vmm]` keys set to TOML values of the test's.
    pub fn start_with_vmm(version: Version, vmm: &[(&str, &str)]) -> Env {
        let image = busybox_image();
        let dir = new_dir();
        std::fs::write(dir.join("containerd.toml"), version.config(&dir)).unwrap();
        // Debug logs help a failing test; the benchmark asks for less.
        let log_level = std::env::var("KUASAR_SANDBOXER_LOG").unwrap_or_else(|_| "debug".into());
        std::fs::write(
            dir.join("sandboxer.toml"),
            format!(
                "log_level = \"{log_level}\"\n[runc]\nbinary = \"runc\"\n[wasm]\nenabled = true\nmax_instances = 600\n\
                 [containerd]\naddress = \"{0}/c.sock\"\nttrpc_address = \"{0}/c.sock.ttrpc\"\n{1}",
                dir.display(),
                vmm_config_with(vmm),
            ),
        )
        .unwrap();
        mount_own_tmpfs(&dir);
        let mut env = Env {
            version,
            dir,
            containerd: None,
            sandboxer: None,
        };
        env.start_sandboxer();
        env.start_containerd();
        env.ctr_ok(&["image", "import", image.to_str().unwrap()]);
        env
    }

    pub fn sandboxer_root(&self) -> PathBuf {
        self.dir.join("k")
    }

    /// The sandboxer's private socket.
    pub fn private_socket(&self) -> PathBuf {
        self.dir.join("k/s.sock")
    }

    pub fn grpc_socket(&self) -> PathBuf {
        self.dir.join("c.sock")
    }

    pub fn start_sandboxer(&mut self) {
        assert!(self.sandboxer.is_none(), "sandboxer already running");
        self.sandboxer = Some(spawn_sandboxer(&self.dir));
    }

    /// Stops the sandboxer (SIGTERM); containers keep running.
    pub fn stop_sandboxer(&mut self) {
        if let Some(c) = self.sandboxer.take() {
            stop_child(c, Duration::from_secs(5));
        }
    }

    pub fn sandboxer_alive(&mut self) -> bool {
        matches!(
            self.sandboxer.as_mut().map(|c| c.try_wait()),
            Some(Ok(None))
        )
    }

    /// The holder: the process started as `kuasar-sandboxer`, which keeps
    /// the daemon's descriptors and restarts it after a crash.
    pub fn holder_pid(&self) -> Option<u32> {
        self.sandboxer.as_ref().map(|c| c.id())
    }

    /// The daemon (the holder's child).
    pub fn sandboxer_pid(&self) -> Option<u32> {
        self.holder_pid().and_then(daemon_of)
    }

    /// The holder and the daemon: what the node pays for.
    pub fn sandboxer_pids(&self) -> Vec<u32> {
        holder_and_daemon(self.holder_pid())
    }

    /// `ctr task ls` as (id, pid, status) rows.
    pub fn tasks(&self) -> Vec<(String, String, String)> {
        self.ctr_ok(&["task", "ls"])
            .lines()
            .skip(1)
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                Some((
                    f.next()?.to_string(),
                    f.next()?.to_string(),
                    f.next()?.to_string(),
                ))
            })
            .collect()
    }

    /// Kills the daemon with SIGKILL and waits until the holder has
    /// started it again and it has taken over; returns the new pid.
    pub fn crash_sandboxer(&mut self) -> u32 {
        self.crash_sandboxer_while(|| {})
    }

    /// As [`Env::crash_sandboxer`], with `while_down` run after the daemon
    /// died and before the holder may start it again (the holder is
    /// stopped meanwhile).
    pub fn crash_sandboxer_while(&mut self, while_down: impl FnOnce()) -> u32 {
        crash_daemon(
            &self.dir,
            self.holder_pid().expect("sandboxer not running"),
            while_down,
        )
    }

    /// Live-upgrades the sandboxer (SIGUSR2: it re-executes itself) and
    /// waits until the new image has taken over and answers on its private
    /// socket. Panics if its process ended.
    pub fn upgrade_sandboxer(&mut self) {
        let pid = self.sandboxer_pid().expect("sandboxer not running");
        let holder = self.holder_pid();
        let log = self.dir.join("sandboxer.log");
        let took_over = || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .matches("live upgrade: took over")
                .count()
        };
        let before = took_over();
        // SAFETY: plain kill(2) on our own child.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGUSR2) }, 0);
        wait_for("the upgraded sandboxer", Duration::from_secs(20), || {
            assert!(self.sandboxer_alive(), "sandboxer died in the upgrade");
            took_over() > before
        });
        // Serving: a resolve of an unknown kind is answered (with an error).
        let sock = self.private_socket();
        wait_for(
            "the upgraded sandboxer's answer",
            Duration::from_secs(10),
            || {
                let Ok(mut c) = kuasar_protocol::Client::connect(&sock, Duration::from_secs(2))
                else {
                    return false;
                };
                matches!(
                    c.resolve(kuasar_protocol::wire::ResolveRequest {
                        kind: "no-such-kind".into(),
                        namespace: "default".into(),
                        id: "probe".into(),
                        ..Default::default()
                    }),
                    Err(kuasar_protocol::Error::Remote { .. })
                )
            },
        );
        assert_eq!(self.sandboxer_pid(), Some(pid));
        assert_eq!(self.holder_pid(), holder);
    }

    pub fn start_containerd(&mut self) {
        assert!(self.containerd.is_none(), "containerd already running");
        self.containerd = Some(spawn_containerd(self.version, &self.dir));
        wait_for("containerd", Duration::from_secs(20), || {
            self.ctr_timeout(&["version"], Duration::from_secs(2)).ok()
        });
    }

    pub fn stop_containerd(&mut self) {
        if let Some(c) = self.containerd.take() {
            stop_child(c, Duration::from_secs(10));
        }
    }

    pub fn restart_containerd(&mut self) {
        self.stop_containerd();
        self.start_containerd();
    }

    pub fn ctr_command(&self) -> Command {
        self.ctr_client().command()
    }

    /// `ctr task exec` of `cmd` in task `id`, its stdin piped.
    pub fn exec_interactive(&self, id: &str, exec_id: &str, cmd: &[&str]) -> Interactive {
        let mut c = self.ctr_command();
        c.args(["task", "exec", "--exec-id", exec_id, id]).args(cmd);
        Interactive::spawn(&mut c)
    }

    /// `ctr task exec -t` of `sh -c SCRIPT` in task `id`, on a terminal
    /// (`script` gives ctr one).
    pub fn exec_on_terminal(&self, id: &str, exec_id: &str, script: &str) -> Interactive {
        let ctr = format!(
            "{} --address {} task exec -t --exec-id {exec_id} {id} sh -c '{script}'",
            self.version.bin_dir().join("ctr").display(),
            self.grpc_socket().display()
        );
        Interactive::spawn(Command::new("script").args(["-qec", &ctr, "/dev/null"]))
    }

    /// A `ctr` of this env that another thread can drive while this one
    /// restarts or upgrades daemons.
    pub fn ctr_client(&self) -> CtrClient {
        CtrClient {
            ctr: self.version.bin_dir().join("ctr"),
            address: self.grpc_socket(),
            cgroup: self.cgroup_name(),
        }
    }

    pub fn ctr_timeout(&self, args: &[&str], timeout: Duration) -> Out {
        run_cmd(self.ctr_command().args(args), timeout)
    }

    /// Runs ctr with a one-minute bound.
    pub fn ctr(&self, args: &[&str]) -> Out {
        self.ctr_timeout(args, Duration::from_secs(60))
    }

    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let o = self.ctr(args);
        assert!(o.ok(), "ctr {args:?} failed: {o}\n{}", self.log_tails());
        o.stdout
    }

    /// The cgroup parent of this env's containers (the env dir's name).
    pub fn cgroup_name(&self) -> String {
        self.dir.file_name().unwrap().to_string_lossy().into_owned()
    }

    /// runc root for containerd-shim-runc-v2 runs, inside the env (its
    /// default, /run/containerd/runc, belongs to the system containerd).
    pub fn runc_v2_root(&self) -> PathBuf {
        self.dir.join("runc-v2")
    }

    /// Arguments of `ctr run FLAGS… --runtime RUNTIME IMAGE ID CMD…`, with
    /// the container's cgroup under this env's parent cgroup.
    pub fn run_args(&self, flags: &[&str], runtime: &str, id: &str, cmd: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = vec!["run".into()];
        args.extend(flags.iter().map(|s| s.to_string()));
        args.extend([
            "--runtime".into(),
            runtime.into(),
            "--cgroup".into(),
            format!("/{}/{id}", self.cgroup_name()),
        ]);
        if !is_kuasar(runtime) {
            args.extend([
                "--runc-root".into(),
                self.runc_v2_root().display().to_string(),
            ]);
        }
        args.extend([IMAGE.to_string(), id.to_string()]);
        args.extend(cmd.iter().map(|s| s.to_string()));
        args
    }

    /// A `ctr run` command line (see [`Env::run_args`]) ready to spawn.
    pub fn run_command(&self, flags: &[&str], runtime: &str, id: &str, cmd: &[&str]) -> Command {
        let mut c = self.ctr_command();
        c.args(self.run_args(flags, runtime, id, cmd));
        c
    }

    /// `ctr run FLAGS…` with a one-minute bound.
    pub fn run_with(&self, flags: &[&str], runtime: &str, id: &str, cmd: &[&str]) -> Out {
        run_cmd(
            &mut self.run_command(flags, runtime, id, cmd),
            Duration::from_secs(60),
        )
    }

    /// `ctr run --rm` through `runtime` with the busybox image.
    pub fn run_rm(&self, runtime: &str, id: &str, cmd: &[&str]) -> Out {
        self.run_with(&["--rm"], runtime, id, cmd)
    }

    /// `ctr run -d` through `runtime`; asserts success.
    pub fn run_detached(&self, runtime: &str, id: &str, cmd: &[&str]) {
        let o = self.run_with(&["-d"], runtime, id, cmd);
        assert!(
            o.ok(),
            "ctr run -d {id} {cmd:?} failed: {o}\n{}",
            self.log_tails()
        );
    }

    /// Starts `ctr events` and returns once it reports events: it
    /// subscribes asynchronously, so throw-away containers are created
    /// until it reports one.
    pub fn subscribe_events(&self) -> EventStream {
        let mut cmd = self.ctr_command();
        cmd.arg("events")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        let mut child = cmd.spawn().expect("starting ctr events");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let events = EventStream {
            child: Some(child),
            lines: rx,
        };
        for n in 0..50 {
            let probe = format!("probe{n}");
            self.ctr_ok(&["container", "create", IMAGE, &probe]);
            self.ctr_ok(&["container", "rm", &probe]);
            let want = format!("\"id\":\"{probe}\"");
            let seen = events.collect_until(Duration::from_millis(200), |l| l.contains(&want));
            if seen.iter().any(|l| l.contains(&want)) {
                return events;
            }
        }
        panic!("ctr events never reported anything");
    }

    /// Imports the WASI test image (all platforms: it is wasip1/wasm only).
    pub fn import_wasm_image(&self) {
        let image = wasm_image();
        self.ctr_ok(&[
            "image",
            "import",
            "--all-platforms",
            image.to_str().unwrap(),
        ]);
    }

    /// `ctr run FLAGS… --platform wasip1/wasm --runtime kuasarwasm WASM_IMAGE
    /// ID PROGRAM ARGS…` ready to spawn.
    pub fn wasm_run_command(&self, flags: &[&str], id: &str, cmd: &[&str]) -> Command {
        let mut c = self.ctr_command();
        c.arg("run")
            .args(flags)
            .args([
                "--platform",
                "wasip1/wasm",
                "--runtime",
                KUASAR_WASM,
                WASM_IMAGE,
                id,
            ])
            .args(cmd);
        c
    }

    /// [`Env::wasm_run_command`] with a one-minute bound.
    pub fn wasm_run(&self, flags: &[&str], id: &str, cmd: &[&str]) -> Out {
        run_cmd(
            &mut self.wasm_run_command(flags, id, cmd),
            Duration::from_secs(60),
        )
    }

    /// The status column of `ctr task ls` for `id`.
    pub fn task_status(&self, id: &str) -> Option<String> {
        parse_task_status(&self.ctr_ok(&["task", "ls"]), id)
    }

    pub fn wait_status(&self, id: &str, want: &str) {
        wait_for(
            &format!("task {id} {want}"),
            Duration::from_secs(20),
            || self.task_status(id).as_deref() == Some(want),
        );
    }

    /// Kills (SIGKILL) and removes a container and its task.
    pub fn remove(&self, id: &str) {
        if self.task_status(id).is_some_and(|s| s != "STOPPED") {
            self.ctr(&["task", "kill", "-s", "KILL", id]);
            self.wait_status(id, "STOPPED");
        }
        let _ = self.ctr(&["task", "rm", id]);
        self.ctr_ok(&["container", "rm", id]);
    }

    /// `ctr task exec --exec-id EXEC_ID ID CMD…` with `input` on its stdin,
    /// then EOF; its status and stdout. Panics if it does not end within a
    /// minute.
    pub fn exec_with_stdin(
        &self,
        exec_id: &str,
        id: &str,
        cmd: &[&str],
        input: &[u8],
    ) -> (std::process::ExitStatus, String) {
        use std::io::{Read, Write};
        let mut child = self
            .ctr_command()
            .args(["task", "exec", "--exec-id", exec_id, id])
            .args(cmd)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut out = String::new();
            let _ = stdout.read_to_string(&mut out);
            out
        });
        stdin.write_all(input).unwrap();
        drop(stdin);
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "ctr task exec {cmd:?} did not end after stdin EOF\n{}",
                    self.log_tails()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        (status, reader.join().unwrap())
    }

    /// Live `containerd-shim-kuasar*` processes started by this env.
    pub fn shim_processes(&self) -> Vec<String> {
        let marker = self.dir.to_string_lossy().into_owned();
        processes()
            .into_iter()
            .filter(|(_, cmd)| cmd.contains("containerd-shim-kuasar") && cmd.contains(&marker))
            .map(|(pid, cmd)| format!("{pid} {cmd}"))
            .collect()
    }

    /// What a removed container must not leave behind: mounts under the
    /// env, task state and sockets in the sandboxer root, runc state.
    pub fn leftovers(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .mounts()
            .into_iter()
            .map(|m| format!("mount {m}"))
            .collect();
        let root = self.sandboxer_root();
        for sub in ["state", "t"] {
            for f in walk(&root.join(sub)) {
                out.push(format!("file {}", f.display()));
            }
        }
        for (root, id) in self.runc_states() {
            out.push(format!("runc state {}", root.join(id).display()));
        }
        for pid in env_processes(&self.dir, "qemu-system") {
            out.push(format!("qemu {pid}"));
        }
        let cg = self.cgroup_name();
        for pid in cgroup::procs(&cg) {
            out.push(format!("container process {pid} {}", cmdline(pid)));
        }
        for c in cgroup::children(&cg) {
            out.push(format!("cgroup {}", c.display()));
        }
        out
    }

    /// (runc --root, container id) of every runc container state of this
    /// env: the sandboxer's runc root and, for containerd-shim-runc-v2 runs,
    /// `ctr --runc-root`; both keep one directory per namespace.
    pub fn runc_states(&self) -> Vec<(PathBuf, String)> {
        let mut out = Vec::new();
        for root in [self.sandboxer_root().join("runc"), self.runc_v2_root()] {
            for ns in std::fs::read_dir(&root).into_iter().flatten().flatten() {
                for c in std::fs::read_dir(ns.path()).into_iter().flatten().flatten() {
                    out.push((ns.path(), c.file_name().to_string_lossy().into_owned()));
                }
            }
        }
        out
    }

    /// Mounts at or below the env dir, except the env's own tmpfs.
    pub fn mounts(&self) -> Vec<String> {
        let own: Vec<String> = OWN_TMPFS
            .iter()
            .map(|s| self.dir.join(s).display().to_string())
            .collect();
        mounts_under(&self.dir)
            .into_iter()
            .filter(|m| !own.contains(m))
            .collect()
    }

    /// Asserts that no shim process stayed and nothing was left behind.
    pub fn assert_clean(&self) {
        // Removal is asynchronous in containerd for a moment after ctr returns.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (shims, left) = (self.shim_processes(), self.leftovers());
            if shims.is_empty() && left.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not clean: shims {shims:?}, leftovers {left:?}\n{}",
                self.log_tails()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_tails(&self) -> String {
        let tail = |name: &str| {
            let text = std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        };
        format!(
            "--- containerd.log (tail) ---\n{}\n--- sandboxer.log (tail) ---\n{}",
            tail("containerd.log"),
            tail("sandboxer.log")
        )
    }
}

/// containerd's state (bundles) and the sandboxer's root live on tmpfs, as
/// /run/containerd and /run/kuasar do on a node.
pub(crate) fn mount_own_tmpfs(dir: &Path) {
    for sub in OWN_TMPFS {
        let target = dir.join(sub);
        std::fs::create_dir_all(&target).unwrap();
        let o = run_cmd(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", "mode=0711", "tmpfs"])
                .arg(&target),
            Duration::from_secs(10),
        );
        assert!(o.ok(), "mounting tmpfs on {}: {o}", target.display());
    }
}

/// kuasar-sandboxer with root `DIR/k`, private socket `DIR/k/s.sock`,
/// config `DIR/sandboxer.toml`, log `DIR/sandboxer.log`; returns once it
/// listens.
pub(crate) fn spawn_sandboxer(dir: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("sandboxer.log"))
        .unwrap();
    let sock = dir.join("k/s.sock");
    let child = Command::new(kuasar_bin_dir().join("kuasar-sandboxer"))
        .arg("--root")
        .arg(dir.join("k"))
        .arg("--listen")
        .arg(&sock)
        .arg("--config")
        .arg(dir.join("sandboxer.toml"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("starting kuasar-sandboxer");
    // Listening, not merely a socket file (a stale one survives a stop).
    wait_for("kuasar-sandboxer", Duration::from_secs(10), || {
        std::os::unix::net::UnixStream::connect(&sock).is_ok()
    });
    child
}

/// `ctr` against one env's containerd, detached from the [`Env`].
#[derive(Clone, Debug)]
pub struct CtrClient {
    ctr: PathBuf,
    address: PathBuf,
    cgroup: String,
}

impl CtrClient {
    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.ctr);
        c.arg("--address").arg(&self.address);
        c
    }

    /// Runs `ctr ARGS` with a one-minute bound.
    pub fn run(&self, args: &[&str]) -> Out {
        run_cmd(self.command().args(args), Duration::from_secs(60))
    }

    /// `ctr run FLAGS` of the busybox image through kuasar's runc runtime,
    /// in the env's cgroup.
    pub fn run_kuasar(&self, flags: &[&str], id: &str, cmd: &[&str]) -> Out {
        let cgroup = format!("/{}/{id}", self.cgroup);
        let mut args = vec!["run"];
        args.extend(flags);
        args.extend(["--runtime", KUASAR_RUNC, "--cgroup", &cgroup, IMAGE, id]);
        args.extend(cmd);
        self.run(&args)
    }
}

/// A holder and its daemon, as far as they run.
pub fn holder_and_daemon(holder: Option<u32>) -> Vec<u32> {
    holder
        .into_iter()
        .chain(holder.and_then(daemon_of))
        .collect()
}

/// The daemon a holder runs: its child running the same binary.
pub fn daemon_of(holder: u32) -> Option<u32> {
    let children =
        std::fs::read_to_string(format!("/proc/{holder}/task/{holder}/children")).ok()?;
    children
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .find(|&p| cmdline(p).contains("kuasar-sandboxer"))
}

/// A running command with a piped stdin whose output is collected as it
/// comes.
pub struct Interactive {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    out: std::sync::mpsc::Receiver<Vec<u8>>,
    seen: String,
}

impl Interactive {
    pub fn spawn(cmd: &mut std::process::Command) -> Interactive {
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let mut stdout = child.stdout.take().unwrap();
        let (tx, out) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut stdout, &mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Interactive {
            child,
            stdin,
            out,
            seen: String::new(),
        }
    }

    pub fn send(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        std::io::Write::write_all(stdin, text.as_bytes()).unwrap();
        std::io::Write::flush(stdin).unwrap();
    }

    pub fn expect(&mut self, needle: &str, env: &Env) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !self.seen.contains(needle) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.out.recv_timeout(left) {
                Ok(b) => self.seen.push_str(&String::from_utf8_lossy(&b)),
                Err(_) => panic!("no {needle:?} in {:?}\n{}", self.seen, env.log_tails()),
            }
        }
    }

    pub fn finish(mut self) -> std::process::ExitStatus {
        drop(self.stdin.take());
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("interactive command did not end: {:?}", self.seen);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// SIGKILLs the daemon under `holder` (env `dir`) and waits until the
/// holder has started it again and it has taken over; returns its pid.
pub(crate) fn crash_daemon(dir: &Path, holder: u32, while_down: impl FnOnce()) -> u32 {
    let log = dir.join("sandboxer.log");
    let ready = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("daemon ready after")
            .count()
    };
    let before = ready();
    let old = daemon_of(holder).expect("no daemon under the holder");
    // SAFETY: plain kill(2) on processes of this test.
    unsafe {
        assert_eq!(libc::kill(holder as i32, libc::SIGSTOP), 0);
        assert_eq!(libc::kill(old as i32, libc::SIGKILL), 0);
    }
    // The daemon is gone (a zombie until the holder runs again).
    wait_for("the daemon's death", Duration::from_secs(10), || {
        std::fs::read_to_string(format!("/proc/{old}/stat")).map_or(true, |s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
    });
    while_down();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(holder as i32, libc::SIGCONT) }, 0);
    wait_for("the restarted sandboxer", Duration::from_secs(30), || {
        ready() > before && daemon_of(holder).is_some_and(|p| p != old)
    });
    daemon_of(holder).unwrap()
}

/// Where [`write_shim_wrappers`] puts its wrappers (first in containerd's
/// PATH; absent, nothing is found there).
const SHIM_WRAPPERS: &str = "shim-wrappers";

/// Wrappers for the kuasar shim binaries that log each exec (its arguments)
/// to `DIR/shim-execs.log`, then exec the real binary.
pub(crate) fn write_shim_wrappers(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let wrappers = dir.join(SHIM_WRAPPERS);
    std::fs::create_dir_all(&wrappers).unwrap();
    for kind in kuasar_protocol::Kind::ALL {
        let name = kind.shim_binary();
        let path = wrappers.join(name);
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\necho \"{name} $*\" >> {}\nexec {} \"$@\"\n",
                dir.join("shim-execs.log").display(),
                kuasar_bin_dir().join(name).display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

/// containerd of `version` with config `DIR/containerd.toml`, log
/// `DIR/containerd.log`, the kuasar shims first in its PATH and the
/// sandboxer's private socket `DIR/k/s.sock` in its environment. Does not
/// wait for it.
pub(crate) fn spawn_containerd(version: Version, dir: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("containerd.log"))
        .unwrap();
    let path = format!(
        "{}:{}:{}:{}",
        dir.join(SHIM_WRAPPERS).display(),
        kuasar_bin_dir().display(),
        version.bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new(version.bin_dir().join("containerd"))
        .arg("--config")
        .arg(dir.join("containerd.toml"))
        .env("PATH", path)
        .env(kuasar_protocol::SOCKET_ENV, dir.join("k/s.sock"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("starting containerd")
}

pub(crate) fn stop_child(mut c: Child, grace: Duration) {
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.kill();
    let _ = c.wait();
}

/// The command line of `pid`, arguments separated by spaces.
pub fn cmdline(pid: u32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    String::from_utf8_lossy(&raw)
        .replace('\0', " ")
        .trim()
        .to_string()
}

/// The status column of `ctr task ls` output for `id`.
pub fn parse_task_status(task_ls: &str, id: &str) -> Option<String> {
    task_ls
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && f[0] == id).then(|| f[2].to_string())
        })
        .next()
}

/// (pid, command line) of every process.
pub fn processes() -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(raw) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&raw)
                .replace('\0', " ")
                .trim()
                .to_string();
            out.push((pid, cmd));
        }
    }
    out
}

/// Mount points at or below `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found = parse_mountpoints(&text, &dir.to_string_lossy());
    found.sort_by_key(|m| std::cmp::Reverse(m.len()));
    found
}

pub(crate) fn parse_mountpoints(mountinfo: &str, prefix: &str) -> Vec<String> {
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_octal)
        .filter(|m| m == prefix || m.starts_with(&format!("{prefix}/")))
        .collect()
}

/// Undoes the kernel's `\ooo` escaping of space, tab, newline and backslash
/// in /proc/self/mountinfo.
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(crate) fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The processes of an env (their command line names `dir`) whose command
/// line names `program`.
pub fn env_processes(dir: &Path, program: &str) -> Vec<u32> {
    let marker = dir.to_string_lossy().into_owned();
    processes()
        .into_iter()
        .filter(|(_, cmd)| cmd.contains(program) && cmd.contains(&marker))
        .map(|(pid, _)| pid)
        .collect()
}

/// SIGKILLs the processes of an env whose command line names `program`,
/// and waits (bounded) until they are gone.
pub(crate) fn kill_env_processes(dir: &Path, program: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = env_processes(dir, program);
        if left.is_empty() || Instant::now() > deadline {
            return;
        }
        for pid in left {
            // SAFETY: plain kill(2).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_tails());
        }
        self.stop_containerd();
        // Containers outlive both daemons: remove them with runc directly.
        for (root, id) in self.runc_states() {
            let _ = run_cmd(
                Command::new("runc")
                    .arg("--root")
                    .arg(root)
                    .args(["delete", "--force", &id]),
                Duration::from_secs(10),
            );
        }
        // Whatever still runs in the env's cgroups (also frozen ones).
        cgroup::destroy(&self.cgroup_name());
        self.stop_sandboxer();
        // containerd-shim-runc-v2 processes of this env (comparison runs).
        kill_env_processes(&self.dir, "containerd-shim");
        // VMs outlive the sandboxer as containers do.
        kill_env_processes(&self.dir, "qemu-system");
        for m in mounts_under(&self.dir) {
            if let Ok(c) = std::ffi::CString::new(m) {
                // SAFETY: c is a valid path.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_is_filtered_by_prefix() {
        let info = "36 35 98:0 / /tmp/kx-1/root/x rw - overlay overlay rw\n\
                    37 35 98:0 / /tmp/kx-10/y rw - ext4 /dev/vda rw\n\
                    38 35 98:0 / /tmp/kx-1 rw - tmpfs tmpfs rw\n";
        assert_eq!(
            parse_mountpoints(info, "/tmp/kx-1"),
            vec!["/tmp/kx-1/root/x", "/tmp/kx-1"]
        );
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        let info = "36 35 98:0 / /tmp/kx-1/a\\040b\\011c\\134d rw - tmpfs tmpfs rw\n";
        assert_eq!(
            parse_mountpoints(info, "/tmp/kx-1"),
            vec!["/tmp/kx-1/a b\tc\\d"]
        );
        assert_eq!(unescape_octal("x\\04"), "x\\04");
        assert_eq!(unescape_octal("\\9999"), "\\9999");
    }

    #[test]
    fn task_ls_status_is_found_by_exact_id() {
        let out = "TASK    PID      STATUS    \n\
                   c1      12345    RUNNING\n\
                   c10     12346    STOPPED\n";
        assert_eq!(parse_task_status(out, "c1").as_deref(), Some("RUNNING"));
        assert_eq!(parse_task_status(out, "c10").as_deref(), Some("STOPPED"));
        assert_eq!(parse_task_status(out, "c"), None);
    }
}
