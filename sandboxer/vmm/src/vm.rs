//! One running VM: qemu, the agent channel, and the VM's end.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use kuasar_agent_api::{self as api, request, response};
use kuasar_core::backend::Parking;
use kuasar_core::config::VmmConfig;
use kuasar_core::error::{io_context, Error, Result};
use kuasar_host::reaper::Reaper;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::sync::watch;

use crate::agent::Agent;
use crate::qemu::{self, Accel, VmSpec};

/// What the guest answered at boot.
#[derive(Clone, Debug)]
pub struct Guest {
    pub kernel_release: String,
    pub boot_time: Duration,
}

pub struct Vm {
    pub pid: i32,
    pub agent: Arc<Agent>,
    pub guest: Guest,
    pub console: PathBuf,
    /// qemu's exit status, once it exited.
    exit: watch::Receiver<Option<u32>>,
}

/// What the pod asks of its VM.
pub struct BootRequest<'a> {
    pub config: &'a VmmConfig,
    pub accel: Accel,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Holds `shared/` (given to the guest), the console log and qemu's log.
    pub dir: &'a Path,
    pub hello: api::Hello,
    pub timeout: Duration,
    /// Where the agent channel and the processes' outputs are parked.
    pub parking: Parking,
}

impl Vm {
    /// Starts qemu and waits for the agent's Hello. A guest that does not
    /// answer in time is killed; the error carries its console's tail.
    pub async fn boot(req: BootRequest<'_>, reaper: &Arc<Reaper>) -> Result<Vm> {
        let started = Instant::now();
        let shared = req.dir.join("shared");
        std::fs::create_dir_all(&shared)
            .map_err(io_context(format!("creating {}", shared.display())))?;
        let console = req.dir.join("console.log");
        let _ = std::fs::remove_file(&console);
        let (host, guest) = UnixStream::pair().map_err(io_context("making the agent channel"))?;
        let spec = VmSpec {
            config: req.config,
            accel: req.accel,
            vcpus: req.vcpus,
            memory_mib: req.memory_mib,
            shared_dir: &shared,
            console: &console,
        };
        let pid = qemu::start(&spec, guest.into(), &req.dir.join("qemu.log"))?;
        let agent = Agent::connect(host.into(), req.parking)?;
        let vm = Vm::watch(
            pid,
            agent,
            Guest {
                kernel_release: String::new(),
                boot_time: Duration::ZERO,
            },
            req.dir,
            reaper,
        );
        match vm
            .agent
            .call(request::Call::Hello(req.hello), req.timeout)
            .await
        {
            Ok(response::Result::Hello(h)) => {
                let mut vm = vm;
                vm.guest = Guest {
                    kernel_release: h.kernel_release,
                    boot_time: started.elapsed(),
                };
                Ok(vm)
            }
            other => {
                vm.kill().await;
                let why = match other {
                    Ok(r) => format!("the guest agent answered Hello with {r:?}"),
                    Err(Error::DeadlineExceeded(_)) => format!(
                        "the guest did not come up within {:?} ({} accelerator)",
                        req.timeout,
                        req.accel.as_str()
                    ),
                    Err(e) => e.to_string(),
                };
                Err(Error::Unavailable(format!(
                    "booting the sandbox VM: {why}; {}",
                    describe(&vm.console, &req.dir.join("qemu.log"))
                )))
            }
        }
    }

    /// A VM whose qemu is `pid`, served by `agent`: its exit ends the
    /// agent's channel.
    pub fn watch(pid: i32, agent: Arc<Agent>, guest: Guest, dir: &Path, reaper: &Reaper) -> Vm {
        let console = dir.join("console.log");
        {
            let (console, log) = (console.clone(), dir.join("qemu.log"));
            agent.describe_with(move || describe(&console, &log));
        }
        let exited = reaper.subscribe(pid);
        let (exit_tx, exit) = watch::channel(None);
        let watcher = Arc::downgrade(&agent);
        tokio::spawn(async move {
            let status = exited.await.unwrap_or(KILLED_STATUS);
            let _ = exit_tx.send(Some(status));
            if let Some(agent) = watcher.upgrade() {
                agent.die(format!("qemu exited with status {status}"));
            }
        });
        Vm {
            pid,
            agent,
            guest,
            console,
            exit,
        }
    }

    /// A VM a crashed predecessor started: qemu is no longer this daemon's
    /// child (the holder reaps it and reports its exit), so a pidfd says
    /// when it ends.
    pub fn watch_foreign(
        pid: i32,
        agent: Arc<Agent>,
        guest: Guest,
        dir: &Path,
        reaper: &Arc<Reaper>,
    ) -> Vm {
        let vm = Vm::watch(pid, agent, guest, dir, reaper);
        reaper.watch_foreign(pid, Duration::from_secs(2), KILLED_STATUS);
        vm
    }

    /// Whether `pid` is the qemu of the VM whose directory is `dir` (its
    /// console log is there), not a process that took its pid.
    pub fn is_ours(pid: i32, dir: &Path) -> bool {
        let needle = dir.join("console.log");
        let needle = needle.as_os_str().as_encoded_bytes();
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| c.windows(needle.len()).any(|w| w == needle))
    }

    /// Powers the guest off cleanly, then kills qemu after `timeout`.
    pub async fn shutdown(&self, timeout: Duration) {
        if !self.agent.is_dead() {
            let _ = self
                .agent
                .call(request::Call::Shutdown(api::Shutdown {}), timeout)
                .await;
        }
        if !self.wait_exit(timeout).await {
            tracing::warn!(
                pid = self.pid,
                "the VM did not power off in time; killing qemu"
            );
            self.kill().await;
        }
    }

    /// Kills qemu and waits for its exit.
    pub async fn kill(&self) {
        let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
        if !self.wait_exit(Duration::from_secs(10)).await {
            tracing::error!(pid = self.pid, "qemu did not exit after SIGKILL");
        }
        self.agent.die("qemu was killed".into());
    }

    async fn wait_exit(&self, timeout: Duration) -> bool {
        let mut rx = self.exit.clone();
        let exited = tokio::time::timeout(timeout, rx.wait_for(|e| e.is_some()))
            .await
            .is_ok();
        exited
    }

    /// Keeps the guest's clock in step with the host's while the VM runs.
    pub fn keep_time(&self) {
        let agent = Arc::downgrade(&self.agent);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(30));
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(agent) = agent.upgrade() else { return };
                if agent.is_dead() {
                    return;
                }
                let _ = agent
                    .call(request::Call::SetTime(now()), Duration::from_secs(5))
                    .await;
            }
        });
    }
}

const KILLED_STATUS: u32 = 128 + 9;

/// The host's clock, for the guest.
pub fn now() -> api::SetTime {
    let d = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    api::SetTime {
        unix_seconds: d.as_secs() as i64,
        unix_nanos: d.subsec_nanos(),
    }
}

fn describe(console: &Path, log: &Path) -> String {
    let c = qemu::tail(console, 8);
    let q = qemu::tail(log, 4);
    let mut s = format!(
        "console ({}): {}",
        console.display(),
        if c.is_empty() { "empty" } else { &c }
    );
    if !q.is_empty() {
        s.push_str(&format!("; qemu: {q}"));
    }
    s
}
