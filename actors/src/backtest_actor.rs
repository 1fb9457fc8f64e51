//! `BacktestActor`: runs the [`crate::backtest`] strategy for a
//! command (`run_backtest`) or a job of type `run_backtest`.
//!
//! # Payload
//!
//! `{"symbol": "EURUSD", "interval": "60", "limit": 1000}` as in dgbit's seed
//! (see [`SeriesRequest`]), plus optional strategy overrides: `fast` and
//! `slow` (positive integers, moving-average lengths), `fee` (fraction per
//! side, `0.001` = 0.1%) and `initial_capital` (number). Defaults are in
//! [`StrategyParams::default`].
//!
//! # Result
//!
//! `{"symbol", "interval", "strategy": {"name": "sma_crossover", "fast",
//! "slow", "fee"}, "first_bar_time", "last_bar_time", "bars", "total_trades",
//! "wins", "win_rate", "net_return", "max_drawdown", "initial_capital",
//! "final_equity", "trades": [{"entry_time", "entry_price", "exit_time",
//! "exit_price", "return", "exit_reason"}, ...]}`. The bar times are null
//! when no bar was selected.
//!
//! # Events
//!
//! While it runs, the actor publishes through its [`EventSink`]
//! `trade.entered` with data `{"job_id", "symbol", "interval", "side":
//! "long", "price", "time"}` and `trade.exited` with the same keys plus
//! `"entry_price", "entry_time", "return", "reason"`. `job_id` is the job's
//! id, or the command's `job_uuid` (else its `request_id`, else null); when
//! there is one it is also the events' `correlation_id`. A job also reports
//! progress once per quarter of the bars: `{"percent", "bars_done",
//! "bars_total"}`.
//!
//! # Where it runs
//!
//! The backtest is CPU work done synchronously inside the handler. That is
//! fine here: 5000 bars take milliseconds. A handler that computes for
//! seconds would stall every other actor on its arbiter; such work belongs in
//! an actor with a `SyncContext`, started on its own threads with
//! `SyncArbiter::start`.

use std::sync::Arc;

use actix::prelude::*;
use dgbit_bus::message::{Command, EventSink, HandlerError, ProgressReporter, RunJob};
use dgbit_bus::wire::Event;
use serde_json::{json, Map, Value};

use crate::backtest::{self, BacktestReport, BacktestStep, StrategyParams, Trade};
use crate::klines::{Bar, KlineStore};
use crate::payload::{self, Payload, SeriesRequest};
use crate::status::ServedCounters;

/// The command name and job type this actor is meant to be registered for.
pub const RUN_BACKTEST: &str = "run_backtest";
/// The `source` of the events the actor publishes, unless changed.
pub const EVENT_SOURCE: &str = "backtest";
/// The strategy's name in results.
const STRATEGY_NAME: &str = "sma_crossover";

/// Runs backtests over a shared [`KlineStore`] and publishes trade events.
///
/// It treats every command and every job it receives as a backtest request,
/// whatever the name or type: register it only under `run_backtest`.
#[derive(Debug)]
pub struct BacktestActor {
    store: Arc<KlineStore>,
    events: EventSink,
    source: String,
    counters: ServedCounters,
}

impl BacktestActor {
    /// A backtester reading bars from `store` and publishing to `events`
    /// (use [`EventSink::discard`] to publish nothing).
    pub fn new(store: Arc<KlineStore>, events: EventSink) -> Self {
        Self {
            store,
            events,
            source: EVENT_SOURCE.to_string(),
            counters: ServedCounters::new(),
        }
    }

    /// Publish events with `source` instead of [`EVENT_SOURCE`].
    pub fn with_source(mut self, source: impl Into<String>) -> Self {
        self.source = source.into();
        self
    }

    /// Count served commands and jobs in `counters` (shared with a
    /// `StatusActor`).
    pub fn with_counters(mut self, counters: ServedCounters) -> Self {
        self.counters = counters;
        self
    }

    fn run(
        &self,
        job_id: Option<&str>,
        payload: &Payload,
        progress: &ProgressReporter,
    ) -> Result<Value, HandlerError> {
        let request = BacktestRequest::from_payload(payload)?;
        let series = self
            .store
            .series(&request.series.symbol, &request.series.interval)?;
        let bars = request.series.select(&series);

        let trades = TradeEvents {
            actor: self,
            job_id,
            series: &request.series,
        };
        let report = backtest::run_observed(bars, &request.params, &mut |step| match step {
            BacktestStep::Entered { bar } => trades.entered(bar),
            BacktestStep::Exited { trade } => trades.exited(trade),
            BacktestStep::Progress {
                percent,
                bars_done,
                bars_total,
            } => progress.report(json!({
                "percent": percent, "bars_done": bars_done, "bars_total": bars_total,
            })),
        })
        .map_err(|err| HandlerError::bad_request(err.to_string()))?;

        log_finished(job_id, &request.series, &report);
        result(&request, bars, report)
    }
}

/// A backtest payload, read and checked.
#[derive(Debug)]
struct BacktestRequest {
    series: SeriesRequest,
    params: StrategyParams,
}

impl BacktestRequest {
    fn from_payload(payload: &Payload) -> Result<Self, HandlerError> {
        let series = SeriesRequest::from_payload(payload)?;
        let defaults = StrategyParams::default();
        let params = StrategyParams {
            fast: payload::positive_integer(payload, "fast")?.unwrap_or(defaults.fast),
            slow: payload::positive_integer(payload, "slow")?.unwrap_or(defaults.slow),
            fee: payload::number(payload, "fee")?.unwrap_or(defaults.fee),
            initial_capital: payload::number(payload, "initial_capital")?
                .unwrap_or(defaults.initial_capital),
        };
        params
            .validate()
            .map_err(|err| HandlerError::bad_request(err.to_string()))?;
        Ok(Self { series, params })
    }
}

fn result(
    request: &BacktestRequest,
    bars: &[Bar],
    report: BacktestReport,
) -> Result<Value, HandlerError> {
    let params = &request.params;
    let mut result = json!({
        "symbol": request.series.symbol.to_ascii_uppercase(),
        "interval": request.series.interval,
        "strategy": {
            "name": STRATEGY_NAME, "fast": params.fast, "slow": params.slow, "fee": params.fee,
        },
        "first_bar_time": bars.first().map(|bar| bar.time.as_str()),
        "last_bar_time": bars.last().map(|bar| bar.time.as_str()),
    });
    let figures = serde_json::to_value(report)
        .map_err(|err| HandlerError::failed(format!("cannot serialise the report: {err}")))?;
    if let (Some(result), Value::Object(figures)) = (result.as_object_mut(), figures) {
        result.extend(figures);
    }
    Ok(result)
}

/// Publishes the trade events of one run.
struct TradeEvents<'a> {
    actor: &'a BacktestActor,
    job_id: Option<&'a str>,
    series: &'a SeriesRequest,
}

impl TradeEvents<'_> {
    fn entered(&self, bar: &Bar) {
        let data = self.data(bar.close, &bar.time);
        self.publish("trade.entered", data);
    }

    fn exited(&self, trade: &Trade) {
        let mut data = self.data(trade.exit_price, &trade.exit_time);
        data.insert("entry_price".into(), json!(trade.entry_price));
        data.insert("entry_time".into(), json!(trade.entry_time));
        data.insert("return".into(), json!(trade.net_return));
        data.insert("reason".into(), json!(trade.exit_reason));
        self.publish("trade.exited", data);
    }

    fn data(&self, price: f64, time: &str) -> Map<String, Value> {
        let mut data = Map::new();
        data.insert("job_id".into(), json!(self.job_id));
        data.insert(
            "symbol".into(),
            json!(self.series.symbol.to_ascii_uppercase()),
        );
        data.insert("interval".into(), json!(self.series.interval));
        data.insert("side".into(), json!("long"));
        data.insert("price".into(), json!(price));
        data.insert("time".into(), json!(time));
        data
    }

    fn publish(&self, topic: &str, data: Map<String, Value>) {
        let event = Event::new(topic, &self.actor.source, Value::Object(data));
        let event = match self.job_id {
            Some(id) => event.with_correlation_id(id),
            None => event,
        };
        self.actor.events.publish(event);
    }
}

impl Actor for BacktestActor {
    type Context = Context<Self>;
}

impl Handler<Command> for BacktestActor {
    type Result = Result<Value, HandlerError>;

    fn handle(&mut self, command: Command, _ctx: &mut Self::Context) -> Self::Result {
        self.counters.record_command(&command.name);
        let job_id = command.request.dedup_key();
        let outcome = self.run(
            job_id,
            &command.request.payload,
            &ProgressReporter::discard(),
        );
        log_refusal(job_id, &outcome);
        outcome
    }
}

impl Handler<RunJob> for BacktestActor {
    type Result = Result<Value, HandlerError>;

    fn handle(&mut self, run: RunJob, _ctx: &mut Self::Context) -> Self::Result {
        self.counters.record_job(&run.job.job_type);
        let job_id = Some(run.job.job_id.as_str());
        let outcome = self.run(job_id, &run.job.payload, &run.progress);
        log_refusal(job_id, &outcome);
        outcome
    }
}

fn log_finished(job_id: Option<&str>, series: &SeriesRequest, report: &BacktestReport) {
    tracing::info!(
        job_id = job_id.unwrap_or("-"),
        symbol = %series.symbol,
        interval = %series.interval,
        bars = report.bars,
        trades = report.total_trades,
        net_return = report.net_return,
        "backtest finished"
    );
}

fn log_refusal(job_id: Option<&str>, outcome: &Result<Value, HandlerError>) {
    if let Err(err) = outcome {
        tracing::debug!(
            job_id = job_id.unwrap_or("-"),
            code = %err.code,
            error = %err.message,
            "backtest refused"
        );
    }
}
