//! The console's memory of the last hour: per group, a ring of samples of its lag and its
//! rate (entries delivered to the group per second), one every [`SAMPLE_EVERY`]. Each
//! replica keeps its own, in memory only: a restarted replica's chart starts empty.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

/// How often the console samples every group.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// How long the chart looks back.
pub const WINDOW: Duration = Duration::from_secs(3600);
/// Samples kept per group: one hour at one every ten seconds.
pub const KEEP: usize = (WINDOW.as_secs() / SAMPLE_EVERY.as_secs()) as usize;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Unix time in milliseconds.
    pub at_ms: u64,
    /// `None` when Redis cannot tell (after XDEL or a trim below the group).
    pub lag: Option<u64>,
    /// Entries delivered per second since the previous sample; `None` for the first sample
    /// or when Redis's counter cannot be compared (it went back, or is unknown).
    pub rate: Option<f64>,
}

#[derive(Debug, Default)]
struct Series {
    samples: VecDeque<Sample>,
    /// The previous sample's time and the group's `entries-read` counter then.
    last_read: Option<(u64, u64)>,
}

/// Samples by (stream, group).
#[derive(Debug, Default)]
pub struct History {
    series: HashMap<(String, String), Series>,
}

impl History {
    /// Records one sample; `entries_read` is XINFO GROUPS' counter of entries delivered to
    /// the group, from which the rate is the difference over time.
    pub fn record(
        &mut self,
        stream: &str,
        group: &str,
        at_ms: u64,
        lag: Option<u64>,
        entries_read: Option<u64>,
    ) {
        let series = self
            .series
            .entry((stream.to_owned(), group.to_owned()))
            .or_default();
        let rate = match (series.last_read, entries_read) {
            (Some((then, before)), Some(now)) if at_ms > then && now >= before => {
                Some((now - before) as f64 * 1000.0 / (at_ms - then) as f64)
            }
            _ => None,
        };
        series.last_read = entries_read.map(|n| (at_ms, n));
        if series.samples.len() == KEEP {
            series.samples.pop_front();
        }
        series.samples.push_back(Sample { at_ms, lag, rate });
    }

    /// The samples of the last `WINDOW`, oldest first.
    pub fn samples(&self, stream: &str, group: &str) -> Vec<Sample> {
        self.series
            .get(&(stream.to_owned(), group.to_owned()))
            .map(|s| s.samples.iter().copied().collect())
            .unwrap_or_default()
    }

    /// The rate the newest sample measured.
    pub fn rate(&self, stream: &str, group: &str) -> Option<f64> {
        self.series
            .get(&(stream.to_owned(), group.to_owned()))
            .and_then(|s| s.samples.back())
            .and_then(|s| s.rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_is_entries_read_over_time_and_unknown_when_the_counter_goes_back() {
        let mut h = History::default();
        h.record("s", "g", 10_000, Some(5), Some(100));
        assert_eq!(h.rate("s", "g"), None, "one sample has no rate");
        h.record("s", "g", 20_000, Some(3), Some(150));
        assert_eq!(h.rate("s", "g"), Some(5.0));
        // The group was recreated: its counter starts again.
        h.record("s", "g", 30_000, Some(0), Some(10));
        assert_eq!(h.rate("s", "g"), None);
        h.record("s", "g", 40_000, None, None);
        assert_eq!(h.rate("s", "g"), None);
        assert_eq!(h.samples("s", "g").len(), 4);
        assert_eq!(h.samples("s", "other"), Vec::new());
    }

    #[test]
    fn keeps_one_hour_of_samples() {
        let mut h = History::default();
        for i in 0..(KEEP as u64 + 50) {
            h.record("s", "g", i * 10_000, Some(i), Some(i));
        }
        let samples = h.samples("s", "g");
        assert_eq!(samples.len(), 360);
        assert_eq!(samples[0].lag, Some(50), "the oldest samples went first");
        assert_eq!(samples.last().unwrap().rate, Some(0.1));
    }
}
