//! `TopicPublisher`: the event bus's role actor.
//!
//! # The life of one event
//!
//! An actor publishes with [`Publish`] (usually through an
//! [`EventSink`](crate::message::EventSink)). The publisher encodes the
//! event once and hands the bytes to the PUB edge, if the bus has one; NNG
//! fans them out to remote subscribers without blocking (see
//! [`PubEdge`]). Then it offers the event, shared in an `Arc`, to each
//! in-process subscription whose [`Pattern`] matches the topic.
//!
//! Every subscription has its own bounded buffer (default
//! [`DEFAULT_SUBSCRIBER_BUFFER`] events, chosen per subscription with
//! [`Subscribe::buffer`]) and its own forwarding task. The publisher only
//! ever tries to put the event into a buffer; the task takes events out one
//! at a time and awaits `send(EventDelivery)` to the subscriber actor, so a
//! subscriber's own mailbox limit slows its task and nothing else. When a
//! buffer is full the event is dropped *for that subscriber only*, counted
//! (per subscription and in total) and logged at `warn`, the first drop of a
//! subscription and then every [`DROP_LOG_INTERVAL`]th. A subscriber whose
//! actor has stopped is removed, with the events still in its buffer counted
//! as dropped.
//!
//! # Known limits
//!
//! A buffer absorbs the difference between how fast events arrive and how
//! fast a subscriber takes them, so its size must cover the largest burst.
//! A producer that awaits each `send(Publish)` gives forwarding tasks a turn
//! between events, and even a buffer of a few events keeps up with a fast
//! subscriber. A producer that queues a burst with `do_send` (as
//! [`EventSink`](crate::message::EventSink) does) without yielding has the
//! whole burst handled in one turn of the arbiter, before any forwarding task
//! runs: events past the buffer are dropped for *every* subscriber, counted
//! as usual.
//!
//! # Remote publishing
//!
//! A process that is not the bus publishes through the *command* bus: a
//! REQ request `{"command": "bus.publish", "payload": <event>}` where the
//! event object has at least `event_type` and optionally `data`, `source`,
//! `correlation_id` and `timestamp` (filled in with `"remote"` and now when
//! left out). The bus registers this actor's `Recipient<Command>` on its
//! router for [`PUBLISH_COMMAND`]; the event then reaches local and remote
//! subscribers like any other, and the reply is `{"published": true}`.
//! Publishing over the command bus, rather than letting peers dial a second
//! PUB socket, keeps one encoder (so the wire shape stays dgbit's) and gives
//! the publisher an acknowledgement.
//!
//! # State that outlives the actor
//!
//! Subscriptions and counters live in a [`SubscriberRegistry`] that the bus
//! creates once and passes to every `TopicPublisher` it starts, so a
//! publisher restarted by a supervisor keeps its subscribers and its counts.
//! Forwarding tasks run on the arbiter where the subscription was made (the
//! publisher's, for [`Subscribe`]) and are not tied to the actor.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use actix::prelude::*;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::edge::listener::EdgeSlot;
use crate::edge::publish::PubEdge;
use crate::message::{Command, EventDelivery, HandlerError, Publish, StatsQuery};
use crate::topics::{is_topic, Pattern, PatternError};
use crate::wire::{code, Event};

/// The command name under which remote processes publish events.
pub const PUBLISH_COMMAND: &str = "bus.publish";

/// Events buffered per in-process subscription when neither the bus nor the
/// subscription says otherwise.
pub const DEFAULT_SUBSCRIBER_BUFFER: usize = 1024;

/// After the first drop of a subscription, one `warn` line per this many.
pub const DROP_LOG_INTERVAL: u64 = 1000;

/// Whether the `count`th drop gets a log line: the first, then every
/// [`DROP_LOG_INTERVAL`]th, so a flood of drops cannot flood the log.
pub(crate) fn worth_logging(count: u64) -> bool {
    count == 1 || count.is_multiple_of(DROP_LOG_INTERVAL)
}

/// How a [`TopicPublisher`] is set up.
#[derive(Debug, Clone)]
pub struct PublisherSettings {
    /// The bus's name, reported in the publisher's stats and log lines.
    pub service_name: String,
    /// Events buffered per in-process subscription unless the subscription
    /// asks for another size. A size of 0 is treated as 1.
    pub subscriber_buffer: usize,
}

impl Default for PublisherSettings {
    fn default() -> Self {
        Self {
            service_name: "dgbit-bus".into(),
            subscriber_buffer: DEFAULT_SUBSCRIBER_BUFFER,
        }
    }
}

impl PublisherSettings {
    /// The settings a bus with `config` uses.
    pub fn from_config(config: &crate::config::BusConfig) -> Self {
        Self {
            service_name: config.service_name.clone(),
            subscriber_buffer: config.subscriber_buffer,
        }
    }
}

/// Names one in-process subscription, for [`Unsubscribe`] and in stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct SubscriptionId(u64);

impl SubscriptionId {
    /// The number the bus gave this subscription (unique per registry).
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for SubscriptionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Register `subscriber` for events whose topic matches `pattern`.
///
/// Replies with the new subscription's id, or the reason the pattern is not
/// one (see [`Pattern::parse`]).
#[derive(Debug, Message)]
#[rtype(result = "Result<SubscriptionId, PatternError>")]
pub struct Subscribe {
    /// An exact topic, `prefix.*`, `*.suffix` or `*`.
    pub pattern: String,
    /// The actor that receives each matching event.
    pub subscriber: Recipient<EventDelivery>,
    /// Events buffered for this subscriber before drops begin; `None` takes
    /// [`PublisherSettings::subscriber_buffer`].
    pub buffer: Option<usize>,
}

/// End a subscription. Replies whether it existed. Events already in its
/// buffer are still delivered.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "bool")]
pub struct Unsubscribe {
    /// The id [`Subscribe`] replied with.
    pub id: SubscriptionId,
}

/// The publisher's counters, as [`StatsQuery`] reports them (serialised to
/// JSON with these field names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PublisherStats {
    /// [`PublisherSettings::service_name`].
    pub service: String,
    /// Events accepted by the publisher.
    pub events_published: u64,
    /// Deliveries to in-process subscribers (one event, many deliveries).
    pub events_delivered: u64,
    /// Deliveries given up, over all subscriptions, including removed ones.
    pub events_dropped: u64,
    /// Events the PUB edge refused; each is lost for every remote subscriber.
    pub edge_send_failures: u64,
    /// Live in-process subscriptions.
    pub subscribers: usize,
    /// Each live subscription, oldest first.
    pub subscriptions: Vec<SubscriptionStats>,
}

/// One live subscription's counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SubscriptionStats {
    /// The subscription's id.
    pub id: SubscriptionId,
    /// Its pattern as written.
    pub pattern: String,
    /// Its buffer size in events.
    pub buffer: usize,
    /// Events waiting in its buffer now.
    pub queued: usize,
    /// Events its subscriber has handled.
    pub delivered: u64,
    /// Events given up for it: buffer full, or subscriber gone.
    pub dropped: u64,
}

/// The subscriptions and counters of an event bus, shared (cheap to clone)
/// between the bus, its current [`TopicPublisher`] and the forwarding tasks.
#[derive(Debug, Clone, Default)]
pub struct SubscriberRegistry {
    inner: Arc<RegistryInner>,
}

#[derive(Debug, Default)]
struct RegistryInner {
    subscriptions: Mutex<Subscriptions>,
    totals: Totals,
}

#[derive(Debug, Default)]
struct Subscriptions {
    next_id: u64,
    entries: BTreeMap<SubscriptionId, Subscription>,
}

#[derive(Debug)]
struct Subscription {
    pattern: Pattern,
    buffer: usize,
    queue: mpsc::Sender<Arc<Event>>,
    counters: Arc<SubscriberCounters>,
}

#[derive(Debug, Default)]
struct SubscriberCounters {
    delivered: AtomicU64,
    dropped: AtomicU64,
}

#[derive(Debug, Default)]
struct Totals {
    published: AtomicU64,
    delivered: AtomicU64,
    dropped: AtomicU64,
    edge_send_failures: AtomicU64,
}

/// What a forwarding task needs, handed out when a subscription is added.
struct Forwarding {
    id: SubscriptionId,
    pattern: String,
    queue: mpsc::Receiver<Arc<Event>>,
    counters: Arc<SubscriberCounters>,
}

impl SubscriberRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many in-process subscriptions are live.
    pub fn subscriber_count(&self) -> usize {
        self.lock().entries.len()
    }

    /// A snapshot of every counter.
    pub fn stats(&self, service: &str) -> PublisherStats {
        let totals = &self.inner.totals;
        let subscriptions: Vec<SubscriptionStats> = self
            .lock()
            .entries
            .iter()
            .map(|(id, subscription)| SubscriptionStats {
                id: *id,
                pattern: subscription.pattern.to_string(),
                buffer: subscription.buffer,
                queued: subscription.buffer - subscription.queue.capacity(),
                delivered: subscription.counters.delivered.load(Ordering::Relaxed),
                dropped: subscription.counters.dropped.load(Ordering::Relaxed),
            })
            .collect();
        PublisherStats {
            service: service.to_string(),
            events_published: totals.published.load(Ordering::Relaxed),
            events_delivered: totals.delivered.load(Ordering::Relaxed),
            events_dropped: totals.dropped.load(Ordering::Relaxed),
            edge_send_failures: totals.edge_send_failures.load(Ordering::Relaxed),
            subscribers: subscriptions.len(),
            subscriptions,
        }
    }

    /// Subscribe `subscriber` to `pattern` directly, without going through
    /// a publisher actor: for a bus that registers subscribers while it
    /// starts. [`Subscribe`] does the same through the actor. A `buffer` of
    /// 0 is treated as 1.
    ///
    /// # Errors
    ///
    /// The [`PatternError`] of an invalid pattern; nothing is registered.
    ///
    /// # Panics
    ///
    /// Outside a running actix system: the subscription's forwarding task is
    /// spawned on the current arbiter.
    pub fn subscribe(
        &self,
        pattern: &str,
        subscriber: Recipient<EventDelivery>,
        buffer: usize,
    ) -> Result<SubscriptionId, PatternError> {
        let pattern = Pattern::parse(pattern)?;
        let buffer = buffer.max(1);
        let forwarding = self.add(pattern, buffer);
        let id = forwarding.id;
        debug!(subscription = %id, pattern = %forwarding.pattern, buffer, "subscribed");

        // A detached task, not one tied to a publisher actor, so that it
        // survives a restart of the publisher.
        actix::spawn(forward(self.clone(), forwarding, subscriber));
        Ok(id)
    }

    /// End a subscription; returns whether it existed. Events already in
    /// its buffer are still delivered.
    pub fn unsubscribe(&self, id: SubscriptionId) -> bool {
        let existed = self.remove(id);
        debug!(subscription = %id, existed, "unsubscribed");
        existed
    }

    fn lock(&self) -> MutexGuard<'_, Subscriptions> {
        // A panic while holding the lock leaves the map consistent (every
        // change is a single insert or remove), so a poisoned lock is usable.
        self.inner
            .subscriptions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn add(&self, pattern: Pattern, buffer: usize) -> Forwarding {
        let (sender, receiver) = mpsc::channel(buffer);
        let counters = Arc::new(SubscriberCounters::default());
        let mut subscriptions = self.lock();
        subscriptions.next_id += 1;
        let id = SubscriptionId(subscriptions.next_id);
        let forwarding = Forwarding {
            id,
            pattern: pattern.to_string(),
            queue: receiver,
            counters: Arc::clone(&counters),
        };
        let subscription = Subscription {
            pattern,
            buffer,
            queue: sender,
            counters,
        };
        subscriptions.entries.insert(id, subscription);
        forwarding
    }

    fn remove(&self, id: SubscriptionId) -> bool {
        self.lock().entries.remove(&id).is_some()
    }

    /// Offer `event` to every matching subscription without waiting.
    fn deliver(&self, event: &Arc<Event>) {
        let mut gone = Vec::new();
        let mut subscriptions = self.lock();
        for (id, subscription) in &subscriptions.entries {
            if !subscription.pattern.matches(&event.event_type) {
                continue;
            }
            match subscription.queue.try_send(Arc::clone(event)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.count_full_buffer(*id, subscription, &event.event_type);
                }
                // The forwarding task has ended: its subscriber is gone.
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.count_drops(&subscription.counters, 1);
                    gone.push(*id);
                }
            }
        }
        for id in gone {
            subscriptions.entries.remove(&id);
        }
    }

    fn count_full_buffer(&self, id: SubscriptionId, subscription: &Subscription, topic: &str) {
        let dropped = self.count_drops(&subscription.counters, 1);
        if worth_logging(dropped) {
            warn!(
                subscription = %id,
                pattern = %subscription.pattern,
                event_type = topic,
                buffer = subscription.buffer,
                dropped,
                "subscriber buffer full, event dropped"
            );
        }
    }

    /// Count `lost` drops for one subscription and in total; returns the
    /// subscription's new drop count.
    fn count_drops(&self, counters: &SubscriberCounters, lost: u64) -> u64 {
        self.inner.totals.dropped.fetch_add(lost, Ordering::Relaxed);
        counters.dropped.fetch_add(lost, Ordering::Relaxed) + lost
    }

    fn count_delivery(&self, counters: &SubscriberCounters) {
        self.inner.totals.delivered.fetch_add(1, Ordering::Relaxed);
        counters.delivered.fetch_add(1, Ordering::Relaxed);
    }
}

/// Move events from one subscription's buffer to its subscriber, one at a
/// time, until the subscription ends or the subscriber is gone.
async fn forward(
    registry: SubscriberRegistry,
    mut forwarding: Forwarding,
    subscriber: Recipient<EventDelivery>,
) {
    while let Some(event) = forwarding.queue.recv().await {
        // Awaiting the reply applies the subscriber's mailbox limit here,
        // in this task, and never in the publisher.
        if subscriber.send(EventDelivery { event }).await.is_ok() {
            registry.count_delivery(&forwarding.counters);
            continue;
        }

        // No timeout is set, so the only failure is a stopped subscriber.
        // Close before draining so that the publisher stops adding events.
        forwarding.queue.close();
        let mut lost = 1;
        while forwarding.queue.try_recv().is_ok() {
            lost += 1;
        }
        registry.count_drops(&forwarding.counters, lost);
        registry.remove(forwarding.id);
        warn!(
            subscription = %forwarding.id,
            pattern = %forwarding.pattern,
            lost,
            "subscriber gone, subscription removed"
        );
        return;
    }
    debug!(subscription = %forwarding.id, "subscription ended");
}

/// The event bus's role actor; see the [module docs](self).
pub struct TopicPublisher {
    settings: PublisherSettings,
    registry: SubscriberRegistry,
    edge: EdgeSlot<PubEdge>,
}

impl TopicPublisher {
    /// A publisher over `registry`, sending to `edge` when there is one.
    ///
    /// The publisher never closes the edge: the bus that opened it does, so
    /// that a restarted publisher can keep using it.
    pub fn new(
        settings: PublisherSettings,
        registry: SubscriberRegistry,
        edge: Option<Arc<PubEdge>>,
    ) -> Self {
        let edge = edge.map(EdgeSlot::holding).unwrap_or_default();
        Self::with_edge_slot(settings, registry, edge)
    }

    /// A publisher sending to whatever edge `slot` holds at the time of each
    /// event: the bus's edge actor fills it once the PUB socket listens, and
    /// empties it while the socket is being reopened.
    pub fn with_edge_slot(
        settings: PublisherSettings,
        registry: SubscriberRegistry,
        edge: EdgeSlot<PubEdge>,
    ) -> Self {
        Self {
            settings,
            registry,
            edge,
        }
    }

    fn publish(&self, event: Event) {
        let event = Arc::new(event);
        self.registry
            .inner
            .totals
            .published
            .fetch_add(1, Ordering::Relaxed);
        if let Some(edge) = self.edge.get() {
            self.send_to_edge(&edge, &event);
        }
        self.registry.deliver(&event);
    }

    fn send_to_edge(&self, edge: &PubEdge, event: &Event) {
        let Err(error) = edge.send(&event.encode()) else {
            return;
        };
        let failures = self
            .registry
            .inner
            .totals
            .edge_send_failures
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        if worth_logging(failures) {
            warn!(
                service = %self.settings.service_name,
                url = edge.url(),
                event_type = %event.event_type,
                failures,
                %error,
                "event edge send failed, event dropped for remote subscribers"
            );
        }
    }
}

impl Actor for TopicPublisher {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Self::Context) {
        debug!(
            service = %self.settings.service_name,
            subscribers = self.registry.subscriber_count(),
            edge = self.edge.is_open(),
            "topic publisher started"
        );
    }
}

/// Restarting keeps everything: the state that matters is in the registry.
impl Supervised for TopicPublisher {}

impl Handler<Publish> for TopicPublisher {
    type Result = ();

    fn handle(&mut self, message: Publish, _: &mut Self::Context) {
        self.publish(message.event);
    }
}

impl Handler<Subscribe> for TopicPublisher {
    type Result = Result<SubscriptionId, PatternError>;

    fn handle(&mut self, message: Subscribe, _: &mut Self::Context) -> Self::Result {
        let buffer = message.buffer.unwrap_or(self.settings.subscriber_buffer);
        self.registry
            .subscribe(&message.pattern, message.subscriber, buffer)
    }
}

impl Handler<Unsubscribe> for TopicPublisher {
    type Result = bool;

    fn handle(&mut self, message: Unsubscribe, _: &mut Self::Context) -> bool {
        self.registry.unsubscribe(message.id)
    }
}

impl Handler<StatsQuery> for TopicPublisher {
    type Result = MessageResult<StatsQuery>;

    fn handle(&mut self, _: StatsQuery, _: &mut Self::Context) -> Self::Result {
        let stats = self.registry.stats(&self.settings.service_name);
        MessageResult(serde_json::to_value(stats).unwrap_or_else(|_| json!({})))
    }
}

impl Handler<Command> for TopicPublisher {
    type Result = Result<Value, HandlerError>;

    /// Serve [`PUBLISH_COMMAND`]: the payload is the event object.
    fn handle(&mut self, command: Command, _: &mut Self::Context) -> Self::Result {
        if command.name != PUBLISH_COMMAND {
            return Err(HandlerError::new(
                code::UNKNOWN_COMMAND,
                format!("the event publisher serves only `{PUBLISH_COMMAND}`"),
            ));
        }
        let event = Event::from_object(command.request.payload)
            .map_err(|error| HandlerError::bad_request(error.message))?;
        if !is_topic(&event.event_type) {
            return Err(HandlerError::bad_request(format!(
                "`{}` is not a topic: use dot-separated names without `*`",
                event.event_type
            )));
        }
        self.publish(event);
        Ok(json!({"published": true}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::sync::Semaphore;

    /// Records the topic of each event it receives.
    struct Recorder {
        topics: mpsc::UnboundedSender<String>,
    }

    impl Actor for Recorder {
        type Context = Context<Self>;
    }

    impl Handler<EventDelivery> for Recorder {
        type Result = ();

        fn handle(&mut self, delivery: EventDelivery, _: &mut Self::Context) {
            let _ = self.topics.send(delivery.event.event_type.clone());
        }
    }

    fn recorder() -> (Recipient<EventDelivery>, mpsc::UnboundedReceiver<String>) {
        let (topics, received) = mpsc::unbounded_channel();
        (Recorder { topics }.start().recipient(), received)
    }

    /// Handles an event only when the test hands out a permit.
    struct Gated {
        gate: Arc<Semaphore>,
    }

    impl Actor for Gated {
        type Context = Context<Self>;
    }

    impl Handler<EventDelivery> for Gated {
        type Result = ResponseFuture<()>;

        fn handle(&mut self, _: EventDelivery, _: &mut Self::Context) -> Self::Result {
            let gate = Arc::clone(&self.gate);
            Box::pin(async move {
                gate.acquire().await.expect("gate open").forget();
            })
        }
    }

    /// Stops on its first event, as a crashed subscriber would.
    struct Quitter;

    impl Actor for Quitter {
        type Context = Context<Self>;
    }

    impl Handler<EventDelivery> for Quitter {
        type Result = ();

        fn handle(&mut self, _: EventDelivery, ctx: &mut Self::Context) {
            ctx.stop();
        }
    }

    fn publisher(registry: &SubscriberRegistry) -> Addr<TopicPublisher> {
        TopicPublisher::new(PublisherSettings::default(), registry.clone(), None).start()
    }

    async fn subscribe(
        publisher: &Addr<TopicPublisher>,
        pattern: &str,
        subscriber: Recipient<EventDelivery>,
        buffer: Option<usize>,
    ) -> SubscriptionId {
        publisher
            .send(Subscribe {
                pattern: pattern.into(),
                subscriber,
                buffer,
            })
            .await
            .unwrap()
            .unwrap()
    }

    async fn publish(publisher: &Addr<TopicPublisher>, topic: &str) {
        let event = Event::new(topic, "test", Value::Null);
        publisher.send(Publish { event }).await.unwrap();
    }

    async fn next_topic(received: &mut mpsc::UnboundedReceiver<String>) -> String {
        tokio::time::timeout(Duration::from_secs(5), received.recv())
            .await
            .expect("an event within 5 s")
            .expect("recorder alive")
    }

    async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !condition() {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[actix::test]
    async fn each_subscriber_receives_only_the_topics_its_pattern_matches() {
        let registry = SubscriberRegistry::new();
        let publisher = publisher(&registry);
        let (jobs, mut job_topics) = recorder();
        let (failures, mut failure_topics) = recorder();
        subscribe(&publisher, "job.*", jobs, None).await;
        subscribe(&publisher, "*.failed", failures, None).await;

        for topic in [
            "jobs.archived",
            "job.created",
            "data.failed",
            "job.failed",
            "job",
        ] {
            publish(&publisher, topic).await;
        }

        assert_eq!(next_topic(&mut job_topics).await, "job.created");
        assert_eq!(next_topic(&mut job_topics).await, "job.failed");
        assert_eq!(next_topic(&mut failure_topics).await, "data.failed");
        assert_eq!(next_topic(&mut failure_topics).await, "job.failed");
        wait_for("all deliveries counted", || {
            registry.stats("t").events_delivered == 4
        })
        .await;
        assert!(job_topics.try_recv().is_err());
        assert!(failure_topics.try_recv().is_err());
    }

    #[actix::test]
    async fn an_invalid_pattern_is_refused_and_subscribes_nothing() {
        let registry = SubscriberRegistry::new();
        let publisher = publisher(&registry);
        let (subscriber, _) = recorder();
        let reply = publisher
            .send(Subscribe {
                pattern: "a.*.b".into(),
                subscriber,
                buffer: None,
            })
            .await
            .unwrap();
        assert!(matches!(reply, Err(PatternError::InnerWildcard { .. })));
        assert_eq!(registry.subscriber_count(), 0);
    }

    #[actix::test]
    async fn a_full_buffer_drops_for_that_subscriber_only_and_counts_each_drop() {
        let registry = SubscriberRegistry::new();
        let publisher = publisher(&registry);
        let gate = Arc::new(Semaphore::new(0));
        let stuck = Gated {
            gate: Arc::clone(&gate),
        }
        .start()
        .recipient();
        let stuck_id = subscribe(&publisher, "*", stuck, Some(2)).await;
        let (fast, mut fast_topics) = recorder();
        subscribe(&publisher, "*", fast, None).await;

        for _ in 0..50 {
            publish(&publisher, "job.progress").await;
        }
        for _ in 0..50 {
            next_topic(&mut fast_topics).await;
        }

        // At most one event in the stuck handler and two in its buffer.
        let stats = registry.stats("t");
        let stuck_stats = &stats.subscriptions[0];
        assert_eq!(stuck_stats.id, stuck_id);
        assert!(stuck_stats.dropped >= 47, "{stats:?}");
        assert_eq!(stats.subscriptions[1].dropped, 0);
        assert_eq!(stats.events_dropped, stuck_stats.dropped);

        gate.add_permits(50);
        wait_for("the stuck subscriber drained", || {
            let stats = registry.stats("t");
            let stuck = &stats.subscriptions[0];
            stuck.delivered + stuck.dropped == 50 && stuck.queued == 0
        })
        .await;
    }

    #[actix::test]
    async fn a_burst_larger_than_the_buffer_sent_without_yielding_is_dropped_and_counted() {
        let registry = SubscriberRegistry::new();
        let publisher = publisher(&registry);
        let (subscriber, _topics) = recorder();
        subscribe(&publisher, "*", subscriber, Some(16)).await;

        let sink = crate::message::EventSink::to(publisher.clone().recipient());
        for _ in 0..1000 {
            sink.publish(Event::new("job.progress", "test", Value::Null));
        }

        wait_for("every event delivered or dropped", || {
            let stats = registry.stats("t");
            stats.events_delivered + stats.events_dropped == 1000
        })
        .await;
        let stats = registry.stats("t");
        assert!(stats.events_dropped >= 1000 - 17, "{stats:?}");
        assert_eq!(stats.subscriptions[0].dropped, stats.events_dropped);
    }

    #[actix::test]
    async fn a_stopped_subscriber_is_removed_and_its_event_counted_as_dropped() {
        let registry = SubscriberRegistry::new();
        let publisher = publisher(&registry);
        subscribe(&publisher, "*", Quitter.start().recipient(), None).await;

        publish(&publisher, "job.created").await;
        wait_for("the first event delivered", || {
            registry.stats("t").events_delivered == 1
        })
        .await;
        publish(&publisher, "job.started").await;

        wait_for("the subscription removed", || {
            registry.subscriber_count() == 0
        })
        .await;
        let stats = registry.stats("t");
        assert_eq!(stats.events_dropped, 1, "{stats:?}");
    }

    #[actix::test]
    async fn subscriptions_and_counters_outlive_the_publisher_that_made_them() {
        let registry = SubscriberRegistry::new();
        let first = publisher(&registry);
        let (subscriber, mut topics) = recorder();
        subscribe(&first, "trade.*", subscriber, None).await;
        publish(&first, "trade.entered").await;
        assert_eq!(next_topic(&mut topics).await, "trade.entered");

        let successor = publisher(&registry);
        publish(&successor, "trade.exited").await;
        assert_eq!(next_topic(&mut topics).await, "trade.exited");
        assert_eq!(registry.stats("t").events_published, 2);
    }

    #[actix::test]
    async fn a_bus_can_subscribe_through_the_registry_before_its_publisher_starts() {
        let registry = SubscriberRegistry::new();
        let (subscriber, mut topics) = recorder();
        registry.subscribe("data.*", subscriber, 4).unwrap();
        assert!(registry.subscribe("data.**", recorder().0, 4).is_err());

        let publisher = publisher(&registry);
        publish(&publisher, "data.cached").await;
        assert_eq!(next_topic(&mut topics).await, "data.cached");
        assert_eq!(registry.subscriber_count(), 1);
    }

    #[actix::test]
    async fn unsubscribing_stops_deliveries() {
        let registry = SubscriberRegistry::new();
        let publisher = publisher(&registry);
        let (subscriber, mut topics) = recorder();
        let id = subscribe(&publisher, "*", subscriber, None).await;
        assert!(publisher.send(Unsubscribe { id }).await.unwrap());
        assert!(!publisher.send(Unsubscribe { id }).await.unwrap());

        publish(&publisher, "job.created").await;
        let (witness, mut witness_topics) = recorder();
        subscribe(&publisher, "*", witness, None).await;
        publish(&publisher, "job.started").await;
        assert_eq!(next_topic(&mut witness_topics).await, "job.started");
        assert!(topics.try_recv().is_err());
    }

    #[actix::test]
    async fn bus_publish_reaches_subscribers_and_replies_published() {
        let registry = SubscriberRegistry::new();
        let publisher = publisher(&registry);
        let (subscriber, mut topics) = recorder();
        subscribe(&publisher, "job.completed", subscriber, None).await;

        let payload = json!({"event_type": "job.completed", "data": {"job_id": "j-1"},
                             "correlation_id": "c-1"});
        let reply = publisher
            .send(Command::new(PUBLISH_COMMAND, payload))
            .await
            .unwrap();
        assert_eq!(reply, Ok(json!({"published": true})));
        assert_eq!(next_topic(&mut topics).await, "job.completed");
    }

    #[actix::test]
    async fn bus_publish_refuses_a_malformed_event_as_bad_request() {
        let publisher = publisher(&SubscriberRegistry::new());
        let cases = [
            json!({"data": {}}),
            json!({"event_type": "job.completed", "data": [1]}),
            json!({"event_type": "job.completed", "extra": 1}),
            json!({"event_type": "job.*"}),
            json!({"event_type": 5}),
        ];
        for payload in cases {
            let reply = publisher
                .send(Command::new(PUBLISH_COMMAND, payload.clone()))
                .await
                .unwrap();
            let error = reply.expect_err("a malformed event is refused");
            assert_eq!(error.code, code::BAD_REQUEST, "{payload}");
        }
        let other = publisher
            .send(Command::new("bus.other", json!({})))
            .await
            .unwrap();
        assert_eq!(other.unwrap_err().code, code::UNKNOWN_COMMAND);
    }

    #[actix::test]
    async fn stats_report_totals_and_each_subscription() {
        let registry = SubscriberRegistry::new();
        let publisher = publisher(&registry);
        let (subscriber, mut topics) = recorder();
        subscribe(&publisher, "job.*", subscriber, Some(8)).await;
        publish(&publisher, "job.created").await;
        next_topic(&mut topics).await;
        wait_for("the delivery counted", || {
            registry.stats("t").events_delivered == 1
        })
        .await;

        let stats = publisher.send(StatsQuery).await.unwrap();
        assert_eq!(
            stats,
            json!({
                "service": "dgbit-bus",
                "events_published": 1,
                "events_delivered": 1,
                "events_dropped": 0,
                "edge_send_failures": 0,
                "subscribers": 1,
                "subscriptions": [{"id": 1, "pattern": "job.*", "buffer": 8,
                                   "queued": 0, "delivered": 1, "dropped": 0}]
            })
        );
    }
}
