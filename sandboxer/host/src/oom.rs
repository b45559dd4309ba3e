//! OOM notifications for a container's memory cgroup: cgroup v1's
//! `memory.oom_control` eventfd, or cgroup v2's `memory.events` counter.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use tokio::io::unix::AsyncFd;
use tokio::task::JoinHandle;

use crate::error::{io_context, sys_context, Error, Result};

/// The memory cgroup directory of `pid` (v1), or its unified cgroup (v2).
fn memory_cgroup(pid: u32) -> Result<(PathBuf, bool)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map_err(io_context(format!("reading the cgroups of pid {pid}")))?;
    let mut unified = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (
            parts.next(),
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
        );
        if controllers.split(',').any(|c| c == "memory") {
            return Ok((
                Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/')),
                false,
            ));
        }
        if controllers.is_empty() {
            unified = Some(path.to_string());
        }
    }
    match unified {
        Some(p) if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() => Ok((
            Path::new("/sys/fs/cgroup").join(p.trim_start_matches('/')),
            true,
        )),
        _ => Err(Error::NotFound(format!("pid {pid} has no memory cgroup"))),
    }
}

/// Calls `on_oom` for every OOM kill in `pid`'s memory cgroup until the
/// cgroup goes away or the returned task is aborted.
pub fn watch(pid: u32, on_oom: impl Fn() + Send + 'static) -> Result<JoinHandle<()>> {
    let (dir, unified) = memory_cgroup(pid)?;
    if unified {
        watch_v2(dir, on_oom)
    } else {
        watch_v1(dir, on_oom)
    }
}

fn eventfd() -> Result<OwnedFd> {
    // SAFETY: eventfd returns a new descriptor or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(sys_context("creating an eventfd")(nix::errno::Errno::last()));
    }
    // SAFETY: fd is fresh and ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn watch_v1(dir: PathBuf, on_oom: impl Fn() + Send + 'static) -> Result<JoinHandle<()>> {
    let control = File::open(dir.join("memory.oom_control")).map_err(io_context(format!(
        "opening {}/memory.oom_control",
        dir.display()
    )))?;
    let efd = eventfd()?;
    let mut event_control = OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.event_control"))
        .map_err(io_context("opening cgroup.event_control"))?;
    event_control
        .write_all(format!("{} {}", efd.as_raw_fd(), control.as_raw_fd()).as_bytes())
        .map_err(io_context("registering for OOM notifications"))?;
    // SAFETY: efd moves into the AsyncFd and stays open until it is dropped.
    let efd = unsafe { AsyncFd::register(efd) }
        .map_err(|e| io_context("watching the eventfd")(e.into()))?;
    Ok(tokio::spawn(async move {
        let _control = control;
        loop {
            let Ok(mut guard) = efd.readable().await else {
                return;
            };
            let mut buf = [0u8; 8];
            match guard.try_io(|fd| {
                nix::unistd::read(fd.get_ref().as_raw_fd(), &mut buf).map_err(Into::into)
            }) {
                Ok(Ok(8)) => {}
                Ok(_) => return,
                Err(_would_block) => continue,
            }
            // The eventfd also fires when the cgroup is removed.
            if !dir.join("cgroup.event_control").exists() {
                return;
            }
            on_oom();
        }
    }))
}

fn oom_kills(events: &Path) -> Option<u64> {
    std::fs::read_to_string(events).ok()?.lines().find_map(|l| {
        l.strip_prefix("oom_kill ")
            .and_then(|v| v.trim().parse().ok())
    })
}

fn watch_v2(dir: PathBuf, on_oom: impl Fn() + Send + 'static) -> Result<JoinHandle<()>> {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let events = dir.join("memory.events");
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
        .map_err(sys_context("creating an inotify"))?;
    inotify
        .add_watch(&events, AddWatchFlags::IN_MODIFY)
        .map_err(sys_context(format!("watching {}", events.display())))?;
    // SAFETY: nix's Inotify is a plain descriptor that never closes itself;
    // ownership moves to the OwnedFd here.
    let fd = unsafe { OwnedFd::from_raw_fd(inotify.as_raw_fd()) };
    // SAFETY: fd moves into the AsyncFd and stays open until it is dropped.
    let fd =
        unsafe { AsyncFd::register(fd) }.map_err(|e| io_context("watching inotify")(e.into()))?;
    let mut seen = oom_kills(&events).unwrap_or(0);
    Ok(tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable().await else {
                return;
            };
            let mut buf = [0u8; 4096];
            match guard.try_io(|fd| {
                nix::unistd::read(fd.get_ref().as_raw_fd(), &mut buf).map_err(Into::into)
            }) {
                Ok(Ok(n)) if n > 0 => {}
                Ok(_) => return,
                Err(_would_block) => continue,
            }
            let Some(now) = oom_kills(&events) else {
                return;
            };
            if now > seen {
                seen = now;
                on_oom();
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_kill_counter_is_read_from_memory_events() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("memory.events");
        std::fs::write(&p, "low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\n").unwrap();
        assert_eq!(oom_kills(&p), Some(2));
        assert_eq!(oom_kills(&dir.path().join("nope")), None);
    }
}
