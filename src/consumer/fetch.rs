//! Fetching: the read connection (connect, reconnect with backoff, recreate a lost
//! group), new entries (XREADGROUP), reclaims (`claim.lua`), the re-read of this
//! consumer's own pending list (resync), and the pause key. Everything is fetched only
//! into free handler slots (see `Loop::free`).

use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use streamworker_handlers::{EntryId, Handler};
use tokio::time::Instant;

use super::{GroupError, Loop, LoopEvent, Source};
use crate::client::{Claimed, ClientError, RawEntry, Reader};

/// Waits between reconnects (and between sends of settlements during an outage): capped
/// exponential backoff with jitter, so replicas do not reconnect in step.
pub(super) fn reconnect_delays() -> impl Iterator<Item = Duration> {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// A read in flight: the slots it reserved, and its reply.
pub(super) type Read = BoxFuture<'static, (usize, crate::client::Result<Vec<RawEntry>>)>;

/// Re-reading this consumer's own pending entries, at startup and after a reconnect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Resync {
    /// Waiting until nothing is in flight here, so every own pending entry is one this
    /// process has lost track of.
    Needed,
    /// Paging through the pending list; `after` is the last id re-delivered.
    Paging {
        after: Option<EntryId>,
    },
    Done,
}

/// The most reads one loop keeps queued at Redis while the backlog is deep.
const PIPELINED_READS: usize = 4;
/// A read whose reply is larger keeps Redis busy writing it for long enough that two
/// queued reads do: more would only hold more memory (measured: 16 KB entries drained
/// slower with four reads of 512 queued than with two, BENCHMARKS.md).
const LARGE_READ_BYTES: usize = 1 << 20;

impl<H: Handler> Loop<'_, H> {
    /// Starts the fetching that can start now: a connection, a resync page, a reclaim or
    /// a read (as free slots, the circuit and a pause allow), waking a blocked read when
    /// it holds up shutdown, a pause or a due reclaim, and the pause key's lookup.
    pub(super) fn fetch(&mut self, running: usize, now: Instant) {
        let cfg = &self.g.config;
        // An open circuit fetches nothing; a half-open one fetches a single probe.
        let limit = self.breaker.may_fetch(running);
        let want = cfg
            .batch_size
            .min(self.concurrency())
            .min(limit.unwrap_or(usize::MAX));
        // A paused group (or one not yet known not to be) fetches nothing either; what is
        // in flight finishes and is settled as usual.
        let paused = self.paused != Some(false);
        if !self.draining && limit != Some(0) {
            if self.reader.is_none() && self.connecting.is_none() && now >= self.connect_at {
                self.start_connect();
            }
            let connected = self.reader.is_some() && !paused;
            // A fresh page only when a good share of a batch fits, so that slow handlers
            // do not turn into a stream of one-entry reads.
            let roomy = |free: usize| free >= want.div_ceil(2) || (free > 0 && running == 0);
            match self.resync {
                Resync::Needed
                    if connected
                        && running == 0
                        && self.reserved == 0
                        && self.pending.is_empty()
                        && self.flushing.is_none()
                        && self.claiming.is_none() =>
                {
                    self.resync = Resync::Paging { after: None };
                }
                _ => {}
            }
            if let Resync::Paging { after } = self.resync {
                let free = self.free(running);
                if connected && self.resyncing.is_none() && roomy(free) {
                    let count = free.min(cfg.batch_size);
                    self.reserved += count;
                    let client = self.g.client.clone();
                    let t = self.target.clone();
                    let counts = self.resync_counts;
                    self.resyncing = Some(Box::pin(async move {
                        let r = client
                            .own_pending(&t.stream, &t.group, &t.consumer, after, count, counts)
                            .await;
                        (count, r)
                    }));
                }
            } else if self.resync == Resync::Done && connected {
                // A due reclaim goes first: reads yield to it, and a read blocked on a quiet
                // stream is woken so that its reserved slots come back at once. Otherwise
                // retries would wait behind reads (up to `block`), or behind a backlog.
                let claim_due = self.claiming.is_none() && now >= self.claim_at && self.may_claim();
                let free = self.free(running);
                if claim_due && free > 0 {
                    let count = free.min(cfg.batch_size);
                    self.reserved += count;
                    self.claim_woke_reader = false;
                    let client = self.g.client.clone();
                    let t = self.target.clone();
                    // An ordered group taking over takes every pending entry, idle or not.
                    let takeover = self.order.as_ref().is_some_and(|o| o.takeover);
                    let min_idle = if takeover {
                        Duration::ZERO
                    } else {
                        cfg.claim_idle
                    };
                    let cursor = self.claim_cursor;
                    self.claiming = Some(Box::pin(async move {
                        let r = client
                            .claim(&t.stream, &t.group, &t.consumer, min_idle, cursor, count)
                            .await;
                        (count, r)
                    }));
                } else if claim_due {
                    if !self.reads.is_empty()
                        && !self.claim_woke_reader
                        && self.unblocking.is_none()
                    {
                        self.claim_woke_reader = true;
                        self.start_unblock();
                    }
                } else if self.order.as_ref().is_some_and(|o| o.takeover) {
                    // Nothing new until the pending list is taken over (`order.rs`).
                } else {
                    // While the backlog is deep, keep up to `PIPELINED_READS` reads queued
                    // at Redis (as many as free slots allow whole batches for), so that it
                    // serves the next while this loop handles the last (with two, it waited
                    // for the daemon between them; BENCHMARKS.md, 2026-12-01). Two when
                    // the reads are large (`read_depth`).
                    let start_read = match self.reads.len() {
                        0 => roomy(free),
                        n => n < self.read_depth && self.backlog && free >= want,
                    };
                    if start_read {
                        let count = free.min(cfg.batch_size);
                        self.reserved += count;
                        // Looking for a fresh probe: do not block; if the stream has
                        // nothing new, a reclaimed entry probes instead.
                        let block = if self.breaker.wants_probe() && !self.probe_claims {
                            Duration::from_millis(1)
                        } else {
                            cfg.block
                        };
                        let read = self.reader.as_ref().expect("connected").read_new(
                            &cfg.stream,
                            &cfg.name,
                            &self.g.consumer,
                            count,
                            block,
                        );
                        self.reads
                            .push_back(Box::pin(read.map(move |r| (count, r))));
                    }
                }
            }
        }
        if (self.draining || self.paused == Some(true))
            && !self.reads.is_empty()
            && self.unblocking.is_none()
            && now >= self.unblock_at
        {
            // A blocked read would hold shutdown (or read on into a pause) for up to
            // `block`: wake it. Repeat while reads remain, since a second pipelined read
            // blocks after the first returns.
            self.start_unblock();
            self.unblock_at = now + Duration::from_millis(100);
        }
        if !self.draining
            && self.pause_checking.is_none()
            && self.claiming.is_none()
            && now >= self.pause_check_at
        {
            self.pause_check_at = now + self.g.claim_interval;
            let client = self.g.client.clone();
            let t = self.target.clone();
            self.pause_checking = Some(Box::pin(async move {
                client.paused_since(&t.stream, &t.group).await
            }));
        }
    }

    /// Wakes this group's blocked read (CLIENT UNBLOCK from the command connection); the
    /// read returns as if its `block` had run out.
    fn start_unblock(&mut self) {
        if let Some(reader) = &self.reader {
            let reader = reader.clone();
            self.unblocking = Some(Box::pin(async move {
                let _ = reader.unblock().await;
            }));
        }
    }

    /// Whether reclaiming may fetch now: always while closed; while half-open only once a
    /// fresh probe was looked for and none found, so retried entries probe last.
    pub(super) fn may_claim(&self) -> bool {
        self.breaker.is_closed() || self.probe_claims
    }

    fn start_connect(&mut self) {
        let client = self.g.client.clone();
        let cfg = Arc::clone(&self.g.config);
        let recreate = self.recreate;
        let metrics = self.g.metrics.clone();
        let name = format!("streamworker:{}:{}", cfg.name, self.g.consumer);
        self.connecting = Some(Box::pin(async move {
            if recreate {
                client
                    .create_group(&cfg.stream, &cfg.name, &cfg.start_id.as_arg())
                    .await?;
                metrics.group_recreated.inc();
                tracing::warn!(stream = %cfg.stream, group = %cfg.name, start_id = %cfg.start_id.as_arg(), "recreated the consumer group, which Redis had lost (NOGROUP)");
            }
            client.reader(&cfg.stream, cfg.block, &name).await
        }));
    }

    pub(super) fn on_connect(
        &mut self,
        result: crate::client::Result<Reader>,
    ) -> Result<(), GroupError> {
        match result {
            Ok(reader) => {
                if self.outage_logged {
                    tracing::info!(stream = %self.g.config.stream, group = %self.g.config.name, "reconnected to Redis; re-reading own pending entries");
                }
                self.reader = Some(reader);
                self.recreate = false;
                self.outage_logged = false;
                self.connect_delays = Box::new(reconnect_delays());
                // A read whose reply was lost may have delivered entries to this consumer.
                self.resync = Resync::Needed;
                Ok(())
            }
            Err(e) => self.redis_trouble(e, Instant::now()),
        }
    }

    /// Handles a failed command: outages back off and reconnect; NOGROUP recreates the
    /// group; anything else ends the loop (the supervisor restarts it).
    fn redis_trouble(&mut self, error: ClientError, now: Instant) -> Result<(), GroupError> {
        self.g.metrics.redis_error(error.kind());
        match error {
            ClientError::Unavailable(_) => {
                let delay = self.connect_delays.next().unwrap_or(Duration::from_secs(5));
                if !self.outage_logged {
                    tracing::warn!(stream = %self.g.config.stream, group = %self.g.config.name, error = %error, "lost Redis; reconnecting with backoff");
                    self.outage_logged = true;
                }
                self.reader = None;
                self.connect_at = self.connect_at.max(now + delay);
                Ok(())
            }
            ClientError::NoGroup(_) => {
                self.reader = None;
                self.recreate = true;
                self.claim_cursor = EntryId::ZERO;
                Ok(())
            }
            other => Err(GroupError::Redis(other)),
        }
    }

    pub(super) fn on_read(
        &mut self,
        count: usize,
        result: crate::client::Result<Vec<RawEntry>>,
    ) -> Result<Vec<RawEntry>, GroupError> {
        self.reserved -= count;
        match result {
            Ok(entries) => {
                self.fetched(Source::Read, &entries);
                self.backlog = entries.len() == count;
                // The reply's size, from its first entry: large replies need fewer reads
                // queued behind them.
                let size = entries.first().map_or(0, |e| {
                    e.fields
                        .iter()
                        .map(|(n, v)| n.len() + v.len())
                        .sum::<usize>()
                }) * entries.len();
                self.read_depth = if size > LARGE_READ_BYTES {
                    2
                } else {
                    PIPELINED_READS
                };
                if entries.is_empty() && self.breaker.wants_probe() {
                    // Nothing fresh to probe with: a reclaimed entry may.
                    self.probe_claims = true;
                } else if !entries.is_empty() {
                    self.g.heartbeat.progress();
                }
                Ok(entries)
            }
            Err(e) => {
                self.backlog = false;
                self.redis_trouble(e, Instant::now())?;
                Ok(Vec::new())
            }
        }
    }

    pub(super) fn on_claim(
        &mut self,
        count: usize,
        result: crate::client::Result<Claimed>,
    ) -> Result<Vec<RawEntry>, GroupError> {
        self.reserved -= count;
        let now = Instant::now();
        match result {
            Ok(claimed) => {
                // Keep going at once through a long pending list (a dead replica's), else
                // look again next interval.
                let more = claimed.next.is_some() && claimed.entries.len() == count;
                self.pause_check_at = now + self.g.claim_interval;
                if claimed.paused {
                    self.set_paused(true);
                    return Ok(Vec::new());
                }
                self.claim_cursor = claimed.next.unwrap_or(EntryId::ZERO);
                if !more && let Some(o) = &mut self.order {
                    o.takeover = false;
                }
                self.claim_at = if more {
                    now
                } else {
                    now + self.g.claim_interval
                };
                self.note_deleted(&claimed.deleted, "reclaim");
                self.fetched(Source::Reclaim, &claimed.entries);
                if !claimed.entries.is_empty() {
                    self.g
                        .metrics
                        .reclaimed
                        .inc_by(claimed.entries.len() as u64);
                    tracing::debug!(stream = %self.g.config.stream, group = %self.g.config.name, count = claimed.entries.len(), "reclaimed idle entries");
                }
                Ok(claimed.entries)
            }
            Err(e) => {
                self.claim_at = now + self.g.claim_interval;
                self.redis_trouble(e, now)?;
                Ok(Vec::new())
            }
        }
    }

    pub(super) fn on_resync(
        &mut self,
        count: usize,
        result: crate::client::Result<Claimed>,
    ) -> Result<Vec<RawEntry>, GroupError> {
        self.reserved -= count;
        match result {
            Ok(page) => {
                self.note_deleted(&page.deleted, "own pending re-read");
                self.fetched(Source::Resync, &page.entries);
                if page.next.is_none() {
                    // From now on, every own pending entry a resync finds is one whose
                    // delivery reply was lost: its handler never ran here.
                    self.resync_counts = false;
                }
                self.resync = match page.next {
                    Some(_) => Resync::Paging {
                        after: page
                            .entries
                            .iter()
                            .map(|e| e.id)
                            .chain(page.deleted.iter().copied())
                            .max(),
                    },
                    None => Resync::Done,
                };
                if !page.entries.is_empty() {
                    tracing::info!(stream = %self.g.config.stream, group = %self.g.config.name, count = page.entries.len(), "re-delivering this consumer's own pending entries");
                }
                Ok(page.entries)
            }
            Err(e) => {
                self.resync = Resync::Needed;
                self.redis_trouble(e, Instant::now())?;
                Ok(Vec::new())
            }
        }
    }

    /// Acts on what the pause key says: stop fetching (in-flight entries finish) or start
    /// again at once.
    pub(super) fn set_paused(&mut self, paused: bool) {
        let was = self.paused.replace(paused);
        if was == Some(paused) {
            return;
        }
        let cfg = &self.g.config;
        self.g.metrics.paused.set(i64::from(paused));
        let now = Instant::now();
        if paused {
            self.unblock_at = now;
            tracing::info!(stream = %cfg.stream, group = %cfg.name, consumer = %self.g.consumer, "group paused (streamworker pause): in-flight entries finish, nothing new is read or reclaimed");
        } else {
            self.claim_at = now;
            if was.is_some() {
                tracing::info!(stream = %cfg.stream, group = %cfg.name, consumer = %self.g.consumer, "group resumed (streamworker resume): reading again");
            }
        }
    }

    /// Reports fetched entries (only when a test listens, and only non-empty fetches).
    fn fetched(&self, from: Source, entries: &[RawEntry]) {
        if !entries.is_empty() {
            self.emit(|| LoopEvent::Fetched {
                from,
                ids: entries.iter().map(|e| e.id).collect(),
            });
        }
    }
}
