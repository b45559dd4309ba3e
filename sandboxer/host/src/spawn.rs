//! The one helper through which the daemon starts processes. Spawning
//! happens on a blocking thread with `posix_spawn` (no fork of the async
//! process), and the exit is taken from the [`Reaper`], never from
//! `waitpid` on the pid, so the two cannot race.

use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::process::{Command, Stdio};
use std::sync::Arc;

use crate::error::{io_context, Error, Result};
use crate::reaper::{ExitCode, Reaper};

#[derive(Debug)]
pub struct Output {
    pub status: ExitCode,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Runs `cmd` to completion and returns its exit status from the reaper.
/// With `capture`, stdout and stderr are collected; otherwise the caller has
/// set them (runc hands its stdio to the container).
pub async fn run(reaper: &Arc<Reaper>, mut cmd: Command, capture: bool) -> Result<Output> {
    let what = format!("{:?}", cmd.get_program());
    let reaper = reaper.clone();
    let (pid, out_reader) = tokio::task::spawn_blocking(move || -> Result<_> {
        if capture {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        let mut child = cmd
            .spawn()
            .map_err(io_context(format!("starting {what}")))?;
        let pid = child.id() as i32;
        let rx = reaper.subscribe(pid);
        let mut stdout = child.stdout.take();
        let mut stderr = child.stderr.take();
        // Read both pipes to EOF on this thread (stderr on a helper thread)
        // so that a chatty child cannot block on a full pipe.
        let err_thread = std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(e) = stderr.as_mut() {
                let _ = e.take(1 << 20).read_to_end(&mut buf);
            }
            buf
        });
        let mut out = Vec::new();
        if let Some(o) = stdout.as_mut() {
            let _ = o.take(16 << 20).read_to_end(&mut out);
        }
        let err = err_thread.join().unwrap_or_default();
        // `child` is dropped without wait(): the reaper owns the exit.
        Ok((pid, (rx, out, err)))
    })
    .await
    .map_err(|e| Error::Internal(format!("spawn thread: {e}")))??;
    let (rx, stdout, stderr) = out_reader;
    let status = rx
        .await
        .map_err(|_| Error::Internal(format!("exit of pid {pid} was lost")))?;
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Starts `program` with `fds` placed at the given descriptor numbers (the
/// rest closed) and returns its pid; `binary://` log drivers need fds 3–5.
pub fn spawn_with_fds(
    program: &str,
    args: &[String],
    env: &[(String, String)],
    fds: &[(RawFd, RawFd)],
) -> Result<i32> {
    let cstr =
        |s: &str| CString::new(s).map_err(|_| Error::InvalidArgument(format!("NUL byte in {s:?}")));
    let path = cstr(program)?;
    let mut argv = vec![path.clone()];
    for a in args {
        argv.push(cstr(a)?);
    }
    let mut envp = Vec::new();
    for (k, v) in std::env::vars().chain(env.iter().cloned()) {
        envp.push(cstr(&format!("{k}={v}"))?);
    }
    let mut argv_ptrs: Vec<*mut libc::c_char> = argv.iter().map(|s| s.as_ptr() as *mut _).collect();
    argv_ptrs.push(std::ptr::null_mut());
    let mut envp_ptrs: Vec<*mut libc::c_char> = envp.iter().map(|s| s.as_ptr() as *mut _).collect();
    envp_ptrs.push(std::ptr::null_mut());

    // SAFETY: all pointers stay valid for the duration of posix_spawn; the
    // attribute and file-action objects are initialised and destroyed here.
    unsafe {
        let mut actions: libc::posix_spawn_file_actions_t = std::mem::zeroed();
        let mut attr: libc::posix_spawnattr_t = std::mem::zeroed();
        libc::posix_spawn_file_actions_init(&mut actions);
        libc::posix_spawnattr_init(&mut attr);
        // Reset SIGPIPE (ignored in the daemon) and the signal mask.
        let mut defaults: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut defaults);
        libc::sigaddset(&mut defaults, libc::SIGPIPE);
        let mut mask: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut mask);
        libc::posix_spawnattr_setsigdefault(&mut attr, &defaults);
        libc::posix_spawnattr_setsigmask(&mut attr, &mask);
        libc::posix_spawnattr_setflags(
            &mut attr,
            (libc::POSIX_SPAWN_SETSIGDEF | libc::POSIX_SPAWN_SETSIGMASK) as _,
        );
        let devnull = c"/dev/null";
        for target in 0..3 {
            if !fds.iter().any(|(_, t)| *t == target) {
                let flags = if target == 0 {
                    libc::O_RDONLY
                } else {
                    libc::O_WRONLY
                };
                libc::posix_spawn_file_actions_addopen(
                    &mut actions,
                    target,
                    devnull.as_ptr(),
                    flags,
                    0,
                );
            }
        }
        for (src, target) in fds {
            // dup2 onto itself would keep CLOEXEC; the sources are CLOEXEC
            // and above the targets, so a plain dup2 is right.
            libc::posix_spawn_file_actions_adddup2(&mut actions, *src, *target);
        }
        let mut pid: libc::pid_t = 0;
        let rc = libc::posix_spawn(
            &mut pid,
            path.as_ptr(),
            &actions,
            &attr,
            argv_ptrs.as_ptr(),
            envp_ptrs.as_ptr(),
        );
        libc::posix_spawn_file_actions_destroy(&mut actions);
        libc::posix_spawnattr_destroy(&mut attr);
        if rc != 0 {
            return Err(Error::Io {
                what: format!("starting {program}"),
                source: std::io::Error::from_raw_os_error(rc),
            });
        }
        Ok(pid)
    }
}

/// Makes sure an fd we pass on sits above the low numbers it will be moved
/// to, so one `dup2` cannot clobber another source.
pub fn raise_fd(fd: OwnedFd) -> Result<OwnedFd> {
    if fd.as_raw_fd() > 10 {
        return Ok(fd);
    }
    let new = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(16))
        .map_err(crate::error::sys_context("duplicating a descriptor"))?;
    // SAFETY: fcntl returned a fresh descriptor we now own.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(new) })
}
