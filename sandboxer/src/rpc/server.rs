//! The ttrpc server. Each accepted connection is served until the peer
//! closes it: the daemon never closes containerd's connections itself, since
//! containerd takes a closed connection for a dead shim.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use protobuf::Message;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use ttrpc::proto::{Request, Response};

use super::frame::{self, TYPE_REQUEST, TYPE_RESPONSE};
use crate::error::Error;

/// What a handler learns about the call besides its payload.
#[derive(Clone, Debug)]
pub struct RequestContext {
    /// `containerd-namespace-ttrpc` from the request metadata, if sent.
    pub namespace: Option<String>,
    pub timeout: Option<Duration>,
}

/// Serves the methods of one or more ttrpc services.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Handles `/service/method` with an encoded request; returns the encoded
    /// response.
    async fn handle(
        &self,
        ctx: RequestContext,
        service: &str,
        method: &str,
        payload: &[u8],
    ) -> Result<Vec<u8>, Error>;
}

/// Accepts connections on `listener` until the listener task is aborted.
pub async fn serve_listener(listener: UnixListener, handler: Arc<dyn Handler>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve_connection(stream, handler.clone()));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("task socket accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Serves one connection until its peer closes it. Requests run
/// concurrently (a `Wait` must not block the `Start` behind it); responses
/// are written by one writer task in the order they finish.
pub async fn serve_connection(stream: UnixStream, handler: Arc<dyn Handler>) {
    let (mut reader, mut writer) = stream.into_split();
    let (tx, mut rx) = mpsc::unbounded_channel::<(u32, Vec<u8>)>();
    let writer_task = tokio::spawn(async move {
        while let Some((stream_id, payload)) = rx.recv().await {
            if let Err(e) =
                frame::write_frame(&mut writer, stream_id, TYPE_RESPONSE, &payload).await
            {
                tracing::debug!("task connection write: {e}");
                break;
            }
        }
    });
    loop {
        let frame = match frame::read_frame(&mut reader).await {
            Ok(f) => f,
            Err(e) => {
                if e.kind() != std::io::ErrorKind::UnexpectedEof {
                    tracing::debug!("task connection read: {e}");
                }
                break;
            }
        };
        let stream_id = frame.header.stream_id;
        if frame.header.kind != TYPE_REQUEST {
            // Streams and data frames are not part of the Task API.
            continue;
        }
        let Some(payload) = frame.payload else {
            let err = Error::ResourceExhausted(format!(
                "message length {} exceeds maximum message size of {}",
                frame.header.length,
                frame::MAX_MESSAGE
            ));
            let _ = tx.send((stream_id, error_response(&err)));
            continue;
        };
        let handler = handler.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let resp = dispatch(handler.as_ref(), &payload).await;
            let _ = tx.send((stream_id, resp));
        });
    }
    // The peer is gone. Calls in flight still run to their end (a Create cut
    // off half-way would leave a container nobody tracks); their answers are
    // dropped with the writer.
    writer_task.abort();
}

async fn dispatch(handler: &dyn Handler, payload: &[u8]) -> Vec<u8> {
    let req = match Request::parse_from_bytes(payload) {
        Ok(r) => r,
        Err(e) => {
            return error_response(&Error::InvalidArgument(format!(
                "malformed ttrpc request: {e}"
            )))
        }
    };
    let ctx = RequestContext {
        namespace: req
            .metadata
            .iter()
            .find(|kv| kv.key == "containerd-namespace-ttrpc")
            .map(|kv| kv.value.clone()),
        timeout: (req.timeout_nano > 0).then(|| Duration::from_nanos(req.timeout_nano as u64)),
    };
    let result = match ctx.timeout {
        Some(t) => tokio::time::timeout(
            t,
            handler.handle(ctx.clone(), &req.service, &req.method, &req.payload),
        )
        .await
        .unwrap_or_else(|_| {
            Err(Error::Unavailable(format!(
                "/{}/{} timed out after {t:?}",
                req.service, req.method
            )))
        }),
        None => {
            handler
                .handle(ctx, &req.service, &req.method, &req.payload)
                .await
        }
    };
    match result {
        Ok(payload) => {
            let mut resp = Response::new();
            resp.payload = payload;
            let mut status = ttrpc::proto::Status::new();
            status.code = protobuf::EnumOrUnknown::from_i32(0);
            resp.status = Some(status).into();
            resp.write_to_bytes().unwrap_or_default()
        }
        Err(e) => {
            tracing::debug!("/{}/{}: {e}", req.service, req.method);
            error_response(&e)
        }
    }
}

fn error_response(err: &Error) -> Vec<u8> {
    let mut resp = Response::new();
    resp.status = Some(err.to_status()).into();
    resp.write_to_bytes().unwrap_or_default()
}
