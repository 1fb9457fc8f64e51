//! `DataService` answering data bus commands, with no socket in between.

mod common;

use std::sync::Arc;

use actix::prelude::*;
use common::{call, fixtures};
use dgbit_actors::{DataService, KlineStore};
use serde_json::{json, Value};

fn start(store: Arc<KlineStore>) -> Addr<DataService> {
    DataService::new(store).start()
}

fn times(bars: &Value) -> Vec<&str> {
    bars.as_array()
        .unwrap()
        .iter()
        .map(|bar| bar["time"].as_str().unwrap())
        .collect()
}

#[actix_rt::test]
async fn get_klines_returns_the_most_recent_bars_in_time_order() {
    let service = start(fixtures());
    let payload = json!({"symbol": "EURUSD", "interval": "60", "limit": 3});
    let bars = call(&service, "GET_KLINES", payload).await.unwrap();

    assert_eq!(
        times(&bars),
        [
            "2018-02-07 13:00:00",
            "2018-02-07 14:00:00",
            "2018-02-07 15:00:00"
        ]
    );
    assert_eq!(
        bars[2],
        json!({"time": "2018-02-07 15:00:00", "open": 1.23427, "high": 1.23444,
               "low": 1.22904, "close": 1.22904, "volume": 6143.0})
    );
}

#[actix_rt::test]
async fn get_klines_without_a_limit_returns_every_bar_oldest_first() {
    let service = start(fixtures());
    let bars = call(
        &service,
        "GET_KLINES",
        json!({"symbol": "BTCUSD", "interval": "M"}),
    )
    .await
    .unwrap();
    let times = times(&bars);
    assert_eq!(times.len(), 156);
    assert_eq!((times[0], times[155]), ("2012-01-31", "2024-12-31"));
}

#[actix_rt::test]
async fn get_klines_upper_cases_the_symbol_and_reads_a_numeric_interval() {
    let service = start(fixtures());
    let payload = json!({"symbol": "eurusd", "interval": 60, "limit": 1});
    let bars = call(&service, "GET_KLINES", payload).await.unwrap();
    assert_eq!(times(&bars), ["2018-02-07 15:00:00"]);
}

#[actix_rt::test]
async fn get_klines_for_an_unknown_series_is_not_found_and_lists_what_exists() {
    let service = start(fixtures());
    let err = call(
        &service,
        "GET_KLINES",
        json!({"symbol": "BTCUSDT", "interval": "15"}),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code, "not_found");
    assert_eq!(
        err.message,
        "no klines for symbol BTCUSDT interval \"15\" (looked for BTCUSDT_15.csv); \
         available: BTCUSD [M], EURUSD [60]"
    );
}

#[actix_rt::test]
async fn get_klines_with_a_malformed_payload_is_a_bad_request() {
    let service = start(fixtures());
    let payloads = [
        json!({}),
        json!({"interval": "60"}),
        json!({"symbol": ["EURUSD"], "interval": "60"}),
        json!({"symbol": "EURUSD"}),
        json!({"symbol": "EURUSD", "interval": "60", "limit": 0}),
        json!({"symbol": "EURUSD", "interval": "60", "limit": "100"}),
        json!({"symbol": "EURUSD", "interval": "60", "limit": 1.5}),
        json!({"symbol": "../klines/EURUSD", "interval": "60"}),
    ];
    for payload in payloads {
        let err = call(&service, "GET_KLINES", payload.clone())
            .await
            .unwrap_err();
        assert_eq!(err.code, "bad_request", "{payload}: {}", err.message);
    }
}

#[actix_rt::test]
async fn get_symbols_lists_each_symbol_with_its_intervals() {
    let service = start(fixtures());
    let symbols = call(&service, "GET_SYMBOLS", json!({})).await.unwrap();
    assert_eq!(
        symbols,
        json!({"symbols": [
            {"symbol": "BTCUSD", "intervals": ["M"]},
            {"symbol": "EURUSD", "intervals": ["60"]},
        ]})
    );
}

#[actix_rt::test]
async fn get_tickers_reports_the_last_close_of_each_symbol() {
    let service = start(fixtures());
    let tickers = call(&service, "GET_TICKERS", json!({})).await.unwrap();
    assert_eq!(
        tickers,
        json!({"tickers": [
            {"symbol": "BTCUSD", "interval": "M", "time": "2024-12-31", "close": 93381.0},
            {"symbol": "EURUSD", "interval": "60", "time": "2018-02-07 15:00:00", "close": 1.22904},
        ]})
    );
}

#[actix_rt::test]
async fn cache_status_counts_hits_and_misses_and_clear_cache_empties_it() {
    let service = start(fixtures());
    let eurusd = json!({"symbol": "EURUSD", "interval": "60", "limit": 10});
    call(&service, "GET_KLINES", eurusd.clone()).await.unwrap();
    call(&service, "GET_KLINES", eurusd).await.unwrap();
    call(
        &service,
        "GET_KLINES",
        json!({"symbol": "BTCUSD", "interval": "M"}),
    )
    .await
    .unwrap();

    let status = call(&service, "GET_CACHE_STATUS", json!({})).await.unwrap();
    assert_eq!(
        (
            &status["entries"],
            &status["bars"],
            &status["hits"],
            &status["misses"]
        ),
        (&json!(2), &json!(5156), &json!(1), &json!(2))
    );
    assert!(
        status["directory"]
            .as_str()
            .unwrap()
            .ends_with("fixtures/klines"),
        "{status}"
    );

    let cleared = call(&service, "CLEAR_CACHE", json!({})).await.unwrap();
    assert_eq!(cleared, json!({"cleared": 2}));
    let status = call(&service, "GET_CACHE_STATUS", json!({})).await.unwrap();
    assert_eq!(
        (&status["entries"], &status["bars"]),
        (&json!(0), &json!(0))
    );
}

#[actix_rt::test]
async fn backfill_is_refused_as_not_supported_offline() {
    let service = start(fixtures());
    let err = call(
        &service,
        "BACKFILL",
        json!({"symbol": "EURUSD", "interval": "60"}),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code, "not_supported");
    assert!(
        err.message.contains("not supported offline"),
        "{}",
        err.message
    );
    assert!(err.message.contains("fixtures/klines"), "{}", err.message);
}

#[actix_rt::test]
async fn ping_answers_pong() {
    let service = start(fixtures());
    assert_eq!(
        call(&service, "ping", json!({})).await.unwrap(),
        json!("pong")
    );
}

#[actix_rt::test]
async fn an_unknown_command_name_is_refused_with_unknown_command() {
    let service = start(fixtures());
    let err = call(&service, "GET_ORDERBOOK", json!({}))
        .await
        .unwrap_err();
    assert_eq!(err.code, "unknown_command");
    assert!(err.message.contains("GET_ORDERBOOK"), "{}", err.message);
}

#[actix_rt::test]
async fn a_malformed_file_fails_the_command_naming_file_and_line_and_the_service_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let body = ",Open,High,Low,Close,Volume\n2024-01-01,1,1,1,1,1\n2024-01-02,1,1,1,oops,1\n";
    std::fs::write(dir.path().join("ABC_D.csv"), body).unwrap();
    let service = start(Arc::new(KlineStore::new(dir.path())));

    let err = call(
        &service,
        "GET_KLINES",
        json!({"symbol": "ABC", "interval": "D"}),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code, "handler_failed");
    assert!(
        err.message
            .ends_with("ABC_D.csv:3: Close \"oops\" is not a finite number"),
        "{}",
        err.message
    );
    assert_eq!(
        call(&service, "ping", json!({})).await.unwrap(),
        json!("pong")
    );
}
