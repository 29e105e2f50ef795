//! `handler = "noop"`: acknowledges every entry. For benchmarks and smoke tests.

use serde::{Deserialize, Serialize};

use crate::{Effects, Entry, Handler, HandlerError};

/// `noop` takes no options.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NoopOptions {}

#[derive(Debug, Default)]
pub struct Noop;

impl Handler for Noop {
    async fn handle(&self, _entry: &Entry) -> Result<Effects, HandlerError> {
        Ok(Effects::new())
    }
}
