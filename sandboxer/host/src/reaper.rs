//! The one place child exits are collected. The daemon is the child
//! subreaper of every container, so container processes, runc invocations
//! and log drivers all end up here; whoever cares about a pid subscribes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::oneshot;

/// How long an exit nobody has claimed yet is kept: a subscriber may learn a
/// pid only after its process already ended (a container's pid file is read
/// after runc returns).
const UNCLAIMED_TTL: Duration = Duration::from_secs(60);

/// An exit status in containerd's convention: the exit code, or 128 plus
/// the signal for a signalled death.
pub type ExitCode = u32;

#[derive(Default)]
pub struct Reaper {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    waiters: HashMap<i32, oneshot::Sender<ExitCode>>,
    unclaimed: HashMap<i32, (ExitCode, Instant)>,
}

impl Reaper {
    pub fn new() -> Arc<Reaper> {
        Arc::new(Reaper::default())
    }

    /// Resolves when `pid` exits (or at once if it already did).
    pub fn subscribe(&self, pid: i32) -> oneshot::Receiver<ExitCode> {
        let (tx, rx) = oneshot::channel();
        let mut st = self.state.lock().unwrap();
        match st.unclaimed.remove(&pid) {
            Some((code, _)) => {
                let _ = tx.send(code);
            }
            None => {
                st.waiters.insert(pid, tx);
            }
        }
        rx
    }

    /// Forgets a subscription whose result is no longer wanted.
    pub fn unsubscribe(&self, pid: i32) {
        self.state.lock().unwrap().waiters.remove(&pid);
    }

    /// Reaps every exited child without blocking.
    pub fn reap(&self) {
        loop {
            let (pid, code) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, code as u32),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, 128 + sig as u32),
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!("waitpid: {e}");
                    break;
                }
            };
            self.deliver(pid.as_raw(), code);
        }
    }

    /// Hands `pid`'s exit to its subscriber (or keeps it for a late one):
    /// from `reap`, or from the holder for orphans of a crashed daemon.
    pub fn deliver(&self, pid: i32, code: ExitCode) {
        let mut st = self.state.lock().unwrap();
        match st.waiters.remove(&pid) {
            Some(tx) => {
                let _ = tx.send(code);
            }
            None => {
                let now = Instant::now();
                st.unclaimed
                    .retain(|_, (_, at)| now.duration_since(*at) < UNCLAIMED_TTL);
                st.unclaimed.insert(pid, (code, now));
            }
        }
    }

    /// Watches a process that is not this daemon's child (it was a crashed
    /// predecessor's; the holder reaps it and reports its exit status). If
    /// it ends and no status has come for `grace`, the subscriber gets
    /// `unknown`: a dead process is never waited on forever.
    pub fn watch_foreign(self: &Arc<Self>, pid: i32, grace: Duration, unknown: ExitCode) {
        // SAFETY: pidfd_open takes a pid and flags, and returns a new fd.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        let reaper = self.clone();
        let pidfd = (fd >= 0).then(|| {
            // SAFETY: pidfd_open returned a descriptor owned by no one else.
            unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) }
        });
        tokio::spawn(async move {
            if let Some(pidfd) = pidfd {
                // Readable once the process has ended.
                // SAFETY: the OwnedFd is moved in and stays open, the same
                // descriptor, for as long as the AsyncFd lives.
                let registered = unsafe {
                    tokio::io::unix::AsyncFd::register_with_interest(
                        pidfd,
                        tokio::io::Interest::READABLE,
                    )
                };
                match registered {
                    Ok(afd) => {
                        let _ = afd.readable().await;
                    }
                    Err(e) => tracing::warn!(pid, "watching a process: {e}"),
                }
            }
            tokio::time::sleep(grace).await;
            let waiter = reaper.state.lock().unwrap().waiters.remove(&pid);
            if let Some(tx) = waiter {
                tracing::warn!(
                    pid,
                    "a process of a crashed predecessor ended with no status known"
                );
                let _ = tx.send(unknown);
            }
        });
    }

    /// Reaps on every SIGCHLD, forever.
    pub async fn run(self: Arc<Self>) {
        let mut sigchld = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())
        {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cannot watch SIGCHLD, exits will be missed: {e}");
                return;
            }
        };
        loop {
            self.reap();
            sigchld.recv().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_before_subscription_is_kept_for_the_late_subscriber() {
        let r = Reaper::default();
        r.deliver(4242, 7);
        let mut rx = r.subscribe(4242);
        assert_eq!(rx.try_recv().unwrap(), 7);
    }

    #[test]
    fn subscriber_gets_the_exit_once() {
        let r = Reaper::default();
        let mut rx = r.subscribe(99);
        assert!(rx.try_recv().is_err());
        r.deliver(99, 137);
        assert_eq!(rx.try_recv().unwrap(), 137);
        // a second exit of the same pid (reused) is not sent to the old waiter
        r.deliver(99, 0);
        assert!(r.state.lock().unwrap().unclaimed.contains_key(&99));
    }
}
