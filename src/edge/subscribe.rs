//! `SubEdge`: a remote subscriber that dials a bus's event address and hands
//! matching events to an actor.
//!
//! # How it runs
//!
//! Two plain threads, no NNG callbacks:
//!
//! 1. The *receive thread* waits on the SUB socket with a receive timeout
//!    ([`RECEIVE_POLL`]), so that it notices [`SubEdge::close`] even when no
//!    event arrives (closing the socket also wakes it at once). It decodes
//!    each message, checks the topic against the [`Pattern`] and offers the
//!    event to a bounded buffer ([`SubEdgeSettings::buffer`]) without ever
//!    waiting: a full buffer drops the event and counts it.
//! 2. The *forwarding thread* takes events from the buffer and awaits
//!    `send(EventDelivery)` to the subscriber, so the subscriber actor's
//!    mailbox limit slows only this thread.
//!
//! A thread that blocks in `recv` is simpler to stop and to reason about
//! than an `Aio` callback (which must never panic, never block and never
//! drop its own last handle), and one edge per subscriber process needs no
//! more. The receive thread never waits on an actor, so NNG's own SUB queue
//! (128 messages, dropping the oldest, uncounted) overflows only if decoding
//! cannot keep up; the bus-side drops are counted in [`SubEdgeStats`].
//!
//! # Filtering
//!
//! The bus encodes events compactly with `event_type` first, so an exact
//! topic or a `prefix.*` pattern is also set as an NNG subscription on the
//! literal bytes `{"event_type":"prefix.` and unwanted events never cross
//! the socket. `*` and `*.suffix` subscribe to everything. Either way every
//! event is checked exactly against the pattern after decoding. A publisher
//! that writes JSON with spaces (Python's `json.dumps` default) matches no
//! such prefix: turn [`SubEdgeSettings::prefix_filter`] off to dial one.
//!
//! # Reconnection and what is not promised
//!
//! The edge dials without waiting for the bus and NNG keeps reconnecting on
//! the [`EdgeOptions`] schedule, so a subscriber started before the bus
//! receives events once the bus is up. PUB/SUB keeps nothing for absent
//! peers: events published before the connection is made, or while it is
//! down, are never seen.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use actix::Recipient;
use nng::options::protocol::pubsub::Subscribe;
use nng::options::{Options, RecvTimeout};
use nng::{Protocol, Socket};
use serde::Serialize;
use tracing::{debug, warn};

use super::{dial, EdgeError, EdgeOptions};
use crate::message::EventDelivery;
use crate::publisher::worth_logging;
use crate::topics::{Pattern, PatternKind};
use crate::wire::Event;

/// Events buffered between the receive and forwarding threads by default.
pub const DEFAULT_SUB_EDGE_BUFFER: usize = 1024;

/// The receive thread's longest wait before it checks for a stop.
pub const RECEIVE_POLL: Duration = Duration::from_millis(200);

/// Where and what a [`SubEdge`] subscribes to.
#[derive(Debug, Clone)]
pub struct SubEdgeSettings {
    /// The bus's event address.
    pub url: String,
    /// Which topics reach the subscriber.
    pub pattern: Pattern,
    /// Events held for a slow subscriber before drops begin. Default
    /// [`DEFAULT_SUB_EDGE_BUFFER`]; 0 is treated as 1.
    pub buffer: usize,
    /// Let NNG filter by the pattern's literal byte prefix (default on).
    /// Turn it off for a publisher that does not encode events compactly
    /// with `event_type` first.
    pub prefix_filter: bool,
    /// Size limit and reconnect schedule.
    pub edge: EdgeOptions,
}

impl SubEdgeSettings {
    /// Settings for `pattern` on `url`, everything else default.
    pub fn new(url: impl Into<String>, pattern: Pattern) -> Self {
        Self {
            url: url.into(),
            pattern,
            buffer: DEFAULT_SUB_EDGE_BUFFER,
            prefix_filter: true,
            edge: EdgeOptions::default(),
        }
    }
}

/// The NNG subscription that pre-selects `pattern`'s events on the wire:
/// the start of a compact event body, or empty (everything) for patterns no
/// byte prefix can express.
pub fn nng_prefix(pattern: &Pattern) -> Vec<u8> {
    // serde_json escapes the topic exactly as the bus's encoder does.
    let quoted = |text: &str| serde_json::to_string(text).unwrap_or_default();
    match pattern.kind() {
        PatternKind::Exact(topic) => format!(r#"{{"event_type":{}"#, quoted(topic)).into_bytes(),
        PatternKind::Under(prefix) => {
            let open = quoted(prefix);
            let open = open.strip_suffix('"').unwrap_or(&open);
            format!(r#"{{"event_type":{open}."#).into_bytes()
        }
        PatternKind::All | PatternKind::EndsWith(_) => Vec::new(),
    }
}

/// What a [`SubEdge`] has seen so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SubEdgeStats {
    /// Messages taken from the socket.
    pub received: u64,
    /// Events whose topic the pattern does not match.
    pub skipped: u64,
    /// Events the subscriber accepted.
    pub delivered: u64,
    /// Matching events given up: buffer full, subscriber gone, or still
    /// buffered when the edge closed.
    pub dropped: u64,
    /// Messages that are not events (not JSON, wrong keys, too large).
    pub undecodable: u64,
}

#[derive(Debug, Default)]
struct Counters {
    received: AtomicU64,
    skipped: AtomicU64,
    delivered: AtomicU64,
    dropped: AtomicU64,
    undecodable: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> SubEdgeStats {
        SubEdgeStats {
            received: self.received.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            undecodable: self.undecodable.load(Ordering::Relaxed),
        }
    }

    /// Add `lost` drops; returns the new total.
    fn drop_events(&self, lost: u64) -> u64 {
        self.dropped.fetch_add(lost, Ordering::Relaxed) + lost
    }
}

/// State shared by the edge handle and its two threads.
#[derive(Debug)]
struct Shared {
    url: String,
    pattern: Pattern,
    max_message_size: usize,
    stopping: AtomicBool,
    counters: Counters,
}

/// A running remote subscription; see the [module docs](self).
///
/// Closing (or dropping) the edge stops it.
#[derive(Debug)]
pub struct SubEdge {
    socket: Socket,
    shared: Arc<Shared>,
    receive_thread: Mutex<Option<JoinHandle<()>>>,
}

impl SubEdge {
    /// Dial `settings.url` and start delivering matching events to
    /// `subscriber`. Returns at once; the connection is made (and remade) in
    /// the background.
    ///
    /// # Errors
    ///
    /// [`EdgeError::Dial`] for a malformed URL or unknown transport;
    /// [`EdgeError::Socket`] when NNG cannot create or configure the socket
    /// or the operating system refuses a thread.
    pub fn dial(
        settings: SubEdgeSettings,
        subscriber: Recipient<EventDelivery>,
    ) -> Result<Self, EdgeError> {
        let socket = Socket::new(Protocol::Sub0)?;
        let prefix = if settings.prefix_filter {
            nng_prefix(&settings.pattern)
        } else {
            Vec::new()
        };
        socket.set_opt::<Subscribe>(prefix)?;
        socket.set_opt::<RecvTimeout>(Some(RECEIVE_POLL))?;
        dial(&socket, &settings.url, &settings.edge)?;

        let shared = Arc::new(Shared {
            url: settings.url,
            pattern: settings.pattern,
            max_message_size: settings.edge.max_message_size,
            stopping: AtomicBool::new(false),
            counters: Counters::default(),
        });
        let (buffer, queue) = mpsc::sync_channel(settings.buffer.max(1));
        spawn_thread("dgbit-sub-forward", {
            let shared = Arc::clone(&shared);
            move || forward(&shared, &queue, &subscriber)
        })?;
        let receive_thread = spawn_thread("dgbit-sub-receive", {
            let (socket, shared) = (socket.clone(), Arc::clone(&shared));
            move || receive(&socket, &shared, &buffer)
        })?;
        debug!(url = %shared.url, pattern = %shared.pattern, "subscriber dialing");
        Ok(Self {
            socket,
            shared,
            receive_thread: Mutex::new(Some(receive_thread)),
        })
    }

    /// The counters so far.
    pub fn stats(&self) -> SubEdgeStats {
        self.shared.counters.snapshot()
    }

    /// False once the edge is closed or its subscriber has stopped.
    pub fn is_running(&self) -> bool {
        !self.shared.stopping.load(Ordering::Acquire)
    }

    /// Stop receiving: close the socket and wait for the receive thread.
    ///
    /// The forwarding thread finishes the delivery it is in (it may be
    /// waiting on the subscriber) and then ends on its own; events still
    /// buffered are counted as dropped. Not waiting for it means `close` is
    /// safe to call from the subscriber actor's own thread. Calling it again
    /// does nothing.
    pub fn close(&self) {
        self.shared.stopping.store(true, Ordering::Release);
        self.socket.close();
        let handle = self
            .receive_thread
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(handle) = handle {
            // The thread catches nothing; a panic there is a bug, and it has
            // already been reported by the panic hook.
            let _ = handle.join();
            debug!(url = %self.shared.url, stats = ?self.stats(), "subscriber closed");
        }
    }
}

impl Drop for SubEdge {
    fn drop(&mut self) {
        self.close();
    }
}

fn spawn_thread(
    name: &str,
    body: impl FnOnce() + Send + 'static,
) -> Result<JoinHandle<()>, EdgeError> {
    thread::Builder::new()
        .name(name.to_string())
        .spawn(body)
        .map_err(|error| {
            warn!(thread = name, %error, "cannot start subscriber thread");
            EdgeError::Socket(nng::Error::OutOfMemory)
        })
}

/// The receive thread: socket to buffer, never waiting on the subscriber.
fn receive(socket: &Socket, shared: &Shared, buffer: &SyncSender<Arc<Event>>) {
    while !shared.stopping.load(Ordering::Acquire) {
        match socket.recv() {
            Ok(message) => {
                if !accept(shared, message.as_slice(), buffer) {
                    break;
                }
            }
            Err(nng::Error::TimedOut) => {}
            Err(nng::Error::Closed) => break,
            Err(error) => {
                // Not expected from SUB; pause so a persistent error cannot
                // spin this thread.
                warn!(url = %shared.url, %error, "subscriber receive failed");
                thread::sleep(RECEIVE_POLL);
            }
        }
    }
    debug!(url = %shared.url, "subscriber receive thread ended");
}

/// Decode, filter and buffer one message. False when the subscriber is gone.
fn accept(shared: &Shared, body: &[u8], buffer: &SyncSender<Arc<Event>>) -> bool {
    let counters = &shared.counters;
    counters.received.fetch_add(1, Ordering::Relaxed);
    let event = match Event::decode(body, shared.max_message_size) {
        Ok(event) => event,
        Err(error) => {
            let undecodable = counters.undecodable.fetch_add(1, Ordering::Relaxed) + 1;
            if worth_logging(undecodable) {
                warn!(
                    url = %shared.url,
                    bytes = body.len(),
                    code = error.code,
                    error = %error.message,
                    undecodable,
                    "undecodable event skipped"
                );
            }
            return true;
        }
    };
    if !shared.pattern.matches(&event.event_type) {
        counters.skipped.fetch_add(1, Ordering::Relaxed);
        return true;
    }
    match buffer.try_send(Arc::new(event)) {
        Ok(()) => true,
        Err(TrySendError::Full(event)) => {
            let dropped = counters.drop_events(1);
            if worth_logging(dropped) {
                warn!(
                    url = %shared.url,
                    pattern = %shared.pattern,
                    event_type = %event.event_type,
                    dropped,
                    "subscriber buffer full, event dropped"
                );
            }
            true
        }
        // The forwarding thread ended: its subscriber is gone.
        Err(TrySendError::Disconnected(_)) => {
            counters.drop_events(1);
            false
        }
    }
}

/// The forwarding thread: buffer to subscriber, one event at a time.
fn forward(shared: &Shared, queue: &Receiver<Arc<Event>>, subscriber: &Recipient<EventDelivery>) {
    let counters = &shared.counters;
    while let Ok(event) = queue.recv() {
        if shared.stopping.load(Ordering::Acquire) {
            let lost = 1 + queue.try_iter().count() as u64;
            counters.drop_events(lost);
            debug!(url = %shared.url, lost, "buffered events dropped at close");
            break;
        }
        // Hand the event over without a round trip while the subscriber's
        // mailbox has room; only when it is full, wait for it (blocking is
        // the point: this thread exists to wait). `delivered` therefore
        // counts events handed to the actor's mailbox.
        let delivery = match subscriber.try_send(EventDelivery { event }) {
            Ok(()) => Ok(()),
            Err(actix::prelude::SendError::Full(delivery)) => {
                futures::executor::block_on(subscriber.send(delivery)).map_err(|_| ())
            }
            Err(actix::prelude::SendError::Closed(_)) => Err(()),
        };
        match delivery {
            Ok(()) => {
                counters.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                // No timeout is set: the subscriber actor has stopped.
                shared.stopping.store(true, Ordering::Release);
                let lost = 1 + queue.try_iter().count() as u64;
                counters.drop_events(lost);
                warn!(url = %shared.url, lost, "subscriber gone, remote subscription stopping");
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(pattern: &str) -> String {
        String::from_utf8(nng_prefix(&Pattern::parse(pattern).unwrap())).unwrap()
    }

    #[test]
    fn prefix_patterns_become_a_literal_nng_subscription() {
        assert_eq!(prefix("job.*"), r#"{"event_type":"job."#);
        assert_eq!(prefix("trade.signal.*"), r#"{"event_type":"trade.signal."#);
    }

    #[test]
    fn an_exact_topic_subscribes_up_to_its_closing_quote() {
        assert_eq!(prefix("trade.entered"), r#"{"event_type":"trade.entered""#);
    }

    #[test]
    fn star_and_suffix_patterns_subscribe_to_everything() {
        assert_eq!(prefix("*"), "");
        assert_eq!(prefix("*.failed"), "");
    }

    #[test]
    fn a_topic_needing_json_escapes_is_escaped_like_the_encoder() {
        let event = Event::new("odd\"topic", "t", serde_json::Value::Null);
        let body = String::from_utf8(event.encode()).unwrap();
        assert!(body.starts_with(&prefix("odd\"topic")), "{body}");
    }
}
