//! Supervision of role actors: crashes by panic and by stop come back on
//! the backoff schedule, the restart budget is respected, and nobody hangs.
//!
//! No sockets here: the roles are small test actors. Every wait is on a
//! channel or on the supervisor's own state, bounded by a deadline.

mod common;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::ThreadId;
use std::time::Duration;

use actix::prelude::*;
use dgbit_bus::backoff::{BackoffPolicy, GiveUpReason, RestartBudget};
use dgbit_bus::message::{EventSink, Publish};
use dgbit_bus::supervisor::{
    supervise, CrashReason, FaultKind, GiveUp, InjectFault, RoleSendError, RoleState,
    SupervisedRole, SupervisionStats, SupervisorOptions, INJECTED_PANIC,
};
use dgbit_bus::wire::Event;
use serde_json::Value;
use tokio::sync::mpsc;

use common::fast_policy;

/// Longest any single wait in these tests may take.
const DEADLINE: Duration = Duration::from_secs(5);
/// How late a restart may be beyond its drawn delay on a busy machine.
const LATENESS: Duration = Duration::from_millis(250);

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    common::within(DEADLINE, what, future).await
}

/// Which instance of a role answered, and on which thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, MessageResponse)]
struct Identity {
    instance: u64,
    thread: ThreadId,
}

#[derive(Message)]
#[rtype(result = "Identity")]
struct WhoAreYou;

/// What a [`Role`] does when it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnStart {
    Nothing,
    /// Panic in `started` while fewer than this many instances were built.
    PanicWhileBuiltBelow(u64),
    /// Refuse to stop when asked.
    IgnoreStop,
}

/// The role under test: it knows its instance number and crashes on
/// request.
struct Role {
    instance: u64,
    on_start: OnStart,
    stopped: Arc<AtomicU64>,
}

impl Actor for Role {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Context<Self>) {
        if let OnStart::PanicWhileBuiltBelow(count) = self.on_start {
            if self.instance < count {
                panic!("cannot start instance {}", self.instance);
            }
        }
    }

    fn stopping(&mut self, _: &mut Context<Self>) -> Running {
        match self.on_start {
            OnStart::IgnoreStop => Running::Continue,
            _ => Running::Stop,
        }
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        self.stopped.fetch_add(1, Ordering::SeqCst);
    }
}

impl Handler<WhoAreYou> for Role {
    type Result = Identity;

    fn handle(&mut self, _: WhoAreYou, _: &mut Context<Self>) -> Identity {
        Identity {
            instance: self.instance,
            thread: std::thread::current().id(),
        }
    }
}

dgbit_bus::impl_inject_fault!(Role);

/// Builds [`Role`]s, numbering them from 1.
#[derive(Clone)]
struct Factory {
    built: Arc<AtomicU64>,
    stopped: Arc<AtomicU64>,
    on_start: OnStart,
}

impl Factory {
    fn new(on_start: OnStart) -> Self {
        Self {
            built: Arc::default(),
            stopped: Arc::default(),
            on_start,
        }
    }

    fn build(&self) -> Role {
        let instance = self.built.fetch_add(1, Ordering::SeqCst) + 1;
        Role {
            instance,
            on_start: self.on_start,
            stopped: Arc::clone(&self.stopped),
        }
    }

    fn into_fn(self) -> impl Fn() -> Role + Send + 'static {
        move || self.build()
    }
}

/// Records every event published to it.
struct AlertRecorder {
    events: mpsc::UnboundedSender<Event>,
}

impl Actor for AlertRecorder {
    type Context = Context<Self>;
}

impl Handler<Publish> for AlertRecorder {
    type Result = ();

    fn handle(&mut self, publish: Publish, _: &mut Context<Self>) {
        let _ = self.events.send(publish.event);
    }
}

fn alert_recorder() -> (EventSink, mpsc::UnboundedReceiver<Event>) {
    let (events, received) = mpsc::unbounded_channel();
    let recorder = AlertRecorder { events }.start();
    (EventSink::to(recorder.recipient()), received)
}

async fn next_alert(alerts: &mut mpsc::UnboundedReceiver<Event>) -> Event {
    let event = within("an alert", alerts.recv())
        .await
        .expect("the recorder is alive");
    assert_eq!(event.event_type, "system.alert");
    event
}

/// Crash the current instance with `kind`, wait until the next one is
/// running, and return the statistics at that moment.
async fn crash_and_wait_for_restart(
    role: &SupervisedRole<Role>,
    kind: FaultKind,
) -> SupervisionStats {
    within("a running instance", role.live())
        .await
        .expect("the role is open");
    let before = role.stats().instances;
    role.do_send(InjectFault { kind })
        .expect("the role is running");
    within(
        "the restart",
        role.wait_for(|stats| stats.instances > before && stats.state == RoleState::Running),
    )
    .await
}

/// Check the latest restart against `policy`: the drawn delay lies within
/// the jitter bounds of `attempt`, and the new instance started no earlier
/// than that delay after the crash was seen, and not much later.
///
/// Measured from the moment the supervisor saw the crash, not from the
/// injection: before the crash is visible the panic hook runs, and with
/// `RUST_BACKTRACE=1` the first backtrace of a debug binary can take
/// hundreds of milliseconds to print.
fn assert_on_schedule(policy: &BackoffPolicy, attempt: u32, stats: &SupervisionStats) {
    let drawn = stats.last_delay.expect("a restart happened");
    let (shortest, longest) = policy.delay_bounds(attempt);
    assert!(
        (shortest..=longest).contains(&drawn),
        "attempt {attempt}: drawn delay {drawn:?} outside {shortest:?}..={longest:?}"
    );
    let crashed_at = stats.last_crash_at.expect("the crash was seen");
    let took = stats.running_since.expect("an instance runs") - crashed_at;
    assert!(
        took >= drawn,
        "attempt {attempt}: restarted {took:?} after the crash, before its delay {drawn:?}"
    );
    assert!(
        took <= drawn + LATENESS,
        "attempt {attempt}: restarted {took:?} after the crash, delay was {drawn:?}"
    );
}

/// What the supervisor relies on, checked on actix alone: a panicking
/// handler ends its actor's task with `JoinError::Panic` carrying the
/// message, the mailbox closes at once (queued and later sends fail with
/// `Closed` instead of hanging), and the arbiter carries on.
#[actix_rt::test]
async fn actix_reports_a_handler_panic_through_the_task_and_closes_the_mailbox() {
    let factory = Factory::new(OnStart::Nothing);
    let context = Context::<Role>::new();
    let addr = context.address();
    let task = actix::spawn(context.into_future(factory.build()));
    assert_eq!(
        within("a reply", addr.send(WhoAreYou))
            .await
            .unwrap()
            .instance,
        1
    );

    addr.do_send(InjectFault {
        kind: FaultKind::Panic,
    });
    let queued = addr.send(WhoAreYou);
    let outcome = within("the task's end", task).await;

    let panic = outcome.expect_err("a panic ends the task with an error");
    assert!(panic.is_panic());
    assert_eq!(
        panic
            .into_panic()
            .downcast_ref::<String>()
            .map(String::as_str),
        Some(INJECTED_PANIC)
    );
    assert!(!addr.connected());
    assert!(matches!(
        within("the queued message", queued).await,
        Err(MailboxError::Closed)
    ));
    assert!(matches!(
        within("a later message", addr.send(WhoAreYou)).await,
        Err(MailboxError::Closed)
    ));
    assert_eq!(
        within("a bystander", Bystander.start().send(Ping))
            .await
            .unwrap(),
        1
    );
}

#[actix_rt::test]
async fn a_panicking_role_comes_back_after_each_scheduled_delay() {
    let policy = fast_policy();
    let (alerts, mut received) = alert_recorder();
    let role = supervise(
        "router",
        policy.clone(),
        Factory::new(OnStart::Nothing).into_fn(),
        SupervisorOptions::new().alerts(alerts),
    );
    assert_eq!(
        within("the first reply", role.send(WhoAreYou))
            .await
            .unwrap()
            .instance,
        1
    );

    for attempt in 1..=4 {
        let stats = crash_and_wait_for_restart(&role, FaultKind::Panic).await;
        assert_eq!(stats.attempt, attempt);
        assert_eq!(stats.restarts, u64::from(attempt));
        assert_on_schedule(&policy, attempt, &stats);
        let identity = within("a reply", role.send(WhoAreYou)).await.unwrap();
        assert_eq!(identity.instance, u64::from(attempt) + 1);

        let alert = next_alert(&mut received).await;
        assert_eq!(alert.data["role"], "router");
        assert_eq!(alert.data["attempt"], attempt);
        assert_eq!(
            alert.data["delay_ms"],
            stats.last_delay.unwrap().as_millis() as u64
        );
        assert_eq!(alert.data["reason"], "panic");
        assert_eq!(alert.data["gave_up"], false);
        assert!(alert.data["error"]
            .as_str()
            .unwrap()
            .contains(INJECTED_PANIC));
    }
    let crash = role.stats().last_crash.unwrap();
    assert_eq!(
        crash,
        CrashReason::Panicked {
            message: INJECTED_PANIC.to_string()
        }
    );
}

#[actix_rt::test]
async fn a_role_that_stops_itself_is_restarted_like_a_crash() {
    let policy = fast_policy();
    let (alerts, mut received) = alert_recorder();
    let factory = Factory::new(OnStart::Nothing);
    let stopped = Arc::clone(&factory.stopped);
    let role = supervise(
        "publisher",
        policy.clone(),
        factory.into_fn(),
        SupervisorOptions::new().alerts(alerts),
    );

    let stats = crash_and_wait_for_restart(&role, FaultKind::Stop).await;
    assert_eq!(stats.last_crash, Some(CrashReason::Stopped));
    assert_on_schedule(&policy, 1, &stats);
    assert_eq!(
        stopped.load(Ordering::SeqCst),
        1,
        "a stop runs the actor's stopped hook"
    );
    assert_eq!(next_alert(&mut received).await.data["reason"], "stop");
    assert_eq!(
        within("a reply", role.send(WhoAreYou))
            .await
            .unwrap()
            .instance,
        2
    );
}

#[actix_rt::test]
async fn a_panic_in_started_is_a_crash() {
    let role = supervise(
        "dispatcher",
        fast_policy(),
        Factory::new(OnStart::PanicWhileBuiltBelow(3)).into_fn(),
        SupervisorOptions::new(),
    );

    let identity = within("a reply from a healthy instance", async {
        loop {
            match role.send(WhoAreYou).await {
                Ok(identity) => break identity,
                Err(RoleSendError::Restarting(_) | RoleSendError::Lost) => {
                    role.live().await.unwrap();
                }
                Err(other) => panic!("unexpected {other}"),
            }
        }
    })
    .await;

    assert_eq!(identity.instance, 3);
    let stats = role.stats();
    assert_eq!(stats.restarts, 2);
    let expected = CrashReason::Panicked {
        message: "cannot start instance 2".to_string(),
    };
    assert_eq!(stats.last_crash, Some(expected));
}

#[actix_rt::test]
async fn a_panic_in_a_timer_callback_is_a_crash() {
    let policy = fast_policy();
    let role = supervise(
        "dead_letter",
        policy.clone(),
        Factory::new(OnStart::Nothing).into_fn(),
        SupervisorOptions::new(),
    );

    let stats = crash_and_wait_for_restart(&role, FaultKind::PanicInTimer).await;
    assert!(
        matches!(stats.last_crash, Some(CrashReason::Panicked { .. })),
        "{stats:?}"
    );
    assert_on_schedule(&policy, 1, &stats);
    assert_eq!(
        within("a reply", role.send(WhoAreYou))
            .await
            .unwrap()
            .instance,
        2
    );
}

#[actix_rt::test]
async fn the_role_is_given_up_when_its_restart_budget_runs_out() {
    let budget = RestartBudget {
        max_restarts: 2,
        window: Duration::from_secs(60),
    };
    let policy = BackoffPolicy {
        budget,
        ..fast_policy()
    };
    let (alerts, mut received) = alert_recorder();
    let (gave_up, mut give_ups) = mpsc::unbounded_channel::<GiveUp>();
    let options = SupervisorOptions::new()
        .alerts(alerts)
        .on_give_up(move |give_up| {
            let _ = gave_up.send(give_up.clone());
        });
    let role = supervise(
        "router",
        policy,
        Factory::new(OnStart::Nothing).into_fn(),
        options,
    );
    crash_and_wait_for_restart(&role, FaultKind::Panic).await;
    crash_and_wait_for_restart(&role, FaultKind::Stop).await;

    role.do_send(InjectFault {
        kind: FaultKind::Panic,
    })
    .unwrap();

    let give_up = within("the give-up callback", give_ups.recv())
        .await
        .unwrap();
    let reason = GiveUpReason::BudgetExhausted {
        restarts: 2,
        window: Duration::from_secs(60),
    };
    assert_eq!(give_up.role, "router");
    assert_eq!(give_up.reason, reason);
    assert_eq!(give_up.restarts, 2);
    assert!(matches!(give_up.last_crash, CrashReason::Panicked { .. }));

    let final_stats = within("termination", role.terminated()).await;
    assert_eq!(final_stats.state, RoleState::GaveUp);
    assert!(final_stats.gave_up());
    assert_eq!(final_stats.give_up_reason, Some(reason));
    assert_eq!(final_stats.instances, 3);

    let alerts: Vec<Value> = [
        next_alert(&mut received).await,
        next_alert(&mut received).await,
        next_alert(&mut received).await,
    ]
    .map(|event| Value::Object(event.data))
    .to_vec();
    assert_eq!(alerts[0]["gave_up"], false);
    assert_eq!(alerts[1]["reason"], "stop");
    assert_eq!(alerts[2]["gave_up"], true);
    assert_eq!(alerts[2]["role"], "router");
    assert_eq!(alerts[2]["reason"], "panic");
    assert!(alerts[2]["give_up_reason"]
        .as_str()
        .unwrap()
        .contains("budget exhausted"));

    match role.send(WhoAreYou).await {
        Err(err @ RoleSendError::GaveUp(_)) => {
            assert!(err.is_closed());
            assert!(err.into_message().is_some(), "the message is handed back");
        }
        other => panic!("expected GaveUp, got {:?}", other.map(|_| ())),
    }
    assert!(role.addr().is_none());
    assert!(role.live().await.is_err());
    assert!(give_ups.try_recv().is_err(), "the callback runs once");
}

#[actix_rt::test]
async fn a_message_to_a_crashed_instance_gets_a_clear_error_instead_of_hanging() {
    let policy = BackoffPolicy {
        base: Duration::from_millis(300),
        ..fast_policy()
    };
    let role = supervise(
        "router",
        policy,
        Factory::new(OnStart::Nothing).into_fn(),
        SupervisorOptions::new(),
    );
    let old_addr = within("the first instance", role.live()).await.unwrap();

    // Queued behind the fault, in the same mailbox: it dies with it.
    role.do_send(InjectFault {
        kind: FaultKind::Panic,
    })
    .unwrap();
    let queued = within("the queued message's fate", role.send(WhoAreYou)).await;
    assert!(
        matches!(queued, Err(RoleSendError::Lost)),
        "{:?}",
        queued.map(|_| ())
    );

    // While the restart is pending, the handle refuses at once and hands
    // the message back, and the dead address fails rather than hangs.
    within(
        "the crash to be seen",
        role.wait_for(|stats| stats.state == RoleState::Restarting),
    )
    .await;
    let refused = within("a refusal", role.send(WhoAreYou)).await;
    assert!(
        matches!(refused, Err(RoleSendError::Restarting(WhoAreYou))),
        "{:?}",
        refused.map(|_| ())
    );
    assert!(matches!(
        role.do_send(WhoAreYou),
        Err(RoleSendError::Restarting(_))
    ));
    assert!(matches!(
        role.try_send(WhoAreYou),
        Err(RoleSendError::Restarting(_))
    ));
    assert!(matches!(
        within("the old address", old_addr.send(WhoAreYou)).await,
        Err(MailboxError::Closed)
    ));

    let new_addr = within("the next instance", role.live()).await.unwrap();
    assert_eq!(
        within("a reply", new_addr.send(WhoAreYou))
            .await
            .unwrap()
            .instance,
        2
    );
}

#[derive(Message)]
#[rtype(result = "u32")]
struct Ping;

struct Bystander;

impl Actor for Bystander {
    type Context = Context<Self>;
}

impl Handler<Ping> for Bystander {
    type Result = u32;

    fn handle(&mut self, _: Ping, _: &mut Context<Self>) -> u32 {
        1
    }
}

#[actix_rt::test]
async fn other_actors_keep_answering_while_a_role_crashes() {
    let bystander = Bystander.start();
    let role = supervise(
        "router",
        fast_policy(),
        Factory::new(OnStart::Nothing).into_fn(),
        SupervisorOptions::new(),
    );

    for kind in [
        FaultKind::Panic,
        FaultKind::PanicInTimer,
        FaultKind::Stop,
        FaultKind::Panic,
    ] {
        within("a running instance", role.live()).await.unwrap();
        let before = role.stats().instances;
        role.do_send(InjectFault { kind }).unwrap();
        let restarted = role.wait_for(|stats| stats.instances > before);
        tokio::pin!(restarted);
        let mut answers = 0;
        within("the restart, pinging the bystander meanwhile", async {
            loop {
                tokio::select! {
                    _ = &mut restarted => break,
                    reply = bystander.send(Ping) => {
                        assert_eq!(reply.unwrap(), 1);
                        answers += 1;
                    }
                }
            }
        })
        .await;
        assert!(answers > 0, "{kind:?}: the bystander was never asked");
    }
    assert_eq!(role.stats().restarts, 4);
}

#[actix_rt::test]
async fn shutdown_stops_the_role_gracefully_and_does_not_restart_it() {
    let (alerts, mut received) = alert_recorder();
    let factory = Factory::new(OnStart::Nothing);
    let (built, stopped) = (Arc::clone(&factory.built), Arc::clone(&factory.stopped));
    let role = supervise(
        "router",
        fast_policy(),
        factory.into_fn(),
        SupervisorOptions::new().alerts(alerts),
    );
    within("the first instance", role.live()).await.unwrap();

    role.shutdown();
    let stats = within("termination", role.terminated()).await;

    assert_eq!(stats.state, RoleState::ShutDown);
    assert_eq!(stats.restarts, 0);
    assert_eq!(
        stopped.load(Ordering::SeqCst),
        1,
        "stopping and stopped hooks ran"
    );
    assert_eq!(built.load(Ordering::SeqCst), 1);
    assert!(matches!(
        role.send(WhoAreYou).await,
        Err(RoleSendError::ShutDown(_))
    ));
    assert!(received.try_recv().is_err(), "a shutdown raises no alert");
}

#[actix_rt::test]
async fn shutdown_during_a_pending_restart_cancels_it() {
    let policy = BackoffPolicy {
        base: Duration::from_secs(30),
        cap: Duration::from_secs(30),
        ..fast_policy()
    };
    let factory = Factory::new(OnStart::Nothing);
    let built = Arc::clone(&factory.built);
    let role = supervise(
        "router",
        policy,
        factory.into_fn(),
        SupervisorOptions::new(),
    );
    role.do_send(InjectFault {
        kind: FaultKind::Panic,
    })
    .unwrap();
    within(
        "the crash to be seen",
        role.wait_for(|stats| stats.state == RoleState::Restarting),
    )
    .await;

    role.shutdown();

    let stats = within("termination", role.terminated()).await;
    assert_eq!(stats.state, RoleState::ShutDown);
    assert_eq!(built.load(Ordering::SeqCst), 1);
}

#[actix_rt::test]
async fn a_role_that_ignores_the_stop_request_is_aborted_after_the_stop_timeout() {
    let options = SupervisorOptions::new().stop_timeout(Duration::from_millis(100));
    let role = supervise(
        "router",
        fast_policy(),
        Factory::new(OnStart::IgnoreStop).into_fn(),
        options,
    );
    let addr = within("the first instance", role.live()).await.unwrap();

    role.shutdown();

    let stats = within("termination", role.terminated()).await;
    assert_eq!(stats.state, RoleState::ShutDown);
    assert!(!addr.connected());
}

#[actix_rt::test]
async fn messages_sent_before_the_first_start_are_queued_not_refused() {
    let role = supervise(
        "router",
        fast_policy(),
        Factory::new(OnStart::Nothing).into_fn(),
        SupervisorOptions::new(),
    );

    // No await between `supervise` and `send`: the supervisor has not run.
    assert_eq!(role.state(), RoleState::Starting);
    let reply = role.send(WhoAreYou);

    assert_eq!(within("a reply", reply).await.unwrap().instance, 1);
}

#[actix_rt::test]
async fn a_panicking_factory_is_a_crash_not_a_dead_supervisor() {
    let built = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&built);
    let factory = move || {
        let instance = counter.fetch_add(1, Ordering::SeqCst) + 1;
        assert!(instance > 1, "no configuration yet");
        Role {
            instance,
            on_start: OnStart::Nothing,
            stopped: Arc::default(),
        }
    };

    let role = supervise("router", fast_policy(), factory, SupervisorOptions::new());

    let addr = within("a healthy instance", role.live()).await.unwrap();
    assert_eq!(
        within("a reply", addr.send(WhoAreYou))
            .await
            .unwrap()
            .instance,
        2
    );
    let stats = role.stats();
    assert_eq!(stats.restarts, 1);
    match stats.last_crash {
        Some(CrashReason::Panicked { message }) => {
            assert!(message.contains("no configuration yet"), "{message}")
        }
        other => panic!("expected a panic, got {other:?}"),
    }
}

#[actix_rt::test]
async fn a_stable_run_resets_the_restart_delay() {
    let policy = BackoffPolicy {
        reset_after: Duration::from_millis(300),
        ..fast_policy()
    };
    let role = supervise(
        "router",
        policy.clone(),
        Factory::new(OnStart::Nothing).into_fn(),
        SupervisorOptions::new(),
    );
    crash_and_wait_for_restart(&role, FaultKind::Panic).await;
    crash_and_wait_for_restart(&role, FaultKind::Panic).await;
    assert_eq!(role.stats().attempt, 2);

    // The scenario itself needs time to pass: the instance must run for
    // longer than `reset_after` before it crashes.
    actix_rt::time::sleep(policy.reset_after).await;
    let stats = crash_and_wait_for_restart(&role, FaultKind::Panic).await;
    assert_eq!(stats.attempt, 1);
    assert_eq!(stats.restarts, 3);
    assert_on_schedule(&policy, 1, &stats);
}

#[actix_rt::test]
async fn a_role_on_its_own_arbiter_is_restarted_there() {
    let arbiter = Arbiter::new();
    let options = SupervisorOptions::new().on_arbiter(arbiter.handle());
    let role = supervise(
        "router",
        fast_policy(),
        Factory::new(OnStart::Nothing).into_fn(),
        options,
    );
    let first = within("a reply", role.send(WhoAreYou)).await.unwrap();
    assert_ne!(first.thread, std::thread::current().id());

    crash_and_wait_for_restart(&role, FaultKind::Panic).await;

    let second = within("a reply", role.send(WhoAreYou)).await.unwrap();
    assert_eq!(second.instance, 2);
    assert_eq!(second.thread, first.thread);

    role.shutdown();
    assert_eq!(
        within("termination", role.terminated()).await.state,
        RoleState::ShutDown
    );
    arbiter.stop();
}

#[actix_rt::test]
async fn a_role_whose_arbiter_stops_is_closed() {
    let arbiter = Arbiter::new();
    let options = SupervisorOptions::new().on_arbiter(arbiter.handle());
    let role = supervise(
        "router",
        fast_policy(),
        Factory::new(OnStart::Nothing).into_fn(),
        options,
    );
    within("the first instance", role.live()).await.unwrap();

    arbiter.stop();

    let stats = within("termination", role.terminated()).await;
    assert_eq!(stats.state, RoleState::ArbiterStopped);
    assert!(matches!(
        role.send(WhoAreYou).await,
        Err(RoleSendError::ShutDown(_))
    ));
}

#[actix_rt::test]
async fn health_reports_restarts_the_delay_and_the_last_crash() {
    let role = supervise(
        "router",
        fast_policy(),
        Factory::new(OnStart::Nothing).into_fn(),
        SupervisorOptions::new(),
    );
    crash_and_wait_for_restart(&role, FaultKind::Stop).await;

    let health = role.health();

    let delay_ms = role.stats().last_delay.unwrap().as_millis() as u64;
    assert_eq!(health["role"], "router");
    assert_eq!(health["state"], "running");
    assert_eq!(health["instances"], 2);
    assert_eq!(health["restarts"], 1);
    assert_eq!(health["attempt"], 1);
    assert_eq!(health["last_delay_ms"], delay_ms);
    assert_eq!(health["current_delay_ms"], Value::Null);
    assert_eq!(health["gave_up"], false);
    assert_eq!(health["last_crash"]["kind"], "stop");
}
