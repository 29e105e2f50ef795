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
//! See ARCHITECTURE.md for the map.

pub mod admin;
mod app;
pub mod bench;
pub mod circuit;
mod cli;
pub mod client;
pub mod config;
pub mod console;
pub mod consumer;
pub mod demo;
pub mod health;
pub mod healthcheck;
pub mod http;
pub mod inspect;
pub mod lease;
pub mod local_redis;
pub mod maintenance;
pub mod metrics;
pub mod produce;
pub mod retry;
pub mod shutdown;
pub mod store;
pub mod supervisor;
pub mod telemetry;

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
