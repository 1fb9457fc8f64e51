//! Workload 4: one publisher, four remote subscribers, 256-byte events.
//!
//! The publisher publishes as fast as it can for a fixed time, but never
//! more than [`WINDOW`] events ahead of the slowest subscriber (it sleeps
//! while it is): a flood would measure only how much of a publisher's CPU
//! goes into events that NNG then drops, so the figure is the lossless
//! rate. It is deliveries per second summed over the four subscribers,
//! from the first publish to the last delivery; drops are `published x 4 -
//! delivered` (NNG drops the oldest message of a full peer queue without
//! telling anyone, so this difference is the only count), and should be 0.
//!
//! - bus: `Bus` with its PUB edge; an in-process producer on the bus's own
//!   thread publishes with `BusHandle::publish` (fire and forget, as
//!   embedding code does) and, after each batch of [`BATCH`], awaits a
//!   stats query on the publisher role: its mailbox is first in, first out,
//!   so the answer means the batch has been sent. The bus's PUB edge queues
//!   1024 messages per peer.
//! - raw: a bare PUB socket sending the same 256 bytes in a loop, with the
//!   same 1024-message peer queue.
//!
//! Subscribers are bare SUB sockets on threads of their own (as dgbit's
//! Python subscribers are bare pynng SUB sockets), subscribed to the byte
//! prefix `{"event_type":"data.`; a second bus row uses the bus's own
//! `SubEdge` subscribers delivering to counting actors.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use actix::prelude::*;
use anyhow::Context as _;
use dgbit_bus::config::EdgeSet;
use dgbit_bus::edge::subscribe::{SubEdge, SubEdgeSettings};
use dgbit_bus::message::{EventDelivery, StatsQuery};
use dgbit_bus::topics::Pattern;
use dgbit_bus::wire::Event;
use nng::options::protocol::pubsub::Subscribe;
use nng::options::{Options, RecvTimeout, SendBufferSize};
use nng::{Message, Protocol, Socket};
use serde_json::json;

use crate::cpu::{CpuSample, CpuUse};
use crate::server::{config_with, BusServer};
use crate::table::{Row, Target};
use crate::transport::Transport;
use crate::Budget;

/// Remote subscribers per run.
const SUBSCRIBERS: usize = 4;

/// Size of every event on the wire.
const EVENT_SIZE: usize = 256;

/// The topic published, and the pattern and NNG prefix subscribed.
const TOPIC: &str = "data.fetched";
const PATTERN: &str = "data.*";
const PREFIX: &[u8] = br#"{"event_type":"data."#;

/// Per-peer PUB queue of the raw baseline: the bus edge's default.
const PEER_QUEUE: i32 = 1024;

/// How long deliveries must pause before a run counts as drained.
const QUIET: Duration = Duration::from_millis(100);

/// How long to wait for subscribers to connect, and for a drain.
const SETTLE_LIMIT: Duration = Duration::from_secs(5);

/// Events published between two looks at the clock and the subscribers.
const BATCH: u64 = 64;

/// The most events the publisher may be ahead of its slowest subscriber.
/// Below the smallest queue on the way, NNG's SUB receive queue of 128
/// (which drops its oldest when full), so that nothing need be dropped.
const WINDOW: u64 = 96;

/// Sleep while `published` is more than [`WINDOW`] ahead of the slowest
/// subscriber. Blocks the calling thread: on the bus's thread that is
/// harmless here, the publisher has handled every event already (the batch
/// ended with an awaited query) and nothing else runs on that bus.
fn hold_back(tally: &Tally, published: u64) {
    let limit = Instant::now() + SETTLE_LIMIT;
    while published > tally.fewest() + WINDOW && Instant::now() < limit {
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// A 256-byte event of the bench's topic.
fn event_template() -> Event {
    let mut event = Event::new(TOPIC, "bench", json!({"symbol": "EURUSD", "pad": ""}));
    let short = event.encode().len();
    assert!(short < EVENT_SIZE, "the bare event is {short} bytes");
    event.data["pad"] = json!("x".repeat(EVENT_SIZE - short));
    assert_eq!(event.encode().len(), EVENT_SIZE);
    event
}

/// Deliveries per subscriber and the time of the latest, shared with the
/// subscriber threads or actors.
struct Tally {
    base: Instant,
    counts: Vec<AtomicU64>,
    last_nanos: AtomicU64,
}

impl Tally {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            base: Instant::now(),
            counts: (0..SUBSCRIBERS).map(|_| AtomicU64::new(0)).collect(),
            last_nanos: AtomicU64::new(0),
        })
    }

    fn record(&self, subscriber: usize) {
        self.counts[subscriber].fetch_add(1, Ordering::Relaxed);
        let now = self.base.elapsed().as_nanos() as u64;
        self.last_nanos.fetch_max(now, Ordering::Relaxed);
    }

    fn total(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    fn fewest(&self) -> u64 {
        self.counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0)
    }

    fn reset(&self) {
        for count in &self.counts {
            count.store(0, Ordering::Relaxed);
        }
        self.last_nanos.store(0, Ordering::Relaxed);
    }

    fn last_delivery(&self) -> Instant {
        self.base + Duration::from_nanos(self.last_nanos.load(Ordering::Relaxed))
    }

    /// Wait until deliveries stop for [`QUIET`]; false if they never did
    /// within [`SETTLE_LIMIT`].
    fn wait_quiet(&self) -> bool {
        let deadline = Instant::now() + SETTLE_LIMIT;
        let mut seen = self.total();
        while Instant::now() < deadline {
            std::thread::sleep(QUIET);
            let now = self.total();
            if now == seen {
                return true;
            }
            seen = now;
        }
        false
    }
}

/// Four bare SUB sockets, each counted by a thread of its own.
struct RawSubscribers {
    sockets: Vec<Socket>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl RawSubscribers {
    fn dial(url: &str, tally: &Arc<Tally>) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut sockets = Vec::new();
        let mut threads = Vec::new();
        for index in 0..SUBSCRIBERS {
            let socket = Socket::new(Protocol::Sub0)?;
            socket.set_opt::<Subscribe>(PREFIX.to_vec())?;
            socket.set_opt::<RecvTimeout>(Some(Duration::from_millis(50)))?;
            socket.dial_async(url)?;
            let (receiver, stop, tally) = (socket.clone(), stop.clone(), tally.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("bench-sub-{index}"))
                    .spawn(move || {
                        while !stop.load(Ordering::Acquire) {
                            match receiver.recv() {
                                Ok(_) => tally.record(index),
                                Err(nng::Error::TimedOut) => {}
                                Err(_) => break,
                            }
                        }
                    })?,
            );
            sockets.push(socket);
        }
        Ok(Self {
            sockets,
            stop,
            threads,
        })
    }
}

impl Drop for RawSubscribers {
    fn drop(&mut self) {
        crate::raw::stop_socket_threads(&self.stop, &self.sockets, &mut self.threads);
    }
}

/// Counts what a `SubEdge` delivers.
struct Counter {
    index: usize,
    tally: Arc<Tally>,
}

impl Actor for Counter {
    type Context = Context<Self>;
}

impl Handler<EventDelivery> for Counter {
    type Result = ();

    fn handle(&mut self, _: EventDelivery, _: &mut Self::Context) {
        self.tally.record(self.index);
    }
}

/// Four `SubEdge`s feeding counting actors on an actix system of their own
/// thread (a subscriber process).
struct EdgeSubscribers {
    edges: Vec<SubEdge>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl EdgeSubscribers {
    fn dial(url: &str, tally: &Arc<Tally>) -> anyhow::Result<Self> {
        let (recipients_sender, recipients) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let tally_for_actors = tally.clone();
        let thread = std::thread::Builder::new()
            .name("bench-subscribers".into())
            .spawn(move || {
                System::new().block_on(async move {
                    let counters: Vec<Recipient<EventDelivery>> = (0..SUBSCRIBERS)
                        .map(|index| {
                            let tally = tally_for_actors.clone();
                            Counter { index, tally }.start().recipient()
                        })
                        .collect();
                    let _ = recipients_sender.send(counters);
                    let _ = stopped.await;
                });
            })?;
        let mut group = Self {
            edges: Vec::new(),
            stop: Some(stop),
            thread: Some(thread),
        };
        let counters = recipients
            .recv_timeout(SETTLE_LIMIT)
            .context("subscriber actors did not start")?;
        let pattern = Pattern::parse(PATTERN).map_err(|err| anyhow::anyhow!("{err}"))?;
        for counter in counters {
            let settings = SubEdgeSettings::new(url, pattern.clone());
            group.edges.push(SubEdge::dial(settings, counter)?);
        }
        Ok(group)
    }
}

impl Drop for EdgeSubscribers {
    fn drop(&mut self) {
        for edge in &self.edges {
            edge.close();
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A publisher the measurement can drive: bus or raw.
trait Publisher {
    /// Publish a few events (to find out when subscribers are connected).
    fn probe(&self) -> anyhow::Result<()>;
    /// Publish for `length` as fast as the slowest subscriber keeps up
    /// (see [`hold_back`]); returns how many.
    fn flood(&self, length: Duration, tally: &Arc<Tally>) -> anyhow::Result<u64>;
}

struct RawPublisher {
    socket: Socket,
    body: Vec<u8>,
}

impl RawPublisher {
    fn listen(url: &str) -> anyhow::Result<Self> {
        let socket = Socket::new(Protocol::Pub0)?;
        socket.set_opt::<SendBufferSize>(PEER_QUEUE)?;
        socket
            .listen(url)
            .with_context(|| format!("raw PUB listen {url}"))?;
        Ok(Self {
            socket,
            body: event_template().encode(),
        })
    }
}

impl Publisher for RawPublisher {
    fn probe(&self) -> anyhow::Result<()> {
        for _ in 0..10 {
            self.socket
                .send(Message::from(&self.body[..]))
                .map_err(|(_, err)| err)?;
        }
        Ok(())
    }

    fn flood(&self, length: Duration, tally: &Arc<Tally>) -> anyhow::Result<u64> {
        let started = Instant::now();
        let mut sent = 0;
        while started.elapsed() < length {
            hold_back(tally, sent);
            for _ in 0..BATCH {
                self.socket
                    .send(Message::from(&self.body[..]))
                    .map_err(|(_, err)| err)?;
            }
            sent += BATCH;
        }
        Ok(sent)
    }
}

struct BusPublisher {
    server: BusServer,
}

impl BusPublisher {
    fn listen(url: &str) -> anyhow::Result<Self> {
        let edges = EdgeSet {
            event: true,
            ..EdgeSet::NONE
        };
        let server = BusServer::start(config_with(edges).event_address(url))?;
        Ok(Self { server })
    }
}

impl Publisher for BusPublisher {
    fn probe(&self) -> anyhow::Result<()> {
        self.server.run(|bus| async move {
            for _ in 0..10 {
                bus.publish(event_template());
            }
        })
    }

    fn flood(&self, length: Duration, tally: &Arc<Tally>) -> anyhow::Result<u64> {
        let template = event_template();
        let tally = tally.clone();
        self.server.run(move |bus| async move {
            let publisher = bus.publisher();
            let started = Instant::now();
            let mut sent = 0;
            while started.elapsed() < length {
                hold_back(&tally, sent);
                for _ in 0..BATCH {
                    bus.publish(template.clone());
                }
                publisher
                    .send(StatsQuery)
                    .await
                    .map_err(|err| anyhow::anyhow!("publisher: {err}"))?;
                sent += BATCH;
            }
            Ok(sent)
        })?
    }
}

/// What one flood achieved.
#[derive(Debug, Clone, Copy, Default)]
struct Delivery {
    published: u64,
    delivered: u64,
    elapsed: Duration,
}

impl Delivery {
    fn add(&mut self, other: Delivery) {
        self.published += other.published;
        self.delivered += other.delivered;
        self.elapsed += other.elapsed;
    }

    fn per_second(&self) -> f64 {
        self.delivered as f64 / self.elapsed.as_secs_f64()
    }

    fn drops(&self) -> u64 {
        (self.published * SUBSCRIBERS as u64).saturating_sub(self.delivered)
    }
}

/// Wait until every subscriber has heard the publisher.
fn connect(publisher: &dyn Publisher, tally: &Tally) -> anyhow::Result<()> {
    let deadline = Instant::now() + SETTLE_LIMIT;
    while tally.fewest() == 0 {
        anyhow::ensure!(Instant::now() < deadline, "subscribers did not connect");
        publisher.probe()?;
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn measure(
    publisher: &dyn Publisher,
    tally: &Arc<Tally>,
    length: Duration,
) -> anyhow::Result<Delivery> {
    // Every measurement ends quiet (see below), and so does `connect`.
    tally.reset();
    let started = Instant::now();
    let published = publisher.flood(length, tally)?;
    anyhow::ensure!(tally.wait_quiet(), "deliveries did not stop");
    let delivered = tally.total();
    let elapsed = tally.last_delivery().saturating_duration_since(started);
    Ok(Delivery {
        published,
        delivered,
        elapsed: elapsed.max(Duration::from_millis(1)),
    })
}

/// # Errors
///
/// When a socket cannot open or subscribers never connect.
pub fn fan_out(budget: &Budget, transport: Transport) -> anyhow::Result<Vec<Row>> {
    let dir = tempfile::tempdir()?;
    let bus_url = transport.url(dir.path(), "bus-evt");
    let edge_url = transport.url(dir.path(), "bus-evt-edges");
    let raw_url = transport.url(dir.path(), "raw-evt");

    let bus = BusPublisher::listen(&bus_url)?;
    let bus_tally = Tally::new();
    let _bus_subscribers = RawSubscribers::dial(&bus_url, &bus_tally)?;
    let bus_for_edges = BusPublisher::listen(&edge_url)?;
    let edge_tally = Tally::new();
    let _edge_subscribers = EdgeSubscribers::dial(&edge_url, &edge_tally)?;
    let raw = RawPublisher::listen(&raw_url)?;
    let raw_tally = Tally::new();
    let _raw_subscribers = RawSubscribers::dial(&raw_url, &raw_tally)?;
    for (publisher, tally) in [
        (&bus as &dyn Publisher, &bus_tally),
        (&bus_for_edges, &edge_tally),
        (&raw, &raw_tally),
    ] {
        connect(publisher, tally)?;
        tally.wait_quiet();
    }

    let mut totals: [(Delivery, CpuUse); 3] = Default::default();
    for round in 0..=budget.rounds {
        let length = if round == 0 {
            Duration::from_millis(100)
        } else {
            budget.round
        };
        let runs = [
            (&bus as &dyn Publisher, &bus_tally),
            (&bus_for_edges, &edge_tally),
            (&raw, &raw_tally),
        ]
        .map(|(publisher, tally)| {
            let sample = CpuSample::now();
            measure(publisher, tally, length).map(|run| (run, CpuSample::now().since(&sample)))
        });
        for (total, run) in totals.iter_mut().zip(runs) {
            let (run, cpu) = run?;
            if round > 0 {
                total.0.add(run);
                total.1.add(&cpu);
            }
        }
    }
    let [(to_raw_subscribers, bare_cpu), (to_edges, edges_cpu), (baseline, baseline_cpu)] = totals;

    let note = |run: &Delivery, cpu: &CpuUse| {
        format!(
            "published {:.0}/s; drops {} of {}; bus {} per delivery; baseline {}, drops {} of {}",
            run.published as f64 / run.elapsed.as_secs_f64(),
            run.drops(),
            run.published * SUBSCRIBERS as u64,
            cpu.per_operation(run.delivered),
            baseline_cpu.per_operation(baseline.delivered),
            baseline.drops(),
            baseline.published * SUBSCRIBERS as u64,
        )
    };
    let row = |workload: &str, run: &Delivery, cpu: &CpuUse| {
        Row::new(workload, transport.name(), "deliveries/s")
            .figures(run.per_second(), baseline.per_second())
            .note(note(run, cpu))
    };
    Ok(vec![
        row(
            "4 events 1->4, bare SUB peers",
            &to_raw_subscribers,
            &bare_cpu,
        )
        .target(Target::AtLeast(0.85)),
        row("4 events 1->4, SubEdge actors", &to_edges, &edges_cpu),
    ])
}
