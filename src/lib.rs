//! streamworker: runs Redis Streams consumer groups in production.
//!
//! See ARCHITECTURE.md for the map. The binary (`main.rs`) is a thin edge over this
//! library: it parses the command line and maps outcomes to exit codes.

pub mod admin;
mod app;
pub mod bench;
pub mod circuit;
mod cli;
pub mod client;
pub mod config;
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
