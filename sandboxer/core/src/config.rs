//! Daemon configuration: a TOML file, with `--root` and `--listen` on the
//! command line taking precedence.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

pub const DEFAULT_CONFIG: &str = "/etc/kuasar/sandboxer.toml";
pub const DEFAULT_ROOT: &str = "/run/kuasar";

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Everything the daemon writes lives here: task sockets, state, runc's root.
    pub root: PathBuf,
    /// The private socket the shims dial; defaults to `<root>/sandboxer.sock`.
    pub listen: Option<PathBuf>,
    /// Peers (by uid) allowed on the private socket.
    pub allowed_uids: Vec<u32>,
    /// `tracing` filter, overridden by `RUST_LOG`.
    pub log_level: String,
    /// Lines of text, or one JSON object per event.
    pub log_format: LogFormat,
    pub runc: RuncConfig,
    pub wasm: WasmConfig,
    pub vmm: VmmConfig,
    pub containerd: ContainerdConfig,
    /// Where containerd 2.x's `[proxy_plugins.NAME] type = "sandbox"`
    /// connects; defaults to `<root>/sandbox.sock`.
    pub sandbox_listen: Option<PathBuf>,
}

/// How log lines are written (to stderr: journald or a file takes them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    /// One JSON object per line, the fields of the event and of the call
    /// it belongs to at its top level.
    Json,
}

/// The containerd whose pods arrive without a shim exec (containerd 2.x's
/// sandbox proxy): no shim tells the daemon its addresses then.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ContainerdConfig {
    /// containerd's gRPC socket (its content store, for wasm layers).
    pub address: String,
    /// containerd's ttrpc socket, where task events are published.
    pub ttrpc_address: String,
}

impl Default for ContainerdConfig {
    fn default() -> Self {
        ContainerdConfig {
            address: "/run/containerd/containerd.sock".into(),
            ttrpc_address: "/run/containerd/containerd.sock.ttrpc".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuncConfig {
    pub enabled: bool,
    /// The runc binary, by path or looked up in `PATH`.
    pub binary: String,
}

/// The wasm backend: one wasmtime engine for every instance on the node.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WasmConfig {
    pub enabled: bool,
    /// Instances that can exist at once (slots of the pooling allocator).
    pub max_instances: u32,
    /// The most linear memory one instance may have, whatever its limit.
    pub max_memory_mib: u64,
    /// Compiled modules kept in memory while no instance uses them.
    pub cached_modules: usize,
    /// Threads that run instances, apart from the daemon's own.
    pub threads: usize,
}

impl Default for WasmConfig {
    fn default() -> Self {
        WasmConfig {
            // Every backend that is built is enabled unless the config says
            // otherwise, as the shipped config does.
            enabled: true,
            max_instances: 1000,
            max_memory_mib: 4096,
            cached_modules: 64,
            threads: 2,
        }
    }
}

/// The microVM backend: one qemu VM per sandbox, booted from the guest
/// image `hack/build-guest-image.sh` builds.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VmmConfig {
    pub enabled: bool,
    /// qemu, by path or looked up in `PATH`.
    pub qemu: String,
    /// The guest kernel (an uncompressed vmlinux, booted through PVH).
    pub kernel: PathBuf,
    /// The guest's initramfs (the agent as `/init`, runc, modules).
    pub initrd: PathBuf,
    /// Appended to the kernel command line.
    pub kernel_params: String,
    /// `auto` (KVM if `/dev/kvm` really runs a guest, probed once), `kvm`
    /// or `tcg`.
    pub accel: String,
    /// How long the KVM probe may take before TCG is chosen.
    pub probe_timeout_ms: u64,
    /// The TCG translation cache of each VM, in MiB.
    pub tcg_cache_mib: u32,
    /// Defaults for a pod that asks for nothing.
    pub vcpus: u32,
    pub memory_mib: u32,
    /// The most one VM may have.
    pub max_vcpus: u32,
    pub max_memory_mib: u32,
    /// How long a VM may take to boot to its agent.
    pub boot_timeout_ms: u64,
    /// How long a clean shutdown may take before qemu is killed.
    pub shutdown_timeout_ms: u64,
}

impl Default for VmmConfig {
    fn default() -> Self {
        VmmConfig {
            enabled: true,
            qemu: "qemu-system-x86_64".into(),
            kernel: "/usr/local/share/kuasar/guest/vmlinux".into(),
            initrd: "/usr/local/share/kuasar/guest/initramfs.cpio".into(),
            kernel_params: String::new(),
            accel: "auto".into(),
            probe_timeout_ms: 3000,
            tcg_cache_mib: 16,
            vcpus: 1,
            memory_mib: 128,
            max_vcpus: 8,
            max_memory_mib: 8192,
            boot_timeout_ms: 20000,
            shutdown_timeout_ms: 3000,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root: DEFAULT_ROOT.into(),
            listen: None,
            allowed_uids: vec![0],
            log_level: "info".into(),
            log_format: LogFormat::Text,
            runc: RuncConfig::default(),
            wasm: WasmConfig::default(),
            vmm: VmmConfig::default(),
            containerd: ContainerdConfig::default(),
            sandbox_listen: None,
        }
    }
}

impl Default for RuncConfig {
    fn default() -> Self {
        RuncConfig {
            enabled: true,
            binary: "runc".into(),
        }
    }
}

impl Config {
    /// Reads `path`; a missing file at the default location means defaults.
    pub fn load(path: &Path, explicit: bool) -> Result<Config> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text)
                .map_err(|e| Error::InvalidArgument(format!("config {}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                Ok(Config::default())
            }
            Err(e) => Err(Error::Io {
                what: format!("reading config {}", path.display()),
                source: e,
            }),
        }
    }

    pub fn sandbox_listen_path(&self) -> PathBuf {
        self.sandbox_listen
            .clone()
            .unwrap_or_else(|| self.root.join("sandbox.sock"))
    }

    pub fn listen_path(&self) -> PathBuf {
        self.listen
            .clone()
            .unwrap_or_else(|| self.root.join("sandboxer.sock"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_file_parses_and_unknown_keys_are_refused() {
        let c: Config = toml::from_str(
            r#"
root = "/tmp/k"
listen = "/tmp/k/s.sock"
allowed_uids = [0, 1000]
log_level = "debug"
log_format = "json"
[runc]
enabled = true
binary = "/usr/sbin/runc"
[wasm]
enabled = true
max_instances = 600
"#,
        )
        .unwrap();
        assert_eq!(c.root, PathBuf::from("/tmp/k"));
        assert_eq!(c.listen_path(), PathBuf::from("/tmp/k/s.sock"));
        assert_eq!(c.allowed_uids, vec![0, 1000]);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.runc.binary, "/usr/sbin/runc");
        assert!(c.vmm.enabled);
        assert_eq!(c.vmm.accel, "auto");
        assert!(c.wasm.enabled);
        assert_eq!(c.wasm.max_instances, 600);
        assert_eq!(c.wasm.max_memory_mib, 4096);
        assert!(toml::from_str::<Config>("roots = \"/x\"").is_err());
        assert!(toml::from_str::<Config>("log_format = \"xml\"").is_err());
    }

    #[test]
    fn defaults_match_the_shipped_config() {
        let shipped =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../hack/config/sandboxer.toml");
        let shipped = Config::load(&shipped, true).unwrap();
        let built = Config::default();
        assert_eq!(built.root, shipped.root);
        assert_eq!(built.listen_path(), shipped.listen_path());
        assert_eq!(built.allowed_uids, shipped.allowed_uids);
        assert_eq!(built.log_level, shipped.log_level);
        assert_eq!(built.log_format, shipped.log_format);
        assert_eq!(built.runc.enabled, shipped.runc.enabled);
        assert_eq!(built.runc.binary, shipped.runc.binary);
        assert_eq!(built.wasm.enabled, shipped.wasm.enabled);
        assert_eq!(built.wasm.max_instances, shipped.wasm.max_instances);
        assert_eq!(built.wasm.threads, shipped.wasm.threads);
        let (b, s) = (&built.vmm, &shipped.vmm);
        assert_eq!(
            (
                b.enabled,
                &b.qemu,
                &b.kernel,
                &b.initrd,
                &b.kernel_params,
                &b.accel
            ),
            (
                s.enabled,
                &s.qemu,
                &s.kernel,
                &s.initrd,
                &s.kernel_params,
                &s.accel
            )
        );
        assert_eq!(
            (
                b.probe_timeout_ms,
                b.tcg_cache_mib,
                b.vcpus,
                b.memory_mib,
                b.max_vcpus
            ),
            (
                s.probe_timeout_ms,
                s.tcg_cache_mib,
                s.vcpus,
                s.memory_mib,
                s.max_vcpus
            )
        );
        assert_eq!(
            (b.max_memory_mib, b.boot_timeout_ms, b.shutdown_timeout_ms),
            (s.max_memory_mib, s.boot_timeout_ms, s.shutdown_timeout_ms)
        );
        assert_eq!(built.sandbox_listen_path(), shipped.sandbox_listen_path());
        assert_eq!(built.containerd.address, shipped.containerd.address);
        assert_eq!(
            built.containerd.ttrpc_address,
            shipped.containerd.ttrpc_address
        );
    }

    #[test]
    fn missing_default_file_means_defaults_but_missing_explicit_file_is_an_error() {
        let p = Path::new("/nonexistent/kuasar.toml");
        assert_eq!(
            Config::load(p, false).unwrap().root,
            PathBuf::from(DEFAULT_ROOT)
        );
        assert!(Config::load(p, true).is_err());
    }
}
