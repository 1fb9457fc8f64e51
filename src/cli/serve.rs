//! `dgbit-bus serve`: run the bus until SIGINT or SIGTERM.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use tracing::{info, warn};

use super::AddressArgs;
use crate::backoff::{BackoffPolicy, RestartBudget, DEFAULT_BUDGET_WINDOW, DEFAULT_MAX_RESTARTS};
use crate::bus::Bus;
use crate::config::BusConfig;

/// Options of `dgbit-bus serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Command run for requests that carry no `command` ("" for none).
    #[arg(long, default_value_t = BusConfig::default().default_command.unwrap_or_default())]
    pub default_command: String,
    /// Largest message accepted on any socket, in bytes.
    #[arg(long, default_value_t = BusConfig::default().max_message_size)]
    pub max_message_size: usize,
    /// Seconds a command handler may run before the caller gets `timeout`.
    #[arg(long, default_value_t = BusConfig::default().handler_timeout.as_secs())]
    pub handler_timeout_s: u64,
    /// Seconds shutdown waits for work in flight.
    #[arg(long, default_value_t = BusConfig::default().drain_deadline.as_secs())]
    pub drain_deadline_s: u64,
    /// Restarts granted to each role (router, publisher, edge, ...) within
    /// `--restart-window-s`; at the next crash the role is given up and
    /// `serve` exits non-zero.
    #[arg(long, default_value_t = DEFAULT_MAX_RESTARTS)]
    pub max_restarts: u32,
    /// Seconds of the sliding window the restart budget is counted in.
    #[arg(long, default_value_t = DEFAULT_BUDGET_WINDOW.as_secs())]
    pub restart_window_s: u64,
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
    #[arg(long, default_value_t = BusConfig::default().backlog_alert)]
    pub backlog_alert: usize,
    /// Seconds between `system.health` events.
    #[arg(long, default_value_t = BusConfig::default().health_interval.as_secs_f64())]
    pub health_interval_s: f64,
    /// Milliseconds before a failed job's first retry (doubling after).
    #[arg(long, default_value_t = BusConfig::default().job_retry_base.as_millis() as u64)]
    pub job_retry_base_ms: u64,
    /// Replies remembered for duplicate suppression (each kept 10 minutes).
    #[arg(long, default_value_t = BusConfig::default().dedup_capacity)]
    pub dedup_capacity: usize,
    /// Seconds a leasing worker may stay silent before its job is
    /// redelivered (every report renews the lease).
    #[arg(long, env = "DGBIT_JOB_LEASE_S", default_value_t = BusConfig::default().job_lease.as_secs_f64())]
    pub job_lease_s: f64,
    /// Mode of the ipc socket files, in octal. A peer needs write permission
    /// on the file to connect: 660 lets in the bus's user and group only.
    #[arg(long, env = "DGBIT_IPC_MODE", default_value = "660", value_parser = parse_mode)]
    pub ipc_mode: u32,
    /// Mode, in octal, of an ipc file's directory when it is missing and the
    /// bus creates it (only the last component; an existing one is left
    /// as it is); `off` creates none and waits for it instead.
    #[arg(long, env = "DGBIT_IPC_DIR_MODE", default_value = "750", value_parser = parse_dir_mode)]
    pub ipc_dir_mode: IpcDirMode,
    /// Allow a wildcard tcp listen address (tcp://0.0.0.0:p, tcp://*:p,
    /// tcp://[::]:p), which accepts connections on every interface. Without
    /// it, such an address is refused at start.
    #[arg(long, env = "DGBIT_ALLOW_WILDCARD_LISTEN")]
    pub allow_wildcard_listen: bool,
}

/// Whether `serve` creates a missing ipc directory, and with which mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpcDirMode {
    Off,
    Create(u32),
}

/// An octal file mode such as `660`, `0660` or `0o660`.
fn parse_mode(text: &str) -> Result<u32, String> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    match u32::from_str_radix(digits, 8) {
        Ok(mode) if mode <= 0o777 && !digits.is_empty() => Ok(mode),
        _ => Err(format!("`{text}` is not an octal mode between 000 and 777")),
    }
}

fn parse_dir_mode(text: &str) -> Result<IpcDirMode, String> {
    match text {
        "off" => Ok(IpcDirMode::Off),
        mode => parse_mode(mode).map(IpcDirMode::Create),
    }
}

impl ServeArgs {
    /// The restart schedule of every role: the default one (see
    /// [`BackoffPolicy`]) with the budget these options set.
    pub fn restart_policy(&self) -> BackoffPolicy {
        BackoffPolicy {
            budget: RestartBudget {
                max_restarts: self.max_restarts,
                window: Duration::from_secs(self.restart_window_s.max(1)),
            },
            ..BackoffPolicy::default()
        }
    }

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
            dedup_capacity: self.dedup_capacity,
            job_retry_base: Duration::from_millis(self.job_retry_base_ms),
            job_lease: Duration::from_secs_f64(self.job_lease_s.max(0.1)),
            ipc_permissions: self.ipc_mode,
            allow_wildcard_listen: self.allow_wildcard_listen,
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

/// Create the missing directories of the bus's ipc listen addresses. One
/// that cannot be created is left to the edge, which waits for it.
fn create_ipc_dirs(config: &BusConfig, mode: IpcDirMode) {
    let IpcDirMode::Create(mode) = mode else {
        return;
    };
    for (socket, url) in config.listen_addresses() {
        match crate::edge::create_ipc_dir(url, mode) {
            Ok(Some(dir)) => {
                info!(socket, dir = %dir.display(), mode = format!("{mode:o}"), "created ipc directory")
            }
            Ok(None) => {}
            Err(error) => warn!(socket, url, %error, "cannot create the ipc directory"),
        }
    }
}

/// Run the bus with the built-in handlers until a signal arrives.
///
/// # Errors
///
/// When a listen address is a wildcard that is not allowed; when a role
/// crashed too often and was given up (the bus exits non-zero so that an
/// outer supervisor restarts it).
pub fn run_serve(args: &ServeArgs, addresses: &AddressArgs) -> anyhow::Result<()> {
    let config = args.config(addresses);
    let policy = args.restart_policy();
    config.check_listen_addresses()?;
    create_ipc_dirs(&config, args.ipc_dir_mode);
    actix::System::new().block_on(async move {
        let bus = Bus::builder(config.clone())
            .restart_policy(policy)
            .start()?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        addresses: AddressArgs,
        #[command(flatten)]
        serve: ServeArgs,
    }

    #[test]
    fn modes_are_octal_in_any_usual_spelling() {
        assert_eq!(parse_mode("660"), Ok(0o660));
        assert_eq!(parse_mode("0660"), Ok(0o660));
        assert_eq!(parse_mode("0o600"), Ok(0o600));
        for bad in ["", "0o", "888", "1777", "rw-rw----", "-1"] {
            assert!(parse_mode(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_dir_mode("off"), Ok(IpcDirMode::Off));
        assert_eq!(parse_dir_mode("700"), Ok(IpcDirMode::Create(0o700)));
    }

    #[test]
    fn the_restart_budget_flags_set_the_policy_budget_only() {
        let cli = Cli::try_parse_from(["serve", "--max-restarts", "2", "--restart-window-s", "60"])
            .unwrap();
        let policy = cli.serve.restart_policy();
        assert_eq!(policy.budget.max_restarts, 2);
        assert_eq!(policy.budget.window, Duration::from_secs(60));
        assert_eq!(policy.base, BackoffPolicy::default().base);

        let defaults = Cli::try_parse_from(["serve"]).unwrap();
        assert_eq!(defaults.serve.restart_policy(), BackoffPolicy::default());
    }

    #[test]
    fn the_access_and_lease_flags_reach_the_bus_config() {
        let cli = Cli::try_parse_from([
            "serve",
            "--ipc-mode",
            "600",
            "--job-lease-s",
            "2.5",
            "--allow-wildcard-listen",
        ])
        .unwrap();
        let config = cli.serve.config(&cli.addresses);
        assert_eq!(config.ipc_permissions, 0o600);
        assert_eq!(config.job_lease, Duration::from_millis(2500));
        assert!(config.allow_wildcard_listen);

        let defaults = Cli::try_parse_from(["serve"]).unwrap();
        let config = defaults.serve.config(&defaults.addresses);
        assert_eq!(config.ipc_permissions, 0o660);
        assert_eq!(config.job_lease, Duration::from_secs(30));
        assert!(!config.allow_wildcard_listen);
        assert_eq!(defaults.serve.ipc_dir_mode, IpcDirMode::Create(0o750));
    }
}
