//! Starting a bus: the roles, their edges, and the handle an application
//! keeps.
//!
//! Every socket role (the two routers, and each edge) runs under its own
//! supervisor with the bus's [`BackoffPolicy`]; a role given up for good is
//! reported by [`BusHandle::fatal`].
//!
//! ```no_run
//! use actix::prelude::*;
//! use dgbit_bus::bus::Bus;
//! use dgbit_bus::config::BusConfig;
//! use dgbit_bus::message::{Command, HandlerError};
//! use dgbit_bus::router::FnHandler;
//! use serde_json::{json, Value};
//!
//! #[actix::main]
//! async fn main() {
//!     let echo = FnHandler::new(|command: Command| -> Result<Value, HandlerError> {
//!         Ok(json!({"echo": command.request.payload}))
//!     })
//!     .start();
//!     let bus = Bus::builder(BusConfig::from_env())
//!         .command("echo", echo.recipient())
//!         .start()
//!         .expect("the dead letter store opens");
//!     // ... serve until asked to stop ...
//!     bus.shutdown().await;
//! }
//! ```

use actix::prelude::*;
use serde_json::{json, Value};
use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use tokio::sync::watch;
use tracing::{error, warn};

use crate::backoff::BackoffPolicy;
use crate::builtin::BuiltinCommands;
use crate::config::BusConfig;
use crate::dead_letter::{
    Bury, DeadLetterActor, DeadLetterError, DeadLetterLimits, SetReplayTarget, DEAD_LETTER_COMMANDS,
};
use crate::dispatcher::{
    CloseIntake, DispatcherSettings, DrainToDeadLetters, Enqueue, QueueDispatcher, QueueState,
    RegisterWorker, QUEUE_COMMANDS,
};
use crate::edge::listener::{Edge, EdgeActor, EdgeOpener, EdgeSlot};
use crate::edge::publish::PubEdge;
use crate::edge::push::{PushEdge, DEFAULT_PUSH_TIMEOUT};
use crate::edge::rep::{Inbound, InboundSink, RepEdge};
use crate::edge::EdgeOptions;
use crate::message::{
    Command, EventDelivery, EventSink, HandlerError, Publish, RunJob, StatsQuery,
};
use crate::publisher::{
    PublisherSettings, SubscriberRegistry, SubscriptionId, TopicPublisher, PUBLISH_COMMAND,
};
use crate::router::{
    CommandRouter, Decoded, Dispatch, ReplyTo, RouteTable, RouterCore, RouterSettings,
};
use crate::supervisor::{supervise, GiveUp, RoleSendError, SupervisedRole, SupervisorOptions};
use crate::topics::{PatternError, SERVICE_STARTED, SERVICE_STOPPED};
use crate::wire::{code, CommandReply, CommandRequest, Event, JobMessage};

/// How long the REP edges stay open after the routers stop at shutdown, so
/// that the last replies handed to NNG reach their peers before the sockets
/// close (NNG has no linger). Taken from the end of the drain deadline.
pub const REPLY_FLUSH_GRACE: std::time::Duration = std::time::Duration::from_millis(100);

/// Why a bus could not start.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot open the dead letter store: {0}")]
    DeadLetters(#[from] DeadLetterError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// Collects handlers, then starts the bus.
pub struct BusBuilder {
    config: BusConfig,
    policy: BackoffPolicy,
    command_routes: RouteTable,
    data_routes: RouteTable,
    workers: Vec<RegisterWorker>,
    handlers: Vec<HandlerStarter>,
}

/// Starts one supervised handler once the bus's roles exist.
type HandlerStarter = Box<dyn FnOnce(&mut RoleSet, &EventSink)>;

/// Entry point: `Bus::builder(config)`.
pub struct Bus;

impl Bus {
    pub fn builder(config: BusConfig) -> BusBuilder {
        BusBuilder {
            config,
            policy: BackoffPolicy::default(),
            command_routes: RouteTable::default(),
            data_routes: RouteTable::default(),
            workers: Vec::new(),
            handlers: Vec::new(),
        }
    }
}

impl BusBuilder {
    /// Serve `name` on the command bus with `handler`.
    pub fn command(self, name: impl Into<String>, handler: Recipient<Command>) -> Self {
        self.command_routes.register(name, handler);
        self
    }

    /// Serve `name` on the data bus with `handler`.
    pub fn data_command(self, name: impl Into<String>, handler: Recipient<Command>) -> Self {
        self.data_routes.register(name, handler);
        self
    }

    /// Serve `name` on the command bus with a function run on the thread
    /// that received the request, with no hand-off to an actor: the fastest
    /// route, for commands that are quick, non-blocking and need no state
    /// of an actor's (see [`crate::router::InlineHandler`]).
    pub fn inline_command<F>(self, name: impl Into<String>, handler: F) -> Self
    where
        F: Fn(Command) -> Result<Value, HandlerError> + Send + Sync + 'static,
    {
        self.command_routes.register_inline(name, handler);
        self
    }

    /// Serve `name` on the data bus with an inline function, as
    /// [`BusBuilder::inline_command`].
    pub fn inline_data_command<F>(self, name: impl Into<String>, handler: F) -> Self
    where
        F: Fn(Command) -> Result<Value, HandlerError> + Send + Sync + 'static,
    {
        self.data_routes.register_inline(name, handler);
        self
    }

    /// Serve `name` on the command bus with an actor built by `factory` and
    /// restarted by a supervisor when it panics or stops: the request it was
    /// handling fails with `handler_failed`, the next one reaches the new
    /// instance.
    ///
    /// The handler is started by [`BusBuilder::start`] under the bus's
    /// restart policy, publishes `system.alert` on each crash like every
    /// role, and shows in `status` under `handlers`. Running out of its
    /// restart budget fails its commands with `handler_failed` but, unlike a
    /// socket role, does not stop the bus.
    pub fn supervised_command<A, F>(mut self, name: &'static str, factory: F) -> Self
    where
        A: Actor<Context = Context<A>> + Handler<Command>,
        F: Fn() -> A + Send + 'static,
    {
        let routes = self.command_routes.clone();
        self.handlers
            .push(Box::new(move |roles: &mut RoleSet, events: &EventSink| {
                let options = SupervisorOptions::new().alerts(events.clone());
                let role = supervise(name, roles.policy.clone(), factory, options);
                roles.handler_health.add(name, health_probe(&role));
                register_role_commands(&routes, &[name], &role);
            }));
        self
    }

    /// Run jobs of `job_type` in-process on `worker`, up to `concurrency` at
    /// once.
    pub fn worker(
        mut self,
        job_type: impl Into<String>,
        worker: Recipient<RunJob>,
        concurrency: usize,
    ) -> Self {
        self.workers.push(RegisterWorker {
            job_type: job_type.into(),
            worker,
            concurrency,
        });
        self
    }

    /// The restart schedule of every role (default [`BackoffPolicy::default`]).
    pub fn restart_policy(mut self, policy: BackoffPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Start every role under its supervisor and open the configured edges.
    /// Must be called inside a running actix system.
    ///
    /// An edge that cannot open (directory missing, permission denied,
    /// address held by a live process) does not fail the start: its edge
    /// actor retries on the restart schedule and logs each failure, and the
    /// bus serves in-process traffic meanwhile. [`BusHandle::fatal`] reports
    /// a role given up for good.
    ///
    /// # Errors
    ///
    /// [`BusError::DeadLetters`] when the dead letter store cannot be
    /// opened (a path in a missing directory, a file that is not SQLite);
    /// [`BusError::Config`] for a wildcard listen address that the config
    /// does not allow.
    pub fn start(self) -> Result<BusHandle, BusError> {
        self.config.check_listen_addresses()?;
        let (fatal_sender, fatal) = watch::channel(None);
        let mut roles = RoleSet {
            policy: self.policy,
            fatal: Arc::new(fatal_sender),
            health: Vec::new(),
            edge_roles: Vec::new(),
            edge_health: GroupHealth::default(),
            handler_health: GroupHealth::default(),
        };
        let config = self.config;
        let options = edge_options(&config);

        // The publisher comes first: every other role reports through it.
        let registry = SubscriberRegistry::new();
        let (publisher, events, event_slot) = roles.publisher(&config, &options, &registry);
        register_role_commands(&self.command_routes, &[PUBLISH_COMMAND], &publisher);

        let dead_letters = roles.dead_letters(&config, &events)?;
        let burials = bury_forwarder(&dead_letters);
        let (dispatcher, queue_slot) = roles.dispatcher(&config, &options, &events, &dead_letters);
        register_role_commands(&self.command_routes, &QUEUE_COMMANDS, &dispatcher);
        register_role_commands(&self.command_routes, &DEAD_LETTER_COMMANDS, &dead_letters);
        let _ = dead_letters.do_send(SetReplayTarget {
            target: enqueue_forwarder(&dispatcher),
        });
        for registration in self.workers {
            let _ = dispatcher.do_send(registration);
        }
        for start_handler in self.handlers {
            start_handler(&mut roles, &events);
        }

        let command_router =
            roles.router(&config, "command", &self.command_routes, &events, &burials);
        let data_router = roles.router(&config, "data", &self.data_routes, &events, &burials);
        let builtins = BuiltinCommands::new(config.service_name.clone())
            .with_role("command", stats_of(&command_router.actor))
            .with_role("data", stats_of(&data_router.actor))
            .with_role("publisher", stats_of(&publisher))
            .with_role("job_queue", stats_of(&dispatcher))
            .with_role("dead_letters", stats_of(&dead_letters))
            .with_role("edges", roles.edge_health.clone().start().recipient())
            .with_role("handlers", roles.handler_health.clone().start().recipient())
            .with_health_events(events.clone(), config.health_interval)
            .start();
        for routes in [&self.command_routes, &self.data_routes] {
            for name in ["ping", "echo", "status"] {
                routes.register_default(name, builtins.clone().recipient());
            }
        }

        let mut rep_slots = Vec::new();
        let stopping = Arc::new(AtomicBool::new(false));
        for (enabled, role, url, router) in [
            (
                config.edges.command,
                "command-edge",
                &config.addresses.command,
                &command_router,
            ),
            (
                config.edges.data,
                "data-edge",
                &config.addresses.data,
                &data_router,
            ),
        ] {
            if enabled {
                let opener = rep_opener(url, &config, &options, router.clone(), stopping.clone());
                rep_slots.push(roles.edge(role, opener, &events));
            }
        }
        events.publish(Event::new(
            SERVICE_STARTED,
            config.service_name.clone(),
            json!({"pid": std::process::id(), "addresses": addresses_json(&config)}),
        ));

        Ok(BusHandle {
            config,
            command_routes: self.command_routes,
            data_routes: self.data_routes,
            command_router,
            data_router,
            rep_slots,
            event_slot,
            publisher,
            registry,
            events,
            dispatcher,
            dead_letters,
            queue_slot,
            roles: Arc::new(roles.health),
            edge_roles: Arc::new(roles.edge_roles),
            stopping,
            fatal,
        })
    }
}

/// Reads one role's supervision counters.
type HealthProbe = Box<dyn Fn() -> Value + Send + Sync>;

/// Starts supervised roles and remembers how to report on them.
struct RoleSet {
    policy: BackoffPolicy,
    fatal: Arc<watch::Sender<Option<String>>>,
    health: Vec<(&'static str, HealthProbe)>,
    /// Each edge role's `SupervisedRole<EdgeActor<E>>`, by role name.
    edge_roles: Vec<(&'static str, Box<dyn Any + Send + Sync>)>,
    edge_health: GroupHealth,
    /// Supervised handler actors (`BusBuilder::supervised_command`).
    handler_health: GroupHealth,
}

impl RoleSet {
    fn options(&self, events: &EventSink) -> SupervisorOptions {
        let fatal = self.fatal.clone();
        SupervisorOptions::new()
            .alerts(events.clone())
            .on_give_up(move |give_up: &GiveUp| {
                error!(
                    role = give_up.role,
                    restarts = give_up.restarts,
                    "required role given up"
                );
                let _ = fatal.send(Some(give_up.role.to_string()));
            })
    }

    fn supervise<A, F>(
        &mut self,
        role: &'static str,
        factory: F,
        events: &EventSink,
    ) -> SupervisedRole<A>
    where
        A: Actor<Context = Context<A>>,
        F: Fn() -> A + Send + 'static,
    {
        let supervised = supervise(role, self.policy.clone(), factory, self.options(events));
        self.health.push((role, health_probe(&supervised)));
        supervised
    }

    /// Start the publisher and its PUB edge; return it with a sink that
    /// reaches whichever publisher instance is live.
    fn publisher(
        &mut self,
        config: &BusConfig,
        options: &EdgeOptions,
        registry: &SubscriberRegistry,
    ) -> (
        SupervisedRole<TopicPublisher>,
        EventSink,
        Option<EdgeSlot<PubEdge>>,
    ) {
        let slot = EdgeSlot::default();
        let (settings, registry, for_actor) = (
            PublisherSettings::from_config(config),
            registry.clone(),
            slot.clone(),
        );
        let factory = move || {
            TopicPublisher::with_edge_slot(settings.clone(), registry.clone(), for_actor.clone())
        };
        let publisher = self.supervise("publisher", factory, &EventSink::discard());
        let events = publisher_sink(publisher.clone());
        if !config.edges.event {
            return (publisher, events, None);
        }
        let (url, edge_options) = (config.addresses.event.clone(), options.clone());
        let opener: EdgeOpener<PubEdge> = Arc::new(move || PubEdge::listen(&url, &edge_options));
        let event_slot = self.edge_into("event-edge", opener, slot, &events);
        (publisher, events, Some(event_slot))
    }

    /// Open the dead letter store and supervise its actor; every instance
    /// shares the one store.
    fn dead_letters(
        &mut self,
        config: &BusConfig,
        events: &EventSink,
    ) -> Result<SupervisedRole<DeadLetterActor>, BusError> {
        let limits = DeadLetterLimits {
            max_entries: config.dead_letter_max_entries,
            ..DeadLetterLimits::default()
        };
        let first = DeadLetterActor::open(config.dead_letter_path.clone(), limits)?;
        Ok(self.supervise("dead_letters", move || first.instance(), events))
    }

    /// Supervise the dispatcher over one shared queue state, and its PUSH
    /// edge when the job queue edge is enabled.
    fn dispatcher(
        &mut self,
        config: &BusConfig,
        options: &EdgeOptions,
        events: &EventSink,
        dead_letters: &SupervisedRole<DeadLetterActor>,
    ) -> (SupervisedRole<QueueDispatcher>, Option<EdgeSlot<PushEdge>>) {
        let (settings, state, slot) = (
            DispatcherSettings::from_config(config),
            QueueState::new(),
            EdgeSlot::default(),
        );
        let (for_actor, sink, burials) =
            (slot.clone(), events.clone(), bury_forwarder(dead_letters));
        let factory = move || {
            let (settings, state, sink) = (settings.clone(), state.clone(), sink.clone());
            QueueDispatcher::with_push_slot(
                settings,
                state,
                sink,
                burials.clone(),
                for_actor.clone(),
            )
        };
        let dispatcher = self.supervise("job_queue", factory, events);
        if !config.edges.job_queue {
            return (dispatcher, None);
        }
        let (url, edge_options, dial) = (
            config.addresses.job_queue.clone(),
            options.clone(),
            config.queue_dial,
        );
        let opener: EdgeOpener<PushEdge> = Arc::new(move || match dial {
            true => PushEdge::dial(&url, &edge_options, DEFAULT_PUSH_TIMEOUT),
            false => PushEdge::listen(&url, &edge_options, DEFAULT_PUSH_TIMEOUT),
        });
        let queue_slot = self.edge_into("queue-edge", opener, slot, events);
        (dispatcher, Some(queue_slot))
    }

    /// Start the router `role` under supervision. Its core is made once and
    /// handed to every instance, so a restart keeps the duplicate cache.
    fn router(
        &mut self,
        config: &BusConfig,
        role: &'static str,
        routes: &RouteTable,
        events: &EventSink,
        dead_letters: &Recipient<Bury>,
    ) -> RouterRole {
        let settings = RouterSettings::from_config(config, role);
        let core = Arc::new(RouterCore::new(settings, routes.clone()));
        let (for_factory, dead_letters) = (core.clone(), dead_letters.clone());
        let factory = move || {
            CommandRouter::with_core(for_factory.clone()).with_dead_letters(dead_letters.clone())
        };
        RouterRole {
            actor: self.supervise(role, factory, events),
            core,
        }
    }

    fn edge<E: Edge + Unpin>(
        &mut self,
        role: &'static str,
        opener: EdgeOpener<E>,
        events: &EventSink,
    ) -> EdgeSlot<E>
    where
        EdgeActor<E>: Actor<Context = Context<EdgeActor<E>>>,
    {
        self.edge_into(role, opener, EdgeSlot::default(), events)
    }

    fn edge_into<E: Edge + Unpin>(
        &mut self,
        role: &'static str,
        opener: EdgeOpener<E>,
        slot: EdgeSlot<E>,
        events: &EventSink,
    ) -> EdgeSlot<E>
    where
        EdgeActor<E>: Actor<Context = Context<EdgeActor<E>>>,
    {
        let for_actor = slot.clone();
        let factory = move || EdgeActor::new(role, opener.clone(), for_actor.clone());
        let supervised = self.supervise(role, factory, events);
        self.edge_health.add(role, health_probe(&supervised));
        self.edge_roles.push((role, Box::new(supervised)));
        slot
    }
}

/// Reads `role`'s supervision counters.
fn health_probe<A: Actor<Context = Context<A>>>(role: &SupervisedRole<A>) -> HealthProbe {
    let role = role.clone();
    Box::new(move || role.health())
}

/// Route each of `names` to whichever instance of `role` is live.
fn register_role_commands<A>(routes: &RouteTable, names: &[&str], role: &SupervisedRole<A>)
where
    A: Actor<Context = Context<A>> + Handler<Command>,
{
    for name in names {
        let role = role.clone();
        routes.register_resolver(*name, Arc::new(move || role.addr().map(Addr::recipient)));
    }
}

/// A `Recipient<Bury>` that reaches the live dead letter instance.
fn bury_forwarder(dead_letters: &SupervisedRole<DeadLetterActor>) -> Recipient<Bury> {
    RoleForwarder {
        role: dead_letters.clone(),
    }
    .start()
    .recipient()
}

/// A `Recipient<Enqueue>` that reaches the live dispatcher instance.
fn enqueue_forwarder(dispatcher: &SupervisedRole<QueueDispatcher>) -> Recipient<Enqueue> {
    RoleForwarder {
        role: dispatcher.clone(),
    }
    .start()
    .recipient()
}

/// Forwards one kind of request to whichever instance of a supervised role
/// is live; while it restarts the caller gets the role's refusal as an error.
struct RoleForwarder<A: Actor> {
    role: SupervisedRole<A>,
}

impl<A: Actor<Context = Context<A>>> Actor for RoleForwarder<A> {
    type Context = Context<Self>;
}

impl Handler<Bury> for RoleForwarder<DeadLetterActor> {
    type Result = ResponseFuture<Result<(), DeadLetterError>>;

    fn handle(&mut self, bury: Bury, _ctx: &mut Self::Context) -> Self::Result {
        let role = self.role.clone();
        Box::pin(async move {
            role.send(bury).await.unwrap_or_else(|refused| {
                warn!(error = %refused, "dead letter store not running");
                Err(DeadLetterError::Unavailable)
            })
        })
    }
}

impl Handler<Enqueue> for RoleForwarder<QueueDispatcher> {
    type Result = ResponseFuture<Result<String, HandlerError>>;

    fn handle(&mut self, enqueue: Enqueue, _ctx: &mut Self::Context) -> Self::Result {
        let role = self.role.clone();
        Box::pin(async move { enqueue_on(&role, enqueue.job).await })
    }
}

/// Put `job` on the live dispatcher's queue; `overloaded` while it is not
/// running.
async fn enqueue_on(
    dispatcher: &SupervisedRole<QueueDispatcher>,
    job: JobMessage,
) -> Result<String, HandlerError> {
    dispatcher
        .send(Enqueue { job })
        .await
        .unwrap_or_else(|refused| {
            Err(HandlerError::new(
                code::OVERLOADED,
                format!("job queue not running: {refused}"),
            ))
        })
}

/// A sink that hands events to the live publisher; events offered while it
/// restarts are counted and logged, never dropped silently.
fn publisher_sink(publisher: SupervisedRole<TopicPublisher>) -> EventSink {
    let lost = Arc::new(std::sync::atomic::AtomicU64::new(0));
    EventSink::from_fn(move |publish: Publish| {
        if let Err(refused) = publisher.do_send(publish) {
            let lost = lost.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            warn!(
                lost,
                closed = refused.is_closed(),
                "event lost: publisher not running"
            );
        }
    })
}

// The publisher's test-only fault hook (see `supervisor::InjectFault`); the
// other roles implement it in their own files.
crate::impl_inject_fault!(TopicPublisher);

fn addresses_json(config: &BusConfig) -> Value {
    let addresses = &config.addresses;
    json!({
        "command": addresses.command,
        "event": addresses.event,
        "job_queue": addresses.job_queue,
        "data": addresses.data,
    })
}

/// A recipient of [`StatsQuery`] for `role`'s current instance.
fn stats_of<A>(role: &SupervisedRole<A>) -> Recipient<StatsQuery>
where
    A: Actor<Context = Context<A>> + Handler<StatsQuery>,
{
    StatsForwarder { role: role.clone() }.start().recipient()
}

/// Answers [`StatsQuery`] for whichever instance of a supervised role is
/// live, adding the supervisor's own counters.
struct StatsForwarder<A: Actor> {
    role: SupervisedRole<A>,
}

impl<A: Actor<Context = Context<A>>> Actor for StatsForwarder<A> {
    type Context = Context<Self>;
}

impl<A> Handler<StatsQuery> for StatsForwarder<A>
where
    A: Actor<Context = Context<A>> + Handler<StatsQuery>,
{
    type Result = ResponseFuture<Value>;

    fn handle(&mut self, query: StatsQuery, _ctx: &mut Self::Context) -> Self::Result {
        let role = self.role.clone();
        Box::pin(async move {
            let supervision = role.health();
            let mut stats = role
                .send(query)
                .await
                .unwrap_or_else(|_| json!({"state": "down"}));
            if let Value::Object(map) = &mut stats {
                map.insert("supervision".into(), supervision);
            }
            stats
        })
    }
}

/// Reports the supervision of a group of roles (the edges, the supervised
/// handlers: state, restarts, current delay, last crash) as one entry of
/// `status` and `system.health`. Shared, so roles added after the report's
/// actor started are included.
#[derive(Clone, Default)]
struct GroupHealth {
    roles: Arc<RwLock<Vec<(&'static str, HealthProbe)>>>,
}

impl GroupHealth {
    fn add(&self, role: &'static str, health: HealthProbe) {
        let mut roles = self
            .roles
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        roles.push((role, health));
    }
}

impl Actor for GroupHealth {
    type Context = Context<Self>;
}

impl Handler<StatsQuery> for GroupHealth {
    type Result = MessageResult<StatsQuery>;

    fn handle(&mut self, _: StatsQuery, _ctx: &mut Self::Context) -> Self::Result {
        let roles = self
            .roles
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let report = roles
            .iter()
            .map(|(role, health)| (role.to_string(), health()));
        MessageResult(Value::Object(report.collect()))
    }
}

fn edge_options(config: &BusConfig) -> EdgeOptions {
    EdgeOptions {
        max_message_size: config.max_message_size,
        ipc_permissions: config.ipc_permissions,
        ..EdgeOptions::default()
    }
}

/// One router: its supervised actor, and the core every instance shares.
#[derive(Clone)]
struct RouterRole {
    actor: SupervisedRole<CommandRouter>,
    core: Arc<RouterCore>,
}

/// Opens the REP edge of `url`, feeding `router`.
///
/// Requests are decoded on the NNG thread that received them. One for an
/// inline handler is routed and run right there; any other goes to the
/// router actor as [`Decoded`] and is routed on its thread, where the actor
/// handler's call runs anyway. A body that does not decode goes to the
/// actor too, which dead-letters it. What the actor cannot take while it restarts
/// is answered `overloaded` at once; once it is given up or shut down, or
/// `stopping` is set, `shutting_down`.
fn rep_opener(
    url: &str,
    config: &BusConfig,
    options: &EdgeOptions,
    router: RouterRole,
    stopping: Arc<AtomicBool>,
) -> EdgeOpener<RepEdge> {
    let sink: InboundSink = Arc::new(move |inbound| {
        // While the routers stop, the role may briefly look like it is
        // restarting; the flag keeps that from being answered `overloaded`.
        if stopping.load(Ordering::Acquire) {
            return refuse(
                &router.actor,
                RoleSendError::ShutDown(inbound),
                Inbound::refuse,
            );
        }
        let Inbound { body, mut reply } = inbound;
        let max_size = router.core.settings().max_message_size;
        let Ok(request) = CommandRequest::decode(&body, max_size) else {
            let refused = router.actor.do_send(Inbound { body, reply });
            return refused.unwrap_or_else(|r| refuse(&router.actor, r, Inbound::refuse));
        };
        reply.remember_echo(request.echo());
        if router.core.serves_inline(&request) {
            if let Some(call) = router.core.accept(request, ReplyTo::Edge(reply)) {
                call.run_inline();
            }
            return;
        }
        let refused = router.actor.do_send(Decoded { request, reply });
        refused.unwrap_or_else(|r| refuse(&router.actor, r, Decoded::refuse));
    });
    let (url, options, contexts) = (url.to_string(), options.clone(), config.contexts_per_socket);
    Arc::new(move || RepEdge::listen(&url, &options, contexts, sink.clone()))
}

/// Answer a request `router` did not take, with `answer(message, code,
/// text)`.
fn refuse<M>(
    router: &SupervisedRole<CommandRouter>,
    refused: RoleSendError<M>,
    answer: impl FnOnce(M, &str, &str),
) {
    match refused {
        RoleSendError::Lost => {
            warn!(role = router.role(), "request lost to a stopping router")
        }
        refused => {
            let (code, text) = if refused.is_closed() {
                (
                    code::SHUTTING_DOWN,
                    "the router is gone for good; the bus is stopping",
                )
            } else {
                (
                    code::OVERLOADED,
                    "the router is restarting; try again shortly",
                )
            };
            if let Some(message) = refused.into_message() {
                answer(message, code, text);
            }
        }
    }
}

/// A running bus. [`BusHandle::shutdown`] drains it and closes its edges.
pub struct BusHandle {
    config: BusConfig,
    command_routes: RouteTable,
    data_routes: RouteTable,
    command_router: RouterRole,
    data_router: RouterRole,
    rep_slots: Vec<EdgeSlot<RepEdge>>,
    event_slot: Option<EdgeSlot<PubEdge>>,
    publisher: SupervisedRole<TopicPublisher>,
    registry: SubscriberRegistry,
    events: EventSink,
    dispatcher: SupervisedRole<QueueDispatcher>,
    dead_letters: SupervisedRole<DeadLetterActor>,
    queue_slot: Option<EdgeSlot<PushEdge>>,
    roles: Arc<Vec<(&'static str, HealthProbe)>>,
    edge_roles: Arc<Vec<(&'static str, Box<dyn Any + Send + Sync>)>>,
    /// Set at shutdown once the drain is over: the REP edges then answer
    /// every request `shutting_down` themselves.
    stopping: Arc<AtomicBool>,
    fatal: watch::Receiver<Option<String>>,
}

impl BusHandle {
    pub fn config(&self) -> &BusConfig {
        &self.config
    }

    /// The command bus's handlers; register more while the bus runs.
    pub fn command_routes(&self) -> &RouteTable {
        &self.command_routes
    }

    pub fn data_routes(&self) -> &RouteTable {
        &self.data_routes
    }

    /// The command router's supervised handle (for its stats and, in tests,
    /// for injecting faults).
    pub fn command_router(&self) -> &SupervisedRole<CommandRouter> {
        &self.command_router.actor
    }

    /// The data router's supervised handle.
    pub fn data_router(&self) -> &SupervisedRole<CommandRouter> {
        &self.data_router.actor
    }

    /// The supervised handle of the edge role `role` (`command-edge`,
    /// `data-edge`, `event-edge`, `queue-edge`) whose edge type is `E`, for its stats and,
    /// in tests, for injecting faults; `None` when that edge is not
    /// configured or has another type.
    pub fn edge_role<E>(&self, role: &str) -> Option<SupervisedRole<EdgeActor<E>>>
    where
        E: Edge + Unpin,
        EdgeActor<E>: Actor<Context = Context<EdgeActor<E>>>,
    {
        self.edge_roles
            .iter()
            .find(|(name, _)| *name == role)
            .and_then(|(_, handle)| handle.downcast_ref::<SupervisedRole<EdgeActor<E>>>())
            .cloned()
    }

    /// Whether every configured edge is open.
    pub fn edges_open(&self) -> bool {
        self.rep_slots.iter().all(EdgeSlot::is_open)
            && self.event_slot.as_ref().is_none_or(EdgeSlot::is_open)
            && self.queue_slot.as_ref().is_none_or(EdgeSlot::is_open)
    }

    /// Put `job` on the queue; the reply is its id once it is queued.
    ///
    /// # Errors
    ///
    /// `overloaded` when the queue is full or the dispatcher is restarting,
    /// `shutting_down` after shutdown began, `bad_request` for a bad job.
    pub async fn enqueue(&self, job: JobMessage) -> Result<String, HandlerError> {
        enqueue_on(&self.dispatcher, job).await
    }

    /// Run jobs of `job_type` in-process on `worker`; the reply is the
    /// worker's id.
    pub async fn register_worker(
        &self,
        job_type: impl Into<String>,
        worker: Recipient<RunJob>,
        concurrency: usize,
    ) -> Option<String> {
        let registration = RegisterWorker {
            job_type: job_type.into(),
            worker,
            concurrency,
        };
        self.dispatcher.send(registration).await.ok()
    }

    /// The dispatcher's supervised handle.
    pub fn dispatcher(&self) -> &SupervisedRole<QueueDispatcher> {
        &self.dispatcher
    }

    /// The dead letter actor's supervised handle.
    pub fn dead_letters(&self) -> &SupervisedRole<DeadLetterActor> {
        &self.dead_letters
    }

    /// Where to publish events into this bus.
    pub fn events(&self) -> EventSink {
        self.events.clone()
    }

    /// Publish `event` to every matching subscriber, local and remote.
    pub fn publish(&self, event: Event) {
        self.events.publish(event);
    }

    /// Deliver events whose topic matches `pattern` to `subscriber`, through
    /// a buffer of [`BusConfig::subscriber_buffer`] events.
    ///
    /// # Errors
    ///
    /// [`PatternError`] when `pattern` is not a valid pattern.
    pub fn subscribe(
        &self,
        pattern: &str,
        subscriber: Recipient<EventDelivery>,
    ) -> Result<SubscriptionId, PatternError> {
        self.registry
            .subscribe(pattern, subscriber, self.config.subscriber_buffer)
    }

    /// The publisher's supervised handle.
    pub fn publisher(&self) -> &SupervisedRole<TopicPublisher> {
        &self.publisher
    }

    /// Wait until every configured edge is open, up to `limit`; edges open
    /// in the background (see [`BusBuilder::start`]).
    pub async fn wait_for_edges(&self, limit: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while !self.edges_open() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        true
    }

    /// The supervision counters of every role, by role name.
    pub fn supervision(&self) -> Value {
        Value::Object(
            self.roles
                .iter()
                .map(|(role, health)| (role.to_string(), health()))
                .collect(),
        )
    }

    /// Run a command through the command router in-process, exactly as a
    /// remote request would run (dedup, timeout, error codes).
    pub async fn request(&self, request: CommandRequest) -> CommandReply {
        dispatch(&self.command_router, request).await
    }

    /// Run a command through the data router in-process.
    pub async fn data_request(&self, request: CommandRequest) -> CommandReply {
        dispatch(&self.data_router, request).await
    }

    /// Resolves when a role has been given up for good, with its name: the
    /// process should then exit non-zero so that an outer supervisor
    /// (systemd, a container runtime) restarts it.
    pub async fn fatal(&self) -> String {
        let mut fatal = self.fatal.clone();
        loop {
            if let Some(role) = fatal.borrow_and_update().clone() {
                return role;
            }
            if fatal.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Stop intake, wait for commands in flight up to the drain deadline,
    /// then close every edge and remove its ipc file.
    ///
    /// Every request the bus took is answered: one that arrives while it
    /// drains gets `shutting_down`, and so does a command still running when
    /// the deadline comes (its handler may finish later; the result is
    /// discarded). The REP edges stay open [`REPLY_FLUSH_GRACE`] longer,
    /// within the deadline, so that those replies reach their peers.
    pub async fn shutdown(self) {
        let deadline = tokio::time::Instant::now() + self.config.drain_deadline;
        let drain_until = deadline.checked_sub(REPLY_FLUSH_GRACE).unwrap_or(deadline);

        // The queue stops handing out jobs first; the command router then
        // refuses everything but the workers' reports, so jobs in flight can
        // still finish within the deadline.
        let _ = self.dispatcher.send(CloseIntake).await;
        let still_served = vec!["bus.report".to_string(), "bus.lease".to_string()];
        self.command_router.core.stop_intake(still_served);
        self.data_router.core.stop_intake(Vec::new());
        self.drain(drain_until).await;

        if let Ok((stored, lost)) = self.dispatcher.send(DrainToDeadLetters).await {
            if stored + lost > 0 {
                warn!(
                    stored,
                    lost, "jobs left at shutdown moved to the dead letter queue"
                );
            }
        }
        self.abandon_commands().await;
        for slot in &self.rep_slots {
            slot.close();
        }
        if let Some(slot) = &self.queue_slot {
            slot.close();
        }
        self.announce_stop().await;
        if let Some(slot) = &self.event_slot {
            slot.close();
        }
    }

    /// Stop both routers: the commands they still run are dropped with
    /// them, and each dropped reply slot answers `shutting_down`. Requests
    /// that arrive afterwards are answered `shutting_down` by the edge.
    /// Then give those replies [`REPLY_FLUSH_GRACE`] to leave.
    async fn abandon_commands(&self) {
        self.stopping.store(true, Ordering::Release);
        for router in [&self.command_router, &self.data_router] {
            router.actor.shutdown();
        }
        for router in [&self.command_router, &self.data_router] {
            router.actor.terminated().await;
        }
        if !self.rep_slots.is_empty() {
            tokio::time::sleep(REPLY_FLUSH_GRACE).await;
        }
    }

    /// Wait until no command and no job is in flight, or `deadline`.
    async fn drain(&self, deadline: tokio::time::Instant) {
        loop {
            let mut busy = 0;
            for router in [&self.command_router, &self.data_router] {
                busy += router.core.in_flight();
            }
            busy += self.dispatcher.send(CloseIntake).await.unwrap_or(0);
            if busy == 0 || tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Publish `service.stopped` and wait until the publisher has handled
    /// it, so it leaves the PUB socket before the socket closes.
    async fn announce_stop(&self) {
        let data = json!({"pid": std::process::id()});
        let event = Event::new(SERVICE_STOPPED, self.config.service_name.clone(), data);
        let _ = self.publisher.send(Publish { event }).await;
    }
}

/// Route `request` in the caller (see [`RouterCore::request`]); outside a
/// tokio runtime, which the handler timeout needs, through the router actor.
async fn dispatch(router: &RouterRole, request: CommandRequest) -> CommandReply {
    if tokio::runtime::Handle::try_current().is_ok() {
        return router.core.request(request).await;
    }
    let echo = request.echo();
    router
        .actor
        .send(Dispatch { request })
        .await
        .unwrap_or_else(|_| {
            CommandReply::error(echo, code::SHUTTING_DOWN, "the router is not running")
        })
}
