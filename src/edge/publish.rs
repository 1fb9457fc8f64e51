//! `PubEdge`: the PUB socket of the event bus.
//!
//! The edge listens on the event address and sends each event's bytes to
//! every connected subscriber. Sending never blocks: NNG's PUB protocol hands
//! a message to each peer's queue and, when a peer's queue is full, throws
//! away that queue's oldest message to make room (see DESIGN.md section 4).
//! NNG's default queue is 16 messages per peer; the edge raises it to
//! [`DEFAULT_PEER_QUEUE`] (or what [`PubEdge::listen_with_queue`] asks for)
//! so that a burst does not cost a briefly busy subscriber its events.
//! The edge also sends with NNG's non-blocking flag, so that a future NNG
//! which did block would fail the send instead of stalling the publisher.
//!
//! # Known limits
//!
//! A message NNG drops from a slow peer's queue is invisible to the bus: NNG
//! keeps no counter for it, so only failed sends are counted (by the
//! [`TopicPublisher`](crate::publisher::TopicPublisher)). Events sent while
//! no subscriber is connected are not kept for later subscribers.

use std::sync::atomic::{AtomicBool, Ordering};

use nng::options::{Options, SendBufferSize};
use nng::{Protocol, Socket};
use tracing::debug;

use super::{listen, remove_ipc_file, EdgeError, EdgeOptions};

/// Messages NNG queues per connected subscriber before it drops the oldest.
pub const DEFAULT_PEER_QUEUE: usize = 1024;

/// The largest per-subscriber queue NNG accepts.
pub const MAX_PEER_QUEUE: usize = 8192;

/// The PUB side of the event bus, listening on one address.
///
/// Shared as `Arc<PubEdge>` between the publisher and whoever closes the bus;
/// every method takes `&self`.
#[derive(Debug)]
pub struct PubEdge {
    socket: Socket,
    url: String,
    closed: AtomicBool,
}

impl PubEdge {
    /// Open a PUB socket and listen on `url`.
    ///
    /// # Errors
    ///
    /// As [`crate::edge::listen`]: [`EdgeError::InUse`] when a live process
    /// holds the ipc path, [`EdgeError::Listen`] when NNG refuses the
    /// address; [`EdgeError::Socket`] when NNG cannot create the socket.
    pub fn listen(url: &str, options: &EdgeOptions) -> Result<Self, EdgeError> {
        Self::listen_with_queue(url, options, DEFAULT_PEER_QUEUE)
    }

    /// As [`PubEdge::listen`], queueing up to `peer_queue` messages per
    /// subscriber (clamped to 1..=[`MAX_PEER_QUEUE`]).
    ///
    /// # Errors
    ///
    /// As [`PubEdge::listen`].
    pub fn listen_with_queue(
        url: &str,
        options: &EdgeOptions,
        peer_queue: usize,
    ) -> Result<Self, EdgeError> {
        let socket = Socket::new(Protocol::Pub0)?;
        // NNG sizes each peer's queue when the peer connects: set it first.
        let depth = peer_queue.clamp(1, MAX_PEER_QUEUE);
        socket.set_opt::<SendBufferSize>(i32::try_from(depth).unwrap_or(i32::MAX))?;
        listen(&socket, url, options)?;
        Ok(Self {
            socket,
            url: url.to_string(),
            closed: AtomicBool::new(false),
        })
    }

    /// The address this edge listens on.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Send one encoded event to every connected subscriber, without
    /// blocking. With no subscriber connected the event is discarded and the
    /// send still succeeds (PUB/SUB keeps nothing for later).
    ///
    /// # Errors
    ///
    /// [`EdgeError::Socket`] with NNG's error: `Closed` after [`close`],
    /// `TryAgain` if NNG could not take the message at once, or an
    /// allocation failure. The event is then lost on the wire and the caller
    /// counts it.
    ///
    /// [`close`]: PubEdge::close
    pub fn send(&self, bytes: &[u8]) -> Result<(), EdgeError> {
        self.socket
            .try_send(nng::Message::from(bytes))
            .map_err(|(_, error)| EdgeError::Socket(error))
    }

    /// Close the socket and remove the ipc file it listened on. Calling it
    /// again does nothing; dropping the edge closes it too.
    pub fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }

        // Close first so that nobody is listening on the path we remove.
        self.socket.close();
        remove_ipc_file(&self.url);
        debug!(url = %self.url, "event edge closed");
    }
}

impl Drop for PubEdge {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn ipc_url(dir: &tempfile::TempDir) -> String {
        format!("ipc://{}", dir.path().join("evt.ipc").display())
    }

    #[test]
    fn sending_with_no_subscriber_succeeds_and_keeps_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let edge = PubEdge::listen(&ipc_url(&dir), &EdgeOptions::default()).unwrap();
        for _ in 0..1000 {
            edge.send(br#"{"event_type":"x"}"#).unwrap();
        }
    }

    #[test]
    fn a_subscriber_that_never_reads_does_not_block_sends() {
        let dir = tempfile::tempdir().unwrap();
        let url = ipc_url(&dir);
        let edge = PubEdge::listen(&url, &EdgeOptions::default()).unwrap();
        let stalled = Socket::new(Protocol::Sub0).unwrap();
        stalled
            .set_opt::<nng::options::protocol::pubsub::Subscribe>(Vec::new())
            .unwrap();
        stalled.dial(&url).unwrap();

        // 200 000 events of 1 KiB each are far more than the peer's queues
        // and the kernel's socket buffer hold: a blocking send would stall.
        let body = vec![b'x'; 1024];
        let started = Instant::now();
        for _ in 0..200_000 {
            edge.send(&body).unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "sends took {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn each_subscriber_gets_the_default_queue_depth_unless_told_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let edge = PubEdge::listen(&ipc_url(&dir), &EdgeOptions::default()).unwrap();
        assert_eq!(edge.socket.get_opt::<SendBufferSize>().unwrap(), 1024);
        edge.close();
        let small = PubEdge::listen_with_queue(&ipc_url(&dir), &EdgeOptions::default(), 0).unwrap();
        assert_eq!(small.socket.get_opt::<SendBufferSize>().unwrap(), 1);
    }

    #[test]
    fn closing_removes_the_ipc_file_and_later_sends_fail() {
        let dir = tempfile::tempdir().unwrap();
        let url = ipc_url(&dir);
        let edge = PubEdge::listen(&url, &EdgeOptions::default()).unwrap();
        assert!(dir.path().join("evt.ipc").exists());
        edge.close();
        edge.close();
        assert!(!dir.path().join("evt.ipc").exists());
        assert!(edge.send(b"{}").is_err());
    }
}
