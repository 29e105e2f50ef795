//! A model's adaptation state (`P:state:<model>`) and what one tick does with it: fire
//! once per crossing, re-send what is not known to be out, recover above the threshold.

use serde::{Deserialize, Serialize};

/// A model's adaptation state (`P:state:<model>`, JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelState {
    /// The last judgement: at or below the threshold.
    pub low: bool,
    /// For `low`: the event of this crossing is known to be in the adaptations stream.
    pub emitted: bool,
    /// When the state last changed (unix milliseconds).
    pub at_ms: u64,
    /// The rolling average and the ratings behind it, when the state last changed.
    pub rating: f64,
    pub feedback: u64,
}

/// What one tick does for one model.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Step {
    Nothing,
    /// Crossed at or below the threshold: record the state, send the event.
    Fire(ModelState),
    /// A crossing whose event is not known to be out: send it again, same content.
    Resend(ModelState),
    /// Back above the threshold: record it, so the next crossing fires.
    Recover(ModelState),
}

pub(super) fn judge(
    prev: Option<&ModelState>,
    rating: f64,
    feedback: u64,
    threshold: f64,
    now_ms: u64,
) -> Step {
    let low = rating <= threshold;
    match prev {
        Some(p) if p.low && !p.emitted => Step::Resend(p.clone()),
        Some(p) if p.low == low => Step::Nothing,
        None if !low => Step::Nothing,
        _ => {
            let state = ModelState {
                low,
                emitted: false,
                at_ms: now_ms,
                rating,
                feedback,
            };
            if low {
                Step::Fire(state)
            } else {
                Step::Recover(state)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crossings_fire_once_and_again_after_recovery() {
        let t = 3.0;
        assert_eq!(judge(None, 4.0, 30, t, 1), Step::Nothing);
        let Step::Fire(low) = judge(None, 2.0, 30, t, 1) else {
            panic!("a first judgement at or below the threshold fires")
        };
        assert!(low.low && !low.emitted);
        assert_eq!(low.rating, 2.0);
        // Not known to be out: sent again with the same content.
        assert_eq!(judge(Some(&low), 1.0, 40, t, 2), Step::Resend(low.clone()));
        let out = ModelState {
            emitted: true,
            ..low
        };
        assert_eq!(
            judge(Some(&out), 3.0, 40, t, 2),
            Step::Nothing,
            "at = still low"
        );
        let Step::Recover(ok) = judge(Some(&out), 3.1, 40, t, 3) else {
            panic!("recovers above the threshold")
        };
        assert_eq!(judge(Some(&ok), 3.5, 40, t, 4), Step::Nothing);
        assert!(matches!(judge(Some(&ok), 2.9, 40, t, 5), Step::Fire(_)));
    }
}
