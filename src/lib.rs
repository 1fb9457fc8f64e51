//! dgbit-bus: dgbit's NNG service bus as a supervised actix runtime.
//!
//! # Layout
//!
//! - [`wire`]: dgbit's JSON shapes (request, reply, event, job, dead letter)
//!   and the checks every incoming body goes through.
//! - [`config`]: addresses from `NNG_*_ADDRESS`, limits, a builder.
//! - [`message`]: the typed messages user actors handle (`Command`,
//!   `EventDelivery`, `RunJob`) and the sinks they publish through.
//! - One file per socket role: [`router`] (`CommandRouter`, also the data
//!   bus), [`publisher`] (`TopicPublisher`), [`dispatcher`]
//!   (`QueueDispatcher`), [`dead_letter`] (`DeadLetterActor`).
//! - [`edge`]: the NNG adapters, the only code that touches sockets.
//! - [`backoff`] and [`supervisor`]: restarting crashed roles on a schedule.
//! - [`bus`]: starts the roles and edges and hands back a [`bus::BusHandle`].
//! - [`client`]: `BusClient`, the Rust counterpart of dgbit's `NNGClient`;
//!   [`worker`]: `JobWorker`, a remote worker process.
//! - [`builtin`]: the bus's own commands (`ping`, `echo`, `status`); the
//!   `bus.*` commands belong to the roles that serve them.
//! - [`cli`]: the `dgbit-bus` binary's subcommands.
//!
//! # The life of one command
//!
//! A REQ peer sends bytes to the command address. The [`edge::rep`] edge
//! receives them on one of its NNG contexts and decodes them
//! ([`wire::CommandRequest::decode`]) on that NNG thread. A request for an
//! inline handler is handed, with its reply slot, to the router's
//! [`router::RouterCore`] right there, which suppresses duplicates and runs
//! the handler. Any other goes to the [`router::CommandRouter`] actor, which
//! routes it through the same core, sends a typed [`message::Command`] to
//! the handler actor and awaits it as a future of its own. The handler's
//! `Result` becomes a [`wire::CommandReply`], written into the reply slot;
//! the edge sends it on the same context and re-arms it for the next
//! request. An in-process [`bus::BusHandle::request`] takes the same path
//! from the core on, in its caller.

pub mod backoff;
pub mod builtin;
pub mod bus;
pub mod cli;
pub mod client;
pub mod config;
pub mod dead_letter;
pub mod dedup;
pub mod dispatcher;
pub mod edge;
pub mod message;
pub mod publisher;
pub mod router;
pub mod supervisor;
pub mod topics;
pub mod wire;
pub mod worker;
