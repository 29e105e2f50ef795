//! The circuit breaker of one group on one replica: a pure state machine, fed with each
//! finished entry's result, telling the loop how many new entries may start.
//!
//! The breaker must tell an outage from bad entries. A handful of poison entries fail
//! on every attempt, and their retries come back together (they were parked with the same
//! backoff): judged on consecutive failures, they look exactly like a dead downstream. So
//! the breaker judges the downstream only by what says something about it:
//!
//! - **First deliveries.** An entry on its first delivery has no history; if it fails, the
//!   downstream is as likely at fault as the entry. A retry of an entry that already
//!   failed says something about that entry, so its failure is not counted (its success
//!   is: the downstream answered).
//! - **A window, not a streak.** Closed: the circuit opens once `threshold` of the last
//!   `window` counted results were retryable failures (a ratio with a minimum sample).
//!
//! Open: no new entries (no reads, no reclaims) for `pause`. Half-open: exactly one entry
//! probes the downstream, a fresh one when the stream has any; its success closes the
//! circuit, its failure opens it again. While the circuit is not closed, retryable
//! failures are the downstream's fault, not the entry's: the loop gives their delivery
//! back — but at most `max_deliveries` times per entry (see [`GiveBacks`]), so no entry
//! becomes immortal by being the probe again and again.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use streamworker_handlers::EntryId;
use tokio::time::Instant;

use crate::config::CircuitBreakerConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open { until: Instant },
    HalfOpen,
}

impl State {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open { .. } => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

/// What changed, for the log and the metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Opened {
        failures: u32,
        window: u32,
        pause: Duration,
    },
    HalfOpened,
    Closed,
    Reopened {
        pause: Duration,
    },
}

#[derive(Debug)]
pub struct Breaker {
    config: CircuitBreakerConfig,
    state: State,
    /// The last `window` counted results while closed: `true` for a retryable failure.
    recent: VecDeque<bool>,
    /// Failures in `recent`.
    failures: u32,
    probe: Option<EntryId>,
}

/// What a finished entry tells the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Success, a drop or a permanent failure: the downstream answered.
    Answered,
    /// A retryable failure (error, timeout, panic, webhook 429/5xx).
    Failed {
        /// The entry's first delivery: no earlier failure of its own explains this one.
        first_delivery: bool,
    },
}

impl Breaker {
    pub fn new(config: CircuitBreakerConfig) -> Self {
        Self {
            config,
            state: State::Closed,
            recent: VecDeque::with_capacity(config.window() as usize),
            failures: 0,
            probe: None,
        }
    }

    /// Whether `id` is the half-open circuit's probe.
    pub fn is_probe(&self, id: EntryId) -> bool {
        self.probe == Some(id)
    }

    /// Half-open and no probe chosen yet.
    pub fn wants_probe(&self) -> bool {
        self.state == State::HalfOpen && self.probe.is_none()
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Moves Open to HalfOpen once the pause is over.
    pub fn tick(&mut self, now: Instant) -> Option<Transition> {
        match self.state {
            State::Open { until } if now >= until => {
                self.state = State::HalfOpen;
                self.probe = None;
                Some(Transition::HalfOpened)
            }
            _ => None,
        }
    }

    /// Whether new entries may be fetched now: all (closed), one probe (half-open, none
    /// probing yet, nothing else in flight), or none.
    pub fn may_fetch(&self, running: usize) -> Option<usize> {
        match self.state {
            State::Closed => None,
            State::Open { .. } => Some(0),
            State::HalfOpen if self.probe.is_none() && running == 0 => Some(1),
            State::HalfOpen => Some(0),
        }
    }

    /// Marks an entry just started while half-open as the probe.
    pub fn started(&mut self, id: EntryId) {
        if self.state == State::HalfOpen && self.probe.is_none() {
            self.probe = Some(id);
        }
    }

    /// When the next state change is due, if one is scheduled.
    pub fn wakeup(&self) -> Option<Instant> {
        match self.state {
            State::Open { until } => Some(until),
            _ => None,
        }
    }

    /// Records a finished entry.
    /// `now` is asked only when the circuit opens: most results change no state, and a
    /// clock read per entry showed in the daemon's profile.
    pub fn record(
        &mut self,
        id: EntryId,
        outcome: Outcome,
        now: impl FnOnce() -> Instant,
    ) -> Option<Transition> {
        if self.config.threshold == 0 {
            return None;
        }
        let failed = matches!(outcome, Outcome::Failed { .. });
        match self.state {
            State::Closed => {
                // A retry failing again is the entry's own trouble (see the module docs).
                if outcome
                    == (Outcome::Failed {
                        first_delivery: false,
                    })
                {
                    return None;
                }
                self.recent.push_back(failed);
                self.failures += u32::from(failed);
                if self.recent.len() > self.config.window() as usize
                    && self.recent.pop_front() == Some(true)
                {
                    self.failures -= 1;
                }
                if self.failures >= self.config.threshold {
                    let failures = self.failures;
                    self.open(now());
                    return Some(Transition::Opened {
                        failures,
                        window: self.config.window(),
                        pause: self.config.pause,
                    });
                }
                None
            }
            // Results of entries started before the circuit opened say nothing new.
            State::Open { .. } => None,
            State::HalfOpen if self.probe == Some(id) => {
                self.probe = None;
                if failed {
                    self.open(now());
                    Some(Transition::Reopened {
                        pause: self.config.pause,
                    })
                } else {
                    self.state = State::Closed;
                    Some(Transition::Closed)
                }
            }
            State::HalfOpen => None,
        }
    }

    fn open(&mut self, now: Instant) {
        self.state = State::Open {
            until: now + self.config.pause,
        };
        // A closed circuit starts judging afresh.
        self.recent.clear();
        self.failures = 0;
        self.probe = None;
    }
}

/// How often this process gave an entry's delivery back because the circuit was not
/// closed. Capped per entry (at `max_deliveries`), so that an entry that fails only while
/// the circuit is open (a probe, a straggler) still reaches its dead letter after at most
/// `2 × max_deliveries` handler calls; capped in size (the oldest forgotten first), so a
/// long outage cannot grow it without end.
#[derive(Debug, Default)]
pub struct GiveBacks {
    counts: HashMap<EntryId, u64>,
    order: VecDeque<EntryId>,
}

/// Entries remembered at most; far more than a group has in flight in one outage.
const REMEMBERED: usize = 65_536;

impl GiveBacks {
    /// How often the entry's delivery was given back so far (`consumer::fate` caps it).
    pub fn given(&self, id: EntryId) -> u64 {
        self.counts.get(&id).copied().unwrap_or(0)
    }

    /// Counts one more give-back of the entry's delivery.
    pub fn record(&mut self, id: EntryId) {
        *self.counts.entry(id).or_insert_with(|| {
            self.order.push_back(id);
            0
        }) += 1;
        while self.counts.len() > REMEMBERED {
            match self.order.pop_front() {
                Some(old) => {
                    self.counts.remove(&old);
                }
                None => break,
            }
        }
    }

    /// The entry was settled otherwise (acknowledged, parked, dead-lettered).
    pub fn forget(&mut self, id: EntryId) {
        if !self.counts.is_empty() {
            self.counts.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(threshold: u32) -> Breaker {
        Breaker::new(CircuitBreakerConfig {
            threshold,
            window: None,
            pause: Duration::from_secs(5),
        })
    }

    const FRESH: Outcome = Outcome::Failed {
        first_delivery: true,
    };
    const RETRY: Outcome = Outcome::Failed {
        first_delivery: false,
    };
    const OK: Outcome = Outcome::Answered;

    fn id(n: u64) -> EntryId {
        EntryId::new(n, 0)
    }

    #[test]
    fn opens_once_threshold_of_the_window_failed() {
        let now = Instant::now();
        // threshold 3, window 6 (derived: twice the threshold).
        let mut b = breaker(3);
        assert_eq!(b.record(id(1), FRESH, || now), None);
        assert_eq!(b.record(id(2), FRESH, || now), None);
        assert_eq!(
            b.record(id(3), OK, || now),
            None,
            "a success alone does not reset"
        );
        assert!(matches!(
            b.record(id(4), FRESH, || now),
            Some(Transition::Opened {
                failures: 3,
                window: 6,
                ..
            })
        ));
        assert_eq!(b.may_fetch(0), Some(0));
    }

    #[test]
    fn failures_spread_thinner_than_the_window_never_open() {
        let now = Instant::now();
        let mut b = breaker(3);
        // 2 failures in every 6: the window never holds 3.
        for n in 0..600 {
            let outcome = if n % 3 == 0 { FRESH } else { OK };
            assert_eq!(b.record(id(n), outcome, || now), None, "result {n}");
        }
        assert!(b.is_closed());
    }

    #[test]
    fn retries_failing_again_never_open_the_circuit() {
        let now = Instant::now();
        let mut b = breaker(3);
        // Poison entries' retries come back together and all fail.
        for n in 0..100 {
            assert_eq!(b.record(id(n), RETRY, || now), None);
        }
        assert!(b.is_closed());
        // A retry's success still says the downstream answers.
        b.record(id(200), FRESH, || now);
        b.record(id(201), FRESH, || now);
        for n in 300..304 {
            b.record(id(n), OK, || now);
        }
        assert_eq!(
            b.record(id(202), FRESH, || now),
            None,
            "2 of the last 6 failed"
        );
    }

    #[test]
    fn half_open_probes_with_one_entry_and_closes_on_success() {
        let now = Instant::now();
        let mut b = breaker(1);
        b.record(id(1), FRESH, || now);
        assert_eq!(b.tick(now + Duration::from_secs(1)), None, "still paused");
        assert_eq!(
            b.tick(now + Duration::from_secs(5)),
            Some(Transition::HalfOpened)
        );
        assert_eq!(
            b.may_fetch(1),
            Some(0),
            "waits until nothing else is in flight"
        );
        assert_eq!(b.may_fetch(0), Some(1));
        b.started(id(7));
        assert_eq!(b.may_fetch(0), Some(0), "one probe at a time");
        assert_eq!(
            b.record(id(2), OK, || now),
            None,
            "a straggler is not the probe"
        );
        assert_eq!(b.record(id(7), OK, || now), Some(Transition::Closed));
        assert_eq!(b.may_fetch(5), None);
    }

    #[test]
    fn a_failed_probe_opens_again() {
        let now = Instant::now();
        let mut b = breaker(1);
        b.record(id(1), FRESH, || now);
        b.tick(now + Duration::from_secs(5));
        b.started(id(2));
        assert!(matches!(
            b.record(id(2), RETRY, || now),
            Some(Transition::Reopened { .. })
        ));
        assert!(matches!(b.state(), State::Open { .. }));
    }

    #[test]
    fn threshold_zero_never_opens() {
        let now = Instant::now();
        let mut b = breaker(0);
        for n in 0..100 {
            assert_eq!(b.record(id(n), FRESH, || now), None);
        }
        assert!(b.is_closed());
    }

    #[test]
    fn give_backs_are_counted_per_entry_until_settled() {
        let mut g = GiveBacks::default();
        for _ in 0..3 {
            g.record(id(1));
        }
        assert_eq!(g.given(id(1)), 3);
        assert_eq!(g.given(id(2)), 0, "other entries are counted apart");
        g.record(id(2));
        g.forget(id(1));
        assert_eq!(g.given(id(1)), 0, "forgotten once settled");
        assert_eq!(g.given(id(2)), 1);
    }

    #[test]
    fn give_backs_remember_a_bounded_number_of_entries() {
        let mut g = GiveBacks::default();
        for n in 0..(REMEMBERED as u64 + 10) {
            g.record(id(n));
        }
        assert_eq!(g.counts.len(), REMEMBERED);
        assert_eq!(g.given(id(0)), 0, "the oldest were forgotten");
        assert_eq!(g.given(id(REMEMBERED as u64 + 9)), 1);
    }
}
