//! The bodies of the `cargo fuzz` targets in `fuzz_targets/`, one module
//! each, and what they share: a peer that sends the input in the chunks its
//! first byte picks, and a daemon over the fake backend in a scratch
//! directory. Each body panics on a broken rule; libFuzzer reports the
//! panic. The unit tests below replay the seed corpus through every body,
//! so a plain `cargo test` checks the targets too.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use kuasar_core::backend::fake::FakeBackend;
use kuasar_core::config::{Config, ContainerdConfig};
use kuasar_core::daemon::Daemon;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub mod agent_frame;
pub mod seeds;
pub mod task_api;
pub mod ttrpc_frame;
pub mod wire_decode;

/// The chunk plan (the first byte) and the bytes a peer sends (the rest).
pub fn split(data: &[u8]) -> (u8, &[u8]) {
    match data.split_first() {
        Some((plan, rest)) => (*plan, rest),
        None => (0, &[]),
    }
}

/// `bytes` cut into chunks of 1 to `plan` bytes (pseudo-random, fixed by
/// `plan`), or whole when `plan` is 0: how a socket may deliver them.
pub struct Chunks<'a> {
    rest: &'a [u8],
    max: usize,
    state: u32,
}

impl<'a> Chunks<'a> {
    pub fn new(plan: u8, bytes: &'a [u8]) -> Chunks<'a> {
        Chunks {
            rest: bytes,
            max: plan as usize,
            state: u32::from(plan),
        }
    }
}

impl<'a> Iterator for Chunks<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.rest.is_empty() {
            return None;
        }
        let n = if self.max == 0 {
            self.rest.len()
        } else {
            self.state = self.state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            1 + (self.state >> 16) as usize % self.max
        };
        let (chunk, rest) = self.rest.split_at(n.min(self.rest.len()));
        self.rest = rest;
        Some(chunk)
    }
}

/// A peer that sends its bytes chunk by chunk, with a pending read between
/// two chunks, then closes; what it is sent is kept in `written`.
pub struct Peer<'a> {
    chunks: Chunks<'a>,
    current: &'a [u8],
    stalled: bool,
    pub written: Vec<u8>,
}

impl<'a> Peer<'a> {
    pub fn new(plan: u8, bytes: &'a [u8]) -> Peer<'a> {
        Peer {
            chunks: Chunks::new(plan, bytes),
            current: &[],
            stalled: true,
            written: Vec::new(),
        }
    }
}

impl AsyncRead for Peer<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.current.is_empty() {
            if !this.stalled {
                // Nothing there yet: the reader must come back when woken.
                this.stalled = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            match this.chunks.next() {
                Some(chunk) => {
                    this.current = chunk;
                    this.stalled = false;
                }
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = this.current.len().min(buf.remaining());
        buf.put_slice(&this.current[..n]);
        this.current = &this.current[n..];
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Peer<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.written.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A runtime for one input.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building a runtime")
}

/// A daemon over the fake backend, rooted in a fresh directory (on tmpfs
/// when there is one: the daemon syncs its state files). Events go nowhere.
pub fn daemon() -> (tempfile::TempDir, Arc<Daemon>) {
    let shm = std::path::Path::new("/dev/shm");
    let dir = shm
        .is_dir()
        .then(|| {
            tempfile::Builder::new()
                .prefix("kuasar-fuzz")
                .tempdir_in(shm)
                .ok()
        })
        .flatten()
        .unwrap_or_else(|| tempfile::tempdir().expect("making a scratch directory"));
    let config = Config {
        root: dir.path().join("k"),
        containerd: ContainerdConfig {
            address: String::new(),
            ttrpc_address: String::new(),
        },
        ..Config::default()
    };
    let daemon = Daemon::new(
        config,
        kuasar_host::reaper::Reaper::new(),
        vec![Arc::new(FakeBackend)],
    )
    .expect("starting a daemon");
    (dir, daemon)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_bytes_in_order_within_the_plan() {
        let bytes: Vec<u8> = (0..=255).collect();
        for plan in [0u8, 1, 7, 255] {
            let chunks: Vec<&[u8]> = Chunks::new(plan, &bytes).collect();
            assert_eq!(chunks.concat(), bytes);
            if plan == 0 {
                assert_eq!(chunks.len(), 1);
            } else {
                assert!(chunks
                    .iter()
                    .all(|c| !c.is_empty() && c.len() <= plan as usize));
            }
        }
        assert_eq!(Chunks::new(1, &bytes).count(), 256);
    }

    #[test]
    fn every_seed_runs_clean_through_its_target() {
        let mut ran = 0;
        for (target, run) in seeds::TARGETS {
            for (name, data) in seeds::read(target) {
                eprintln!("{target}/{name}");
                run(&data);
                ran += 1;
            }
        }
        assert!(ran >= 4 * 3, "only {ran} seeds found");
    }

    /// The seeds reach past the refusals: what they ask is done.
    #[test]
    fn task_api_seeds_drive_whole_lifecycles() {
        use kuasar_protocol::Code;
        use task_api::Outcome::{Answered, Refused, Waiting};
        let seeds: std::collections::HashMap<String, Vec<u8>> =
            seeds::generate("task_api").into_iter().collect();
        let run = |name: &str| task_api::outcomes(&seeds[name]);
        let lifecycle = [
            ("Create", Answered),
            ("State", Answered),
            ("Start", Answered),
            ("Pids", Answered),
            ("Pause", Answered),
            ("Resume", Answered),
            ("Update", Answered),
            ("Stats", Refused(Code::Unimplemented)),
            ("Connect", Answered),
            ("Kill", Answered),
            ("Wait", Answered),
            ("Delete", Answered),
            ("Shutdown", Answered),
        ];
        assert_eq!(run("seed-lifecycle-v3"), lifecycle);
        assert_eq!(run("seed-lifecycle-v2"), lifecycle);
        assert_eq!(
            run("seed-exec"),
            [
                ("Create", Answered),
                ("Start", Answered),
                ("Exec", Answered),
                ("Start", Answered),
                ("ResizePty", Answered),
                ("CloseIO", Answered),
                ("Kill", Answered),
                ("Wait", Answered),
                ("Delete", Answered),
                ("Checkpoint", Refused(Code::Unimplemented)),
            ]
        );
        assert_eq!(
            run("seed-sandbox"),
            [
                ("CreateSandbox", Answered),
                ("StartSandbox", Answered),
                ("Platform", Answered),
                ("SandboxStatus", Answered),
                ("PingSandbox", Answered),
                ("SandboxMetrics", Answered),
                ("StopSandbox", Answered),
                ("WaitSandbox", Answered),
                ("ShutdownSandbox", Answered),
            ]
        );
        assert_eq!(
            run("seed-refused"),
            [
                ("Create", Refused(Code::InvalidArgument)),
                ("Create", Refused(Code::InvalidArgument)),
                ("Frobnicate", Refused(Code::Unimplemented)),
                ("State", Refused(Code::InvalidArgument)),
            ]
        );
        // A Wait on a task nothing ends is left waiting, and the calls
        // after it are served.
        let lifecycle = task_api::calls(&seeds["seed-lifecycle-v3"]);
        let pick = |name: &str| {
            let c = lifecycle
                .iter()
                .find(|c| task_api::methods()[c.method as usize].1 == name)
                .unwrap();
            (c.method, c.namespace, c.payload.to_vec())
        };
        let waits = task_api::encode(&[pick("Create"), pick("Wait"), pick("State")]);
        assert_eq!(
            task_api::outcomes(&waits),
            [("Create", Answered), ("Wait", Waiting), ("State", Answered)]
        );
    }

    #[test]
    fn the_seed_corpus_is_what_the_generator_makes() {
        // KUASAR_FUZZ_WRITE_SEEDS=1 rewrites it after a change.
        if std::env::var_os("KUASAR_FUZZ_WRITE_SEEDS").is_some() {
            seeds::write();
        }
        for (target, _) in seeds::TARGETS {
            let made = seeds::generate(target);
            let stored: Vec<(String, Vec<u8>)> = seeds::read(target)
                .into_iter()
                .filter(|(name, _)| name.starts_with("seed-"))
                .collect();
            assert_eq!(
                stored.iter().map(|s| &s.0).collect::<Vec<_>>(),
                made.iter().map(|s| &s.0).collect::<Vec<_>>(),
                "{target}: run with KUASAR_FUZZ_WRITE_SEEDS=1 to refresh"
            );
            for ((name, a), (_, b)) in stored.iter().zip(&made) {
                assert!(a == b, "{target}/{name} differs from the generator's");
            }
        }
    }
}
