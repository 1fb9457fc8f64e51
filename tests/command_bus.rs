//! The command and data buses over real NNG sockets, with Rust clients.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use dgbit_bus::bus::{Bus, BusHandle};
use dgbit_bus::client::{BusClient, ClientError, ClientOptions};
use dgbit_bus::config::{BusConfig, EdgeSet};
use dgbit_bus::message::{Command, HandlerError};
use dgbit_bus::wire::{code, CommandReply, CommandRequest};
use serde_json::{json, Value};

use common::{free_tcp_url, TestAddresses};

/// Answers after `delay`, counting its calls; `fail` and `panic` commands
/// fail as their names say.
struct TestHandler {
    delay: Duration,
    calls: Arc<AtomicUsize>,
}

impl Actor for TestHandler {
    type Context = Context<Self>;
}

impl Handler<Command> for TestHandler {
    type Result = ResponseFuture<Result<Value, HandlerError>>;

    fn handle(&mut self, command: Command, _ctx: &mut Self::Context) -> Self::Result {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match command.name.as_str() {
            "fail" => return Box::pin(async { Err(HandlerError::failed("asked to fail")) }),
            "panic" => panic!("asked to panic"),
            _ => {}
        }
        let delay = self.delay;
        let payload = command.request.payload;
        Box::pin(async move {
            actix::clock::sleep(delay).await;
            Ok(json!({"echo": payload}))
        })
    }
}

fn handler(delay: Duration) -> (Recipient<Command>, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let addr = TestHandler {
        delay,
        calls: calls.clone(),
    }
    .start();
    (addr.recipient(), calls)
}

fn start_bus(addresses: &TestAddresses, handlers: &[(&str, Recipient<Command>)]) -> BusHandle {
    let config = BusConfig::default().addresses(addresses.addresses.clone());
    let mut builder = Bus::builder(config);
    for (name, recipient) in handlers {
        builder = builder.command(*name, recipient.clone());
    }
    builder.start().expect("bus starts")
}

async fn ready(bus: &BusHandle) {
    assert!(
        bus.wait_for_edges(Duration::from_secs(5)).await,
        "edges did not open"
    );
}

async fn client(url: &str, timeout: Duration) -> BusClient {
    let options = ClientOptions::default()
        .timeout(timeout)
        .connect_attempts(5, Duration::from_millis(50));
    BusClient::connect(url, options)
        .await
        .expect("client connects")
}

#[actix_rt::test]
async fn a_slow_handler_does_not_delay_a_ping_from_another_client() {
    let addresses = TestAddresses::new();
    let (slow, _) = handler(Duration::from_secs(2));
    let bus = start_bus(&addresses, &[("slow", slow)]);
    ready(&bus).await;
    let url = addresses.addresses.command.clone();
    let slow_client = client(&url, Duration::from_secs(10)).await;
    let ping_client = client(&url, Duration::from_secs(10)).await;

    let slow_call = slow_client.call("slow", json!({}));
    let ping_call = async {
        // Let the slow request reach its handler before pinging.
        actix::clock::sleep(Duration::from_millis(100)).await;
        ping_client.call("ping", json!({})).await
    };
    tokio::pin!(slow_call);
    let first = tokio::select! {
        pong = ping_call => ("ping", pong.map(|_| ())),
        slow = &mut slow_call => ("slow", slow.map(|_| ())),
    };
    assert_eq!(first.0, "ping", "the ping waited behind the slow handler");
    assert!(first.1.is_ok());
    assert!(slow_call.await.is_ok());
    bus.shutdown().await;
}

#[actix_rt::test]
async fn a_timed_out_client_succeeds_on_its_next_request() {
    let addresses = TestAddresses::new();
    let (slow, _) = handler(Duration::from_secs(2));
    let bus = start_bus(&addresses, &[("slow", slow)]);
    ready(&bus).await;
    let client = client(&addresses.addresses.command, Duration::from_millis(500)).await;

    let err = client.call("slow", json!({})).await.unwrap_err();
    assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
    let pong = client
        .call("ping", json!({}))
        .await
        .expect("the next request works");
    assert_eq!(pong["pong"], json!(true));
    bus.shutdown().await;
}

#[actix_rt::test]
async fn a_request_resent_by_nng_runs_the_handler_once() {
    let addresses = TestAddresses::new();
    let (slow, calls) = handler(Duration::from_millis(800));
    let bus = start_bus(&addresses, &[("slow", slow)]);
    ready(&bus).await;
    let options = ClientOptions::default()
        .timeout(Duration::from_secs(10))
        .resend_interval(Duration::from_millis(100));
    let client = BusClient::connect(&addresses.addresses.command, options)
        .await
        .unwrap();

    let mut request = CommandRequest::new("slow", json!({"n": 1}));
    request.job_uuid = Some("job-resent".into());
    let reply = client.request(&request).await.unwrap();
    assert_eq!(reply.to_value()["result"], json!({"echo": {"n": 1}}));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the handler ran more than once"
    );

    let status = client.call("status", json!({})).await.unwrap();
    let duplicates = status["roles"]["command"]["duplicates"].as_u64().unwrap();
    assert!(
        duplicates >= 1,
        "NNG never resent, so nothing was tested: {status}"
    );
    bus.shutdown().await;
}

#[actix_rt::test]
async fn a_repeated_job_uuid_gets_the_first_reply_without_running_again() {
    let addresses = TestAddresses::new();
    let (echo, calls) = handler(Duration::ZERO);
    let bus = start_bus(&addresses, &[("echo", echo)]);
    ready(&bus).await;
    let client = client(&addresses.addresses.command, Duration::from_secs(5)).await;

    let mut first = CommandRequest::new("echo", json!({"n": 1}));
    first.job_uuid = Some("same".into());
    let mut second = CommandRequest::new("echo", json!({"n": 2}));
    second.job_uuid = Some("same".into());
    let reply_one = client.request(&first).await.unwrap();
    let reply_two = client.request(&second).await.unwrap();
    assert_eq!(reply_one, reply_two);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    bus.shutdown().await;
}

#[actix_rt::test]
async fn every_kind_of_bad_request_gets_its_code_over_tcp_and_the_next_is_served() {
    let addresses = TestAddresses::new();
    let url = free_tcp_url();
    let config = BusConfig::default()
        .addresses(addresses.addresses.clone())
        .command_address(url.clone())
        .max_message_size(1024);
    let (echo, _) = handler(Duration::ZERO);
    let bus = Bus::builder(config)
        .command("echo", echo.clone())
        .command("fail", echo)
        .start()
        .expect("bus starts");
    ready(&bus).await;
    let client = client(&url, Duration::from_secs(5)).await;

    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"not json".to_vec(), code::BAD_REQUEST),
        (vec![0xff, 0xfe, 0x00], code::BAD_REQUEST),
        (b"\"a string\"".to_vec(), code::BAD_REQUEST),
        (br#"{"command": ["x"]}"#.to_vec(), code::BAD_REQUEST),
        (br#"{"command": "nope"}"#.to_vec(), code::UNKNOWN_COMMAND),
        (
            br#"{"command": "fail", "job_uuid": "f-1"}"#.to_vec(),
            code::HANDLER_FAILED,
        ),
        (vec![b' '; 1500], code::TOO_LARGE),
    ];
    for (body, expected) in cases {
        let reply = CommandReply::decode(&client.send_raw(&body).await.unwrap()).unwrap();
        assert_eq!(
            reply.code(),
            Some(expected),
            "body {:?}",
            String::from_utf8_lossy(&body)
        );
        let pong = client.call("ping", json!({})).await.unwrap();
        assert_eq!(pong["pong"], json!(true));
    }
    bus.shutdown().await;
}

#[actix_rt::test]
async fn a_request_without_command_goes_to_the_default_route() {
    let addresses = TestAddresses::new();
    let (echo, calls) = handler(Duration::ZERO);
    let bus = start_bus(&addresses, &[("run_backtest", echo)]);
    ready(&bus).await;
    let client = client(&addresses.addresses.command, Duration::from_secs(5)).await;

    let body = json!({"job_uuid": "550e8400", "payload": {"symbol": "EURUSD"}, "extra": 1});
    let reply = client.send_json(&body).await.unwrap().to_value();
    assert_eq!(
        reply,
        json!({"status": "ok", "job_uuid": "550e8400", "result": {"echo": {"symbol": "EURUSD"}}})
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    bus.shutdown().await;
}

#[actix_rt::test]
async fn a_panicking_handler_fails_its_request_and_the_bus_serves_on() {
    let addresses = TestAddresses::new();
    let (panicky, _) = handler(Duration::ZERO);
    let bus = start_bus(&addresses, &[("panic", panicky)]);
    ready(&bus).await;
    let client = client(&addresses.addresses.command, Duration::from_secs(5)).await;

    let err = client.call("panic", json!({})).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Remote { code, .. } if code == "handler_failed"),
        "{err}"
    );
    assert_eq!(
        client.call("ping", json!({})).await.unwrap()["pong"],
        json!(true)
    );
    bus.shutdown().await;
}

#[actix_rt::test]
async fn the_data_bus_is_a_second_router_with_its_own_handlers() {
    let addresses = TestAddresses::new();
    let (klines, _) = handler(Duration::ZERO);
    let config = BusConfig::default().addresses(addresses.addresses.clone());
    let bus = Bus::builder(config)
        .data_command("GET_KLINES", klines)
        .start()
        .expect("bus starts");
    ready(&bus).await;
    let data = client(&addresses.addresses.data, Duration::from_secs(5)).await;
    let command = client(&addresses.addresses.command, Duration::from_secs(5)).await;

    let bars = data
        .call("GET_KLINES", json!({"symbol": "EURUSD"}))
        .await
        .unwrap();
    assert_eq!(bars, json!({"echo": {"symbol": "EURUSD"}}));
    let err = command.call("GET_KLINES", json!({})).await.unwrap_err();
    assert!(matches!(&err, ClientError::Remote { code, .. } if code == "unknown_command"));
    bus.shutdown().await;
}

#[actix_rt::test]
async fn a_bus_without_edges_serves_in_process_requests() {
    let (echo, calls) = handler(Duration::ZERO);
    let bus = Bus::builder(BusConfig::in_process().edges(EdgeSet::NONE))
        .command("echo", echo)
        .start()
        .expect("bus starts");
    let reply = bus
        .request(CommandRequest::new("echo", json!({"a": 1})))
        .await;
    assert_eq!(reply.to_value()["result"], json!({"echo": {"a": 1}}));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[actix_rt::test]
async fn a_client_with_no_bus_fails_to_connect_after_its_retries() {
    let addresses = TestAddresses::new();
    let options = ClientOptions::default().connect_attempts(3, Duration::from_millis(10));
    let err = BusClient::connect(&addresses.addresses.command, options)
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, ClientError::Connect { attempts: 3, .. }),
        "{err}"
    );
}

#[actix_rt::test]
async fn a_lazy_client_started_before_the_bus_gets_its_reply_once_the_bus_is_up() {
    let addresses = TestAddresses::new();
    let options = ClientOptions::default().timeout(Duration::from_secs(10));
    let client = BusClient::connect_lazy(&addresses.addresses.command, options).unwrap();
    let pending = actix_rt::spawn(async move { client.call("ping", json!({})).await });
    actix::clock::sleep(Duration::from_millis(200)).await;
    let bus = start_bus(&addresses, &[]);
    let pong = pending
        .await
        .unwrap()
        .expect("the queued request is answered");
    assert_eq!(pong["pong"], json!(true));
    bus.shutdown().await;
}

/// Echoes its payload; `boom` panics.
fn inline_echo(command: Command) -> Result<Value, HandlerError> {
    if command.request.payload.contains_key("boom") {
        panic!("inline handler asked to panic");
    }
    Ok(Value::Object(command.request.payload))
}

#[actix_rt::test]
async fn an_inline_handler_answers_over_the_socket_and_a_panic_fails_only_its_request() {
    let addresses = TestAddresses::new();
    let config = BusConfig::default().addresses(addresses.addresses.clone());
    let bus = Bus::builder(config)
        .inline_command("quick", inline_echo)
        .start()
        .expect("bus starts");
    ready(&bus).await;
    let client = client(&addresses.addresses.command, Duration::from_secs(5)).await;

    let reply = client.call("quick", json!({"n": 1})).await.unwrap();
    assert_eq!(reply, json!({"n": 1}));
    let err = client
        .call("quick", json!({"boom": true}))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Remote { code, .. } if code == "handler_failed"),
        "{err}"
    );
    let reply = client.call("quick", json!({"n": 2})).await.unwrap();
    assert_eq!(reply, json!({"n": 2}), "the next request was not served");

    let status = client.call("status", json!({})).await.unwrap();
    assert_eq!(
        status["roles"]["command"]["inline_panics"],
        json!(1),
        "{status}"
    );
    bus.shutdown().await;
}

#[actix_rt::test]
async fn an_inline_handler_runs_once_for_a_repeated_job_uuid() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let bus = Bus::builder(BusConfig::in_process().edges(EdgeSet::NONE))
        .inline_command("count", move |_| {
            Ok(json!(counted.fetch_add(1, Ordering::SeqCst) + 1))
        })
        .start()
        .expect("bus starts");

    let mut request = CommandRequest::new("count", json!({}));
    request.job_uuid = Some("once".into());
    let first = bus.request(request.clone()).await;
    let second = bus.request(request).await;
    assert_eq!(first.to_value()["result"], json!(1));
    assert_eq!(first, second);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    bus.shutdown().await;
}

#[actix_rt::test]
async fn concurrent_in_process_duplicates_run_the_actor_handler_once() {
    let (slow, calls) = handler(Duration::from_millis(200));
    let bus = Bus::builder(BusConfig::in_process().edges(EdgeSet::NONE))
        .command("slow", slow)
        .start()
        .expect("bus starts");

    let mut request = CommandRequest::new("slow", json!({"n": 7}));
    request.request_id = Some("twice".into());
    let (first, second) = tokio::join!(bus.request(request.clone()), bus.request(request));
    assert!(first.is_ok(), "{first:?}");
    assert_eq!(first, second);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    bus.shutdown().await;
}

#[actix_rt::test]
async fn a_router_restart_keeps_the_duplicate_cache() {
    use dgbit_bus::supervisor::{FaultKind, InjectFault};

    let addresses = TestAddresses::new();
    let (echo, calls) = handler(Duration::ZERO);
    let bus = start_bus(&addresses, &[("echo", echo)]);
    ready(&bus).await;
    let client = client(&addresses.addresses.command, Duration::from_secs(5)).await;
    let mut request = CommandRequest::new("echo", json!({"n": 1}));
    request.job_uuid = Some("before-the-crash".into());
    let first = client.request(&request).await.unwrap();
    assert!(first.is_ok(), "{first:?}");

    let router = bus.command_router();
    let restarts = router.stats().restarts;
    router
        .do_send(InjectFault {
            kind: FaultKind::Panic,
        })
        .unwrap_or_else(|_| panic!("the router took no fault"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while router.stats().restarts == restarts {
        assert!(
            std::time::Instant::now() < deadline,
            "the router never restarted"
        );
        actix::clock::sleep(Duration::from_millis(10)).await;
    }
    router.live().await.expect("the router came back");

    let again = client.request(&request).await.unwrap();
    assert_eq!(again, first);
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the handler ran again");
    bus.shutdown().await;
}

#[actix_rt::test]
async fn one_client_serves_concurrent_requests_and_a_quick_one_is_not_held_behind_a_slow_one() {
    let addresses = TestAddresses::new();
    let (slow, _) = handler(Duration::from_secs(2));
    let bus = start_bus(&addresses, &[("slow", slow)]);
    ready(&bus).await;
    let client = client(&addresses.addresses.command, Duration::from_secs(10)).await;

    // The slow request holds the client's socket-level path; the ping goes
    // on a context of its own and must not wait for the slow one.
    let slow_call = client.call("slow", json!({}));
    tokio::pin!(slow_call);
    let ping_call = async {
        actix::clock::sleep(Duration::from_millis(100)).await;
        client.call("ping", json!({})).await
    };
    let first = tokio::select! {
        pong = ping_call => ("ping", pong.map(|_| ())),
        slow = &mut slow_call => ("slow", slow.map(|_| ())),
    };
    assert_eq!(first.0, "ping", "the ping waited behind the slow request");
    assert!(first.1.is_ok(), "{first:?}");
    assert_eq!(slow_call.await.unwrap(), json!({"echo": {}}));
    bus.shutdown().await;
}

#[actix_rt::test]
async fn a_late_reply_to_a_timed_out_request_never_answers_the_next_one() {
    let addresses = TestAddresses::new();
    let (slow, _) = handler(Duration::from_millis(700));
    let (mid, _) = handler(Duration::from_millis(350));
    let bus = start_bus(&addresses, &[("slow", slow), ("mid", mid)]);
    ready(&bus).await;
    let client = client(&addresses.addresses.command, Duration::from_millis(500)).await;

    let err = client.call("slow", json!({"n": 1})).await.unwrap_err();
    assert!(err.is_timeout(), "{err}");
    // The first request's reply arrives about 200 ms into this one.
    let reply = client.call("mid", json!({"n": 2})).await.unwrap();
    assert_eq!(reply, json!({"echo": {"n": 2}}));
    let reply = client.call("mid", json!({"n": 3})).await.unwrap();
    assert_eq!(reply, json!({"echo": {"n": 3}}));
    bus.shutdown().await;
}

#[actix_rt::test]
async fn a_dropped_request_leaves_the_client_usable() {
    let addresses = TestAddresses::new();
    let (slow, _) = handler(Duration::from_millis(500));
    let bus = start_bus(&addresses, &[("slow", slow)]);
    ready(&bus).await;
    let client = client(&addresses.addresses.command, Duration::from_secs(5)).await;

    let abandoned = tokio::time::timeout(
        Duration::from_millis(100),
        client.call("slow", json!({"n": 1})),
    )
    .await;
    assert!(
        abandoned.is_err(),
        "the slow request answered within 100 ms"
    );
    assert_eq!(
        client.call("ping", json!({})).await.unwrap()["pong"],
        json!(true)
    );
    let reply = client.call("slow", json!({"n": 2})).await.unwrap();
    assert_eq!(reply, json!({"echo": {"n": 2}}));
    bus.shutdown().await;
}
