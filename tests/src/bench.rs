//! What the benchmarks share: their command line, percentiles, PSS, and
//! the side-by-side table.

use std::time::Duration;

use crate::Version;

/// A benchmark's command line, read flag by flag:
///
/// ```text
/// let mut args = Args::from_env("kuasar-bench", "[--containerd 1.6|2.1] [--serial N]");
/// while let Some(flag) = args.next_flag() {
///     match flag.as_str() {
///         "--containerd" => o.version = args.version(),
///         "--serial" => o.serial = args.number(),
///         _ => args.unknown(),
///     }
/// }
/// ```
///
/// `-h`/`--help` prints the usage and exits 0; a bad value prints what is
/// wrong and the usage and exits 2.
pub struct Args {
    prog: &'static str,
    usage: &'static str,
    args: std::vec::IntoIter<String>,
    flag: String,
}

impl Args {
    /// The process's arguments; `usage` is the line after `usage: PROG`.
    pub fn from_env(prog: &'static str, usage: &'static str) -> Args {
        Args::new(prog, usage, std::env::args().skip(1).collect())
    }

    pub fn new(prog: &'static str, usage: &'static str, args: Vec<String>) -> Args {
        Args {
            prog,
            usage,
            args: args.into_iter(),
            flag: String::new(),
        }
    }

    /// The next flag; handles `-h` and `--help` itself.
    pub fn next_flag(&mut self) -> Option<String> {
        self.flag = self.args.next()?;
        if self.flag == "-h" || self.flag == "--help" {
            eprintln!("usage: {} {}", self.prog, self.usage);
            std::process::exit(0)
        }
        Some(self.flag.clone())
    }

    /// The value of the current flag.
    pub fn value(&mut self) -> String {
        match self.args.next() {
            Some(v) => v,
            None => self.fail(&format!("{} needs a value", self.flag)),
        }
    }

    pub fn number(&mut self) -> usize {
        let v = self.value();
        self.parse_number(&v)
    }

    /// A number of at least 1.
    pub fn count(&mut self) -> usize {
        let n = self.number();
        if n == 0 {
            self.fail(&format!("{} takes at least 1", self.flag))
        }
        n
    }

    /// A comma-separated list of numbers (`1,10,50`).
    pub fn numbers(&mut self) -> Vec<usize> {
        let v = self.value();
        v.split(',')
            .filter(|s| !s.is_empty())
            .map(|n| self.parse_number(n))
            .collect()
    }

    /// A comma-separated list of words.
    pub fn list(&mut self) -> Vec<String> {
        self.value()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// A containerd version: `1.6` or `2.1`.
    pub fn version(&mut self) -> Version {
        let v = self.value();
        Version::parse(&v).unwrap_or_else(|| self.fail(&format!("unknown containerd version {v}")))
    }

    /// The current flag is not one of the program's.
    pub fn unknown(&self) -> ! {
        self.fail(&format!("unknown argument {}", self.flag))
    }

    pub fn fail(&self, msg: &str) -> ! {
        eprintln!("{}: {msg}", self.prog);
        eprintln!("usage: {} {}", self.prog, self.usage);
        std::process::exit(2)
    }

    fn parse_number(&self, v: &str) -> usize {
        v.parse()
            .unwrap_or_else(|_| self.fail(&format!("{} takes numbers, not {v:?}", self.flag)))
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Args {
        Args::new("t", "", v.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn flags_and_their_values_are_read_in_order() {
        let mut a = args(&[
            "--containerd",
            "2.1",
            "--n",
            "7",
            "--pss",
            "1,10,,50",
            "--b",
            "x,y",
        ]);
        assert_eq!(a.next_flag().as_deref(), Some("--containerd"));
        assert_eq!(a.version(), Version::V2_1);
        assert_eq!(a.next_flag().as_deref(), Some("--n"));
        assert_eq!(a.count(), 7);
        assert_eq!(a.next_flag().as_deref(), Some("--pss"));
        assert_eq!(a.numbers(), vec![1, 10, 50]);
        assert_eq!(a.next_flag().as_deref(), Some("--b"));
        assert_eq!(a.list(), vec!["x", "y"]);
        assert_eq!(a.next_flag(), None);
    }
}
