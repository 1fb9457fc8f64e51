//! Supervision: a handler that panics is restarted on a backoff schedule,
//! while the rest of the bus keeps serving.
//!
//! `cargo run --example supervision`
//!
//! The handler, `RiskCheck`, serves `risk_check`: how many units of a
//! symbol fit under a fixed exposure limit, given the order's quantity. It
//! has a real bug: it divides by the quantity in integer arithmetic, so a
//! quantity of 0 panics ("attempt to divide by zero"; the panic message on
//! stderr is expected).
//!
//! It runs under a supervisor with its own schedule, 200 ms doubling up to
//! 2 s, with ±10% jitter, at most 5 restarts a minute (see
//! `dgbit_bus::backoff` for the exact rule), that publishes each restart as
//! `system.alert`. The example:
//!
//! 1. sends a good request: answered;
//! 2. sends quantity 0: the handler panics, the caller gets
//!    `handler_failed`;
//! 3. at once sends a good request: `handler_failed` again, "restarting";
//!    while `ping` on the same bus is answered as usual;
//! 4. reads the `system.alert` (attempt, `delay_ms`) and polls until the
//!    handler answers again, measuring the gap;
//! 5. crashes it a second time: the next delay is twice the first, give or
//!    take the jitter.

#[path = "support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use dgbit_bus::backoff::{BackoffPolicy, RestartBudget};
use dgbit_bus::bus::{Bus, BusHandle};
use dgbit_bus::client::{BusClient, ClientOptions};
use dgbit_bus::config::BusConfig;
use dgbit_bus::message::{Command, HandlerError};
use dgbit_bus::supervisor::{supervise, SupervisedRole, SupervisorOptions};
use dgbit_bus::wire::{CommandReply, Event};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The command, and the supervised role's name.
const RISK_CHECK: &str = "risk_check";

/// The exposure limit, in cents.
const EXPOSURE_LIMIT_CENTS: u64 = 5_000_000;

/// How long a wait of this example may take.
const WAIT_LIMIT: Duration = Duration::from_secs(10);

/// The handler's restart schedule.
fn policy() -> BackoffPolicy {
    BackoffPolicy {
        base: Duration::from_millis(200),
        factor: 2.0,
        cap: Duration::from_secs(2),
        jitter: 0.1,
        reset_after: Duration::from_secs(60),
        budget: RestartBudget {
            max_restarts: 5,
            window: Duration::from_secs(60),
        },
    }
}

/// Serves `risk_check`, with a division bug.
#[derive(Default)]
struct RiskCheck;

impl Actor for RiskCheck {
    type Context = Context<Self>;
}

impl Handler<Command> for RiskCheck {
    type Result = Result<Value, HandlerError>;

    fn handle(&mut self, command: Command, _ctx: &mut Self::Context) -> Self::Result {
        let payload = &command.request.payload;
        let quantity = payload
            .get("quantity")
            .and_then(Value::as_u64)
            .ok_or_else(|| HandlerError::bad_request("`quantity` must be a whole number"))?;
        let price_cents = payload
            .get("price_cents")
            .and_then(Value::as_u64)
            .unwrap_or(1);
        // The bug: quantity 0 divides by zero and panics.
        let budget_per_unit = EXPOSURE_LIMIT_CENTS / quantity;
        Ok(
            json!({"approved": price_cents <= budget_per_unit, "budget_per_unit_cents": budget_per_unit}),
        )
    }
}

/// One crash and the recovery after it.
#[derive(Debug, Clone)]
pub struct Recovery {
    /// The reply to the request that crashed the handler.
    pub crash_reply: Value,
    /// The reply to a good request sent right after.
    pub during_restart: Value,
    /// The reply to `ping` sent during the restart.
    pub ping_during_restart: Value,
    /// The `system.alert` data of the restart.
    pub alert: Value,
    /// From the crash reply to the first good answer.
    pub gap: Duration,
}

/// What the run showed.
#[derive(Debug, Clone)]
pub struct Report {
    pub first_answer: Value,
    pub recoveries: Vec<Recovery>,
    /// The supervisor's counters at the end.
    pub supervision: Value,
}

fn main() -> anyhow::Result<()> {
    support::init_tracing();
    // The panics are the point of this example: one line each, no backtrace.
    std::panic::set_hook(Box::new(|info| eprintln!("panic (on purpose): {info}")));
    actix::System::new().block_on(async { run().await.map(|_| ()) })
}

/// Crash the handler twice and watch it come back each time.
///
/// # Errors
///
/// When the bus cannot start, or the handler does not come back within
/// 10 s.
pub async fn run() -> anyhow::Result<Report> {
    let (_dir, addresses) = support::temp_addresses()?;
    let bus = Bus::builder(BusConfig::default().addresses(addresses.clone())).start()?;
    let role = supervise_risk_check(&bus);
    anyhow::ensure!(
        bus.wait_for_edges(Duration::from_secs(5)).await,
        "the bus's sockets did not open"
    );
    let mut alerts = support::tap(&bus, "system.alert")?;
    let client = BusClient::connect(&addresses.command, ClientOptions::default()).await?;
    let policy = policy();
    println!(
        "risk_check supervised: restart after {} ms, x{} per attempt, at most {} ms, jitter ±{}%",
        policy.base.as_millis(),
        policy.factor,
        policy.cap.as_millis(),
        policy.jitter * 100.0
    );
    println!();

    let outcome = crash_twice(&client, &mut alerts).await;
    let supervision = role.health();
    bus.shutdown().await;
    role.shutdown();

    let (first_answer, recoveries) = outcome?;
    println!(
        "supervisor: {} instances started, {} restarts, last delay {} ms",
        supervision["instances"], supervision["restarts"], supervision["last_delay_ms"]
    );
    Ok(Report {
        first_answer,
        recoveries,
        supervision,
    })
}

/// Run `RiskCheck` under its own supervisor, publishing restarts into the
/// bus, and route `risk_check` to whichever instance is live.
///
/// `BusBuilder::supervised_command` does the routing too, but hands back no
/// handle and publishes no alerts; this example wants both.
fn supervise_risk_check(bus: &BusHandle) -> SupervisedRole<RiskCheck> {
    let options = SupervisorOptions::new()
        .alerts(bus.events())
        .source("supervision-example");
    let role = supervise(RISK_CHECK, policy(), RiskCheck::default, options);
    let live = role.clone();
    bus.command_routes().register_resolver(
        RISK_CHECK,
        Arc::new(move || live.addr().map(Addr::recipient)),
    );
    role
}

async fn crash_twice(
    client: &BusClient,
    alerts: &mut mpsc::UnboundedReceiver<Arc<Event>>,
) -> anyhow::Result<(Value, Vec<Recovery>)> {
    let good = json!({"symbol": "EURUSD", "quantity": 100_000, "price_cents": 108});
    let first_answer = ask(client, RISK_CHECK, &good).await?;
    println!("risk_check quantity 100000 -> {first_answer}");
    println!();

    let mut recoveries = Vec::new();
    for round in 1..=2 {
        println!("crash {round}:");
        recoveries.push(crash_and_recover(client, alerts, &good).await?);
        println!();
    }
    Ok((first_answer, recoveries))
}

async fn crash_and_recover(
    client: &BusClient,
    alerts: &mut mpsc::UnboundedReceiver<Arc<Event>>,
    good: &Value,
) -> anyhow::Result<Recovery> {
    let poison = json!({"symbol": "EURUSD", "quantity": 0});
    let crash_reply = ask(client, RISK_CHECK, &poison).await?;
    let crashed_at = Instant::now();
    println!("  risk_check quantity 0      -> {crash_reply}");
    let during_restart = ask(client, RISK_CHECK, good).await?;
    println!("  risk_check right after     -> {during_restart}");
    let ping_during_restart = ask(client, "ping", &json!({})).await?;
    println!("  ping meanwhile             -> {ping_during_restart}");

    let deadline = Instant::now() + WAIT_LIMIT;
    let alert = support::next_matching(alerts, deadline, |event| {
        support::data_str(event, "role") == RISK_CHECK
    })
    .await
    .ok_or_else(|| anyhow::anyhow!("no system.alert within {WAIT_LIMIT:?}"))?;
    let alert = Value::Object(alert.data.clone());
    println!(
        "  system.alert: attempt {}, restart delay {} ms, reason {}",
        alert["attempt"], alert["delay_ms"], alert["reason"]
    );

    loop {
        let reply = ask(client, RISK_CHECK, good).await?;
        if reply["status"] == "ok" {
            let gap = crashed_at.elapsed();
            println!(
                "  serving again {} after the crash reply -> {reply}",
                support::millis(gap)
            );
            return Ok(Recovery {
                crash_reply,
                during_restart,
                ping_during_restart,
                alert,
                gap,
            });
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "risk_check did not come back within {WAIT_LIMIT:?}"
        );
        actix::clock::sleep(Duration::from_millis(10)).await;
    }
}

/// Send `command` with `payload` and return the reply as JSON, ok or not.
async fn ask(client: &BusClient, command: &str, payload: &Value) -> anyhow::Result<Value> {
    let reply: CommandReply = client
        .send_json(&json!({"command": command, "payload": payload}))
        .await?;
    Ok(reply.to_value())
}
