//! The ttrpc server. Each accepted connection is served until the peer
//! closes it: the daemon never closes containerd's connections itself, since
//! containerd takes a closed connection for a dead shim. On a live upgrade a
//! connection stops between two reads and is handed over to the new process.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use protobuf::Message;
use tokio::io::AsyncReadExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tracing::Instrument;
use ttrpc::proto::{Request, Response};

use super::frame::{self, FrameBuf, TYPE_REQUEST, TYPE_RESPONSE};
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
}

/// The live connections of every sandbox socket, so that they can be
/// quiesced and handed over (see `upgrade.rs`).
pub struct Registry {
    stop: watch::Sender<bool>,
    conns: Mutex<Slots>,
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
        }
    }
}

impl Registry {
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
}

/// Accepts connections on `listener` until the listener task is aborted.
pub async fn serve_listener(listener: UnixListener, handler: Arc<dyn Handler>, scope: ConnScope) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                // Registered before the task runs, so a quiesce that starts
                // now waits for this connection too.
                let id = scope.registry.register();
                tokio::spawn(serve_connection(
                    stream,
                    handler.clone(),
                    scope.clone(),
                    id,
                    FrameBuf::default(),
                    Vec::new(),
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

/// Serves a connection handed over by a predecessor (or by this process
/// after a failed upgrade): its buffered bytes first, its unanswered
/// requests dispatched again under their own stream ids.
pub fn adopt_connection(
    state: ConnHandover,
    handler: Arc<dyn Handler>,
    registry: Arc<Registry>,
) -> std::io::Result<()> {
    let std = std::os::unix::net::UnixStream::from(state.fd);
    std.set_nonblocking(true)?;
    let stream = UnixStream::from_std(std)?;
    let scope = ConnScope {
        registry,
        sandbox: state.sandbox,
    };
    let id = scope.registry.register();
    tokio::spawn(serve_connection(
        stream,
        handler,
        scope,
        id,
        state.frames,
        state.pending,
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

/// Serves one connection until its peer closes it, or until the registry
/// asks it to hand over. Requests run concurrently (a `Wait` must not block
/// the `Start` behind it); responses are written in the order they finish.
async fn serve_connection(
    mut stream: UnixStream,
    handler: Arc<dyn Handler>,
    scope: ConnScope,
    id: u64,
    mut frames: FrameBuf,
    resumed: Vec<(u32, Vec<u8>)>,
) {
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
    for (stream_id, payload) in resumed {
        spawn_call(stream_id, payload.clone());
        let wait = is_wait(&payload);
        pending.insert(stream_id, (payload, wait));
    }
    loop {
        if *stop.borrow_and_update() {
            break;
        }
        while let Some(frame) = frames.next_frame() {
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
            spawn_call(stream_id, payload.clone());
            let wait = is_wait(&payload);
            pending.insert(stream_id, (payload, wait));
        }
        tokio::select! {
            read = stream.read_buf(&mut frames.buf) => match read {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!("task connection read: {e}");
                    break;
                }
            },
            Some((stream_id, resp)) = rx.recv() => {
                if let Err(e) = frame::write_frame(&mut stream, stream_id, TYPE_RESPONSE, &resp).await {
                    tracing::debug!("task connection write: {e}");
                    break;
                }
                pending.remove(&stream_id);
            }
            _ = stop.changed() => {}
        }
    }
    if !*stop.borrow() {
        // The peer is gone. Calls in flight still run to their end (a Create
        // cut off half-way would leave a container nobody tracks); their
        // answers are dropped.
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
        if let Err(e) = frame::write_frame(&mut stream, stream_id, TYPE_RESPONSE, &resp).await {
            tracing::debug!("task connection write: {e}");
            scope.registry.forget(id);
            return;
        }
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
        },
    );
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
