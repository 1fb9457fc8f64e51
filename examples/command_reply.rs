//! Command and reply: a handler actor on the command bus, a `BusClient`
//! calling it over NNG, and every kind of reply a caller can get.
//!
//! `cargo run --example command_reply`
//!
//! The handler, `PositionSizer`, serves `position_size`: how many units to
//! buy so that being stopped out loses `risk` of the equity,
//! `floor(equity * risk / |entry - stop|)`. It refuses a malformed payload
//! with `bad_request` and a risk above 2% with a code of its own,
//! `risk_limit`. A second handler, `slow_quote`, takes longer than the bus's
//! handler timeout (200 ms here) on purpose.
//!
//! The client then sends, one after another: a good request; a request
//! with no `command` (the bus's default route, set to `position_size`
//! here); a bad payload; a risk over the limit; a misspelt command; bytes
//! that are not JSON; the slow command; and the same `job_uuid` twice, which
//! runs the handler once and answers both with the first reply.

#[path = "support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use dgbit_bus::bus::Bus;
use dgbit_bus::client::{BusClient, ClientOptions};
use dgbit_bus::config::BusConfig;
use dgbit_bus::message::{Command, HandlerError};
use dgbit_bus::wire::{CommandReply, CommandRequest};
use serde_json::{json, Value};

/// The most of its equity a position may risk.
const MAX_RISK: f64 = 0.02;

/// How long the bus lets a handler run before answering `timeout`.
const HANDLER_TIMEOUT: Duration = Duration::from_millis(200);

/// How long `slow_quote` takes: longer than [`HANDLER_TIMEOUT`].
const SLOW_QUOTE_TIME: Duration = Duration::from_millis(500);

/// Serves `position_size` and counts the requests it handled.
struct PositionSizer {
    runs: Arc<AtomicU64>,
}

impl Actor for PositionSizer {
    type Context = Context<Self>;
}

impl Handler<Command> for PositionSizer {
    type Result = Result<Value, HandlerError>;

    fn handle(&mut self, command: Command, _ctx: &mut Self::Context) -> Self::Result {
        self.runs.fetch_add(1, Ordering::Relaxed);
        let payload = &command.request.payload;
        let field = |key: &str| {
            payload.get(key).and_then(Value::as_f64).ok_or_else(|| {
                HandlerError::bad_request(format!("payload field `{key}` must be a number"))
            })
        };
        let (equity, risk, entry, stop) = (
            field("equity")?,
            field("risk")?,
            field("entry")?,
            field("stop")?,
        );
        if risk > MAX_RISK {
            let text = format!("risk {risk} is over the limit of {MAX_RISK}");
            return Err(HandlerError::new("risk_limit", text));
        }
        let distance = (entry - stop).abs();
        if distance == 0.0 {
            return Err(HandlerError::bad_request("`entry` and `stop` must differ"));
        }
        let units = (equity * risk / distance).floor();
        Ok(json!({"units": units, "at_risk": units * distance}))
    }
}

/// Serves `slow_quote`, too slowly.
struct SlowQuote;

impl Actor for SlowQuote {
    type Context = Context<Self>;
}

impl Handler<Command> for SlowQuote {
    type Result = ResponseFuture<Result<Value, HandlerError>>;

    fn handle(&mut self, _command: Command, _ctx: &mut Self::Context) -> Self::Result {
        Box::pin(async {
            actix::clock::sleep(SLOW_QUOTE_TIME).await;
            Ok(json!({"bid": 1.0842}))
        })
    }
}

/// One request and the reply it got.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub case: &'static str,
    pub reply: Value,
}

/// What the run showed.
#[derive(Debug, Clone)]
pub struct Report {
    pub exchanges: Vec<Exchange>,
    /// How many times `position_size` actually ran.
    pub sizer_runs: u64,
}

impl Report {
    /// The reply of `case`.
    pub fn reply(&self, case: &str) -> &Value {
        self.exchanges
            .iter()
            .find(|exchange| exchange.case == case)
            .map(|exchange| &exchange.reply)
            .unwrap_or(&Value::Null)
    }
}

fn main() -> anyhow::Result<()> {
    support::init_tracing();
    actix::System::new().block_on(async { run().await.map(|_| ()) })
}

/// Start a bus with the two handlers, send every case, print each reply.
///
/// # Errors
///
/// When the bus cannot start or the client cannot reach it.
pub async fn run() -> anyhow::Result<Report> {
    let (_dir, addresses) = support::temp_addresses()?;
    let runs = Arc::new(AtomicU64::new(0));
    let sizer = PositionSizer { runs: runs.clone() }.start();
    let config = BusConfig::default()
        .addresses(addresses.clone())
        .handler_timeout(HANDLER_TIMEOUT)
        .default_command(Some("position_size".into()));
    let bus = Bus::builder(config)
        .command("position_size", sizer.recipient())
        .command("slow_quote", SlowQuote.start().recipient())
        .start()?;
    anyhow::ensure!(
        bus.wait_for_edges(Duration::from_secs(5)).await,
        "the bus's sockets did not open"
    );
    println!("command bus at {}", addresses.command);
    println!();

    let client = BusClient::connect(&addresses.command, ClientOptions::default()).await?;
    let exchanges = send_every_case(&client).await;
    bus.shutdown().await;

    let exchanges = exchanges?;
    let sizer_runs = runs.load(Ordering::Relaxed);
    println!();
    println!("position_size ran {sizer_runs} times for the requests that reached it");
    println!("(the duplicate job_uuid was answered from the first reply, not run again)");
    Ok(Report {
        exchanges,
        sizer_runs,
    })
}

async fn send_every_case(client: &BusClient) -> anyhow::Result<Vec<Exchange>> {
    let good = json!({"equity": 10000.0, "risk": 0.01, "entry": 250.0, "stop": 245.0});
    let cases: Vec<(&'static str, Value)> = vec![
        ("ok", json!({"command": "position_size", "payload": good})),
        (
            "default_route",
            json!({"job_uuid": "size-1", "payload": good}),
        ),
        (
            "bad_payload",
            json!({"command": "position_size", "payload": {"equity": "all of it"}}),
        ),
        (
            "own_code",
            json!({"command": "position_size", "request_id": "r-9",
                   "payload": {"equity": 10000.0, "risk": 0.05, "entry": 1.0, "stop": 0.9}}),
        ),
        (
            "unknown_command",
            json!({"command": "position_sise", "payload": good}),
        ),
        ("slow", json!({"command": "slow_quote"})),
        (
            "first_of_two",
            json!({"command": "position_size", "job_uuid": "dup-1", "payload": good}),
        ),
        (
            "second_of_two",
            json!({"command": "position_size", "job_uuid": "dup-1", "payload": good}),
        ),
    ];

    let mut exchanges = Vec::new();
    for (case, body) in cases {
        let reply = client.send_json(&body).await?;
        exchanges.push(show(case, &body.to_string(), reply));
    }
    let not_json = b"size me, please";
    let reply = CommandReply::decode(&client.send_raw(not_json).await?)?;
    exchanges.push(show("not_json", "size me, please", reply));
    let ping = client
        .request(&CommandRequest::new("ping", json!({})))
        .await?;
    exchanges.push(show("builtin_ping", r#"{"command":"ping"}"#, ping));
    Ok(exchanges)
}

fn show(case: &'static str, sent: &str, reply: CommandReply) -> Exchange {
    let reply = reply.to_value();
    println!("{case}");
    println!("  sent  {sent}");
    println!("  reply {reply}");
    Exchange { case, reply }
}
