//! A registered kind at its thinnest: this binary has the built-ins plus `nothing`, which
//! acknowledges every entry. Two uses:
//!
//! - `bench-nothing.py` drains the same entries with `noop` and with `nothing` from this one
//!   build: what a user's kind costs next to a built-in;
//! - with `batch` and `tick_ms` set, `tests/end_to_end.rs` checks that a user's kind gets
//!   batches and ticks like the built-ins: each batch counts itself in the hash
//!   `<stream>:nothing` (through effects), each tick sets `<stream>:nothing:ticked`.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use streamworker::{
    Batching, BuildError, Effect, Effects, Entry, Handler, HandlerContext, HandlerError,
    HandlerKind, HandlerOptions, Needs, ResultExt, Store,
};

/// How long a batch waits for more entries.
const MAX_WAIT: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct NothingOptions {
    /// Take entries in batches of up to this many.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    batch: Option<usize>,
    /// Tick this often, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tick_ms: Option<u64>,
}

impl HandlerOptions for NothingOptions {
    // A batched entry waits up to MAX_WAIT before its handler starts: its idle time in Redis
    // must still stay below claim_idle.
    fn needs(&self, _is_set: &dyn Fn(&str) -> bool) -> Needs {
        Needs {
            claim_idle_margin: if self.batch.is_some() {
                MAX_WAIT
            } else {
                Duration::ZERO
            },
            ..Needs::default()
        }
    }
}

struct Nothing {
    options: NothingOptions,
    key: String,
    store: Arc<dyn Store>,
}

impl Handler for Nothing {
    async fn handle(&self, _entry: &Entry) -> Result<Effects, HandlerError> {
        Ok(Effects::new())
    }

    fn batching(&self) -> Option<Batching> {
        self.options.batch.map(|max_entries| Batching {
            max_entries,
            max_wait: MAX_WAIT,
        })
    }

    async fn handle_batch(&self, entries: &[Entry]) -> Vec<Result<Effects, HandlerError>> {
        let count = |field: &str| Effect::HashIncr {
            key: self.key.clone(),
            field: field.into(),
            by: 1,
        };
        (0..entries.len())
            .map(|i| {
                let mut effects = vec![count("entries")];
                if i == 0 {
                    effects.push(count("batches"));
                }
                Ok(effects)
            })
            .collect()
    }

    fn tick_every(&self) -> Option<Duration> {
        self.options.tick_ms.map(Duration::from_millis)
    }

    async fn tick(&self) -> Result<(), HandlerError> {
        self.store
            .set(format!("{}:ticked", self.key), "1".into(), None)
            .await
            .retryable()
    }
}

impl HandlerKind for Nothing {
    type Options = NothingOptions;
    fn build(options: &NothingOptions, context: &HandlerContext) -> Result<Self, BuildError> {
        Ok(Nothing {
            options: options.clone(),
            key: format!("{}:nothing", context.stream),
            store: Arc::clone(&context.store),
        })
    }
}

fn main() -> ExitCode {
    streamworker::App::new()
        .handler::<Nothing>("nothing")
        .main()
}
