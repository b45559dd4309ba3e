//! `/pause` of the pod sandbox image: it only holds the pod's namespaces.
//!
//! It waits in pause(2) forever. With a shared PID namespace it is PID 1 of
//! the pod, so it reaps every orphan that is reparented to it (SIGCHLD), and
//! as PID 1 the kernel delivers it no signal it has no handler for: SIGINT
//! and SIGTERM get one that exits 0, which is how the pod is stopped.
//! Built statically (hack/build-pause-image.sh) so the image needs no libc.

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

extern "C" fn exit_now(_: libc::c_int) {
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(0) }
}

extern "C" fn reap(_: libc::c_int) {
    // Every exited child, not one per signal: SIGCHLDs coalesce.
    // waitpid is async-signal-safe.
    while let Ok(st) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
        if st == WaitStatus::StillAlive {
            break;
        }
    }
}

fn install(sig: Signal, handler: extern "C" fn(libc::c_int), flags: SaFlags) {
    let action = SigAction::new(SigHandler::Handler(handler), flags, SigSet::empty());
    // SAFETY: both handlers call only async-signal-safe functions.
    if let Err(e) = unsafe { sigaction(sig, &action) } {
        eprintln!("kuasar-pause: sigaction {sig}: {e}");
        std::process::exit(1);
    }
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("-v") {
        println!("kuasar-pause {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    install(Signal::SIGINT, exit_now, SaFlags::empty());
    install(Signal::SIGTERM, exit_now, SaFlags::empty());
    install(
        Signal::SIGCHLD,
        reap,
        SaFlags::SA_NOCLDSTOP | SaFlags::SA_RESTART,
    );
    // Children that exited before the handler was in place.
    reap(0);
    loop {
        // SAFETY: pause(2) only waits for a signal.
        unsafe { libc::pause() };
    }
}
