//! The arithmetic of the aggregates: prompt ids, the minutes of the rolling window, totals
//! over per-minute buckets, and the formats events and files use.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::EntryId;

/// A minute in milliseconds: the width of the per-minute buckets.
pub(super) const MINUTE_MS: u64 = 60_000;

/// The default prompt id: the first 16 hex digits of the SHA-256 of the prompt text.
pub fn prompt_id(prompt: &str) -> String {
    let digest = Sha256::digest(prompt.as_bytes());
    hex::encode(&digest[..8])
}

/// The minutes (`unix_minute` numbers) of the window ending with the minute of `now_ms`.
pub fn window_range(now_ms: u64, window: Duration) -> RangeInclusive<u64> {
    let n = (window.as_millis() as u64 / MINUTE_MS).max(1);
    let last = now_ms / MINUTE_MS;
    last.saturating_sub(n - 1)..=last
}

/// Counts and sums of one model (over a window, or all time).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Totals {
    pub count: u64,
    pub rating_sum: f64,
    pub thumbs_up: u64,
    pub thumbs_down: u64,
}

impl Totals {
    /// The average rating, `None` without ratings.
    pub fn average(&self) -> Option<f64> {
        (self.count > 0).then(|| self.rating_sum / self.count as f64)
    }
}

/// Sums per-minute buckets (the fields of `P:minute:<m>` hashes) per model.
pub fn window_totals(buckets: &[Vec<(String, String)>]) -> BTreeMap<String, Totals> {
    let mut out: BTreeMap<String, Totals> = BTreeMap::new();
    for (field, value) in buckets.iter().flatten() {
        let Some((kind, model)) = field.split_once(':') else {
            continue;
        };
        let t = out.entry(model.to_owned()).or_default();
        match kind {
            "count" => t.count += value.parse::<u64>().unwrap_or(0),
            "rating_sum" => t.rating_sum += value.parse::<f64>().unwrap_or(0.0),
            "thumbs_up" => t.thumbs_up += value.parse::<u64>().unwrap_or(0),
            "thumbs_down" => t.thumbs_down += value.parse::<u64>().unwrap_or(0),
            _ => {}
        }
    }
    out
}

/// A number as events show it: at most 3 decimals, no trailing zeros.
pub(super) fn number(x: f64) -> String {
    let text = format!("{x:.3}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    text.to_owned()
}

/// The UTC day (`YYYY-MM-DD`) of an entry id.
pub(super) fn day(id: EntryId) -> String {
    let mut text = humantime::format_rfc3339_seconds(id.time()).to_string();
    text.truncate(10);
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learning::dataset::path_component;

    #[test]
    fn windows_are_whole_minutes_ending_now() {
        assert_eq!(
            window_range(10 * MINUTE_MS + 5, Duration::from_secs(180)),
            8..=10
        );
        assert_eq!(window_range(5, Duration::from_secs(3600)), 0..=0);
    }

    #[test]
    fn numbers_and_days_and_paths() {
        assert_eq!(number(2.0), "2");
        assert_eq!(number(2.33333), "2.333");
        assert_eq!(number(2.5), "2.5");
        assert_eq!(day(EntryId::new(1_700_000_000_000, 0)), "2023-11-14");
        assert_eq!(path_component("learning"), "learning");
        assert_eq!(path_component("../x/y"), "%2E.%2Fx%2Fy");
        assert_eq!(prompt_id("hello").len(), 16);
        assert_ne!(prompt_id("hello"), prompt_id("hello!"));
    }
}
