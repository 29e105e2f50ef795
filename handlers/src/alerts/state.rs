//! A rule's state machine (ok → pending → firing → resolved), kept in Redis so any replica
//! can continue, and what one evaluation observes of a windowed rule.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Rule;
use super::notify::{percent, show};
use super::options::{RuleKind, human};

/// Where a rule stands; kept in Redis so any replica can continue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    #[default]
    Ok,
    /// The condition holds but not yet for `for`.
    Pending,
    Firing,
}

/// A rule's state, one JSON value in the state hash.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RuleState {
    pub state: Phase,
    /// Since when the rule has been watched without interruption (ms): an absence rule
    /// fires only after watching a whole window.
    pub since: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_since: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fired_at: Option<u64>,
    /// The last value judged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
}

/// What one evaluation saw for a rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub value: f64,
    /// `None`: cannot tell (lag unknown, absence not watched long enough): nothing changes.
    pub firing: Option<bool>,
    /// For messages: what the value is made of.
    pub detail: String,
}

/// A change announced to the world.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Firing,
    Resolved,
}

impl Change {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Firing => "firing",
            Self::Resolved => "resolved",
        }
    }
}

/// Advances a rule's state machine; returns the change to announce, if any.
///
/// `fresh`: nobody evaluated the rules for a while (or ever), so what happened meanwhile is
/// unknown: watching starts over.
pub fn step(
    state: &mut RuleState,
    seen: Option<bool>,
    now: u64,
    fresh: bool,
    hold_ms: u64,
    cooldown_ms: u64,
) -> Option<Change> {
    if fresh {
        state.since = now;
        if state.state == Phase::Pending {
            state.state = Phase::Ok;
            state.pending_since = None;
        }
    }
    let fire = |state: &mut RuleState| {
        state.state = Phase::Firing;
        state.fired_at = Some(now);
        state.pending_since = None;
        Some(Change::Firing)
    };
    match (state.state, seen?) {
        (Phase::Ok, true) if hold_ms == 0 => fire(state),
        (Phase::Ok, true) => {
            state.state = Phase::Pending;
            state.pending_since = Some(now);
            None
        }
        (Phase::Pending, true) => {
            let since = *state.pending_since.get_or_insert(now);
            if now.saturating_sub(since) >= hold_ms {
                fire(state)
            } else {
                None
            }
        }
        (Phase::Pending, false) => {
            state.state = Phase::Ok;
            state.pending_since = None;
            None
        }
        (Phase::Firing, false) => {
            let fired = state.fired_at.unwrap_or(0);
            if now.saturating_sub(fired) >= cooldown_ms {
                state.state = Phase::Ok;
                Some(Change::Resolved)
            } else {
                None
            }
        }
        (Phase::Ok, false) | (Phase::Firing, true) => None,
    }
}

/// A transition found by one evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    pub rule: String,
    pub kind: RuleKind,
    pub change: Change,
    pub value: f64,
    pub threshold: Option<f64>,
    pub window: Option<Duration>,
    pub at: u64,
    pub fired_at: Option<u64>,
    pub message: String,
}

pub(super) fn unknown() -> Observation {
    Observation {
        value: 0.0,
        firing: None,
        detail: String::new(),
    }
}

/// Judges a windowed rule from its counts; `watched_ms` is how long the rule has been
/// watched without interruption.
pub(super) fn observe_window(rule: &Rule, matched: u64, all: u64, watched_ms: u64) -> Observation {
    let window = human(rule.window);
    match rule.kind {
        RuleKind::Count => Observation {
            value: matched as f64,
            firing: Some(matched as f64 >= rule.threshold),
            detail: format!(
                "{matched} matching entries in the last {window} (threshold {})",
                show(rule.kind, rule.threshold)
            ),
        },
        RuleKind::Rate => {
            let rate = if all == 0 {
                0.0
            } else {
                matched as f64 / all as f64
            };
            Observation {
                value: rate,
                firing: Some(all >= rule.min_events && rate >= rule.threshold),
                detail: format!(
                    "{} of entries match ({matched} of {all}) in the last {window} (threshold {}, judged from {} entries)",
                    percent(rate),
                    percent(rule.threshold),
                    rule.min_events
                ),
            }
        }
        RuleKind::Absence => Observation {
            value: matched as f64,
            firing: if matched > 0 {
                Some(false)
            } else if watched_ms >= rule.window.as_millis() as u64 {
                Some(true)
            } else {
                None // not watched for a whole window yet
            },
            detail: if matched > 0 {
                format!("{matched} matching entries in the last {window}")
            } else {
                format!("no matching entry for {window}")
            },
        },
        RuleKind::Lag | RuleKind::Consumers => unknown(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_incident_is_one_firing_and_one_resolved() {
        let (hold, cooldown) = (0, 10_000);
        let mut s = RuleState::default();
        assert_eq!(
            step(&mut s, Some(true), 1_000, true, hold, cooldown),
            Some(Change::Firing)
        );
        for t in (2_000..30_000).step_by(1_000) {
            assert_eq!(
                step(&mut s, Some(true), t, false, hold, cooldown),
                None,
                "at {t}"
            );
        }
        // Clear, but inside the cooldown: still firing, silently.
        let mut s2 = s.clone();
        s2.fired_at = Some(25_000);
        assert_eq!(
            step(&mut s2, Some(false), 30_000, false, hold, cooldown),
            None
        );
        assert_eq!(s2.state, Phase::Firing);
        // Unknown changes nothing.
        assert_eq!(step(&mut s, None, 31_000, false, hold, cooldown), None);
        assert_eq!(
            step(&mut s, Some(false), 32_000, false, hold, cooldown),
            Some(Change::Resolved)
        );
        assert_eq!(
            step(&mut s, Some(false), 33_000, false, hold, cooldown),
            None
        );
        assert_eq!(s.state, Phase::Ok);
        assert_eq!(s.fired_at, Some(1_000), "resolved events say when it fired");
    }

    #[test]
    fn for_requires_the_condition_to_last() {
        let mut s = RuleState::default();
        assert_eq!(step(&mut s, Some(true), 0, true, 5_000, 0), None);
        assert_eq!(s.state, Phase::Pending);
        assert_eq!(step(&mut s, Some(false), 1_000, false, 5_000, 0), None);
        assert_eq!(s.state, Phase::Ok);
        assert_eq!(step(&mut s, Some(true), 2_000, false, 5_000, 0), None);
        assert_eq!(step(&mut s, Some(true), 6_000, false, 5_000, 0), None);
        assert_eq!(
            step(&mut s, Some(true), 7_000, false, 5_000, 0),
            Some(Change::Firing)
        );
    }
}
