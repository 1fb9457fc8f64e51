//! `CommandRouter`: routes requests on the command bus (and, as a second
//! instance, the data bus) to the handler registered for each command.
//!
//! The routing itself lives in a [`RouterCore`] shared by every thread that
//! takes requests. The REP edge's sink decodes each request on the NNG
//! thread that received it; a request for an inline handler is routed and
//! run right there, any other comes to this actor as [`Decoded`], is routed
//! here and its handler call runs as a future of its own on the router's
//! context, so one slow handler never delays another command.
//! [`RouterCore::request`] routes an in-process request in its caller.
//! Every request gets exactly one reply.
//!
//! The actor also takes raw [`Inbound`] bodies (decoding them itself) and
//! keeps the bytes of requests that do not parse in the dead letter store.
//! Handlers live in a [`RouteTable`] shared with the bus, so a router
//! restarted by its supervisor still knows them, and the core outlives the
//! actor, so a restart keeps the duplicate cache.

mod routes;
mod routing;

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use serde_json::Value;
use tokio::sync::oneshot;
use tracing::{debug, warn};

pub use self::routes::{HandlerResolver, InlineHandler, Route, RouteTable};
pub use self::routing::{Call, ReplyTo, RouterCore};
use crate::dead_letter::{Bury, DeadLetter};
use crate::edge::rep::{Inbound, ReplySlot};
use crate::message::{Command, HandlerError, StatsQuery};
use crate::wire::{code, CommandReply, CommandRequest, Echo, WireError};

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

impl RouterSettings {
    /// The settings of the router `role` of a bus configured by `config`.
    pub fn from_config(config: &crate::config::BusConfig, role: &'static str) -> Self {
        Self {
            role,
            default_command: config.default_command.clone(),
            max_message_size: config.max_message_size,
            handler_timeout: config.handler_timeout,
            max_in_flight: config.max_commands_in_flight,
            dedup_capacity: config.dedup_capacity,
            dedup_ttl: config.dedup_ttl,
        }
    }
}

impl Default for RouterSettings {
    fn default() -> Self {
        Self::from_config(&crate::config::BusConfig::default(), "command")
    }
}

/// Send a typed command through the router in-process and get its reply.
/// [`RouterCore::request`] does the same without the trip through this
/// actor's mailbox.
#[derive(Debug, Message)]
#[rtype(result = "CommandReply")]
pub struct Dispatch {
    pub request: CommandRequest,
}

/// A request the edge has decoded, for the router to route on its own
/// thread: the call to an actor handler runs there anyway, and routing it
/// there keeps the NNG threads free to receive.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Decoded {
    pub request: CommandRequest,
    pub reply: ReplySlot,
}

impl Decoded {
    /// Answer the request with `code` without routing it.
    pub fn refuse(self, code: &str, text: &str) {
        let reply = CommandReply::error(self.request.echo(), code, text);
        self.reply.send(&reply.encode());
    }
}

impl Inbound {
    /// Answer a body no router took with `code`.
    pub fn refuse(self, code: &str, text: &str) {
        let reply = CommandReply::error(Echo::salvage(&self.body), code, text);
        self.reply.send(&reply.encode());
    }
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
    core: Arc<RouterCore>,
    dead_letters: Option<Recipient<Bury>>,
    dead_letters_pending: usize,
}

impl CommandRouter {
    /// A router with a core of its own.
    pub fn new(settings: RouterSettings, routes: RouteTable) -> Self {
        Self::with_core(Arc::new(RouterCore::new(settings, routes)))
    }

    /// A router over `core`, which may outlive it (the bus keeps one core
    /// across restarts of its router).
    pub fn with_core(core: Arc<RouterCore>) -> Self {
        Self {
            core,
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

    fn role(&self) -> &'static str {
        self.core.settings().role
    }

    fn reject(&mut self, body: &[u8], err: WireError, reply_to: ReplyTo, ctx: &mut Context<Self>) {
        debug!(router = self.role(), code = err.code, error = %err, "request rejected");
        let echo = if err.code == code::TOO_LARGE {
            Echo::default()
        } else {
            Echo::salvage(body)
        };
        if err.code == code::BAD_REQUEST {
            self.bury(body, &err, ctx);
        }
        self.core
            .answer_now(reply_to, CommandReply::error(echo, err.code, err.message));
    }

    /// Keep an unparseable body in the dead letter store, unless
    /// [`MAX_DEAD_LETTERS_PENDING`] are already on their way there.
    fn bury(&mut self, body: &[u8], err: &WireError, ctx: &mut Context<Self>) {
        let Some(dead_letters) = self.dead_letters.clone() else {
            return;
        };
        if self.dead_letters_pending >= MAX_DEAD_LETTERS_PENDING {
            let skipped = self.core.count_dead_letter_skipped();
            if skipped % DEAD_LETTER_SKIP_LOG_INTERVAL == 1 {
                warn!(
                    router = self.role(),
                    skipped,
                    pending = self.dead_letters_pending,
                    "dead letter store behind; unparseable request answered, not kept"
                );
            }
            return;
        }
        self.dead_letters_pending += 1;
        let entry = DeadLetter::unparseable(self.role(), body, err.message.clone());
        let stored = dead_letters.send(Bury { entry });
        ctx.spawn(stored.into_actor(self).map(|_, router, _| {
            router.dead_letters_pending -= 1;
        }));
    }

    /// Run `call` as a future of its own, so the router keeps serving while
    /// the handler works. A call still running when the router stops is
    /// answered `shutting_down` as it is dropped.
    fn spawn_call(&mut self, call: Call, ctx: &mut Context<Self>) {
        ctx.spawn(actix::fut::wrap_future(call.run()));
    }
}

impl Actor for CommandRouter {
    type Context = Context<Self>;

    fn started(&mut self, _ctx: &mut Self::Context) {
        debug!(router = self.role(), "router started");
    }
}

impl Handler<Inbound> for CommandRouter {
    type Result = ();

    fn handle(&mut self, inbound: Inbound, ctx: &mut Self::Context) {
        let Inbound { body, mut reply } = inbound;
        match CommandRequest::decode(&body, self.core.settings().max_message_size) {
            Ok(request) => {
                reply.remember_echo(request.echo());
                if let Some(call) = self.core.accept(request, ReplyTo::Edge(reply)) {
                    self.spawn_call(call, ctx);
                }
            }
            Err(err) => self.reject(&body, err, ReplyTo::Edge(reply), ctx),
        }
    }
}

impl Handler<Decoded> for CommandRouter {
    type Result = ();

    fn handle(&mut self, decoded: Decoded, ctx: &mut Self::Context) {
        let Decoded { request, reply } = decoded;
        if let Some(call) = self.core.accept(request, ReplyTo::Edge(reply)) {
            self.spawn_call(call, ctx);
        }
    }
}

impl Handler<Dispatch> for CommandRouter {
    type Result = ResponseFuture<CommandReply>;

    fn handle(&mut self, dispatch: Dispatch, ctx: &mut Self::Context) -> Self::Result {
        let echo = dispatch.request.echo();
        let (sender, receiver) = oneshot::channel();
        if let Some(call) = self.core.accept(dispatch.request, ReplyTo::Local(sender)) {
            self.spawn_call(call, ctx);
        }
        Box::pin(async move {
            receiver.await.unwrap_or_else(|_| {
                CommandReply::error(echo, code::SHUTTING_DOWN, "the router stopped")
            })
        })
    }
}

impl Handler<StatsQuery> for CommandRouter {
    type Result = MessageResult<StatsQuery>;

    fn handle(&mut self, _: StatsQuery, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(self.core.stats())
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
