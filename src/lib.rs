//! streamworker: runs Redis Streams consumer groups in production.
//!
//! # Your own handler
//!
//! A crate that depends on `streamworker` gets the whole daemon with handler kinds of its
//! own: implement [`Handler`] (what to do with one entry) and [`HandlerKind`] (its
//! [`HandlerOptions`] and how it is built from them), then register it on an [`App`]:
//!
//! ```no_run
//! use serde::{Deserialize, Serialize};
//! use streamworker::{
//!     BuildError, Effect, Effects, Entry, Handler, HandlerContext, HandlerError, HandlerKind,
//!     HandlerOptions, ResultExt,
//! };
//!
//! /// `[groups.<name>.options]`
//! #[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
//! #[serde(deny_unknown_fields)]
//! struct Options {
//!     totals: String,
//! }
//! impl HandlerOptions for Options {}
//!
//! struct Totals {
//!     key: String,
//! }
//!
//! impl Handler for Totals {
//!     async fn handle(&self, entry: &Entry) -> Result<Effects, HandlerError> {
//!         let amount: i64 = entry.get("amount").unwrap_or_default().parse().permanent()?;
//!         Ok(vec![Effect::HashIncr { key: self.key.clone(), field: "amount".into(), by: amount }])
//!     }
//! }
//!
//! impl HandlerKind for Totals {
//!     type Options = Options;
//!     fn build(options: &Options, _context: &HandlerContext) -> Result<Self, BuildError> {
//!         Ok(Totals { key: options.totals.clone() })
//!     }
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     streamworker::App::new().handler::<Totals>("totals").main()
//! }
//! ```
//!
//! `handler = "totals"` then works in the TOML file like any built-in: `check` reports
//! its options' problems with file, key and value; `run` gives it batches, ticks, effects
//! applied with the acknowledgement, metrics, spans and the retry/permanent/drop error
//! kinds. The items at the top of this crate are that API; see `docs/writing-a-handler.md`.
//! The modules below are the runtime, public for the binary and its tests, not an API.
//!
//! See ARCHITECTURE.md for the map and the invariants. The binary (`main.rs`) is
//! `App::new().main()`: [`App`] and the command line it runs are the program's edge.
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
//! - [`tools`]: `produce`, `demo`, `bench`: around the daemon, never inside it;
//! - [`App`] (`app.rs`) and the command line (`cli.rs`): the program's edge, shared by the
//!   shipped binary and a user's own.

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

// The program's edge: a binary's handler kinds and its command line.
mod app;
mod cli;

pub use streamworker_handlers as handlers;

pub use app::App;

// The extension API: everything a handler crate needs, and nothing of Redis, the runtime
// or the supervisor. `tests/public_api.rs` keeps this list deliberate.
pub use streamworker_handlers::{
    Batching, BuildError, Derived, Effect, Effects, Entry, EntryId, Handler, HandlerContext,
    HandlerError, HandlerKind, HandlerOptions, Limits, MemoryStore, Needs, OptionProblem, Origin,
    Payload, PayloadFormat, ResultExt, Store, StoreCall, StoreError, StoreFuture,
};

// The command line (`cli.rs`) names the library by its crate name, as it did when it was
// the binary.
extern crate self as streamworker;

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
