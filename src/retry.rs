//! The retry policy: a pure function of the handler's result and the entry's delivery
//! count (the attempt counter Redis keeps), unit-tested without Redis.

use std::time::Duration;

use streamworker_handlers::HandlerError;

use crate::config::RetryBackoff;

/// What becomes of an entry after its handler returned.
#[derive(Debug, Clone, PartialEq)]
pub enum Fate {
    /// Handled: acknowledge.
    Ack,
    /// The handler dropped it on purpose: acknowledge, count, no dead letter.
    Drop { reason: String },
    /// Retryable failure with attempts left: hand it to the backoff consumer with an idle
    /// time such that any replica's reclaim takes it `after` from now.
    Retry { after: Duration, reason: String },
    /// Permanent failure, or attempts used up: move it to the dead-letter stream.
    DeadLetter { reason: String },
}

/// Decides an entry's fate. `random` is uniform in `[0, 1)` and only ever lengthens the
/// backoff (jitter adds, never subtracts).
pub fn decide(
    result: Result<(), HandlerError>,
    delivery_count: u64,
    max_deliveries: u64,
    backoff: &RetryBackoff,
    random: f64,
) -> Fate {
    match result {
        Ok(()) => Fate::Ack,
        Err(HandlerError::Drop(reason)) => Fate::Drop { reason },
        Err(HandlerError::Permanent(reason)) => Fate::DeadLetter { reason },
        Err(HandlerError::Retry(reason)) if delivery_count >= max_deliveries => Fate::DeadLetter {
            reason: format!("{reason} (gave up after {delivery_count} deliveries)"),
        },
        Err(HandlerError::Retry(reason)) => Fate::Retry {
            after: delay(backoff, delivery_count, random),
            reason,
        },
    }
}

/// The wait after the `delivery_count`-th failed delivery:
/// `min(initial × multiplier^(count−1), max) × (1 + random × jitter)`.
pub fn delay(backoff: &RetryBackoff, delivery_count: u64, random: f64) -> Duration {
    let exponent = delivery_count.saturating_sub(1).min(64) as i32;
    let base = backoff.initial.as_secs_f64() * backoff.multiplier.max(1.0).powi(exponent);
    let capped = base.min(backoff.max.as_secs_f64());
    let jitter = backoff.jitter.clamp(0.0, 1.0) * random.clamp(0.0, 1.0);
    Duration::from_secs_f64(capped * (1.0 + jitter))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryBackoff {
        RetryBackoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(10),
            multiplier: 2.0,
            jitter: 0.5,
        }
    }

    #[test]
    fn success_and_drop_acknowledge() {
        assert_eq!(decide(Ok(()), 1, 5, &policy(), 0.0), Fate::Ack);
        assert_eq!(
            decide(Err(HandlerError::drop_entry("dup")), 1, 5, &policy(), 0.0),
            Fate::Drop {
                reason: "dup".into()
            }
        );
    }

    #[test]
    fn permanent_dead_letters_at_once() {
        let f = decide(Err(HandlerError::permanent("400")), 1, 5, &policy(), 0.0);
        assert_eq!(
            f,
            Fate::DeadLetter {
                reason: "400".into()
            }
        );
    }

    #[test]
    fn retries_until_the_delivery_count_reaches_the_limit() {
        for count in 1..5 {
            assert!(matches!(
                decide(Err(HandlerError::retry("x")), count, 5, &policy(), 0.0),
                Fate::Retry { .. }
            ));
        }
        assert!(matches!(
            decide(Err(HandlerError::retry("x")), 5, 5, &policy(), 0.0),
            Fate::DeadLetter { .. }
        ));
        // A count above the limit (a crash mid-attempt) never retries again.
        assert!(matches!(
            decide(Err(HandlerError::retry("x")), 9, 5, &policy(), 0.0),
            Fate::DeadLetter { .. }
        ));
    }

    #[test]
    fn backoff_grows_caps_and_jitter_only_adds() {
        let p = policy();
        assert_eq!(delay(&p, 1, 0.0), Duration::from_secs(1));
        assert_eq!(delay(&p, 2, 0.0), Duration::from_secs(2));
        assert_eq!(delay(&p, 4, 0.0), Duration::from_secs(8));
        assert_eq!(delay(&p, 5, 0.0), Duration::from_secs(10));
        assert_eq!(delay(&p, 500, 0.0), Duration::from_secs(10));
        for i in 0..100 {
            let r = f64::from(i) / 100.0;
            let d = delay(&p, 3, r);
            assert!(
                d >= Duration::from_secs(4) && d <= Duration::from_secs(6),
                "{d:?}"
            );
        }
    }
}
