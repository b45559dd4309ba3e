//! One wasm container: its WASI context built from the OCI spec, its
//! `Store` with memory limits, and the run that ends in an exit status.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use wasmtime::{ResourceLimiter, Store};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::{I32Exit, WasiCtxView, WasiView};

use super::engine::Program;
use kuasar_core::backend::{ContainerEvent, EventSink};

/// Exit status of an instance that trapped: what the wasmtime CLI reports
/// on Unix (128 + SIGABRT), apart from 137/143 for kills.
pub const EXIT_TRAP: u32 = 134;
/// Exit status of an instance that ran out of its memory limit, as a
/// process the kernel's OOM killer ended.
pub const EXIT_OOM: u32 = 137;

/// What a `Store` carries.
pub struct State {
    pub wasi: WasiP1Ctx,
    pub limits: Limiter,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        self.wasi.ctx()
    }
}

/// The memory accounting of one instance, shared with the Task API
/// (Stats reads it, Update changes the limit).
#[derive(Default)]
pub struct Memory {
    /// Bytes of linear memory and tables in use.
    pub usage: AtomicU64,
    /// 0: no limit beyond the engine's.
    pub limit: AtomicU64,
    pub oom: AtomicBool,
}

/// Raised inside the instance when it grows past its limit.
#[derive(Debug)]
pub struct MemoryLimitExceeded(pub u64);

impl std::fmt::Display for MemoryLimitExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "memory limit of {} bytes exceeded", self.0)
    }
}

impl std::error::Error for MemoryLimitExceeded {}

/// Enforces the OCI memory limit as a cgroup would: growing past it ends
/// the instance (and reports an OOM) instead of failing the grow.
pub struct Limiter {
    pub memory: Arc<Memory>,
    pub events: EventSink,
}

impl Limiter {
    fn grow(&mut self, current: usize, desired: usize) -> wasmtime::Result<bool> {
        let added = desired.saturating_sub(current) as u64;
        let used = self.memory.usage.load(Ordering::SeqCst) + added;
        let limit = self.memory.limit.load(Ordering::SeqCst);
        if limit != 0 && used > limit {
            if !self.memory.oom.swap(true, Ordering::SeqCst) {
                let _ = self.events.send(ContainerEvent::Oom);
            }
            return Err(wasmtime::Error::new(MemoryLimitExceeded(limit)));
        }
        self.memory.usage.store(used, Ordering::SeqCst);
        Ok(true)
    }
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.grow(current, desired)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // A table element is a pointer on the host.
        let size = std::mem::size_of::<usize>();
        self.grow(current.saturating_mul(size), desired.saturating_mul(size))
    }
}

/// How a run ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `_start` or `wasi:cli/run` returned, or the program called exit.
    Exited(u32),
    /// Ended by Kill with this signal.
    Killed(u32),
    /// Grew past its memory limit.
    OutOfMemory(u64),
    /// A trap, or an error of the host while running it.
    Trapped(String),
}

impl Outcome {
    pub fn exit_status(&self) -> u32 {
        match self {
            Outcome::Exited(c) => *c,
            Outcome::Killed(sig) => 128 + sig,
            Outcome::OutOfMemory(_) => EXIT_OOM,
            Outcome::Trapped(_) => EXIT_TRAP,
        }
    }

    /// What the container's stderr gets about the end, if anything.
    pub fn message(&self) -> Option<String> {
        match self {
            Outcome::Exited(_) | Outcome::Killed(_) => None,
            Outcome::OutOfMemory(limit) => Some(format!(
                "kuasar: wasm instance ended: memory limit of {limit} bytes exceeded\n"
            )),
            Outcome::Trapped(m) => Some(format!("kuasar: wasm instance trapped: {m}\n")),
        }
    }

    fn from_error(e: wasmtime::Error) -> Outcome {
        if let Some(exit) = e.downcast_ref::<I32Exit>() {
            return Outcome::Exited(exit.0 as u32);
        }
        if let Some(oom) = e.downcast_ref::<MemoryLimitExceeded>() {
            return Outcome::OutOfMemory(oom.0);
        }
        Outcome::Trapped(format!("{e:?}"))
    }
}

/// Instantiates the program in `store` and runs its entry point.
pub async fn run(program: Arc<Program>, entry: String, mut store: Store<State>) -> Outcome {
    let ran = async {
        match &*program {
            Program::Core { pre, .. } => {
                let instance = pre.instantiate_async(&mut store).await?;
                let f = instance.get_typed_func::<(), ()>(&mut store, &entry)?;
                f.call_async(&mut store, ()).await?;
                Ok(0)
            }
            Program::Component(pre) => {
                let command = pre.instantiate_async(&mut store).await?;
                match command.wasi_cli_run().call_run(&mut store).await? {
                    Ok(()) => Ok(0),
                    Err(()) => Ok(1),
                }
            }
        }
    };
    let outcome = match ran.await {
        Ok(code) => Outcome::Exited(code),
        Err(e) => Outcome::from_error(e),
    };
    // A limit hit inside a host call may surface as some other error.
    if let Outcome::Trapped(_) = outcome {
        let memory = &store.data().limits.memory;
        if memory.oom.load(Ordering::SeqCst) {
            return Outcome::OutOfMemory(memory.limit.load(Ordering::SeqCst));
        }
    }
    outcome
}

/// Kill, pause and resume requests for one instance, and its CPU time.
#[derive(Default)]
pub struct Control {
    /// The signal that ends it; 0 while none was sent.
    kill: AtomicU32,
    paused: AtomicBool,
    /// The task running the instance, woken on every request.
    waker: Mutex<Option<Waker>>,
    pub cpu_ns: AtomicU64,
    /// Set when its turn ended at an epoch tick (it wants more CPU) rather
    /// than in a wait.
    yielded: AtomicBool,
}

impl Control {
    pub fn kill(&self, signal: u32) {
        let _ = self
            .kill
            .compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst);
        self.wake();
    }

    pub fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
    }

    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
        self.wake();
    }

    /// For the store's epoch callback: its turn ends at this tick.
    pub fn tick(&self) {
        self.yielded.store(true, Ordering::Relaxed);
    }

    fn wake(&self) {
        if let Some(w) = self.waker.lock().unwrap().take() {
            w.wake();
        }
    }
}

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Runs an instance's future under its [`Control`]. The future yields at
/// every epoch tick, so a kill or pause takes effect within one tick even
/// in a loop that never calls the host; a kill also ends it while it waits
/// in a host call. Counts the CPU time spent polling it, and keeps it
/// counted among the engine's busy instances while it wants the CPU.
pub struct Supervised<F> {
    inner: Pin<Box<F>>,
    control: Arc<Control>,
    busy: Arc<AtomicUsize>,
    counted: bool,
}

impl<F: Future<Output = Outcome>> Supervised<F> {
    pub fn new(inner: F, control: Arc<Control>, busy: Arc<AtomicUsize>) -> Self {
        Supervised {
            inner: Box::pin(inner),
            control,
            busy,
            counted: false,
        }
    }

    fn count_busy(&mut self, busy: bool) {
        if busy != self.counted {
            if busy {
                self.busy.fetch_add(1, Ordering::Relaxed);
            } else {
                self.busy.fetch_sub(1, Ordering::Relaxed);
            }
            self.counted = busy;
        }
    }
}

impl<F> Drop for Supervised<F> {
    fn drop(&mut self) {
        if self.counted {
            self.busy.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl<F: Future<Output = Outcome>> Future for Supervised<F> {
    type Output = Outcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        let control = self.control.clone();
        *control.waker.lock().unwrap() = Some(cx.waker().clone());
        let signal = control.kill.load(Ordering::SeqCst);
        if signal != 0 {
            self.count_busy(false);
            return Poll::Ready(Outcome::Killed(signal));
        }
        if control.paused.load(Ordering::SeqCst) {
            self.count_busy(false);
            return Poll::Pending;
        }
        control.yielded.store(false, Ordering::Relaxed);
        let before = thread_cpu_ns();
        let polled = self.inner.as_mut().poll(cx);
        control
            .cpu_ns
            .fetch_add(thread_cpu_ns().saturating_sub(before), Ordering::Relaxed);
        let busy = polled.is_pending() && control.yielded.load(Ordering::Relaxed);
        self.count_busy(busy);
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses() {
        assert_eq!(Outcome::Exited(7).exit_status(), 7);
        assert_eq!(Outcome::Killed(9).exit_status(), 137);
        assert_eq!(Outcome::Killed(15).exit_status(), 143);
        assert_eq!(Outcome::OutOfMemory(1).exit_status(), 137);
        assert_eq!(Outcome::Trapped("x".into()).exit_status(), EXIT_TRAP);
        assert!(Outcome::Exited(0).message().is_none());
        assert!(Outcome::Trapped("unreachable".into())
            .message()
            .unwrap()
            .contains("unreachable"));
    }

    #[test]
    fn limiter_refuses_growth_past_the_limit_once_reporting_oom() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let memory = Arc::new(Memory::default());
        memory.limit.store(128 << 10, Ordering::SeqCst);
        let mut l = Limiter {
            memory: memory.clone(),
            events: tx,
        };
        assert!(l.memory_growing(0, 64 << 10, None).unwrap());
        assert!(l.memory_growing(64 << 10, 128 << 10, None).unwrap());
        assert_eq!(memory.usage.load(Ordering::SeqCst), 128 << 10);
        let e = l.memory_growing(128 << 10, 192 << 10, None).unwrap_err();
        assert!(e.downcast_ref::<MemoryLimitExceeded>().is_some());
        assert!(l.memory_growing(128 << 10, 192 << 10, None).is_err());
        assert_eq!(rx.try_recv().unwrap(), ContainerEvent::Oom);
        assert!(rx.try_recv().is_err(), "one OOM event per instance");
        assert_eq!(memory.usage.load(Ordering::SeqCst), 128 << 10);
    }
}
