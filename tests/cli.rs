//! The `dgbit-bus` binary as a user drives it from a shell.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::{bus_command, ServeProcess, TestAddresses};

fn publish(addresses: &dgbit_bus::config::Addresses, topic: &str) {
    let status = bus_command(addresses)
        .args(["publish", topic, r#"{"n": 1}"#])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "publish {topic} failed");
}

#[test]
fn tail_job_star_prints_job_events_and_nothing_from_jobs_archived() {
    let dir = TestAddresses::new();
    let addresses = &dir.addresses;
    let _serve = ServeProcess::start(addresses, &[]);
    let mut tail = bus_command(addresses)
        .args(["tail", "job.*"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = tail.stdout.take().unwrap();
    let (lines, received) = mpsc::channel::<Value>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let event = serde_json::from_str(&line).expect("each line is one JSON event");
            if lines.send(event).is_err() {
                return;
            }
        }
    });

    // PUB/SUB drops what is sent before the subscriber is connected: probe
    // until tail shows one, then send the events that count.
    let deadline = Instant::now() + Duration::from_secs(20);
    let connected = loop {
        publish(addresses, "job.probe");
        if received.recv_timeout(Duration::from_millis(200)).is_ok() {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
    };
    assert!(connected, "tail never received a probe");
    for topic in [
        "jobs.archived",
        "job.created",
        "trade.entered",
        "job",
        "job.completed",
    ] {
        publish(addresses, topic);
    }

    let mut seen = Vec::new();
    while !seen.contains(&"job.completed".to_string()) {
        let event = received
            .recv_timeout(Duration::from_secs(10))
            .expect("job.completed reached tail");
        assert_eq!(event.as_object().unwrap().len(), 4, "{event}");
        seen.push(event["event_type"].as_str().unwrap().to_string());
    }
    let _ = tail.kill();
    let _ = tail.wait();
    seen.retain(|topic| topic != "job.probe");
    assert_eq!(seen, ["job.created", "job.completed"]);
}
