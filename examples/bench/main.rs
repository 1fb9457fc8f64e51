//! dgbit-bus benchmarks: every workload through the bus and as the same
//! traffic over bare NNG (or bare actix), in one run, as ratios.
//!
//! ```text
//! cargo run --release --example bench -- [--quick] [--only NAME[,NAME...]]
//! ```
//!
//! Workloads (names for `--only`): `latency` (1), `throughput` (2, with the
//! Python baseline), `dispatch` (3), `events` (4), `jobs` (5), `memory` (6).
//! `--quick` runs each for a fraction of a second, for CI. The table is
//! markdown, ready for BENCHMARKS.md; the process exits non-zero only when
//! a workload fails to run, never because a target is missed.
//!
//! Traffic goes only to 127.0.0.1 and to ipc paths in fresh temp dirs;
//! every child process is killed before the program ends.

mod commands;
mod cpu;
mod dispatch;
mod events;
mod jobs;
mod memory;
mod raw;
mod server;
mod table;
mod transport;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use table::{failed_row, render, Row};
use transport::Transport;

/// How long each part of a workload runs.
#[derive(Debug, Clone)]
pub struct Budget {
    pub quick: bool,
    /// Measured rounds (after one warm-up round); bus and baseline
    /// alternate round by round.
    pub rounds: usize,
    /// The longest a measured round of one configuration runs.
    pub round: Duration,
    /// Round trips per latency round.
    pub round_trips: usize,
}

impl Budget {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                quick,
                rounds: 1,
                round: Duration::from_millis(200),
                round_trips: 300,
            }
        } else {
            Self {
                quick,
                rounds: 4,
                round: Duration::from_millis(500),
                round_trips: 2000,
            }
        }
    }
}

const WORKLOADS: [&str; 6] = [
    "latency",
    "throughput",
    "dispatch",
    "events",
    "jobs",
    "memory",
];

struct Options {
    quick: bool,
    only: Vec<String>,
}

fn parse_options() -> Result<Options, String> {
    let mut options = Options {
        quick: false,
        only: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => options.quick = true,
            "--only" => {
                let names = args.next().ok_or("--only needs a workload name")?;
                for name in names.split(',').filter(|name| !name.is_empty()) {
                    let name = workload_name(name)?;
                    options.only.push(name.to_string());
                }
            }
            "--help" | "-h" => return Err(String::new()),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(options)
}

/// A workload by name or number.
fn workload_name(name: &str) -> Result<&'static str, String> {
    if let Ok(number) = name.parse::<usize>() {
        if (1..=WORKLOADS.len()).contains(&number) {
            return Ok(WORKLOADS[number - 1]);
        }
    }
    WORKLOADS
        .iter()
        .copied()
        .find(|known| *known == name)
        .ok_or_else(|| format!("unknown workload `{name}`; one of {}", WORKLOADS.join(", ")))
}

fn usage() -> String {
    format!(
        "usage: bench [--quick] [--only NAME[,NAME...]]\nworkloads: {}",
        WORKLOADS.join(", ")
    )
}

fn main() -> ExitCode {
    let options = match parse_options() {
        Ok(options) => options,
        Err(why) => {
            if !why.is_empty() {
                eprintln!("bench: {why}");
            }
            eprintln!("{}", usage());
            return if why.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
    };
    let budget = Budget::new(options.quick);
    let selected = |name: &str| options.only.is_empty() || options.only.iter().any(|n| n == name);

    let started = Instant::now();
    let mut rows: Vec<Row> = Vec::new();
    let mut failures = 0;
    for name in WORKLOADS.iter().copied().filter(|name| selected(name)) {
        eprintln!("bench: {name} ...");
        let section = Instant::now();
        for (label, transport, outcome) in run_workload(name, &budget) {
            match outcome {
                Ok(mut more) => rows.append(&mut more),
                Err(err) => {
                    failures += 1;
                    eprintln!("bench: {name} over {transport} failed: {err:#}");
                    rows.push(failed_row(label, transport, &format!("{err:#}")));
                }
            }
        }
        eprintln!(
            "bench: {name} took {:.1} s",
            section.elapsed().as_secs_f64()
        );
    }

    println!("{}", render(&rows));
    println!(
        "mode: {}; total {:.1} s; {} logical CPUs",
        if budget.quick { "quick" } else { "full" },
        started.elapsed().as_secs_f64(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    let missed: Vec<&Row> = rows.iter().filter(|row| row.missed()).collect();
    for row in &missed {
        println!("target missed: {} over {}", row.workload, row.transport);
    }
    if failures > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

type Outcome = (&'static str, &'static str, anyhow::Result<Vec<Row>>);

/// Run one workload over each of its transports.
fn run_workload(name: &str, budget: &Budget) -> Vec<Outcome> {
    let per_transport =
        |label: &'static str, run: fn(&Budget, Transport) -> anyhow::Result<Vec<Row>>| {
            Transport::ALL
                .iter()
                .map(|transport| (label, transport.name(), run(budget, *transport)))
                .collect::<Vec<_>>()
        };
    match name {
        "latency" => per_transport("1 round trip", commands::round_trip),
        "throughput" => per_transport("2 x32 clients", commands::concurrent),
        "events" => per_transport("4 events", events::fan_out),
        "jobs" => per_transport("5 jobs", jobs::workers),
        "memory" => vec![("6 serve memory", "ipc", memory::peak_memory(budget))],
        "dispatch" => vec![(
            "3 in-process dispatch",
            "in-proc",
            dispatch::in_process(budget),
        )],
        _ => vec![(
            "not yet",
            "-",
            Err(anyhow::anyhow!("workload `{name}` is not built yet")),
        )],
    }
}
