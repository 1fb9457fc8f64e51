//! `RouteTable`: which handler serves each command name.
//!
//! A command is served either by an actor (the usual way: the router sends
//! it a [`Command`] and awaits the answer) or by an inline function, which
//! runs on the thread that received the request, with no hand-off at all.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use actix::prelude::*;
use serde_json::Value;

use crate::message::{Command, HandlerError};

/// Resolves a command name to the handler's current address. A supervised
/// handler's resolver returns the live instance, or `None` while it restarts.
pub type HandlerResolver = Arc<dyn Fn() -> Option<Recipient<Command>> + Send + Sync>;

/// A handler run on the thread that received the request: an NNG thread
/// for requests from a socket, the caller's thread for in-process ones.
///
/// It saves the hand-off to an actor's thread and back, which is most of a
/// round trip's cost for a cheap command, at a price: it must be quick and
/// must not block, since it holds up that thread's other work, and the
/// handler timeout cannot stop it. A panic fails only its own request
/// (`handler_failed`). Anything slow, stateful or async belongs in an actor.
pub type InlineHandler = Arc<dyn Fn(Command) -> Result<Value, HandlerError> + Send + Sync>;

/// How one command name is served.
#[derive(Clone)]
pub enum Route {
    Actor(HandlerResolver),
    Inline(InlineHandler),
}

/// A resolver that always returns `handler`.
fn fixed(handler: Recipient<Command>) -> Route {
    Route::Actor(Arc::new(move || Some(handler.clone())))
}

/// The handlers of one router, shared with the bus that registers them.
#[derive(Clone, Default)]
pub struct RouteTable {
    routes: Arc<RwLock<HashMap<String, Route>>>,
}

impl RouteTable {
    /// Route `name` to `handler`, replacing any earlier handler.
    pub fn register(&self, name: impl Into<String>, handler: Recipient<Command>) {
        self.write().insert(name.into(), fixed(handler));
    }

    /// Route `name` to whatever `resolver` returns at the time of each call.
    pub fn register_resolver(&self, name: impl Into<String>, resolver: HandlerResolver) {
        self.write().insert(name.into(), Route::Actor(resolver));
    }

    /// Serve `name` with `handler` on the receiving thread (see
    /// [`InlineHandler`] for what such a handler may do).
    pub fn register_inline<F>(&self, name: impl Into<String>, handler: F)
    where
        F: Fn(Command) -> Result<Value, HandlerError> + Send + Sync + 'static,
    {
        self.write()
            .insert(name.into(), Route::Inline(Arc::new(handler)));
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

    /// Whether `name` is served by an inline handler.
    pub fn is_inline(&self, name: &str) -> bool {
        matches!(self.read().get(name), Some(Route::Inline(_)))
    }

    pub(crate) fn resolve(&self, name: &str) -> Option<Route> {
        self.read().get(name).cloned()
    }

    // No user code runs under this lock, so a panic elsewhere cannot leave
    // the table half-written; recovering a poisoned guard is safe.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Route>> {
        self.routes
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Route>> {
        self.routes
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
