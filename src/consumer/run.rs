//! Running handlers: one call (or one batch) under `handler_timeout`, a panic or a
//! timeout turned into a retryable failure, and the admission of a fetched entry (decoded,
//! traced, or settled at once when it cannot or must not reach the handler).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use streamworker_handlers::{Effects, Entry, Handler, HandlerError, REPLAY_GROUP_FIELD};
use tracing::Instrument;

use super::Loop;
use crate::client::RawEntry;
use crate::telemetry::panic_message;

/// A handler call's result.
pub(super) struct Done {
    pub(super) entry: Entry,
    pub(super) result: Result<Effects, HandlerError>,
    pub(super) elapsed: Duration,
    /// The entry's consumer span (`Span::none()` when traces are off); it ends when the
    /// entry's fate is decided.
    pub(super) span: tracing::Span,
}

/// Runs one handler call under `timeout`, turning a panic or a timeout into a retryable
/// failure so neither takes anything else down.
pub(super) async fn call<H: Handler>(
    handler: &H,
    entry: Entry,
    timeout: Duration,
    span: tracing::Span,
) -> Done {
    let started = std::time::Instant::now();
    let outcome = tokio::time::timeout(
        timeout,
        AssertUnwindSafe(handler.handle(&entry).instrument(span.clone())).catch_unwind(),
    )
    .await;
    let result = match outcome {
        Ok(Ok(result)) => result,
        Ok(Err(panic)) => Err(panicked(panic.as_ref())),
        Err(_) => Err(timed_out(timeout)),
    };
    Done {
        entry,
        result,
        elapsed: started.elapsed(),
        span,
    }
}

/// Runs one batch under `timeout` (the whole batch): a panic, a timeout or a wrong number
/// of results fails every entry of the batch, retryably.
pub(super) async fn call_batch<H: Handler>(
    handler: &H,
    batch: Vec<(Entry, tracing::Span)>,
    timeout: Duration,
) -> Vec<Done> {
    let (entries, spans): (Vec<Entry>, Vec<tracing::Span>) = batch.into_iter().unzip();
    let started = std::time::Instant::now();
    let outcome = tokio::time::timeout(
        timeout,
        AssertUnwindSafe(handler.handle_batch(&entries)).catch_unwind(),
    )
    .await;
    let elapsed = started.elapsed();
    let results = match outcome {
        Ok(Ok(results)) if results.len() == entries.len() => results,
        Ok(Ok(results)) => {
            let e = HandlerError::retry(format!(
                "handler returned {} results for a batch of {}",
                results.len(),
                entries.len()
            ));
            vec![Err(e); entries.len()]
        }
        Ok(Err(panic)) => vec![Err(panicked(panic.as_ref())); entries.len()],
        Err(_) => vec![Err(timed_out(timeout)); entries.len()],
    };
    entries
        .into_iter()
        .zip(results)
        .zip(spans)
        .map(|((entry, result), span)| Done {
            entry,
            result,
            elapsed,
            span,
        })
        .collect()
}

fn panicked(panic: &(dyn std::any::Any + Send)) -> HandlerError {
    HandlerError::retry(format!("handler panicked: {}", panic_message(panic)))
}

fn timed_out(timeout: Duration) -> HandlerError {
    HandlerError::retry(format!(
        "handler timed out after {}",
        streamworker_handlers::duration::format(timeout)
    ))
}

impl<H: Handler> Loop<'_, H> {
    /// Decodes an entry for a handler, or decides its fate at once: handed back when
    /// shutting down, dead-lettered when its payload cannot be decoded, dropped when it is
    /// a replay meant for another group.
    pub(super) fn admit(&mut self, raw: RawEntry) -> Option<(Entry, tracing::Span)> {
        let cfg = &self.g.config;
        if self.draining {
            self.hand_back(raw.id, raw.delivery_count);
            return None;
        }
        let mut entry = Entry::new(
            Arc::clone(&self.origin),
            raw.id,
            raw.delivery_count,
            raw.fields,
        );
        let span = if crate::telemetry::traces_on() {
            let (span, traceparent) = crate::telemetry::entry_span(
                &cfg.stream,
                &cfg.name,
                &self.g.consumer,
                &entry.id,
                entry.delivery_count,
                &entry.fields,
            );
            entry.traceparent = traceparent;
            span
        } else {
            tracing::Span::none()
        };
        // A dead letter replayed to the stream is meant for one group; the others
        // acknowledge it without calling their handler. `dlq replay` appends its fields
        // last, so only entries whose last field is a `dlq_` one need a look.
        if entry
            .fields
            .last()
            .is_some_and(|(name, _)| crate::dead_letter::is_own_field(name))
            && let Some(target) = entry.field(REPLAY_GROUP_FIELD)
            && target != cfg.name.as_bytes()
        {
            let reason = format!(
                "a replay meant for group {}",
                String::from_utf8_lossy(target)
            );
            self.settle(Done {
                entry,
                result: Err(HandlerError::Drop(reason)),
                elapsed: Duration::ZERO,
                span,
            });
            return None;
        }
        match entry.decode(&cfg.payload) {
            Ok(()) => Some((entry, span)),
            Err(error) => {
                self.settle(Done {
                    entry,
                    result: Err(error),
                    elapsed: Duration::ZERO,
                    span,
                });
                None
            }
        }
    }
}
