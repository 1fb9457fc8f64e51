//! Results: one row per workload and transport, printed as a markdown table
//! so that a run can be pasted into BENCHMARKS.md as it is.

use std::fmt::Write as _;
use std::time::Duration;

/// What a workload's target asks of the bus/raw ratio.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// The ratio must not exceed this (latencies: lower is better).
    AtMost(f64),
    /// The ratio must reach this (rates: higher is better).
    AtLeast(f64),
    /// A figure for the record, with no target.
    None,
}

impl Target {
    fn verdict(self, ratio: f64) -> &'static str {
        match self {
            Target::AtMost(limit) if ratio <= limit => "met",
            Target::AtLeast(limit) if ratio >= limit => "met",
            Target::None => "",
            _ => "MISSED",
        }
    }

    fn describe(self) -> String {
        match self {
            Target::AtMost(limit) => format!("<= {limit}"),
            Target::AtLeast(limit) => format!(">= {limit}"),
            Target::None => String::new(),
        }
    }
}

/// The 50th and 99th percentile of a set of latencies.
#[derive(Debug, Clone, Copy)]
pub struct Tail {
    pub p50: Duration,
    pub p99: Duration,
}

impl Tail {
    /// Percentiles of `samples` (sorted in place); `None` when empty.
    pub fn of(samples: &mut [Duration]) -> Option<Tail> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let at = |fraction: f64| {
            let index = ((samples.len() - 1) as f64 * fraction).round() as usize;
            samples[index]
        };
        Some(Tail {
            p50: at(0.50),
            p99: at(0.99),
        })
    }

    fn describe(self) -> String {
        format!("{}/{}", micros(self.p50), micros(self.p99))
    }
}

/// One measured figure, bus against its baseline.
#[derive(Debug, Clone)]
pub struct Row {
    /// Workload number and name, e.g. `1 round trip p50`.
    pub workload: String,
    /// `ipc`, `tcp` or `in-proc`.
    pub transport: &'static str,
    /// Unit of `bus` and `raw`, e.g. `us` or `req/s`.
    pub unit: &'static str,
    pub bus: f64,
    /// The baseline: raw NNG, bare actix, or the Python server.
    pub raw: f64,
    pub target: Target,
    pub bus_tail: Option<Tail>,
    pub raw_tail: Option<Tail>,
    /// Drops, sample counts, what the baseline was.
    pub note: String,
}

impl Row {
    pub fn new(workload: impl Into<String>, transport: &'static str, unit: &'static str) -> Self {
        Self {
            workload: workload.into(),
            transport,
            unit,
            bus: f64::NAN,
            raw: f64::NAN,
            target: Target::None,
            bus_tail: None,
            raw_tail: None,
            note: String::new(),
        }
    }

    pub fn figures(mut self, bus: f64, raw: f64) -> Self {
        self.bus = bus;
        self.raw = raw;
        self
    }

    pub fn target(mut self, target: Target) -> Self {
        self.target = target;
        self
    }

    pub fn tails(mut self, bus: Option<Tail>, raw: Option<Tail>) -> Self {
        self.bus_tail = bus;
        self.raw_tail = raw;
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = note.into();
        self
    }

    pub fn ratio(&self) -> f64 {
        self.bus / self.raw
    }

    /// Whether the row has a target and misses it.
    pub fn missed(&self) -> bool {
        self.target.verdict(self.ratio()) == "MISSED"
    }
}

/// A row that only reports a failure (a workload that could not run).
pub fn failed_row(workload: &str, transport: &'static str, why: &str) -> Row {
    Row::new(workload, transport, "-").note(format!("did not run: {why}"))
}

/// The rows as a markdown table.
pub fn render(rows: &[Row]) -> String {
    let mut out = String::new();
    out.push_str(
        "| workload | transport | unit | bus | baseline | bus/baseline | target | \
         bus p50/p99 us | baseline p50/p99 us | notes |\n",
    );
    out.push_str("|---|---|---|---:|---:|---:|---|---|---|---|\n");
    for row in rows {
        let ratio = row.ratio();
        let target = match row.target {
            Target::None => String::new(),
            target => format!("{} {}", target.describe(), target.verdict(ratio)),
        };
        let tail = |tail: Option<Tail>| tail.map(Tail::describe).unwrap_or_default();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.workload,
            row.transport,
            row.unit,
            figure(row.bus),
            figure(row.raw),
            if ratio.is_finite() {
                format!("{ratio:.2}")
            } else {
                "-".into()
            },
            target,
            tail(row.bus_tail),
            tail(row.raw_tail),
            row.note,
        );
    }
    out
}

/// A figure with as many digits as it deserves.
fn figure(value: f64) -> String {
    if !value.is_finite() {
        "-".into()
    } else if value >= 1000.0 {
        format!("{:.0}", value)
    } else if value >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

/// A duration in whole microseconds, as text.
pub fn micros(duration: Duration) -> String {
    format!("{:.0}", duration.as_secs_f64() * 1e6)
}
