//! `BacktestActor` serving `run_backtest` commands and jobs, with no socket.

mod common;

use std::sync::{Arc, Mutex};

use actix::prelude::*;
use common::{call, fixtures, Recording};
use dgbit_actors::backtest::{self, StrategyParams};
use dgbit_actors::BacktestActor;
use dgbit_bus::message::{Command, EventSink, ProgressReporter, RunJob};
use dgbit_bus::wire::{Event, JobMessage};
use serde_json::{json, Value};

fn seed_payload() -> Value {
    json!({"symbol": "EURUSD", "interval": "60", "limit": 1000})
}

fn quiet_actor() -> Addr<BacktestActor> {
    BacktestActor::new(fixtures(), EventSink::discard()).start()
}

/// Topics and times of trade events, e.g. `("trade.entered", "2017-...")`.
fn topics_and_times(events: &[Event]) -> Vec<(String, String)> {
    events
        .iter()
        .map(|event| {
            (
                event.event_type.clone(),
                event.data["time"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The same `(topic, time)` pairs, expected from a result's trade list.
fn expected_from_trades(result: &Value) -> Vec<(String, String)> {
    let mut expected = Vec::new();
    for trade in result["trades"].as_array().unwrap() {
        expected.push((
            "trade.entered".to_string(),
            trade["entry_time"].as_str().unwrap().into(),
        ));
        expected.push((
            "trade.exited".to_string(),
            trade["exit_time"].as_str().unwrap().into(),
        ));
    }
    expected
}

#[actix_rt::test]
async fn run_backtest_on_the_seed_payload_reports_the_pure_functions_figures() {
    let result = call(&quiet_actor(), "run_backtest", seed_payload())
        .await
        .unwrap();

    let series = fixtures().series("EURUSD", "60").unwrap();
    let expected = backtest::run(&series[4000..], &StrategyParams::default()).unwrap();
    assert_eq!(result["bars"], json!(1000));
    assert_eq!(result["first_bar_time"], json!(series[4000].time));
    assert_eq!(result["last_bar_time"], json!("2018-02-07 15:00:00"));
    assert_eq!(
        result["strategy"],
        json!({"name": "sma_crossover", "fast": 10, "slow": 30, "fee": 0.001})
    );
    assert_eq!(result["total_trades"], json!(expected.total_trades));
    assert_eq!(result["net_return"], json!(expected.net_return));
    assert_eq!(result["max_drawdown"], json!(expected.max_drawdown));
    assert_eq!(
        result["trades"],
        serde_json::to_value(&expected.trades).unwrap()
    );
    println!(
        "EURUSD 60 limit 1000: trades {} win_rate {} net_return {} max_drawdown {} final_equity {}",
        result["total_trades"],
        result["win_rate"],
        result["net_return"],
        result["max_drawdown"],
        result["final_equity"]
    );
}

#[actix_rt::test]
async fn run_backtest_publishes_an_entered_and_an_exited_event_per_trade() {
    let mut recording = Recording::start();
    let actor = BacktestActor::new(fixtures(), recording.sink()).start();
    let mut command = Command::new("run_backtest", seed_payload());
    command.request.job_uuid = Some("550e8400-e29b-41d4-a716-446655440000".into());

    let result = actor.send(command).await.unwrap().unwrap();
    let events = recording.events_so_far().await;

    assert!(!events.is_empty());
    assert_eq!(topics_and_times(&events), expected_from_trades(&result));
    let first_trade = &result["trades"][0];
    let entered = &events[0];
    assert_eq!(entered.source, "backtest");
    assert_eq!(
        entered.correlation_id.as_deref(),
        Some("550e8400-e29b-41d4-a716-446655440000")
    );
    assert_eq!(
        Value::Object(entered.data.clone()),
        json!({"job_id": "550e8400-e29b-41d4-a716-446655440000", "symbol": "EURUSD",
               "interval": "60", "side": "long", "price": first_trade["entry_price"],
               "time": first_trade["entry_time"]})
    );
    let exited = &events[1].data;
    assert_eq!(exited["price"], first_trade["exit_price"]);
    assert_eq!(exited["entry_price"], first_trade["entry_price"]);
    assert_eq!(exited["return"], first_trade["return"]);
    assert_eq!(exited["reason"], first_trade["exit_reason"]);
}

#[actix_rt::test]
async fn a_run_backtest_job_reports_progress_and_tags_its_events_with_the_job_id() {
    let mut recording = Recording::start();
    let actor = BacktestActor::new(fixtures(), recording.sink())
        .with_source("worker-7")
        .start();
    let reports = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&reports);
    let progress = ProgressReporter::new(move |data| sink.lock().unwrap().push(data));
    let job = JobMessage::new("run_backtest", seed_payload());
    let job_id = job.job_id.clone();

    let result = actor.send(RunJob { job, progress }).await.unwrap().unwrap();
    let events = recording.events_so_far().await;

    let percents: Vec<Value> = reports
        .lock()
        .unwrap()
        .iter()
        .map(|r| r["percent"].clone())
        .collect();
    assert_eq!(percents, [json!(25), json!(50), json!(75), json!(100)]);
    assert_eq!(
        reports.lock().unwrap()[3],
        json!({"percent": 100, "bars_done": 1000, "bars_total": 1000})
    );
    assert_eq!(topics_and_times(&events), expected_from_trades(&result));
    for event in &events {
        assert_eq!(event.correlation_id.as_deref(), Some(job_id.as_str()));
        assert_eq!(event.data["job_id"], json!(job_id));
        assert_eq!(event.source, "worker-7");
    }
}

#[actix_rt::test]
async fn a_command_without_an_identity_publishes_events_with_a_null_job_id() {
    let mut recording = Recording::start();
    let actor = BacktestActor::new(fixtures(), recording.sink()).start();
    call(&actor, "run_backtest", seed_payload()).await.unwrap();
    let events = recording.events_so_far().await;
    assert!(!events.is_empty());
    assert!(events
        .iter()
        .all(|e| e.correlation_id.is_none() && e.data["job_id"].is_null()));
}

#[actix_rt::test]
async fn strategy_overrides_in_the_payload_change_the_run() {
    let payload = json!({"symbol": "BTCUSD", "interval": "M", "fast": 3, "slow": 12,
                         "fee": 0, "initial_capital": 100});
    let result = call(&quiet_actor(), "run_backtest", payload).await.unwrap();

    let series = fixtures().series("BTCUSD", "M").unwrap();
    let params = StrategyParams {
        fast: 3,
        slow: 12,
        fee: 0.0,
        initial_capital: 100.0,
    };
    let expected = backtest::run(&series, &params).unwrap();
    assert_eq!(
        result["strategy"],
        json!({"name": "sma_crossover", "fast": 3, "slow": 12, "fee": 0.0})
    );
    assert_eq!(result["bars"], json!(156));
    assert_eq!(result["final_equity"], json!(expected.final_equity));
    assert_eq!(result["total_trades"], json!(expected.total_trades));
}

#[actix_rt::test]
async fn parameters_that_cannot_run_are_a_bad_request() {
    let actor = quiet_actor();
    let payloads = [
        json!({"symbol": "EURUSD", "interval": "60", "fast": 30, "slow": 10}),
        json!({"symbol": "EURUSD", "interval": "60", "fast": 0}),
        json!({"symbol": "EURUSD", "interval": "60", "fee": "0.1%"}),
        json!({"symbol": "EURUSD", "interval": "60", "fee": 1.5}),
        json!({"symbol": "EURUSD", "interval": "60", "initial_capital": -5}),
        json!({"symbol": "EURUSD", "interval": "60", "limit": -1}),
        json!({"interval": "60"}),
    ];
    for payload in payloads {
        let err = call(&actor, "run_backtest", payload.clone())
            .await
            .unwrap_err();
        assert_eq!(err.code, "bad_request", "{payload}: {}", err.message);
    }
}

#[actix_rt::test]
async fn the_seeds_btcusdt_example_is_not_found() {
    let payload = json!({"symbol": "BTCUSDT", "interval": "15", "limit": 1000});
    let err = call(&quiet_actor(), "run_backtest", payload)
        .await
        .unwrap_err();
    assert_eq!(err.code, "not_found");
    assert!(err.message.contains("BTCUSDT_15.csv"), "{}", err.message);
}

#[actix_rt::test]
async fn a_job_with_a_bad_payload_fails_with_bad_request_and_publishes_nothing() {
    let mut recording = Recording::start();
    let actor = BacktestActor::new(fixtures(), recording.sink()).start();
    let job = JobMessage::new("run_backtest", json!({"symbol": 42, "interval": "60"}));
    let outcome = actor
        .send(RunJob {
            job,
            progress: ProgressReporter::discard(),
        })
        .await
        .unwrap();
    assert_eq!(outcome.unwrap_err().code, "bad_request");
    assert!(recording.events_so_far().await.is_empty());
}
