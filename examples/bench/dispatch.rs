//! Workload 3: in-process command dispatch, no socket.
//!
//! One caller awaits one command at a time, on the actix system that runs
//! the bus: through the router (`BusHandle::request`: decode-free, but with
//! duplicate tracking, the handler timeout and the reply built) against a
//! bare `Addr::send` of the same `Command` to the same handler actor.

use std::time::{Duration, Instant};

use actix::prelude::*;
use dgbit_bus::bus::{Bus, BusHandle};
use dgbit_bus::config::BusConfig;
use dgbit_bus::message::Command;
use dgbit_bus::router::FnHandler;

use crate::raw::Throughput;
use crate::server::{echo_handler, EchoFn};
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

        let mut routed = Throughput::default();
        let mut bare = Throughput::default();
        for round in 0..=budget.rounds {
            let length = if round == 0 {
                Duration::from_millis(100)
            } else {
                budget.round
            };
            let through_bus = through_router(&bus, &template, length).await?;
            let direct = direct(&handler, &template, length).await?;
            if round > 0 {
                routed.add(through_bus);
                bare.add(direct);
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
        Ok(vec![row])
    })
}

async fn through_router(
    bus: &BusHandle,
    template: &RequestTemplate,
    length: Duration,
) -> anyhow::Result<Throughput> {
    let mut run = Throughput::default();
    while run.elapsed < length {
        let requests = batch(template);
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
    handler: &Addr<FnHandler<EchoFn>>,
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
