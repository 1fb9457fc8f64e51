//! Floods, crowds and misbehaving peers against the command and data buses.
//!
//! Most tests run a `dgbit-bus serve` child, so that its resident memory
//! (`VmRSS` in `/proc/<pid>/status`) and open descriptors (`/proc/<pid>/fd`)
//! can be read apart from the test process; the bounded-memory tests that
//! need a slow handler run a bus in-process on its own actix thread. Peers
//! are plain synchronous NNG sockets on threads of their own, raw Unix and
//! TCP streams for the wrong-protocol cases, and pynng for the oversize one.
//! Every test prints the figures it checked.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Barrier};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use actix::prelude::*;
use dgbit_bus::bus::Bus;
use dgbit_bus::client::{BusClient, ClientError, ClientOptions};
use dgbit_bus::config::{Addresses, BusConfig};
use dgbit_bus::edge::hard_receive_limit;
use dgbit_bus::message::{Command, HandlerError};
use dgbit_bus::wire::{code, CommandReply};
use nng::options::{Options, RecvTimeout, SendTimeout};
use nng::{Protocol, Socket};
use serde_json::{json, Value};
use tokio::sync::watch;

use common::{bus_binary, free_tcp_url, wait_until, TestAddresses};

/// How long any single reply may take before a test calls it lost.
const REPLY_LIMIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// A `dgbit-bus serve` child and what /proc says about it
// ---------------------------------------------------------------------------

/// A `dgbit-bus serve` child whose stderr goes to a file, killed on drop.
struct Serve {
    child: Child,
    addresses: Addresses,
    log: PathBuf,
}

impl Serve {
    /// Start `dgbit-bus serve` on `addresses` with `extra` arguments and wait
    /// until it answers `ping`.
    fn start(dir: &Path, addresses: &Addresses, extra: &[&str]) -> Serve {
        let log = dir.join("serve.log");
        let child = Process::new(bus_binary())
            .arg("serve")
            .args(extra)
            .env("NNG_COMMAND_ADDRESS", &addresses.command)
            .env("NNG_EVENT_ADDRESS", &addresses.event)
            .env("NNG_JOB_QUEUE_ADDRESS", &addresses.job_queue)
            .env("NNG_DATA_ADDRESS", &addresses.data)
            .env("RUST_LOG", "info")
            .env("XDG_STATE_HOME", dir)
            .env("DGBIT_DEAD_LETTER_PATH", dir.join("dead.sqlite"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("a log file"))
            .spawn()
            .expect("dgbit-bus serve starts");
        let serve = Serve {
            child,
            addresses: addresses.clone(),
            log,
        };
        let answered = wait_until(Duration::from_secs(20), || {
            Peer::dial(&serve.addresses.command).is_ok_and(|peer| peer.ping().is_ok())
        });
        assert!(answered, "dgbit-bus serve did not answer ping within 20 s");
        serve
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }

    fn fds(&self) -> usize {
        fd_count(self.pid())
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().expect("wait on serve").is_none()
    }

    /// Lines of the child's log at `WARN` or `ERROR`.
    fn warnings(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains("WARN") || line.contains("ERROR"))
            .map(str::to_string)
            .collect()
    }

    /// The descriptor count once connections that just closed are gone: the
    /// lowest count seen over a short polling window.
    fn quiet_fds(&self) -> usize {
        let mut lowest = self.fds();
        wait_until(Duration::from_millis(300), || {
            lowest = lowest.min(self.fds());
            false
        });
        lowest
    }

    /// Poll until the descriptor count is at most `limit`; the last count.
    fn fds_settle_to(&self, limit: usize) -> usize {
        let mut last = self.fds();
        wait_until(Duration::from_secs(10), || {
            last = self.fds();
            last <= limit
        });
        last
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of process `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("a VmRSS line")
}

/// Open file descriptors of process `pid`.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("proc fd")
        .count()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

// ---------------------------------------------------------------------------
// Peers
// ---------------------------------------------------------------------------

/// A synchronous REQ peer with send and receive timeouts.
struct Peer {
    socket: Socket,
}

impl Peer {
    /// Dial `url`. A burst of peers can find the listen backlog full for a
    /// moment, which the kernel answers with "try again"; a peer retries
    /// that, as NNG's own background dialer would, up to [`REPLY_LIMIT`].
    fn dial(url: &str) -> Result<Peer, nng::Error> {
        let socket = Socket::new(Protocol::Req0)?;
        socket.set_opt::<RecvTimeout>(Some(REPLY_LIMIT))?;
        socket.set_opt::<SendTimeout>(Some(REPLY_LIMIT))?;
        let deadline = Instant::now() + REPLY_LIMIT;
        loop {
            match socket.dial(url) {
                Err(nng::Error::TryAgain) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                outcome => return outcome.map(|()| Peer { socket }),
            }
        }
    }

    /// Send `body` and return the reply as JSON.
    fn send(&self, body: &[u8]) -> Result<Value, String> {
        self.socket
            .send(body)
            .map_err(|(_, err)| format!("send: {err}"))?;
        let reply = self.socket.recv().map_err(|err| format!("recv: {err}"))?;
        let value: Value = serde_json::from_slice(&reply).map_err(|err| format!("{err}"))?;
        CommandReply::decode(&reply).map_err(|err| format!("not a reply: {err}"))?;
        Ok(value)
    }

    fn send_json(&self, body: &Value) -> Result<Value, String> {
        self.send(&serde_json::to_vec(body).expect("serialises"))
    }

    fn ping(&self) -> Result<(), String> {
        let reply = self.send_json(&json!({"command": "ping"}))?;
        match reply["result"]["pong"].as_bool() {
            Some(true) => Ok(()),
            _ => Err(format!("not a pong: {reply}")),
        }
    }
}

/// Ping `count` times on a fresh peer; the slowest round trip.
fn pings_from_a_fresh_peer(url: &str, count: usize) -> Duration {
    let peer = Peer::dial(url).expect("a fresh peer dials");
    let mut slowest = Duration::ZERO;
    for _ in 0..count {
        let started = Instant::now();
        peer.ping().expect("ping is served");
        slowest = slowest.max(started.elapsed());
    }
    slowest
}

fn ipc_path(url: &str) -> PathBuf {
    PathBuf::from(url.strip_prefix("ipc://").expect("an ipc url"))
}

/// The 8-byte SP handshake header for NNG protocol number `protocol`.
fn sp_header(protocol: u16) -> [u8; 8] {
    let [high, low] = protocol.to_be_bytes();
    [0, b'S', b'P', 0, high, low, 0, 0]
}

const REQ0: u16 = 0x30;
const REP0: u16 = 0x31;
const PUSH0: u16 = 0x50;

/// Whether the far end closes `stream` within `limit` (a read returns end
/// of file or a reset), reading and discarding whatever it sends first.
fn closed_by_peer(stream: &mut impl Read, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let mut buffer = [0u8; 1024];
    while Instant::now() < deadline {
        match stream.read(&mut buffer) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return true,
        }
    }
    false
}

// ---------------------------------------------------------------------------
// An in-process bus on its own actix thread
// ---------------------------------------------------------------------------

/// A bus running on a thread of its own; shut down and joined on drop.
struct BusThread {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl BusThread {
    /// Start a bus with `config` and the handlers `handlers` builds (inside
    /// the bus's actix system), and wait until its edges are open.
    fn start<F>(config: BusConfig, handlers: F) -> BusThread
    where
        F: FnOnce() -> Vec<(&'static str, Recipient<Command>)> + Send + 'static,
    {
        let (ready_sender, ready) = mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            actix::System::new().block_on(async move {
                let mut builder = Bus::builder(config);
                for (name, handler) in handlers() {
                    builder = builder.command(name, handler);
                }
                let bus = builder.start().expect("the bus starts");
                let open = bus.wait_for_edges(Duration::from_secs(10)).await;
                let _ = ready_sender.send(open);
                let _ = stopped.await;
                bus.shutdown().await;
            });
        });
        let open = ready.recv_timeout(Duration::from_secs(20));
        assert_eq!(open, Ok(true), "the in-process bus did not open its edges");
        BusThread {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for BusThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Counts of a [`GatedHandler`], shared with the test.
#[derive(Default)]
struct GateCounts {
    calls: AtomicUsize,
    running: AtomicUsize,
    peak: AtomicUsize,
}

/// Holds every command until its gate opens, counting calls and how many
/// wait at once.
struct GatedHandler {
    gate: watch::Receiver<bool>,
    counts: Arc<GateCounts>,
}

impl Actor for GatedHandler {
    type Context = Context<Self>;
}

impl Handler<Command> for GatedHandler {
    type Result = ResponseFuture<Result<Value, HandlerError>>;

    fn handle(&mut self, _command: Command, _ctx: &mut Self::Context) -> Self::Result {
        let counts = self.counts.clone();
        counts.calls.fetch_add(1, Ordering::SeqCst);
        let now = counts.running.fetch_add(1, Ordering::SeqCst) + 1;
        counts.peak.fetch_max(now, Ordering::SeqCst);
        let mut gate = self.gate.clone();
        Box::pin(async move {
            let _ = gate.wait_for(|open| *open).await;
            counts.running.fetch_sub(1, Ordering::SeqCst);
            Ok(json!({"released": true}))
        })
    }
}

/// A gate, its counts, and a config-independent way to build the handler.
struct Gate {
    open: watch::Sender<bool>,
    closed: watch::Receiver<bool>,
    counts: Arc<GateCounts>,
}

impl Gate {
    fn new() -> Gate {
        let (open, closed) = watch::channel(false);
        Gate {
            open,
            closed,
            counts: Arc::default(),
        }
    }

    /// A builder of the handler for [`BusThread::start`].
    fn handlers(&self) -> impl FnOnce() -> Vec<(&'static str, Recipient<Command>)> + Send {
        let gate = self.closed.clone();
        let counts = self.counts.clone();
        move || {
            let handler = GatedHandler { gate, counts }.start();
            vec![("slow", handler.recipient())]
        }
    }

    fn release(&self) {
        self.open.send_replace(true);
    }

    fn running(&self) -> usize {
        self.counts.running.load(Ordering::SeqCst)
    }
}

/// Send `slow` from `count` peers on threads of their own; each thread
/// returns its reply.
fn slow_requests(url: &str, count: usize) -> Vec<JoinHandle<Result<Value, String>>> {
    (0..count)
        .map(|n| {
            let url = url.to_string();
            std::thread::spawn(move || {
                let peer = Peer::dial(&url).map_err(|err| err.to_string())?;
                peer.send_json(&json!({"command": "slow", "job_uuid": format!("slow-{n}")}))
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Size limits
// ---------------------------------------------------------------------------

const SMALL_LIMIT: usize = 64 * 1024;

fn echo_of_size(size: usize) -> Vec<u8> {
    let frame = r#"{"command": "echo", "payload": {"blob": "@"}}"#;
    frame
        .replace('@', &"x".repeat(size - (frame.len() - 1)))
        .into_bytes()
}

#[test]
fn an_oversize_request_gets_too_large_naming_its_size_on_the_command_and_data_sockets() {
    let addresses = TestAddresses::new();
    let limit = SMALL_LIMIT.to_string();
    let mut serve = Serve::start(
        addresses.path(),
        &addresses.addresses,
        &["--max-message-size", &limit],
    );
    for url in [&addresses.addresses.command, &addresses.addresses.data] {
        let peer = Peer::dial(url).expect("dial");
        let at_limit = peer.send(&echo_of_size(SMALL_LIMIT)).unwrap();
        assert_eq!(at_limit["status"], "ok", "{url}: a body at the limit");

        for size in [SMALL_LIMIT + 1, 100_000, hard_receive_limit(SMALL_LIMIT)] {
            let reply = peer.send(&echo_of_size(size)).unwrap();
            assert_eq!(reply["code"], code::TOO_LARGE, "{url}, {size} bytes");
            let text = reply["error"].as_str().unwrap();
            assert!(text.contains(&size.to_string()), "{text}");
            assert!(text.contains(&limit), "{text}");
            peer.ping().expect("ping after too_large");
            eprintln!("{url}: {size} bytes -> too_large: {text}");
        }
    }
    assert!(serve.alive());
}

/// pynng peer: sends one request of the given size and reports how it ended
/// and how many connections its socket made meanwhile.
const OVERSIZE_PROBE: &str = r#"
import json, sys, time, pynng
address, size, resend_ms = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
connects = []
with pynng.Req0(recv_timeout=3000, send_timeout=3000) as sock:
    if resend_ms != 0:
        sock.resend_time = resend_ms
    sock.add_post_pipe_connect_cb(lambda pipe: connects.append(time.monotonic()))
    sock.dial(address, block=True)
    body = json.dumps({"command": "echo", "payload": {"blob": "x" * size}}).encode()
    started = time.monotonic()
    sock.send(body)
    try:
        reply = json.loads(sock.recv())
        outcome = {"code": reply.get("code"), "status": reply.get("status")}
    except pynng.exceptions.NNGException as err:
        outcome = {"error": type(err).__name__}
    outcome["seconds"] = round(time.monotonic() - started, 2)
    outcome["connects"] = len(connects)
    print(json.dumps(outcome))
"#;

fn oversize_probe(url: &str, size: usize, resend_ms: i64) -> Value {
    let output = common::python()
        .args(["-c", OVERSIZE_PROBE, url, &size.to_string()])
        .arg(resend_ms.to_string())
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "probe failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("probe prints JSON")
}

/// What happens past NNG's hard receive limit, where the transport drops
/// the connection before the bus sees a byte: the bus serves on and its
/// descriptors return to baseline. A pynng REQ with NNG's default resend
/// (60 s) re-dials and re-sends once per reconnect interval (pynng: 1 s)
/// until its own receive timeout; with resend disabled it fails at once with
/// `ConnectionReset`. The test pins both behaviours and prints them.
#[test]
fn a_request_beyond_the_hard_receive_limit_costs_only_its_own_connection() {
    let addresses = TestAddresses::new();
    let limit = SMALL_LIMIT.to_string();
    let mut serve = Serve::start(
        addresses.path(),
        &addresses.addresses,
        &["--max-message-size", &limit],
    );
    let url = addresses.addresses.command.clone();
    let baseline = serve.quiet_fds();
    let size = hard_receive_limit(SMALL_LIMIT) + 1024;

    let between = oversize_probe(&url, 100_000, 0);
    assert_eq!(between["code"], code::TOO_LARGE, "{between}");
    assert_eq!(between["connects"], 1, "{between}");

    let no_resend = oversize_probe(&url, size, -1);
    assert_eq!(no_resend["error"], "ConnectionReset", "{no_resend}");
    assert_eq!(no_resend["connects"], 1, "{no_resend}");

    let default_resend = oversize_probe(&url, size, 0);
    assert_eq!(default_resend["error"], "Timeout", "{default_resend}");
    let reconnects = default_resend["connects"].as_u64().unwrap();
    // Not a tight loop: one attempt per reconnect interval (pynng: 1 s,
    // shorter while a connection is being torn down).
    assert!(
        reconnects <= 30,
        "the default pynng REQ reconnected {reconnects} times in 3 s"
    );

    // The bus's own client behaves like the default pynng REQ: NNG re-dials
    // and re-sends until the request's timeout, which is what it reports.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let options = ClientOptions::default().timeout(Duration::from_secs(2));
    let client = BusClient::connect_lazy(&url, options).unwrap();
    let started = Instant::now();
    let rust_client = runtime.block_on(client.send_raw(&echo_of_size(size)));
    let rust_client_after = started.elapsed();
    assert!(
        matches!(rust_client, Err(ClientError::Timeout { .. })),
        "{rust_client:?}"
    );
    drop(client);

    let slowest = pings_from_a_fresh_peer(&url, 20);
    let after = serve.fds_settle_to(baseline);
    assert!(after <= baseline, "fds {baseline} -> {after}");
    assert!(serve.alive());
    eprintln!(
        "beyond the hard limit ({size} bytes, limit {limit}): between limits {between}; \
         resend disabled {no_resend}; pynng default resend {default_resend}; BusClient \
         {:?} after {rust_client_after:?}; \
         bus fds {baseline} -> {after}; slowest ping after {slowest:?}; bus warnings {:?}",
        rust_client.err(),
        serve.warnings()
    );
}

// ---------------------------------------------------------------------------
// Bounded memory
// ---------------------------------------------------------------------------

#[test]
fn past_the_in_flight_limit_requests_get_overloaded_and_the_bus_recovers() {
    let addresses = TestAddresses::new();
    let limit = 4;
    let config = BusConfig {
        max_commands_in_flight: limit,
        ..BusConfig::default().addresses(addresses.addresses.clone())
    };
    let gate = Gate::new();
    let _bus = BusThread::start(config, gate.handlers());
    let url = addresses.addresses.command.clone();

    let slow = slow_requests(&url, limit);
    assert!(
        wait_until(REPLY_LIMIT, || gate.running() == limit),
        "only {} slow commands started",
        gate.running()
    );
    let peer = Peer::dial(&url).unwrap();
    let mut overloaded = Vec::new();
    for body in [json!({"command": "ping"}), json!({"command": "slow"})] {
        let reply = peer.send_json(&body).unwrap();
        assert_eq!(reply["code"], code::OVERLOADED, "{reply}");
        overloaded.push(reply["error"].as_str().unwrap().to_string());
    }
    assert_eq!(gate.counts.calls.load(Ordering::SeqCst), limit);

    gate.release();
    for thread in slow {
        let reply = thread.join().unwrap().unwrap();
        assert_eq!(reply["status"], "ok", "{reply}");
    }
    peer.ping().expect("ping once the slow commands finished");
    eprintln!("in-flight limit {limit}: overloaded replies {overloaded:?}; recovered");
}

#[test]
fn the_rep_context_pool_bounds_the_requests_in_service_and_queues_the_rest() {
    let addresses = TestAddresses::new();
    let contexts = 4;
    let clients = 12;
    let config = BusConfig {
        contexts_per_socket: contexts,
        ..BusConfig::default().addresses(addresses.addresses.clone())
    };
    let gate = Gate::new();
    let _bus = BusThread::start(config, gate.handlers());

    let slow = slow_requests(&addresses.addresses.command, clients);
    assert!(
        wait_until(REPLY_LIMIT, || gate.running() == contexts),
        "{} running",
        gate.running()
    );
    // Give the queued requests a fair chance to get in (they must not).
    let overflowed = wait_until(Duration::from_millis(300), || gate.running() > contexts);
    assert!(
        !overflowed,
        "{} running with {contexts} contexts",
        gate.running()
    );

    gate.release();
    for thread in slow {
        let reply = thread.join().unwrap().unwrap();
        assert_eq!(reply["status"], "ok", "{reply}");
    }
    let calls = gate.counts.calls.load(Ordering::SeqCst);
    let peak = gate.counts.peak.load(Ordering::SeqCst);
    assert_eq!(calls, clients);
    assert_eq!(peak, contexts);
    eprintln!("{clients} slow requests on {contexts} contexts: peak {peak} in service, all {calls} answered");
}

/// Counts its calls and answers with the count.
struct CountingHandler {
    calls: Arc<AtomicUsize>,
}

impl Actor for CountingHandler {
    type Context = Context<Self>;
}

impl Handler<Command> for CountingHandler {
    type Result = Result<Value, HandlerError>;

    fn handle(&mut self, _command: Command, _ctx: &mut Self::Context) -> Self::Result {
        Ok(json!({"call": self.calls.fetch_add(1, Ordering::SeqCst) + 1}))
    }
}

#[test]
fn the_dedup_cache_forgets_past_its_capacity_and_after_its_ttl() {
    let addresses = TestAddresses::new();
    let capacity = 8;
    let ttl = Duration::from_millis(500);
    let config = BusConfig {
        dedup_capacity: capacity,
        dedup_ttl: ttl,
        ..BusConfig::default().addresses(addresses.addresses.clone())
    };
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let _bus = BusThread::start(config, move || {
        let handler = CountingHandler { calls: counter }.start();
        vec![("count", handler.recipient())]
    });
    let peer = Peer::dial(&addresses.addresses.command).unwrap();
    let send = |key: &str| {
        peer.send_json(&json!({"command": "count", "job_uuid": key}))
            .unwrap()["result"]["call"]
            .as_u64()
            .unwrap()
    };

    let started = Instant::now();
    let keys: Vec<String> = (0..20).map(|n| format!("key-{n}")).collect();
    for key in &keys {
        send(key);
    }
    assert_eq!(send("key-19"), 20, "the newest key was forgotten");
    assert_eq!(send("key-0"), 21, "the oldest key was still remembered");
    let newest_first = send("key-19");
    assert_eq!(newest_first, 20);

    let mut expired_after = None;
    let expired = wait_until(REPLY_LIMIT, || {
        let call = send("key-19");
        if call != newest_first {
            expired_after = Some(started.elapsed());
        }
        call != newest_first
    });
    assert!(expired, "key-19 was never forgotten");
    let expired_after = expired_after.unwrap();
    assert!(expired_after >= ttl, "forgotten after {expired_after:?}");
    eprintln!(
        "dedup capacity {capacity}, ttl {ttl:?}: 20 keys, the oldest evicted, the newest \
         remembered, then forgotten after {expired_after:?}; {} handler calls",
        calls.load(Ordering::SeqCst)
    );
}

/// Most the resident memory may still grow over the second half of a soak
/// once warmed up: a leak of a few dozen bytes per request would cross it.
const LATE_GROWTH_LIMIT_KIB: u64 = 2 * 1024;

/// The RSS samples (one a second) grow by at most [`LATE_GROWTH_LIMIT_KIB`]
/// over their second half.
fn assert_levels_off(samples: &[u64]) {
    let middle = samples[samples.len() / 2];
    let last = *samples.last().expect("samples");
    assert!(
        last <= middle + LATE_GROWTH_LIMIT_KIB,
        "RSS still growing: {middle} KiB -> {last} KiB over the second half ({samples:?})"
    );
}

/// Flood the command socket from several peers for `SOAK` and check that
/// the bus's resident memory levels off once the dedup cache is full.
const SOAK: Duration = Duration::from_secs(10);
const SOAK_PEERS: usize = 4;
const WARM_UP_LIMIT: Duration = Duration::from_secs(8);
/// The soaked bus's dedup cache: small, so that warm-up fills it even on a
/// loaded machine and the soak measures steady state.
const SOAK_DEDUP_CAPACITY: usize = 1000;

/// The bodies one soak peer cycles through: every outcome the router has.
fn soak_body(peer: usize, n: usize) -> Vec<u8> {
    match n % 8 {
        0 => br#"{"command": "ping"}"#.to_vec(),
        1 | 2 => serde_json::to_vec(&json!({
            "command": "echo",
            "job_uuid": format!("soak-{peer}-{n}"),
            "payload": {"n": n, "pad": "x".repeat(64)},
        }))
        .unwrap(),
        3 => br#"{"command": "echo", "job_uuid": "soak-repeated", "payload": {}}"#.to_vec(),
        4 => b"{not json".to_vec(),
        5 => br#"{"command": "no_such_command", "request_id": "r"}"#.to_vec(),
        6 => echo_of_size(SMALL_LIMIT + 1000),
        _ => vec![0xff; 16],
    }
}

#[test]
fn a_ten_second_flood_of_the_command_socket_levels_off_in_resident_memory() {
    let addresses = TestAddresses::new();
    let limit = SMALL_LIMIT.to_string();
    let dedup_capacity = SOAK_DEDUP_CAPACITY.to_string();
    let mut serve = Serve::start(
        addresses.path(),
        &addresses.addresses,
        &[
            "--max-message-size",
            &limit,
            "--dedup-capacity",
            &dedup_capacity,
        ],
    );
    let url = addresses.addresses.command.clone();
    let start_rss = serve.rss_kib();
    let start_fds = serve.quiet_fds();

    // Warm up until the dedup cache is full and evicting (a slow, loaded
    // machine may not get through a full-size cache in time), or for at most
    // `WARM_UP_LIMIT`, then soak.
    let total = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooders: Vec<_> = (0..SOAK_PEERS)
        .map(|peer_id| {
            let (url, total, stop) = (url.clone(), total.clone(), stop.clone());
            std::thread::spawn(move || -> Result<usize, String> {
                let peer = Peer::dial(&url).map_err(|err| err.to_string())?;
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) && n < 10_000_000 {
                    let reply = peer.send(&soak_body(peer_id, n))?;
                    if reply["status"] != "ok" && reply["code"].as_str().is_none() {
                        return Err(format!("reply without code: {reply}"));
                    }
                    n += 1;
                    total.fetch_add(1, Ordering::Relaxed);
                }
                Ok(n)
            })
        })
        .collect();

    let warm_started = Instant::now();
    let unique_share = 4;
    wait_until(WARM_UP_LIMIT, || {
        total.load(Ordering::Relaxed) / unique_share > SOAK_DEDUP_CAPACITY * 2
    });
    let warm_time = warm_started.elapsed();
    let warm_rss = serve.rss_kib();
    let warm_total = total.load(Ordering::Relaxed);

    let mut samples = Vec::new();
    let soak_started = Instant::now();
    while soak_started.elapsed() < SOAK {
        let second = soak_started.elapsed() + Duration::from_secs(1);
        wait_until(Duration::from_secs(1), || soak_started.elapsed() >= second);
        samples.push(serve.rss_kib());
    }
    stop.store(true, Ordering::Relaxed);
    let mut per_peer = Vec::new();
    for flooder in flooders {
        per_peer.push(flooder.join().unwrap().expect("every reply well-formed"));
    }
    let status = Peer::dial(&url)
        .unwrap()
        .send_json(&json!({"command": "status"}))
        .unwrap();
    let router = &status["result"]["roles"]["command"];
    let soaked = total.load(Ordering::Relaxed) - warm_total;
    let end_rss = *samples.last().unwrap();
    let peak_rss = *samples.iter().max().unwrap();
    let end_fds = serve.fds_settle_to(start_fds);

    eprintln!(
        "soak: {SOAK_PEERS} peers; warm-up {warm_total} requests in {warm_time:?}; \
         {soaked} requests in {SOAK:?} ({:.0}/s); RSS start {:.1} MiB, after warm-up {:.1} MiB, \
         peak {:.1} MiB, end {:.1} MiB; per second {:?} KiB; fds {start_fds} -> {end_fds}; \
         router errors {}, dead letters skipped {}",
        soaked as f64 / SOAK.as_secs_f64(),
        mib(start_rss),
        mib(warm_rss),
        mib(peak_rss),
        mib(end_rss),
        samples,
        router["errors"],
        router["dead_letters_skipped"],
    );
    assert!(serve.alive(), "the bus died during the soak");
    let allowed = warm_rss + (warm_rss / 4).max(16 * 1024);
    assert!(
        peak_rss <= allowed,
        "RSS grew from {warm_rss} KiB after warm-up to {peak_rss} KiB (allowed {allowed})"
    );
    assert_levels_off(&samples);
    assert!(end_fds <= start_fds, "fds {start_fds} -> {end_fds}");
    pings_from_a_fresh_peer(&url, 3);
}

// ---------------------------------------------------------------------------
// Many peers
// ---------------------------------------------------------------------------

#[test]
fn two_hundred_concurrent_req_clients_all_get_their_own_replies_and_fds_return_to_baseline() {
    let addresses = TestAddresses::new();
    let mut serve = Serve::start(addresses.path(), &addresses.addresses, &[]);
    let url = addresses.addresses.command.clone();
    let clients = 200;
    let rounds = 5;
    let start_fds = serve.quiet_fds();
    let start_rss = serve.rss_kib();

    let connected = Arc::new(Barrier::new(clients + 1));
    let go = Arc::new(Barrier::new(clients + 1));
    let threads: Vec<_> = (0..clients)
        .map(|client| {
            let (url, connected, go) = (url.clone(), connected.clone(), go.clone());
            std::thread::spawn(move || -> Result<(), String> {
                let peer = Peer::dial(&url);
                connected.wait();
                go.wait();
                let peer = peer.map_err(|err| format!("client {client}: {err}"))?;
                for round in 0..rounds {
                    let key = format!("client-{client}-round-{round}");
                    let body = json!({"command": "echo", "job_uuid": key, "payload": {"client": client, "round": round}});
                    let reply = peer.send_json(&body)?;
                    let echoed = &reply["result"]["echo"];
                    if reply["job_uuid"] != key || echoed["client"] != client || echoed["round"] != round {
                        return Err(format!("client {client} got someone else's reply: {reply}"));
                    }
                }
                Ok(())
            })
        })
        .collect();

    connected.wait();
    let mut peak_fds = serve.fds();
    wait_until(REPLY_LIMIT, || {
        peak_fds = serve.fds();
        peak_fds >= start_fds + clients
    });
    let started = Instant::now();
    go.wait();
    let outcomes: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let elapsed = started.elapsed();
    let failures: Vec<_> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "{} clients failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let peak_rss = serve.rss_kib();

    let end_fds = serve.fds_settle_to(start_fds);
    let end_rss = serve.rss_kib();
    eprintln!(
        "{clients} concurrent REQ clients x {rounds} echoes in {elapsed:?}: fds {start_fds} -> \
         peak {peak_fds} -> {end_fds}; RSS {:.1} MiB -> {:.1} MiB -> {:.1} MiB",
        mib(start_rss),
        mib(peak_rss),
        mib(end_rss)
    );
    assert!(
        peak_fds >= start_fds + clients,
        "the clients never all connected"
    );
    assert!(end_fds <= start_fds, "fds {start_fds} -> {end_fds}");
    assert!(
        end_rss <= start_rss + 32 * 1024,
        "RSS {start_rss} KiB -> {end_rss} KiB"
    );
    assert!(serve.alive());
    pings_from_a_fresh_peer(&url, 3);
}

#[test]
fn connections_opened_and_closed_in_a_tight_loop_leave_no_descriptors_behind() {
    let addresses = TestAddresses::new();
    let mut serve = Serve::start(addresses.path(), &addresses.addresses, &[]);
    let url = addresses.addresses.command.clone();
    let start_fds = serve.quiet_fds();
    let start_rss = serve.rss_kib();
    let cycles = 300;

    let started = Instant::now();
    let mut answered = 0;
    for n in 0..cycles {
        let peer = Peer::dial(&url).expect("dial");
        match n % 3 {
            // Connect and leave at once.
            0 => {}
            // Ask and wait for the answer.
            1 => {
                peer.ping().expect("ping");
                answered += 1;
            }
            // Ask and leave before the answer.
            _ => {
                let body = serde_json::to_vec(
                    &json!({"command": "echo", "job_uuid": format!("gone-{n}")}),
                )
                .unwrap();
                peer.socket
                    .send(&body[..])
                    .map_err(|(_, err)| err)
                    .expect("send");
            }
        }
        drop(peer);
    }
    let elapsed = started.elapsed();

    let end_fds = serve.fds_settle_to(start_fds);
    let end_rss = serve.rss_kib();
    let slowest = pings_from_a_fresh_peer(&url, 10);
    eprintln!(
        "{cycles} connect/close cycles ({answered} answered) in {elapsed:?}: fds {start_fds} -> \
         {end_fds}; RSS {:.1} MiB -> {:.1} MiB; slowest ping after {slowest:?}",
        mib(start_rss),
        mib(end_rss)
    );
    assert!(end_fds <= start_fds, "fds {start_fds} -> {end_fds}");
    assert!(
        end_rss <= start_rss + 16 * 1024,
        "RSS {start_rss} KiB -> {end_rss} KiB"
    );
    assert!(serve.alive());
}

/// Silent peers of three kinds: REQ sockets that never send, Unix streams
/// that never finish NNG's handshake, and one that sends half of it. Others
/// are served meanwhile; NNG drops a handshake that does not finish within
/// its negotiation timeout (10 s in NNG 1.4), so silent streams cannot pile
/// up for ever.
#[test]
fn peers_that_connect_and_send_nothing_do_not_hold_up_others() {
    let addresses = TestAddresses::new();
    let mut serve = Serve::start(addresses.path(), &addresses.addresses, &[]);
    let url = addresses.addresses.command.clone();
    let start_fds = serve.quiet_fds();

    let silent_req: Vec<Peer> = (0..5).map(|_| Peer::dial(&url).unwrap()).collect();
    let mut silent_streams: Vec<UnixStream> = (0..5)
        .map(|_| UnixStream::connect(ipc_path(&url)).unwrap())
        .collect();
    let mut half = UnixStream::connect(ipc_path(&url)).unwrap();
    half.write_all(&sp_header(REQ0)[..4]).unwrap();
    silent_streams.push(half);
    let with_silent_fds = serve.fds();

    let slowest = pings_from_a_fresh_peer(&url, 50);
    assert!(slowest < Duration::from_secs(1), "slowest ping {slowest:?}");

    let started = Instant::now();
    for stream in &silent_streams {
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
    }
    let dropped = silent_streams
        .iter_mut()
        .all(|stream| closed_by_peer(stream, Duration::from_secs(15)));
    let dropped_after = started.elapsed();
    drop(silent_req);
    drop(silent_streams);
    let end_fds = serve.fds_settle_to(start_fds);
    eprintln!(
        "5 silent REQ peers, 6 silent streams: fds {start_fds} -> {with_silent_fds} -> {end_fds}; \
         slowest of 50 pings meanwhile {slowest:?}; silent streams dropped by the bus: {dropped} \
         (after {dropped_after:?})"
    );
    assert!(
        dropped,
        "a peer that never finishes the handshake is kept for ever"
    );
    assert!(end_fds <= start_fds, "fds {start_fds} -> {end_fds}");
    assert!(serve.alive());
}

// ---------------------------------------------------------------------------
// Wrong protocols
// ---------------------------------------------------------------------------

#[test]
fn push_sub_pub_and_rep_sockets_dialing_the_command_address_do_not_disturb_other_peers() {
    let addresses = TestAddresses::new();
    let mut serve = Serve::start(addresses.path(), &addresses.addresses, &[]);
    let url = addresses.addresses.command.clone();
    let start_fds = serve.quiet_fds();

    let mut wrong = Vec::new();
    for protocol in [
        Protocol::Push0,
        Protocol::Sub0,
        Protocol::Pub0,
        Protocol::Rep0,
        Protocol::Pair1,
    ] {
        let socket = Socket::new(protocol).unwrap();
        socket.dial_async(&url).unwrap();
        wrong.push((protocol, socket));
    }
    // A PUSH send with no compatible peer must not wait for ever.
    let push = &wrong[0].1;
    push.set_opt::<SendTimeout>(Some(Duration::from_millis(200)))
        .unwrap();
    let push_send = push
        .send(&br#"{"command": "ping"}"#[..])
        .map_err(|(_, err)| err);

    let started = Instant::now();
    let slowest = pings_from_a_fresh_peer(&url, 100);
    let pinging = started.elapsed();
    let during_fds = serve.fds();
    drop(wrong);
    let end_fds = serve.fds_settle_to(start_fds);
    eprintln!(
        "PUSH, SUB, PUB, REP and PAIR dialing the command address: PUSH send {push_send:?}; \
         100 pings in {pinging:?} (slowest {slowest:?}); fds {start_fds} -> {during_fds} -> \
         {end_fds}; bus warnings {:?}",
        serve.warnings()
    );
    assert!(push_send.is_err(), "the bus accepted a PUSH message");
    assert!(end_fds <= start_fds, "fds {start_fds} -> {end_fds}");
    assert!(serve.alive());
}

/// One raw TCP peer's misbehaviour.
struct Garbage {
    name: &'static str,
    bytes: Vec<u8>,
}

fn tcp_garbage() -> Vec<Garbage> {
    let frame =
        |payload: &[u8]| [(payload.len() as u64).to_be_bytes().as_slice(), payload].concat();
    let mut random = Vec::with_capacity(64 * 1024);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    while random.len() < 64 * 1024 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        random.extend(state.to_le_bytes());
    }
    vec![
        Garbage {
            name: "an HTTP request",
            bytes: b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".to_vec(),
        },
        Garbage {
            name: "64 KiB of noise",
            bytes: random,
        },
        Garbage {
            name: "a PUSH handshake",
            bytes: sp_header(PUSH0).to_vec(),
        },
        Garbage {
            name: "a bad SP version",
            bytes: vec![0, b'S', b'P', 9, 0, 0x30, 0, 0],
        },
        Garbage {
            name: "a REQ handshake and a frame claiming 2^62 bytes",
            bytes: [sp_header(REQ0).as_slice(), &(1u64 << 62).to_be_bytes()].concat(),
        },
        Garbage {
            name: "a REQ handshake and an empty frame",
            bytes: [sp_header(REQ0).as_slice(), &frame(b"")].concat(),
        },
        Garbage {
            name: "a REQ handshake and a frame with no request id",
            bytes: [sp_header(REQ0).as_slice(), &frame(b"{}")].concat(),
        },
        Garbage {
            name: "a REQ handshake cut short",
            bytes: sp_header(REQ0)[..5].to_vec(),
        },
    ]
}

#[test]
fn raw_tcp_garbage_on_the_command_listener_does_not_disturb_other_peers() {
    let addresses = TestAddresses::new();
    let tcp = free_tcp_url();
    let mut on_tcp = addresses.addresses.clone();
    on_tcp.command = tcp.clone();
    let mut serve = Serve::start(addresses.path(), &on_tcp, &[]);
    let address = tcp.strip_prefix("tcp://").unwrap().to_string();
    let start_fds = serve.quiet_fds();
    let peer = Peer::dial(&tcp).unwrap();

    let mut report = Vec::new();
    for garbage in tcp_garbage() {
        let mut stream = TcpStream::connect(&address).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        // The bus may hang up mid-write: that is an answer too.
        let _ = stream.write_all(&garbage.bytes);
        let hung_up = closed_by_peer(&mut stream, Duration::from_secs(12));
        peer.ping()
            .unwrap_or_else(|err| panic!("ping after {}: {err}", garbage.name));
        report.push(format!("{}: hung up {hung_up}", garbage.name));
    }

    // A hand-built REQ peer that frames a bad body correctly is answered.
    let mut stream = TcpStream::connect(&address).unwrap();
    stream.set_read_timeout(Some(REPLY_LIMIT)).unwrap();
    let request_id = 0x8000_0001u32.to_be_bytes();
    let message = [request_id.as_slice(), b"not json"].concat();
    let framed = [
        sp_header(REQ0).as_slice(),
        &(message.len() as u64).to_be_bytes(),
        &message,
    ]
    .concat();
    stream.write_all(&framed).unwrap();
    let mut header = [0u8; 8];
    stream.read_exact(&mut header).unwrap();
    assert_eq!(header, sp_header(REP0), "the bus's handshake");
    let mut length = [0u8; 8];
    stream.read_exact(&mut length).unwrap();
    let mut reply = vec![0u8; u64::from_be_bytes(length) as usize];
    stream.read_exact(&mut reply).unwrap();
    assert_eq!(&reply[..4], &request_id, "the reply carries the request id");
    let reply: Value = serde_json::from_slice(&reply[4..]).unwrap();
    assert_eq!(reply["code"], code::BAD_REQUEST, "{reply}");
    drop(stream);

    drop(peer);
    let end_fds = serve.fds_settle_to(start_fds);
    eprintln!(
        "raw TCP peers on {tcp}: {report:?}; a hand-framed REQ got {reply}; fds {start_fds} -> \
         {end_fds}; bus warnings {:?}",
        serve.warnings()
    );
    assert!(end_fds <= start_fds, "fds {start_fds} -> {end_fds}");
    assert!(serve.alive());
}

#[test]
fn raw_garbage_on_the_ipc_command_socket_does_not_disturb_other_peers() {
    let addresses = TestAddresses::new();
    let mut serve = Serve::start(addresses.path(), &addresses.addresses, &[]);
    let url = addresses.addresses.command.clone();
    let start_fds = serve.quiet_fds();
    let peer = Peer::dial(&url).unwrap();
    let ipc_frame = |payload: &[u8]| {
        [
            [1u8].as_slice(),
            &(payload.len() as u64).to_be_bytes(),
            payload,
        ]
        .concat()
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("noise", b"\x00\x01garbage\xff\xfe".repeat(100)),
        ("a PUSH handshake", sp_header(PUSH0).to_vec()),
        (
            "a REQ handshake and a frame of the wrong type",
            [sp_header(REQ0).as_slice(), &[7u8; 9]].concat(),
        ),
        (
            "a REQ handshake and a frame claiming 2^62 bytes",
            [
                sp_header(REQ0).as_slice(),
                &[1u8],
                &(1u64 << 62).to_be_bytes(),
            ]
            .concat(),
        ),
        (
            "a REQ handshake and a frame with no request id",
            [sp_header(REQ0).as_slice(), &ipc_frame(b"{}")].concat(),
        ),
    ];
    let mut report = Vec::new();
    for (name, bytes) in cases {
        let mut stream = UnixStream::connect(ipc_path(&url)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let _ = stream.write_all(&bytes);
        let hung_up = closed_by_peer(&mut stream, Duration::from_secs(12));
        peer.ping()
            .unwrap_or_else(|err| panic!("ping after {name}: {err}"));
        report.push(format!("{name}: hung up {hung_up}"));
    }
    drop(peer);
    let end_fds = serve.fds_settle_to(start_fds);
    eprintln!(
        "raw ipc peers: {report:?}; fds {start_fds} -> {end_fds}; bus warnings {:?}",
        serve.warnings()
    );
    assert!(end_fds <= start_fds, "fds {start_fds} -> {end_fds}");
    assert!(serve.alive());
}

// ---------------------------------------------------------------------------
// The event bus and the job queue
// ---------------------------------------------------------------------------

/// A SUB peer of the event address, subscribed to `prefix`.
fn subscriber(url: &str, prefix: &[u8]) -> Socket {
    let socket = Socket::new(Protocol::Sub0).unwrap();
    socket
        .set_opt::<nng::options::protocol::pubsub::Subscribe>(prefix.to_vec())
        .unwrap();
    socket
        .set_opt::<RecvTimeout>(Some(Duration::from_millis(200)))
        .unwrap();
    socket.dial(url).unwrap();
    socket
}

fn publish(peer: &Peer, n: usize, pad: usize) -> Result<Value, String> {
    peer.send_json(&json!({
        "command": "bus.publish",
        "payload": {"event_type": "trade.signal", "data": {"n": n, "pad": "x".repeat(pad)}},
    }))
}

#[test]
fn fifty_subscribers_over_ipc_each_receive_every_event_and_fds_return_to_baseline() {
    let addresses = TestAddresses::new();
    let mut serve = Serve::start(addresses.path(), &addresses.addresses, &[]);
    let start_fds = serve.quiet_fds();
    let (subscribers, events) = (50, 100);

    let subscribed = Arc::new(Barrier::new(subscribers + 1));
    let threads: Vec<_> = (0..subscribers)
        .map(|_| {
            let (url, subscribed) = (addresses.addresses.event.clone(), subscribed.clone());
            std::thread::spawn(move || -> Result<usize, String> {
                let socket = subscriber(&url, br#"{"event_type":"trade.signal""#);
                subscribed.wait();
                let mut seen = 0;
                let deadline = Instant::now() + REPLY_LIMIT;
                while seen < events && Instant::now() < deadline {
                    let Ok(body) = socket.recv() else { continue };
                    let event = dgbit_bus::wire::Event::decode(&body, 0)
                        .map_err(|err| format!("{err}: {}", String::from_utf8_lossy(&body)))?;
                    if event.data["n"] != seen {
                        return Err(format!("event {seen} arrived as {}", event.data["n"]));
                    }
                    seen += 1;
                }
                Ok(seen)
            })
        })
        .collect();
    subscribed.wait();
    let mut peak_fds = serve.fds();
    wait_until(REPLY_LIMIT, || {
        peak_fds = serve.fds();
        peak_fds >= start_fds + subscribers
    });

    let peer = Peer::dial(&addresses.addresses.command).unwrap();
    let started = Instant::now();
    for n in 0..events {
        let reply = publish(&peer, n, 16).unwrap();
        assert_eq!(reply["status"], "ok", "{reply}");
    }
    let counts: Vec<usize> = threads
        .into_iter()
        .map(|thread| thread.join().unwrap().unwrap())
        .collect();
    let elapsed = started.elapsed();
    drop(peer);
    let end_fds = serve.fds_settle_to(start_fds);
    eprintln!(
        "{subscribers} SUB peers, {events} events in {elapsed:?}: received {:?}..; fds {start_fds} \
         -> peak {peak_fds} -> {end_fds}",
        &counts[..5]
    );
    assert!(
        peak_fds >= start_fds + subscribers,
        "the subscribers never all connected"
    );
    assert!(
        counts.iter().all(|&count| count == events),
        "counts {counts:?}"
    );
    assert!(end_fds <= start_fds, "fds {start_fds} -> {end_fds}");
    assert!(serve.alive());
}

#[test]
fn past_the_queue_capacity_enqueue_is_refused_overloaded_at_once() {
    let addresses = TestAddresses::new();
    let capacity = 50;
    let config = BusConfig {
        queue_capacity: capacity,
        ..BusConfig::default().addresses(addresses.addresses.clone())
    };
    let _bus = BusThread::start(config, Vec::new);
    let peer = Peer::dial(&addresses.addresses.command).unwrap();

    let mut codes = std::collections::BTreeMap::<String, usize>::new();
    let mut slowest = Duration::ZERO;
    for n in 0..capacity + 20 {
        let started = Instant::now();
        let reply = peer
            .send_json(&json!({"command": "bus.enqueue", "payload": {"job_type": "nobody-runs-this", "payload": {"n": n}}}))
            .unwrap();
        slowest = slowest.max(started.elapsed());
        let outcome = reply["code"].as_str().unwrap_or("ok").to_string();
        *codes.entry(outcome).or_default() += 1;
    }
    let jobs = peer.send_json(&json!({"command": "bus.jobs"})).unwrap();
    eprintln!(
        "queue capacity {capacity}: {} enqueues -> {codes:?}, slowest {slowest:?}; bus.jobs {}",
        capacity + 20,
        jobs["result"]
    );
    assert_eq!(codes.get("ok"), Some(&capacity));
    assert_eq!(codes.get(code::OVERLOADED), Some(&20));
    assert!(
        slowest < Duration::from_secs(1),
        "an enqueue waited {slowest:?}"
    );
    peer.ping().unwrap();
}

/// Flood the event and job sockets for `SOAK` and check that resident
/// memory levels off: events go to a SUB peer that reads and one that never
/// does; each job peer enqueues a job and then pulls one as a PULL peer, so
/// the queue stays short and everything else the dispatcher keeps per job
/// would show as growth.
#[test]
fn a_flood_of_events_and_jobs_levels_off_in_resident_memory() {
    let addresses = TestAddresses::new();
    let mut serve = Serve::start(addresses.path(), &addresses.addresses, &[]);
    let start_rss = serve.rss_kib();
    let start_fds = serve.quiet_fds();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (published, jobs) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));

    let _deaf = subscriber(&addresses.addresses.event, b"");
    let reader = {
        let (url, stop) = (addresses.addresses.event.clone(), stop.clone());
        std::thread::spawn(move || {
            let socket = subscriber(&url, b"");
            let mut seen = 0usize;
            while !stop.load(Ordering::Relaxed) {
                if socket.recv().is_ok() {
                    seen += 1;
                }
            }
            seen
        })
    };
    let mut floods = Vec::new();
    for _ in 0..2 {
        let (url, stop, published) = (
            addresses.addresses.command.clone(),
            stop.clone(),
            published.clone(),
        );
        floods.push(std::thread::spawn(move || -> Result<(), String> {
            let peer = Peer::dial(&url).map_err(|err| err.to_string())?;
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) && n < 10_000_000 {
                publish(&peer, n, 512)?;
                n += 1;
                published.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        }));
    }
    for worker in 0..2 {
        let (command, queue) = (
            addresses.addresses.command.clone(),
            addresses.addresses.job_queue.clone(),
        );
        let (stop, jobs) = (stop.clone(), jobs.clone());
        floods.push(std::thread::spawn(move || -> Result<(), String> {
            let peer = Peer::dial(&command).map_err(|err| err.to_string())?;
            let pull = Socket::new(Protocol::Pull0).map_err(|err| err.to_string())?;
            pull.set_opt::<RecvTimeout>(Some(REPLY_LIMIT)).map_err(|err| err.to_string())?;
            pull.dial(&queue).map_err(|err| err.to_string())?;
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) && n < 10_000_000 {
                let body = json!({"command": "bus.enqueue", "payload": {"job_type": "soak", "payload": {"worker": worker, "n": n, "pad": "x".repeat(256)}}});
                let reply = peer.send_json(&body)?;
                if reply["status"] != "ok" {
                    return Err(format!("enqueue refused: {reply}"));
                }
                let job = pull.recv().map_err(|err| format!("pull: {err}"))?;
                dgbit_bus::wire::JobMessage::decode(&job, 0).map_err(|err| err.to_string())?;
                n += 1;
                jobs.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        }));
    }

    let warm_up = Instant::now();
    wait_until(Duration::from_secs(3), || false);
    let warm_rss = serve.rss_kib();
    let warm_counts = (
        published.load(Ordering::Relaxed),
        jobs.load(Ordering::Relaxed),
    );
    let mut samples = Vec::new();
    let soak_started = Instant::now();
    while soak_started.elapsed() < Duration::from_secs(8) {
        let second = soak_started.elapsed() + Duration::from_secs(1);
        wait_until(Duration::from_secs(1), || soak_started.elapsed() >= second);
        samples.push(serve.rss_kib());
    }
    stop.store(true, Ordering::Relaxed);
    for flood in floods {
        flood.join().unwrap().expect("every flood peer is served");
    }
    let events_read = reader.join().unwrap();
    let status = Peer::dial(&addresses.addresses.command)
        .unwrap()
        .send_json(&json!({"command": "bus.jobs"}))
        .unwrap();
    drop(_deaf);
    let end_fds = serve.fds_settle_to(start_fds);
    let peak_rss = *samples.iter().max().unwrap();
    eprintln!(
        "event and job soak: warm-up {:?} ({} events, {} jobs); then 8 s: {} events published \
         ({events_read} read by the reading SUB), {} jobs enqueued and pulled; RSS start {:.1} MiB, \
         after warm-up {:.1} MiB, peak {:.1} MiB; per second {samples:?} KiB; fds {start_fds} -> \
         {end_fds}; bus.jobs {}",
        warm_up.elapsed() - soak_started.elapsed(),
        warm_counts.0,
        warm_counts.1,
        published.load(Ordering::Relaxed) - warm_counts.0,
        jobs.load(Ordering::Relaxed) - warm_counts.1,
        mib(start_rss),
        mib(warm_rss),
        mib(peak_rss),
        status["result"],
    );
    assert!(serve.alive());
    let allowed = warm_rss + (warm_rss / 4).max(16 * 1024);
    assert!(
        peak_rss <= allowed,
        "RSS {warm_rss} KiB after warm-up -> {peak_rss} KiB"
    );
    assert_levels_off(&samples);
    assert!(end_fds <= start_fds, "fds {start_fds} -> {end_fds}");
}

#[test]
fn wrong_protocols_and_raw_garbage_on_the_event_and_queue_addresses_do_not_disturb_their_peers() {
    let addresses = TestAddresses::new();
    let mut serve = Serve::start(addresses.path(), &addresses.addresses, &[]);
    let start_fds = serve.quiet_fds();
    let events = subscriber(
        &addresses.addresses.event,
        br#"{"event_type":"trade.signal""#,
    );
    let pull = Socket::new(Protocol::Pull0).unwrap();
    pull.set_opt::<RecvTimeout>(Some(REPLY_LIMIT)).unwrap();
    pull.dial(&addresses.addresses.job_queue).unwrap();

    let mut wrong = Vec::new();
    for url in [&addresses.addresses.event, &addresses.addresses.job_queue] {
        for protocol in [
            Protocol::Req0,
            Protocol::Push0,
            Protocol::Pub0,
            Protocol::Rep0,
        ] {
            let socket = Socket::new(protocol).unwrap();
            socket.dial_async(url).unwrap();
            wrong.push(socket);
        }
    }
    let mut hung_up = Vec::new();
    for url in [&addresses.addresses.event, &addresses.addresses.job_queue] {
        for bytes in [
            b"\x00\x01garbage\xff".repeat(50),
            sp_header(PUSH0).to_vec(),
            [
                sp_header(0x21).as_slice(),
                &[1u8],
                &(1u64 << 62).to_be_bytes(),
            ]
            .concat(),
        ] {
            let mut stream = UnixStream::connect(ipc_path(url)).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let _ = stream.write_all(&bytes);
            hung_up.push(closed_by_peer(&mut stream, Duration::from_secs(12)));
        }
    }

    let peer = Peer::dial(&addresses.addresses.command).unwrap();
    let mut received = 0;
    for n in 0..20 {
        publish(&peer, n, 16).unwrap();
        let enqueued = peer
            .send_json(&json!({"command": "bus.enqueue", "payload": {"job_type": "garbage-test", "payload": {"n": n}}}))
            .unwrap();
        assert_eq!(enqueued["status"], "ok", "{enqueued}");
        let job = pull.recv().expect("the PULL peer gets its job");
        dgbit_bus::wire::JobMessage::decode(&job, 0).unwrap();
        if events.recv().is_ok() {
            received += 1;
        }
    }
    drop(wrong);
    drop((events, pull, peer));
    let end_fds = serve.fds_settle_to(start_fds);
    eprintln!(
        "REQ, PUSH, PUB, REP dialing the event and queue addresses, raw garbage hung up {hung_up:?}: \
         20 jobs pulled, {received}/20 events received; fds {start_fds} -> {end_fds}; bus warnings {:?}",
        serve.warnings()
    );
    assert!(hung_up.iter().all(|&closed| closed), "{hung_up:?}");
    assert_eq!(received, 20);
    assert!(end_fds <= start_fds, "fds {start_fds} -> {end_fds}");
    assert!(serve.alive());
}

// ---------------------------------------------------------------------------
// The reply path
// ---------------------------------------------------------------------------

/// Answers with arrays nested `depth` deep, built without recursion.
struct DeepResultHandler {
    depth: usize,
}

impl Actor for DeepResultHandler {
    type Context = Context<Self>;
}

impl Handler<Command> for DeepResultHandler {
    type Result = Result<Value, HandlerError>;

    fn handle(&mut self, _command: Command, _ctx: &mut Self::Context) -> Self::Result {
        Ok((0..self.depth).fold(json!(1), |inner, _| Value::Array(vec![inner])))
    }
}

/// Wire input cannot nest past the codec's limit, but a handler can build
/// any value: one nested 100 000 levels deep must become an error reply,
/// not a stack overflow in the router (measuring, encoding or dropping it).
#[test]
fn a_handler_result_nested_a_hundred_thousand_levels_deep_fails_only_its_request() {
    let addresses = TestAddresses::new();
    let config = BusConfig::default().addresses(addresses.addresses.clone());
    let _bus = BusThread::start(config, || {
        let deep = DeepResultHandler { depth: 100_000 }.start();
        let shallow = DeepResultHandler { depth: 100 }.start();
        vec![("deep", deep.recipient()), ("shallow", shallow.recipient())]
    });
    let peer = Peer::dial(&addresses.addresses.command).unwrap();

    let deep = peer.send_json(&json!({"command": "deep"})).unwrap();
    assert_eq!(deep["code"], code::HANDLER_FAILED, "{deep}");
    let shallow = peer.send_json(&json!({"command": "shallow"})).unwrap();
    assert_eq!(shallow["status"], "ok", "{shallow}");
    peer.ping().unwrap();
    eprintln!(
        "a 100 000-level result: {}; a 100-level result: ok",
        deep["error"]
    );
}

#[test]
fn the_dead_letter_store_keeps_at_most_its_entry_limit() {
    let addresses = TestAddresses::new();
    let limit = 5;
    let config = BusConfig {
        dead_letter_max_entries: limit,
        push_job_types: Default::default(),
        ..BusConfig::default().addresses(addresses.addresses.clone())
    };
    let _bus = BusThread::start(config, Vec::new);
    let peer = Peer::dial(&addresses.addresses.command).unwrap();
    let call = |command: &str, payload: Value| {
        let reply = peer
            .send_json(&json!({"command": command, "payload": payload}))
            .unwrap();
        assert_eq!(reply["status"], "ok", "{command}: {reply}");
        reply["result"].clone()
    };

    let buried = 3 * limit;
    for n in 0..buried {
        let error = "x".repeat(10 * 1024);
        call(
            "bus.enqueue",
            json!({"job_type": "doomed", "max_retries": 0, "payload": {"n": n}}),
        );
        let grant = call(
            "bus.lease",
            json!({"worker": "w", "job_types": ["doomed"], "wait_ms": 0}),
        );
        let job_id = grant["job"]["job_id"]
            .as_str()
            .expect("a leased job")
            .to_string();
        let report = json!({"worker": "w", "job_id": job_id, "lease_id": grant["lease_id"], "state": "failed", "error": error});
        call("bus.report", report);
    }
    // Eviction runs after each insert; poll in case it lags the reply.
    let total = wait_until(REPLY_LIMIT, || {
        call("bus.dlq.list", json!({}))["total"].as_u64() == Some(limit as u64)
    });
    let listed = call("bus.dlq.list", json!({}));
    let stats = call("bus.jobs", json!({}));
    eprintln!(
        "dead letter limit {limit}: {buried} jobs buried with 10 KiB errors; store total {}; \
         dead_lettered {}",
        listed["total"], stats["dead_lettered"]
    );
    assert!(total, "the store holds {} entries", listed["total"]);
    assert_eq!(stats["dead_lettered"], buried);
}
