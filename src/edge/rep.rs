//! `RepEdge`: the REP side of the command and data buses.
//!
//! The edge opens a pool of NNG contexts on one REP socket, each with its own
//! `Aio`, so that many requests are in flight at once without a thread per
//! request. Each context cycles: receive, hand the body and a [`ReplySlot`] to
//! the sink (the router), wait for the slot to be filled, send, receive again.
//!
//! Every request gets exactly one reply: a [`ReplySlot`] dropped without a
//! reply sends a `shutting_down` error on its way out, so a context is never
//! left waiting.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use nng::{Aio, AioResult, Context, Listener, Message, Protocol, Socket};
use tracing::{debug, warn};

use super::{listen, remove_ipc_file, EdgeError, EdgeOptions};
use crate::wire::{code, CommandReply, Echo};

/// A received request body and where its reply goes.
pub struct Inbound {
    pub body: Message,
    pub reply: ReplySlot,
}

/// Where the edge hands received requests. Called on NNG's own threads: it
/// must not block (use `Addr::do_send`) and must not panic.
pub type InboundSink = Arc<dyn Fn(Inbound) + Send + Sync>;

/// The one reply a received request is owed.
pub struct ReplySlot {
    ctx: Context,
    aio: Aio,
    counters: Arc<RepCounters>,
    sent: bool,
    /// What the `shutting_down` reply of an unanswered slot echoes.
    echo: Echo,
}

impl ReplySlot {
    /// Name the request this slot answers, once it is decoded, so that the
    /// `shutting_down` reply of a slot dropped unanswered (its router
    /// crashed or stopped) still echoes its `job_uuid` and `request_id`.
    pub fn remember_echo(&mut self, echo: Echo) {
        self.echo = echo;
    }

    /// Send `body` as the reply and re-arm the context.
    pub fn send(mut self, body: &[u8]) {
        self.sent = true;
        self.send_now(body);
    }

    fn send_now(&self, body: &[u8]) {
        if let Err((_, err)) = self.ctx.send(&self.aio, Message::from(body)) {
            // The context is closed (shutdown) or the peer went away: the
            // reply cannot be delivered, so count it.
            self.counters.replies_lost.fetch_add(1, Ordering::Relaxed);
            debug!(error = %err, "reply not sent");
        }
    }
}

impl Drop for ReplySlot {
    fn drop(&mut self) {
        if !self.sent {
            let reply = CommandReply::error(
                std::mem::take(&mut self.echo),
                code::SHUTTING_DOWN,
                "the bus dropped this request before answering it",
            );
            self.counters
                .dropped_unanswered
                .fetch_add(1, Ordering::Relaxed);
            self.send_now(&reply.encode());
        }
    }
}

/// Counters of one REP edge.
#[derive(Debug, Default)]
pub struct RepCounters {
    pub received: AtomicU64,
    pub receive_errors: AtomicU64,
    pub replies_lost: AtomicU64,
    pub dropped_unanswered: AtomicU64,
}

/// The REP side of a command or data bus.
pub struct RepEdge {
    url: String,
    socket: Socket,
    _listener: Listener,
    // The Aio handles live here for the life of the edge: NNG's callback
    // holds only a weak reference, and dropping the last handle inside its own
    // callback would hang that NNG thread.
    slots: Vec<(Context, Aio)>,
    closed: Arc<AtomicBool>,
    counters: Arc<RepCounters>,
}

impl RepEdge {
    /// Listen on `url` and start `contexts` receive loops feeding `sink`.
    ///
    /// # Errors
    ///
    /// As [`listen`], plus [`EdgeError::Socket`] when NNG cannot allocate a
    /// socket, context or aio.
    pub fn listen(
        url: &str,
        options: &EdgeOptions,
        contexts: usize,
        sink: InboundSink,
    ) -> Result<RepEdge, EdgeError> {
        let socket = Socket::new(Protocol::Rep0)?;
        let listener = listen(&socket, url, options)?;
        let closed = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(RepCounters::default());
        let mut slots = Vec::with_capacity(contexts.max(1));
        for _ in 0..contexts.max(1) {
            let ctx = Context::new(&socket)?;
            let aio = Self::make_aio(ctx.clone(), sink.clone(), closed.clone(), counters.clone())?;
            ctx.recv(&aio)?;
            slots.push((ctx, aio));
        }
        Ok(RepEdge {
            url: url.to_string(),
            socket,
            _listener: listener,
            slots,
            closed,
            counters,
        })
    }

    fn make_aio(
        ctx: Context,
        sink: InboundSink,
        closed: Arc<AtomicBool>,
        counters: Arc<RepCounters>,
    ) -> Result<Aio, nng::Error> {
        Aio::new(move |aio, result| match result {
            AioResult::Recv(Ok(body)) => {
                counters.received.fetch_add(1, Ordering::Relaxed);
                let reply = ReplySlot {
                    ctx: ctx.clone(),
                    aio,
                    counters: counters.clone(),
                    sent: false,
                    echo: Echo::default(),
                };
                sink(Inbound { body, reply });
            }
            AioResult::Recv(Err(err)) => {
                if closed.load(Ordering::Acquire) || err == nng::Error::Closed {
                    return;
                }
                counters.receive_errors.fetch_add(1, Ordering::Relaxed);
                warn!(error = %err, "receive failed; re-arming");
                let _ = ctx.recv(&aio);
            }
            AioResult::Send(outcome) => {
                if let Err((_, err)) = outcome {
                    counters.replies_lost.fetch_add(1, Ordering::Relaxed);
                    debug!(error = %err, "reply not delivered");
                }
                if !closed.load(Ordering::Acquire) {
                    let _ = ctx.recv(&aio);
                }
            }
            AioResult::Sleep(_) => {}
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn counters(&self) -> &RepCounters {
        &self.counters
    }

    /// Stop receiving, close the socket and remove the ipc file.
    pub fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.socket.close();
        for (_, aio) in &self.slots {
            aio.cancel();
        }
        remove_ipc_file(&self.url);
    }
}

impl Drop for RepEdge {
    fn drop(&mut self) {
        self.close();
    }
}
