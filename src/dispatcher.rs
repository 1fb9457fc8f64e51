//! `QueueDispatcher`: the job queue's role actor.
//!
//! The dispatcher holds the queue, so its depth can be seen; it hands jobs to
//! workers, tracks every job in flight under a lease, redelivers what a dead
//! or silent worker held, retries failures with backoff and buries what runs
//! out of retries in the dead letter queue. The rules of the queue itself
//! (order, capacity, leases, retries) live in [`queue`], apart from the
//! actor; the command payloads in [`protocol`].
//!
//! # Intake
//!
//! Jobs come in as [`Enqueue`] from in-process code, or as the `bus.enqueue`
//! command on the command bus from remote producers. There is no intake
//! socket: a producer gets a reply only once the job is in the queue, so a
//! producer that enqueues and exits at once loses nothing. The queue is
//! bounded by `queue_capacity` (waiting, retrying and in-flight jobs
//! together); past it a job is refused with code `overloaded` at once, the
//! caller never blocks. Order is priority 2, then 1, then 0, and first in,
//! first out within a priority.
//!
//! # Three ways to deliver
//!
//! 1. **Leasing workers (at least once).** A remote worker asks for one job
//!    per free slot with `bus.lease`, so it never holds more than it can run
//!    and a slow worker cannot hoard: a fast worker simply asks more often.
//!    Waiting workers are served first come, first served. The lease lasts
//!    `job_lease`; every report the worker sends renews it. A lease that runs
//!    out means the worker died or fell silent: the job is redelivered with
//!    `retry_count + 1`. The protocol is documented in [`crate::worker`].
//! 2. **In-process workers (at least once).** [`RegisterWorker`] gives the
//!    dispatcher a `Recipient<RunJob>` and a concurrency; the dispatcher feeds
//!    it up to that many jobs at once, in the same first-come order as the
//!    leasing workers (a free slot queues up like a lease request). While a
//!    `RunJob` is running the dispatcher renews its lease itself;
//!    `Ok` completes the job, `Err` or a mailbox error fails the attempt. A
//!    worker whose actor is gone is unregistered.
//! 3. **PULL peers (at most once).** Plain PUSH/PULL peers, such as dgbit's
//!    Python worker, report nothing. The [`PushEdge`] on
//!    `NNG_JOB_QUEUE_ADDRESS` pushes jobs to them one at a time, only while a
//!    peer is connected; a pushed job counts as handed off and leaves the
//!    queue (event `job.started` with `"delivery": "at_most_once"`). Which
//!    jobs go there is set by `push_job_types`:
//!    - empty: none;
//!    - a job type: jobs of that type go only to PULL peers, never to
//!      leasing or in-process workers;
//!    - `*`: any job whose type no worker wants: no in-process worker is
//!      registered for it and no leasing worker asked for it (or for any
//!      type) within `push_grace`. Leasing workers count as asking while they
//!      lease and report.
//!
//!    With no PULL peer connected nothing is pushed and jobs wait.
//!
//! # Failure, retry and dead letters
//!
//! A failed attempt (a `failed` report, a handler error) is retried after a
//! backoff: `retry_backoff_base`, doubled for each further retry, capped at
//! `retry_backoff_max`. An expired lease is redelivered at once, without
//! backoff (the lease itself was the wait). Either way `retry_count` grows by
//! one; a job that fails or expires with `retry_count == max_retries` goes to
//! the dead letter queue with the reason and its attempt history. A report
//! for a job that is not (or no longer) leased to the reporting worker, or
//! names another lease, is ignored and counted as `ignored_reports`: a job
//! never completes twice.
//!
//! # Events
//!
//! Every event's `data` has `job_id` and `job_type`; its `correlation_id` is
//! the job id.
//!
//! | event | when | more data |
//! |---|---|---|
//! | `job.created` | a job is accepted | `priority`, `created_at` |
//! | `job.queued` | it is waiting: after `job.created`, after a retry's backoff, after an expired lease | `reason` (`enqueued`, `retry`, `lease_expired`), `retry_count`, `priority`, `queue_depth` |
//! | `job.started` | it is leased, given to an in-process worker, or pushed | `worker`, `delivery` (`lease`, `in_process`, `at_most_once`), `retry_count`, `lease_ms` |
//! | `job.progress` | a worker reports progress | `worker`, `progress` |
//! | `job.completed` | it completed | `worker`, `result`, `retry_count` |
//! | `job.failed` | an attempt failed, or the last lease expired | `worker`, `error`, `retry_count`, `will_retry`, `retry_in_ms` |
//! | `job.cancelled` | it was cancelled while waiting | |
//!
//! An expired lease that will be redelivered is not a failure: it shows as
//! `job.queued` with reason `lease_expired`. Only when no retry is left does
//! it end in `job.failed` with `will_retry: false`.
//!
//! # Backlog alert
//!
//! When the depth (waiting plus waiting for a retry) goes over
//! `backlog_alert`, one `system.alert` is published with `"alert":
//! "job_backlog", "active": true`. It clears, with a second `system.alert`
//! with `"active": false`, only when the depth falls to half the threshold
//! or less, so a depth hovering around the threshold does not flap.
//! `backlog_alert` 0 turns the alert off.
//!
//! # Commands
//!
//! The dispatcher implements `Handler<Command>` for:
//!
//! - `bus.enqueue` `{"job_type", "payload"?, "priority"?, "max_retries"?}`
//!   or a whole 7-key job: `{"job_id", "queue_depth"}`.
//! - `bus.lease` `{"worker", "job_types"?, "wait_ms"?}` (wait at most 5 s,
//!   default 0): `{"job": <7-key job>, "lease_ms", "lease_id"}` or
//!   `{"job": null}`.
//! - `bus.report` `{"worker", "job_id", "lease_id"?, "state", "result"?,
//!   "error"?, "progress"?, "next"?}`: `{"accepted": true}` or
//!   `{"accepted": false, "reason"}`; with `"next": {"job_types"?}` on a
//!   `completed` or `failed` report, also `"next"`: a `bus.lease` reply,
//!   answered at once.
//! - `bus.cancel` `{"job_id"}`: `{"cancelled": true, "job_id"}`, or the
//!   error codes `not_found` and `in_flight`.
//! - `bus.jobs` `{}`: the stats (as [`StatsQuery`]).
//!
//! # Shutdown
//!
//! [`CloseIntake`] closes the queue: new jobs get `shutting_down`, nothing
//! more is handed out (waiting lease requests get no job), and reports for
//! jobs in flight are still taken, so the bus can wait for the in-flight
//! count to reach zero within its drain deadline.
//!
//! # Restarts
//!
//! A supervisor's factory builds each instance from clones (the bus uses
//! [`QueueDispatcher::with_push_slot`], which takes the PUSH edge's slot
//! instead of an edge).
//!
//! Everything that must outlive the actor (jobs, leases, waiting lease
//! requests, in-process workers, counters) lives in [`QueueState`], which
//! the bus creates once and hands to each new `QueueDispatcher`. The actor
//! holds only its timer and the handlers currently running in-process jobs:
//! after a restart those handlers' results are lost, their leases are no
//! longer renewed, and the jobs are redelivered when the leases run out.
//!
//! # Limits
//!
//! The queue lives in memory: jobs waiting or in flight when the process
//! exits are lost (dead letters are durable, the queue is not). An
//! in-process handler that never answers keeps its slot, and its lease, for
//! as long as it runs: there is no per-job time limit. Leases and
//! retry delays are checked every [`TICK_INTERVAL`], so they end up to that
//! much late.

pub mod protocol;
pub mod queue;

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use actix::prelude::*;
use serde_json::{json, Value};
use tracing::{debug, error, warn};

use crate::config::BusConfig;
use crate::dead_letter::Bury;
use crate::edge::listener::EdgeSlot;
use crate::edge::push::{PushEdge, PushNotice, PushOutcome};
use crate::message::{Command, EventSink, HandlerError, ProgressReporter, RunJob, StatsQuery};
use crate::wire::{code, Event, JobMessage};
use queue::{Effect, JobQueue, LeaseRequest, QueueConfig, Report, ReportState};

/// How often leases, retry delays and lease waits are checked.
pub const TICK_INTERVAL: Duration = Duration::from_millis(50);

/// The command names the dispatcher serves; the bus routes each of them to
/// the dispatcher's `Recipient<Command>`.
pub const QUEUE_COMMANDS: [&str; 5] = [
    "bus.enqueue",
    "bus.lease",
    "bus.report",
    "bus.cancel",
    "bus.jobs",
];

/// The longest a `bus.lease` request may wait for a job.
pub const MAX_LEASE_WAIT: Duration = Duration::from_secs(5);

/// The dispatcher's settings.
#[derive(Debug, Clone)]
pub struct DispatcherSettings {
    /// Jobs held at once (waiting, retrying, in flight); more are refused
    /// with `overloaded`. Default 100 000.
    pub queue_capacity: usize,
    /// How long a worker holds a job without a report. Default 30 s.
    pub job_lease: Duration,
    /// Depth that raises `system.alert`; 0 for none. Default 1000.
    pub backlog_alert: usize,
    /// The `source` of the events the dispatcher publishes.
    pub service_name: String,
    /// Job types pushed to PULL peers; `*` for any type no worker wants.
    /// Default `{"*"}`.
    pub push_job_types: BTreeSet<String>,
    /// How long a job type counts as wanted after a worker asked for it.
    /// Keep it above the lease: leasing workers report every lease/3.
    /// Default 30 s.
    pub push_grace: Duration,
    /// Delay before the first retry of a failed job. Default 1 s.
    pub retry_backoff_base: Duration,
    /// Longest delay between retries. Default 60 s.
    pub retry_backoff_max: Duration,
}

impl Default for DispatcherSettings {
    fn default() -> Self {
        let queue = QueueConfig::default();
        Self {
            queue_capacity: queue.capacity,
            job_lease: queue.lease,
            backlog_alert: queue.backlog_alert,
            service_name: "dgbit-bus".into(),
            push_job_types: queue.push_job_types,
            push_grace: queue.push_grace,
            retry_backoff_base: queue.retry_backoff_base,
            retry_backoff_max: queue.retry_backoff_max,
        }
    }
}

impl DispatcherSettings {
    /// The settings `config` sets, defaults for the rest.
    pub fn from_config(config: &BusConfig) -> Self {
        Self {
            queue_capacity: config.queue_capacity,
            job_lease: config.job_lease,
            backlog_alert: config.backlog_alert,
            service_name: config.service_name.clone(),
            push_job_types: config.push_job_types.clone(),
            retry_backoff_base: config.job_retry_base,
            ..Self::default()
        }
    }

    fn queue_config(&self) -> QueueConfig {
        QueueConfig {
            capacity: self.queue_capacity,
            lease: self.job_lease,
            backlog_alert: self.backlog_alert,
            retry_backoff_base: self.retry_backoff_base,
            retry_backoff_max: self.retry_backoff_max,
            push_job_types: self.push_job_types.clone(),
            push_grace: self.push_grace,
        }
    }
}

/// The queue's state, shared by every incarnation of the dispatcher actor.
/// Cloning gives another handle to the same state.
#[derive(Clone, Default)]
pub struct QueueState {
    queue: Arc<Mutex<JobQueue>>,
}

impl QueueState {
    /// A fresh, empty queue with default limits (the dispatcher sets its own).
    pub fn new() -> Self {
        Self::default()
    }

    /// Jobs waiting (also for a retry).
    pub fn depth(&self) -> usize {
        self.lock().depth()
    }

    /// Jobs leased or being pushed.
    pub fn in_flight(&self) -> usize {
        self.lock().in_flight()
    }

    /// A poisoned lock means an earlier dispatcher panicked mid-operation;
    /// the state is still the best there is, so it is used as it is.
    fn lock(&self) -> MutexGuard<'_, JobQueue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl std::fmt::Debug for QueueState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let queue = self.lock();
        f.debug_struct("QueueState")
            .field("depth", &queue.depth())
            .field("in_flight", &queue.in_flight())
            .finish()
    }
}

/// Add a job to the queue; the reply is its id once it is queued.
///
/// # Errors
///
/// `overloaded` when the queue is full, `bad_request` for a job without id
/// or type.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<String, HandlerError>")]
pub struct Enqueue {
    /// The job, with its id already set.
    pub job: JobMessage,
}

/// Register an in-process worker actor for `job_type`, run with up to
/// `concurrency` jobs at once (at least 1). The reply is its worker id.
#[derive(Debug, Clone, Message)]
#[rtype(result = "String")]
pub struct RegisterWorker {
    /// The job type the worker runs.
    pub job_type: String,
    /// The worker actor.
    pub worker: Recipient<RunJob>,
    /// Jobs it may run at once.
    pub concurrency: usize,
}

/// Cancel a job that is still waiting.
///
/// # Errors
///
/// `not_found` for a job the queue does not hold, `in_flight` for one a
/// worker already has.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(), HandlerError>")]
pub struct Cancel {
    /// The job to cancel.
    pub job_id: String,
}

/// Close the queue for shutdown (see [`JobQueue::close`]); the reply is the
/// number of jobs still in flight, so the bus can poll it until the drain
/// deadline. Closing twice is harmless.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "usize")]
pub struct CloseIntake;

/// Move every job still held into the dead letter store (see
/// [`JobQueue::drain_to_dead_letters`]); the reply counts the jobs stored and
/// those the store refused (each refusal is logged with its entry).
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "(usize, usize)")]
pub struct DrainToDeadLetters;

/// A progress report from an in-process handler.
#[derive(Debug, Message)]
#[rtype(result = "()")]
struct LocalProgress {
    job_id: String,
    worker: String,
    lease_id: u64,
    progress: Value,
}

/// The job queue's role actor; see the module docs.
pub struct QueueDispatcher {
    settings: DispatcherSettings,
    state: QueueState,
    events: EventSink,
    dead_letters: Recipient<Bury>,
    push: EdgeSlot<PushEdge>,
    /// The edge this instance asked for push notices, so that an edge opened
    /// (or reopened) after the dispatcher started is registered on a tick.
    noticed_edge: Option<Arc<PushEdge>>,
    /// In-process jobs whose handler is running in this incarnation, by
    /// lease id.
    running: HashMap<u64, String>,
}

impl QueueDispatcher {
    /// A dispatcher over `state`, publishing through `events`, burying into
    /// `dead_letters`, and pushing through `push` when given.
    pub fn new(
        settings: DispatcherSettings,
        state: QueueState,
        events: EventSink,
        dead_letters: Recipient<Bury>,
        push: Option<Arc<PushEdge>>,
    ) -> Self {
        let push = push.map(EdgeSlot::holding).unwrap_or_default();
        Self::with_push_slot(settings, state, events, dead_letters, push)
    }

    /// A dispatcher pushing through whatever edge `push` holds at the time:
    /// the bus's edge actor fills the slot once the PUSH socket is open.
    pub fn with_push_slot(
        settings: DispatcherSettings,
        state: QueueState,
        events: EventSink,
        dead_letters: Recipient<Bury>,
        push: EdgeSlot<PushEdge>,
    ) -> Self {
        state.lock().set_config(settings.queue_config());
        Self {
            settings,
            state,
            events,
            dead_letters,
            push,
            noticed_edge: None,
            running: HashMap::new(),
        }
    }

    /// Register for push notices with the open edge, once per edge.
    fn watch_push_edge(&mut self, ctx: &mut Context<Self>) {
        let edge = self.push.get();
        let same = match (&edge, &self.noticed_edge) {
            (Some(edge), Some(noticed)) => Arc::ptr_eq(edge, noticed),
            (None, None) => true,
            _ => false,
        };
        if !same {
            if let Some(edge) = &edge {
                edge.set_notice_target(ctx.address().recipient());
            }
            self.noticed_edge = edge;
        }
    }

    /// Run `operation` on the queue, hand out what can be handed out, and
    /// carry out the effects after the lock is released.
    fn apply<R>(
        &mut self,
        ctx: &mut Context<Self>,
        operation: impl FnOnce(&mut JobQueue, Instant) -> R,
    ) -> R {
        let now = Instant::now();
        let push_ready = self.push.get().is_some_and(|edge| edge.is_ready());
        let (result, effects) = {
            let mut queue = self.state.lock();
            let result = operation(&mut queue, now);
            queue.pump(now, push_ready);
            (result, queue.take_effects())
        };
        for effect in effects {
            self.carry_out(effect, ctx);
        }
        result
    }

    fn carry_out(&mut self, effect: Effect, ctx: &mut Context<Self>) {
        match effect {
            Effect::Publish { event_type, data } => self.publish(event_type, data),
            Effect::Bury(entry) => self.bury(entry),
            Effect::RunLocal {
                worker,
                target,
                job,
                lease_id,
            } => self.run_local(worker, target, job, lease_id, ctx),
            Effect::Push(job) => self.push(job),
        }
    }

    fn publish(&self, event_type: &str, data: Value) {
        let job_id = data
            .get("job_id")
            .and_then(Value::as_str)
            .map(str::to_string);
        let mut event = Event::new(event_type, &self.settings.service_name, data);
        if let Some(job_id) = job_id {
            event = event.with_correlation_id(job_id);
        }
        self.events.publish(event);
    }

    /// Send `entry` to the dead letter queue. The job has left the queue, so
    /// a refusal is logged with the whole entry and counted.
    fn bury(&self, entry: crate::dead_letter::DeadLetter) {
        let target = self.dead_letters.clone();
        let state = self.state.clone();
        actix::spawn(async move {
            let copy = entry.clone();
            if let Err(failure) = send_letter(&target, entry).await {
                state.lock().note_dead_letter_failure();
                error!(entry = %copy.to_value(), error = failure, "dead letter lost: the store refused it");
            }
        });
    }

    /// The outcomes of the PUSH edge's finished sends, if it is open.
    fn take_push_outcomes(&self) -> Vec<PushOutcome> {
        self.push
            .get()
            .map(|edge| edge.take_outcomes())
            .unwrap_or_default()
    }

    fn run_local(
        &mut self,
        worker: String,
        target: Recipient<RunJob>,
        job: JobMessage,
        lease_id: u64,
        ctx: &mut Context<Self>,
    ) {
        let job_id = job.job_id.clone();
        let progress = {
            let (address, job_id, worker) = (ctx.address(), job_id.clone(), worker.clone());
            ProgressReporter::new(move |progress| {
                address.do_send(LocalProgress {
                    job_id: job_id.clone(),
                    worker: worker.clone(),
                    lease_id,
                    progress,
                })
            })
        };
        self.running.insert(lease_id, job_id.clone());
        let request = target.send(RunJob { job, progress });
        ctx.spawn(request.into_actor(self).map(move |result, actor, ctx| {
            actor.running.remove(&lease_id);
            let outcome = match result {
                Ok(Ok(value)) => Ok(value),
                Ok(Err(err)) => Err(err.message),
                Err(err) => {
                    warn!(worker, job_id, error = %err, "in-process worker unavailable");
                    if matches!(err, MailboxError::Closed) {
                        actor.state.lock().remove_local(&worker);
                    }
                    Err(format!("the in-process worker is unavailable: {err}"))
                }
            };
            actor.apply(ctx, |queue, now| {
                queue.local_finished(&job_id, &worker, lease_id, outcome, now)
            });
        }));
    }

    fn push(&mut self, job: JobMessage) {
        let result = match self.push.get() {
            Some(edge) => edge.push(&job),
            None => Err(crate::edge::push::PushError::Closed),
        };
        // Not started: the job waits again; the next tick tries once more.
        if let Err(err) = result {
            debug!(job_id = %job.job_id, error = %err, "push not started");
            self.state.lock().push_returned(&job.job_id);
        }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        self.watch_push_edge(ctx);
        let outcomes = self.take_push_outcomes();
        let running = std::mem::take(&mut self.running);
        self.apply(ctx, |queue, now| {
            queue.renew_local(
                running.iter().map(|(lease, job)| (job.as_str(), *lease)),
                now,
            );
            apply_push_outcomes(queue, outcomes, now);
            queue.tick(now);
        });
        self.running.extend(running);
    }

    fn stats(&self) -> Value {
        let mut stats = self.state.lock().stats(Instant::now());
        stats["lease_ms"] = (self.settings.job_lease.as_millis() as u64).into();
        stats["push"] = match self.push.get() {
            Some(edge) => edge.stats(),
            None => Value::Null,
        };
        stats["push_job_types"] = self.settings.push_job_types.iter().cloned().collect();
        stats
    }

    /// Ask the queue for a job for `request`; the future is the
    /// `bus.lease` reply, ready when a job is granted or the wait runs out.
    fn lease(
        &mut self,
        request: LeaseRequest,
        ctx: &mut Context<Self>,
    ) -> impl Future<Output = Value> + Send + 'static {
        let wait = request.wait;
        let receiver = self.apply(ctx, |queue, now| queue.lease(request, now));
        async move {
            // The tick answers a wait that ran out; this timeout only
            // guards against a dispatcher that is gone for good.
            let grant = tokio::time::timeout(wait + Duration::from_secs(2), receiver).await;
            protocol::lease_reply(grant.ok().and_then(Result::ok).flatten())
        }
    }

    fn command(
        &mut self,
        command: Command,
        ctx: &mut Context<Self>,
    ) -> Result<CommandAnswer, HandlerError> {
        let payload = command.request.payload;
        match command.name.as_str() {
            "bus.enqueue" => {
                let job = protocol::enqueue_job(payload)?;
                let (job_id, depth) = self.apply(ctx, |queue, _| {
                    queue.enqueue(job).map(|id| (id, queue.depth()))
                })?;
                Ok(CommandAnswer::Now(
                    json!({"job_id": job_id, "queue_depth": depth}),
                ))
            }
            "bus.lease" => {
                let request = protocol::lease_request(&payload, MAX_LEASE_WAIT)?;
                let lease = self.lease(request, ctx);
                Ok(CommandAnswer::Later(Box::pin(
                    async move { Ok(lease.await) },
                )))
            }
            "bus.report" => {
                let report = protocol::report(&payload)?;
                let next = protocol::next_lease(&payload, &report)?;
                let outcome = self.apply(ctx, |queue, now| queue.report(report, now));
                let mut reply = protocol::report_reply(outcome);
                let Some(request) = next else {
                    return Ok(CommandAnswer::Now(reply));
                };
                // The report is applied before the lease is asked for, so
                // the worker's slot is free again when the queue looks.
                let lease = self.lease(request, ctx);
                Ok(CommandAnswer::Later(Box::pin(async move {
                    reply["next"] = lease.await;
                    Ok(reply)
                })))
            }
            "bus.cancel" => {
                let job_id = protocol::job_id(&payload)?;
                self.apply(ctx, |queue, _| queue.cancel(&job_id))?;
                Ok(CommandAnswer::Now(
                    json!({"cancelled": true, "job_id": job_id}),
                ))
            }
            "bus.jobs" => Ok(CommandAnswer::Now(self.stats())),
            other => Err(HandlerError::new(
                code::UNKNOWN_COMMAND,
                format!("the job queue does not serve `{other}`"),
            )),
        }
    }
}

/// A command's answer: ready now, or later (a lease that waits).
enum CommandAnswer {
    Now(Value),
    Later(futures::future::BoxFuture<'static, Result<Value, HandlerError>>),
}

/// Store `entry` in the dead letter queue; the error says why it was not.
async fn send_letter(
    target: &Recipient<Bury>,
    entry: crate::dead_letter::DeadLetter,
) -> Result<(), String> {
    match target.send(Bury { entry }).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(err.to_string()),
        Err(err) => Err(err.to_string()),
    }
}

fn apply_push_outcomes(queue: &mut JobQueue, outcomes: Vec<PushOutcome>, now: Instant) {
    for outcome in outcomes {
        match outcome {
            PushOutcome::HandedOff { job_id } => queue.push_handed_off(&job_id, now),
            PushOutcome::Returned { job_id, .. } => queue.push_returned(&job_id),
        }
    }
}

impl Actor for QueueDispatcher {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Lease requests and reports are answered at once (a waiting lease
        // answers from a future), so a deep mailbox only absorbs bursts.
        ctx.set_mailbox_capacity(1024);
        self.watch_push_edge(ctx);
        ctx.run_interval(TICK_INTERVAL, |actor, ctx| actor.tick(ctx));
        debug!(depth = self.state.depth(), "queue dispatcher started");
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        if !self.running.is_empty() {
            warn!(
                running = self.running.len(),
                "queue dispatcher stopped with in-process jobs running; they will be redelivered"
            );
        }
    }
}

crate::impl_inject_fault!(QueueDispatcher);

impl Handler<Enqueue> for QueueDispatcher {
    type Result = Result<String, HandlerError>;

    fn handle(&mut self, msg: Enqueue, ctx: &mut Self::Context) -> Self::Result {
        self.apply(ctx, |queue, _| queue.enqueue(msg.job))
    }
}

impl Handler<RegisterWorker> for QueueDispatcher {
    type Result = String;

    fn handle(&mut self, msg: RegisterWorker, ctx: &mut Self::Context) -> String {
        let RegisterWorker {
            job_type,
            worker,
            concurrency,
        } = msg;
        let id = self.apply(ctx, |queue, now| {
            queue.register_local(job_type.clone(), worker, concurrency, now)
        });
        debug!(
            worker = id,
            job_type, concurrency, "in-process worker registered"
        );
        id
    }
}

impl Handler<Cancel> for QueueDispatcher {
    type Result = Result<(), HandlerError>;

    fn handle(&mut self, msg: Cancel, ctx: &mut Self::Context) -> Self::Result {
        self.apply(ctx, |queue, _| queue.cancel(&msg.job_id))
    }
}

impl Handler<DrainToDeadLetters> for QueueDispatcher {
    type Result = ResponseFuture<(usize, usize)>;

    fn handle(&mut self, _: DrainToDeadLetters, _ctx: &mut Self::Context) -> Self::Result {
        let letters = self.state.lock().drain_to_dead_letters();
        let target = self.dead_letters.clone();
        Box::pin(async move {
            let mut outcome = (0, 0);
            for letter in letters {
                let copy = letter.clone();
                match send_letter(&target, letter).await {
                    Ok(()) => outcome.0 += 1,
                    Err(_) => {
                        outcome.1 += 1;
                        warn!(entry = %copy.to_value(), "job lost at shutdown: dead letter store refused it");
                    }
                }
            }
            outcome
        })
    }
}

impl Handler<CloseIntake> for QueueDispatcher {
    type Result = usize;

    fn handle(&mut self, _: CloseIntake, ctx: &mut Self::Context) -> usize {
        self.apply(ctx, |queue, _| {
            queue.close();
            queue.in_flight()
        })
    }
}

impl Handler<StatsQuery> for QueueDispatcher {
    type Result = MessageResult<StatsQuery>;

    fn handle(&mut self, _: StatsQuery, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.stats())
    }
}

impl Handler<PushNotice> for QueueDispatcher {
    type Result = ();

    fn handle(&mut self, _: PushNotice, ctx: &mut Self::Context) {
        let outcomes = self.take_push_outcomes();
        self.apply(ctx, |queue, now| apply_push_outcomes(queue, outcomes, now));
    }
}

impl Handler<LocalProgress> for QueueDispatcher {
    type Result = ();

    fn handle(&mut self, msg: LocalProgress, ctx: &mut Self::Context) {
        let report = Report {
            worker: msg.worker,
            job_id: msg.job_id,
            lease_id: Some(msg.lease_id),
            state: ReportState::Progress(msg.progress),
        };
        self.apply(ctx, |queue, now| queue.report(report, now));
    }
}

impl Handler<Command> for QueueDispatcher {
    type Result = ResponseFuture<Result<Value, HandlerError>>;

    fn handle(&mut self, msg: Command, ctx: &mut Self::Context) -> Self::Result {
        match self.command(msg, ctx) {
            Ok(CommandAnswer::Now(value)) => Box::pin(async move { Ok(value) }),
            Ok(CommandAnswer::Later(future)) => future,
            Err(err) => Box::pin(async move { Err(err) }),
        }
    }
}
