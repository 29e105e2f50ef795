//! The backoff curve: how long a failing entry waits before its next attempt, a pure
//! function of its delivery count (the attempt counter Redis keeps). What becomes of an
//! entry — retried, given back, dead-lettered — is decided in `consumer::fate`.

use std::time::Duration;

use crate::config::RetryBackoff;

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
