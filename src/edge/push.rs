//! `PushEdge`: the PUSH side of the job queue, for plain PULL peers such as
//! dgbit's Python worker.
//!
//! # At most once
//!
//! A PULL peer acknowledges nothing, so a job pushed to it is handed off at
//! most once: if the peer dies with the job, the job is gone. The edge makes
//! that loss as unlikely as it can:
//!
//! - It sends only while at least one PULL peer is connected (pipes are
//!   tracked with `pipe_notify`), so jobs wait in the dispatcher's queue,
//!   where they can be seen and cancelled, rather than in NNG's buffers.
//! - One send is outstanding at a time, on an `Aio` with its own timeout
//!   (socket timeouts do not apply to asynchronous sends). A send that times
//!   out or fails hands its job back unsent ([`PushOutcome::Returned`]).
//! - A completed send means NNG accepted the body for a connected peer
//!   ([`PushOutcome::HandedOff`]).
//!
//! The edge listens by default; it can dial instead, for dgbit's Python
//! worker, which listens.
//!
//! # Threads
//!
//! Outcomes are produced on NNG's threads. The callback records them in a
//! queue and pokes the registered notice target with `do_send`; the
//! dispatcher drains the queue with [`PushEdge::take_outcomes`] on each
//! notice and on its own timer, so an outcome is not lost when the notice
//! target was restarting. The callback never panics and never owns the last
//! handle of its `Aio`: the edge keeps one until [`Drop`], which cancels and
//! waits for the operation first.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use actix::prelude::*;
use nng::{Aio, AioResult, Pipe, PipeEvent, Protocol, Socket};
use serde_json::{json, Value};
use tracing::{debug, info, warn};

use crate::edge::{dial, listen, remove_ipc_file, EdgeError, EdgeOptions};
use crate::wire::JobMessage;

/// How long one push may wait for a peer to take it. Default 1 s.
pub const DEFAULT_PUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// Sent to the notice target when something changed: a peer connected or a
/// send finished. Drain [`PushEdge::take_outcomes`] on receipt.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct PushNotice;

/// What became of a pushed job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushOutcome {
    /// NNG took the job for a connected PULL peer.
    HandedOff {
        /// The job pushed.
        job_id: String,
    },
    /// The job was not sent (timeout, peer gone, socket closed).
    Returned {
        /// The job not sent.
        job_id: String,
        /// NNG's reason.
        error: String,
    },
}

/// Why [`PushEdge::push`] did not start a send.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// No PULL peer is connected.
    #[error("no PULL peer is connected")]
    NoPeer,
    /// Another push is in progress.
    #[error("a push is already in progress")]
    Busy,
    /// The socket is closed.
    #[error("the push edge is closed")]
    Closed,
    /// NNG refused the send, with its reason.
    #[error("push failed: {0}")]
    Send(String),
}

#[derive(Default)]
struct Shared {
    peers: Mutex<HashSet<Pipe>>,
    sending: Mutex<Option<String>>,
    outcomes: Mutex<VecDeque<PushOutcome>>,
    notice: Mutex<Option<Recipient<PushNotice>>>,
    handed_off: AtomicU64,
    returned: AtomicU64,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn notify(&self) {
        if let Some(target) = lock(&self.notice).as_ref() {
            target.do_send(PushNotice);
        }
    }

    /// The send callback: record the outcome and poke the dispatcher.
    fn on_send(&self, result: AioResult) {
        let job_id = lock(&self.sending).take();
        let Some(job_id) = job_id else { return };
        let outcome = match result {
            AioResult::Send(Ok(())) => {
                self.handed_off.fetch_add(1, Ordering::Relaxed);
                PushOutcome::HandedOff { job_id }
            }
            AioResult::Send(Err((_, err))) => {
                self.returned.fetch_add(1, Ordering::Relaxed);
                debug!(job_id, error = %err, "push returned unsent");
                PushOutcome::Returned {
                    job_id,
                    error: err.to_string(),
                }
            }
            other => {
                self.returned.fetch_add(1, Ordering::Relaxed);
                PushOutcome::Returned {
                    job_id,
                    error: format!("unexpected aio result {other:?}"),
                }
            }
        };
        lock(&self.outcomes).push_back(outcome);
        self.notify();
    }

    fn on_pipe(&self, pipe: Pipe, event: PipeEvent) {
        let peers = {
            let mut peers = lock(&self.peers);
            match event {
                PipeEvent::AddPost => {
                    peers.insert(pipe);
                }
                PipeEvent::RemovePost => {
                    peers.remove(&pipe);
                }
                _ => return,
            }
            peers.len()
        };
        debug!(peers, event = ?event, "job queue peer change");
        self.notify();
    }
}

/// The PUSH edge; see the module docs.
pub struct PushEdge {
    url: String,
    socket: Socket,
    aio: Aio,
    shared: Arc<Shared>,
    /// Whether the edge listens (and so owns its ipc file).
    listening: bool,
    closed: std::sync::atomic::AtomicBool,
}

impl PushEdge {
    /// Listen on `url` for PULL peers (the default mode).
    ///
    /// # Errors
    ///
    /// As [`crate::edge::listen`]; [`EdgeError::Socket`] when NNG cannot
    /// create the socket or `Aio`.
    pub fn listen(url: &str, options: &EdgeOptions, timeout: Duration) -> Result<Self, EdgeError> {
        let (socket, aio, shared) = Self::open(timeout)?;
        // NNG closes the listener with the socket.
        listen(&socket, url, options)?;
        info!(url, "job queue push edge listening");
        Ok(Self {
            url: url.to_string(),
            socket,
            aio,
            shared,
            listening: true,
            closed: Default::default(),
        })
    }

    /// Dial a PULL peer that listens on `url` (dgbit's Python worker);
    /// NNG reconnects in the background.
    ///
    /// # Errors
    ///
    /// As [`crate::edge::dial`]; [`EdgeError::Socket`] when NNG cannot
    /// create the socket or `Aio`.
    pub fn dial(url: &str, options: &EdgeOptions, timeout: Duration) -> Result<Self, EdgeError> {
        let (socket, aio, shared) = Self::open(timeout)?;
        dial(&socket, url, options)?;
        info!(url, "job queue push edge dialing");
        Ok(Self {
            url: url.to_string(),
            socket,
            aio,
            shared,
            listening: false,
            closed: Default::default(),
        })
    }

    fn open(timeout: Duration) -> Result<(Socket, Aio, Arc<Shared>), EdgeError> {
        let socket = Socket::new(Protocol::Push0)?;
        let shared = Arc::new(Shared::default());
        let for_pipes = shared.clone();
        socket.pipe_notify(move |pipe, event| for_pipes.on_pipe(pipe, event))?;
        let for_sends = shared.clone();
        // The callback's own `Aio` argument is dropped at its end; the edge
        // holds another handle, so it is never the last one.
        let aio = Aio::new(move |_aio, result| for_sends.on_send(result))?;
        aio.set_timeout(Some(timeout))?;
        Ok((socket, aio, shared))
    }

    /// The address this edge listens on or dials.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Where to send [`PushNotice`]s; replaces the previous target (a
    /// restarted dispatcher registers itself again).
    pub fn set_notice_target(&self, target: Recipient<PushNotice>) {
        *lock(&self.shared.notice) = Some(target);
    }

    /// Connected PULL peers.
    pub fn peers(&self) -> usize {
        lock(&self.shared.peers).len()
    }

    /// Whether a push would start now: a peer is connected and no push is in
    /// progress.
    pub fn is_ready(&self) -> bool {
        self.peers() > 0 && lock(&self.shared.sending).is_none()
    }

    /// Start pushing `job`; its outcome arrives through
    /// [`PushEdge::take_outcomes`].
    ///
    /// # Errors
    ///
    /// [`PushError::NoPeer`] with no PULL peer connected, [`PushError::Busy`]
    /// while another push is in progress, [`PushError::Closed`] or
    /// [`PushError::Send`] when NNG refuses to start the send. In every case
    /// nothing was sent.
    pub fn push(&self, job: &JobMessage) -> Result<(), PushError> {
        if self.peers() == 0 {
            return Err(PushError::NoPeer);
        }
        {
            let mut sending = lock(&self.shared.sending);
            if sending.is_some() {
                return Err(PushError::Busy);
            }
            *sending = Some(job.job_id.clone());
        }
        // The slot is set before the send starts, so the callback always
        // finds the job id it completes.
        match self
            .socket
            .send_async(&self.aio, nng::Message::from(&job.encode()[..]))
        {
            Ok(()) => Ok(()),
            Err((_, err)) => {
                lock(&self.shared.sending).take();
                Err(match err {
                    nng::Error::Closed => PushError::Closed,
                    other => PushError::Send(other.to_string()),
                })
            }
        }
    }

    /// The outcomes of finished pushes, oldest first.
    pub fn take_outcomes(&self) -> Vec<PushOutcome> {
        lock(&self.shared.outcomes).drain(..).collect()
    }

    /// Counters for the stats.
    pub fn stats(&self) -> Value {
        json!({
            "url": self.url,
            "peers": self.peers(),
            "sending": lock(&self.shared.sending).is_some(),
            "handed_off": self.shared.handed_off.load(Ordering::Relaxed),
            "returned": self.shared.returned.load(Ordering::Relaxed),
        })
    }
}

impl PushEdge {
    /// Close the socket (a push in progress fails with `Closed` and its job
    /// goes back to the queue) and remove the ipc file if the edge listens.
    /// Calling it again does nothing.
    pub fn close(&self) {
        if self.closed.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        self.socket.close();
        if self.listening {
            remove_ipc_file(&self.url);
        }
    }
}

impl Drop for PushEdge {
    fn drop(&mut self) {
        // Finish the callback before the socket and the last Aio handle go.
        self.aio.cancel();
        self.aio.wait();
        self.close();
        let pending = lock(&self.shared.outcomes).len();
        if pending > 0 {
            warn!(pending, "push edge closed with outcomes nobody collected");
        }
    }
}
