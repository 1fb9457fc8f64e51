//! `CommandRouter`: routes requests on the command bus (and, as a second
//! instance, the data bus) to the handler actor registered for each command.
//!
//! Requests arrive from the REP edge as bytes ([`Inbound`]) or in-process as a
//! typed [`Dispatch`]. The router decodes, answers malformed ones at once,
//! suppresses duplicates by `job_uuid`/`request_id`, and sends a [`Command`]
//! to the handler without waiting for it: each handler call runs as its own
//! future on the router's context, so one slow handler never delays another
//! command. Every request gets exactly one reply.
//!
//! Handlers live in a [`RouteTable`] shared with the bus, so that a router
//! restarted by its supervisor still knows them.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use actix::prelude::*;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tracing::{debug, warn};

use crate::dead_letter::{Bury, DeadLetter};
use crate::dedup::{Admission, DedupCache};
use crate::edge::rep::{Inbound, ReplySlot};
use crate::message::{Command, HandlerError, StatsQuery};
use crate::wire::{
    code, nesting_depth, CommandReply, CommandRequest, Echo, WireError, MAX_NESTING,
};

/// Resolves a command name to the handler's current address. A supervised
/// handler's resolver returns the live instance, or `None` while it restarts.
pub type HandlerResolver = Arc<dyn Fn() -> Option<Recipient<Command>> + Send + Sync>;

/// A resolver that always returns `handler`.
fn fixed(handler: Recipient<Command>) -> HandlerResolver {
    Arc::new(move || Some(handler.clone()))
}

/// The handlers of one router, shared with the bus that registers them.
#[derive(Clone, Default)]
pub struct RouteTable {
    routes: Arc<RwLock<HashMap<String, HandlerResolver>>>,
}

impl RouteTable {
    /// Route `name` to `handler`, replacing any earlier handler.
    pub fn register(&self, name: impl Into<String>, handler: Recipient<Command>) {
        self.register_resolver(name, fixed(handler));
    }

    /// Route `name` to whatever `resolver` returns at the time of each call.
    pub fn register_resolver(&self, name: impl Into<String>, resolver: HandlerResolver) {
        self.write().insert(name.into(), resolver);
    }

    /// Route `name` to `handler` unless something already serves it.
    pub fn register_default(&self, name: impl Into<String>, handler: Recipient<Command>) {
        self.write()
            .entry(name.into())
            .or_insert_with(|| fixed(handler));
    }

    pub fn unregister(&self, name: &str) -> bool {
        self.write().remove(name).is_some()
    }

    /// The registered command names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.read().keys().cloned().collect();
        names.sort();
        names
    }

    fn resolve(&self, name: &str) -> Option<HandlerResolver> {
        self.read().get(name).cloned()
    }

    // A handler panicking elsewhere cannot poison this lock (no user code runs
    // under it), so recovering the guard is safe.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, HandlerResolver>> {
        self.routes
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, HandlerResolver>> {
        self.routes
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Limits and names of one router.
#[derive(Debug, Clone)]
pub struct RouterSettings {
    /// `command` or `data`: names the router in logs and stats.
    pub role: &'static str,
    pub default_command: Option<String>,
    pub max_message_size: usize,
    pub handler_timeout: Duration,
    pub max_in_flight: usize,
    pub dedup_capacity: usize,
    pub dedup_ttl: Duration,
}

impl Default for RouterSettings {
    fn default() -> Self {
        let config = crate::config::BusConfig::default();
        Self {
            role: "command",
            default_command: config.default_command,
            max_message_size: config.max_message_size,
            handler_timeout: config.handler_timeout,
            max_in_flight: config.max_commands_in_flight,
            dedup_capacity: config.dedup_capacity,
            dedup_ttl: config.dedup_ttl,
        }
    }
}

/// Send a typed command through the router in-process and get its reply.
#[derive(Debug, Message)]
#[rtype(result = "CommandReply")]
pub struct Dispatch {
    pub request: CommandRequest,
}

/// Stop taking new requests (they get `shutting_down`), except for the
/// commands in `still_served` (a draining job queue still needs workers'
/// reports); answers with the number still running.
#[derive(Debug, Default, Message)]
#[rtype(result = "usize")]
pub struct StopIntake {
    pub still_served: Vec<String>,
}

/// How many commands are running now.
#[derive(Debug, Message)]
#[rtype(result = "usize")]
pub struct InFlight;

/// Where one request's reply goes.
enum ReplyTo {
    Edge(ReplySlot),
    Local(oneshot::Sender<CommandReply>),
}

impl ReplyTo {
    fn send(self, reply: &CommandReply) {
        match self {
            ReplyTo::Edge(slot) => slot.send(reply.encode()),
            ReplyTo::Local(sender) => {
                let _ = sender.send(reply.clone());
            }
        }
    }
}

#[derive(Debug, Default)]
struct RouterCounters {
    received: u64,
    ok: u64,
    errors: HashMap<&'static str, u64>,
    dead_letters_skipped: u64,
}

/// Unparseable requests sent to the dead letter store and not yet stored.
/// Past this many, more are answered but not kept (and counted): the store
/// commits each entry to disk, so a flood of garbage would otherwise queue
/// in memory without bound.
pub const MAX_DEAD_LETTERS_PENDING: usize = 64;

/// A skipped dead letter is logged the first time and then every this many.
const DEAD_LETTER_SKIP_LOG_INTERVAL: u64 = 1000;

/// The actor behind one REQ/REP bus.
pub struct CommandRouter {
    settings: RouterSettings,
    routes: RouteTable,
    dedup: DedupCache<CommandReply, ReplyTo>,
    in_flight: usize,
    intake_open: bool,
    still_served: Vec<String>,
    counters: RouterCounters,
    dead_letters: Option<Recipient<Bury>>,
    dead_letters_pending: usize,
}

impl CommandRouter {
    pub fn new(settings: RouterSettings, routes: RouteTable) -> Self {
        let dedup = DedupCache::new(settings.dedup_capacity, settings.dedup_ttl);
        Self {
            settings,
            routes,
            dedup,
            in_flight: 0,
            intake_open: true,
            still_served: Vec::new(),
            counters: RouterCounters::default(),
            dead_letters: None,
            dead_letters_pending: 0,
        }
    }

    /// Keep the raw bytes of every request that could not be parsed in the
    /// dead letter store, besides answering it with `bad_request`.
    pub fn with_dead_letters(mut self, dead_letters: Recipient<Bury>) -> Self {
        self.dead_letters = Some(dead_letters);
        self
    }

    /// Decide a request's fate: answer it now, park it, or run its handler.
    fn accept(&mut self, request: CommandRequest, reply_to: ReplyTo, ctx: &mut Context<Self>) {
        let echo = request.echo();
        let Some(name) = request
            .command
            .clone()
            .or_else(|| self.settings.default_command.clone())
        else {
            let text = "request has no `command` and the bus has no default route";
            return self.answer(reply_to, CommandReply::error(echo, code::BAD_REQUEST, text));
        };
        if !self.intake_open && !self.still_served.contains(&name) {
            let text = "the bus is shutting down";
            return self.answer(
                reply_to,
                CommandReply::error(echo, code::SHUTTING_DOWN, text),
            );
        }
        let Some(resolver) = self.routes.resolve(&name) else {
            let text = format!("unknown command `{name}`");
            return self.answer(
                reply_to,
                CommandReply::error(echo, code::UNKNOWN_COMMAND, text),
            );
        };
        if self.in_flight >= self.settings.max_in_flight {
            let text = format!("{} commands are running; try again later", self.in_flight);
            return self.answer(reply_to, CommandReply::error(echo, code::OVERLOADED, text));
        }

        let Some(key) = request.dedup_key().map(str::to_string) else {
            return self.run(name, request, resolver, None, reply_to, ctx);
        };
        match self.dedup.admit(&key, reply_to, Instant::now()) {
            Admission::New(reply_to) => self.run(name, request, resolver, Some(key), reply_to, ctx),
            Admission::Parked => debug!(router = self.settings.role, key, "duplicate parked"),
            Admission::Answered(reply, reply_to) => {
                debug!(
                    router = self.settings.role,
                    key, "duplicate answered from cache"
                );
                self.answer(reply_to, reply.with_echo(echo));
            }
        }
    }

    /// Send the command to its handler as a future of its own, so the router
    /// keeps serving while the handler works.
    fn run(
        &mut self,
        name: String,
        request: CommandRequest,
        resolver: HandlerResolver,
        key: Option<String>,
        reply_to: ReplyTo,
        ctx: &mut Context<Self>,
    ) {
        let echo = request.echo();
        let Some(handler) = resolver() else {
            let text = format!("the handler for `{name}` is restarting; try again");
            let reply = CommandReply::error(echo, code::HANDLER_FAILED, text);
            return self.finish(key, reply, reply_to);
        };
        self.in_flight += 1;
        let call = handler
            .send(Command {
                name: name.clone(),
                request,
            })
            .timeout(self.settings.handler_timeout);
        let timeout = self.settings.handler_timeout;
        ctx.spawn(call.into_actor(self).map(move |outcome, router, _| {
            router.in_flight -= 1;
            let reply = match outcome {
                Ok(Ok(result)) => result_reply(echo, &name, result),
                Ok(Err(err)) => CommandReply::error(echo, err.code, err.message),
                Err(MailboxError::Timeout) => {
                    let text = format!("`{name}` did not answer within {} ms", timeout.as_millis());
                    CommandReply::error(echo, code::TIMEOUT, text)
                }
                Err(MailboxError::Closed) => {
                    warn!(router = router.settings.role, command = %name, "handler is gone");
                    let text = format!("the handler for `{name}` crashed or stopped");
                    CommandReply::error(echo, code::HANDLER_FAILED, text)
                }
            };
            router.finish(key, reply, reply_to);
        }));
    }

    /// Reply to the first caller and to every duplicate parked behind it.
    fn finish(&mut self, key: Option<String>, reply: CommandReply, reply_to: ReplyTo) {
        if let Some(key) = key {
            for waiter in self.dedup.complete(&key, reply.clone(), Instant::now()) {
                self.answer(waiter, reply.clone());
            }
        }
        self.answer(reply_to, reply);
    }

    fn answer(&mut self, reply_to: ReplyTo, reply: CommandReply) {
        match reply.code() {
            None => self.counters.ok += 1,
            Some(code) => {
                let code = known_code(code);
                *self.counters.errors.entry(code).or_default() += 1;
            }
        }
        reply_to.send(&reply);
    }

    fn reject(&mut self, body: &[u8], err: WireError, reply_to: ReplyTo, ctx: &mut Context<Self>) {
        debug!(router = self.settings.role, code = err.code, error = %err, "request rejected");
        let echo = if err.code == code::TOO_LARGE {
            Echo::default()
        } else {
            Echo::salvage(body)
        };
        if err.code == code::BAD_REQUEST {
            self.bury(body, &err, ctx);
        }
        self.answer(reply_to, CommandReply::error(echo, err.code, err.message));
    }

    /// Keep an unparseable body in the dead letter store, unless
    /// [`MAX_DEAD_LETTERS_PENDING`] are already on their way there.
    fn bury(&mut self, body: &[u8], err: &WireError, ctx: &mut Context<Self>) {
        let Some(dead_letters) = self.dead_letters.clone() else {
            return;
        };
        if self.dead_letters_pending >= MAX_DEAD_LETTERS_PENDING {
            self.counters.dead_letters_skipped += 1;
            let skipped = self.counters.dead_letters_skipped;
            if skipped % DEAD_LETTER_SKIP_LOG_INTERVAL == 1 {
                warn!(
                    router = self.settings.role,
                    skipped,
                    pending = self.dead_letters_pending,
                    "dead letter store behind; unparseable request answered, not kept"
                );
            }
            return;
        }
        self.dead_letters_pending += 1;
        let entry = DeadLetter::unparseable(self.settings.role, body, err.message.clone());
        let stored = dead_letters.send(Bury { entry });
        ctx.spawn(stored.into_actor(self).map(|_, router, _| {
            router.dead_letters_pending -= 1;
        }));
    }
}

/// A handler's result as an ok reply, or `handler_failed` when the reply
/// would nest deeper than any Rust peer (this crate's own client included)
/// can decode: the reply object and its `result` add one level, and an
/// `echo` of a payload near the request limit would otherwise cross it.
fn result_reply(echo: Echo, name: &str, result: Value) -> CommandReply {
    let depth = nesting_depth(&result) + 1;
    if depth > MAX_NESTING {
        drop_without_recursion(result);
        let text = format!(
            "the reply of `{name}` would nest {depth} levels deep; the limit is {MAX_NESTING}"
        );
        return CommandReply::error(echo, code::HANDLER_FAILED, text);
    }
    CommandReply::ok(echo, result)
}

/// Drop `value` however deep it nests: serde_json's own drop recurses once
/// per level, which overflows the stack on a value thousands of levels deep.
fn drop_without_recursion(value: Value) {
    let mut pending = vec![value];
    while let Some(value) = pending.pop() {
        match value {
            Value::Array(items) => pending.extend(items),
            Value::Object(map) => pending.extend(map.into_iter().map(|(_, item)| item)),
            _ => {}
        }
    }
}

/// Counter keys are static; a handler's own code is counted as `other`.
fn known_code(value: &str) -> &'static str {
    [
        code::BAD_REQUEST,
        code::UNKNOWN_COMMAND,
        code::HANDLER_FAILED,
        code::TIMEOUT,
        code::OVERLOADED,
        code::TOO_LARGE,
        code::SHUTTING_DOWN,
        code::NOT_FOUND,
    ]
    .into_iter()
    .find(|known| *known == value)
    .unwrap_or("other")
}

impl Actor for CommandRouter {
    type Context = Context<Self>;

    fn started(&mut self, _ctx: &mut Self::Context) {
        debug!(router = self.settings.role, "router started");
    }
}

impl Handler<Inbound> for CommandRouter {
    type Result = ();

    fn handle(&mut self, inbound: Inbound, ctx: &mut Self::Context) {
        self.counters.received += 1;
        let Inbound { body, mut reply } = inbound;
        match CommandRequest::decode(&body, self.settings.max_message_size) {
            Ok(request) => {
                reply.remember_echo(request.echo());
                self.accept(request, ReplyTo::Edge(reply), ctx)
            }
            Err(err) => self.reject(&body, err, ReplyTo::Edge(reply), ctx),
        }
    }
}

impl Handler<Dispatch> for CommandRouter {
    type Result = ResponseFuture<CommandReply>;

    fn handle(&mut self, dispatch: Dispatch, ctx: &mut Self::Context) -> Self::Result {
        self.counters.received += 1;
        let echo = dispatch.request.echo();
        let (sender, receiver) = oneshot::channel();
        self.accept(dispatch.request, ReplyTo::Local(sender), ctx);
        Box::pin(async move {
            receiver.await.unwrap_or_else(|_| {
                CommandReply::error(echo, code::SHUTTING_DOWN, "the router stopped")
            })
        })
    }
}

impl Handler<StopIntake> for CommandRouter {
    type Result = usize;

    fn handle(&mut self, stop: StopIntake, _ctx: &mut Self::Context) -> usize {
        self.intake_open = false;
        self.still_served = stop.still_served;
        self.in_flight
    }
}

impl Handler<InFlight> for CommandRouter {
    type Result = usize;

    fn handle(&mut self, _: InFlight, _ctx: &mut Self::Context) -> usize {
        self.in_flight
    }
}

impl Handler<StatsQuery> for CommandRouter {
    type Result = MessageResult<StatsQuery>;

    fn handle(&mut self, _: StatsQuery, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(json!({
            "role": self.settings.role,
            "received": self.counters.received,
            "ok": self.counters.ok,
            "errors": self.counters.errors,
            "in_flight": self.in_flight,
            "duplicates": self.dedup.hits(),
            "dead_letters_skipped": self.counters.dead_letters_skipped,
            "commands": self.routes.names(),
        }))
    }
}

impl Message for Inbound {
    type Result = ();
}

/// Serve a [`Command`] with a plain function: the quickest way to register a
/// small synchronous handler.
pub struct FnHandler<F> {
    function: F,
}

impl<F> FnHandler<F>
where
    F: FnMut(Command) -> Result<Value, HandlerError> + Unpin + 'static,
{
    pub fn new(function: F) -> Self {
        Self { function }
    }
}

impl<F: Unpin + 'static> Actor for FnHandler<F> {
    type Context = Context<Self>;
}

impl<F> Handler<Command> for FnHandler<F>
where
    F: FnMut(Command) -> Result<Value, HandlerError> + Unpin + 'static,
{
    type Result = Result<Value, HandlerError>;

    fn handle(&mut self, command: Command, _ctx: &mut Self::Context) -> Self::Result {
        (self.function)(command)
    }
}
crate::impl_inject_fault!(CommandRouter);
