//! One consumer group's loop: fetch → run → settle (acknowledge, retry later, give back,
//! or dead-letter). The only caller of `Handler::handle`.
//!
//! A single task drives everything for its group: up to two pipelined XREADGROUPs, up to
//! `concurrency` handler futures, one reclaim, one settlement flush. There is no task or
//! channel per entry. Entries are only fetched when a handler slot is free for them, so an
//! entry's idle time in Redis is its handler's running time — which `handler_timeout`
//! bounds below `claim_idle`, so no other replica can reclaim an entry that is being
//! handled.
//!
//! Each turn of `Loop::run`:
//!
//! 1. **pump** starts whatever can start: a connection, a read, a reclaim or a page of
//!    the own pending list (`fetch.rs`, only into free slots and as the circuit allows),
//!    and a flush of what is decided (`settle.rs`);
//! 2. it waits for the first thing to happen: a handler finishing, a read, reclaim or
//!    resync coming back, a flush answered, a timer, shutdown, the lease lost;
//! 3. finished handlers are **settled**: `fate::decide` (one pure function) says what
//!    becomes of the entry, `settle.rs` queues it for the next flush;
//! 4. fetched entries are **admitted** (`run.rs`): decoded and started, or settled at once
//!    (undecodable, a replay for another group, shutdown).
//!
//! The handler's periodic work runs beside the loop, under its own lease (`tick.rs`).

mod fate;
mod fetch;
mod order;
mod run;
mod settle;
mod tick;

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesOrdered, FuturesUnordered};
use futures_util::{FutureExt, StreamExt};
use streamworker_handlers::{Entry, EntryId, Handler, Origin};
use tokio::time::{Instant, sleep_until};

pub use fate::{Fate, Policy};
use fetch::{Read, Resync, reconnect_delays};
use run::{Done, call, call_batch};
pub use settle::{BACKOFF_CONSUMER, DeadLetter, Settlements, dead_letter_fields};
use settle::{Flushed, Target};
use tick::tick;

use crate::circuit::{Breaker, GiveBacks, Transition};
use crate::client::{Claimed, Client, ClientError, RawEntry, Reader};
use crate::config::GroupConfig;
use crate::health::Heartbeat;
use crate::lease::{Lease, LeaseError};
use crate::metrics::GroupMetrics;
use crate::shutdown::Shutdown;

/// Everything one group needs to run.
pub struct Group<H> {
    pub config: Arc<GroupConfig>,
    pub consumer: String,
    pub claim_interval: Duration,
    pub client: Client,
    pub handler: H,
    pub metrics: GroupMetrics,
    pub shutdown: Shutdown,
    pub heartbeat: Heartbeat,
    pub lease_token: String,
    /// Where the loop reports what it does, for tests that run a group inside the test
    /// process and wait on events instead of sleeping (`tests/it/inprocess.rs`). `None`
    /// in the daemon: then no event is even built.
    #[doc(hidden)]
    pub events: Option<Events>,
}

/// The sending side of a group's [`LoopEvent`]s.
#[doc(hidden)]
pub type Events = tokio::sync::mpsc::UnboundedSender<LoopEvent>;

/// Something the loop did, reported to [`Group::events`] when set.
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq)]
pub enum LoopEvent {
    /// Entries came back from Redis, in the order they will be admitted.
    Fetched { from: Source, ids: Vec<EntryId> },
    /// An entry's fate was decided and queued for the next flush.
    Settled {
        id: EntryId,
        delivery_count: u64,
        fate: Fate,
    },
    /// A flush came back: what Redis now knows.
    Flushed {
        acked: Vec<EntryId>,
        parked: usize,
        handed_back: usize,
        dead_lettered: Vec<EntryId>,
        /// Settlements to send again (Redis unreachable or refusing).
        unsent: usize,
    },
    /// The circuit breaker changed state.
    Circuit(Transition),
}

/// Where fetched entries came from.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Read,
    Reclaim,
    Resync,
}

/// How a group's loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupExit {
    /// Every in-flight entry finished and every settlement reached Redis.
    Drained,
    /// The shutdown deadline passed first: `abandoned` handler calls were cut off and
    /// `unsettled` decisions never reached Redis; those entries stay pending for others.
    CutOff { abandoned: usize, unsettled: usize },
}

#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error("another process took this consumer name's lease")]
    LeaseLost,
    #[error(transparent)]
    Redis(#[from] ClientError),
    /// The handler could not be built from its options.
    #[error("{0}")]
    Handler(String),
}

impl GroupError {
    /// Errors that restarting the group cannot fix.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            Self::Lease(LeaseError::Held { .. }) | Self::Handler(_)
        )
    }
}

/// Runs the group until shutdown. Creates the group if missing and takes the lease on the
/// consumer name first, waiting out Redis outages.
pub async fn run<H: Handler>(g: &Group<H>) -> Result<GroupExit, GroupError> {
    let Some(lease) = setup(g).await? else {
        return Ok(GroupExit::Drained);
    };
    g.heartbeat.set_running(true);
    let stop = tokio_util::sync::CancellationToken::new();
    let (mut result, tick_cut) = tokio::join!(
        async {
            let result = Loop::new(g).run(&lease).await;
            stop.cancel();
            result
        },
        tick(g, &stop),
    );
    if tick_cut && let Ok(GroupExit::Drained) = result {
        // The deadline cut the periodic work off: that is work cut off (exit 3).
        result = Ok(GroupExit::CutOff {
            abandoned: 1,
            unsettled: 0,
        });
    }
    g.heartbeat.set_running(false);
    if tokio::time::timeout(LAST_WORDS, lease.release())
        .await
        .is_err()
    {
        tracing::debug!(stream = %g.config.stream, group = %g.config.name, "could not release the consumer name's lease in time; it expires by itself");
    }
    result
}

/// How long the last calls of a stopping group (lease releases, the final settlement
/// after a cut-off) may take: the process exits within `shutdown_timeout` plus a little.
const LAST_WORDS: Duration = Duration::from_millis(500);

/// Creates the group (MKSTREAM; BUSYGROUP is fine) and takes the lease. `None` when
/// shutdown came first.
async fn setup<H: Handler>(g: &Group<H>) -> Result<Option<Lease>, GroupError> {
    let cfg = &g.config;
    let mut delays = reconnect_delays();
    loop {
        let attempt = async {
            if g.client
                .create_group(&cfg.stream, &cfg.name, &cfg.start_id.as_arg())
                .await?
            {
                tracing::info!(stream = %cfg.stream, group = %cfg.name, start_id = %cfg.start_id.as_arg(), "created consumer group");
            }
            Lease::acquire(
                &g.client,
                &cfg.stream,
                &cfg.name,
                &g.consumer,
                &g.lease_token,
            )
            .await
        };
        let error = tokio::select! {
            result = attempt => match result {
                Ok(lease) => return Ok(Some(lease)),
                Err(LeaseError::Redis(e)) if e.is_unavailable() => e,
                Err(e) => return Err(e.into()),
            },
            _ = g.shutdown.triggered() => return Ok(None),
        };
        g.metrics.redis_error(error.kind());
        let delay = delays.next().unwrap_or(Duration::from_secs(10));
        tracing::warn!(stream = %cfg.stream, group = %cfg.name, error = %error, retry_in_ms = delay.as_millis() as u64, "cannot start the group yet: Redis is unreachable");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = g.shutdown.triggered() => return Ok(None),
        }
    }
}

/// The loop's state, apart from the handler futures (whose type only `run` can name).
struct Loop<'g, H> {
    g: &'g Group<H>,
    origin: Arc<Origin>,
    target: Target,
    /// The per-group read connection; `None` while (re)connecting.
    reader: Option<Reader>,
    connecting: Option<BoxFuture<'static, crate::client::Result<Reader>>>,
    connect_at: Instant,
    connect_delays: Box<dyn Iterator<Item = Duration> + Send>,
    /// The group vanished (NOGROUP): recreate it before reading again.
    recreate: bool,
    reads: FuturesOrdered<Read>,
    /// Handler slots promised to reads and claims in flight.
    reserved: usize,
    /// The last read or claim returned a full page: more is waiting.
    backlog: bool,
    /// How many reads to keep queued at Redis while there is a backlog (`fetch.rs`).
    read_depth: usize,
    claiming: Option<BoxFuture<'static, (usize, crate::client::Result<Claimed>)>>,
    claim_cursor: EntryId,
    claim_at: Instant,
    /// A due reclaim found every slot reserved and woke the blocked read once.
    claim_woke_reader: bool,
    resync: Resync,
    resyncing: Option<BoxFuture<'static, (usize, crate::client::Result<Claimed>)>>,
    pending: Settlements,
    flushing: Option<BoxFuture<'static, Flushed>>,
    flush_at: Instant,
    flush_delays: Box<dyn Iterator<Item = Duration> + Send>,
    outage_logged: bool,
    draining: bool,
    unblocking: Option<BoxFuture<'static, ()>>,
    unblock_at: Instant,
    report_at: Instant,
    breaker: Breaker,
    /// Deliveries given back because the circuit was not closed, per entry (bounded).
    give_backs: GiveBacks,
    /// Half-open: a read for a fresh probe came back empty, so a reclaimed entry may probe.
    probe_claims: bool,
    /// How often Redis refused each entry's settlement so far (see `on_flush`).
    refusals: HashMap<EntryId, u32>,
    /// Entries whose settlement was put back into `pending` after a failed send.
    requeued: HashSet<EntryId>,
    /// Settlements in the flush in flight: they count towards the bound on unsent ones,
    /// since a failed send puts them back.
    flushing_len: usize,
    /// Whether a resync re-delivery counts as a delivery: yes at startup (a crash may have
    /// cut a handler call short), no after a reconnect (this process never started them).
    resync_counts: bool,
    /// When to tell Redis again that the circuit is not closed (for `status`).
    circuit_refresh_at: Instant,
    /// Entries waiting for a batch handler's next batch, and since when the oldest waits.
    buffer: Vec<(Entry, tracing::Span)>,
    buffer_since: Option<Instant>,
    /// Entries in batches being handled.
    batched: usize,
    /// Whether the group is paused (`streamworker pause`); `None` until first looked up,
    /// and nothing is fetched before it is known.
    paused: Option<bool>,
    /// A lookup of the pause key. Reclaims report it too (`claim.lua`), so this runs only
    /// when no reclaim did for a `claim_interval`: while paused, or with no slot free.
    pause_checking: Option<BoxFuture<'static, crate::client::Result<Option<u64>>>>,
    pause_check_at: Instant,
    policy: Policy,
    /// Per-key order (`order_by`): which keys are busy, what waits behind them.
    order: Option<order::Order>,
}

impl<'g, H: Handler> Loop<'g, H> {
    fn new(g: &'g Group<H>) -> Self {
        let cfg = &g.config;
        let now = Instant::now();
        // The group's `order_by`, or the order its handler needs (a partitioned forward).
        let ordering = cfg
            .order_by
            .clone()
            .map(|field| streamworker_handlers::Ordering {
                field,
                partitions: None,
            })
            .or_else(|| g.handler.ordering());
        Self {
            g,
            origin: Arc::new(Origin {
                stream: cfg.stream.clone(),
                group: cfg.name.clone(),
                consumer: g.consumer.clone(),
            }),
            target: Target {
                stream: cfg.stream.clone(),
                group: cfg.name.clone(),
                consumer: g.consumer.clone(),
                dead_letter_stream: cfg.dead_letter_stream(),
            },
            reader: None,
            connecting: None,
            connect_at: now,
            connect_delays: Box::new(reconnect_delays()),
            recreate: false,
            reads: FuturesOrdered::new(),
            reserved: 0,
            backlog: false,
            read_depth: 2,
            claiming: None,
            claim_cursor: EntryId::ZERO,
            claim_at: now,
            claim_woke_reader: false,
            // An ordered group takes over the group's whole pending list first (its own
            // pending entries included), in id order: see `order.rs`.
            resync: if ordering.is_some() {
                Resync::Done
            } else {
                Resync::Needed
            },
            resyncing: None,
            pending: Settlements::default(),
            flushing: None,
            flush_at: now,
            flush_delays: Box::new(reconnect_delays()),
            outage_logged: false,
            draining: false,
            unblocking: None,
            unblock_at: now,
            report_at: now,
            breaker: Breaker::new(cfg.circuit_breaker),
            give_backs: GiveBacks::default(),
            probe_claims: false,
            refusals: HashMap::new(),
            requeued: HashSet::new(),
            flushing_len: 0,
            resync_counts: ordering.is_none(),
            circuit_refresh_at: now,
            buffer: Vec::new(),
            buffer_since: None,
            batched: 0,
            paused: None,
            pause_checking: None,
            pause_check_at: now,
            policy: Policy::of(cfg),
            order: ordering.map(|ordering| {
                // Waiting entries cost memory only, not handler slots: a slow key holds
                // up its own entries, and reading stops when this many wait.
                let cap = (cfg.concurrency * 4).max(cfg.batch_size);
                order::Order::new(ordering, cap, now)
            }),
        }
    }

    async fn run(mut self, lease: &Lease) -> Result<GroupExit, GroupError> {
        let g = self.g;
        let timeout = g.config.handler_timeout;
        let batching = g.handler.batching();
        // Single entries and batches run side by side as futures of this task; a group
        // uses one or the other, depending on its handler.
        let mut running: FuturesUnordered<BoxFuture<'_, Done>> = FuturesUnordered::new();
        let mut batches = FuturesUnordered::new();
        loop {
            g.heartbeat.beat();
            if self.draining
                || self.outage_logged
                || !self.breaker.is_closed()
                || self.paused == Some(true)
            {
                // Waiting on purpose (an outage, an open circuit, a pause, shutdown) is not
                // a stall.
                g.heartbeat.progress();
            }
            let now = Instant::now();
            let busy = running.len() + self.batched + self.buffer.len();
            g.metrics.inflight.set(busy as i64);
            if self.draining {
                // Entries waiting for a batch were fetched but never started.
                for (entry, span) in std::mem::take(&mut self.buffer) {
                    crate::telemetry::finish_span(&span, "handed_back", None);
                    self.hand_back(entry.id, entry.delivery_count);
                }
                // So are entries waiting for their key's turn, and held retries.
                let unstarted = self.order.as_mut().map(order::Order::drain);
                for (id, delivery_count) in unstarted.into_iter().flatten() {
                    self.hand_back(id, delivery_count);
                }
                if running.is_empty() && batches.is_empty() && self.quiescent() {
                    return Ok(GroupExit::Drained);
                }
                if g.shutdown.deadline().is_some_and(|d| now >= d) {
                    let abandoned = running.len() + self.batched;
                    return Ok(self.cut_off(abandoned).await);
                }
                if now >= self.report_at {
                    tracing::info!(
                        stream = %g.config.stream, group = %g.config.name,
                        handlers = running.len() + self.batched, reads = self.reads.len(), settlements = self.pending.len(),
                        "draining: still waiting for in-flight work"
                    );
                    self.report_at = now + Duration::from_secs(5);
                }
            } else if let Some(b) = batching
                && !self.buffer.is_empty()
                && (self.buffer.len() >= b.max_entries
                    || self.buffer_since.is_some_and(|t| now >= t + b.max_wait)
                    // Nothing more can be fetched until something finishes, so waiting
                    // for max_wait would only add latency (concurrency < max_entries).
                    || running.len() + self.batched + self.buffer.len() >= self.concurrency())
            {
                let take = self.buffer.len().min(b.max_entries.max(1));
                let batch: Vec<(Entry, tracing::Span)> = self.buffer.drain(..take).collect();
                self.buffer_since = (!self.buffer.is_empty()).then_some(now);
                self.batched += batch.len();
                batches.push(call_batch(&g.handler, batch, timeout));
            }
            self.pump(running.len() + self.batched + self.buffer.len(), now);

            let mut wake = self.next_wakeup(now, running.len() + self.batched + self.buffer.len());
            if let (Some(b), Some(since)) = (batching, self.buffer_since) {
                wake = wake.min(since + b.max_wait);
            }
            let admitted: Vec<RawEntry> = tokio::select! {
                biased;
                _ = g.shutdown.triggered(), if !self.draining => {
                    self.begin_drain(now);
                    Vec::new()
                }
                _ = lease.lost() => return Err(GroupError::LeaseLost),
                Some(done) = running.next(), if !running.is_empty() => {
                    self.settle(done);
                    // Drain everything already finished before looking at anything else:
                    // one turn of the loop per batch, not per entry.
                    while let Some(Some(done)) = running.next().now_or_never() {
                        self.settle(done);
                    }
                    Vec::new()
                }
                Some(dones) = batches.next(), if !batches.is_empty() => {
                    let dones: Vec<Done> = dones;
                    self.batched -= dones.len();
                    for done in dones {
                        self.settle(done);
                    }
                    Vec::new()
                }
                Some((count, result)) = self.reads.next(), if !self.reads.is_empty() => {
                    self.on_read(count, result)?
                }
                (count, result) = maybe(&mut self.claiming) => {
                    self.claiming = None;
                    self.on_claim(count, result)?
                }
                (count, result) = maybe(&mut self.resyncing) => {
                    self.resyncing = None;
                    self.on_resync(count, result)?
                }
                result = maybe(&mut self.connecting) => {
                    self.connecting = None;
                    self.on_connect(result)?;
                    Vec::new()
                }
                flushed = maybe(&mut self.flushing) => {
                    self.flushing = None;
                    self.on_flush(flushed);
                    Vec::new()
                }
                _ = maybe(&mut self.unblocking) => {
                    self.unblocking = None;
                    Vec::new()
                }
                result = maybe(&mut self.pause_checking) => {
                    self.pause_checking = None;
                    match result {
                        Ok(since) => self.set_paused(since.is_some()),
                        Err(e) if e.is_unavailable() => tracing::debug!(stream = %g.config.stream, group = %g.config.name, error = %e, "could not look up whether the group is paused; trying again"),
                        // Not knowing, the loop does not read (a refused GET, e.g. an ACL
                        // without +get, would otherwise stall the group without a word).
                        Err(e) => tracing::warn!(stream = %g.config.stream, group = %g.config.name, key = %crate::keys::pause_key(&g.config.stream, &g.config.name), error = %e, "cannot read the group's pause key; not reading until it can (the ACL user needs +get)"),
                    }
                    Vec::new()
                }
                _ = sleep_until(wake) => Vec::new(),
            };
            let mut start: Vec<(Entry, tracing::Span)> = Vec::with_capacity(admitted.len());
            for raw in admitted {
                if let Some(o) = &self.order
                    && o.holds(raw.id)
                {
                    // Already here (running, waiting or held): a reclaim or resync of
                    // this consumer's own pending list brought it again.
                    continue;
                }
                if let Some((entry, span)) = self.admit(raw) {
                    match &mut self.order {
                        Some(o) => start.extend(o.admit(entry, span)),
                        None => start.push((entry, span)),
                    }
                }
            }
            if let Some(o) = &mut self.order
                && !self.draining
            {
                let retries = self.breaker.may_fetch(running.len()) != Some(0);
                let busy = running.len() + self.batched + self.buffer.len() + start.len();
                let slots = self.g.config.concurrency.saturating_sub(busy);
                start.extend(o.take_ready(Instant::now(), retries, slots));
                self.touch_idle(Instant::now());
            }
            for (entry, span) in start {
                self.breaker.started(entry.id);
                if batching.is_some() {
                    if self.buffer.is_empty() {
                        self.buffer_since = Some(Instant::now());
                    }
                    self.buffer.push((entry, span));
                } else {
                    // Most handler calls answer on their first poll (`noop`, counting,
                    // routing): settle those here and now. Only a call that has to wait
                    // becomes a task of `running`; the task's allocation, wakers and the
                    // copies of the call in and out of it were a sixth of the daemon's
                    // CPU per entry while draining. Its waker is this task's, so a call
                    // that registered it and then moved to `running` costs at most one
                    // spurious wakeup.
                    let mut call = call(&g.handler, entry, timeout, span).boxed();
                    match std::future::poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx))).await {
                        Poll::Ready(done) => self.settle(done),
                        Poll::Pending => running.push(call),
                    }
                }
            }
        }
    }

    /// Keeps entries waiting for their key (and held retries) pending on this consumer:
    /// resets their idle time each `claim_interval`, so no reclaim takes them, and records
    /// the deliveries a held retry had (which the in-process retry does not count in Redis).
    fn touch_idle(&mut self, now: Instant) {
        let Some(o) = &mut self.order else { return };
        if now < o.touch_at {
            return;
        }
        o.touch_at = now + self.g.claim_interval.min(self.g.config.claim_idle / 2);
        let entries = o.idle_entries();
        if entries.is_empty() {
            return;
        }
        let client = self.g.client.clone();
        let t = self.target.clone();
        tokio::spawn(async move {
            if let Err(e) = client
                .touch(&t.stream, &t.group, &t.consumer, &entries)
                .await
            {
                tracing::debug!(stream = %t.stream, group = %t.group, error = %e, "could not refresh the idle time of entries waiting for their key; trying again");
            }
        });
    }

    /// Reports an event when a test asked for them; builds nothing otherwise.
    fn emit(&self, event: impl FnOnce() -> LoopEvent) {
        if let Some(events) = &self.g.events {
            // A test that stopped listening does not stop the loop.
            let _ = events.send(event());
        }
    }

    fn concurrency(&self) -> usize {
        self.g.config.concurrency
    }

    /// Unsent settlements at which reading pauses. Handlers still running add at most
    /// `concurrency` more.
    fn max_unsent(&self) -> usize {
        (self.concurrency() * 2)
            .max(self.g.config.batch_size)
            .max(1024)
    }

    /// Slots left for new entries: none while the queue of unsent settlements is full
    /// (Redis is refusing or unreachable), so memory stays bounded.
    fn free(&self, running: usize) -> usize {
        if self.pending.len() + self.flushing_len >= self.max_unsent()
            || self.order.as_ref().is_some_and(order::Order::full)
        {
            return 0;
        }
        // Entries whose key's turn came take their slots before anything new.
        let running = running + self.order.as_ref().map_or(0, order::Order::ready);
        let free = self.concurrency().saturating_sub(running + self.reserved);
        match self.breaker.may_fetch(running) {
            Some(limit) => free.min(limit.saturating_sub(self.reserved)),
            None => free,
        }
    }

    /// Starts whatever can start now.
    fn pump(&mut self, running: usize, now: Instant) {
        if let Some(t) = self.breaker.tick(now) {
            self.on_transition(t);
        }
        if !self.breaker.is_closed() && now >= self.circuit_refresh_at {
            self.report_circuit();
        }
        self.fetch(running, now);
        self.start_flush(now);
    }

    /// When something may change without an event: a timer the loop set itself. A due
    /// reclaim counts only when it could start, or the loop would spin until it can.
    fn next_wakeup(&self, now: Instant, running: usize) -> Instant {
        let mut wake = now + Duration::from_secs(1);
        if !self.draining {
            if self.reader.is_none() && self.connecting.is_none() {
                wake = wake.min(self.connect_at);
            }
            if self.claiming.is_none()
                && self.resync == Resync::Done
                && self.reader.is_some()
                && self.may_claim()
                && self.free(running) > 0
            {
                wake = wake.min(self.claim_at);
            }
        } else {
            if !self.reads.is_empty() {
                wake = wake.min(self.unblock_at);
            }
            if let Some(deadline) = self.g.shutdown.deadline() {
                wake = wake.min(deadline);
            }
        }
        if !self.draining && self.pause_checking.is_none() && self.claiming.is_none() {
            wake = wake.min(self.pause_check_at);
        }
        if self.paused == Some(true) && !self.reads.is_empty() {
            wake = wake.min(self.unblock_at);
        }
        if self.flushing.is_none() && !self.pending.is_empty() {
            wake = wake.min(self.flush_at);
        }
        if let Some(at) = self.breaker.wakeup() {
            wake = wake.min(at);
        }
        if let Some(o) = &self.order
            && !self.draining
        {
            if let Some(at) = o.next_due() {
                wake = wake.min(at);
            }
            if !o.is_empty() {
                wake = wake.min(o.touch_at);
            }
            // Calls that answered on their first poll were settled where they started,
            // after this turn took what its free slots allowed: entries waiting for a
            // slot may start now, not at the next event.
            if o.ready() > 0 && running < self.concurrency() {
                wake = now;
            }
        }
        wake.max(now)
    }

    /// Nothing in flight towards Redis and nothing left to tell it.
    fn quiescent(&self) -> bool {
        self.reads.is_empty()
            && self.claiming.is_none()
            && self.resyncing.is_none()
            && self.connecting.is_none()
            && self.flushing.is_none()
            && self.pending.is_empty()
    }

    fn begin_drain(&mut self, now: Instant) {
        self.draining = true;
        self.unblock_at = now;
        self.report_at = now + Duration::from_secs(5);
        // Reads in progress will be unblocked; their entries are handed back.
        tracing::info!(stream = %self.g.config.stream, group = %self.g.config.name, "stopped reading; finishing in-flight entries");
    }

    fn on_transition(&mut self, transition: Transition) {
        self.emit(|| LoopEvent::Circuit(transition));
        let cfg = &self.g.config;
        match transition {
            Transition::Opened {
                failures,
                window,
                pause,
            } => tracing::warn!(
                stream = %cfg.stream, group = %cfg.name, consumer = %self.g.consumer, failures, window,
                pause_ms = pause.as_millis() as u64,
                "circuit opened: the handler keeps failing; reading paused, then one entry will probe"
            ),
            Transition::HalfOpened => {
                self.probe_claims = false;
                tracing::info!(stream = %cfg.stream, group = %cfg.name, consumer = %self.g.consumer, "circuit half-open: probing with one entry")
            }
            Transition::Reopened { pause } => {
                tracing::warn!(stream = %cfg.stream, group = %cfg.name, consumer = %self.g.consumer, pause_ms = pause.as_millis() as u64, "probe failed; circuit open again")
            }
            Transition::Closed => {
                tracing::info!(stream = %cfg.stream, group = %cfg.name, consumer = %self.g.consumer, "probe succeeded; circuit closed, reading resumed")
            }
        }
        self.g
            .metrics
            .circuit_open
            .set(i64::from(!self.breaker.is_closed()));
        self.report_circuit();
    }

    /// Records this replica's circuit state in Redis for `streamworker status`; refreshed
    /// while not closed, so a replica that died open does not show forever.
    fn report_circuit(&mut self) {
        let client = self.g.client.clone();
        let t = self.target.clone();
        let state = (!self.breaker.is_closed()).then(|| self.breaker.state().name());
        self.circuit_refresh_at = Instant::now() + Duration::from_secs(5);
        tokio::spawn(async move {
            if let Err(e) = client
                .report_circuit(&t.stream, &t.group, &t.consumer, state)
                .await
            {
                tracing::debug!(error = %e, "could not record the circuit state");
            }
        });
    }
}

/// Awaits an optional future; pending forever when there is none.
async fn maybe<T>(slot: &mut Option<BoxFuture<'static, T>>) -> T {
    match slot {
        Some(future) => Pin::new(future).await,
        None => std::future::pending().await,
    }
}
