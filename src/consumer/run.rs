//! Running handlers: one call (or one batch) under `handler_timeout`, a panic or a
//! timeout turned into a retryable failure, and the admission of a fetched entry (decoded,
//! traced, or settled at once when it cannot or must not reach the handler).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::Poll;
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
    let started = tokio::time::Instant::now();
    let outcome = within(
        started + timeout,
        AssertUnwindSafe(handler.handle(&entry).instrument(span.clone())).catch_unwind(),
    )
    .await;
    let result = match outcome {
        Some(Ok(result)) => result,
        Some(Err(panic)) => Err(panicked(panic.as_ref())),
        None => Err(timed_out(timeout)),
    };
    Done {
        entry,
        result,
        elapsed: started.elapsed(),
        span,
    }
}

/// `future`'s output, or `None` once `deadline` has passed: `tokio::time::timeout`, except
/// that the timer is set only when the future first has to wait. Most handler calls finish
/// on their first poll (`noop`, counting, buffering for a batch); setting and clearing a
/// timer for each of them, and carrying it in every call's future, was a measurable share
/// of the daemon's CPU per entry while draining.
pub(super) async fn within<F: Future>(
    deadline: tokio::time::Instant,
    future: F,
) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    let mut timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(output) = future.as_mut().poll(cx) {
            return Poll::Ready(Some(output));
        }
        let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        timer.as_mut().poll(cx).map(|()| None)
    })
    .await
}

/// Runs one batch under `timeout` (the whole batch): a panic, a timeout or a wrong number
/// of results fails every entry of the batch, retryably.
pub(super) async fn call_batch<H: Handler>(
    handler: &H,
    batch: Vec<(Entry, tracing::Span)>,
    timeout: Duration,
) -> Vec<Done> {
    let (entries, spans): (Vec<Entry>, Vec<tracing::Span>) = batch.into_iter().unzip();
    let started = tokio::time::Instant::now();
    let outcome = within(
        started + timeout,
        AssertUnwindSafe(handler.handle_batch(&entries)).catch_unwind(),
    )
    .await;
    let elapsed = started.elapsed();
    let results = match outcome {
        Some(Ok(results)) if results.len() == entries.len() => results,
        Some(Ok(results)) => {
            let e = HandlerError::retry(format!(
                "handler returned {} results for a batch of {}",
                results.len(),
                entries.len()
            ));
            vec![Err(e); entries.len()]
        }
        Some(Err(panic)) => vec![Err(panicked(panic.as_ref())); entries.len()],
        None => vec![Err(timed_out(timeout)); entries.len()],
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::within;

    #[tokio::test]
    async fn within_answers_what_finishes_and_gives_up_on_what_does_not() {
        let soon = || Instant::now() + Duration::from_millis(200);
        // Ready at once: no timer needed.
        assert_eq!(within(soon(), async { 7 }).await, Some(7));
        // Waits, then finishes before the deadline: the timer set on the first wait must
        // not end it early.
        let waits = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            8
        };
        assert_eq!(within(soon(), waits).await, Some(8));
        // Never finishes: gives up at the deadline, not before.
        let started = Instant::now();
        let never = within(
            started + Duration::from_millis(50),
            std::future::pending::<()>(),
        );
        assert_eq!(never.await, None);
        assert!(started.elapsed() >= Duration::from_millis(50));
        // A deadline already past still lets a ready future answer.
        assert_eq!(within(started, async { 9 }).await, Some(9));
    }
}
