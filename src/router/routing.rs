//! `RouterCore`: the routing state of one bus, shared by every thread that
//! takes requests.
//!
//! The core decides each request's fate (answer at once, park behind its
//! first copy, or run a handler) under one short lock, and never runs user
//! code under it. It is shared, not owned by the router actor, so that a
//! request for an inline handler can be routed and run on the NNG thread
//! that received it, and an in-process request in the caller of
//! [`RouterCore::request`]: neither crosses to another thread. Because the
//! core outlives the router actor, a router restart keeps the duplicate
//! cache and the counters.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use actix::prelude::*;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tracing::{debug, error, warn};

use super::routes::{InlineHandler, Route, RouteTable};
use super::RouterSettings;
use crate::dedup::{Admission, DedupCache};
use crate::edge::rep::ReplySlot;
use crate::message::Command;
use crate::wire::{code, nesting_depth, CommandReply, CommandRequest, Echo, MAX_NESTING};

/// Where one request's reply goes.
pub enum ReplyTo {
    Edge(ReplySlot),
    Local(oneshot::Sender<CommandReply>),
}

impl ReplyTo {
    fn send(self, reply: CommandReply) {
        match self {
            ReplyTo::Edge(slot) => slot.send(&reply.encode()),
            ReplyTo::Local(sender) => {
                let _ = sender.send(reply);
            }
        }
    }

    /// Send `reply`, whose encoding is `encoded` when that is at hand (an
    /// edge then sends those bytes as they are).
    fn send_encoded(self, reply: CommandReply, encoded: Option<&[u8]>) {
        match (self, encoded) {
            (ReplyTo::Edge(slot), Some(bytes)) => slot.send(bytes),
            (reply_to, _) => reply_to.send(reply),
        }
    }
}

/// A finished reply as the duplicate cache keeps it: encoded, one
/// allocation, so that keeping and evicting it costs a copy and a free
/// rather than a deep clone and a deep drop of its JSON.
type CachedReply = Arc<[u8]>;

#[derive(Debug, Default)]
struct RouterCounters {
    received: u64,
    ok: u64,
    errors: HashMap<&'static str, u64>,
    dead_letters_skipped: u64,
    inline_panics: u64,
}

impl RouterCounters {
    fn count(&mut self, reply: &CommandReply, replies: usize) {
        let replies = replies as u64;
        match reply.code() {
            None => self.ok += replies,
            Some(code) => *self.errors.entry(known_code(code)).or_default() += replies,
        }
    }
}

struct CoreState {
    dedup: DedupCache<CachedReply, ReplyTo>,
    in_flight: usize,
    intake_open: bool,
    still_served: Vec<String>,
    counters: RouterCounters,
}

/// What the lock-holding part of [`RouterCore::accept`] decided.
enum Decision {
    /// Answer now with an error.
    Answer(ReplyTo, CommandReply),
    /// A duplicate of a finished request: answer with the cached reply.
    Cached(ReplyTo, CachedReply),
    /// A duplicate of a running request, parked until it completes.
    Parked,
    /// Run the handler; the in-flight count already includes it.
    Run(ReplyTo, Route),
}

/// The routing state of one router. See the module doc.
pub struct RouterCore {
    settings: RouterSettings,
    routes: RouteTable,
    state: Mutex<CoreState>,
}

impl RouterCore {
    pub fn new(settings: RouterSettings, routes: RouteTable) -> Self {
        let dedup = DedupCache::new(settings.dedup_capacity, settings.dedup_ttl);
        Self {
            settings,
            routes,
            state: Mutex::new(CoreState {
                dedup,
                in_flight: 0,
                intake_open: true,
                still_served: Vec::new(),
                counters: RouterCounters::default(),
            }),
        }
    }

    pub fn settings(&self) -> &RouterSettings {
        &self.settings
    }

    /// Run `request` in-process and return its reply: routed in the caller,
    /// with duplicate tracking, the handler timeout and the limits of a
    /// request from a socket. An actor handler gets the command in its
    /// mailbox; an inline handler runs here.
    ///
    /// Needs a tokio runtime (for the handler timeout); an actix system is
    /// one.
    ///
    /// # Cancellation safety
    ///
    /// Dropping the future abandons the call: the reply is lost, a
    /// duplicate parked behind it gets `shutting_down`, and the command is
    /// not remembered as done, so a later duplicate runs it again. An actor
    /// handler that already has the command in its mailbox still runs it.
    pub async fn request(self: &Arc<Self>, request: CommandRequest) -> CommandReply {
        let echo = request.echo();
        let (sender, receiver) = oneshot::channel();
        if let Some(call) = self.accept(request, ReplyTo::Local(sender)) {
            call.run().await;
        }
        receiver.await.unwrap_or_else(|_| {
            CommandReply::error(echo, code::SHUTTING_DOWN, "the router stopped")
        })
    }

    /// Whether `request` goes to an inline handler, to be routed and run
    /// on the receiving thread.
    pub fn serves_inline(&self, request: &CommandRequest) -> bool {
        let default = self.settings.default_command.as_deref();
        request
            .command
            .as_deref()
            .or(default)
            .is_some_and(|name| self.routes.is_inline(name))
    }

    /// Decide a request's fate: answer it now, park it behind its first
    /// copy, or hand back the [`Call`] that runs its handler.
    pub fn accept(self: &Arc<Self>, request: CommandRequest, reply_to: ReplyTo) -> Option<Call> {
        let echo = request.echo();
        let Some(name) = request
            .command
            .clone()
            .or_else(|| self.settings.default_command.clone())
        else {
            let text = "request has no `command` and the bus has no default route";
            self.answer_now(reply_to, CommandReply::error(echo, code::BAD_REQUEST, text));
            return None;
        };
        let route = self.routes.resolve(&name);
        let key = request.dedup_key().map(str::to_string);

        let (reply_to, route) = match self.decide(&name, route, key.as_deref(), reply_to, &echo) {
            Decision::Answer(reply_to, reply) => {
                reply_to.send(reply);
                return None;
            }
            Decision::Cached(reply_to, cached) => {
                debug!(
                    router = self.settings.role,
                    key, "duplicate answered from cache"
                );
                let reply = match CommandReply::decode(&cached) {
                    Ok(reply) => reply.with_echo(echo),
                    Err(err) => CommandReply::error(echo, code::HANDLER_FAILED, err.message),
                };
                self.lock().counters.count(&reply, 1);
                reply_to.send(reply);
                return None;
            }
            Decision::Parked => {
                debug!(router = self.settings.role, key, "duplicate parked");
                return None;
            }
            Decision::Run(reply_to, route) => (reply_to, route),
        };

        // Resolving a supervised handler takes the supervisor's lock, so it
        // happens outside the core's.
        let target = match route {
            Route::Inline(handler) => Some(Target::Inline(handler)),
            Route::Actor(resolver) => resolver().map(Target::Actor),
        };
        let call = Call {
            core: self.clone(),
            command: Some(Command {
                name: name.clone(),
                request,
            }),
            name,
            echo,
            key,
            target,
            reply_to: Some(reply_to),
        };
        if call.target.is_none() {
            let text = format!("the handler for `{}` is restarting; try again", call.name);
            call.refuse(code::HANDLER_FAILED, text);
            return None;
        }
        Some(call)
    }

    /// The part of [`RouterCore::accept`] that needs the lock.
    fn decide(
        &self,
        name: &str,
        route: Option<Route>,
        key: Option<&str>,
        reply_to: ReplyTo,
        echo: &Echo,
    ) -> Decision {
        let mut state = self.lock();
        state.counters.received += 1;
        let closed = !state.intake_open && !state.still_served.iter().any(|s| s == name);
        let route = match route {
            _ if closed => Err((code::SHUTTING_DOWN, "the bus is shutting down".to_string())),
            None => Err((code::UNKNOWN_COMMAND, format!("unknown command `{name}`"))),
            Some(_) if state.in_flight >= self.settings.max_in_flight => Err((
                code::OVERLOADED,
                format!("{} commands are running; try again later", state.in_flight),
            )),
            Some(route) => Ok(route),
        };
        let route = match route {
            Ok(route) => route,
            Err((code, text)) => {
                let reply = CommandReply::error(echo.clone(), code, text);
                state.counters.count(&reply, 1);
                return Decision::Answer(reply_to, reply);
            }
        };

        let reply_to = match key {
            None => reply_to,
            Some(key) => match state.dedup.admit(key, reply_to, Instant::now()) {
                Admission::New(reply_to) => reply_to,
                Admission::Parked => return Decision::Parked,
                Admission::Answered(cached, reply_to) => {
                    return Decision::Cached(reply_to, cached);
                }
            },
        };
        state.in_flight += 1;
        Decision::Run(reply_to, route)
    }

    /// Record a call's end and return whoever is owed its reply. `cached`
    /// is kept for later duplicates; `None` keeps nothing (a refusal that
    /// says "try again" must not be kept, or the retry would get it too).
    fn close(
        &self,
        key: Option<&str>,
        reply: &CommandReply,
        cached: Option<CachedReply>,
    ) -> Vec<ReplyTo> {
        let mut state = self.lock();
        state.in_flight -= 1;
        let waiters = match (key, cached) {
            (None, _) => Vec::new(),
            (Some(key), Some(cached)) => state.dedup.complete(key, cached, Instant::now()),
            (Some(key), None) => state.dedup.abandon(key),
        };
        state.counters.count(reply, waiters.len() + 1);
        waiters
    }

    /// Answer, and count, a request that never reached a handler's route
    /// (it did not decode, or named no command).
    pub fn answer_now(&self, reply_to: ReplyTo, reply: CommandReply) {
        {
            let mut state = self.lock();
            state.counters.received += 1;
            state.counters.count(&reply, 1);
        }
        reply_to.send(reply);
    }

    /// Count an unparseable request that was answered but not kept.
    pub fn count_dead_letter_skipped(&self) -> u64 {
        let mut state = self.lock();
        state.counters.dead_letters_skipped += 1;
        state.counters.dead_letters_skipped
    }

    /// Stop taking new requests, except for the commands in `still_served`;
    /// returns the number still running.
    pub fn stop_intake(&self, still_served: Vec<String>) -> usize {
        let mut state = self.lock();
        state.intake_open = false;
        state.still_served = still_served;
        state.in_flight
    }

    /// How many commands are running now.
    pub fn in_flight(&self) -> usize {
        self.lock().in_flight
    }

    /// The router's counters, as `status` and `system.health` show them.
    pub fn stats(&self) -> Value {
        let state = self.lock();
        json!({
            "role": self.settings.role,
            "received": state.counters.received,
            "ok": state.counters.ok,
            "errors": state.counters.errors,
            "in_flight": state.in_flight,
            "duplicates": state.dedup.hits(),
            "dead_letters_skipped": state.counters.dead_letters_skipped,
            "inline_panics": state.counters.inline_panics,
            "commands": self.routes.names(),
        })
    }

    // No user code runs under this lock (replies are sent after it is
    // released), so a poisoned guard holds consistent state.
    fn lock(&self) -> MutexGuard<'_, CoreState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Who runs an admitted command.
enum Target {
    Actor(Recipient<Command>),
    Inline(InlineHandler),
}

/// One admitted handler call. Run it with [`Call::run`] (or, for an inline
/// handler, [`Call::run_inline`] on the receiving thread). A call dropped
/// before it ran to the end still answers: `shutting_down`, to its caller
/// and to every duplicate parked behind it.
pub struct Call {
    core: Arc<RouterCore>,
    name: String,
    echo: Echo,
    key: Option<String>,
    target: Option<Target>,
    command: Option<Command>,
    reply_to: Option<ReplyTo>,
}

impl Call {
    /// Run the handler and send its reply. An actor handler's call ends at
    /// the handler timeout.
    pub async fn run(mut self) {
        let Some(command) = self.command.take() else {
            return;
        };
        let handler = match self.target.take() {
            Some(Target::Actor(handler)) => handler,
            Some(Target::Inline(handler)) => return self.finish_inline(&handler, command),
            None => return,
        };
        let timeout = self.core.settings.handler_timeout;
        let outcome = handler.send(command).timeout(timeout).await;
        // Past this point the call cannot be dropped unanswered, so its
        // echo moves into the reply.
        let echo = std::mem::take(&mut self.echo);
        let reply = match outcome {
            Ok(Ok(result)) => result_reply(echo, &self.name, result),
            Ok(Err(err)) => CommandReply::error(echo, err.code, err.message),
            Err(MailboxError::Timeout) => {
                let text = format!(
                    "`{}` did not answer within {} ms",
                    self.name,
                    timeout.as_millis()
                );
                CommandReply::error(echo, code::TIMEOUT, text)
            }
            Err(MailboxError::Closed) => {
                warn!(router = self.core.settings.role, command = %self.name, "handler is gone");
                let text = format!("the handler for `{}` crashed or stopped", self.name);
                CommandReply::error(echo, code::HANDLER_FAILED, text)
            }
        };
        self.finish(reply, true);
    }

    /// Run an inline handler here and send its reply. Does nothing for an
    /// actor handler's call (use [`Call::run`]).
    pub fn run_inline(mut self) {
        if let (Some(Target::Inline(handler)), Some(command)) =
            (self.target.take(), self.command.take())
        {
            self.finish_inline(&handler, command);
        }
    }

    fn finish_inline(mut self, handler: &InlineHandler, command: Command) {
        let outcome = catch_unwind(AssertUnwindSafe(|| handler(command)));
        let echo = std::mem::take(&mut self.echo);
        let reply = match outcome {
            Ok(Ok(result)) => result_reply(echo, &self.name, result),
            Ok(Err(err)) => CommandReply::error(echo, err.code, err.message),
            Err(_) => {
                self.core.lock().counters.inline_panics += 1;
                error!(router = self.core.settings.role, command = %self.name, "inline handler panicked");
                let text = format!("the handler for `{}` panicked", self.name);
                CommandReply::error(echo, code::HANDLER_FAILED, text)
            }
        };
        self.finish(reply, true);
    }

    /// End the call without running it, with an error that invites a
    /// retry: it is not kept for duplicates.
    pub fn refuse(mut self, code: &str, text: impl Into<String>) {
        let reply = CommandReply::error(self.echo.clone(), code, text);
        self.finish(reply, false);
    }

    fn finish(&mut self, reply: CommandReply, cache: bool) {
        let Some(reply_to) = self.reply_to.take() else {
            return;
        };
        // A reply kept for later duplicates is encoded once, outside the
        // lock, and those bytes also go to every edge waiting now.
        let remember = cache && self.key.is_some() && self.core.settings.dedup_capacity > 0;
        let cached: Option<CachedReply> = remember.then(|| reply.encode().into());
        let waiters = self.core.close(self.key.as_deref(), &reply, cached.clone());
        for waiter in waiters {
            waiter.send_encoded(reply.clone(), cached.as_deref());
        }
        reply_to.send_encoded(reply, cached.as_deref());
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if self.reply_to.is_some() {
            debug!(router = self.core.settings.role, command = %self.name, "call dropped unanswered");
            let text = format!("the router stopped before `{}` answered", self.name);
            let reply = CommandReply::error(self.echo.clone(), code::SHUTTING_DOWN, text);
            self.finish(reply, false);
        }
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
    code::ALL
        .into_iter()
        .find(|known| *known == value)
        .unwrap_or("other")
}
