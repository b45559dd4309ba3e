//! What the benchmarks share: percentiles, PSS, and the side-by-side table.

use std::time::Duration;

pub fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let idx = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[idx]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Proportional set size of a process.
pub fn pss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("Pss:")
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// One metric of the baseline and of kuasar.
pub struct Row {
    pub metric: String,
    pub runc: f64,
    pub kuasar: f64,
    pub unit: &'static str,
}

/// The median and p90 rows of one latency workload, in milliseconds.
pub fn push_latency_rows(rows: &mut Vec<Row>, what: &str, runc: Vec<f64>, kuasar: Vec<f64>) {
    rows.push(Row {
        metric: format!("{what}, median of {}", runc.len()),
        runc: percentile(runc.clone(), 0.5),
        kuasar: percentile(kuasar.clone(), 0.5),
        unit: "ms",
    });
    rows.push(Row {
        metric: format!("{what}, p90"),
        runc: percentile(runc, 0.9),
        kuasar: percentile(kuasar, 0.9),
        unit: "ms",
    });
}

/// Prints `rows` as a markdown table with the kuasar/baseline ratio.
pub fn print_table(baseline: &str, kuasar: &str, rows: &[Row]) {
    println!("| metric | {baseline} | {kuasar} | ratio |");
    println!("|---|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {:.2} {u} | {:.2} {u} | {:.3}x |",
            r.metric,
            r.runc,
            r.kuasar,
            if r.runc > 0.0 {
                r.kuasar / r.runc
            } else {
                f64::NAN
            },
            u = r.unit
        );
    }
}
