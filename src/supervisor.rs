//! Supervision: a socket-role actor that crashes is started again on the
//! [`BackoffPolicy`] schedule, and given up loudly when its restart budget
//! runs out.
//!
//! actix's own `Supervisor` is not enough for the bus: it restarts an actor
//! that stops at once, with no delay and no limit, and it never sees a
//! panic. [`supervise`] runs the role instead, with a [`SupervisedRole`]
//! handle that always reaches the current instance.
//!
//! # How a crash is seen
//!
//! The supervisor builds each instance's context itself and spawns its
//! future with `actix_rt::spawn`, so it holds the task's `JoinHandle`. Checked
//! with actix 0.13.5 and tokio 1.54 (see `tests/supervision.rs`):
//!
//! - A panic in a handler, in `started`, in a `run_later` callback or in
//!   `stopping`/`stopped` unwinds out of that one task. Tokio catches it, so
//!   other actors on the same arbiter keep running, and the `JoinHandle`
//!   yields `JoinError::Panic` with the payload (a `&str` or a `String`).
//! - The context, and with it the mailbox, is dropped during that unwinding:
//!   `Addr::connected()` turns false at once, messages still queued are
//!   dropped, and every pending or later `send` fails with
//!   `MailboxError::Closed` rather than hanging.
//! - An actor that stops itself (`ctx.stop()`, say on a socket error) ends
//!   its task normally: the `JoinHandle` yields `Ok(())`.
//!
//! So the role needs no cooperation: any end of the task that the
//! supervisor did not ask for is a crash. To stop an instance on request
//! the supervisor spawns one small future into its context, which calls
//! `ctx.stop()` when [`SupervisedRole::shutdown`] is called; that stop is
//! routine, not a crash.
//!
//! # What happens on a crash
//!
//! The crash is logged (`error` for a panic, `warn` for an unasked stop,
//! with `role`, `attempt` and `delay_ms` as fields) and published as a
//! `system.alert` event through [`SupervisorOptions::alerts`]. After the
//! delay (an async timer; no thread sleeps) a fresh instance is built by the
//! factory and gets a fresh mailbox. While the role is restarting, sends
//! through the handle fail at once with [`RoleSendError::Restarting`].
//!
//! When the [`RestartTracker`] gives up, the give-up is logged at `warn`,
//! published with `"gave_up": true`, the handle is closed for good
//! ([`RoleSendError::GaveUp`]) and the [`SupervisorOptions::on_give_up`]
//! callback runs, so that the bus can exit when a required role is gone.
//!
//! # Example
//!
//! ```
//! use actix::prelude::*;
//! use dgbit_bus::backoff::BackoffPolicy;
//! use dgbit_bus::supervisor::{supervise, SupervisorOptions};
//!
//! struct Echo;
//! impl Actor for Echo {
//!     type Context = Context<Self>;
//! }
//! dgbit_bus::impl_inject_fault!(Echo);
//!
//! #[derive(Message)]
//! #[rtype(result = "u32")]
//! struct Twice(u32);
//! impl Handler<Twice> for Echo {
//!     type Result = u32;
//!     fn handle(&mut self, msg: Twice, _: &mut Context<Self>) -> u32 {
//!         msg.0 * 2
//!     }
//! }
//!
//! # actix::System::new().block_on(async {
//! let echo = supervise("echo", BackoffPolicy::default(), || Echo, SupervisorOptions::new());
//! assert_eq!(echo.send(Twice(21)).await.ok(), Some(42));
//! echo.shutdown();
//! echo.terminated().await;
//! # });
//! ```

use std::any::Any;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::dev::channel::{channel, AddressReceiver};
use actix::prelude::*;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::{JoinError, JoinHandle};
use tracing::{debug, error, info, warn};

use crate::backoff::{BackoffPolicy, Decision, GiveUpReason, RestartTracker};
use crate::message::EventSink;
use crate::wire::Event;

#[doc(hidden)]
pub use actix as __actix;

/// The topic crashes and give-ups are published on.
pub const ALERT_TOPIC: &str = crate::topics::SYSTEM_ALERT;
/// How long a role may take to stop after [`SupervisedRole::shutdown`]
/// before its task is aborted, unless [`SupervisorOptions::stop_timeout`]
/// says otherwise.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Capacity of each instance's mailbox, the same as actix's default; an
/// actor may change it in `started`.
pub const MAILBOX_CAPACITY: usize = 16;
/// The `source` of alert events unless [`SupervisorOptions::source`] says
/// otherwise.
pub const DEFAULT_ALERT_SOURCE: &str = "dgbit-bus";

/// Called once when a role is given up.
pub type GiveUpCallback = Arc<dyn Fn(&GiveUp) + Send + Sync>;

/// Where and how [`supervise`] runs a role.
#[derive(Clone)]
pub struct SupervisorOptions {
    arbiter: Option<ArbiterHandle>,
    alerts: EventSink,
    source: String,
    on_give_up: Option<GiveUpCallback>,
    stop_timeout: Duration,
}

impl Default for SupervisorOptions {
    fn default() -> Self {
        Self {
            arbiter: None,
            alerts: EventSink::discard(),
            source: DEFAULT_ALERT_SOURCE.to_string(),
            on_give_up: None,
            stop_timeout: DEFAULT_STOP_TIMEOUT,
        }
    }
}

impl SupervisorOptions {
    /// Run on the current arbiter, publish no alerts, do nothing extra on
    /// give-up, allow [`DEFAULT_STOP_TIMEOUT`] for a stop.
    pub fn new() -> Self {
        Self::default()
    }

    /// Run the role, and the supervisor watching it, on `arbiter` instead
    /// of the current one.
    pub fn on_arbiter(mut self, arbiter: ArbiterHandle) -> Self {
        self.arbiter = Some(arbiter);
        self
    }

    /// Publish `system.alert` events for crashes and give-ups to `sink`.
    pub fn alerts(mut self, sink: EventSink) -> Self {
        self.alerts = sink;
        self
    }

    /// The `source` field of alert events.
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = source.into();
        self
    }

    /// Call `callback` once, on the role's arbiter, when the role is given
    /// up; the bus uses it to exit when a required role is gone.
    pub fn on_give_up(mut self, callback: impl Fn(&GiveUp) + Send + Sync + 'static) -> Self {
        self.on_give_up = Some(Arc::new(callback));
        self
    }

    /// How long a role may take to stop after a shutdown request before its
    /// task is aborted (its `stopped` hook then does not run).
    pub fn stop_timeout(mut self, timeout: Duration) -> Self {
        self.stop_timeout = timeout;
        self
    }
}

impl fmt::Debug for SupervisorOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SupervisorOptions")
            .field("arbiter", &self.arbiter.is_some())
            .field("alerts", &self.alerts)
            .field("source", &self.source)
            .field("on_give_up", &self.on_give_up.is_some())
            .field("stop_timeout", &self.stop_timeout)
            .finish()
    }
}

/// How an instance ended without being asked to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CrashReason {
    /// It panicked: in a handler, `started`, a timer callback, a stop hook,
    /// or in the factory while it was being built.
    Panicked { message: String },
    /// It stopped by itself, for example with `ctx.stop()` on a socket error.
    Stopped,
}

impl CrashReason {
    /// `"panic"` or `"stop"`, for logs and alerts.
    pub fn kind(&self) -> &'static str {
        match self {
            CrashReason::Panicked { .. } => "panic",
            CrashReason::Stopped => "stop",
        }
    }
}

impl fmt::Display for CrashReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CrashReason::Panicked { message } => write!(f, "panicked: {message}"),
            CrashReason::Stopped => f.write_str("stopped without being asked to"),
        }
    }
}

/// What the [`SupervisorOptions::on_give_up`] callback is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GiveUp {
    pub role: &'static str,
    pub reason: GiveUpReason,
    /// The crash that was not restarted.
    pub last_crash: CrashReason,
    /// Restarts made before giving up.
    pub restarts: u64,
}

/// Where a supervised role is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RoleState {
    /// The first instance has a mailbox but has not been started yet.
    Starting,
    Running,
    /// An instance crashed; the next one starts after the delay.
    Restarting,
    /// The restart budget ran out. Final.
    GaveUp,
    /// Stopped on request. Final.
    ShutDown,
    /// The arbiter or system running the role stopped under it. Final.
    ArbiterStopped,
}

impl RoleState {
    pub fn as_str(self) -> &'static str {
        match self {
            RoleState::Starting => "starting",
            RoleState::Running => "running",
            RoleState::Restarting => "restarting",
            RoleState::GaveUp => "gave_up",
            RoleState::ShutDown => "shut_down",
            RoleState::ArbiterStopped => "arbiter_stopped",
        }
    }

    /// Whether no instance will ever run again.
    pub fn is_closed(self) -> bool {
        matches!(
            self,
            RoleState::GaveUp | RoleState::ShutDown | RoleState::ArbiterStopped
        )
    }
}

impl fmt::Display for RoleState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A snapshot of one role's supervision, for `system.health` and tests.
#[derive(Debug, Clone, PartialEq)]
pub struct SupervisionStats {
    pub role: &'static str,
    pub state: RoleState,
    /// Instances started so far, the first included.
    pub instances: u64,
    /// Restarts scheduled so far.
    pub restarts: u64,
    /// Attempt number of the latest restart (1 after a stable run); 0
    /// before the first.
    pub attempt: u32,
    /// The delay being waited now, while [`RoleState::Restarting`].
    pub current_delay: Option<Duration>,
    /// The delay of the latest restart.
    pub last_delay: Option<Duration>,
    pub last_crash: Option<CrashReason>,
    /// When the supervisor saw the latest crash; the restart delay is
    /// counted from here.
    pub last_crash_at: Option<Instant>,
    /// When the current instance was started, while one runs.
    pub running_since: Option<Instant>,
    pub give_up_reason: Option<GiveUpReason>,
}

impl SupervisionStats {
    fn new(role: &'static str) -> Self {
        Self {
            role,
            state: RoleState::Starting,
            instances: 0,
            restarts: 0,
            attempt: 0,
            current_delay: None,
            last_delay: None,
            last_crash: None,
            last_crash_at: None,
            running_since: None,
            give_up_reason: None,
        }
    }

    pub fn gave_up(&self) -> bool {
        self.state == RoleState::GaveUp
    }

    /// The snapshot as one JSON object, durations in milliseconds;
    /// `uptime_ms` is the current instance's age at the time of the call.
    pub fn to_json(&self) -> Value {
        json!({
            "role": self.role,
            "state": self.state.as_str(),
            "uptime_ms": self.running_since.map(|since| millis(since.elapsed())),
            "instances": self.instances,
            "restarts": self.restarts,
            "attempt": self.attempt,
            "current_delay_ms": self.current_delay.map(millis),
            "last_delay_ms": self.last_delay.map(millis),
            "gave_up": self.gave_up(),
            "give_up_reason": self.give_up_reason.as_ref().map(ToString::to_string),
            "last_crash": self.last_crash.as_ref().map(|crash| json!({
                "kind": crash.kind(),
                "error": crash.to_string(),
            })),
        })
    }
}

/// Why a message could not be handed to a supervised role.
///
/// Every variant but [`Lost`](Self::Lost) hands the message back.
pub enum RoleSendError<M> {
    /// No instance is running right now: the role crashed and its restart
    /// is pending. Worth trying again later.
    Restarting(M),
    /// The role was given up after too many crashes. Final.
    GaveUp(M),
    /// The role was shut down, or its arbiter stopped. Final.
    ShutDown(M),
    /// The instance's mailbox is full (only from `try_send`).
    Full(M),
    /// The instance took the message but stopped before replying; the
    /// message is lost with it.
    Lost,
}

impl<M> RoleSendError<M> {
    /// The message, unless it was lost.
    pub fn into_message(self) -> Option<M> {
        match self {
            RoleSendError::Restarting(message)
            | RoleSendError::GaveUp(message)
            | RoleSendError::ShutDown(message)
            | RoleSendError::Full(message) => Some(message),
            RoleSendError::Lost => None,
        }
    }

    /// Whether the role will never take a message again.
    pub fn is_closed(&self) -> bool {
        matches!(self, RoleSendError::GaveUp(_) | RoleSendError::ShutDown(_))
    }

    fn describe(&self) -> &'static str {
        match self {
            RoleSendError::Restarting(_) => "the role is restarting after a crash",
            RoleSendError::GaveUp(_) => "the role was given up after too many crashes",
            RoleSendError::ShutDown(_) => "the role has shut down",
            RoleSendError::Full(_) => "the role's mailbox is full",
            RoleSendError::Lost => "the role stopped before replying; the message is lost",
        }
    }
}

impl<M> fmt::Debug for RoleSendError<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            RoleSendError::Restarting(_) => "Restarting",
            RoleSendError::GaveUp(_) => "GaveUp",
            RoleSendError::ShutDown(_) => "ShutDown",
            RoleSendError::Full(_) => "Full",
            RoleSendError::Lost => "Lost",
        };
        write!(f, "RoleSendError::{name}")
    }
}

impl<M> fmt::Display for RoleSendError<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

impl<M> std::error::Error for RoleSendError<M> {}

/// A supervised role will never run again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("role {role} is closed ({state})")]
pub struct RoleClosed {
    pub role: &'static str,
    pub state: RoleState,
}

/// What the handle and the supervisor share: the current instance and the
/// statistics in one watch channel, so that a reader never sees an address
/// and a state from different moments.
struct Shared<A: Actor> {
    status: watch::Sender<Status<A>>,
    shutdown: watch::Sender<bool>,
}

struct Status<A: Actor> {
    addr: Option<Addr<A>>,
    stats: SupervisionStats,
}

/// A handle on a supervised role that always reaches its current instance.
///
/// Cheap to clone. The role keeps running while the supervisor does, even
/// when every handle is dropped; only [`shutdown`](Self::shutdown), a
/// give-up or the end of its arbiter stop it.
pub struct SupervisedRole<A: Actor> {
    shared: Arc<Shared<A>>,
}

impl<A: Actor> Clone for SupervisedRole<A> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<A: Actor> fmt::Debug for SupervisedRole<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = self.shared.status.borrow();
        f.debug_struct("SupervisedRole")
            .field("role", &status.stats.role)
            .field("state", &status.stats.state)
            .finish()
    }
}

impl<A> SupervisedRole<A>
where
    A: Actor<Context = Context<A>>,
{
    pub fn role(&self) -> &'static str {
        self.shared.status.borrow().stats.role
    }

    /// The current instance's address, or `None` while none is alive.
    ///
    /// The address goes dead if that instance crashes; keep the handle, not
    /// the address, to reach whichever instance is current.
    pub fn addr(&self) -> Option<Addr<A>> {
        self.shared
            .status
            .borrow()
            .addr
            .clone()
            .filter(Addr::connected)
    }

    pub fn state(&self) -> RoleState {
        self.shared.status.borrow().stats.state
    }

    pub fn stats(&self) -> SupervisionStats {
        self.shared.status.borrow().stats.clone()
    }

    /// [`stats`](Self::stats) as JSON, for `system.health`.
    pub fn health(&self) -> Value {
        self.stats().to_json()
    }

    /// Wait until the statistics satisfy `condition` (checked at once, then
    /// after each change) and return them.
    ///
    /// # Cancellation safety
    ///
    /// Dropping the future loses nothing.
    pub async fn wait_for(
        &self,
        mut condition: impl FnMut(&SupervisionStats) -> bool,
    ) -> SupervisionStats {
        self.wait_status(|status| condition(&status.stats))
            .await
            .stats
    }

    /// Wait until an instance has been built and started, and return its
    /// address.
    ///
    /// # Errors
    ///
    /// [`RoleClosed`] when the role was given up or shut down, or its
    /// arbiter stopped.
    ///
    /// # Cancellation safety
    ///
    /// Dropping the future loses nothing.
    pub async fn live(&self) -> Result<Addr<A>, RoleClosed> {
        let status = self
            .wait_status(|status| {
                let running = status.stats.state == RoleState::Running;
                status.stats.state.is_closed()
                    || (running && status.addr.as_ref().is_some_and(Addr::connected))
            })
            .await;
        match status.addr {
            Some(addr) if !status.stats.state.is_closed() => Ok(addr),
            _ => Err(RoleClosed {
                role: status.stats.role,
                state: status.stats.state,
            }),
        }
    }

    /// Send `message` to the current instance and wait for its reply. Like
    /// `Addr::send`, this waits while the mailbox is full.
    ///
    /// # Errors
    ///
    /// [`RoleSendError::Restarting`] at once when no instance is alive,
    /// [`RoleSendError::GaveUp`] or [`RoleSendError::ShutDown`] when the role
    /// is closed, all three with the message; [`RoleSendError::Lost`] when
    /// the instance crashed or stopped before replying.
    ///
    /// # Cancellation safety
    ///
    /// Dropping the future after the message was queued does not take it
    /// back: the role still handles it and its reply is discarded.
    pub async fn send<M>(&self, message: M) -> Result<M::Result, RoleSendError<M>>
    where
        A: Handler<M>,
        M: Message + Send + 'static,
        M::Result: Send,
    {
        let addr = match self.current() {
            Ok(addr) => addr,
            Err(refusal) => return Err(refusal.with(message)),
        };
        addr.send(message)
            .await
            .map_err(|_closed| RoleSendError::Lost)
    }

    /// Queue `message` for the current instance without waiting, ignoring
    /// the mailbox capacity (as `Addr::do_send` does).
    ///
    /// A message queued in the instant between a crash and its detection
    /// dies with the crashed mailbox, like every message already queued
    /// there.
    ///
    /// # Errors
    ///
    /// [`RoleSendError::Restarting`], [`RoleSendError::GaveUp`] or
    /// [`RoleSendError::ShutDown`], with the message, when no instance is
    /// alive.
    pub fn do_send<M>(&self, message: M) -> Result<(), RoleSendError<M>>
    where
        A: Handler<M>,
        M: Message + Send + 'static,
        M::Result: Send,
    {
        match self.current() {
            Ok(addr) => {
                addr.do_send(message);
                Ok(())
            }
            Err(refusal) => Err(refusal.with(message)),
        }
    }

    /// Queue `message` for the current instance unless its mailbox is full.
    ///
    /// # Errors
    ///
    /// [`RoleSendError::Full`] when the mailbox is full; otherwise as
    /// [`do_send`](Self::do_send). The message is always handed back.
    pub fn try_send<M>(&self, message: M) -> Result<(), RoleSendError<M>>
    where
        A: Handler<M>,
        M: Message + Send + 'static,
        M::Result: Send,
    {
        let addr = match self.current() {
            Ok(addr) => addr,
            Err(refusal) => return Err(refusal.with(message)),
        };
        addr.try_send(message).map_err(|err| match err {
            SendError::Full(message) => RoleSendError::Full(message),
            SendError::Closed(message) => RoleSendError::Restarting(message),
        })
    }

    /// Stop the role for good: the current instance is asked to stop
    /// (its `stopping` and `stopped` hooks run) and is not restarted; a
    /// pending restart is cancelled. Does nothing once the role is closed.
    /// Wait with [`terminated`](Self::terminated).
    pub fn shutdown(&self) {
        self.shared.shutdown.send_replace(true);
    }

    /// Wait until the role is closed for good (given up, shut down, or its
    /// arbiter stopped) and return the final statistics.
    pub async fn terminated(&self) -> SupervisionStats {
        self.wait_for(|stats| stats.state.is_closed()).await
    }

    fn current(&self) -> Result<Addr<A>, Refusal> {
        let status = self.shared.status.borrow();
        match status.stats.state {
            RoleState::GaveUp => Err(Refusal::GaveUp),
            RoleState::ShutDown | RoleState::ArbiterStopped => Err(Refusal::ShutDown),
            RoleState::Starting | RoleState::Running | RoleState::Restarting => status
                .addr
                .clone()
                .filter(Addr::connected)
                .ok_or(Refusal::Restarting),
        }
    }

    async fn wait_status(&self, mut condition: impl FnMut(&Status<A>) -> bool) -> Status<A> {
        let mut receiver = self.shared.status.subscribe();
        // The sender lives in `shared`, which `self` holds, so the channel
        // cannot close while we wait.
        let seen = receiver
            .wait_for(|status| condition(status))
            .await
            .map(|status| status.clone());
        seen.unwrap_or_else(|_closed| receiver.borrow().clone())
    }
}

// Written out: a derived `Clone` would require `A: Clone`.
impl<A: Actor> Clone for Status<A> {
    fn clone(&self) -> Self {
        Status {
            addr: self.addr.clone(),
            stats: self.stats.clone(),
        }
    }
}

/// Why the handle refused a message before trying to deliver it.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    Restarting,
    GaveUp,
    ShutDown,
}

impl Refusal {
    fn with<M>(self, message: M) -> RoleSendError<M> {
        match self {
            Refusal::Restarting => RoleSendError::Restarting(message),
            Refusal::GaveUp => RoleSendError::GaveUp(message),
            Refusal::ShutDown => RoleSendError::ShutDown(message),
        }
    }
}

/// Run the actor built by `factory` as the role `role`, restarting it after
/// each crash on the schedule of `policy`, and return a handle to it.
///
/// The first instance's mailbox exists when this returns, so messages sent
/// at once are queued, not refused. The factory runs on the role's arbiter
/// for every instance; it should capture whatever must survive a crash
/// (configuration, shared stores) and build everything else afresh.
///
/// # Panics
///
/// Without [`SupervisorOptions::on_arbiter`], when called outside a running
/// actix system (as `actix::spawn` does).
pub fn supervise<A, F>(
    role: &'static str,
    policy: BackoffPolicy,
    factory: F,
    options: SupervisorOptions,
) -> SupervisedRole<A>
where
    A: Actor<Context = Context<A>>,
    F: Fn() -> A + Send + 'static,
{
    let (first_sender, first_mailbox) = channel::<A>(MAILBOX_CAPACITY);
    let (status, _) = watch::channel(Status {
        addr: Some(Addr::new(first_sender)),
        stats: SupervisionStats::new(role),
    });
    let (shutdown, shutdown_requests) = watch::channel(false);
    let shared = Arc::new(Shared { status, shutdown });

    let arbiter = options.arbiter.clone();
    let supervisor = Supervisor {
        role,
        factory,
        tracker: RestartTracker::new(policy),
        options,
        shutdown_requests,
        closer: CloseOnDrop {
            shared: Arc::clone(&shared),
        },
    };
    let start = move || {
        actix::spawn(supervisor.run(first_mailbox));
    };
    match arbiter {
        // A refused closure is dropped with the supervisor in it, and its
        // `CloseOnDrop` marks the role closed.
        Some(arbiter) => {
            arbiter.spawn_fn(start);
        }
        None => start(),
    }
    SupervisedRole { shared }
}

/// How one instance's task ended.
enum Exit {
    Crashed(CrashReason),
    ShutDown,
    /// The runtime dropped the task: the arbiter is going away.
    Cancelled,
}

/// The loop that owns a role: it runs on the role's arbiter as a local task.
struct Supervisor<A: Actor, F> {
    role: &'static str,
    factory: F,
    tracker: RestartTracker,
    options: SupervisorOptions,
    shutdown_requests: watch::Receiver<bool>,
    closer: CloseOnDrop<A>,
}

impl<A, F> Supervisor<A, F>
where
    A: Actor<Context = Context<A>>,
    F: Fn() -> A,
{
    async fn run(mut self, first_mailbox: AddressReceiver<A>) {
        let mut rng = StdRng::from_entropy();
        let mut mailbox = Some(first_mailbox);
        loop {
            if *self.shutdown_requests.borrow() {
                return self.close(RoleState::ShutDown);
            }
            let mailbox = mailbox.take().unwrap_or_else(|| self.fresh_mailbox());

            let crash = match self.run_instance(mailbox).await {
                Exit::Crashed(crash) => crash,
                Exit::ShutDown => {
                    debug!(role = self.role, "role stopped on request");
                    return self.close(RoleState::ShutDown);
                }
                Exit::Cancelled => return,
            };

            let crashed_at = Instant::now();
            self.update(|status| {
                status.addr = None;
                status.stats.last_crash = Some(crash.clone());
                status.stats.last_crash_at = Some(crashed_at);
                status.stats.running_since = None;
            });

            match self.tracker.on_crash(crashed_at, &mut rng) {
                Decision::Restart { attempt, delay } => {
                    self.report_restart(&crash, attempt, delay);
                    if !self.wait_unless_shutdown(delay).await {
                        debug!(role = self.role, "pending restart cancelled by shutdown");
                        return self.close(RoleState::ShutDown);
                    }
                    info!(role = self.role, attempt, "role restarting");
                }
                Decision::GiveUp(reason) => return self.give_up(crash, reason),
            }
        }
    }

    /// Build an instance on `mailbox`, run it, and wait for its end.
    async fn run_instance(&mut self, mailbox: AddressReceiver<A>) -> Exit {
        self.tracker.on_start(Instant::now());
        let actor = match catch_unwind(AssertUnwindSafe(&self.factory)) {
            Ok(actor) => actor,
            Err(payload) => {
                let message = format!("in the factory: {}", panic_message(&*payload));
                return Exit::Crashed(CrashReason::Panicked { message });
            }
        };

        let mut context = Context::with_receiver(mailbox);
        context.spawn(stop_on_request(self.shutdown_requests.clone()));
        let mut task = actix::spawn(context.into_future(actor));
        self.update(|status| {
            status.stats.state = RoleState::Running;
            status.stats.instances += 1;
            status.stats.current_delay = None;
            status.stats.running_since = Some(Instant::now());
        });

        let exit = tokio::select! {
            outcome = &mut task => exit_of(outcome),
            _ = shutdown_requested(&mut self.shutdown_requests) => {
                self.stop_within_timeout(&mut task).await;
                Exit::ShutDown
            }
        };
        // A crash racing a shutdown request is still a shutdown.
        match exit {
            Exit::Crashed(_) if *self.shutdown_requests.borrow() => Exit::ShutDown,
            exit => exit,
        }
    }

    /// Wait for an instance asked to stop; abort it if it takes too long.
    async fn stop_within_timeout(&self, task: &mut JoinHandle<()>) {
        let limit = self.options.stop_timeout;
        match actix_rt::time::timeout(limit, &mut *task).await {
            Ok(Err(err)) if err.is_panic() => {
                let panic = panic_message(&*err.into_panic());
                error!(role = self.role, panic, "role panicked while stopping");
            }
            Ok(_) => {}
            Err(_elapsed) => {
                warn!(
                    role = self.role,
                    timeout_ms = millis(limit),
                    "role did not stop in time; aborting it"
                );
                task.abort();
                let _ = task.await;
            }
        }
    }

    /// Sleep for `delay`; false when a shutdown request cut it short.
    async fn wait_unless_shutdown(&mut self, delay: Duration) -> bool {
        tokio::select! {
            () = actix_rt::time::sleep(delay) => !*self.shutdown_requests.borrow(),
            _ = shutdown_requested(&mut self.shutdown_requests) => false,
        }
    }

    /// A mailbox for the next instance, published at once so that the
    /// handle can queue messages for it.
    fn fresh_mailbox(&self) -> AddressReceiver<A> {
        let (sender, mailbox) = channel::<A>(MAILBOX_CAPACITY);
        self.update(|status| status.addr = Some(Addr::new(sender)));
        mailbox
    }

    fn report_restart(&self, crash: &CrashReason, attempt: u32, delay: Duration) {
        let (role, delay_ms) = (self.role, millis(delay));
        match crash {
            CrashReason::Panicked { message } => {
                let panic = message.as_str();
                error!(
                    role,
                    attempt, delay_ms, panic, "role panicked; restart scheduled"
                );
            }
            CrashReason::Stopped => {
                warn!(
                    role,
                    attempt, delay_ms, "role stopped unasked; restart scheduled"
                );
            }
        }

        self.update(|status| {
            let stats = &mut status.stats;
            stats.state = RoleState::Restarting;
            stats.restarts += 1;
            stats.attempt = attempt;
            stats.current_delay = Some(delay);
            stats.last_delay = Some(delay);
        });

        self.alert(json!({
            "role": role,
            "attempt": attempt,
            "delay_ms": delay_ms,
            "reason": crash.kind(),
            "error": crash.to_string(),
            "gave_up": false,
        }));
    }

    fn give_up(&self, crash: CrashReason, reason: GiveUpReason) {
        let role = self.role;
        if let CrashReason::Panicked { message } = &crash {
            error!(role, panic = %message, "role panicked");
        }
        let restarts = self.closer.shared.status.borrow().stats.restarts;
        warn!(role, restarts, reason = %reason, crash = crash.kind(), "role given up");

        self.update(|status| status.stats.give_up_reason = Some(reason.clone()));
        self.close(RoleState::GaveUp);

        self.alert(json!({
            "role": role,
            "reason": crash.kind(),
            "error": crash.to_string(),
            "gave_up": true,
            "give_up_reason": reason.to_string(),
            "restarts": restarts,
        }));
        if let Some(callback) = &self.options.on_give_up {
            callback(&GiveUp {
                role,
                reason,
                last_crash: crash,
                restarts,
            });
        }
    }

    fn close(&self, state: RoleState) {
        self.closer.close(state);
    }

    fn alert(&self, data: Value) {
        let event = Event::new(ALERT_TOPIC, self.options.source.clone(), data);
        self.options.alerts.publish(event);
    }

    fn update(&self, change: impl FnOnce(&mut Status<A>)) {
        self.closer.shared.status.send_modify(change);
    }
}

/// Marks the role closed when the supervisor goes away without having
/// closed it, which happens when its arbiter or the system stops.
struct CloseOnDrop<A: Actor> {
    shared: Arc<Shared<A>>,
}

impl<A: Actor> CloseOnDrop<A> {
    fn close(&self, state: RoleState) {
        self.shared.status.send_if_modified(|status| {
            if status.stats.state.is_closed() {
                return false;
            }
            status.addr = None;
            status.stats.state = state;
            status.stats.current_delay = None;
            status.stats.running_since = None;
            true
        });
    }
}

impl<A: Actor> Drop for CloseOnDrop<A> {
    fn drop(&mut self) {
        if !self.shared.status.borrow().stats.state.is_closed() {
            let role = self.shared.status.borrow().stats.role;
            debug!(role, "role's arbiter stopped");
            self.close(RoleState::ArbiterStopped);
        }
    }
}

/// Resolves once shutdown is requested (or, never in practice, when the
/// handle side is gone).
async fn shutdown_requested(requests: &mut watch::Receiver<bool>) {
    let _ = requests.wait_for(|asked| *asked).await;
}

/// A future living in the instance's context that stops it when shutdown
/// is requested. Being inside the context, it dies with a crashed instance.
fn stop_on_request<A>(mut requests: watch::Receiver<bool>) -> impl ActorFuture<A, Output = ()>
where
    A: Actor<Context = Context<A>>,
{
    let asked = async move { requests.wait_for(|asked| *asked).await.is_ok() };
    actix::fut::wrap_future::<_, A>(asked).map(|asked, _actor, context: &mut Context<A>| {
        if asked {
            context.stop();
        }
    })
}

fn exit_of(outcome: Result<(), JoinError>) -> Exit {
    match outcome {
        Ok(()) => Exit::Crashed(CrashReason::Stopped),
        Err(err) if err.is_panic() => Exit::Crashed(CrashReason::Panicked {
            message: panic_message(&*err.into_panic()),
        }),
        Err(_) => Exit::Cancelled,
    }
}

/// The text of a panic payload: `panic!` with a literal gives a `&str`,
/// with formatting a `String`.
fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_string()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "a panic without a message".to_string()
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// **For tests only**: makes the actor that receives it crash, so that a
/// test can check that the role is restarted. Roles implement it with
/// [`impl_inject_fault!`](crate::impl_inject_fault); nothing in the bus
/// sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Message)]
#[rtype(result = "()")]
pub struct InjectFault {
    pub kind: FaultKind,
}

/// The crash [`InjectFault`] causes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// Panic inside the handler.
    Panic,
    /// Stop the actor as if it had hit a fatal error (`ctx.stop()`).
    Stop,
    /// Panic in a timer callback just after the handler returns.
    PanicInTimer,
}

/// The panic message of an injected fault.
pub const INJECTED_PANIC: &str = "fault injected by InjectFault";

/// Apply `kind` to the actor whose context is `context`: the body of every
/// `Handler<InjectFault>`.
///
/// # Panics
///
/// On purpose, with [`INJECTED_PANIC`], for [`FaultKind::Panic`] (at once)
/// and [`FaultKind::PanicInTimer`] (in the timer callback).
pub fn apply_fault<A>(kind: FaultKind, context: &mut Context<A>)
where
    A: Actor<Context = Context<A>>,
{
    match kind {
        FaultKind::Panic => panic!("{INJECTED_PANIC}"),
        FaultKind::Stop => context.stop(),
        FaultKind::PanicInTimer => {
            context.run_later(Duration::ZERO, |_actor, _context| {
                panic!("{INJECTED_PANIC}")
            });
        }
    }
}

/// Implement `Handler<InjectFault>` for a role actor in one line, **for
/// tests**: `dgbit_bus::impl_inject_fault!(CommandRouter);`.
#[macro_export]
macro_rules! impl_inject_fault {
    ($role:ty) => {
        impl $crate::supervisor::__actix::Handler<$crate::supervisor::InjectFault> for $role {
            type Result = ();

            fn handle(
                &mut self,
                fault: $crate::supervisor::InjectFault,
                context: &mut Self::Context,
            ) {
                $crate::supervisor::apply_fault(fault.kind, context);
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backoff::RestartBudget;

    struct Counter {
        count: u32,
    }

    impl Actor for Counter {
        type Context = Context<Self>;
    }

    #[derive(Message)]
    #[rtype(result = "u32")]
    struct Increment;

    impl Handler<Increment> for Counter {
        type Result = u32;

        fn handle(&mut self, _: Increment, _: &mut Context<Self>) -> u32 {
            self.count += 1;
            self.count
        }
    }

    crate::impl_inject_fault!(Counter);

    fn quick_policy() -> BackoffPolicy {
        BackoffPolicy {
            base: Duration::from_millis(10),
            jitter: 0.0,
            budget: RestartBudget {
                max_restarts: 5,
                window: Duration::from_secs(60),
            },
            ..BackoffPolicy::default()
        }
    }

    async fn bounded<T>(future: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(5), future)
            .await
            .expect("done within 5 s")
    }

    #[test]
    fn a_panic_message_is_read_from_str_and_string_payloads() {
        let literal: Box<dyn Any + Send> = Box::new("literal");
        let formatted: Box<dyn Any + Send> = Box::new(format!("formatted {}", 1));
        let other: Box<dyn Any + Send> = Box::new(7_u8);

        assert_eq!(panic_message(&*literal), "literal");
        assert_eq!(panic_message(&*formatted), "formatted 1");
        assert_eq!(panic_message(&*other), "a panic without a message");
    }

    #[test]
    fn every_send_error_but_lost_hands_the_message_back() {
        let handed_back = [
            RoleSendError::Restarting(1),
            RoleSendError::GaveUp(2),
            RoleSendError::ShutDown(3),
            RoleSendError::Full(4),
        ]
        .map(RoleSendError::into_message);

        assert_eq!(handed_back, [Some(1), Some(2), Some(3), Some(4)]);
        assert_eq!(RoleSendError::<u8>::Lost.into_message(), None);
    }

    #[test]
    fn only_a_given_up_or_shut_down_role_refuses_for_good() {
        assert!(!RoleSendError::Restarting(()).is_closed());
        assert!(!RoleSendError::Full(()).is_closed());
        assert!(RoleSendError::GaveUp(()).is_closed());
        assert!(RoleSendError::ShutDown(()).is_closed());
        let text = RoleSendError::Restarting(()).to_string();
        assert!(text.contains("restarting"), "{text}");
    }

    #[test]
    fn the_closed_states_are_exactly_the_final_ones() {
        let closed: Vec<RoleState> = [
            RoleState::Starting,
            RoleState::Running,
            RoleState::Restarting,
            RoleState::GaveUp,
            RoleState::ShutDown,
            RoleState::ArbiterStopped,
        ]
        .into_iter()
        .filter(|state| state.is_closed())
        .collect();

        assert_eq!(
            closed,
            [
                RoleState::GaveUp,
                RoleState::ShutDown,
                RoleState::ArbiterStopped
            ]
        );
    }

    #[test]
    fn fresh_stats_serialise_with_every_field_and_nulls() {
        let json = SupervisionStats::new("router").to_json();

        assert_eq!(
            json,
            json!({
                "role": "router",
                "state": "starting",
                "uptime_ms": null,
                "instances": 0,
                "restarts": 0,
                "attempt": 0,
                "current_delay_ms": null,
                "last_delay_ms": null,
                "gave_up": false,
                "give_up_reason": null,
                "last_crash": null,
            })
        );
    }

    #[test]
    fn a_crash_reason_reads_as_text() {
        let panic = CrashReason::Panicked {
            message: "boom".into(),
        };

        assert_eq!(panic.to_string(), "panicked: boom");
        assert_eq!(panic.kind(), "panic");
        assert_eq!(CrashReason::Stopped.kind(), "stop");
    }

    #[actix_rt::test]
    async fn a_task_that_ends_is_a_stop_and_one_that_panics_keeps_its_message() {
        let ended = actix::spawn(async {});
        let panicked = actix::spawn(async { panic!("boom {}", 42) });

        assert!(matches!(
            exit_of(ended.await),
            Exit::Crashed(CrashReason::Stopped)
        ));
        match exit_of(panicked.await) {
            Exit::Crashed(CrashReason::Panicked { message }) => assert_eq!(message, "boom 42"),
            _ => panic!("a panic must be a crash"),
        }
    }

    /// A `Counter` under the quick policy, with no alerts.
    fn counter_role() -> SupervisedRole<Counter> {
        supervise(
            "counter",
            quick_policy(),
            || Counter { count: 0 },
            SupervisorOptions::new(),
        )
    }

    #[actix_rt::test]
    async fn a_supervised_role_keeps_its_state_until_it_crashes() {
        let role = counter_role();

        assert_eq!(bounded(role.send(Increment)).await.unwrap(), 1);
        assert_eq!(bounded(role.send(Increment)).await.unwrap(), 2);
        role.do_send(InjectFault {
            kind: FaultKind::Panic,
        })
        .unwrap();
        bounded(role.wait_for(|stats| stats.instances == 2)).await;

        assert_eq!(bounded(role.send(Increment)).await.unwrap(), 1);
        assert_eq!(role.stats().last_delay, Some(Duration::from_millis(10)));
    }

    #[actix_rt::test]
    async fn a_routine_shutdown_is_not_counted_as_a_crash() {
        let role = counter_role();
        bounded(role.live()).await.unwrap();

        role.shutdown();
        let stats = bounded(role.terminated()).await;

        assert_eq!(stats.state, RoleState::ShutDown);
        assert_eq!((stats.restarts, stats.last_crash), (0, None));
        assert!(role.addr().is_none());
        let closed = bounded(role.live()).await.unwrap_err();
        assert_eq!(
            closed,
            RoleClosed {
                role: "counter",
                state: RoleState::ShutDown
            }
        );
    }

    #[actix_rt::test]
    async fn a_stopped_instance_is_restarted_with_the_policy_delay() {
        let role = counter_role();
        bounded(role.live()).await.unwrap();

        role.do_send(InjectFault {
            kind: FaultKind::Stop,
        })
        .unwrap();
        let stats = bounded(role.wait_for(|stats| stats.instances == 2)).await;

        assert_eq!(stats.last_crash, Some(CrashReason::Stopped));
        assert_eq!(stats.attempt, 1);
    }
}
