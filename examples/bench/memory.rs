//! Workload 6: peak resident memory (`VmHWM`) of a `dgbit-bus serve`
//! process under input it cannot pass on.
//!
//! - events: 1 000 000 256-byte events published through `bus.publish`
//!   (32 concurrent `BusClient`s, each request with a fresh `request_id`,
//!   so the duplicate cache fills too) while one subscriber reads one event
//!   per millisecond. The peak after the whole flood is compared with the
//!   peak after its first tenth: bounded queues make them about equal.
//! - jobs: 100 000 jobs enqueued with `bus.enqueue` and no worker, which
//!   fills the queue to its default capacity, then 20 000 more, which the
//!   bus must refuse (`overloaded`) without growing.
//!
//! Only over ipc: the figure is about the bus's queues, not the transport.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use dgbit_bus::client::BusClient;
use dgbit_bus::config::Addresses;
use dgbit_bus::wire::{CommandReply, CommandRequest};
use nng::options::protocol::pubsub::Subscribe;
use nng::options::{Options, RecvTimeout};
use nng::{Protocol, Socket};
use serde_json::{json, Value};

use crate::commands::{client_runtime, connect};
use crate::table::{Row, Target};
use crate::transport::next_id;
use crate::Budget;

/// Publishing and enqueueing clients.
const CLIENTS: usize = 32;

/// Default queue capacity of `serve` (`BusConfig::queue_capacity`).
const QUEUE_CAPACITY: u64 = 100_000;

/// Jobs sent past the capacity, all of which must be refused.
const OVER_CAPACITY: u64 = 20_000;

/// How long the slow subscriber takes per event.
const SLOW_READ: Duration = Duration::from_millis(1);

/// The `dgbit-bus` binary: `DGBIT_BUS_BIN`, else the one beside this
/// example's own target directory, built first with cargo.
fn bus_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("DGBIT_BUS_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/examples/bench -> target/<profile>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("the bench is not inside a target directory")?;
    let target_dir = profile_dir.parent().context("no target directory")?;
    let release = profile_dir
        .file_name()
        .is_some_and(|name| name == "release");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .args(["build", "--quiet", "--bin", "dgbit-bus", "--manifest-path"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", target_dir);
    if release {
        build.arg("--release");
    }
    let status = build.status().context("run cargo to build dgbit-bus")?;
    anyhow::ensure!(status.success(), "cargo build --bin dgbit-bus failed");
    Ok(profile_dir.join("dgbit-bus"))
}

/// A `dgbit-bus serve` child with every address in a temp dir; killed on
/// drop.
struct ServeProcess {
    child: Child,
    addresses: Addresses,
    _dir: tempfile::TempDir,
}

impl ServeProcess {
    fn start(binary: &Path) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let addresses = Addresses::in_dir(dir.path());
        let child = Command::new(binary)
            .arg("serve")
            .arg("--dead-letter-path")
            .arg(dir.path().join("dead_letters.sqlite"))
            .env("NNG_COMMAND_ADDRESS", &addresses.command)
            .env("NNG_EVENT_ADDRESS", &addresses.event)
            .env("NNG_JOB_QUEUE_ADDRESS", &addresses.job_queue)
            .env("NNG_DATA_ADDRESS", &addresses.data)
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?;
        Ok(Self {
            child,
            addresses,
            _dir: dir,
        })
    }

    /// Peak and current resident memory, in MiB.
    fn memory(&self) -> anyhow::Result<(f64, f64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let field = |name: &str| -> anyhow::Result<f64> {
            let line = status
                .lines()
                .find(|line| line.starts_with(name))
                .with_context(|| format!("no {name} in /proc/<pid>/status"))?;
            let kib: f64 = line
                .split_whitespace()
                .nth(1)
                .context("no value")?
                .parse()?;
            Ok(kib / 1024.0)
        };
        Ok((field("VmHWM:")?, field("VmRSS:")?))
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A subscriber that takes one event per [`SLOW_READ`].
struct SlowSubscriber {
    socket: Socket,
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl SlowSubscriber {
    fn dial(url: &str) -> anyhow::Result<Self> {
        let socket = Socket::new(Protocol::Sub0)?;
        socket.set_opt::<Subscribe>(br#"{"event_type":"data."#.to_vec())?;
        socket.set_opt::<RecvTimeout>(Some(Duration::from_millis(50)))?;
        socket.dial_async(url)?;
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let (reader, stopping, count) = (socket.clone(), stop.clone(), received.clone());
        let thread = std::thread::Builder::new()
            .name("bench-slow-sub".into())
            .spawn(move || {
                while !stopping.load(Ordering::Acquire) {
                    match reader.recv() {
                        Ok(_) => {
                            count.fetch_add(1, Ordering::Relaxed);
                            std::thread::sleep(SLOW_READ);
                        }
                        Err(nng::Error::TimedOut) => {}
                        Err(_) => break,
                    }
                }
            })?;
        Ok(Self {
            socket,
            stop,
            received,
            thread: Some(thread),
        })
    }
}

impl Drop for SlowSubscriber {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.socket.close();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Counts of one batch of requests.
#[derive(Debug, Default, Clone, Copy)]
struct Sent {
    ok: u64,
    refused: u64,
    failed: u64,
}

/// Send `count` requests built by `request`, `CLIENTS` at a time.
async fn send_all(
    clients: &[BusClient],
    count: u64,
    request: &(dyn Fn() -> CommandRequest + Sync),
) -> Sent {
    let remaining = AtomicU64::new(count);
    let loops = clients.iter().map(|client| {
        let remaining = &remaining;
        async move {
            let mut sent = Sent::default();
            while remaining
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
            {
                match client.request(&request()).await {
                    Ok(CommandReply::Ok { .. }) => sent.ok += 1,
                    Ok(CommandReply::Error { .. }) => sent.refused += 1,
                    Err(_) => sent.failed += 1,
                }
            }
            sent
        }
    });
    let mut total = Sent::default();
    for sent in futures::future::join_all(loops).await {
        total.ok += sent.ok;
        total.refused += sent.refused;
        total.failed += sent.failed;
    }
    total
}

fn with_id(mut request: CommandRequest) -> CommandRequest {
    request.request_id = Some(format!("m-{:012}", next_id()));
    request
}

fn event_request() -> CommandRequest {
    with_id(CommandRequest::new(
        "bus.publish",
        json!({"event_type": "data.fetched", "source": "bench",
            "data": {"symbol": "EURUSD", "pad": "x".repeat(120)}}),
    ))
}

fn job_request() -> CommandRequest {
    with_id(CommandRequest::new(
        "bus.enqueue",
        json!({"job_type": "bench.noop", "payload": {"pad": "x".repeat(120)}}),
    ))
}

/// # Errors
///
/// When `dgbit-bus` cannot be built or started, or stops answering.
pub fn peak_memory(budget: &Budget) -> anyhow::Result<Vec<Row>> {
    let binary = bus_binary()?;
    let runtime = client_runtime()?;
    let events = if budget.quick { 20_000 } else { 1_000_000 };
    let jobs = if budget.quick { 10_000 } else { QUEUE_CAPACITY };

    let serve = ServeProcess::start(&binary)?;
    let subscriber = SlowSubscriber::dial(&serve.addresses.event)?;
    let clients = runtime.block_on(async {
        let mut clients = Vec::new();
        for _ in 0..CLIENTS {
            clients.push(connect(&serve.addresses.command).await?);
        }
        anyhow::Ok(clients)
    })?;
    let (idle, _) = serve.memory()?;

    let started = Instant::now();
    let first = runtime.block_on(send_all(&clients, events / 10, &event_request));
    let (tenth, _) = serve.memory()?;
    let rest = runtime.block_on(send_all(&clients, events - events / 10, &event_request));
    let (flooded, rss) = serve.memory()?;
    let publish_rate = events as f64 / started.elapsed().as_secs_f64();
    let published = first.ok + rest.ok;
    let unanswered = first.failed + rest.failed + first.refused + rest.refused;
    // The duplicate cache alone holds 10 000 replies: only a long flood
    // shows whether the peak stops growing.
    let target = match budget.quick {
        true => Target::None,
        false => Target::AtMost(1.2),
    };
    let events_row = Row::new(format!("6 serve VmHWM, {events} events"), "ipc", "MiB")
        .figures(flooded, tenth)
        .target(target)
        .note(format!(
            "baseline: VmHWM after the first tenth; idle {idle:.1} MiB, RSS after {rss:.1} MiB; \
             {published} published at {publish_rate:.0}/s, {unanswered} not accepted; \
             slow subscriber got {}",
            subscriber.received.load(Ordering::Relaxed)
        ));
    drop(subscriber);

    let (before_jobs, _) = serve.memory()?;
    let started = Instant::now();
    let first_tenth = runtime.block_on(send_all(&clients, jobs / 10, &job_request));
    let first_rate = jobs as f64 / 10.0 / started.elapsed().as_secs_f64();
    let started = Instant::now();
    let rest = runtime.block_on(send_all(&clients, jobs - jobs / 10, &job_request));
    let rest_rate = (jobs - jobs / 10) as f64 / started.elapsed().as_secs_f64();
    let queued = Sent {
        ok: first_tenth.ok + rest.ok,
        refused: first_tenth.refused + rest.refused,
        failed: first_tenth.failed + rest.failed,
    };
    let rates = format!("enqueued at {first_rate:.0}/s (first tenth), {rest_rate:.0}/s (rest)");
    let (full, _) = serve.memory()?;
    let per_job = (full - before_jobs) * 1024.0 * 1024.0 / jobs as f64;
    let jobs_row = if budget.quick {
        Row::new(format!("6 serve VmHWM, {jobs} jobs queued"), "ipc", "MiB")
            .figures(full, before_jobs)
            .note(format!(
                "quick mode: capacity not reached; {} queued, {rates}; ~{per_job:.0} B per job",
                queued.ok
            ))
    } else {
        let over = runtime.block_on(send_all(&clients, OVER_CAPACITY, &job_request));
        let (after, _) = serve.memory()?;
        Row::new(
            format!("6 serve VmHWM, {jobs} jobs + {OVER_CAPACITY} over"),
            "ipc",
            "MiB",
        )
        .figures(after, full)
        .target(Target::AtMost(1.2))
        .note(format!(
            "baseline: VmHWM at capacity; {} queued, {rates}; {} then refused of \
             {OVER_CAPACITY}; ~{per_job:.0} B per queued job",
            queued.ok, over.refused
        ))
    };
    let depth = runtime.block_on(async {
        let reply = clients[0].call("bus.jobs", json!({})).await.ok();
        reply.and_then(|stats: Value| stats["queue_depth"].as_u64())
    });
    anyhow::ensure!(depth.is_some(), "serve stopped answering");
    Ok(vec![events_row, jobs_row])
}
