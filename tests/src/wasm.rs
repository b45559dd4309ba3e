//! The WAT test programs, compiled at test time with the `wat` crate.

use std::path::Path;

/// Compiles every `*.wat` in `src` into `out/NAME.wasm`; returns the names.
pub fn compile_all(src: &Path, out: &Path) -> Result<Vec<String>, String> {
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let mut names = Vec::new();
    let entries = std::fs::read_dir(src).map_err(|e| format!("{}: {e}", src.display()))?;
    for entry in entries {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("wat") {
            continue;
        }
        let bytes = wat::parse_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        std::fs::write(out.join(format!("{name}.wasm")), bytes)
            .map_err(|e| format!("{}: {e}", out.display()))?;
        names.push(name);
    }
    names.sort();
    Ok(names)
}
