//! The descriptor store: the daemon parks its listening sockets and
//! containerd's accepted task connections (with their journals) in the
//! holder, the small process that started it, so that they outlive a crash
//! of the daemon. A restarted daemon inherits them and serves on; containerd
//! sees no connection drop. The holder speaks systemd's notification
//! protocol (`FDSTORE=1`, `FDNAME=`, `FDSTOREREMOVE=1`, `READY=1`,
//! `WATCHDOG=1`) over a `SOCK_SEQPACKET` pair and forwards it to systemd
//! where one runs; it reports the exits of the daemon's orphaned children
//! back as `EXIT=<pid> <status>`.

use std::collections::HashMap;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

/// The holder's end of the pair, in the daemon.
pub const HOLDER_FD_ENV: &str = "KUASAR_HOLDER_FD";
/// How many descriptors the holder passed, from fd 3 on.
pub const FDS_ENV: &str = "KUASAR_FDS";
/// Their names, `:`-separated, one per descriptor (as systemd's
/// `LISTEN_FDNAMES`).
pub const FDNAMES_ENV: &str = "KUASAR_FDNAMES";
pub const FDS_START: RawFd = 3;
/// Most descriptors one message carries (the kernel's SCM_MAX_FD).
pub const MAX_FDS_PER_MESSAGE: usize = 253;
/// Longest message either side sends.
pub const MAX_MESSAGE: usize = 4096;

/// One notification: `KEY=VALUE` lines.
pub fn encode(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in fields {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(b'\n');
    }
    out
}

/// The fields of a notification; lines without `=` are ignored, as systemd
/// does.
pub fn decode(msg: &[u8]) -> Vec<(String, String)> {
    String::from_utf8_lossy(msg)
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect()
}

/// A descriptor name the store accepts: what systemd accepts for
/// `FDNAME=` (printable ASCII, no `:`, at most 255 bytes).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 255 && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
}

/// Sends one message with `fds` attached.
pub fn send(sock: RawFd, msg: &[u8], fds: &[RawFd]) -> nix::Result<()> {
    let iov = [IoSlice::new(msg)];
    let cmsgs = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsgs };
    sendmsg::<()>(sock, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None).map(|_| ())
}

/// Receives one message and the descriptors attached to it (close on
/// exec). `Ok(None)`: the peer is gone.
pub fn recv(sock: RawFd) -> nix::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS_PER_MESSAGE]);
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(sock, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs() {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: the kernel just installed these descriptors for us.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    let n = msg.bytes;
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    buf.truncate(n);
    Ok(Some((buf, fds)))
}

/// Descriptors a predecessor parked, as the holder passed them at start.
#[derive(Default, Debug)]
pub struct Inherited {
    by_name: HashMap<String, Vec<OwnedFd>>,
}

impl Inherited {
    /// Takes the descriptors passed under `name`.
    pub fn take(&mut self, name: &str) -> Option<Vec<OwnedFd>> {
        self.by_name.remove(name)
    }

    /// Names passed that start with `prefix`.
    pub fn names(&self, prefix: &str) -> Vec<String> {
        let mut names: Vec<String> = self
            .by_name
            .keys()
            .filter(|n| n.starts_with(prefix))
            .cloned()
            .collect();
        names.sort();
        names
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// What nobody took: closed, and said.
    pub fn drop_rest(&mut self) {
        for (name, fds) in self.by_name.drain() {
            tracing::warn!(name, count = fds.len(), "inherited descriptor not used");
        }
    }
}

/// The daemon's side of the store. Without a holder every call is a no-op:
/// the daemon then runs as before, and a crash drops containerd's
/// connections.
#[derive(Default)]
pub struct FdStore {
    sock: Option<OwnedFd>,
    /// Serialises sends, so that a store and its remove stay in order.
    send_lock: Mutex<()>,
    gone: AtomicBool,
}

impl FdStore {
    /// A daemon with no holder.
    pub fn none() -> FdStore {
        FdStore::default()
    }

    /// Reads what the holder passed and takes the variables out of the
    /// environment (children must not see them). Call before any thread
    /// exists.
    pub fn from_env() -> (FdStore, Inherited) {
        let holder = std::env::var(HOLDER_FD_ENV)
            .ok()
            .and_then(|v| v.parse::<RawFd>().ok());
        let count = std::env::var(FDS_ENV)
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0);
        let names = std::env::var(FDNAMES_ENV).unwrap_or_default();
        for var in [HOLDER_FD_ENV, FDS_ENV, FDNAMES_ENV] {
            std::env::remove_var(var);
        }
        let mut inherited = Inherited::default();
        let names: Vec<&str> = names.split(':').collect();
        for i in 0..count {
            let fd = FDS_START + i as RawFd;
            if !is_open(fd) {
                continue;
            }
            let _ = set_cloexec(fd);
            // SAFETY: the holder passed this descriptor for this process
            // alone, and it is taken exactly once here.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            let name = names.get(i).copied().unwrap_or("unknown").to_string();
            inherited.by_name.entry(name).or_default().push(owned);
        }
        let sock = holder.filter(|&fd| is_open(fd)).map(|fd| {
            let _ = set_cloexec(fd);
            // SAFETY: as above: passed for us, taken once.
            unsafe { OwnedFd::from_raw_fd(fd) }
        });
        (
            FdStore {
                sock,
                ..Default::default()
            },
            inherited,
        )
    }

    /// The store over an already open holder socket (a live upgrade hands
    /// it over).
    pub fn from_fd(fd: OwnedFd) -> FdStore {
        FdStore {
            sock: Some(fd),
            ..Default::default()
        }
    }

    /// Whether a holder keeps what the daemon parks.
    pub fn held(&self) -> bool {
        self.sock.is_some() && !self.gone.load(Ordering::Relaxed)
    }

    /// The holder socket, for a live upgrade to pass on.
    pub fn raw_fd(&self) -> Option<RawFd> {
        self.sock.as_ref().map(|s| s.as_raw_fd())
    }

    fn send(&self, msg: &[u8], fds: &[RawFd]) {
        let Some(sock) = &self.sock else { return };
        let _l = self.send_lock.lock().unwrap();
        if let Err(e) = send(sock.as_raw_fd(), msg, fds) {
            if !self.gone.swap(true, Ordering::Relaxed) {
                tracing::error!("the holder is gone ({e}): a crash of this daemon now drops containerd's connections");
            }
        }
    }

    /// Parks `fds` under `name` (replacing what was parked under it).
    pub fn store(&self, name: &str, fds: &[BorrowedFd<'_>]) {
        debug_assert!(valid_name(name), "{name}");
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        self.send(&encode(&[("FDSTORE", "1"), ("FDNAME", name)]), &raw);
    }

    /// Closes what is parked under `name`.
    pub fn remove(&self, name: &str) {
        self.send(&encode(&[("FDSTOREREMOVE", "1"), ("FDNAME", name)]), &[]);
    }

    /// `READY=1`, `WATCHDOG=1`, `STOPPING=1`.
    pub fn notify(&self, field: &str) {
        self.send(&encode(&[(field, "1")]), &[]);
    }

    /// Feeds the exits the holder reports (the daemon's orphaned children,
    /// reaped by the holder after a crash) to `deliver`, on a thread of its
    /// own, until the holder goes away.
    pub fn watch_exits(&self, deliver: impl Fn(i32, u32) + Send + 'static) {
        let Some(sock) = &self.sock else { return };
        let sock = match sock.try_clone() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("watching the holder: {e}");
                return;
            }
        };
        let spawned = std::thread::Builder::new()
            .name("holder-exits".into())
            .spawn(move || loop {
                match recv(sock.as_raw_fd()) {
                    Ok(Some((msg, _fds))) => {
                        for (k, v) in decode(&msg) {
                            if k != "EXIT" {
                                continue;
                            }
                            let mut parts = v.split(' ');
                            let pid = parts.next().and_then(|p| p.parse().ok());
                            let status = parts.next().and_then(|p| p.parse().ok());
                            if let (Some(pid), Some(status)) = (pid, status) {
                                deliver(pid, status);
                            }
                        }
                    }
                    Ok(None) => return,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => {
                        tracing::warn!("reading from the holder: {e}");
                        return;
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!("watching the holder: {e}");
        }
    }
}

fn is_open(fd: RawFd) -> bool {
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_ok()
}

fn set_cloexec(fd: RawFd) -> nix::Result<()> {
    nix::fcntl::fcntl(
        fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

    #[test]
    fn notifications_round_trip_and_tolerate_junk() {
        let msg = encode(&[("FDSTORE", "1"), ("FDNAME", "c/7/default/pod")]);
        assert_eq!(msg, b"FDSTORE=1\nFDNAME=c/7/default/pod\n");
        let mut fields = decode(&msg);
        fields.push(("x".into(), "y".into()));
        assert_eq!(fields[1], ("FDNAME".into(), "c/7/default/pod".into()));
        assert!(decode(b"no equals sign\n\xff\xfe=1").len() == 1);
    }

    #[test]
    fn names_follow_systemd_rules() {
        assert!(valid_name("l/k8s.io/pod-1"));
        assert!(!valid_name(""));
        assert!(!valid_name("a:b"));
        assert!(!valid_name("a b"));
        assert!(!valid_name(&"x".repeat(256)));
    }

    #[test]
    fn descriptors_travel_with_their_message() {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        // SAFETY: both ends were just made and are owned here alone.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(a), OwnedFd::from_raw_fd(b)) };
        let (r, w) = nix::unistd::pipe().unwrap();
        send(a.as_raw_fd(), b"FDSTORE=1\nFDNAME=p\n", &[r, w]).unwrap();
        let (msg, fds) = recv(b.as_raw_fd()).unwrap().unwrap();
        assert_eq!(decode(&msg)[1].1, "p");
        assert_eq!(fds.len(), 2);
        nix::unistd::write(fds[1].as_raw_fd(), b"ok").unwrap();
        let mut buf = [0u8; 2];
        nix::unistd::read(r, &mut buf).unwrap();
        assert_eq!(&buf, b"ok");
        drop(a);
        assert!(recv(b.as_raw_fd()).unwrap().is_none());
        let _ = nix::unistd::close(r);
        let _ = nix::unistd::close(w);
    }
}
