//! The private socket the shims and `kuasar-ctl` dial: root-only, one
//! request/response pair per frame, anything malformed answered with an
//! error and the connection closed, never a panic.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kuasar_protocol::wire::{self, request, response, Response};
use kuasar_protocol::Code;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use crate::daemon::Daemon;
use crate::error::{io_context, Result};
use crate::inspect;

/// How long a peer may take to send a request before it is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_context(format!("creating {}", dir.display())))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io_context(format!("securing {}", dir.display())))?;
    }
    let _ = std::fs::remove_file(path);
    let listener =
        UnixListener::bind(path).map_err(io_context(format!("binding {}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io_context(format!("securing {}", path.display())))?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, daemon: Arc<Daemon>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let daemon = daemon.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_peer(stream, &daemon).await {
                        tracing::debug!("control connection: {e}");
                    }
                });
            }
            Err(e) => {
                tracing::warn!("control socket accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn send(stream: &mut UnixStream, resp: &Response) -> std::io::Result<()> {
    // Only `kuasar-ctl` asks for what can outgrow a request frame (a list).
    let frame =
        wire::encode_frame_within(resp, wire::MAX_REPLY_FRAME).map_err(std::io::Error::other)?;
    stream.write_all(&frame).await
}

async fn serve_peer(mut stream: UnixStream, daemon: &Arc<Daemon>) -> std::io::Result<()> {
    let cred = stream.peer_cred()?;
    if !daemon.config.allowed_uids.contains(&cred.uid()) {
        tracing::warn!(uid = cred.uid(), "refused a peer that is not allowed");
        let resp = Response::error(
            Code::PermissionDenied,
            format!("uid {} may not use the kuasar sandboxer", cred.uid()),
        );
        return send(&mut stream, &resp).await;
    }
    loop {
        let mut prefix = [0u8; 4];
        match tokio::time::timeout(READ_TIMEOUT, stream.read_exact(&mut prefix)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(()),
        }
        let len = match wire::frame_len(prefix) {
            Ok(l) => l,
            Err(e) => {
                // The stream cannot be resynchronised: answer and close.
                return send(&mut stream, &Response::error(e.code(), e.to_string())).await;
            }
        };
        let mut body = vec![0u8; len];
        match tokio::time::timeout(READ_TIMEOUT, stream.read_exact(&mut body)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(()),
        }
        let req = match wire::decode_request(&body) {
            Ok(r) => r,
            Err(e) => return send(&mut stream, &Response::error(e.code(), e.to_string())).await,
        };
        let resp = handle(daemon, cred.uid(), req.body).await;
        send(&mut stream, &resp).await?;
    }
}

/// Counts a request in `Daemon::control_calls` while it is handled.
struct Busy<'a>(&'a AtomicUsize);

impl<'a> Busy<'a> {
    fn new(n: &'a AtomicUsize) -> Busy<'a> {
        n.fetch_add(1, Ordering::SeqCst);
        Busy(n)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn handle(daemon: &Arc<Daemon>, uid: u32, body: Option<request::Body>) -> Response {
    let _busy = Busy::new(&daemon.control_calls);
    let result = match body {
        Some(request::Body::List(_)) => Ok(response::Body::List(inspect::list(daemon))),
        Some(request::Body::Health(_)) => Ok(response::Body::Health(inspect::health(daemon))),
        Some(request::Body::Upgrade(r)) => Ok(response::Body::Upgrade(upgrade(daemon, uid, r))),
        Some(request::Body::Resolve(r)) => daemon
            .resolve(&r)
            .await
            .map(|address| response::Body::Resolve(wire::ResolveResponse { address })),
        Some(request::Body::Delete(r)) => daemon.shim_delete(&r).await.map(response::Body::Delete),
        None => {
            return Response::error(
                Code::InvalidArgument,
                "request has no body, or one this kuasar-sandboxer does not know",
            )
        }
    };
    match result {
        Ok(body) => Response::new(body),
        Err(e) => {
            tracing::info!("shim request refused: {e}");
            Response::error(e.code(), e.to_string())
        }
    }
}

/// `kuasar-ctl upgrade`: refused with what blocks it, or set off. The
/// daemon's signal loop runs a live upgrade on SIGUSR2, as for
/// `systemctl reload`; this answer goes out before it stops reading.
fn upgrade(daemon: &Daemon, uid: u32, req: wire::UpgradeRequest) -> wire::UpgradeResponse {
    let blockers = inspect::upgrade_blockers(daemon);
    let image_started_at_nanos = crate::task::nanos(daemon.image.started_at);
    if req.check || !blockers.is_empty() {
        if !req.check {
            tracing::info!(uid, "live upgrade refused: {}", blockers.join("; "));
        }
        return wire::UpgradeResponse {
            started: false,
            blockers,
            image_started_at_nanos,
        };
    }
    tracing::info!(uid, "live upgrade requested");
    let sent = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::SIGUSR2);
    wire::UpgradeResponse {
        started: sent.is_ok(),
        blockers: match sent {
            Ok(()) => Vec::new(),
            Err(e) => vec![format!("signalling the daemon: {e}")],
        },
        image_started_at_nanos,
    }
}
