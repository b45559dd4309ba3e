//! How answers are shown: aligned tables and short durations for people,
//! JSON (times in RFC 3339 and Unix nanoseconds) for machines.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kuasar_protocol::wire;
use serde_json::{json, Value};

/// Columns padded to their widest cell, two spaces apart.
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            rows: vec![header.iter().map(|s| s.to_string()).collect()],
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let cols = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..cols)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|s| s.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for r in &self.rows {
            let mut line = String::new();
            for (c, cell) in r.iter().enumerate() {
                if c > 0 {
                    line.push_str("  ");
                }
                line.push_str(cell);
                let pad = widths[c].saturating_sub(cell.chars().count());
                line.extend(std::iter::repeat_n(' ', pad));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

fn time_of(nanos: i64) -> Option<SystemTime> {
    (nanos > 0).then(|| UNIX_EPOCH + Duration::from_nanos(nanos as u64))
}

/// `45s`, `3m12s`, `2h05m`, `3d04h`.
pub fn age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// Time from `nanos` to `now`; `None` when not known.
fn since(nanos: i64, now: SystemTime) -> Option<Duration> {
    time_of(nanos).map(|t| now.duration_since(t).unwrap_or_default())
}

fn age_cell(nanos: i64, now: SystemTime) -> String {
    since(nanos, now).map(age).unwrap_or_else(|| "-".into())
}

/// UTC, to the second: `2025-05-20T13:04:05Z`; `-` when not known.
pub fn rfc3339(nanos: i64) -> String {
    if nanos <= 0 {
        return "-".into();
    }
    let secs = nanos / 1_000_000_000;
    let (days, rem) = (secs / 86400, secs % 86400);
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn time_json(nanos: i64) -> Value {
    if nanos > 0 {
        rfc3339(nanos).into()
    } else {
        Value::Null
    }
}

fn pid_cell(pid: u32) -> String {
    if pid == 0 {
        "-".into()
    } else {
        pid.to_string()
    }
}

fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

pub fn list_text(list: &wire::ListResponse, now: SystemTime) -> String {
    let mut sandboxes = Table::new(&[
        "NAMESPACE",
        "SANDBOX",
        "KIND",
        "STATE",
        "PID",
        "AGE",
        "CONTAINERS",
        "ADDRESS",
    ]);
    for s in &list.sandboxes {
        sandboxes.row(vec![
            s.namespace.clone(),
            s.id.clone(),
            s.kind.clone(),
            s.state.clone(),
            pid_cell(s.pid),
            age_cell(s.created_at_nanos, now),
            if s.members.is_empty() {
                "-".into()
            } else {
                s.members.join(",")
            },
            s.address.clone(),
        ]);
    }
    let mut tasks = Table::new(&[
        "NAMESPACE",
        "TASK",
        "SANDBOX",
        "KIND",
        "STATUS",
        "PID",
        "EXECS",
        "AGE",
    ]);
    for t in &list.tasks {
        let status = match t.exit_status {
            Some(code) => format!("{}({code})", t.status),
            None => t.status.clone(),
        };
        let execs = if t.execs.is_empty() {
            "-".into()
        } else {
            let pids: Vec<String> = t.execs.iter().map(|e| pid_cell(e.pid)).collect();
            format!("{} ({})", t.execs.len(), pids.join(","))
        };
        tasks.row(vec![
            t.namespace.clone(),
            t.id.clone(),
            t.sandbox.clone(),
            t.kind.clone(),
            status,
            pid_cell(t.pid),
            execs,
            age_cell(t.created_at_nanos, now),
        ]);
    }
    format!("{}\n{}", sandboxes.render(), tasks.render())
}

pub fn list_json(list: &wire::ListResponse, now: SystemTime) -> Value {
    let age_json = |nanos: i64| -> Value {
        since(nanos, now)
            .map(|d| d.as_secs().into())
            .unwrap_or(Value::Null)
    };
    json!({
        "sandboxes": list.sandboxes.iter().map(|s| json!({
            "namespace": s.namespace,
            "id": s.id,
            "kind": s.kind,
            "state": s.state,
            "pid": s.pid,
            "address": s.address,
            "created_at": time_json(s.created_at_nanos),
            "age_seconds": age_json(s.created_at_nanos),
            "containers": s.members,
        })).collect::<Vec<_>>(),
        "tasks": list.tasks.iter().map(|t| json!({
            "namespace": t.namespace,
            "id": t.id,
            "sandbox": t.sandbox,
            "kind": t.kind,
            "status": t.status,
            "pid": t.pid,
            "exit_status": t.exit_status,
            "execs": t.execs.iter().map(|e| json!({
                "exec_id": e.exec_id,
                "status": e.status,
                "pid": e.pid,
            })).collect::<Vec<_>>(),
            "created_at": time_json(t.created_at_nanos),
            "age_seconds": age_json(t.created_at_nanos),
        })).collect::<Vec<_>>(),
    })
}

/// Seconds from `from` to the daemon's clock when it answered.
fn uptime(h: &wire::HealthResponse, from: i64) -> Option<Duration> {
    time_of(h.now_nanos).and_then(|now| since(from, now))
}

pub fn health_json(h: &wire::HealthResponse) -> Value {
    let secs = |from: i64| -> Value {
        uptime(h, from)
            .map(|d| d.as_secs().into())
            .unwrap_or(Value::Null)
    };
    json!({
        "pid": h.pid,
        "version": h.version,
        "started_at": time_json(h.started_at_nanos),
        "started_at_unix_nanos": h.started_at_nanos,
        "uptime_seconds": secs(h.started_at_nanos),
        "image_started_at": time_json(h.image_started_at_nanos),
        "image_started_at_unix_nanos": h.image_started_at_nanos,
        "image_uptime_seconds": secs(h.image_started_at_nanos),
        "binary": h.binary,
        "backends": h.backends.iter().map(|b| json!({
            "kind": b.kind,
            "sandboxes": b.sandboxes,
            "tasks": b.tasks,
        })).collect::<Vec<_>>(),
        "open_fds": h.open_fds,
        "threads": h.threads,
        "rss_bytes": h.rss_bytes,
        "pss_bytes": h.pss_bytes,
        "upgrade_possible": h.upgrade_blockers.is_empty(),
        "upgrade_blockers": h.upgrade_blockers,
        "upgrades_failed": h.upgrades_failed,
        "last_upgrade_error": h.last_upgrade_error,
    })
}

pub fn health_text(h: &wire::HealthResponse) -> String {
    let up = |from: i64| uptime(h, from).map(age).unwrap_or_else(|| "-".into());
    let backends: Vec<String> = h
        .backends
        .iter()
        .map(|b| format!("{} ({} sandboxes, {} tasks)", b.kind, b.sandboxes, b.tasks))
        .collect();
    let mut t = Table::new(&["pid", &h.pid.to_string()]);
    t.row(vec!["version".into(), h.version.clone()]);
    t.row(vec![
        "started".into(),
        format!(
            "{} (up {})",
            rfc3339(h.started_at_nanos),
            up(h.started_at_nanos)
        ),
    ]);
    t.row(vec![
        "image started".into(),
        format!(
            "{} (up {})",
            rfc3339(h.image_started_at_nanos),
            up(h.image_started_at_nanos)
        ),
    ]);
    t.row(vec![
        "binary".into(),
        match h.binary.strip_suffix(" (deleted)") {
            Some(path) => format!("{path} (replaced on disk: an upgrade runs the new file)"),
            None => h.binary.clone(),
        },
    ]);
    t.row(vec!["backends".into(), backends.join(", ")]);
    t.row(vec!["open fds".into(), h.open_fds.to_string()]);
    t.row(vec!["threads".into(), h.threads.to_string()]);
    t.row(vec!["rss".into(), megabytes(h.rss_bytes)]);
    t.row(vec!["pss".into(), megabytes(h.pss_bytes)]);
    t.row(vec![
        "live upgrade".into(),
        if h.upgrade_blockers.is_empty() {
            "possible".into()
        } else {
            format!("refused: {}", h.upgrade_blockers.join("; "))
        },
    ]);
    if h.upgrades_failed > 0 {
        t.row(vec![
            "upgrades failed".into(),
            format!("{}, last: {}", h.upgrades_failed, h.last_upgrade_error),
        ]);
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_utc_civil_dates() {
        assert_eq!(rfc3339(1), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400_000_000_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_747_746_245_999_999_999), "2025-05-20T13:04:05Z");
        assert_eq!(rfc3339(0), "-");
    }

    #[test]
    fn ages_keep_two_units() {
        assert_eq!(age(Duration::from_secs(45)), "45s");
        assert_eq!(age(Duration::from_secs(192)), "3m12s");
        assert_eq!(age(Duration::from_secs(7500)), "2h05m");
        assert_eq!(age(Duration::from_secs(3 * 86400 + 4 * 3600 + 5)), "3d04h");
    }

    #[test]
    fn tables_align_on_the_widest_cell() {
        let mut t = Table::new(&["A", "LONGER"]);
        t.row(vec!["wide cell".into(), "x".into()]);
        assert_eq!(t.render(), "A          LONGER\nwide cell  x\n");
    }

    #[test]
    fn a_listing_shows_execs_exits_and_unknown_ages() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let list = wire::ListResponse {
            sandboxes: vec![wire::SandboxInfo {
                namespace: "default".into(),
                id: "pod".into(),
                kind: "runc".into(),
                state: "ready".into(),
                pid: 0,
                address: "unix:///run/kuasar/t/1.sock".into(),
                created_at_nanos: 999_000 * 1_000_000_000,
                members: vec!["c1".into(), "c2".into()],
            }],
            tasks: vec![wire::TaskInfo {
                namespace: "default".into(),
                id: "c1".into(),
                sandbox: "pod".into(),
                kind: "runc".into(),
                status: "STOPPED".into(),
                pid: 42,
                exit_status: Some(137),
                execs: vec![wire::ExecInfo {
                    exec_id: "e1".into(),
                    status: "RUNNING".into(),
                    pid: 43,
                }],
                created_at_nanos: 0,
            }],
        };
        let text = list_text(&list, now);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("NAMESPACE  SANDBOX  KIND  STATE  PID  AGE"));
        assert!(lines[1].contains("ready  -    16m40s  c1,c2"), "{text}");
        assert!(lines[4].contains("STOPPED(137)  42   1 (43)  -"), "{text}");
        let v = list_json(&list, now);
        assert_eq!(v["sandboxes"][0]["age_seconds"], 1000);
        assert_eq!(v["tasks"][0]["age_seconds"], Value::Null);
        assert_eq!(v["tasks"][0]["exit_status"], 137);
        assert_eq!(v["tasks"][0]["execs"][0]["pid"], 43);
    }
}
