//! What the examples share: logging set-up, fresh ipc addresses, an actor
//! that turns bus events into a channel, and number formatting.
//!
//! Each example includes this file with `#[path = "support/mod.rs"]`, and so
//! does `tests/examples.rs` through the example; not every example uses
//! every item.
#![allow(dead_code)]

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use dgbit_bus::bus::BusHandle;
use dgbit_bus::config::Addresses;
use dgbit_bus::message::EventDelivery;
use dgbit_bus::wire::Event;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Send the examples' logs to stderr at `warn` unless `RUST_LOG` says
/// otherwise, so that stdout shows only what the example prints. Calling it
/// twice (two examples in one test binary) is harmless.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Four ipc addresses in a fresh temp dir; the dir (and any socket file
/// left in it) is removed when the returned guard drops.
pub fn temp_addresses() -> std::io::Result<(tempfile::TempDir, Addresses)> {
    let dir = tempfile::Builder::new().prefix("dgbit-").tempdir()?;
    let addresses = Addresses::in_dir(dir.path());
    Ok((dir, addresses))
}

/// The shell lines that point the `dgbit-bus` binary (or a Python peer) at
/// `addresses`.
pub fn env_lines(addresses: &Addresses) -> Vec<String> {
    vec![
        format!("export NNG_COMMAND_ADDRESS={}", addresses.command),
        format!("export NNG_EVENT_ADDRESS={}", addresses.event),
        format!("export NNG_JOB_QUEUE_ADDRESS={}", addresses.job_queue),
        format!("export NNG_DATA_ADDRESS={}", addresses.data),
    ]
}

/// A subscriber actor that forwards each event it is given into a channel,
/// so that plain async code can wait for events with a deadline.
pub struct EventTap {
    sender: mpsc::UnboundedSender<Arc<Event>>,
}

impl EventTap {
    /// A tap and the receiving end of its channel.
    pub fn new() -> (Self, mpsc::UnboundedReceiver<Arc<Event>>) {
        let (sender, receiver) = mpsc::unbounded_channel();
        (Self { sender }, receiver)
    }
}

impl Actor for EventTap {
    type Context = Context<Self>;
}

impl Handler<EventDelivery> for EventTap {
    type Result = ();

    fn handle(&mut self, delivery: EventDelivery, _ctx: &mut Self::Context) {
        // The receiver is gone only when the example has stopped listening.
        let _ = self.sender.send(delivery.event);
    }
}

/// Subscribe an [`EventTap`] to `pattern` on `bus`.
///
/// # Errors
///
/// When `pattern` is not a valid pattern.
pub fn tap(bus: &BusHandle, pattern: &str) -> anyhow::Result<mpsc::UnboundedReceiver<Arc<Event>>> {
    let (tap, receiver) = EventTap::new();
    bus.subscribe(pattern, tap.start().recipient())?;
    Ok(receiver)
}

/// The next event from `events` that satisfies `wanted`, skipping others,
/// or `None` once `deadline` passes or the channel closes.
pub async fn next_matching(
    events: &mut mpsc::UnboundedReceiver<Arc<Event>>,
    deadline: Instant,
    mut wanted: impl FnMut(&Event) -> bool,
) -> Option<Arc<Event>> {
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(event)) if wanted(&event) => return Some(event),
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => return None,
        }
    }
}

/// A `str` field of an event's data, or "".
pub fn data_str<'a>(event: &'a Event, key: &str) -> &'a str {
    event
        .data
        .get(key)
        .and_then(serde_json::Value::as_str)
        .unwrap_or("")
}

/// A fraction as a signed percentage with two decimals: `-0.0123` is
/// `-1.23%`.
pub fn signed_percent(fraction: f64) -> String {
    format!("{:+.2}%", fraction * 100.0)
}

/// A fraction as a percentage with one decimal: `0.385` is `38.5%`.
pub fn percent(fraction: f64) -> String {
    format!("{:.1}%", fraction * 100.0)
}

/// Milliseconds with one decimal, for printed timings.
pub fn millis(duration: Duration) -> String {
    format!("{:.1} ms", duration.as_secs_f64() * 1000.0)
}
