//! The baselines: the same traffic over bare `nng` sockets, no actors, no
//! JSON. Servers and load generators here are also used against the bus,
//! so that a bus figure and its raw figure differ only in what answers.
//!
//! Every `Aio` lives in a struct owned by the bench's own thread; callbacks
//! stop re-arming once told to stop, and the owner cancels and waits for
//! each `Aio` before dropping it (DESIGN.md section 4: dropping the last
//! handle inside its own callback hangs the NNG thread).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use dgbit_bus::wire::{CommandReply, CommandRequest, Echo};
use nng::options::{Options, RecvTimeout, SendTimeout};
use nng::{Aio, AioResult, Context, Message, Protocol, Socket};
use serde_json::Value;

use crate::transport::{next_id, RequestTemplate};

/// The bus's default message size limit, applied by the codec server too.
const MAX_MESSAGE_SIZE: usize = 8 * 1024 * 1024;

/// How long any single raw operation may wait before the bench calls it
/// stuck.
pub const OPERATION_LIMIT: Duration = Duration::from_secs(10);

/// What a raw REP server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The request's bytes, unchanged: the NNG floor.
    Echo,
    /// The bus's reply to the bench's echo command, built with the bus's
    /// own codec (decode the request, `{"status": "ok", ..., "result":
    /// <payload>}`, encode) right in the callback: everything the bus does
    /// except actors, routing and duplicate tracking.
    Codec,
}

/// A REP server on `contexts` NNG contexts, each cycling recv -> send ->
/// recv inside its callback.
pub struct RawEchoServer {
    url: String,
    socket: Socket,
    stopping: Arc<AtomicBool>,
    aios: Vec<Aio>,
}

impl RawEchoServer {
    /// # Errors
    ///
    /// When NNG cannot listen on `url` or allocate a context.
    pub fn listen(url: &str, contexts: usize, answer: Answer) -> anyhow::Result<Self> {
        let socket = Socket::new(Protocol::Rep0)?;
        socket
            .listen(url)
            .with_context(|| format!("raw REP listen {url}"))?;
        let stopping = Arc::new(AtomicBool::new(false));
        let mut aios = Vec::with_capacity(contexts);
        for _ in 0..contexts {
            let ctx = Context::new(&socket)?;
            let aio = echo_aio(ctx.clone(), stopping.clone(), answer)?;
            ctx.recv(&aio)?;
            aios.push(aio);
        }
        Ok(Self {
            url: url.to_string(),
            socket,
            stopping,
            aios,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }
}

fn echo_aio(ctx: Context, stopping: Arc<AtomicBool>, answer: Answer) -> nng::Result<Aio> {
    Aio::new(move |aio, result| {
        if stopping.load(Ordering::Acquire) {
            return;
        }
        match result {
            AioResult::Recv(Ok(request)) => {
                let reply = match answer {
                    Answer::Echo => request,
                    Answer::Codec => Message::from(&codec_reply(request.as_slice())[..]),
                };
                if ctx.send(&aio, reply).is_err() {
                    let _ = ctx.recv(&aio);
                }
            }
            AioResult::Recv(Err(nng::Error::Closed)) => {}
            AioResult::Recv(Err(_)) | AioResult::Send(_) => {
                let _ = ctx.recv(&aio);
            }
            AioResult::Sleep(_) => {}
        }
    })
}

/// The reply the bus gives the bench's echo command, without the bus.
fn codec_reply(body: &[u8]) -> Vec<u8> {
    let reply = match CommandRequest::decode(body, MAX_MESSAGE_SIZE) {
        Ok(request) => CommandReply::ok(request.echo(), Value::Object(request.payload)),
        Err(err) => CommandReply::error(Echo::salvage(body), err.code, err.message),
    };
    reply.encode()
}

impl Drop for RawEchoServer {
    fn drop(&mut self) {
        stop_aio_server(&self.stopping, &self.socket, &self.aios);
    }
}

/// A blocking REQ client, one request at a time.
pub struct RawReqClient {
    socket: Socket,
}

impl RawReqClient {
    /// # Errors
    ///
    /// When nothing listens on `url`.
    pub fn dial(url: &str) -> anyhow::Result<Self> {
        let socket = Socket::new(Protocol::Req0)?;
        socket.set_opt::<RecvTimeout>(Some(OPERATION_LIMIT))?;
        socket.set_opt::<SendTimeout>(Some(OPERATION_LIMIT))?;
        socket
            .dial(url)
            .with_context(|| format!("raw REQ dial {url}"))?;
        Ok(Self { socket })
    }

    /// Send `body`, wait for the reply, return how long that took.
    ///
    /// # Errors
    ///
    /// A send or receive that failed or timed out.
    pub fn round_trip(&self, body: Vec<u8>) -> anyhow::Result<Duration> {
        let started = Instant::now();
        self.socket
            .send(Message::from(&body[..]))
            .map_err(|(_, err)| err)?;
        let reply = self.socket.recv()?;
        let elapsed = started.elapsed();
        anyhow::ensure!(!reply.as_slice().is_empty(), "empty reply");
        Ok(elapsed)
    }
}

/// What a load run achieved.
#[derive(Debug, Clone, Copy, Default)]
pub struct Throughput {
    pub completed: u64,
    pub errors: u64,
    pub elapsed: Duration,
}

impl Throughput {
    pub fn per_second(&self) -> f64 {
        self.completed as f64 / self.elapsed.as_secs_f64()
    }

    pub fn add(&mut self, other: Throughput) {
        self.completed += other.completed;
        self.errors += other.errors;
        self.elapsed += other.elapsed;
    }
}

/// `clients` REQ sockets, each keeping one request in flight from inside
/// its `Aio` callback: the cheapest closed-loop load NNG can generate, with
/// no thread of its own per client.
pub struct RawLoad {
    _sockets: Vec<Socket>,
    clients: Vec<(Context, Aio)>,
    template: Arc<RequestTemplate>,
    stop: Arc<AtomicBool>,
    shared: Arc<LoadCounters>,
    done: mpsc::Receiver<()>,
}

struct LoadCounters {
    completed: AtomicU64,
    errors: AtomicU64,
}

impl RawLoad {
    /// Dial `clients` sockets to `url`; nothing is sent until [`run`].
    ///
    /// # Errors
    ///
    /// When a dial fails.
    ///
    /// [`run`]: RawLoad::run
    pub fn dial(url: &str, clients: usize) -> anyhow::Result<Self> {
        Self::dial_with(url, clients, RequestTemplate::new())
    }

    /// As [`RawLoad::dial`], sending requests built from `template`.
    ///
    /// # Errors
    ///
    /// As [`RawLoad::dial`].
    pub fn dial_with(url: &str, clients: usize, template: RequestTemplate) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(LoadCounters {
            completed: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        });
        let (done_sender, done) = mpsc::channel();
        let template = Arc::new(template);
        let mut sockets = Vec::with_capacity(clients);
        let mut pairs = Vec::with_capacity(clients);
        for _ in 0..clients {
            let socket = Socket::new(Protocol::Req0)?;
            socket
                .dial(url)
                .with_context(|| format!("raw REQ dial {url}"))?;
            let ctx = Context::new(&socket)?;
            let aio = load_aio(
                ctx.clone(),
                template.clone(),
                stop.clone(),
                shared.clone(),
                done_sender.clone(),
            )?;
            aio.set_timeout(Some(OPERATION_LIMIT))?;
            sockets.push(socket);
            pairs.push((ctx, aio));
        }
        Ok(Self {
            _sockets: sockets,
            clients: pairs,
            template,
            stop,
            shared,
            done,
        })
    }

    /// Keep every client busy for `duration`, then wait for the requests in
    /// flight to finish. The clients can run again afterwards.
    ///
    /// # Errors
    ///
    /// When a client does not finish within [`OPERATION_LIMIT`] after the
    /// deadline; the load must not be run again then.
    pub fn run(&self, duration: Duration) -> anyhow::Result<Throughput> {
        self.stop.store(false, Ordering::Release);
        self.shared.completed.store(0, Ordering::Relaxed);
        self.shared.errors.store(0, Ordering::Relaxed);
        let started = Instant::now();
        let mut running = 0;
        for (ctx, aio) in &self.clients {
            ctx.send(aio, Message::from(&self.template.body(next_id())[..]))
                .map_err(|(_, err)| err)?;
            running += 1;
        }
        std::thread::sleep(duration);
        self.stop.store(true, Ordering::Release);
        for _ in 0..running {
            self.done
                .recv_timeout(OPERATION_LIMIT)
                .context("a raw client did not finish")?;
        }
        let elapsed = started.elapsed();
        Ok(Throughput {
            completed: self.shared.completed.load(Ordering::Relaxed),
            errors: self.shared.errors.load(Ordering::Relaxed),
            elapsed,
        })
    }
}

fn load_aio(
    ctx: Context,
    template: Arc<RequestTemplate>,
    stop: Arc<AtomicBool>,
    shared: Arc<LoadCounters>,
    done: mpsc::Sender<()>,
) -> nng::Result<Aio> {
    Aio::new(move |aio, result| {
        let next = match result {
            AioResult::Send(Ok(())) => {
                if ctx.recv(&aio).is_err() {
                    shared.errors.fetch_add(1, Ordering::Relaxed);
                    let _ = done.send(());
                }
                return;
            }
            AioResult::Recv(Ok(_reply)) => {
                shared.completed.fetch_add(1, Ordering::Relaxed);
                true
            }
            AioResult::Send(Err(_)) | AioResult::Recv(Err(_)) => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                false
            }
            AioResult::Sleep(_) => return,
        };
        if !next || stop.load(Ordering::Acquire) {
            let _ = done.send(());
            return;
        }
        if ctx
            .send(&aio, Message::from(&template.body(next_id())[..]))
            .is_err()
        {
            shared.errors.fetch_add(1, Ordering::Relaxed);
            let _ = done.send(());
        }
    })
}

impl Drop for RawLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        for (_, aio) in &self.clients {
            aio.cancel();
            aio.wait();
        }
    }
}

/// Stop threads that each serve one of `sockets`: set `stop`, close the
/// sockets (which ends a blocking receive), and join the threads.
pub fn stop_socket_threads(
    stop: &AtomicBool,
    sockets: &[Socket],
    threads: &mut Vec<std::thread::JoinHandle<()>>,
) {
    stop.store(true, Ordering::Release);
    for socket in sockets {
        socket.close();
    }
    for thread in threads.drain(..) {
        let _ = thread.join();
    }
}

/// Stop a server driven by `aios`' callbacks: set `stopping` (which the
/// callbacks check), close the socket, and wait for each callback to end.
pub fn stop_aio_server(stopping: &AtomicBool, socket: &Socket, aios: &[Aio]) {
    stopping.store(true, Ordering::Release);
    socket.close();
    for aio in aios {
        aio.cancel();
        aio.wait();
    }
}
