//! Dead letters: a job that keeps failing runs out of retries, lands in the
//! dead letter queue, is listed and inspected, and is replayed once the
//! fault is fixed.
//!
//! `cargo run --example dead_letters`
//!
//! The fault is a missing price file. The bus runs `run_backtest` jobs
//! in-process on a `BacktestActor` whose `KlineStore` reads a fresh
//! directory holding only `EURUSD_60.csv`. A backtest of BTCUSD monthly
//! with `max_retries` 2 fails three times (`not_found`), with the retry
//! delays doubling (1 s, then 2 s), and is buried in the dead letter store
//! (a SQLite file in the temp dir). An operator lists it and reads its
//! attempt history over the command bus (`bus.dlq.list`, `bus.dlq.show`;
//! `dgbit-bus dlq list` and `dgbit-bus dlq show ID` do the same), copies
//! the missing file into place, and replays it (`bus.dlq.replay`): the job
//! goes back into the queue with `retry_count` 0 and completes. The run
//! takes about 3 s, mostly the retry delays.

#[path = "support/mod.rs"]
mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use anyhow::Context as _;
use dgbit_actors::{BacktestActor, KlineStore, RUN_BACKTEST};
use dgbit_bus::bus::Bus;
use dgbit_bus::client::{BusClient, ClientOptions};
use dgbit_bus::config::BusConfig;
use dgbit_bus::wire::{Event, JobMessage};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Retries after the first attempt before the job is buried.
const MAX_RETRIES: u32 = 2;

/// How long any one wait of this example may take.
const WAIT_LIMIT: Duration = Duration::from_secs(15);

/// What the run showed.
#[derive(Debug, Clone)]
pub struct Report {
    pub job_id: String,
    /// Each `job.failed` event's data, in order.
    pub failures: Vec<Value>,
    /// The dead letter entry, as `bus.dlq.show` returned it.
    pub entry: Value,
    /// The `bus.dlq.replay` result.
    pub replay: Value,
    /// The backtest result once replayed.
    pub result: Value,
    /// `bus.dlq.list`'s total after the replay.
    pub left_after_replay: u64,
}

fn main() -> anyhow::Result<()> {
    support::init_tracing();
    actix::System::new().block_on(async { run().await.map(|_| ()) })
}

/// Fail, bury, list, fix, replay; print each step.
///
/// # Errors
///
/// When the bus cannot start, or a step does not happen within 15 s.
pub async fn run() -> anyhow::Result<Report> {
    let (dir, addresses) = support::temp_addresses()?;
    let prices = dir.path().join("klines");
    std::fs::create_dir(&prices)?;
    std::fs::copy(fixture("EURUSD_60.csv"), prices.join("EURUSD_60.csv"))?;
    let dead_letter_file = dir.path().join("dead_letters.sqlite");

    let config = BusConfig::default()
        .addresses(addresses.clone())
        .dead_letter_path(&dead_letter_file);
    let bus = Bus::builder(config).start()?;
    let backtest = BacktestActor::new(Arc::new(KlineStore::new(&prices)), bus.events()).start();
    bus.register_worker(RUN_BACKTEST, backtest.recipient(), 1)
        .await
        .context("registering the worker")?;
    anyhow::ensure!(
        bus.wait_for_edges(Duration::from_secs(5)).await,
        "the bus's sockets did not open"
    );
    let mut events = support::tap(&bus, "job.*")?;
    let client = BusClient::connect(&addresses.command, ClientOptions::default()).await?;
    println!("prices in {} (EURUSD_60.csv only)", prices.display());
    println!("dead letters in {}", dead_letter_file.display());
    println!();

    let outcome = fail_bury_fix_replay(&bus, &client, &mut events, &prices).await;
    bus.shutdown().await;
    outcome
}

async fn fail_bury_fix_replay(
    bus: &dgbit_bus::bus::BusHandle,
    client: &BusClient,
    events: &mut mpsc::UnboundedReceiver<Arc<Event>>,
    prices: &Path,
) -> anyhow::Result<Report> {
    let payload = json!({"symbol": "BTCUSD", "interval": "M", "fast": 6, "slow": 12});
    let job = JobMessage::new(RUN_BACKTEST, payload).with_max_retries(MAX_RETRIES);
    let job_id = bus.enqueue(job).await?;
    println!("enqueued run_backtest BTCUSD M (max_retries {MAX_RETRIES}): {job_id}");
    let failures = wait_until_given_up(events, &job_id).await?;

    let entry_id = wait_for_dead_letter(client, &job_id).await?;
    let entry = client.call("bus.dlq.show", json!({"id": entry_id})).await?;
    let text = |value: &Value| value.as_str().unwrap_or("?").to_string();
    println!("bus.dlq.show: error: {}", text(&entry["error"]));
    for attempt in entry["attempts"].as_array().into_iter().flatten() {
        println!(
            "  attempt {} on {}: {}",
            attempt["attempt"],
            text(&attempt["worker"]),
            text(&attempt["outcome"])
        );
    }
    println!();

    std::fs::copy(fixture("BTCUSD_M.csv"), prices.join("BTCUSD_M.csv"))?;
    println!("fix: copied BTCUSD_M.csv into {}", prices.display());
    let replay = client
        .call("bus.dlq.replay", json!({"id": entry_id}))
        .await?;
    println!("bus.dlq.replay: {replay}");
    let result = wait_until_completed(events, &job_id).await?;
    println!(
        "completed after the replay: {} bars, {} trades, net return {}, max drawdown {}",
        result["bars"],
        result["total_trades"],
        support::signed_percent(result["net_return"].as_f64().unwrap_or(f64::NAN)),
        support::percent(result["max_drawdown"].as_f64().unwrap_or(f64::NAN)),
    );
    let left = client.call("bus.dlq.list", json!({})).await?["total"]
        .as_u64()
        .unwrap_or(u64::MAX);
    println!("dead letters left: {left}");
    Ok(Report {
        job_id,
        failures,
        entry,
        replay,
        result,
        left_after_replay: left,
    })
}

/// Print each `job.failed` of `job_id` until one says it will not be
/// retried; returns their data.
async fn wait_until_given_up(
    events: &mut mpsc::UnboundedReceiver<Arc<Event>>,
    job_id: &str,
) -> anyhow::Result<Vec<Value>> {
    let deadline = Instant::now() + WAIT_LIMIT;
    let started = Instant::now();
    let mut failures = Vec::new();
    loop {
        let failed = support::next_matching(events, deadline, |event| {
            event.event_type == "job.failed" && support::data_str(event, "job_id") == job_id
        })
        .await
        .context("the job did not fail as expected")?;
        let data = Value::Object(failed.data.clone());
        let will_retry = data["will_retry"] == json!(true);
        println!(
            "  {:>9}  job.failed  retry_count {}  will_retry {:<5}  retry_in_ms {:<4}  {}",
            support::millis(started.elapsed()),
            data["retry_count"],
            will_retry,
            data["retry_in_ms"],
            data["error"].as_str().unwrap_or("?"),
        );
        failures.push(data);
        if !will_retry {
            println!();
            return Ok(failures);
        }
    }
}

/// Poll `bus.dlq.list` until the job's entry is stored; returns its id.
async fn wait_for_dead_letter(client: &BusClient, job_id: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + WAIT_LIMIT;
    loop {
        let list = client.call("bus.dlq.list", json!({})).await?;
        let entry = list["entries"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|entry| entry["job_id"] == job_id);
        if let Some(entry) = entry {
            let text = |key: &str| entry[key].as_str().unwrap_or("?").to_string();
            println!(
                "bus.dlq.list: {} entry: {} {}, buried at {} after {} attempts",
                list["total"],
                text("job_type"),
                text("id"),
                text("timestamp"),
                entry["attempts"]
            );
            return Ok(entry["id"].as_str().unwrap_or_default().to_string());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no dead letter within {WAIT_LIMIT:?}"
        );
        actix::clock::sleep(Duration::from_millis(20)).await;
    }
}

/// Wait for `job.completed` of `job_id` and return its result.
async fn wait_until_completed(
    events: &mut mpsc::UnboundedReceiver<Arc<Event>>,
    job_id: &str,
) -> anyhow::Result<Value> {
    let deadline = Instant::now() + WAIT_LIMIT;
    let completed = support::next_matching(events, deadline, |event| {
        support::data_str(event, "job_id") == job_id
            && matches!(event.event_type.as_str(), "job.completed" | "job.failed")
    })
    .await
    .context("the replayed job did not finish")?;
    anyhow::ensure!(
        completed.event_type == "job.completed",
        "the replayed job failed: {}",
        support::data_str(&completed, "error")
    );
    Ok(completed.data.get("result").cloned().unwrap_or(Value::Null))
}

/// A file of dgbit-actors' shipped price data.
fn fixture(name: &str) -> std::path::PathBuf {
    KlineStore::fixtures().dir().join(name)
}
