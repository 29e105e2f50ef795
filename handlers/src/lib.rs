//! `streamworker-handlers`: what a handler is, what it sees, and the built-in handlers.
//!
//! This crate knows nothing about Redis or the runtime on purpose. A handler gets an
//! [`Entry`] and answers `Ok(())` or a [`HandlerError`] saying what should happen to the
//! entry; the runtime alone decides when to acknowledge, retry or dead-letter, so a handler
//! can neither acknowledge early nor lose an entry. A user's own handler depends on this
//! crate only.

pub mod duration;
mod entry;
mod error;
pub mod noop;
mod spec;
pub mod webhook;

use std::future::Future;

pub use entry::{
    Entry, EntryId, Origin, Payload, PayloadFormat, REPLAY_GROUP_FIELD, REPLAY_OF_FIELD,
};
pub use error::{HandlerError, ResultExt, one_line};
pub use spec::{HandlerSpec, OptionProblem};

/// Business logic for one consumer group.
///
/// The runtime calls [`Handler::handle`] with up to `concurrency` entries at once, each under
/// `handler_timeout`, with panics caught; it acknowledges the entry when the future returns
/// `Ok(())` or [`HandlerError::Drop`], and retries or dead-letters it otherwise. Handlers are
/// called at least once per entry: make side effects idempotent (key them on
/// [`Entry::idempotency_id`]).
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, entry: &Entry) -> impl Future<Output = Result<(), HandlerError>> + Send;
}
