//! The `(name, recipient)` lists that a bus registers.

mod common;

use common::{fixtures, Recording};
use dgbit_actors::{command_handlers, data_handlers, job_handlers, ServedCounters};
use dgbit_bus::message::{Command, EventSink, ProgressReporter, RunJob};
use dgbit_bus::wire::JobMessage;
use serde_json::json;

#[actix_rt::test]
async fn data_handlers_register_every_data_command_on_one_shared_service() {
    let handlers = data_handlers(fixtures(), ServedCounters::new());
    let names: Vec<&str> = handlers.iter().map(|(name, _)| *name).collect();
    assert_eq!(
        names,
        [
            "GET_KLINES",
            "GET_SYMBOLS",
            "GET_TICKERS",
            "BACKFILL",
            "GET_CACHE_STATUS",
            "CLEAR_CACHE",
            "ping"
        ]
    );
    let recipient = |wanted: &str| {
        handlers
            .iter()
            .find(|(name, _)| *name == wanted)
            .map(|(_, r)| r.clone())
            .unwrap()
    };

    let payload = json!({"symbol": "EURUSD", "interval": "60", "limit": 5});
    recipient("GET_KLINES")
        .send(Command::new("GET_KLINES", payload))
        .await
        .unwrap()
        .unwrap();
    let status = recipient("GET_CACHE_STATUS")
        .send(Command::new("GET_CACHE_STATUS", json!({})))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status["entries"], json!(1));
}

#[actix_rt::test]
async fn command_handlers_serve_run_backtest_and_a_status_that_counts_it() {
    let handlers = command_handlers(
        fixtures(),
        EventSink::discard(),
        "worker-a",
        ServedCounters::new(),
    );
    let names: Vec<&str> = handlers.iter().map(|(name, _)| *name).collect();
    assert_eq!(names, ["run_backtest", "status"]);

    let payload = json!({"symbol": "EURUSD", "interval": "60", "limit": 200});
    let result = handlers[0]
        .1
        .send(Command::new("run_backtest", payload))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(result["bars"], json!(200));
    let status = handlers[1]
        .1
        .send(Command::new("status", json!({})))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status["worker"], json!("worker-a"));
    assert_eq!(
        status["commands_served"],
        json!({"run_backtest": 1, "status": 1})
    );
}

#[actix_rt::test]
async fn job_handlers_run_backtest_jobs_and_publish_their_trades() {
    let mut recording = Recording::start();
    let counters = ServedCounters::new();
    let handlers = job_handlers(fixtures(), recording.sink(), counters.clone());
    assert_eq!(handlers.len(), 1);
    assert_eq!(handlers[0].0, "run_backtest");

    let job = JobMessage::new(
        "run_backtest",
        json!({"symbol": "EURUSD", "interval": "60"}),
    );
    let run = RunJob {
        job,
        progress: ProgressReporter::discard(),
    };
    let result = handlers[0].1.send(run).await.unwrap().unwrap();

    assert_eq!(result["bars"], json!(5000));
    let trades = result["total_trades"].as_u64().unwrap() as usize;
    assert_eq!(recording.events_so_far().await.len(), 2 * trades);
    assert_eq!(counters.snapshot().jobs["run_backtest"], 1);
}
