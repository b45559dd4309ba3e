//! `kuasar-sandboxer`: the resident daemon behind the short-lived
//! `containerd-shim-kuasar*-v1` binaries. It owns every sandbox and task on
//! the node and serves containerd's Task API on one socket per sandbox.

pub mod backend;
pub mod config;
pub mod control;
pub mod daemon;
pub mod error;
pub mod events;
pub mod ids;
pub mod mount;
pub mod oom;
pub mod reaper;
pub mod rpc;
pub mod spawn;
pub mod state;
pub mod stdio;
pub mod task;

use std::sync::Arc;

use crate::backend::Backend;
use crate::config::Config;
use crate::error::Result;

/// Runs the daemon until SIGTERM or SIGINT. Containers keep running when it
/// stops; only the daemon's own sockets go away.
pub async fn run(config: Config) -> Result<()> {
    let reaper = reaper::Reaper::new();
    tokio::spawn(reaper.clone().run());
    let mut backends: Vec<Arc<dyn Backend>> = Vec::new();
    if config.runc.enabled {
        backends.push(Arc::new(backend::runc::Runc::new(
            config.runc.binary.clone(),
            &config.root,
            reaper.clone(),
        )));
    }
    let listen = config.listen_path();
    let daemon = daemon::Daemon::new(config, reaper, backends)?;
    let listener = control::bind(&listen)?;
    tracing::info!(listen = %listen.display(), "kuasar-sandboxer ready");
    let control = tokio::spawn(control::serve(listener, daemon));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(error::io_context("watching SIGTERM"))?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    control.abort();
    let _ = std::fs::remove_file(&listen);
    tracing::info!("kuasar-sandboxer stopping");
    Ok(())
}
