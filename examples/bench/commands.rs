//! Workloads 1 and 2: the command bus over sockets.
//!
//! Both run a bus ([`BusServer`]) and a raw echo server ([`RawEchoServer`])
//! side by side and alternate between them round by round, so that load
//! from other processes on the machine falls on both alike.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use dgbit_bus::client::{BusClient, ClientOptions};

use crate::raw::{RawEchoServer, RawLoad, RawReqClient, Throughput, OPERATION_LIMIT};
use crate::server::command_bus;
use crate::table::{Row, Tail, Target};
use crate::transport::{next_id, RequestTemplate, Transport};
use crate::Budget;

/// Concurrent clients in workload 2.
const CLIENTS: usize = 32;

/// Contexts of the raw echo server: as many as the bus's REP edge opens by
/// default (`BusConfig::contexts_per_socket`).
const RAW_CONTEXTS: usize = 128;

/// Round trips before measuring, per client and server.
const WARM_UP: usize = 200;

/// Workload 1: one client, one request at a time; p50/p99 latency.
///
/// # Errors
///
/// When a server cannot start or a request fails.
pub fn round_trip(budget: &Budget, transport: Transport) -> anyhow::Result<Vec<Row>> {
    let dir = tempfile::tempdir()?;
    let bus_url = transport.url(dir.path(), "bus");
    let _bus = command_bus(&bus_url)?;
    let raw = RawEchoServer::listen(&transport.url(dir.path(), "raw"), RAW_CONTEXTS)?;
    let runtime = client_runtime()?;
    let template = RequestTemplate::new();

    let bus_client = runtime.block_on(connect(&bus_url))?;
    let raw_to_bus = RawReqClient::dial(&bus_url)?;
    let raw_client = RawReqClient::dial(raw.url())?;

    let mut through_client = Vec::new();
    let mut through_raw_req = Vec::new();
    let mut baseline = Vec::new();
    for round in 0..=budget.rounds {
        let count = if round == 0 {
            WARM_UP
        } else {
            budget.round_trips
        };
        let keep = round > 0;
        let deadline = Instant::now() + budget.round;
        let samples = runtime.block_on(bus_round_trips(&bus_client, &template, count, deadline))?;
        keep_if(keep, &mut through_client, samples);
        let deadline = Instant::now() + budget.round;
        let samples = raw_round_trips(&raw_to_bus, &template, count, deadline)?;
        keep_if(keep, &mut through_raw_req, samples);
        let deadline = Instant::now() + budget.round;
        let samples = raw_round_trips(&raw_client, &template, count, deadline)?;
        keep_if(keep, &mut baseline, samples);
    }

    let name = transport.name();
    let raw_tail = Tail::of(&mut baseline);
    let row = |workload: &str, samples: &mut Vec<Duration>| {
        let bus_tail = Tail::of(samples);
        let p50 = |tail: Option<Tail>| tail.map_or(f64::NAN, |t| t.p50.as_secs_f64() * 1e6);
        Row::new(workload, name, "us p50")
            .figures(p50(bus_tail), p50(raw_tail))
            .tails(bus_tail, raw_tail)
            .note(format!("{} / {} samples", samples.len(), baseline.len()))
    };
    Ok(vec![
        row("1 round trip, BusClient", &mut through_client).target(Target::AtMost(1.15)),
        row("1 round trip, raw REQ to bus", &mut through_raw_req),
    ])
}

fn keep_if(keep: bool, into: &mut Vec<Duration>, samples: Vec<Duration>) {
    if keep {
        into.extend(samples);
    }
}

/// Up to `count` sequential requests through `client`, stopping at
/// `deadline`.
async fn bus_round_trips(
    client: &BusClient,
    template: &RequestTemplate,
    count: usize,
    deadline: Instant,
) -> anyhow::Result<Vec<Duration>> {
    let mut samples = Vec::with_capacity(count);
    while samples.len() < count && Instant::now() < deadline {
        let request = template.request(next_id());
        let started = Instant::now();
        let reply = client.request(&request).await?;
        samples.push(started.elapsed());
        anyhow::ensure!(reply.is_ok(), "the bus answered {reply:?}");
    }
    Ok(samples)
}

fn raw_round_trips(
    client: &RawReqClient,
    template: &RequestTemplate,
    count: usize,
    deadline: Instant,
) -> anyhow::Result<Vec<Duration>> {
    let mut samples = Vec::with_capacity(count);
    while samples.len() < count && Instant::now() < deadline {
        samples.push(client.round_trip(template.body(next_id()))?);
    }
    Ok(samples)
}

/// Workload 2: 32 concurrent clients; requests per second. Also the same
/// load against the Python REP server.
///
/// # Errors
///
/// When a server cannot start or a client cannot connect.
pub fn concurrent(budget: &Budget, transport: Transport) -> anyhow::Result<Vec<Row>> {
    let dir = tempfile::tempdir()?;
    let bus_url = transport.url(dir.path(), "bus");
    let _bus = command_bus(&bus_url)?;
    let raw = RawEchoServer::listen(&transport.url(dir.path(), "raw"), RAW_CONTEXTS)?;
    let python = PythonServer::start(&transport.url(dir.path(), "python"));
    let runtime = client_runtime()?;
    let template = RequestTemplate::new();
    let clients = runtime.block_on(async {
        let mut clients = Vec::with_capacity(CLIENTS);
        for _ in 0..CLIENTS {
            clients.push(connect(&bus_url).await?);
        }
        anyhow::Ok(clients)
    })?;

    let mut through_clients = Throughput::default();
    let mut through_raw_req = Throughput::default();
    let mut baseline = Throughput::default();
    let mut against_python = Throughput::default();
    let warm_up = Duration::from_millis(100);
    for round in 0..=budget.rounds {
        let length = if round == 0 { warm_up } else { budget.round };
        let keep = |total: &mut Throughput, run: Throughput| {
            if round > 0 {
                total.add(run);
            }
        };
        let run = runtime.block_on(bus_load(&clients, &template, length));
        keep(&mut through_clients, run);
        keep(
            &mut through_raw_req,
            RawLoad::dial(&bus_url, CLIENTS)?.run(length)?,
        );
        keep(
            &mut baseline,
            RawLoad::dial(raw.url(), CLIENTS)?.run(length)?,
        );
        if let Ok(python) = &python {
            keep(
                &mut against_python,
                RawLoad::dial(&python.url, CLIENTS)?.run(length)?,
            );
        }
    }

    let name = transport.name();
    let errors = |run: &Throughput| match run.errors {
        0 => String::new(),
        n => format!(", {n} errors"),
    };
    let row = |workload: &str, run: &Throughput| {
        Row::new(workload, name, "req/s")
            .figures(run.per_second(), baseline.per_second())
            .note(format!("{} requests{}", run.completed, errors(run)))
    };
    let mut rows = vec![
        row("2 x32 clients, BusClient", &through_clients).target(Target::AtLeast(0.85)),
        row("2 x32 clients, raw REQ to bus", &through_raw_req),
    ];
    rows.push(match &python {
        Ok(_) => Row::new("2 x32 clients, bus vs Python REP", name, "req/s")
            .figures(through_clients.per_second(), against_python.per_second())
            .note(format!(
                "baseline: Python asyncio REP server, raw REQ load, {} requests",
                against_python.completed
            )),
        Err(err) => {
            crate::table::failed_row("2 x32 clients, bus vs Python REP", name, &err.to_string())
        }
    });
    Ok(rows)
}

/// Every client keeps one request in flight until `length` has passed.
async fn bus_load(
    clients: &[BusClient],
    template: &RequestTemplate,
    length: Duration,
) -> Throughput {
    let started = Instant::now();
    let deadline = started + length;
    let loops = clients.iter().map(|client| async move {
        let mut run = Throughput::default();
        while Instant::now() < deadline {
            match client.request(&template.request(next_id())).await {
                Ok(reply) if reply.is_ok() => run.completed += 1,
                _ => run.errors += 1,
            }
        }
        run
    });
    let mut total = Throughput::default();
    for run in futures::future::join_all(loops).await {
        total.add(run);
    }
    total.elapsed = started.elapsed();
    total
}

/// The runtime `BusClient`s run on: one thread, the bench's own.
pub fn client_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// A `BusClient` with a timeout short enough to fail a stuck run.
pub async fn connect(url: &str) -> anyhow::Result<BusClient> {
    let options = ClientOptions::default()
        .timeout(OPERATION_LIMIT)
        .connect_attempts(5, Duration::from_millis(100));
    BusClient::connect(url, options)
        .await
        .with_context(|| format!("connect to the bus at {url}"))
}

/// `tests/python/bench_rep_server.py` as a child process, killed on drop.
pub struct PythonServer {
    pub url: String,
    child: Child,
}

impl PythonServer {
    /// Start the server and wait for its `ready` line.
    ///
    /// # Errors
    ///
    /// When python3 or pynng is missing or the server does not get ready
    /// within ten seconds.
    pub fn start(url: &str) -> anyhow::Result<Self> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/bench_rep_server.py");
        let mut child = Command::new("python3")
            .arg(&script)
            .args(["--address", url])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("start python3")?;
        let stdout = child.stdout.take().context("python's stdout")?;
        let mut server = Self {
            url: url.to_string(),
            child,
        };
        let (line_sender, line) = mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            let mut first = String::new();
            let _ = std::io::BufReader::new(stdout).read_line(&mut first);
            let _ = line_sender.send(first);
        });
        match line.recv_timeout(Duration::from_secs(10)) {
            Ok(first) if first.trim() == "ready" => Ok(server),
            _ => {
                server.kill();
                anyhow::bail!("the Python REP server did not start (python3 with pynng needed)")
            }
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PythonServer {
    fn drop(&mut self) {
        self.kill();
    }
}
