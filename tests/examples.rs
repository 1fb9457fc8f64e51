//! The examples run to completion, and what they report is what happened.
//!
//! Each example keeps its logic in a `run` function that returns a report;
//! this file includes the example's source as a module and calls it, with a
//! deadline, inside its own actix system. Building the examples themselves
//! is `cargo build --examples`. The Python tests run pynng peers against a
//! bus in this process.

// Every example includes examples/support/mod.rs itself, so this file, which
// includes the examples, loads it once per example.
#![allow(clippy::duplicate_mod)]

mod common;

#[allow(dead_code)]
#[path = "../examples/actix_web.rs"]
mod actix_web;
#[allow(dead_code)]
#[path = "../examples/command_reply.rs"]
mod command_reply;
#[allow(dead_code)]
#[path = "../examples/dead_letters.rs"]
mod dead_letters;
#[allow(dead_code)]
#[path = "../examples/job_queue.rs"]
mod job_queue;
#[allow(dead_code)]
#[path = "../examples/pub_sub.rs"]
mod pub_sub;
#[allow(dead_code)]
#[path = "../examples/quickstart.rs"]
mod quickstart;
#[allow(dead_code)]
#[path = "../examples/supervision.rs"]
mod supervision;

use std::future::Future;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use dgbit_actors::backtest::{self, BacktestReport, StrategyParams};
use dgbit_actors::{command_handlers, data_handlers, KlineStore, ServedCounters};
use dgbit_bus::bus::Bus;
use dgbit_bus::config::{Addresses, BusConfig};
use dgbit_bus::wire::Priority;
use serde_json::{json, Value};

/// Finish `run` within `limit`, or fail the test.
async fn within<T>(limit: Duration, run: impl Future<Output = anyhow::Result<T>>) -> T {
    match tokio::time::timeout(limit, run).await {
        Ok(Ok(report)) => report,
        Ok(Err(err)) => panic!("the example failed: {err:#}"),
        Err(_) => panic!("the example did not finish within {limit:?}"),
    }
}

/// The backtest the handler runs for this request, computed directly.
fn direct_backtest(request: &quickstart::Backtest) -> BacktestReport {
    let bars = KlineStore::fixtures()
        .series(request.symbol, request.interval)
        .expect("the fixtures hold the series");
    let keep = request
        .limit
        .map_or(bars.len(), |limit| limit.min(bars.len()));
    let params = StrategyParams {
        fast: request.fast,
        slow: request.slow,
        ..StrategyParams::default()
    };
    backtest::run(&bars[bars.len() - keep..], &params).expect("valid parameters")
}

/// Equal up to what a JSON round trip of an `f64` may change.
fn assert_same(actual: f64, expected: f64, what: &str) {
    let tolerance = 1e-12 * expected.abs().max(1.0);
    assert!(
        (actual - expected).abs() <= tolerance,
        "{what}: {actual} != {expected}"
    );
}

#[actix_rt::test]
async fn the_quick_start_runs_every_backtest_with_the_figures_of_a_direct_run() {
    let report = within(Duration::from_secs(60), quickstart::run(Default::default())).await;

    assert_eq!(report.rows.len(), quickstart::BATCH.len() + 1);
    for (row, request) in report.rows.iter().zip(quickstart::BATCH) {
        assert_eq!(row.request, request);
        assert_eq!(row.route, quickstart::Route::JobQueue);
        assert!(
            quickstart::WORKERS.contains(&row.worker.as_str()),
            "{row:?}"
        );
    }
    let command = report.rows.last().unwrap();
    assert_eq!(command.route, quickstart::Route::CommandBus);
    assert_eq!(command.request, quickstart::COMMAND_BACKTEST);
    for row in &report.rows {
        let expected = direct_backtest(&row.request);
        let what = |figure: &str| format!("{} {figure}", row.label);
        assert_eq!(row.bars, expected.bars as u64, "{}", what("bars"));
        assert_eq!(
            row.trades,
            expected.total_trades as u64,
            "{}",
            what("trades")
        );
        assert_same(row.win_rate, expected.win_rate, &what("win rate"));
        assert_same(row.net_return, expected.net_return, &what("net return"));
        assert_same(
            row.max_drawdown,
            expected.max_drawdown,
            &what("max drawdown"),
        );
        assert_same(
            row.final_equity,
            expected.final_equity,
            &what("final equity"),
        );
    }

    let counts = &report.event_counts;
    let trades: u64 = report.rows.iter().map(|row| row.trades).sum();
    assert_eq!(counts["trade.exited"], trades);
    assert_eq!(counts["trade.entered"], trades);
    for topic in ["job.created", "job.queued", "job.started", "job.completed"] {
        assert_eq!(counts[topic], quickstart::BATCH.len() as u64, "{topic}");
    }
    assert_eq!(report.publisher["events_dropped"], json!(0));
    let completed: u64 = report.workers.iter().map(|(_, s)| s.completed).sum();
    assert_eq!(completed, quickstart::BATCH.len() as u64);
    assert_eq!(report.symbols["symbols"].as_array().map(Vec::len), Some(2));
}

#[actix_rt::test]
async fn command_reply_shows_each_reply_code_and_runs_a_duplicate_once() {
    let report = within(Duration::from_secs(30), command_reply::run()).await;
    let code = |case: &str| report.reply(case)["code"].clone();

    assert_eq!(
        report.reply("ok")["result"],
        json!({"units": 20.0, "at_risk": 100.0})
    );
    assert_eq!(report.reply("default_route")["job_uuid"], "size-1");
    assert_eq!(report.reply("default_route")["status"], "ok");
    assert_eq!(code("bad_payload"), "bad_request");
    assert_eq!(code("own_code"), "risk_limit");
    assert_eq!(report.reply("own_code")["request_id"], "r-9");
    assert_eq!(code("unknown_command"), "unknown_command");
    assert_eq!(code("slow"), "timeout");
    assert_eq!(code("not_json"), "bad_request");
    assert_eq!(report.reply("builtin_ping")["result"]["pong"], true);
    assert_eq!(report.reply("first_of_two"), report.reply("second_of_two"));
    // ok, default_route, bad_payload, own_code and the first of the two.
    assert_eq!(report.sizer_runs, 5);
}

#[actix_rt::test]
async fn pub_sub_delivers_each_event_to_every_matching_pattern_and_counts_drops() {
    let report = within(Duration::from_secs(30), pub_sub::run()).await;
    let got = |subscriber: &str| report.received[subscriber].clone();

    assert_eq!(got("job.*"), ["job.created", "job.completed", "job.failed"]);
    assert_eq!(got("*.failed"), ["job.failed"]);
    assert_eq!(got("*").len(), 8);
    assert_eq!(
        got("remote trade.*"),
        ["trade.entered", "trade.exited", "trade.signal"]
    );
    assert!(report.probes >= 1);
    assert_eq!(report.slow_delivered + report.slow_dropped, 50);
    assert!(report.slow_dropped > 0, "{report:?}");
    assert_eq!(
        report.publisher["events_dropped"],
        json!(report.slow_dropped)
    );
}

#[actix_rt::test]
async fn job_queue_starts_urgent_then_high_then_normal_and_the_slow_worker_never_hoards() {
    let report = within(Duration::from_secs(60), job_queue::run()).await;

    assert_eq!(report.depth_before, 24);
    let priorities: Vec<Priority> = report.started.iter().map(|run| run.priority).collect();
    let mut sorted = priorities.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(priorities, sorted, "jobs started out of priority order");
    assert_eq!(report.started.len(), 24);
    for (worker, (completed, most_held)) in &report.per_worker {
        assert_eq!(*most_held, 1, "{worker} held more than its one slot");
        assert!(*completed >= 1, "{worker} ran nothing");
    }
    let (slow, _) = report.per_worker["slow"];
    let (fast, _) = report.per_worker["fast-1"];
    assert!(slow < fast, "slow ran {slow}, fast-1 {fast}");
    assert!(report
        .started
        .iter()
        .all(|run| run.result["mean_close"].is_number()));
}

#[actix_rt::test]
async fn dead_letters_bury_a_job_after_its_retries_and_a_replay_completes_it_once_fixed() {
    let report = within(Duration::from_secs(60), dead_letters::run()).await;

    let will_retry: Vec<&Value> = report.failures.iter().map(|f| &f["will_retry"]).collect();
    assert_eq!(will_retry, [&json!(true), &json!(true), &json!(false)]);
    assert_eq!(report.failures[0]["retry_in_ms"], json!(1000));
    assert_eq!(report.failures[1]["retry_in_ms"], json!(2000));
    assert_eq!(report.entry["original_job"]["job_id"], json!(report.job_id));
    assert_eq!(report.entry["attempts"].as_array().map(Vec::len), Some(3));
    assert!(report.entry["error"].as_str().unwrap().contains("BTCUSD"));
    assert_eq!(report.replay["failed"], json!([]));

    let expected = direct_backtest(&quickstart::Backtest {
        symbol: "BTCUSD",
        interval: "M",
        limit: None,
        fast: 6,
        slow: 12,
    });
    assert_eq!(report.result["total_trades"], json!(expected.total_trades));
    assert_same(
        report.result["net_return"].as_f64().unwrap(),
        expected.net_return,
        "net return",
    );
    assert_eq!(report.left_after_replay, 0);
}

#[actix_rt::test]
async fn supervision_restarts_a_panicking_handler_after_its_delay_and_it_serves_again() {
    let report = within(Duration::from_secs(30), supervision::run()).await;

    assert_eq!(report.first_answer["status"], "ok");
    assert_eq!(report.recoveries.len(), 2);
    for (round, recovery) in report.recoveries.iter().enumerate() {
        assert_eq!(recovery.crash_reply["code"], "handler_failed");
        assert_eq!(recovery.during_restart["code"], "handler_failed");
        assert!(recovery.during_restart["error"]
            .as_str()
            .unwrap()
            .contains("restarting"));
        assert_eq!(recovery.ping_during_restart["status"], "ok");
        assert_eq!(recovery.alert["attempt"], json!(round + 1));
        // 200 ms doubling, ±10% jitter.
        let nominal = 200.0 * 2f64.powi(round as i32);
        let delay = recovery.alert["delay_ms"].as_f64().unwrap();
        assert!((nominal * 0.9..=nominal * 1.1).contains(&delay), "{delay}");
        assert!(
            recovery.gap.as_secs_f64() * 1000.0 >= delay * 0.9,
            "{recovery:?}"
        );
    }
    assert_eq!(report.supervision["restarts"], json!(2));
}

#[actix_rt::test]
async fn the_actix_web_self_test_enqueues_backtests_over_http_and_reports_them_completed() {
    let report = within(Duration::from_secs(60), actix_web::self_test()).await;

    assert_eq!(report.jobs.len(), 2);
    for job in &report.jobs {
        assert_eq!(job.post_status, 202);
        assert_eq!(job.last["status"], "completed", "{job:?}");
        assert_eq!(job.last["job_id"], job.post_body["job_id"]);
        assert!(job.last["result"]["total_trades"].is_u64());
        assert!(job.last["result"].get("trades").is_none());
    }
    let eurusd = &report.jobs[0].last["result"];
    let expected = direct_backtest(&quickstart::COMMAND_BACKTEST);
    assert_eq!(eurusd["total_trades"], json!(expected.total_trades));
    assert_eq!(report.bad_request.0, 400);
    assert_eq!(report.unknown_status, 404);
}

/// A bus in this process with the dgbit-actors handlers (`run_backtest` as
/// the default route, the data service) listening on `addresses`.
fn dgbit_bus_on(addresses: &Addresses) -> dgbit_bus::bus::BusHandle {
    let store = Arc::new(KlineStore::fixtures());
    let counters = ServedCounters::new();
    let mut builder = Bus::builder(BusConfig::default().addresses(addresses.clone()));
    for (name, handler) in data_handlers(Arc::clone(&store), counters.clone()) {
        builder = builder.data_command(name, handler);
    }
    let bus = builder.start().expect("the bus starts");
    for (name, handler) in command_handlers(store, bus.events(), "test-bus", counters) {
        bus.command_routes().register(name, handler);
    }
    bus
}

#[actix_rt::test]
async fn a_pynng_peer_sending_a_backtest_with_no_command_gets_a_backtest_result() {
    let addresses = common::TestAddresses::new();
    let bus = dgbit_bus_on(&addresses.addresses);
    assert!(bus.wait_for_edges(Duration::from_secs(5)).await);

    let url = addresses.addresses.command.clone();
    let lines = tokio::task::spawn_blocking(move || {
        common::run_python(
            "backtest_command.py",
            &[&url, "py-backtest-1"],
            Duration::from_secs(60),
        )
    })
    .await
    .expect("the Python peer ran");
    bus.shutdown().await;

    let reply = &lines[0];
    assert_eq!(reply["status"], "ok", "{reply}");
    assert_eq!(reply["job_uuid"], "py-backtest-1");
    let result = &reply["result"];
    let expected = direct_backtest(&quickstart::COMMAND_BACKTEST);
    assert_eq!(result["symbol"], "EURUSD");
    assert_eq!(result["interval"], "60");
    assert_eq!(result["bars"], json!(1000));
    assert_eq!(result["total_trades"], json!(expected.total_trades));
    assert_eq!(
        result["trades"].as_array().map(Vec::len),
        Some(expected.total_trades)
    );
    for (key, value) in [
        ("win_rate", expected.win_rate),
        ("net_return", expected.net_return),
        ("max_drawdown", expected.max_drawdown),
    ] {
        assert_same(result[key].as_f64().unwrap(), value, key);
    }
}

/// Run examples/python_peer.py with `--json` against `addresses`, within
/// `limit`; its stdout lines as JSON.
fn run_python_peer(addresses: &Addresses, limit: Duration) -> Vec<Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/python_peer.py");
    let mut child = common::python()
        .arg(script)
        .arg("--json")
        .env("NNG_COMMAND_ADDRESS", &addresses.command)
        .env("NNG_EVENT_ADDRESS", &addresses.event)
        .env("NNG_DATA_ADDRESS", &addresses.data)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 starts");
    let finished = common::wait_until(limit, || matches!(child.try_wait(), Ok(Some(_))));
    if !finished {
        let _ = child.kill();
        let _ = child.wait();
        panic!("python_peer.py did not finish within {limit:?}");
    }
    let output = child.wait_with_output().expect("python output");
    assert!(
        output.status.success(),
        "python_peer.py failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|err| panic!("{line}: {err}")))
        .collect()
}

#[actix_rt::test]
async fn the_python_peer_example_runs_against_the_quick_start_bus() {
    let stack = within(Duration::from_secs(30), quickstart::Stack::start(None)).await;
    let addresses = stack.addresses.clone();
    let lines =
        tokio::task::spawn_blocking(move || run_python_peer(&addresses, Duration::from_secs(60)))
            .await
            .expect("the Python peer ran");
    let workers = stack.stop().await.expect("the workers stop");

    let step =
        |name: &str| -> Vec<&Value> { lines.iter().filter(|line| line["step"] == name).collect() };
    let command = step("command");
    assert_eq!(command[0]["reply"]["status"], "ok");
    let expected = direct_backtest(&quickstart::COMMAND_BACKTEST);
    assert_eq!(
        command[0]["reply"]["result"]["total_trades"],
        json!(expected.total_trades)
    );

    let worked = step("worked");
    assert_eq!(worked.len(), 3);
    let eurusd = KlineStore::fixtures().series("EURUSD", "60").unwrap();
    let last_500 = &eurusd[eurusd.len() - 500..];
    assert_eq!(worked[0]["result"]["bars"], json!(500));
    assert_eq!(worked[0]["result"]["first_close"], json!(last_500[0].close));
    assert_eq!(
        worked[0]["result"]["last_close"],
        json!(last_500[499].close)
    );

    let enqueued = step("enqueued");
    let backtest_id = enqueued[0]["run_backtest"].clone();
    let ran_backtest = step("event")
        .into_iter()
        .any(|event| event["job_id"] == backtest_id && event["event_type"] == "job.completed");
    assert!(ran_backtest, "no job.completed for the Rust workers' job");
    assert_eq!(
        step("done")[0]["completed"].as_array().map(Vec::len),
        Some(4)
    );
    let rust_completed: u64 = workers.iter().map(|(_, s)| s.completed).sum();
    assert_eq!(rust_completed, 1);
}
