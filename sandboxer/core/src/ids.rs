//! Validation of the names containerd hands us. They end up in paths and
//! command lines, so anything outside containerd's identifier grammar is
//! refused before it is used.

use crate::error::{Error, Result};

/// containerd's limit (`identifiers.Validate`).
const MAX_LEN: usize = 76;

/// Checks `value` against containerd's identifier rules: alphanumeric runs
/// joined by single `.`, `_` or `-`, at most 76 characters.
pub fn validate(what: &str, value: &str) -> Result<()> {
    let bad = |why: &str| {
        let shown: String = value.chars().take(80).collect();
        Err(Error::InvalidArgument(format!(
            "invalid {what} {shown:?}: {why}"
        )))
    };
    if value.is_empty() {
        return bad("must not be empty");
    }
    if value.len() > MAX_LEN {
        return bad("longer than 76 characters");
    }
    let mut prev_sep = true;
    for c in value.chars() {
        if c.is_ascii_alphanumeric() {
            prev_sep = false;
        } else if matches!(c, '.' | '_' | '-') {
            if prev_sep {
                return bad("separators must sit between letters or digits");
            }
            prev_sep = true;
        } else {
            return bad("only letters, digits, '.', '_' and '-' are allowed");
        }
    }
    if prev_sep {
        return bad("must end with a letter or digit");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::validate;

    #[test]
    fn containerd_style_ids_pass() {
        for id in [
            "a",
            "default",
            "k8s.io",
            "c1",
            "abc-def_1.2",
            &"f".repeat(64),
        ] {
            validate("id", id).unwrap();
        }
    }

    #[test]
    fn path_tricks_and_oddities_are_refused() {
        for id in [
            "",
            "..",
            "../x",
            "a/b",
            "/abs",
            "a..b",
            "-a",
            "a-",
            "a b",
            "é",
            &"x".repeat(77),
            "a\0b",
        ] {
            assert!(validate("id", id).is_err(), "{id:?} accepted");
        }
    }
}
