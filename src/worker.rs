//! `JobWorker`: a worker process that takes jobs from a bus and runs them
//! with handler actors, reporting every outcome back.
//!
//! # The outcome-report protocol
//!
//! Any process that can send REQ requests to the command bus
//! (`NNG_COMMAND_ADDRESS`) can be an at-least-once worker; this is what
//! `JobWorker` does, and what `tests/python/lease_worker.py` does with pynng.
//! Requests and replies are the command bus's usual JSON (`{"command", "payload"}` in,
//! `{"status": "ok", "result"}` or `{"status": "error", "error", "code"}` out).
//!
//! 1. **Lease.** For each free slot, send
//!    `{"command": "bus.lease", "payload": {"worker": ID, "job_types": [..], "wait_ms": 5000}}`.
//!    `worker` names this process (unique on the bus, stable while it runs);
//!    `job_types` lists what it can run (leave it out for any type);
//!    `wait_ms` (at most 5000) is how long the bus may hold the request when
//!    no job waits. The result is `{"job": null}` (ask again) or
//!    `{"job": JOB, "lease_ms": N, "lease_id": L}`, where `JOB` is dgbit's
//!    7-key job object. Ask only when a slot is free: that is what keeps a
//!    slow worker from hoarding jobs. Use a client timeout longer than
//!    `wait_ms`.
//! 2. **Report.** Send `bus.report` with payload
//!    `{"worker": ID, "job_id": ..., "lease_id": L, "state": S, ...}`:
//!    - `"started"` when the handler starts (optional: the bus publishes
//!      `job.started` when it grants the lease; `JobWorker` skips it);
//!    - `"heartbeat"` at least every `lease_ms / 3` while it runs;
//!    - `"progress"` with `"progress": <any JSON>` whenever there is some
//!      (published as `job.progress`);
//!    - `"completed"` with `"result": <any JSON>` at the end (published as
//!      `job.completed`), or
//!    - `"failed"` with `"error": "<text>"` (retried with backoff until
//!      `max_retries`, then dead-lettered).
//!
//!    A `completed` or `failed` report may ask for the slot's next job in
//!    the same round trip: add `"next": {"job_types": [..]}` (the fields of
//!    `bus.lease`; the worker is the report's). The reply then carries
//!    `"next"`, which is exactly a `bus.lease` reply. It is answered at once
//!    (`wait_ms` is ignored, so the report's acknowledgement is never held
//!    back): on `{"job": null}`, ask with `bus.lease` as usual. While there
//!    is work, a worker so makes one round trip per job.
//!
//!    Every report renews the lease for another `lease_ms`. The reply is
//!    `{"accepted": true}`, or `{"accepted": false, "reason"}` when the job
//!    is no longer leased to this worker (the lease ran out and the job went
//!    elsewhere, or it was already reported): stop working on it, and do not
//!    retry the report. `lease_id` is optional but recommended: it makes a
//!    report from an old lease of the same job count as late.
//! 3. **Silence is death.** A worker that sends nothing for `lease_ms`
//!    loses the job: it is redelivered with `retry_count + 1`. So a job can
//!    run more than once (at least once); handlers should be idempotent.
//!
//! # Shutdown
//!
//! [`JobWorker::run`] stops when its `shutdown` future resolves: no slot asks
//! for new work, lease requests already sent are let finish (so a job the
//! bus granted is not stranded until its lease runs out; this takes up to
//! `lease_wait`), running jobs finish and are reported, then `run` returns.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures::future::{join, join_all};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::client::{BusClient, ClientError, ClientOptions};
use crate::message::{Command, ProgressReporter, RunJob};
use crate::wire::JobMessage;

/// The longest wait the bus grants a lease request.
pub const MAX_LEASE_WAIT: Duration = crate::dispatcher::MAX_LEASE_WAIT;

/// How many times a final report is retried when the bus cannot be reached.
const FINAL_REPORT_ATTEMPTS: u32 = 3;

/// Why the worker could not talk to the bus.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The command bus could not be reached, or did not answer in time.
    #[error("command bus: {0}")]
    Client(#[from] ClientError),
    /// The bus answered with an error.
    #[error("{code}: {message}")]
    Remote {
        /// The reply's machine code.
        code: String,
        /// The reply's text.
        message: String,
    },
    /// The in-process command target is gone.
    #[error("the command target is gone: {0}")]
    Gone(String),
}

/// How a [`JobWorker`] behaves.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// This worker's name on the bus. Default `<host>-<pid>`.
    pub worker_id: String,
    /// Jobs run at once (lease slots). Default 1.
    pub concurrency: usize,
    /// How long one lease request may wait for a job (at most 5 s).
    /// Default 5 s.
    pub lease_wait: Duration,
    /// Pause after a failed lease request, doubling up to 5 s. Default
    /// 200 ms.
    pub error_backoff: Duration,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            worker_id: default_worker_id(),
            concurrency: 1,
            lease_wait: MAX_LEASE_WAIT,
            error_backoff: Duration::from_millis(200),
        }
    }
}

/// `<host>-<pid>`: unique on one bus as long as host names are.
pub fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "worker".into());
    format!("{host}-{}", std::process::id())
}

/// Where the worker sends its `bus.*` commands.
#[derive(Clone)]
pub enum CommandChannel {
    /// A remote bus, through a REQ client.
    Remote(Arc<BusClient>),
    /// A dispatcher in this process (for tests and embedded use).
    Local(Recipient<Command>),
}

impl CommandChannel {
    /// Run `command` and return its result.
    ///
    /// # Errors
    ///
    /// [`WorkerError::Client`] when the bus cannot be reached or times out,
    /// [`WorkerError::Remote`] for an error reply, [`WorkerError::Gone`] when
    /// an in-process target is gone.
    pub async fn call(&self, command: &str, payload: Value) -> Result<Value, WorkerError> {
        match self {
            CommandChannel::Remote(client) => match client.call(command, payload).await {
                Ok(value) => Ok(value),
                Err(ClientError::Remote { code, message }) => {
                    Err(WorkerError::Remote { code, message })
                }
                Err(err) => Err(WorkerError::Client(err)),
            },
            CommandChannel::Local(target) => {
                match target.send(Command::new(command, payload)).await {
                    Ok(Ok(value)) => Ok(value),
                    Ok(Err(err)) => Err(WorkerError::Remote {
                        code: err.code,
                        message: err.message,
                    }),
                    Err(err) => Err(WorkerError::Gone(err.to_string())),
                }
            }
        }
    }
}

/// What a worker did, returned by [`JobWorker::run`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct WorkerSummary {
    /// Jobs leased.
    pub leased: u64,
    /// Jobs completed (and accepted by the bus).
    pub completed: u64,
    /// Jobs failed (and accepted by the bus).
    pub failed: u64,
    /// Reports the bus answered with `accepted: false`.
    pub reports_ignored: u64,
    /// Reports that could not be delivered at all.
    pub reports_lost: u64,
    /// Lease requests that failed (bus unreachable, timeout).
    pub lease_errors: u64,
}

#[derive(Default)]
struct Counters {
    leased: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    reports_ignored: AtomicU64,
    reports_lost: AtomicU64,
    lease_errors: AtomicU64,
}

impl Counters {
    fn summary(&self) -> WorkerSummary {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        WorkerSummary {
            leased: get(&self.leased),
            completed: get(&self.completed),
            failed: get(&self.failed),
            reports_ignored: get(&self.reports_ignored),
            reports_lost: get(&self.reports_lost),
            lease_errors: get(&self.lease_errors),
        }
    }
}

/// A leased job, as `bus.lease` returned it.
struct Leased {
    job: JobMessage,
    lease_id: Option<u64>,
    lease: Duration,
}

/// A worker process: leases jobs from a bus and runs them with handler
/// actors registered per job type. See the module docs.
pub struct JobWorker {
    channel: CommandChannel,
    options: WorkerOptions,
    handlers: HashMap<String, Recipient<RunJob>>,
    counters: Arc<Counters>,
    stopping: Arc<AtomicBool>,
}

impl JobWorker {
    /// A worker for the bus whose command bus is at `url`.
    ///
    /// # Errors
    ///
    /// [`WorkerError::Client`] when the bus cannot be dialed after the
    /// client's connect attempts.
    pub async fn connect(
        url: &str,
        options: WorkerOptions,
        client: ClientOptions,
    ) -> Result<Self, WorkerError> {
        // A lease request waits up to `lease_wait` on the bus; the client
        // must outlast it.
        let floor = options.lease_wait.min(MAX_LEASE_WAIT) + Duration::from_secs(5);
        let client = ClientOptions {
            timeout: client.timeout.max(floor),
            ..client
        };
        let client = BusClient::connect(url, client).await?;
        Ok(Self::with_channel(
            CommandChannel::Remote(Arc::new(client)),
            options,
        ))
    }

    /// A worker that talks to the command target `channel`.
    pub fn with_channel(channel: CommandChannel, options: WorkerOptions) -> Self {
        Self {
            channel,
            options,
            handlers: HashMap::new(),
            counters: Arc::default(),
            stopping: Arc::default(),
        }
    }

    /// Run jobs of `job_type` with `handler`.
    pub fn handler(mut self, job_type: impl Into<String>, handler: Recipient<RunJob>) -> Self {
        self.handlers.insert(job_type.into(), handler);
        self
    }

    /// This worker's name on the bus.
    pub fn worker_id(&self) -> &str {
        &self.options.worker_id
    }

    /// Lease and run jobs until `shutdown` resolves, then drain; see the
    /// module docs.
    ///
    /// # Cancellation
    ///
    /// Dropping the future abandons running jobs and pending lease requests;
    /// the bus redelivers what this worker held once its leases run out.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> WorkerSummary {
        let job_types: Vec<String> = self.handlers.keys().cloned().collect();
        info!(worker = %self.options.worker_id, concurrency = self.options.concurrency,
            job_types = ?job_types, "job worker started");
        let slots = join_all((0..self.options.concurrency.max(1)).map(|slot| self.slot(slot)));
        let stopping = self.stopping.clone();
        let trigger = async move {
            shutdown.await;
            stopping.store(true, Ordering::Relaxed);
        };
        join(slots, trigger).await;
        let summary = self.counters.summary();
        info!(worker = %self.options.worker_id, completed = summary.completed,
            failed = summary.failed, "job worker stopped");
        summary
    }

    /// Lease and run jobs, one at a time, until told to stop. Each final
    /// report asks for the next job too; a job granted that way is run even
    /// when the worker is stopping, so it is not stranded until its lease
    /// runs out.
    async fn slot(&self, slot: usize) {
        let mut backoff = self.options.error_backoff;
        let mut next = None;
        loop {
            let leased = match next.take() {
                Some(leased) => Ok(Some(leased)),
                None if self.stopping.load(Ordering::Relaxed) => return,
                None => self.lease().await,
            };
            match leased {
                Ok(Some(leased)) => {
                    backoff = self.options.error_backoff;
                    next = self.run_job(leased).await;
                }
                Ok(None) => backoff = self.options.error_backoff,
                Err(err) => {
                    self.counters.lease_errors.fetch_add(1, Ordering::Relaxed);
                    warn!(worker = %self.options.worker_id, slot, error = %err,
                        delay_ms = backoff.as_millis() as u64, "lease request failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_LEASE_WAIT);
                }
            }
        }
    }

    /// The job types a lease asks for (`bus.lease`, or a final report's
    /// `next`).
    fn lease_fields(&self) -> Value {
        json!({"job_types": self.handlers.keys().collect::<Vec<_>>()})
    }

    async fn lease(&self) -> Result<Option<Leased>, WorkerError> {
        let mut payload = self.lease_fields();
        payload["worker"] = self.options.worker_id.clone().into();
        payload["wait_ms"] =
            (self.options.lease_wait.min(MAX_LEASE_WAIT).as_millis() as u64).into();
        let reply = self.channel.call("bus.lease", payload).await?;
        self.leased(&reply)
    }

    /// The job a `bus.lease` reply grants, if any.
    fn leased(&self, reply: &Value) -> Result<Option<Leased>, WorkerError> {
        let job = match reply.get("job") {
            None | Some(Value::Null) => return Ok(None),
            Some(job) => job.clone(),
        };
        let job = JobMessage::from_value(job).map_err(|err| WorkerError::Remote {
            code: err.code.into(),
            message: format!("the bus leased a job that is not valid: {err}"),
        })?;
        let lease_ms = reply
            .get("lease_ms")
            .and_then(Value::as_u64)
            .unwrap_or(30_000);
        self.counters.leased.fetch_add(1, Ordering::Relaxed);
        Ok(Some(Leased {
            job,
            lease_id: reply.get("lease_id").and_then(Value::as_u64),
            lease: Duration::from_millis(lease_ms.max(30)),
        }))
    }

    /// Run one leased job: keep the lease alive with heartbeats and
    /// progress while the handler runs, report the outcome; returns the
    /// next job, when the final report got one.
    async fn run_job(&self, leased: Leased) -> Option<Leased> {
        let Leased {
            job,
            lease_id,
            lease,
        } = leased;
        let job_id = job.job_id.clone();
        debug!(worker = %self.options.worker_id, job_id, job_type = %job.job_type, "job leased");
        let Some(handler) = self.handlers.get(&job.job_type).cloned() else {
            let error = format!("no handler for job type `{}`", job.job_type);
            return self.finish(&job_id, lease_id, Err(error)).await;
        };
        // No `started` report: the bus published `job.started` when it
        // granted the lease, and the first heartbeat renews it. One round
        // trip fewer per job (see BENCHMARKS.md, workload 5).

        let (progress_tx, mut progress_rx) = mpsc::unbounded_channel();
        let progress = ProgressReporter::new(move |value| {
            let _ = progress_tx.send(value);
        });
        let mut outcome = std::pin::pin!(handler.send(RunJob { job, progress }));
        // The first heartbeat is due a third of the lease from now. (Not
        // `interval` and a first `tick().await`: that first tick goes
        // through the timer wheel, which costs up to a millisecond per job.)
        let period = lease / 3;
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        let result = loop {
            tokio::select! {
                result = &mut outcome => break result,
                _ = heartbeat.tick() => {
                    self.report(&job_id, lease_id, json!({"state": "heartbeat"})).await;
                }
                Some(value) = progress_rx.recv() => {
                    self.report(&job_id, lease_id, json!({"state": "progress", "progress": value}))
                        .await;
                }
            }
        };
        // Reports made just before the handler returned are still queued:
        // send them before the outcome, so `job.progress` precedes
        // `job.completed` and none is lost.
        while let Ok(value) = progress_rx.try_recv() {
            self.report(
                &job_id,
                lease_id,
                json!({"state": "progress", "progress": value}),
            )
            .await;
        }
        let outcome = match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => Err(err.message),
            Err(err) => Err(format!("the job handler is unavailable: {err}")),
        };
        self.finish(&job_id, lease_id, outcome).await
    }

    /// Report the final outcome, asking for the slot's next job unless the
    /// worker is stopping, and retrying a lost report a few times: a report
    /// that never arrives costs a redelivery after the lease. Returns the
    /// next job, if the bus granted one.
    async fn finish(
        &self,
        job_id: &str,
        lease_id: Option<u64>,
        outcome: Result<Value, String>,
    ) -> Option<Leased> {
        let (mut payload, counter) = match outcome {
            Ok(result) => (
                json!({"state": "completed", "result": result}),
                &self.counters.completed,
            ),
            Err(error) => (
                json!({"state": "failed", "error": error}),
                &self.counters.failed,
            ),
        };
        if !self.stopping.load(Ordering::Relaxed) {
            payload["next"] = self.lease_fields();
        }
        for attempt in 1..=FINAL_REPORT_ATTEMPTS {
            match self.send_report(job_id, lease_id, payload.clone()).await {
                Ok(reply) => {
                    if accepted(&reply) {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    return self.next_from(&reply);
                }
                Err(err) if attempt < FINAL_REPORT_ATTEMPTS => {
                    warn!(job_id, attempt, error = %err, "final report failed; retrying");
                    tokio::time::sleep(self.options.error_backoff * attempt).await;
                }
                Err(err) => warn!(job_id, error = %err, "final report lost"),
            }
        }
        self.counters.reports_lost.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// The next job a final report's reply grants. A grant that is not a
    /// valid job is counted as a lease error; the slot then asks again.
    fn next_from(&self, reply: &Value) -> Option<Leased> {
        let next = reply.get("next")?;
        match self.leased(next) {
            Ok(leased) => leased,
            Err(err) => {
                self.counters.lease_errors.fetch_add(1, Ordering::Relaxed);
                warn!(worker = %self.options.worker_id, error = %err, "next job not usable");
                None
            }
        }
    }

    /// Send one report; false only when the bus said the job is no longer
    /// ours. A lost report is counted and the job carries on: the next
    /// report may still reach the bus within the lease.
    async fn report(&self, job_id: &str, lease_id: Option<u64>, fields: Value) -> bool {
        match self.send_report(job_id, lease_id, fields).await {
            Ok(reply) => accepted(&reply),
            Err(err) => {
                self.counters.reports_lost.fetch_add(1, Ordering::Relaxed);
                warn!(job_id, error = %err, "report lost");
                true
            }
        }
    }

    /// Send a report and return the bus's reply; a report the bus ignored
    /// (the job is no longer ours) is counted here.
    async fn send_report(
        &self,
        job_id: &str,
        lease_id: Option<u64>,
        fields: Value,
    ) -> Result<Value, WorkerError> {
        let mut payload = json!({"worker": self.options.worker_id, "job_id": job_id});
        if let Some(lease_id) = lease_id {
            payload["lease_id"] = lease_id.into();
        }
        if let (Value::Object(payload), Value::Object(fields)) = (&mut payload, fields) {
            payload.extend(fields);
        }
        let reply = self.channel.call("bus.report", payload).await?;
        if !accepted(&reply) {
            self.counters
                .reports_ignored
                .fetch_add(1, Ordering::Relaxed);
            debug!(job_id, reason = ?reply.get("reason"), "report ignored by the bus");
        }
        Ok(reply)
    }
}

/// Whether a `bus.report` reply accepted the report.
fn accepted(reply: &Value) -> bool {
    reply
        .get("accepted")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}
