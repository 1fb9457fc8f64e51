//! Faults against the real bus (issue 5, "Must show"): every role crashed
//! on purpose comes back on its schedule while the others serve, a
//! panicking handler costs one request, a listener in a missing directory
//! retries cheaply until it can open, and shutdown under load answers every
//! request it took.
//!
//! Real NNG sockets throughout: ipc paths in a fresh temp dir per test, or a
//! free tcp port on 127.0.0.1. Waits are on channels or on polled state with
//! a deadline. Measured figures go to stderr (`--nocapture` shows them).

mod common;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use dgbit_bus::backoff::{BackoffPolicy, RestartBudget};
use dgbit_bus::bus::{Bus, BusHandle};
use dgbit_bus::client::{BusClient, ClientError, ClientOptions};
use dgbit_bus::config::{Addresses, BusConfig};
use dgbit_bus::edge::listener::EdgeActor;
use dgbit_bus::edge::publish::PubEdge;
use dgbit_bus::edge::push::PushEdge;
use dgbit_bus::edge::rep::RepEdge;
use dgbit_bus::edge::subscribe::{SubEdge, SubEdgeSettings};
use dgbit_bus::message::{Command, HandlerError, RunJob, StatsQuery};
use dgbit_bus::router::{CommandRouter, FnHandler};
use dgbit_bus::supervisor::{FaultKind, InjectFault, RoleState, SupervisedRole};
use dgbit_bus::topics::Pattern;
use dgbit_bus::wire::{CommandRequest, Event, JobMessage};
use futures::StreamExt;
use nng::options::Options;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

use common::{fast_policy, recorder, ServeProcess, TestAddresses};

/// Longest any single wait in these tests may take.
const DEADLINE: Duration = Duration::from_secs(10);
/// How late a restart may be beyond its drawn delay on a busy machine.
const LATENESS: Duration = Duration::from_millis(250);
/// Client timeout for the background traffic: long enough that a busy
/// machine does not fail a request, short enough that a lost reply shows.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    common::within(DEADLINE, what, future).await
}

fn config_for(addresses: &TestAddresses) -> BusConfig {
    BusConfig::default().addresses(addresses.addresses.clone())
}

/// A bus on `addresses` with the fast policy, its edges open.
async fn fast_bus(addresses: &TestAddresses) -> BusHandle {
    let bus = Bus::builder(config_for(addresses))
        .restart_policy(fast_policy())
        .start()
        .expect("the bus starts");
    assert!(bus.wait_for_edges(DEADLINE).await, "the edges did not open");
    bus
}

async fn client(url: &str) -> BusClient {
    let options = ClientOptions::default()
        .timeout(CLIENT_TIMEOUT)
        .connect_attempts(5, Duration::from_millis(50));
    BusClient::connect(url, options)
        .await
        .expect("the client connects")
}

/// Ping `client` until it answers, or fail after the deadline.
async fn until_pong(client: &BusClient, what: &str) -> u32 {
    within(what, async {
        let mut tries = 0;
        loop {
            tries += 1;
            match client.call("ping", json!({})).await {
                Ok(pong) if pong["pong"] == json!(true) => return tries,
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    })
    .await
}

/// What background traffic saw while a fault was going on.
#[derive(Debug, Default)]
struct Tally {
    ok: u64,
    failures: Vec<String>,
    slowest: Duration,
}

/// Pings `url` in a loop until `stop` turns true.
struct Pinger {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Tally>,
}

impl Pinger {
    async fn start(url: &str) -> Self {
        let client = client(url).await;
        until_pong(&client, "the pinger's first pong").await;
        let (stop, mut stopped) = watch::channel(false);
        let task = actix_rt::spawn(async move {
            let mut tally = Tally::default();
            while !*stopped.borrow_and_update() {
                let started = Instant::now();
                match client.call("ping", json!({})).await {
                    Ok(pong) if pong["pong"] == json!(true) => tally.ok += 1,
                    Ok(other) => tally.failures.push(format!("odd reply {other}")),
                    Err(err) => tally.failures.push(err.to_string()),
                }
                tally.slowest = tally.slowest.max(started.elapsed());
            }
            tally
        });
        Self { stop, task }
    }

    async fn finish(self) -> Tally {
        let _ = self.stop.send(true);
        within("the pinger to stop", self.task)
            .await
            .expect("the pinger task does not panic")
    }
}

/// Assert that background traffic was served throughout, and print it.
fn assert_undisturbed(what: &str, tally: &Tally) {
    eprintln!(
        "{what}: {} pings answered, {} failed, slowest {} ms",
        tally.ok,
        tally.failures.len(),
        tally.slowest.as_millis()
    );
    assert!(tally.failures.is_empty(), "{what}: {:?}", tally.failures);
    assert!(tally.ok > 0, "{what}: no ping was sent during the faults");
}

/// Crash `role` once per fault in `faults`, and check that each restart
/// comes on the schedule of `policy`: attempt `n` draws a delay within the
/// jitter bounds of `nominal(n)`, and the new instance starts no earlier
/// than that delay after the supervisor saw the crash, and not much later.
///
/// Timed from the supervisor's own crash timestamp: with
/// `RUST_BACKTRACE=1` the first panic's backtrace alone can take hundreds
/// of milliseconds to print before the crash is visible.
async fn crash_on_schedule<A>(
    name: &str,
    role: &SupervisedRole<A>,
    policy: &BackoffPolicy,
    faults: &[FaultKind],
) where
    A: Actor<Context = Context<A>> + Handler<InjectFault>,
{
    let restarts_before = role.stats().restarts;
    for (index, kind) in faults.iter().enumerate() {
        let attempt = u32::try_from(index).unwrap() + 1;
        within("a running instance", role.live())
            .await
            .expect("the role is open");
        let before = role.stats().instances;
        let injected = Instant::now();
        role.do_send(InjectFault { kind: *kind })
            .expect("the role takes the fault");
        let stats = within(
            "the restart",
            role.wait_for(|stats| stats.instances > before && stats.state == RoleState::Running),
        )
        .await;

        let drawn = stats.last_delay.expect("a restart happened");
        let crashed_at = stats.last_crash_at.expect("the crash was seen");
        let took = stats.running_since.expect("an instance runs") - crashed_at;
        let (shortest, longest) = policy.delay_bounds(attempt);
        eprintln!(
            "{name}: {kind:?} -> attempt {}, drawn {} ms (bounds {}..={} ms), \
             restarted {} ms after the crash was seen, {} ms after injection",
            stats.attempt,
            drawn.as_millis(),
            shortest.as_millis(),
            longest.as_millis(),
            took.as_millis(),
            (stats.running_since.unwrap() - injected).as_millis(),
        );
        assert_eq!(stats.attempt, attempt, "{name}: {stats:?}");
        assert_eq!(stats.restarts, restarts_before + u64::from(attempt));
        assert!(
            (shortest..=longest).contains(&drawn),
            "{name} attempt {attempt}: drawn {drawn:?} outside {shortest:?}..={longest:?}"
        );
        assert!(
            took >= drawn && took <= drawn + LATENESS,
            "{name} attempt {attempt}: restarted {took:?} after the crash, delay {drawn:?}"
        );
    }
}

const EVERY_FAULT: [FaultKind; 3] = [FaultKind::Panic, FaultKind::Stop, FaultKind::PanicInTimer];

/// Crash the router `which` picks on schedule while a pinger keeps the other
/// bus (at `other_url`) busy: the other bus must not notice, and the crashed
/// router (at `crashed_url`) must answer again.
async fn a_router_comes_back_while_the_other_bus_serves(
    name: &str,
    which: fn(&BusHandle) -> &SupervisedRole<CommandRouter>,
    crashed_url: fn(&Addresses) -> &str,
    other_url: fn(&Addresses) -> &str,
) {
    let addresses = TestAddresses::new();
    let bus = fast_bus(&addresses).await;
    let pinger = Pinger::start(other_url(&addresses.addresses)).await;

    crash_on_schedule(name, which(&bus), &fast_policy(), &EVERY_FAULT).await;

    assert_undisturbed(
        &format!("the other bus during {name} crashes"),
        &pinger.finish().await,
    );
    let crashed = client(crashed_url(&addresses.addresses)).await;
    until_pong(&crashed, &format!("the restarted {name}")).await;
    bus.shutdown().await;
}

#[actix_rt::test]
async fn the_command_router_comes_back_on_schedule_while_the_data_bus_serves() {
    a_router_comes_back_while_the_other_bus_serves(
        "command router",
        BusHandle::command_router,
        |a| &a.command,
        |a| &a.data,
    )
    .await;
}

#[actix_rt::test]
async fn the_data_router_comes_back_on_schedule_while_the_command_bus_serves() {
    a_router_comes_back_while_the_other_bus_serves(
        "data router",
        BusHandle::data_router,
        |a| &a.data,
        |a| &a.command,
    )
    .await;
}

fn rep_edge(bus: &BusHandle, role: &str) -> SupervisedRole<EdgeActor<RepEdge>> {
    bus.edge_role::<RepEdge>(role)
        .unwrap_or_else(|| panic!("the bus has a {role} role"))
}

#[actix_rt::test]
async fn the_command_edge_comes_back_on_schedule_and_serves_while_the_data_bus_serves() {
    let addresses = TestAddresses::new();
    let bus = fast_bus(&addresses).await;
    let pinger = Pinger::start(&addresses.addresses.data).await;
    let command = client(&addresses.addresses.command).await;
    let edge = rep_edge(&bus, "command-edge");

    crash_on_schedule("command edge", &edge, &fast_policy(), &EVERY_FAULT).await;

    let tries = until_pong(&command, "the reopened command edge").await;
    eprintln!("command edge: the old client got a pong after {tries} tries");
    assert_undisturbed(
        "data bus during command edge crashes",
        &pinger.finish().await,
    );
    assert_eq!(edge.stats().restarts, 3, "{:?}", edge.stats());
    bus.shutdown().await;
}

#[actix_rt::test]
async fn the_data_edge_comes_back_on_schedule_and_serves_while_the_command_bus_serves() {
    let addresses = TestAddresses::new();
    let bus = fast_bus(&addresses).await;
    let pinger = Pinger::start(&addresses.addresses.command).await;
    let data = client(&addresses.addresses.data).await;
    let edge = rep_edge(&bus, "data-edge");

    crash_on_schedule("data edge", &edge, &fast_policy(), &EVERY_FAULT).await;

    let tries = until_pong(&data, "the reopened data edge").await;
    eprintln!("data edge: the old client got a pong after {tries} tries");
    assert_undisturbed(
        "command bus during data edge crashes",
        &pinger.finish().await,
    );
    assert_eq!(edge.stats().restarts, 3, "{:?}", edge.stats());
    bus.shutdown().await;
}

/// Publish numbered `trade.signal` events tagged `round` until one comes
/// out of `received`; returns how many were published.
async fn until_event_flows(
    bus: &BusHandle,
    received: &mut mpsc::UnboundedReceiver<Arc<Event>>,
    round: &str,
) -> u32 {
    within("an event to come through", async {
        let mut published = 0;
        loop {
            published += 1;
            let data = json!({"round": round, "n": published});
            bus.publish(Event::new("trade.signal", "bus_faults", data));
            let arrived = tokio::time::timeout(Duration::from_millis(50), async {
                loop {
                    let event = received.recv().await.expect("the recorder lives");
                    if event.data["round"] == json!(round) {
                        return;
                    }
                }
            })
            .await;
            if arrived.is_ok() {
                return published;
            }
        }
    })
    .await
}

#[actix_rt::test]
async fn the_publisher_comes_back_on_schedule_and_events_flow_again_locally_and_remotely() {
    let addresses = TestAddresses::new();
    let bus = fast_bus(&addresses).await;
    let (local, mut local_events) = recorder();
    bus.subscribe("trade.*", local).unwrap();
    let (remote, mut remote_events) = recorder();
    let settings = SubEdgeSettings::new(
        addresses.addresses.event.clone(),
        Pattern::parse("trade.*").unwrap(),
    );
    let sub = SubEdge::dial(settings, remote).unwrap();
    until_event_flows(&bus, &mut remote_events, "before").await;
    let command = Pinger::start(&addresses.addresses.command).await;
    let data = Pinger::start(&addresses.addresses.data).await;

    crash_on_schedule("publisher", bus.publisher(), &fast_policy(), &EVERY_FAULT).await;

    assert_undisturbed(
        "command bus during publisher crashes",
        &command.finish().await,
    );
    assert_undisturbed("data bus during publisher crashes", &data.finish().await);
    let local_tries = until_event_flows(&bus, &mut local_events, "after").await;
    let remote_tries = until_event_flows(&bus, &mut remote_events, "after-remote").await;
    eprintln!(
        "publisher: after the restarts the first event reached the local \
         subscriber after {local_tries} publish(es), the remote one after {remote_tries}"
    );
    sub.close();
    bus.shutdown().await;
}

#[actix_rt::test]
async fn the_event_edge_comes_back_on_schedule_and_remote_subscribers_hear_again() {
    let addresses = TestAddresses::new();
    let bus = fast_bus(&addresses).await;
    let (remote, mut remote_events) = recorder();
    let settings = SubEdgeSettings::new(
        addresses.addresses.event.clone(),
        Pattern::parse("trade.*").unwrap(),
    );
    let sub = SubEdge::dial(settings, remote).unwrap();
    until_event_flows(&bus, &mut remote_events, "before").await;
    let pinger = Pinger::start(&addresses.addresses.command).await;
    let edge = bus
        .edge_role::<PubEdge>("event-edge")
        .expect("the bus has an event edge");

    crash_on_schedule("event edge", &edge, &fast_policy(), &EVERY_FAULT).await;

    let tries = until_event_flows(&bus, &mut remote_events, "after").await;
    eprintln!("event edge: the old subscriber heard again after {tries} publish(es)");
    assert_undisturbed(
        "command bus during event edge crashes",
        &pinger.finish().await,
    );
    assert_eq!(edge.stats().restarts, 3, "{:?}", edge.stats());
    sub.close();
    bus.shutdown().await;
}

/// Records every event on `pattern` published into `bus`.
fn record(bus: &BusHandle, pattern: &str) -> mpsc::UnboundedReceiver<Arc<Event>> {
    let (recipient, received) = recorder();
    bus.subscribe(pattern, recipient).expect("a valid pattern");
    received
}

#[actix_rt::test]
async fn a_role_past_its_restart_budget_is_given_up_reported_and_fatal_while_the_rest_serves() {
    let addresses = TestAddresses::new();
    let policy = BackoffPolicy {
        budget: RestartBudget {
            max_restarts: 2,
            window: Duration::from_secs(60),
        },
        ..fast_policy()
    };
    let bus = Bus::builder(config_for(&addresses))
        .restart_policy(policy.clone())
        .start()
        .expect("the bus starts");
    assert!(bus.wait_for_edges(DEADLINE).await);
    let mut alerts = record(&bus, "system.alert");
    let pinger = Pinger::start(&addresses.addresses.command).await;
    let data = client(&addresses.addresses.data).await;

    crash_on_schedule(
        "data router",
        bus.data_router(),
        &policy,
        &[FaultKind::Panic, FaultKind::Stop],
    )
    .await;
    let last_crash = Instant::now();
    bus.data_router()
        .do_send(InjectFault {
            kind: FaultKind::Panic,
        })
        .expect("the third fault is taken");
    let gone = within("the fatal report", bus.fatal()).await;
    eprintln!(
        "budget: data router given up {} ms after its third crash was injected",
        last_crash.elapsed().as_millis()
    );

    assert_eq!(gone, "data");
    let stats = bus.data_router().stats();
    assert!(stats.gave_up(), "{stats:?}");
    assert_eq!((stats.restarts, stats.instances), (2, 3));
    let give_up = within("the give-up alert", async {
        loop {
            let alert = alerts.recv().await.expect("the recorder lives");
            if alert.data["gave_up"] == json!(true) {
                return alert;
            }
        }
    })
    .await;
    assert_eq!(give_up.data["role"], "data");
    assert_eq!(give_up.data["restarts"], 2);

    let refused = data.call("ping", json!({})).await.unwrap_err();
    eprintln!("budget: a data request after the give-up gets: {refused}");
    assert!(
        matches!(&refused, ClientError::Remote { code, .. } if code == "shutting_down"),
        "{refused}"
    );
    let command = client(&addresses.addresses.command).await;
    let status = command.call("status", json!({})).await.unwrap();
    assert_eq!(
        status["roles"]["data"]["supervision"]["state"], "gave_up",
        "{status}"
    );
    assert_undisturbed(
        "command bus while the data router gave up",
        &pinger.finish().await,
    );
    bus.shutdown().await;
}

/// A supervised handler: panics when the payload asks it to, otherwise
/// names its instance.
struct Flaky {
    instance: u64,
}

impl Actor for Flaky {
    type Context = Context<Self>;
}

impl Handler<Command> for Flaky {
    type Result = Result<Value, HandlerError>;

    fn handle(&mut self, command: Command, _: &mut Self::Context) -> Self::Result {
        let payload = &command.request.payload;
        if payload.get("panic") == Some(&json!(true)) {
            panic!("flaky was asked to panic");
        }
        Ok(json!({"instance": self.instance, "n": payload.get("n")}))
    }
}

fn flaky_factory() -> impl Fn() -> Flaky + Send + 'static {
    let built = Arc::new(AtomicU64::new(0));
    move || Flaky {
        instance: built.fetch_add(1, Ordering::SeqCst) + 1,
    }
}

fn square_handler() -> Recipient<Command> {
    FnHandler::new(|command: Command| -> Result<Value, HandlerError> {
        let n = command.request.payload.get("n").and_then(Value::as_u64);
        let n = n.ok_or_else(|| HandlerError::bad_request("`n` must be a number"))?;
        Ok(json!({"square": n * n}))
    })
    .start()
    .recipient()
}

/// The `i`th of the background commands and the result it must get.
fn command_number(i: u64) -> (&'static str, Value, Value) {
    if i.is_multiple_of(2) {
        ("square", json!({"n": i}), json!({"square": i * i}))
    } else {
        ("echo", json!({"n": i}), json!({"echo": {"n": i}}))
    }
}

#[actix_rt::test]
async fn a_panicking_handler_fails_only_its_command_while_a_thousand_around_it_are_answered() {
    const CLIENTS: u64 = 4;
    const PER_CLIENT: u64 = 250;
    const CONCURRENCY: usize = 10;
    let addresses = TestAddresses::new();
    // The policy first: `supervised_command` takes the policy set so far.
    let bus = Bus::builder(config_for(&addresses))
        .restart_policy(fast_policy())
        .supervised_command("flaky", flaky_factory())
        .command("square", square_handler())
        .start()
        .expect("the bus starts");
    assert!(bus.wait_for_edges(DEADLINE).await);
    let url = addresses.addresses.command.clone();
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();

    let mut senders = Vec::new();
    for c in 0..CLIENTS {
        let (client, done) = (client(&url).await, done.clone());
        senders.push(actix_rt::spawn(async move {
            let numbers = (c * PER_CLIENT)..((c + 1) * PER_CLIENT);
            let calls = futures::stream::iter(numbers).map(|i| {
                let (client, done) = (&client, &done);
                async move {
                    let (name, payload, expected) = command_number(i);
                    let outcome = client.call(name, payload).await;
                    done.fetch_add(1, Ordering::SeqCst);
                    match outcome {
                        Ok(result) if result == expected => None,
                        other => Some(format!("{i} {name}: {other:?}")),
                    }
                }
            });
            let wrong: Vec<String> = calls
                .buffer_unordered(CONCURRENCY)
                .filter_map(|wrong| async move { wrong })
                .collect()
                .await;
            wrong
        }));
    }

    // The panic goes in while the thousand are in full flow.
    let panicker = client(&url).await;
    within("a third of the commands", async {
        while done.load(Ordering::SeqCst) < CLIENTS * PER_CLIENT / 3 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    let panic_sent = Instant::now();
    let err = panicker
        .call("flaky", json!({"panic": true}))
        .await
        .unwrap_err();
    let panic_answered = panic_sent.elapsed();
    assert!(
        matches!(&err, ClientError::Remote { code, .. } if code == "handler_failed"),
        "{err}"
    );
    let in_flow = done.load(Ordering::SeqCst);

    // The next command to the handler reaches a fresh instance once its
    // restart delay has passed; until then it is refused, not queued.
    let mut refused = 0;
    let next = within("the restarted handler", async {
        loop {
            match panicker.call("flaky", json!({"n": 7})).await {
                Ok(result) => return result,
                Err(ClientError::Remote { code, .. }) if code == "handler_failed" => {
                    refused += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(other) => panic!("unexpected {other}"),
            }
        }
    })
    .await;
    let back_after = panic_sent.elapsed();
    assert_eq!(next, json!({"instance": 2, "n": 7}));

    let mut wrong = Vec::new();
    for sender in senders {
        wrong.extend(within("the clients", sender).await.unwrap());
    }
    let total = CLIENTS * PER_CLIENT;
    eprintln!(
        "handler panic: {total} commands from {CLIENTS} clients ({CONCURRENCY} in flight each) \
         in {} ms, {} wrong; the panic was answered handler_failed in {} ms with {in_flow} \
         done; the handler served again {} ms after the panic ({refused} refusals meanwhile)",
        started.elapsed().as_millis(),
        wrong.len(),
        panic_answered.as_millis(),
        back_after.as_millis(),
    );
    assert!(wrong.is_empty(), "{wrong:?}");
    assert!(
        in_flow < total,
        "the panic came after the thousand were done"
    );
    bus.shutdown().await;
}

/// Documents what "fails only its command" means with actix mailboxes: a
/// command already queued for the handler when it panics dies with that
/// mailbox, and is answered `handler_failed` rather than silently lost.
#[actix_rt::test]
async fn a_command_queued_behind_a_panicking_handler_is_answered_handler_failed() {
    let bus = Bus::builder(BusConfig::in_process())
        .restart_policy(fast_policy())
        .supervised_command("flaky", flaky_factory())
        .start()
        .expect("the bus starts");
    let panic = CommandRequest::new("flaky", json!({"panic": true}));
    let queued = CommandRequest::new("flaky", json!({"n": 1}));

    // Both reach the router in one turn, so both are in the handler's
    // mailbox before it runs.
    let (first, second) = within("both replies", async {
        tokio::join!(bus.request(panic), bus.request(queued))
    })
    .await;

    assert_eq!(first.code(), Some("handler_failed"), "{first:?}");
    assert_eq!(second.code(), Some("handler_failed"), "{second:?}");
    eprintln!(
        "queued behind a panic: {}",
        second.to_value()["error"].as_str().unwrap_or_default()
    );
}

/// Answers only once `release` turns true: holds commands in flight.
struct Hold {
    release: watch::Receiver<bool>,
}

impl Actor for Hold {
    type Context = Context<Self>;
}

impl Handler<Command> for Hold {
    type Result = ResponseFuture<Result<Value, HandlerError>>;

    fn handle(&mut self, _: Command, _: &mut Self::Context) -> Self::Result {
        let mut release = self.release.clone();
        Box::pin(async move {
            let _ = release.wait_for(|released| *released).await;
            Ok(json!({"held": true}))
        })
    }
}

async fn router_in_flight(router: &SupervisedRole<CommandRouter>) -> u64 {
    let stats = router.send(StatsQuery).await.expect("the router answers");
    stats["in_flight"].as_u64().unwrap_or_default()
}

#[actix_rt::test]
async fn requests_in_flight_in_a_crashing_router_get_shutting_down_at_once_not_a_timeout() {
    const HELD: usize = 20;
    let addresses = TestAddresses::new();
    // A long first delay, so a request can be sent while the router is down.
    let policy = BackoffPolicy {
        base: Duration::from_millis(300),
        ..fast_policy()
    };
    let (_release, held) = watch::channel(false);
    let bus = Bus::builder(config_for(&addresses))
        .restart_policy(policy)
        .command("hold", Hold { release: held }.start().recipient())
        .start()
        .expect("the bus starts");
    assert!(bus.wait_for_edges(DEADLINE).await);
    let options = ClientOptions::default().timeout(Duration::from_secs(20));
    let client = Arc::new(
        BusClient::connect(&addresses.addresses.command, options)
            .await
            .unwrap(),
    );
    let calls: Vec<_> = (0..HELD)
        .map(|n| {
            let client = client.clone();
            actix_rt::spawn(async move {
                let mut request = CommandRequest::new("hold", json!({}));
                request.job_uuid = Some(format!("held-{n}"));
                let outcome = client.request(&request).await;
                (n, outcome, Instant::now())
            })
        })
        .collect();
    within("every held command to reach its handler", async {
        while router_in_flight(bus.command_router()).await < HELD as u64 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;

    let injected = Instant::now();
    bus.command_router()
        .do_send(InjectFault {
            kind: FaultKind::Panic,
        })
        .unwrap();
    let mut slowest = Duration::ZERO;
    for call in calls {
        let (n, outcome, answered_at) = within("a held reply", call).await.unwrap();
        slowest = slowest.max(answered_at - injected);
        let reply = outcome.expect("a reply, not a client error").to_value();
        assert_eq!(reply["code"], "shutting_down", "{reply}");
        assert_eq!(reply["job_uuid"], format!("held-{n}"), "{reply}");
    }
    within(
        "the crash to be seen",
        bus.command_router()
            .wait_for(|stats| stats.state == RoleState::Restarting),
    )
    .await;
    let during = client.call("ping", json!({})).await.unwrap_err();
    let tries = until_pong(&client, "the restarted router").await;

    eprintln!(
        "router crash: {HELD} requests in flight all answered shutting_down echoing their job_uuid, the last \
         {} ms after the fault (client timeout 20 s); a ping during the restart got \
         `{during}`; served again after {tries} tries",
        slowest.as_millis()
    );
    assert!(slowest < Duration::from_secs(2), "{slowest:?}");
    assert!(
        matches!(&during, ClientError::Remote { code, .. } if code == "overloaded"),
        "{during}"
    );
    bus.shutdown().await;
}

/// Blocks its thread (the bus's arbiter) until released: while it does,
/// nothing on that arbiter runs, so messages pile up in the router's
/// mailbox.
struct BlockArbiter {
    entered: std::sync::mpsc::Sender<()>,
    release: std::sync::mpsc::Receiver<()>,
}

impl Actor for BlockArbiter {
    type Context = Context<Self>;
}

impl Handler<Command> for BlockArbiter {
    type Result = Result<Value, HandlerError>;

    fn handle(&mut self, _: Command, _: &mut Self::Context) -> Self::Result {
        let _ = self.entered.send(());
        let _ = self.release.recv_timeout(DEADLINE);
        Ok(json!({"blocked": true}))
    }
}

/// What a raw REQ peer got back, and how long after the router was let go.
#[derive(Debug)]
struct RawOutcome {
    code: Option<String>,
    after_release: Duration,
}

#[actix_rt::test]
async fn requests_queued_in_a_crashing_routers_mailbox_get_shutting_down_not_silence() {
    const QUEUED: usize = 10;
    let addresses = TestAddresses::new();
    let (entered, entered_rx) = std::sync::mpsc::channel();
    let (release_tx, release) = std::sync::mpsc::channel();
    let block = BlockArbiter { entered, release }.start().recipient();
    let bus = Bus::builder(config_for(&addresses))
        .restart_policy(fast_policy())
        .command("block", block)
        .start()
        .expect("the bus starts");
    assert!(bus.wait_for_edges(DEADLINE).await);
    let url = addresses.addresses.command.clone();
    let router = bus.command_router().clone();
    let (outcomes_tx, outcomes) = tokio::sync::oneshot::channel();

    // Raw REQ sockets on a thread of their own: the arbiter will be blocked.
    let peers = std::thread::spawn(move || {
        let sockets: Vec<nng::Socket> = (0..QUEUED)
            .map(|_| {
                let socket = nng::Socket::new(nng::Protocol::Req0).unwrap();
                socket.dial(&url).unwrap();
                socket
                    .set_opt::<nng::options::RecvTimeout>(Some(DEADLINE))
                    .unwrap();
                socket
            })
            .collect();
        entered_rx
            .recv_timeout(DEADLINE)
            .expect("the arbiter gets blocked");
        // The fault first, then the requests: each request the edge hands
        // over now lands behind the fault in the router's mailbox.
        router
            .do_send(InjectFault {
                kind: FaultKind::Panic,
            })
            .unwrap();
        for (n, socket) in sockets.iter().enumerate() {
            let body = json!({"command": "echo", "request_id": format!("q{n}")});
            socket
                .send(nng::Message::from(body.to_string().as_bytes()))
                .unwrap();
        }
        // Sent means written to the connection; NNG's own threads hand each
        // request to the router within microseconds. This margin only makes
        // that likely before the router runs again; a request that arrives
        // later is answered `overloaded` (router restarting) or served, and
        // the assertions below accept those too.
        std::thread::sleep(Duration::from_millis(200));
        let released = Instant::now();
        release_tx.send(()).unwrap();
        let outcomes: Vec<RawOutcome> = sockets
            .iter()
            .map(|socket| {
                let code = socket.recv().ok().map(|reply| {
                    let reply: Value = serde_json::from_slice(&reply).unwrap();
                    reply["code"].as_str().unwrap_or("ok").to_string()
                });
                RawOutcome {
                    code,
                    after_release: released.elapsed(),
                }
            })
            .collect();
        let _ = outcomes_tx.send(outcomes);
    });

    let blocker = client(&addresses.addresses.command).await;
    let blocked = blocker.call("block", json!({})).await;
    let outcomes = within("the raw peers", outcomes).await.unwrap();
    peers.join().unwrap();

    let codes: Vec<Option<&str>> = outcomes.iter().map(|o| o.code.as_deref()).collect();
    let slowest = outcomes.iter().map(|o| o.after_release).max().unwrap();
    eprintln!(
        "router mailbox: {QUEUED} requests queued behind a fault got {codes:?}, the last \
         {} ms after the router ran again; the blocking request itself got {blocked:?}",
        slowest.as_millis()
    );
    assert!(
        codes
            .iter()
            .all(|code| matches!(code, Some("shutting_down" | "overloaded" | "ok"))),
        "a request went unanswered: {codes:?}"
    );
    assert!(
        codes.contains(&Some("shutting_down")),
        "no request was queued behind the fault: {codes:?}"
    );
    assert!(slowest < Duration::from_secs(2), "{slowest:?}");
    assert!(
        matches!(&blocked, Err(ClientError::Remote { code, .. }) if code == "shutting_down"),
        "{blocked:?}"
    );
    bus.shutdown().await;
}

/// An in-process job worker that reports each job it runs, and fails them
/// all when `fail` is set.
struct JobRecorder {
    runs: mpsc::UnboundedSender<String>,
    fail: bool,
}

impl Actor for JobRecorder {
    type Context = Context<Self>;
}

impl Handler<RunJob> for JobRecorder {
    type Result = Result<Value, HandlerError>;

    fn handle(&mut self, run: RunJob, _: &mut Self::Context) -> Self::Result {
        let _ = self.runs.send(run.job.job_id.clone());
        if self.fail {
            return Err(HandlerError::failed("this worker fails every job"));
        }
        Ok(json!({"done": run.job.job_id}))
    }
}

fn job_recorder(fail: bool) -> (Recipient<RunJob>, mpsc::UnboundedReceiver<String>) {
    let (runs, ran) = mpsc::unbounded_channel();
    (JobRecorder { runs, fail }.start().recipient(), ran)
}

#[actix_rt::test]
async fn the_dispatcher_comes_back_on_schedule_with_its_queue_while_the_buses_serve() {
    const JOBS: usize = 5;
    let addresses = TestAddresses::new();
    let bus = fast_bus(&addresses).await;
    let mut queued = Vec::new();
    for n in 0..JOBS {
        let job = JobMessage::new("fault.test", json!({"n": n}));
        queued.push(bus.enqueue(job).await.expect("the job is queued"));
    }
    let command = Pinger::start(&addresses.addresses.command).await;
    let data = Pinger::start(&addresses.addresses.data).await;

    crash_on_schedule("dispatcher", bus.dispatcher(), &fast_policy(), &EVERY_FAULT).await;

    assert_undisturbed(
        "command bus during dispatcher crashes",
        &command.finish().await,
    );
    assert_undisturbed("data bus during dispatcher crashes", &data.finish().await);
    let (worker, mut ran) = job_recorder(false);
    bus.register_worker("fault.test", worker, 2)
        .await
        .expect("the restarted dispatcher takes a worker");
    let mut run = Vec::new();
    while run.len() < JOBS {
        run.push(within("the queued jobs to run", ran.recv()).await.unwrap());
    }
    run.sort();
    queued.sort();
    assert_eq!(run, queued, "the jobs queued before the crashes");
    eprintln!("dispatcher: the {JOBS} jobs queued before three crashes all ran after them");
    bus.shutdown().await;
}

async fn dead_letter_total(client: &BusClient) -> Value {
    let list = client.call("bus.dlq.list", json!({})).await.unwrap();
    list["total"].clone()
}

#[actix_rt::test]
async fn the_dead_letter_actor_comes_back_on_schedule_with_its_store_while_the_buses_serve() {
    let addresses = TestAddresses::new();
    let store = addresses.path().join("dead_letters.sqlite");
    let bus = Bus::builder(config_for(&addresses).dead_letter_path(&store))
        .restart_policy(fast_policy())
        .start()
        .expect("the bus starts");
    assert!(bus.wait_for_edges(DEADLINE).await);
    let (worker, mut ran) = job_recorder(true);
    bus.register_worker("doomed", worker, 1).await.unwrap();
    let job = JobMessage::new("doomed", json!({})).with_max_retries(0);
    let id = bus.enqueue(job).await.unwrap();
    assert_eq!(within("the doomed job to run", ran.recv()).await, Some(id));
    let admin = client(&addresses.addresses.command).await;
    within("the job to be dead-lettered", async {
        while dead_letter_total(&admin).await != json!(1) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let command = Pinger::start(&addresses.addresses.command).await;
    let data = Pinger::start(&addresses.addresses.data).await;

    crash_on_schedule(
        "dead letters",
        bus.dead_letters(),
        &fast_policy(),
        &EVERY_FAULT,
    )
    .await;

    assert_undisturbed(
        "command bus during dead letter crashes",
        &command.finish().await,
    );
    assert_undisturbed("data bus during dead letter crashes", &data.finish().await);
    assert_eq!(dead_letter_total(&admin).await, json!(1));
    eprintln!("dead letters: the entry stored before three crashes is listed after them");
    bus.shutdown().await;
}

#[actix_rt::test]
async fn the_queue_edge_comes_back_on_schedule_and_a_pull_peer_gets_jobs_again() {
    let addresses = TestAddresses::new();
    let bus = fast_bus(&addresses).await;
    let pull = nng::Socket::new(nng::Protocol::Pull0).unwrap();
    pull.set_opt::<nng::options::RecvTimeout>(Some(DEADLINE))
        .unwrap();
    pull.set_opt::<nng::options::ReconnectMinTime>(Some(Duration::from_millis(20)))
        .unwrap();
    pull.set_opt::<nng::options::ReconnectMaxTime>(Some(Duration::from_millis(100)))
        .unwrap();
    pull.dial(&addresses.addresses.job_queue).unwrap();
    let pinger = Pinger::start(&addresses.addresses.command).await;
    let edge = bus
        .edge_role::<PushEdge>("queue-edge")
        .expect("the bus has a queue edge");

    crash_on_schedule("queue edge", &edge, &fast_policy(), &EVERY_FAULT).await;

    let id = bus
        .enqueue(JobMessage::new("pulled", json!({})))
        .await
        .unwrap();
    let receiver = std::thread::spawn(move || pull.recv().map(|body| body.to_vec()));
    let body = within("the pull peer's job", async {
        while !receiver.is_finished() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        receiver.join().unwrap()
    })
    .await
    .expect("the pull peer receives a job");
    let job: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(job["job_id"], json!(id));
    assert_undisturbed(
        "command bus during queue edge crashes",
        &pinger.finish().await,
    );
    assert_eq!(edge.stats().restarts, 3, "{:?}", edge.stats());
    bus.shutdown().await;
}

/// User plus system CPU time `pid` has used so far, from /proc.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the process runs");
    // The command name may hold spaces; the fields after it do not.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("a stat line")
        .1
        .split_whitespace()
        .collect();
    // After the name: state is field 3 of the line, utime 14 and stime 15.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_secs_f64(ticks as f64 / clock_ticks_per_second() as f64)
}

fn clock_ticks_per_second() -> u64 {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .expect("getconf runs");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(100)
}

/// `dgbit-bus send <command>` to the bus at `addresses`, with a short
/// timeout; the reply as JSON when it was one.
fn send(addresses: &Addresses, command: &str, data: bool) -> Option<Value> {
    let mut run = common::bus_command(addresses);
    run.args(["send", command, "--timeout-s", "2"]);
    if data {
        run.arg("--data");
    }
    let out = run.output().expect("dgbit-bus send runs");
    let reply: Value = serde_json::from_slice(&out.stdout).ok()?;
    (out.status.success() && reply["status"] == "ok").then_some(reply)
}

/// Send SIGTERM to `pid` (through kill(1): the tests use no `unsafe`).
fn terminate(pid: u32) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -TERM {pid} failed");
}

/// Wait for `child` to exit, up to `limit`.
fn exit_within(
    child: &mut std::process::Child,
    limit: Duration,
) -> Option<std::process::ExitStatus> {
    let mut status = None;
    common::wait_until(limit, || {
        status = child.try_wait().expect("wait on the child");
        status.is_some()
    });
    status
}

/// A `dgbit-bus serve` child with `extra` flags, its stderr in `log`;
/// killed when dropped. Dead letters stay in memory unless `extra` names a
/// file, so that nothing is written outside the test's directory.
fn spawn_serve(addresses: &Addresses, extra: &[&str], log: &std::path::Path) -> ServeProcess {
    let mut serve = common::bus_command(addresses);
    serve.arg("serve");
    if !extra.contains(&"--dead-letter-path") {
        serve.args(["--dead-letter-path", ":memory:"]);
    }
    let child = serve
        .args(extra)
        .env(
            "RUST_LOG",
            std::env::var("SERVE_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).expect("a log file"))
        .spawn()
        .expect("dgbit-bus serve starts");
    ServeProcess { child }
}

#[test]
fn a_command_address_in_a_missing_directory_is_retried_with_growing_delays_at_low_cpu_until_it_exists(
) {
    let dir = TestAddresses::new();
    // Two levels missing: serve creates at most the last one itself.
    let missing = dir.path().join("not-yet").join("there");
    let mut addresses = dir.addresses.clone();
    addresses.command = format!("ipc://{}", missing.join("cmd.ipc").display());
    let log = dir.path().join("serve.log");
    let mut serve = spawn_serve(&addresses, &[], &log);
    assert!(
        common::wait_until(Duration::from_secs(20), || send(&addresses, "ping", true)
            .is_some()),
        "the data bus never answered"
    );

    // Watch the failed opens in the log (which costs the bus nothing) until
    // the fifth restart has failed too; attempt 6 then waits 3.2 s.
    let failed_opens = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("edge could not open")
            .count()
    };
    let (watched_from, cpu_before) = (Instant::now(), cpu_time(serve.pid()));
    let mut failures = vec![(failed_opens(), Instant::now())];
    common::wait_until(Duration::from_secs(15), || {
        let count = failed_opens();
        if count > failures.last().unwrap().0 {
            failures.push((count, Instant::now()));
        }
        count >= 6
    });
    let watched = watched_from.elapsed();
    let cpu = cpu_time(serve.pid()) - cpu_before;
    let gaps: Vec<u128> = failures
        .windows(2)
        .filter(|pair| pair[1].0 == pair[0].0 + 1)
        .map(|pair| (pair[1].1 - pair[0].1).as_millis())
        .collect();
    eprintln!(
        "missing dir: {} failed opens; gaps between them {gaps:?} ms; the bus used {} ms \
         of CPU in {} ms while retrying ({:.1} %)",
        failed_opens(),
        cpu.as_millis(),
        watched.as_millis(),
        100.0 * cpu.as_secs_f64() / watched.as_secs_f64()
    );
    assert!(failed_opens() >= 6, "only {} failed opens", failed_opens());
    assert!(
        gaps.windows(2).all(|pair| pair[1] > pair[0]),
        "the delays did not grow: {gaps:?}"
    );
    assert!(
        cpu.as_secs_f64() < 0.10 * watched.as_secs_f64(),
        "retrying is not cheap: {cpu:?} of CPU in {watched:?}"
    );

    // The same, as the supervisor reports it on the data bus.
    let status = send(&addresses, "status", true).expect("the data bus answers status");
    let edge = status["result"]["roles"]["edges"]["command-edge"].clone();
    eprintln!("missing dir: status of command-edge: {edge}");
    assert!(edge["restarts"].as_u64().unwrap() >= 6, "{edge}");
    assert_eq!(edge["state"], "restarting", "{edge}");
    assert_eq!(edge["last_crash"]["kind"], "stop", "{edge}");
    // Attempt 6 of the default schedule waits 3.2 s ±10 %.
    assert!(edge["last_delay_ms"].as_u64().unwrap() >= 2880, "{edge}");
    assert!(
        send(&addresses, "ping", false).is_none(),
        "the command bus answered from a missing directory"
    );

    std::fs::create_dir_all(&missing).unwrap();
    let created = Instant::now();
    let serves = common::wait_until(Duration::from_secs(10), || {
        send(&addresses, "ping", false).is_some()
    });
    eprintln!(
        "missing dir: the command bus served {} ms after the directory was created",
        created.elapsed().as_millis()
    );
    assert!(
        serves,
        "the command bus never served after the directory appeared"
    );

    terminate(serve.pid());
    let exit = exit_within(&mut serve.child, Duration::from_secs(10));
    assert!(exit.is_some_and(|status| status.success()), "{exit:?}");
}

/// How one request of the load ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Ok,
    ShuttingDown,
    OtherError,
    /// No reply within the client's timeout, or the connection failed.
    NoReply,
}

#[derive(Debug, Clone, Copy)]
struct Sent {
    at: Instant,
    ending: Ending,
}

/// Send `echo` requests from `clients` clients with `loops` requests in
/// flight each until `stop` turns true, or, as a well-behaved client does,
/// until the bus answers `shutting_down`; record every request.
fn echo_load(
    url: &str,
    clients: usize,
    loops: usize,
    timeout: Duration,
    stop: watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<Vec<Sent>>> {
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let options = ClientOptions::default()
            .timeout(timeout)
            .connect_attempts(5, Duration::from_millis(50));
        let client = Arc::new(BusClient::connect_lazy(url, options).unwrap());
        for _ in 0..loops {
            let (client, stop) = (client.clone(), stop.clone());
            tasks.push(actix_rt::spawn(async move {
                let mut sent = Vec::new();
                let mut n = 0_u64;
                while !*stop.borrow() {
                    n += 1;
                    let at = Instant::now();
                    let ending = match client.call("echo", json!({"n": n})).await {
                        Ok(reply) if reply == json!({"echo": {"n": n}}) => Ending::Ok,
                        Ok(_) => Ending::OtherError,
                        Err(ClientError::Remote { code, .. }) if code == "shutting_down" => {
                            Ending::ShuttingDown
                        }
                        Err(ClientError::Remote { code, message }) => {
                            eprintln!("echo load: unexpected error reply {code}: {message}");
                            Ending::OtherError
                        }
                        Err(_) => Ending::NoReply,
                    };
                    sent.push(Sent { at, ending });
                    if ending == Ending::ShuttingDown {
                        break;
                    }
                }
                sent
            }));
        }
    }
    tasks
}

/// SIGTERM with requests in flight, against the binary. The clients stop
/// sending once the bus answers `shutting_down`, as a well-behaved client
/// does.
///
/// What counts as a failure:
/// - a request sent before the signal that got no reply (`ok` or
///   `shutting_down` are both fine);
/// - a request sent while the command socket was open (10 ms before it
///   closed, at the latest) that got no reply;
/// - a client timeout that ran out while the process still ran. Once the
///   process is gone nobody can answer, and the client's own timeout is the
///   clear error its caller gets.
#[actix_rt::test]
async fn sigterm_under_load_answers_every_request_it_took_exits_zero_in_time_and_removes_its_ipc_files(
) {
    const CLIENTS: usize = 8;
    const LOOPS: usize = 4;
    const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
    let drain_deadline = Duration::from_secs(5);
    let dir = TestAddresses::new();
    let addresses = dir.addresses.clone();
    let log = dir.path().join("serve.log");
    let mut serve = spawn_serve(
        &addresses,
        &["--drain-deadline-s", &drain_deadline.as_secs().to_string()],
        &log,
    );
    let pid = serve.pid();
    let pinger = client(&addresses.command).await;
    until_pong(&pinger, "the serve child").await;
    let (stop, stopped) = watch::channel(false);
    let load = echo_load(&addresses.command, CLIENTS, LOOPS, CLIENT_TIMEOUT, stopped);
    within("the load to get going", async {
        while serve_echoes(&pinger).await < 200 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;

    // The command socket's file goes when the socket closes.
    let socket_file = dgbit_bus::edge::ipc_path(&addresses.command).unwrap();
    let closed = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        while socket_file.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        Instant::now()
    });
    // Timed once kill(1) is done: a request counted as sent before the
    // signal was sent before the bus could see it.
    terminate(pid);
    let signalled = Instant::now();
    // A blocking wait, so that the exit is timed when it happens.
    let (exit_tx, exit_rx) = tokio::sync::oneshot::channel();
    let waiter = std::thread::spawn(move || {
        let status = serve.child.wait().ok();
        let _ = exit_tx.send((status, Instant::now()));
    });
    let Ok(exit) = tokio::time::timeout(Duration::from_secs(30), exit_rx).await else {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
        panic!("the serve child did not exit within 30 s of SIGTERM");
    };
    let (status, exited) = exit.unwrap();
    waiter.join().unwrap();
    let closed = closed.join().unwrap();
    let _ = stop.send(true);
    let mut sent = Vec::new();
    for task in load {
        sent.extend(within("the load to stop", task).await.unwrap());
    }

    let before: Vec<&Sent> = sent.iter().filter(|s| s.at < signalled).collect();
    let after: Vec<&Sent> = sent.iter().filter(|s| s.at >= signalled).collect();
    let count = |list: &[&Sent], ending| list.iter().filter(|s| s.ending == ending).count();
    let unanswered = |failed: &dyn Fn(&Sent) -> bool| {
        sent.iter()
            .filter(|s| s.ending == Ending::NoReply && failed(s))
            .count()
    };
    let while_open = unanswered(&|s| s.at + Duration::from_millis(10) < closed);
    let while_alive = unanswered(&|s| s.at + CLIENT_TIMEOUT < exited);
    let leftovers: Vec<String> = [
        &addresses.command,
        &addresses.data,
        &addresses.event,
        &addresses.job_queue,
    ]
    .iter()
    .filter_map(|url| dgbit_bus::edge::ipc_path(url))
    .filter(|path| path.exists())
    .map(|path| path.display().to_string())
    .collect();
    eprintln!(
        "sigterm: {} requests before the signal: {} ok, {} shutting_down, {} no reply; {} \
         after it: {} ok, {} shutting_down, {} no reply; unanswered while the socket was \
         open: {while_open}, while the process ran: {while_alive}; the socket closed {} ms \
         and the process exited ({status:?}) {} ms after the signal (drain deadline {} ms)",
        before.len(),
        count(&before, Ending::Ok),
        count(&before, Ending::ShuttingDown),
        count(&before, Ending::NoReply),
        after.len(),
        count(&after, Ending::Ok),
        count(&after, Ending::ShuttingDown),
        count(&after, Ending::NoReply),
        (closed - signalled).as_millis(),
        (exited - signalled).as_millis(),
        drain_deadline.as_millis(),
    );
    assert!(before.len() >= 200, "too little load: {}", before.len());
    assert_eq!(
        count(&before, Ending::Ok) + count(&before, Ending::ShuttingDown),
        before.len(),
        "a request sent before the signal went unanswered"
    );
    assert_eq!(
        count(&before, Ending::OtherError) + count(&after, Ending::OtherError),
        0
    );
    assert_eq!(
        (while_open, while_alive),
        (0, 0),
        "requests went unanswered"
    );
    assert!(status.is_some_and(|status| status.success()), "{status:?}");
    assert!(exited - signalled <= drain_deadline, "exit took too long");
    assert!(leftovers.is_empty(), "ipc files left behind: {leftovers:?}");
}

/// How many `echo` requests the bus has answered `ok` so far.
async fn serve_echoes(client: &BusClient) -> u64 {
    let status = client.call("status", json!({})).await.unwrap_or_default();
    status["roles"]["command"]["ok"]
        .as_u64()
        .unwrap_or_default()
}

/// Answers after `delay`.
struct Sleeper {
    delay: Duration,
}

impl Actor for Sleeper {
    type Context = Context<Self>;
}

impl Handler<Command> for Sleeper {
    type Result = ResponseFuture<Result<Value, HandlerError>>;

    fn handle(&mut self, command: Command, _: &mut Self::Context) -> Self::Result {
        let (delay, payload) = (self.delay, command.request.payload);
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            Ok(json!({"slept": payload}))
        })
    }
}

#[actix_rt::test]
async fn shutdown_finishes_slow_commands_within_the_deadline_and_abandons_later_ones_with_an_error()
{
    const SLOW: usize = 16;
    let addresses = TestAddresses::new();
    let drain_deadline = Duration::from_secs(2);
    let config = BusConfig {
        drain_deadline,
        ..config_for(&addresses)
    };
    let slow = Sleeper {
        delay: Duration::from_millis(500),
    };
    let stuck = Sleeper {
        delay: Duration::from_secs(30),
    };
    let bus = Bus::builder(config)
        .restart_policy(fast_policy())
        .command("slow", slow.start().recipient())
        .command("stuck", stuck.start().recipient())
        .start()
        .expect("the bus starts");
    assert!(bus.wait_for_edges(DEADLINE).await);
    let options = ClientOptions::default().timeout(Duration::from_secs(10));
    let client = Arc::new(
        BusClient::connect(&addresses.addresses.command, options)
            .await
            .unwrap(),
    );
    let call = |name: &'static str, n: usize| {
        let client = client.clone();
        actix_rt::spawn(async move {
            let outcome = client.call(name, json!({"n": n})).await;
            (outcome, Instant::now())
        })
    };
    let slow_calls: Vec<_> = (0..SLOW).map(|n| call("slow", n)).collect();
    let stuck_call = call("stuck", 0);
    within("the commands to reach their handlers", async {
        while router_in_flight(bus.command_router()).await < SLOW as u64 + 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;

    let began = Instant::now();
    let stopping = actix_rt::spawn(bus.shutdown());
    // A request that arrives while the bus drains is refused at once.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let late = client.call("echo", json!({})).await;
    within("shutdown", stopping).await.unwrap();
    let took = began.elapsed();

    let mut slowest = Duration::ZERO;
    for slow in slow_calls {
        let (outcome, at) = within("a slow reply", slow).await.unwrap();
        assert!(
            outcome.is_ok(),
            "a slow command was not drained: {outcome:?}"
        );
        slowest = slowest.max(at - began);
    }
    let (stuck, stuck_at) = within("the stuck reply", stuck_call).await.unwrap();
    eprintln!(
        "shutdown: {SLOW} slow (500 ms) commands all finished, the last {} ms into the drain; \
         shutdown took {} ms (deadline {} ms); the 30 s command got {:?} after {} ms; a \
         request during the drain got {late:?}",
        slowest.as_millis(),
        took.as_millis(),
        drain_deadline.as_millis(),
        stuck.as_ref().map_err(ToString::to_string),
        (stuck_at - began).as_millis(),
    );
    assert!(
        matches!(&late, Err(ClientError::Remote { code, .. }) if code == "shutting_down"),
        "{late:?}"
    );
    assert!(
        matches!(&stuck, Err(ClientError::Remote { code, .. }) if code == "shutting_down"),
        "the command past the deadline got {stuck:?}"
    );
    assert!(stuck_at - began < drain_deadline + Duration::from_millis(500));
    assert!(
        took < drain_deadline + Duration::from_millis(500),
        "{took:?}"
    );
    let command_ipc = dgbit_bus::edge::ipc_path(&addresses.addresses.command).unwrap();
    assert!(!command_ipc.exists(), "the ipc file is left behind");
}

#[test]
fn serve_exits_non_zero_naming_the_role_it_gave_up_and_still_cleans_up() {
    let dir = TestAddresses::new();
    let mut addresses = dir.addresses.clone();
    let missing = dir.path().join("never").join("there");
    addresses.command = format!("ipc://{}", missing.join("cmd.ipc").display());
    let log = dir.path().join("serve.log");
    let started = Instant::now();
    let mut serve = spawn_serve(
        &addresses,
        &["--max-restarts", "2", "--restart-window-s", "60"],
        &log,
    );

    // 100 ms and 200 ms of restart delay, then the third failure is final.
    let exit = exit_within(&mut serve.child, Duration::from_secs(20));
    let took = started.elapsed();
    let stderr = std::fs::read_to_string(&log).unwrap();
    let last_line = stderr.lines().last().unwrap_or_default().to_string();
    eprintln!(
        "give-up: serve exited {exit:?} {} ms after it started; its last words: {last_line}",
        took.as_millis()
    );
    let status = exit.expect("serve exits once the role is given up");
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        last_line.contains("`command-edge`") && last_line.contains("given up"),
        "{stderr}"
    );
    assert!(
        stderr.contains("role given up"),
        "no give-up log line: {stderr}"
    );
    let leftovers: Vec<_> = [&addresses.data, &addresses.event, &addresses.job_queue]
        .iter()
        .filter_map(|url| dgbit_bus::edge::ipc_path(url))
        .filter(|path| path.exists())
        .collect();
    assert!(leftovers.is_empty(), "ipc files left behind: {leftovers:?}");
}

#[actix_rt::test]
async fn sigterm_keeps_the_jobs_it_did_not_hand_out_for_the_next_start() {
    const JOBS: usize = 20;
    let dir = TestAddresses::new();
    let addresses = dir.addresses.clone();
    let store = dir.path().join("dead_letters.sqlite");
    let store = store.to_str().unwrap();
    let extra = ["--dead-letter-path", store, "--drain-deadline-s", "2"];
    let mut first = spawn_serve(&addresses, &extra, &dir.path().join("first.log"));
    let producer = client(&addresses.command).await;
    until_pong(&producer, "the first serve child").await;
    let mut enqueued = Vec::new();
    for n in 0..JOBS {
        let payload = json!({"job_type": "kept", "payload": {"n": n}});
        let queued = producer.call("bus.enqueue", payload).await.unwrap();
        enqueued.push(queued["job_id"].as_str().unwrap().to_string());
    }

    terminate(first.pid());
    let exit = exit_within(&mut first.child, Duration::from_secs(10));
    assert!(exit.is_some_and(|status| status.success()), "{exit:?}");
    let second = spawn_serve(&addresses, &extra, &dir.path().join("second.log"));
    let admin = client(&addresses.command).await;
    until_pong(&admin, "the second serve child").await;
    let listed = admin
        .call("bus.dlq.list", json!({"limit": 100}))
        .await
        .unwrap();

    let mut kept: Vec<String> = listed["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["job_id"].as_str().unwrap_or_default().to_string())
        .collect();
    eprintln!(
        "sigterm with a queue: {JOBS} queued jobs, {} kept as dead letters for the next start, \
         e.g. {}",
        kept.len(),
        listed["entries"][0]
    );
    kept.sort();
    enqueued.sort();
    assert_eq!(kept, enqueued);
    terminate(second.pid());
    drop(second);
}
