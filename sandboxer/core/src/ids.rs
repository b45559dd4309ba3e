//! Validation of the names and paths containerd hands us. They end up in
//! paths and command lines, so anything outside containerd's identifier
//! grammar, and any path that is relative or climbs with `..`, is refused
//! before it is used.

use std::path::{Component, Path};

use crate::error::{Error, Result};
use kuasar_host::stdio::StdioPaths;

/// containerd's limit (`identifiers.Validate`).
const MAX_LEN: usize = 76;
/// Linux's `PATH_MAX`.
const MAX_PATH: usize = 4096;

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

/// Checks a path from a request (a bundle, a FIFO, a netns): absolute,
/// without `..` components or NUL bytes, at most `PATH_MAX` bytes. Such a
/// path names what it says wherever the daemon's working directory is, and
/// cannot climb out of the directory containerd made for it.
pub fn validate_path(what: &str, value: &str) -> Result<()> {
    let bad = |why: &str| {
        let shown: String = value.chars().take(200).collect();
        Err(Error::InvalidArgument(format!(
            "invalid {what} {shown:?}: {why}"
        )))
    };
    if value.len() > MAX_PATH {
        return bad("longer than 4096 bytes");
    }
    if value.contains('\0') {
        return bad("contains a NUL byte");
    }
    let path = Path::new(value);
    if !path.is_absolute() {
        return bad("not an absolute path");
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return bad("must not contain '..'");
    }
    Ok(())
}

/// Checks a socket address from a request (containerd's ttrpc or gRPC
/// socket): a path as [`validate_path`] wants it, optionally `unix://`.
pub fn validate_address(what: &str, value: &str) -> Result<()> {
    validate_path(what, value.strip_prefix("unix://").unwrap_or(value))
}

/// Checks every file a process's stdio fields name (FIFOs, a `file://` log,
/// a `binary://` log driver) with [`validate_path`].
pub fn validate_stdio(stdio: &StdioPaths) -> Result<()> {
    for path in stdio.paths()? {
        validate_path("stdio path", &path)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{validate, validate_address, validate_path, validate_stdio};
    use kuasar_host::stdio::StdioPaths;

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

    #[test]
    fn absolute_clean_paths_pass() {
        for p in [
            "/",
            "/run/containerd/io.containerd.runtime.v2.task/default/c1",
            "/var/run/netns/cni-1234",
            "/a/./b",
            "/a//b/",
            "/a/..b/c..",
        ] {
            validate_path("path", p).unwrap();
        }
    }

    #[test]
    fn relative_climbing_and_odd_paths_are_refused() {
        for p in [
            "",
            "rootfs",
            "./b",
            "../b",
            "/a/../../etc",
            "/a/..",
            "/..",
            "/a\0b",
            &format!("/{}", "x".repeat(4096)),
        ] {
            assert!(validate_path("path", p).is_err(), "{p:?} accepted");
        }
    }

    #[test]
    fn addresses_may_carry_the_unix_scheme() {
        validate_address("address", "/run/containerd/containerd.sock.ttrpc").unwrap();
        validate_address("address", "unix:///run/containerd/containerd.sock").unwrap();
        for a in [
            "unix://run/x.sock",
            "x.sock",
            "unix:///run/../x.sock",
            "tcp://1.2.3.4:5",
        ] {
            assert!(validate_address("address", a).is_err(), "{a:?} accepted");
        }
    }

    fn stdio(stdin: &str, stdout: &str, stderr: &str) -> StdioPaths {
        StdioPaths {
            stdin: stdin.into(),
            stdout: stdout.into(),
            stderr: stderr.into(),
            terminal: false,
        }
    }

    #[test]
    fn stdio_fifos_logs_and_drivers_must_be_absolute_and_clean() {
        for ok in [
            stdio("", "", ""),
            stdio(
                "/run/fifo/c-stdin",
                "/run/fifo/c-stdout",
                "/run/fifo/c-stderr",
            ),
            stdio("", "file:///var/log/c.log", ""),
            stdio(
                "",
                "binary:///usr/bin/logger?id=a%2Fb",
                "ignored-with-a-driver",
            ),
        ] {
            validate_stdio(&ok).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
        for bad in [
            stdio("stdin", "", ""),
            stdio("", "../stdout", ""),
            stdio("", "/run/fifo/c-stdout", "/run/fifo/../../etc/passwd"),
            stdio("", "file://var/log/c.log", ""),
            stdio("", "file:///var/log/../../etc/shadow", ""),
            stdio("", "binary://logger", ""),
            stdio("", "binary:///usr/bin/../../tmp/x", ""),
            stdio("", "ftp://host/x", ""),
        ] {
            assert!(validate_stdio(&bad).is_err(), "{bad:?} accepted");
        }
    }
}
