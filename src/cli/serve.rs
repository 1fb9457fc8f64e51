//! `dgbit-bus serve`: run the bus until SIGINT or SIGTERM.

use std::time::Duration;

use clap::Args;
use tracing::info;

use super::AddressArgs;
use crate::bus::Bus;
use crate::config::BusConfig;

/// Options of `dgbit-bus serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Command run for requests that carry no `command` ("" for none).
    #[arg(long, default_value = "run_backtest")]
    pub default_command: String,
    /// Largest message accepted on any socket, in bytes.
    #[arg(long, default_value_t = 8 * 1024 * 1024)]
    pub max_message_size: usize,
    /// Seconds a command handler may run before the caller gets `timeout`.
    #[arg(long, default_value_t = 60)]
    pub handler_timeout_s: u64,
    /// Seconds shutdown waits for work in flight.
    #[arg(long, default_value_t = 10)]
    pub drain_deadline_s: u64,
}

impl ServeArgs {
    /// The bus configuration these options and addresses describe.
    pub fn config(&self, addresses: &AddressArgs) -> BusConfig {
        let default_command = Some(self.default_command.clone()).filter(|name| !name.is_empty());
        BusConfig {
            addresses: addresses.addresses(),
            default_command,
            max_message_size: self.max_message_size,
            handler_timeout: Duration::from_secs(self.handler_timeout_s),
            drain_deadline: Duration::from_secs(self.drain_deadline_s),
            ..BusConfig::default()
        }
    }
}

/// Run the bus with the built-in handlers until a signal arrives.
///
/// # Errors
///
/// When a role crashed too often and was given up (the bus exits non-zero
/// so that an outer supervisor restarts it).
pub fn run_serve(args: &ServeArgs, addresses: &AddressArgs) -> anyhow::Result<()> {
    let config = args.config(addresses);
    actix::System::new().block_on(async move {
        let bus = Bus::builder(config.clone()).start()?;
        info!(
            command = %config.addresses.command,
            data = %config.addresses.data,
            event = %config.addresses.event,
            queue = %config.addresses.job_queue,
            "bus starting"
        );
        let gone = tokio::select! {
            _ = wait_for_signal() => None,
            role = bus.fatal() => Some(role),
        };
        info!("shutdown requested; draining");
        bus.shutdown().await;
        match gone {
            None => {
                info!("bus stopped");
                Ok(())
            }
            Some(role) => anyhow::bail!("role `{role}` crashed too often and was given up"),
        }
    })
}

/// Resolve on SIGINT or SIGTERM.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(stream) => stream,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}
