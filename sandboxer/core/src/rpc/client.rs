//! A minimal ttrpc client: one call at a time on one connection, which is
//! all event forwarding needs.

use std::time::Duration;

use protobuf::Message;
use tokio::net::UnixStream;
use ttrpc::proto::{KeyValue, Request, Response};

use super::frame::{self, TYPE_REQUEST, TYPE_RESPONSE};
use crate::error::{io_context, Error, Result};

pub struct Client {
    stream: UnixStream,
    next_stream: u32,
}

impl Client {
    /// `address` is a path, optionally with `unix://`.
    pub async fn connect(address: &str) -> Result<Client> {
        let path = address.strip_prefix("unix://").unwrap_or(address);
        let stream = UnixStream::connect(path)
            .await
            .map_err(io_context(format!("connecting to {path}")))?;
        Ok(Client {
            stream,
            next_stream: 1,
        })
    }

    pub async fn call(
        &mut self,
        service: &str,
        method: &str,
        payload: Vec<u8>,
        namespace: &str,
        timeout: Duration,
    ) -> Result<Vec<u8>> {
        let mut req = Request::new();
        req.service = service.into();
        req.method = method.into();
        req.payload = payload;
        req.timeout_nano = timeout.as_nanos() as i64;
        let mut kv = KeyValue::new();
        kv.key = "containerd-namespace-ttrpc".into();
        kv.value = namespace.into();
        req.metadata.push(kv);
        let bytes = req
            .write_to_bytes()
            .map_err(|e| Error::Internal(format!("encoding ttrpc request: {e}")))?;
        // Client stream ids are odd.
        let stream_id = self.next_stream;
        self.next_stream = self.next_stream.wrapping_add(2);
        let call = async {
            frame::write_frame(&mut self.stream, stream_id, TYPE_REQUEST, &bytes).await?;
            loop {
                let f = frame::read_frame(&mut self.stream).await?;
                if f.header.kind == TYPE_RESPONSE && f.header.stream_id == stream_id {
                    return Ok::<_, std::io::Error>(f.payload.unwrap_or_default());
                }
            }
        };
        let payload = tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| Error::Unavailable(format!("/{service}/{method} timed out")))?
            .map_err(io_context(format!("/{service}/{method}")))?;
        let resp = Response::parse_from_bytes(&payload)
            .map_err(|e| Error::Internal(format!("malformed ttrpc response: {e}")))?;
        if let Some(status) = resp.status.as_ref() {
            if status.code.value() != 0 {
                return Err(Error::Runtime {
                    command: format!("/{service}/{method}"),
                    message: format!("code {}: {}", status.code.value(), status.message),
                });
            }
        }
        Ok(resp.payload)
    }
}
