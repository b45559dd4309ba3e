//! Container metrics in the cgroup metrics types containerd's CRI expects
//! (any other type breaks its stats listing for the whole node): from
//! `runc events --stats`, a cgroup v2 directory, or what a backend counts
//! itself.

use std::collections::HashMap;

use containerd_shim_protos::cgroups::metrics as v1;
use containerd_shim_protos::cgroups_v2::metrics as v2;
use protobuf::well_known_types::any::Any;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::to_any;

#[derive(Deserialize, Default)]
#[serde(default)]
struct Event {
    data: Stats,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct Stats {
    cpu: Cpu,
    memory: Memory,
    pids: Pids,
    blkio: Blkio,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Cpu {
    usage: CpuUsage,
    throttling: Throttling,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct CpuUsage {
    total: u64,
    percpu: Vec<u64>,
    kernel: u64,
    user: u64,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Throttling {
    periods: u64,
    throttled_periods: u64,
    throttled_time: u64,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Memory {
    cache: u64,
    usage: MemEntry,
    swap_usage: MemEntry,
    kernel_usage: MemEntry,
    kernel_tcp_usage: MemEntry,
    raw: HashMap<String, u64>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct MemEntry {
    limit: u64,
    usage: u64,
    max: u64,
    failcnt: u64,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Pids {
    current: u64,
    limit: u64,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Blkio {
    #[serde(rename = "ioServiceBytesRecursive")]
    io_service_bytes_recursive: Option<Vec<BlkioEntry>>,
    #[serde(rename = "ioServicedRecursive")]
    io_serviced_recursive: Option<Vec<BlkioEntry>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct BlkioEntry {
    major: u64,
    minor: u64,
    op: String,
    value: u64,
}

impl Stats {
    /// Metrics of a workload that is not a cgroup of its own: CPU time,
    /// memory in use and its peak, the memory limit (0: none), one task.
    pub fn counted(cpu_ns: u64, memory: u64, memory_max: u64, memory_limit: u64) -> Stats {
        let mut s = Stats::default();
        s.cpu.usage.total = cpu_ns;
        s.cpu.usage.user = cpu_ns;
        s.memory.usage = MemEntry {
            limit: if memory_limit == 0 {
                u64::MAX
            } else {
                memory_limit
            },
            usage: memory,
            max: memory_max,
            failcnt: 0,
        };
        s.memory.raw.insert("rss".into(), memory);
        s.memory.raw.insert("total_rss".into(), memory);
        s.memory.raw.insert("anon".into(), memory);
        s.pids.current = 1;
        s
    }
}

/// Reads the cgroup v2 files of the cgroup `pid` is in (for an OCI
/// runtime without `events --stats`, such as crun).
pub fn read_cgroup_v2(pid: u32) -> Result<Stats> {
    let membership = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map_err(|e| Error::NotFound(format!("process {pid}: {e}")))?;
    let path = membership
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| Error::Internal(format!("process {pid} is in no cgroup v2")))?;
    read_cgroup_v2_dir(&std::path::Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/')))
}

/// Reads the cgroup v2 files of `dir`.
pub fn read_cgroup_v2_dir(dir: &std::path::Path) -> Result<Stats> {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    let keyed = |f: &str| -> HashMap<String, u64> {
        read(f)
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(' ')?;
                Some((k.to_string(), v.trim().parse().ok()?))
            })
            .collect()
    };
    let single = |f: &str| -> u64 {
        match read(f).trim() {
            "max" => u64::MAX,
            v => v.parse().unwrap_or(0),
        }
    };
    if !dir.is_dir() {
        return Err(Error::NotFound(format!("cgroup {} is gone", dir.display())));
    }
    let mut s = Stats::default();
    let cpu = keyed("cpu.stat");
    let usec = |k: &str| cpu.get(k).copied().unwrap_or(0) * 1000;
    s.cpu.usage.total = usec("usage_usec");
    s.cpu.usage.user = usec("user_usec");
    s.cpu.usage.kernel = usec("system_usec");
    s.cpu.throttling.periods = cpu.get("nr_periods").copied().unwrap_or(0);
    s.cpu.throttling.throttled_periods = cpu.get("nr_throttled").copied().unwrap_or(0);
    s.cpu.throttling.throttled_time = usec("throttled_usec");
    s.memory.usage = MemEntry {
        limit: single("memory.max"),
        usage: single("memory.current"),
        max: single("memory.peak"),
        failcnt: keyed("memory.events").get("oom").copied().unwrap_or(0),
    };
    s.memory.swap_usage = MemEntry {
        limit: single("memory.swap.max"),
        usage: single("memory.swap.current"),
        ..Default::default()
    };
    s.memory.raw = keyed("memory.stat");
    s.pids.current = single("pids.current");
    s.pids.limit = match single("pids.max") {
        u64::MAX => 0,
        n => n,
    };
    Ok(s)
}

/// Parses `runc events --stats` output.
pub fn parse(json: &[u8]) -> Result<Stats> {
    serde_json::from_slice::<Event>(json)
        .map(|e| e.data)
        .map_err(|e| Error::Internal(format!("parsing runc stats: {e}")))
}

fn mem_entry(e: &MemEntry) -> v1::MemoryEntry {
    let mut m = v1::MemoryEntry::new();
    m.limit = e.limit;
    m.usage = e.usage;
    m.max = e.max;
    m.failcnt = e.failcnt;
    m
}

fn blkio_entries(entries: &Option<Vec<BlkioEntry>>) -> Vec<v1::BlkIOEntry> {
    entries
        .iter()
        .flatten()
        .map(|e| {
            let mut b = v1::BlkIOEntry::new();
            b.major = e.major;
            b.minor = e.minor;
            b.op = e.op.clone();
            b.value = e.value;
            b
        })
        .collect()
}

/// `io.containerd.cgroups.v1.Metrics`.
pub fn to_v1(s: &Stats) -> v1::Metrics {
    let raw = |k: &str| s.memory.raw.get(k).copied().unwrap_or(0);
    let mut m = v1::Metrics::new();
    let mut pids = v1::PidsStat::new();
    pids.current = s.pids.current;
    pids.limit = s.pids.limit;
    m.pids = Some(pids).into();

    let mut usage = v1::CPUUsage::new();
    usage.total = s.cpu.usage.total;
    usage.kernel = s.cpu.usage.kernel;
    usage.user = s.cpu.usage.user;
    usage.per_cpu = s.cpu.usage.percpu.clone();
    let mut thr = v1::Throttle::new();
    thr.periods = s.cpu.throttling.periods;
    thr.throttled_periods = s.cpu.throttling.throttled_periods;
    thr.throttled_time = s.cpu.throttling.throttled_time;
    let mut cpu = v1::CPUStat::new();
    cpu.usage = Some(usage).into();
    cpu.throttling = Some(thr).into();
    m.cpu = Some(cpu).into();

    let mut mem = v1::MemoryStat::new();
    mem.cache = s.memory.cache;
    mem.rss = raw("rss");
    mem.rss_huge = raw("rss_huge");
    mem.mapped_file = raw("mapped_file");
    mem.dirty = raw("dirty");
    mem.writeback = raw("writeback");
    mem.pg_pg_in = raw("pgpgin");
    mem.pg_pg_out = raw("pgpgout");
    mem.pg_fault = raw("pgfault");
    mem.pg_maj_fault = raw("pgmajfault");
    mem.inactive_anon = raw("inactive_anon");
    mem.active_anon = raw("active_anon");
    mem.inactive_file = raw("inactive_file");
    mem.active_file = raw("active_file");
    mem.unevictable = raw("unevictable");
    mem.hierarchical_memory_limit = raw("hierarchical_memory_limit");
    mem.hierarchical_swap_limit = raw("hierarchical_memsw_limit");
    mem.total_cache = raw("total_cache");
    mem.total_rss = raw("total_rss");
    mem.total_rss_huge = raw("total_rss_huge");
    mem.total_mapped_file = raw("total_mapped_file");
    mem.total_dirty = raw("total_dirty");
    mem.total_writeback = raw("total_writeback");
    mem.total_pg_pg_in = raw("total_pgpgin");
    mem.total_pg_pg_out = raw("total_pgpgout");
    mem.total_pg_fault = raw("total_pgfault");
    mem.total_pg_maj_fault = raw("total_pgmajfault");
    mem.total_inactive_anon = raw("total_inactive_anon");
    mem.total_active_anon = raw("total_active_anon");
    mem.total_inactive_file = raw("total_inactive_file");
    mem.total_active_file = raw("total_active_file");
    mem.total_unevictable = raw("total_unevictable");
    mem.usage = Some(mem_entry(&s.memory.usage)).into();
    mem.swap = Some(mem_entry(&s.memory.swap_usage)).into();
    mem.kernel = Some(mem_entry(&s.memory.kernel_usage)).into();
    mem.kernel_tcp = Some(mem_entry(&s.memory.kernel_tcp_usage)).into();
    m.memory = Some(mem).into();

    let mut blkio = v1::BlkIOStat::new();
    blkio.io_service_bytes_recursive = blkio_entries(&s.blkio.io_service_bytes_recursive);
    blkio.io_serviced_recursive = blkio_entries(&s.blkio.io_serviced_recursive);
    m.blkio = Some(blkio).into();
    m
}

/// `io.containerd.cgroups.v2.Metrics`.
pub fn to_v2(s: &Stats) -> v2::Metrics {
    let raw = |k: &str| s.memory.raw.get(k).copied().unwrap_or(0);
    let mut m = v2::Metrics::new();
    let mut pids = v2::PidsStat::new();
    pids.current = s.pids.current;
    pids.limit = s.pids.limit;
    m.pids = Some(pids).into();
    let mut cpu = v2::CPUStat::new();
    cpu.usage_usec = s.cpu.usage.total / 1000;
    cpu.user_usec = s.cpu.usage.user / 1000;
    cpu.system_usec = s.cpu.usage.kernel / 1000;
    cpu.nr_periods = s.cpu.throttling.periods;
    cpu.nr_throttled = s.cpu.throttling.throttled_periods;
    cpu.throttled_usec = s.cpu.throttling.throttled_time / 1000;
    m.cpu = Some(cpu).into();
    let mut mem = v2::MemoryStat::new();
    mem.usage = s.memory.usage.usage;
    mem.usage_limit = s.memory.usage.limit;
    mem.max_usage = s.memory.usage.max;
    mem.swap_usage = s.memory.swap_usage.usage;
    mem.swap_limit = s.memory.swap_usage.limit;
    mem.anon = raw("anon");
    mem.file = raw("file");
    mem.kernel_stack = raw("kernel_stack");
    mem.slab = raw("slab");
    mem.sock = raw("sock");
    mem.shmem = raw("shmem");
    mem.file_mapped = raw("file_mapped");
    mem.inactive_anon = raw("inactive_anon");
    mem.active_anon = raw("active_anon");
    mem.inactive_file = raw("inactive_file");
    mem.active_file = raw("active_file");
    mem.pgfault = raw("pgfault");
    mem.pgmajfault = raw("pgmajfault");
    m.memory = Some(mem).into();
    m
}

/// Whether the host runs the unified cgroup hierarchy only.
pub fn unified_host() -> bool {
    std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

pub fn to_any_for_host(s: &Stats) -> Any {
    if unified_host() {
        to_any(&to_v2(s))
    } else {
        to_any(&to_v1(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_v2_files_become_metrics() {
        let dir = tempfile::tempdir().unwrap();
        for (f, v) in [
            ("cpu.stat", "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 4\nnr_throttled 1\nthrottled_usec 7\n"),
            ("memory.current", "4096\n"),
            ("memory.max", "max\n"),
            ("memory.peak", "8192\n"),
            ("memory.events", "low 0\nhigh 0\nmax 2\noom 1\noom_kill 1\n"),
            ("memory.stat", "anon 1024\nfile 2048\n"),
            ("pids.current", "3\n"),
            ("pids.max", "max\n"),
        ] {
            std::fs::write(dir.path().join(f), v).unwrap();
        }
        let s = read_cgroup_v2_dir(dir.path()).unwrap();
        assert_eq!(
            (s.cpu.usage.total, s.cpu.usage.user, s.cpu.usage.kernel),
            (1_500_000, 1_000_000, 500_000)
        );
        assert_eq!(s.cpu.throttling.throttled_time, 7000);
        assert_eq!(
            (
                s.memory.usage.usage,
                s.memory.usage.limit,
                s.memory.usage.max
            ),
            (4096, u64::MAX, 8192)
        );
        assert_eq!(s.memory.usage.failcnt, 1);
        assert_eq!(s.memory.raw.get("file"), Some(&2048));
        assert_eq!((s.pids.current, s.pids.limit), (3, 0));
        let m = to_v2(&s);
        assert_eq!(m.memory.usage, 4096);
        assert!(read_cgroup_v2_dir(&dir.path().join("gone")).is_err());
    }

    const SAMPLE: &str = r#"{"type":"stats","id":"c1","data":{"cpu":{"usage":{"percpu":[10,20],"total":30,"kernel":5,"user":25},"throttling":{}},"memory":{"usage":{"limit":1048576,"usage":4096,"max":8192,"failcnt":0},"swap_usage":{"limit":0,"usage":0},"kernel_usage":{"usage":1},"cache":12,"raw":{"rss":100,"total_rss":200,"pgfault":7}},"pids":{"current":3,"limit":100},"blkio":{"ioServiceBytesRecursive":[{"major":8,"minor":0,"op":"Read","value":9}]},"hugetlb":{}}}"#;

    #[test]
    fn runc_stats_map_to_cgroup_v1_metrics() {
        let m = to_v1(&parse(SAMPLE.as_bytes()).unwrap());
        assert_eq!(m.pids.current, 3);
        assert_eq!(m.pids.limit, 100);
        assert_eq!(m.cpu.usage.total, 30);
        assert_eq!(m.cpu.usage.per_cpu, vec![10, 20]);
        assert_eq!(m.memory.usage.usage, 4096);
        assert_eq!(m.memory.usage.limit, 1048576);
        assert_eq!(m.memory.rss, 100);
        assert_eq!(m.memory.total_rss, 200);
        assert_eq!(m.memory.cache, 12);
        assert_eq!(m.blkio.io_service_bytes_recursive[0].value, 9);
        assert_eq!(to_any(&m).type_url, "io.containerd.cgroups.v1.Metrics");
    }

    #[test]
    fn runc_stats_map_to_cgroup_v2_metrics() {
        let m = to_v2(&parse(SAMPLE.as_bytes()).unwrap());
        assert_eq!(m.memory.usage, 4096);
        assert_eq!(m.cpu.usage_usec, 0);
        assert_eq!(m.pids.current, 3);
        assert_eq!(to_any(&m).type_url, "io.containerd.cgroups.v2.Metrics");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(parse(b"not json").is_err());
    }
}
