//! The socket-level request path of a [`super::BusClient`].
//!
//! A request on a context of its own costs NNG a context and an aio, and
//! its reply reaches the caller through two NNG callbacks (send done, reply
//! in) before the caller's runtime is woken. When no other request of the
//! client is in flight, the client instead sends on the socket itself,
//! without blocking, and waits for the reply on NNG's receive notification
//! descriptor (`NNG_OPT_RECVFD`) registered with the tokio reactor: the
//! thread that reads the reply wakes the caller directly. This is what
//! makes one client with one request at a time (a worker, a script, a
//! service calling the bus in turn) as fast as a blocking REQ socket.
//!
//! REQ semantics keep it safe: a new socket-level request abandons the
//! previous one, and NNG discards a reply to an abandoned request, so a
//! request that timed out or was dropped leaves nothing behind.

use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use nng::options::{Options, RecvFd, SendFd};
use nng::{Message, Socket};
use tokio::io::unix::AsyncFd;

/// How long the first wait for NNG's notification may last before the
/// socket is asked again anyway; each further wait of the same request may
/// last twice as long, up to [`RECHECK_MAX`]. A safety net, should the
/// descriptor say "ready" at a moment the socket is not, which would leave
/// no notification edge to wait for.
const RECHECK_FIRST: Duration = Duration::from_millis(5);
const RECHECK_MAX: Duration = Duration::from_millis(500);

/// One of NNG's notification descriptors. NNG owns it and closes it with
/// the socket; this only lends it to the reactor.
struct NotifyFd(RawFd);

impl AsRawFd for NotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// The socket's two notification descriptors, registered with the reactor
/// of the runtime that first used the path.
struct Readiness {
    recv: AsyncFd<NotifyFd>,
    send: AsyncFd<NotifyFd>,
}

impl Readiness {
    // tokio deprecates `AsyncFd::new` because nothing in its signature
    // proves that the descriptor outlives the registration. Here it does:
    // NNG closes these descriptors only when the socket closes, and the
    // client drops its `DirectPath` (deregistering them) before its
    // socket; see the field order of `BusClient`.
    #[allow(deprecated)]
    fn new(socket: &Socket) -> Option<Readiness> {
        tokio::runtime::Handle::try_current().ok()?;
        let recv = socket.get_opt::<RecvFd>().ok()?;
        let send = socket.get_opt::<SendFd>().ok()?;
        Some(Readiness {
            recv: AsyncFd::new(NotifyFd(recv)).ok()?,
            send: AsyncFd::new(NotifyFd(send)).ok()?,
        })
    }
}

/// The socket-level path of one client: free, or held by one request.
pub(super) struct DirectPath {
    enabled: AtomicBool,
    busy: AtomicBool,
    readiness: OnceLock<Option<Readiness>>,
}

impl DirectPath {
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled: AtomicBool::new(enabled),
            busy: AtomicBool::new(false),
            readiness: OnceLock::new(),
        }
    }

    /// Hold the path for one request, or `None` when another request holds
    /// it (or it is off, or there is no reactor): that request then goes on
    /// a context of its own.
    pub fn claim(&self, socket: &Socket) -> Option<Claim<'_>> {
        if !self.enabled.load(Ordering::Acquire) {
            return None;
        }
        let readiness = self
            .readiness
            .get_or_init(|| Readiness::new(socket))
            .as_ref()?;
        self.busy
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()?;
        Some(Claim {
            path: self,
            readiness,
        })
    }
}

/// The path, held by one request until dropped.
pub(super) struct Claim<'a> {
    path: &'a DirectPath,
    readiness: &'a Readiness,
}

impl Claim<'_> {
    /// Send `body` on the socket and wait for its reply. The caller bounds
    /// the wait with its timeout.
    ///
    /// # Errors
    ///
    /// What NNG answers other than "try again"; [`nng::Error::Canceled`]
    /// when the reactor is shutting down, after which the client uses
    /// contexts only.
    pub async fn exchange(&self, socket: &Socket, body: &[u8]) -> Result<Message, nng::Error> {
        let mut message = Message::from(body);
        let mut recheck = RECHECK_FIRST;
        loop {
            match socket.try_send(message) {
                Ok(()) => break,
                Err((back, nng::Error::TryAgain)) => message = back,
                Err((_, err)) => return Err(err),
            }
            self.wait(&self.readiness.send, &mut recheck).await?;
        }
        let mut recheck = RECHECK_FIRST;
        loop {
            match socket.try_recv() {
                Ok(reply) => return Ok(reply),
                Err(nng::Error::TryAgain) => {}
                Err(err) => return Err(err),
            }
            self.wait(&self.readiness.recv, &mut recheck).await?;
        }
    }

    /// Wait until NNG signals `fd`, or `recheck` has passed (which then
    /// doubles). Readiness is cleared before the caller asks the socket
    /// again, so a signal that comes after that question is not lost.
    async fn wait(&self, fd: &AsyncFd<NotifyFd>, recheck: &mut Duration) -> Result<(), nng::Error> {
        let ready = tokio::time::timeout(*recheck, fd.readable()).await;
        *recheck = (*recheck * 2).min(RECHECK_MAX);
        match ready {
            Ok(Ok(mut guard)) => {
                guard.clear_ready();
                Ok(())
            }
            Ok(Err(_)) => {
                self.path.enabled.store(false, Ordering::Release);
                Err(nng::Error::Canceled)
            }
            Err(_elapsed) => Ok(()),
        }
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.path.busy.store(false, Ordering::Release);
    }
}
