//! Running a command with a deadline: a stuck ctr must fail its test, not
//! hang the suite.

use std::fmt;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

pub struct Out {
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
}

impl Out {
    pub fn ok(&self) -> bool {
        self.status == Some(0)
    }
}

impl fmt::Display for Out {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "status {:?}{}\nstdout: {}\nstderr: {}",
            self.status,
            if self.timed_out { " (timed out)" } else { "" },
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

pub fn run_cmd(cmd: &mut Command, timeout: Duration) -> Out {
    let mut child = match cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            return Out {
                status: None,
                stdout: String::new(),
                stderr: format!("spawn failed: {e}"),
                timed_out: false,
            }
        }
    };
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t1 = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = so.read_to_string(&mut s);
        s
    });
    let t2 = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = se.read_to_string(&mut s);
        s
    });
    // Wait on a thread so the exit is seen at once (timings depend on it).
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let mut timed_out = false;
    let status = match rx.recv_timeout(timeout) {
        Ok(Ok(st)) => st.code().or(st.signal_code().map(|s| 128 + s)),
        Ok(Err(_)) => None,
        Err(_) => {
            timed_out = true;
            // SAFETY: plain kill(2) of our own, not yet reaped, child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            None
        }
    };
    let _ = waiter.join();
    Out {
        status,
        stdout: t1.join().unwrap_or_default(),
        stderr: t2.join().unwrap_or_default(),
        timed_out,
    }
}

trait SignalCode {
    fn signal_code(&self) -> Option<i32>;
}

impl SignalCode for std::process::ExitStatus {
    fn signal_code(&self) -> Option<i32> {
        std::os::unix::process::ExitStatusExt::signal(self)
    }
}
