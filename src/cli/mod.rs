//! The `dgbit-bus` binary's subcommands.
//!
//! One file per group: [`serve`] runs the bus, [`send`] talks to a running
//! command or data bus, [`events`] publishes and tails events, [`jobs`]
//! enqueues, works on and inspects jobs and dead letters.

pub mod events;
pub mod jobs;
pub mod send;
pub mod serve;

use std::time::Duration;

use clap::Args;
use serde_json::{Map, Value};

use crate::client::{into_result, BusClient, ClientError, ClientOptions};
use crate::wire::{CommandReply, CommandRequest};

use crate::config::{
    Addresses, COMMAND_ADDRESS_VAR, DATA_ADDRESS_VAR, DEFAULT_COMMAND_ADDRESS,
    DEFAULT_DATA_ADDRESS, DEFAULT_EVENT_ADDRESS, DEFAULT_JOB_QUEUE_ADDRESS, EVENT_ADDRESS_VAR,
    JOB_QUEUE_ADDRESS_VAR,
};

/// The bus's addresses, from flags or the `NNG_*_ADDRESS` variables.
#[derive(Debug, Clone, Args)]
pub struct AddressArgs {
    /// Command bus (REQ/REP) address.
    #[arg(long, global = true, env = COMMAND_ADDRESS_VAR, default_value = DEFAULT_COMMAND_ADDRESS)]
    pub command_address: String,
    /// Event bus (PUB/SUB) address.
    #[arg(long, global = true, env = EVENT_ADDRESS_VAR, default_value = DEFAULT_EVENT_ADDRESS)]
    pub event_address: String,
    /// Job queue (PUSH/PULL) address.
    #[arg(long, global = true, env = JOB_QUEUE_ADDRESS_VAR, default_value = DEFAULT_JOB_QUEUE_ADDRESS)]
    pub queue_address: String,
    /// Data bus (REQ/REP) address.
    #[arg(long, global = true, env = DATA_ADDRESS_VAR, default_value = DEFAULT_DATA_ADDRESS)]
    pub data_address: String,
}

impl AddressArgs {
    pub fn addresses(&self) -> Addresses {
        Addresses {
            command: self.command_address.clone(),
            event: self.event_address.clone(),
            job_queue: self.queue_address.clone(),
            data: self.data_address.clone(),
        }
    }
}

/// Send one request to a running bus, as a one-shot CLI command does:
/// connect (three attempts, 200 ms apart, doubling), send, wait up to
/// `timeout`.
///
/// # Errors
///
/// As [`BusClient::connect`] and [`BusClient::request`].
pub fn request_once(
    url: &str,
    timeout: Duration,
    request: &CommandRequest,
) -> Result<CommandReply, ClientError> {
    let options = ClientOptions::default()
        .timeout(timeout)
        .connect_attempts(3, Duration::from_millis(200));
    block_on(async {
        let client = BusClient::connect(url, options).await?;
        client.request(request).await
    })
}

/// Run `command` once on a running bus and return its result.
///
/// # Errors
///
/// As [`request_once`], plus [`ClientError::Remote`] for an error reply.
pub fn call_once(
    url: &str,
    timeout: Duration,
    command: &str,
    payload: Value,
) -> Result<Value, ClientError> {
    into_result(request_once(
        url,
        timeout,
        &CommandRequest::new(command, payload),
    )?)
}

/// Run a future to completion on a fresh single-threaded runtime.
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime always builds")
        .block_on(future)
}

/// A JSON object given on the command line; `what` names it in the error.
///
/// # Errors
///
/// "the `what` must be a JSON object" with serde's reason.
pub fn json_object_arg(text: &str, what: &str) -> anyhow::Result<Map<String, Value>> {
    serde_json::from_str(text)
        .map_err(|err| anyhow::anyhow!("the {what} must be a JSON object: {err}"))
}
