//! Shared test support: fresh addresses, a `dgbit-bus serve` child process,
//! Python peers, a fast restart policy, an event recorder, and waiting with
//! a deadline instead of sleeping.
#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use dgbit_bus::backoff::{BackoffPolicy, RestartBudget};
use dgbit_bus::config::Addresses;
use dgbit_bus::message::EventDelivery;
use dgbit_bus::wire::Event;
use tokio::sync::mpsc;

/// Await `future`, or panic naming `what` once `limit` has passed.
pub async fn within<T>(limit: Duration, what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// A fast restart schedule for tests: 50, 100, 200, 400, 400 ... ms, ±10 %,
/// ten restarts a minute.
pub fn fast_policy() -> BackoffPolicy {
    BackoffPolicy {
        base: Duration::from_millis(50),
        factor: 2.0,
        cap: Duration::from_millis(400),
        jitter: 0.1,
        reset_after: Duration::from_secs(60),
        budget: RestartBudget {
            max_restarts: 10,
            window: Duration::from_secs(60),
        },
    }
}

/// Forwards every event delivered to it to a channel.
pub struct EventRecorder {
    events: mpsc::UnboundedSender<Arc<Event>>,
}

impl Actor for EventRecorder {
    type Context = Context<Self>;
}

impl Handler<EventDelivery> for EventRecorder {
    type Result = ();

    fn handle(&mut self, delivery: EventDelivery, _: &mut Self::Context) {
        let _ = self.events.send(delivery.event);
    }
}

/// A started [`EventRecorder`] and the channel it forwards to.
pub fn recorder() -> (
    Recipient<EventDelivery>,
    mpsc::UnboundedReceiver<Arc<Event>>,
) {
    let (events, received) = mpsc::unbounded_channel();
    (EventRecorder { events }.start().recipient(), received)
}

/// Four ipc addresses in a fresh temp dir, removed when dropped.
pub struct TestAddresses {
    pub dir: tempfile::TempDir,
    pub addresses: Addresses,
}

impl TestAddresses {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("a temp dir");
        let addresses = Addresses::in_dir(dir.path());
        Self { dir, addresses }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// A free tcp port on 127.0.0.1, as a `tcp://` URL.
pub fn free_tcp_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    format!("tcp://{}", listener.local_addr().unwrap())
}

/// Poll `condition` every 10 ms until it holds or `limit` passes.
pub fn wait_until(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    condition()
}

/// The `dgbit-bus` binary built for these tests.
pub fn bus_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_dgbit-bus"))
}

/// A `dgbit-bus` command with the test's addresses in its environment.
pub fn bus_command(addresses: &Addresses) -> Command {
    let mut command = Command::new(bus_binary());
    command
        .env("NNG_COMMAND_ADDRESS", &addresses.command)
        .env("NNG_EVENT_ADDRESS", &addresses.event)
        .env("NNG_JOB_QUEUE_ADDRESS", &addresses.job_queue)
        .env("NNG_DATA_ADDRESS", &addresses.data)
        .env("DGBIT_DEAD_LETTER_PATH", dead_letter_path(addresses))
        .env("RUST_LOG", "warn");
    command
}

/// Where a `serve` child keeps dead letters: beside its ipc files, or
/// nowhere when the addresses are not ipc paths.
fn dead_letter_path(addresses: &Addresses) -> String {
    let dir = dgbit_bus::edge::ipc_path(&addresses.command);
    match dir.as_deref().and_then(Path::parent) {
        Some(dir) => dir.join("dead_letters.sqlite").display().to_string(),
        None => ":memory:".to_string(),
    }
}

/// A `dgbit-bus serve` child process, killed when dropped.
pub struct ServeProcess {
    pub child: Child,
}

impl ServeProcess {
    /// Start `dgbit-bus serve` with `extra` arguments and wait until it
    /// answers `ping`.
    pub fn start(addresses: &Addresses, extra: &[&str]) -> Self {
        let child = bus_command(addresses)
            .arg("serve")
            .args(extra)
            .stdout(Stdio::null())
            .spawn()
            .expect("dgbit-bus serve starts");
        let process = ServeProcess { child };
        let answered = wait_until(Duration::from_secs(20), || {
            bus_command(addresses)
                .args(["send", "ping", "--timeout-s", "1"])
                .output()
                .map(|out| out.status.success())
                .unwrap_or(false)
        });
        assert!(answered, "dgbit-bus serve did not answer ping within 20 s");
        process
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The python3 interpreter, after checking that pynng imports.
pub fn python() -> Command {
    let check = Command::new("python3")
        .args(["-c", "import pynng"])
        .output();
    let ok = matches!(check, Ok(Output { ref status, .. }) if status.success());
    assert!(
        ok,
        "python3 with pynng is required for the interop tests: run ./scripts/setup.sh"
    );
    Command::new("python3")
}

/// The path of a script under tests/python/.
pub fn python_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(name)
}

/// Run a Python peer script to completion with a time limit, returning its
/// stdout lines parsed as JSON.
pub fn run_python(script: &str, args: &[&str], limit: Duration) -> Vec<serde_json::Value> {
    let mut child = python()
        .arg(python_script(script))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 starts");
    let deadline = Instant::now() + limit;
    loop {
        if let Some(_status) = child.try_wait().expect("wait on python") {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{script} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let output = child.wait_with_output().expect("python output");
    assert!(
        output.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).unwrap_or_else(|err| panic!("{line}: {err}")))
        .collect()
}
