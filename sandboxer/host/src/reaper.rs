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

    fn deliver(&self, pid: i32, code: ExitCode) {
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
