//! `streamworker-handlers`: what a handler is, what it sees, and the built-in handlers.
//!
//! This crate knows nothing about Redis or the runtime on purpose. A handler gets an
//! [`Entry`] and answers `Ok(effects)` or a [`HandlerError`] saying what should happen to the
//! entry; the runtime alone decides when to acknowledge, retry or dead-letter, so a handler
//! can neither acknowledge early nor lose an entry. A user's own handler kind implements
//! the same traits as the built-ins ([`Handler`], [`HandlerKind`], [`HandlerOptions`]); the
//! `streamworker` crate re-exports them with `App`, which registers the kind by name.

pub mod alerts;
pub mod analytics;
mod batch_wait;
mod builtins;
pub mod duration;
mod effect;
mod entry;
mod error;
pub mod forward;
mod jsonl;
pub mod learning;
pub mod noop;
pub mod redact;
mod slot;
mod spec;
mod store;
pub mod warehouse;
pub mod webhook;

use std::future::Future;
use std::time::Duration;

pub use builtins::register_builtins;
pub use effect::{Effect, Effects};
pub use entry::{
    Entry, EntryId, Origin, Payload, PayloadFormat, REPLAY_GROUP_FIELD, REPLAY_OF_FIELD,
};
pub use error::{HandlerError, ResultExt, one_line};
pub use slot::{hash_input, slot_tag, slot_tag_reaches};
pub use spec::{
    BuildError, Derived, HandlerContext, HandlerKind, HandlerOptions, Limits, Needs, OptionProblem,
    Register,
};

pub use store::{MemoryStore, Store, StoreCall, StoreError, StoreFuture};

/// How a handler asks for per-key order: entries with the same value of `field` (or, with
/// `partitions`, whose values fall in the same partition, `crc32(value) % partitions`)
/// are handled one at a time, in id order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ordering {
    pub field: String,
    pub partitions: Option<u32>,
}

/// The partition (0-based) of `key` among `partitions`: CRC-32 (zlib's) of the key's bytes
/// modulo the partitions. The daemon's `partition::partition_of` re-exports it; its tests
/// hold the known answers producers in other languages can check against.
pub fn partition_of(key: &[u8], partitions: u32) -> u32 {
    crc32fast::hash(key) % partitions.max(1)
}

/// Business logic for one consumer group.
///
/// The runtime calls [`Handler::handle`] with up to `concurrency` entries at once, each under
/// `handler_timeout`, with panics caught. `Ok(effects)` acknowledges the entry and applies
/// the effects in the same atomic step (so they happen exactly once);
/// [`HandlerError::Drop`] acknowledges it without effects; the other errors retry or
/// dead-letter it. Handlers are called at least once per entry: side effects outside Redis
/// must be idempotent (key them on [`Entry::idempotency_id`]).
pub trait Handler: Send + Sync + 'static {
    /// Handles one entry: `Ok` with the writes to make together with its acknowledgement
    /// (usually none), or the [`HandlerError`] that decides its fate (retry, dead-letter,
    /// or acknowledge without effects).
    fn handle(&self, entry: &Entry) -> impl Future<Output = Result<Effects, HandlerError>> + Send;

    /// `Some` to receive entries in batches through [`Handler::handle_batch`].
    fn batching(&self) -> Option<Batching> {
        None
    }

    /// `Some` when the handler needs entries handled in order per key, one at a time,
    /// as with a group's `order_by` (which takes precedence).
    fn ordering(&self) -> Option<Ordering> {
        None
    }

    /// Handles a batch, answering one result per entry, in order. Only called when
    /// [`Handler::batching`] says so; the default handles the entries one by one.
    fn handle_batch(
        &self,
        entries: &[Entry],
    ) -> impl Future<Output = Vec<Result<Effects, HandlerError>>> + Send {
        async move {
            let mut out = Vec::with_capacity(entries.len());
            for entry in entries {
                out.push(self.handle(entry).await);
            }
            out
        }
    }

    /// How often [`Handler::tick`] should run; `None` for never. One replica at a time
    /// runs it, under a lease.
    fn tick_every(&self) -> Option<Duration> {
        None
    }

    /// Periodic work that does not come from an entry: absence and lag rules, threshold
    /// crossings over shared aggregates.
    fn tick(&self) -> impl Future<Output = Result<(), HandlerError>> + Send {
        async { Ok(()) }
    }
}

/// How a batch handler wants its entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// A batch starts when this many entries are waiting ...
    pub max_entries: usize,
    /// ... or when the oldest has waited this long.
    pub max_wait: Duration,
}
