//! What a container of a VM needs from the host, shared into the guest:
//! its rootfs and the sources of its bind mounts are mounted under the
//! sandbox's shared directory (virtio-9p), and its spec is rewritten to
//! the paths the guest sees.

use std::path::{Path, PathBuf};

use kuasar_core::error::{io_context, sys_context, Error, Result};
use kuasar_host::mount::{unmount_all, Rootfs};
use nix::mount::{mount, MsFlags};
use serde_json::Value;

/// Where the guest mounts the shared directory.
pub const GUEST_SHARED: &str = "/run/kuasar/shared";

/// A container's share: its directory under the sandbox's shared
/// directory, with the rootfs and bind-mount sources mounted in it.
pub struct Share {
    dir: PathBuf,
    rootfs: Rootfs,
    binds: Vec<PathBuf>,
}

/// What a successor daemon needs of a share.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone)]
pub struct ShareRecord {
    dir: PathBuf,
    rootfs_mounted: bool,
    binds: Vec<PathBuf>,
}

impl Share {
    pub fn record(&self) -> ShareRecord {
        ShareRecord {
            dir: self.dir.clone(),
            rootfs_mounted: self.rootfs.is_mounted(),
            binds: self.binds.clone(),
        }
    }

    /// The share a predecessor made.
    pub fn adopt(r: ShareRecord) -> Share {
        Share {
            rootfs: Rootfs::adopt(&r.dir, r.rootfs_mounted),
            dir: r.dir,
            binds: r.binds,
        }
    }

    /// Mounts the container's rootfs (containerd's `mounts`, or the
    /// bundle's own rootfs when none were sent) and rewrites `spec`.
    pub fn prepare(
        shared: &Path,
        id: &str,
        bundle: &Path,
        mounts: &[containerd_shim_protos::api::Mount],
        spec: &mut Value,
    ) -> Result<Share> {
        let dir = shared.join(id);
        let rootfs_dir = dir.join("rootfs");
        std::fs::create_dir_all(&rootfs_dir)
            .map_err(io_context(format!("creating {}", rootfs_dir.display())))?;
        let rootfs = if mounts.is_empty() {
            let root = spec["root"]["path"].as_str().unwrap_or("rootfs");
            let source = bundle.join(root);
            bind(&source, &rootfs_dir)?;
            Rootfs::adopt(&dir, true)
        } else {
            Rootfs::mount(mounts, &dir)?
        };
        let mut share = Share {
            dir,
            rootfs,
            binds: Vec::new(),
        };
        if let Err(e) = share.rewrite(id, spec) {
            share.release();
            return Err(e);
        }
        Ok(share)
    }

    fn rewrite(&mut self, id: &str, spec: &mut Value) -> Result<()> {
        let guest = Path::new(GUEST_SHARED).join(id);
        spec["root"]["path"] = guest.join("rootfs").display().to_string().into();
        // Hooks name host binaries the guest does not have.
        if let Some(obj) = spec.as_object_mut() {
            obj.remove("hooks");
        }
        let Some(mounts) = spec.get_mut("mounts").and_then(Value::as_array_mut) else {
            return Ok(());
        };
        for (n, m) in mounts.iter_mut().enumerate() {
            let is_bind = m["type"].as_str() == Some("bind")
                || m["options"]
                    .as_array()
                    .is_some_and(|o| o.iter().any(|v| v == "bind" || v == "rbind"));
            let Some(source) = m["source"].as_str().map(PathBuf::from) else {
                continue;
            };
            // Kernel filesystems are the guest's own.
            if !is_bind
                || !source.is_absolute()
                || ["/proc", "/sys", "/dev"]
                    .iter()
                    .any(|p| source.starts_with(p))
            {
                continue;
            }
            let target = self.dir.join(format!("m{n}"));
            let meta = std::fs::metadata(&source).map_err(io_context(format!(
                "bind mount source {}",
                source.display()
            )))?;
            if meta.is_dir() {
                std::fs::create_dir_all(&target)
            } else {
                std::fs::write(&target, b"")
            }
            .map_err(io_context(format!("creating {}", target.display())))?;
            bind(&source, &target)?;
            self.binds.push(target);
            m["source"] = guest.join(format!("m{n}")).display().to_string().into();
        }
        Ok(())
    }

    /// Unmounts and removes everything of the share; idempotent. Only
    /// empty mount points are removed, never recursively: what stays
    /// mounted by mistake is left alone, not deleted through the mount.
    pub fn release(&self) {
        for b in &self.binds {
            match unmount_all(b) {
                Ok(()) => {
                    let _ = std::fs::remove_file(b).or_else(|_| std::fs::remove_dir(b));
                }
                Err(e) => tracing::warn!("{e}"),
            }
        }
        match self.rootfs.unmount() {
            Ok(()) => {
                let _ = std::fs::remove_dir(self.dir.join("rootfs"));
            }
            Err(e) => tracing::warn!("{e}"),
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn bind(source: &Path, target: &Path) -> Result<()> {
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(sys_context(format!(
        "sharing {} with the VM",
        source.display()
    )))
    .map_err(|e| match e {
        Error::Sys {
            what,
            source: nix::errno::Errno::ENOENT,
        } => Error::InvalidArgument(format!("{what}: it does not exist")),
        e => e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rootfs_and_bind_sources_become_guest_paths() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let bundle = tmp.path().join("bundle");
        std::fs::create_dir_all(bundle.join("rootfs/etc")).unwrap();
        let src = tmp.path().join("data");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("f"), "x").unwrap();
        let hosts = tmp.path().join("hosts");
        std::fs::write(&hosts, "127.0.0.1 a").unwrap();
        let shared = tmp.path().join("shared");
        let mut spec = json!({
            "root": {"path": "rootfs"},
            "hooks": {"prestart": [{"path": "/usr/bin/x"}]},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/data", "type": "bind", "source": src, "options": ["rbind", "ro"]},
                {"destination": "/etc/hosts", "type": "bind", "source": hosts, "options": ["bind"]},
                {"destination": "/dev/shm", "type": "bind", "source": "/dev/shm", "options": ["rbind"]},
            ]
        });
        let share = Share::prepare(&shared, "c1", &bundle, &[], &mut spec).unwrap();
        assert_eq!(spec["root"]["path"], "/run/kuasar/shared/c1/rootfs");
        assert!(spec.get("hooks").is_none());
        assert_eq!(spec["mounts"][0]["source"], "proc");
        assert_eq!(spec["mounts"][1]["source"], "/run/kuasar/shared/c1/m1");
        assert_eq!(spec["mounts"][2]["source"], "/run/kuasar/shared/c1/m2");
        assert_eq!(spec["mounts"][3]["source"], "/dev/shm");
        assert_eq!(
            std::fs::read_to_string(shared.join("c1/m1/f")).unwrap(),
            "x"
        );
        assert_eq!(
            std::fs::read_to_string(shared.join("c1/m2")).unwrap(),
            "127.0.0.1 a"
        );
        assert!(shared.join("c1/rootfs/etc").is_dir());
        share.release();
        assert!(!shared.join("c1").exists());
        assert!(
            src.join("f").exists(),
            "releasing must not touch the sources"
        );
    }

    #[test]
    fn a_missing_bind_source_is_a_clear_error_and_leaves_nothing() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let bundle = tmp.path().join("bundle");
        std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
        let shared = tmp.path().join("shared");
        let mut spec = json!({"root": {"path": "rootfs"}, "mounts": [
            {"destination": "/x", "type": "bind", "source": "/nonexistent/src", "options": ["rbind"]}]});
        let e = Share::prepare(&shared, "c1", &bundle, &[], &mut spec)
            .err()
            .unwrap();
        assert!(e.to_string().contains("/nonexistent/src"), "{e}");
        assert!(!shared.join("c1").exists());
    }
}
