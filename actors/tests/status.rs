//! `StatusActor` answering `status`, with no socket.

mod common;

use actix::prelude::*;
use common::{call, fixtures};
use dgbit_actors::{DataService, ServedCounters, StatusActor};
use serde_json::json;

#[actix_rt::test]
async fn status_names_the_worker_and_its_process() {
    let status = StatusActor::new("backtest-worker-1").start();
    let report = call(&status, "status", json!({})).await.unwrap();

    assert_eq!(report["worker"], json!("backtest-worker-1"));
    assert_eq!(report["pid"], json!(std::process::id()));
    // The actor was made a moment ago.
    assert!(report["uptime_seconds"].as_u64().unwrap() < 60, "{report}");
    if let Some(hostname) = report.get("hostname") {
        assert!(!hostname.as_str().unwrap().is_empty(), "{report}");
    }
}

#[actix_rt::test]
async fn status_counts_its_own_calls() {
    let status = StatusActor::new("w").start();
    call(&status, "status", json!({})).await.unwrap();
    let report = call(&status, "status", json!({})).await.unwrap();
    assert_eq!(report["commands_served"], json!({"status": 2}));
    assert_eq!(report["total_served"], json!(2));
}

#[actix_rt::test]
async fn status_counts_the_commands_of_every_actor_sharing_its_counters() {
    let counters = ServedCounters::new();
    let data = DataService::new(fixtures())
        .with_counters(counters.clone())
        .start();
    let status = StatusActor::new("w").with_counters(counters).start();

    call(&data, "ping", json!({})).await.unwrap();
    call(
        &data,
        "GET_KLINES",
        json!({"symbol": "EURUSD", "interval": "60", "limit": 1}),
    )
    .await
    .unwrap();
    // A refused command was still served.
    call(&data, "GET_KLINES", json!({})).await.unwrap_err();
    let report = call(&status, "status", json!({})).await.unwrap();

    assert_eq!(
        report["commands_served"],
        json!({"GET_KLINES": 2, "ping": 1, "status": 1})
    );
    assert_eq!(report["jobs_run"], json!({}));
    assert_eq!(report["total_served"], json!(4));
}
