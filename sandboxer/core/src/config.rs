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
    pub runc: RuncConfig,
    pub wasm: WasmConfig,
    pub vmm: BackendToggle,
    pub containerd: ContainerdConfig,
    /// Where containerd 2.x's `[proxy_plugins.NAME] type = "sandbox"`
    /// connects; defaults to `<root>/sandbox.sock`.
    pub sandbox_listen: Option<PathBuf>,
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

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackendToggle {
    pub enabled: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root: DEFAULT_ROOT.into(),
            listen: None,
            allowed_uids: vec![0],
            log_level: "info".into(),
            runc: RuncConfig::default(),
            wasm: WasmConfig::default(),
            vmm: BackendToggle::default(),
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
        assert_eq!(c.runc.binary, "/usr/sbin/runc");
        assert!(!c.vmm.enabled);
        assert!(c.wasm.enabled);
        assert_eq!(c.wasm.max_instances, 600);
        assert_eq!(c.wasm.max_memory_mib, 4096);
        assert!(toml::from_str::<Config>("roots = \"/x\"").is_err());
    }

    #[test]
    fn defaults_match_the_shipped_config() {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hack/config/sandboxer.toml");
        let shipped = Config::load(&shipped, true).unwrap();
        let built = Config::default();
        assert_eq!(built.root, shipped.root);
        assert_eq!(built.listen_path(), shipped.listen_path());
        assert_eq!(built.allowed_uids, shipped.allowed_uids);
        assert_eq!(built.runc.enabled, shipped.runc.enabled);
        assert_eq!(built.runc.binary, shipped.runc.binary);
        assert_eq!(built.wasm.enabled, shipped.wasm.enabled);
        assert_eq!(built.wasm.max_instances, shipped.wasm.max_instances);
        assert_eq!(built.wasm.threads, shipped.wasm.threads);
        assert_eq!(built.vmm.enabled, shipped.vmm.enabled);
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
