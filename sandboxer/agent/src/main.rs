//! `kuasar-agent`: PID 1 of a sandbox VM. It prepares the guest (modules,
//! a tmpfs root so runc can pivot_root, the host's shared directory), then
//! serves the agent API on the virtio-serial port named `agent`, running
//! the pod's containers with the same runc backend the host uses.

mod init;
mod server;
mod spec;

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KUASAR_AGENT_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    let result = init::prepare().and_then(|port| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| format!("starting the runtime: {e}"))?;
        rt.block_on(server::serve(port))
    });
    match result {
        Ok(()) => init::power_off(),
        Err(e) => {
            tracing::error!("kuasar-agent: {e}");
            // PID 1 must not exit: the kernel would panic with no trace of
            // why. Power off instead; the host reads the console.
            init::power_off()
        }
    }
}
