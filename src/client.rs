//! `BusClient`: the Rust counterpart of dgbit's Python `NNGClient`.
//!
//! One REQ socket. A request goes on the socket itself while no other
//! request of the client is in flight (the fast path, see `client/direct.rs`), and
//! on an NNG context of its own otherwise, so requests from many tasks run
//! at once. A request that timed out leaves nothing behind: NNG drops the
//! late reply. The next request on the same client works as usual.
//!
//! The fast path waits on NNG's notification descriptors through the tokio
//! reactor of the runtime that first sends, so that runtime needs IO
//! enabled (`#[actix::main]`, `#[tokio::main]` and `Runtime::new` have it;
//! on a runtime built without it tokio panics, as it does for a client
//! timeout on a runtime without timers). [`ClientOptions::socket_path`]
//! turns the fast path off.
//!
//! # Retry and reconnection
//!
//! [`BusClient::connect`] dials up to `connect_attempts` times, waiting
//! `connect_backoff`, then twice that, and so on, between attempts (the
//! seed's `ResilientClient` schedule is 3 attempts, 1 s, 2 s). Once connected,
//! NNG redials a lost bus on its own between `reconnect_min` and
//! `reconnect_max`; a request sent meanwhile waits for the bus up to its
//! timeout. A timeout is always an error, never a success.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use nng::options::protocol::reqrep::ResendTime;
use nng::options::Options;
use nng::{Aio, AioResult, Context, Dialer, Message, Protocol, Socket};
use serde_json::Value;
use tokio::sync::oneshot;

mod direct;

use self::direct::DirectPath;
use crate::edge::{self, EdgeOptions};
use crate::wire::{CommandReply, CommandRequest, WireError};

/// How a [`BusClient`] connects and waits.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// How long a request waits for its reply. Default 30 s, as in the seed.
    pub timeout: Duration,
    /// Dial attempts before [`BusClient::connect`] gives up. Default 3.
    pub connect_attempts: u32,
    /// Wait before the second dial attempt; doubles each attempt. Default 1 s.
    pub connect_backoff: Duration,
    /// NNG's REQ resend interval for an unanswered request; `None` keeps
    /// NNG's default of 60 s.
    pub resend_interval: Option<Duration>,
    /// Redial schedule after a lost connection. Default 100 ms up to 5 s.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Largest reply accepted. Default 16 MiB.
    pub max_reply_size: usize,
    /// Largest request sent; a larger one fails at once with
    /// [`ClientError::TooLarge`] instead of reaching a bus that would drop
    /// the connection. Default 16 MiB: twice the bus's default limit, so
    /// anything in between gets the bus's own `too_large` reply.
    pub max_request_size: usize,
    /// Send a request on the socket itself while no other request of the
    /// client is in flight (see the module doc). On by default.
    pub socket_path: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            connect_attempts: 3,
            connect_backoff: Duration::from_secs(1),
            resend_interval: None,
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            max_reply_size: 16 * 1024 * 1024,
            max_request_size: 16 * 1024 * 1024,
            socket_path: true,
        }
    }
}

impl ClientOptions {
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn resend_interval(mut self, interval: Duration) -> Self {
        self.resend_interval = Some(interval);
        self
    }

    /// Use the socket-level fast path (`true`, the default) or contexts
    /// only (`false`, for a runtime without IO).
    pub fn socket_path(mut self, enabled: bool) -> Self {
        self.socket_path = enabled;
        self
    }

    pub fn connect_attempts(mut self, attempts: u32, backoff: Duration) -> Self {
        self.connect_attempts = attempts.max(1);
        self.connect_backoff = backoff;
        self
    }
}

/// Why a request produced no reply.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {url} after {attempts} attempts: {source}")]
    Connect {
        url: String,
        attempts: u32,
        source: nng::Error,
    },
    #[error("no reply within {} ms", .after.as_millis())]
    Timeout { after: Duration },
    #[error("request failed: {0}")]
    Transport(nng::Error),
    #[error("a request of {size} bytes exceeds the client's limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("the reply is not a valid bus reply: {0}")]
    BadReply(WireError),
    /// The bus answered with an error (only from [`BusClient::call`]).
    #[error("{code}: {message}")]
    Remote { code: String, message: String },
}

impl ClientError {
    pub fn is_timeout(&self) -> bool {
        matches!(self, ClientError::Timeout { .. })
    }
}

/// A REQ client of the command or data bus.
pub struct BusClient {
    // Declared first so that it drops first: it lends the socket's
    // notification descriptors to the reactor, and must give them back
    // before the socket closes them.
    direct: DirectPath,
    url: String,
    socket: Socket,
    _dialer: Dialer,
    options: ClientOptions,
}

impl BusClient {
    /// Dial `url`, retrying with exponential backoff.
    ///
    /// # Errors
    ///
    /// [`ClientError::Connect`] after the last failed attempt (bus not
    /// running, bad URL, permission denied).
    pub async fn connect(url: &str, options: ClientOptions) -> Result<BusClient, ClientError> {
        let mut delay = options.connect_backoff;
        let mut attempt = 1;
        loop {
            match Self::dial(url, &options, false) {
                Ok(client) => return Ok(client),
                Err(source) if attempt >= options.connect_attempts => {
                    return Err(ClientError::Connect {
                        url: url.into(),
                        attempts: attempt,
                        source,
                    })
                }
                Err(err) => {
                    tracing::debug!(url, attempt, error = %err, "dial failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = delay.saturating_mul(2);
                    attempt += 1;
                }
            }
        }
    }

    /// Dial `url` in the background: requests wait (up to their timeout) for
    /// the bus to appear. For clients started before the bus.
    ///
    /// # Errors
    ///
    /// [`ClientError::Connect`] for a malformed URL or unknown transport.
    pub fn connect_lazy(url: &str, options: ClientOptions) -> Result<BusClient, ClientError> {
        Self::dial(url, &options, true).map_err(|source| ClientError::Connect {
            url: url.into(),
            attempts: 1,
            source,
        })
    }

    fn dial(url: &str, options: &ClientOptions, lazy: bool) -> Result<BusClient, nng::Error> {
        let socket = Socket::new(Protocol::Req0)?;
        if let Some(interval) = options.resend_interval {
            socket.set_opt::<ResendTime>(Some(interval))?;
        }
        let edge = EdgeOptions {
            max_message_size: options.max_reply_size,
            reconnect_min: options.reconnect_min,
            reconnect_max: options.reconnect_max,
            ..EdgeOptions::default()
        };
        // Only socket and dial errors come back from a dial.
        let dialer = edge::dial_with(&socket, url, &edge, lazy)
            .map_err(|err| err.nng_error().unwrap_or(nng::Error::Internal))?;
        Ok(BusClient {
            direct: DirectPath::new(options.socket_path),
            url: url.into(),
            socket,
            _dialer: dialer,
            options: options.clone(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Send a typed request and wait for the bus's reply (ok or error).
    ///
    /// # Errors
    ///
    /// [`ClientError::Timeout`] when no reply came within the timeout;
    /// [`ClientError::Transport`] when NNG failed; [`ClientError::BadReply`]
    /// when the reply is not a bus reply.
    ///
    /// # Cancellation safety
    ///
    /// Dropping the future abandons the request: NNG discards a late reply
    /// (its context is closed, or on the socket path the next request
    /// supersedes it). The handler on the bus may still run.
    pub async fn request(&self, request: &CommandRequest) -> Result<CommandReply, ClientError> {
        let body = self.send_raw(&request.encode()).await?;
        CommandReply::decode(&body).map_err(ClientError::BadReply)
    }

    /// Send any JSON value as the request body (dgbit's `client.send(dict)`).
    ///
    /// # Errors
    ///
    /// As [`BusClient::request`].
    pub async fn send_json(&self, body: &Value) -> Result<CommandReply, ClientError> {
        let bytes = serde_json::to_vec(body).expect("a JSON value always serialises");
        let reply = self.send_raw(&bytes).await?;
        CommandReply::decode(&reply).map_err(ClientError::BadReply)
    }

    /// Run `command` with `payload` and return its result.
    ///
    /// # Errors
    ///
    /// As [`BusClient::request`], plus [`ClientError::Remote`] carrying the
    /// code and text of an error reply.
    pub async fn call(&self, command: &str, payload: Value) -> Result<Value, ClientError> {
        into_result(self.request(&CommandRequest::new(command, payload)).await?)
    }

    /// Send raw bytes and return the raw reply.
    ///
    /// # Errors
    ///
    /// [`ClientError::Timeout`] or [`ClientError::Transport`];
    /// [`ClientError::TooLarge`] before anything is sent.
    pub async fn send_raw(&self, body: &[u8]) -> Result<Vec<u8>, ClientError> {
        if body.len() > self.options.max_request_size {
            let limit = self.options.max_request_size;
            return Err(ClientError::TooLarge {
                size: body.len(),
                limit,
            });
        }
        let timeout = self.options.timeout;
        let exchange = async {
            if let Some(claim) = self.direct.claim(&self.socket) {
                return claim.exchange(&self.socket, body).await;
            }
            Exchange::start(&self.socket, body, timeout)?.reply().await
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok(reply)) => Ok(reply.as_slice().to_vec()),
            Ok(Err(nng::Error::TimedOut)) | Err(_) => Err(ClientError::Timeout { after: timeout }),
            Ok(Err(err)) => Err(ClientError::Transport(err)),
        }
    }
}

/// An ok reply's result, or its error as [`ClientError::Remote`].
///
/// # Errors
///
/// [`ClientError::Remote`] with the code and text of an error reply.
pub fn into_result(reply: CommandReply) -> Result<Value, ClientError> {
    match reply {
        CommandReply::Ok { result, .. } => Ok(result),
        CommandReply::Error { code, error, .. } => Err(ClientError::Remote {
            code,
            message: error,
        }),
    }
}

/// One request and its reply on a context of its own.
///
/// The NNG callback sends the request, then receives the reply, and hands it
/// over a oneshot channel. Dropping an `Exchange` cancels what is still
/// running and waits for the callback to finish, so the last `Aio` handle is
/// never released inside its own callback.
struct Exchange {
    aio: Aio,
    _ctx: Context,
    receiver: Option<oneshot::Receiver<Result<Message, nng::Error>>>,
    abandoned: Arc<Mutex<bool>>,
}

impl Exchange {
    fn start(socket: &Socket, body: &[u8], timeout: Duration) -> Result<Exchange, nng::Error> {
        let ctx = Context::new(socket)?;
        let (sender, receiver) = oneshot::channel();
        let sender = Mutex::new(Some(sender));
        let abandoned = Arc::new(Mutex::new(false));
        let callback_ctx = ctx.clone();
        let callback_abandoned = abandoned.clone();
        let deliver = move |outcome| {
            if let Some(sender) = sender.lock().ok().and_then(|mut slot| slot.take()) {
                let _ = sender.send(outcome);
            }
        };
        let aio = Aio::new(move |aio, result| match result {
            AioResult::Send(Ok(())) => {
                // Holding the flag's lock while re-arming means a drop either
                // sees this receive and cancels it, or stops it starting.
                let rearmed = match callback_abandoned.lock() {
                    Ok(abandoned) if !*abandoned => callback_ctx.recv(&aio),
                    _ => Err(nng::Error::Canceled),
                };
                if let Err(err) = rearmed {
                    deliver(Err(err));
                }
            }
            AioResult::Send(Err((_, err))) => deliver(Err(err)),
            AioResult::Recv(outcome) => deliver(outcome),
            AioResult::Sleep(_) => {}
        })?;
        aio.set_timeout(Some(timeout))?;
        ctx.send(&aio, Message::from(body))
            .map_err(|(_, err)| err)?;
        Ok(Exchange {
            aio,
            _ctx: ctx,
            receiver: Some(receiver),
            abandoned,
        })
    }

    async fn reply(mut self) -> Result<Message, nng::Error> {
        let receiver = self.receiver.take().expect("reply is awaited once");
        receiver.await.unwrap_or(Err(nng::Error::Canceled))
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        if let Ok(mut abandoned) = self.abandoned.lock() {
            *abandoned = true;
        }
        self.aio.cancel();
        self.aio.wait();
    }
}
