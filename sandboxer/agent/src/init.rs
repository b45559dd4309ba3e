//! Guest bring-up as PID 1. Stage one runs on the initramfs: it loads the
//! kernel modules the guest needs, copies itself and runc into a tmpfs and
//! makes that the root (runc's pivot_root refuses the initramfs), then
//! re-executes. Stage two mounts the kernel filesystems and the host's
//! shared directory and opens the agent port.

use std::ffi::CString;
use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::{mount, MsFlags};

/// Where the host's shared directory (virtio-9p tag `share`) is mounted.
pub const SHARED: &str = "/run/kuasar/shared";
/// The agent's own state: bundles, stdio FIFOs, runc's state.
pub const STATE: &str = "/run/kuasar";

const STAGE_ENV: &str = "KUASAR_AGENT_STAGE";
const PORT_NAME: &str = "agent";
const NEW_ROOT: &str = "/newroot";

type Result<T> = std::result::Result<T, String>;

/// Brings the guest up and returns the agent port. Outside a VM (not PID
/// 1) the port is the descriptor or path in `KUASAR_AGENT_PORT`.
pub fn prepare() -> Result<OwnedFd> {
    if std::process::id() != 1 {
        let port = std::env::var("KUASAR_AGENT_PORT")
            .map_err(|_| "not PID 1 and no KUASAR_AGENT_PORT given".to_string())?;
        return open_port(Path::new(&port));
    }
    if std::env::var_os(STAGE_ENV).is_none() {
        stage_one()?;
    }
    stage_two()
}

fn sys(what: impl AsRef<str>) -> impl FnOnce(nix::Error) -> String {
    let what = what.as_ref().to_string();
    move |e| format!("{what}: {e}")
}

fn io(what: impl AsRef<str>) -> impl FnOnce(std::io::Error) -> String {
    let what = what.as_ref().to_string();
    move |e| format!("{what}: {e}")
}

fn mount_fs(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<()> {
    fs::create_dir_all(target).map_err(io(format!("creating {target}")))?;
    mount(Some(source), target, Some(fstype), flags, data)
        .map_err(sys(format!("mounting {fstype} on {target}")))
}

fn stage_one() -> Result<()> {
    let started = Instant::now();
    load_modules(Path::new("/etc/modules.order"), Path::new("/lib/modules"))?;
    let loaded = started.elapsed();
    mount_fs(
        "tmpfs",
        NEW_ROOT,
        "tmpfs",
        MsFlags::empty(),
        Some("mode=0755"),
    )?;
    let root_dev = fs::metadata("/").map_err(io("stat /"))?.dev();
    for entry in fs::read_dir("/").map_err(io("reading /"))? {
        let entry = entry.map_err(io("reading /"))?;
        let name = entry.file_name();
        if name == "newroot" {
            continue;
        }
        move_tree(&entry.path(), &Path::new(NEW_ROOT).join(&name), root_dev)?;
    }
    // Frees what is left of the initramfs (the modules, loaded by now).
    for entry in fs::read_dir("/").map_err(io("reading /"))?.flatten() {
        if entry.file_name() != "newroot" {
            remove_tree(&entry.path(), root_dev);
        }
    }
    std::env::set_current_dir(NEW_ROOT).map_err(io("entering the new root"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(sys("moving the new root"))?;
    nix::unistd::chroot(".").map_err(sys("chroot"))?;
    std::env::set_current_dir("/").map_err(io("entering /"))?;
    tracing::info!(
        modules_ms = loaded.as_millis() as u64,
        total_ms = started.elapsed().as_millis() as u64,
        "stage one done"
    );
    std::env::set_var(STAGE_ENV, "2");
    let init = CString::new("/init").unwrap_or_default();
    let err = nix::unistd::execv(&init, std::slice::from_ref(&init)).unwrap_err();
    Err(format!("re-executing /init: {err}"))
}

/// Moves files, directories and symlinks of one filesystem to another,
/// file by file: the guest has too little memory to hold its root twice.
fn move_tree(from: &Path, to: &Path, dev: u64) -> Result<()> {
    let meta = fs::symlink_metadata(from).map_err(io(format!("stat {}", from.display())))?;
    if meta.dev() != dev || from == Path::new("/lib/modules") {
        return Ok(());
    }
    let ft = meta.file_type();
    if ft.is_symlink() {
        let target = fs::read_link(from).map_err(io(format!("reading {}", from.display())))?;
        std::os::unix::fs::symlink(target, to).map_err(io(format!("linking {}", to.display())))?;
    } else if ft.is_dir() {
        fs::create_dir_all(to).map_err(io(format!("creating {}", to.display())))?;
        fs::set_permissions(to, fs::Permissions::from_mode(meta.mode() & 0o7777))
            .map_err(io("chmod"))?;
        for e in fs::read_dir(from).map_err(io(format!("reading {}", from.display())))? {
            let e = e.map_err(io(format!("reading {}", from.display())))?;
            move_tree(&e.path(), &to.join(e.file_name()), dev)?;
        }
        let _ = fs::remove_dir(from);
    } else if ft.is_file() {
        fs::copy(from, to).map_err(io(format!("copying {}", from.display())))?;
        let _ = fs::remove_file(from);
    }
    Ok(())
}

fn remove_tree(path: &Path, dev: u64) {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return;
    };
    if meta.dev() != dev {
        return;
    }
    if meta.is_dir() {
        if let Ok(entries) = fs::read_dir(path) {
            for e in entries.flatten() {
                remove_tree(&e.path(), dev);
            }
        }
        let _ = fs::remove_dir(path);
    } else {
        let _ = fs::remove_file(path);
    }
}

/// Loads the modules named in `order`, one file name per line, in order.
fn load_modules(order: &Path, dir: &Path) -> Result<()> {
    let Ok(list) = fs::read_to_string(order) else {
        return Ok(()); // a kernel with everything built in
    };
    for name in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = dir.join(name);
        let file = fs::File::open(&path).map_err(io(format!("opening {}", path.display())))?;
        let params = CString::default();
        match nix::kmod::finit_module(&file, &params, nix::kmod::ModuleInitFlags::empty()) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => return Err(format!("loading {name}: {e}")),
        }
    }
    Ok(())
}

fn stage_two() -> Result<OwnedFd> {
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("proc", "/proc", "proc", nodev, None)?;
    mount_fs("sysfs", "/sys", "sysfs", nodev, None)?;
    mount_fs(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )?;
    mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("ptmxmode=0666,mode=0620"),
    )?;
    mount_fs("shm", "/dev/shm", "tmpfs", nodev, Some("mode=1777"))?;
    mount_fs("cgroup2", "/sys/fs/cgroup", "cgroup2", nodev, None)?;
    mount_fs(
        "tmpfs",
        "/tmp",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    mount_fs(
        "tmpfs",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(target, link);
    }
    // Freed guest pages go back to the host in 128 KiB blocks: at the
    // driver's default order (set when it loads, whatever the command line
    // said) almost nothing is reported.
    let _ = fs::write(
        "/sys/module/page_reporting/parameters/page_reporting_order",
        "5",
    );
    // Containers get every controller the guest kernel has.
    if let Ok(controllers) = fs::read_to_string("/sys/fs/cgroup/cgroup.controllers") {
        let enable: Vec<String> = controllers
            .split_whitespace()
            .map(|c| format!("+{c}"))
            .collect();
        let _ = fs::write("/sys/fs/cgroup/cgroup.subtree_control", enable.join(" "));
    }
    mount_fs(
        "share",
        SHARED,
        "9p",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("trans=virtio,version=9p2000.L,msize=262144,cache=none"),
    )?;
    loopback_up()?;
    let port = find_port(Duration::from_secs(10))?;
    open_port(&port)
}

/// Brings `lo` up: the pod's containers share the VM's network.
fn loopback_up() -> Result<()> {
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(sys("opening a socket"))?;
    // SAFETY: ifreq is plain old data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in b"lo".iter().enumerate() {
        req.ifr_name[i] = *b as libc::c_char;
    }
    // SAFETY: SIOCSIFFLAGS reads an ifreq we own; the socket is open.
    let rc = unsafe {
        req.ifr_ifru.ifru_flags =
            (libc::IFF_UP | libc::IFF_LOOPBACK | libc::IFF_RUNNING) as libc::c_short;
        libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req)
    };
    if rc != 0 {
        return Err(format!(
            "bringing lo up: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// The character device of the virtio-serial port named `agent`. There is
/// no udev in the guest, so the name is read from sysfs.
fn find_port(timeout: Duration) -> Result<PathBuf> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(entries) = fs::read_dir("/sys/class/virtio-ports") {
            for e in entries.flatten() {
                let name = fs::read_to_string(e.path().join("name")).unwrap_or_default();
                let dev = Path::new("/dev").join(e.file_name());
                if name.trim() == PORT_NAME && dev.exists() {
                    return Ok(dev);
                }
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "no virtio-serial port named {PORT_NAME:?} appeared"
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn open_port(path: &Path) -> Result<OwnedFd> {
    if let Ok(fd) = path.to_string_lossy().parse::<i32>() {
        // SAFETY: a descriptor number the caller handed to this process.
        return Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
    }
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map(OwnedFd::from)
        .map_err(io(format!("opening {}", path.display())))
}

/// Sets the guest's clock (from the host's, at Hello and periodically).
pub fn set_time(seconds: i64, nanos: u32) {
    let ts = nix::sys::time::TimeSpec::new(seconds, nanos as i64);
    if let Err(e) = nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts) {
        tracing::warn!("setting the clock: {e}");
    }
}

/// Ends the VM: PID 1 never exits.
pub fn power_off() -> ! {
    nix::unistd::sync();
    if std::process::id() == 1 {
        let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    }
    std::process::exit(0)
}
