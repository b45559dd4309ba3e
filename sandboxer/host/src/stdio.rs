//! A process's stdio as containerd describes it: FIFO paths (or none),
//! `file://` and `binary://` URIs, or a terminal. Written once for every
//! backend. Outputs are handed to the process directly wherever no copy is
//! needed; stdin and terminals are copied by tasks owned by [`IoTasks`].

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::task::JoinHandle;

use crate::error::{io_context, sys_context, Error, Result};
use crate::reaper::Reaper;
use crate::spawn;

/// The stdio fields of a Create or Exec request.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

impl StdioPaths {
    /// The files these fields make the daemon open or run: the stdin and
    /// output FIFOs, a `file://` log or a `binary://` log driver (the
    /// scheme of stdout decides for both outputs), for the caller to vet
    /// before anything is opened. An unknown scheme is refused.
    pub fn paths(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        if !self.stdin.is_empty() {
            out.push(self.stdin.clone());
        }
        match parse_sink(&self.stdout)? {
            Sink::Fifo => out.extend(
                [&self.stdout, &self.stderr]
                    .into_iter()
                    .filter(|p| !p.is_empty())
                    .cloned(),
            ),
            Sink::File(path) => out.push(path.to_string_lossy().into_owned()),
            Sink::Binary { path, .. } => out.push(path),
        }
        Ok(out)
    }
}

/// Where output goes; the scheme of the stdout URI decides for both streams.
#[derive(Debug, PartialEq, Eq)]
enum Sink {
    Fifo,
    File(PathBuf),
    Binary { path: String, args: Vec<String> },
}

fn parse_sink(stdout: &str) -> Result<Sink> {
    let Some((scheme, rest)) = stdout.split_once("://") else {
        return Ok(Sink::Fifo);
    };
    match scheme {
        "fifo" => Ok(Sink::Fifo),
        "file" => Ok(Sink::File(PathBuf::from(rest))),
        "binary" => {
            let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
            let mut args = Vec::new();
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                args.push(percent_decode(k));
                if !v.is_empty() {
                    args.push(percent_decode(v));
                }
            }
            Ok(Sink::Binary {
                path: percent_decode(path),
                args,
            })
        }
        other => Err(Error::InvalidArgument(format!(
            "unknown STDIO scheme {other}"
        ))),
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The descriptors a process gets for stdout and stderr, and the log driver
/// behind them, if any.
pub struct Outputs {
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    pub logger: Option<Logger>,
}

fn open_null(write: bool) -> Result<OwnedFd> {
    let f = OpenOptions::new()
        .read(!write)
        .write(write)
        .open("/dev/null")
        .map_err(io_context("opening /dev/null"))?;
    Ok(f.into())
}

/// Opens a FIFO for writing without waiting for a reader: read-write, as
/// containerd-shim-runc-v2 does, which also survives containerd restarts.
fn open_fifo_output(path: &str) -> Result<OwnedFd> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(io_context(format!("opening {path}")))?;
    Ok(f.into())
}

fn dup(fd: &OwnedFd) -> Result<OwnedFd> {
    fd.try_clone()
        .map_err(io_context("duplicating a descriptor"))
}

/// Opens (or starts) whatever receives the process's output.
pub async fn open_outputs(
    paths: &StdioPaths,
    namespace: &str,
    id: &str,
    reaper: &Arc<Reaper>,
) -> Result<Outputs> {
    match parse_sink(&paths.stdout)? {
        Sink::Fifo => {
            let open = |p: &str| {
                if p.is_empty() {
                    open_null(true)
                } else {
                    open_fifo_output(p)
                }
            };
            Ok(Outputs {
                stdout: open(&paths.stdout)?,
                stderr: open(&paths.stderr)?,
                logger: None,
            })
        }
        Sink::File(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(io_context(format!("creating {}", dir.display())))?;
            }
            let f: OwnedFd = OpenOptions::new()
                .append(true)
                .create(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(&path)
                .map_err(io_context(format!("opening {}", path.display())))?
                .into();
            Ok(Outputs {
                stderr: dup(&f)?,
                stdout: f,
                logger: None,
            })
        }
        Sink::Binary { path, args } => {
            let (out_r, out_w) = pipe()?;
            let (err_r, err_w) = pipe()?;
            let (ready_r, ready_w) = pipe()?;
            let env = [
                ("CONTAINER_ID".to_string(), id.to_string()),
                ("CONTAINER_NAMESPACE".to_string(), namespace.to_string()),
            ];
            let (out_r, err_r, ready_w) = (
                spawn::raise_fd(out_r)?,
                spawn::raise_fd(err_r)?,
                spawn::raise_fd(ready_w)?,
            );
            let pid = spawn::spawn_with_fds(
                &path,
                &args,
                &env,
                &[
                    (out_r.as_raw_fd(), 3),
                    (err_r.as_raw_fd(), 4),
                    (ready_w.as_raw_fd(), 5),
                ],
            )?;
            let logger = Logger {
                pid,
                reaper: reaper.clone(),
            };
            drop((out_r, err_r, ready_w));
            // The driver signals readiness by writing a byte or closing fd 5.
            let wait = tokio::task::spawn_blocking(move || {
                let mut b = [0u8; 1];
                nix::unistd::read(ready_r.as_raw_fd(), &mut b)
            });
            match tokio::time::timeout(Duration::from_secs(10), wait).await {
                Ok(Ok(Ok(_))) => {}
                _ => {
                    logger.stop();
                    return Err(Error::Unavailable(format!(
                        "log driver {path} did not become ready"
                    )));
                }
            }
            Ok(Outputs {
                stdout: out_w,
                stderr: err_w,
                logger: Some(logger),
            })
        }
    }
}

/// A `binary://` log driver. Stopped like containerd-shim-runc-v2 does:
/// SIGTERM, then SIGKILL after 12 s.
pub struct Logger {
    pid: i32,
    reaper: Arc<Reaper>,
}

impl Logger {
    /// A driver a predecessor started (live upgrade).
    pub fn adopt(pid: i32, reaper: Arc<Reaper>) -> Logger {
        Logger { pid, reaper }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn stop(self) {
        let pid = nix::unistd::Pid::from_raw(self.pid);
        let exited = self.reaper.subscribe(self.pid);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        tokio::spawn(async move {
            if tokio::time::timeout(Duration::from_secs(12), exited)
                .await
                .is_err()
            {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            }
        });
    }
}

pub fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(sys_context("creating a pipe"))?;
    // SAFETY: pipe2 returned two fresh descriptors we now own.
    Ok(unsafe { (OwnedFd::from_raw_fd(r), OwnedFd::from_raw_fd(w)) })
}

/// Copy tasks of one process; aborted when dropped.
/// A duplicate of a descriptor a copy task uses, kept for a live upgrade to
/// hand over. Emptied when the copy ends (or is aborted), so that no extra
/// descriptor keeps a pipe or FIFO open past it (the reader must see EOF).
type FdSlot = Arc<std::sync::Mutex<Option<OwnedFd>>>;

fn slot(fd: Option<&OwnedFd>) -> Result<FdSlot> {
    Ok(Arc::new(std::sync::Mutex::new(fd.map(dup).transpose()?)))
}

/// Empties its slots when dropped, with the copy future that owns it.
struct SlotGuard(Vec<FdSlot>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        for s in &self.0 {
            s.lock().unwrap().take();
        }
    }
}

fn dup_slot(s: &FdSlot) -> Option<OwnedFd> {
    s.lock()
        .unwrap()
        .as_ref()
        .and_then(|fd| fd.try_clone().ok())
}

/// Duplicates of what a process's copies use, for a live upgrade.
#[derive(Default, Debug)]
pub struct IoFds {
    /// The stdin FIFO, once opened for reading.
    pub stdin_from: Option<OwnedFd>,
    /// Where stdin goes (a pipe, or the terminal); `None` once stdin ended.
    pub stdin_to: Option<OwnedFd>,
    /// Where the terminal's output goes; `None` without a terminal copy.
    pub output_to: Option<OwnedFd>,
    /// Ends (its sender is dropped) when the stdin copy ends.
    pub stdin_end: Option<tokio::sync::watch::Receiver<()>>,
}

#[derive(Default)]
pub struct IoTasks {
    stdin: Option<(JoinHandle<()>, Option<FifoHandle>)>,
    /// (from, to) of the stdin copy.
    stdin_fds: Option<(FdSlot, FdSlot)>,
    /// See [`IoFds::stdin_end`].
    stdin_end: Option<tokio::sync::watch::Receiver<()>>,
    outputs: Vec<JoinHandle<()>>,
    /// `to` of each output copy.
    output_fds: Vec<FdSlot>,
    pub logger: Option<Logger>,
}

impl IoTasks {
    /// Copies the stdin FIFO at `path` into `to` until the client closes it.
    pub fn copy_stdin(&mut self, path: &str, to: OwnedFd) -> Result<()> {
        let fifo = FifoHandle::open(Path::new(path))?;
        let (from_slot, to_slot) = (slot(None)?, slot(Some(&to))?);
        let (end_tx, end_rx) = tokio::sync::watch::channel(());
        self.stdin_end = Some(end_rx);
        let task = tokio::spawn({
            let reopen = fifo.proc_path();
            let guard = SlotGuard(vec![from_slot.clone(), to_slot.clone()]);
            async move {
                // Moved in whole: dropping the future drops it.
                let guard = guard;
                let _end = end_tx;
                // Opening for reading waits for the client's writer.
                let opened = tokio::task::spawn_blocking(move || {
                    OpenOptions::new()
                        .read(true)
                        .custom_flags(libc::O_CLOEXEC)
                        .open(&reopen)
                })
                .await;
                let Ok(Ok(from)) = opened else { return };
                let from = OwnedFd::from(from);
                *guard.0[0].lock().unwrap() = from.try_clone().ok();
                let (Ok(mut from), Ok(mut to)) = (FdStream::new(from), writer(to)) else {
                    return;
                };
                let _ = tokio::io::copy(&mut from, &mut to).await;
            }
        });
        self.stdin = Some((task, Some(fifo)));
        self.stdin_fds = Some((from_slot, to_slot));
        Ok(())
    }

    /// Copies an already opened stdin into `to` (taken over in a live
    /// upgrade).
    pub fn adopt_stdin(&mut self, from: OwnedFd, to: OwnedFd) -> Result<()> {
        let (from_slot, to_slot) = (slot(Some(&from))?, slot(Some(&to))?);
        let guard = SlotGuard(vec![from_slot.clone(), to_slot.clone()]);
        let mut from = FdStream::new(from).map_err(io_context("watching stdin"))?;
        let mut to = writer(to).map_err(io_context("watching the process's stdin"))?;
        let (end_tx, end_rx) = tokio::sync::watch::channel(());
        self.stdin_end = Some(end_rx);
        let task = tokio::spawn(async move {
            let _guard = guard;
            let _end = end_tx;
            let _ = tokio::io::copy(&mut from, &mut to).await;
        });
        self.stdin = Some((task, None));
        self.stdin_fds = Some((from_slot, to_slot));
        Ok(())
    }

    /// Copies `from` (a terminal) into `to` until the terminal closes.
    pub fn copy_output(&mut self, from: OwnedFd, to: OwnedFd) -> Result<()> {
        let to_slot = slot(Some(&to))?;
        let guard = SlotGuard(vec![to_slot.clone()]);
        let mut from = FdStream::new(from).map_err(io_context("watching the terminal"))?;
        let mut to = writer(to).map_err(io_context("watching the output"))?;
        self.outputs.push(tokio::spawn(async move {
            let _guard = guard;
            let _ = tokio::io::copy(&mut from, &mut to).await;
        }));
        self.output_fds.push(to_slot);
        Ok(())
    }

    /// Duplicates of the descriptors of the copies still running.
    pub fn handover(&self) -> IoFds {
        IoFds {
            stdin_from: self.stdin_fds.as_ref().and_then(|(f, _)| dup_slot(f)),
            stdin_to: self.stdin_fds.as_ref().and_then(|(_, t)| dup_slot(t)),
            output_to: self.output_fds.iter().find_map(dup_slot),
            stdin_end: self.stdin_end.clone(),
        }
    }

    /// Ends stdin (CloseIO): the process reads EOF once what was written has
    /// been passed on.
    pub async fn close_stdin(&mut self) {
        if let Some((task, fifo)) = self.stdin.take() {
            if let Some(fifo) = fifo {
                fifo.release_opener();
            }
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_millis(200), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }

    /// Waits briefly for terminal output to drain (after the process ended).
    pub async fn drain(&mut self) {
        for t in self.outputs.drain(..) {
            let abort = t.abort_handle();
            if tokio::time::timeout(Duration::from_secs(2), t)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }
}

impl Drop for IoTasks {
    fn drop(&mut self) {
        if let Some((task, fifo)) = self.stdin.take() {
            if let Some(fifo) = fifo {
                fifo.release_opener();
            }
            task.abort();
        }
        for t in self.outputs.drain(..) {
            t.abort();
        }
        if let Some(l) = self.logger.take() {
            l.stop();
        }
    }
}

/// An `O_PATH` handle on a client's FIFO. Opening through
/// `/proc/self/fd/N` works even after the client removed the FIFO, so a
/// blocked opener can always be released.
struct FifoHandle(OwnedFd);

impl FifoHandle {
    fn open(path: &Path) -> Result<FifoHandle> {
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
            .open(path)
            .map_err(io_context(format!("opening {}", path.display())))?;
        Ok(FifoHandle(f.into()))
    }

    fn proc_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.0.as_raw_fd()))
    }

    /// A blocked open for reading returns once a writer appears; opening
    /// one ourselves releases a copy task whose client never came.
    fn release_opener(&self) {
        let _ = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(self.proc_path());
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(io::Error::from)?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(fd, FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
    Ok(())
}

/// A writer for any descriptor: pollable ones (pipes, FIFOs, terminals)
/// through the reactor, the rest (regular files, /dev/null) through tokio's
/// file.
pub fn writer(fd: OwnedFd) -> io::Result<Pin<Box<dyn AsyncWrite + Send + Sync>>> {
    let raw = fd.as_raw_fd();
    let stat = nix::sys::stat::fstat(raw).map_err(io::Error::from)?;
    if stat.st_mode & libc::S_IFMT == libc::S_IFREG {
        return Ok(Box::pin(tokio::fs::File::from_std(std::fs::File::from(fd))));
    }
    let fallback = fd.try_clone()?;
    match FdStream::new(fd) {
        Ok(s) => Ok(Box::pin(s)),
        // epoll refuses what cannot block, such as /dev/null.
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Ok(Box::pin(tokio::fs::File::from_std(
            std::fs::File::from(fallback),
        ))),
        Err(e) => Err(e),
    }
}

/// Non-blocking reads and writes on a pollable descriptor. A terminal
/// master reports EIO once its last slave closes: that is EOF.
pub struct FdStream {
    fd: AsyncFd<OwnedFd>,
}

impl FdStream {
    pub fn new(fd: OwnedFd) -> io::Result<FdStream> {
        set_nonblocking(fd.as_raw_fd())?;
        // SAFETY: the OwnedFd moves into the AsyncFd and stays open, and
        // the same descriptor, until the AsyncFd is dropped.
        let fd = unsafe { AsyncFd::register(fd) }?;
        Ok(FdStream { fd })
    }
}

impl AsyncRead for FdStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| {
                nix::unistd::read(fd.get_ref().as_raw_fd(), unfilled).map_err(io::Error::from)
            }) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Poll::Ready(Ok(())),
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for FdStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|fd| {
                nix::unistd::write(fd.get_ref().as_raw_fd(), data).map_err(io::Error::from)
            }) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdout_scheme_picks_the_sink() {
        assert_eq!(parse_sink("/run/fifo/x-stdout").unwrap(), Sink::Fifo);
        assert_eq!(parse_sink("").unwrap(), Sink::Fifo);
        assert_eq!(parse_sink("fifo:///a").unwrap(), Sink::Fifo);
        assert_eq!(
            parse_sink("file:///var/log/x.log").unwrap(),
            Sink::File("/var/log/x.log".into())
        );
        assert_eq!(
            parse_sink("binary:///usr/bin/logger?id=a%20b&flag").unwrap(),
            Sink::Binary {
                path: "/usr/bin/logger".into(),
                args: vec!["id".into(), "a b".into(), "flag".into()]
            }
        );
        assert!(parse_sink("ftp://x")
            .unwrap_err()
            .to_string()
            .contains("unknown STDIO scheme"));
    }

    #[test]
    fn paths_are_what_would_be_opened_or_run() {
        let mut p = StdioPaths {
            stdin: "/f/in".into(),
            stdout: "/f/out".into(),
            stderr: "/f/err".into(),
            terminal: false,
        };
        assert_eq!(p.paths().unwrap(), ["/f/in", "/f/out", "/f/err"]);
        p.stdout = "file:///var/log/x.log".into();
        assert_eq!(p.paths().unwrap(), ["/f/in", "/var/log/x.log"]);
        p.stdout = "binary:///usr/bin/log%67er?x=1".into();
        assert_eq!(p.paths().unwrap(), ["/f/in", "/usr/bin/logger"]);
        p.stdin.clear();
        p.stdout.clear();
        assert_eq!(p.paths().unwrap(), ["/f/err"]);
        p.stdout = "s3://bucket".into();
        assert!(p.paths().is_err());
    }
}
