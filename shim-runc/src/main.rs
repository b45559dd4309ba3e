//! `containerd-shim-kuasarrunc-v1`: see `kuasar_protocol::shim`.

fn main() -> std::process::ExitCode {
    kuasar_protocol::shim::main(kuasar_protocol::Kind::Runc)
}
