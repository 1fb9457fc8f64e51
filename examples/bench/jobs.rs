//! Workload 5: no-op jobs through four workers, with and without
//! acknowledgements; jobs per second from the first enqueue to the last
//! completion (acks on) or receipt (acks off).
//!
//! - acks on, bus: four `JobWorker`s, each on an actix system of its own
//!   thread with one slot, leasing over the command bus and running a
//!   no-op handler actor: one `bus.lease`, then for each job one
//!   `bus.report` `completed` that leases the next job too (`next`), so one
//!   round trip per job while there is work. Jobs are enqueued in-process.
//! - acks on, raw: the same round trips with the same JSON bodies, from
//!   four threads with blocking REQ sockets to a bare REP server that pops
//!   job bodies from a `Mutex<VecDeque>` (no actors, no JSON decoding).
//! - acks off, bus: the bus's PUSH edge to four bare PULL threads; the job
//!   type is configured push-only, jobs are enqueued in-process.
//! - acks off, raw: a bare PUSH socket sending the same job bodies to the
//!   same four PULL threads.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use actix::prelude::*;
use anyhow::Context as _;
use dgbit_bus::client::ClientOptions;
use dgbit_bus::config::EdgeSet;
use dgbit_bus::message::{HandlerError, RunJob, StatsQuery};
use dgbit_bus::wire::JobMessage;
use dgbit_bus::worker::{JobWorker, WorkerOptions};
use nng::options::{Options, RecvTimeout, SendTimeout};
use nng::{Aio, AioResult, Message, Protocol, Socket};
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::cpu::{CpuSample, CpuUse};
use crate::raw::OPERATION_LIMIT;
use crate::server::{config_with, BusServer};
use crate::table::{Row, Target};
use crate::transport::Transport;
use crate::Budget;

/// Workers per run.
const WORKERS: usize = 4;

/// The job type every bench job has.
const JOB_TYPE: &str = "bench.noop";

/// How long a lease request may wait on the bus: short, so that a worker
/// told to stop is gone quickly.
const LEASE_WAIT: Duration = Duration::from_millis(200);

/// The longest one run may take before it counts what it has.
const RUN_LIMIT: Duration = Duration::from_secs(20);

/// What one run achieved.
#[derive(Debug, Clone, Copy, Default)]
struct JobRun {
    done: u64,
    elapsed: Duration,
}

impl JobRun {
    fn add(&mut self, other: JobRun) {
        self.done += other.done;
        self.elapsed += other.elapsed;
    }

    fn per_second(&self) -> f64 {
        self.done as f64 / self.elapsed.as_secs_f64()
    }
}

/// Jobs per run: enough for a few hundred milliseconds at the rates seen
/// on this machine.
fn jobs_per_run(budget: &Budget) -> u64 {
    if budget.quick {
        300
    } else {
        1000
    }
}

/// A handler that does nothing but count.
struct Noop {
    ran: Arc<AtomicU64>,
}

impl Actor for Noop {
    type Context = Context<Self>;
}

impl Handler<RunJob> for Noop {
    type Result = Result<Value, HandlerError>;

    fn handle(&mut self, _: RunJob, _: &mut Self::Context) -> Self::Result {
        self.ran.fetch_add(1, Ordering::Relaxed);
        Ok(Value::Null)
    }
}

/// Four `JobWorker`s, each on its own thread and actix system.
struct LeaseWorkers {
    ran: Arc<AtomicU64>,
    stops: Vec<oneshot::Sender<()>>,
    threads: Vec<JoinHandle<()>>,
}

impl LeaseWorkers {
    fn start(url: &str) -> anyhow::Result<Self> {
        let mut workers = Self {
            ran: Arc::new(AtomicU64::new(0)),
            stops: Vec::new(),
            threads: Vec::new(),
        };
        let (ready_sender, ready) = std::sync::mpsc::channel();
        for index in 0..WORKERS {
            let (stop, stopped) = oneshot::channel::<()>();
            let (url, ready_sender) = (url.to_string(), ready_sender.clone());
            let ran = workers.ran.clone();
            let thread = std::thread::Builder::new()
                .name(format!("bench-worker-{index}"))
                .spawn(move || {
                    System::new().block_on(async move {
                        let options = WorkerOptions {
                            worker_id: format!("bench-worker-{index}"),
                            concurrency: 1,
                            lease_wait: LEASE_WAIT,
                            ..WorkerOptions::default()
                        };
                        let client = ClientOptions::default().timeout(OPERATION_LIMIT);
                        let worker = match JobWorker::connect(&url, options, client).await {
                            Ok(worker) => {
                                worker.handler(JOB_TYPE, Noop { ran }.start().recipient())
                            }
                            Err(err) => {
                                let _ = ready_sender.send(Err(err.to_string()));
                                return;
                            }
                        };
                        let _ = ready_sender.send(Ok(()));
                        worker
                            .run(async move {
                                let _ = stopped.await;
                            })
                            .await;
                    });
                })?;
            workers.stops.push(stop);
            workers.threads.push(thread);
        }
        for _ in 0..WORKERS {
            ready
                .recv_timeout(OPERATION_LIMIT)
                .context("a worker did not start")?
                .map_err(|why| anyhow::anyhow!("a worker could not connect: {why}"))?;
        }
        Ok(workers)
    }
}

impl Drop for LeaseWorkers {
    fn drop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Run `run`, returning its result and the CPU the process used meanwhile.
fn with_cpu(run: impl FnOnce() -> anyhow::Result<JobRun>) -> anyhow::Result<(JobRun, CpuUse)> {
    let sample = CpuSample::now();
    let outcome = run()?;
    Ok((outcome, CpuSample::now().since(&sample)))
}

/// Enqueue `count` jobs in-process, on the bus's thread.
fn enqueue(server: &BusServer, count: u64) -> anyhow::Result<()> {
    server.run(move |bus| async move {
        for _ in 0..count {
            bus.enqueue(JobMessage::new(JOB_TYPE, json!({})))
                .await
                .map_err(|err| anyhow::anyhow!("enqueue: {err}"))?;
        }
        anyhow::Ok(())
    })?
}

/// Wait until `done()` reaches `count` or the run's time is up.
fn wait_done(started: Instant, count: u64, done: impl Fn() -> u64) -> JobRun {
    let deadline = started + RUN_LIMIT;
    while done() < count && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(200));
    }
    JobRun {
        done: done(),
        elapsed: started.elapsed(),
    }
}

/// Acks on: enqueue `count` jobs, wait until the workers' handlers ran
/// them all. The last `completed` report is one round trip later; it is
/// checked, untimed, before the next run.
fn bus_lease_run(server: &BusServer, workers: &LeaseWorkers, count: u64) -> anyhow::Result<JobRun> {
    let before = workers.ran.load(Ordering::Relaxed);
    let acknowledged = || {
        server.run(|bus| async move {
            let stats = bus
                .dispatcher()
                .send(StatsQuery)
                .await
                .unwrap_or(Value::Null);
            stats["completed"].as_u64().unwrap_or(0)
        })
    };
    let acknowledged_before = acknowledged()?;
    let started = Instant::now();
    enqueue(server, count)?;
    let run = wait_done(started, count, || {
        workers.ran.load(Ordering::Relaxed) - before
    });
    let deadline = Instant::now() + OPERATION_LIMIT;
    while acknowledged()? - acknowledged_before < run.done {
        anyhow::ensure!(
            Instant::now() < deadline,
            "completions were not acknowledged"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(run)
}

/// Acks off: enqueue `count` push-only jobs, wait until the PULL workers
/// have them all.
fn bus_push_run(server: &BusServer, pull: &PullWorkers, count: u64) -> anyhow::Result<JobRun> {
    let before = pull.total();
    let started = Instant::now();
    enqueue(server, count)?;
    Ok(wait_done(started, count, || pull.total() - before))
}

/// Four bare PULL sockets on threads of their own, counting jobs.
struct PullWorkers {
    sockets: Vec<Socket>,
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl PullWorkers {
    fn dial(url: &str) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let mut workers = Self {
            sockets: Vec::new(),
            stop: stop.clone(),
            received: received.clone(),
            threads: Vec::new(),
        };
        for index in 0..WORKERS {
            let socket = Socket::new(Protocol::Pull0)?;
            socket.set_opt::<RecvTimeout>(Some(Duration::from_millis(50)))?;
            socket.dial_async(url)?;
            let (pull, stop, received) = (socket.clone(), stop.clone(), received.clone());
            workers.threads.push(
                std::thread::Builder::new()
                    .name(format!("bench-pull-{index}"))
                    .spawn(move || {
                        while !stop.load(Ordering::Acquire) {
                            match pull.recv() {
                                Ok(_) => {
                                    received.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(nng::Error::TimedOut) => {}
                                Err(_) => break,
                            }
                        }
                    })?,
            );
            workers.sockets.push(socket);
        }
        Ok(workers)
    }

    fn total(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Wait until `expected` jobs have arrived in all.
    fn wait_for(&self, expected: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + OPERATION_LIMIT;
        while self.total() < expected {
            anyhow::ensure!(
                Instant::now() < deadline,
                "PULL workers got {} of {expected}",
                self.total()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }
}

impl Drop for PullWorkers {
    fn drop(&mut self) {
        crate::raw::stop_socket_threads(&self.stop, &self.sockets, &mut self.threads);
    }
}

/// The raw PUSH baseline.
fn raw_push_run(push: &Socket, pull: &PullWorkers, count: u64) -> anyhow::Result<JobRun> {
    let before = pull.total();
    let bodies: Vec<Vec<u8>> = (0..count)
        .map(|_| JobMessage::new(JOB_TYPE, json!({})).encode())
        .collect();
    let started = Instant::now();
    for body in bodies {
        push.send(Message::from(&body[..]))
            .map_err(|(_, err)| err)?;
    }
    Ok(wait_done(started, count, || pull.total() - before))
}

/// A bare REP server speaking the lease protocol's traffic: a lease gets a
/// job body (or `{"job":null}`), a report gets `{"accepted":true}`.
struct RawLeaseServer {
    socket: Socket,
    stopping: Arc<AtomicBool>,
    queue: Arc<Mutex<VecDeque<Vec<u8>>>>,
    completed: Arc<AtomicU64>,
    aios: Vec<Aio>,
}

const LEASE_PREFIX: &[u8] = br#"{"command":"bus.lease""#;
const COMPLETED_MARK: &[u8] = br#""state":"completed""#;
const NEXT_MARK: &[u8] = br#""next":{"#;
const NO_NEXT_JOB: &[u8] = br#""next":{"job":null}}}"#;

impl RawLeaseServer {
    fn listen(url: &str) -> anyhow::Result<Self> {
        let socket = Socket::new(Protocol::Rep0)?;
        socket
            .listen(url)
            .with_context(|| format!("raw lease server listen {url}"))?;
        let stopping = Arc::new(AtomicBool::new(false));
        let queue = Arc::new(Mutex::new(VecDeque::new()));
        let completed = Arc::new(AtomicU64::new(0));
        let mut aios = Vec::new();
        for _ in 0..WORKERS * 2 {
            let ctx = nng::Context::new(&socket)?;
            let (stop, jobs, done) = (stopping.clone(), queue.clone(), completed.clone());
            let reply_ctx = ctx.clone();
            let aio = Aio::new(move |aio, result| {
                if stop.load(Ordering::Acquire) {
                    return;
                }
                match result {
                    AioResult::Recv(Ok(request)) => {
                        let reply = lease_reply(request.as_slice(), &jobs, &done);
                        if reply_ctx.send(&aio, Message::from(&reply[..])).is_err() {
                            let _ = reply_ctx.recv(&aio);
                        }
                    }
                    AioResult::Recv(Err(nng::Error::Closed)) => {}
                    AioResult::Recv(Err(_)) | AioResult::Send(_) => {
                        let _ = reply_ctx.recv(&aio);
                    }
                    AioResult::Sleep(_) => {}
                }
            })?;
            ctx.recv(&aio)?;
            aios.push(aio);
        }
        Ok(Self {
            socket,
            stopping,
            queue,
            completed,
            aios,
        })
    }
}

/// The reply to a lease, or to a report (leasing the next job when it has
/// `next`), built from the queued job objects by concatenation.
fn lease_reply(request: &[u8], jobs: &Mutex<VecDeque<Vec<u8>>>, completed: &AtomicU64) -> Vec<u8> {
    let contains = |mark: &[u8]| request.windows(mark.len()).any(|w| w == mark);
    let grant = || {
        let job = jobs.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
        match job {
            Some(job) => [
                br#"{"job":"#.as_slice(),
                &job,
                br#","lease_ms":30000,"lease_id":1}"#,
            ]
            .concat(),
            None => br#"{"job":null}"#.to_vec(),
        }
    };
    let result = if request.starts_with(LEASE_PREFIX) {
        grant()
    } else {
        if contains(COMPLETED_MARK) {
            completed.fetch_add(1, Ordering::Relaxed);
        }
        match contains(NEXT_MARK) {
            true => [br#"{"accepted":true,"next":"#.as_slice(), &grant(), b"}"].concat(),
            false => br#"{"accepted":true}"#.to_vec(),
        }
    };
    [
        br#"{"status":"ok","job_uuid":null,"result":"#.as_slice(),
        &result,
        b"}",
    ]
    .concat()
}

impl Drop for RawLeaseServer {
    fn drop(&mut self) {
        crate::raw::stop_aio_server(&self.stopping, &self.socket, &self.aios);
    }
}

/// Four threads with blocking REQ sockets: a lease, then a `completed`
/// report that leases the next job, for every job they get; idling briefly
/// on an empty queue. Outside their own runs they wait on [`Gate`], so
/// that their polling takes no CPU from the bus's runs.
struct RawLeaseWorkers {
    stop: Arc<AtomicBool>,
    gate: Arc<Gate>,
    threads: Vec<JoinHandle<()>>,
}

/// Open while the raw lease workers' run lasts.
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    changed: std::sync::Condvar,
}

impl Gate {
    fn set(&self, open: bool) {
        *self.open.lock().unwrap_or_else(|p| p.into_inner()) = open;
        self.changed.notify_all();
    }

    /// Wait until the gate is open or `stop` is set (checked every 100 ms).
    fn wait_open(&self, stop: &AtomicBool) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        while !*open && !stop.load(Ordering::Acquire) {
            open = match self.changed.wait_timeout(open, Duration::from_millis(100)) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }
}

impl RawLeaseWorkers {
    fn start(url: &str) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let gate = Arc::new(Gate::default());
        let mut threads = Vec::new();
        for index in 0..WORKERS {
            let socket = Socket::new(Protocol::Req0)?;
            socket.set_opt::<RecvTimeout>(Some(OPERATION_LIMIT))?;
            socket.set_opt::<SendTimeout>(Some(OPERATION_LIMIT))?;
            socket
                .dial(url)
                .with_context(|| format!("raw lease worker dial {url}"))?;
            let (stop, gate) = (stop.clone(), gate.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("bench-lease-{index}"))
                    .spawn(move || raw_lease_loop(&socket, index, &stop, &gate))?,
            );
        }
        Ok(Self {
            stop,
            gate,
            threads,
        })
    }
}

fn raw_lease_loop(socket: &Socket, index: usize, stop: &AtomicBool, gate: &Gate) {
    let worker = format!("bench-worker-{index}");
    let lease = json!({"command": "bus.lease", "payload":
        {"worker": worker, "job_types": [JOB_TYPE], "wait_ms": LEASE_WAIT.as_millis() as u64}});
    let lease = serde_json::to_vec(&lease).unwrap_or_default();
    let completed = json!({"command": "bus.report", "payload": {"worker": worker,
        "job_id": "00000000-0000-4000-8000-000000000000", "lease_id": 1, "state": "completed",
        "result": {}, "next": {"job_types": [JOB_TYPE]}}});
    let completed = serde_json::to_vec(&completed).unwrap_or_default();
    let call = |body: &[u8]| -> Option<Message> {
        socket.send(Message::from(body)).ok()?;
        socket.recv().ok()
    };
    let mut holding = false;
    while !stop.load(Ordering::Acquire) {
        if !holding {
            gate.wait_open(stop);
            let Some(reply) = call(&lease) else { return };
            if reply.as_slice().ends_with(br#"{"job":null}}"#) {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
        }
        let Some(reply) = call(&completed) else {
            return;
        };
        holding = !reply.as_slice().ends_with(NO_NEXT_JOB);
    }
}

impl Drop for RawLeaseWorkers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.gate.set(false);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// The raw lease baseline: fill the queue, wait until all are completed.
fn raw_lease_run(server: &RawLeaseServer, workers: &RawLeaseWorkers, count: u64) -> JobRun {
    let before = server.completed.load(Ordering::Relaxed);
    let bodies: Vec<Vec<u8>> = (0..count)
        .map(|_| JobMessage::new(JOB_TYPE, json!({})).encode())
        .collect();
    let started = Instant::now();
    server
        .queue
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .extend(bodies);
    workers.gate.set(true);
    let run = wait_done(started, count, || {
        server.completed.load(Ordering::Relaxed) - before
    });
    workers.gate.set(false);
    run
}

/// # Errors
///
/// When a socket cannot open or the workers cannot connect.
pub fn workers(budget: &Budget, transport: Transport) -> anyhow::Result<Vec<Row>> {
    let dir = tempfile::tempdir()?;
    let count = jobs_per_run(budget);

    // Acks on: the bus's lease protocol against its raw imitation.
    let lease_url = transport.url(dir.path(), "bus-cmd");
    let command_edge = EdgeSet {
        command: true,
        ..EdgeSet::NONE
    };
    let lease_bus = BusServer::start(config_with(command_edge).command_address(&lease_url))?;
    let lease_workers = LeaseWorkers::start(&lease_url)?;
    let raw_lease_url = transport.url(dir.path(), "raw-lease");
    let raw_lease = RawLeaseServer::listen(&raw_lease_url)?;
    let raw_lease_workers = RawLeaseWorkers::start(&raw_lease_url)?;

    // Acks off: the bus's PUSH edge against a bare PUSH socket.
    let push_url = transport.url(dir.path(), "bus-queue");
    let queue_edge = EdgeSet {
        job_queue: true,
        ..EdgeSet::NONE
    };
    let mut push_config = config_with(queue_edge).job_queue_address(&push_url);
    push_config.push_job_types = [JOB_TYPE.to_string()].into();
    let push_bus = BusServer::start(push_config)?;
    let bus_pull = PullWorkers::dial(&push_url)?;
    let raw_push_url = transport.url(dir.path(), "raw-queue");
    let raw_push = Socket::new(Protocol::Push0)?;
    raw_push.set_opt::<SendTimeout>(Some(OPERATION_LIMIT))?;
    raw_push
        .listen(&raw_push_url)
        .with_context(|| format!("raw PUSH listen {raw_push_url}"))?;
    let raw_pull = PullWorkers::dial(&raw_push_url)?;

    // Every PULL worker connected: the probes arrive.
    bus_push_run(&push_bus, &bus_pull, WORKERS as u64)?;
    bus_pull.wait_for(WORKERS as u64)?;
    raw_push_run(&raw_push, &raw_pull, WORKERS as u64)?;

    let mut runs: [(JobRun, CpuUse); 4] = Default::default();
    for round in 0..=budget.rounds {
        let count = if round == 0 { count / 4 } else { count };
        let measured = [
            with_cpu(|| bus_lease_run(&lease_bus, &lease_workers, count))?,
            with_cpu(|| Ok(raw_lease_run(&raw_lease, &raw_lease_workers, count)))?,
            with_cpu(|| bus_push_run(&push_bus, &bus_pull, count))?,
            with_cpu(|| raw_push_run(&raw_push, &raw_pull, count))?,
        ];
        if round > 0 {
            for (total, (run, cpu)) in runs.iter_mut().zip(measured) {
                total.0.add(run);
                total.1.add(&cpu);
            }
        }
    }
    let [(acked, acked_cpu), (raw_acked, raw_acked_cpu), (pushed, pushed_cpu), (raw_pushed, raw_pushed_cpu)] =
        runs;

    let name = transport.name();
    Ok(vec![
        Row::new("5 jobs x4 workers, acks on", name, "jobs/s")
            .figures(acked.per_second(), raw_acked.per_second())
            .target(Target::AtLeast(0.6))
            .note(format!(
                "baseline: raw REQ/REP, same round trips (one per job); {} jobs; bus {}; \
                 baseline {}; vs raw PUSH/PULL {:.2}",
                acked.done,
                acked_cpu.per_operation(acked.done),
                raw_acked_cpu.per_operation(raw_acked.done),
                acked.per_second() / raw_pushed.per_second()
            )),
        Row::new("5 jobs x4 workers, acks off", name, "jobs/s")
            .figures(pushed.per_second(), raw_pushed.per_second())
            .note(format!(
                "baseline: raw PUSH to the same 4 PULL threads; {} jobs; bus {}; baseline {}",
                pushed.done,
                pushed_cpu.per_operation(pushed.done),
                raw_pushed_cpu.per_operation(raw_pushed.done)
            )),
    ])
}
