//! Sockets of wasm instances, in their pod's network namespace.
//!
//! A socket belongs to the network namespace of the thread that creates it,
//! and wasmtime's WASI creates sockets on the thread that runs the instance.
//! An instance given network access therefore runs on a thread of its own
//! that joined the pod's namespace before running any guest code; every
//! other instance shares the engine's threads and has no sockets at all.

use std::ffi::CStr;
use std::future::Future;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::pin::Pin;

use tokio::sync::oneshot;

use super::spec::NetNs;
use kuasar_core::error::{Error, Result};

/// Opens the namespace the instance's sockets will live in: `None` for the
/// daemon's own (a spec that names no network namespace, as runc would
/// leave such a container in the host's).
pub fn open(ns: &NetNs) -> Result<Option<OwnedFd>> {
    match ns {
        NetNs::Host => Ok(None),
        NetNs::Path(p) => open_path(p).map(Some),
        NetNs::New => new_namespace().map(Some),
    }
}

fn open_path(path: &Path) -> Result<OwnedFd> {
    let fd = nix::fcntl::open(
        path,
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| {
        Error::InvalidArgument(format!("opening network namespace {}: {e}", path.display()))
    })?;
    // SAFETY: open returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the fd.
    let kind = unsafe { libc::ioctl(fd.as_raw_fd(), libc::NS_GET_NSTYPE) };
    if kind != libc::CLONE_NEWNET {
        return Err(Error::InvalidArgument(format!(
            "{} is not a network namespace",
            path.display()
        )));
    }
    Ok(fd)
}

/// A network namespace of the instance's own, with its loopback up, as a
/// spec asks for with a network namespace that has no path.
fn new_namespace() -> Result<OwnedFd> {
    // unshare on a short-lived thread: only that thread moves, and the
    // namespace lives on through the descriptor.
    std::thread::scope(|s| {
        s.spawn(|| -> std::io::Result<OwnedFd> {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
            loopback_up()?;
            Ok(std::fs::File::open("/proc/thread-self/ns/net")?.into())
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("thread panicked")))
    })
    .map_err(|e| Error::Internal(format!("creating a network namespace: {e}")))
}

/// Sets `lo` up in the calling thread's network namespace.
pub(super) fn loopback_up() -> std::io::Result<()> {
    // SAFETY: a plain socket call; the fd is owned at once.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: just created, owned by nothing else.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    // SAFETY: ifreq is plain data; all zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = c"lo";
    for (d, s) in req.ifr_name.iter_mut().zip(CStr::to_bytes(name)) {
        *d = *s as libc::c_char;
    }
    // SAFETY: both ioctls read and write the ifreq passed, nothing else.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// How a run on a thread of its own ended: its output, or the message of
/// a panic.
pub type Ended<T> = std::result::Result<T, String>;

type Work<T> = (
    Pin<Box<dyn Future<Output = T> + Send>>,
    oneshot::Sender<Ended<T>>,
);

/// A thread inside a network namespace, ready to run one instance.
pub struct NetThread<T> {
    work: oneshot::Sender<Work<T>>,
}

impl<T: Send + 'static> NetThread<T> {
    /// Starts a thread that joins the network namespace `ns` and waits for
    /// its instance; fails when it cannot join. Dropped unused, the thread
    /// ends.
    pub async fn start(ns: OwnedFd, name: &str) -> Result<Self> {
        let (joined_tx, joined) = oneshot::channel();
        let (work, work_rx) = oneshot::channel::<Work<T>>();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let runtime =
                    nix::sched::setns(ns.as_raw_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(|e| format!("joining the network namespace: {e}"))
                        .and_then(|()| {
                            // Threads of its blocking pool start from this one
                            // and so share its namespace.
                            tokio::runtime::Builder::new_current_thread()
                                .enable_all()
                                .build()
                                .map_err(|e| format!("starting the instance's runtime: {e}"))
                        });
                let runtime = match runtime {
                    Ok(rt) => {
                        let _ = joined_tx.send(Ok(()));
                        rt
                    }
                    Err(e) => {
                        let _ = joined_tx.send(Err(e));
                        return;
                    }
                };
                let Ok((run, done)) = work_rx.blocking_recv() else {
                    return;
                };
                // A task of its own, so that a panic of host code is caught.
                let ended = runtime.block_on(async { tokio::spawn(run).await });
                let _ = done.send(ended.map_err(kuasar_core::error::panic_message));
            })
            .map_err(|e| Error::Internal(format!("starting an instance thread: {e}")))?;
        match joined.await {
            Ok(Ok(())) => Ok(NetThread { work }),
            Ok(Err(e)) => Err(Error::Internal(e)),
            Err(_) => Err(Error::Internal("the instance thread ended at once".into())),
        }
    }

    /// Runs `run` in a task of its own on the thread (a panic of host code
    /// ends that task and comes back as its message); resolves when it ends.
    pub fn isolated(
        self,
        run: impl Future<Output = T> + Send + 'static,
    ) -> impl Future<Output = Ended<T>> {
        let (done_tx, done) = oneshot::channel();
        // The thread waits for this; should it be gone, `done` says so.
        let _ = self.work.send((Box::pin(run), done_tx));
        async move {
            done.await
                .unwrap_or_else(|_| Err("the instance thread ended".into()))
        }
    }
}
