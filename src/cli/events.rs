//! `dgbit-bus publish` and `dgbit-bus tail`: the event bus from a shell.
//!
//! `publish` sends one event into a running bus through its command bus (the
//! `bus.publish` command, see [`crate::publisher`]), so local and remote
//! subscribers all get it and the command waits for the bus to accept it.
//! `tail` dials the event address with a [`SubEdge`] and prints each matching
//! event as one compact JSON line, flushed at once, for `jq` and friends.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use anyhow::Context as _;
use clap::Args;
use serde_json::{Map, Value};
use tokio::sync::Notify;

use super::AddressArgs;

use crate::edge::subscribe::{SubEdge, SubEdgeSettings};
use crate::message::EventDelivery;
use crate::publisher::PUBLISH_COMMAND;
use crate::topics::{is_topic, Pattern};

/// Options of `dgbit-bus publish`.
#[derive(Debug, Clone, Args)]
pub struct PublishArgs {
    /// The event's topic, e.g. `job.completed`.
    pub topic: String,
    /// The event's data as a JSON object.
    #[arg(default_value = "{}")]
    pub data: String,
    /// The event's `source` (the bus fills in `remote` when left out).
    #[arg(long)]
    pub source: Option<String>,
    /// The event's `correlation_id`.
    #[arg(long)]
    pub correlation_id: Option<String>,
    /// Seconds to wait for the bus to accept the event.
    #[arg(long, default_value_t = 10.0)]
    pub timeout_s: f64,
}

/// Publish one event into the bus at the command address and print the
/// bus's result.
///
/// # Errors
///
/// When the topic is not a topic or the data not a JSON object, the bus
/// cannot be reached, the request times out, or the bus refuses the event.
pub fn run_publish(args: &PublishArgs, addresses: &AddressArgs) -> anyhow::Result<()> {
    let event = event_object(args)?;
    let url = &addresses.command_address;
    let timeout = Duration::from_secs_f64(args.timeout_s);
    let result = super::call_once(url, timeout, PUBLISH_COMMAND, Value::Object(event))
        .with_context(|| format!("publishing {} through {url}", args.topic))?;
    println!("{result}");
    Ok(())
}

/// The `bus.publish` payload: dgbit's event object without `timestamp`,
/// which the bus stamps on arrival.
fn event_object(args: &PublishArgs) -> anyhow::Result<Map<String, Value>> {
    anyhow::ensure!(
        is_topic(&args.topic),
        "`{}` is not a topic: use dot-separated names without `*`",
        args.topic
    );
    let data = super::json_object_arg(&args.data, "data")?;
    let mut event = Map::new();
    event.insert("event_type".into(), args.topic.clone().into());
    event.insert("data".into(), Value::Object(data));
    if let Some(source) = &args.source {
        event.insert("source".into(), source.clone().into());
    }
    if let Some(id) = &args.correlation_id {
        event.insert("correlation_id".into(), id.clone().into());
    }
    Ok(event)
}

/// Options of `dgbit-bus tail`.
#[derive(Debug, Clone, Args)]
pub struct TailArgs {
    /// Which topics to print: an exact topic, `prefix.*`, `*.suffix` or `*`.
    #[arg(default_value = "*")]
    pub pattern: String,
    /// Events held while stdout is slow before drops begin.
    #[arg(long, default_value_t = crate::edge::subscribe::DEFAULT_SUB_EDGE_BUFFER)]
    pub buffer: usize,
    /// Do not let NNG pre-filter by byte prefix; needed only for publishers
    /// other than dgbit-bus that write JSON with spaces.
    #[arg(long)]
    pub no_prefix_filter: bool,
}

/// Print every matching event on the bus's event address, one compact JSON
/// object per line, until SIGINT or SIGTERM or until stdout is closed.
///
/// Events published before `tail` connects are not shown (PUB/SUB keeps
/// nothing); if the bus is not up yet, `tail` waits for it.
///
/// # Errors
///
/// When the pattern is invalid, the address malformed, or the signal
/// handlers cannot be installed.
pub fn run_tail(args: &TailArgs, addresses: &AddressArgs) -> anyhow::Result<()> {
    let pattern = Pattern::parse(&args.pattern)?;
    let mut settings = SubEdgeSettings::new(addresses.event_address.clone(), pattern);
    settings.buffer = args.buffer;
    settings.prefix_filter = !args.no_prefix_filter;

    System::new().block_on(async move {
        let stdout_closed = Arc::new(Notify::new());
        let printer = LinePrinter {
            stdout_closed: Arc::clone(&stdout_closed),
        }
        .start();
        let edge = SubEdge::dial(settings, printer.recipient())?;
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            interrupted = tokio::signal::ctrl_c() => interrupted?,
            _ = terminate.recv() => {}
            () = stdout_closed.notified() => {}
        }
        edge.close();
        tracing::debug!(stats = ?edge.stats(), "tail stopped");
        Ok(())
    })
}

/// Writes each event to stdout as one line; tells `run_tail` when stdout is
/// gone (a closed pipe, `head` having read enough).
struct LinePrinter {
    stdout_closed: Arc<Notify>,
}

impl Actor for LinePrinter {
    type Context = Context<Self>;
}

impl Handler<EventDelivery> for LinePrinter {
    type Result = ();

    fn handle(&mut self, delivery: EventDelivery, ctx: &mut Self::Context) {
        let mut line = delivery.event.encode();
        line.push(b'\n');
        let mut stdout = std::io::stdout().lock();
        if stdout
            .write_all(&line)
            .and_then(|()| stdout.flush())
            .is_err()
        {
            self.stdout_closed.notify_one();
            ctx.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(topic: &str, data: &str) -> PublishArgs {
        PublishArgs {
            topic: topic.into(),
            data: data.into(),
            source: None,
            correlation_id: None,
            timeout_s: 1.0,
        }
    }

    #[test]
    fn a_published_event_carries_only_the_keys_given() {
        let mut full = args("job.completed", r#"{"job_id": "j-1"}"#);
        full.source = Some("cli".into());
        full.correlation_id = Some("c-1".into());
        let event = event_object(&full).unwrap();
        let keys: Vec<&str> = event.keys().map(String::as_str).collect();
        assert_eq!(keys, ["event_type", "data", "source", "correlation_id"]);

        let bare = event_object(&args("job.completed", "{}")).unwrap();
        assert_eq!(bare.len(), 2);
    }

    #[test]
    fn a_wildcard_topic_or_non_object_data_is_refused_before_sending() {
        assert!(event_object(&args("job.*", "{}")).is_err());
        assert!(event_object(&args("job.completed", "[1]")).is_err());
        assert!(event_object(&args("job.completed", "nope")).is_err());
    }
}
