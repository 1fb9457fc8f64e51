//! `DataService`: the data bus's commands, answered from a [`KlineStore`].
//!
//! | command | payload | result |
//! |---|---|---|
//! | `GET_KLINES` | [`SeriesRequest`] | bars, see below |
//! | `GET_SYMBOLS` | none | `{"symbols": [{"symbol", "intervals"}, ...]}` |
//! | `GET_TICKERS` | none | `{"tickers": [{"symbol", "interval", "time", "close"}, ...]}` |
//! | `GET_CACHE_STATUS` | none | `{"directory", "entries", "bars", "hits", "misses"}` |
//! | `CLEAR_CACHE` | none | `{"cleared": <series dropped>}` |
//! | `ping` | none | `"pong"` |
//! | `BACKFILL` | any | always the error `not_supported` |
//!
//! `GET_KLINES` takes `{"symbol": "EURUSD", "interval": "60", "limit": 100}`
//! (`limit` optional) and answers a list of bars oldest first, each
//! `{"time", "open", "high", "low", "close", "volume"}`: every bar of the
//! series, or with `limit` the most recent `limit` of them.
//!
//! This service is offline: it serves files and fetches nothing. So
//! `GET_TICKERS` answers locally with each symbol's last close from its
//! files (from the series whose last bar is latest, comparing times as text;
//! it reads, and so caches, every series), and `BACKFILL` is refused with
//! code [`NOT_SUPPORTED`] and a message saying where files go instead.
//!
//! Errors: `bad_request` for a malformed payload, `not_found` for a symbol and
//! interval without a file (the message lists what exists), `handler_failed`
//! for an unreadable or malformed file (the message names file and line),
//! `unknown_command` for a name outside the table.

use std::sync::Arc;

use actix::prelude::*;
use dgbit_bus::message::{Command, HandlerError};
use dgbit_bus::wire::code;
use serde_json::{json, Value};

use crate::klines::{Bar, KlineStore};
use crate::payload::SeriesRequest;
use crate::status::ServedCounters;

/// The error code of a command this offline service cannot carry out.
pub const NOT_SUPPORTED: &str = "not_supported";

/// The command names [`DataService`] answers.
pub mod commands {
    /// Bars of one series.
    pub const GET_KLINES: &str = "GET_KLINES";
    /// The symbols and intervals on file.
    pub const GET_SYMBOLS: &str = "GET_SYMBOLS";
    /// The last close of each symbol.
    pub const GET_TICKERS: &str = "GET_TICKERS";
    /// Fetch history from an exchange: refused offline.
    pub const BACKFILL: &str = "BACKFILL";
    /// The cache's contents and counters.
    pub const GET_CACHE_STATUS: &str = "GET_CACHE_STATUS";
    /// Drop every cached series.
    pub const CLEAR_CACHE: &str = "CLEAR_CACHE";
    /// Liveness check.
    pub const PING: &str = "ping";

    /// Every name above, to register the service under each.
    pub const ALL: [&str; 7] = [
        GET_KLINES,
        GET_SYMBOLS,
        GET_TICKERS,
        BACKFILL,
        GET_CACHE_STATUS,
        CLEAR_CACHE,
        PING,
    ];
}

/// The data bus's handler actor. See the module docs for its commands.
///
/// Every command is answered synchronously from memory or local files, so
/// the actor runs on an ordinary arbiter.
#[derive(Debug)]
pub struct DataService {
    store: Arc<KlineStore>,
    counters: ServedCounters,
}

impl DataService {
    /// A service over `store`, with its own served counters.
    pub fn new(store: Arc<KlineStore>) -> Self {
        Self {
            store,
            counters: ServedCounters::new(),
        }
    }

    /// Count served commands in `counters` (shared with a `StatusActor`).
    pub fn with_counters(mut self, counters: ServedCounters) -> Self {
        self.counters = counters;
        self
    }

    fn dispatch(&self, command: &Command) -> Result<Value, HandlerError> {
        match command.name.as_str() {
            commands::GET_KLINES => self.klines(command),
            commands::GET_SYMBOLS => self.symbols(),
            commands::GET_TICKERS => self.tickers(),
            commands::BACKFILL => Err(self.backfill_refusal()),
            commands::GET_CACHE_STATUS => Ok(self.cache_status()),
            commands::CLEAR_CACHE => Ok(json!({"cleared": self.store.clear_cache()})),
            commands::PING => Ok(json!("pong")),
            other => Err(HandlerError::new(
                code::UNKNOWN_COMMAND,
                format!(
                    "the data service has no command {other:?}; it knows {:?}",
                    commands::ALL
                ),
            )),
        }
    }

    fn klines(&self, command: &Command) -> Result<Value, HandlerError> {
        let request = SeriesRequest::from_payload(&command.request.payload)?;
        let bars = self.store.series(&request.symbol, &request.interval)?;
        serde_json::to_value(request.select(&bars)).map_err(serialise_error)
    }

    fn symbols(&self) -> Result<Value, HandlerError> {
        let symbols: Vec<Value> = self
            .store
            .catalog()?
            .into_iter()
            .map(|(symbol, intervals)| json!({"symbol": symbol, "intervals": intervals}))
            .collect();
        Ok(json!({ "symbols": symbols }))
    }

    fn tickers(&self) -> Result<Value, HandlerError> {
        let mut tickers = Vec::new();
        for (symbol, intervals) in self.store.catalog()? {
            let mut latest: Option<(String, Bar)> = None;
            for interval in intervals {
                let Some(last) = self.store.series(&symbol, &interval)?.last().cloned() else {
                    continue;
                };
                if latest.as_ref().is_none_or(|(_, bar)| last.time > bar.time) {
                    latest = Some((interval, last));
                }
            }
            if let Some((interval, bar)) = latest {
                tickers.push(json!({
                    "symbol": symbol, "interval": interval, "time": bar.time, "close": bar.close,
                }));
            }
        }
        Ok(json!({ "tickers": tickers }))
    }

    fn backfill_refusal(&self) -> HandlerError {
        let directory = self.store.dir().display();
        HandlerError::new(
            NOT_SUPPORTED,
            format!(
                "BACKFILL is not supported offline: this data service fetches nothing and only \
                 serves <SYMBOL>_<INTERVAL>.csv files from {directory}; add the file there instead"
            ),
        )
    }

    fn cache_status(&self) -> Value {
        let status = self.store.cache_status();
        json!({
            "directory": self.store.dir().display().to_string(),
            "entries": status.entries,
            "bars": status.bars,
            "hits": status.hits,
            "misses": status.misses,
        })
    }
}

fn serialise_error(err: serde_json::Error) -> HandlerError {
    HandlerError::failed(format!("cannot serialise the bars: {err}"))
}

impl Actor for DataService {
    type Context = Context<Self>;
}

impl Handler<Command> for DataService {
    type Result = Result<Value, HandlerError>;

    fn handle(&mut self, command: Command, _ctx: &mut Self::Context) -> Self::Result {
        self.counters.record_command(&command.name);
        let outcome = self.dispatch(&command);
        match &outcome {
            Ok(_) => tracing::debug!(command = %command.name, "data command served"),
            // A broken file is the operator's problem; a bad request the caller's.
            Err(err) if err.code == code::HANDLER_FAILED => {
                tracing::warn!(command = %command.name, error = %err.message, "data command failed")
            }
            Err(err) => {
                tracing::debug!(command = %command.name, code = %err.code, "data command refused")
            }
        }
        outcome
    }
}
