//! An entry's fate: one pure function from what happened to what becomes of the entry,
//! unit-tested without Redis.
//!
//! Everything that decides whether an entry is acknowledged, retried later, given back,
//! dead-lettered or dropped — and with which idle time and delivery count it is parked —
//! is here. The loop only feeds it (the handler's result, the delivery count Redis keeps,
//! the circuit's state when the result came in, how often this process already gave the
//! entry's delivery back) and books the answer (`settle.rs`); `release.lua` applies the
//! idle time and count it is given and decides nothing.
//!
//! | result                | circuit closed                                  | circuit open or half-open                                  |
//! | --------------------- | ----------------------------------------------- | ---------------------------------------------------------- |
//! | `Ok`                  | `Ack`                                           | `Ack`                                                      |
//! | `Drop`                | `Drop`                                          | `Drop`                                                     |
//! | `Permanent`           | `DeadLetter`                                    | `DeadLetter`                                               |
//! | `Retry`, count < max  | `Park` (idle `claim_idle − backoff`, count kept) | `GiveBack` (idle `claim_idle − backoff`, count `max(1, n−1)`) while fewer than `max_deliveries` give-backs, else as closed |
//! | `Retry`, count ≥ max  | `DeadLetter` (gave up)                          | `GiveBack` while give-backs remain, else `DeadLetter`      |
//!
//! And an entry fetched but never started (shutdown) is handed back: idle `claim_idle`,
//! count `n − 1` ([`hand_back`]).

use std::time::Duration;

use streamworker_handlers::HandlerError;

use crate::circuit::State;
use crate::config::{GroupConfig, RetryBackoff};
use crate::retry;

/// What becomes of an entry.
#[derive(Debug, Clone, PartialEq)]
pub enum Fate {
    /// Handled: acknowledge.
    Ack,
    /// The handler dropped it on purpose: acknowledge, count, no dead letter.
    Drop { reason: String },
    /// Retryable failure with attempts left: park it with the backoff consumer, delivery
    /// count kept, idle `idle` so that any replica's reclaim takes it `after` from now.
    Park {
        after: Duration,
        idle: Duration,
        reason: String,
    },
    /// Retryable failure while the circuit was not closed: the downstream is at fault, not
    /// the entry, so the delivery is given back (`delivery_count` is what Redis should
    /// count) and the entry parked like a retry.
    GiveBack {
        after: Duration,
        idle: Duration,
        delivery_count: u64,
        reason: String,
    },
    /// Fetched but never started (shutdown): back to this consumer, reclaimable by any
    /// replica at its next `claim_interval`, the delivery that never ran given back.
    HandBack { idle: Duration, delivery_count: u64 },
    /// Permanent failure, or attempts used up: move it to the dead-letter stream.
    DeadLetter { reason: String },
}

impl Fate {
    /// The outcome as the entry's span (and the metric) names it.
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::Ack => "acked",
            Self::Drop { .. } => "dropped",
            Self::Park { .. } | Self::GiveBack { .. } => "retried",
            Self::HandBack { .. } => "handed_back",
            Self::DeadLetter { .. } => "dead_lettered",
        }
    }

    /// The error that decided it, for failures.
    pub fn error(&self) -> Option<&str> {
        match self {
            Self::Park { reason, .. }
            | Self::GiveBack { reason, .. }
            | Self::DeadLetter { reason } => Some(reason),
            Self::Ack | Self::Drop { .. } | Self::HandBack { .. } => None,
        }
    }
}

/// The part of a group's configuration that decides fates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// The delivery count at which a failing entry is dead-lettered; also how often one
    /// process may give an entry's delivery back.
    pub max_deliveries: u64,
    /// Idle time after which any replica reclaims an entry.
    pub claim_idle: Duration,
    pub backoff: RetryBackoff,
}

impl Policy {
    pub fn of(config: &GroupConfig) -> Self {
        Self {
            max_deliveries: config.max_deliveries,
            claim_idle: config.claim_idle,
            backoff: config.retry_backoff,
        }
    }

    /// The idle time that makes a reclaim (min-idle `claim_idle`) take a parked entry
    /// `backoff` from now. A backoff longer than `claim_idle` (which `check` refuses)
    /// would mean idle 0: reclaimed after `claim_idle`.
    fn park_idle(&self, backoff: Duration) -> Duration {
        self.claim_idle.saturating_sub(backoff)
    }
}

/// Decides a finished entry's fate.
///
/// - `delivery_count`: the entry's delivery count in Redis (this delivery included).
/// - `circuit`: the circuit's state before this result was recorded.
/// - `given_back`: how often this process already gave this entry's delivery back.
/// - `random`: uniform in `[0, 1)`; it only ever lengthens the backoff (jitter adds).
pub fn decide(
    result: Result<(), HandlerError>,
    delivery_count: u64,
    circuit: State,
    given_back: u64,
    policy: &Policy,
    random: f64,
) -> Fate {
    let reason = match result {
        Ok(()) => return Fate::Ack,
        Err(HandlerError::Drop(reason)) => return Fate::Drop { reason },
        Err(HandlerError::Permanent(reason)) => return Fate::DeadLetter { reason },
        Err(HandlerError::Retry(reason)) => reason,
    };
    let after = retry::delay(&policy.backoff, delivery_count, random);
    let idle = policy.park_idle(after);
    if circuit != State::Closed && given_back < policy.max_deliveries {
        // The circuit had already opened: the downstream is down, not this entry. Give
        // the delivery back so an outage cannot use up its attempts — a bounded number of
        // times, so an entry that fails only while the circuit is open (a probe, again
        // and again) still reaches its dead letter within 2 × max_deliveries calls.
        //
        // Never below 1: reclaimed, the entry then counts at least 2, so it is never
        // taken for a first delivery. Otherwise poison given back while the circuit was
        // open would come back looking fresh, bunched, and open the circuit again (seen
        // in the fault matrix's Redis restart without persistence). An outage so costs an
        // entry at most one attempt.
        return Fate::GiveBack {
            after,
            idle,
            delivery_count: delivery_count.saturating_sub(1).max(1),
            reason,
        };
    }
    if delivery_count >= policy.max_deliveries {
        return Fate::DeadLetter {
            reason: format!("{reason} (gave up after {delivery_count} deliveries)"),
        };
    }
    Fate::Park {
        after,
        idle,
        reason,
    }
}

/// The fate of an entry fetched but never started (shutdown): reclaimable at once by any
/// replica's next reclaim, its delivery given back (it never reached a handler).
pub fn hand_back(delivery_count: u64, policy: &Policy) -> Fate {
    Fate::HandBack {
        idle: policy.claim_idle,
        delivery_count: delivery_count.saturating_sub(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tokio::time::Instant;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn policy(max_deliveries: u64) -> Policy {
        Policy {
            max_deliveries,
            claim_idle: S(60),
            backoff: RetryBackoff {
                initial: S(1),
                max: S(10),
                multiplier: 2.0,
                jitter: 0.5,
            },
        }
    }

    fn open() -> State {
        State::Open {
            until: Instant::now(),
        }
    }

    fn result(kind: &str) -> Result<(), HandlerError> {
        match kind {
            "ok" => Ok(()),
            "drop" => Err(HandlerError::drop_entry("dup")),
            "permanent" => Err(HandlerError::permanent("400")),
            "retry" => Err(HandlerError::retry("503")),
            other => unreachable!("{other}"),
        }
    }

    fn kind(fate: &Fate) -> &'static str {
        match fate {
            Fate::Ack => "ack",
            Fate::Drop { .. } => "drop",
            Fate::Park { .. } => "park",
            Fate::GiveBack { .. } => "give",
            Fate::HandBack { .. } => "hand",
            Fate::DeadLetter { .. } => "dead",
        }
    }

    /// Every result kind × first / middle / last / beyond-last delivery × every circuit
    /// state, for max_deliveries = 5, with no give-back used yet and with all used up.
    #[test]
    fn the_fate_table() {
        let counts = [1, 3, 5, 7];
        #[rustfmt::skip]
        let table: &[(&str, &str, u64, [&str; 4])] = &[
            // result      circuit     given_back  fate at count 1, 3, 5, 7
            ("ok",        "closed",    0, ["ack",  "ack",  "ack",  "ack"]),
            ("ok",        "open",      0, ["ack",  "ack",  "ack",  "ack"]),
            ("ok",        "half_open", 0, ["ack",  "ack",  "ack",  "ack"]),
            ("drop",      "closed",    0, ["drop", "drop", "drop", "drop"]),
            ("drop",      "open",      0, ["drop", "drop", "drop", "drop"]),
            ("drop",      "half_open", 0, ["drop", "drop", "drop", "drop"]),
            ("permanent", "closed",    0, ["dead", "dead", "dead", "dead"]),
            ("permanent", "open",      0, ["dead", "dead", "dead", "dead"]),
            ("permanent", "half_open", 0, ["dead", "dead", "dead", "dead"]),
            ("retry",     "closed",    0, ["park", "park", "dead", "dead"]),
            ("retry",     "open",      0, ["give", "give", "give", "give"]),
            ("retry",     "half_open", 0, ["give", "give", "give", "give"]),
            // Give-backs used up: the circuit no longer shields the entry.
            ("retry",     "closed",    5, ["park", "park", "dead", "dead"]),
            ("retry",     "open",      4, ["give", "give", "give", "give"]),
            ("retry",     "open",      5, ["park", "park", "dead", "dead"]),
            ("retry",     "half_open", 5, ["park", "park", "dead", "dead"]),
            ("ok",        "open",      5, ["ack",  "ack",  "ack",  "ack"]),
            ("permanent", "half_open", 5, ["dead", "dead", "dead", "dead"]),
        ];
        for (res, circuit, given_back, expected) in table {
            let state = match *circuit {
                "closed" => State::Closed,
                "open" => open(),
                "half_open" => State::HalfOpen,
                other => unreachable!("{other}"),
            };
            for (count, want) in counts.iter().zip(expected) {
                let fate = decide(result(res), *count, state, *given_back, &policy(5), 0.0);
                assert_eq!(
                    kind(&fate),
                    *want,
                    "{res} at delivery {count}, circuit {circuit}, {given_back} given back: {fate:?}"
                );
            }
        }
    }

    #[test]
    fn a_single_delivery_policy_never_parks() {
        let p = policy(1);
        for count in [1, 2] {
            let f = decide(result("retry"), count, State::Closed, 0, &p, 0.0);
            assert_eq!(
                f,
                Fate::DeadLetter {
                    reason: format!("503 (gave up after {count} deliveries)")
                }
            );
        }
        // One give-back, then the circuit shields it no more.
        assert_eq!(
            kind(&decide(result("retry"), 1, open(), 0, &p, 0.0)),
            "give"
        );
        assert_eq!(
            kind(&decide(result("retry"), 1, open(), 1, &p, 0.0)),
            "dead"
        );
    }

    #[test]
    fn reasons_are_kept() {
        let p = policy(5);
        assert_eq!(
            decide(result("drop"), 1, State::Closed, 0, &p, 0.0),
            Fate::Drop {
                reason: "dup".into()
            }
        );
        assert_eq!(
            decide(result("permanent"), 1, open(), 0, &p, 0.0),
            Fate::DeadLetter {
                reason: "400".into()
            }
        );
        assert_eq!(
            decide(result("retry"), 5, State::Closed, 0, &p, 0.0),
            Fate::DeadLetter {
                reason: "503 (gave up after 5 deliveries)".into()
            }
        );
    }

    #[test]
    fn a_retry_is_parked_so_that_a_reclaim_takes_it_after_the_backoff() {
        let p = policy(5);
        // Backoff 1 s, 2 s, 4 s, then capped at 10 s; idle = claim_idle − backoff.
        for (count, after) in [(1, 1), (2, 2), (3, 4), (4, 8)] {
            assert_eq!(
                decide(result("retry"), count, State::Closed, 0, &p, 0.0),
                Fate::Park {
                    after: S(after),
                    idle: S(60 - after),
                    reason: "503".into()
                }
            );
        }
        let p = Policy {
            max_deliveries: 50,
            ..p
        };
        assert_eq!(
            decide(result("retry"), 20, State::Closed, 0, &p, 0.0),
            Fate::Park {
                after: S(10),
                idle: S(50),
                reason: "503".into()
            }
        );
        // Jitter only lengthens the wait: at most +50 % here.
        let Fate::Park { after, idle, .. } =
            decide(result("retry"), 1, State::Closed, 0, &p, 0.999)
        else {
            panic!("parked")
        };
        assert!(
            after > S(1) && after < Duration::from_millis(1500),
            "{after:?}"
        );
        assert_eq!(idle + after, S(60));
    }

    #[test]
    fn a_backoff_beyond_claim_idle_parks_with_idle_zero() {
        let p = Policy {
            claim_idle: S(5),
            ..policy(5)
        };
        assert_eq!(
            decide(result("retry"), 4, State::Closed, 0, &p, 0.0),
            Fate::Park {
                after: S(8),
                idle: Duration::ZERO,
                reason: "503".into()
            }
        );
    }

    #[test]
    fn a_give_back_returns_one_delivery_but_never_below_one() {
        let p = policy(5);
        for (count, kept) in [(1, 1), (2, 1), (3, 2), (5, 4), (7, 6)] {
            assert_eq!(
                decide(result("retry"), count, State::HalfOpen, 0, &p, 0.0),
                Fate::GiveBack {
                    after: retry::delay(&p.backoff, count, 0.0),
                    idle: S(60) - retry::delay(&p.backoff, count, 0.0),
                    delivery_count: kept,
                    reason: "503".into()
                },
                "delivery {count}"
            );
        }
    }

    #[test]
    fn a_hand_back_returns_the_delivery_that_never_ran() {
        let p = policy(5);
        assert_eq!(
            hand_back(3, &p),
            Fate::HandBack {
                idle: S(60),
                delivery_count: 2
            }
        );
        assert_eq!(
            hand_back(0, &p),
            Fate::HandBack {
                idle: S(60),
                delivery_count: 0
            }
        );
    }

    #[test]
    fn outcomes_and_errors_name_the_fate() {
        let p = policy(5);
        let cases = [
            (
                decide(result("ok"), 1, State::Closed, 0, &p, 0.0),
                "acked",
                None,
            ),
            (
                decide(result("drop"), 1, State::Closed, 0, &p, 0.0),
                "dropped",
                None,
            ),
            (
                decide(result("retry"), 1, State::Closed, 0, &p, 0.0),
                "retried",
                Some("503"),
            ),
            (
                decide(result("retry"), 1, open(), 0, &p, 0.0),
                "retried",
                Some("503"),
            ),
            (
                decide(result("permanent"), 1, State::Closed, 0, &p, 0.0),
                "dead_lettered",
                Some("400"),
            ),
            (hand_back(1, &p), "handed_back", None),
        ];
        for (fate, outcome, error) in cases {
            assert_eq!(fate.outcome(), outcome, "{fate:?}");
            assert_eq!(fate.error(), error, "{fate:?}");
        }
    }

    fn any_state() -> impl Strategy<Value = State> {
        prop_oneof![Just(State::Closed), Just(State::HalfOpen), Just(open())]
    }

    fn any_result() -> impl Strategy<Value = Result<(), HandlerError>> {
        prop_oneof![
            Just(Ok(())),
            Just(Err(HandlerError::drop_entry("d"))),
            Just(Err(HandlerError::permanent("p"))),
            Just(Err(HandlerError::retry("r"))),
        ]
    }

    proptest! {
        /// Whatever comes in: a park keeps attempts below the limit and waits exactly its
        /// backoff (never less than the initial one), a give-back only while the circuit
        /// is not closed and give-backs remain, and never to a first delivery's count.
        #[test]
        fn every_fate_keeps_the_rules(
            result in any_result(),
            count in 0u64..200,
            state in any_state(),
            given_back in 0u64..20,
            max_deliveries in 1u64..20,
            claim_idle_s in 1u64..600,
            initial_ms in 1u64..5_000,
            random in 0.0f64..1.0,
        ) {
            let p = Policy {
                max_deliveries,
                claim_idle: S(claim_idle_s),
                backoff: RetryBackoff {
                    initial: Duration::from_millis(initial_ms),
                    max: S(30),
                    multiplier: 2.0,
                    jitter: 0.2,
                },
            };
            let retryable = matches!(result, Err(HandlerError::Retry(_)));
            let fate = decide(result, count, state, given_back, &p, random);
            match fate {
                Fate::Park { after, idle, .. } => {
                    prop_assert!(retryable);
                    prop_assert!(count < max_deliveries);
                    prop_assert!(state == State::Closed || given_back >= max_deliveries);
                    prop_assert!(after >= Duration::from_millis(initial_ms).min(S(30)));
                    prop_assert_eq!(idle, p.claim_idle.saturating_sub(after));
                }
                Fate::GiveBack { delivery_count, idle, after, .. } => {
                    prop_assert!(retryable);
                    prop_assert!(state != State::Closed && given_back < max_deliveries);
                    prop_assert!(delivery_count >= 1 && delivery_count <= count.max(1));
                    prop_assert_eq!(idle, p.claim_idle.saturating_sub(after));
                }
                Fate::DeadLetter { .. } => {
                    prop_assert!(!retryable || count >= max_deliveries);
                }
                Fate::Ack | Fate::Drop { .. } => prop_assert!(!retryable),
                Fate::HandBack { .. } => prop_assert!(false, "decide never hands back"),
            }
        }
    }
}
