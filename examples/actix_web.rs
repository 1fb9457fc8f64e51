//! The bus embedded in an actix-web application: HTTP in front, jobs behind.
//!
//! `cargo run --example actix_web` serves on 127.0.0.1:8080 until Ctrl-C
//! (`--bind ADDR` to change); `cargo run --example actix_web -- --self-test`
//! serves on a free port, calls itself over plain HTTP/1.1 and exits.
//!
//! # The application
//!
//! - `POST /backtests` with `{"symbol", "interval", "limit"?, "fast"?,
//!   "slow"?}` puts a `run_backtest` job on the bus's queue and answers
//!   `202 Accepted` with `{"job_id", "status"}` and a `Location` header. A
//!   body without `symbol` or `interval` gets `400`.
//! - `GET /backtests/{id}` answers the job's status as the lifecycle events
//!   reported it (`queued`, `running`, `retrying`, `completed`, `failed`,
//!   `cancelled`), with the worker, the latest progress and, once
//!   completed, the figures; `404` for an id it never saw.
//!
//! The status comes from events, not from asking the queue: a `JobBook`
//! actor subscribes to `job.*` and keeps the latest state of each job (at
//! most 10 000, the oldest forgotten first). So the application learns of
//! jobs run by any worker, in this process or a remote one.
//!
//! The bus runs in the same actix system as the HTTP server, with its NNG
//! sockets on a temp dir (printed at start) so that remote workers, `tail`
//! and Python peers can join, and with an in-process worker running up to
//! two backtests at once on the shipped price data.

#[path = "support/mod.rs"]
mod support;

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_web::{http::header, web, App, HttpResponse, HttpServer};
use clap::Parser;
use dgbit_actors::{BacktestActor, KlineStore, RUN_BACKTEST};
use dgbit_bus::bus::{Bus, BusHandle};
use dgbit_bus::config::BusConfig;
use dgbit_bus::dispatcher::{Enqueue, QueueDispatcher};
use dgbit_bus::message::{EventDelivery, HandlerError};
use dgbit_bus::supervisor::SupervisedRole;
use dgbit_bus::wire::{code, Event, JobMessage};
use serde::Serialize;
use serde_json::{json, Map, Value};

/// Jobs the book remembers; past this the oldest is forgotten.
const MAX_TRACKED_JOBS: usize = 10_000;

/// How long the self-test waits for its jobs to finish.
const SELF_TEST_LIMIT: Duration = Duration::from_secs(20);

/// Command-line options.
#[derive(Debug, Clone, Parser)]
#[command(about = "dgbit-bus embedded in an actix-web application")]
pub struct Options {
    /// Serve on a free port, exercise the API over HTTP, and exit.
    #[arg(long)]
    pub self_test: bool,
    /// Where to serve (ignored with --self-test, which uses 127.0.0.1:0).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub bind: String,
}

/// A job's latest known state, as `GET /backtests/{id}` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct JobStatus {
    pub job_id: String,
    pub status: &'static str,
    pub worker: Option<String>,
    pub retry_count: u64,
    pub progress: Option<Value>,
    pub error: Option<String>,
    /// The backtest's figures (its trade list left out).
    pub result: Option<Value>,
    /// The timestamp of the event that set this state.
    pub updated_at: String,
}

impl JobStatus {
    fn new(job_id: &str, status: &'static str, updated_at: &str) -> Self {
        Self {
            job_id: job_id.to_string(),
            status,
            worker: None,
            retry_count: 0,
            progress: None,
            error: None,
            result: None,
            updated_at: updated_at.to_string(),
        }
    }
}

/// The latest state of each job seen, shared between the event subscriber
/// and the HTTP handlers.
#[derive(Debug, Default)]
pub struct JobBook {
    jobs: Mutex<(HashMap<String, JobStatus>, VecDeque<String>)>,
}

impl JobBook {
    /// The status of `job_id`, if it was seen.
    pub fn get(&self, job_id: &str) -> Option<JobStatus> {
        self.lock().0.get(job_id).cloned()
    }

    /// Note a job accepted by the queue, unless its events got here first.
    fn accepted(&self, job_id: &str, at: &str) {
        self.update(job_id, at, |_| {});
    }

    /// Apply one lifecycle event.
    fn apply(&self, event: &Event) {
        let job_id = support::data_str(event, "job_id");
        if job_id.is_empty() {
            return;
        }
        self.update(job_id, &event.timestamp, |status| {
            let data = &event.data;
            match event.event_type.as_str() {
                "job.created" | "job.queued" => status.status = "queued",
                "job.started" => {
                    status.status = "running";
                    status.worker = data.get("worker").and_then(Value::as_str).map(Into::into);
                }
                "job.progress" => status.progress = data.get("progress").cloned(),
                "job.completed" => {
                    status.status = "completed";
                    status.result = data.get("result").map(figures);
                }
                "job.failed" => {
                    let will_retry = data.get("will_retry") == Some(&json!(true));
                    status.status = if will_retry { "retrying" } else { "failed" };
                    status.error = data.get("error").and_then(Value::as_str).map(Into::into);
                }
                "job.cancelled" => status.status = "cancelled",
                _ => return,
            }
            if let Some(retries) = data.get("retry_count").and_then(Value::as_u64) {
                status.retry_count = retries;
            }
            status.updated_at = event.timestamp.clone();
        });
    }

    /// Change `job_id`'s status with `change`, adding it (as `queued`) if
    /// new and forgetting the oldest job past the limit.
    fn update(&self, job_id: &str, at: &str, change: impl FnOnce(&mut JobStatus)) {
        let mut guard = self.lock();
        let (jobs, order) = &mut *guard;
        if !jobs.contains_key(job_id) {
            jobs.insert(job_id.to_string(), JobStatus::new(job_id, "queued", at));
            order.push_back(job_id.to_string());
            if order.len() > MAX_TRACKED_JOBS {
                if let Some(oldest) = order.pop_front() {
                    jobs.remove(&oldest);
                }
            }
        }
        if let Some(status) = jobs.get_mut(job_id) {
            change(status);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (HashMap<String, JobStatus>, VecDeque<String>)> {
        // Every update is a few field writes; a panic cannot leave a job
        // half-changed in a way that matters, so a poisoned book is used.
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A backtest result without its trade list.
fn figures(result: &Value) -> Value {
    let mut figures = result.as_object().cloned().unwrap_or_default();
    figures.remove("trades");
    Value::Object(figures)
}

/// Subscribes the [`JobBook`] to `job.*`.
struct BookKeeper {
    book: Arc<JobBook>,
}

impl Actor for BookKeeper {
    type Context = Context<Self>;
}

impl Handler<EventDelivery> for BookKeeper {
    type Result = ();

    fn handle(&mut self, delivery: EventDelivery, _ctx: &mut Self::Context) {
        self.book.apply(&delivery.event);
    }
}

/// What every HTTP handler can reach: the job queue's role (the bus handle
/// itself stays with `main`, which shuts it down) and the book.
struct AppState {
    queue: SupervisedRole<QueueDispatcher>,
    book: Arc<JobBook>,
}

/// `POST /backtests`.
async fn submit(state: web::Data<AppState>, body: web::Json<Map<String, Value>>) -> HttpResponse {
    let payload = match backtest_payload(body.into_inner()) {
        Ok(payload) => payload,
        Err(error) => return HttpResponse::BadRequest().json(json!({"error": error})),
    };
    let job = JobMessage::new(RUN_BACKTEST, Value::Object(payload));
    let created_at = job.created_at.clone();
    let accepted = match state.queue.send(Enqueue { job }).await {
        Ok(accepted) => accepted,
        Err(refused) => Err(HandlerError::new(
            code::OVERLOADED,
            format!("job queue not running: {refused}"),
        )),
    };
    match accepted {
        Ok(job_id) => {
            state.book.accepted(&job_id, &created_at);
            HttpResponse::Accepted()
                .insert_header((header::LOCATION, format!("/backtests/{job_id}")))
                .json(json!({"job_id": job_id, "status": "queued"}))
        }
        Err(err) => {
            HttpResponse::ServiceUnavailable().json(json!({"error": err.message, "code": err.code}))
        }
    }
}

/// Check what the handler cannot check later without a failed job: the
/// series is named, and the moving averages (if given) are in order.
fn backtest_payload(body: Map<String, Value>) -> Result<Map<String, Value>, String> {
    for key in ["symbol", "interval"] {
        if !body.get(key).is_some_and(Value::is_string) {
            return Err(format!("`{key}` is required and must be a string"));
        }
    }
    let length = |key: &str| body.get(key).and_then(Value::as_u64);
    if let (Some(fast), Some(slow)) = (length("fast"), length("slow")) {
        if fast == 0 || fast >= slow {
            return Err(format!("need 1 <= fast < slow, got {fast} and {slow}"));
        }
    }
    Ok(body)
}

/// `GET /backtests/{id}`.
async fn status(state: web::Data<AppState>, path: web::Path<String>) -> HttpResponse {
    let job_id = path.into_inner();
    match state.book.get(&job_id) {
        Some(status) => HttpResponse::Ok().json(status),
        None => HttpResponse::NotFound().json(json!({"error": format!("no job {job_id}")})),
    }
}

/// What the self-test saw.
#[derive(Debug, Clone)]
pub struct SelfTest {
    /// The server's address.
    pub address: SocketAddr,
    /// Per submitted backtest: the POST's status code and body, the
    /// statuses seen while polling (each change once), the final GET body.
    pub jobs: Vec<SubmittedJob>,
    /// Status code and body of a POST without `symbol`.
    pub bad_request: (u16, Value),
    /// Status code of a GET for an unknown id.
    pub unknown_status: u16,
}

/// One backtest submitted by the self-test.
#[derive(Debug, Clone)]
pub struct SubmittedJob {
    pub post_status: u16,
    pub post_body: Value,
    pub seen: Vec<String>,
    pub last: Value,
}

fn main() -> anyhow::Result<()> {
    support::init_tracing();
    let options = Options::parse();
    actix::System::new().block_on(async move {
        if options.self_test {
            self_test().await.map(|_| ())
        } else {
            serve(&options.bind).await
        }
    })
}

/// The bus with its in-process worker and its job book, on temp ipc
/// addresses.
struct Backend {
    bus: BusHandle,
    book: Arc<JobBook>,
    _dir: tempfile::TempDir,
}

async fn backend() -> anyhow::Result<Backend> {
    let (dir, addresses) = support::temp_addresses()?;
    let bus = Bus::builder(BusConfig::default().addresses(addresses.clone())).start()?;
    let backtest = BacktestActor::new(Arc::new(KlineStore::fixtures()), bus.events()).start();
    bus.register_worker(RUN_BACKTEST, backtest.recipient(), 2)
        .await
        .ok_or_else(|| anyhow::anyhow!("the job queue did not register the worker"))?;
    let book = Arc::new(JobBook::default());
    let keeper = BookKeeper {
        book: Arc::clone(&book),
    };
    bus.subscribe("job.*", keeper.start().recipient())?;
    anyhow::ensure!(
        bus.wait_for_edges(Duration::from_secs(5)).await,
        "the bus's sockets did not open"
    );
    println!("bus sockets (for remote workers, dgbit-bus tail, Python peers):");
    for line in support::env_lines(&addresses) {
        println!("  {line}");
    }
    Ok(Backend {
        bus,
        book,
        _dir: dir,
    })
}

/// The HTTP server on `bind` with the API routes, not yet running, and the
/// address it got.
fn http_server(
    backend: &Backend,
    bind: &str,
) -> anyhow::Result<(actix_web::dev::Server, SocketAddr)> {
    let state = web::Data::new(AppState {
        queue: backend.bus.dispatcher().clone(),
        book: Arc::clone(&backend.book),
    });
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .route("/backtests", web::post().to(submit))
            .route("/backtests/{id}", web::get().to(status))
    })
    .workers(1)
    .disable_signals()
    .bind(bind)?;
    let address = *server
        .addrs()
        .first()
        .ok_or_else(|| anyhow::anyhow!("bound to no address"))?;
    Ok((server.run(), address))
}

/// Serve until Ctrl-C, then stop the server and shut the bus down.
async fn serve(bind: &str) -> anyhow::Result<()> {
    let backend = backend().await?;
    let (server, address) = http_server(&backend, bind)?;
    let handle = server.handle();
    let running = actix::spawn(server);
    println!("serving on http://{address} until Ctrl-C; try:");
    println!(
        "  curl -s -X POST http://{address}/backtests -H 'content-type: application/json' \
         -d '{{\"symbol\": \"EURUSD\", \"interval\": \"60\", \"limit\": 1000}}'"
    );
    println!("  curl -s http://{address}/backtests/<job_id>");
    dgbit_bus::cli::serve::wait_for_signal().await;
    handle.stop(true).await;
    let _ = running.await;
    backend.bus.shutdown().await;
    Ok(())
}

/// Serve on a free port, drive the API from a plain HTTP client on another
/// thread, stop, and report what it saw.
///
/// # Errors
///
/// When the bus or server cannot start, or the client sees something
/// unexpected (a failed request, a job unfinished after 20 s).
pub async fn self_test() -> anyhow::Result<SelfTest> {
    let backend = backend().await?;
    let (server, address) = http_server(&backend, "127.0.0.1:0")?;
    let handle = server.handle();
    let running = actix::spawn(server);
    println!("self-test against http://{address}");

    // The client blocks, so it runs off the actix thread.
    let report = tokio::task::spawn_blocking(move || drive(address)).await;
    handle.stop(true).await;
    let _ = running.await;
    backend.bus.shutdown().await;
    report?
}

/// The self-test's client side.
fn drive(address: SocketAddr) -> anyhow::Result<SelfTest> {
    let bodies = [
        json!({"symbol": "EURUSD", "interval": "60", "limit": 1000}),
        json!({"symbol": "BTCUSD", "interval": "M", "fast": 6, "slow": 12}),
    ];
    let mut jobs = Vec::new();
    for body in &bodies {
        let (post_status, post_body) = http(address, "POST", "/backtests", Some(body))?;
        println!("POST /backtests {body} -> {post_status} {post_body}");
        anyhow::ensure!(
            post_status == 202,
            "POST answered {post_status}: {post_body}"
        );
        jobs.push(SubmittedJob {
            post_status,
            post_body,
            seen: Vec::new(),
            last: Value::Null,
        });
    }

    let bad_body = json!({"interval": "60"});
    let bad_request = http(address, "POST", "/backtests", Some(&bad_body))?;
    println!(
        "POST /backtests {bad_body} -> {} {}",
        bad_request.0, bad_request.1
    );
    let (unknown_status, unknown_body) = http(address, "GET", "/backtests/no-such-job", None)?;
    println!("GET /backtests/no-such-job -> {unknown_status} {unknown_body}");

    for job in &mut jobs {
        poll_until_finished(address, job)?;
    }
    Ok(SelfTest {
        address,
        jobs,
        bad_request,
        unknown_status,
    })
}

/// GET the job's status every 20 ms until it is completed or failed,
/// noting each status change.
fn poll_until_finished(address: SocketAddr, job: &mut SubmittedJob) -> anyhow::Result<()> {
    let job_id = job.post_body["job_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let path = format!("/backtests/{job_id}");
    let deadline = Instant::now() + SELF_TEST_LIMIT;
    loop {
        let (code, body) = http(address, "GET", &path, None)?;
        anyhow::ensure!(code == 200, "GET {path} answered {code}: {body}");
        let status = body["status"].as_str().unwrap_or("?").to_string();
        if job.seen.last() != Some(&status) {
            job.seen.push(status.clone());
        }
        if status == "completed" || status == "failed" {
            let result = &body["result"];
            println!(
                "GET {path} -> statuses seen {:?}; {} {} on {}: {} trades, net {}, max drawdown {}",
                job.seen,
                result["symbol"].as_str().unwrap_or("?"),
                result["interval"].as_str().unwrap_or("?"),
                body["worker"].as_str().unwrap_or("?"),
                result["total_trades"],
                support::signed_percent(result["net_return"].as_f64().unwrap_or(f64::NAN)),
                support::percent(result["max_drawdown"].as_f64().unwrap_or(f64::NAN)),
            );
            job.last = body;
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{path} still {status} after {SELF_TEST_LIMIT:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One HTTP/1.1 exchange over a fresh connection: the status code and the
/// body parsed as JSON (null when empty).
fn http(
    address: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<(u16, Value)> {
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut stream = TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8(response)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no end of headers in {text:?}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no status code in {head:?}"))?;
    let body = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(body)?
    };
    Ok((code, body))
}
