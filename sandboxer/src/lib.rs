//! `kuasar-sandboxer`: the resident daemon behind the short-lived
//! `containerd-shim-kuasar*-v1` binaries. It owns every sandbox and task on
//! the node and serves containerd's Task API on one socket per sandbox.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinHandle;

pub use kuasar_core::{backend, config, control, daemon, error, fdstore, sandbox_api, upgrade};
pub use kuasar_host::reaper;

pub mod holder;

use crate::backend::Backend;
use crate::config::Config;
use crate::error::Result;

/// Runs the daemon until SIGTERM or SIGINT. Containers keep running when it
/// stops; only the daemon's own sockets go away. SIGUSR2 upgrades it in
/// place (see `upgrade.rs`).
pub async fn run(config: Config) -> Result<()> {
    run_with_handover(config, None, fdstore::FdStore::none(), Default::default()).await
}

/// How often the daemon tells the holder (and systemd) it is alive.
const WATCHDOG_PING: std::time::Duration = std::time::Duration::from_secs(10);

/// A listening socket the holder kept under `name`, or a new one bound at
/// `path` and parked there.
fn listener(
    name: &str,
    path: &std::path::Path,
    inherited: &mut fdstore::Inherited,
    store: &fdstore::FdStore,
) -> Result<OwnedFd> {
    if let Some(fd) = inherited.take(name).and_then(|mut v| v.pop()) {
        return Ok(fd);
    }
    let fd = control::bind(path)?
        .into_std()
        .map(OwnedFd::from)
        .map_err(error::io_context("detaching a listening socket"))?;
    store.store(name, &[std::os::fd::AsFd::as_fd(&fd)]);
    Ok(fd)
}

fn serve_control(fd: &OwnedFd, daemon: Arc<daemon::Daemon>) -> Result<JoinHandle<()>> {
    let std = fd
        .try_clone()
        .map(std::os::unix::net::UnixListener::from)
        .map_err(error::io_context("duplicating the private socket"))?;
    std.set_nonblocking(true)
        .map_err(error::io_context("configuring the private socket"))?;
    let listener = tokio::net::UnixListener::from_std(std)
        .map_err(error::io_context("watching the private socket"))?;
    Ok(tokio::spawn(control::serve(listener, daemon)))
}

/// [`run`], taking over from a predecessor: a live upgrade when `handover`
/// names its file, a restart after a crash when the holder passed
/// descriptors or records were left.
pub async fn run_with_handover(
    config: Config,
    handover: Option<PathBuf>,
    store: fdstore::FdStore,
    mut inherited: fdstore::Inherited,
) -> Result<()> {
    let reaper = reaper::Reaper::new();
    let store = Arc::new(store);
    {
        let reaper = reaper.clone();
        store.watch_exits(move |pid, status| reaper.deliver(pid, status));
    }
    let mut reaper_task = tokio::spawn(reaper.clone().run());
    let mut backends: Vec<Arc<dyn Backend>> = Vec::new();
    if config.runc.enabled {
        backends.push(Arc::new(kuasar_runc::Runc::new(
            config.runc.binary.clone(),
            &config.root,
            reaper.clone(),
        )));
    }
    #[cfg(feature = "wasm")]
    if config.wasm.enabled {
        backends.push(Arc::new(kuasar_wasm::Wasm::new(
            &config.root,
            &config.wasm,
            reaper.clone(),
            kuasar_runc::Runc::new(config.runc.binary.clone(), &config.root, reaper.clone()),
        )?));
    }
    if config.vmm.enabled {
        backends.push(Arc::new(kuasar_vmm::Vmm::new(
            &config.vmm,
            &config.root,
            reaper.clone(),
        )?));
    }
    let listen = config.listen_path();
    let daemon = daemon::Daemon::with_store(config, reaper.clone(), backends, store.clone())?;
    let adopted = match &handover {
        Some(path) => match upgrade::adopt(&daemon, path).await {
            Ok(fd) => Some(fd),
            Err(e) => {
                tracing::error!("live upgrade: nothing taken over: {e}");
                None
            }
        },
        None => None,
    };
    if adopted.is_none() && kuasar_core::recover::needed(&daemon, &inherited) {
        kuasar_core::recover::recover(&daemon, &mut inherited).await?;
    }
    let control_fd = match adopted {
        Some(fd) => fd,
        None => listener("control", &listen, &mut inherited, &store)?,
    };
    let sandbox_listen = daemon.config.sandbox_listen_path();
    let sandbox_fd = listener("sandbox-api", &sandbox_listen, &mut inherited, &store)?;
    inherited.drop_rest();
    let sandbox_socket = {
        let std = std::os::unix::net::UnixListener::from(sandbox_fd);
        std.set_nonblocking(true)
            .map_err(error::io_context("configuring the sandbox socket"))?;
        tokio::net::UnixListener::from_std(std)
            .map_err(error::io_context("watching the sandbox socket"))?
    };
    let (stop_controller, controller_stopped) = tokio::sync::oneshot::channel::<()>();
    let controller = tokio::spawn(sandbox_api::serve(sandbox_socket, daemon.clone(), async {
        let _ = controller_stopped.await;
    }));
    tracing::info!(listen = %listen.display(), sandbox_controller = %sandbox_listen.display(), "kuasar-sandboxer ready");
    let mut control = serve_control(&control_fd, daemon.clone())?;
    store.notify("READY");
    let watchdog = tokio::spawn({
        let store = store.clone();
        async move {
            loop {
                tokio::time::sleep(WATCHDOG_PING).await;
                store.notify("WATCHDOG");
            }
        }
    });
    let mut term =
        signal(SignalKind::terminate()).map_err(error::io_context("watching SIGTERM"))?;
    let mut usr2 =
        signal(SignalKind::user_defined2()).map_err(error::io_context("watching SIGUSR2"))?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = upgrade_asked(&daemon, &mut usr2) => {
                control.abort();
                let _ = (&mut control).await;
                let e = upgrade::upgrade(&daemon, control_fd.as_raw_fd(), &mut reaper_task).await;
                tracing::error!("live upgrade failed, serving on: {e}");
                daemon.image.upgrade_failed(&e);
                reaper_task = tokio::spawn(reaper.clone().run());
                control = serve_control(&control_fd, daemon.clone())?;
            }
        }
    }
    control.abort();
    watchdog.abort();
    store.notify("STOPPING");
    let _ = stop_controller.send(());
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), controller).await;
    let _ = std::fs::remove_file(&listen);
    let _ = std::fs::remove_file(&sandbox_listen);
    tracing::info!("kuasar-sandboxer stopping");
    Ok(())
}

/// SIGUSR2, or `kuasar-ctl upgrade` through the private socket.
async fn upgrade_asked(daemon: &daemon::Daemon, usr2: &mut tokio::signal::unix::Signal) {
    tokio::select! {
        _ = usr2.recv() => {}
        _ = daemon.upgrade_requested.notified() => {}
    }
}
