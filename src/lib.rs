//! streamworker: runs Redis Streams consumer groups in production.
//!
//! See ARCHITECTURE.md for the map and the invariants. The binary (`main.rs`) is a thin
//! edge over this library: it parses the command line and maps outcomes to exit codes.
//!
//! # Layout
//!
//! In reading order, following an entry from the configuration to its acknowledgement:
//!
//! - [`config`]: the configuration file, loaded with its overrides and checked (every
//!   problem at once);
//! - [`supervisor`]: one task per group, restarted with backoff; the run's outcome;
//! - [`shutdown`]: the shutdown handle (token and deadline) and the signal thread;
//! - [`consumer`]: a group's loop, the only caller of `Handler::handle` and the only place
//!   that decides an entry's fate;
//! - [`retry`]: the retry policy, a pure function of the result and the delivery count;
//! - [`circuit`]: the circuit breaker the loop feeds with results;
//! - [`lease`]: one process per consumer name;
//! - [`maintenance`]: retention, forgetting gone consumers, group gauges;
//! - [`dead_letter`]: what a dead letter is made of, and its stream's default name;
//! - [`keys`]: every key derived from a stream, each in its stream's cluster slot;
//! - [`partition`]: which partition a key belongs to, and each partition's stream name;
//! - [`client`]: the only module that sends commands to Redis;
//! - [`store`]: the handlers' narrow view of Redis (handlers glue; the handlers
//!   themselves are the [`handlers`] crate);
//! - [`telemetry`]: logs and traces;
//! - [`metrics`]: every metric, registered once;
//! - [`health`], [`http`], [`healthcheck`]: `/livez`, `/readyz`, `/metrics`, and the
//!   image's probe of them;
//! - [`inspect`]: what Redis says about streams and groups, for `status` and the gauges;
//! - [`admin`]: the operator's commands (`status`, `dlq`, `stats`, `pending`, `rewind`,
//!   `pause`);
//! - [`console`]: the web console over the same views and commands (`http.console`);
//! - [`tools`]: `produce`, `demo`, `bench`: around the daemon, never inside it.

// The daemon, in the order an entry meets it.
pub mod config;

pub mod supervisor;

pub mod shutdown;

pub mod consumer;

pub mod retry;

pub mod circuit;

pub mod lease;

pub mod maintenance;

// Facts about Redis: what a dead letter holds, which keys a stream has.
pub mod dead_letter;

pub mod keys;

pub mod partition;

// Redis, spoken in one place.
pub mod client;

// Handlers glue.
pub mod store;

// Observability.
pub mod telemetry;

pub mod metrics;

pub mod health;

pub mod http;

pub mod healthcheck;

pub mod inspect;

// Operators.
pub mod admin;

pub mod console;

// Around the daemon.
pub mod tools;

pub use streamworker_handlers as handlers;

/// The version line of `--version` and `streamworker_build_info`.
pub fn version() -> &'static str {
    static VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    VERSION.get_or_init(|| {
        format!(
            "{} (commit {}, {} build)",
            env!("CARGO_PKG_VERSION"),
            option_env!("STREAMWORKER_COMMIT").unwrap_or("unknown"),
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            }
        )
    })
}
