//! CPU time of this process, per thread group, from `/proc/self/task`.
//!
//! On a shared machine wall-clock rates move with everyone else's load;
//! CPU time spent per request moves much less, so the bench reports it
//! beside the rates. Resolution is one clock tick (10 ms at Linux's
//! `USER_HZ` of 100), fine for runs of a second or more.

use std::collections::BTreeMap;
use std::time::Duration;

/// Linux's `USER_HZ` (`getconf CLK_TCK`), 100 on every mainstream build.
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU time used so far by each group of this process's threads, grouped
/// by name: `nng` (every NNG thread), `bus` (the bench's bus thread),
/// `other` (the bench's own threads: clients, subscribers, workers).
#[derive(Debug, Clone, Default)]
pub struct CpuSample {
    pub by_group: BTreeMap<&'static str, Duration>,
}

impl CpuSample {
    /// Read every thread's user and system time. Threads that ended since
    /// the last sample are not counted, so sample around a run whose
    /// threads outlive it.
    pub fn now() -> Self {
        let mut sample = Self::default();
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            return sample;
        };
        for task in tasks.flatten() {
            let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
                continue;
            };
            if let Some((name, used)) = parse_stat(&stat) {
                *sample.by_group.entry(group(&name)).or_default() += used;
            }
        }
        sample
    }

    /// CPU used by each group between `earlier` and `self`.
    pub fn since(&self, earlier: &CpuSample) -> CpuUse {
        let by_group = self
            .by_group
            .iter()
            .map(|(group, used)| {
                let before = earlier.by_group.get(group).copied().unwrap_or_default();
                (*group, used.saturating_sub(before))
            })
            .collect();
        CpuUse { by_group }
    }
}

/// CPU used over some runs, per thread group.
#[derive(Debug, Clone, Default)]
pub struct CpuUse {
    by_group: BTreeMap<&'static str, Duration>,
}

impl CpuUse {
    pub fn add(&mut self, other: &CpuUse) {
        for (group, used) in &other.by_group {
            *self.by_group.entry(group).or_default() += *used;
        }
    }

    pub fn total(&self) -> Duration {
        self.by_group.values().sum()
    }

    /// Microseconds of CPU per operation, in total and by group, e.g.
    /// `31 us CPU/op (bus 12, nng 14, other 5)`.
    pub fn per_operation(&self, operations: u64) -> String {
        if operations == 0 {
            return "no CPU figure".into();
        }
        let micros = |used: Duration| used.as_secs_f64() * 1e6 / operations as f64;
        let groups: Vec<String> = self
            .by_group
            .iter()
            .filter(|(_, used)| !used.is_zero())
            .map(|(group, used)| format!("{group} {:.0}", micros(*used)))
            .collect();
        format!(
            "{:.0} us CPU/op ({})",
            micros(self.total()),
            groups.join(", ")
        )
    }
}

fn group(name: &str) -> &'static str {
    if name.starts_with("nng:") {
        "nng"
    } else if name.starts_with("bench-bus") {
        "bus"
    } else {
        "other"
    }
}

/// The thread name and user + system time of one `/proc/.../stat` line.
fn parse_stat(stat: &str) -> Option<(String, Duration)> {
    // The name sits in parentheses and may contain spaces; the fields
    // after it are space separated, utime and stime being the 12th and
    // 13th of them.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat[open + 1..close].to_string();
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some((name, Duration::from_secs_f64(ticks / TICKS_PER_SECOND)))
}
