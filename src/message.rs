//! The typed messages that handler, subscriber and worker actors receive.
//!
//! These are the public face of the bus for a user's own actors: implement
//! `Handler<Command>` to serve a command, `Handler<EventDelivery>` to
//! subscribe to events, `Handler<RunJob>` to work on jobs. None of them sees
//! bytes or sockets, so each can be unit-tested with a bare actix system.

use std::fmt;
use std::sync::Arc;

use actix::prelude::*;
use serde_json::Value;

use crate::wire::{code, CommandRequest, Event, JobMessage};

/// A command routed to the handler registered for `name`.
///
/// `name` is the request's `command`, or the router's default route for a
/// request that had none.
#[derive(Debug, Clone)]
pub struct Command {
    pub name: String,
    pub request: CommandRequest,
}

impl Command {
    pub fn new(name: impl Into<String>, payload: Value) -> Self {
        let name = name.into();
        Self {
            request: CommandRequest::new(name.clone(), payload),
            name,
        }
    }
}

impl Message for Command {
    type Result = Result<Value, HandlerError>;
}

/// A handler's refusal or failure: becomes an error reply with `code`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerError {
    pub code: String,
    pub message: String,
}

impl HandlerError {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
        }
    }

    /// The handler ran and failed: code `handler_failed`.
    pub fn failed(message: impl Into<String>) -> Self {
        Self::new(code::HANDLER_FAILED, message)
    }

    /// The request itself is wrong: code `bad_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(code::BAD_REQUEST, message)
    }
}

/// The optional whole-number field `key` of a command's payload: `None`
/// when it is missing or null.
///
/// # Errors
///
/// `bad_request` ("`key` must be a whole number") for any other value.
pub fn optional_u64(
    payload: &serde_json::Map<String, Value>,
    key: &str,
) -> Result<Option<u64>, HandlerError> {
    match payload.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => value
            .as_u64()
            .map(Some)
            .ok_or_else(|| HandlerError::bad_request(format!("`{key}` must be a whole number"))),
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for HandlerError {}

/// Ask the event bus to publish `event` to every matching subscriber.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct Publish {
    pub event: Event,
}

/// An event delivered to a subscriber actor. Shared, because one event goes to
/// many subscribers.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct EventDelivery {
    pub event: Arc<Event>,
}

/// A job handed to an in-process worker actor registered for its type.
#[derive(Debug, Clone)]
pub struct RunJob {
    pub job: JobMessage,
    pub progress: ProgressReporter,
}

impl Message for RunJob {
    type Result = Result<Value, HandlerError>;
}

/// Where a job handler reports progress; each report becomes a
/// `job.progress` event with the job's id. Reports also renew the job's lease.
#[derive(Clone, Default)]
pub struct ProgressReporter {
    sink: Option<Arc<dyn Fn(Value) + Send + Sync>>,
}

impl ProgressReporter {
    /// A reporter that calls `sink` with each report's data.
    pub fn new(sink: impl Fn(Value) + Send + Sync + 'static) -> Self {
        Self {
            sink: Some(Arc::new(sink)),
        }
    }

    /// A reporter that discards reports, for tests.
    pub fn discard() -> Self {
        Self::default()
    }

    pub fn report(&self, data: Value) {
        if let Some(sink) = &self.sink {
            sink(data);
        }
    }
}

impl fmt::Debug for ProgressReporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProgressReporter")
            .field("connected", &self.sink.is_some())
            .finish()
    }
}

/// Where a handler publishes events of its own (for example `trade.entered`).
///
/// A handler built without a bus gets [`EventSink::discard`]; a test can pass
/// [`EventSink::to`] with its own recording actor. The bus hands out sinks
/// that reach whichever publisher instance is live ([`EventSink::from_fn`]).
#[derive(Clone, Default)]
pub struct EventSink {
    target: Option<Arc<dyn Fn(Publish) + Send + Sync>>,
}

impl EventSink {
    pub fn to(target: Recipient<Publish>) -> Self {
        Self::from_fn(move |publish| target.do_send(publish))
    }

    /// A sink that hands each event to `deliver`, which must not block.
    pub fn from_fn(deliver: impl Fn(Publish) + Send + Sync + 'static) -> Self {
        Self {
            target: Some(Arc::new(deliver)),
        }
    }

    pub fn discard() -> Self {
        Self::default()
    }

    /// Hand `event` to the publisher without waiting. The publisher counts
    /// anything it cannot deliver; an event given to a discarding sink is
    /// dropped by design.
    pub fn publish(&self, event: Event) {
        if let Some(target) = &self.target {
            target(Publish { event });
        }
    }
}

impl fmt::Debug for EventSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventSink")
            .field("connected", &self.target.is_some())
            .finish()
    }
}

/// Ask a role for its counters, as a JSON object for `system.health` and
/// `dgbit-bus status`.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "serde_json::Value")]
pub struct StatsQuery;
