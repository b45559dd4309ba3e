//! Compiles the repository's WAT test programs (tests/wasm/*.wat) with the
//! `wat` crate into OUT_DIR/NAME.wasm, for the wasm test image.
//!
//!     kuasar-wasm-programs OUT_DIR

use std::path::PathBuf;

fn main() {
    let out: PathBuf = match std::env::args_os().nth(1) {
        Some(o) => o.into(),
        None => {
            eprintln!("usage: kuasar-wasm-programs OUT_DIR");
            std::process::exit(2);
        }
    };
    let src = kuasar_e2e::workspace().join("tests/wasm");
    if let Err(e) = kuasar_e2e::wasm::compile_all(&src, &out) {
        eprintln!("kuasar-wasm-programs: {e}");
        std::process::exit(1);
    }
}
