//! Where the traffic goes (fresh ipc paths, free tcp ports on 127.0.0.1) and
//! what it carries (the 256-byte command request).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use dgbit_bus::wire::CommandRequest;
use serde_json::json;

/// The two socket transports every networked workload runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Ipc,
    Tcp,
}

impl Transport {
    pub const ALL: [Transport; 2] = [Transport::Ipc, Transport::Tcp];

    pub fn name(self) -> &'static str {
        match self {
            Transport::Ipc => "ipc",
            Transport::Tcp => "tcp",
        }
    }

    /// A fresh address: `name` inside `dir` for ipc, a free port on
    /// 127.0.0.1 for tcp.
    pub fn url(self, dir: &Path, name: &str) -> String {
        match self {
            Transport::Ipc => format!("ipc://{}", dir.join(format!("{name}.ipc")).display()),
            Transport::Tcp => format!("tcp://127.0.0.1:{}", free_port()),
        }
    }
}

/// A port nothing listens on right now. Another process could take it
/// before the bench listens; on this machine nothing else binds loopback
/// ports at random, and a collision shows up as a listen error.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("a bound address").port()
}

/// The size of every command request the workloads send.
pub const REQUEST_SIZE: usize = 256;

/// The command the bus's bench handler actor serves.
pub const ECHO_COMMAND: &str = "bench.echo";

/// The same echo as an inline handler, run on the thread that received the
/// request (the template's padding keeps its requests at 256 bytes too).
pub const INLINE_ECHO_COMMAND: &str = "bench.echo_inline";

/// Digits of the per-request id; ids are zero-padded so every request has
/// the same size.
const ID_DIGITS: usize = 12;

/// A request id no other request of this run has used: every workload
/// draws from this one counter, so the bus never answers a request from its
/// duplicate cache.
pub fn next_id() -> u64 {
    static NEXT_ID: AtomicU64 = AtomicU64::new(0);
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// Builds 256-byte requests with unique `request_id`s.
///
/// Every request carries a `request_id`, as dgbit's callers carry a
/// `job_uuid`: the bus must see each as new (a repeated id would be
/// answered from its duplicate cache), so the raw baseline sends the very
/// same bytes.
#[derive(Debug, Clone)]
pub struct RequestTemplate {
    command: &'static str,
    pad: String,
    /// The encoding of request 0, and where its id digits start.
    bytes: Vec<u8>,
    id_at: usize,
}

impl RequestTemplate {
    pub fn new() -> Self {
        Self::for_command(ECHO_COMMAND)
    }

    /// Requests for `command` instead of [`ECHO_COMMAND`].
    pub fn for_command(command: &'static str) -> Self {
        let mut template = Self {
            command,
            pad: String::new(),
            bytes: Vec::new(),
            id_at: 0,
        };
        let short = template.request(0).encode().len();
        assert!(short < REQUEST_SIZE, "the bare request is {short} bytes");
        template.pad = "x".repeat(REQUEST_SIZE - short);
        template.bytes = template.request(0).encode();
        assert_eq!(template.bytes.len(), REQUEST_SIZE);
        let id = Self::id(0);
        template.id_at = template
            .bytes
            .windows(id.len())
            .position(|window| window == id.as_bytes())
            .expect("the id appears in the encoding");
        template
    }

    fn id(n: u64) -> String {
        format!("r-{n:0width$}", width = ID_DIGITS)
    }

    /// Request number `n` as a typed request (for `BusClient` and in-process
    /// dispatch).
    pub fn request(&self, n: u64) -> CommandRequest {
        let mut request = CommandRequest::new(
            self.command,
            json!({"symbol": "EURUSD", "interval": "60", "pad": self.pad}),
        );
        request.request_id = Some(Self::id(n));
        request
    }

    /// Request number `n` encoded: the template with its id digits
    /// overwritten, byte for byte what `request(n).encode()` gives.
    pub fn body(&self, n: u64) -> Vec<u8> {
        let mut body = self.bytes.clone();
        let id = Self::id(n);
        body[self.id_at..self.id_at + id.len()].copy_from_slice(id.as_bytes());
        body
    }
}
