//! The microVM backend: each sandbox is a qemu VM whose guest agent runs
//! the pod's containers with runc. The daemon owns qemu (spawned through
//! the one spawn helper, reaped by the one reaper); the Task API of the
//! pod's containers is forwarded to the agent over a virtio-serial port.

mod agent;
mod qemu;
mod sandbox;
mod share;
mod size;
mod vm;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kuasar_agent_api as api;
use kuasar_core::backend::{Backend, BackendRecord, Capabilities, Sandbox, SandboxRequest};
use kuasar_core::config::VmmConfig;
use kuasar_core::error::{Error, Result};
use kuasar_host::reaper::Reaper;
use kuasar_protocol::Kind;
use tokio::sync::OnceCell;

pub use qemu::Accel;

/// What every VM of the backend shares.
pub struct Shared {
    config: VmmConfig,
    reaper: Arc<Reaper>,
    /// Where the accelerator probe boots its VM.
    root: PathBuf,
    accel: OnceCell<Accel>,
}

impl Shared {
    /// The accelerator, chosen once per daemon.
    async fn accel(&self) -> Accel {
        *self
            .accel
            .get_or_init(|| async {
                let chosen = self.choose_accel().await;
                tracing::info!(
                    accel = chosen.as_str(),
                    "sandbox VMs run on {}",
                    chosen.as_str()
                );
                chosen
            })
            .await
    }

    async fn choose_accel(&self) -> Accel {
        match self.config.accel.as_str() {
            "tcg" => return Accel::Tcg,
            "kvm" => return Accel::Kvm,
            _ => {}
        }
        if std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_err()
        {
            return Accel::Tcg;
        }
        // /dev/kvm can exist and still not run a stock kernel (a
        // paravirtual KVM module): boot the guest on it, bounded.
        let dir = self.root.join("probe");
        let t = vm::now();
        let booted = vm::Vm::boot(
            vm::BootRequest {
                config: &self.config,
                accel: Accel::Kvm,
                vcpus: 1,
                memory_mib: self.config.memory_mib,
                dir: &dir,
                hello: api::Hello {
                    version: api::VERSION,
                    unix_seconds: t.unix_seconds,
                    unix_nanos: t.unix_nanos,
                    ..Default::default()
                },
                timeout: Duration::from_millis(self.config.probe_timeout_ms),
                parking: Default::default(),
            },
            &self.reaper,
        )
        .await;
        let accel = match booted {
            Ok(vm) => {
                vm.kill().await;
                Accel::Kvm
            }
            Err(e) => {
                tracing::info!("KVM does not run the guest here, using TCG: {e}");
                Accel::Tcg
            }
        };
        let _ = std::fs::remove_dir_all(&dir);
        accel
    }
}

pub struct Vmm {
    shared: Arc<Shared>,
}

impl Vmm {
    pub fn new(config: &VmmConfig, root: &Path, reaper: Arc<Reaper>) -> Result<Vmm> {
        if !["auto", "kvm", "tcg"].contains(&config.accel.as_str()) {
            return Err(Error::InvalidArgument(format!(
                "[vmm] accel = {:?}: expected \"auto\", \"kvm\" or \"tcg\"",
                config.accel
            )));
        }
        Ok(Vmm {
            shared: Arc::new(Shared {
                config: config.clone(),
                reaper,
                root: root.join("vmm"),
                accel: OnceCell::new(),
            }),
        })
    }
}

#[async_trait]
impl Backend for Vmm {
    fn kind(&self) -> Kind {
        Kind::Vmm
    }

    fn capabilities(&self) -> Capabilities {
        // qemu stays the daemon's child across the re-exec; the agent
        // channel and the stdio descriptors are handed over. Across a
        // crash they are parked in the holder, and the agent says what
        // happened meanwhile (Resync).
        Capabilities {
            survives_reexec: true,
            survives_crash: true,
        }
    }

    async fn create_sandbox(&self, req: SandboxRequest) -> Result<Arc<dyn Sandbox>> {
        Ok(Arc::new(sandbox::VmSandbox::new(self.shared.clone(), req)))
    }

    async fn restore_sandbox(
        &self,
        req: SandboxRequest,
        record: BackendRecord,
        fds: Vec<std::os::fd::OwnedFd>,
    ) -> Result<Arc<dyn Sandbox>> {
        Ok(Arc::new(
            sandbox::VmSandbox::restore(self.shared.clone(), req, record, fds).await?,
        ))
    }

    async fn discard_sandbox(&self, req: SandboxRequest, _record: BackendRecord) -> Result<()> {
        sandbox::discard(&req.state_dir).await
    }

    async fn cleanup(&self, _namespace: &str, _id: &str, _bundle: Option<&Path>) -> Result<()> {
        // A VM's containers live and die with their VM, which its sandbox
        // stops; nothing of theirs is left on the host.
        Ok(())
    }
}
