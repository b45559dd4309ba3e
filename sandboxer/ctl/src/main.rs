//! `kuasar-ctl`: see the library.

fn main() -> std::process::ExitCode {
    kuasar_ctl::main()
}
