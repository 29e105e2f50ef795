//! The handler's periodic work (`Handler::tick`), run beside the group's loop on one
//! replica at a time, under the group's tick lease.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures_util::FutureExt;
use streamworker_handlers::Handler;

use super::{Group, LAST_WORDS};
use crate::telemetry::panic_message;

/// Runs the handler's periodic `tick`, on one replica at a time: each turn, the replica
/// that holds (or takes) the group's tick lease runs it. Returns whether the shutdown
/// deadline cut a tick off.
pub(super) async fn tick<H: Handler>(
    g: &Group<H>,
    stop: &tokio_util::sync::CancellationToken,
) -> bool {
    let Some(every) = g.handler.tick_every() else {
        return false;
    };
    let mut cut = false;
    let cfg = &g.config;
    let key = crate::keys::tick_key(&cfg.stream, &cfg.name);
    // A tick in progress at shutdown may run until the shutdown deadline, then it is
    // dropped: shutdown keeps its deadline whatever the handler's periodic work does.
    let past_deadline = async {
        g.shutdown.triggered().await;
        if let Some(deadline) = g.shutdown.deadline() {
            tokio::time::sleep_until(deadline).await;
        }
    };
    tokio::pin!(past_deadline);
    loop {
        let jitter = every.mul_f64(fastrand::f64() * 0.1);
        tokio::select! {
            _ = tokio::time::sleep(every + jitter) => {}
            _ = stop.cancelled() => break,
            _ = g.shutdown.triggered() => break,
        }
        match g
            .client
            .lease(
                &key,
                &g.lease_token,
                tick_lease_ttl(every, cfg.handler_timeout),
            )
            .await
        {
            Ok(None) => {
                let ticking = tokio::time::timeout(
                    cfg.handler_timeout,
                    AssertUnwindSafe(g.handler.tick()).catch_unwind(),
                );
                let outcome = tokio::select! {
                    outcome = ticking => outcome,
                    _ = &mut past_deadline => {
                        tracing::warn!(stream = %cfg.stream, group = %cfg.name, "the handler's periodic work was cut off at the shutdown deadline");
                        cut = true;
                        break;
                    }
                };
                match outcome {
                    Ok(Ok(Ok(()))) => {}
                    Ok(Ok(Err(e))) => {
                        tracing::warn!(stream = %cfg.stream, group = %cfg.name, error = %e, "the handler's periodic work failed")
                    }
                    Ok(Err(panic)) => {
                        tracing::error!(stream = %cfg.stream, group = %cfg.name, panic = %panic_message(panic.as_ref()), "the handler's periodic work panicked")
                    }
                    Err(_) => {
                        tracing::warn!(stream = %cfg.stream, group = %cfg.name, "the handler's periodic work timed out (handler_timeout)")
                    }
                }
            }
            Ok(Some(_)) => {} // another replica ticks this turn
            Err(e) => {
                tracing::debug!(stream = %cfg.stream, group = %cfg.name, error = %e, "could not take the tick lease")
            }
        }
    }
    // Bounded: with Redis down the lease simply expires.
    let _ = tokio::time::timeout(LAST_WORDS, g.client.release_lease(&key, &g.lease_token)).await;
    cut
}

/// How long a tick lease lasts: a few turns, so the holder keeps it from turn to turn,
/// and never less than one tick may run (`handler_timeout`) plus a turn, so that a slow
/// tick is not joined by another replica's.
pub(super) fn tick_lease_ttl(every: Duration, handler_timeout: Duration) -> Duration {
    (every * 3).max(handler_timeout + every * 2)
}

#[cfg(test)]
mod tests {
    use super::tick_lease_ttl;
    use std::time::Duration;

    #[test]
    fn a_tick_lease_outlives_the_longest_tick() {
        let s = Duration::from_secs;
        // A slow tick (up to handler_timeout) keeps its lease past its end.
        assert!(tick_lease_ttl(s(1), s(30)) > s(30) + s(1));
        // A fast handler still holds the lease for a few turns.
        assert_eq!(tick_lease_ttl(s(10), s(1)), s(30));
    }
}
