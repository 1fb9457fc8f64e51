//! The event bus, in-process and over real sockets: `TopicPublisher`,
//! `PubEdge`, `SubEdge`, dgbit's Python subscribers (pynng) and remote
//! publishing through `bus.publish`.
//!
//! PUB/SUB has a slow joiner: a subscriber that has just dialed misses
//! events until its connection is up. Every socket test therefore publishes
//! warm-up events until the subscriber shows one, and only then sends the
//! batch it counts.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use dgbit_bus::edge::publish::PubEdge;
use dgbit_bus::edge::subscribe::{SubEdge, SubEdgeSettings};
use dgbit_bus::edge::EdgeOptions;
use dgbit_bus::message::{Command, EventDelivery, Publish, StatsQuery};
use dgbit_bus::publisher::{
    PublisherSettings, Subscribe, SubscriberRegistry, TopicPublisher, PUBLISH_COMMAND,
};
use dgbit_bus::topics::{self, Pattern};
use dgbit_bus::wire::{CommandReply, CommandRequest, Event};
use nng::options::Options;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use common::recorder;

/// The longest any single wait in these tests may take.
const DEADLINE: Duration = Duration::from_secs(20);

/// Topics that `job.*` must select, mixed with near misses it must not.
const MIXED_BATCH: [&str; 7] = [
    "jobs.archived",
    topics::JOB_CREATED,
    topics::TRADE_ENTERED,
    "job",
    topics::DATA_ERROR,
    topics::JOB_COMPLETED,
    "jobs.archived",
];

fn event_url(dir: &tempfile::TempDir) -> String {
    format!("ipc://{}", dir.path().join("evt.ipc").display())
}

fn start_publisher(edge: Option<Arc<PubEdge>>) -> (Addr<TopicPublisher>, SubscriberRegistry) {
    let registry = SubscriberRegistry::new();
    let publisher =
        TopicPublisher::new(PublisherSettings::default(), registry.clone(), edge).start();
    (publisher, registry)
}

async fn publish(publisher: &Addr<TopicPublisher>, event: Event) {
    publisher
        .send(Publish { event })
        .await
        .expect("publisher alive");
}

fn warm_up_event() -> Event {
    Event::new(topics::JOB_PROGRESS, "test", json!({"warm_up": true}))
}

fn stop_event(topic: &str) -> Event {
    Event::new(topic, "test", json!({"stop": true}))
}

/// Publish a warm-up event every 20 ms until the subscriber reports one, and
/// return that first report.
async fn warm_up<T>(
    publisher: &Addr<TopicPublisher>,
    received: &mut mpsc::UnboundedReceiver<T>,
) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        publish(publisher, warm_up_event()).await;
        let wait = tokio::time::timeout(Duration::from_millis(20), received.recv());
        if let Ok(Some(first)) = wait.await {
            return first;
        }
        assert!(
            Instant::now() < deadline,
            "the subscriber saw no event within {DEADLINE:?}"
        );
    }
}

/// Everything received up to and including the first item `is_stop` accepts.
async fn collect_until<T>(
    received: &mut mpsc::UnboundedReceiver<T>,
    is_stop: impl Fn(&T) -> bool,
) -> Vec<T> {
    let mut items = Vec::new();
    loop {
        let next = tokio::time::timeout(DEADLINE, received.recv())
            .await
            .unwrap_or_else(|_| panic!("no stop event within {DEADLINE:?}"))
            .expect("the subscriber is alive");
        let stop = is_stop(&next);
        items.push(next);
        if stop {
            return items;
        }
    }
}

/// The topics of a recorded batch, warm-up events left out.
fn batch_topics(events: &[Arc<Event>]) -> Vec<String> {
    events
        .iter()
        .filter(|event| !event.data.contains_key("warm_up"))
        .map(|event| event.event_type.clone())
        .collect()
}

/// Counts events, taking `per_event` over each (0: as fast as it can).
struct Counter {
    received: Arc<AtomicU64>,
    per_event: Duration,
}

impl Actor for Counter {
    type Context = Context<Self>;
}

impl Handler<EventDelivery> for Counter {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: EventDelivery, _: &mut Self::Context) -> Self::Result {
        let (received, per_event) = (Arc::clone(&self.received), self.per_event);
        Box::pin(async move {
            if !per_event.is_zero() {
                tokio::time::sleep(per_event).await;
            }
            received.fetch_add(1, Ordering::Relaxed);
        })
    }
}

fn counter(per_event: Duration) -> (Recipient<EventDelivery>, Arc<AtomicU64>) {
    let received = Arc::new(AtomicU64::new(0));
    let actor = Counter {
        received: Arc::clone(&received),
        per_event,
    };
    (actor.start().recipient(), received)
}

async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `tests/python/sub_events.py` running as a child, its JSON lines on a
/// channel. Killed when dropped.
struct PythonSubscriber {
    child: Child,
    lines: mpsc::UnboundedReceiver<Value>,
}

impl PythonSubscriber {
    fn start(url: &str, prefix: Option<&str>) -> Self {
        let mut command = common::python();
        command
            .arg(common::python_script("sub_events.py"))
            .arg(url)
            .args(prefix)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = command.spawn().expect("python3 starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let (sender, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| json!({"error": "not JSON", "body": line}));
                if sender.send(value).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }
}

impl Drop for PythonSubscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn python_batch_topics(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .filter(|line| line["data"]["warm_up"] != true)
        .map(|line| line["event_type"].as_str().unwrap_or("?").to_string())
        .collect()
}

#[actix::test]
async fn ten_thousand_events_reach_a_fast_subscriber_in_full_while_a_slow_ones_drops_are_counted() {
    const EVENTS: u64 = 10_000;
    let (publisher, registry) = start_publisher(None);
    let (fast, fast_received) = counter(Duration::ZERO);
    let (slow, slow_received) = counter(Duration::from_millis(5));
    for subscriber in [fast, slow] {
        let subscribe = Subscribe {
            pattern: "*".into(),
            subscriber,
            buffer: None,
        };
        publisher.send(subscribe).await.unwrap().unwrap();
    }

    let started = Instant::now();
    for i in 0..EVENTS {
        publish(
            &publisher,
            Event::new(topics::JOB_PROGRESS, "test", json!({"i": i})),
        )
        .await;
    }
    let publishing = started.elapsed();

    wait_for("the fast subscriber to get every event", || {
        fast_received.load(Ordering::Relaxed) == EVENTS
    })
    .await;
    wait_for("the slow subscriber's buffer to drain", || {
        let slow = &registry.stats("").subscriptions[1];
        slow.queued == 0 && slow.delivered + slow.dropped == EVENTS
    })
    .await;

    let stats = publisher.send(StatsQuery).await.unwrap();
    eprintln!("publishing {EVENTS} events took {publishing:?}; stats {stats}");
    let (fast_stats, slow_stats) = (&stats["subscriptions"][0], &stats["subscriptions"][1]);
    assert_eq!(fast_stats["delivered"], EVENTS);
    assert_eq!(fast_stats["dropped"], 0);
    let slow_dropped = slow_stats["dropped"].as_u64().unwrap();
    assert!(slow_dropped > 0, "{stats}");
    assert_eq!(slow_received.load(Ordering::Relaxed) + slow_dropped, EVENTS);
    assert_eq!(stats["events_dropped"], slow_dropped);
    assert_eq!(stats["events_published"], EVENTS);
    // Handled in line, the slow subscriber alone would take 50 s.
    assert!(
        publishing < Duration::from_secs(5),
        "publishing took {publishing:?}"
    );
}

#[actix::test]
async fn a_pynng_subscriber_parses_every_event_with_exactly_dgbits_keys() {
    let dir = tempfile::tempdir().unwrap();
    let url = event_url(&dir);
    let edge = Arc::new(PubEdge::listen(&url, &EdgeOptions::default()).unwrap());
    let (publisher, registry) = start_publisher(Some(edge));
    let mut peer = PythonSubscriber::start(&url, None);
    let first = warm_up(&publisher, &mut peer.lines).await;
    assert!(first.get("error").is_none(), "{first}");

    for (i, topic) in topics::ALL.iter().enumerate() {
        let mut event = Event::new(*topic, "test", json!({"i": i}));
        if i.is_multiple_of(2) {
            event = event.with_correlation_id(format!("c-{i}"));
        }
        publish(&publisher, event).await;
    }
    publish(&publisher, stop_event(topics::HEALTH_CHECK)).await;
    let lines = collect_until(&mut peer.lines, |line| line["data"]["stop"] == true).await;

    for line in &lines {
        assert!(
            line.get("error").is_none(),
            "dgbit's Event(**json) failed: {line}"
        );
    }
    let numbered: Vec<&Value> = lines.iter().filter(|l| l["data"]["i"].is_u64()).collect();
    assert_eq!(numbered.len(), topics::ALL.len(), "{lines:?}");
    for line in numbered {
        let i = line["data"]["i"].as_u64().unwrap() as usize;
        assert_eq!(line["event_type"], topics::ALL[i]);
        let keys = if i.is_multiple_of(2) {
            json!([
                "event_type",
                "data",
                "timestamp",
                "source",
                "correlation_id"
            ])
        } else {
            json!(["event_type", "data", "timestamp", "source"])
        };
        assert_eq!(line["keys"], keys, "{line}");
    }
    assert_eq!(registry.stats("").edge_send_failures, 0);
}

#[actix::test]
async fn a_pynng_subscriber_on_the_job_byte_prefix_gets_job_events_only() {
    let dir = tempfile::tempdir().unwrap();
    let url = event_url(&dir);
    let edge = Arc::new(PubEdge::listen(&url, &EdgeOptions::default()).unwrap());
    let (publisher, _) = start_publisher(Some(edge));
    let mut peer = PythonSubscriber::start(&url, Some(r#"{"event_type":"job."#));
    warm_up(&publisher, &mut peer.lines).await;

    for topic in MIXED_BATCH {
        publish(&publisher, Event::new(topic, "test", json!({}))).await;
    }
    publish(&publisher, stop_event(topics::JOB_FAILED)).await;
    let lines = collect_until(&mut peer.lines, |line| line["data"]["stop"] == true).await;

    assert_eq!(
        python_batch_topics(&lines),
        [
            topics::JOB_CREATED,
            topics::JOB_COMPLETED,
            topics::JOB_FAILED
        ]
    );
}

/// Dial a `SubEdge` for `pattern` and pass each event to a recorder.
fn sub_edge(
    url: &str,
    pattern: &str,
    prefix_filter: bool,
) -> (SubEdge, mpsc::UnboundedReceiver<Arc<Event>>) {
    let (subscriber, received) = recorder();
    let mut settings = SubEdgeSettings::new(url, Pattern::parse(pattern).unwrap());
    settings.prefix_filter = prefix_filter;
    (SubEdge::dial(settings, subscriber).unwrap(), received)
}

fn is_stop(event: &Arc<Event>) -> bool {
    event.data.get("stop") == Some(&json!(true))
}

/// Publish [`MIXED_BATCH`] and a stop event to a `SubEdge` on `job.*`, with
/// or without NNG's prefix filter; assert that exactly the job events came
/// through, and return the subscription for its counters.
async fn job_star_through_a_sub_edge(prefix_filter: bool) -> SubEdge {
    let dir = tempfile::tempdir().unwrap();
    let url = event_url(&dir);
    let edge = Arc::new(PubEdge::listen(&url, &EdgeOptions::default()).unwrap());
    let (publisher, _) = start_publisher(Some(edge));
    let (subscription, mut received) = sub_edge(&url, "job.*", prefix_filter);
    warm_up(&publisher, &mut received).await;

    for topic in MIXED_BATCH {
        publish(&publisher, Event::new(topic, "test", json!({}))).await;
    }
    publish(&publisher, stop_event(topics::JOB_FAILED)).await;
    let events = collect_until(&mut received, is_stop).await;

    assert_eq!(
        batch_topics(&events),
        [
            topics::JOB_CREATED,
            topics::JOB_COMPLETED,
            topics::JOB_FAILED
        ]
    );
    subscription
}

#[actix::test]
async fn a_sub_edge_on_job_star_gets_job_events_and_nothing_from_jobs_archived() {
    let subscription = job_star_through_a_sub_edge(true).await;
    // NNG's prefix kept the other topics off the socket altogether.
    let stats = subscription.stats();
    assert_eq!((stats.skipped, stats.dropped, stats.undecodable), (0, 0, 0));
    subscription.close();
    assert!(!subscription.is_running());
}

#[actix::test]
async fn a_sub_edge_without_the_nng_prefix_still_filters_by_whole_segments() {
    let subscription = job_star_through_a_sub_edge(false).await;
    assert_eq!(subscription.stats().skipped, 5);
}

#[actix::test]
async fn a_sub_edge_counts_and_skips_messages_that_are_not_events() {
    let dir = tempfile::tempdir().unwrap();
    let url = event_url(&dir);
    let edge = Arc::new(PubEdge::listen(&url, &EdgeOptions::default()).unwrap());
    let (publisher, _) = start_publisher(Some(edge.clone()));
    let (subscription, mut received) = sub_edge(&url, "*", true);
    // Connected first: a subscriber that joined halfway through the junk
    // would see only part of it.
    warm_up(&publisher, &mut received).await;

    // Raw bodies straight onto the socket: junk first, then an event.
    for junk in [&b"not json"[..], br#"{"event_type":"x","extra":1}"#, b"[1]"] {
        edge.send(junk).unwrap();
    }
    let event = Event::new(topics::HEALTH_CHECK, "test", json!({"stop": true}));
    edge.send(&event.encode()).unwrap();
    let stop = collect_until(&mut received, is_stop).await.pop().unwrap();
    assert_eq!(stop.event_type, topics::HEALTH_CHECK);
    let stats = subscription.stats();
    assert!(stats.undecodable >= 3, "{stats:?}");
    assert_eq!(stats.undecodable % 3, 0, "{stats:?}");
}

#[actix::test]
async fn a_sub_edge_started_before_the_bus_receives_events_once_it_is_up_and_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let url = event_url(&dir);
    let (subscription, mut received) = sub_edge(&url, "trade.*", true);
    assert!(subscription.is_running());

    for round in 0..2 {
        let edge = Arc::new(PubEdge::listen(&url, &EdgeOptions::default()).unwrap());
        let (publisher, _) = start_publisher(Some(Arc::clone(&edge)));
        // Warm-up events are job events, which `trade.*` never shows: warm
        // up with trade events instead.
        let deadline = Instant::now() + DEADLINE;
        loop {
            let event = Event::new(topics::TRADE_UPDATED, "test", json!({"warm_up": true}));
            publish(&publisher, event).await;
            let wait = tokio::time::timeout(Duration::from_millis(20), received.recv());
            if let Ok(Some(_)) = wait.await {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: nothing within {DEADLINE:?}"
            );
        }

        publish(
            &publisher,
            Event::new(topics::TRADE_ENTERED, "test", json!({})),
        )
        .await;
        publish(&publisher, stop_event(topics::TRADE_EXITED)).await;
        let events = collect_until(&mut received, is_stop).await;
        assert_eq!(
            batch_topics(&events),
            [topics::TRADE_ENTERED, topics::TRADE_EXITED],
            "round {round}"
        );

        // The bus goes away; the subscriber keeps redialing.
        edge.close();
    }
    assert!(subscription.is_running());
}

/// A stand-in for the bus's command router: serves REQ requests on `url`
/// by sending them as `Command`s to the publisher, until the socket closes.
fn serve_commands(url: &str, publisher: Addr<TopicPublisher>) -> nng::Socket {
    let socket = nng::Socket::new(nng::Protocol::Rep0).unwrap();
    dgbit_bus::edge::listen(&socket, url, &EdgeOptions::default()).unwrap();
    let serving = socket.clone();
    std::thread::spawn(move || {
        while let Ok(body) = serving.recv() {
            let request = CommandRequest::decode(&body, 0).unwrap();
            let echo = request.echo();
            let command = Command {
                name: request.command.clone().unwrap_or_default(),
                request,
            };
            let reply = match futures::executor::block_on(publisher.send(command)) {
                Ok(Ok(result)) => CommandReply::ok(echo, result),
                Ok(Err(error)) => CommandReply::error(echo, error.code, error.message),
                Err(error) => CommandReply::error(echo, "shutting_down", error.to_string()),
            };
            if serving.send(&reply.encode()[..]).is_err() {
                break;
            }
        }
    });
    socket
}

#[actix::test]
async fn dgbit_bus_publish_sends_an_event_through_the_command_bus_to_subscribers() {
    use dgbit_bus::cli::events::{run_publish, PublishArgs};
    use dgbit_bus::cli::AddressArgs;

    let dir = tempfile::tempdir().unwrap();
    let addresses = dgbit_bus::config::Addresses::in_dir(dir.path());
    let (publisher, _) = start_publisher(None);
    let (subscriber, mut received) = recorder();
    let subscribe = Subscribe {
        pattern: "job.*".into(),
        subscriber,
        buffer: None,
    };
    publisher.send(subscribe).await.unwrap().unwrap();
    let server = serve_commands(&addresses.command, publisher.clone());

    let args = PublishArgs {
        topic: topics::JOB_COMPLETED.into(),
        data: r#"{"job_id": "j-1"}"#.into(),
        source: Some("cli".into()),
        correlation_id: Some("c-1".into()),
        timeout_s: 10.0,
    };
    let address_args = AddressArgs {
        command_address: addresses.command.clone(),
        event_address: addresses.event.clone(),
        queue_address: addresses.job_queue.clone(),
        data_address: addresses.data.clone(),
    };
    // `run_publish` blocks on a runtime of its own: keep it off this one.
    let outcome = tokio::task::spawn_blocking(move || run_publish(&args, &address_args))
        .await
        .unwrap();
    outcome.expect("the bus accepts the event");

    let event = tokio::time::timeout(DEADLINE, received.recv())
        .await
        .expect("the event arrives")
        .unwrap();
    assert_eq!(event.event_type, topics::JOB_COMPLETED);
    assert_eq!(event.source, "cli");
    assert_eq!(event.correlation_id.as_deref(), Some("c-1"));
    assert_eq!(event.data["job_id"], "j-1");
    server.close();
}

#[actix::test]
async fn bus_publish_over_the_wire_refuses_a_malformed_event_with_bad_request() {
    let dir = tempfile::tempdir().unwrap();
    let addresses = dgbit_bus::config::Addresses::in_dir(dir.path());
    let (publisher, registry) = start_publisher(None);
    let server = serve_commands(&addresses.command, publisher);

    let client = nng::Socket::new(nng::Protocol::Req0).unwrap();
    client
        .set_opt::<nng::options::RecvTimeout>(Some(DEADLINE))
        .unwrap();
    client.dial(&addresses.command).unwrap();
    let body =
        json!({"command": PUBLISH_COMMAND, "payload": {"event_type": "job.done", "colour": "red"}});
    let reply = tokio::task::spawn_blocking(move || {
        client
            .send(&serde_json::to_vec(&body).unwrap()[..])
            .unwrap();
        client.recv().unwrap()
    })
    .await
    .unwrap();
    let reply = CommandReply::decode(&reply).unwrap();
    assert_eq!(reply.code(), Some("bad_request"), "{reply:?}");
    assert_eq!(registry.stats("").events_published, 0);
    server.close();
}
