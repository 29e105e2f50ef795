//! What `/livez` and `/readyz` report: per-group heartbeats and whether Redis answers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Shared by the groups (which beat), the supervisor and the HTTP endpoints (which read).
#[derive(Clone, Debug)]
pub struct Health {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    epoch: Instant,
    redis_up: AtomicBool,
    groups: std::sync::Mutex<Vec<(String, Heartbeat)>>,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                epoch: Instant::now(),
                redis_up: AtomicBool::new(false),
                groups: Default::default(),
            }),
        }
    }

    /// A heartbeat for one group; `stall_after` is how long without a beat means wedged,
    /// `idle_after` how long a loop that turns may go without progress while its group has
    /// lag.
    pub fn register(&self, group: &str, stall_after: Duration, idle_after: Duration) -> Heartbeat {
        let beat = Heartbeat {
            epoch: self.inner.epoch,
            last_ms: Arc::new(AtomicU64::new(0)),
            progress_ms: Arc::new(AtomicU64::new(0)),
            lag: Arc::new(AtomicU64::new(0)),
            running: Arc::new(AtomicBool::new(false)),
            stall_after,
            idle_after,
        };
        beat.beat();
        beat.progress();
        self.inner
            .groups
            .lock()
            .expect("health lock")
            .push((group.to_owned(), beat.clone()));
        beat
    }

    pub fn set_redis_up(&self, up: bool) {
        self.inner.redis_up.store(up, Ordering::Relaxed);
    }

    pub fn redis_up(&self) -> bool {
        self.inner.redis_up.load(Ordering::Relaxed)
    }

    /// Groups whose loop runs but has not turned within its `stall_after` (wedged), or
    /// turns without fetching or settling anything for `idle_after` while entries wait
    /// for the group (stuck). Waiting out an outage or an open circuit is progress.
    /// (Groups not running — starting, restarting, drained — are `/readyz`'s concern.)
    pub fn stalled(&self) -> Vec<String> {
        self.inner
            .groups
            .lock()
            .expect("health lock")
            .iter()
            .filter(|(_, b)| b.running.load(Ordering::Relaxed) && b.is_stalled())
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Records each group's lag, as the housekeeping last read it.
    pub fn set_lags(&self, reports: &[crate::inspect::StreamReport]) {
        let groups = self.inner.groups.lock().expect("health lock");
        for report in reports {
            for g in report.groups.iter().filter(|g| g.managed) {
                for (_, beat) in groups.iter().filter(|(name, _)| *name == g.group) {
                    beat.lag.store(g.lag.unwrap_or(0), Ordering::Relaxed);
                }
            }
        }
    }

    /// Groups not currently running their consumer loop.
    pub fn not_running(&self) -> Vec<String> {
        self.inner
            .groups
            .lock()
            .expect("health lock")
            .iter()
            .filter(|(_, b)| !b.running.load(Ordering::Relaxed))
            .map(|(name, _)| name.clone())
            .collect()
    }
}

/// A group's proof of life: the loop beats on every turn, including turns woken only by a
/// read timing out, so a silent stream still beats every `block`.
#[derive(Clone, Debug)]
pub struct Heartbeat {
    epoch: Instant,
    last_ms: Arc<AtomicU64>,
    /// When the loop last fetched or settled entries, or waited on purpose.
    progress_ms: Arc<AtomicU64>,
    /// The group's lag at the last look.
    lag: Arc<AtomicU64>,
    running: Arc<AtomicBool>,
    stall_after: Duration,
    idle_after: Duration,
}

impl Heartbeat {
    pub fn beat(&self) {
        self.last_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// The loop fetched or settled entries, or is waiting on purpose.
    pub fn progress(&self) {
        self.progress_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    pub fn set_running(&self, running: bool) {
        self.running.store(running, Ordering::Relaxed);
        self.beat();
        self.progress();
    }

    fn since(&self, at: &AtomicU64) -> Duration {
        let now = self.epoch.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(at.load(Ordering::Relaxed)))
    }

    fn is_stalled(&self) -> bool {
        self.since(&self.last_ms) > self.stall_after
            || (self.lag.load(Ordering::Relaxed) > 0
                && self.since(&self.progress_ms) > self.idle_after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inspect::{GroupReport, StreamReport};

    fn report(group: &str, lag: u64) -> Vec<StreamReport> {
        vec![StreamReport {
            stream: "s".into(),
            length: 10,
            groups: vec![GroupReport {
                group: group.into(),
                managed: true,
                lag: Some(lag),
                pending: 0,
                retrying: 0,
                last_delivered_id: "0-0".into(),
                oldest_pending_seconds: None,
                consumers: Vec::new(),
                dead_letter_stream: None,
                dead_letter_length: None,
                circuits: Vec::new(),
                paused: false,
                partition: None,
            }],
        }]
    }

    #[tokio::test(start_paused = true)]
    async fn a_loop_that_turns_without_progress_while_its_group_has_lag_is_stalled() {
        let health = Health::new();
        let beat = health.register("g", Duration::from_secs(10), Duration::from_secs(30));
        beat.set_running(true);
        tokio::time::advance(Duration::from_secs(40)).await;
        beat.beat();
        assert!(health.stalled().is_empty(), "no lag: idle is fine");
        health.set_lags(&report("g", 5));
        assert_eq!(
            health.stalled(),
            vec!["g".to_owned()],
            "lag and no progress"
        );
        beat.progress();
        assert!(health.stalled().is_empty(), "progress clears it");
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(health.stalled(), vec!["g".to_owned()], "no beat at all");
    }
}
