//! A CRI-enabled throw-away node: containerd 1.6 or 2.1 with its CRI plugin
//! on, a private kuasar-sandboxer, a private image registry, and a CNI
//! bridge network of its own — everything private to the env (root, state,
//! sockets, netns mounts, CNI conf and IPAM dirs, bridge name and subnet,
//! registry port), and stopped, unmounted and removed on drop, also when a
//! test panics.
//!
//! Runtime handlers: `runc` (containerd's io.containerd.runc.v2, the
//! baseline), `kuasar-runc` (io.containerd.kuasarrunc.v1) and `kuasar-wasm`
//! (io.containerd.kuasarwasm.v1).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::cri::api::{
    ContainerConfig, ContainerMetadata, ImageSpec, LinuxContainerConfig,
    LinuxContainerSecurityContext, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
    NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxMetadata,
};
use crate::cri::Cri;
use crate::{
    built_image, cgroup, mount_own_tmpfs, mounts_under, new_dir_named, processes, run_cmd,
    spawn_containerd, spawn_sandboxer, stop_child, wait_for, walk, workspace, Version, OWN_TMPFS,
};

/// containerd's own shim: the baseline every scenario can be compared with.
pub const RUNC: &str = "runc";
pub const KUASAR_RUNC: &str = "kuasar-runc";
pub const KUASAR_WASM: &str = "kuasar-wasm";
pub const KUASAR_VMM: &str = "kuasar-vmm";
/// The pod sandbox image hack/build-pause-image.sh builds (`/pause` is
/// kuasar-pause from this workspace).
pub const PAUSE_IMAGE: &str = "docker.io/kuasar/pause:latest";
/// The CRI namespace of containerd.
pub const K8S_NS: &str = "k8s.io";

/// The pause image archive: `KUASAR_PAUSE_IMAGE`, else built by
/// hack/build-pause-image.sh.
pub fn pause_image() -> PathBuf {
    static IMAGE_TAR: OnceLock<PathBuf> = OnceLock::new();
    built_image(
        &IMAGE_TAR,
        "KUASAR_PAUSE_IMAGE",
        "pause.tar",
        "build-pause-image.sh",
    )
}

/// How containerd 2.1 runs a pod's sandbox for the kuasar handlers (the
/// runtime's `sandboxer` key). containerd 1.6 has only the first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SandboxMode {
    /// `podsandbox`: a pause container, through the handler's shim.
    PodSandbox,
    /// `shim`: containerd runs `<shim> start` for the sandbox and calls the
    /// ttrpc Sandbox service at the address it prints.
    Shim,
    /// `kuasar`: the sandboxer's gRPC sandbox Controller, as
    /// `[proxy_plugins.kuasar] type = "sandbox"`.
    Proxy,
}

impl SandboxMode {
    fn sandboxer(self) -> &'static str {
        match self {
            SandboxMode::PodSandbox => "podsandbox",
            SandboxMode::Shim => "shim",
            SandboxMode::Proxy => "kuasar",
        }
    }
}

// ---- private image registry ------------------------------------------------

/// Debian's docker-registry on 127.0.0.1:<free port>, started and stopped
/// by hack/lib/registry.sh, with config and storage under `dir`.
pub struct Registry {
    dir: PathBuf,
    pub port: u16,
}

fn registry_sh(args: &[&str]) -> crate::Out {
    let mut cmd = Command::new("bash");
    cmd.arg(workspace().join("hack/lib/registry.sh")).args(args);
    run_cmd(&mut cmd, Duration::from_secs(60))
}

impl Registry {
    pub fn start(dir: &Path) -> Registry {
        let o = registry_sh(&["start", &dir.to_string_lossy()]);
        assert!(o.ok(), "starting the registry: {o}");
        let port = o.stdout.trim().parse().expect("registry port");
        Registry {
            dir: dir.to_path_buf(),
            port,
        }
    }

    /// Pushes an OCI image archive as `repository:tag`; returns the pullable
    /// reference `127.0.0.1:PORT/repository:tag`.
    pub fn push(&self, archive: &Path, repo_tag: &str) -> String {
        let o = registry_sh(&[
            "push",
            &self.dir.to_string_lossy(),
            &archive.to_string_lossy(),
            repo_tag,
        ]);
        assert!(o.ok(), "pushing {} as {repo_tag}: {o}", archive.display());
        format!("127.0.0.1:{}/{repo_tag}", self.port)
    }

    /// containerd's registry host config (`config_path`) for this registry,
    /// over plain http; 1.6 needs the `[host]` table, `server` alone is not
    /// enough for it.
    fn write_hosts_dir(&self, config_path: &Path) {
        let host = format!("127.0.0.1:{}", self.port);
        let dir = config_path.join(&host);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("hosts.toml"),
            format!(
                "server = \"http://{host}\"\n\n[host.\"http://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ),
        )
        .unwrap();
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = registry_sh(&["stop", &self.dir.to_string_lossy()]);
    }
}

// ---- CNI network slots -----------------------------------------------------

/// Where envs of every test process claim their bridge and subnet, so that
/// two envs never share either; also what the first env found of the
/// host-wide state CNI changes, to restore once the last env is gone.
const NET_SLOTS: &str = "/tmp/kuasar-cri-nets";
/// portmap's chains, shared by every network on the host.
const HOSTPORT_CHAINS: [&str; 3] = [
    "CNI-HOSTPORT-DNAT",
    "CNI-HOSTPORT-SETMARK",
    "CNI-HOSTPORT-MASQ",
];
const CNI_CACHE: &str = "/var/lib/cni";

/// This env's bridge `kcri<N>` and subnet `10.241.<N>.0/24`.
struct NetSlot {
    index: u32,
}

/// Runs `f` holding the slots' lock (flock: released if the process dies).
fn with_slots_lock<T>(f: impl FnOnce(&Path) -> T) -> T {
    let dir = Path::new(NET_SLOTS);
    std::fs::create_dir_all(dir).unwrap();
    let lock = File::create(dir.join(".lock")).unwrap();
    // SAFETY: flock on a descriptor we own; unlocked when `lock` closes.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let out = f(dir);
    drop(lock);
    out
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// (index, owner pid) of every claimed slot.
fn claimed_slots(dir: &Path) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(index) = name.strip_prefix("slot-").and_then(|n| n.parse().ok()) else {
            continue;
        };
        let pid = std::fs::read_to_string(e.path())
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or(0);
        out.push((index, pid));
    }
    out
}

fn iptables(args: &[&str]) -> crate::Out {
    run_cmd(Command::new("iptables").args(args), Duration::from_secs(20))
}

fn nat_rules() -> String {
    run_cmd(
        Command::new("iptables-save").args(["-t", "nat"]),
        Duration::from_secs(20),
    )
    .stdout
}

fn chain_exists(chain: &str) -> bool {
    iptables(&["-t", "nat", "-S", chain]).ok()
}

/// Deletes the nat rules `iptables-save` printed as `lines` ("-A CHAIN …",
/// quoted as a shell would), then flushes and removes `chains`.
fn delete_nat(lines: &[&str], chains: &[String]) {
    for l in lines {
        if let Some(rule) = l.strip_prefix("-A ") {
            let _ = run_cmd(
                Command::new("sh").args(["-c", &format!("iptables -t nat -D {rule}")]),
                Duration::from_secs(20),
            );
        }
    }
    for c in chains {
        let _ = iptables(&["-t", "nat", "-F", c]);
        let _ = iptables(&["-t", "nat", "-X", c]);
    }
}

/// portmap's per-pod rules and chains of network `net` (their comments name
/// it: `dnat name: "NET" id: "…"`).
fn net_nat_rules(rules: &str, net: &str) -> (Vec<String>, Vec<String>) {
    let marker = format!("\\\"{net}\\\"");
    let lines: Vec<String> = rules
        .lines()
        .filter(|l| l.starts_with("-A ") && l.contains(&marker))
        .map(str::to_string)
        .collect();
    let mut chains = Vec::new();
    for l in &lines {
        let words: Vec<&str> = l.split_whitespace().collect();
        for w in words.windows(2) {
            if (w[0] == "-j" || w[0] == "-g")
                && w[1].starts_with("CNI-")
                && !HOSTPORT_CHAINS.contains(&w[1])
            {
                chains.push(w[1].to_string());
            }
        }
        if let Some(c) = words.get(1).filter(|c| c.starts_with("CNI-DN-")) {
            chains.push(c.to_string());
        }
    }
    chains.sort();
    chains.dedup();
    (lines, chains)
}

impl NetSlot {
    fn claim() -> NetSlot {
        with_slots_lock(|dir| {
            let mut live = Vec::new();
            for (index, pid) in claimed_slots(dir) {
                if pid_alive(pid) {
                    live.push(index);
                } else {
                    // A killed run's: its bridge is ours to remove now.
                    let _ = run_cmd(
                        Command::new("ip").args(["link", "del", &format!("kcri{index}")]),
                        Duration::from_secs(10),
                    );
                    let _ = std::fs::remove_file(dir.join(format!("slot-{index}")));
                }
            }
            let shared = dir.join("host-before");
            if live.is_empty() && !shared.exists() {
                // The bridge plugin turns on ip_forward; portmap adds chains
                // for every network; libcni caches results: remember how the
                // host was, to put it back after the last env.
                let forward =
                    std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap_or_default();
                let record = serde_json::json!({
                    "ip_forward": forward.trim(),
                    "hostport_chains": chain_exists(HOSTPORT_CHAINS[0]),
                    "cni_cache": Path::new(CNI_CACHE).exists(),
                });
                std::fs::write(&shared, record.to_string()).unwrap();
            }
            let index = (1..=250)
                .find(|i| !live.contains(i))
                .expect("no free CNI network slot");
            std::fs::write(
                dir.join(format!("slot-{index}")),
                std::process::id().to_string(),
            )
            .unwrap();
            NetSlot { index }
        })
    }

    fn bridge(&self) -> String {
        format!("kcri{}", self.index)
    }

    fn subnet(&self) -> String {
        format!("10.241.{}.0/24", self.index)
    }

    /// Gives the slot back; the last env restores the host as the first
    /// found it.
    fn release(&self) {
        with_slots_lock(|dir| {
            let _ = std::fs::remove_file(dir.join(format!("slot-{}", self.index)));
            let others = claimed_slots(dir)
                .into_iter()
                .any(|(_, pid)| pid_alive(pid));
            let shared = dir.join("host-before");
            if others {
                return;
            }
            let Ok(text) = std::fs::read_to_string(&shared) else {
                return;
            };
            let before: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            if let Some(f) = before["ip_forward"].as_str().filter(|f| !f.is_empty()) {
                let _ = std::fs::write("/proc/sys/net/ipv4/ip_forward", f);
            }
            if before["hostport_chains"] == serde_json::Value::Bool(false) {
                let rules = nat_rules();
                let jumps: Vec<&str> = rules
                    .lines()
                    .filter(|l| {
                        l.starts_with("-A ")
                            && HOSTPORT_CHAINS
                                .iter()
                                .any(|c| l.ends_with(&format!("-j {c}")))
                    })
                    .collect();
                let chains: Vec<String> = HOSTPORT_CHAINS
                    .iter()
                    .filter(|c| chain_exists(c))
                    .map(|c| c.to_string())
                    .collect();
                delete_nat(&jumps, &chains);
            }
            if before["cni_cache"] == serde_json::Value::Bool(false) {
                for d in ["results", ""] {
                    let _ = std::fs::remove_dir(Path::new(CNI_CACHE).join(d));
                }
            }
            let _ = std::fs::remove_file(&shared);
        })
    }
}

// ---- shim sampling ---------------------------------------------------------

/// Samples the process table while a test runs and remembers every
/// `containerd-shim-kuasar*` process of an env with how long it was seen.
pub struct ShimSampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<BTreeMap<u32, (String, Duration)>>>,
}

impl ShimSampler {
    fn start(marker: String) -> ShimSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seen: BTreeMap<u32, (String, Instant, Instant)> = BTreeMap::new();
            while !flag.load(Ordering::Relaxed) {
                let now = Instant::now();
                for (pid, cmd) in processes() {
                    if cmd.contains("containerd-shim-kuasar") && cmd.contains(&marker) {
                        seen.entry(pid).or_insert((cmd, now, now)).2 = now;
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            seen.into_iter()
                .map(|(pid, (cmd, first, last))| (pid, (cmd, last - first)))
                .collect()
        });
        ShimSampler {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops sampling: every shim process seen, with how long it lived
    /// (from its first to its last sample).
    pub fn finish(mut self) -> BTreeMap<u32, (String, Duration)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }

    /// Stops sampling and asserts that no kuasar shim stayed resident: each
    /// one seen lived less than `max` (a `start`/`delete` exec is a few ms).
    pub fn assert_none_resident(self, max: Duration) {
        let seen = self.finish();
        let longest = seen.values().map(|(_, d)| *d).max().unwrap_or_default();
        eprintln!(
            "kuasar shim processes sampled: {}, longest seen alive {longest:?}",
            seen.len()
        );
        let resident: Vec<_> = seen.iter().filter(|(_, (_, d))| *d >= max).collect();
        assert!(
            resident.is_empty(),
            "containerd-shim-kuasar processes stayed resident: {resident:?}"
        );
    }
}

impl Drop for ShimSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

// ---- the env ---------------------------------------------------------------

pub struct CriEnv {
    pub version: Version,
    pub mode: SandboxMode,
    pub dir: PathBuf,
    net: Option<NetSlot>,
    registry: Option<Registry>,
    containerd: Option<Child>,
    sandboxer: Option<Child>,
    cri: Option<Cri>,
    busybox: String,
}

impl CriEnv {
    /// containerd of `version` with CRI, pods in pause-container mode.
    pub fn start(version: Version) -> CriEnv {
        CriEnv::start_with(version, SandboxMode::PodSandbox)
    }

    /// containerd of `version` with CRI; on 2.1 the kuasar handlers use
    /// sandbox `mode`.
    pub fn start_with(version: Version, mode: SandboxMode) -> CriEnv {
        CriEnv::start_inner(version, mode, false)
    }

    /// [`CriEnv::start_with`], with every exec of a kuasar shim binary by
    /// containerd logged (a wrapper first in containerd's PATH): see
    /// [`CriEnv::shim_execs`]. Wrappers slow each exec down; not for
    /// benchmarks.
    pub fn start_counting_shim_execs(version: Version, mode: SandboxMode) -> CriEnv {
        CriEnv::start_inner(version, mode, true)
    }

    /// The kuasar shim execs containerd made so far: the arguments of each.
    pub fn shim_execs(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("shim-execs.log"))
            .map(|t| t.lines().map(str::to_string).collect())
            .unwrap_or_default()
    }

    fn start_inner(version: Version, mode: SandboxMode, count_execs: bool) -> CriEnv {
        assert!(
            version == Version::V2_1 || mode == SandboxMode::PodSandbox,
            "containerd 1.6 has only pause-container sandboxes"
        );
        let pause = pause_image();
        let busybox = crate::busybox_image();
        let dir = new_dir_named("kc");
        mount_own_tmpfs(&dir);
        let mut env = CriEnv {
            version,
            mode,
            dir,
            net: None,
            registry: None,
            containerd: None,
            sandboxer: None,
            cri: None,
            busybox: String::new(),
        };
        env.net = Some(NetSlot::claim());
        env.write_cni_config();
        let registry = Registry::start(&env.dir.join("registry"));
        env.busybox = registry.push(&busybox, "library/busybox:latest");
        registry.write_hosts_dir(&env.dir.join("certs.d"));
        env.registry = Some(registry);
        // [containerd]: pods that arrive through the sandbox proxy (no shim
        // exec tells the daemon containerd's sockets) publish events here.
        std::fs::write(
            env.dir.join("sandboxer.toml"),
            format!(
                "log_level = \"debug\"\n[runc]\nbinary = \"runc\"\n[wasm]\nenabled = true\nmax_instances = 100\n\
                 [containerd]\naddress = \"{0}/c.sock\"\nttrpc_address = \"{0}/c.sock.ttrpc\"\n{1}",
                env.dir.display(),
                crate::vmm_config(),
            ),
        )
        .unwrap();
        std::fs::write(env.dir.join("containerd.toml"), env.containerd_config()).unwrap();
        if count_execs {
            crate::write_shim_wrappers(&env.dir);
        }
        env.sandboxer = Some(spawn_sandboxer(&env.dir));
        env.start_containerd();
        env.ctr_ok(&["image", "import", &pause.to_string_lossy()]);
        // kubelet never garbage-collects a pinned image: 2.1 pins its
        // sandbox image (and reads this label); 1.6 knows no pinning.
        env.ctr_ok(&[
            "image",
            "label",
            PAUSE_IMAGE,
            "io.cri-containerd.pinned=pinned",
        ]);
        // CRI learns of the import and the label from containerd's events.
        wait_for("the pause image in CRI", Duration::from_secs(20), || {
            env.cri()
                .image_status(PAUSE_IMAGE)
                .ok()
                .flatten()
                .is_some_and(|i| i.pinned || version == Version::V1_6)
        });
        env
    }

    /// This env's name: its dir's name, the top-level cgroup of its pods,
    /// part of its CNI network's name.
    pub fn name(&self) -> String {
        self.dir.file_name().unwrap().to_string_lossy().into_owned()
    }

    pub fn net_name(&self) -> String {
        format!("kuasar-{}", self.name())
    }

    pub fn bridge(&self) -> String {
        self.net.as_ref().unwrap().bridge()
    }

    pub fn grpc_socket(&self) -> PathBuf {
        self.dir.join("c.sock")
    }

    pub fn sandboxer_root(&self) -> PathBuf {
        self.dir.join("k")
    }

    /// The pullable busybox reference in this env's registry.
    pub fn busybox(&self) -> &str {
        &self.busybox
    }

    /// Pushes the WASI test image (hack/build-wasm-image.sh) into the
    /// env's registry; returns its pullable reference.
    pub fn push_wasm_image(&self) -> String {
        self.registry
            .as_ref()
            .unwrap()
            .push(&crate::wasm_image(), "kuasar/wasm-test:latest")
    }

    /// The env's CRI client.
    pub fn cri(&self) -> &Cri {
        self.cri.as_ref().expect("containerd is not running")
    }

    /// A CRI client of its own, for another thread.
    pub fn new_cri(&self) -> Cri {
        Cri::connect(&self.grpc_socket()).expect("connecting to CRI")
    }

    fn write_cni_config(&self) {
        let net = self.net.as_ref().unwrap();
        let conf = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": self.net_name(),
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": net.bridge(),
                    // The bridge gets the gateway address, so the host
                    // reaches pods (hostPort, pod IPs). No default route and
                    // no masquerade: pods reach their subnet and nothing
                    // beyond this machine.
                    "isGateway": true,
                    "ipMasq": false,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{ "subnet": net.subnet() }]],
                        "dataDir": self.dir.join("cni-ipam"),
                    },
                },
                { "type": "portmap", "capabilities": { "portMappings": true } },
            ],
        });
        let dir = self.dir.join("cni");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("10-kuasar.conflist"),
            serde_json::to_string_pretty(&conf).unwrap(),
        )
        .unwrap();
    }

    fn containerd_config(&self) -> String {
        let d = self.dir.display();
        match self.version {
            Version::V1_6 => format!(
                r#"version = 2
root = "{d}/root"
state = "{d}/state"
[grpc]
  address = "{d}/c.sock"
[ttrpc]
  address = "{d}/c.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # root lacks CAP_SYS_RESOURCE here: without this no pod starts.
  restrict_oom_score_adj = true
  # Pod netns mounts under the env's state, not /var/run/netns.
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "{RUNC}"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{RUNC}]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{RUNC}.options]
        Root = "{d}/runc-v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{KUASAR_RUNC}]
      runtime_type = "io.containerd.kuasarrunc.v1"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{KUASAR_WASM}]
      runtime_type = "io.containerd.kuasarwasm.v1"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{KUASAR_VMM}]
      runtime_type = "io.containerd.kuasarvmm.v1"
      pod_annotations = ["io.kuasar.vmm.*"]
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{d}/certs.d"
"#
            ),
            Version::V2_1 => {
                let sandboxer = self.mode.sandboxer();
                let proxy = if self.mode == SandboxMode::Proxy {
                    format!(
                        "\n[proxy_plugins]\n  [proxy_plugins.kuasar]\n    type = 'sandbox'\n    address = '{d}/k/sandbox.sock'\n"
                    )
                } else {
                    String::new()
                };
                format!(
                    r#"version = 3
root = '{d}/root'
state = '{d}/state'
[grpc]
  address = '{d}/c.sock'
[ttrpc]
  address = '{d}/c.sock.ttrpc'
[plugins]
  [plugins.'io.containerd.internal.v1.opt']
    path = '{d}/opt'
  # NRI's socket is host-wide (/var/run/nri); envs must not share it.
  [plugins.'io.containerd.nri.v1.nri']
    disable = true
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = 'overlayfs'
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = '{PAUSE_IMAGE}'
    [plugins.'io.containerd.cri.v1.images'.registry]
      config_path = '{d}/certs.d'
  [plugins.'io.containerd.cri.v1.runtime']
    # root lacks CAP_SYS_RESOURCE here: without this no pod starts.
    restrict_oom_score_adj = true
    # Pod netns mounts under the env's state, not /var/run/netns.
    netns_mounts_under_state_dir = true
    enable_cdi = false
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = ['/usr/lib/cni']
      conf_dir = '{d}/cni'
      max_conf_num = 1
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = '{RUNC}'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.{RUNC}]
        runtime_type = 'io.containerd.runc.v2'
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.{RUNC}.options]
          Root = '{d}/runc-v2'
      # No options tables: containerd 2.1.9 fails a runtime that has one
      # together with a sandbox address (containerd issue 12986).
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.{KUASAR_RUNC}]
        runtime_type = 'io.containerd.kuasarrunc.v1'
        sandboxer = '{sandboxer}'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.{KUASAR_WASM}]
        runtime_type = 'io.containerd.kuasarwasm.v1'
        sandboxer = '{sandboxer}'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.{KUASAR_VMM}]
        runtime_type = 'io.containerd.kuasarvmm.v1'
        sandboxer = '{sandboxer}'
  [plugins.'io.containerd.grpc.v1.cri']
    stream_server_address = '127.0.0.1'
    stream_server_port = '0'
{proxy}"#
                )
            }
        }
    }

    /// Starts containerd and waits until its CRI plugin reports the runtime
    /// and the network ready.
    pub fn start_containerd(&mut self) {
        assert!(self.containerd.is_none(), "containerd already running");
        self.containerd = Some(spawn_containerd(self.version, &self.dir));
        let sock = self.grpc_socket();
        let mut cri = None;
        wait_for("containerd's CRI", Duration::from_secs(30), || {
            if let Some(Ok(Some(c))) = self.containerd.as_mut().map(|c| c.try_wait()) {
                panic!("containerd exited ({c})\n{}", self.log_tails());
            }
            if cri.is_none() && sock.exists() {
                cri = Cri::connect(&sock).ok();
            }
            let Some(c) = cri.as_ref() else { return false };
            c.status().is_ok_and(|s| {
                s.status.is_some_and(|s| {
                    s.conditions.len() >= 2 && s.conditions.iter().all(|c| c.status)
                })
            })
        });
        self.cri = cri;
    }

    pub fn stop_containerd(&mut self) {
        self.cri = None;
        if let Some(c) = self.containerd.take() {
            stop_child(c, Duration::from_secs(10));
        }
    }

    pub fn restart_containerd(&mut self) {
        self.stop_containerd();
        self.start_containerd();
    }

    pub fn holder_pid(&self) -> Option<u32> {
        self.sandboxer.as_ref().map(|c| c.id())
    }

    /// The daemon (the holder's child).
    pub fn sandboxer_pid(&self) -> Option<u32> {
        self.holder_pid().and_then(crate::daemon_of)
    }

    /// The holder and the daemon: what the node pays for.
    pub fn sandboxer_pids(&self) -> Vec<u32> {
        crate::holder_and_daemon(self.holder_pid())
    }

    /// Kills the daemon with SIGKILL; returns once it was started again
    /// and took over.
    pub fn crash_sandboxer(&mut self) -> u32 {
        crate::crash_daemon(
            &self.dir,
            self.holder_pid().expect("sandboxer not running"),
            || {},
        )
    }

    pub fn ctr(&self, args: &[&str]) -> crate::Out {
        let mut c = Command::new(self.version.bin_dir().join("ctr"));
        c.arg("--address")
            .arg(self.grpc_socket())
            .args(["--namespace", K8S_NS])
            .args(args);
        run_cmd(&mut c, Duration::from_secs(60))
    }

    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let o = self.ctr(args);
        assert!(o.ok(), "ctr {args:?} failed: {o}\n{}", self.log_tails());
        o.stdout
    }

    /// PullImage of busybox from the env's registry.
    pub fn pull_busybox(&self) -> String {
        self.cri()
            .pull_image(&self.busybox, None)
            .unwrap_or_else(|e| panic!("PullImage {}: {e}\n{}", self.busybox, self.log_tails()))
    }

    /// A pod's config as kubelet sends it: network and IPC of the pod, a PID
    /// namespace per container, the pod's cgroup under the env's cgroup, logs
    /// under the env.
    pub fn pod_config(&self, name: &str) -> PodSandboxConfig {
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                uid: format!("{name}-uid"),
                namespace: "e2e".into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: self.dir.join("logs").join(name).display().to_string(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: format!("/{}/{name}", self.name()),
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: NamespaceMode::Pod as i32,
                        pid: NamespaceMode::Container as i32,
                        ipc: NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// A busybox container's config: `cmd`, its log at
    /// `<pod log dir>/<name>.log`, the pod's namespace options.
    pub fn container_config(
        &self,
        pod: &PodSandboxConfig,
        name: &str,
        cmd: &[&str],
    ) -> ContainerConfig {
        let ns = pod
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.clone());
        ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: self.busybox.clone(),
                ..Default::default()
            }),
            command: cmd.iter().map(|s| s.to_string()).collect(),
            log_path: format!("{name}.log"),
            linux: Some(LinuxContainerConfig {
                security_context: Some(LinuxContainerSecurityContext {
                    namespace_options: ns,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// RunPodSandbox of `config` through `handler`; panics with the logs on
    /// failure.
    pub fn run_pod(&self, config: &PodSandboxConfig, handler: &str) -> String {
        self.cri()
            .run_pod_sandbox(config, handler)
            .unwrap_or_else(|e| panic!("RunPodSandbox via {handler}: {e}\n{}", self.log_tails()))
    }

    /// CreateContainer + StartContainer; returns the container id.
    pub fn run_container(
        &self,
        pod_id: &str,
        pod: &PodSandboxConfig,
        config: &ContainerConfig,
    ) -> String {
        let id = self
            .cri()
            .create_container(pod_id, config, pod)
            .unwrap_or_else(|e| panic!("CreateContainer: {e}\n{}", self.log_tails()));
        self.cri()
            .start_container(&id)
            .unwrap_or_else(|e| panic!("StartContainer: {e}\n{}", self.log_tails()));
        id
    }

    /// Stops and removes every pod (and so its containers).
    pub fn remove_all_pods(&self) {
        let cri = self.cri();
        for p in cri.list_pod_sandbox().unwrap_or_default() {
            let _ = cri.stop_pod_sandbox(&p.id);
            let _ = cri.remove_pod_sandbox(&p.id);
        }
    }

    /// The task address containerd keeps in a task's bundle (`address`).
    pub fn bundle_address(&self, id: &str) -> String {
        let p = self
            .dir
            .join("state/io.containerd.runtime.v2.task")
            .join(K8S_NS)
            .join(id)
            .join("address");
        std::fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
            .trim()
            .to_string()
    }

    /// Starts sampling for resident `containerd-shim-kuasar*` processes of
    /// this env.
    pub fn sample_shims(&self) -> ShimSampler {
        ShimSampler::start(self.dir.to_string_lossy().into_owned())
    }

    /// Pod netns files CRI made (under the env's state).
    pub fn netns_files(&self) -> Vec<PathBuf> {
        walk(&self.dir.join("state"))
            .into_iter()
            .filter(|p| p.parent().is_some_and(|d| d.ends_with("netns")))
            .collect()
    }

    /// What an env with no pods must not have: container processes and
    /// cgroups, mounts, netns, veths on its bridge, IP allocations, portmap
    /// rules, CNI cache entries, task state in the sandboxer, runc state,
    /// live kuasar shims.
    pub fn leftovers(&self) -> Vec<String> {
        let own: Vec<String> = OWN_TMPFS
            .iter()
            .map(|s| self.dir.join(s).display().to_string())
            .collect();
        let mut out: Vec<String> = mounts_under(&self.dir)
            .into_iter()
            .filter(|m| !own.contains(m))
            .map(|m| format!("mount {m}"))
            .collect();
        for f in self.netns_files() {
            out.push(format!("netns {}", f.display()));
        }
        for pid in crate::env_processes(&self.dir, "qemu-system") {
            out.push(format!("qemu {pid}"));
        }
        let cg = self.name();
        for pid in cgroup::procs(&cg) {
            out.push(format!("container process {pid} {}", crate::cmdline(pid)));
        }
        // Container cgroups (`<env>/<pod>/<id>`); the pod level is kubelet's
        // to make and remove (here: the env's drop).
        for c in cgroup::children(&cg) {
            if c.parent().and_then(Path::file_name) != Some(std::ffi::OsStr::new(&cg)) {
                out.push(format!("cgroup {}", c.display()));
            }
        }
        let brif = Path::new("/sys/class/net").join(self.bridge()).join("brif");
        for e in std::fs::read_dir(brif).into_iter().flatten().flatten() {
            out.push(format!("veth {}", e.file_name().to_string_lossy()));
        }
        for f in walk(&self.dir.join("cni-ipam")) {
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            if name != "lock" && !name.starts_with("last_reserved_ip") {
                out.push(format!("IP allocation {}", f.display()));
            }
        }
        let (rules, chains) = net_nat_rules(&nat_rules(), &self.net_name());
        out.extend(rules.into_iter().map(|r| format!("iptables {r}")));
        out.extend(chains.into_iter().map(|c| format!("iptables chain {c}")));
        for f in walk(&Path::new(CNI_CACHE).join("results")) {
            if f.to_string_lossy().contains(&self.net_name()) {
                out.push(format!("CNI cache {}", f.display()));
            }
        }
        for sub in ["state", "t"] {
            for f in walk(&self.sandboxer_root().join(sub)) {
                out.push(format!("sandboxer file {}", f.display()));
            }
        }
        for (root, id) in self.runc_states() {
            out.push(format!("runc state {}", root.join(id).display()));
        }
        let marker = self.dir.to_string_lossy().into_owned();
        for (pid, cmd) in processes() {
            if cmd.contains("containerd-shim") && cmd.contains(&marker) {
                out.push(format!("shim {pid} {cmd}"));
            }
        }
        out
    }

    /// Asserts that nothing of a pod is left (see [`CriEnv::leftovers`]);
    /// containerd cleans up asynchronously for a moment.
    pub fn assert_clean(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = self.leftovers();
            if left.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not clean: {left:#?}\n{}",
                self.log_tails()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// (runc root, container id) of every runc container of this env: the
    /// sandboxer's and containerd-shim-runc-v2's (`Root` of the runc handler).
    pub fn runc_states(&self) -> Vec<(PathBuf, String)> {
        let mut out = Vec::new();
        for root in [self.sandboxer_root().join("runc"), self.dir.join("runc-v2")] {
            for ns in std::fs::read_dir(&root).into_iter().flatten().flatten() {
                for c in std::fs::read_dir(ns.path()).into_iter().flatten().flatten() {
                    out.push((ns.path(), c.file_name().to_string_lossy().into_owned()));
                }
            }
        }
        out
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

impl Drop for CriEnv {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_tails());
            // The whole logs outlive the env, for the failure's post-mortem.
            let keep = workspace().join("target/cri-e2e-logs").join(self.name());
            if std::fs::create_dir_all(&keep).is_ok() {
                for f in ["containerd.log", "sandboxer.log", "containerd.toml"] {
                    let _ = std::fs::copy(self.dir.join(f), keep.join(f));
                }
                eprintln!("logs kept in {}", keep.display());
            }
        }
        // Pods first, through CRI, so that CNI releases what it set up
        // (veths, IPs, portmap rules) and containerd unmounts the netns.
        if self.cri.is_some() {
            self.remove_all_pods();
        }
        self.stop_containerd();
        // Whatever outlived both daemons.
        for (root, id) in self.runc_states() {
            let _ = run_cmd(
                Command::new("runc")
                    .arg("--root")
                    .arg(root)
                    .args(["delete", "--force", &id]),
                Duration::from_secs(10),
            );
        }
        cgroup::destroy(&self.name());
        crate::kill_env_processes(&self.dir, "qemu-system");
        if let Some(c) = self.sandboxer.take() {
            stop_child(c, Duration::from_secs(5));
        }
        let marker = self.dir.to_string_lossy().into_owned();
        for (pid, cmd) in processes() {
            if cmd.contains("containerd-shim") && cmd.contains(&marker) {
                // SAFETY: plain kill(2).
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        self.registry = None;
        for m in mounts_under(&self.dir) {
            if let Ok(c) = std::ffi::CString::new(m) {
                // SAFETY: c is a valid path.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        if let Some(net) = self.net.take() {
            let (rules, chains) = net_nat_rules(&nat_rules(), &self.net_name());
            let rules: Vec<&str> = rules.iter().map(String::as_str).collect();
            delete_nat(&rules, &chains);
            let _ = run_cmd(
                Command::new("ip").args(["link", "del", &net.bridge()]),
                Duration::from_secs(10),
            );
            for f in walk(&Path::new(CNI_CACHE).join("results")) {
                if f.to_string_lossy().contains(&self.net_name()) {
                    let _ = std::fs::remove_file(f);
                }
            }
            net.release();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn portmap_rules_of_one_network_are_found_by_its_name() {
        let rules = r#"*nat
:CNI-DN-1234 - [0:0]
:CNI-DN-5678 - [0:0]
-A CNI-HOSTPORT-DNAT -p tcp -m comment --comment "dnat name: \"kuasar-kc-1-1\" id: \"abc\"" -m multiport --dports 8080 -j CNI-DN-1234
-A CNI-HOSTPORT-DNAT -p tcp -m comment --comment "dnat name: \"kuasar-kc-1-10\" id: \"def\"" -m multiport --dports 8081 -j CNI-DN-5678
-A CNI-DN-1234 -s 10.241.1.0/24 -p tcp -m tcp --dport 8080 -j CNI-HOSTPORT-SETMARK
COMMIT
"#;
        let (lines, chains) = net_nat_rules(rules, "kuasar-kc-1-1");
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains("--dports 8080"));
        assert_eq!(chains, vec!["CNI-DN-1234".to_string()]);
    }
}
