//! The bus's own commands: `ping`, `echo` and `status` on both buses.
//!
//! `ping` answers `{"pong": true, "time": ...}`; `echo` answers
//! `{"echo": <the payload>}` (for checking a peer's framing and sizes). `status` answers the
//! bus's identity, uptime and the counters of every role, each asked with a
//! [`StatsQuery`]; a role that does not answer within a second shows as
//! `{"error": "no answer: <why>"}` instead of its counters.
//!
//! Given an event sink, the same report is published as `system.health`
//! every health interval.
//!
//! [`BuiltinJobs`] is the job handler of `dgbit-bus work`: job types `noop`,
//! `echo`, `sleep` and `fail`, for trying a queue out and for benchmarks.

use std::time::{Duration, Instant};

use actix::prelude::*;
use serde_json::{json, Map, Value};

use crate::message::{Command, EventSink, HandlerError, RunJob, StatsQuery};
use crate::topics::SYSTEM_HEALTH;
use crate::wire::{now_rfc3339, Event};

/// How long `status` waits for one role's counters.
const STATS_ANSWER_LIMIT: Duration = Duration::from_secs(1);

/// Serves `ping`, `echo` and `status`.
pub struct BuiltinCommands {
    service_name: String,
    started: Instant,
    roles: Vec<(String, Recipient<StatsQuery>)>,
    health: Option<(EventSink, Duration)>,
}

impl BuiltinCommands {
    pub fn new(service_name: impl Into<String>) -> Self {
        Self {
            service_name: service_name.into(),
            started: Instant::now(),
            roles: Vec::new(),
            health: None,
        }
    }

    /// Include `role`'s counters in `status` replies.
    pub fn with_role(mut self, role: impl Into<String>, stats: Recipient<StatsQuery>) -> Self {
        self.roles.push((role.into(), stats));
        self
    }

    /// Publish the `status` report as `system.health` every `interval`.
    pub fn with_health_events(mut self, events: EventSink, interval: Duration) -> Self {
        self.health = Some((events, interval));
        self
    }

    fn report_head(&self) -> Value {
        json!({
            "service": self.service_name,
            "pid": std::process::id(),
            "uptime_s": self.started.elapsed().as_secs_f64(),
            "version": env!("CARGO_PKG_VERSION"),
        })
    }

    fn publish_health(&self) {
        let Some((events, _)) = &self.health else {
            return;
        };
        let (events, source) = (events.clone(), self.service_name.clone());
        let report = status_reply(self.report_head(), self.roles.clone());
        actix::spawn(async move {
            events.publish(Event::new(SYSTEM_HEALTH, source, report.await));
        });
    }
}

impl Actor for BuiltinCommands {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if let Some((_, interval)) = &self.health {
            ctx.run_interval(*interval, |builtins, _| builtins.publish_health());
        }
    }
}

impl Handler<Command> for BuiltinCommands {
    type Result = ResponseFuture<Result<Value, HandlerError>>;

    fn handle(&mut self, command: Command, _ctx: &mut Self::Context) -> Self::Result {
        match command.name.as_str() {
            "ping" => {
                let reply = json!({"pong": true, "time": now_rfc3339()});
                Box::pin(async move { Ok(reply) })
            }
            "echo" => {
                let reply = json!({"echo": command.request.payload});
                Box::pin(async move { Ok(reply) })
            }
            "status" => {
                let head = self.report_head();
                let roles = self.roles.clone();
                Box::pin(async move { Ok(status_reply(head, roles).await) })
            }
            other => {
                let text = format!("BuiltinCommands does not serve `{other}`");
                Box::pin(
                    async move { Err(HandlerError::new(crate::wire::code::UNKNOWN_COMMAND, text)) },
                )
            }
        }
    }
}

async fn status_reply(mut head: Value, roles: Vec<(String, Recipient<StatsQuery>)>) -> Value {
    let mut stats = Map::new();
    for (role, recipient) in roles {
        let answer = match recipient.send(StatsQuery).timeout(STATS_ANSWER_LIMIT).await {
            Ok(value) => value,
            Err(err) => json!({"error": format!("no answer: {err}")}),
        };
        stats.insert(role, answer);
    }
    head["roles"] = Value::Object(stats);
    head
}

/// Job types served by [`BuiltinJobs`].
pub const BUILTIN_JOB_TYPES: [&str; 4] = ["noop", "echo", "sleep", "fail"];

/// The longest a `sleep` job may ask for.
const SLEEP_JOB_LIMIT: Duration = Duration::from_secs(600);

/// Runs the built-in job types:
/// - `noop`: nothing, result `{}`;
/// - `echo`: result `{"echo": <payload>}`;
/// - `sleep`: waits `payload.ms` milliseconds (at most 10 minutes), reporting
///   progress halfway, result `{"slept_ms": ms}`;
/// - `fail`: always fails with `payload.error` or a fixed text.
#[derive(Debug, Default)]
pub struct BuiltinJobs;

impl Actor for BuiltinJobs {
    type Context = Context<Self>;
}

impl Handler<RunJob> for BuiltinJobs {
    type Result = ResponseFuture<Result<Value, HandlerError>>;

    fn handle(&mut self, run: RunJob, _ctx: &mut Self::Context) -> Self::Result {
        let RunJob { job, progress } = run;
        Box::pin(async move {
            match job.job_type.as_str() {
                "noop" => Ok(json!({})),
                "echo" => Ok(json!({"echo": job.payload})),
                "sleep" => {
                    let ms = job.payload.get("ms").and_then(Value::as_u64).unwrap_or(0);
                    let total = Duration::from_millis(ms).min(SLEEP_JOB_LIMIT);
                    actix::clock::sleep(total / 2).await;
                    progress.report(json!({"percent": 50}));
                    actix::clock::sleep(total - total / 2).await;
                    Ok(json!({"slept_ms": total.as_millis() as u64}))
                }
                "fail" => {
                    let text = job.payload.get("error").and_then(Value::as_str);
                    Err(HandlerError::failed(
                        text.unwrap_or("the job asked to fail"),
                    ))
                }
                other => Err(HandlerError::bad_request(format!(
                    "no built-in job type `{other}`"
                ))),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[actix_rt::test]
    async fn builtin_jobs_run_each_type_and_fail_on_request() {
        use crate::message::ProgressReporter;
        use crate::wire::JobMessage;
        let jobs = BuiltinJobs.start();
        let run = |job_type: &str, payload: Value| RunJob {
            job: JobMessage::new(job_type, payload),
            progress: ProgressReporter::discard(),
        };
        let echo = jobs
            .send(run("echo", json!({"a": 1})))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(echo, json!({"echo": {"a": 1}}));
        let slept = jobs
            .send(run("sleep", json!({"ms": 20})))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(slept, json!({"slept_ms": 20}));
        let failed = jobs
            .send(run("fail", json!({"error": "boom"})))
            .await
            .unwrap();
        assert_eq!(failed.unwrap_err().message, "boom");
        let unknown = jobs.send(run("other", json!({}))).await.unwrap();
        assert_eq!(unknown.unwrap_err().code, "bad_request");
    }

    #[actix_rt::test]
    async fn ping_answers_pong() {
        let status = BuiltinCommands::new("test").start();
        let reply = status
            .send(Command::new("ping", json!({})))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(reply["pong"], json!(true));
    }

    #[actix_rt::test]
    async fn status_lists_each_role_and_survives_a_dead_one() {
        struct Quiet;
        impl Actor for Quiet {
            type Context = Context<Self>;
        }
        impl Handler<StatsQuery> for Quiet {
            type Result = MessageResult<StatsQuery>;
            fn handle(&mut self, _: StatsQuery, ctx: &mut Self::Context) -> Self::Result {
                ctx.stop();
                MessageResult(json!({"n": 1}))
            }
        }
        let live = Quiet.start();
        let status = BuiltinCommands::new("test")
            .with_role("live", live.clone().recipient())
            .with_role("dead", live.recipient())
            .start();
        let reply = status
            .send(Command::new("status", json!({})))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(reply["service"], json!("test"));
        assert_eq!(reply["roles"]["live"], json!({"n": 1}));
        assert!(reply["roles"]["dead"]["error"].is_string(), "{reply}");
    }
}
