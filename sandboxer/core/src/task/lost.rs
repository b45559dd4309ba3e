//! A container whose workload died with a predecessor daemon (the wasm
//! backend runs instances in the daemon's memory; a VM whose channel cannot
//! be taken over after a crash). The task stays known so that containerd's
//! Wait, State and Delete get a clear answer: it exited, with
//! [`EXIT_STATUS`], and the reason was written to its stderr.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim_protos::api::ProcessInfo;
use protobuf::well_known_types::any::Any;

use crate::backend::{Backend, Container};
use crate::error::{Error, Result};
use kuasar_host::stdio::StdioPaths;

/// What containerd reports for a task whose shim died (`cleanupAfterDeadShim`).
pub const EXIT_STATUS: u32 = 255;

pub struct LostContainer {
    pub backend: Arc<dyn Backend>,
    pub namespace: String,
    pub id: String,
    pub bundle: PathBuf,
    pub pid: u32,
    pub reason: String,
}

impl LostContainer {
    fn gone(&self) -> Error {
        Error::FailedPrecondition(format!("container {}: {}", self.id, self.reason))
    }
}

/// Writes why the process ended to its stderr: into the write end the
/// holder kept (`parked`), else a FIFO only when its reader still holds it
/// (never blocks), or a `file://` log appended to.
pub fn tell(parked: Option<std::os::fd::OwnedFd>, stderr: &str, reason: &str) {
    let line = format!("kuasar-sandboxer: {reason}\n");
    if let Some(fd) = parked {
        let _ = std::fs::File::from(fd).write_all(line.as_bytes());
        return;
    }
    if stderr.is_empty() || stderr.starts_with("binary://") {
        return;
    }
    let opened = match stderr.strip_prefix("file://") {
        Some(path) => std::fs::OpenOptions::new().append(true).open(path),
        None => {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(stderr.strip_prefix("fifo://").unwrap_or(stderr))
        }
    };
    if let Ok(mut f) = opened {
        let _ = f.write_all(line.as_bytes());
    }
}

#[async_trait]
impl Container for LostContainer {
    fn pid(&self) -> u32 {
        self.pid
    }

    async fn start(&self) -> Result<u32> {
        Err(self.gone())
    }

    fn exec_supported(&self) -> Result<()> {
        Err(self.gone())
    }

    async fn exec(&self, _: &str, _: &[u8], _: &StdioPaths) -> Result<u32> {
        Err(self.gone())
    }

    async fn kill(&self, _: Option<&str>, _: u32, _: bool) -> Result<()> {
        Err(Error::NotFound(format!(
            "process of {} already finished: {}",
            self.id, self.reason
        )))
    }

    async fn pause(&self) -> Result<()> {
        Err(self.gone())
    }

    async fn resume(&self) -> Result<()> {
        Err(self.gone())
    }

    async fn update(&self, _: &[u8]) -> Result<()> {
        Err(self.gone())
    }

    async fn stats(&self) -> Result<Any> {
        Err(self.gone())
    }

    async fn pids(&self) -> Result<Vec<ProcessInfo>> {
        Ok(Vec::new())
    }

    async fn resize_pty(&self, _: Option<&str>, _: u32, _: u32) -> Result<()> {
        Err(self.gone())
    }

    async fn close_stdin(&self, _: Option<&str>) -> Result<()> {
        Ok(())
    }

    async fn delete_exec(&self, _: &str) {}

    async fn delete(&self, _force: bool) -> Result<()> {
        self.backend
            .cleanup(&self.namespace, &self.id, Some(&self.bundle))
            .await
    }
}
