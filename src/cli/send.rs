//! `dgbit-bus send`: one command to a running bus, reply printed as JSON.

use std::time::Duration;

use clap::Args;
use serde_json::Value;

use super::AddressArgs;
use crate::wire::CommandReply;

/// Options of `dgbit-bus send`.
#[derive(Debug, Clone, Args)]
pub struct SendArgs {
    /// The command name, e.g. `ping`.
    pub command: String,
    /// The payload as a JSON object.
    #[arg(default_value = "{}")]
    pub payload: String,
    /// Send to the data bus instead of the command bus.
    #[arg(long)]
    pub data: bool,
    /// Seconds to wait for the reply.
    #[arg(long, default_value_t = 30.0)]
    pub timeout_s: f64,
    /// `job_uuid` to put on the request (for deduplication).
    #[arg(long)]
    pub job_uuid: Option<String>,
}

impl SendArgs {
    /// The arguments of `dgbit-bus status`: the `status` command.
    pub fn status() -> Self {
        Self {
            command: "status".into(),
            payload: "{}".into(),
            data: false,
            timeout_s: 10.0,
            job_uuid: None,
        }
    }
}

/// Send the command and print the reply; an error reply exits non-zero.
///
/// # Errors
///
/// When the payload is not a JSON object, the bus cannot be reached, the
/// request times out, or the bus answers with an error.
pub fn run_send(args: &SendArgs, addresses: &AddressArgs) -> anyhow::Result<()> {
    let payload = super::json_object_arg(&args.payload, "payload")?;
    let url = if args.data {
        &addresses.data_address
    } else {
        &addresses.command_address
    };
    let mut request =
        crate::wire::CommandRequest::new(args.command.clone(), Value::Object(payload));
    request.job_uuid = args.job_uuid.clone();
    let reply = super::request_once(url, Duration::from_secs_f64(args.timeout_s), &request)?;
    println!("{}", reply.to_value());
    match reply {
        CommandReply::Ok { .. } => Ok(()),
        CommandReply::Error { code, error, .. } => anyhow::bail!("{code}: {error}"),
    }
}
