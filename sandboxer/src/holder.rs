//! The holder: the process `kuasar-sandboxer` starts as. It starts the
//! daemon (this binary again), keeps the descriptors the daemon parks in it
//! (listening sockets, containerd's task connections and their journals),
//! and when the daemon dies (kill -9, an OOM kill, a bug) starts it again
//! with those descriptors, so containerd's connections never see the crash.
//! It is the child subreaper above the daemon: containers orphaned by the
//! daemon's death become its children, and their exits are reported to the
//! daemon (`EXIT=<pid> <status>`), since only a parent learns an exit
//! status. It is small on purpose: no runtime, no engine, one poll loop.
//!
//! Under systemd (`Type=notify`) it forwards `READY=1`, `WATCHDOG=1` and the
//! descriptor store to systemd's, and takes systemd's stored descriptors at
//! start, so that a restart of the unit keeps them too.

use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use kuasar_core::fdstore;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags};
use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType, UnixAddr};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// No `WATCHDOG=1` from a ready daemon for this long: it is wedged, and is
/// killed and started again.
const DEFAULT_WATCHDOG: Duration = Duration::from_secs(60);
const WATCHDOG_ENV: &str = "KUASAR_WATCHDOG_SEC";
/// Restart back-off after a crash: doubled per quick crash, up to the cap.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A daemon that ran this long resets the back-off.
const STABLE: Duration = Duration::from_secs(30);
/// Exits kept for a daemon that is not there to hear them.
const MAX_QUEUED_EXITS: usize = 65536;

fn say(msg: std::fmt::Arguments<'_>) {
    eprintln!("kuasar-sandboxer holder[{}]: {msg}", std::process::id());
}

macro_rules! say {
    ($($t:tt)*) => { say(format_args!($($t)*)) };
}

/// systemd's notification socket, when one runs us.
struct Systemd {
    sock: OwnedFd,
    addr: UnixAddr,
}

impl Systemd {
    fn from_env() -> Option<Systemd> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        std::env::remove_var("NOTIFY_SOCKET");
        let path = path.to_string_lossy().into_owned();
        let addr = match path.strip_prefix('@') {
            Some(abs) => UnixAddr::new_abstract(abs.as_bytes()).ok()?,
            None => UnixAddr::new(path.as_str()).ok()?,
        };
        let sock = nix::sys::socket::socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .ok()?;
        // SAFETY: a socket we just made and own alone.
        let sock = unsafe { OwnedFd::from_raw_fd(sock) };
        Some(Systemd { sock, addr })
    }

    fn send(&self, msg: &[u8], fds: &[RawFd]) {
        let iov = [std::io::IoSlice::new(msg)];
        let rights = [nix::sys::socket::ControlMessage::ScmRights(fds)];
        let cmsgs: &[nix::sys::socket::ControlMessage] = if fds.is_empty() { &[] } else { &rights };
        if let Err(e) = nix::sys::socket::sendmsg(
            self.sock.as_raw_fd(),
            &iov,
            cmsgs,
            nix::sys::socket::MsgFlags::empty(),
            Some(&self.addr),
        ) {
            say!("notifying systemd: {e}");
        }
    }
}

/// Descriptors systemd kept for us from an earlier run of the unit.
fn systemd_fds() -> Vec<(String, OwnedFd)> {
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let count: usize = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(v);
    }
    if !ours {
        return Vec::new();
    }
    let names: Vec<&str> = names.split(':').collect();
    (0..count)
        .filter_map(|i| {
            let fd = fdstore::FDS_START + i as RawFd;
            nix::fcntl::fcntl(
                fd,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            )
            .ok()?;
            // SAFETY: systemd passed these descriptors to this process.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            Some((names.get(i).unwrap_or(&"unknown").to_string(), owned))
        })
        .collect()
}

struct Holder {
    args: Vec<OsString>,
    /// Our end of the pair, and the daemon's (passed to every incarnation).
    ours: OwnedFd,
    theirs: OwnedFd,
    store: BTreeMap<String, Vec<OwnedFd>>,
    systemd: Option<Systemd>,
    daemon: Option<Pid>,
    started_at: Instant,
    ready: bool,
    last_ping: Instant,
    watchdog: Duration,
    backoff: Duration,
    stopping: bool,
    exits: VecDeque<(i32, u32)>,
}

/// Runs the holder; returns the daemon's exit status once it stopped for
/// good (SIGTERM, or an exit of its own with status 0).
pub fn run(args: Vec<OsString>) -> ExitCode {
    match Holder::new(args).and_then(|h| h.serve()) {
        Ok(code) => code,
        Err(e) => {
            say!("{e}");
            ExitCode::FAILURE
        }
    }
}

impl Holder {
    fn new(args: Vec<OsString>) -> nix::Result<Holder> {
        // Thousands of connections may be parked here.
        if let Ok((_, hard)) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        {
            let _ = nix::sys::resource::setrlimit(
                nix::sys::resource::Resource::RLIMIT_NOFILE,
                hard,
                hard,
            );
        }
        // SAFETY: PR_SET_CHILD_SUBREAPER takes one integer argument.
        if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
            return Err(Errno::last());
        }
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        // SAFETY: both ends were just made and are owned here alone.
        let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(a), OwnedFd::from_raw_fd(b)) };
        let systemd = Systemd::from_env();
        let mut store: BTreeMap<String, Vec<OwnedFd>> = BTreeMap::new();
        for (name, fd) in systemd_fds() {
            store.entry(name).or_default().push(fd);
        }
        let watchdog = std::env::var(WATCHDOG_ENV)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .filter(|s| *s > 0)
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_WATCHDOG);
        std::env::remove_var(WATCHDOG_ENV);
        Ok(Holder {
            args,
            ours,
            theirs,
            store,
            systemd,
            daemon: None,
            started_at: Instant::now(),
            ready: false,
            last_ping: Instant::now(),
            watchdog,
            backoff: FIRST_BACKOFF,
            stopping: false,
            exits: VecDeque::new(),
        })
    }

    fn serve(mut self) -> nix::Result<ExitCode> {
        let mut mask = SigSet::empty();
        for s in [
            Signal::SIGCHLD,
            Signal::SIGTERM,
            Signal::SIGINT,
            Signal::SIGUSR2,
            Signal::SIGHUP,
        ] {
            mask.add(s);
        }
        mask.thread_block()?;
        let mut signals =
            SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)?;
        self.spawn()?;
        let mut restart_at: Option<Instant> = None;
        loop {
            let timeout = match restart_at {
                Some(at) => at.saturating_duration_since(Instant::now()),
                None => Duration::from_secs(1),
            };
            let mut fds = [
                PollFd::new(signals.as_raw_fd(), PollFlags::POLLIN),
                PollFd::new(self.ours.as_raw_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, timeout.as_millis().min(1000) as i32) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(e),
            }
            if fds[1].revents().is_some_and(|r| !r.is_empty()) {
                self.read_messages();
            }
            if fds[0].revents().is_some_and(|r| !r.is_empty()) {
                while let Ok(Some(info)) = signals.read_signal() {
                    let sig = Signal::try_from(info.ssi_signo as i32).ok();
                    match sig {
                        Some(Signal::SIGCHLD) => {
                            if let Some(code) = self.reap(&mut restart_at) {
                                return Ok(code);
                            }
                        }
                        Some(Signal::SIGTERM) | Some(Signal::SIGINT) => {
                            self.stopping = true;
                            if let Some(s) = &self.systemd {
                                s.send(b"STOPPING=1\n", &[]);
                            }
                            match self.daemon {
                                Some(pid) => {
                                    let _ = kill(pid, Signal::SIGTERM);
                                }
                                None => return Ok(ExitCode::SUCCESS),
                            }
                        }
                        // A live upgrade, or a log reopen: the daemon's.
                        Some(s @ (Signal::SIGUSR2 | Signal::SIGHUP)) => {
                            if let Some(pid) = self.daemon {
                                let _ = kill(pid, s);
                            }
                        }
                        _ => {}
                    }
                }
            }
            if let Some(at) = restart_at {
                if Instant::now() >= at && !self.stopping {
                    restart_at = None;
                    if let Err(e) = self.spawn() {
                        say!("starting the daemon again: {e}");
                        restart_at = Some(Instant::now() + MAX_BACKOFF);
                    }
                }
            }
            self.check_watchdog();
        }
    }

    /// Starts the daemon with every parked descriptor from fd 3 on.
    fn spawn(&mut self) -> nix::Result<()> {
        let parked: Vec<(String, RawFd)> = self
            .store
            .iter()
            .flat_map(|(n, fds)| fds.iter().map(move |f| (n.clone(), f.as_raw_fd())))
            .collect();
        let names: Vec<&str> = parked.iter().map(|(n, _)| n.as_str()).collect();
        let count = parked.len();
        let holder_target = fdstore::FDS_START + count as RawFd;
        let mut sources: Vec<RawFd> = parked.iter().map(|(_, f)| *f).collect();
        sources.push(self.theirs.as_raw_fd());
        let mut cmd = std::process::Command::new("/proc/self/exe");
        // Named as the holder was, for ps and for whoever looks it up.
        cmd.arg0(
            std::env::args_os()
                .next()
                .unwrap_or_else(|| "kuasar-sandboxer".into()),
        )
        .args(&self.args)
        .env(fdstore::HOLDER_FD_ENV, holder_target.to_string())
        .env(fdstore::FDS_ENV, count.to_string())
        .env(fdstore::FDNAMES_ENV, names.join(":"));
        let floor = sources
            .iter()
            .copied()
            .max()
            .unwrap_or(0)
            .max(holder_target)
            + 1;
        // SAFETY: runs in the child between fork and exec and only makes
        // async-signal-safe calls (fcntl, dup2, sigprocmask).
        unsafe {
            cmd.pre_exec(move || {
                // Out of the way first, so that no target overwrites a
                // source still to be moved.
                let mut high = Vec::with_capacity(sources.len());
                for &fd in &sources {
                    let h = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, floor);
                    if h < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    high.push(h);
                }
                for (i, &h) in high.iter().enumerate() {
                    if libc::dup2(h, fdstore::FDS_START + i as RawFd) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                let empty: libc::sigset_t = std::mem::zeroed();
                libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| {
            say!("starting the daemon: {e}");
            Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
        })?;
        let pid = Pid::from_raw(child.id() as i32);
        say!(
            "daemon started, pid {pid}, {count} parked descriptor(s) passed, {} queued exit(s)",
            self.exits.len()
        );
        self.daemon = Some(pid);
        self.started_at = Instant::now();
        self.ready = false;
        self.last_ping = Instant::now();
        self.flush_exits();
        Ok(())
    }

    fn read_messages(&mut self) {
        loop {
            match nix::sys::socket::recv(
                self.ours.as_raw_fd(),
                &mut [0u8; 0],
                nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
            ) {
                Err(Errno::EAGAIN) => return,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    say!("reading from the daemon: {e}");
                    return;
                }
                Ok(_) => {}
            }
            match fdstore::recv(self.ours.as_raw_fd()) {
                Ok(Some((msg, fds))) => self.handle(&msg, fds),
                Ok(None) => return,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    say!("reading from the daemon: {e}");
                    return;
                }
            }
        }
    }

    fn handle(&mut self, msg: &[u8], fds: Vec<OwnedFd>) {
        let fields = fdstore::decode(msg);
        let get = |k: &str| {
            fields
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        let name = get("FDNAME").filter(|n| fdstore::valid_name(n));
        if get("FDSTORE") == Some("1") {
            let Some(name) = name else {
                say!("descriptor without a valid name dropped");
                return;
            };
            if let Some(s) = &self.systemd {
                let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
                s.send(msg, &raw);
            }
            self.store.insert(name.to_string(), fds);
        } else if get("FDSTOREREMOVE") == Some("1") {
            if let Some(name) = name {
                self.store.remove(name);
                if let Some(s) = &self.systemd {
                    s.send(msg, &[]);
                }
            }
        }
        if get("READY") == Some("1") {
            if !self.ready {
                say!(
                    "daemon ready after {} ms, {} descriptor(s) parked",
                    self.started_at.elapsed().as_millis(),
                    self.store.values().map(Vec::len).sum::<usize>()
                );
            }
            self.ready = true;
            self.last_ping = Instant::now();
            if let Some(s) = &self.systemd {
                s.send(b"READY=1\n", &[]);
            }
        }
        if get("WATCHDOG") == Some("1") {
            self.last_ping = Instant::now();
            if let Some(s) = &self.systemd {
                s.send(b"WATCHDOG=1\n", &[]);
            }
        }
    }

    /// Collects exits; returns the holder's own exit code when it is time
    /// to stop.
    fn reap(&mut self, restart_at: &mut Option<Instant>) -> Option<ExitCode> {
        loop {
            let (pid, code) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, code as u32),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, 128 + sig as u32),
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return None,
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(e) => {
                    say!("waitpid: {e}");
                    return None;
                }
            };
            if Some(pid) != self.daemon {
                // An orphan of a dead daemon: its exit is the next daemon's.
                if self.exits.len() >= MAX_QUEUED_EXITS {
                    self.exits.pop_front();
                }
                self.exits.push_back((pid.as_raw(), code));
                self.flush_exits();
                continue;
            }
            self.daemon = None;
            if self.stopping || code == 0 {
                say!("daemon stopped with status {code}");
                return Some(ExitCode::from(code.min(255) as u8));
            }
            let ran = self.started_at.elapsed();
            if ran >= STABLE {
                self.backoff = FIRST_BACKOFF;
            }
            say!(
                "daemon died with status {code} after {} ms; starting it again in {} ms with {} parked descriptor(s)",
                ran.as_millis(),
                self.backoff.as_millis(),
                self.store.values().map(Vec::len).sum::<usize>()
            );
            *restart_at = Some(Instant::now() + self.backoff);
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Sends queued exits; what the socket cannot take now stays queued.
    fn flush_exits(&mut self) {
        while let Some(&(pid, code)) = self.exits.front() {
            let msg = fdstore::encode(&[("EXIT", &format!("{pid} {code}"))]);
            let sent = nix::sys::socket::send(
                self.ours.as_raw_fd(),
                &msg,
                nix::sys::socket::MsgFlags::MSG_DONTWAIT | nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
            );
            match sent {
                Ok(_) => {
                    self.exits.pop_front();
                }
                Err(_) => return,
            }
        }
    }

    fn check_watchdog(&mut self) {
        let Some(pid) = self.daemon else { return };
        if self.ready && !self.stopping && self.last_ping.elapsed() > self.watchdog {
            say!(
                "daemon {pid} sent no watchdog ping for {} s: killing it",
                self.last_ping.elapsed().as_secs()
            );
            let _ = kill(pid, Signal::SIGKILL);
            self.ready = false;
        }
        if !self.exits.is_empty() {
            self.flush_exits();
        }
    }
}

/// Unblocks what the holder blocked (for a daemon started without one).
pub fn unblock_signals() {
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
}
