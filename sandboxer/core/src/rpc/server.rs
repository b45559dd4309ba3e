//! The ttrpc server. Each accepted connection is served until the peer
//! closes it: the daemon never closes containerd's connections itself, since
//! containerd takes a closed connection for a dead shim. On a live upgrade a
//! connection stops between two reads and is handed over to the new process.
//!
//! Where a holder keeps descriptors (see `fdstore.rs`), every accepted
//! connection is parked there with a journal (see `journal.rs`), and frames
//! are taken off the socket only once their request is journaled: a frame
//! is peeked until it is whole, recorded, then consumed. A daemon killed at
//! any point leaves the connection at a frame boundary, with every request
//! it took either answered or in the journal. Frames too large to be held
//! in the socket at once (over 64 KiB; Task API requests are a few hundred
//! bytes) are read in pieces: a crash in the middle of one cannot be
//! resumed, and the restarted daemon closes that connection.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use protobuf::Message;
use tokio::io::Interest;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tracing::Instrument;
use ttrpc::proto::{Request, Response};

use super::frame::{self, Frame, FrameBuf, Header, HEADER_LEN, TYPE_REQUEST, TYPE_RESPONSE};
use super::journal::Journal;
use crate::error::Error;
use crate::fdstore::FdStore;

/// Largest frame read whole by peeking; larger ones are read in pieces.
const PEEK_LIMIT: usize = 64 * 1024;
/// Calls one connection may have running at once; more are refused with
/// ResourceExhausted (containerd has a handful per task).
const MAX_PENDING: usize = 256;

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

/// A connection as it stands when the daemon hands over to its successor:
/// the socket, the bytes read but not yet parsed, and the requests still
/// unanswered (raw ttrpc payloads by stream id) to be dispatched again.
#[derive(Debug)]
pub struct ConnHandover {
    pub fd: OwnedFd,
    /// The sandbox whose socket accepted the connection.
    pub sandbox: (String, String),
    pub frames: FrameBuf,
    pub pending: Vec<(u32, Vec<u8>)>,
    /// Answers made but maybe not written: written first.
    pub replies: Vec<(u32, Vec<u8>)>,
    /// Its name in the descriptor store (empty: not parked).
    pub name: String,
    pub journal: Option<Journal>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Journal({} pending)", self.pending())
    }
}

impl ConnHandover {
    /// A connection a predecessor parked, from its socket and journal.
    /// `resumed_bytes` are bytes it had read and not parsed (a live
    /// upgrade); after a crash there are none, and a connection that was
    /// half-way through a frame read in pieces cannot go on (`Err`).
    pub fn from_journal(
        fd: OwnedFd,
        journal_fd: OwnedFd,
        sandbox: (String, String),
        name: String,
        frames: Option<FrameBuf>,
    ) -> std::io::Result<ConnHandover> {
        let (mut journal, rec) = Journal::open(journal_fd)?;
        let crashed = frames.is_none();
        if crashed && rec.unsafe_read {
            return Err(std::io::Error::other(
                "the daemon died while reading a large frame: the stream position is lost",
            ));
        }
        // Recorded, then the daemon died before taking it off the socket:
        // it will be read again.
        let mut reread = None;
        if let Some(last) = rec.last_request {
            if rec.entries.contains_key(&last) && head_stream(fd.as_raw_fd()) == Some(last) {
                journal.forget(last)?;
                reread = Some(last);
            }
        }
        let mut pending = Vec::new();
        let mut replies = Vec::new();
        for (stream, e) in rec.entries {
            if Some(stream) == reread {
                continue;
            }
            match e.response {
                Some(r) => replies.push((stream, r)),
                None => pending.push((stream, e.request)),
            }
        }
        Ok(ConnHandover {
            fd,
            sandbox,
            frames: frames.unwrap_or_default(),
            pending,
            replies,
            name,
            journal: Some(journal),
        })
    }
}

/// The live connections of every sandbox socket, so that they can be
/// quiesced and handed over (see `upgrade.rs`).
pub struct Registry {
    stop: watch::Sender<bool>,
    conns: Mutex<Slots>,
    /// Numbers connections for their names in the descriptor store.
    names: AtomicU64,
}

#[derive(Default)]
struct Slots {
    next: u64,
    /// `None` while serving, `Some` once handed over.
    slots: HashMap<u64, Option<ConnHandover>>,
}

impl Default for Registry {
    fn default() -> Registry {
        Registry {
            stop: watch::channel(false).0,
            conns: Mutex::default(),
            names: AtomicU64::new(1),
        }
    }
}

impl Registry {
    /// Connections numbered from here on get numbers above `n` (those a
    /// predecessor parked keep theirs).
    pub fn number_above(&self, n: u64) {
        self.names.fetch_max(n + 1, Ordering::SeqCst);
    }

    fn register(&self) -> u64 {
        let mut c = self.conns.lock().unwrap();
        c.next += 1;
        let id = c.next;
        c.slots.insert(id, None);
        id
    }

    fn forget(&self, id: u64) {
        self.conns.lock().unwrap().slots.remove(&id);
    }

    fn report(&self, id: u64, state: ConnHandover) {
        self.conns.lock().unwrap().slots.insert(id, Some(state));
    }

    /// Asks every connection to stop reading and hand over.
    pub fn quiesce(&self) {
        self.stop.send_replace(true);
    }

    /// Lets connections served from now on run normally again.
    pub fn resume(&self) {
        self.stop.send_replace(false);
    }

    /// Waits (up to `limit`) until every live connection has handed over,
    /// and takes what they reported. One that did not make it in time is
    /// left behind (logged): containerd will see it drop.
    pub async fn collect(&self, limit: Duration) -> Vec<ConnHandover> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let done = self
                .conns
                .lock()
                .unwrap()
                .slots
                .values()
                .all(|s| s.is_some());
            if done || tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut c = self.conns.lock().unwrap();
        let mut out = Vec::new();
        let mut stuck = 0;
        for (_, slot) in c.slots.drain() {
            match slot {
                Some(s) => out.push(s),
                None => stuck += 1,
            }
        }
        if stuck > 0 {
            tracing::warn!("{stuck} task connection(s) did not quiesce in time");
        }
        out
    }
}

/// Which sandbox a connection serves and where it reports on quiesce.
#[derive(Clone)]
pub struct ConnScope {
    pub registry: Arc<Registry>,
    pub sandbox: (String, String),
    pub store: Arc<FdStore>,
    /// Peers allowed on the socket (containerd runs as root).
    pub allowed_uids: Arc<Vec<u32>>,
}

#[cfg(test)]
impl ConnScope {
    /// A root-only socket of no sandbox whose connections are not parked.
    pub fn unparked() -> ConnScope {
        ConnScope {
            store: Arc::new(FdStore::none()),
            allowed_uids: Arc::new(vec![0]),
            registry: Default::default(),
            sandbox: (String::new(), String::new()),
        }
    }
}

/// The descriptor-store name of connection `n` of `sandbox`.
pub fn conn_name(n: u64, sandbox: &(String, String)) -> String {
    format!("c/{n}/{}/{}", sandbox.0, sandbox.1)
}

/// Parses a name made by [`conn_name`].
pub fn parse_conn_name(name: &str) -> Option<(u64, (String, String))> {
    let mut parts = name.splitn(4, '/');
    if parts.next()? != "c" {
        return None;
    }
    let n = parts.next()?.parse().ok()?;
    let ns = parts.next()?.to_string();
    let id = parts.next()?.to_string();
    Some((n, (ns, id)))
}

/// The stream id of the frame at the head of the socket, if a whole
/// header is there.
fn head_stream(fd: RawFd) -> Option<u32> {
    let mut hb = [0u8; HEADER_LEN];
    let n = nix::sys::socket::recv(
        fd,
        &mut hb,
        nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
    )
    .ok()?;
    (n == HEADER_LEN).then(|| Header::decode(&hb).stream_id)
}

/// Accepts connections on `listener` until the listener task is aborted.
pub async fn serve_listener(listener: UnixListener, handler: Arc<dyn Handler>, scope: ConnScope) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                match stream.peer_cred() {
                    Ok(c) if scope.allowed_uids.contains(&c.uid()) => {}
                    Ok(c) => {
                        tracing::warn!(uid = c.uid(), sandbox = %scope.sandbox.1, "refused a task connection from a peer that is not allowed");
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!("task connection without credentials refused: {e}");
                        continue;
                    }
                }
                // Parked with its journal before anything is read from it,
                // so that it outlives a crash from here on.
                let (name, journal) = if scope.store.held() {
                    let n = scope.registry.names.fetch_add(1, Ordering::SeqCst);
                    let name = conn_name(n, &scope.sandbox);
                    match Journal::create() {
                        Ok(j) => {
                            scope.store.store(&name, &[stream.as_fd(), j.fd()]);
                            (name, Some(j))
                        }
                        Err(e) => {
                            tracing::warn!("task connection not parked (no journal: {e}): a crash will drop it");
                            (String::new(), None)
                        }
                    }
                } else {
                    (String::new(), None)
                };
                // Registered before the task runs, so a quiesce that starts
                // now waits for this connection too.
                let id = scope.registry.register();
                tokio::spawn(serve_connection(
                    stream,
                    handler.clone(),
                    scope.clone(),
                    id,
                    ConnState {
                        frames: FrameBuf::default(),
                        pending: Vec::new(),
                        replies: Vec::new(),
                        name,
                        journal,
                    },
                ));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("task socket accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// What a connection carries besides its socket.
struct ConnState {
    frames: FrameBuf,
    pending: Vec<(u32, Vec<u8>)>,
    replies: Vec<(u32, Vec<u8>)>,
    name: String,
    journal: Option<Journal>,
}

/// Serves a connection handed over by a predecessor (or by this process
/// after a failed upgrade): its answers already made first, its buffered
/// bytes, its unanswered requests dispatched again under their own stream
/// ids.
pub fn adopt_connection(
    state: ConnHandover,
    handler: Arc<dyn Handler>,
    registry: Arc<Registry>,
    store: Arc<FdStore>,
    allowed_uids: Arc<Vec<u32>>,
) -> std::io::Result<()> {
    let std = std::os::unix::net::UnixStream::from(state.fd);
    std.set_nonblocking(true)?;
    let stream = UnixStream::from_std(std)?;
    if let Some((n, _)) = parse_conn_name(&state.name) {
        registry.number_above(n);
    }
    let scope = ConnScope {
        registry,
        sandbox: state.sandbox,
        store,
        allowed_uids,
    };
    let id = scope.registry.register();
    tokio::spawn(serve_connection(
        stream,
        handler,
        scope,
        id,
        ConnState {
            frames: state.frames,
            pending: state.pending,
            replies: state.replies,
            name: state.name,
            journal: state.journal,
        },
    ));
    Ok(())
}

fn is_wait(payload: &[u8]) -> bool {
    Request::parse_from_bytes(payload)
        .map(|r| r.method == "Wait")
        .unwrap_or(false)
}

/// How long a quiescing connection waits for its calls other than Wait.
const QUIESCE_CALLS: Duration = Duration::from_secs(5);

/// Takes what the socket has off it: whole frames by peeking while a
/// journal is kept and they fit [`PEEK_LIMIT`] (recorded before they are
/// consumed), otherwise plain reads into `frames`. `Ok(true)`: end of
/// stream. Cancel safe: nothing is consumed across an await.
async fn read_more(
    stream: &UnixStream,
    frames: &mut FrameBuf,
    journal: &mut Option<Journal>,
    whole: &mut Vec<Frame>,
) -> std::io::Result<bool> {
    loop {
        stream.readable().await?;
        let fd = stream.as_raw_fd();
        match stream.try_io(Interest::READABLE, || take(fd, frames, journal, whole)) {
            Ok(eof) => return Ok(eof),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

fn take(
    fd: RawFd,
    frames: &mut FrameBuf,
    journal: &mut Option<Journal>,
    whole: &mut Vec<Frame>,
) -> std::io::Result<bool> {
    use nix::sys::socket::{recv, MsgFlags};
    let would_block = || std::io::Error::from(std::io::ErrorKind::WouldBlock);
    let plain = |frames: &mut FrameBuf, journal: &mut Option<Journal>| -> std::io::Result<bool> {
        if let Some(j) = journal {
            j.set_unsafe(true)?;
        }
        let mut chunk = [0u8; 16 * 1024];
        let n = recv(fd, &mut chunk, MsgFlags::MSG_DONTWAIT).map_err(std::io::Error::from)?;
        frames.buf.extend_from_slice(&chunk[..n]);
        Ok(n == 0)
    };
    let Some(j) = journal else {
        return plain(frames, journal);
    };
    if !frames.buf.is_empty() || frames.skip > 0 {
        return plain(frames, journal);
    }
    let _ = j;
    let mut taken = 0;
    loop {
        let mut hb = [0u8; HEADER_LEN];
        let n = recv(fd, &mut hb, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT);
        let n = match n {
            Ok(n) => n,
            Err(nix::errno::Errno::EAGAIN) if taken > 0 => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            return Ok(taken == 0);
        }
        if n < HEADER_LEN {
            return if taken > 0 {
                Ok(false)
            } else {
                Err(would_block())
            };
        }
        let header = Header::decode(&hb);
        let total = HEADER_LEN + header.length as usize;
        if header.length as usize > frame::MAX_MESSAGE || total > PEEK_LIMIT {
            if taken > 0 {
                return Ok(false);
            }
            return plain(frames, journal);
        }
        let mut avail: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int through the valid pointer.
        if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut avail) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if (avail as usize) < total {
            return if taken > 0 {
                Ok(false)
            } else {
                Err(would_block())
            };
        }
        let mut buf = vec![0u8; total];
        let n = recv(fd, &mut buf, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT)
            .map_err(std::io::Error::from)?;
        if n < total {
            return if taken > 0 {
                Ok(false)
            } else {
                Err(would_block())
            };
        }
        if header.kind == TYPE_REQUEST {
            if let Some(j) = journal.as_mut() {
                j.request(header.stream_id, &buf[HEADER_LEN..])?;
            }
        }
        let mut got = 0;
        while got < total {
            match recv(fd, &mut buf[got..], MsgFlags::MSG_DONTWAIT) {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => got += n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        buf.drain(..HEADER_LEN);
        whole.push(Frame {
            header,
            payload: Some(buf),
        });
        taken += 1;
    }
}

/// Serves one connection until its peer closes it, or until the registry
/// asks it to hand over. Requests run concurrently (a `Wait` must not block
/// the `Start` behind it); responses are written in the order they finish.
/// Each response is written with one write: below 32 KiB a Unix socket
/// takes it whole or not at all, so a crash never leaves half an answer.
async fn serve_connection(
    mut stream: UnixStream,
    handler: Arc<dyn Handler>,
    scope: ConnScope,
    id: u64,
    state: ConnState,
) {
    let ConnState {
        mut frames,
        pending: resumed,
        replies,
        name,
        mut journal,
    } = state;
    let (tx, mut rx) = mpsc::unbounded_channel::<(u32, Vec<u8>)>();
    // Requests not yet answered: raw payload, and whether it is a Wait.
    let mut pending: HashMap<u32, (Vec<u8>, bool)> = HashMap::new();
    let mut stop = scope.registry.stop.subscribe();
    let spawn_call = |stream_id: u32, payload: Vec<u8>| {
        let handler = handler.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let resp = dispatch(&handler, &payload).await;
            let _ = tx.send((stream_id, resp));
        });
    };
    let mut gone = false;
    for (stream_id, resp) in replies {
        if let Err(e) = frame::write_frame(&mut stream, stream_id, TYPE_RESPONSE, &resp).await {
            tracing::debug!("task connection write: {e}");
            gone = true;
            break;
        }
        journal_done(&mut journal, stream_id);
    }
    for (stream_id, payload) in resumed {
        spawn_call(stream_id, payload.clone());
        let wait = is_wait(&payload);
        pending.insert(stream_id, (payload, wait));
    }
    let mut whole: Vec<Frame> = Vec::new();
    loop {
        if gone || *stop.borrow_and_update() {
            break;
        }
        let before = frames.buf.is_empty() && frames.skip == 0;
        while let Some(frame) = frames.next_frame() {
            if frame.header.kind == TYPE_REQUEST {
                if let (Some(j), Some(p)) = (journal.as_mut(), frame.payload.as_ref()) {
                    journal_io(j.request(frame.header.stream_id, p));
                }
            }
            whole.push(frame);
        }
        if !before && frames.buf.is_empty() && frames.skip == 0 {
            if let Some(j) = journal.as_mut() {
                journal_io(j.set_unsafe(false));
            }
        }
        for frame in whole.drain(..) {
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
            if pending.len() >= MAX_PENDING {
                let err = Error::ResourceExhausted(format!(
                    "more than {MAX_PENDING} calls at once on one connection"
                ));
                let _ = tx.send((stream_id, error_response(&err)));
                continue;
            }
            spawn_call(stream_id, payload.clone());
            let wait = is_wait(&payload);
            pending.insert(stream_id, (payload, wait));
        }
        tokio::select! {
            read = read_more(&stream, &mut frames, &mut journal, &mut whole) => match read {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => {
                    tracing::debug!("task connection read: {e}");
                    break;
                }
            },
            Some((stream_id, resp)) = rx.recv() => {
                if let Some(j) = journal.as_mut() {
                    journal_io(j.response(stream_id, &resp));
                }
                if let Err(e) = frame::write_frame(&mut stream, stream_id, TYPE_RESPONSE, &resp).await {
                    tracing::debug!("task connection write: {e}");
                    break;
                }
                journal_done(&mut journal, stream_id);
                pending.remove(&stream_id);
            }
            _ = stop.changed() => {}
        }
    }
    if !*stop.borrow() {
        // The peer is gone. Calls in flight still run to their end (a Create
        // cut off half-way would leave a container nobody tracks); their
        // answers are dropped.
        if !name.is_empty() {
            scope.store.remove(&name);
        }
        scope.registry.forget(id);
        return;
    }
    // Quiescing: let calls other than Wait finish and answer (a Wait may
    // block for days; the successor asks again), then hand over.
    let deadline = tokio::time::Instant::now() + QUIESCE_CALLS;
    loop {
        let busy = pending.values().any(|(_, wait)| !wait);
        let next = if busy {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(n) => n,
                Err(_) => break,
            }
        } else {
            match rx.try_recv() {
                Ok(n) => Some(n),
                Err(_) => break,
            }
        };
        let Some((stream_id, resp)) = next else { break };
        if let Some(j) = journal.as_mut() {
            journal_io(j.response(stream_id, &resp));
        }
        if let Err(e) = frame::write_frame(&mut stream, stream_id, TYPE_RESPONSE, &resp).await {
            tracing::debug!("task connection write: {e}");
            if !name.is_empty() {
                scope.store.remove(&name);
            }
            scope.registry.forget(id);
            return;
        }
        journal_done(&mut journal, stream_id);
        pending.remove(&stream_id);
    }
    let fd = match stream.into_std() {
        Ok(s) => OwnedFd::from(s),
        Err(e) => {
            tracing::warn!("task connection cannot be handed over: {e}");
            scope.registry.forget(id);
            return;
        }
    };
    scope.registry.report(
        id,
        ConnHandover {
            fd,
            sandbox: scope.sandbox,
            frames,
            pending: pending.into_iter().map(|(k, (p, _))| (k, p)).collect(),
            replies: Vec::new(),
            name,
            journal,
        },
    );
}

fn journal_done(journal: &mut Option<Journal>, stream_id: u32) {
    if let Some(j) = journal.as_mut() {
        journal_io(j.done(stream_id));
    }
}

/// A journal that cannot be written (memory exhausted) makes the
/// connection unsafe across a crash, not unusable.
fn journal_io(r: std::io::Result<()>) {
    if let Err(e) = r {
        tracing::warn!("task connection journal: {e}");
    }
}

async fn dispatch(handler: &Arc<dyn Handler>, payload: &[u8]) -> Vec<u8> {
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
    let started = std::time::Instant::now();
    let timeout = ctx.timeout;
    let name = format!("/{}/{}", req.service, req.method);
    // Everything logged while the call runs carries these; the handler
    // records the namespace (containerd 1.6 sends none: the sandbox's) and
    // the task id once it has decoded the request.
    let span = tracing::info_span!(
        "call",
        method = %name,
        namespace = tracing::field::Empty,
        id = tracing::field::Empty,
    );
    // The handler runs as a task of its own: a panic in it becomes an
    // answer, and a call whose deadline passes runs on to its end (a Create
    // is finished, never dropped half-way) while the caller is told.
    let mut call = tokio::spawn(
        {
            let handler = handler.clone();
            async move {
                handler
                    .handle(ctx, &req.service, &req.method, &req.payload)
                    .await
            }
        }
        .instrument(span.clone()),
    );
    let joined = match timeout {
        Some(t) => match tokio::time::timeout(t, &mut call).await {
            Ok(joined) => joined,
            Err(_) => Ok(Err(Error::DeadlineExceeded(format!(
                "{name} did not finish within its deadline of {t:?}"
            )))),
        },
        None => call.await,
    };
    let result = joined.unwrap_or_else(|e| {
        let why = crate::error::panic_message(e);
        tracing::error!("{name} failed inside the daemon: {why}");
        Err(Error::Internal(format!(
            "{name} failed inside the daemon: {why}"
        )))
    });
    let took_us = started.elapsed().as_micros() as u64;
    span.in_scope(|| match &result {
        Ok(_) => tracing::debug!(took_us, "done"),
        Err(e) => tracing::debug!(took_us, error = %e, "failed"),
    });
    match result {
        Ok(payload) => {
            let mut resp = Response::new();
            resp.payload = payload;
            let mut status = ttrpc::proto::Status::new();
            status.code = protobuf::EnumOrUnknown::from_i32(0);
            resp.status = Some(status).into();
            resp.write_to_bytes().unwrap_or_default()
        }
        Err(e) => error_response(&e),
    }
}

fn error_response(err: &Error) -> Vec<u8> {
    let mut resp = Response::new();
    resp.status = Some(err.to_status()).into();
    resp.write_to_bytes().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    /// Panics on `Panic`, takes 200 ms (then records that it finished) on
    /// `Slow`, fails with a missing file on `Missing`.
    #[derive(Default)]
    struct Handlers {
        slow_finished: AtomicBool,
    }

    #[async_trait]
    impl Handler for Handlers {
        async fn handle(
            &self,
            _: RequestContext,
            _: &str,
            method: &str,
            _: &[u8],
        ) -> Result<Vec<u8>, Error> {
            match method {
                "Panic" => panic!("handler bug"),
                "Slow" => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    self.slow_finished.store(true, Ordering::SeqCst);
                    Ok(vec![])
                }
                _ => Err(crate::error::io_context("reading runc's pid file")(
                    std::io::Error::from(std::io::ErrorKind::NotFound),
                )),
            }
        }
    }

    async fn call(handler: &Arc<dyn Handler>, method: &str, timeout: Option<Duration>) -> Response {
        let mut req = Request::new();
        req.service = "containerd.task.v2.Task".into();
        req.method = method.into();
        req.timeout_nano = timeout.map(|t| t.as_nanos() as i64).unwrap_or(0);
        let resp = dispatch(handler, &req.write_to_bytes().unwrap()).await;
        Response::parse_from_bytes(&resp).unwrap()
    }

    fn code(resp: &Response) -> i32 {
        resp.status.code.value()
    }

    #[tokio::test]
    async fn a_panicking_handler_answers_internal_and_the_server_serves_on() {
        let handler: Arc<dyn Handler> = Arc::new(Handlers::default());
        let resp = call(&handler, "Panic", None).await;
        assert_eq!(code(&resp), kuasar_protocol::Code::Internal as i32);
        assert!(
            resp.status.message.contains("handler bug"),
            "{}",
            resp.status.message
        );
        let resp = call(&handler, "Slow", None).await;
        assert_eq!(code(&resp), 0);
    }

    #[tokio::test]
    async fn a_passed_deadline_answers_deadline_exceeded_and_the_call_still_finishes() {
        let handlers = Arc::new(Handlers::default());
        let handler: Arc<dyn Handler> = handlers.clone();
        let resp = call(&handler, "Slow", Some(Duration::from_millis(20))).await;
        assert_eq!(code(&resp), kuasar_protocol::Code::DeadlineExceeded as i32);
        assert!(!handlers.slow_finished.load(Ordering::SeqCst));
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(handlers.slow_finished.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_missing_file_inside_the_daemon_is_not_reported_as_task_not_found() {
        let handler: Arc<dyn Handler> = Arc::new(Handlers::default());
        let resp = call(&handler, "Missing", None).await;
        assert_eq!(code(&resp), kuasar_protocol::Code::Unknown as i32);
    }
}
