//! The bus under test: a `Bus` with the bench's echo handler, running on an
//! actix system of its own thread, as it would in a separate process.
//! Workloads that must act inside the bus (publish events) hand it jobs
//! with [`BusServer::run`].

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use actix::prelude::*;
use dgbit_bus::bus::{Bus, BusHandle};
use dgbit_bus::config::{BusConfig, EdgeSet};
use dgbit_bus::message::{Command, HandlerError};
use dgbit_bus::router::FnHandler;
use serde_json::Value;
use tokio::sync::mpsc as channel;

use crate::transport::{ECHO_COMMAND, INLINE_ECHO_COMMAND};

/// How long the bus may take to open its edges.
const OPEN_LIMIT: Duration = Duration::from_secs(10);

/// How long a job handed to the bus thread may run.
const JOB_LIMIT: Duration = Duration::from_secs(120);

/// The bench's handler: the request's payload back, as its result.
pub fn echo(command: Command) -> Result<Value, HandlerError> {
    Ok(Value::Object(command.request.payload))
}

pub type EchoFn = fn(Command) -> Result<Value, HandlerError>;

/// An echo handler actor, for in-process use.
pub fn echo_handler() -> FnHandler<EchoFn> {
    FnHandler::new(echo as EchoFn)
}

/// A bus with only `edges` open, at `addresses`' defaults otherwise.
pub fn config_with(edges: EdgeSet) -> BusConfig {
    BusConfig::default().edges(edges)
}

/// A bus with only its command edge, on `url`.
pub fn command_bus(url: &str) -> anyhow::Result<BusServer> {
    let edges = EdgeSet {
        command: true,
        ..EdgeSet::NONE
    };
    BusServer::start(config_with(edges).command_address(url))
}

type BusJob = Box<dyn FnOnce(Rc<BusHandle>) -> Pin<Box<dyn Future<Output = ()>>> + Send>;

/// A bus serving [`ECHO_COMMAND`] (an actor) and [`INLINE_ECHO_COMMAND`]
/// (inline) with the edges `config` enables; stopped
/// (drained, edges closed, ipc files removed) when dropped.
pub struct BusServer {
    jobs: Option<channel::UnboundedSender<BusJob>>,
    thread: Option<JoinHandle<()>>,
}

impl BusServer {
    /// Start the bus and wait until its edges listen.
    ///
    /// # Errors
    ///
    /// When an edge did not open within [`OPEN_LIMIT`].
    pub fn start(config: BusConfig) -> anyhow::Result<Self> {
        let (ready_sender, ready) = mpsc::channel();
        let (jobs, mut incoming) = channel::unbounded_channel::<BusJob>();
        let thread = std::thread::Builder::new()
            .name("bench-bus".into())
            .spawn(move || {
                System::new().block_on(async move {
                    let handler = echo_handler().start();
                    let started = Bus::builder(config)
                        .command(ECHO_COMMAND, handler.recipient())
                        .inline_command(INLINE_ECHO_COMMAND, echo)
                        .start();
                    let bus = match started {
                        Ok(bus) => bus,
                        Err(err) => {
                            let _ = ready_sender.send(Err(err.to_string()));
                            return;
                        }
                    };
                    let open = bus.wait_for_edges(OPEN_LIMIT).await;
                    let _ = ready_sender.send(Ok(open));
                    let bus = Rc::new(bus);
                    while let Some(job) = incoming.recv().await {
                        job(bus.clone()).await;
                    }
                    if let Ok(bus) = Rc::try_unwrap(bus) {
                        bus.shutdown().await;
                    }
                });
            })?;
        let mut server = Self {
            jobs: Some(jobs),
            thread: Some(thread),
        };
        let outcome = ready.recv_timeout(OPEN_LIMIT + Duration::from_secs(1));
        match outcome {
            Ok(Ok(true)) => Ok(server),
            Ok(Err(why)) => {
                server.stop_now();
                anyhow::bail!("the bus did not start: {why}")
            }
            _ => {
                server.stop_now();
                anyhow::bail!("the bus did not open its edges")
            }
        }
    }

    /// Run `job` on the bus's own thread and wait for its result.
    ///
    /// # Errors
    ///
    /// When the bus thread is gone or the job takes longer than
    /// [`JOB_LIMIT`].
    pub fn run<T, F, Fut>(&self, job: F) -> anyhow::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Rc<BusHandle>) -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
    {
        let (result_sender, result) = mpsc::channel();
        let boxed: BusJob = Box::new(move |bus| {
            Box::pin(async move {
                let _ = result_sender.send(job(bus).await);
            })
        });
        let jobs = self
            .jobs
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("bus stopped"))?;
        jobs.send(boxed)
            .map_err(|_| anyhow::anyhow!("the bus thread is gone"))?;
        Ok(result.recv_timeout(JOB_LIMIT)?)
    }

    fn stop_now(&mut self) {
        // Closing the job channel ends the bus thread's loop.
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for BusServer {
    fn drop(&mut self) {
        self.stop_now();
    }
}
