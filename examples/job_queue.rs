//! The job queue: several workers share one queue, urgent jobs go first,
//! and a slow worker cannot hoard jobs.
//!
//! `cargo run --example job_queue`
//!
//! The job, `window_stats`, summarises one window of 200 hourly EURUSD bars
//! from the shipped price data: mean, highest and lowest close. 24 jobs are
//! enqueued before any worker starts, 4 of them urgent (priority 2), 4 high
//! (priority 1) and 16 normal, interleaved. Then three `JobWorker`s dial the
//! command bus and lease jobs with the lease/report protocol: `fast-1` and
//! `fast-2` take 20 ms per job, `slow` takes 200 ms (each worker's pace is
//! an added wait, standing in for a slower machine).
//!
//! What it shows, from the `job.*` events:
//! - the start order: every urgent job before every high one, every high
//!   one before every normal one (first in, first out within a priority);
//! - fair sharing: a worker asks for a job only when it has a free slot, so
//!   the slow worker never holds more than its one slot and the fast ones
//!   run most of the batch.

#[path = "support/mod.rs"]
mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use dgbit_actors::KlineStore;
use dgbit_bus::bus::Bus;
use dgbit_bus::client::{BusClient, ClientOptions};
use dgbit_bus::config::BusConfig;
use dgbit_bus::message::{HandlerError, RunJob};
use dgbit_bus::wire::{JobMessage, Priority};
use dgbit_bus::worker::{JobWorker, WorkerOptions, WorkerSummary};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::time::Instant;

/// The job type of this example.
const WINDOW_STATS: &str = "window_stats";

/// Jobs in the batch, and bars per job.
const JOBS: usize = 24;
const WINDOW: usize = 200;

/// The workers and their pace per job.
const WORKERS: [(&str, Duration); 3] = [
    ("fast-1", Duration::from_millis(20)),
    ("fast-2", Duration::from_millis(20)),
    ("slow", Duration::from_millis(200)),
];

/// How long the batch may take.
const BATCH_LIMIT: Duration = Duration::from_secs(20);

/// Summarises a window of bars, then waits out its pace.
struct WindowStats {
    store: Arc<KlineStore>,
    pace: Duration,
}

impl Actor for WindowStats {
    type Context = Context<Self>;
}

impl Handler<RunJob> for WindowStats {
    type Result = ResponseFuture<Result<Value, HandlerError>>;

    fn handle(&mut self, run: RunJob, _ctx: &mut Self::Context) -> Self::Result {
        let outcome = window_stats(&self.store, &run.job.payload);
        let pace = self.pace;
        Box::pin(async move {
            actix::clock::sleep(pace).await;
            outcome
        })
    }
}

fn window_stats(
    store: &KlineStore,
    payload: &serde_json::Map<String, Value>,
) -> Result<Value, HandlerError> {
    let from = payload.get("from").and_then(Value::as_u64).unwrap_or(0) as usize;
    let bars = store.series("EURUSD", "60")?;
    let window = bars
        .get(from..from + WINDOW)
        .ok_or_else(|| HandlerError::bad_request(format!("no {WINDOW} bars from bar {from}")))?;
    let closes = window.iter().map(|bar| bar.close);
    let mean = closes.clone().sum::<f64>() / WINDOW as f64;
    Ok(json!({
        "first_bar": window[0].time,
        "mean_close": mean,
        "high_close": closes.clone().fold(f64::MIN, f64::max),
        "low_close": closes.fold(f64::MAX, f64::min),
    }))
}

/// How one job went.
#[derive(Debug, Clone)]
pub struct JobRun {
    pub job_id: String,
    pub priority: Priority,
    pub worker: String,
    pub result: Value,
}

/// What the run showed.
#[derive(Debug, Clone)]
pub struct Report {
    /// Jobs in the order they started.
    pub started: Vec<JobRun>,
    /// The queue depth before any worker started.
    pub depth_before: u64,
    /// Per worker: jobs completed, and the most it held at once.
    pub per_worker: BTreeMap<String, (u64, u64)>,
    /// Each worker's own summary.
    pub summaries: Vec<(String, WorkerSummary)>,
}

fn main() -> anyhow::Result<()> {
    support::init_tracing();
    actix::System::new().block_on(async { run().await.map(|_| ()) })
}

/// Enqueue the batch, run it on three workers, print what happened.
///
/// # Errors
///
/// When the bus cannot start, a worker cannot connect, or the batch does
/// not finish within 20 s.
pub async fn run() -> anyhow::Result<Report> {
    let (_dir, addresses) = support::temp_addresses()?;
    let bus = Bus::builder(BusConfig::default().addresses(addresses.clone())).start()?;
    anyhow::ensure!(
        bus.wait_for_edges(Duration::from_secs(5)).await,
        "the bus's sockets did not open"
    );
    let mut events = support::tap(&bus, "job.*")?;

    let mut priorities = HashMap::new();
    for n in 0..JOBS {
        let priority = match n % 6 {
            1 => Priority::Urgent,
            4 => Priority::High,
            _ => Priority::Normal,
        };
        let job =
            JobMessage::new(WINDOW_STATS, json!({"from": n * WINDOW})).with_priority(priority);
        let id = bus.enqueue(job).await?;
        priorities.insert(id, priority);
    }
    let client = BusClient::connect(&addresses.command, ClientOptions::default()).await?;
    let depth_before = client.call("bus.jobs", json!({})).await?["queue_depth"]
        .as_u64()
        .unwrap_or(0);
    println!("enqueued {JOBS} jobs (4 urgent, 4 high, 16 normal); bus.jobs says queue_depth {depth_before}");

    let store = Arc::new(KlineStore::fixtures());
    let mut workers = Vec::new();
    for (id, pace) in WORKERS {
        workers.push(start_worker(id, pace, &addresses.command, &store).await?);
    }
    println!("started workers: fast-1 and fast-2 (20 ms per job), slow (200 ms per job)");

    let watched = watch(&mut events, &priorities).await;
    let mut summaries = Vec::new();
    for (id, stop, done) in workers {
        let _ = stop.send(());
        if let Ok(summary) = done.await {
            summaries.push((id.to_string(), summary));
        }
    }
    bus.shutdown().await;

    let (started, per_worker) = watched?;
    print_report(&started, &per_worker);
    Ok(Report {
        started,
        depth_before,
        per_worker,
        summaries,
    })
}

type RunningWorker = (
    &'static str,
    oneshot::Sender<()>,
    oneshot::Receiver<WorkerSummary>,
);

/// Connect a worker and run it until its stop sender fires.
async fn start_worker(
    id: &'static str,
    pace: Duration,
    command_address: &str,
    store: &Arc<KlineStore>,
) -> anyhow::Result<RunningWorker> {
    let options = WorkerOptions {
        worker_id: id.to_string(),
        concurrency: 1,
        lease_wait: Duration::from_millis(200),
        ..WorkerOptions::default()
    };
    let handler = WindowStats {
        store: Arc::clone(store),
        pace,
    }
    .start();
    let worker = JobWorker::connect(command_address, options, ClientOptions::default())
        .await?
        .handler(WINDOW_STATS, handler.recipient());
    let (stop, stop_requested) = oneshot::channel::<()>();
    let (finished, done) = oneshot::channel();
    actix::spawn(async move {
        let summary = worker
            .run(async {
                let _ = stop_requested.await;
            })
            .await;
        let _ = finished.send(summary);
    });
    Ok((id, stop, done))
}

/// Follow the jobs until all completed: the start order, and per worker
/// the jobs completed and the most held at once.
async fn watch(
    events: &mut tokio::sync::mpsc::UnboundedReceiver<Arc<dgbit_bus::wire::Event>>,
    priorities: &HashMap<String, Priority>,
) -> anyhow::Result<(Vec<JobRun>, BTreeMap<String, (u64, u64)>)> {
    let deadline = Instant::now() + BATCH_LIMIT;
    let mut started: Vec<JobRun> = Vec::new();
    let mut held: HashMap<String, u64> = HashMap::new();
    let mut per_worker: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut completed = 0;
    while completed < JOBS {
        let Some(event) = support::next_matching(events, deadline, |_| true).await else {
            anyhow::bail!("{completed} of {JOBS} jobs completed within {BATCH_LIMIT:?}");
        };
        let job_id = support::data_str(&event, "job_id").to_string();
        let worker = support::data_str(&event, "worker").to_string();
        match event.event_type.as_str() {
            "job.started" => {
                let now_held = held.entry(worker.clone()).or_default();
                *now_held += 1;
                let entry = per_worker.entry(worker.clone()).or_default();
                entry.1 = entry.1.max(*now_held);
                let priority = priorities.get(&job_id).copied().unwrap_or_default();
                started.push(JobRun {
                    job_id,
                    priority,
                    worker,
                    result: Value::Null,
                });
            }
            "job.completed" => {
                *held.entry(worker.clone()).or_default() -= 1;
                per_worker.entry(worker).or_default().0 += 1;
                if let Some(run) = started.iter_mut().find(|run| run.job_id == job_id) {
                    run.result = event.data.get("result").cloned().unwrap_or(Value::Null);
                }
                completed += 1;
            }
            "job.failed" => anyhow::bail!(
                "job {job_id} failed: {}",
                support::data_str(&event, "error")
            ),
            _ => {}
        }
    }
    Ok((started, per_worker))
}

fn print_report(started: &[JobRun], per_worker: &BTreeMap<String, (u64, u64)>) {
    let order: Vec<&str> = started
        .iter()
        .map(|run| match run.priority {
            Priority::Urgent => "U",
            Priority::High => "H",
            Priority::Normal => "n",
        })
        .collect();
    println!();
    println!(
        "start order (U urgent, H high, n normal): {}",
        order.join(" ")
    );
    println!();
    println!("jobs per worker:");
    for (worker, (completed, most_held)) in per_worker {
        println!("  {worker:<7} completed {completed:>2}, most held at once {most_held}");
    }
    let round_robin = JOBS / WORKERS.len();
    println!(
        "  (a plain round-robin split would have handed `slow` {round_robin} jobs, \
         {} ms of work at its pace)",
        round_robin as u128 * WORKERS[2].1.as_millis()
    );
    println!();
    println!("the first three windows:");
    let mut by_start: Vec<&JobRun> = started.iter().collect();
    by_start.sort_by_key(|run| run.result["first_bar"].as_str().unwrap_or("").to_string());
    for run in by_start.iter().take(3) {
        println!(
            "  from {}: mean close {:.5}, high {:.5}, low {:.5} (ran on {})",
            run.result["first_bar"].as_str().unwrap_or("?"),
            run.result["mean_close"].as_f64().unwrap_or(f64::NAN),
            run.result["high_close"].as_f64().unwrap_or(f64::NAN),
            run.result["low_close"].as_f64().unwrap_or(f64::NAN),
            run.worker,
        );
    }
}
