//! The overhead of a user's kind, measured: this binary has the built-ins plus `nothing`,
//! a registered kind that acknowledges every entry, so `bench-nothing.sh` can drain the
//! same entries with `noop` and with `nothing` from one build.

use std::process::ExitCode;

use serde::{Deserialize, Serialize};
use streamworker::{
    BuildError, Effects, Entry, Handler, HandlerContext, HandlerError, HandlerKind, HandlerOptions,
};

#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct NothingOptions {}

impl HandlerOptions for NothingOptions {}

struct Nothing;

impl Handler for Nothing {
    async fn handle(&self, _entry: &Entry) -> Result<Effects, HandlerError> {
        Ok(Effects::new())
    }
}

impl HandlerKind for Nothing {
    type Options = NothingOptions;
    fn build(_options: &NothingOptions, _context: &HandlerContext) -> Result<Self, BuildError> {
        Ok(Nothing)
    }
}

fn main() -> ExitCode {
    streamworker::App::new()
        .handler::<Nothing>("nothing")
        .main()
}
