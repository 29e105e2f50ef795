//! Bucket math: entries are counted in time buckets about a sixtieth of a window wide, and
//! rules whose windows share a width share the bucket keys (a family).

use std::time::Duration;

/// Bucket widths, in seconds; a rule ideally uses the largest one at most a sixtieth of its
/// window.
const WIDTHS: &[u64] = &[1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600];
const BUCKETS_PER_WINDOW: u64 = 60;
/// A longer window still shares a shorter one's buckets when it is read as at most this
/// many: every width costs each entry one more PEXPIRE, while reading a few hundred small
/// hashes once a second costs Redis well under a millisecond.
const MAX_BUCKETS: u64 = 600;

/// The ideal bucket width (ms) of a window and the number of buckets it is read as.
pub fn buckets_for(window: Duration) -> (u64, u64) {
    let window_ms = window.as_millis().max(1) as u64;
    let width_s = WIDTHS
        .iter()
        .copied()
        .rev()
        .find(|w| w * 1000 * BUCKETS_PER_WINDOW <= window_ms)
        .unwrap_or(1);
    let width_ms = width_s * 1000;
    (width_ms, window_ms.div_ceil(width_ms))
}

/// The bucket width (ms) of each window: windows are taken shortest first, each starting a
/// new width only when the current one would read it as more than `MAX_BUCKETS` buckets.
pub fn bucket_widths(windows: &[Duration]) -> Vec<u64> {
    let mut order: Vec<usize> = (0..windows.len()).collect();
    order.sort_by_key(|&i| windows[i]);
    let mut out = vec![0; windows.len()];
    let mut current: Option<u64> = None;
    for i in order {
        let window_ms = windows[i].as_millis().max(1) as u64;
        let width = match current {
            Some(w) if window_ms.div_ceil(w) <= MAX_BUCKETS => w,
            _ => buckets_for(windows[i]).0,
        };
        current = Some(width);
        out[i] = width;
    }
    out
}

/// Rules that share a bucket width share the bucket keys.
#[derive(Debug)]
pub(super) struct Family {
    pub(super) width_ms: u64,
    /// Buckets read per evaluation: the most any of its rules needs.
    pub(super) buckets: u64,
    /// Entries older than this (ms) fall in no window any more: not counted.
    pub(super) keep_ms: u64,
    pub(super) ttl: Duration,
    /// Count every entry in the field `all`: the family has a rate rule or a rule that
    /// matches every entry (which then reads `all` instead of a field of its own).
    pub(super) all: bool,
    /// The rules counted in a field of their own (`m:<name>`).
    pub(super) counted: Vec<usize>,
    pub(super) prefix: String,
}

impl Family {
    pub(super) fn key(&self, bucket: u64) -> String {
        format!("{}{}", self.prefix, bucket * (self.width_ms / 1000))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_read_as_about_sixty_buckets() {
        let s = Duration::from_secs;
        assert_eq!(buckets_for(s(5)), (1000, 5));
        assert_eq!(buckets_for(s(60)), (1000, 60));
        assert_eq!(buckets_for(s(90)), (1000, 90));
        assert_eq!(buckets_for(s(300)), (5000, 60));
        assert_eq!(buckets_for(s(3600)), (60_000, 60));
        assert_eq!(buckets_for(s(24 * 3600)), (900_000, 96));
        assert_eq!(buckets_for(Duration::from_millis(5500)), (1000, 6));
        // Longer windows share shorter ones' buckets up to 600 of them.
        assert_eq!(bucket_widths(&[s(300), s(60)]), vec![1000, 1000]);
        assert_eq!(bucket_widths(&[s(60), s(3600)]), vec![1000, 60_000]);
        assert_eq!(
            bucket_widths(&[s(24 * 3600), s(5), s(600), s(3600), s(7200)]),
            vec![900_000, 1000, 1000, 60_000, 60_000]
        );
    }
}
