//! What `kuasar-ctl` is told: the sandboxes and tasks the daemon holds, its
//! health, and what would refuse a live upgrade. Read-only views of the
//! registry and of `/proc/self`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kuasar_protocol::wire;

use crate::daemon::{Daemon, Sandbox};
use crate::task::{nanos, Task};

/// Of the running image: when it started and how its live upgrades went.
pub struct ImageLog {
    pub started_at: SystemTime,
    /// Upgrades that came back failed, and the last one's error.
    failed: Mutex<(u32, String)>,
}

impl Default for ImageLog {
    fn default() -> Self {
        ImageLog {
            started_at: SystemTime::now(),
            failed: Mutex::new((0, String::new())),
        }
    }
}

impl ImageLog {
    /// A live upgrade failed and this image serves on.
    pub fn upgrade_failed(&self, error: &dyn std::fmt::Display) {
        let mut f = self.failed.lock().unwrap();
        f.0 += 1;
        f.1 = error.to_string();
    }
}

/// `resolved` (a shim has its address, nothing is made yet), `created`,
/// `ready` or `stopped`.
fn sandbox_state(s: &Sandbox) -> &'static str {
    let view = s.view();
    if view.exit.is_some() {
        "stopped"
    } else if view.ready {
        "ready"
    } else if s.backend().is_some() {
        "created"
    } else {
        "resolved"
    }
}

fn task_info(t: &Task) -> wire::TaskInfo {
    let init = t.init.view();
    let mut execs: Vec<wire::ExecInfo> = t
        .execs
        .lock()
        .unwrap()
        .values()
        .map(|p| {
            let v = p.view();
            wire::ExecInfo {
                exec_id: p.exec_id.clone(),
                status: format!("{:?}", v.status),
                pid: v.pid,
            }
        })
        .collect();
    execs.sort_by(|a, b| a.exec_id.cmp(&b.exec_id));
    wire::TaskInfo {
        namespace: t.namespace.clone(),
        id: t.id.clone(),
        sandbox: t.sandbox_id.clone(),
        kind: t.kind.as_str().into(),
        status: format!("{:?}", init.status),
        pid: init.pid,
        exit_status: init.exit.map(|e| e.status),
        execs,
        created_at_nanos: nanos(t.created_at),
    }
}

/// Every sandbox and task, ordered by namespace and id.
pub fn list(daemon: &Daemon) -> wire::ListResponse {
    let mut sandboxes: Vec<wire::SandboxInfo> = daemon
        .sandboxes()
        .iter()
        .map(|s| {
            let view = s.view();
            let mut members = s.members();
            members.sort();
            wire::SandboxInfo {
                namespace: s.namespace.clone(),
                id: s.id.clone(),
                kind: s.kind.as_str().into(),
                state: sandbox_state(s).into(),
                pid: view.pid,
                address: s.address.clone(),
                created_at_nanos: nanos(view.created_at),
                members,
            }
        })
        .collect();
    sandboxes.sort_by(|a, b| (&a.namespace, &a.id).cmp(&(&b.namespace, &b.id)));
    let mut tasks: Vec<wire::TaskInfo> = daemon.tasks().iter().map(|t| task_info(t)).collect();
    tasks.sort_by(|a, b| (&a.namespace, &a.id).cmp(&(&b.namespace, &b.id)));
    wire::ListResponse { sandboxes, tasks }
}

/// Most task names a blocker spells out.
const NAMED: usize = 5;

/// What would refuse a live upgrade now, one line per cause: tasks whose
/// workload lives in the daemon's memory and would be lost with it.
pub fn upgrade_blockers(daemon: &Daemon) -> Vec<String> {
    let mut held: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
    for t in daemon.tasks() {
        let survives = daemon
            .backend(t.kind)
            .is_ok_and(|b| b.capabilities().survives_reexec);
        if !survives {
            held.entry(t.kind.as_str())
                .or_default()
                .push(format!("{}/{}", t.namespace, t.id));
        }
    }
    held.into_iter()
        .map(|(kind, mut ids)| {
            ids.sort();
            let n = ids.len();
            let (noun, verb) = if n == 1 {
                ("task", "lives")
            } else {
                ("tasks", "live")
            };
            let more = n.saturating_sub(NAMED);
            ids.truncate(NAMED);
            let mut named = ids.join(", ");
            if more > 0 {
                named.push_str(&format!(" and {more} more"));
            }
            format!("{n} {kind} {noun} {verb} inside this process and would be lost: {named}")
        })
        .collect()
}

pub fn health(daemon: &Daemon) -> wire::HealthResponse {
    let mut per_kind: BTreeMap<&'static str, (u32, u32)> = daemon
        .enabled_kinds()
        .into_iter()
        .map(|k| (k.as_str(), (0, 0)))
        .collect();
    for s in daemon.sandboxes() {
        per_kind.entry(s.kind.as_str()).or_default().0 += 1;
    }
    for t in daemon.tasks() {
        per_kind.entry(t.kind.as_str()).or_default().1 += 1;
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
    let (failed, last_error) = daemon.image.failed.lock().unwrap().clone();
    wire::HealthResponse {
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").into(),
        started_at_nanos: process_started_at().map(nanos).unwrap_or(0),
        image_started_at_nanos: nanos(daemon.image.started_at),
        now_nanos: nanos(SystemTime::now()),
        backends: per_kind
            .into_iter()
            .map(|(kind, (sandboxes, tasks))| wire::BackendHealth {
                kind: kind.into(),
                sandboxes,
                tasks,
            })
            .collect(),
        open_fds: open_fds(),
        threads: kib_field(&status, "Threads:").unwrap_or(0) as u32,
        rss_bytes: kib_field(&status, "VmRSS:").unwrap_or(0) * 1024,
        pss_bytes: kib_field(&rollup, "Pss:").unwrap_or(0) * 1024,
        upgrade_blockers: upgrade_blockers(daemon),
        upgrades_failed: failed,
        last_upgrade_error: last_error,
        binary: std::fs::read_link("/proc/self/exe")
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
    }
}

/// The number after `key` on its line of a `/proc` status file (kB values
/// are returned as they stand).
fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

fn open_fds() -> u32 {
    // The directory's own descriptor is counted by the listing too.
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count().saturating_sub(1) as u32)
        .unwrap_or(0)
}

/// When this process started: it keeps its pid, and this time, across live
/// upgrades.
fn process_started_at() -> Option<SystemTime> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let boot = std::fs::read_to_string("/proc/stat").ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    started_at(&stat, &boot, u64::try_from(ticks).ok()?)
}

/// From `/proc/PID/stat` (start time in clock ticks since boot, field 22)
/// and `/proc/stat` (`btime`, boot time in seconds since the epoch).
fn started_at(stat: &str, proc_stat: &str, ticks_per_sec: u64) -> Option<SystemTime> {
    // The command name may hold spaces and parentheses: fields are counted
    // from after its last ')', where field 3 begins.
    let after = &stat[stat.rfind(')')? + 1..];
    let start_ticks: u64 = after.split_whitespace().nth(22 - 3)?.parse().ok()?;
    let btime: u64 = proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    if ticks_per_sec == 0 {
        return None;
    }
    let since_boot = Duration::from_secs(start_ticks / ticks_per_sec)
        + Duration::from_nanos((start_ticks % ticks_per_sec) * 1_000_000_000 / ticks_per_sec);
    Some(UNIX_EPOCH + Duration::from_secs(btime) + since_boot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_read_after_a_command_name_with_spaces_and_parens() {
        let stat = "4242 (kuasar (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 \
                    9 0 12345 1000000 200 18446744073709551615";
        let proc_stat = "cpu  1 2 3\nbtime 1700000000\nprocesses 10\n";
        let t = started_at(stat, proc_stat, 100).unwrap();
        assert_eq!(
            t,
            UNIX_EPOCH + Duration::from_secs(1_700_000_000) + Duration::from_millis(123_450)
        );
        assert!(started_at("garbage", proc_stat, 100).is_none());
        assert!(started_at(stat, "cpu 1\n", 100).is_none());
    }

    #[test]
    fn this_process_started_before_now_and_after_boot() {
        let t = process_started_at().unwrap();
        assert!(t <= SystemTime::now());
        assert!(t > UNIX_EPOCH + Duration::from_secs(1_000_000_000));
    }

    #[test]
    fn status_fields_are_found_by_their_key() {
        let status = "Name:\tx\nVmRSS:\t    5120 kB\nThreads:\t7\n";
        assert_eq!(kib_field(status, "VmRSS:"), Some(5120));
        assert_eq!(kib_field(status, "Threads:"), Some(7));
        assert_eq!(kib_field(status, "VmSwap:"), None);
    }
}
