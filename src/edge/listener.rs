//! `EdgeActor`: keeps one edge open under supervision.
//!
//! Opening a listener can fail for reasons that go away: the directory of an
//! ipc path does not exist yet, a tcp port is still held by a process that is
//! exiting, a permission is fixed by an operator. The edge actor tries to open
//! its edge when it starts; when that fails it logs the cause and stops, which
//! its supervisor counts as a crash and answers with a restart on the backoff
//! schedule. Once open, the edge is put in an [`EdgeSlot`] that the role
//! actor reads, so the role never waits for its socket and keeps serving
//! in-process traffic meanwhile.

use std::sync::{Arc, RwLock};

use actix::prelude::*;
use tracing::{info, warn};

use super::EdgeError;

/// What every edge can do: say where it is, and close.
pub trait Edge: Send + Sync + 'static {
    fn url(&self) -> &str;
    fn close(&self);
}

impl Edge for super::rep::RepEdge {
    fn url(&self) -> &str {
        super::rep::RepEdge::url(self)
    }

    fn close(&self) {
        super::rep::RepEdge::close(self)
    }
}

impl Edge for super::publish::PubEdge {
    fn url(&self) -> &str {
        super::publish::PubEdge::url(self)
    }

    fn close(&self) {
        super::publish::PubEdge::close(self)
    }
}

impl Edge for super::push::PushEdge {
    fn url(&self) -> &str {
        super::push::PushEdge::url(self)
    }

    fn close(&self) {
        super::push::PushEdge::close(self)
    }
}

/// The currently open edge of one socket, if any, shared by the edge actor
/// (which fills it) and the role actor (which uses it).
pub struct EdgeSlot<E> {
    current: Arc<RwLock<Option<Arc<E>>>>,
}

impl<E> Clone for EdgeSlot<E> {
    fn clone(&self) -> Self {
        Self {
            current: self.current.clone(),
        }
    }
}

impl<E> Default for EdgeSlot<E> {
    fn default() -> Self {
        Self {
            current: Arc::new(RwLock::new(None)),
        }
    }
}

impl<E: Edge> EdgeSlot<E> {
    /// A slot already holding `edge`, for a role given an edge opened by
    /// hand rather than by an [`EdgeActor`].
    pub fn holding(edge: Arc<E>) -> Self {
        Self {
            current: Arc::new(RwLock::new(Some(edge))),
        }
    }

    /// The open edge, or `None` while it is not (yet, or any more) open.
    pub fn get(&self) -> Option<Arc<E>> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub fn is_open(&self) -> bool {
        self.get().is_some()
    }

    fn set(&self, edge: Option<Arc<E>>) -> Option<Arc<E>> {
        let mut current = self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        std::mem::replace(&mut *current, edge)
    }

    /// Close the open edge, if any, and empty the slot.
    pub fn close(&self) {
        if let Some(edge) = self.set(None) {
            edge.close();
        }
    }
}

/// Opens an edge; called again on every restart.
pub type EdgeOpener<E> = Arc<dyn Fn() -> Result<E, EdgeError> + Send + Sync>;

/// Keeps one edge open; see the [module docs](self).
pub struct EdgeActor<E: Edge> {
    role: &'static str,
    open: EdgeOpener<E>,
    slot: EdgeSlot<E>,
}

impl<E: Edge> EdgeActor<E> {
    pub fn new(role: &'static str, open: EdgeOpener<E>, slot: EdgeSlot<E>) -> Self {
        Self { role, open, slot }
    }
}

impl<E: Edge + Unpin> Actor for EdgeActor<E> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        match (self.open)() {
            Ok(edge) => {
                info!(role = self.role, url = edge.url(), "edge open");
                if let Some(previous) = self.slot.set(Some(Arc::new(edge))) {
                    previous.close();
                }
            }
            Err(error) => {
                warn!(role = self.role, %error, "edge could not open; will retry");
                ctx.stop();
            }
        }
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.slot.close();
    }
}

crate::impl_inject_fault!(EdgeActor<crate::edge::rep::RepEdge>);
crate::impl_inject_fault!(EdgeActor<crate::edge::publish::PubEdge>);
crate::impl_inject_fault!(EdgeActor<crate::edge::push::PushEdge>);
