//! A bus's life: shutdown keeps what it could not finish, a restart gets it
//! back.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use dgbit_bus::bus::{Bus, BusHandle};
use dgbit_bus::config::{BusConfig, EdgeSet};
use dgbit_bus::message::{HandlerError, RunJob};
use dgbit_bus::wire::{CommandRequest, JobMessage};
use serde_json::{json, Value};

use common::TestAddresses;

/// Counts the jobs it runs.
struct Counter {
    runs: Arc<AtomicUsize>,
}

impl Actor for Counter {
    type Context = Context<Self>;
}

impl Handler<RunJob> for Counter {
    type Result = Result<Value, HandlerError>;

    fn handle(&mut self, _: RunJob, _ctx: &mut Self::Context) -> Self::Result {
        self.runs.fetch_add(1, Ordering::SeqCst);
        Ok(json!({}))
    }
}

fn bus_with_store(addresses: &TestAddresses) -> BusConfig {
    BusConfig::in_process()
        .edges(EdgeSet::NONE)
        .dead_letter_path(addresses.path().join("dead_letters.sqlite"))
}

async fn call(bus: &BusHandle, command: &str, payload: Value) -> Value {
    let reply = bus
        .request(CommandRequest::new(command, payload))
        .await
        .to_value();
    assert_eq!(reply["status"], "ok", "{command}: {reply}");
    reply["result"].clone()
}

#[actix_rt::test]
async fn jobs_left_at_shutdown_are_kept_as_dead_letters_and_run_after_a_restart() {
    let addresses = TestAddresses::new();
    let first = Bus::builder(bus_with_store(&addresses))
        .start()
        .expect("bus starts");
    for n in 0..5 {
        first
            .enqueue(JobMessage::new("count", json!({"n": n})))
            .await
            .unwrap();
    }
    first.shutdown().await;

    let runs = Arc::new(AtomicUsize::new(0));
    let worker = Counter { runs: runs.clone() }.start();
    let second = Bus::builder(bus_with_store(&addresses))
        .worker("count", worker.recipient(), 2)
        .start()
        .expect("bus restarts");
    let listed = call(&second, "bus.dlq.list", json!({})).await;
    assert_eq!(listed["total"], json!(5), "{listed}");
    let reason = listed["entries"][0]["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(reason.contains("shut down"), "{listed}");

    call(&second, "bus.dlq.replay", json!({"all": true})).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while runs.load(Ordering::SeqCst) < 5 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(runs.load(Ordering::SeqCst), 5);
    let listed = call(&second, "bus.dlq.list", json!({})).await;
    assert_eq!(listed["total"], json!(0), "{listed}");
    second.shutdown().await;
}

#[actix_rt::test]
async fn shutdown_removes_the_ipc_files_the_bus_created() {
    let addresses = TestAddresses::new();
    let config = BusConfig::default()
        .addresses(addresses.addresses.clone())
        .dead_letter_path(addresses.path().join("dl.sqlite"));
    let bus = Bus::builder(config).start().expect("bus starts");
    assert!(bus.wait_for_edges(Duration::from_secs(5)).await);
    let files = ["cmd.ipc", "evt.ipc", "queue.ipc", "data.ipc"];
    for file in files {
        assert!(
            addresses.path().join(file).exists(),
            "{file} missing while serving"
        );
    }
    bus.shutdown().await;
    for file in files {
        assert!(!addresses.path().join(file).exists(), "{file} left behind");
    }
}

#[actix_rt::test]
async fn an_unparseable_request_is_answered_and_kept_with_its_raw_bytes() {
    use dgbit_bus::client::{BusClient, ClientOptions};
    let addresses = TestAddresses::new();
    let config = BusConfig::default()
        .addresses(addresses.addresses.clone())
        .dead_letter_path(addresses.path().join("dl.sqlite"));
    let bus = Bus::builder(config).start().expect("bus starts");
    assert!(bus.wait_for_edges(Duration::from_secs(5)).await);
    let client = BusClient::connect(&addresses.addresses.command, ClientOptions::default())
        .await
        .unwrap();

    let garbage = b"\xff{not json at all";
    let reply = client.send_raw(garbage).await.unwrap();
    assert!(String::from_utf8_lossy(&reply).contains("bad_request"));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let listed = loop {
        let listed = call(&bus, "bus.dlq.list", json!({})).await;
        if listed["total"] == json!(1) || tokio::time::Instant::now() > deadline {
            break listed;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(listed["total"], json!(1), "{listed}");
    let id = listed["entries"][0]["id"].clone();
    let entry = call(&bus, "bus.dlq.show", json!({"id": id})).await;
    let raw_hex: String = garbage.iter().map(|byte| format!("{byte:02x}")).collect();
    assert_eq!(entry["raw_hex"], json!(raw_hex), "{entry}");
    assert_eq!(entry["source"], "command");
    bus.shutdown().await;
}

/// Run `dgbit-bus ARGS` against `addresses` and return its stdout as JSON.
fn cli_json(addresses: &dgbit_bus::config::Addresses, args: &[&str]) -> Value {
    let output = common::bus_command(addresses).args(args).output().unwrap();
    assert!(
        output.status.success(),
        "dgbit-bus {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|err| panic!("{args:?}: {text}: {err}"))
}

#[test]
fn dead_letters_survive_a_sigkill_of_serve_and_dlq_replay_runs_them_again() {
    use common::{wait_until, ServeProcess};
    let dir = TestAddresses::new();
    let addresses = &dir.addresses;
    let mut serve = ServeProcess::start(addresses, &["--job-lease-s", "1"]);

    // A job whose only attempt is leased and abandoned: its lease runs out
    // and, with no retries left, it becomes a dead letter.
    let job_id = common::bus_command(addresses)
        .args(["enqueue", "echo", r#"{"n": 7}"#, "--max-retries", "0"])
        .output()
        .unwrap();
    let job_id = String::from_utf8_lossy(&job_id.stdout).trim().to_string();
    let lease = cli_json(
        addresses,
        &[
            "send",
            "bus.lease",
            r#"{"worker": "doomed", "wait_ms": 1000}"#,
        ],
    );
    assert_eq!(lease["result"]["job"]["job_id"], json!(job_id), "{lease}");
    let buried = wait_until(Duration::from_secs(10), || {
        cli_json(addresses, &["dlq", "--json", "list"])["total"] == json!(1)
    });
    assert!(
        buried,
        "the abandoned job never reached the dead letter queue"
    );

    // SIGKILL: no shutdown, no flush.
    serve.child.kill().unwrap();
    serve.child.wait().unwrap();
    let _serve = ServeProcess::start(addresses, &[]);
    let listed = cli_json(addresses, &["dlq", "--json", "list"]);
    assert_eq!(listed["total"], json!(1), "{listed}");
    assert_eq!(listed["entries"][0]["job_id"], json!(job_id), "{listed}");

    cli_json(addresses, &["dlq", "--json", "replay", "--all"]);
    let mut worker = common::bus_command(addresses)
        .args(["work", "--job-type", "echo", "--lease-wait-ms", "200"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let completed = wait_until(Duration::from_secs(15), || {
        cli_json(addresses, &["jobs", "--json"])["completed"] == json!(1)
    });
    let _ = worker.kill();
    let _ = worker.wait();
    assert!(completed, "the replayed job did not complete");
    let listed = cli_json(addresses, &["dlq", "--json", "list"]);
    assert_eq!(listed["total"], json!(0), "{listed}");
    eprintln!("dead letter {job_id} survived SIGKILL of serve and completed after replay");
}
