//! The quick start: dgbit-bus doing dgbit's real work, in one process.
//!
//! Run it with `./scripts/quickstart.sh` (which builds it in release mode
//! after the set-up), or `cargo run --release --example quickstart`.
//!
//! # What runs
//!
//! Everything lives in this one process, but the parts talk over NNG as
//! separate processes would:
//!
//! - **the bus**, listening on four fresh ipc addresses (a temp dir, or
//!   `--dir DIR`), with the dgbit-actors handlers: the data service
//!   (`GET_KLINES`, `GET_SYMBOLS`, ...) on the data bus and a
//!   `BacktestActor` for `run_backtest` on the command bus, which is also
//!   the default route of a request with no `command`;
//! - **two workers**, `worker-1` and `worker-2`, each a `JobWorker` on a
//!   thread of its own that dials the command address and leases
//!   `run_backtest` jobs with the lease/report protocol (`src/worker.rs`),
//!   running them on its own `BacktestActor`, which publishes every trade
//!   into the bus as `trade.entered` / `trade.exited`;
//! - **a client**, two `BusClient`s on the command and data addresses: it
//!   asks the data bus which prices it has, enqueues a batch of backtests on
//!   the job queue (`bus.enqueue`), and sends one backtest straight to the
//!   command bus shaped as dgbit's API sends it:
//!   `{"job_uuid", "payload": {"symbol": "EURUSD", "interval": "60",
//!   "limit": 1000}}`, with no `command`.
//!
//! An in-process subscriber to `*` prints one line per job state change
//! while the batch runs and counts every event. At the end come the results
//! table, the event summary and what each worker did; then the workers stop,
//! the bus shuts down (removing its ipc files) and the process exits 0.
//!
//! Every figure is computed from the shipped price data
//! (`actors/fixtures/klines`) and is the same on every run. Which worker ran
//! which job, the timings and the number of `job.progress` events vary.
//!
//! # Options
//!
//! - `--serve`: after the batch, keep the bus and the workers up until
//!   Ctrl-C, for `dgbit-bus tail`, `dgbit-bus send` and
//!   `examples/python_peer.py`.
//! - `--dir DIR`: put the ipc files in DIR instead of a fresh temp dir, so
//!   that their addresses are known before the run;
//! - `--wait-s N`: wait N seconds after the bus is up before the batch. A
//!   subscriber started before the bus (`dgbit-bus tail` with the `--dir`
//!   addresses) redials every few seconds, up to 5; PUB/SUB keeps nothing
//!   for a subscriber that is not connected yet, so with `--wait-s 6` it sees
//!   the whole batch.

#[path = "support/mod.rs"]
mod support;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use anyhow::{bail, Context as _};
use clap::Parser;
use dgbit_actors::backtest::{DEFAULT_FAST, DEFAULT_SLOW};
use dgbit_actors::{
    data_handlers, job_handlers, BacktestActor, KlineStore, ServedCounters, RUN_BACKTEST,
};
use dgbit_bus::bus::{Bus, BusHandle};
use dgbit_bus::client::{BusClient, ClientOptions};
use dgbit_bus::config::{Addresses, BusConfig};
use dgbit_bus::message::{EventSink, StatsQuery};
use dgbit_bus::wire::{CommandReply, Event, JobMessage};
use dgbit_bus::worker::{JobWorker, WorkerOptions, WorkerSummary};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// The names of the two workers.
pub const WORKERS: [&str; 2] = ["worker-1", "worker-2"];

/// How long the whole batch may take before the run counts as failed.
const BATCH_LIMIT: Duration = Duration::from_secs(30);

/// How long a worker may take to stop: its pending lease request ends
/// within its lease wait.
const WORKER_STOP_LIMIT: Duration = Duration::from_secs(10);

/// The longest `--wait-s` honoured.
const MAX_WAIT_S: f64 = 600.0;

/// How long a worker's lease request waits for a job. Short, so that a
/// stopping worker is not held up.
const LEASE_WAIT: Duration = Duration::from_millis(500);

/// One backtest request: the series and the moving-average lengths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backtest {
    pub symbol: &'static str,
    pub interval: &'static str,
    /// The most recent `limit` bars; `None` for the whole series.
    pub limit: Option<usize>,
    pub fast: usize,
    pub slow: usize,
}

impl Backtest {
    const fn new(
        symbol: &'static str,
        interval: &'static str,
        limit: Option<usize>,
        fast: usize,
        slow: usize,
    ) -> Self {
        Self {
            symbol,
            interval,
            limit,
            fast,
            slow,
        }
    }

    /// The `run_backtest` payload asking for this backtest.
    pub fn payload(&self) -> Value {
        let mut payload = json!({
            "symbol": self.symbol, "interval": self.interval, "fast": self.fast, "slow": self.slow,
        });
        if let Some(limit) = self.limit {
            payload["limit"] = limit.into();
        }
        payload
    }
}

/// The batch that goes through the job queue: hourly EURUSD (the last 1000
/// bars, then all 5000) and monthly BTCUSD (all 156 bars), each with several
/// moving-average pairs.
pub const BATCH: [Backtest; 10] = [
    Backtest::new("EURUSD", "60", Some(1000), 5, 20),
    Backtest::new("EURUSD", "60", Some(1000), 10, 30),
    Backtest::new("EURUSD", "60", Some(1000), 20, 50),
    Backtest::new("EURUSD", "60", Some(1000), 50, 100),
    Backtest::new("EURUSD", "60", None, 10, 30),
    Backtest::new("EURUSD", "60", None, 20, 50),
    Backtest::new("EURUSD", "60", None, 50, 200),
    Backtest::new("BTCUSD", "M", None, 3, 10),
    Backtest::new("BTCUSD", "M", None, 6, 12),
    Backtest::new("BTCUSD", "M", None, 10, 30),
];

/// The backtest sent straight to the command bus. Its payload carries no
/// `fast`/`slow`, as dgbit's API sends it, so the strategy's defaults apply.
pub const COMMAND_BACKTEST: Backtest =
    Backtest::new("EURUSD", "60", Some(1000), DEFAULT_FAST, DEFAULT_SLOW);

/// Command-line options.
#[derive(Debug, Clone, Default, Parser)]
#[command(about = "dgbit-bus quick start: a bus, two workers and a client run backtests")]
pub struct Options {
    /// Keep the bus and the workers up after the batch, until Ctrl-C.
    #[arg(long)]
    pub serve: bool,
    /// Put the ipc socket files in this directory (created if missing)
    /// instead of a fresh temp dir.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Seconds to wait after the bus is up before the batch, so that
    /// subscribers started beforehand have connected.
    #[arg(long, default_value_t = 0.0)]
    pub wait_s: f64,
}

/// How a backtest reached its handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    JobQueue,
    CommandBus,
}

/// One line of the results table, read back from the handler's result.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultRow {
    /// `#1` to `#10` for the batch, `cmd` for the command bus.
    pub label: String,
    pub route: Route,
    pub request: Backtest,
    /// The job id, or the command's `job_uuid`.
    pub id: String,
    pub bars: u64,
    pub trades: u64,
    pub win_rate: f64,
    pub net_return: f64,
    pub max_drawdown: f64,
    pub final_equity: f64,
    /// The worker that ran it, or `bus` for the command handler.
    pub worker: String,
}

/// What a run did, for the caller to check.
#[derive(Debug, Clone)]
pub struct Report {
    pub addresses: Addresses,
    /// The data bus's `GET_SYMBOLS` result.
    pub symbols: Value,
    /// The batch in order, then the command bus's backtest.
    pub rows: Vec<ResultRow>,
    /// Events seen by the in-process `*` subscriber, by topic.
    pub event_counts: BTreeMap<String, u64>,
    /// The publisher's counters (`events_published`, `events_dropped`, ...).
    pub publisher: Value,
    /// Each worker's own count of what it did.
    pub workers: Vec<(String, WorkerSummary)>,
    /// From the first enqueue to the last job's end.
    pub batch_time: Duration,
}

fn main() -> anyhow::Result<()> {
    support::init_tracing();
    let options = Options::parse();
    actix::System::new().block_on(async move { run(options).await.map(|_| ()) })
}

/// Start the bus and the workers, run the batch, print everything, stop.
///
/// # Errors
///
/// When the bus cannot start, a client cannot connect, a backtest fails or
/// the batch does not finish within 30 s.
pub async fn run(options: Options) -> anyhow::Result<Report> {
    let stack = Stack::start(options.dir.clone()).await?;
    let mut events = support::tap(&stack.bus, "*")?;
    print_addresses(&stack.addresses);
    if options.wait_s > 0.0 {
        println!("waiting {} s for subscribers to connect", options.wait_s);
        println!();
        actix::clock::sleep(Duration::from_secs_f64(options.wait_s.min(MAX_WAIT_S))).await;
    }

    let outcome = run_batch(&stack, &mut events).await;
    let outcome = match outcome {
        Ok(batch) if options.serve => serve(&stack, &mut events).await.map(|()| batch),
        other => other,
    };
    let workers = stack.stop().await;
    let batch = outcome?;
    let workers = workers?;
    print_workers(&workers);
    println!("bus stopped; its ipc files are removed");
    Ok(Report { workers, ..batch })
}

/// The bus, its two workers and the temp dir holding the ipc files.
pub struct Stack {
    pub bus: BusHandle,
    pub addresses: Addresses,
    workers: Vec<WorkerThread>,
    _dir: Option<tempfile::TempDir>,
}

impl Stack {
    /// Start the bus with the dgbit handlers on fresh addresses (or in
    /// `dir`), wait for its sockets, and start the two workers.
    ///
    /// # Errors
    ///
    /// When the temp dir cannot be made, the bus cannot start or its
    /// sockets do not open within 5 s.
    pub async fn start(dir: Option<PathBuf>) -> anyhow::Result<Self> {
        let (guard, addresses) = match dir {
            Some(dir) => {
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                (None, Addresses::in_dir(&dir))
            }
            None => {
                let (guard, addresses) = support::temp_addresses()?;
                (Some(guard), addresses)
            }
        };
        let store = Arc::new(KlineStore::fixtures());
        let counters = ServedCounters::new();
        let config = BusConfig::default()
            .addresses(addresses.clone())
            .default_command(Some(RUN_BACKTEST.into()));
        let mut builder = Bus::builder(config);
        for (name, handler) in data_handlers(Arc::clone(&store), counters.clone()) {
            builder = builder.data_command(name, handler);
        }
        let bus = builder.start()?;

        // The backtest handler publishes through the bus, so it is
        // registered once the bus (and its event sink) exists.
        let backtest = BacktestActor::new(store, bus.events())
            .with_counters(counters)
            .start();
        bus.command_routes()
            .register(RUN_BACKTEST, backtest.recipient());
        if !bus.wait_for_edges(Duration::from_secs(5)).await {
            bus.shutdown().await;
            bail!("the bus's sockets did not open within 5 s");
        }

        let workers = WORKERS
            .iter()
            .map(|id| WorkerThread::start(id, &addresses.command, bus.events()))
            .collect();
        Ok(Self {
            bus,
            addresses,
            workers,
            _dir: guard,
        })
    }

    /// Stop the workers (each finishes what it runs), then shut the bus
    /// down; returns each worker's summary.
    ///
    /// # Errors
    ///
    /// When a worker could not connect or did not stop in time; the bus is
    /// shut down either way.
    pub async fn stop(self) -> anyhow::Result<Vec<(String, WorkerSummary)>> {
        let mut summaries = Vec::new();
        let mut failure = None;
        for worker in self.workers {
            match worker.stop().await {
                Ok(summary) => summaries.push(summary),
                Err(err) => failure = Some(err),
            }
        }
        self.bus.shutdown().await;
        match failure {
            Some(err) => Err(err),
            None => Ok(summaries),
        }
    }
}

/// A `JobWorker` with its own `BacktestActor`, on an arbiter (a thread) of
/// its own, as a worker process would be.
struct WorkerThread {
    id: &'static str,
    arbiter: Arbiter,
    stop: oneshot::Sender<()>,
    done: oneshot::Receiver<Result<WorkerSummary, String>>,
}

impl WorkerThread {
    fn start(id: &'static str, command_address: &str, events: EventSink) -> Self {
        let arbiter = Arbiter::new();
        let (stop, stop_requested) = oneshot::channel::<()>();
        let (finished, done) = oneshot::channel();
        let url = command_address.to_string();
        arbiter.spawn_fn(move || {
            actix::spawn(async move {
                let outcome = work(id, &url, events, stop_requested).await;
                let _ = finished.send(outcome);
            });
        });
        Self {
            id,
            arbiter,
            stop,
            done,
        }
    }

    async fn stop(self) -> anyhow::Result<(String, WorkerSummary)> {
        let _ = self.stop.send(());
        let outcome = tokio::time::timeout(WORKER_STOP_LIMIT, self.done).await;
        self.arbiter.stop();
        match outcome {
            Ok(Ok(Ok(summary))) => Ok((self.id.to_string(), summary)),
            Ok(Ok(Err(err))) => bail!("{}: {err}", self.id),
            Ok(Err(_)) => bail!("{}: the worker thread ended without a summary", self.id),
            Err(_) => bail!("{} did not stop within {WORKER_STOP_LIMIT:?}", self.id),
        }
    }
}

/// One worker's life: connect, lease and run backtests until asked to stop.
async fn work(
    id: &str,
    url: &str,
    events: EventSink,
    stop_requested: oneshot::Receiver<()>,
) -> Result<WorkerSummary, String> {
    // Each worker reads the price files itself, as a separate process would.
    let store = Arc::new(KlineStore::fixtures());
    let options = WorkerOptions {
        worker_id: id.to_string(),
        concurrency: 1,
        lease_wait: LEASE_WAIT,
        ..WorkerOptions::default()
    };
    let client = ClientOptions::default().connect_attempts(5, Duration::from_millis(100));
    let mut worker = JobWorker::connect(url, options, client)
        .await
        .map_err(|err| err.to_string())?;
    for (job_type, handler) in job_handlers(store, events, ServedCounters::new()) {
        worker = worker.handler(job_type, handler);
    }
    Ok(worker
        .run(async {
            let _ = stop_requested.await;
        })
        .await)
}

fn print_addresses(addresses: &Addresses) {
    println!("dgbit-bus quick start");
    println!();
    println!("bus listening on:");
    println!("  command    {}", addresses.command);
    println!("  event      {}", addresses.event);
    println!("  job queue  {}", addresses.job_queue);
    println!("  data       {}", addresses.data);
    println!("the same addresses for a second terminal (in this directory):");
    for line in support::env_lines(addresses) {
        println!("  {line}");
    }
    println!("  cargo run --release --bin dgbit-bus -- tail '*'");
    println!("(to see this batch, start the tail first and run with --dir and --wait-s;");
    println!("with --serve it sees what comes after the batch)");
    println!();
}

/// Everything but the worker summaries, which come once the workers stop.
async fn run_batch(
    stack: &Stack,
    events: &mut mpsc::UnboundedReceiver<Arc<Event>>,
) -> anyhow::Result<Report> {
    let options = ClientOptions::default()
        .timeout(Duration::from_secs(10))
        .connect_attempts(3, Duration::from_millis(100));
    let client = BusClient::connect(&stack.addresses.command, options.clone()).await?;
    let data = BusClient::connect(&stack.addresses.data, options).await?;

    let symbols = tour_data_bus(&data).await?;

    let started = Instant::now();
    let jobs = enqueue_batch(&client).await?;
    println!("progress (job.* events from an in-process subscriber):");
    let mut watch = BatchWatch::new(jobs, started);
    let (command_row, watched) = tokio::join!(
        backtest_by_command(&client),
        watch.until_done(events, started + BATCH_LIMIT)
    );
    watched?;
    let batch_time = started.elapsed();
    let mut rows = watch.rows()?;
    rows.push(command_row?);
    println!();
    print_table(&rows);
    check_command_matches_batch(&rows);

    let publisher = stack
        .bus
        .publisher()
        .send(StatsQuery)
        .await
        .unwrap_or(Value::Null);
    print_event_summary(&watch.counts, &publisher, &rows);
    println!(
        "batch of {} jobs and 1 command finished in {}",
        BATCH.len(),
        support::millis(batch_time)
    );
    println!();
    Ok(Report {
        addresses: stack.addresses.clone(),
        symbols,
        rows,
        event_counts: watch.counts,
        publisher,
        workers: Vec::new(),
        batch_time,
    })
}

/// Ask the data bus what it holds, and describe each series from its bars.
async fn tour_data_bus(data: &BusClient) -> anyhow::Result<Value> {
    let symbols = data.call("GET_SYMBOLS", json!({})).await?;
    println!("data bus: GET_SYMBOLS, then GET_KLINES for each series");
    let empty = Vec::new();
    for entry in symbols["symbols"].as_array().unwrap_or(&empty) {
        let symbol = entry["symbol"].as_str().unwrap_or("?");
        for interval in entry["intervals"].as_array().unwrap_or(&empty) {
            let interval = interval.as_str().unwrap_or("?");
            let bars = data
                .call(
                    "GET_KLINES",
                    json!({"symbol": symbol, "interval": interval}),
                )
                .await?;
            let bars = bars.as_array().map(Vec::as_slice).unwrap_or_default();
            let (Some(first), Some(last)) = (bars.first(), bars.last()) else {
                println!("  {symbol} {interval}: no bars");
                continue;
            };
            println!(
                "  {symbol:<6} {interval:>2}  {:>5} bars  {} .. {}  close {} .. {}",
                bars.len(),
                first["time"].as_str().unwrap_or("?"),
                last["time"].as_str().unwrap_or("?"),
                first["close"],
                last["close"],
            );
        }
    }
    println!();
    Ok(symbols)
}

/// Enqueue the batch through the command bus; the client names each job
/// (a whole 7-key job is accepted by `bus.enqueue`), so that every event
/// can be labelled from the first.
async fn enqueue_batch(client: &BusClient) -> anyhow::Result<Vec<(String, Backtest)>> {
    let mut jobs = Vec::new();
    for backtest in BATCH {
        let job = JobMessage::new(RUN_BACKTEST, backtest.payload());
        let reply = client.call("bus.enqueue", job.to_value()).await?;
        let id = reply["job_id"].as_str().unwrap_or(&job.job_id).to_string();
        jobs.push((id, backtest));
    }
    println!(
        "client: enqueued {} run_backtest jobs (bus.enqueue on the command bus)",
        jobs.len()
    );
    Ok(jobs)
}

/// Run [`COMMAND_BACKTEST`] as dgbit's API does: no `command`, a
/// `job_uuid`, the payload of the seed.
async fn backtest_by_command(client: &BusClient) -> anyhow::Result<ResultRow> {
    let job_uuid = uuid::Uuid::new_v4().to_string();
    let request = json!({
        "job_uuid": job_uuid,
        "payload": {"symbol": "EURUSD", "interval": "60", "limit": 1000},
    });
    let reply = client.send_json(&request).await?;
    let (echo, result) = match reply {
        CommandReply::Ok { echo, result } => (echo, result),
        CommandReply::Error { code, error, .. } => {
            bail!("the command bus answered {code}: {error}")
        }
    };
    if echo.job_uuid.as_deref() != Some(job_uuid.as_str()) {
        bail!("the reply echoed {:?}, not {job_uuid}", echo.job_uuid);
    }
    println!(
        "client: command bus answered status ok for job_uuid {job_uuid} (no `command`: default route run_backtest)"
    );
    row_from_result(
        "cmd",
        Route::CommandBus,
        COMMAND_BACKTEST,
        job_uuid,
        "bus",
        &result,
    )
}

/// Read a result row from a `run_backtest` result.
fn row_from_result(
    label: &str,
    route: Route,
    request: Backtest,
    id: String,
    worker: &str,
    result: &Value,
) -> anyhow::Result<ResultRow> {
    let number = |key: &str| {
        result[key]
            .as_f64()
            .with_context(|| format!("the result of {label} has no number `{key}`: {result}"))
    };
    let count = |key: &str| {
        result[key]
            .as_u64()
            .with_context(|| format!("the result of {label} has no count `{key}`: {result}"))
    };
    Ok(ResultRow {
        label: label.to_string(),
        route,
        request,
        id,
        bars: count("bars")?,
        trades: count("total_trades")?,
        win_rate: number("win_rate")?,
        net_return: number("net_return")?,
        max_drawdown: number("max_drawdown")?,
        final_equity: number("final_equity")?,
        worker: worker.to_string(),
    })
}

/// How a batch job ended.
#[derive(Debug, Clone)]
enum Outcome {
    Completed { worker: String, result: Value },
    Failed { worker: String, error: String },
}

/// Follows the batch through its events: prints state changes, counts
/// every event, keeps each job's outcome.
struct BatchWatch {
    jobs: Vec<(String, Backtest)>,
    index: HashMap<String, usize>,
    outcomes: HashMap<usize, Outcome>,
    counts: BTreeMap<String, u64>,
    started: Instant,
}

impl BatchWatch {
    fn new(jobs: Vec<(String, Backtest)>, started: Instant) -> Self {
        let index = jobs
            .iter()
            .enumerate()
            .map(|(n, (id, _))| (id.clone(), n))
            .collect();
        Self {
            jobs,
            index,
            outcomes: HashMap::new(),
            counts: BTreeMap::new(),
            started,
        }
    }

    /// Take events until every job has ended, or fail at `deadline`.
    async fn until_done(
        &mut self,
        events: &mut mpsc::UnboundedReceiver<Arc<Event>>,
        deadline: Instant,
    ) -> anyhow::Result<()> {
        while self.outcomes.len() < self.jobs.len() {
            let Some(event) = support::next_matching(events, deadline, |_| true).await else {
                bail!(
                    "{} of {} jobs unfinished after {BATCH_LIMIT:?}",
                    self.jobs.len() - self.outcomes.len(),
                    self.jobs.len()
                );
            };
            self.take(&event);
        }
        Ok(())
    }

    fn take(&mut self, event: &Event) {
        *self.counts.entry(event.event_type.clone()).or_default() += 1;
        let Some(&n) = self.index.get(support::data_str(event, "job_id")) else {
            return;
        };
        if !event.event_type.starts_with("job.") {
            return;
        }
        if let Some(change) = self.state_change(n, event) {
            let at = support::millis(self.started.elapsed());
            println!("  {at:>9}  {}  {change}", job_label(n, &self.jobs[n].1));
        }
    }

    /// The printed state change of job `n`, recording its outcome.
    fn state_change(&mut self, n: usize, event: &Event) -> Option<String> {
        let worker = support::data_str(event, "worker").to_string();
        match event.event_type.as_str() {
            "job.queued" => Some(match support::data_str(event, "reason") {
                "enqueued" => "queued".to_string(),
                reason => format!("queued again ({reason})"),
            }),
            "job.started" => Some(format!("started on {worker}")),
            "job.completed" => {
                let result = event.data.get("result").cloned().unwrap_or(Value::Null);
                let line = format!(
                    "completed on {worker}: {} trades, net {}",
                    result["total_trades"],
                    support::signed_percent(result["net_return"].as_f64().unwrap_or(0.0))
                );
                self.outcomes
                    .insert(n, Outcome::Completed { worker, result });
                Some(line)
            }
            "job.failed" => {
                let error = support::data_str(event, "error").to_string();
                let will_retry = event.data.get("will_retry") == Some(&json!(true));
                let line = format!("failed on {worker}: {error} (will retry: {will_retry})");
                if !will_retry {
                    self.outcomes.insert(n, Outcome::Failed { worker, error });
                }
                Some(line)
            }
            "job.cancelled" => {
                let error = "cancelled".to_string();
                self.outcomes.insert(n, Outcome::Failed { worker, error });
                Some("cancelled".into())
            }
            _ => None,
        }
    }

    /// One row per job, in batch order.
    ///
    /// # Errors
    ///
    /// When a job failed, naming it and its error.
    fn rows(&self) -> anyhow::Result<Vec<ResultRow>> {
        let mut rows = Vec::new();
        for (n, (id, backtest)) in self.jobs.iter().enumerate() {
            let label = format!("#{}", n + 1);
            match &self.outcomes[&n] {
                Outcome::Completed { worker, result } => rows.push(row_from_result(
                    &label,
                    Route::JobQueue,
                    *backtest,
                    id.clone(),
                    worker,
                    result,
                )?),
                Outcome::Failed { worker, error } => {
                    bail!("job {label} ({id}) failed on {worker}: {error}")
                }
            }
        }
        Ok(rows)
    }
}

fn job_label(n: usize, backtest: &Backtest) -> String {
    let bars = backtest
        .limit
        .map_or_else(|| "all".to_string(), |limit| limit.to_string());
    format!(
        "#{:<2} {:<6} {:>2} {:>4} bars {:>3}/{:<3}",
        n + 1,
        backtest.symbol,
        backtest.interval,
        bars,
        backtest.fast,
        backtest.slow
    )
}

fn print_table(rows: &[ResultRow]) {
    println!("results (SMA crossover, long only, 0.1% fee per side, from 10 000):");
    println!(
        "  {:<4} {:<8} {:<7} {:>8} {:>5} {:>9} {:>6} {:>8} {:>10} {:>8}  ran on",
        "job",
        "via",
        "symbol",
        "interval",
        "bars",
        "fast/slow",
        "trades",
        "win rate",
        "net return",
        "max dd",
    );
    for row in rows {
        let via = match row.route {
            Route::JobQueue => "queue",
            Route::CommandBus => "command",
        };
        println!(
            "  {:<4} {:<8} {:<7} {:>8} {:>5} {:>9} {:>6} {:>8} {:>10} {:>8}  {}",
            row.label,
            via,
            row.request.symbol,
            row.request.interval,
            row.bars,
            format!("{}/{}", row.request.fast, row.request.slow),
            row.trades,
            support::percent(row.win_rate),
            support::signed_percent(row.net_return),
            support::percent(row.max_drawdown),
            row.worker
        );
    }
}

/// The command bus ran the same backtest as job #2; say whether the figures
/// agree (they are computed by the same code from the same bars).
fn check_command_matches_batch(rows: &[ResultRow]) {
    let Some(command) = rows.iter().find(|row| row.route == Route::CommandBus) else {
        return;
    };
    let twin = rows
        .iter()
        .find(|row| row.route == Route::JobQueue && row.request == command.request);
    if let Some(twin) = twin {
        let same = twin.trades == command.trades
            && (twin.net_return - command.net_return).abs() < 1e-12
            && (twin.max_drawdown - command.max_drawdown).abs() < 1e-12;
        let verdict = if same {
            "the same figures"
        } else {
            "DIFFERENT figures"
        };
        println!(
            "  the command bus's backtest and job {} (same request) gave {verdict}",
            twin.label
        );
    }
    println!();
}

fn print_event_summary(counts: &BTreeMap<String, u64>, publisher: &Value, rows: &[ResultRow]) {
    println!("event stream (what the in-process `*` subscriber saw; it subscribed after");
    println!("the bus published service.started):");
    for (topic, count) in counts {
        println!("  {topic:<15} {count:>6}");
    }
    let total: u64 = counts.values().sum();
    println!("  {:<15} {total:>6}", "total");
    let trades: u64 = rows.iter().map(|row| row.trades).sum();
    println!(
        "  trades in the table: {trades}; trade.exited events: {}",
        counts.get("trade.exited").copied().unwrap_or(0)
    );
    println!(
        "publisher: {} published, {} delivered in-process, {} dropped, {} not sent to remote subscribers",
        publisher["events_published"],
        publisher["events_delivered"],
        publisher["events_dropped"],
        publisher["edge_send_failures"],
    );
    println!();
}

fn print_workers(workers: &[(String, WorkerSummary)]) {
    println!("workers:");
    for (id, summary) in workers {
        println!(
            "  {id}: leased {}, completed {}, failed {}, reports lost {}",
            summary.leased, summary.completed, summary.failed, summary.reports_lost
        );
    }
}

/// Keep serving until Ctrl-C, printing job state changes as they come.
async fn serve(
    stack: &Stack,
    events: &mut mpsc::UnboundedReceiver<Arc<Event>>,
) -> anyhow::Result<()> {
    println!("serving until Ctrl-C; from another terminal (in this directory):");
    for line in support::env_lines(&stack.addresses) {
        println!("  {line}");
    }
    println!("  cargo run --release --bin dgbit-bus -- tail '*'");
    println!("  cargo run --release --bin dgbit-bus -- send run_backtest '{{\"symbol\": \"BTCUSD\", \"interval\": \"M\"}}'");
    println!("  python3 examples/python_peer.py");
    println!();
    let signal = dgbit_bus::cli::serve::wait_for_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            () = &mut signal => break,
            event = events.recv() => match event {
                Some(event) => print_served_event(&event),
                None => break,
            },
        }
    }
    println!("stopping");
    Ok(())
}

fn print_served_event(event: &Event) {
    let change = match event.event_type.as_str() {
        "job.queued" | "job.started" | "job.completed" | "job.failed" | "job.cancelled" => {
            &event.event_type["job.".len()..]
        }
        _ => return,
    };
    let job_id = support::data_str(event, "job_id");
    println!(
        "  {}  {:<8} {:<12} {:<9} {}",
        event.timestamp,
        job_id.get(..8).unwrap_or(job_id),
        support::data_str(event, "job_type"),
        change,
        support::data_str(event, "worker"),
    );
}
