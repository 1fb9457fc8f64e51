//! The job queue end to end: the dispatcher with in-process workers, remote
//! leasing workers over the command protocol, and the dead letter queue.
//!
//! Everything waits on channels or polls a condition with a deadline.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use dgbit_bus::dead_letter::{DeadLetterActor, DeadLetterLimits, SetReplayTarget};
use dgbit_bus::dispatcher::{
    Cancel, DispatcherSettings, Enqueue, QueueDispatcher, QueueState, RegisterWorker,
};
use dgbit_bus::message::{Command, EventSink, HandlerError, Publish, RunJob, StatsQuery};
use dgbit_bus::wire::{Event, JobMessage, Priority};
use dgbit_bus::worker::{CommandChannel, JobWorker, WorkerOptions};
use serde_json::{json, Value};
use tokio::sync::mpsc;

// ---- helpers ----

/// Forwards every published event into a channel.
struct Recorder(mpsc::UnboundedSender<Event>);

impl Actor for Recorder {
    type Context = Context<Self>;
}

impl Handler<Publish> for Recorder {
    type Result = ();

    fn handle(&mut self, msg: Publish, _: &mut Self::Context) {
        let _ = self.0.send(msg.event);
    }
}

/// A handler that sleeps `delay`, records who ran which job, and fails
/// while `fail` says so.
struct Sleeper {
    name: &'static str,
    delay: Duration,
    fail: bool,
    runs: Arc<Mutex<Vec<(&'static str, String)>>>,
}

impl Actor for Sleeper {
    type Context = Context<Self>;
}

impl Handler<RunJob> for Sleeper {
    type Result = ResponseFuture<Result<Value, HandlerError>>;

    fn handle(&mut self, msg: RunJob, _: &mut Self::Context) -> Self::Result {
        let (name, delay, fail, runs) = (self.name, self.delay, self.fail, self.runs.clone());
        Box::pin(async move {
            msg.progress.report(json!({"step": "begin"}));
            tokio::time::sleep(delay).await;
            runs.lock().unwrap().push((name, msg.job.job_id.clone()));
            if fail {
                Err(HandlerError::failed("the handler gave up"))
            } else {
                Ok(json!({"by": name}))
            }
        })
    }
}

struct Harness {
    dispatcher: Addr<QueueDispatcher>,
    dead_letters: Addr<DeadLetterActor>,
    events: mpsc::UnboundedReceiver<Event>,
    state: QueueState,
    runs: Arc<Mutex<Vec<(&'static str, String)>>>,
}

fn settings() -> DispatcherSettings {
    DispatcherSettings {
        job_lease: Duration::from_millis(300),
        retry_backoff_base: Duration::from_millis(20),
        retry_backoff_max: Duration::from_millis(100),
        push_job_types: BTreeSet::new(),
        backlog_alert: 0,
        ..DispatcherSettings::default()
    }
}

fn harness(settings: DispatcherSettings) -> Harness {
    start_harness(settings, None, None)
}

/// A dispatcher recording its events, with a dead letter store at
/// `dead_letter_path` (in memory for `None`) and an optional PUSH edge.
fn start_harness(
    settings: DispatcherSettings,
    dead_letter_path: Option<std::path::PathBuf>,
    push: Option<Arc<PushEdge>>,
) -> Harness {
    let (sender, events) = mpsc::unbounded_channel();
    let recorder = Recorder(sender).start();
    let dead_letters = DeadLetterActor::open(dead_letter_path, DeadLetterLimits::default())
        .unwrap()
        .start();
    let state = QueueState::new();
    let dispatcher = QueueDispatcher::new(
        settings,
        state.clone(),
        EventSink::to(recorder.recipient()),
        dead_letters.clone().recipient(),
        push,
    )
    .start();
    Harness {
        dispatcher,
        dead_letters,
        events,
        state,
        runs: Arc::default(),
    }
}

impl Harness {
    async fn worker(&self, name: &'static str, job_type: &str, delay: Duration, fail: bool) {
        let sleeper = Sleeper {
            name,
            delay,
            fail,
            runs: self.runs.clone(),
        }
        .start();
        self.dispatcher
            .send(RegisterWorker {
                job_type: job_type.into(),
                worker: sleeper.recipient(),
                concurrency: 1,
            })
            .await
            .unwrap();
    }

    async fn enqueue(&self, job: JobMessage) -> String {
        self.dispatcher
            .send(Enqueue { job })
            .await
            .unwrap()
            .unwrap()
    }

    async fn command(&self, name: &str, payload: Value) -> Result<Value, HandlerError> {
        self.dispatcher
            .send(Command::new(name, payload))
            .await
            .unwrap()
    }

    async fn stats(&self) -> Value {
        self.dispatcher.send(StatsQuery).await.unwrap()
    }

    /// Events until `stop` says enough, or panic at the deadline.
    async fn events_until(
        &mut self,
        within: Duration,
        mut stop: impl FnMut(&[Event]) -> bool,
    ) -> Vec<Event> {
        let deadline = tokio::time::Instant::now() + within;
        let mut seen = Vec::new();
        while !stop(&seen) {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(event)) => seen.push(event),
                _ => panic!("timed out; events so far: {:#?}", summary(&seen)),
            }
        }
        seen
    }
}

fn summary(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .map(|e| format!("{} {}", e.event_type, Value::Object(e.data.clone())))
        .collect()
}

fn count(events: &[Event], event_type: &str) -> usize {
    events.iter().filter(|e| e.event_type == event_type).count()
}

/// Poll `condition` every 10 ms until it holds or `within` passes.
async fn eventually<F, Fut>(within: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !condition().await {
        assert!(
            Instant::now() < deadline,
            "condition not met within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---- in-process workers ----

#[actix_rt::test]
async fn every_job_completes_once_and_its_events_follow_the_lifecycle() {
    let mut bus = harness(settings());
    bus.worker("w", "t", Duration::from_millis(1), false).await;
    let mut ids = HashSet::new();
    for _ in 0..20 {
        ids.insert(bus.enqueue(JobMessage::new("t", json!({}))).await);
    }
    let events = bus
        .events_until(Duration::from_secs(10), |seen| {
            count(seen, "job.completed") == 20
        })
        .await;

    for id in &ids {
        let of_job: Vec<&str> = events
            .iter()
            .filter(|e| e.data["job_id"] == json!(id))
            .map(|e| e.event_type.as_str())
            .collect();
        assert_eq!(
            of_job,
            [
                "job.created",
                "job.queued",
                "job.started",
                "job.progress",
                "job.completed"
            ],
            "job {id}"
        );
    }
    let started = events
        .iter()
        .find(|e| e.event_type == "job.started")
        .unwrap();
    assert_eq!(started.data["delivery"], json!("in_process"));
    assert_eq!(
        started.correlation_id.as_deref(),
        started.data["job_id"].as_str()
    );
    let stats = bus.stats().await;
    assert_eq!(stats["completed"], json!(20));
    assert_eq!(stats["queue_depth"], json!(0));
    assert_eq!(bus.runs.lock().unwrap().len(), 20);
}

#[actix_rt::test]
async fn a_worker_forty_times_slower_takes_only_a_small_share() {
    let mut bus = harness(settings());
    bus.worker("fast", "t", Duration::from_millis(5), false)
        .await;
    bus.worker("slow", "t", Duration::from_millis(200), false)
        .await;
    let started = Instant::now();
    for _ in 0..100 {
        bus.enqueue(JobMessage::new("t", json!({}))).await;
    }
    bus.events_until(Duration::from_secs(20), |seen| {
        count(seen, "job.completed") == 100
    })
    .await;
    let elapsed = started.elapsed();

    let runs = bus.runs.lock().unwrap().clone();
    let slow = runs.iter().filter(|(name, _)| *name == "slow").count();
    assert_eq!(runs.len(), 100);
    assert!(slow <= 10, "the slow worker ran {slow} of 100");
    // The fast worker alone needs about 100 x 5 ms; allow for timer slack.
    assert!(elapsed < Duration::from_millis(2500), "took {elapsed:?}");
}

#[actix_rt::test]
async fn a_handler_that_keeps_failing_is_retried_then_dead_lettered_with_its_history() {
    let mut bus = harness(settings());
    bus.worker("broken", "t", Duration::from_millis(1), true)
        .await;
    let id = bus
        .enqueue(JobMessage::new("t", json!({})).with_max_retries(2))
        .await;
    let events = bus
        .events_until(Duration::from_secs(10), |seen| {
            seen.iter()
                .any(|e| e.event_type == "job.failed" && e.data["will_retry"] == json!(false))
        })
        .await;
    assert_eq!(count(&events, "job.failed"), 3);
    assert_eq!(count(&events, "job.completed"), 0);

    let dead_letters = bus.dead_letters.clone();
    eventually(Duration::from_secs(5), || {
        let dead_letters = dead_letters.clone();
        async move { dead_letters.send(StatsQuery).await.unwrap()["entries"] == json!(1) }
    })
    .await;
    let page = bus
        .dead_letters
        .send(Command::new("bus.dlq.list", json!({})))
        .await
        .unwrap()
        .unwrap();
    let entry_id = page["entries"][0]["id"].clone();
    let entry = bus
        .dead_letters
        .send(Command::new("bus.dlq.show", json!({"id": entry_id})))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(entry["original_job"]["job_id"], json!(id));
    assert_eq!(entry["attempts"].as_array().unwrap().len(), 3);
    assert!(
        entry["error"]
            .as_str()
            .unwrap()
            .contains("the handler gave up"),
        "{entry}"
    );
}

#[actix_rt::test]
async fn a_replayed_dead_letter_runs_again_from_a_fresh_attempt_count() {
    let mut bus = harness(settings());
    bus.dead_letters
        .send(SetReplayTarget {
            target: bus.dispatcher.clone().recipient(),
        })
        .await
        .unwrap();
    let id = bus
        .enqueue(JobMessage::new("t", json!({})).with_max_retries(0))
        .await;
    bus.command("bus.lease", json!({"worker": "w"}))
        .await
        .unwrap();
    let failed = json!({"worker": "w", "job_id": id, "state": "failed", "error": "boom"});
    bus.command("bus.report", failed).await.unwrap();
    bus.events_until(Duration::from_secs(5), |seen| {
        count(seen, "job.failed") == 1
    })
    .await;
    let dead_letters = bus.dead_letters.clone();
    eventually(Duration::from_secs(5), || {
        let dead_letters = dead_letters.clone();
        async move { dead_letters.send(StatsQuery).await.unwrap()["entries"] == json!(1) }
    })
    .await;

    bus.worker("healthy", "t", Duration::from_millis(1), false)
        .await;
    let replay = Command::new("bus.dlq.replay", json!({"all": true}));
    let reply = bus.dead_letters.send(replay).await.unwrap().unwrap();
    assert_eq!(reply["replayed"].as_array().unwrap().len(), 1);
    let events = bus
        .events_until(Duration::from_secs(10), |seen| {
            count(seen, "job.completed") == 1
        })
        .await;
    let created = events
        .iter()
        .find(|e| e.event_type == "job.created")
        .unwrap();
    assert_eq!(created.data["job_id"], json!(id));
}

/// Stops itself on its first job before answering, so the dispatcher sees
/// its mailbox close (as after a panic).
struct Quitter;

impl Actor for Quitter {
    type Context = Context<Self>;
}

impl Handler<RunJob> for Quitter {
    type Result = ResponseActFuture<Self, Result<Value, HandlerError>>;

    fn handle(&mut self, _: RunJob, ctx: &mut Self::Context) -> Self::Result {
        ctx.stop();
        Box::pin(actix::fut::wrap_future(std::future::pending()))
    }
}

#[actix_rt::test]
async fn a_worker_whose_actor_is_gone_is_unregistered_and_its_job_runs_elsewhere() {
    let mut bus = harness(settings());
    let quitter = Quitter.start();
    bus.dispatcher
        .send(RegisterWorker {
            job_type: "t".into(),
            worker: quitter.recipient(),
            concurrency: 1,
        })
        .await
        .unwrap();
    bus.enqueue(JobMessage::new("t", json!({}))).await;
    bus.events_until(Duration::from_secs(5), |seen| {
        count(seen, "job.failed") == 1
    })
    .await;

    bus.worker("healthy", "t", Duration::from_millis(1), false)
        .await;
    let events = bus
        .events_until(Duration::from_secs(5), |seen| {
            count(seen, "job.completed") == 1
        })
        .await;
    let completed = events
        .iter()
        .find(|e| e.event_type == "job.completed")
        .unwrap();
    assert_eq!(completed.data["retry_count"], json!(1));
    let stats = bus.stats().await;
    assert_eq!(
        stats["workers"]["local:t:1"]["registered"],
        json!(false),
        "{stats}"
    );
    assert_eq!(
        stats["workers"]["local:t:2"]["registered"],
        json!(true),
        "{stats}"
    );
}

#[actix_rt::test]
async fn a_long_in_process_job_keeps_its_lease_and_runs_once() {
    let mut bus = harness(settings());
    // Three leases long, with no progress after the start.
    bus.worker("long", "t", Duration::from_millis(900), false)
        .await;
    bus.enqueue(JobMessage::new("t", json!({}))).await;
    let events = bus
        .events_until(Duration::from_secs(5), |seen| {
            count(seen, "job.completed") == 1
        })
        .await;
    assert_eq!(count(&events, "job.started"), 1);
    assert_eq!(bus.stats().await["redelivered"], json!(0));
}

// ---- the command protocol, in-process ----

#[actix_rt::test]
async fn a_leased_job_is_completed_by_report_and_late_reports_are_ignored() {
    let mut bus = harness(settings());
    let enqueued = bus
        .command("bus.enqueue", json!({"job_type": "t", "payload": {"x": 1}}))
        .await
        .unwrap();
    let job_id = enqueued["job_id"].as_str().unwrap().to_string();

    let lease = bus
        .command("bus.lease", json!({"worker": "w1", "wait_ms": 1000}))
        .await
        .unwrap();
    assert_eq!(lease["job"]["job_id"], json!(job_id));
    assert_eq!(
        lease["job"].as_object().unwrap().len(),
        7,
        "exactly dgbit's seven keys"
    );
    assert_eq!(lease["lease_ms"], json!(300));

    let report = |state: &str| json!({"worker": "w1", "job_id": job_id, "state": state, "result": {"ok": 1}});
    assert_eq!(
        bus.command("bus.report", report("started")).await.unwrap()["accepted"],
        json!(true)
    );
    assert_eq!(
        bus.command("bus.report", report("completed"))
            .await
            .unwrap()["accepted"],
        json!(true)
    );
    assert_eq!(
        bus.command("bus.report", report("completed"))
            .await
            .unwrap()["accepted"],
        json!(false)
    );

    let events = bus
        .events_until(Duration::from_secs(5), |seen| {
            count(seen, "job.completed") == 1
        })
        .await;
    let completed = events
        .iter()
        .find(|e| e.event_type == "job.completed")
        .unwrap();
    assert_eq!(completed.data["result"], json!({"ok": 1}));
    assert_eq!(completed.data["worker"], json!("w1"));
    assert_eq!(bus.stats().await["ignored_reports"], json!(1));
}

#[actix_rt::test]
async fn a_final_report_can_lease_the_next_job_in_the_same_round_trip() {
    let mut bus = harness(settings());
    let first = bus.enqueue(JobMessage::new("t", json!({"n": 1}))).await;
    let second = bus.enqueue(JobMessage::new("t", json!({"n": 2}))).await;
    let lease = bus
        .command("bus.lease", json!({"worker": "w1", "job_types": ["t"]}))
        .await
        .unwrap();
    assert_eq!(lease["job"]["job_id"], json!(first));

    let done = |job_id: &str, lease_id: &Value| {
        json!({"worker": "w1", "job_id": job_id, "lease_id": lease_id, "state": "completed",
               "result": {}, "next": {"job_types": ["t"], "wait_ms": 5000}})
    };
    let reply = bus
        .command("bus.report", done(&first, &lease["lease_id"]))
        .await
        .unwrap();
    assert_eq!(reply["accepted"], json!(true));
    assert_eq!(reply["next"]["job"]["job_id"], json!(second), "{reply}");
    assert!(reply["next"]["lease_id"].is_u64(), "{reply}");

    // The queue is empty now: the next lease comes back empty, at once
    // (its `wait_ms` of 5 s is ignored, so the acknowledgement is not held).
    let asked = std::time::Instant::now();
    let reply = bus
        .command("bus.report", done(&second, &reply["next"]["lease_id"]))
        .await
        .unwrap();
    assert!(
        asked.elapsed() < Duration::from_millis(2500),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(reply["accepted"], json!(true));
    assert_eq!(reply["next"], json!({"job": null}));
    bus.events_until(Duration::from_secs(5), |seen| {
        count(seen, "job.completed") == 2
    })
    .await;

    // `next` only goes with a final report.
    let third = bus.enqueue(JobMessage::new("t", json!({}))).await;
    bus.command("bus.lease", json!({"worker": "w1"}))
        .await
        .unwrap();
    let heartbeat = json!({"worker": "w1", "job_id": third, "state": "heartbeat",
                           "next": {"wait_ms": 0}});
    let err = bus.command("bus.report", heartbeat).await.unwrap_err();
    assert_eq!(err.code, "bad_request");
}

#[actix_rt::test]
async fn a_silent_worker_loses_its_lease_and_the_job_goes_to_the_next_with_one_more_retry() {
    let bus = harness(settings());
    let job_id = bus.enqueue(JobMessage::new("t", json!({}))).await;
    let first = bus
        .command("bus.lease", json!({"worker": "silent"}))
        .await
        .unwrap();
    assert_eq!(first["job"]["retry_count"], json!(0));

    let started = Instant::now();
    let second = bus
        .command("bus.lease", json!({"worker": "next", "wait_ms": 2000}))
        .await
        .unwrap();
    assert_eq!(second["job"]["job_id"], json!(job_id));
    assert_eq!(second["job"]["retry_count"], json!(1));
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "not before the lease ran out"
    );
    let late = json!({"worker": "silent", "job_id": job_id, "state": "completed"});
    assert_eq!(
        bus.command("bus.report", late).await.unwrap()["accepted"],
        json!(false)
    );
}

#[actix_rt::test]
async fn an_idle_lease_request_answers_no_job_after_its_wait() {
    let bus = harness(settings());
    let started = Instant::now();
    let reply = bus
        .command("bus.lease", json!({"worker": "w", "wait_ms": 200}))
        .await
        .unwrap();
    assert_eq!(reply, json!({"job": null}));
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert!(started.elapsed() < Duration::from_millis(1500));
}

#[actix_rt::test]
async fn a_waiting_job_can_be_cancelled_but_a_leased_one_cannot() {
    let mut bus = harness(settings());
    let running = bus
        .enqueue(JobMessage::new("t", json!({})).with_priority(Priority::Urgent))
        .await;
    let waiting = bus.enqueue(JobMessage::new("t", json!({}))).await;
    bus.command("bus.lease", json!({"worker": "w"}))
        .await
        .unwrap();

    let reply = bus
        .command("bus.cancel", json!({"job_id": waiting}))
        .await
        .unwrap();
    assert_eq!(reply["cancelled"], json!(true));
    let refused = bus
        .dispatcher
        .send(Cancel { job_id: running })
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(refused.code, "in_flight");
    let events = bus
        .events_until(Duration::from_secs(5), |seen| {
            count(seen, "job.cancelled") == 1
        })
        .await;
    let cancelled = events
        .iter()
        .find(|e| e.event_type == "job.cancelled")
        .unwrap();
    assert_eq!(cancelled.data["job_id"], json!(waiting));
    assert_eq!(bus.stats().await["queue_depth"], json!(0));
}

#[actix_rt::test]
async fn a_full_queue_refuses_at_once_with_overloaded() {
    let bus = harness(DispatcherSettings {
        queue_capacity: 3,
        ..settings()
    });
    for _ in 0..3 {
        bus.command("bus.enqueue", json!({"job_type": "t"}))
            .await
            .unwrap();
    }
    let refused = bus
        .command("bus.enqueue", json!({"job_type": "t"}))
        .await
        .unwrap_err();
    assert_eq!(refused.code, "overloaded");
}

#[actix_rt::test]
async fn with_no_worker_jobs_wait_raise_the_backlog_alert_then_flow_and_clear_it() {
    let mut bus = harness(DispatcherSettings {
        backlog_alert: 5,
        ..settings()
    });
    for _ in 0..10 {
        bus.enqueue(JobMessage::new("t", json!({}))).await;
    }
    let raised = bus
        .events_until(Duration::from_secs(5), |seen| {
            count(seen, "system.alert") == 1
        })
        .await;
    let alert = raised
        .iter()
        .find(|e| e.event_type == "system.alert")
        .unwrap();
    assert_eq!(alert.data["active"], json!(true));
    assert_eq!(bus.stats().await["queue_depth"], json!(10));

    bus.worker("late", "t", Duration::from_millis(1), false)
        .await;
    let events = bus
        .events_until(Duration::from_secs(10), |seen| {
            count(seen, "job.completed") == 10 && count(seen, "system.alert") == 1
        })
        .await;
    let cleared = events
        .iter()
        .find(|e| e.event_type == "system.alert")
        .unwrap();
    assert_eq!(cleared.data["active"], json!(false));
}

#[actix_rt::test]
async fn a_restarted_dispatcher_keeps_the_queue_it_was_given() {
    let bus = harness(settings());
    for _ in 0..3 {
        bus.enqueue(JobMessage::new("t", json!({}))).await;
    }
    let Harness {
        dispatcher,
        dead_letters,
        state,
        ..
    } = bus;
    drop(dispatcher);
    let (sender, mut events) = mpsc::unbounded_channel();
    let recorder = Recorder(sender).start();
    let second = QueueDispatcher::new(
        settings(),
        state.clone(),
        EventSink::to(recorder.recipient()),
        dead_letters.recipient(),
        None,
    )
    .start();
    assert_eq!(
        second.send(StatsQuery).await.unwrap()["queue_depth"],
        json!(3)
    );

    let runs = Arc::new(Mutex::new(Vec::new()));
    let sleeper = Sleeper {
        name: "w",
        delay: Duration::ZERO,
        fail: false,
        runs: runs.clone(),
    }
    .start();
    second
        .send(RegisterWorker {
            job_type: "t".into(),
            worker: sleeper.recipient(),
            concurrency: 2,
        })
        .await
        .unwrap();
    let mut completed = 0;
    while completed < 3 {
        let event = tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .unwrap()
            .unwrap();
        completed += usize::from(event.event_type == "job.completed");
    }
    assert_eq!(state.depth(), 0);
    let by_worker: HashMap<_, usize> =
        runs.lock()
            .unwrap()
            .iter()
            .fold(HashMap::new(), |mut m, (w, _)| {
                *m.entry(*w).or_default() += 1;
                m
            });
    assert_eq!(by_worker["w"], 3);
}

// ---- JobWorker against an in-process dispatcher ----

fn job_worker(bus: &Harness, name: &'static str, delay: Duration, concurrency: usize) -> JobWorker {
    let sleeper = Sleeper {
        name,
        delay,
        fail: false,
        runs: bus.runs.clone(),
    }
    .start();
    let options = WorkerOptions {
        worker_id: name.into(),
        concurrency,
        lease_wait: Duration::from_millis(500),
        ..WorkerOptions::default()
    };
    JobWorker::with_channel(
        CommandChannel::Local(bus.dispatcher.clone().recipient()),
        options,
    )
    .handler("t", sleeper.recipient())
}

#[actix_rt::test]
async fn job_workers_share_by_speed_and_drain_on_shutdown() {
    let mut bus = harness(settings());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let fast = actix::spawn(
        job_worker(&bus, "fast", Duration::from_millis(5), 2).run(stopped(stop_rx.clone())),
    );
    let slow =
        actix::spawn(job_worker(&bus, "slow", Duration::from_millis(200), 2).run(stopped(stop_rx)));
    for _ in 0..100 {
        bus.enqueue(JobMessage::new("t", json!({}))).await;
    }
    bus.events_until(Duration::from_secs(20), |seen| {
        count(seen, "job.completed") == 100
    })
    .await;
    stop_tx.send(true).unwrap();
    let (fast, slow) = (fast.await.unwrap(), slow.await.unwrap());

    assert_eq!(fast.completed + slow.completed, 100);
    assert!(
        slow.completed <= 12,
        "slow worker completed {}",
        slow.completed
    );
    assert_eq!(fast.reports_ignored + slow.reports_ignored, 0);
    let stats = bus.stats().await;
    assert_eq!(stats["workers"]["fast"]["completed"], json!(fast.completed));
    assert_eq!(stats["in_flight"], json!(0));
}

#[actix_rt::test]
async fn a_job_worker_heartbeats_so_a_long_job_keeps_its_lease() {
    let mut bus = harness(settings());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let worker = job_worker(&bus, "long", Duration::from_millis(1000), 1);
    let running = actix::spawn(worker.run(async move {
        let _ = stop_rx.await;
    }));
    bus.enqueue(JobMessage::new("t", json!({}))).await;
    let events = bus
        .events_until(Duration::from_secs(5), |seen| {
            count(seen, "job.completed") == 1
        })
        .await;
    assert_eq!(count(&events, "job.started"), 1, "never redelivered");
    assert_eq!(
        count(&events, "job.progress"),
        1,
        "the handler's progress report"
    );
    stop_tx.send(()).unwrap();
    let summary = running.await.unwrap();
    assert_eq!(summary.completed, 1);
    assert_eq!(bus.stats().await["redelivered"], json!(0));
}

// ---- over real ipc sockets: a command bus wired to the dispatcher ----

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};

use dgbit_bus::client::{BusClient, ClientOptions};
use dgbit_bus::config::Addresses;
use dgbit_bus::edge::push::PushEdge;
use dgbit_bus::edge::rep::{InboundSink, RepEdge};
use dgbit_bus::edge::EdgeOptions;
use dgbit_bus::router::{CommandRouter, RouteTable, RouterSettings};

/// The job queue behind a real command socket (and, when asked, a PUSH
/// edge), in a fresh temp dir.
struct SocketBus {
    _dir: common::TestAddresses,
    addresses: Addresses,
    inner: Harness,
    _edge: RepEdge,
}

fn socket_bus(
    settings: DispatcherSettings,
    dead_letter_path: Option<std::path::PathBuf>,
    push: Option<Arc<PushEdge>>,
    dir: common::TestAddresses,
) -> SocketBus {
    let inner = start_harness(settings, dead_letter_path, push);
    let (dispatcher, dead_letters) = (&inner.dispatcher, &inner.dead_letters);
    dead_letters.do_send(SetReplayTarget {
        target: dispatcher.clone().recipient(),
    });

    let routes = RouteTable::default();
    for name in dgbit_bus::dispatcher::QUEUE_COMMANDS {
        routes.register(name, dispatcher.clone().recipient());
    }
    for name in dgbit_bus::dead_letter::DEAD_LETTER_COMMANDS {
        routes.register(name, dead_letters.clone().recipient());
    }
    let router = CommandRouter::new(RouterSettings::default(), routes).start();
    let sink: InboundSink = Arc::new(move |inbound| router.do_send(inbound));
    let addresses = dir.addresses.clone();
    let edge = RepEdge::listen(&addresses.command, &EdgeOptions::default(), 32, sink).unwrap();
    SocketBus {
        _dir: dir,
        addresses,
        inner,
        _edge: edge,
    }
}

async fn client(url: &str) -> BusClient {
    let options = ClientOptions::default().timeout(Duration::from_secs(10));
    BusClient::connect(url, options).await.unwrap()
}

/// A Python peer; its stdout lines arrive on a channel. Killed (SIGKILL)
/// when dropped.
struct Peer {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
}

impl Peer {
    fn start(script: &str, args: &[&str]) -> Peer {
        let mut child = common::python()
            .arg(common::python_script(script))
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 starts");
        let stdout = child.stdout.take().unwrap();
        let (sender, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Peer { child, lines }
    }

    async fn line(&mut self, within: Duration) -> String {
        tokio::time::timeout(within, self.lines.recv())
            .await
            .expect("a line from the Python peer in time")
            .expect("the Python peer is still running")
    }

    /// Lines printed so far, without waiting.
    fn drain(&mut self) -> Vec<String> {
        std::iter::from_fn(|| self.lines.try_recv().ok()).collect()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn lease_worker(address: &str, id: &str, delay: &str) -> Peer {
    Peer::start(
        "lease_worker.py",
        &["--address", address, "--worker-id", id, "--delay", delay],
    )
}

fn completed_ids(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("completed ").map(str::to_string))
        .collect()
}

/// Run 300 jobs through Python leasing workers `(id, seconds per job)` on a
/// fresh bus; returns the time from the first enqueue to the last
/// completion, and the completions per worker.
async fn run_300_jobs(workers: &[(&str, &str)]) -> (Duration, HashMap<String, u64>) {
    let mut bus = socket_bus(settings(), None, None, common::TestAddresses::new());
    let command = bus.addresses.command.clone();
    let mut peers: Vec<Peer> = workers
        .iter()
        .map(|(id, delay)| lease_worker(&command, id, delay))
        .collect();
    for peer in &mut peers {
        assert!(peer
            .line(Duration::from_secs(10))
            .await
            .starts_with("ready"));
    }
    let producer = client(&command).await;
    let started = Instant::now();
    for n in 0..300 {
        producer
            .call("bus.enqueue", json!({"job_type": "t", "payload": {"n": n}}))
            .await
            .unwrap();
    }
    bus.inner
        .events_until(Duration::from_secs(60), |seen| {
            count(seen, "job.completed") == 300
        })
        .await;
    let elapsed = started.elapsed();
    let stats = bus.inner.stats().await;
    assert_eq!(stats["redelivered"], json!(0));
    let done = workers
        .iter()
        .map(|(id, _)| {
            (
                id.to_string(),
                stats["workers"][id]["completed"].as_u64().unwrap(),
            )
        })
        .collect();
    (elapsed, done)
}

#[actix_rt::test]
async fn three_python_workers_one_forty_times_slower_share_300_jobs_by_speed() {
    let fast = [("fast-1", "0.01"), ("fast-2", "0.01")];
    let (alone, _) = run_300_jobs(&fast).await;
    let (elapsed, done) = run_300_jobs(&[fast[0], fast[1], ("slow", "0.4")]).await;

    let slow = done["slow"];
    eprintln!("300 jobs: two fast workers alone {alone:?}; with a 40x slower third {elapsed:?}, which took {slow}");
    assert_eq!(done.values().sum::<u64>(), 300);
    assert!(slow <= 15, "the slow worker completed {slow} of 300");
    // Close to the two fast workers alone: at worst the slow worker's last
    // job (0.4 s) finishes after theirs.
    assert!(
        elapsed < alone * 11 / 10 + Duration::from_millis(500),
        "took {elapsed:?}"
    );
}

#[actix_rt::test]
async fn a_worker_killed_mid_run_loses_no_job_and_none_completes_twice() {
    let lease = DispatcherSettings {
        job_lease: Duration::from_millis(600),
        ..settings()
    };
    let mut bus = socket_bus(lease, None, None, common::TestAddresses::new());
    let command = bus.addresses.command.clone();
    let mut doomed = lease_worker(&command, "doomed", "0.03");
    let mut survivor = lease_worker(&command, "survivor", "0.03");
    for worker in [&mut doomed, &mut survivor] {
        assert!(worker
            .line(Duration::from_secs(10))
            .await
            .starts_with("ready"));
    }
    let producer = client(&command).await;
    let mut ids = HashSet::new();
    for n in 0..100 {
        let reply = producer
            .call(
                "bus.enqueue",
                json!({"job_type": "t", "payload": {"n": n}, "max_retries": 3}),
            )
            .await
            .unwrap();
        ids.insert(reply["job_id"].as_str().unwrap().to_string());
    }

    // Kill it mid-run: after it completed some, while it holds a job.
    let mut before_kill = Vec::new();
    while completed_ids(&before_kill).len() < 10 {
        before_kill.push(doomed.line(Duration::from_secs(10)).await);
    }
    doomed.kill();
    before_kill.extend(doomed.drain());

    let events = bus
        .inner
        .events_until(Duration::from_secs(30), |seen| {
            count(seen, "job.completed") + count_final_failures(seen) == 100
        })
        .await;
    let mut completions: HashMap<String, usize> = HashMap::new();
    for event in events.iter().filter(|e| e.event_type == "job.completed") {
        *completions
            .entry(event.data["job_id"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    let buried: HashSet<String> = events
        .iter()
        .filter(|e| e.event_type == "job.failed" && e.data["will_retry"] == json!(false))
        .map(|e| e.data["job_id"].as_str().unwrap().to_string())
        .collect();
    for id in &ids {
        let times = completions.get(id).copied().unwrap_or(0);
        assert!(
            (times == 1) != buried.contains(id),
            "job {id}: completed {times} time(s), dead-lettered: {}",
            buried.contains(id)
        );
    }
    assert_eq!(completions.len() + buried.len(), 100);
    let stats = bus.inner.stats().await;
    eprintln!(
        "doomed completed {} before SIGKILL; redelivered {}; survivor completed {}",
        completed_ids(&before_kill).len(),
        stats["redelivered"],
        stats["workers"]["survivor"]["completed"]
    );
    // Jobs the doomed worker completed were reported before it died, so the
    // bus counted them for it; every other job went to the survivor.
    let doomed_done = stats["workers"]["doomed"]["completed"].as_u64().unwrap();
    assert_eq!(doomed_done as usize, completed_ids(&before_kill).len());
    assert_eq!(stats["in_flight"], json!(0));
}

fn count_final_failures(events: &[Event]) -> usize {
    events
        .iter()
        .filter(|e| e.event_type == "job.failed" && e.data["will_retry"] == json!(false))
        .count()
}

#[actix_rt::test]
async fn a_producer_that_enqueues_and_exits_at_once_loses_nothing() {
    let bus = socket_bus(settings(), None, None, common::TestAddresses::new());
    let command = bus.addresses.command.clone();
    let mut ids = HashSet::new();
    for _ in 0..3 {
        let producer = client(&command).await;
        let reply = producer
            .call("bus.enqueue", json!({"job_type": "t"}))
            .await
            .unwrap();
        ids.insert(reply["job_id"].as_str().unwrap().to_string());
        drop(producer);
    }
    // The bus runs on this thread: wait for the producer on another one.
    let address = command.clone();
    let python = tokio::task::spawn_blocking(move || {
        let args = ["--address", address.as_str(), "--count", "20"];
        common::run_python("enqueue_and_exit.py", &args, Duration::from_secs(20))
    })
    .await
    .unwrap();
    for line in &python {
        ids.insert(line["job_id"].as_str().unwrap().to_string());
    }
    assert_eq!(ids.len(), 23);
    assert_eq!(bus.inner.state.depth(), 23);
    let workers = client(&command).await;
    let mut leased = HashSet::new();
    for _ in 0..23 {
        let lease = workers
            .call("bus.lease", json!({"worker": "w"}))
            .await
            .unwrap();
        leased.insert(lease["job"]["job_id"].as_str().unwrap().to_string());
    }
    assert_eq!(leased, ids);
}

#[actix_rt::test]
async fn a_rust_job_worker_over_ipc_runs_jobs_and_reports_them() {
    let mut bus = socket_bus(settings(), None, None, common::TestAddresses::new());
    let sleeper = Sleeper {
        name: "rust",
        delay: Duration::from_millis(2),
        fail: false,
        runs: bus.inner.runs.clone(),
    }
    .start();
    let options = WorkerOptions {
        worker_id: "rust-worker".into(),
        concurrency: 3,
        lease_wait: Duration::from_millis(500),
        ..WorkerOptions::default()
    };
    let worker = JobWorker::connect(&bus.addresses.command, options, ClientOptions::default())
        .await
        .unwrap()
        .handler("t", sleeper.recipient());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = actix::spawn(worker.run(async move {
        let _ = stop_rx.await;
    }));
    for _ in 0..30 {
        bus.inner.enqueue(JobMessage::new("t", json!({}))).await;
    }
    bus.inner
        .events_until(Duration::from_secs(20), |seen| {
            count(seen, "job.completed") == 30
        })
        .await;
    stop_tx.send(()).unwrap();
    let summary = running.await.unwrap();
    assert_eq!(summary.completed, 30);
    assert_eq!(summary.reports_lost + summary.reports_ignored, 0);
}

// ---- the PUSH edge: at most once, to plain PULL peers ----

#[actix_rt::test]
async fn jobs_wait_until_a_pull_peer_connects_then_go_to_it_at_most_once() {
    let dir = common::TestAddresses::new();
    let push = PushEdge::listen(
        &dir.addresses.job_queue,
        &EdgeOptions::default(),
        Duration::from_secs(1),
    )
    .unwrap();
    let queue_url = dir.addresses.job_queue.clone();
    let all = DispatcherSettings {
        push_job_types: BTreeSet::from(["*".to_string()]),
        ..settings()
    };
    let mut bus = socket_bus(all, None, Some(Arc::new(push)), dir);

    let mut ids = HashSet::new();
    for _ in 0..5 {
        ids.insert(
            bus.inner
                .enqueue(JobMessage::new("python_job", json!({"k": 1})))
                .await,
        );
    }
    let stats = bus.inner.stats().await;
    assert_eq!(stats["queue_depth"], json!(5), "no peer: nothing pushed");
    assert_eq!(stats["push"]["peers"], json!(0));

    let mut peer = Peer::start("pull_worker.py", &["--address", &queue_url, "--count", "5"]);
    let mut received = HashSet::new();
    while received.len() < 5 {
        let line = peer.line(Duration::from_secs(10)).await;
        if let Some(rest) = line.strip_prefix("job ") {
            received.insert(rest.split(' ').next().unwrap().to_string());
        } else {
            assert_eq!(line, "ready");
        }
    }
    assert_eq!(received, ids);
    let events = bus
        .inner
        .events_until(Duration::from_secs(5), |seen| {
            count(seen, "job.started") == 5
        })
        .await;
    assert!(events
        .iter()
        .filter(|e| e.event_type == "job.started")
        .all(|e| e.data["delivery"] == json!("at_most_once")));
    let stats = bus.inner.stats().await;
    assert_eq!(stats["handed_off_at_most_once"], json!(5));
    assert_eq!(stats["queue_depth"], json!(0));
}

#[actix_rt::test]
async fn the_push_edge_can_dial_a_pull_worker_that_listens() {
    let dir = common::TestAddresses::new();
    let queue_url = dir.addresses.job_queue.clone();
    let mut peer = Peer::start(
        "pull_worker.py",
        &["--address", &queue_url, "--listen", "--count", "2"],
    );
    assert_eq!(peer.line(Duration::from_secs(10)).await, "ready");
    let push = PushEdge::dial(&queue_url, &EdgeOptions::default(), Duration::from_secs(1)).unwrap();
    let only = DispatcherSettings {
        push_job_types: BTreeSet::from(["python_job".to_string()]),
        ..settings()
    };
    let bus = socket_bus(only, None, Some(Arc::new(push)), dir);
    for _ in 0..2 {
        bus.inner
            .enqueue(JobMessage::new("python_job", json!({})))
            .await;
    }
    for _ in 0..2 {
        assert!(peer.line(Duration::from_secs(10)).await.starts_with("job "));
    }
    let dispatcher = bus.inner.dispatcher.clone();
    eventually(Duration::from_secs(5), || {
        let dispatcher = dispatcher.clone();
        async move { dispatcher.send(StatsQuery).await.unwrap()["handed_off_at_most_once"] == json!(2) }
    })
    .await;
}

// ---- dead letters across a SIGKILL of the process holding them ----

const DLQ_SERVER_DIR: &str = "DGBIT_TEST_DLQ_SERVER_DIR";

/// Not a test on its own: the child process of the test below. It serves a
/// job queue with a dead letter file in the directory named by the
/// environment until it is killed.
#[actix_rt::test]
#[ignore = "run as a child process by dead_letters_survive_a_sigkill_and_can_be_replayed"]
async fn dead_letter_server_for_the_kill_test() {
    let Ok(dir) = std::env::var(DLQ_SERVER_DIR) else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    let addresses = common::TestAddresses::new();
    let fixed = common::TestAddresses {
        addresses: Addresses::in_dir(&dir),
        ..addresses
    };
    let _bus = socket_bus(
        settings(),
        Some(dir.join("dead_letters.sqlite")),
        None,
        fixed,
    );
    println!("dlq-server-ready");
    std::future::pending::<()>().await;
}

fn dead_letter_server(dir: &std::path::Path) -> Child {
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "dead_letter_server_for_the_kill_test",
            "--ignored",
            "--nocapture",
        ])
        .env(DLQ_SERVER_DIR, dir)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let ready = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|l| l == "dlq-server-ready");
    assert!(ready, "the dead letter server did not start");
    child
}

#[actix_rt::test]
async fn dead_letters_survive_a_sigkill_and_can_be_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let command = Addresses::in_dir(dir.path()).command;
    let path = dir.path().to_path_buf();
    let mut server = tokio::task::spawn_blocking(move || dead_letter_server(&path))
        .await
        .unwrap();
    let bus = client(&command).await;
    let job = bus
        .call(
            "bus.enqueue",
            json!({"job_type": "t", "payload": {"keep": "me"}, "max_retries": 0}),
        )
        .await
        .unwrap();
    let job_id = job["job_id"].clone();
    bus.call("bus.lease", json!({"worker": "w"})).await.unwrap();
    let failed = json!({"worker": "w", "job_id": job_id, "state": "failed", "error": "boom"});
    bus.call("bus.report", failed).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while bus.call("bus.dlq.list", json!({})).await.unwrap()["total"] != json!(1) {
        assert!(Instant::now() < deadline, "the job was not dead-lettered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(bus);

    server.kill().unwrap();
    server.wait().unwrap();
    let path = dir.path().to_path_buf();
    let mut server = tokio::task::spawn_blocking(move || dead_letter_server(&path))
        .await
        .unwrap();

    let bus = client(&command).await;
    let list = bus.call("bus.dlq.list", json!({})).await.unwrap();
    assert_eq!(list["total"], json!(1), "{list}");
    assert_eq!(list["entries"][0]["job_id"], job_id);
    let entry = bus
        .call("bus.dlq.show", json!({"id": list["entries"][0]["id"]}))
        .await
        .unwrap();
    assert_eq!(entry["original_job"]["payload"], json!({"keep": "me"}));
    assert!(entry["error"].as_str().unwrap().contains("boom"));

    let replay = bus
        .call("bus.dlq.replay", json!({"all": true}))
        .await
        .unwrap();
    assert_eq!(replay["replayed"].as_array().unwrap().len(), 1);
    let lease = bus
        .call("bus.lease", json!({"worker": "w2", "wait_ms": 1000}))
        .await
        .unwrap();
    assert_eq!(lease["job"]["job_id"], job_id);
    assert_eq!(lease["job"]["retry_count"], json!(0));
    assert_eq!(
        bus.call("bus.dlq.list", json!({})).await.unwrap()["total"],
        json!(0)
    );
    server.kill().unwrap();
    server.wait().unwrap();
}

// ---- under the bus's supervisor ----

#[actix_rt::test]
async fn a_supervised_dispatcher_that_panics_comes_back_with_its_queue_and_leases() {
    use dgbit_bus::backoff::BackoffPolicy;
    use dgbit_bus::supervisor::{supervise, FaultKind, InjectFault, SupervisorOptions};

    let (sender, mut events) = mpsc::unbounded_channel();
    let recorder = Recorder(sender).start();
    let dead_letters = DeadLetterActor::open(None, DeadLetterLimits::default()).unwrap();
    let dead_letters = dead_letters.start().recipient();
    let state = QueueState::new();
    let (events_sink, shared) = (EventSink::to(recorder.recipient()), state.clone());
    let factory = move || {
        QueueDispatcher::new(
            settings(),
            shared.clone(),
            events_sink.clone(),
            dead_letters.clone(),
            None,
        )
    };
    let policy = BackoffPolicy {
        base: Duration::from_millis(10),
        jitter: 0.0,
        ..BackoffPolicy::default()
    };
    let role = supervise("job_queue", policy, factory, SupervisorOptions::new());

    for _ in 0..3 {
        role.send(Enqueue {
            job: JobMessage::new("t", json!({})),
        })
        .await
        .unwrap()
        .unwrap();
    }
    let lease = role
        .send(Command::new("bus.lease", json!({"worker": "w"})))
        .await
        .unwrap()
        .unwrap();
    let held = lease["job"]["job_id"].as_str().unwrap().to_string();

    let _ = role
        .send(InjectFault {
            kind: FaultKind::Panic,
        })
        .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let stats = loop {
        if let Ok(stats) = role.send(StatsQuery).await {
            break stats;
        }
        assert!(
            Instant::now() < deadline,
            "the dispatcher did not come back"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(stats["queue_depth"], json!(2));
    assert_eq!(stats["in_flight"], json!(1));

    // The lease taken before the crash is still honoured.
    let done = json!({"worker": "w", "job_id": held, "state": "completed"});
    let reply = role
        .send(Command::new("bus.report", done))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply["accepted"], json!(true));
    loop {
        let event = tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .unwrap()
            .unwrap();
        if event.event_type == "job.completed" {
            assert_eq!(event.data["job_id"], json!(held));
            break;
        }
    }
    assert_eq!(state.depth(), 2);
    role.shutdown();
}
