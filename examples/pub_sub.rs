//! Publish and subscribe: in-process subscriber actors with patterns, a
//! remote subscriber over NNG (`SubEdge`), publishing from in-process code
//! and from another process's point of view, and drops that are counted.
//!
//! `cargo run --example pub_sub`
//!
//! Subscribers:
//! - in-process `job.*`, `*.failed` and `*`, each an actor that the bus
//!   hands `EventDelivery` messages;
//! - remote `trade.*`: a `SubEdge` dialing the bus's event address, as
//!   another process would (`dgbit-bus tail` and pynng's `Sub0` do the same);
//! - in-process `signal.*` with a buffer of only 4 events and a handler that
//!   takes 20 ms per event, to show what happens to a slow subscriber.
//!
//! PUB/SUB keeps nothing for a subscriber that is not connected yet, so the
//! example first publishes `trade.updated` probes until the remote
//! subscriber has seen one. Then it publishes a fixed set of events, one of
//! them through the command bus (`bus.publish`, how another process
//! publishes), waits until every subscriber has what its pattern selects,
//! and prints who got what. Last, a burst of 50 `signal.generated` events
//! overflows the slow subscriber's buffer: the events it missed are counted
//! as dropped, for it alone.

#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use dgbit_bus::bus::{Bus, BusHandle};
use dgbit_bus::client::{BusClient, ClientOptions};
use dgbit_bus::config::BusConfig;
use dgbit_bus::edge::subscribe::{SubEdge, SubEdgeSettings};
use dgbit_bus::message::{EventDelivery, StatsQuery};
use dgbit_bus::publisher::Subscribe;
use dgbit_bus::topics::Pattern;
use dgbit_bus::wire::Event;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The events published once every subscriber is connected. The last one
/// goes through the command bus.
const TOPICS: [&str; 8] = [
    "job.created",
    "job.completed",
    "job.failed",
    "trade.entered",
    "trade.exited",
    "data.error",
    "system.alert",
    "trade.signal",
];

/// Events in the burst that overflows the slow subscriber.
const BURST: usize = 50;

/// The slow subscriber's buffer, in events.
const SLOW_BUFFER: usize = 4;

/// How long the slow subscriber takes per event.
const SLOW_HANDLING: Duration = Duration::from_millis(20);

/// How long any wait in this example may take.
const WAIT_LIMIT: Duration = Duration::from_secs(10);

/// The in-process subscribers' patterns, in the order they are printed.
const LOCAL_PATTERNS: [&str; 3] = ["job.*", "*.failed", "*"];

/// The remote subscriber's pattern.
const REMOTE_PATTERN: &str = "trade.*";

/// What each subscriber received, and the drop counts.
#[derive(Debug, Clone)]
pub struct Report {
    /// Topics received, in arrival order, by subscriber pattern (the remote
    /// one under `remote trade.*`); probes left out.
    pub received: BTreeMap<String, Vec<String>>,
    /// Probes published before the remote subscriber saw one.
    pub probes: u32,
    /// The slow subscriber's count of burst events handled and dropped.
    pub slow_delivered: u64,
    pub slow_dropped: u64,
    /// The publisher's counters at the end.
    pub publisher: Value,
}

fn main() -> anyhow::Result<()> {
    support::init_tracing();
    actix::System::new().block_on(async { run().await.map(|_| ()) })
}

/// Run every step and print what each subscriber got.
///
/// # Errors
///
/// When the bus cannot start, or an event does not arrive within 10 s.
pub async fn run() -> anyhow::Result<Report> {
    let (_dir, addresses) = support::temp_addresses()?;
    // No `system.health` during the run: the `*` subscriber should see only
    // what this example publishes.
    let config = BusConfig::default()
        .addresses(addresses.clone())
        .health_interval(Duration::from_secs(600));
    let bus = Bus::builder(config).start()?;
    anyhow::ensure!(
        bus.wait_for_edges(Duration::from_secs(5)).await,
        "the bus's sockets did not open"
    );
    println!("event bus at {}", addresses.event);

    let mut local = Vec::new();
    for pattern in LOCAL_PATTERNS {
        local.push((pattern, support::tap(&bus, pattern)?));
    }
    let (remote_tap, mut remote) = support::EventTap::new();
    let settings = SubEdgeSettings::new(addresses.event.clone(), Pattern::parse(REMOTE_PATTERN)?);
    let edge = SubEdge::dial(settings, remote_tap.start().recipient())?;

    let outcome = exchange(&bus, &addresses.command, &mut local, &mut remote).await;
    edge.close();
    let outcome = match outcome {
        Ok(received) => overflow_slow_subscriber(&bus)
            .await
            .map(|slow| (received, slow)),
        Err(err) => Err(err),
    };
    let publisher = bus
        .publisher()
        .send(StatsQuery)
        .await
        .unwrap_or(Value::Null);
    bus.shutdown().await;

    let ((received, probes), (slow_delivered, slow_dropped)) = outcome?;
    println!(
        "publisher: {} events published, {} deliveries in-process, {} dropped",
        publisher["events_published"], publisher["events_delivered"], publisher["events_dropped"]
    );
    Ok(Report {
        received,
        probes,
        slow_delivered,
        slow_dropped,
        publisher,
    })
}

type Tap = mpsc::UnboundedReceiver<Arc<Event>>;

/// Connect the remote subscriber, publish [`TOPICS`], collect what each
/// subscriber got.
async fn exchange(
    bus: &BusHandle,
    command_address: &str,
    local: &mut [(&'static str, Tap)],
    remote: &mut Tap,
) -> anyhow::Result<(BTreeMap<String, Vec<String>>, u32)> {
    let probes = wait_for_remote(bus, remote).await?;
    println!("remote subscriber {REMOTE_PATTERN} connected after {probes} probe(s)");
    println!();

    let (in_process, by_command) = TOPICS.split_at(TOPICS.len() - 1);
    for topic in in_process {
        bus.publish(Event::new(*topic, "pub-sub-example", json!({"n": 1})));
    }
    let client = BusClient::connect(command_address, ClientOptions::default()).await?;
    let published = client
        .call(
            "bus.publish",
            json!({"event_type": by_command[0], "data": {"symbol": "EURUSD", "side": "buy"}}),
        )
        .await?;
    println!("published {in_process:?} in-process");
    println!(
        "published [{:?}] through the command bus: {published}",
        by_command[0]
    );
    println!();

    let mut received = BTreeMap::new();
    for (pattern, tap) in local.iter_mut() {
        let topics = collect(tap, pattern).await;
        received.insert(pattern.to_string(), topics);
    }
    received.insert(
        format!("remote {REMOTE_PATTERN}"),
        collect(remote, REMOTE_PATTERN).await,
    );
    for (subscriber, topics) in &received {
        println!(
            "{subscriber:<16} got {}: {}",
            topics.len(),
            topics.join(", ")
        );
    }
    println!();
    Ok((received, probes))
}

/// Publish a probe every 20 ms until the remote subscriber receives one;
/// returns how many were published.
async fn wait_for_remote(bus: &BusHandle, remote: &mut Tap) -> anyhow::Result<u32> {
    let deadline = Instant::now() + WAIT_LIMIT;
    let mut probes = 0;
    while Instant::now() < deadline {
        probes += 1;
        bus.publish(Event::new(
            "trade.updated",
            "pub-sub-example",
            json!({"probe": probes}),
        ));
        let soon = Instant::now() + Duration::from_millis(20);
        if support::next_matching(remote, soon, is_probe)
            .await
            .is_some()
        {
            return Ok(probes);
        }
    }
    anyhow::bail!("the remote subscriber saw no probe within {WAIT_LIMIT:?}")
}

fn is_probe(event: &Event) -> bool {
    event.data.contains_key("probe")
}

/// The topics of every non-probe event `tap` receives until it has all
/// that [`TOPICS`] holds for `pattern`, or the wait runs out.
async fn collect(tap: &mut Tap, pattern: &str) -> Vec<String> {
    let pattern = Pattern::parse(pattern).expect("the example's patterns are valid");
    let expected = TOPICS.iter().filter(|topic| pattern.matches(topic)).count();
    let deadline = Instant::now() + WAIT_LIMIT;
    let mut topics = Vec::new();
    while topics.len() < expected {
        match support::next_matching(tap, deadline, |event| !is_probe(event)).await {
            Some(event) => topics.push(event.event_type.clone()),
            None => break,
        }
    }
    topics
}

/// Handles one event per [`SLOW_HANDLING`].
struct SlowSubscriber;

impl Actor for SlowSubscriber {
    type Context = Context<Self>;
}

impl Handler<EventDelivery> for SlowSubscriber {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _delivery: EventDelivery, _ctx: &mut Self::Context) -> Self::Result {
        Box::pin(actix::clock::sleep(SLOW_HANDLING))
    }
}

/// Publish a burst at a slow subscriber with a small buffer and wait until
/// every event of it is accounted for; returns (delivered, dropped).
async fn overflow_slow_subscriber(bus: &BusHandle) -> anyhow::Result<(u64, u64)> {
    let subscribe = Subscribe {
        pattern: "signal.*".into(),
        subscriber: SlowSubscriber.start().recipient(),
        buffer: Some(SLOW_BUFFER),
    };
    bus.publisher()
        .send(subscribe)
        .await
        .map_err(|err| anyhow::anyhow!("subscribing: {err}"))??;
    for n in 0..BURST {
        bus.publish(Event::new(
            "signal.generated",
            "pub-sub-example",
            json!({"n": n}),
        ));
    }

    let deadline = Instant::now() + WAIT_LIMIT;
    loop {
        let (delivered, dropped) = slow_counts(bus).await;
        if delivered + dropped >= BURST as u64 {
            println!(
                "slow subscriber signal.* (buffer {SLOW_BUFFER}, {} ms per event): \
                 {BURST} published in a burst, {delivered} handled, {dropped} dropped and counted",
                SLOW_HANDLING.as_millis()
            );
            return Ok((delivered, dropped));
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the burst was not accounted for within {WAIT_LIMIT:?}"
        );
        actix::clock::sleep(SLOW_HANDLING).await;
    }
}

/// The `signal.*` subscription's delivered and dropped counts.
async fn slow_counts(bus: &BusHandle) -> (u64, u64) {
    let stats = bus
        .publisher()
        .send(StatsQuery)
        .await
        .unwrap_or(Value::Null);
    let empty = Vec::new();
    let subscription = stats["subscriptions"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .find(|subscription| subscription["pattern"] == "signal.*");
    let count = |key: &str| subscription.and_then(|s| s[key].as_u64()).unwrap_or(0);
    (count("delivered"), count("dropped"))
}
