//! Pod namespaces held without a process: containerd 2.x's Sandbox API
//! gives a pod's network namespace by path, and the pod's IPC and UTS
//! namespaces are made here and pinned by bind mounts under the daemon's
//! root. CRI writes the pod's namespaces into each container's spec as
//! `/proc/<sandbox pid>/ns/<type>`; a sandbox with no process reports pid 0,
//! and those paths are pointed at the pinned namespaces before the
//! container is created.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};

use crate::error::{io_context, sys_context, Error, Result};

/// The namespaces a pod's containers share.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PodNamespaces {
    /// The network namespace containerd made (none: host networking).
    pub net: Option<PathBuf>,
    /// Pinned IPC and UTS namespaces.
    pub ipc: Option<PathBuf>,
    pub uts: Option<PathBuf>,
}

/// How CRI names a namespace of a sandbox without a process.
const NO_PROCESS: &str = "/proc/0/ns/";

impl PodNamespaces {
    /// Makes new IPC and UTS namespaces (the UTS one with `hostname`) and
    /// pins them under `dir`.
    pub fn pin(
        dir: &Path,
        net: Option<PathBuf>,
        hostname: Option<String>,
    ) -> Result<PodNamespaces> {
        std::fs::create_dir_all(dir).map_err(io_context(format!("creating {}", dir.display())))?;
        let (ipc, uts) = (dir.join("ipc"), dir.join("uts"));
        let targets = (ipc.clone(), uts.clone());
        // unshare(2) of IPC and UTS changes only the calling thread: a
        // thread of its own makes them, pins them and ends.
        std::thread::spawn(move || -> Result<()> {
            unshare(CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS)
                .map_err(sys_context("making the pod's IPC and UTS namespaces"))?;
            if let Some(h) = hostname.filter(|h| !h.is_empty()) {
                nix::unistd::sethostname(&h)
                    .map_err(sys_context(format!("setting the pod's hostname {h:?}")))?;
            }
            for (ns, target) in [("ipc", &targets.0), ("uts", &targets.1)] {
                std::fs::File::create(target)
                    .map_err(io_context(format!("creating {}", target.display())))?;
                mount(
                    Some(format!("/proc/thread-self/ns/{ns}").as_str()),
                    target,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(sys_context(format!("pinning the pod's {ns} namespace")))?;
            }
            Ok(())
        })
        .join()
        .map_err(|_| Error::Internal("the namespace thread panicked".into()))
        .and_then(|r| r)
        .inspect_err(|_| {
            for t in [&ipc, &uts] {
                let _ = umount2(t, MntFlags::MNT_DETACH);
                let _ = std::fs::remove_file(t);
            }
        })?;
        Ok(PodNamespaces {
            net,
            ipc: Some(ipc),
            uts: Some(uts),
        })
    }

    /// Unpins what `pin` pinned; idempotent.
    pub fn release(&self) {
        for t in [&self.ipc, &self.uts].into_iter().flatten() {
            let _ = umount2(t, MntFlags::MNT_DETACH);
            let _ = std::fs::remove_file(t);
            if let Some(dir) = t.parent() {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }

    /// Points the pod namespaces of a bundle's spec that name a sandbox
    /// without a process at the pinned ones. A pod-wide PID namespace needs
    /// a process to hold it, which such a sandbox does not have.
    pub fn join(&self, bundle: &Path) -> Result<()> {
        let path = bundle.join("config.json");
        let text =
            std::fs::read(&path).map_err(io_context(format!("reading {}", path.display())))?;
        let mut spec: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))?;
        let Some(namespaces) = spec
            .pointer_mut("/linux/namespaces")
            .and_then(|n| n.as_array_mut())
        else {
            return Ok(());
        };
        let mut changed = false;
        for ns in namespaces.iter_mut() {
            let Some(p) = ns["path"].as_str() else {
                continue;
            };
            if !p.starts_with(NO_PROCESS) {
                continue;
            }
            let pinned = match ns["type"].as_str() {
                Some("network") => &self.net,
                Some("ipc") => &self.ipc,
                Some("uts") => &self.uts,
                other => {
                    return Err(Error::InvalidArgument(format!(
                        "a {} namespace shared by the pod needs a process to hold it; \
                         use the pause-container mode (sandboxer = \"podsandbox\") for such pods",
                        other.unwrap_or("?")
                    )))
                }
            };
            let Some(pinned) = pinned else {
                return Err(Error::InvalidArgument(format!(
                    "the spec joins the pod's {} namespace, which the pod does not have",
                    ns["type"]
                )));
            };
            ns["path"] = pinned.display().to_string().into();
            changed = true;
        }
        if changed {
            let data = serde_json::to_vec(&spec)
                .map_err(|e| Error::Internal(format!("encoding {}: {e}", path.display())))?;
            kuasar_protocol::shim::write_atomic(&path, &data)
                .map_err(io_context(format!("writing {}", path.display())))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(dir: &Path, namespaces: serde_json::Value) -> PathBuf {
        let spec = serde_json::json!({"linux": {"namespaces": namespaces}});
        std::fs::write(dir.join("config.json"), spec.to_string()).unwrap();
        dir.to_path_buf()
    }

    fn namespaces(b: &Path) -> serde_json::Value {
        let spec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(b.join("config.json")).unwrap()).unwrap();
        spec["linux"]["namespaces"].clone()
    }

    #[test]
    fn pinned_namespaces_are_distinct_from_the_daemons_and_hold_the_hostname() {
        let dir = tempfile::tempdir().unwrap();
        let pod = PodNamespaces::pin(&dir.path().join("ns"), None, Some("pod-a".into())).unwrap();
        let ino = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
        let uts = pod.uts.clone().unwrap();
        assert_ne!(ino(&uts), ino(Path::new("/proc/self/ns/uts")));
        assert_ne!(
            ino(pod.ipc.as_ref().unwrap()),
            ino(Path::new("/proc/self/ns/ipc"))
        );
        let host = nix::unistd::gethostname().unwrap();
        assert_ne!(
            host.to_str(),
            Some("pod-a"),
            "the daemon's hostname changed"
        );
        pod.release();
        assert!(!uts.exists());
    }

    #[test]
    fn join_points_no_process_paths_at_the_pinned_namespaces_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let b = bundle(
            dir.path(),
            serde_json::json!([
                {"type": "network", "path": "/proc/0/ns/net"},
                {"type": "ipc", "path": "/proc/0/ns/ipc"},
                {"type": "uts", "path": "/proc/0/ns/uts"},
                {"type": "mount"},
                {"type": "pid"},
            ]),
        );
        let pod = PodNamespaces {
            net: Some("/var/run/netns/cni-1".into()),
            ipc: Some("/k/ns/ipc".into()),
            uts: Some("/k/ns/uts".into()),
        };
        pod.join(&b).unwrap();
        let got = namespaces(&b);
        assert_eq!(got[0]["path"], "/var/run/netns/cni-1");
        assert_eq!(got[1]["path"], "/k/ns/ipc");
        assert_eq!(got[2]["path"], "/k/ns/uts");
        assert!(got[3].get("path").is_none());
    }

    #[test]
    fn a_pod_wide_pid_namespace_or_a_missing_netns_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let pod = PodNamespaces::default();
        let b = bundle(
            dir.path(),
            serde_json::json!([{"type": "pid", "path": "/proc/0/ns/pid"}]),
        );
        let e = pod.join(&b).unwrap_err().to_string();
        assert!(e.contains("pid namespace shared by the pod"), "{e}");
        let b = bundle(
            dir.path(),
            serde_json::json!([{"type": "network", "path": "/proc/0/ns/net"}]),
        );
        assert!(pod.join(&b).is_err());
    }
}
