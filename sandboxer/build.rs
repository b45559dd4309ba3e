//! Links the daemon as a position-dependent executable: its loader then
//! applies no relocations at start, so the relocation tables and the data
//! they would dirty (large with wasmtime linked in) stay out of its memory.
fn main() {
    println!("cargo:rustc-link-arg-bin=kuasar-sandboxer=-no-pie");
}
