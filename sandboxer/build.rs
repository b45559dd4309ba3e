//! Links the daemon position-independent (the default: ASLR for a root
//! daemon that compiles untrusted wasm) with its relative relocations
//! packed (DT_RELR; glibc 2.36, binutils 2.38): the loader reads a table of
//! a few KB instead of 1.4 MB of RELA entries at every start, and those
//! pages stay out of the daemon's memory.
fn main() {
    println!("cargo:rustc-link-arg-bin=kuasar-sandboxer=-Wl,-z,pack-relative-relocs");
}
