//! What changes in a container's spec inside the VM. The VM is the pod:
//! the containers share its network, and namespaces the host named by
//! paths that exist only on the host (containerd's CNI netns, a pod's
//! pinned namespaces) are the VM's own.

use serde_json::Value;

/// Rewrites the namespaces of `spec`: a network namespace named by path is
/// the VM's; an IPC or UTS namespace named by a path the guest does not
/// have is the VM's too, except `/proc/0/ns/*` (the pod's, pinned by the
/// agent when the pod has no pause container), which is left for the
/// runc sandbox to resolve. Anything else named by a path the guest does
/// not have is an error.
pub fn adapt(spec: &mut Value, pod_pinned: bool) -> Result<(), String> {
    let exists = |p: &str| std::path::Path::new(p).exists();
    adapt_with(spec, pod_pinned, &exists)
}

fn adapt_with(
    spec: &mut Value,
    pod_pinned: bool,
    exists: &dyn Fn(&str) -> bool,
) -> Result<(), String> {
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
            let pod_path = path.starts_with("/proc/0/ns/");
            match kind.as_str() {
                "network" => continue,
                "ipc" | "uts" if pod_path && pod_pinned => kept.push(ns),
                "ipc" | "uts" if !exists(&path) || pod_path => {
                    dropped_uts |= kind == "uts";
                }
                _ if exists(&path) && !pod_path => kept.push(ns),
                // The runc sandbox names what it cannot hold.
                _ if pod_path && pod_pinned => kept.push(ns),
                _ => {
                    return Err(format!(
                        "the spec joins the {kind} namespace at {path}, which is not in the VM"
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
        adapt_with(&mut spec, false, &|p| p.starts_with("/proc/42/")).unwrap();
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
        adapt_with(&mut spec, false, &|_| false).unwrap();
        assert!(types(&spec).is_empty());
        assert!(spec.get("hostname").is_none());
    }

    #[test]
    fn pod_paths_are_left_to_the_pinned_namespaces() {
        let mut spec = json!({"linux": {"namespaces": [
            {"type": "ipc", "path": "/proc/0/ns/ipc"}, {"type": "pid", "path": "/proc/0/ns/pid"},
        ]}});
        adapt_with(&mut spec, true, &|_| true).unwrap();
        assert_eq!(types(&spec).len(), 2);
    }

    #[test]
    fn a_pid_namespace_not_in_the_vm_is_refused() {
        let mut spec =
            json!({"linux": {"namespaces": [{"type": "pid", "path": "/proc/99/ns/pid"}]}});
        let e = adapt_with(&mut spec, false, &|_| false).unwrap_err();
        assert!(e.contains("pid namespace at /proc/99/ns/pid"), "{e}");
    }
}
