//! A backend whose sandboxes and containers only record what they are
//! asked, for the core's tests: a signal ends a process at once.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use containerd_shim_protos::api::ProcessInfo;
use kuasar_host::stdio::StdioPaths;
use kuasar_protocol::Kind;
use protobuf::well_known_types::any::Any;

use crate::backend::{
    Backend, BackendRecord, Capabilities, Container, ContainerEvent, CreateRequest, EventSink,
    RestoreRequest, Sandbox, SandboxRequest,
};
use crate::error::{Error, Result};

pub const INIT_PID: u32 = 4242;

/// A daemon over this backend alone, its state under `root`.
pub fn daemon(root: &std::path::Path) -> Arc<crate::daemon::Daemon> {
    let config = crate::config::Config {
        root: root.to_path_buf(),
        ..crate::config::Config::default()
    };
    crate::daemon::Daemon::new(
        config,
        kuasar_host::reaper::Reaper::new(),
        vec![Arc::new(FakeBackend)],
    )
    .expect("starting a daemon over the fake backend")
}

pub struct FakeBackend;

struct FakeContainer {
    events: EventSink,
    execs: Mutex<Vec<String>>,
}

#[async_trait]
impl Backend for FakeBackend {
    fn kind(&self) -> Kind {
        Kind::Runc
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            survives_reexec: true,
            survives_crash: true,
        }
    }
    async fn create_sandbox(&self, _: SandboxRequest) -> Result<Arc<dyn Sandbox>> {
        Ok(Arc::new(FakeSandbox))
    }
    async fn restore_sandbox(
        &self,
        _: SandboxRequest,
        _: BackendRecord,
        _: Vec<std::os::fd::OwnedFd>,
    ) -> Result<Arc<dyn Sandbox>> {
        Ok(Arc::new(FakeSandbox))
    }
    async fn cleanup(&self, _: &str, _: &str, _: Option<&std::path::Path>) -> Result<()> {
        Ok(())
    }
}

struct FakeSandbox;

#[async_trait]
impl Sandbox for FakeSandbox {
    async fn start(&self) -> Result<u32> {
        Ok(0)
    }
    async fn stop(&self) -> Result<()> {
        Ok(())
    }
    async fn create_container(&self, req: CreateRequest) -> Result<Box<dyn Container>> {
        Ok(Box::new(FakeContainer {
            events: req.events,
            execs: Mutex::default(),
        }))
    }
    async fn restore_container(&self, _: RestoreRequest) -> Result<Box<dyn Container>> {
        Err(Error::Unimplemented("fake".into()))
    }
}

#[async_trait]
impl Container for FakeContainer {
    fn pid(&self) -> u32 {
        INIT_PID
    }
    async fn start(&self) -> Result<u32> {
        Ok(INIT_PID)
    }
    async fn exec(&self, exec_id: &str, _: &[u8], _: &StdioPaths) -> Result<u32> {
        self.execs.lock().unwrap().push(exec_id.into());
        Ok(INIT_PID + 1)
    }
    /// A signal ends the process at once, as SIGKILL would.
    async fn kill(&self, exec_id: Option<&str>, signal: u32, _: bool) -> Result<()> {
        let _ = self
            .events
            .send(ContainerEvent::Exit(exec_id.map(Into::into), 128 + signal));
        Ok(())
    }
    async fn pause(&self) -> Result<()> {
        Ok(())
    }
    async fn resume(&self) -> Result<()> {
        Ok(())
    }
    async fn update(&self, _: &[u8]) -> Result<()> {
        Ok(())
    }
    async fn stats(&self) -> Result<Any> {
        Err(Error::Unimplemented("fake".into()))
    }
    async fn pids(&self) -> Result<Vec<ProcessInfo>> {
        Ok(vec![])
    }
    async fn resize_pty(&self, _: Option<&str>, _: u32, _: u32) -> Result<()> {
        Ok(())
    }
    async fn close_stdin(&self, _: Option<&str>) -> Result<()> {
        Ok(())
    }
    async fn delete_exec(&self, _: &str) {}
    async fn delete(&self, _: bool) -> Result<()> {
        Ok(())
    }
}
