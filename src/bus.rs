//! Starting a bus: the roles, their edges, and the handle an application
//! keeps.
//!
//! ```no_run
//! use actix::prelude::*;
//! use dgbit_bus::bus::Bus;
//! use dgbit_bus::config::BusConfig;
//! use dgbit_bus::message::{Command, HandlerError};
//! use dgbit_bus::router::FnHandler;
//! use serde_json::{json, Value};
//!
//! #[actix::main]
//! async fn main() -> anyhow::Result<()> {
//!     let echo = FnHandler::new(|command: Command| -> Result<Value, HandlerError> {
//!         Ok(json!({"echo": command.request.payload}))
//!     })
//!     .start();
//!     let bus = Bus::builder(BusConfig::from_env())
//!         .command("echo", echo.recipient())
//!         .start()?;
//!     // ... serve until asked to stop ...
//!     bus.shutdown().await;
//!     Ok(())
//! }
//! ```

use actix::prelude::*;

use crate::builtin::BuiltinCommands;
use crate::config::BusConfig;
use crate::edge::rep::{InboundSink, RepEdge};
use crate::edge::{EdgeError, EdgeOptions};
use crate::message::Command;
use crate::router::{CommandRouter, Dispatch, RouteTable, RouterSettings, StopIntake};
use crate::wire::{CommandReply, CommandRequest};

/// Why a bus could not start.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("{role} edge: {source}")]
    Edge {
        role: &'static str,
        source: EdgeError,
    },
}

/// Collects handlers, then starts the bus.
pub struct BusBuilder {
    config: BusConfig,
    command_routes: RouteTable,
    data_routes: RouteTable,
}

/// Entry point: `Bus::builder(config)`.
pub struct Bus;

impl Bus {
    pub fn builder(config: BusConfig) -> BusBuilder {
        BusBuilder {
            config,
            command_routes: RouteTable::default(),
            data_routes: RouteTable::default(),
        }
    }
}

impl BusBuilder {
    /// Serve `name` on the command bus with `handler`.
    pub fn command(self, name: impl Into<String>, handler: Recipient<Command>) -> Self {
        self.command_routes.register(name, handler);
        self
    }

    /// Serve `name` on the data bus with `handler`.
    pub fn data_command(self, name: impl Into<String>, handler: Recipient<Command>) -> Self {
        self.data_routes.register(name, handler);
        self
    }

    /// Start every role and open the configured edges. Must be called inside
    /// a running actix system.
    ///
    /// # Errors
    ///
    /// [`BusError::Edge`] when a socket cannot listen (address in use by a
    /// live bus, directory missing, permission denied).
    pub fn start(self) -> Result<BusHandle, BusError> {
        let config = self.config;
        let command_router = start_router(&config, "command", self.command_routes.clone());
        let data_router = start_router(&config, "data", self.data_routes.clone());

        let status = BuiltinCommands::new(config.service_name.clone())
            .with_role("command", command_router.clone().recipient())
            .with_role("data", data_router.clone().recipient())
            .start();
        for routes in [&self.command_routes, &self.data_routes] {
            for name in ["ping", "echo", "status"] {
                routes.register_default(name, status.clone().recipient());
            }
        }

        let options = edge_options(&config);
        let mut edges = Vec::new();
        if config.edges.command {
            edges.push(open_rep(
                "command",
                &config.addresses.command,
                &config,
                &options,
                &command_router,
            )?);
        }
        if config.edges.data {
            edges.push(open_rep(
                "data",
                &config.addresses.data,
                &config,
                &options,
                &data_router,
            )?);
        }
        Ok(BusHandle {
            config,
            command_routes: self.command_routes,
            data_routes: self.data_routes,
            command_router,
            data_router,
            rep_edges: edges,
        })
    }
}

fn start_router(config: &BusConfig, role: &'static str, routes: RouteTable) -> Addr<CommandRouter> {
    let settings = RouterSettings {
        role,
        default_command: config.default_command.clone(),
        max_message_size: config.max_message_size,
        handler_timeout: config.handler_timeout,
        max_in_flight: config.max_commands_in_flight,
        dedup_capacity: config.dedup_capacity,
        dedup_ttl: config.dedup_ttl,
    };
    CommandRouter::new(settings, routes).start()
}

fn edge_options(config: &BusConfig) -> EdgeOptions {
    EdgeOptions {
        max_message_size: config.max_message_size,
        ipc_permissions: config.ipc_permissions,
        ..EdgeOptions::default()
    }
}

fn open_rep(
    role: &'static str,
    url: &str,
    config: &BusConfig,
    options: &EdgeOptions,
    router: &Addr<CommandRouter>,
) -> Result<RepEdge, BusError> {
    let router = router.clone();
    let sink: InboundSink = std::sync::Arc::new(move |inbound| router.do_send(inbound));
    RepEdge::listen(url, options, config.contexts_per_socket, sink)
        .map_err(|source| BusError::Edge { role, source })
}

/// A running bus. Dropping it closes the edges; [`BusHandle::shutdown`]
/// drains first.
pub struct BusHandle {
    config: BusConfig,
    command_routes: RouteTable,
    data_routes: RouteTable,
    command_router: Addr<CommandRouter>,
    data_router: Addr<CommandRouter>,
    rep_edges: Vec<RepEdge>,
}

impl BusHandle {
    pub fn config(&self) -> &BusConfig {
        &self.config
    }

    /// The command bus's handlers; register more while the bus runs.
    pub fn command_routes(&self) -> &RouteTable {
        &self.command_routes
    }

    pub fn data_routes(&self) -> &RouteTable {
        &self.data_routes
    }

    /// Run a command through the command router in-process, exactly as a
    /// remote request would run (dedup, timeout, error codes).
    pub async fn request(&self, request: CommandRequest) -> CommandReply {
        dispatch(&self.command_router, request).await
    }

    /// Run a command through the data router in-process.
    pub async fn data_request(&self, request: CommandRequest) -> CommandReply {
        dispatch(&self.data_router, request).await
    }

    /// Stop intake, wait for commands in flight up to the drain deadline,
    /// then close every edge and remove its ipc file.
    pub async fn shutdown(self) {
        let deadline = tokio::time::Instant::now() + self.config.drain_deadline;
        for router in [&self.command_router, &self.data_router] {
            while let Ok(in_flight) = router.send(StopIntake).await {
                if in_flight == 0 || tokio::time::Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
        for edge in &self.rep_edges {
            edge.close();
        }
    }
}

async fn dispatch(router: &Addr<CommandRouter>, request: CommandRequest) -> CommandReply {
    let echo = request.echo();
    router.send(Dispatch { request }).await.unwrap_or_else(|_| {
        CommandReply::error(echo, crate::wire::code::SHUTTING_DOWN, "the router is gone")
    })
}
