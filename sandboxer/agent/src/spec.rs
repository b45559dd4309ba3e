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
///
/// A container that joins the VM's network this way cannot set `net.*`
/// sysctls itself (runc refuses them without a network namespace of its
/// own): they are the pod's network's, which is the VM's. They are taken
/// out of the spec and returned, for the VM to apply (containerd 2.x sets
/// `net.ipv4.ip_unprivileged_port_start` on every pod's sandbox).
pub fn adapt(spec: &mut Value) -> Result<Vec<(String, String)>, String> {
    let exists = |p: &str| std::path::Path::new(p).exists();
    clamp_version(spec);
    adapt_with(spec, &exists)
}

/// Writes network sysctls for the VM's network namespace.
pub fn apply_sysctls(sysctls: &[(String, String)]) -> Result<(), String> {
    for (key, value) in sysctls {
        let path = std::path::Path::new("/proc/sys").join(key.replace('.', "/"));
        std::fs::write(&path, value).map_err(|e| format!("setting sysctl {key}={value}: {e}"))?;
    }
    Ok(())
}

/// A sysctl name the VM may be asked to set: `net.` and plain components.
fn net_sysctl(key: &str) -> bool {
    key.starts_with("net.")
        && key.split('.').all(|c| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        })
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

fn adapt_with(
    spec: &mut Value,
    exists: &dyn Fn(&str) -> bool,
) -> Result<Vec<(String, String)>, String> {
    let mut dropped_uts = false;
    let mut joins_vm_network = false;
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
                "network" => joins_vm_network = true,
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
    let mut vm_sysctls = Vec::new();
    if joins_vm_network {
        if let Some(sysctl) = spec
            .pointer_mut("/linux/sysctl")
            .and_then(Value::as_object_mut)
        {
            let keys: Vec<String> = sysctl
                .keys()
                .filter(|k| k.starts_with("net."))
                .cloned()
                .collect();
            for key in keys {
                let value = sysctl.remove(&key).unwrap_or_default();
                let Some(value) = value.as_str() else {
                    return Err(format!("sysctl {key}: the value is not a string"));
                };
                if !net_sysctl(&key) || value.contains('\n') {
                    return Err(format!("sysctl {key}={value:?} is not a valid setting"));
                }
                vm_sysctls.push((key, value.to_string()));
            }
        }
    }
    Ok(vm_sysctls)
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

    #[test]
    fn net_sysctls_of_a_container_on_the_vms_network_are_the_vms() {
        let mut spec = json!({"linux": {
            "namespaces": [{"type": "network", "path": "/var/run/netns/cni-1"}],
            "sysctl": {"net.ipv4.ip_unprivileged_port_start": "0", "kernel.shm_rmid_forced": "1"},
        }});
        let vm = adapt_with(&mut spec, &|_| false).unwrap();
        assert_eq!(
            vm,
            vec![("net.ipv4.ip_unprivileged_port_start".into(), "0".into())]
        );
        assert_eq!(
            spec["linux"]["sysctl"],
            json!({"kernel.shm_rmid_forced": "1"})
        );
        // A container with a network namespace of its own keeps them.
        let mut own = json!({"linux": {
            "namespaces": [{"type": "network"}],
            "sysctl": {"net.ipv4.ip_forward": "1"},
        }});
        assert!(adapt_with(&mut own, &|_| false).unwrap().is_empty());
        assert_eq!(own["linux"]["sysctl"]["net.ipv4.ip_forward"], "1");
        // Names that could leave /proc/sys/net are refused.
        for bad in ["net....", "net.ipv4/../../x", "net.a b"] {
            let mut sysctl = serde_json::Map::new();
            sysctl.insert(bad.into(), "1".into());
            let mut spec = json!({"linux": {
                "namespaces": [{"type": "network", "path": "/x"}],
                "sysctl": sysctl,
            }});
            assert!(adapt_with(&mut spec, &|_| false).is_err(), "{bad}");
        }
    }
}
