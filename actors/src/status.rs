//! `StatusActor`, the `status` command: who this worker is and what it served.
//!
//! The counts come from a [`ServedCounters`] that the other handler actors of
//! this crate share: give the same set to each of them (as
//! [`crate::command_handlers`] and [`crate::data_handlers`] do) and `status`
//! reports every command and job they handled.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use actix::prelude::*;
use dgbit_bus::message::{Command, HandlerError};
use serde::Serialize;
use serde_json::{json, Value};

/// The command name this actor is meant to be registered under.
pub const STATUS: &str = "status";

/// How many commands and jobs, by name, the actors sharing this set handled.
///
/// Every command and job is counted when it arrives, whatever its outcome.
/// Clones share one set.
#[derive(Debug, Clone, Default)]
pub struct ServedCounters {
    tallies: Arc<Mutex<ServedSnapshot>>,
}

/// A copy of the counts at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ServedSnapshot {
    /// Commands by command name.
    pub commands: BTreeMap<String, u64>,
    /// Jobs by job type.
    pub jobs: BTreeMap<String, u64>,
}

impl ServedSnapshot {
    /// Commands and jobs together.
    pub fn total(&self) -> u64 {
        self.commands.values().chain(self.jobs.values()).sum()
    }
}

impl ServedCounters {
    /// A new, empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Count one command called `name`.
    pub fn record_command(&self, name: &str) {
        *self.lock().commands.entry(name.to_string()).or_default() += 1;
    }

    /// Count one job of type `job_type`.
    pub fn record_job(&self, job_type: &str) {
        *self.lock().jobs.entry(job_type.to_string()).or_default() += 1;
    }

    /// The counts now.
    pub fn snapshot(&self) -> ServedSnapshot {
        self.lock().clone()
    }

    fn lock(&self) -> MutexGuard<'_, ServedSnapshot> {
        // An increment cannot leave the maps half-updated, so a lock poisoned
        // by a panic elsewhere still guards consistent counts.
        self.tallies.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Answers `status` with this worker's identity, uptime and served counts.
///
/// Result: `{"worker": <name>, "pid": <u32>, "hostname": <text, left out
/// when unknown>, "uptime_seconds": <whole seconds since construction>,
/// "commands_served": {<name>: <count>}, "jobs_run": {<type>: <count>},
/// "total_served": <count>}`. The `status` call being answered is counted.
/// The payload is ignored, and so is the command's name: register the actor
/// only under the name meant to reach it.
#[derive(Debug)]
pub struct StatusActor {
    worker: String,
    hostname: Option<String>,
    started: Instant,
    counters: ServedCounters,
}

impl StatusActor {
    /// A status actor for the worker called `worker`, with its own counters.
    pub fn new(worker: impl Into<String>) -> Self {
        Self {
            worker: worker.into(),
            hostname: hostname(),
            started: Instant::now(),
            counters: ServedCounters::new(),
        }
    }

    /// Report (and add to) `counters` instead of a private set.
    pub fn with_counters(mut self, counters: ServedCounters) -> Self {
        self.counters = counters;
        self
    }

    fn report(&self) -> Value {
        let served = self.counters.snapshot();
        let mut report = json!({
            "worker": self.worker,
            "pid": std::process::id(),
        });
        if let Some(hostname) = &self.hostname {
            report["hostname"] = json!(hostname);
        }
        report["uptime_seconds"] = json!(self.started.elapsed().as_secs());
        report["total_served"] = json!(served.total());
        report["commands_served"] = json!(served.commands);
        report["jobs_run"] = json!(served.jobs);
        report
    }
}

/// The host's name from `HOSTNAME`, else from Linux's `/proc`; `None` when
/// neither is available (std has no portable call for it).
fn hostname() -> Option<String> {
    let from_env = std::env::var("HOSTNAME").ok();
    let from_proc = || std::fs::read_to_string("/proc/sys/kernel/hostname").ok();
    from_env
        .or_else(from_proc)
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
}

impl Actor for StatusActor {
    type Context = Context<Self>;
}

impl Handler<Command> for StatusActor {
    type Result = Result<Value, HandlerError>;

    fn handle(&mut self, command: Command, _ctx: &mut Self::Context) -> Self::Result {
        self.counters.record_command(&command.name);
        tracing::debug!(command = %command.name, worker = %self.worker, "status requested");
        Ok(self.report())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_of_a_counter_set_count_into_the_same_tallies() {
        let counters = ServedCounters::new();
        let clone = counters.clone();
        counters.record_command("GET_KLINES");
        clone.record_command("GET_KLINES");
        clone.record_job("run_backtest");
        let snapshot = counters.snapshot();
        assert_eq!(snapshot.commands["GET_KLINES"], 2);
        assert_eq!(snapshot.jobs["run_backtest"], 1);
        assert_eq!(snapshot.total(), 3);
    }
}
