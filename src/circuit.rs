//! The circuit breaker of one group on one replica: a pure state machine, fed with each
//! finished entry's result, telling the loop how many new entries may start.
//!
//! Closed: everything runs; `threshold` consecutive retryable failures open it. Open: no
//! new entries (no reads, no reclaims) for `pause`. Half-open: exactly one entry probes the
//! downstream; its success closes the circuit, its failure opens it again. While the
//! circuit is not closed, retryable failures are the downstream's fault, not the entry's:
//! the loop gives their delivery back, so an outage cannot dead-letter the stream.

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
    Opened { failures: u32, pause: Duration },
    HalfOpened,
    Closed,
    Reopened { pause: Duration },
}

#[derive(Debug)]
pub struct Breaker {
    config: CircuitBreakerConfig,
    state: State,
    consecutive: u32,
    probe: Option<EntryId>,
}

impl Breaker {
    pub fn new(config: CircuitBreakerConfig) -> Self {
        Self {
            config,
            state: State::Closed,
            consecutive: 0,
            probe: None,
        }
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

    /// Records a finished entry. `failed` means a retryable failure (the downstream's
    /// fault as far as we can tell); success, drops and permanent failures mean the
    /// downstream answered.
    pub fn record(&mut self, id: EntryId, failed: bool, now: Instant) -> Option<Transition> {
        if self.config.threshold == 0 {
            return None;
        }
        match self.state {
            State::Closed => {
                if !failed {
                    self.consecutive = 0;
                    return None;
                }
                self.consecutive += 1;
                if self.consecutive >= self.config.threshold {
                    let failures = self.consecutive;
                    self.open(now);
                    return Some(Transition::Opened {
                        failures,
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
                    self.open(now);
                    Some(Transition::Reopened {
                        pause: self.config.pause,
                    })
                } else {
                    self.state = State::Closed;
                    self.consecutive = 0;
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
        self.consecutive = 0;
        self.probe = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(threshold: u32) -> Breaker {
        Breaker::new(CircuitBreakerConfig {
            threshold,
            pause: Duration::from_secs(5),
        })
    }

    fn id(n: u64) -> EntryId {
        EntryId::new(n, 0)
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let now = Instant::now();
        let mut b = breaker(3);
        assert_eq!(b.record(id(1), true, now), None);
        assert_eq!(b.record(id(2), true, now), None);
        assert_eq!(
            b.record(id(3), false, now),
            None,
            "a success resets the count"
        );
        assert_eq!(b.record(id(4), true, now), None);
        assert_eq!(b.record(id(5), true, now), None);
        assert!(matches!(
            b.record(id(6), true, now),
            Some(Transition::Opened { failures: 3, .. })
        ));
        assert_eq!(b.may_fetch(0), Some(0));
    }

    #[test]
    fn half_open_probes_with_one_entry_and_closes_on_success() {
        let now = Instant::now();
        let mut b = breaker(1);
        b.record(id(1), true, now);
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
            b.record(id(2), false, now),
            None,
            "a straggler is not the probe"
        );
        assert_eq!(b.record(id(7), false, now), Some(Transition::Closed));
        assert_eq!(b.may_fetch(5), None);
    }

    #[test]
    fn a_failed_probe_opens_again() {
        let now = Instant::now();
        let mut b = breaker(1);
        b.record(id(1), true, now);
        b.tick(now + Duration::from_secs(5));
        b.started(id(2));
        assert!(matches!(
            b.record(id(2), true, now),
            Some(Transition::Reopened { .. })
        ));
        assert!(matches!(b.state(), State::Open { .. }));
    }

    #[test]
    fn threshold_zero_never_opens() {
        let now = Instant::now();
        let mut b = breaker(0);
        for n in 0..100 {
            assert_eq!(b.record(id(n), true, now), None);
        }
        assert!(b.is_closed());
    }
}
