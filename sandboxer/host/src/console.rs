//! runc's console socket: runc connects and passes the terminal master.

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use tokio::net::UnixListener;

use crate::error::{io_context, sys_context, Error, Result};

static NEXT: AtomicU64 = AtomicU64::new(0);

pub struct ConsoleSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ConsoleSocket {
    pub fn bind(dir: &Path) -> Result<ConsoleSocket> {
        std::fs::create_dir_all(dir).map_err(io_context(format!("creating {}", dir.display())))?;
        let path = dir.join(format!(
            "{}-{}.sock",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&path);
        let listener =
            UnixListener::bind(&path).map_err(io_context(format!("binding {}", path.display())))?;
        Ok(ConsoleSocket { listener, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for runc to pass the terminal master.
    pub async fn receive(self) -> Result<OwnedFd> {
        let (stream, _) = self
            .listener
            .accept()
            .await
            .map_err(io_context("accepting runc's console connection"))?;
        let stream = stream
            .into_std()
            .map_err(io_context("console connection"))?;
        stream
            .set_nonblocking(false)
            .map_err(io_context("console connection"))?;
        tokio::task::spawn_blocking(move || -> Result<OwnedFd> {
            use std::os::fd::AsRawFd;
            let mut buf = [0u8; 4096];
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
            let msg = recvmsg::<()>(
                stream.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(sys_context("receiving the terminal from runc"))?;
            for c in msg.cmsgs() {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    if let Some(fd) = fds.first() {
                        // SAFETY: the kernel installed this descriptor for us.
                        return Ok(unsafe { OwnedFd::from_raw_fd(*fd) });
                    }
                }
            }
            Err(Error::Internal("runc sent no terminal descriptor".into()))
        })
        .await
        .map_err(|e| Error::Internal(format!("console thread: {e}")))?
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Sets a terminal's window size.
pub fn resize(master: &OwnedFd, width: u32, height: u32) -> Result<()> {
    use std::os::fd::AsRawFd;
    let ws = libc::winsize {
        ws_row: height as u16,
        ws_col: width as u16,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from the pointer, which is valid.
    let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if rc < 0 {
        return Err(sys_context("resizing the terminal")(
            nix::errno::Errno::last(),
        ));
    }
    Ok(())
}
