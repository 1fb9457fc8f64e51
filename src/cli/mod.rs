//! The `dgbit-bus` binary's subcommands.
//!
//! One file per group: [`serve`] runs the bus, [`send`] talks to a running
//! command or data bus, [`events`] publishes and tails events, [`jobs`]
//! enqueues, works on and inspects jobs and dead letters.

pub mod events;
pub mod jobs;
pub mod send;
pub mod serve;

use clap::Args;

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
