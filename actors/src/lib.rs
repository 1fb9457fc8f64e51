//! dgbit-actors: ready-made handler actors for the dgbit trading domain, and
//! the worked example of custom handlers registered on a dgbit-bus.
//!
//! # Modules
//!
//! - [`klines`]: [`KlineStore`], bars read from `<SYMBOL>_<INTERVAL>.csv`
//!   files and cached in memory; the crate's fixtures live in
//!   `fixtures/klines/`.
//! - [`payload`]: reading command and job payloads into checked values.
//! - [`backtest`]: the moving-average crossover strategy as a pure function,
//!   no actors involved.
//! - One file per actor: [`data_service`] ([`DataService`], the data bus's
//!   commands), [`backtest_actor`] ([`BacktestActor`], `run_backtest` as a
//!   command and as a job), [`status`] ([`StatusActor`], the `status`
//!   command, and the [`ServedCounters`] the actors share).
//!
//! The crate uses only dgbit-bus's `message` and `wire` modules: each actor
//! handles the bus's typed messages and never sees a socket, so each can be
//! tested with a bare actix system (see `tests/`).
//!
//! # The life of one backtest
//!
//! A `run_backtest` command reaches the [`BacktestActor`] as a
//! [`Command`]. The actor reads the payload, takes the bars from the shared
//! [`KlineStore`] (parsed from file on the first request, from memory after),
//! keeps the most recent `limit` of them and runs [`backtest::run_observed`].
//! Each entry and exit becomes a `trade.entered` or `trade.exited` event on
//! the actor's [`EventSink`] as it happens; the report is the handler's
//! result, which the bus turns into the reply. A `run_backtest` job takes the
//! same path and also reports progress through its [`RunJob`] reporter.
//!
//! # Registering
//!
//! [`data_handlers`], [`command_handlers`] and [`job_handlers`] start the
//! actors and return `(name, recipient)` pairs to register on the bus.

#![warn(missing_docs)]

use std::sync::Arc;

use actix::prelude::*;
use dgbit_bus::message::{Command, EventSink, RunJob};

pub mod backtest;
pub mod backtest_actor;
pub mod data_service;
pub mod klines;
pub mod payload;
pub mod status;

pub use backtest_actor::{BacktestActor, RUN_BACKTEST};
pub use data_service::DataService;
pub use klines::{Bar, CacheStatus, KlineError, KlineStore};
pub use status::{ServedCounters, StatusActor, STATUS};

/// Start a [`DataService`] over `store` and return its recipient under each
/// data bus command name (`GET_KLINES`, `GET_SYMBOLS`, `GET_TICKERS`,
/// `BACKFILL`, `GET_CACHE_STATUS`, `CLEAR_CACHE`, `ping`).
///
/// # Panics
///
/// When called outside a running actix system, as starting any actor does.
pub fn data_handlers(
    store: Arc<KlineStore>,
    counters: ServedCounters,
) -> Vec<(&'static str, Recipient<Command>)> {
    let service = DataService::new(store).with_counters(counters).start();
    data_service::commands::ALL
        .iter()
        .map(|&name| (name, service.clone().recipient()))
        .collect()
}

/// Start a [`BacktestActor`] and a [`StatusActor`] (named `worker`) and
/// return them under `run_backtest` and `status`, for the command bus.
///
/// The bus may have a built-in `status` of its own; register this one under
/// another name where both are wanted.
///
/// # Panics
///
/// When called outside a running actix system, as starting any actor does.
pub fn command_handlers(
    store: Arc<KlineStore>,
    events: EventSink,
    worker: impl Into<String>,
    counters: ServedCounters,
) -> Vec<(&'static str, Recipient<Command>)> {
    let backtest = BacktestActor::new(store, events)
        .with_counters(counters.clone())
        .start();
    let status = StatusActor::new(worker).with_counters(counters).start();
    vec![
        (RUN_BACKTEST, backtest.recipient()),
        (STATUS, status.recipient()),
    ]
}

/// Start a [`BacktestActor`] and return it under the job type `run_backtest`.
/// It is a separate actor from [`command_handlers`]'s, so jobs and commands
/// do not queue behind each other's mailbox.
///
/// # Panics
///
/// When called outside a running actix system, as starting any actor does.
pub fn job_handlers(
    store: Arc<KlineStore>,
    events: EventSink,
    counters: ServedCounters,
) -> Vec<(&'static str, Recipient<RunJob>)> {
    let backtest = BacktestActor::new(store, events)
        .with_counters(counters)
        .start();
    vec![(RUN_BACKTEST, backtest.recipient())]
}
