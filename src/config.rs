//! Bus configuration: addresses from the `NNG_*_ADDRESS` variables with the
//! seed's defaults, every limit with a documented default, overridable from
//! code with the chainable setters below and from the CLI.

use std::path::PathBuf;
use std::time::Duration;

use crate::dead_letter::DeadLetterLimits;
use crate::dispatcher::queue::QueueConfig;

pub const COMMAND_ADDRESS_VAR: &str = "NNG_COMMAND_ADDRESS";
pub const EVENT_ADDRESS_VAR: &str = "NNG_EVENT_ADDRESS";
pub const JOB_QUEUE_ADDRESS_VAR: &str = "NNG_JOB_QUEUE_ADDRESS";
pub const DATA_ADDRESS_VAR: &str = "NNG_DATA_ADDRESS";

pub const DEFAULT_COMMAND_ADDRESS: &str = "ipc:///tmp/dgbit_cmd.ipc";
pub const DEFAULT_EVENT_ADDRESS: &str = "ipc:///tmp/dgbit_evt.ipc";
pub const DEFAULT_JOB_QUEUE_ADDRESS: &str = "ipc:///tmp/dgbit_queue.ipc";
pub const DEFAULT_DATA_ADDRESS: &str = "ipc:///tmp/dgbit_data.ipc";

/// The four socket addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addresses {
    pub command: String,
    pub event: String,
    pub job_queue: String,
    pub data: String,
}

impl Default for Addresses {
    fn default() -> Self {
        Self {
            command: DEFAULT_COMMAND_ADDRESS.into(),
            event: DEFAULT_EVENT_ADDRESS.into(),
            job_queue: DEFAULT_JOB_QUEUE_ADDRESS.into(),
            data: DEFAULT_DATA_ADDRESS.into(),
        }
    }
}

impl Addresses {
    /// Addresses from the environment, each falling back to its default.
    pub fn from_env() -> Self {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Addresses from any variable lookup (the environment, a test's map).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Self {
        let pick = |name: &str, default: &str| {
            lookup(name)
                .filter(|value| !value.is_empty())
                .unwrap_or_else(|| default.into())
        };
        Self {
            command: pick(COMMAND_ADDRESS_VAR, DEFAULT_COMMAND_ADDRESS),
            event: pick(EVENT_ADDRESS_VAR, DEFAULT_EVENT_ADDRESS),
            job_queue: pick(JOB_QUEUE_ADDRESS_VAR, DEFAULT_JOB_QUEUE_ADDRESS),
            data: pick(DATA_ADDRESS_VAR, DEFAULT_DATA_ADDRESS),
        }
    }

    /// Four ipc addresses inside `dir`, for tests and the quick start.
    pub fn in_dir(dir: &std::path::Path) -> Self {
        let url = |name: &str| format!("ipc://{}", dir.join(name).display());
        Self {
            command: url("cmd.ipc"),
            event: url("evt.ipc"),
            job_queue: url("queue.ipc"),
            data: url("data.ipc"),
        }
    }
}

/// Everything a bus needs to start. Build with [`BusConfig::from_env`] or
/// [`BusConfig::default`] and adjust with the chainable setters.
#[derive(Debug, Clone)]
pub struct BusConfig {
    pub addresses: Addresses,
    /// Which edges to open. With none, the bus runs wholly in-process.
    pub edges: EdgeSet,
    /// The handler for requests with no `command` (dgbit's API dispatches
    /// backtests that way). Default `run_backtest`.
    pub default_command: Option<String>,
    /// Largest body accepted on any socket; larger gets `too_large`.
    /// Default 8 MiB.
    pub max_message_size: usize,
    /// How long a command handler may take before the caller gets `timeout`.
    /// Default 60 s.
    pub handler_timeout: Duration,
    /// Requests served at once per REP socket (one NNG context each).
    /// Default 128.
    pub contexts_per_socket: usize,
    /// Commands admitted into a router at once; more get `overloaded`.
    /// Default 10 000.
    pub max_commands_in_flight: usize,
    /// Replies remembered for duplicate suppression. Default 10 000 entries,
    /// each kept 10 minutes.
    pub dedup_capacity: usize,
    pub dedup_ttl: Duration,
    /// Events buffered per in-process subscriber before they are dropped and
    /// counted. Default 1024.
    pub subscriber_buffer: usize,
    /// Jobs held in the queue; more get `overloaded`. Default 100 000.
    pub queue_capacity: usize,
    /// How long a worker holds a job without renewing its lease. Default 30 s.
    pub job_lease: Duration,
    /// Queue depth that raises `system.alert`. Default 1000.
    pub backlog_alert: usize,
    /// Delay before a failed job's first retry; each retry doubles it, up
    /// to 60 s. Default 1 s.
    pub job_retry_base: Duration,
    /// Where dead letters are stored; `None` keeps them in memory only.
    pub dead_letter_path: Option<PathBuf>,
    /// Period of `system.health` events. Default 10 s.
    pub health_interval: Duration,
    /// The `source` of events the bus publishes. Default `dgbit-bus`.
    pub service_name: String,
    /// How long shutdown waits for work in flight. Default 10 s.
    pub drain_deadline: Duration,
    /// Mode bits of ipc socket files. Default 0o660 (owner and group).
    pub ipc_permissions: u32,
    /// Dial the job queue address instead of listening on it, for a PULL
    /// worker that listens (dgbit's Python `JobWorker` does). Default false.
    pub queue_dial: bool,
    /// Job types pushed at most once to plain PULL peers; `*` for any type
    /// no in-process or leasing worker wants. Default `{"*"}`.
    pub push_job_types: std::collections::BTreeSet<String>,
    /// Dead letters kept at most, oldest evicted first. Default 100 000.
    pub dead_letter_max_entries: usize,
    /// Allow listening on a wildcard address (`tcp://0.0.0.0:p`,
    /// `tcp://*:p`, `tcp://[::]:p`), which accepts connections on every
    /// network interface. Default false: [`BusConfig::check_listen_addresses`]
    /// refuses such an address, so a bus is reachable only on the
    /// interfaces its addresses name.
    pub allow_wildcard_listen: bool,
}

/// A configuration the bus refuses to start with.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A listen address is a wildcard and `allow_wildcard_listen` is off.
    #[error(
        "refusing to listen on {url} ({socket} socket): a wildcard address accepts \
         connections on every network interface; name the interface's address \
         (e.g. tcp://10.0.0.5:5555) or allow it explicitly (allow_wildcard_listen, \
         serve --allow-wildcard-listen)"
    )]
    WildcardListen {
        /// Which socket: `command`, `event`, `job queue` or `data`.
        socket: &'static str,
        url: String,
    },
}

/// Which NNG edges a bus opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdgeSet {
    pub command: bool,
    pub data: bool,
    pub event: bool,
    pub job_queue: bool,
}

impl EdgeSet {
    pub const ALL: EdgeSet = EdgeSet {
        command: true,
        data: true,
        event: true,
        job_queue: true,
    };
    pub const NONE: EdgeSet = EdgeSet {
        command: false,
        data: false,
        event: false,
        job_queue: false,
    };
}

impl Default for BusConfig {
    /// The queue's and the dead letter store's limits are theirs
    /// ([`QueueConfig`], [`DeadLetterLimits`]), not repeated here.
    fn default() -> Self {
        let queue = QueueConfig::default();
        Self {
            addresses: Addresses::default(),
            edges: EdgeSet::ALL,
            default_command: Some("run_backtest".into()),
            max_message_size: 8 * 1024 * 1024,
            handler_timeout: Duration::from_secs(60),
            contexts_per_socket: 128,
            max_commands_in_flight: 10_000,
            dedup_capacity: 10_000,
            dedup_ttl: Duration::from_secs(600),
            subscriber_buffer: crate::publisher::DEFAULT_SUBSCRIBER_BUFFER,
            queue_capacity: queue.capacity,
            job_lease: queue.lease,
            backlog_alert: queue.backlog_alert,
            job_retry_base: queue.retry_backoff_base,
            dead_letter_path: None,
            health_interval: Duration::from_secs(10),
            service_name: "dgbit-bus".into(),
            drain_deadline: Duration::from_secs(10),
            ipc_permissions: 0o660,
            queue_dial: false,
            push_job_types: queue.push_job_types,
            dead_letter_max_entries: DeadLetterLimits::default().max_entries,
            allow_wildcard_listen: false,
        }
    }
}

impl BusConfig {
    /// Defaults, with the addresses taken from the environment.
    pub fn from_env() -> Self {
        Self {
            addresses: Addresses::from_env(),
            ..Self::default()
        }
    }

    /// A bus with no sockets at all, for unit tests of handler actors.
    pub fn in_process() -> Self {
        Self {
            edges: EdgeSet::NONE,
            ..Self::default()
        }
    }

    pub fn addresses(mut self, addresses: Addresses) -> Self {
        self.addresses = addresses;
        self
    }

    pub fn command_address(mut self, url: impl Into<String>) -> Self {
        self.addresses.command = url.into();
        self
    }

    pub fn event_address(mut self, url: impl Into<String>) -> Self {
        self.addresses.event = url.into();
        self
    }

    pub fn job_queue_address(mut self, url: impl Into<String>) -> Self {
        self.addresses.job_queue = url.into();
        self
    }

    pub fn data_address(mut self, url: impl Into<String>) -> Self {
        self.addresses.data = url.into();
        self
    }

    pub fn edges(mut self, edges: EdgeSet) -> Self {
        self.edges = edges;
        self
    }

    pub fn default_command(mut self, name: Option<String>) -> Self {
        self.default_command = name;
        self
    }

    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    pub fn handler_timeout(mut self, timeout: Duration) -> Self {
        self.handler_timeout = timeout;
        self
    }

    pub fn dead_letter_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.dead_letter_path = Some(path.into());
        self
    }

    pub fn job_lease(mut self, lease: Duration) -> Self {
        self.job_lease = lease;
        self
    }

    pub fn health_interval(mut self, interval: Duration) -> Self {
        self.health_interval = interval;
        self
    }

    pub fn subscriber_buffer(mut self, events: usize) -> Self {
        self.subscriber_buffer = events;
        self
    }

    pub fn backlog_alert(mut self, depth: usize) -> Self {
        self.backlog_alert = depth;
        self
    }

    pub fn allow_wildcard_listen(mut self, allow: bool) -> Self {
        self.allow_wildcard_listen = allow;
        self
    }

    /// The addresses this bus listens on (not those it dials), each with
    /// its socket's name.
    pub fn listen_addresses(&self) -> Vec<(&'static str, &str)> {
        let a = &self.addresses;
        [
            (self.edges.command, "command", a.command.as_str()),
            (self.edges.event, "event", a.event.as_str()),
            (
                self.edges.job_queue && !self.queue_dial,
                "job queue",
                a.job_queue.as_str(),
            ),
            (self.edges.data, "data", a.data.as_str()),
        ]
        .into_iter()
        .filter(|(open, _, _)| *open)
        .map(|(_, socket, url)| (socket, url))
        .collect()
    }

    /// Check that every listen address names an interface, unless
    /// `allow_wildcard_listen` is set.
    ///
    /// # Errors
    ///
    /// [`ConfigError::WildcardListen`] for the first wildcard address.
    pub fn check_listen_addresses(&self) -> Result<(), ConfigError> {
        if self.allow_wildcard_listen {
            return Ok(());
        }
        match self
            .listen_addresses()
            .into_iter()
            .find(|(_, url)| crate::edge::is_wildcard_listen(url))
        {
            Some((socket, url)) => Err(ConfigError::WildcardListen {
                socket,
                url: url.to_string(),
            }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn unset_variables_fall_back_to_the_seed_defaults() {
        assert_eq!(Addresses::from_lookup(|_| None), Addresses::default());
        assert_eq!(Addresses::default().command, "ipc:///tmp/dgbit_cmd.ipc");
    }

    #[test]
    fn each_variable_overrides_its_own_address() {
        let vars = HashMap::from([
            (COMMAND_ADDRESS_VAR, "tcp://127.0.0.1:5555"),
            (DATA_ADDRESS_VAR, "ipc:///run/d.ipc"),
            (EVENT_ADDRESS_VAR, ""),
        ]);
        let addresses = Addresses::from_lookup(|name| vars.get(name).map(|v| v.to_string()));
        assert_eq!(addresses.command, "tcp://127.0.0.1:5555");
        assert_eq!(addresses.data, "ipc:///run/d.ipc");
        assert_eq!(addresses.event, DEFAULT_EVENT_ADDRESS);
        assert_eq!(addresses.job_queue, DEFAULT_JOB_QUEUE_ADDRESS);
    }

    #[test]
    fn a_wildcard_listen_address_is_refused_unless_allowed() {
        let config = BusConfig::default()
            .command_address("tcp://127.0.0.1:5555")
            .event_address("tcp://0.0.0.0:5556");
        let err = config.check_listen_addresses().unwrap_err();
        assert!(err.to_string().contains("tcp://0.0.0.0:5556"), "{err}");
        assert!(err.to_string().contains("event socket"), "{err}");
        assert!(config
            .allow_wildcard_listen(true)
            .check_listen_addresses()
            .is_ok());
        assert!(BusConfig::default().check_listen_addresses().is_ok());
    }

    #[test]
    fn a_dialed_queue_or_a_closed_edge_is_not_a_listen_address() {
        let mut config = BusConfig::default().job_queue_address("tcp://*:5557");
        config.queue_dial = true;
        assert!(config.check_listen_addresses().is_ok());
        let config = BusConfig::default()
            .data_address("tcp://*:5558")
            .edges(EdgeSet {
                data: false,
                ..EdgeSet::ALL
            });
        assert!(config.check_listen_addresses().is_ok());
    }

    #[test]
    fn setters_override_the_environment() {
        let config = BusConfig::default()
            .command_address("inproc://c")
            .edges(EdgeSet::NONE);
        assert_eq!(config.addresses.command, "inproc://c");
        assert_eq!(config.edges, EdgeSet::NONE);
    }
}
