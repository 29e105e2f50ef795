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

    /// A heartbeat for one group; `stall_after` is how long without a beat means wedged.
    pub fn register(&self, group: &str, stall_after: Duration) -> Heartbeat {
        let beat = Heartbeat {
            epoch: self.inner.epoch,
            last_ms: Arc::new(AtomicU64::new(0)),
            running: Arc::new(AtomicBool::new(false)),
            stall_after,
        };
        beat.beat();
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

    /// Groups whose loop runs but has not turned within its `stall_after`: wedged.
    /// (Groups not running — starting, restarting, drained — are `/readyz`'s concern.)
    pub fn stalled(&self) -> Vec<String> {
        self.inner
            .groups
            .lock()
            .expect("health lock")
            .iter()
            .filter(|(_, b)| b.running.load(Ordering::Relaxed) && b.since_last() > b.stall_after)
            .map(|(name, _)| name.clone())
            .collect()
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
    running: Arc<AtomicBool>,
    stall_after: Duration,
}

impl Heartbeat {
    pub fn beat(&self) {
        self.last_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    pub fn set_running(&self, running: bool) {
        self.running.store(running, Ordering::Relaxed);
        self.beat();
    }

    fn since_last(&self) -> Duration {
        let now = self.epoch.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}
