//! The private socket the shims and `kuasar-ctl` dial: root-only, one
//! request/response pair per frame, anything malformed answered with an
//! error and the connection closed, never a panic. A peer that stays silent
//! or stops reading is dropped, and a bounded number of peers is served at
//! once, so a stuck client cannot hold the daemon's descriptors or block
//! other shims.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kuasar_protocol::wire::{self, request, response, Response};
use kuasar_protocol::Code;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use crate::daemon::Daemon;
use crate::error::{io_context, Result};
use crate::inspect;

/// How long a peer may take to send a request before it is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an answer may stay unread before its peer is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once. A shim holds one for a few milliseconds; at
/// the limit new ones wait in the socket's backlog until a slot frees, which
/// a silent peer does within `READ_TIMEOUT`.
const MAX_CONNECTIONS: usize = 128;

/// What one peer may cost: how long it may stay silent or leave an answer
/// unread, and how many peers are served at once.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            read_timeout: READ_TIMEOUT,
            write_timeout: WRITE_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
        }
    }
}

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
    serve_with(listener, daemon, Limits::default()).await
}

/// [`serve`] with other limits.
pub async fn serve_with(listener: UnixListener, daemon: Arc<Daemon>, limits: Limits) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        // A slot before the accept: at the limit, peers wait in the backlog.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, _)) => {
                let daemon = daemon.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_peer(stream, &daemon, limits).await {
                        tracing::debug!("control connection: {e}");
                    }
                    drop(slot);
                });
            }
            Err(e) => {
                tracing::warn!("control socket accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn send<S: AsyncWrite + Unpin>(
    stream: &mut S,
    resp: &Response,
    limit: Duration,
) -> std::io::Result<()> {
    // Only `kuasar-ctl` asks for what can outgrow a request frame (a list).
    let frame =
        wire::encode_frame_within(resp, wire::MAX_REPLY_FRAME).map_err(std::io::Error::other)?;
    match tokio::time::timeout(limit, stream.write_all(&frame)).await {
        Ok(written) => written,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the peer leaves its answer unread",
        )),
    }
}

async fn serve_peer(
    mut stream: UnixStream,
    daemon: &Arc<Daemon>,
    limits: Limits,
) -> std::io::Result<()> {
    let cred = stream.peer_cred()?;
    if !daemon.config.allowed_uids.contains(&cred.uid()) {
        tracing::warn!(uid = cred.uid(), "refused a peer that is not allowed");
        let resp = Response::error(
            Code::PermissionDenied,
            format!("uid {} may not use the kuasar sandboxer", cred.uid()),
        );
        return send(&mut stream, &resp, limits.write_timeout).await;
    }
    serve_stream(stream, daemon, cred.uid(), limits).await
}

/// Serves the requests of an allowed peer until it closes the connection,
/// stays silent for `read_timeout` or leaves an answer unread for
/// `write_timeout`. Anything malformed is answered and ends the connection.
/// `uid` is the peer's, for the log.
#[doc(hidden)]
pub async fn serve_stream<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    daemon: &Arc<Daemon>,
    uid: u32,
    limits: Limits,
) -> std::io::Result<()> {
    loop {
        let mut prefix = [0u8; 4];
        match tokio::time::timeout(limits.read_timeout, stream.read_exact(&mut prefix)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(()),
        }
        let len = match wire::frame_len(prefix) {
            Ok(l) => l,
            Err(e) => {
                // The stream cannot be resynchronised: answer and close.
                let resp = Response::error(e.code(), e.to_string());
                return send(&mut stream, &resp, limits.write_timeout).await;
            }
        };
        let mut body = vec![0u8; len];
        match tokio::time::timeout(limits.read_timeout, stream.read_exact(&mut body)).await {
            Ok(Ok(_)) => {}
            // Gone in the middle of a frame: nobody is left to answer.
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(()),
        }
        let req = match wire::decode_request(&body) {
            Ok(r) => r,
            Err(e) => {
                let resp = Response::error(e.code(), e.to_string());
                return send(&mut stream, &resp, limits.write_timeout).await;
            }
        };
        let resp = handle(daemon, uid, req.body).await;
        send(&mut stream, &resp, limits.write_timeout).await?;
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
/// daemon's main loop runs the live upgrade, as on SIGUSR2 (`systemctl
/// reload`); this answer goes out before it stops reading.
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
    daemon.upgrade_requested.notify_one();
    wire::UpgradeResponse {
        started: true,
        blockers: Vec::new(),
        image_started_at_nanos,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::{Read, Write};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixStream as StdStream;
    use std::path::Path;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use kuasar_protocol::wire::{self, request, response, Request, Response};
    use kuasar_protocol::Code;

    use super::{bind, serve_with, Limits};
    use crate::daemon::Daemon;

    /// The uid and gid a refused peer runs as.
    const NOBODY: u32 = 65534;

    /// The child's half of [`connect_as_nobody`]: drops to `NOBODY`,
    /// connects, and sends the connect errno (0 on success) over `chan`
    /// with the connection attached. Only async-signal-safe calls: it runs
    /// between fork and _exit in a multi-threaded process.
    ///
    /// # Safety
    /// `chan` is an open unix socket and `addr` a filled-in address of
    /// `addr_len` bytes.
    unsafe fn nobody_child(chan: RawFd, addr: &libc::sockaddr_un, addr_len: u32) -> i32 {
        // SAFETY: plain system calls on values the caller vouches for; the
        // control message is built in a local, aligned buffer.
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(NOBODY) != 0
                || libc::setuid(NOBODY) != 0
            {
                return 2;
            }
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                return 3;
            }
            let rc = libc::connect(fd, (addr as *const libc::sockaddr_un).cast(), addr_len);
            let errno = if rc == 0 {
                0
            } else {
                *libc::__errno_location()
            };
            let mut payload = errno.to_ne_bytes();
            let mut iov = libc::iovec {
                iov_base: payload.as_mut_ptr().cast(),
                iov_len: payload.len(),
            };
            #[repr(C, align(8))]
            struct Control([u8; 64]);
            let mut control = Control([0; 64]);
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            if rc == 0 {
                msg.msg_control = control.0.as_mut_ptr().cast();
                msg.msg_controllen = libc::CMSG_SPACE(4) as usize;
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<RawFd>(), fd);
            }
            if libc::sendmsg(chan, &msg, 0) != payload.len() as isize {
                return 4;
            }
            0
        }
    }

    /// Connects to the socket at `path` from a child forked and switched to
    /// uid and gid 65534, and returns the connection: the server sees the
    /// child's credentials on it. `Err` is the child's connect error.
    pub(crate) fn connect_as_nobody(path: &Path) -> std::io::Result<StdStream> {
        assert!(
            nix::unistd::geteuid().is_root(),
            "connecting as another uid needs root"
        );
        let bytes = path.as_os_str().as_bytes();
        // SAFETY: an all-zero sockaddr_un is valid.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        assert!(bytes.len() < addr.sun_path.len(), "{}", path.display());
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        let addr_len = (std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1) as u32;
        let (ours, theirs) = StdStream::pair().unwrap();
        // SAFETY: the child only makes system calls and leaves with _exit.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                // SAFETY: `theirs` is open and `addr` is filled in above.
                let code = unsafe { nobody_child(theirs.as_raw_fd(), &addr, addr_len) };
                // SAFETY: ends the child without running the parent's
                // destructors or atexit handlers.
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                drop(theirs);
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(
                    status,
                    nix::sys::wait::WaitStatus::Exited(child, 0),
                    "the uid {NOBODY} child failed"
                );
                let mut payload = [0u8; 4];
                let mut iov = [std::io::IoSliceMut::new(&mut payload)];
                let mut space = nix::cmsg_space!(RawFd);
                let msg = nix::sys::socket::recvmsg::<()>(
                    ours.as_raw_fd(),
                    &mut iov,
                    Some(&mut space),
                    nix::sys::socket::MsgFlags::empty(),
                )
                .unwrap();
                let fd = msg.cmsgs().find_map(|c| match c {
                    nix::sys::socket::ControlMessageOwned::ScmRights(fds) => fds.first().copied(),
                    _ => None,
                });
                let errno = i32::from_ne_bytes(payload);
                match fd {
                    // SAFETY: the descriptor just arrived and is ours alone.
                    Some(fd) => Ok(StdStream::from(unsafe { OwnedFd::from_raw_fd(fd) })),
                    None => Err(std::io::Error::from_raw_os_error(errno)),
                }
            }
        }
    }

    /// As bound, the directory and socket modes keep uid 65534 out of the
    /// socket at `path`: its connect fails with EACCES.
    pub(crate) async fn refused_by_its_mode(path: &Path) {
        let path = path.to_path_buf();
        let err = tokio::task::spawn_blocking(move || connect_as_nobody(&path))
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
    }

    /// Makes `path` and every directory above it up to `top` reachable by
    /// any uid, as a misconfigured node might.
    pub(crate) fn open_up(top: &Path, path: &Path) {
        let mut dir = path.parent();
        while let Some(d) = dir {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
            if d == top {
                break;
            }
            dir = d.parent();
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).unwrap();
    }

    struct Fixture {
        dir: tempfile::TempDir,
        daemon: Arc<Daemon>,
        socket: std::path::PathBuf,
    }

    fn fixture(limits: Limits) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let daemon = crate::backend::fake::daemon(&dir.path().join("k"));
        let socket = dir.path().join("run/sandboxer.sock");
        let listener = bind(&socket).unwrap();
        tokio::spawn(serve_with(listener, daemon.clone(), limits));
        Fixture {
            dir,
            daemon,
            socket,
        }
    }

    fn resolve(id: &str) -> Request {
        Request::new(request::Body::Resolve(wire::ResolveRequest {
            kind: "runc".into(),
            namespace: "ns".into(),
            id: id.into(),
            ..Default::default()
        }))
    }

    fn delete(id: &str) -> Request {
        Request::new(request::Body::Delete(wire::DeleteRequest {
            kind: "runc".into(),
            namespace: "ns".into(),
            id: id.into(),
            bundle: String::new(),
        }))
    }

    fn ask(stream: &mut StdStream, req: &Request) -> Response {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        wire::write_frame(stream, req).unwrap();
        wire::read_frame(stream).unwrap()
    }

    fn refusal(resp: &Response) -> (Code, String) {
        match &resp.body {
            Some(response::Body::Error(e)) => (Code::from_i32(e.code), e.message.clone()),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_of_another_uid_is_refused_by_the_socket_mode_and_by_its_credentials() {
        let f = fixture(Limits::default());
        refused_by_its_mode(&f.socket).await;
        // With the modes opened up, the daemon still refuses it by its
        // peer credentials, before reading any request.
        open_up(f.dir.path(), &f.socket);
        let socket = f.socket.clone();
        let resp = tokio::task::spawn_blocking(move || {
            // The refusal comes unasked, and the connection is closed.
            let mut conn = connect_as_nobody(&socket).unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let resp: Response = wire::read_frame(&mut conn).unwrap();
            let mut rest = Vec::new();
            conn.read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty(), "{rest:?}");
            resp
        })
        .await
        .unwrap();
        let (code, message) = refusal(&resp);
        assert_eq!(code, Code::PermissionDenied, "{message}");
        assert!(message.contains("uid 65534"), "{message}");
        assert!(f.daemon.sandbox("ns", "c1").is_err());
        // Root is served on the same socket.
        let socket = f.socket.clone();
        let resp = tokio::task::spawn_blocking(move || {
            ask(&mut StdStream::connect(&socket).unwrap(), &resolve("c1"))
        })
        .await
        .unwrap();
        assert!(
            matches!(resp.body, Some(response::Body::Resolve(_))),
            "{resp:?}"
        );
        assert!(f.daemon.sandbox("ns", "c1").is_ok());
    }

    /// Serves a root peer that sends `sent` and closes its side; returns
    /// everything the daemon wrote back.
    async fn serve_bytes(daemon: &Arc<Daemon>, sent: &[u8]) -> Vec<u8> {
        let (mut ours, theirs) = tokio::io::duplex(sent.len().max(64));
        tokio::io::AsyncWriteExt::write_all(&mut ours, sent)
            .await
            .unwrap();
        tokio::io::AsyncWriteExt::shutdown(&mut ours).await.unwrap();
        super::serve_stream(theirs, daemon, 0, Limits::default())
            .await
            .unwrap();
        let mut answer = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut ours, &mut answer)
            .await
            .unwrap();
        answer
    }

    /// Found by the `wire_decode` fuzz target: an upgrade asked through
    /// the socket is handed to the daemon's main loop, never raised as a
    /// signal on the process that served it.
    #[tokio::test]
    async fn an_upgrade_request_is_handed_to_the_main_loop() {
        let f = fixture(Limits::default());
        let req = Request::new(request::Body::Upgrade(wire::UpgradeRequest {
            check: false,
        }));
        let answer = serve_bytes(&f.daemon, &wire::encode_frame(&req).unwrap()).await;
        let resp: Response = wire::read_frame(&mut answer.as_slice()).unwrap();
        match resp.body {
            Some(response::Body::Upgrade(u)) => assert!(u.started && u.blockers.is_empty()),
            other => panic!("{other:?}"),
        }
        tokio::time::timeout(
            Duration::from_secs(1),
            f.daemon.upgrade_requested.notified(),
        )
        .await
        .expect("the main loop was not asked for an upgrade");
    }

    /// Found by the `wire_decode` fuzz target (corpus `regression-cut-body`):
    /// a peer that closes after a frame's length prefix ends the connection
    /// quietly, answered nothing, as one that closes between frames does.
    #[tokio::test]
    async fn a_peer_gone_in_the_middle_of_a_frame_ends_the_connection_quietly() {
        let f = fixture(Limits::default());
        for sent in [&[0u8, 0, 0, 1][..], &[0, 0, 0, 9, 1, 2], &[0, 0]] {
            let answer = serve_bytes(&f.daemon, sent).await;
            assert!(answer.is_empty(), "{sent:?}: {answer:?}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn silent_and_half_sent_peers_do_not_hold_up_others_and_are_dropped() {
        let f = fixture(Limits {
            read_timeout: Duration::from_millis(500),
            ..Limits::default()
        });
        let socket = f.socket.clone();
        tokio::task::spawn_blocking(move || {
            let silent = StdStream::connect(&socket).unwrap();
            let mut half_prefix = StdStream::connect(&socket).unwrap();
            half_prefix.write_all(&[0, 0]).unwrap();
            let mut half_body = StdStream::connect(&socket).unwrap();
            half_body.write_all(&[0, 0, 1, 0, 8]).unwrap();
            let started = Instant::now();
            let resp = ask(&mut StdStream::connect(&socket).unwrap(), &delete("c1"));
            assert!(
                matches!(resp.body, Some(response::Body::Delete(_))),
                "{resp:?}"
            );
            assert!(started.elapsed() < Duration::from_millis(400));
            // Each stuck peer is closed once it has been silent too long.
            for mut stuck in [silent, half_prefix, half_body] {
                stuck
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                let mut buf = [0u8; 16];
                assert_eq!(stuck.read(&mut buf).unwrap(), 0);
            }
            assert!(started.elapsed() < Duration::from_secs(3));
        })
        .await
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_that_never_reads_its_answers_is_dropped() {
        let f = fixture(Limits {
            write_timeout: Duration::from_millis(300),
            ..Limits::default()
        });
        let socket = f.socket.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = StdStream::connect(&socket).unwrap();
            conn.set_write_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let frame = wire::encode_frame(&delete("c1")).unwrap();
            let started = Instant::now();
            // Requests pile up until the answers fill the socket and the
            // daemon gives the peer up; its writes then fail.
            let refused = loop {
                assert!(
                    started.elapsed() < Duration::from_secs(20),
                    "the daemon still holds a peer that reads nothing"
                );
                match conn.write_all(&frame) {
                    Ok(()) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => break e,
                }
            };
            assert!(
                matches!(
                    refused.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ),
                "{refused}"
            );
        })
        .await
        .unwrap();
        // The daemon serves others on.
        let socket = f.socket.clone();
        let resp = tokio::task::spawn_blocking(move || {
            ask(&mut StdStream::connect(&socket).unwrap(), &delete("c2"))
        })
        .await
        .unwrap();
        assert!(matches!(resp.body, Some(response::Body::Delete(_))));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn peers_beyond_the_connection_limit_wait_for_a_free_slot() {
        let f = fixture(Limits {
            read_timeout: Duration::from_millis(600),
            max_connections: 2,
            ..Limits::default()
        });
        let socket = f.socket.clone();
        tokio::task::spawn_blocking(move || {
            let held: Vec<StdStream> = (0..2)
                .map(|_| StdStream::connect(&socket).unwrap())
                .collect();
            std::thread::sleep(Duration::from_millis(100));
            let started = Instant::now();
            // Accepted by the kernel, served once a held slot frees.
            let resp = ask(&mut StdStream::connect(&socket).unwrap(), &delete("c1"));
            assert!(matches!(resp.body, Some(response::Body::Delete(_))));
            let waited = started.elapsed();
            assert!(waited >= Duration::from_millis(400), "{waited:?}");
            assert!(waited < Duration::from_secs(5), "{waited:?}");
            drop(held);
        })
        .await
        .unwrap();
    }
}
