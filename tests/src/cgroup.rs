//! Each env puts its containers under a cgroup parent of its own
//! (`ctr run --cgroup /<env>/<id>`), so two envs running at once never share
//! a container cgroup even when they use the same container id, leftover
//! container processes can be found, and `Drop` can kill whatever a
//! failed test left running.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const CGROUP_FS: &str = "/sys/fs/cgroup";

/// The directories of cgroup `name` (a top-level cgroup) in every mounted
/// hierarchy (cgroup v1 controllers, the unified v2 tree, or v2 alone).
pub fn dirs(name: &str) -> Vec<PathBuf> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    if Path::new(CGROUP_FS).join("cgroup.controllers").exists() {
        // Pure cgroup v2.
        let d = Path::new(CGROUP_FS).join(name);
        if d.is_dir() {
            out.push(d);
        }
        return out;
    }
    for e in std::fs::read_dir(CGROUP_FS).into_iter().flatten().flatten() {
        // cpu,cpuacct style mounts have symlinks (cpu -> cpu,cpuacct).
        let Ok(real) = std::fs::canonicalize(e.path()) else {
            continue;
        };
        if !seen.insert(real.clone()) {
            continue;
        }
        let d = real.join(name);
        if d.is_dir() {
            out.push(d);
        }
    }
    out
}

/// Every directory below (not including) `root`, deepest first.
fn subdirs(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(subdirs(&e.path()));
            out.push(e.path());
        }
    }
    out
}

/// Parses a `cgroup.procs` file.
pub fn parse_procs(text: &str) -> Vec<u32> {
    text.split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Pids of every process in cgroup `name` or below it, in any hierarchy.
pub fn procs(name: &str) -> BTreeSet<u32> {
    let mut out = BTreeSet::new();
    for d in dirs(name) {
        for c in std::iter::once(d.clone()).chain(subdirs(&d)) {
            let text = std::fs::read_to_string(c.join("cgroup.procs")).unwrap_or_default();
            out.extend(parse_procs(&text));
        }
    }
    out
}

/// Container cgroups still present below `name` (one per hierarchy).
pub fn children(name: &str) -> Vec<PathBuf> {
    dirs(name).iter().flat_map(|d| subdirs(d)).collect()
}

/// Thaws, kills and removes everything in cgroup `name`, then the cgroup.
pub fn destroy(name: &str) {
    for d in dirs(name) {
        for c in std::iter::once(d.clone()).chain(subdirs(&d)) {
            // A frozen process does not die of SIGKILL until thawed.
            let state = c.join("freezer.state");
            if state.exists() {
                let _ = std::fs::write(&state, "THAWED");
            }
            let freeze = c.join("cgroup.freeze");
            if freeze.exists() {
                let _ = std::fs::write(&freeze, "0");
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids = procs(name);
        if pids.is_empty() || Instant::now() > deadline {
            break;
        }
        for pid in pids {
            // SAFETY: kill(2) with a plain pid.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for d in dirs(name) {
        for c in subdirs(&d) {
            let _ = std::fs::remove_dir(c);
        }
        let _ = std::fs::remove_dir(d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_procs_parse_one_pid_a_line() {
        assert_eq!(parse_procs("12\n345\n\n"), vec![12, 345]);
        assert!(parse_procs("").is_empty());
    }

    #[test]
    fn unknown_cgroup_has_no_dirs_procs_or_children() {
        let name = "kx-no-such-cgroup-for-sure";
        assert!(dirs(name).is_empty());
        assert!(procs(name).is_empty());
        assert!(children(name).is_empty());
        destroy(name);
    }
}
