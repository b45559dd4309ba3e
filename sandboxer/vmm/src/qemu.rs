//! One qemu process per VM: its command line, its start through the one
//! spawn helper, and the choice of accelerator.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use kuasar_core::config::VmmConfig;
use kuasar_core::error::{io_context, Error, Result};
use kuasar_host::spawn;

/// The accelerator a VM runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// What one VM is started with.
pub struct VmSpec<'a> {
    pub config: &'a VmmConfig,
    pub accel: Accel,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Shared with the guest over virtio-9p (tag `share`).
    pub shared_dir: &'a Path,
    /// The guest's serial console is written here.
    pub console: &'a Path,
}

/// The descriptor number the agent channel has in qemu.
const CHANNEL_FD: i32 = 3;

/// The host's TSC frequency in kHz: the guest kernel skips calibrating it,
/// which under TCG can fail on a busy host and hang the boot.
fn tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0) as u64)
}

/// The guest kernel's command line: the one the image was built with (the
/// `cmdline` file beside the kernel), the host's TSC frequency, and the
/// config's additions.
pub fn kernel_cmdline(config: &VmmConfig) -> String {
    let mut line = std::fs::read_to_string(config.kernel.with_file_name("cmdline"))
        .map(|l| l.trim().to_string())
        .unwrap_or_else(|_| "console=ttyS0 panic=-1".into());
    if let Some(khz) = tsc_khz() {
        line.push_str(&format!(" tsc_early_khz={khz}"));
    }
    if !config.kernel_params.is_empty() {
        line.push(' ');
        line.push_str(&config.kernel_params);
    }
    line
}

/// qemu's arguments for `spec`; the agent channel is descriptor 3.
pub fn args(spec: &VmSpec) -> Vec<String> {
    let c = spec.config;
    let accel = match spec.accel {
        Accel::Tcg => format!("tcg,tb-size={}", c.tcg_cache_mib.max(1)),
        Accel::Kvm => "kvm".into(),
    };
    // Under TCG a plain model boots ~0.3 s faster than `max`; rdrand keeps
    // the guest's random pool from starting empty (getrandom would block).
    let cpu = match spec.accel {
        Accel::Tcg => "qemu64,+rdrand",
        Accel::Kvm => "host",
    };
    let share = spec.shared_dir.display().to_string().replace(',', ",,");
    let console = spec.console.display().to_string().replace(',', ",,");
    [
        "-accel",
        &accel,
        "-machine",
        "microvm,memory-backend=mem",
        "-object",
        &format!(
            "memory-backend-memfd,id=mem,size={}M,share=on",
            spec.memory_mib
        ),
        "-cpu",
        cpu,
        "-m",
        &format!("{}M", spec.memory_mib),
        "-smp",
        &spec.vcpus.to_string(),
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-kernel",
        &c.kernel.display().to_string(),
        "-initrd",
        &c.initrd.display().to_string(),
        "-append",
        &kernel_cmdline(c),
        "-serial",
        &format!("file:{console}"),
        "-fsdev",
        &format!("local,id=share,path={share},security_model=none,multidevs=remap"),
        "-device",
        "virtio-9p-device,fsdev=share,mount_tag=share",
        "-device",
        "virtio-serial-device,max_ports=2",
        "-chardev",
        &format!("socket,id=agent,fd={CHANNEL_FD}"),
        "-device",
        "virtserialport,chardev=agent,name=agent",
        // Guest RAM the guest frees goes back to the host.
        "-device",
        "virtio-balloon-device,free-page-reporting=on",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// `program` as a path: a bare name is looked up in `PATH`.
pub fn resolve(program: &str) -> Result<PathBuf> {
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .ok_or_else(|| Error::FailedPrecondition(format!("{program} not found in PATH")))
}

/// Starts qemu with `channel` as the guest's agent port; its stderr goes to
/// `log`. Returns the pid; the exit comes from the reaper.
pub fn start(spec: &VmSpec, channel: OwnedFd, log: &Path) -> Result<i32> {
    for (what, p) in [
        ("kernel", &spec.config.kernel),
        ("initramfs", &spec.config.initrd),
    ] {
        if !p.is_file() {
            return Err(Error::FailedPrecondition(format!(
                "the guest {what} {} is missing: build the guest image with hack/build-guest-image.sh \
                 and point [vmm] kernel/initrd at it",
                p.display()
            )));
        }
    }
    let qemu = resolve(&spec.config.qemu)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io_context(format!("opening {}", log.display())))?;
    let log = spawn::raise_fd(OwnedFd::from(log))?;
    let channel = spawn::raise_fd(channel)?;
    spawn::spawn_with_fds(
        &qemu.display().to_string(),
        &args(spec),
        &[],
        &[
            (log.as_raw_fd(), 1),
            (log.as_raw_fd(), 2),
            (channel.as_raw_fd(), CHANNEL_FD),
        ],
    )
    .map_err(Error::from)
}

/// The last `lines` lines of a console log, for errors.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = all.len().saturating_sub(lines);
    all[start..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_passes_the_channel_and_escapes_paths() {
        let config = VmmConfig::default();
        let spec = VmSpec {
            config: &config,
            accel: Accel::Tcg,
            vcpus: 2,
            memory_mib: 96,
            shared_dir: Path::new("/run/k/a,b"),
            console: Path::new("/run/k/console.log"),
        };
        let a = args(&spec).join(" ");
        assert!(a.contains("-accel tcg,tb-size=16"), "{a}");
        assert!(a.contains("-cpu qemu64,+rdrand"), "{a}");
        assert!(a.contains("path=/run/k/a,,b,"), "{a}");
        assert!(a.contains("socket,id=agent,fd=3"), "{a}");
        assert!(a.contains("-smp 2") && a.contains("-m 96M"), "{a}");
        assert!(a.contains("size=96M"), "{a}");
        let kvm = args(&VmSpec {
            accel: Accel::Kvm,
            ..spec
        })
        .join(" ");
        assert!(
            kvm.contains("-accel kvm -machine") && kvm.contains("-cpu host"),
            "{kvm}"
        );
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.log");
        std::fs::write(&p, "a\n\nb\nc\nd\n").unwrap();
        assert_eq!(tail(&p, 2), "c | d");
        assert_eq!(tail(&dir.path().join("none"), 2), "");
    }
}
