//! What a resident daemon holds, read from /proc: open descriptors, threads,
//! PSS, children and mounts. The churn benchmark and the churn e2e test
//! compare these before and after many container cycles.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::bench::pss_kb;
use crate::{Env, OWN_TMPFS};

/// One reading of a daemon's resources.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sample {
    pub fds: usize,
    pub threads: usize,
    pub pss_kb: u64,
    pub children: usize,
    pub mounts: usize,
}

impl Sample {
    /// Reads `pid`'s resources; `mounts` counts the mount points below
    /// `dir` in its mount namespace, other than `dir` itself and `except`.
    pub fn of(pid: u32, dir: &Path, except: &[PathBuf]) -> Sample {
        Sample {
            fds: count_entries(&format!("/proc/{pid}/fd")),
            threads: count_entries(&format!("/proc/{pid}/task")),
            pss_kb: pss_kb(pid),
            children: children(pid).len(),
            mounts: mounts_below(pid, dir)
                .iter()
                .filter(|m| !except.iter().any(|e| Path::new(m) == e))
                .count(),
        }
    }

    /// The larger of each field.
    pub fn max(self, o: Sample) -> Sample {
        Sample {
            fds: self.fds.max(o.fds),
            threads: self.threads.max(o.threads),
            pss_kb: self.pss_kb.max(o.pss_kb),
            children: self.children.max(o.children),
            mounts: self.mounts.max(o.mounts),
        }
    }
}

impl fmt::Display for Sample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} fds, {} threads, {} kB PSS, {} children, {} mounts",
            self.fds, self.threads, self.pss_kb, self.children, self.mounts
        )
    }
}

impl Env {
    /// The sandboxer's resources; its mounts are those below the env's
    /// directory (bundles' rootfs, VM shares, pod namespaces), other than
    /// the env's own tmpfs.
    pub fn sandboxer_sample(&self) -> Sample {
        let pid = self.sandboxer_pid().expect("sandboxer running");
        let own: Vec<PathBuf> = OWN_TMPFS.iter().map(|s| self.dir.join(s)).collect();
        Sample::of(pid, &self.dir, &own)
    }
}

fn count_entries(dir: &str) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// Live children of `pid` (zombies included: an unreaped exit is a leak).
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(child) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        if parse_ppid(&stat) == Some(pid) {
            out.push(child);
        }
    }
    out
}

/// The parent pid field of a /proc/PID/stat line (the command name, in
/// parentheses, may itself hold spaces and parentheses).
fn parse_ppid(stat: &str) -> Option<u32> {
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Mount points strictly below `root` in `pid`'s mount namespace.
pub fn mounts_below(pid: u32, root: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
    let root = root.to_string_lossy();
    crate::parse_mountpoints(&text, &root)
        .into_iter()
        .filter(|m| *m != root)
        .collect()
}

/// What `pid`'s descriptors point at, counted: `socket:`, `pipe:`,
/// `anon_inode:[eventfd]`, or a path. Inode numbers are dropped, so two
/// readings compare by kind.
pub fn fd_kinds(pid: u32) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        *out.entry(fd_kind(&target.to_string_lossy())).or_default() += 1;
    }
    out
}

fn fd_kind(target: &str) -> String {
    match target.split_once(":[") {
        Some((kind, _)) if kind == "socket" || kind == "pipe" => format!("{kind}:"),
        _ => target.to_string(),
    }
}

/// The kinds whose count differs between two [`fd_kinds`] readings:
/// `kind: before -> after`.
pub fn fd_diff(before: &BTreeMap<String, usize>, after: &BTreeMap<String, usize>) -> Vec<String> {
    let mut keys: Vec<&String> = before.keys().chain(after.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|k| {
            let (b, a) = (
                before.get(k).copied().unwrap_or(0),
                after.get(k).copied().unwrap_or(0),
            );
            (a != b).then(|| format!("{k}: {b} -> {a}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ppid_is_read_past_a_command_with_parentheses() {
        assert_eq!(parse_ppid("42 (a) b) S 7 42 42 0"), Some(7));
        assert_eq!(parse_ppid("garbage"), None);
    }

    #[test]
    fn fd_kinds_drop_inodes_but_keep_paths_and_anon_inodes() {
        assert_eq!(fd_kind("socket:[1234]"), "socket:");
        assert_eq!(fd_kind("pipe:[99]"), "pipe:");
        assert_eq!(fd_kind("anon_inode:[eventfd]"), "anon_inode:[eventfd]");
        assert_eq!(fd_kind("/tmp/kx-1/k/x.log"), "/tmp/kx-1/k/x.log");
    }

    #[test]
    fn fd_diff_names_the_kinds_that_changed() {
        let before = BTreeMap::from([("socket:".to_string(), 3), ("pipe:".to_string(), 2)]);
        let after = BTreeMap::from([
            ("socket:".to_string(), 4),
            ("pipe:".to_string(), 2),
            ("anon_inode:[pidfd]".to_string(), 1),
        ]);
        assert_eq!(
            fd_diff(&before, &after),
            vec!["anon_inode:[pidfd]: 0 -> 1", "socket:: 3 -> 4"]
        );
    }

    #[test]
    fn the_current_process_is_readable() {
        let me = Sample::of(std::process::id(), Path::new("/nonexistent"), &[]);
        assert!(me.fds >= 3, "{me}");
        assert!(me.threads >= 1, "{me}");
        assert_eq!(me.mounts, 0);
    }
}
