//! What `/livez` and `/readyz` report: per-group heartbeats and whether Redis answers.
//!
//! A partitioned group has one heartbeat for the replica's owner of its partitions (the
//! group's: running or not is `/readyz`'s concern) and one per partition whose loop this
//! replica runs, so a wedged partition loop fails `/livez` as an ordinary group's loop does
//! while the owner and the other partitions keep beating.

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
    groups: std::sync::Mutex<Vec<Registered>>,
}

#[derive(Debug)]
struct Registered {
    group: String,
    /// The partition stream, for a partition's loop; `None` for a group's own heartbeat.
    partition: Option<String>,
    beat: Heartbeat,
}

impl Registered {
    /// How `/livez` names it: the group, and the partition's stream.
    fn name(&self) -> String {
        match &self.partition {
            Some(stream) => format!("{} ({stream})", self.group),
            None => self.group.clone(),
        }
    }
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
            health: Arc::downgrade(&self.inner),
            group: group.into(),
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
            .push(Registered {
                group: group.to_owned(),
                partition: None,
                beat: beat.clone(),
            });
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
            .filter(|r| r.beat.running.load(Ordering::Relaxed) && r.beat.is_stalled())
            .map(Registered::name)
            .collect()
    }

    /// Records each group's lag, as the housekeeping last read it: a partition's on its
    /// loop's heartbeat (the owner of a group's partitions reads nothing itself).
    pub fn set_lags(&self, reports: &[crate::inspect::StreamReport]) {
        let groups = self.inner.groups.lock().expect("health lock");
        for report in reports {
            for g in report.groups.iter().filter(|g| g.managed) {
                let partition = g.partition.as_ref().map(|_| &report.stream);
                for r in groups
                    .iter()
                    .filter(|r| r.group == g.group && r.partition.as_ref() == partition)
                {
                    r.beat.lag.store(g.lag.unwrap_or(0), Ordering::Relaxed);
                }
            }
        }
    }

    /// Groups not currently running their consumer loop (for a partitioned group, the
    /// owner of its partitions: a partition this replica does not run is someone else's).
    pub fn not_running(&self) -> Vec<String> {
        self.inner
            .groups
            .lock()
            .expect("health lock")
            .iter()
            .filter(|r| r.partition.is_none() && !r.beat.running.load(Ordering::Relaxed))
            .map(Registered::name)
            .collect()
    }
}

/// A group's proof of life: the loop beats on every turn, including turns woken only by a
/// read timing out, so a silent stream still beats every `block`.
#[derive(Clone, Debug)]
pub struct Heartbeat {
    /// Where partition heartbeats are registered ([`Heartbeat::partition`]).
    health: std::sync::Weak<Inner>,
    group: String,
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
    /// The heartbeat of partition `stream`'s loop in this (partitioned) group, with the
    /// group's limits: registered the first time the partition runs here, the same one
    /// each time after. It counts for `/livez` only while the loop runs, so the guard the
    /// caller holds marks it stopped however the loop ends (a panic included).
    pub fn partition(&self, stream: &str) -> (Heartbeat, Stopped) {
        let beat = match self.health.upgrade() {
            Some(inner) => {
                let mut groups = inner.groups.lock().expect("health lock");
                let found = groups
                    .iter()
                    .find(|r| r.group == self.group && r.partition.as_deref() == Some(stream))
                    .map(|r| r.beat.clone());
                found.unwrap_or_else(|| {
                    let beat = self.fresh();
                    groups.push(Registered {
                        group: self.group.clone(),
                        partition: Some(stream.to_owned()),
                        beat: beat.clone(),
                    });
                    beat
                })
            }
            // Nothing reads it any more (the process is ending): a heartbeat of its own.
            None => self.fresh(),
        };
        beat.beat();
        beat.progress();
        (beat.clone(), Stopped(beat))
    }

    /// A heartbeat with this one's limits, not running, no lag.
    fn fresh(&self) -> Heartbeat {
        Heartbeat {
            health: self.health.clone(),
            group: self.group.clone(),
            epoch: self.epoch,
            last_ms: Arc::new(AtomicU64::new(0)),
            progress_ms: Arc::new(AtomicU64::new(0)),
            lag: Arc::new(AtomicU64::new(0)),
            running: Arc::new(AtomicBool::new(false)),
            stall_after: self.stall_after,
            idle_after: self.idle_after,
        }
    }

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

/// Marks a partition's heartbeat as not running when dropped ([`Heartbeat::partition`]).
#[derive(Debug)]
pub struct Stopped(Heartbeat);

impl Drop for Stopped {
    fn drop(&mut self) {
        self.0.running.store(false, Ordering::Relaxed);
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

    #[tokio::test(start_paused = true)]
    async fn a_wedged_partition_loop_is_stalled_while_its_owner_beats() {
        let health = Health::new();
        let owner = health.register("g", Duration::from_secs(10), Duration::from_secs(30));
        owner.set_running(true);
        let (p0, stopped0) = owner.partition("s:p0");
        let (p1, _stopped1) = owner.partition("s:p1");
        p0.set_running(true);
        p1.set_running(true);
        for _ in 0..12 {
            tokio::time::advance(Duration::from_secs(1)).await;
            owner.beat();
            p1.beat();
        }
        assert_eq!(health.stalled(), vec!["g (s:p0)".to_owned()]);
        assert!(health.not_running().is_empty());
        // The partition released: its loop's end is not a stall, nor the group not running.
        drop(stopped0);
        assert!(health.stalled().is_empty());
        assert!(health.not_running().is_empty());
        // Taken again: the same heartbeat, beating afresh.
        let (again, _stopped) = owner.partition("s:p0");
        again.set_running(true);
        assert!(health.stalled().is_empty());
        assert_eq!(health.inner.groups.lock().unwrap().len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_partition_with_lag_and_no_progress_is_stalled_not_its_siblings() {
        let health = Health::new();
        let owner = health.register("g", Duration::from_secs(10), Duration::from_secs(30));
        owner.set_running(true);
        let (p0, _s0) = owner.partition("s:p0");
        let (p1, _s1) = owner.partition("s:p1");
        p0.set_running(true);
        p1.set_running(true);
        let mut reports = report("g", 0);
        reports[0].stream = "s:p0".into();
        reports[0].groups[0].partition = Some(crate::inspect::PartitionReport {
            partition: 0,
            partitions: 2,
            stream: "s".into(),
            owner: None,
        });
        let mut p1_report = reports[0].clone();
        p1_report.stream = "s:p1".into();
        p1_report.groups[0].lag = Some(7);
        reports.push(p1_report);
        health.set_lags(&reports);
        for _ in 0..40 {
            tokio::time::advance(Duration::from_secs(1)).await;
            owner.beat();
            p0.beat();
            p1.beat();
        }
        assert_eq!(health.stalled(), vec!["g (s:p1)".to_owned()]);
    }
}
