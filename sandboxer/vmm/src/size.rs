//! How big a pod's VM is: annotations first, then what the pod's resources
//! add up to, then the config's defaults; never more than the config's
//! maximum or the host's memory.

use kuasar_core::backend::SandboxResources;
use kuasar_core::config::VmmConfig;
use kuasar_core::error::{Error, Result};

pub const VCPUS_ANNOTATION: &str = "io.kuasar.vmm.vcpus";
pub const MEMORY_ANNOTATION: &str = "io.kuasar.vmm.memory_mib";

/// What the guest kernel and agent need besides the pod's own limit.
const GUEST_OVERHEAD_MIB: u64 = 64;
/// Below this the generic kernel does not boot with the initramfs.
const MIN_MEMORY_MIB: u64 = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmSize {
    pub vcpus: u32,
    pub memory_mib: u32,
}

fn annotation(r: &SandboxResources, key: &str) -> Result<Option<u64>> {
    match r.annotations.get(key) {
        None => Ok(None),
        Some(v) => {
            v.trim().parse::<u64>().map(Some).map_err(|_| {
                Error::InvalidArgument(format!("annotation {key}={v:?} is not a number"))
            })
        }
    }
}

/// The VM for `r`; `host_mib` is the host's memory.
pub fn size(config: &VmmConfig, r: &SandboxResources, host_mib: u64) -> Result<VmSize> {
    let vcpus = match annotation(r, VCPUS_ANNOTATION)? {
        Some(v) => v,
        None => r
            .cpus
            .map(|c| c.ceil() as u64)
            .unwrap_or(config.vcpus as u64),
    };
    let memory = match annotation(r, MEMORY_ANNOTATION)? {
        Some(m) => m,
        None => r
            .memory_limit_bytes
            .map(|b| b.div_ceil(1 << 20) + GUEST_OVERHEAD_MIB)
            .unwrap_or(config.memory_mib as u64)
            .max(config.memory_mib as u64),
    };
    if vcpus == 0 || vcpus > config.max_vcpus as u64 {
        return Err(Error::InvalidArgument(format!(
            "the pod asks for {vcpus} vCPUs; a VM has 1 to {} ([vmm] max_vcpus)",
            config.max_vcpus
        )));
    }
    if memory < MIN_MEMORY_MIB {
        return Err(Error::InvalidArgument(format!(
            "the pod asks for {memory} MiB; a VM needs at least {MIN_MEMORY_MIB} MiB"
        )));
    }
    if memory > config.max_memory_mib as u64 {
        return Err(Error::InvalidArgument(format!(
            "the pod asks for {memory} MiB of memory, more than [vmm] max_memory_mib = {}",
            config.max_memory_mib
        )));
    }
    if memory > host_mib {
        return Err(Error::ResourceExhausted(format!(
            "the pod asks for {memory} MiB of memory, more than the host has ({host_mib} MiB)"
        )));
    }
    Ok(VmSize {
        vcpus: vcpus as u32,
        memory_mib: memory as u32,
    })
}

/// The host's memory in MiB (MemTotal).
pub fn host_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .map(|kb| kb / 1024)
        .unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(annotations: &[(&str, &str)], mem: Option<u64>, cpus: Option<f64>) -> SandboxResources {
        SandboxResources {
            annotations: annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            memory_limit_bytes: mem,
            cpus,
        }
    }

    #[test]
    fn annotations_then_resources_then_defaults() {
        let c = VmmConfig::default();
        let host = 16384;
        assert_eq!(
            size(&c, &res(&[], None, None), host).unwrap(),
            VmSize {
                vcpus: 1,
                memory_mib: 128
            }
        );
        assert_eq!(
            size(&c, &res(&[], Some(256 << 20), Some(1.5)), host).unwrap(),
            VmSize {
                vcpus: 2,
                memory_mib: 320
            }
        );
        // A small limit never shrinks the VM below the default.
        assert_eq!(
            size(&c, &res(&[], Some(16 << 20), None), host)
                .unwrap()
                .memory_mib,
            128
        );
        assert_eq!(
            size(
                &c,
                &res(
                    &[(VCPUS_ANNOTATION, "3"), (MEMORY_ANNOTATION, "96")],
                    Some(1 << 30),
                    Some(1.0)
                ),
                host
            )
            .unwrap(),
            VmSize {
                vcpus: 3,
                memory_mib: 96
            }
        );
    }

    #[test]
    fn too_much_or_nonsense_is_refused_clearly() {
        let c = VmmConfig::default();
        let e = size(
            &c,
            &res(&[(MEMORY_ANNOTATION, "9000")], None, None),
            1 << 20,
        )
        .unwrap_err();
        assert!(e.to_string().contains("max_memory_mib"), "{e}");
        let e = size(&c, &res(&[(MEMORY_ANNOTATION, "4096")], None, None), 2048).unwrap_err();
        assert!(
            matches!(e, Error::ResourceExhausted(_)) && e.to_string().contains("2048 MiB"),
            "{e}"
        );
        let e = size(&c, &res(&[(VCPUS_ANNOTATION, "0")], None, None), 4096).unwrap_err();
        assert!(e.to_string().contains("vCPUs"), "{e}");
        let e = size(&c, &res(&[(VCPUS_ANNOTATION, "two")], None, None), 4096).unwrap_err();
        assert!(e.to_string().contains("not a number"), "{e}");
        let e = size(&c, &res(&[(MEMORY_ANNOTATION, "32")], None, None), 4096).unwrap_err();
        assert!(e.to_string().contains("at least"), "{e}");
    }
}
