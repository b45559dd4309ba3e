//! Network namespaces for tests, made with `ip netns` as CNI plugins make a
//! pod's, and removed when dropped.

use std::io::Read;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::mpsc::Receiver;

use crate::cmd::run_cmd;

pub struct Netns {
    name: String,
}

impl Netns {
    /// `ip netns add NAME`, with its loopback up.
    pub fn add(name: &str) -> Netns {
        let ip = |args: &[&str]| {
            let o = run_cmd(
                std::process::Command::new("ip").args(args),
                std::time::Duration::from_secs(10),
            );
            assert!(o.ok(), "ip {}: {o}", args.join(" "));
        };
        // Leftovers of a run that was killed.
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", name])
            .stderr(std::process::Stdio::null())
            .status();
        ip(&["netns", "add", name]);
        let ns = Netns { name: name.into() };
        ip(&["-n", name, "link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// A TCP listener on 127.0.0.1:`port` inside the namespace, on a
    /// thread of its own: what each client sends, one message per
    /// connection.
    pub fn listen_tcp(&self, port: u16) -> Receiver<String> {
        let (bound_tx, bound) = std::sync::mpsc::channel();
        let (tx, rx) = std::sync::mpsc::channel();
        let path = self.path();
        std::thread::spawn(move || {
            let listener = std::fs::File::open(&path)
                .map_err(|e| e.to_string())
                .and_then(|ns| {
                    // SAFETY: setns only reads the descriptor, held open here.
                    match unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } {
                        0 => Ok(()),
                        _ => Err(std::io::Error::last_os_error().to_string()),
                    }
                })
                .and_then(|()| TcpListener::bind(("127.0.0.1", port)).map_err(|e| e.to_string()));
            let listener = match listener {
                Ok(l) => {
                    bound_tx.send(Ok(())).unwrap();
                    l
                }
                Err(e) => return bound_tx.send(Err(e)).unwrap(),
            };
            for conn in listener.incoming() {
                let mut text = String::new();
                if let Ok(mut c) = conn {
                    let _ = c.read_to_string(&mut text);
                }
                if tx.send(text).is_err() {
                    return;
                }
            }
        });
        bound
            .recv()
            .unwrap()
            .unwrap_or_else(|e| panic!("listening in netns {}: {e}", self.name));
        rx
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
