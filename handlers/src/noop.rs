//! `handler = "noop"`: acknowledges every entry. For benchmarks, smoke tests and failure
//! drills: it can simulate a handler's cost, asynchronously (`sleep`) or by blocking its
//! thread (`busy`, as CPU-bound or blocking code would).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{Effects, Entry, Handler, HandlerError};

/// `[groups.<name>.options]` for `handler = "noop"`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NoopOptions {
    /// Wait this long per entry without blocking (simulates I/O).
    #[serde(
        default,
        with = "crate::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub sleep: Option<Duration>,
    /// Block the thread this long per entry (simulates CPU-bound or blocking code; a
    /// value above a few seconds wedges the group, which `/livez` reports).
    #[serde(
        default,
        with = "crate::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub busy: Option<Duration>,
}

#[derive(Debug, Default)]
pub struct Noop {
    sleep: Option<Duration>,
    busy: Option<Duration>,
}

impl Noop {
    pub fn new(options: &NoopOptions) -> Self {
        Self {
            sleep: options.sleep.filter(|d| !d.is_zero()),
            busy: options.busy.filter(|d| !d.is_zero()),
        }
    }
}

impl Handler for Noop {
    async fn handle(&self, _entry: &Entry) -> Result<Effects, HandlerError> {
        if let Some(busy) = self.busy {
            std::thread::sleep(busy);
        }
        if let Some(sleep) = self.sleep {
            tokio::time::sleep(sleep).await;
        }
        Ok(Effects::new())
    }
}
