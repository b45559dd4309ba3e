//! Synchronous client of the private API: the shims have no async runtime,
//! since they must exit within a couple of milliseconds.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Code, Error};
use crate::wire::{self, request, response, Request, Response};

pub struct Client {
    stream: UnixStream,
}

impl Client {
    /// Connects to the sandboxer's private socket. `timeout` bounds every
    /// later read and write, so a wedged daemon cannot hang containerd.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Client, Error> {
        let stream = UnixStream::connect(path).map_err(|source| Error::Unreachable {
            path: path.display().to_string(),
            source,
        })?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(Client { stream })
    }

    /// Connects to the socket named by the environment (or the default).
    pub fn connect_default(timeout: Duration) -> Result<Client, Error> {
        let path: PathBuf = crate::socket_path();
        Client::connect(&path, timeout)
    }

    fn call(&mut self, body: request::Body) -> Result<response::Body, Error> {
        self.call_within(body, wire::MAX_FRAME)
    }

    /// A call whose reply may be up to `max` bytes.
    fn call_within(&mut self, body: request::Body, max: usize) -> Result<response::Body, Error> {
        wire::write_frame(&mut self.stream, &Request::new(body))?;
        let resp: Response = wire::read_frame_within(&mut self.stream, max)?;
        if resp.version != wire::PROTOCOL_VERSION {
            return Err(Error::Version { peer: resp.version });
        }
        match resp.body {
            Some(response::Body::Error(e)) => Err(Error::Remote {
                code: Code::from_i32(e.code),
                message: e.message,
            }),
            Some(body) => Ok(body),
            None => Err(Error::UnexpectedReply),
        }
    }

    /// Returns the task address (`unix:///…`) for the container.
    pub fn resolve(&mut self, req: wire::ResolveRequest) -> Result<String, Error> {
        match self.call(request::Body::Resolve(req))? {
            response::Body::Resolve(r) => Ok(r.address),
            _ => Err(Error::UnexpectedReply),
        }
    }

    pub fn delete(&mut self, req: wire::DeleteRequest) -> Result<wire::DeleteResponse, Error> {
        match self.call(request::Body::Delete(req))? {
            response::Body::Delete(r) => Ok(r),
            _ => Err(Error::UnexpectedReply),
        }
    }

    /// Every sandbox and task the daemon holds.
    pub fn list(&mut self) -> Result<wire::ListResponse, Error> {
        match self.call_within(
            request::Body::List(wire::ListRequest {}),
            wire::MAX_REPLY_FRAME,
        )? {
            response::Body::List(r) => Ok(r),
            _ => Err(Error::UnexpectedReply),
        }
    }

    pub fn health(&mut self) -> Result<wire::HealthResponse, Error> {
        match self.call(request::Body::Health(wire::HealthRequest {}))? {
            response::Body::Health(r) => Ok(r),
            _ => Err(Error::UnexpectedReply),
        }
    }

    /// Sets off a live upgrade, or with `check` only says what would refuse
    /// one.
    pub fn upgrade(&mut self, check: bool) -> Result<wire::UpgradeResponse, Error> {
        match self.call(request::Body::Upgrade(wire::UpgradeRequest { check }))? {
            response::Body::Upgrade(r) => Ok(r),
            _ => Err(Error::UnexpectedReply),
        }
    }
}
