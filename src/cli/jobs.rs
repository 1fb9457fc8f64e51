//! `dgbit-bus enqueue | cancel | work | jobs | dlq`: jobs and dead letters on
//! a running bus, all over its command bus.

use std::time::Duration;

use actix::Recipient;
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::AddressArgs;
use crate::client::ClientOptions;
use crate::message::RunJob;
use crate::worker::{default_worker_id, JobWorker, WorkerOptions, MAX_LEASE_WAIT};

/// Options shared by the commands that make one request.
#[derive(Debug, Clone, Args)]
pub struct RequestArgs {
    /// Seconds to wait for the bus's reply.
    #[arg(long, default_value_t = 30.0)]
    pub timeout_s: f64,
    /// Print the bus's whole reply as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Options of `dgbit-bus enqueue`.
#[derive(Debug, Clone, Args)]
pub struct EnqueueArgs {
    /// The job type, e.g. `run_backtest`.
    pub job_type: String,
    /// The job's payload, a JSON object.
    #[arg(default_value = "{}")]
    pub payload: String,
    /// 0 normal, 1 high, 2 urgent.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub priority: u8,
    /// Retries after the first attempt before the job is dead-lettered.
    #[arg(long)]
    pub max_retries: Option<u32>,
    /// How to talk to the bus.
    #[command(flatten)]
    pub request: RequestArgs,
}

/// Options of `dgbit-bus cancel`.
#[derive(Debug, Clone, Args)]
pub struct CancelArgs {
    /// The id of a job that is still waiting.
    pub job_id: String,
    /// How to talk to the bus.
    #[command(flatten)]
    pub request: RequestArgs,
}

/// Options of `dgbit-bus work`.
#[derive(Debug, Clone, Args)]
pub struct WorkArgs {
    /// Jobs run at once.
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// This worker's name on the bus (default `<host>-<pid>`).
    #[arg(long)]
    pub worker_id: Option<String>,
    /// Milliseconds one lease request may wait for a job (at most 5000).
    #[arg(long, default_value_t = 5000)]
    pub lease_wait_ms: u64,
    /// Run only these job types (repeat the flag); default all built-in
    /// handlers.
    #[arg(long = "job-type")]
    pub job_types: Vec<String>,
}

/// Options of `dgbit-bus jobs`.
#[derive(Debug, Clone, Args)]
pub struct JobsArgs {
    /// How to talk to the bus.
    #[command(flatten)]
    pub request: RequestArgs,
}

/// Options of `dgbit-bus dlq`.
#[derive(Debug, Clone, Args)]
pub struct DlqArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: DlqAction,
    /// How to talk to the bus.
    #[command(flatten)]
    pub request: RequestArgs,
}

/// What `dgbit-bus dlq` does.
#[derive(Debug, Clone, Subcommand)]
pub enum DlqAction {
    /// List entries, oldest first.
    List {
        /// Entries to skip.
        #[arg(long, default_value_t = 0)]
        offset: usize,
        /// Entries to list (at most 1000).
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Print one entry whole.
    Show {
        /// The entry's id.
        id: String,
    },
    /// Put entries' jobs back in the queue with a fresh attempt count.
    Replay {
        /// The entry to replay.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Replay every entry.
        #[arg(long)]
        all: bool,
    },
    /// Delete entries.
    Purge {
        /// The entry to delete.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Delete every entry.
        #[arg(long)]
        all: bool,
    },
}

/// Run one command on the command bus and return its result.
fn call(
    addresses: &AddressArgs,
    request: &RequestArgs,
    command: &str,
    payload: Value,
) -> anyhow::Result<Value> {
    let timeout = Duration::from_secs_f64(request.timeout_s);
    Ok(super::call_once(
        &addresses.command_address,
        timeout,
        command,
        payload,
    )?)
}

fn print(request: &RequestArgs, result: &Value, human: impl FnOnce(&Value)) {
    if request.json {
        println!("{result}");
    } else {
        human(result);
    }
}

/// Enqueue one job and print its id.
///
/// # Errors
///
/// When the payload is not a JSON object, the bus cannot be reached or
/// times out, or refuses the job (`overloaded`, `bad_request`).
pub fn run_enqueue(args: &EnqueueArgs, addresses: &AddressArgs) -> anyhow::Result<()> {
    let payload = super::json_object_arg(&args.payload, "payload")?;
    let mut request = json!({"job_type": args.job_type, "payload": payload,
                             "priority": args.priority});
    if let Some(max_retries) = args.max_retries {
        request["max_retries"] = max_retries.into();
    }
    let result = call(addresses, &args.request, "bus.enqueue", request)?;
    print(&args.request, &result, |r| {
        println!("{}", r["job_id"].as_str().unwrap_or("?"))
    });
    Ok(())
}

/// Cancel a waiting job.
///
/// # Errors
///
/// When the bus cannot be reached, or the job is unknown (`not_found`) or
/// already running (`in_flight`).
pub fn run_cancel(args: &CancelArgs, addresses: &AddressArgs) -> anyhow::Result<()> {
    let result = call(
        addresses,
        &args.request,
        "bus.cancel",
        json!({"job_id": args.job_id}),
    )?;
    print(&args.request, &result, |_| {
        println!("cancelled {}", args.job_id)
    });
    Ok(())
}

/// Print the queue's depth, in-flight count and workers.
///
/// # Errors
///
/// When the bus cannot be reached or times out.
pub fn run_jobs(args: &JobsArgs, addresses: &AddressArgs) -> anyhow::Result<()> {
    let result = call(addresses, &args.request, "bus.jobs", json!({}))?;
    print(&args.request, &result, |stats| {
        let field = |key: &str| stats[key].to_string();
        println!(
            "queue_depth {}  in_flight {}  completed {}  dead_lettered {}  redelivered {}",
            field("queue_depth"),
            field("in_flight"),
            field("completed"),
            field("dead_lettered"),
            field("redelivered"),
        );
        if let Some(workers) = stats["workers"].as_object() {
            for (id, worker) in workers {
                println!(
                    "  {id}: {} in flight, {} completed, {} failed, {} expired, last seen {}",
                    worker["in_flight"],
                    worker["completed"],
                    worker["failed"],
                    worker["expired"],
                    worker["last_seen"].as_str().unwrap_or("?"),
                );
            }
        }
    });
    Ok(())
}

/// List, show, replay or purge dead letters.
///
/// # Errors
///
/// When the bus cannot be reached or times out, or the entry is unknown
/// (`not_found`).
pub fn run_dlq(args: &DlqArgs, addresses: &AddressArgs) -> anyhow::Result<()> {
    let target = |id: &Option<String>, all: bool| match id {
        Some(id) if !all => json!({"id": id}),
        _ => json!({"all": true}),
    };
    let (command, payload) = match &args.action {
        DlqAction::List { offset, limit } => {
            ("bus.dlq.list", json!({"offset": offset, "limit": limit}))
        }
        DlqAction::Show { id } => ("bus.dlq.show", json!({"id": id})),
        DlqAction::Replay { id, all } => ("bus.dlq.replay", target(id, *all)),
        DlqAction::Purge { id, all } => ("bus.dlq.purge", target(id, *all)),
    };
    let result = call(addresses, &args.request, command, payload)?;
    print(&args.request, &result, |result| match &args.action {
        DlqAction::List { .. } => {
            println!("{} dead letter(s)", result["total"]);
            for entry in result["entries"].as_array().into_iter().flatten() {
                println!(
                    "{}  {}  {}  {}",
                    entry["id"].as_str().unwrap_or("?"),
                    entry["timestamp"].as_str().unwrap_or("?"),
                    entry["job_type"].as_str().unwrap_or("-"),
                    entry["error"].as_str().unwrap_or(""),
                );
            }
        }
        DlqAction::Show { .. } => {
            println!(
                "{}",
                serde_json::to_string_pretty(result).unwrap_or_default()
            )
        }
        DlqAction::Replay { .. } | DlqAction::Purge { .. } => println!("{result}"),
    });
    Ok(())
}

/// How much longer than its lease wait a worker waits for any reply.
const LINK_MARGIN: Duration = Duration::from_secs(5);

/// Run a worker process until SIGINT/SIGTERM, then drain.
///
/// `handlers` is called inside the worker's actix system to start the
/// handler actors; it returns one `(job_type, handler)` pair per job type.
///
/// # Errors
///
/// When no handler is left after the `--job-type` filter, or the command bus
/// cannot be reached.
pub fn run_work<F>(args: &WorkArgs, addresses: &AddressArgs, handlers: F) -> anyhow::Result<()>
where
    F: FnOnce() -> Vec<(String, Recipient<RunJob>)>,
{
    let options = WorkerOptions {
        worker_id: args.worker_id.clone().unwrap_or_else(default_worker_id),
        concurrency: args.concurrency.max(1),
        lease_wait: Duration::from_millis(args.lease_wait_ms).min(MAX_LEASE_WAIT),
        ..WorkerOptions::default()
    };
    let url = addresses.command_address.clone();
    let wanted = args.job_types.clone();
    actix::System::new().block_on(async move {
        let handlers: Vec<_> = handlers()
            .into_iter()
            .filter(|(job_type, _)| wanted.is_empty() || wanted.contains(job_type))
            .collect();
        anyhow::ensure!(
            !handlers.is_empty(),
            "no handler for the requested job types"
        );
        // A lease waits at most `lease_wait` on the bus: a reply later than
        // that plus a margin means the link is gone, so the worker finds out
        // in seconds rather than after the default 30 s.
        let client = ClientOptions::default().timeout(options.lease_wait + LINK_MARGIN);
        let mut worker = JobWorker::connect(&url, options, client).await?;
        for (job_type, handler) in handlers {
            worker = worker.handler(job_type, handler);
        }
        let summary = worker.run(super::serve::wait_for_signal()).await;
        println!("{}", serde_json::to_string(&summary).unwrap_or_default());
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    enum Cli {
        Enqueue(EnqueueArgs),
        Work(WorkArgs),
        Dlq(DlqArgs),
    }

    #[test]
    fn the_job_commands_parse_as_documented() {
        let cli = Cli::try_parse_from(["x", "enqueue", "fetch", r#"{"a":1}"#, "--priority", "2"]);
        let Ok(Cli::Enqueue(args)) = cli else {
            panic!("{cli:?}")
        };
        assert_eq!((args.job_type.as_str(), args.priority), ("fetch", 2));
        assert!(Cli::try_parse_from(["x", "enqueue", "t", "{}", "--priority", "3"]).is_err());

        let Ok(Cli::Dlq(args)) = Cli::try_parse_from(["x", "dlq", "replay", "--all"]) else {
            panic!()
        };
        assert!(matches!(
            args.action,
            DlqAction::Replay {
                id: None,
                all: true
            }
        ));
        assert!(
            Cli::try_parse_from(["x", "dlq", "purge"]).is_err(),
            "an id or --all"
        );

        let Ok(Cli::Work(args)) =
            Cli::try_parse_from(["x", "work", "--concurrency", "4", "--job-type", "a"])
        else {
            panic!()
        };
        assert_eq!(
            (args.concurrency, args.job_types),
            (4, vec!["a".to_string()])
        );
    }
}
