//! `dgbit-bus serve`: run the bus until SIGINT or SIGTERM.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use tracing::{info, warn};

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
    /// SQLite file of the dead letter queue (`:memory:` keeps none across
    /// restarts). Default: $XDG_STATE_HOME/dgbit-bus/dead_letters.sqlite
    /// (~/.local/state when unset).
    #[arg(long, env = "DGBIT_DEAD_LETTER_PATH")]
    pub dead_letter_path: Option<String>,
    /// Dial the job queue address (a PULL worker listens there) instead of
    /// listening on it.
    #[arg(long)]
    pub queue_dial: bool,
    /// Job types pushed at most once to plain PULL peers (repeatable);
    /// `*` for any type no acknowledging worker wants.
    #[arg(long = "push-job-type", default_values_t = ["*".to_string()])]
    pub push_job_types: Vec<String>,
    /// Queue depth that raises `system.alert`.
    #[arg(long, default_value_t = 1000)]
    pub backlog_alert: usize,
    /// Seconds between `system.health` events.
    #[arg(long, default_value_t = 10.0)]
    pub health_interval_s: f64,
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
            dead_letter_path: dead_letter_path(self.dead_letter_path.as_deref()),
            queue_dial: self.queue_dial,
            push_job_types: self.push_job_types.iter().cloned().collect(),
            backlog_alert: self.backlog_alert,
            health_interval: Duration::from_secs_f64(self.health_interval_s.max(0.1)),
            ..BusConfig::default()
        }
    }
}

/// The dead letter file: as given, none for `:memory:`, else the default
/// under the XDG state directory (created when missing).
fn dead_letter_path(given: Option<&str>) -> Option<PathBuf> {
    match given {
        Some(":memory:") => None,
        Some(path) => Some(PathBuf::from(path)),
        None => {
            let state = std::env::var_os("XDG_STATE_HOME")
                .map(PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME").map(|home| Path::new(&home).join(".local/state"))
                })
                .unwrap_or_else(std::env::temp_dir)
                .join("dgbit-bus");
            if let Err(error) = std::fs::create_dir_all(&state) {
                warn!(dir = %state.display(), %error, "cannot create the dead letter directory");
            }
            Some(state.join("dead_letters.sqlite"))
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
