//! Helpers shared by the actor tests: a recording event sink and payloads.

// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use dgbit_actors::KlineStore;
use dgbit_bus::message::{Command, EventSink, HandlerError, Publish};
use dgbit_bus::wire::Event;
use serde_json::Value;
use tokio::sync::mpsc;

/// How long a test waits for an event before it fails.
pub const EVENT_DEADLINE: Duration = Duration::from_secs(5);
/// The topic of the marker event that closes a recording.
const END_OF_RECORDING: &str = "test.end_of_recording";

/// A fresh store over the crate's fixtures, so that cache counts are the
/// test's own.
pub fn fixtures() -> Arc<KlineStore> {
    Arc::new(KlineStore::fixtures())
}

/// Forwards every published event to the test.
struct Recorder {
    events: mpsc::UnboundedSender<Event>,
}

impl Actor for Recorder {
    type Context = Context<Self>;
}

impl Handler<Publish> for Recorder {
    type Result = ();

    fn handle(&mut self, publish: Publish, _ctx: &mut Self::Context) {
        // The receiver only goes away when the test is over.
        let _ = self.events.send(publish.event);
    }
}

/// An [`EventSink`] whose events the test can read back.
pub struct Recording {
    recorder: Addr<Recorder>,
    events: mpsc::UnboundedReceiver<Event>,
}

impl Recording {
    /// Start a recorder; must run inside an actix system.
    pub fn start() -> Self {
        let (sender, events) = mpsc::unbounded_channel();
        let recorder = Recorder { events: sender }.start();
        Self { recorder, events }
    }

    /// A sink that publishes into this recording.
    pub fn sink(&self) -> EventSink {
        EventSink::to(self.recorder.clone().recipient())
    }

    /// Every event published so far, in order.
    ///
    /// A marker event is sent after everything already in the recorder's
    /// mailbox; collecting up to the marker returns exactly the events
    /// published before this call. Each wait has a deadline.
    pub async fn events_so_far(&mut self) -> Vec<Event> {
        let marker = Event::new(END_OF_RECORDING, "test", Value::Null);
        self.recorder
            .send(Publish { event: marker })
            .await
            .expect("the recorder is alive");
        let mut events = Vec::new();
        loop {
            let next = tokio::time::timeout(EVENT_DEADLINE, self.events.recv()).await;
            let event = next
                .expect("events arrive before the deadline")
                .expect("channel open");
            if event.event_type == END_OF_RECORDING {
                return events;
            }
            events.push(event);
        }
    }
}

/// Send `name` with `payload` to `actor` and return the handler's outcome.
pub async fn call<A>(actor: &Addr<A>, name: &str, payload: Value) -> Result<Value, HandlerError>
where
    A: Actor<Context = Context<A>> + Handler<Command>,
{
    actor
        .send(Command::new(name, payload))
        .await
        .expect("the actor is alive")
}
