mod logging;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use kuasar_sandboxer::config::{Config, DEFAULT_CONFIG};

/// The resident kuasar sandboxer: serves containerd's Task API for every
/// container started through the containerd-shim-kuasar*-v1 runtimes.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Configuration file (TOML).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Directory for task sockets, state and runc's root.
    #[arg(long)]
    root: Option<PathBuf>,
    /// The private socket the shims dial.
    #[arg(long)]
    listen: Option<PathBuf>,
    /// Run the daemon alone, without the holder that keeps containerd's
    /// connections open and restarts it if it crashes.
    #[arg(long)]
    no_holder: bool,
}

fn main() -> ExitCode {
    // Set by a predecessor handing over (live upgrade); taken out of the
    // environment while no other thread exists, so children do not see it.
    let handover = std::env::var_os(kuasar_sandboxer::upgrade::HANDOVER_ENV).map(PathBuf::from);
    std::env::remove_var(kuasar_sandboxer::upgrade::HANDOVER_ENV);
    let cli = Cli::parse();
    let is_daemon = handover.is_some()
        || std::env::var_os(kuasar_sandboxer::fdstore::HOLDER_FD_ENV).is_some()
        || cli.no_holder;
    if !is_daemon {
        // The holder starts this binary again as the daemon, with the same
        // arguments, and starts it again if it dies.
        return kuasar_sandboxer::holder::run(std::env::args_os().skip(1).collect());
    }
    // Descriptors the holder kept for a crashed predecessor; read while no
    // other thread exists, since it edits the environment.
    let (store, inherited) = kuasar_sandboxer::fdstore::FdStore::from_env();
    let explicit = cli.config.is_some();
    let path = cli.config.unwrap_or_else(|| DEFAULT_CONFIG.into());
    let mut config = match Config::load(&path, explicit) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kuasar-sandboxer: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(root) = cli.root {
        config.root = root;
    }
    if let Some(listen) = cli.listen {
        config.listen = Some(listen);
    }
    if let Err(e) = logging::init(&config) {
        eprintln!("kuasar-sandboxer: {e}");
        return ExitCode::FAILURE;
    }

    // Orphaned container processes must be re-parented to the daemon so
    // that it sees their exits. Set before any thread or child exists. (It
    // also survives the execve of a live upgrade; setting it again is
    // harmless.)
    // SAFETY: PR_SET_CHILD_SUBREAPER takes one integer argument.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        let e = std::io::Error::last_os_error();
        eprintln!("kuasar-sandboxer: cannot become child subreaper: {e}");
        return ExitCode::FAILURE;
    }
    // One malloc arena per blocking thread (runc calls run on them) would
    // cost the node resident memory for nothing: two are plenty.
    // SAFETY: mallopt only tunes the allocator; called before any thread.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_keep_alive(std::time::Duration::from_secs(2))
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kuasar-sandboxer: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(kuasar_sandboxer::run_with_handover(
        config, handover, store, inherited,
    ));
    // Threads blocked on a client's FIFO must not hold the exit up.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("kuasar-sandboxer: {e}");
            ExitCode::FAILURE
        }
    }
}
