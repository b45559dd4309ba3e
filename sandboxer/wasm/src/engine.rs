//! What every wasm instance on the node shares: one wasmtime `Engine` with a
//! pooling allocator, the WASI linkers, the threads instances run on, the
//! epoch ticker that bounds how long an instance runs between yields, and
//! the cache of compiled programs (in memory, and precompiled on disk).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;
use wasmtime::component::Component;
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, InstancePre, Module, PoolingAllocationConfig,
};
use wasmtime_wasi::p2::bindings::CommandPre;

use super::instance::State;
use kuasar_core::config::WasmConfig;
use kuasar_core::error::{io_context, Error, Result};

/// How often the epoch advances while few instances want the CPU: an
/// instance runs at most this long between two points where it can be
/// paused, killed or descheduled.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// The shortest tick, for when many instances spin at once.
const MIN_TICK: Duration = Duration::from_millis(1);

/// How long one round of the instance threads over every busy instance
/// should take: the time within which a kill or pause of any of them is
/// seen.
const ROUND: Duration = Duration::from_millis(50);

/// The tick for `busy` instances that want the CPU on `threads` threads:
/// every one gets a turn (and sees a kill) within [`ROUND`], down to
/// [`MIN_TICK`]; an idle instance needs no turns and does not count.
pub fn tick_for(busy: usize, threads: usize) -> Duration {
    let turns = busy.div_ceil(threads.max(1)).max(1) as u32;
    (ROUND / turns).clamp(MIN_TICK, EPOCH_TICK)
}

/// A program ready to instantiate: a WASI preview1 core module or a WASI
/// preview2 command component, linked against the host once.
pub enum Program {
    Core {
        module: Module,
        pre: InstancePre<State>,
    },
    Component(CommandPre<State>),
}

impl Program {
    pub fn is_component(&self) -> bool {
        matches!(self, Program::Component(_))
    }
}

/// A sha256 content digest.
pub type ContentDigest = [u8; 32];

pub fn digest(bytes: &[u8]) -> ContentDigest {
    Sha256::digest(bytes).into()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Feeds `Hash` output into sha256: a key that stays the same across
/// builds, unlike `DefaultHasher`.
struct StableHasher(Sha256);

impl Hasher for StableHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn finish(&self) -> u64 {
        let d = self.0.clone().finalize();
        u64::from_le_bytes(d[..8].try_into().unwrap_or_default())
    }
}

pub struct WasmEngine {
    pub engine: Engine,
    core_linker: wasmtime::Linker<State>,
    component_linker: wasmtime::component::Linker<State>,
    /// Instances run here, away from the threads that serve containerd, so
    /// a busy module never delays the Task API.
    runtime: Option<tokio::runtime::Runtime>,
    pub handle: tokio::runtime::Handle,
    /// Instances running now; the ticker sleeps while there are none.
    running: Arc<AtomicUsize>,
    /// Instances that left their last turn at an epoch tick, wanting more
    /// CPU; the ticker shortens the tick while there are many.
    pub busy: Arc<AtomicUsize>,
    ticker: std::thread::Thread,
    /// Ends the ticker with the engine.
    stopped: Arc<AtomicBool>,
    /// `<root>/wasm/<engine compatibility hash>/`: precompiled programs.
    cache_dir: PathBuf,
    cached: Mutex<HashMap<ContentDigest, Arc<OnceCell<Arc<Program>>>>>,
    cache_capacity: usize,
}

impl Drop for WasmEngine {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which an async caller must not do.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        self.stopped.store(true, Ordering::SeqCst);
        self.ticker.unpark();
    }
}

/// Counts one running instance for as long as it lives.
pub struct RunningGuard(Arc<AtomicUsize>);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl WasmEngine {
    pub fn new(root: &Path, cfg: &WasmConfig) -> Result<WasmEngine> {
        let wasm_err = |what: &str| {
            let what = what.to_string();
            move |e: wasmtime::Error| Error::Internal(format!("{what}: {e:#}"))
        };
        let n = cfg.max_instances.max(1);
        let mut pool = PoolingAllocationConfig::new();
        // A command component holds a few core instances, memories and
        // tables (the WASI adapter's among them).
        pool.total_component_instances(n)
            .total_core_instances(n.saturating_mul(4))
            .total_memories(n.saturating_mul(2))
            .total_tables(n.saturating_mul(4))
            .total_stacks(n)
            .max_memory_size((cfg.max_memory_mib.saturating_mul(1 << 20)) as usize);
        let mut config = Config::new();
        config
            .epoch_interruption(true)
            .memory_init_cow(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .wasm_component_model(true)
            .async_stack_size(1 << 20)
            .max_wasm_stack(512 << 10);
        let engine = Engine::new(&config).map_err(wasm_err("creating the wasm engine"))?;

        let mut core_linker = wasmtime::Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut core_linker, |s: &mut State| &mut s.wasi)
            .map_err(wasm_err("linking WASI preview1"))?;
        let mut component_linker = wasmtime::component::Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut component_linker)
            .map_err(wasm_err("linking WASI preview2"))?;

        let threads = cfg.threads.max(1);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("wasm-instance")
            .enable_all()
            .build()
            .map_err(io_context("starting the wasm instance threads"))?;
        let handle = runtime.handle().clone();

        let running = Arc::new(AtomicUsize::new(0));
        let busy = Arc::new(AtomicUsize::new(0));
        let stopped = Arc::new(AtomicBool::new(false));
        let ticker = {
            let engine = engine.clone();
            let running = running.clone();
            let busy = busy.clone();
            let stopped = stopped.clone();
            std::thread::Builder::new()
                .name("wasm-epoch".into())
                .spawn(move || loop {
                    if stopped.load(Ordering::SeqCst) {
                        return;
                    }
                    if running.load(Ordering::SeqCst) == 0 {
                        std::thread::park();
                        continue;
                    }
                    std::thread::sleep(tick_for(busy.load(Ordering::Relaxed), threads));
                    engine.increment_epoch();
                })
                .map_err(io_context("starting the wasm epoch ticker"))?
                .thread()
                .clone()
        };

        let mut h = StableHasher(Sha256::new());
        engine.precompile_compatibility_hash().hash(&mut h);
        let compat = hex(&h.0.finalize()[..12]);
        let cache_dir = root.join("wasm").join(compat);
        std::fs::create_dir_all(&cache_dir)
            .map_err(io_context(format!("creating {}", cache_dir.display())))?;
        Ok(WasmEngine {
            engine,
            core_linker,
            component_linker,
            runtime: Some(runtime),
            handle,
            running,
            busy,
            ticker,
            stopped,
            cache_dir,
            cached: Mutex::new(HashMap::new()),
            cache_capacity: cfg.cached_modules,
        })
    }

    /// Marks an instance as running: the epoch advances while any does.
    pub fn running(&self) -> RunningGuard {
        self.running.fetch_add(1, Ordering::SeqCst);
        self.ticker.unpark();
        RunningGuard(self.running.clone())
    }

    /// The program for these bytes: from memory, from the precompiled file
    /// on disk, or compiled now (once, however many containers ask at once).
    pub async fn program(self: &Arc<Self>, bytes: Vec<u8>) -> Result<Arc<Program>> {
        let key = digest(&bytes);
        let cell = {
            let mut cached = self.cached.lock().unwrap();
            if cached.len() >= self.cache_capacity && !cached.contains_key(&key) {
                // Forget programs no instance holds; the disk tier keeps them.
                cached.retain(|_, c| c.get().is_some_and(|p| Arc::strong_count(p) > 1));
            }
            cached.entry(key).or_default().clone()
        };
        let this = self.clone();
        let program = cell
            .get_or_try_init(|| async move {
                tokio::task::spawn_blocking(move || this.load(&key, &bytes))
                    .await
                    .map_err(|e| Error::Internal(format!("compiling: {e}")))?
            })
            .await;
        if program.is_err() {
            self.cached.lock().unwrap().remove(&key);
        }
        program.cloned()
    }

    /// Whether a program for this digest is compiled (in memory).
    pub fn is_cached(&self, key: &ContentDigest) -> bool {
        self.cached
            .lock()
            .unwrap()
            .get(key)
            .is_some_and(|c| c.initialized())
    }

    pub fn precompiled_path(&self, key: &ContentDigest) -> PathBuf {
        self.cache_dir.join(format!("{}.cwasm", hex(key)))
    }

    fn load(&self, key: &ContentDigest, bytes: &[u8]) -> Result<Arc<Program>> {
        let component = match kind_of(bytes)? {
            BinaryKind::Module => false,
            BinaryKind::Component => true,
        };
        let path = self.precompiled_path(key);
        if path.exists() {
            match self.deserialize(&path, component) {
                Ok(p) => return Ok(Arc::new(p)),
                Err(e) => {
                    tracing::warn!(path = %path.display(), "recompiling: {e}");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let compiled = if component {
            Component::new(&self.engine, bytes).and_then(|c| c.serialize())
        } else {
            Module::new(&self.engine, bytes).and_then(|m| m.serialize())
        }
        .map_err(|e| Error::InvalidArgument(format!("compiling the wasm program: {e:#}")))?;
        kuasar_protocol::shim::write_atomic(&path, &compiled)
            .map_err(io_context(format!("writing {}", path.display())))?;
        // Loaded back from the file: its code pages are then a shared file
        // mapping, not memory of the daemon's own.
        self.deserialize(&path, component).map(Arc::new)
    }

    fn deserialize(&self, path: &Path, component: bool) -> Result<Program> {
        let link = |e: wasmtime::Error| Error::InvalidArgument(format!("{e:#}"));
        if component {
            // SAFETY: the file was written by this engine's own serialize
            // under a directory keyed by its compatibility hash, and
            // deserialize_file checks that hash again.
            let c = unsafe { Component::deserialize_file(&self.engine, path) }
                .map_err(|e| Error::Internal(format!("{e:#}")))?;
            let pre = self.component_linker.instantiate_pre(&c).map_err(link)?;
            let pre = CommandPre::new(pre).map_err(|e| {
                Error::InvalidArgument(format!(
                    "the component is not a WASI command (no wasi:cli/run export): {e:#}"
                ))
            })?;
            Ok(Program::Component(pre))
        } else {
            // SAFETY: as above.
            let module = unsafe { Module::deserialize_file(&self.engine, path) }
                .map_err(|e| Error::Internal(format!("{e:#}")))?;
            let pre = self.core_linker.instantiate_pre(&module).map_err(link)?;
            Ok(Program::Core { module, pre })
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum BinaryKind {
    Module,
    Component,
}

/// Tells a core module from a component by the binary's preamble.
pub fn kind_of(bytes: &[u8]) -> Result<BinaryKind> {
    match bytes.get(..8) {
        Some([0, b'a', b's', b'm', 1, 0, 0, 0]) => Ok(BinaryKind::Module),
        Some([0, b'a', b's', b'm', _, _, 1, 0]) => Ok(BinaryKind::Component),
        _ => Err(Error::InvalidArgument(
            "not a WebAssembly binary (no \\0asm preamble of a module or component)".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preamble_tells_modules_from_components() {
        assert_eq!(kind_of(b"\0asm\x01\0\0\0rest").unwrap(), BinaryKind::Module);
        assert_eq!(
            kind_of(b"\0asm\x0d\0\x01\0").unwrap(),
            BinaryKind::Component
        );
        assert!(kind_of(b"\x7fELF\x02\x01\x01\0").is_err());
        assert!(kind_of(b"\0asm").is_err());
    }

    #[test]
    fn stable_hasher_is_deterministic() {
        let h = |v: &str| {
            let mut h = StableHasher(Sha256::new());
            v.hash(&mut h);
            h.finish()
        };
        assert_eq!(h("engine"), h("engine"));
        assert_ne!(h("engine"), h("engine2"));
    }
}
