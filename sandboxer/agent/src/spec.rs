//! What changes in a container's spec inside the VM. The VM is the pod:
//! the containers share its network, and namespaces the host named by
//! paths that exist only on the host (containerd's CNI netns, a pod's
//! pinned namespaces) are the VM's own.

use serde_json::Value;

/// Rewrites the namespaces of `spec`: a network namespace named by path
/// (containerd's CNI netns on the host) is the VM's; an IPC or UTS
/// namespace named by a path the guest does not have (the pod's on the
/// host: `/proc/<pid>/ns/*` of a sandbox with no process in the guest) is
/// the VM's too. Paths the guest has (a pause container's in the guest) are
/// kept. Anything else named by a path the guest does not have is an error.
pub fn adapt(spec: &mut Value) -> Result<(), String> {
    let exists = |p: &str| std::path::Path::new(p).exists();
    clamp_version(spec);
    adapt_with(spec, &exists)
}

/// The newest runtime-spec version the guest's runtime accepts. Newer 1.x
/// specs (containerd 2.1 writes 1.2.x) only add fields older runtimes
/// ignore; crun refuses the version string itself.
const NEWEST_SPEC: (u64, u64) = (1, 1);

fn clamp_version(spec: &mut Value) {
    let Some(v) = spec["ociVersion"].as_str() else {
        return;
    };
    let mut parts = v.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if major == NEWEST_SPEC.0 && minor > NEWEST_SPEC.1 {
        spec["ociVersion"] = format!("{}.{}.0", NEWEST_SPEC.0, NEWEST_SPEC.1).into();
    }
}

fn adapt_with(spec: &mut Value, exists: &dyn Fn(&str) -> bool) -> Result<(), String> {
    let mut dropped_uts = false;
    if let Some(namespaces) = spec
        .pointer_mut("/linux/namespaces")
        .and_then(Value::as_array_mut)
    {
        let mut kept = Vec::with_capacity(namespaces.len());
        for ns in namespaces.drain(..) {
            let kind = ns["type"].as_str().unwrap_or_default().to_string();
            let Some(path) = ns["path"]
                .as_str()
                .filter(|p| !p.is_empty())
                .map(str::to_string)
            else {
                kept.push(ns);
                continue;
            };
            match kind.as_str() {
                "network" => {}
                _ if exists(&path) => kept.push(ns),
                "ipc" => {}
                "uts" => dropped_uts = true,
                _ => {
                    return Err(format!(
                        "the spec joins the {kind} namespace at {path}, which is not in the VM \
                         (a namespace shared by the pod needs a process holding it in the VM: \
                         use the pause-container mode for such pods)"
                    ))
                }
            }
        }
        *namespaces = kept;
    }
    if dropped_uts {
        // Without a UTS namespace of its own the container has the VM's
        // hostname; runc refuses to set one.
        if let Some(obj) = spec.as_object_mut() {
            obj.remove("hostname");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn types(spec: &Value) -> Vec<(String, String)> {
        spec["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                (
                    n["type"].as_str().unwrap().to_string(),
                    n["path"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    #[test]
    fn the_hosts_netns_is_the_vms_and_guest_paths_are_kept() {
        let mut spec = json!({"hostname": "pod", "linux": {"namespaces": [
            {"type": "pid"}, {"type": "mount"},
            {"type": "network", "path": "/var/run/netns/cni-1"},
            {"type": "ipc", "path": "/proc/42/ns/ipc"},
            {"type": "uts", "path": "/proc/42/ns/uts"},
        ]}});
        adapt_with(&mut spec, &|p| p.starts_with("/proc/42/")).unwrap();
        assert_eq!(
            types(&spec),
            vec![
                ("pid".into(), "".into()),
                ("mount".into(), "".into()),
                ("ipc".into(), "/proc/42/ns/ipc".into()),
                ("uts".into(), "/proc/42/ns/uts".into()),
            ]
        );
        assert_eq!(spec["hostname"], "pod");
    }

    #[test]
    fn host_only_ipc_and_uts_become_the_vms_and_drop_the_hostname() {
        let mut spec = json!({"hostname": "pod", "linux": {"namespaces": [
            {"type": "ipc", "path": "/proc/7/ns/ipc"}, {"type": "uts", "path": "/proc/7/ns/uts"},
        ]}});
        adapt_with(&mut spec, &|_| false).unwrap();
        assert!(types(&spec).is_empty());
        assert!(spec.get("hostname").is_none());
    }

    #[test]
    fn newer_1x_spec_versions_are_clamped_and_others_kept() {
        for (given, want) in [
            ("1.2.1", "1.1.0"),
            ("1.1.0", "1.1.0"),
            ("1.0.2-dev", "1.0.2-dev"),
            ("2.0.0", "2.0.0"),
        ] {
            let mut spec = json!({ "ociVersion": given });
            clamp_version(&mut spec);
            assert_eq!(spec["ociVersion"], want, "{given}");
        }
    }

    #[test]
    fn a_pid_namespace_not_in_the_vm_is_refused() {
        let mut spec =
            json!({"linux": {"namespaces": [{"type": "pid", "path": "/proc/99/ns/pid"}]}});
        let e = adapt_with(&mut spec, &|_| false).unwrap_err();
        assert!(e.contains("pid namespace at /proc/99/ns/pid"), "{e}");
    }
}
