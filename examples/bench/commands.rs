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

use crate::cpu::{CpuSample, CpuUse};
use crate::raw::{Answer, RawEchoServer, RawLoad, RawReqClient, Throughput, OPERATION_LIMIT};
use crate::server::{command_bus, BusServer};
use crate::table::{Row, Tail, Target};
use crate::transport::{next_id, RequestTemplate, Transport, INLINE_ECHO_COMMAND};
use crate::Budget;

/// Concurrent clients in workload 2.
const CLIENTS: usize = 32;

/// Contexts of the raw echo server: as many as the bus's REP edge opens by
/// default (`BusConfig::contexts_per_socket`).
const RAW_CONTEXTS: usize = 128;

/// Round trips before measuring, per client and server.
const WARM_UP: usize = 200;

/// Round trips per pair before the next pair's turn.
const LATENCY_BLOCK: usize = 100;

/// The three servers workloads 1 and 2 compare, in one temp dir: the bus,
/// the raw echo server and the codec-only server.
struct Servers {
    dir: tempfile::TempDir,
    bus_url: String,
    _bus: BusServer,
    raw: RawEchoServer,
    codec: RawEchoServer,
}

impl Servers {
    fn start(transport: Transport) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let bus_url = transport.url(dir.path(), "bus");
        let bus = command_bus(&bus_url)?;
        let raw_url = transport.url(dir.path(), "raw");
        let raw = RawEchoServer::listen(&raw_url, RAW_CONTEXTS, Answer::Echo)?;
        let codec_url = transport.url(dir.path(), "codec");
        let codec = RawEchoServer::listen(&codec_url, RAW_CONTEXTS, Answer::Codec)?;
        Ok(Self {
            dir,
            bus_url,
            _bus: bus,
            raw,
            codec,
        })
    }
}

/// Workload 1: one client, one request at a time; p50/p99 latency.
///
/// # Errors
///
/// When a server cannot start or a request fails.
pub fn round_trip(budget: &Budget, transport: Transport) -> anyhow::Result<Vec<Row>> {
    let servers = Servers::start(transport)?;
    let Servers {
        ref bus_url,
        ref raw,
        ref codec,
        ..
    } = servers;
    let runtime = client_runtime()?;
    let template = RequestTemplate::new();
    let inline = RequestTemplate::for_command(INLINE_ECHO_COMMAND);

    let bus_client = runtime.block_on(connect(bus_url))?;
    let raw_to_bus = RawReqClient::dial(bus_url)?;
    let raw_client = RawReqClient::dial(raw.url())?;
    let codec_client = RawReqClient::dial(codec.url())?;

    // Blocks of round trips cycle through the six pairs, so that a change
    // in the machine's load falls on all of them alike.
    let mut through_client = Vec::new();
    let mut client_inline = Vec::new();
    let mut through_raw_req = Vec::new();
    let mut raw_req_inline = Vec::new();
    let mut baseline = Vec::new();
    let mut with_codec = Vec::new();
    let total = budget.round_trips * budget.rounds;
    let deadline = Instant::now() + budget.round * (budget.rounds as u32) * 4;
    let mut warming = true;
    while through_client.len() < total && Instant::now() < deadline {
        let count = if warming { WARM_UP } else { LATENCY_BLOCK };
        for (template, into) in [
            (&template, &mut through_client),
            (&inline, &mut client_inline),
        ] {
            let samples = runtime.block_on(bus_round_trips(&bus_client, template, count))?;
            keep_if(!warming, into, samples);
        }
        for (client, template, into) in [
            (&raw_to_bus, &template, &mut through_raw_req),
            (&raw_to_bus, &inline, &mut raw_req_inline),
            (&raw_client, &template, &mut baseline),
            (&codec_client, &template, &mut with_codec),
        ] {
            keep_if(!warming, into, raw_round_trips(client, template, count)?);
        }
        warming = false;
    }

    let name = transport.name();
    let p50 = |tail: Option<Tail>| tail.map_or(f64::NAN, |t| t.p50.as_secs_f64() * 1e6);
    let row = |workload: &str, samples: &mut Vec<Duration>, base: &mut Vec<Duration>| {
        let (bus_tail, base_tail) = (Tail::of(samples), Tail::of(base));
        Row::new(workload, name, "us p50")
            .figures(p50(bus_tail), p50(base_tail))
            .tails(bus_tail, base_tail)
            .note(format!("{} / {} samples", samples.len(), base.len()))
    };
    Ok(vec![
        row(
            "1 round trip, BusClient",
            &mut through_client,
            &mut baseline.clone(),
        )
        .target(Target::AtMost(1.15)),
        row(
            "1 round trip, BusClient, inline handler",
            &mut client_inline,
            &mut baseline.clone(),
        )
        .target(Target::AtMost(1.15)),
        row(
            "1 round trip, raw REQ to bus",
            &mut through_raw_req,
            &mut baseline.clone(),
        ),
        row(
            "1 round trip, raw REQ to bus, inline handler",
            &mut raw_req_inline,
            &mut baseline,
        ),
        row(
            "1 round trip, raw REQ to bus vs codec-only server",
            &mut through_raw_req.clone(),
            &mut with_codec,
        )
        .note("baseline: raw REP answering with the bus's codec, no actors"),
    ])
}

fn keep_if(keep: bool, into: &mut Vec<Duration>, samples: Vec<Duration>) {
    if keep {
        into.extend(samples);
    }
}

/// `count` sequential requests through `client`.
async fn bus_round_trips(
    client: &BusClient,
    template: &RequestTemplate,
    count: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut samples = Vec::with_capacity(count);
    while samples.len() < count {
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
) -> anyhow::Result<Vec<Duration>> {
    let mut samples = Vec::with_capacity(count);
    while samples.len() < count {
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
    let servers = Servers::start(transport)?;
    let Servers {
        ref dir,
        ref bus_url,
        ref raw,
        ref codec,
        ..
    } = servers;
    let python = PythonServer::start(&transport.url(dir.path(), "python"));
    let runtime = client_runtime()?;
    let template = RequestTemplate::new();
    let clients = runtime.block_on(async {
        let mut clients = Vec::with_capacity(CLIENTS);
        for _ in 0..CLIENTS {
            clients.push(connect(bus_url).await?);
        }
        anyhow::Ok(clients)
    })?;

    let inline = RequestTemplate::for_command(INLINE_ECHO_COMMAND);
    let to_bus = RawLoad::dial(bus_url, CLIENTS)?;
    let to_bus_inline = RawLoad::dial_with(bus_url, CLIENTS, inline.clone())?;
    let to_raw = RawLoad::dial(raw.url(), CLIENTS)?;
    let to_codec = RawLoad::dial(codec.url(), CLIENTS)?;
    let to_python = match &python {
        Ok(python) => Some(RawLoad::dial(&python.url, CLIENTS)?),
        Err(_) => None,
    };

    let mut through_clients = (Throughput::default(), CpuUse::default());
    let mut clients_inline = (Throughput::default(), CpuUse::default());
    let mut through_raw_req = (Throughput::default(), CpuUse::default());
    let mut raw_req_inline = (Throughput::default(), CpuUse::default());
    let mut baseline = (Throughput::default(), CpuUse::default());
    let mut with_codec = (Throughput::default(), CpuUse::default());
    let mut against_python = (Throughput::default(), CpuUse::default());
    let warm_up = Duration::from_millis(100);
    for round in 0..=budget.rounds {
        let length = if round == 0 { warm_up } else { budget.round };
        let keep = |total: &mut (Throughput, CpuUse), sample: CpuSample, run: Throughput| {
            if round > 0 {
                total.0.add(run);
                total.1.add(&CpuSample::now().since(&sample));
            }
        };
        for (template, total) in [
            (&template, &mut through_clients),
            (&inline, &mut clients_inline),
        ] {
            let sample = CpuSample::now();
            let run = runtime.block_on(bus_load(&clients, template, length));
            keep(total, sample, run);
        }
        for (load, total) in [
            (&to_bus, &mut through_raw_req),
            (&to_bus_inline, &mut raw_req_inline),
            (&to_raw, &mut baseline),
            (&to_codec, &mut with_codec),
        ] {
            let sample = CpuSample::now();
            keep(total, sample, load.run(length)?);
        }
        if let Some(load) = &to_python {
            let sample = CpuSample::now();
            keep(&mut against_python, sample, load.run(length)?);
        }
    }
    let (through_clients, clients_cpu) = through_clients;
    let (clients_inline, clients_inline_cpu) = clients_inline;
    let (through_raw_req, raw_req_cpu) = through_raw_req;
    let (raw_req_inline, raw_req_inline_cpu) = raw_req_inline;
    let (baseline, baseline_cpu) = baseline;
    let (with_codec, codec_cpu) = with_codec;
    let (against_python, _) = against_python;

    let name = transport.name();
    let errors = |run: &Throughput| match run.errors {
        0 => String::new(),
        n => format!(", {n} errors"),
    };
    let baseline_note = format!(
        "baseline {}",
        baseline_cpu.per_operation(baseline.completed)
    );
    let row = |workload: &str, run: &Throughput, cpu: &CpuUse| {
        Row::new(workload, name, "req/s")
            .figures(run.per_second(), baseline.per_second())
            .note(format!(
                "{} requests{}; bus {}; {baseline_note}",
                run.completed,
                errors(run),
                cpu.per_operation(run.completed)
            ))
    };
    let mut rows = vec![
        row("2 x32 clients, BusClient", &through_clients, &clients_cpu)
            .target(Target::AtLeast(0.85)),
        row(
            "2 x32 clients, BusClient, inline handler",
            &clients_inline,
            &clients_inline_cpu,
        )
        .target(Target::AtLeast(0.85)),
        row(
            "2 x32 clients, raw REQ to bus",
            &through_raw_req,
            &raw_req_cpu,
        ),
        row(
            "2 x32 clients, raw REQ to bus, inline handler",
            &raw_req_inline,
            &raw_req_inline_cpu,
        ),
        Row::new(
            "2 x32 clients, raw REQ to bus vs codec-only server",
            name,
            "req/s",
        )
        .figures(through_raw_req.per_second(), with_codec.per_second())
        .note(format!(
            "baseline: raw REP answering with the bus's codec, no actors, {}",
            codec_cpu.per_operation(with_codec.completed)
        )),
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
