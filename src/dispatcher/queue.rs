//! The queue's bookkeeping, apart from the actor: which jobs wait, which are
//! leased to whom and until when, who is waiting for work, and what must
//! happen next.
//!
//! [`JobQueue`] never touches a socket, a timer or an actor mailbox. Every
//! operation takes the current `Instant`, changes the state, and appends
//! [`Effect`]s (events to publish, jobs to bury, jobs to run or push) to an
//! outbox that the dispatcher actor drains after releasing the lock. That is
//! what makes the rules below testable without a running system.
//!
//! # Rules
//!
//! - Order: priority 2 before 1 before 0; first in, first out within a
//!   priority. A job keeps its place (its enqueue sequence number) when it
//!   comes back after a lease ran out, a retry delay or a failed push, so it
//!   goes ahead of younger jobs of its priority.
//! - Capacity counts every job held: waiting, waiting for a retry, and in
//!   flight. A job past capacity is refused with `overloaded`.
//! - Waiters (long-polling remote workers and free in-process worker slots)
//!   are served first come, first served. After every operation no waiting
//!   job matches any waiter, so a new lease request can take the best
//!   matching job at once.
//! - Operations change state only; [`JobQueue::pump`] then hands waiting
//!   jobs out. The caller runs it after every operation (the dispatcher's
//!   `apply` does), so the "no waiting job matches a waiter" invariant
//!   holds between operations.
//! - A job leaves the queue when it completes, is cancelled while waiting,
//!   is dead-lettered, or is handed off at most once to a PULL peer.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use actix::Recipient;
use serde_json::{json, Map, Value};
use tokio::sync::oneshot;

use crate::dead_letter::DeadLetter;
use crate::message::{HandlerError, RunJob};
use crate::topics;
use crate::wire::{code, now_rfc3339, JobMessage};

/// The `code` of an error reply to cancelling a job that is in flight.
pub const CODE_IN_FLIGHT: &str = "in_flight";

/// The `source` of dead letters made by the dispatcher.
pub const DEAD_LETTER_SOURCE: &str = "job_queue";

/// The worker name under which at-most-once hand-offs to PULL peers are
/// counted.
pub const PUSH_WORKER: &str = "push";

/// How long an idle remote worker (nothing in flight) stays in the stats.
const IDLE_WORKER_FORGOTTEN_AFTER: Duration = Duration::from_secs(600);

/// The queue's limits and delivery policy; see `DispatcherSettings` for the
/// meaning of each.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// Jobs held at once.
    pub capacity: usize,
    /// How long a lease lasts without a report.
    pub lease: Duration,
    /// Depth that raises the backlog alert; 0 for none.
    pub backlog_alert: usize,
    /// Delay before the first retry.
    pub retry_backoff_base: Duration,
    /// Longest delay between retries.
    pub retry_backoff_max: Duration,
    /// Job types pushed to PULL peers; `*` for unclaimed ones.
    pub push_job_types: BTreeSet<String>,
    /// How long a job type counts as wanted after a worker asked for it.
    pub push_grace: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            capacity: 100_000,
            lease: Duration::from_secs(30),
            backlog_alert: 1000,
            retry_backoff_base: Duration::from_secs(1),
            retry_backoff_max: Duration::from_secs(60),
            push_job_types: BTreeSet::from(["*".to_string()]),
            push_grace: Duration::from_secs(30),
        }
    }
}

impl QueueConfig {
    /// The delay before retry number `retry_count` (1 for the first retry):
    /// the base, doubled for each further retry, capped at the maximum.
    pub fn retry_delay(&self, retry_count: u32) -> Duration {
        let doublings = retry_count.saturating_sub(1).min(30);
        self.retry_backoff_base
            .saturating_mul(1 << doublings)
            .min(self.retry_backoff_max)
    }

    fn push_reserves(&self, job_type: &str) -> bool {
        self.push_job_types.contains(job_type)
    }

    fn push_takes_unclaimed(&self) -> bool {
        self.push_job_types.contains("*")
    }
}

/// Something the actor must do after an operation, in order.
#[derive(Debug)]
pub enum Effect {
    /// Publish an event with this type and data.
    Publish {
        /// The event's type.
        event_type: &'static str,
        /// The event's data.
        data: Value,
    },
    /// Store this entry in the dead letter queue.
    Bury(DeadLetter),
    /// Send `job` to the in-process worker `worker`.
    RunLocal {
        /// The in-process worker's id.
        worker: String,
        /// Its actor.
        target: Recipient<RunJob>,
        /// The job to run.
        job: JobMessage,
        /// The lease it runs under.
        lease_id: u64,
    },
    /// Push `job` through the PUSH edge; report back with
    /// [`JobQueue::push_handed_off`] or [`JobQueue::push_returned`].
    Push(JobMessage),
}

/// A job granted to a remote worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    /// The job, as dgbit's 7-key object.
    pub job: JobMessage,
    /// Names this lease of the job.
    pub lease_id: u64,
    /// How long the lease lasts without a report.
    pub lease_ms: u64,
}

/// A remote worker's request for one job.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseRequest {
    /// The worker's name.
    pub worker: String,
    /// The job types the worker can run; `None` for any.
    pub job_types: Option<Vec<String>>,
    /// How long to wait for a job before answering with none.
    pub wait: Duration,
}

/// What a worker says about a job it holds.
#[derive(Debug, Clone, PartialEq)]
pub enum ReportState {
    /// The handler started.
    Started,
    /// Still alive, no news.
    Heartbeat,
    /// Progress data, published as `job.progress`.
    Progress(Value),
    /// Done, with its result.
    Completed(Value),
    /// Failed, with the reason.
    Failed(String),
}

/// A worker's report on a leased job.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The reporting worker.
    pub worker: String,
    /// The job reported on.
    pub job_id: String,
    /// When given, the report only counts for this lease of the job.
    pub lease_id: Option<u64>,
    /// What the worker says.
    pub state: ReportState,
}

/// Whether a report was taken into account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportOutcome {
    /// The report counted.
    Accepted,
    /// The job is not leased to this worker (any more): the report changed
    /// nothing and was counted.
    Ignored {
        /// Why it did not count.
        reason: &'static str,
    },
}

/// How a job is delivered to whoever holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// A remote worker leased it with `bus.lease`.
    Lease,
    /// An in-process worker actor runs it.
    InProcess,
}

impl Delivery {
    fn as_str(self) -> &'static str {
        match self {
            Delivery::Lease => "lease",
            Delivery::InProcess => "in_process",
        }
    }
}

#[derive(Debug)]
struct Lease {
    id: u64,
    worker: String,
    delivery: Delivery,
    expires: Instant,
    started_at: String,
}

#[derive(Debug)]
enum JobState {
    Waiting,
    RetryAt(Instant),
    Leased(Lease),
    Pushing,
}

#[derive(Debug)]
struct Entry {
    job: JobMessage,
    seq: u64,
    state: JobState,
    attempts: Vec<Value>,
}

/// Ready-index key: highest priority first, then oldest first.
type ReadyKey = (Reverse<u8>, u64);

enum Waiter {
    Remote {
        worker: String,
        job_types: Option<Vec<String>>,
        deadline: Instant,
        reply: oneshot::Sender<Option<Grant>>,
    },
    /// One free slot of an in-process worker.
    Local { worker: String },
}

impl Waiter {
    fn worker(&self) -> &str {
        match self {
            Waiter::Remote { worker, .. } | Waiter::Local { worker } => worker,
        }
    }
}

struct LocalWorker {
    job_type: String,
    target: Recipient<RunJob>,
    concurrency: usize,
}

/// Counts per worker, for the stats.
#[derive(Debug)]
struct WorkerRecord {
    kind: &'static str,
    in_flight: usize,
    leased: u64,
    completed: u64,
    failed: u64,
    expired: u64,
    last_seen: Instant,
    last_seen_at: String,
}

impl WorkerRecord {
    fn new(kind: &'static str, now: Instant) -> Self {
        Self {
            kind,
            in_flight: 0,
            leased: 0,
            completed: 0,
            failed: 0,
            expired: 0,
            last_seen: now,
            last_seen_at: now_rfc3339(),
        }
    }

    fn seen(&mut self, now: Instant) {
        self.last_seen = now;
        self.last_seen_at = now_rfc3339();
    }
}

/// Totals since the state was created.
#[derive(Debug, Default, Clone)]
struct Counters {
    enqueued: u64,
    duplicates: u64,
    rejected_overloaded: u64,
    completed: u64,
    failed_attempts: u64,
    redelivered: u64,
    dead_lettered: u64,
    cancelled: u64,
    ignored_reports: u64,
    handed_off: u64,
    push_returned: u64,
    lost_grants: u64,
    dead_letter_failures: u64,
}

/// The queue, its leases and its waiters. See the module docs for the rules.
pub struct JobQueue {
    config: QueueConfig,
    jobs: HashMap<String, Entry>,
    ready: HashMap<String, BTreeMap<ReadyKey, String>>,
    ready_count: usize,
    retry_at: BTreeMap<(Instant, u64), String>,
    in_flight: HashSet<String>,
    waiters: VecDeque<Waiter>,
    local: HashMap<String, LocalWorker>,
    workers: HashMap<String, WorkerRecord>,
    /// When some worker last asked for each job type; `None` key = any type.
    demand: HashMap<Option<String>, Instant>,
    next_seq: u64,
    next_lease: u64,
    next_local: u64,
    counters: Counters,
    backlog_raised: bool,
    /// Closed for shutdown: no new jobs in, none handed out.
    closed: bool,
    effects: Vec<Effect>,
}

impl Default for JobQueue {
    fn default() -> Self {
        Self::new(QueueConfig::default())
    }
}

impl JobQueue {
    /// An empty queue with `config`.
    pub fn new(config: QueueConfig) -> Self {
        Self {
            config,
            jobs: HashMap::new(),
            ready: HashMap::new(),
            ready_count: 0,
            retry_at: BTreeMap::new(),
            in_flight: HashSet::new(),
            waiters: VecDeque::new(),
            local: HashMap::new(),
            workers: HashMap::new(),
            demand: HashMap::new(),
            next_seq: 0,
            next_lease: 0,
            next_local: 0,
            counters: Counters::default(),
            backlog_raised: false,
            closed: false,
            effects: Vec::new(),
        }
    }

    /// The current limits.
    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    /// Replace the limits; jobs already held stay, even past a smaller
    /// capacity.
    pub fn set_config(&mut self, config: QueueConfig) {
        self.config = config;
    }

    /// Take the effects of the operations so far, oldest first.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    /// Jobs waiting to be delivered, including those waiting for a retry.
    pub fn depth(&self) -> usize {
        self.ready_count + self.retry_at.len()
    }

    /// Jobs leased or being pushed.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Add `job` to the queue.
    ///
    /// A job whose id the queue already holds is accepted again without a
    /// second copy (a producer's retry), and counted as a duplicate.
    ///
    /// # Errors
    ///
    /// `overloaded` when the queue holds `capacity` jobs; `bad_request` for
    /// an empty job type or job id; `shutting_down` once [`JobQueue::close`]d.
    pub fn enqueue(&mut self, job: JobMessage) -> Result<String, HandlerError> {
        if self.closed {
            return Err(HandlerError::new(
                code::SHUTTING_DOWN,
                "the job queue is shutting down",
            ));
        }
        if job.job_type.is_empty() || job.job_id.is_empty() {
            return Err(HandlerError::bad_request(
                "a job needs a job_id and a job_type",
            ));
        }
        if self.jobs.contains_key(&job.job_id) {
            self.counters.duplicates += 1;
            return Ok(job.job_id);
        }
        if self.jobs.len() >= self.config.capacity {
            self.counters.rejected_overloaded += 1;
            return Err(HandlerError::new(
                code::OVERLOADED,
                format!("the job queue is full ({} jobs)", self.config.capacity),
            ));
        }

        let job_id = job.job_id.clone();
        let seq = self.next_seq;
        self.next_seq += 1;
        self.counters.enqueued += 1;
        self.publish(
            topics::JOB_CREATED,
            json!({"job_id": job.job_id, "job_type": job.job_type,
                   "priority": u8::from(job.priority), "created_at": job.created_at}),
        );
        self.jobs.insert(
            job_id.clone(),
            Entry {
                job,
                seq,
                state: JobState::Waiting,
                attempts: vec![],
            },
        );
        self.make_ready(&job_id, "enqueued");
        Ok(job_id)
    }

    /// Register an in-process worker with `concurrency` slots for `job_type`;
    /// returns its worker id.
    pub fn register_local(
        &mut self,
        job_type: String,
        target: Recipient<RunJob>,
        concurrency: usize,
        now: Instant,
    ) -> String {
        self.next_local += 1;
        let worker = format!("local:{job_type}:{}", self.next_local);
        let concurrency = concurrency.max(1);
        for _ in 0..concurrency {
            self.waiters.push_back(Waiter::Local {
                worker: worker.clone(),
            });
        }
        self.local.insert(
            worker.clone(),
            LocalWorker {
                job_type,
                target,
                concurrency,
            },
        );
        self.workers
            .insert(worker.clone(), WorkerRecord::new("in_process", now));
        worker
    }

    /// Ask for one job for a remote worker. The receiver yields the grant,
    /// or `None` once `request.wait` has passed (on a [`JobQueue::tick`]).
    pub fn lease(
        &mut self,
        request: LeaseRequest,
        now: Instant,
    ) -> oneshot::Receiver<Option<Grant>> {
        let (reply, receiver) = oneshot::channel();
        self.note_demand(request.job_types.as_deref(), now);
        self.worker_record(&request.worker, "lease", now).seen(now);

        // No older waiter matches a waiting job (see the module docs), so this
        // request may take the best match directly.
        let found = match self.closed {
            true => None,
            false => self.best_ready(request.job_types.as_deref()),
        };
        let waiter = Waiter::Remote {
            worker: request.worker,
            job_types: request.job_types,
            deadline: now + request.wait,
            reply,
        };
        match found {
            // The receiver is still here, so this grant cannot be lost.
            Some(job_id) => {
                self.grant(waiter, &job_id, now);
            }
            None if request.wait.is_zero() || self.closed => {
                if let Waiter::Remote { reply, .. } = waiter {
                    let _ = reply.send(None);
                }
            }
            None => self.waiters.push_back(waiter),
        }
        receiver
    }

    /// Apply a worker's report. Any report from the lease holder renews the
    /// lease; `completed` and `failed` end it.
    pub fn report(&mut self, report: Report, now: Instant) -> ReportOutcome {
        if let Some(record) = self.workers.get_mut(&report.worker) {
            record.seen(now);
        }
        let Some(entry) = self.jobs.get_mut(&report.job_id) else {
            return self.ignore_report(&report, "unknown or finished job");
        };
        let JobState::Leased(lease) = &mut entry.state else {
            return self.ignore_report(&report, "job is not leased");
        };
        if lease.worker != report.worker || report.lease_id.is_some_and(|id| id != lease.id) {
            return self.ignore_report(&report, "job is leased to another worker or lease");
        }

        lease.expires = now + self.config.lease;
        let job_type = entry.job.job_type.clone();
        self.demand.insert(Some(job_type.clone()), now);
        match report.state {
            ReportState::Started | ReportState::Heartbeat => {}
            ReportState::Progress(progress) => self.publish(
                topics::JOB_PROGRESS,
                json!({"job_id": report.job_id, "job_type": job_type,
                       "worker": report.worker, "progress": progress}),
            ),
            ReportState::Completed(result) => self.complete(&report.job_id, result, now),
            ReportState::Failed(error) => self.fail_attempt(&report.job_id, "failed", &error, now),
        }
        ReportOutcome::Accepted
    }

    /// An in-process worker finished `job_id` with `outcome`.
    pub fn local_finished(
        &mut self,
        job_id: &str,
        worker: &str,
        lease_id: u64,
        outcome: Result<Value, String>,
        now: Instant,
    ) -> ReportOutcome {
        let state = match outcome {
            Ok(result) => ReportState::Completed(result),
            Err(error) => ReportState::Failed(error),
        };
        let report = Report {
            worker: worker.to_string(),
            job_id: job_id.to_string(),
            lease_id: Some(lease_id),
            state,
        };
        self.report(report, now)
    }

    /// Forget an in-process worker whose actor is gone: its free slots go,
    /// and what it holds is redelivered when its leases run out.
    pub fn remove_local(&mut self, worker: &str) {
        if self.local.remove(worker).is_some() {
            self.waiters.retain(|waiter| waiter.worker() != worker);
            tracing::warn!(worker, "in-process worker removed: its actor is gone");
        }
    }

    /// Renew the leases of in-process jobs whose handler is still running,
    /// given as (job id, lease id) pairs.
    pub fn renew_local<'a>(
        &mut self,
        running: impl IntoIterator<Item = (&'a str, u64)>,
        now: Instant,
    ) {
        for (job_id, lease_id) in running {
            if let Some(Entry {
                state: JobState::Leased(lease),
                ..
            }) = self.jobs.get_mut(job_id)
            {
                if lease.id == lease_id {
                    lease.expires = now + self.config.lease;
                }
            }
        }
    }

    /// Cancel a job that is waiting (also for a retry).
    ///
    /// # Errors
    ///
    /// `not_found` for a job the queue does not hold; `in_flight` for a job
    /// a worker holds.
    pub fn cancel(&mut self, job_id: &str) -> Result<(), HandlerError> {
        let Some(entry) = self.jobs.get(job_id) else {
            return Err(HandlerError::new(
                code::NOT_FOUND,
                format!("no queued job {job_id}"),
            ));
        };
        match entry.state {
            JobState::Leased(_) | JobState::Pushing => {
                return Err(HandlerError::new(
                    CODE_IN_FLIGHT,
                    format!("job {job_id} is in flight and can no longer be cancelled"),
                ));
            }
            JobState::Waiting | JobState::RetryAt(_) => {}
        }
        let entry = self.take_waiting(job_id).expect("checked above");
        self.counters.cancelled += 1;
        self.publish(
            topics::JOB_CANCELLED,
            json!({"job_id": entry.job.job_id, "job_type": entry.job.job_type}),
        );
        Ok(())
    }

    /// Expire leases and waiters, release retries that are due.
    pub fn tick(&mut self, now: Instant) {
        self.expire_leases(now);
        self.release_retries(now);
        self.expire_waiters(now);
        self.forget_idle_workers(now);
    }

    /// The PUSH edge took `job_id`: it is handed off, at most once.
    pub fn push_handed_off(&mut self, job_id: &str, now: Instant) {
        let Some(entry) = self.jobs.get(job_id) else {
            return;
        };
        if !matches!(entry.state, JobState::Pushing) {
            return;
        }
        let entry = self.jobs.remove(job_id).expect("present");
        self.in_flight.remove(job_id);
        self.counters.handed_off += 1;
        let record = self.worker_record(PUSH_WORKER, "push", now);
        record.leased += 1;
        record.seen(now);
        self.publish(
            topics::JOB_STARTED,
            json!({"job_id": entry.job.job_id, "job_type": entry.job.job_type,
                   "worker": PUSH_WORKER, "delivery": "at_most_once",
                   "retry_count": entry.job.retry_count}),
        );
    }

    /// The PUSH edge could not send `job_id`: it waits again, in its place,
    /// with its attempt count unchanged (it was never delivered).
    pub fn push_returned(&mut self, job_id: &str) {
        let Some(entry) = self.jobs.get(job_id) else {
            return;
        };
        if !matches!(entry.state, JobState::Pushing) {
            return;
        }
        self.in_flight.remove(job_id);
        self.counters.push_returned += 1;
        self.insert_ready(job_id);
    }

    /// Close the queue for shutdown: new jobs are refused with
    /// `shutting_down`, nothing more is handed out, waiting lease requests are
    /// answered with no job. Jobs in flight may still be reported, so they
    /// can finish within the drain deadline.
    pub fn close(&mut self) {
        self.closed = true;
        for waiter in self.waiters.drain(..) {
            if let Waiter::Remote { reply, .. } = waiter {
                let _ = reply.send(None);
            }
        }
    }

    /// Take every job the queue still holds (waiting, retrying or in
    /// flight) as dead letters, for a shutdown that must not lose them: the
    /// queue itself lives in memory, the dead letter store on disk, and
    /// `dgbit-bus dlq replay` brings them back. A job in flight is marked as
    /// such, since its worker may have run it.
    pub fn drain_to_dead_letters(&mut self) -> Vec<DeadLetter> {
        self.close();
        let ids: Vec<String> = self.jobs.keys().cloned().collect();
        let mut letters = Vec::with_capacity(ids.len());
        for id in ids {
            let in_flight = self.in_flight.contains(&id);
            let entry = match in_flight {
                true => self.jobs.remove(&id),
                false => self.take_waiting(&id),
            };
            let Some(entry) = entry else { continue };
            self.in_flight.remove(&id);
            let reason = match in_flight {
                true => "the bus shut down while the job was in flight; it may have run",
                false => "the bus shut down before the job ran",
            };
            self.counters.dead_lettered += 1;
            letters.push(DeadLetter::for_job(
                &entry.job,
                reason,
                DEAD_LETTER_SOURCE,
                entry.attempts,
            ));
        }
        letters
    }

    /// Count a dead letter the store refused, so the loss is visible.
    pub fn note_dead_letter_failure(&mut self) {
        self.counters.dead_letter_failures += 1;
    }

    /// Hand waiting jobs to waiters, oldest waiter first, then at most one to
    /// the PUSH edge when `push_ready`; also raises and clears the backlog
    /// alert.
    pub fn pump(&mut self, now: Instant, push_ready: bool) {
        if self.closed {
            return;
        }
        self.serve_waiters(now);
        if push_ready {
            if let Some(job_id) = self.best_pushable(now) {
                self.start_push(&job_id);
            }
        }
        self.check_backlog();
    }

    /// Counters, depth and per-worker figures as JSON.
    pub fn stats(&self, now: Instant) -> Value {
        let mut by_priority = Map::new();
        for priority in [0u8, 1, 2] {
            let count = self
                .ready
                .values()
                .map(|index| index.range((Reverse(priority), 0)..=(Reverse(priority), u64::MAX)))
                .map(|range| range.count())
                .sum::<usize>();
            by_priority.insert(priority.to_string(), count.into());
        }
        let workers: Map<String, Value> = self
            .workers
            .iter()
            .map(|(id, record)| {
                let mut value = json!({
                    "kind": record.kind,
                    "in_flight": record.in_flight,
                    "leased": record.leased,
                    "completed": record.completed,
                    "failed": record.failed,
                    "expired": record.expired,
                    "last_seen": record.last_seen_at,
                    "idle_ms": now.saturating_duration_since(record.last_seen).as_millis() as u64,
                });
                if let Some(local) = self.local.get(id) {
                    value["job_type"] = local.job_type.clone().into();
                    value["concurrency"] = local.concurrency.into();
                }
                if record.kind == "in_process" {
                    value["registered"] = self.local.contains_key(id).into();
                }
                (id.clone(), value)
            })
            .collect();
        let c = &self.counters;
        json!({
            "queue_depth": self.depth(),
            "waiting": self.ready_count,
            "waiting_retry": self.retry_at.len(),
            "in_flight": self.in_flight.len(),
            "capacity": self.config.capacity,
            "by_priority": by_priority,
            "lease_waiters": self.waiters.iter().filter(|w| matches!(w, Waiter::Remote { .. })).count(),
            "backlog_alert": self.backlog_raised,
            "closed": self.closed,
            "enqueued": c.enqueued,
            "duplicates": c.duplicates,
            "rejected_overloaded": c.rejected_overloaded,
            "completed": c.completed,
            "failed_attempts": c.failed_attempts,
            "redelivered": c.redelivered,
            "dead_lettered": c.dead_lettered,
            "cancelled": c.cancelled,
            "ignored_reports": c.ignored_reports,
            "handed_off_at_most_once": c.handed_off,
            "push_returned": c.push_returned,
            "lost_grants": c.lost_grants,
            "dead_letter_failures": c.dead_letter_failures,
            "workers": workers,
        })
    }

    // ---- transitions ----

    fn complete(&mut self, job_id: &str, result: Value, now: Instant) {
        let Some(entry) = self.jobs.remove(job_id) else {
            return;
        };
        self.in_flight.remove(job_id);
        let worker = self.release_lease(&entry, now);
        if let Some(record) = self.workers.get_mut(&worker) {
            record.completed += 1;
        }
        self.counters.completed += 1;
        self.publish(
            topics::JOB_COMPLETED,
            json!({"job_id": entry.job.job_id, "job_type": entry.job.job_type,
                   "worker": worker, "retry_count": entry.job.retry_count, "result": result}),
        );
    }

    /// End the current attempt of a leased job with `outcome` (`failed` or
    /// `lease_expired`): retry it, or bury it when its retries are spent.
    fn fail_attempt(&mut self, job_id: &str, outcome: &'static str, error: &str, now: Instant) {
        let Some(mut entry) = self.jobs.remove(job_id) else {
            return;
        };
        self.in_flight.remove(job_id);
        let worker = self.release_lease(&entry, now);
        if let Some(record) = self.workers.get_mut(&worker) {
            match outcome {
                "lease_expired" => record.expired += 1,
                _ => record.failed += 1,
            }
        }
        let started_at = match &entry.state {
            JobState::Leased(lease) => lease.started_at.clone(),
            _ => String::new(),
        };
        entry.attempts.push(json!({
            "attempt": entry.job.retry_count,
            "worker": worker,
            "started_at": started_at,
            "ended_at": now_rfc3339(),
            "outcome": outcome,
            "error": error,
        }));

        let will_retry = entry.job.retry_count < entry.job.max_retries;
        let expired = outcome == "lease_expired";
        let retry_delay = self.config.retry_delay(entry.job.retry_count + 1);
        if !expired || !will_retry {
            // A failed attempt, or a lost lease with no retry left (an
            // expired lease that is retried is redelivered at once instead).
            self.counters.failed_attempts += 1;
            let retry_in_ms = match will_retry {
                true => retry_delay.as_millis() as u64,
                false => 0,
            };
            self.publish(
                topics::JOB_FAILED,
                json!({"job_id": entry.job.job_id, "job_type": entry.job.job_type,
                       "worker": worker, "error": error, "retry_count": entry.job.retry_count,
                       "will_retry": will_retry, "retry_in_ms": retry_in_ms}),
            );
        }
        if !will_retry {
            self.bury(entry, error);
            return;
        }

        entry.job.retry_count += 1;
        let id = entry.job.job_id.clone();
        if expired {
            self.counters.redelivered += 1;
            self.jobs.insert(
                id.clone(),
                Entry {
                    state: JobState::Waiting,
                    ..entry
                },
            );
            self.make_ready(&id, "lease_expired");
        } else {
            let due = now + retry_delay;
            let seq = entry.seq;
            self.jobs.insert(
                id.clone(),
                Entry {
                    state: JobState::RetryAt(due),
                    ..entry
                },
            );
            self.retry_at.insert((due, seq), id);
        }
    }

    fn bury(&mut self, entry: Entry, error: &str) {
        self.counters.dead_lettered += 1;
        let reason = format!("gave up after {} attempt(s): {error}", entry.attempts.len());
        tracing::warn!(job_id = %entry.job.job_id, job_type = %entry.job.job_type,
            attempts = entry.attempts.len(), "job moved to the dead letter queue");
        let letter = DeadLetter::for_job(&entry.job, reason, DEAD_LETTER_SOURCE, entry.attempts);
        self.effects.push(Effect::Bury(letter));
    }

    /// Clear the lease of `entry` from its worker's counts; returns the
    /// worker that held it.
    fn release_lease(&mut self, entry: &Entry, now: Instant) -> String {
        let JobState::Leased(lease) = &entry.state else {
            return String::new();
        };
        if let Some(record) = self.workers.get_mut(&lease.worker) {
            record.in_flight = record.in_flight.saturating_sub(1);
            record.seen(now);
        }
        if lease.delivery == Delivery::InProcess && self.local.contains_key(&lease.worker) {
            self.waiters.push_back(Waiter::Local {
                worker: lease.worker.clone(),
            });
        }
        lease.worker.clone()
    }

    fn expire_leases(&mut self, now: Instant) {
        let expired: Vec<String> = self
            .in_flight
            .iter()
            .filter(|id| {
                matches!(self.jobs.get(*id),
                    Some(Entry { state: JobState::Leased(lease), .. }) if lease.expires <= now)
            })
            .cloned()
            .collect();
        for job_id in expired {
            tracing::warn!(job_id, "job lease ran out; redelivering");
            self.fail_attempt(
                &job_id,
                "lease_expired",
                "lease expired: the worker fell silent",
                now,
            );
        }
    }

    fn release_retries(&mut self, now: Instant) {
        while let Some(entry) = self.retry_at.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let job_id = entry.remove();
            if let Some(entry) = self.jobs.get_mut(&job_id) {
                entry.state = JobState::Waiting;
                self.make_ready(&job_id, "retry");
            }
        }
    }

    fn expire_waiters(&mut self, now: Instant) {
        let mut kept = VecDeque::with_capacity(self.waiters.len());
        for waiter in self.waiters.drain(..) {
            match waiter {
                Waiter::Remote {
                    deadline, reply, ..
                } if deadline <= now => {
                    let _ = reply.send(None);
                }
                Waiter::Remote { ref reply, .. } if reply.is_closed() => {}
                other => kept.push_back(other),
            }
        }
        self.waiters = kept;
    }

    fn forget_idle_workers(&mut self, now: Instant) {
        let local = &self.local;
        self.workers.retain(|id, record| {
            record.in_flight > 0
                || local.contains_key(id)
                || now.saturating_duration_since(record.last_seen) < IDLE_WORKER_FORGOTTEN_AFTER
        });
    }

    fn check_backlog(&mut self) {
        let threshold = self.config.backlog_alert;
        if threshold == 0 {
            return;
        }
        let depth = self.depth();
        if !self.backlog_raised && depth > threshold {
            self.backlog_raised = true;
            tracing::warn!(depth, threshold, "job backlog over the alert threshold");
            self.publish(
                topics::SYSTEM_ALERT,
                json!({"alert": "job_backlog", "active": true, "level": "warning",
                       "queue_depth": depth, "threshold": threshold,
                       "message": format!("job queue depth {depth} is over {threshold}")}),
            );
        } else if self.backlog_raised && depth <= threshold / 2 {
            self.backlog_raised = false;
            tracing::info!(depth, threshold, "job backlog cleared");
            self.publish(
                topics::SYSTEM_ALERT,
                json!({"alert": "job_backlog", "active": false, "level": "info",
                       "queue_depth": depth, "threshold": threshold,
                       "message": format!("job queue depth {depth} is back under {threshold}")}),
            );
        }
    }

    // ---- delivery ----

    fn serve_waiters(&mut self, now: Instant) {
        let mut index = 0;
        while index < self.waiters.len() && self.ready_count > 0 {
            let found = match &self.waiters[index] {
                Waiter::Remote { job_types, .. } => self.best_ready(job_types.as_deref()),
                Waiter::Local { worker } => match self.local.get(worker) {
                    Some(local) => self.best_ready(Some(std::slice::from_ref(&local.job_type))),
                    None => None,
                },
            };
            let Some(job_id) = found else {
                index += 1;
                continue;
            };
            // A waiter that could not take the job is gone; the job is back
            // in its place and the loop tries the next waiter.
            let waiter = self.waiters.remove(index).expect("index is in range");
            self.grant(waiter, &job_id, now);
        }
    }

    /// Lease `job_id` to `waiter`. Returns false when the waiter could not
    /// take the job (a remote requester that hung up, a local actor that is
    /// gone); the job is then waiting again in its place.
    fn grant(&mut self, waiter: Waiter, job_id: &str, now: Instant) -> bool {
        let Some(entry) = self.take_waiting(job_id) else {
            return false;
        };
        let lease_id = self.next_lease;
        self.next_lease += 1;
        let lease_ms = self.config.lease.as_millis() as u64;

        let (worker, delivery) = match waiter {
            Waiter::Remote { worker, reply, .. } => {
                let grant = Grant {
                    job: entry.job.clone(),
                    lease_id,
                    lease_ms,
                };
                if reply.send(Some(grant)).is_err() {
                    self.counters.lost_grants += 1;
                    self.restore_waiting(entry);
                    return false;
                }
                (worker, Delivery::Lease)
            }
            Waiter::Local { worker } => {
                let Some(local) = self.local.get(&worker) else {
                    self.restore_waiting(entry);
                    return false;
                };
                if !local.target.connected() {
                    self.restore_waiting(entry);
                    self.remove_local(&worker);
                    return false;
                }
                self.effects.push(Effect::RunLocal {
                    worker: worker.clone(),
                    target: local.target.clone(),
                    job: entry.job.clone(),
                    lease_id,
                });
                (worker, Delivery::InProcess)
            }
        };

        let kind = if delivery == Delivery::Lease {
            "lease"
        } else {
            "in_process"
        };
        let record = self.worker_record(&worker, kind, now);
        record.in_flight += 1;
        record.leased += 1;
        record.seen(now);
        self.publish(
            topics::JOB_STARTED,
            json!({"job_id": entry.job.job_id, "job_type": entry.job.job_type,
                   "worker": worker, "delivery": delivery.as_str(),
                   "retry_count": entry.job.retry_count, "lease_ms": lease_ms}),
        );
        let lease = Lease {
            id: lease_id,
            worker,
            delivery,
            expires: now + self.config.lease,
            started_at: now_rfc3339(),
        };
        self.in_flight.insert(job_id.to_string());
        self.jobs.insert(
            job_id.to_string(),
            Entry {
                state: JobState::Leased(lease),
                ..entry
            },
        );
        true
    }

    fn start_push(&mut self, job_id: &str) {
        let Some(mut entry) = self.take_waiting(job_id) else {
            return;
        };
        entry.state = JobState::Pushing;
        self.effects.push(Effect::Push(entry.job.clone()));
        self.in_flight.insert(job_id.to_string());
        self.jobs.insert(job_id.to_string(), entry);
    }

    /// The best waiting job a worker for `job_types` (`None`: any) may take.
    /// Types reserved for the PUSH edge are never leased.
    fn best_ready(&self, job_types: Option<&[String]>) -> Option<String> {
        let candidates: Box<dyn Iterator<Item = (&String, &BTreeMap<ReadyKey, String>)>> =
            match job_types {
                Some(types) => Box::new(
                    types
                        .iter()
                        .filter_map(|t| self.ready.get_key_value(t.as_str())),
                ),
                None => Box::new(self.ready.iter()),
            };
        candidates
            .filter(|(job_type, _)| !self.config.push_reserves(job_type))
            .filter_map(|(_, index)| index.first_key_value())
            .min_by_key(|(key, _)| **key)
            .map(|(_, job_id)| job_id.clone())
    }

    /// The best waiting job the PUSH edge may take now.
    fn best_pushable(&self, now: Instant) -> Option<String> {
        self.ready
            .iter()
            .filter(|(job_type, _)| self.pushable(job_type, now))
            .filter_map(|(_, index)| index.first_key_value())
            .min_by_key(|(key, _)| **key)
            .map(|(_, job_id)| job_id.clone())
    }

    /// Reserved types always go to the PUSH edge; with `*`, so does any type
    /// no worker asked for within the grace period.
    fn pushable(&self, job_type: &str, now: Instant) -> bool {
        if self.config.push_reserves(job_type) {
            return true;
        }
        if !self.config.push_takes_unclaimed() {
            return false;
        }
        if self.local.values().any(|local| local.job_type == job_type) {
            return false;
        }
        let recent = |key: Option<String>| {
            self.demand
                .get(&key)
                .is_some_and(|at| now.saturating_duration_since(*at) < self.config.push_grace)
        };
        !recent(None) && !recent(Some(job_type.to_string()))
    }

    fn note_demand(&mut self, job_types: Option<&[String]>, now: Instant) {
        match job_types {
            None => {
                self.demand.insert(None, now);
            }
            Some(types) => {
                for job_type in types {
                    self.demand.insert(Some(job_type.clone()), now);
                }
            }
        }
    }

    // ---- index upkeep ----

    /// Put a held job into the ready index and announce `job.queued`.
    fn make_ready(&mut self, job_id: &str, reason: &'static str) {
        self.insert_ready(job_id);
        let Some(entry) = self.jobs.get(job_id) else {
            return;
        };
        let data = json!({"job_id": entry.job.job_id, "job_type": entry.job.job_type,
                          "priority": u8::from(entry.job.priority),
                          "retry_count": entry.job.retry_count,
                          "reason": reason, "queue_depth": self.depth()});
        self.publish(topics::JOB_QUEUED, data);
    }

    fn insert_ready(&mut self, job_id: &str) {
        let Some(entry) = self.jobs.get_mut(job_id) else {
            return;
        };
        entry.state = JobState::Waiting;
        let key = (Reverse(u8::from(entry.job.priority)), entry.seq);
        let index = self.ready.entry(entry.job.job_type.clone()).or_default();
        if index.insert(key, job_id.to_string()).is_none() {
            self.ready_count += 1;
        }
    }

    /// Remove a waiting (or retry-waiting) job from the indexes and the map.
    fn take_waiting(&mut self, job_id: &str) -> Option<Entry> {
        let entry = self.jobs.get(job_id)?;
        match entry.state {
            JobState::Waiting => {
                let key = (Reverse(u8::from(entry.job.priority)), entry.seq);
                let job_type = entry.job.job_type.clone();
                if let Some(index) = self.ready.get_mut(&job_type) {
                    if index.remove(&key).is_some() {
                        self.ready_count -= 1;
                    }
                    if index.is_empty() {
                        self.ready.remove(&job_type);
                    }
                }
            }
            JobState::RetryAt(due) => {
                self.retry_at.remove(&(due, entry.seq));
            }
            JobState::Leased(_) | JobState::Pushing => return None,
        }
        self.jobs.remove(job_id)
    }

    fn restore_waiting(&mut self, entry: Entry) {
        let job_id = entry.job.job_id.clone();
        self.jobs.insert(
            job_id.clone(),
            Entry {
                state: JobState::Waiting,
                ..entry
            },
        );
        self.insert_ready(&job_id);
    }

    fn worker_record(
        &mut self,
        worker: &str,
        kind: &'static str,
        now: Instant,
    ) -> &mut WorkerRecord {
        self.workers
            .entry(worker.to_string())
            .or_insert_with(|| WorkerRecord::new(kind, now))
    }

    fn ignore_report(&mut self, report: &Report, reason: &'static str) -> ReportOutcome {
        self.counters.ignored_reports += 1;
        tracing::debug!(job_id = %report.job_id, worker = %report.worker, reason,
            "report ignored");
        ReportOutcome::Ignored { reason }
    }

    fn publish(&mut self, event_type: &'static str, data: Value) {
        self.effects.push(Effect::Publish { event_type, data });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Priority;

    const LEASE: Duration = Duration::from_secs(10);

    fn queue() -> JobQueue {
        JobQueue::new(QueueConfig {
            capacity: 100,
            lease: LEASE,
            backlog_alert: 0,
            retry_backoff_base: Duration::from_secs(1),
            retry_backoff_max: Duration::from_secs(8),
            push_job_types: BTreeSet::new(),
            push_grace: Duration::from_secs(5),
        })
    }

    fn job(job_type: &str, priority: Priority) -> JobMessage {
        JobMessage::new(job_type, json!({})).with_priority(priority)
    }

    fn request(worker: &str) -> LeaseRequest {
        LeaseRequest {
            worker: worker.into(),
            job_types: None,
            wait: Duration::ZERO,
        }
    }

    /// Lease one job for `worker` at `now`, as the dispatcher does.
    fn lease_now(queue: &mut JobQueue, worker: &str, now: Instant) -> Option<Grant> {
        let mut receiver = queue.lease(request(worker), now);
        queue.pump(now, false);
        receiver.try_recv().ok().flatten()
    }

    fn report(worker: &str, job_id: &str, state: ReportState) -> Report {
        Report {
            worker: worker.into(),
            job_id: job_id.into(),
            lease_id: None,
            state,
        }
    }

    fn events(queue: &mut JobQueue) -> Vec<(&'static str, Value)> {
        queue
            .take_effects()
            .into_iter()
            .filter_map(|effect| match effect {
                Effect::Publish { event_type, data } => Some((event_type, data)),
                _ => None,
            })
            .collect()
    }

    fn buried(queue: &mut JobQueue) -> Vec<DeadLetter> {
        queue
            .take_effects()
            .into_iter()
            .filter_map(|effect| match effect {
                Effect::Bury(letter) => Some(letter),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn jobs_come_out_by_priority_then_in_arrival_order() {
        let mut queue = queue();
        let now = Instant::now();
        let order = [
            ("a", Priority::Normal),
            ("b", Priority::Urgent),
            ("c", Priority::High),
            ("d", Priority::Urgent),
            ("e", Priority::Normal),
        ];
        let mut ids = HashMap::new();
        for (name, priority) in order {
            ids.insert(queue.enqueue(job("t", priority)).unwrap(), name);
        }
        let leased: Vec<&str> = (0..5)
            .map(|_| ids[lease_now(&mut queue, "w", now).unwrap().job.job_id.as_str()])
            .collect();
        assert_eq!(leased, ["b", "d", "c", "a", "e"]);
        assert!(lease_now(&mut queue, "w", now).is_none());
    }

    #[test]
    fn a_full_queue_refuses_with_overloaded_and_counts_it() {
        let mut queue = queue();
        for _ in 0..100 {
            queue.enqueue(job("t", Priority::Normal)).unwrap();
        }
        let err = queue.enqueue(job("t", Priority::Normal)).unwrap_err();
        assert_eq!(err.code, code::OVERLOADED);
        assert_eq!(queue.stats(Instant::now())["rejected_overloaded"], json!(1));
        assert_eq!(queue.depth(), 100);
    }

    #[test]
    fn the_same_job_id_enqueued_twice_is_held_once() {
        let mut queue = queue();
        let first = job("t", Priority::Normal);
        queue.enqueue(first.clone()).unwrap();
        assert_eq!(queue.enqueue(first).unwrap().len(), 36);
        assert_eq!(queue.depth(), 1);
        assert_eq!(queue.stats(Instant::now())["duplicates"], json!(1));
    }

    #[test]
    fn an_expired_lease_redelivers_the_job_with_one_more_retry() {
        let mut queue = queue();
        let now = Instant::now();
        let id = queue.enqueue(job("t", Priority::Normal)).unwrap();
        let first = lease_now(&mut queue, "dies", now).unwrap();
        assert_eq!(first.job.retry_count, 0);
        queue.take_effects();

        queue.tick(now + LEASE - Duration::from_millis(1));
        assert!(
            lease_now(&mut queue, "other", now).is_none(),
            "still leased"
        );
        queue.tick(now + LEASE);
        let seen = events(&mut queue);
        assert!(seen
            .iter()
            .any(|(t, d)| *t == "job.queued" && d["reason"] == "lease_expired"));
        assert!(
            !seen.iter().any(|(t, _)| *t == "job.failed"),
            "redelivery is not a failure"
        );

        let second = lease_now(&mut queue, "other", now + LEASE).unwrap();
        assert_eq!(second.job.job_id, id);
        assert_eq!(second.job.retry_count, 1);
        assert_ne!(second.lease_id, first.lease_id);
    }

    #[test]
    fn any_report_from_the_holder_renews_the_lease() {
        let mut queue = queue();
        let now = Instant::now();
        let id = queue.enqueue(job("t", Priority::Normal)).unwrap();
        lease_now(&mut queue, "w", now).unwrap();
        let later = now + LEASE - Duration::from_secs(1);
        assert_eq!(
            queue.report(report("w", &id, ReportState::Heartbeat), later),
            ReportOutcome::Accepted
        );
        queue.tick(now + LEASE + Duration::from_secs(1));
        assert_eq!(queue.in_flight(), 1, "the heartbeat kept the lease");
        queue.tick(later + LEASE);
        assert_eq!(queue.in_flight(), 0);
    }

    #[test]
    fn a_failed_job_waits_for_its_backoff_before_it_is_leased_again() {
        let mut queue = queue();
        let now = Instant::now();
        let id = queue.enqueue(job("t", Priority::Normal)).unwrap();
        lease_now(&mut queue, "w", now).unwrap();
        queue.take_effects();
        queue.report(report("w", &id, ReportState::Failed("boom".into())), now);
        let failed = events(&mut queue);
        let (_, data) = failed.iter().find(|(t, _)| *t == "job.failed").unwrap();
        assert_eq!(data["will_retry"], json!(true));
        assert_eq!(data["retry_in_ms"], json!(1000));

        queue.tick(now + Duration::from_millis(999));
        assert!(lease_now(&mut queue, "w", now + Duration::from_millis(999)).is_none());
        queue.tick(now + Duration::from_secs(1));
        let grant = lease_now(&mut queue, "w", now + Duration::from_secs(1)).unwrap();
        assert_eq!(grant.job.retry_count, 1);
    }

    #[test]
    fn retry_delays_double_up_to_the_cap() {
        let config = queue().config().clone();
        let delays: Vec<u64> = (1..=6).map(|n| config.retry_delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 8, 8]);
    }

    #[test]
    fn a_job_that_keeps_failing_is_buried_with_its_attempt_history_after_max_retries() {
        let mut queue = queue();
        let mut now = Instant::now();
        let id = queue
            .enqueue(job("t", Priority::Normal).with_max_retries(2))
            .unwrap();
        let mut letters = Vec::new();
        for attempt in 0..3 {
            let grant = lease_now(&mut queue, "w", now).expect("a retry is due");
            assert_eq!(grant.job.retry_count, attempt);
            if attempt == 1 {
                // The second attempt dies silently instead.
                now += LEASE;
                queue.tick(now);
            } else {
                queue.report(
                    report("w", &id, ReportState::Failed(format!("boom {attempt}"))),
                    now,
                );
            }
            letters.extend(buried(&mut queue));
            now += Duration::from_secs(60);
            queue.tick(now);
        }
        assert_eq!(letters.len(), 1);
        let letter = &letters[0];
        assert_eq!(letter.original_job["job_id"], json!(id));
        assert_eq!(letter.original_job["retry_count"], json!(2));
        assert!(
            letter.error.contains("3 attempt(s)") && letter.error.contains("boom 2"),
            "{}",
            letter.error
        );
        let outcomes: Vec<&Value> = letter.attempts.iter().map(|a| &a["outcome"]).collect();
        assert_eq!(
            outcomes,
            [&json!("failed"), &json!("lease_expired"), &json!("failed")]
        );
        assert_eq!(queue.depth() + queue.in_flight(), 0);
        assert_eq!(queue.stats(now)["dead_lettered"], json!(1));
    }

    #[test]
    fn late_and_duplicate_reports_are_ignored_and_counted() {
        let mut queue = queue();
        let now = Instant::now();
        let id = queue.enqueue(job("t", Priority::Normal)).unwrap();
        let first = lease_now(&mut queue, "slow", now).unwrap();
        queue.tick(now + LEASE);
        let second = lease_now(&mut queue, "fast", now + LEASE).unwrap();

        let late = queue.report(
            report("slow", &id, ReportState::Completed(json!(1))),
            now + LEASE,
        );
        assert!(matches!(late, ReportOutcome::Ignored { .. }));
        let stale_lease = Report {
            lease_id: Some(first.lease_id),
            ..report("fast", &id, ReportState::Heartbeat)
        };
        assert!(matches!(
            queue.report(stale_lease, now + LEASE),
            ReportOutcome::Ignored { .. }
        ));

        let done = Report {
            lease_id: Some(second.lease_id),
            ..report("fast", &id, ReportState::Completed(json!(2)))
        };
        assert_eq!(
            queue.report(done.clone(), now + LEASE),
            ReportOutcome::Accepted
        );
        assert!(matches!(
            queue.report(done, now + LEASE),
            ReportOutcome::Ignored { .. }
        ));

        let completed = events(&mut queue)
            .into_iter()
            .filter(|(t, _)| *t == "job.completed")
            .count();
        assert_eq!(completed, 1);
        let stats = queue.stats(now + LEASE);
        assert_eq!(stats["ignored_reports"], json!(3));
        assert_eq!(stats["completed"], json!(1));
    }

    #[test]
    fn cancelling_a_waiting_job_removes_it_and_an_in_flight_one_is_refused() {
        let mut queue = queue();
        let now = Instant::now();
        let running = queue.enqueue(job("t", Priority::High)).unwrap();
        let waiting = queue.enqueue(job("t", Priority::Normal)).unwrap();
        lease_now(&mut queue, "w", now).unwrap();
        queue.take_effects();

        queue.cancel(&waiting).unwrap();
        assert_eq!(events(&mut queue)[0].0, "job.cancelled");
        assert_eq!(queue.depth(), 0);
        assert_eq!(queue.cancel(&running).unwrap_err().code, CODE_IN_FLIGHT);
        assert_eq!(queue.cancel(&waiting).unwrap_err().code, code::NOT_FOUND);
    }

    #[test]
    fn a_waiting_lease_gets_the_next_job_and_an_idle_one_gets_none_after_its_wait() {
        let mut queue = queue();
        let now = Instant::now();
        let wait = Duration::from_secs(2);
        let mut first = queue.lease(
            LeaseRequest {
                wait,
                ..request("a")
            },
            now,
        );
        let mut second = queue.lease(
            LeaseRequest {
                wait,
                ..request("b")
            },
            now,
        );
        queue.pump(now, false);
        assert!(first.try_recv().is_err(), "nothing to lease yet");

        let id = queue.enqueue(job("t", Priority::Normal)).unwrap();
        queue.pump(now, false);
        assert_eq!(
            first.try_recv().unwrap().unwrap().job.job_id,
            id,
            "first come, first served"
        );
        queue.tick(now + wait);
        assert_eq!(second.try_recv().unwrap(), None);
    }

    #[test]
    fn a_lease_requester_that_hung_up_loses_no_job() {
        let mut queue = queue();
        let now = Instant::now();
        let gone = queue.lease(
            LeaseRequest {
                wait: Duration::from_secs(2),
                ..request("gone")
            },
            now,
        );
        drop(gone);
        queue.enqueue(job("t", Priority::Normal)).unwrap();
        queue.pump(now, false);
        assert_eq!(queue.depth(), 1);
        assert!(lease_now(&mut queue, "alive", now).is_some());
    }

    #[test]
    fn a_lease_for_given_types_takes_only_those() {
        let mut queue = queue();
        let now = Instant::now();
        queue.enqueue(job("backtest", Priority::Urgent)).unwrap();
        let fetch = queue.enqueue(job("fetch", Priority::Normal)).unwrap();
        let typed = LeaseRequest {
            job_types: Some(vec!["fetch".into()]),
            ..request("w")
        };
        let mut receiver = queue.lease(typed, now);
        assert_eq!(receiver.try_recv().unwrap().unwrap().job.job_id, fetch);
    }

    #[test]
    fn the_push_edge_gets_reserved_types_and_unclaimed_ones_after_the_grace() {
        let mut config = queue().config().clone();
        config.push_job_types = BTreeSet::from(["*".to_string(), "python".to_string()]);
        let mut queue = JobQueue::new(config);
        let now = Instant::now();
        let pushed = |queue: &mut JobQueue| -> Vec<String> {
            queue
                .take_effects()
                .into_iter()
                .filter_map(|e| match e {
                    Effect::Push(job) => Some(job.job_type),
                    _ => None,
                })
                .collect()
        };

        // A leasing worker asks for `fetch`, so only `python` may be pushed.
        let _waiting = queue.lease(
            LeaseRequest {
                job_types: Some(vec!["fetch".into()]),
                ..request("w")
            },
            now,
        );
        queue.enqueue(job("fetch", Priority::Urgent)).unwrap();
        assert!(
            lease_now(&mut queue, "any", now).is_some(),
            "fetch is leased normally"
        );
        let python = queue.enqueue(job("python", Priority::Normal)).unwrap();
        assert!(
            lease_now(&mut queue, "any", now).is_none(),
            "reserved types are never leased"
        );
        queue.enqueue(job("fetch", Priority::Normal)).unwrap();
        queue.take_effects();
        queue.pump(now, true);
        assert_eq!(pushed(&mut queue), ["python"]);
        queue.push_handed_off(&python, now);

        // Nobody asked for anything lately: unclaimed `fetch` goes too.
        let later = now + Duration::from_secs(6);
        queue.pump(later, true);
        assert_eq!(pushed(&mut queue), ["fetch"]);
        assert_eq!(queue.stats(later)["handed_off_at_most_once"], json!(1));
    }

    #[test]
    fn a_returned_push_waits_again_in_its_place_without_a_retry() {
        let mut config = queue().config().clone();
        config.push_job_types = BTreeSet::from(["t".to_string()]);
        let mut queue = JobQueue::new(config);
        let now = Instant::now();
        let first = queue.enqueue(job("t", Priority::Normal)).unwrap();
        queue.enqueue(job("t", Priority::Normal)).unwrap();
        queue.pump(now, true);
        queue.push_returned(&first);
        queue.take_effects();
        queue.pump(now, true);
        let again: Vec<JobMessage> = queue
            .take_effects()
            .into_iter()
            .filter_map(|e| match e {
                Effect::Push(job) => Some(job),
                _ => None,
            })
            .collect();
        assert_eq!(again[0].job_id, first);
        assert_eq!(again[0].retry_count, 0);
    }

    #[test]
    fn a_closed_queue_refuses_jobs_and_hands_none_out_but_takes_reports() {
        let mut queue = queue();
        let now = Instant::now();
        let running = queue.enqueue(job("t", Priority::Normal)).unwrap();
        lease_now(&mut queue, "w", now).unwrap();
        let mut waiting = queue.lease(
            LeaseRequest {
                wait: LEASE,
                ..request("idle")
            },
            now,
        );
        // Queued but not yet handed out when the queue closes.
        queue.enqueue(job("t", Priority::Normal)).unwrap();
        queue.close();
        assert_eq!(
            waiting.try_recv().unwrap(),
            None,
            "waiting leases are let go"
        );
        assert!(lease_now(&mut queue, "w", now).is_none());
        assert_eq!(queue.depth(), 1, "the waiting job stays");
        let refused = queue.enqueue(job("t", Priority::Normal)).unwrap_err();
        assert_eq!(refused.code, code::SHUTTING_DOWN);
        let done = report("w", &running, ReportState::Completed(json!(1)));
        assert_eq!(queue.report(done, now), ReportOutcome::Accepted);
        assert_eq!(queue.in_flight(), 0);
    }

    #[test]
    fn the_backlog_alert_fires_once_and_clears_at_half_the_threshold() {
        let mut config = queue().config().clone();
        config.backlog_alert = 4;
        let mut queue = JobQueue::new(config);
        let now = Instant::now();
        let mut alerts = Vec::new();
        let collect = |queue: &mut JobQueue, alerts: &mut Vec<Value>| {
            queue.pump(now, false);
            alerts.extend(
                events(queue)
                    .into_iter()
                    .filter(|(t, _)| *t == "system.alert")
                    .map(|(_, d)| d["active"].clone()),
            );
        };
        for _ in 0..6 {
            queue.enqueue(job("t", Priority::Normal)).unwrap();
            collect(&mut queue, &mut alerts);
        }
        assert_eq!(alerts, [json!(true)], "raised once, at depth 5");
        for _ in 0..4 {
            lease_now(&mut queue, "w", now).unwrap();
            collect(&mut queue, &mut alerts);
        }
        assert_eq!(alerts, [json!(true), json!(false)], "cleared at depth 2");
    }
}
