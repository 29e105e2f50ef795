//! The rule every batch handler's `max_wait` obeys, in one place for the warehouse and
//! learning handlers (and any later batch handler).
//!
//! An entry waits in a batch for up to `max_wait` before its handler starts, and that wait
//! adds to its idle time in Redis. So the group's `claim_idle` must exceed
//! `handler_timeout + max_wait`, or another replica could claim an entry still waiting in
//! a batch or being handled — the invariant "no replica claims an entry whose handler is
//! still running" would break for batch handlers.

use std::time::Duration;

use crate::{Derived, Limits, Needs, OptionProblem};

/// What `max_wait` (set or not) asks of the group's `claim_idle`; a handler adds its own
/// needs with struct update syntax (`Needs { …, ..batch_wait::needs(…) }`).
pub(crate) fn needs(max_wait: Duration, is_set: &dyn Fn(&str) -> bool) -> Needs {
    Needs {
        claim_idle_margin: max_wait,
        claim_idle_margin_key: is_set("max_wait").then_some("max_wait"),
        ..Needs::default()
    }
}

/// A `max_wait` left out that the group's `claim_idle` cannot hold becomes half the room
/// between `handler_timeout` and `claim_idle` (none when there is no room: `check` says so).
pub(crate) fn derive(
    max_wait: &mut Duration,
    limits: &Limits,
    is_set: &dyn Fn(&str) -> bool,
) -> Option<Derived> {
    let room = limits.claim_idle.checked_sub(limits.handler_timeout)?;
    if is_set("max_wait") || room.is_zero() || room > *max_wait {
        return None;
    }
    *max_wait = crate::duration::whole_ms(room / 2);
    Some(Derived::new("max_wait", "claim_idle"))
}

/// The rule itself: a problem with `max_wait` when `claim_idle <= handler_timeout +
/// max_wait`.
pub(crate) fn check(max_wait: Duration, limits: &Limits) -> Option<OptionProblem> {
    if limits.claim_idle > limits.handler_timeout + max_wait {
        return None;
    }
    let d = crate::duration::format;
    Some(OptionProblem {
        key: "max_wait".to_owned(),
        message: format!(
            "({}) plus the group's handler_timeout ({}) reaches its claim_idle ({}): another replica could claim entries still waiting in a batch or being handled; lower max_wait or handler_timeout, or raise claim_idle",
            d(max_wait),
            d(limits.handler_timeout),
            d(limits.claim_idle)
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn limits(handler_timeout: u64, claim_idle: u64) -> Limits {
        Limits {
            handler_timeout: S(handler_timeout),
            claim_idle: S(claim_idle),
        }
    }

    #[test]
    fn claim_idle_must_exceed_handler_timeout_plus_max_wait() {
        assert_eq!(check(S(5), &limits(30, 36)), None);
        let p = check(S(5), &limits(30, 35)).unwrap();
        assert_eq!(p.key, "max_wait");
        assert!(p.message.contains("(5s)"), "{}", p.message);
        assert!(p.message.contains("handler_timeout (30s)"), "{}", p.message);
        assert!(p.message.contains("claim_idle (35s)"), "{}", p.message);
    }

    #[test]
    fn a_max_wait_left_out_fits_the_room_and_a_set_one_is_kept() {
        let unset = |_: &str| false;
        let set = |k: &str| k == "max_wait";
        let mut w = S(10);
        assert_eq!(derive(&mut w, &limits(30, 120), &unset), None);
        assert_eq!(w, S(10), "room enough: unchanged");
        let d = derive(&mut w, &limits(30, 36), &unset).unwrap();
        assert_eq!(
            (d.key.as_str(), d.from.as_str()),
            ("max_wait", "claim_idle")
        );
        assert_eq!(w, S(3));
        assert_eq!(check(w, &limits(30, 36)), None);
        let mut w = S(10);
        assert_eq!(derive(&mut w, &limits(30, 36), &set), None);
        assert_eq!(derive(&mut w, &limits(30, 30), &unset), None, "no room");
        assert_eq!(w, S(10));
        let n = needs(S(10), &set);
        assert_eq!(
            (n.claim_idle_margin, n.claim_idle_margin_key),
            (S(10), Some("max_wait"))
        );
        assert_eq!(needs(S(10), &unset).claim_idle_margin_key, None);
    }
}
