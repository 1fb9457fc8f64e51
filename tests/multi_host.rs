//! Across hosts: every socket over tcp, listen addresses that must name an
//! interface, and a three-host run in network namespaces with a partition.
//!
//! The three-host test needs root and `ip` (Debian's iproute2). Without them
//! it prints a `SKIPPED` line and returns; with `DGBIT_REQUIRE_NETNS=1` set
//! (as CI should, since it runs as root) a missing prerequisite fails it
//! instead. Its addresses (10.77.0.0/24) exist only inside the namespaces
//! the test creates, so no packet leaves them; the namespaces are removed
//! at the end, on failure too.
//!
//! Everything waits on a channel or polls with a deadline.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use dgbit_bus::client::{BusClient, ClientOptions};
use dgbit_bus::config::Addresses;
use nng::options::{Options, RecvTimeout};
use nng::{Protocol, Socket};
use serde_json::{json, Value};

use common::{bus_binary, free_tcp_url, wait_until, ServeProcess};

// ---- output that shows without --nocapture ----

/// Write a line straight to the test's stderr: libtest captures `eprintln!`
/// of passing tests, and a skip or a measurement must never go unseen.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Skip the test with a reason, or fail it when the environment demands
/// that it run (`DGBIT_REQUIRE_NETNS=1`).
fn skip(test: &str, reason: &str) {
    if std::env::var_os("DGBIT_REQUIRE_NETNS").is_some_and(|v| v != "0" && !v.is_empty()) {
        panic!("{test} cannot run but DGBIT_REQUIRE_NETNS is set: {reason}");
    }
    say(&format!("SKIPPED {test}: {reason}"));
}

// ---- child processes ----

/// A child process, killed and reaped when dropped.
struct Spawned {
    name: String,
    child: Child,
}

impl Spawned {
    fn start(name: &str, command: &mut Command) -> Spawned {
        let child = command
            .spawn()
            .unwrap_or_else(|err| panic!("{name} does not start: {err}"));
        Spawned {
            name: name.into(),
            child,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then wait up to `limit` for the exit; returns stdout.
    fn terminate(mut self, limit: Duration) -> String {
        let _ = Command::new("sh")
            .args(["-c", &format!("kill -TERM {}", self.pid())])
            .status();
        let exited = wait_until(limit, || matches!(self.child.try_wait(), Ok(Some(_))));
        assert!(
            exited,
            "{} did not stop within {limit:?} of SIGTERM",
            self.name
        );
        let mut out = String::new();
        if let Some(mut stdout) = self.child.stdout.take() {
            let _ = stdout.read_to_string(&mut out);
        }
        out
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run `command` to completion within `limit`; its output, or why not.
fn run_bounded(command: &mut Command, limit: Duration) -> Result<Output, String> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| format!("cannot start {command:?}: {err}"))?;
    let done = wait_until(limit, || matches!(child.try_wait(), Ok(Some(_))));
    if !done {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!("{command:?} did not finish within {limit:?}"));
    }
    child.wait_with_output().map_err(|err| err.to_string())
}

/// Run `command`, which must succeed within `limit`; its stdout.
fn run_ok(command: &mut Command, limit: Duration) -> String {
    let output = run_bounded(command, limit).unwrap_or_else(|err| panic!("{err}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn with_addresses<'c>(command: &'c mut Command, addresses: &Addresses) -> &'c mut Command {
    command
        .env("NNG_COMMAND_ADDRESS", &addresses.command)
        .env("NNG_EVENT_ADDRESS", &addresses.event)
        .env("NNG_JOB_QUEUE_ADDRESS", &addresses.job_queue)
        .env("NNG_DATA_ADDRESS", &addresses.data)
        .env("RUST_LOG", "warn")
}

/// `dgbit-bus` on this host, talking to `addresses`.
fn local_bus(addresses: &Addresses) -> Command {
    let mut command = Command::new(bus_binary());
    with_addresses(&mut command, addresses);
    command
}

fn tcp_addresses() -> Addresses {
    Addresses {
        command: free_tcp_url(),
        event: free_tcp_url(),
        job_queue: free_tcp_url(),
        data: free_tcp_url(),
    }
}

// ---- the event subscriber's ledger ----

/// What a `dgbit-bus tail 'job.*'` process has printed, by job.
#[derive(Default)]
struct Ledger {
    by_type: BTreeMap<String, usize>,
    created: HashSet<String>,
    /// Each start of a job: the worker and when it was seen.
    started: HashMap<String, Vec<(String, Instant)>>,
    /// Each completion of a job: the worker.
    completed: HashMap<String, Vec<String>>,
    /// Jobs put back in the queue because their lease ran out.
    expired: Vec<String>,
    probes: usize,
}

impl Ledger {
    fn record(&mut self, at: Instant, event: &Value) {
        let topic = event["event_type"].as_str().unwrap_or_default().to_string();
        let data = &event["data"];
        if data.get("probe").is_some() {
            self.probes += 1;
            return;
        }
        *self.by_type.entry(topic.clone()).or_default() += 1;
        let job = data["job_id"].as_str().unwrap_or_default().to_string();
        let worker = data["worker"].as_str().unwrap_or_default().to_string();
        match topic.as_str() {
            "job.created" => {
                self.created.insert(job);
            }
            "job.started" => self.started.entry(job).or_default().push((worker, at)),
            "job.completed" => self.completed.entry(job).or_default().push(worker),
            "job.queued" if data["reason"] == "lease_expired" => self.expired.push(job),
            _ => {}
        }
    }

    fn completions(&self) -> usize {
        self.completed.values().map(Vec::len).sum()
    }

    fn completed_by(&self, worker: &str) -> usize {
        self.completed
            .values()
            .flatten()
            .filter(|w| *w == worker)
            .count()
    }

    /// Jobs last started by `worker` and not completed (as far as the
    /// events have shown).
    fn running_on(&self, worker: &str) -> usize {
        self.started
            .iter()
            .filter(|(job, starts)| {
                starts.last().is_some_and(|(w, _)| w == worker)
                    && !self.completed.contains_key(*job)
            })
            .count()
    }

    /// Jobs created and never started.
    fn waiting(&self) -> usize {
        self.created
            .iter()
            .filter(|job| !self.started.contains_key(*job))
            .count()
    }

    /// The first start by `worker` seen after `since`.
    fn first_start_after(&self, worker: &str, since: Instant) -> Option<Instant> {
        self.started
            .values()
            .flatten()
            .filter(|(w, at)| w == worker && *at > since)
            .map(|(_, at)| *at)
            .min()
    }
}

/// Events from a tail process's stdout, read on a thread of their own.
struct EventFeed {
    events: Receiver<(Instant, Value)>,
    ledger: Ledger,
}

impl EventFeed {
    fn follow(tail: &mut Spawned) -> EventFeed {
        let stdout = tail.child.stdout.take().expect("tail's stdout is piped");
        let (sender, events) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(event) = serde_json::from_str::<Value>(&line) {
                    if sender.send((Instant::now(), event)).is_err() {
                        return;
                    }
                }
            }
        });
        EventFeed {
            events,
            ledger: Ledger::default(),
        }
    }

    /// Take events until `condition` holds of the ledger or `limit` passes.
    fn until(&mut self, limit: Duration, mut condition: impl FnMut(&Ledger) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            while let Ok((at, event)) = self.events.try_recv() {
                self.ledger.record(at, &event);
            }
            if condition(&self.ledger) {
                return true;
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            match self
                .events
                .recv_timeout(left.min(Duration::from_millis(50)))
            {
                Ok((at, event)) => self.ledger.record(at, &event),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return condition(&self.ledger),
            }
        }
    }

    /// Publish probe events with `publish` until the subscriber prints one:
    /// PUB/SUB keeps nothing for a subscriber that is not connected yet.
    fn wait_subscribed(&mut self, mut publish: impl FnMut() -> Command) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let _ = run_bounded(&mut publish(), Duration::from_secs(10));
            if self.until(Duration::from_millis(300), |ledger| ledger.probes > 0) {
                return;
            }
        }
        panic!("the subscriber saw no probe event within 30 s");
    }
}

fn probe_publish(mut command: Command) -> Command {
    command.args([
        "publish",
        "job.progress",
        r#"{"probe": true}"#,
        "--timeout-s",
        "5",
    ]);
    command
}

// ---- every socket over tcp on loopback ----

#[test]
fn every_socket_and_every_cli_tool_work_over_tcp_on_loopback() {
    let addresses = tcp_addresses();
    let _bus = ServeProcess::start(
        &addresses,
        &["--dead-letter-path", ":memory:", "--job-lease-s", "5"],
    );

    // The event bus: a tail process over tcp.
    let mut tail = Spawned::start(
        "tail",
        local_bus(&addresses)
            .args(["tail", "job.*"])
            .stdout(Stdio::piped()),
    );
    let mut feed = EventFeed::follow(&mut tail);
    feed.wait_subscribed(|| probe_publish(local_bus(&addresses)));

    // The command bus: a worker and a producer.
    let _worker = Spawned::start(
        "work",
        local_bus(&addresses)
            .args(["work", "--worker-id", "tcp-worker", "--concurrency", "2"])
            .args(["--lease-wait-ms", "500", "--job-type", "echo"])
            .stdout(Stdio::null()),
    );
    let ids: Vec<String> = (0..5)
        .map(|n| {
            let out = run_ok(
                local_bus(&addresses).args(["enqueue", "echo", &format!(r#"{{"n": {n}}}"#)]),
                Duration::from_secs(20),
            );
            out.trim().to_string()
        })
        .collect();
    let all_done = feed.until(Duration::from_secs(30), |ledger| {
        ids.iter().all(|id| {
            ledger
                .completed
                .get(id)
                .is_some_and(|w| w == &["tcp-worker"])
        })
    });
    assert!(all_done, "the tcp worker did not complete the 5 jobs");

    // The data bus, through `send --data`.
    let pong = run_ok(
        local_bus(&addresses).args(["send", "ping", "--data"]),
        Duration::from_secs(20),
    );
    assert!(pong.contains(r#""pong":true"#), "{pong}");

    // The Rust client on both REQ/REP buses.
    let stats = dgbit_bus::cli::block_on(async {
        let options = ClientOptions::default().timeout(Duration::from_secs(10));
        let command = BusClient::connect(&addresses.command, options.clone()).await?;
        let data = BusClient::connect(&addresses.data, options).await?;
        data.call("ping", json!({})).await?;
        command.call("bus.jobs", json!({})).await
    })
    .expect("the Rust client works over tcp");
    assert_eq!(stats["completed"], json!(5), "{stats}");

    // The job queue's PUSH edge: a plain PULL peer gets a job no leasing
    // worker wants.
    let pull = Socket::new(Protocol::Pull0).unwrap();
    pull.set_opt::<RecvTimeout>(Some(Duration::from_secs(20)))
        .unwrap();
    pull.dial_async(&addresses.job_queue).unwrap();
    let pushed_id = run_ok(
        local_bus(&addresses).args(["enqueue", "pull_only", r#"{"via": "tcp"}"#]),
        Duration::from_secs(20),
    );
    let message = pull.recv().expect("a job pushed over tcp");
    let job: Value = serde_json::from_slice(message.as_slice()).unwrap();
    assert_eq!(job["job_id"], json!(pushed_id.trim()));
    assert_eq!(job["payload"], json!({"via": "tcp"}));
}

// ---- listen addresses must name an interface ----

#[test]
fn a_wildcard_listen_address_is_refused_with_a_clear_error() {
    for wildcard in ["tcp://0.0.0.0:", "tcp://*:", "tcp://[::]:"] {
        let port = free_tcp_url().rsplit(':').next().unwrap().to_string();
        let mut addresses = tcp_addresses();
        addresses.event = format!("{wildcard}{port}");
        let output = run_bounded(
            local_bus(&addresses).args(["serve", "--dead-letter-path", ":memory:"]),
            Duration::from_secs(20),
        )
        .expect("serve exits at once");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{wildcard} was accepted");
        assert!(
            stderr.contains(&format!("refusing to listen on {}", addresses.event))
                && stderr.contains("--allow-wildcard-listen"),
            "{stderr}"
        );
    }
}

/// Listening on every interface is allowed when asked for; tried inside a
/// fresh network namespace (only its own loopback), so nothing is exposed.
#[test]
fn a_wildcard_listen_address_is_served_when_allowed() {
    const TEST: &str = "a_wildcard_listen_address_is_served_when_allowed";
    let lab = match Lab::open(TEST, &["w"]) {
        Ok(lab) => lab,
        Err(reason) => return skip(TEST, &reason),
    };
    let host = lab.host("w");
    let addresses = Addresses {
        command: "tcp://0.0.0.0:5601".into(),
        event: "tcp://0.0.0.0:5602".into(),
        job_queue: "tcp://0.0.0.0:5603".into(),
        data: "tcp://0.0.0.0:5604".into(),
    };
    let mut bus = Spawned::start(
        "serve",
        host.bus(&addresses)
            .args([
                "serve",
                "--allow-wildcard-listen",
                "--dead-letter-path",
                ":memory:",
            ])
            .stdout(Stdio::null()),
    );
    let loopback = Addresses {
        command: "tcp://127.0.0.1:5601".into(),
        ..addresses.clone()
    };
    let answered = wait_until(Duration::from_secs(20), || {
        matches!(bus.child.try_wait(), Ok(None))
            && run_bounded(
                host.bus(&loopback)
                    .args(["send", "ping", "--timeout-s", "1"]),
                Duration::from_secs(10),
            )
            .is_ok_and(|out| out.status.success())
    });
    assert!(answered, "the allowed wildcard bus never answered");
}

// ---- network namespaces ----

/// Network namespaces made for one test, removed when dropped: first every
/// process started in them, then the namespaces (their veths go with them).
struct Lab {
    prefix: String,
    namespaces: Vec<String>,
    processes: Vec<Spawned>,
}

/// The prefix of every namespace these tests create.
const LAB_PREFIX: &str = "dgbmh";

impl Lab {
    /// One namespace per host name, with its loopback up.
    ///
    /// # Errors
    ///
    /// Why namespaces cannot be made here, for the SKIPPED line.
    fn open(test: &str, hosts: &[&str]) -> Result<Lab, String> {
        if !effective_uid_is_root() {
            return Err("not root: creating network namespaces needs root".into());
        }
        match Command::new("ip").arg("-V").output() {
            Ok(out) if out.status.success() => {}
            Ok(_) | Err(_) => {
                return Err("`ip` not found: install Debian's iproute2 package".into());
            }
        }
        remove_abandoned_labs();
        // Unique per process and test, so parallel tests and runs never
        // share a namespace.
        let tag = test
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b.into()));
        let prefix = format!("{LAB_PREFIX}-{}-{:x}", std::process::id(), tag % 0xfff);
        let mut lab = Lab {
            prefix,
            namespaces: Vec::new(),
            processes: Vec::new(),
        };
        for host in hosts {
            let name = format!("{}-{host}", lab.prefix);
            ip(&["netns", "add", &name])
                .map_err(|err| format!("cannot create a namespace: {err}"))?;
            lab.namespaces.push(name.clone());
            ip(&["-n", &name, "link", "set", "lo", "up"])?;
        }
        Ok(lab)
    }

    fn host(&self, name: &str) -> Host {
        Host {
            netns: format!("{}-{name}", self.prefix),
        }
    }

    /// Keep `process` until the lab is torn down.
    fn keep(&mut self, process: Spawned) -> &mut Spawned {
        self.processes.push(process);
        self.processes.last_mut().unwrap()
    }

    fn take(&mut self, name: &str) -> Spawned {
        let index = self
            .processes
            .iter()
            .position(|p| p.name == name)
            .unwrap_or_else(|| panic!("no process {name}"));
        self.processes.remove(index)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.processes.clear();
        for name in &self.namespaces {
            if let Err(err) = ip(&["netns", "del", name]) {
                say(&format!("could not remove namespace {name}: {err}"));
            }
        }
    }
}

/// Namespaces of an earlier run of these tests whose process is gone (it
/// was killed before it could clean up), with the processes that run was
/// still running in them.
fn remove_abandoned_labs() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let mut parts = name.split('-');
        if parts.next() != Some(LAB_PREFIX) {
            continue;
        }
        let pid = parts.next().unwrap_or_default();
        if pid.is_empty() || std::path::Path::new("/proc").join(pid).exists() {
            continue;
        }
        if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
            for left in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-KILL", left]).status();
            }
        }
        say(&format!("removed namespace {name}, left by an earlier run"));
        let _ = ip(&["netns", "del", name]);
    }
}

fn effective_uid_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("Uid:"))
                .and_then(|line| line.split_whitespace().nth(2).map(|uid| uid == "0"))
        })
        .unwrap_or(false)
}

fn ip(args: &[&str]) -> Result<(), String> {
    let output = run_bounded(Command::new("ip").args(args), Duration::from_secs(20))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// A network namespace that plays one host.
#[derive(Clone)]
struct Host {
    netns: String,
}

impl Host {
    /// `program` run inside this host.
    fn exec(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.netns, program]);
        command
    }

    /// `dgbit-bus` run inside this host, talking to `addresses`.
    fn bus(&self, addresses: &Addresses) -> Command {
        let mut command = self.exec(bus_binary().to_str().expect("a UTF-8 binary path"));
        with_addresses(&mut command, addresses);
        command
    }

    fn ip(&self, args: &[&str]) -> Result<(), String> {
        let mut all = vec!["-n", self.netns.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    fn sysctl(&self, key: &str, value: &str) -> Result<(), String> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let output = run_bounded(
            self.exec("sh")
                .args(["-c", &format!("echo {value} > {path}")]),
            Duration::from_secs(10),
        )?;
        match output.status.success() {
            true => Ok(()),
            false => Err(format!(
                "cannot set {key}: {}",
                String::from_utf8_lossy(&output.stderr)
            )),
        }
    }

    /// Established tcp connections from this host to `peer`.
    fn connections_to(&self, peer: &str) -> usize {
        let out = run_ok(
            self.exec("ss")
                .args(["-Htn", "state", "established", "dst", peer]),
            Duration::from_secs(10),
        );
        out.lines().count()
    }
}

// ---- three hosts and a partition ----

const BUS_IP: &str = "10.77.0.1";
const JOBS_BEFORE_CUT: usize = 120;
const JOBS_DURING_CUT: usize = 30;
const JOBS_AFTER_RECONNECT: usize = 50;
const TOTAL_JOBS: usize = JOBS_BEFORE_CUT + JOBS_DURING_CUT + JOBS_AFTER_RECONNECT;
/// The lease `serve` is given: short, so the partition test is quick.
const LEASE: Duration = Duration::from_secs(2);
/// The dialers' longest pause between reconnect attempts (the default of
/// `EdgeOptions` and `ClientOptions`).
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// How long C stays cut off: past the lease and TCP's give-up, and long
/// enough for C's reconnect backoff to grow.
const PARTITION: Duration = Duration::from_secs(10);

/// A bridge in A with one veth to each of B and C: one /24 that exists only
/// inside these namespaces.
fn wire_three_hosts(lab: &Lab) -> Result<(), String> {
    let (a, b, c) = (lab.host("a"), lab.host("b"), lab.host("c"));
    a.ip(&["link", "add", "br0", "type", "bridge"])?;
    a.ip(&["addr", "add", &format!("{BUS_IP}/24"), "dev", "br0"])?;
    a.ip(&["link", "set", "br0", "up"])?;
    for (host, port, address) in [(&b, "to-b", "10.77.0.2/24"), (&c, "to-c", "10.77.0.3/24")] {
        a.ip(&[
            "link",
            "add",
            port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &host.netns,
        ])?;
        a.ip(&["link", "set", port, "master", "br0"])?;
        a.ip(&["link", "set", port, "up"])?;
        host.ip(&["addr", "add", address, "dev", "eth0"])?;
        host.ip(&["link", "set", "eth0", "up"])?;
    }
    // TCP gives up on an unanswered connection after about 3 s instead of
    // about 15 minutes, so a partition ends connections within the test.
    a.sysctl("net.ipv4.tcp_retries2", "3")?;
    c.sysctl("net.ipv4.tcp_retries2", "3")?;
    Ok(())
}

fn bus_addresses() -> Addresses {
    Addresses {
        command: format!("tcp://{BUS_IP}:5601"),
        event: format!("tcp://{BUS_IP}:5602"),
        job_queue: format!("tcp://{BUS_IP}:5603"),
        data: format!("tcp://{BUS_IP}:5604"),
    }
}

/// Sleep jobs of 20 to 50 ms, enqueued from `host` by `dgbit-bus enqueue`
/// processes, `parallel` at a time; their ids.
fn enqueue_sleeps(
    host: &Host,
    addresses: &Addresses,
    count: usize,
    parallel: usize,
) -> Vec<String> {
    let per_thread = count.div_ceil(parallel);
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..count)
            .collect::<Vec<_>>()
            .chunks(per_thread)
            .map(|chunk| {
                let chunk = chunk.to_vec();
                scope.spawn(move || {
                    chunk
                        .into_iter()
                        .map(|n| {
                            let payload = format!(r#"{{"ms": {}}}"#, 20 + (n * 7) % 31);
                            let out = run_ok(
                                host.bus(addresses).args(["enqueue", "sleep", &payload]),
                                Duration::from_secs(20),
                            );
                            out.trim().to_string()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|thread| thread.join().expect("an enqueue thread"))
            .collect()
    })
}

/// `dgbit-bus jobs --json` from `host`.
fn queue_stats(host: &Host, addresses: &Addresses) -> Value {
    let out = run_ok(
        host.bus(addresses).args(["jobs", "--json"]),
        Duration::from_secs(20),
    );
    serde_json::from_str(out.trim()).unwrap_or_else(|err| panic!("{out}: {err}"))
}

fn worker(host: &Host, addresses: &Addresses, id: &str) -> Spawned {
    Spawned::start(
        id,
        host.bus(addresses)
            .args(["work", "--worker-id", id, "--concurrency", "2"])
            .args(["--lease-wait-ms", "1000", "--job-type", "sleep"])
            .stdout(Stdio::piped()),
    )
}

/// What the partition test measured.
#[derive(Debug, Default)]
struct Figures {
    in_flight_on_c_at_cut: u64,
    cut_noticed_by_c: Duration,
    redelivered: usize,
    pings_during_cut: Vec<Duration>,
    partition: Duration,
    reconnect: Duration,
    first_job_on_c_after_link_up: Duration,
    ignored_reports: u64,
}

#[test]
fn three_hosts_share_jobs_survive_a_cut_link_and_reconnect() {
    const TEST: &str = "three_hosts_share_jobs_survive_a_cut_link_and_reconnect";
    let started = Instant::now();
    let mut lab = match Lab::open(TEST, &["a", "b", "c"]) {
        Ok(lab) => lab,
        Err(reason) => return skip(TEST, &reason),
    };
    if !Command::new("ss")
        .arg("-V")
        .output()
        .is_ok_and(|out| out.status.success())
    {
        return skip(TEST, "`ss` not found: install Debian's iproute2 package");
    }
    if let Err(reason) = wire_three_hosts(&lab) {
        return skip(TEST, &format!("cannot wire the namespaces: {reason}"));
    }
    let (a, b, c) = (lab.host("a"), lab.host("b"), lab.host("c"));
    let addresses = bus_addresses();

    // The bus in A; the subscriber in B.
    lab.keep(Spawned::start(
        "serve",
        a.bus(&addresses)
            .args([
                "serve",
                "--dead-letter-path",
                ":memory:",
                "--health-interval-s",
                "60",
            ])
            .args(["--job-lease-s", &LEASE.as_secs_f64().to_string()])
            .stdout(Stdio::null()),
    ));
    for host in [&b, &c] {
        let answered = wait_until(Duration::from_secs(30), || {
            run_bounded(
                host.bus(&addresses)
                    .args(["send", "ping", "--timeout-s", "1"]),
                Duration::from_secs(10),
            )
            .is_ok_and(|out| out.status.success())
        });
        assert!(answered, "the bus in A does not answer {}", host.netns);
    }
    let tail = lab.keep(Spawned::start(
        "tail",
        b.bus(&addresses)
            .args(["tail", "job.*"])
            .stdout(Stdio::piped()),
    ));
    let mut feed = EventFeed::follow(tail);
    feed.wait_subscribed(|| probe_publish(b.bus(&addresses)));

    // Before the cut: a backlog, then C's worker, then B's.
    let mut ids = enqueue_sleeps(&b, &addresses, JOBS_BEFORE_CUT, 4);
    lab.keep(worker(&c, &addresses, "host-c"));
    let c_started = feed.until(Duration::from_secs(30), |l| {
        l.first_start_after("host-c", started).is_some()
    });
    assert!(c_started, "the worker in C took no job");
    lab.keep(worker(&b, &addresses, "host-b"));
    let ready_to_cut = feed.until(Duration::from_secs(30), |l| {
        l.completed_by("host-b") >= 5
            && l.completed_by("host-c") >= 10
            && l.running_on("host-c") > 0
    });
    assert!(ready_to_cut, "both workers should be busy before the cut");
    let waiting_at_cut = feed.ledger.waiting();

    // The cut: C's interface goes down.
    let mut figures = Figures::default();
    let cut_at = Instant::now();
    c.ip(&["link", "set", "eth0", "down"])
        .expect("cut C's link");
    let at_cut = queue_stats(&b, &addresses);
    figures.in_flight_on_c_at_cut = at_cut["workers"]["host-c"]["in_flight"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        figures.in_flight_on_c_at_cut > 0,
        "C held no job at the cut ({waiting_at_cut} waiting): {at_cut}"
    );

    // Commands from B keep working while C is away.
    for chunk in 0..3 {
        let ping_at = Instant::now();
        run_ok(
            b.bus(&addresses).args(["send", "ping", "--timeout-s", "5"]),
            Duration::from_secs(10),
        );
        figures.pings_during_cut.push(ping_at.elapsed());
        let batch = enqueue_sleeps(&b, &addresses, JOBS_DURING_CUT / 3, 1);
        assert_eq!(batch.len(), JOBS_DURING_CUT / 3, "enqueue batch {chunk}");
        ids.extend(batch);
    }

    // C's jobs come back to B after the lease; C's TCP gives up.
    let redelivered = feed.until(Duration::from_secs(30), |l| {
        l.expired.len() as u64 >= figures.in_flight_on_c_at_cut
            && l.expired.iter().all(|job| l.completed.contains_key(job))
    });
    assert!(
        redelivered,
        "C's jobs were not redelivered: {:?}",
        feed.ledger.expired
    );
    let dropped = wait_until(Duration::from_secs(45), || c.connections_to(BUS_IP) == 0);
    assert!(
        dropped,
        "C's connection to the bus outlived 45 s of partition"
    );
    figures.cut_noticed_by_c = cut_at.elapsed();

    // The partition lasts long enough for C's redials (each refused at
    // once: C has no route) to back off towards the cap; B's commands keep
    // being answered meanwhile.
    while cut_at.elapsed() < PARTITION {
        let ping_at = Instant::now();
        run_ok(
            b.bus(&addresses).args(["send", "ping", "--timeout-s", "5"]),
            Duration::from_secs(10),
        );
        figures.pings_during_cut.push(ping_at.elapsed());
        assert_eq!(c.connections_to(BUS_IP), 0, "C is cut off");
        feed.until(Duration::from_millis(400), |_| false);
    }
    figures.partition = cut_at.elapsed();

    // The link comes back: C redials on its backoff schedule.
    let up_at = Instant::now();
    c.ip(&["link", "set", "eth0", "up"])
        .expect("restore C's link");
    let reconnected = wait_until(RECONNECT_MAX * 4, || c.connections_to(BUS_IP) > 0);
    figures.reconnect = up_at.elapsed();
    assert!(
        reconnected,
        "C did not reconnect within {:?}",
        RECONNECT_MAX * 4
    );
    // NNG waits a random time below the current backoff, which is capped.
    assert!(
        figures.reconnect <= RECONNECT_MAX + Duration::from_secs(3),
        "C reconnected after {:?}, later than the backoff cap allows",
        figures.reconnect
    );
    ids.extend(enqueue_sleeps(&b, &addresses, JOBS_AFTER_RECONNECT, 4));
    let c_back = feed.until(Duration::from_secs(30), |l| {
        l.first_start_after("host-c", up_at).is_some() && l.completions() >= TOTAL_JOBS
    });
    assert!(
        c_back,
        "C took no work after the link came back, or jobs are missing"
    );
    figures.first_job_on_c_after_link_up =
        feed.ledger.first_start_after("host-c", up_at).unwrap() - up_at;

    // Reconcile: every job once, nothing lost, nothing dead-lettered.
    assert_eq!(ids.len(), TOTAL_JOBS);
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), TOTAL_JOBS, "job ids are unique");
    for id in &ids {
        let done = feed
            .ledger
            .completed
            .get(id)
            .map(Vec::as_slice)
            .unwrap_or_default();
        assert_eq!(
            done.len(),
            1,
            "job {id} completed {} times: {done:?}",
            done.len()
        );
    }
    for job in &feed.ledger.expired {
        let starts = &feed.ledger.started[job];
        assert!(
            starts.iter().any(|(w, _)| w == "host-c"),
            "redelivered job {job} was never C's: {starts:?}"
        );
        assert_eq!(feed.ledger.completed[job], ["host-b"], "job {job}");
    }
    let stats = queue_stats(&b, &addresses);
    assert_eq!(stats["completed"], json!(TOTAL_JOBS), "{stats}");
    assert_eq!(stats["in_flight"], json!(0), "{stats}");
    assert_eq!(stats["queue_depth"], json!(0), "{stats}");
    assert_eq!(stats["dead_lettered"], json!(0), "{stats}");
    assert_eq!(
        stats["redelivered"],
        json!(feed.ledger.expired.len()),
        "{stats}"
    );
    let dlq = run_ok(
        b.bus(&addresses).args(["dlq", "--json", "list"]),
        Duration::from_secs(20),
    );
    assert_eq!(
        serde_json::from_str::<Value>(&dlq).unwrap()["total"],
        json!(0),
        "{dlq}"
    );
    figures.redelivered = feed.ledger.expired.len();
    figures.ignored_reports = stats["ignored_reports"].as_u64().unwrap_or(0);

    // The workers stop on SIGTERM and say what the bus accepted from them.
    let mut accepted = BTreeMap::new();
    for id in ["host-b", "host-c"] {
        let summary = lab.take(id).terminate(Duration::from_secs(20));
        let summary: Value = serde_json::from_str(summary.trim())
            .unwrap_or_else(|err| panic!("{id} summary {summary:?}: {err}"));
        accepted.insert(id, summary);
    }
    let completed_total: u64 = accepted
        .values()
        .map(|s| s["completed"].as_u64().unwrap())
        .sum();
    assert_eq!(completed_total, TOTAL_JOBS as u64, "{accepted:?}");
    assert_eq!(
        accepted["host-c"]["completed"].as_u64().unwrap() as usize,
        feed.ledger.completed_by("host-c")
    );

    report(&figures, &feed.ledger, &accepted, started.elapsed());
}

fn report(figures: &Figures, ledger: &Ledger, workers: &BTreeMap<&str, Value>, total: Duration) {
    say("---- three hosts over tcp, with a partition (measured) ----");
    say(&format!(
        "jobs: {TOTAL_JOBS} completed once each; host-b {}, host-c {} (worker summaries: {} / {})",
        ledger.completed_by("host-b"),
        ledger.completed_by("host-c"),
        workers["host-b"]["completed"],
        workers["host-c"]["completed"],
    ));
    say(&format!(
        "cut: C held {} job(s) in flight; {} job(s) redelivered after the {:?} lease, all completed by host-b",
        figures.in_flight_on_c_at_cut, figures.redelivered, LEASE
    ));
    say(&format!(
        "C's connection ended {:.1} s after the cut (TCP gave up); reports from C ignored as stale: {} (C's summary: {})",
        figures.cut_noticed_by_c.as_secs_f64(),
        figures.ignored_reports,
        workers["host-c"]
    ));
    let pings: Vec<u128> = figures
        .pings_during_cut
        .iter()
        .map(|d| d.as_millis())
        .collect();
    say(&format!(
        "partition {:.1} s; {} pings from B meanwhile, all answered, in ms (process start included): {pings:?}",
        figures.partition.as_secs_f64(),
        pings.len()
    ));
    say(&format!(
        "reconnect: C's connection back {:.2} s after the link came up (backoff cap {:?}); first job on C {:.2} s after",
        figures.reconnect.as_secs_f64(),
        RECONNECT_MAX,
        figures.first_job_on_c_after_link_up.as_secs_f64()
    ));
    say(&format!(
        "events seen by the subscriber in B: {:?}",
        ledger.by_type
    ));
    say(&format!("total {:.1} s", total.as_secs_f64()));
}
