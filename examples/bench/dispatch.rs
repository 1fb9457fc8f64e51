//! Workload 3: in-process command dispatch, no socket.
//!
//! One caller awaits one command at a time, on the actix system that runs
//! the bus: through the router (`BusHandle::request`: decode-free, but with
//! duplicate tracking, the handler timeout and the reply built) against a
//! bare `Addr::send` of the same `Command` to the same handler actor.
//!
//! Two more figures: the same through the router without a `request_id`
//! (no duplicate tracking: what that costs), and a bare forwarding actor
//! that sends each `Command` on to the handler and returns its answer,
//! nothing else (what any design with an actor between caller and handler
//! could reach).

use std::time::{Duration, Instant};

use actix::prelude::*;
use dgbit_bus::bus::{Bus, BusHandle};
use dgbit_bus::config::BusConfig;
use dgbit_bus::message::Command;
use dgbit_bus::message::HandlerError;
use serde_json::Value;

use crate::raw::Throughput;
use crate::server::echo_handler;
use crate::table::{Row, Target};
use crate::transport::{next_id, RequestTemplate, ECHO_COMMAND};
use crate::Budget;

/// Commands timed together. Each batch of requests is built before its
/// clock starts, so that neither side pays for building them.
const BATCH: u64 = 64;

fn batch(template: &RequestTemplate) -> Vec<dgbit_bus::wire::CommandRequest> {
    (0..BATCH).map(|_| template.request(next_id())).collect()
}

/// # Errors
///
/// When the router does not start or a command fails.
pub fn in_process(budget: &Budget) -> anyhow::Result<Vec<Row>> {
    let budget = budget.clone();
    System::new().block_on(async move {
        let handler = echo_handler().start();
        let bus = Bus::builder(BusConfig::in_process())
            .command(ECHO_COMMAND, handler.clone().recipient())
            .start()?;
        bus.command_router().live().await?;
        let template = RequestTemplate::new();

        let forwarder = Forwarder {
            handler: handler.clone().recipient(),
        }
        .start();

        let mut routed = Throughput::default();
        let mut unkeyed = Throughput::default();
        let mut bare = Throughput::default();
        let mut forwarded = Throughput::default();
        for round in 0..=budget.rounds {
            let length = if round == 0 {
                Duration::from_millis(100)
            } else {
                budget.round
            };
            let through_bus = through_router(&bus, &template, true, length).await?;
            let without_key = through_router(&bus, &template, false, length).await?;
            let straight = direct(&handler.clone().recipient(), &template, length).await?;
            let via = direct(&forwarder.clone().recipient(), &template, length).await?;
            if round > 0 {
                routed.add(through_bus);
                unkeyed.add(without_key);
                bare.add(straight);
                forwarded.add(via);
            }
        }
        bus.shutdown().await;

        let row = Row::new("3 in-process dispatch", "in-proc", "cmd/s")
            .figures(routed.per_second(), bare.per_second())
            .target(Target::AtLeast(0.7))
            .note(format!(
                "baseline: Addr::send to the handler; {} / {} commands",
                routed.completed, bare.completed
            ));
        let no_key = Row::new("3 in-process dispatch, no request_id", "in-proc", "cmd/s")
            .figures(unkeyed.per_second(), bare.per_second())
            .note("the same without duplicate tracking");
        let bound = Row::new("3 bare forwarding actor (bound)", "in-proc", "cmd/s")
            .figures(forwarded.per_second(), bare.per_second())
            .note("any actor between caller and handler: two mailbox hops, no work");
        Ok(vec![row, no_key, bound])
    })
}

/// Requests through `bus.request`; `keyed` keeps their `request_id`.
async fn through_router(
    bus: &BusHandle,
    template: &RequestTemplate,
    keyed: bool,
    length: Duration,
) -> anyhow::Result<Throughput> {
    let mut run = Throughput::default();
    while run.elapsed < length {
        let mut requests = batch(template);
        if !keyed {
            requests
                .iter_mut()
                .for_each(|request| request.request_id = None);
        }
        let started = Instant::now();
        for request in requests {
            let reply = bus.request(request).await;
            anyhow::ensure!(reply.is_ok(), "the router answered {reply:?}");
        }
        run.elapsed += started.elapsed();
        run.completed += BATCH;
    }
    Ok(run)
}

async fn direct(
    handler: &Recipient<Command>,
    template: &RequestTemplate,
    length: Duration,
) -> anyhow::Result<Throughput> {
    let mut run = Throughput::default();
    while run.elapsed < length {
        let commands: Vec<Command> = batch(template)
            .into_iter()
            .map(|request| Command {
                name: ECHO_COMMAND.to_string(),
                request,
            })
            .collect();
        let started = Instant::now();
        for command in commands {
            handler
                .send(command)
                .await?
                .map_err(|err| anyhow::anyhow!("{err}"))?;
        }
        run.elapsed += started.elapsed();
        run.completed += BATCH;
    }
    Ok(run)
}

/// Sends each command on to `handler` and answers with its answer.
struct Forwarder {
    handler: Recipient<Command>,
}

impl Actor for Forwarder {
    type Context = Context<Self>;
}

impl Handler<Command> for Forwarder {
    type Result = ResponseFuture<Result<Value, HandlerError>>;

    fn handle(&mut self, command: Command, _: &mut Self::Context) -> Self::Result {
        let handler = self.handler.clone();
        Box::pin(async move {
            handler
                .send(command)
                .await
                .unwrap_or_else(|err| Err(HandlerError::failed(err.to_string())))
        })
    }
}
