//! The `dgbit-bus` binary: run a bus, or talk to a running one.

use std::io::IsTerminal;
use std::process::ExitCode;

use actix::prelude::*;
use clap::{Parser, Subcommand};
use dgbit_bus::builtin::{BuiltinJobs, BUILTIN_JOB_TYPES};
use dgbit_bus::cli::events::{run_publish, run_tail, PublishArgs, TailArgs};
use dgbit_bus::cli::jobs::{
    run_cancel, run_dlq, run_enqueue, run_jobs, run_work, CancelArgs, DlqArgs, EnqueueArgs,
    JobsArgs, WorkArgs,
};
use dgbit_bus::cli::send::{run_send, SendArgs};
use dgbit_bus::cli::serve::{run_serve, ServeArgs};
use dgbit_bus::cli::AddressArgs;
use tracing_subscriber::EnvFilter;

/// dgbit's NNG service bus: command (REQ/REP), event (PUB/SUB), job queue
/// (PUSH/PULL) and data (REQ/REP) sockets, with a dead letter queue.
///
/// Addresses come from the flags or the NNG_COMMAND_ADDRESS,
/// NNG_EVENT_ADDRESS, NNG_JOB_QUEUE_ADDRESS and NNG_DATA_ADDRESS variables.
/// Log level from RUST_LOG (default info).
#[derive(Debug, Parser)]
#[command(name = "dgbit-bus", version, about, long_about)]
struct Cli {
    #[command(flatten)]
    addresses: AddressArgs,
    #[command(subcommand)]
    command: Commands,
}

#[derive(Debug, Subcommand)]
enum Commands {
    /// Run the bus until SIGINT/SIGTERM.
    Serve(ServeArgs),
    /// Send one command to a running bus and print the reply.
    Send(SendArgs),
    /// Publish one event into a running bus (through its command bus).
    Publish(PublishArgs),
    /// Print events matching PATTERN as they arrive, one JSON per line.
    Tail(TailArgs),
    /// Put a job on a running bus's queue.
    Enqueue(EnqueueArgs),
    /// Cancel a job that is still waiting in the queue.
    Cancel(CancelArgs),
    /// Run a worker with the built-in job types (noop, echo, sleep, fail).
    Work(WorkArgs),
    /// Show the queue: depth, jobs in flight, workers.
    Jobs(JobsArgs),
    /// List, show, replay or purge dead letters.
    Dlq(DlqArgs),
    /// Show the bus's status: every role's counters and restarts.
    Status,
}

fn builtin_job_handlers() -> Vec<(String, Recipient<dgbit_bus::message::RunJob>)> {
    let jobs = BuiltinJobs.start();
    BUILTIN_JOB_TYPES
        .iter()
        .map(|name| (name.to_string(), jobs.clone().recipient()))
        .collect()
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    let outcome = match &cli.command {
        Commands::Serve(args) => run_serve(args, &cli.addresses),
        Commands::Send(args) => run_send(args, &cli.addresses),
        Commands::Publish(args) => run_publish(args, &cli.addresses),
        Commands::Tail(args) => run_tail(args, &cli.addresses),
        Commands::Enqueue(args) => run_enqueue(args, &cli.addresses),
        Commands::Cancel(args) => run_cancel(args, &cli.addresses),
        Commands::Work(args) => run_work(args, &cli.addresses, builtin_job_handlers),
        Commands::Jobs(args) => run_jobs(args, &cli.addresses),
        Commands::Dlq(args) => run_dlq(args, &cli.addresses),
        Commands::Status => run_send(&SendArgs::status(), &cli.addresses),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("dgbit-bus: {err:#}");
            ExitCode::FAILURE
        }
    }
}
