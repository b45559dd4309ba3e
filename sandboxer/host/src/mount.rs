//! Mounting a task's rootfs from the mounts containerd sends in Create.

use std::path::Path;

use containerd_shim_protos::api::Mount;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::error::{sys_context, Result};

/// Splits mount(8)-style options into flags and the data string.
fn parse_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        let (set, f) = match o.as_str() {
            "ro" => (true, MsFlags::MS_RDONLY),
            "rw" => (false, MsFlags::MS_RDONLY),
            "nosuid" => (true, MsFlags::MS_NOSUID),
            "suid" => (false, MsFlags::MS_NOSUID),
            "nodev" => (true, MsFlags::MS_NODEV),
            "dev" => (false, MsFlags::MS_NODEV),
            "noexec" => (true, MsFlags::MS_NOEXEC),
            "exec" => (false, MsFlags::MS_NOEXEC),
            "sync" => (true, MsFlags::MS_SYNCHRONOUS),
            "async" => (false, MsFlags::MS_SYNCHRONOUS),
            "noatime" => (true, MsFlags::MS_NOATIME),
            "relatime" => (true, MsFlags::MS_RELATIME),
            "strictatime" => (true, MsFlags::MS_STRICTATIME),
            "bind" => (true, MsFlags::MS_BIND),
            "rbind" => (true, MsFlags::MS_BIND | MsFlags::MS_REC),
            "remount" => (true, MsFlags::MS_REMOUNT),
            _ => {
                data.push(o.as_str());
                continue;
            }
        };
        if set {
            flags |= f;
        } else {
            flags &= !f;
        }
    }
    (flags, data.join(","))
}

/// Mounts `mounts` onto `target` in order.
fn mount_rootfs(mounts: &[Mount], target: &Path) -> Result<()> {
    for (i, m) in mounts.iter().enumerate() {
        let (flags, data) = parse_options(&m.options);
        let fstype = if m.type_.is_empty() || m.type_ == "bind" {
            None
        } else {
            Some(m.type_.as_str())
        };
        let data = (!data.is_empty()).then_some(data.as_str());
        let res = mount(Some(m.source.as_str()), target, fstype, flags, data);
        if let Err(e) = res {
            // Leave nothing half-mounted behind.
            for _ in 0..i {
                let _ = umount2(target, MntFlags::MNT_DETACH);
            }
            return Err(sys_context(format!(
                "mounting {} ({}) on {}",
                m.source,
                m.type_,
                target.display()
            ))(e));
        }
        // A bind mount ignores MS_RDONLY until remounted.
        if flags.contains(MsFlags::MS_BIND) && flags.contains(MsFlags::MS_RDONLY) {
            let _ = mount(
                None::<&str>,
                target,
                None::<&str>,
                flags | MsFlags::MS_REMOUNT,
                None::<&str>,
            );
        }
    }
    Ok(())
}

/// Unmounts everything stacked on `target`; an unmounted target is fine.
pub fn unmount_all(target: &Path) -> Result<()> {
    for _ in 0..64 {
        match umount2(target, MntFlags::MNT_DETACH) {
            Ok(()) => continue,
            Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => return Ok(()),
            Err(e) => return Err(sys_context(format!("unmounting {}", target.display()))(e)),
        }
    }
    Ok(())
}

/// A container's rootfs on the host: the bundle's `rootfs` directory with
/// containerd's mounts (if it sent any) stacked on it.
#[derive(Debug)]
pub struct Rootfs {
    target: std::path::PathBuf,
    mounted: bool,
}

impl Rootfs {
    /// Mounts `mounts` on `<bundle>/rootfs`; none leaves it as it is.
    pub fn mount(mounts: &[containerd_shim_protos::api::Mount], bundle: &Path) -> Result<Rootfs> {
        let target = bundle.join("rootfs");
        if !mounts.is_empty() {
            mount_rootfs(mounts, &target)?;
        }
        Ok(Rootfs {
            target,
            mounted: !mounts.is_empty(),
        })
    }

    /// The rootfs of a container a predecessor daemon mounted.
    pub fn adopt(bundle: &Path, mounted: bool) -> Rootfs {
        Rootfs {
            target: bundle.join("rootfs"),
            mounted,
        }
    }

    pub fn is_mounted(&self) -> bool {
        self.mounted
    }

    /// Unmounts what `mount` mounted; idempotent.
    pub fn unmount(&self) -> Result<()> {
        if self.mounted {
            unmount_all(&self.target)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_options_go_to_data_and_flags_to_flags() {
        let (f, d) = parse_options(&[
            "index=off".into(),
            "ro".into(),
            "lowerdir=/a:/b".into(),
            "nosuid".into(),
        ]);
        assert_eq!(f, MsFlags::MS_RDONLY | MsFlags::MS_NOSUID);
        assert_eq!(d, "index=off,lowerdir=/a:/b");
        let (f, _) = parse_options(&["rbind".into(), "rw".into()]);
        assert_eq!(f, MsFlags::MS_BIND | MsFlags::MS_REC);
    }
}
