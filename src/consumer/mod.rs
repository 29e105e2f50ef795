//! One consumer group's loop: read → handle → settle (acknowledge, retry later, or
//! dead-letter). The only caller of `Handler::handle` and the only place that decides an
//! entry's fate.
//!
//! A single task drives everything for its group: up to two pipelined XREADGROUPs, up to
//! `concurrency` handler futures, one reclaim, one settlement flush. There is no task or
//! channel per entry. Entries are only fetched when a handler slot is free for them, so an
//! entry's idle time in Redis is its handler's running time — which `handler_timeout`
//! bounds below `claim_idle`, so no other replica can reclaim an entry that is being
//! handled.

mod settle;

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesOrdered, FuturesUnordered};
use futures_util::{FutureExt, StreamExt};
use streamworker_handlers::{
    Effect, Effects, Entry, EntryId, Handler, HandlerError, Origin, REPLAY_GROUP_FIELD,
};
use tokio::time::{Instant, sleep_until};
use tracing::Instrument;

use settle::{AckKind, Burial, Flushed, Target, park_idle};
pub use settle::{BACKOFF_CONSUMER, DeadLetter, Settlements, dead_letter_fields};

use crate::circuit::{Breaker, GiveBacks, Outcome, Transition};
use crate::client::{Claimed, Client, ClientError, RawEntry, Reader, Release};
use crate::config::GroupConfig;
use crate::health::Heartbeat;
use crate::lease::{Lease, LeaseError};
use crate::metrics::GroupMetrics;
use crate::retry::{self, Fate};
use crate::shutdown::Shutdown;
use crate::telemetry::panic_message;

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

/// Runs the handler's periodic `tick`, on one replica at a time: each turn, the replica
/// that holds (or takes) the group's tick lease runs it. Returns whether the shutdown
/// deadline cut a tick off.
async fn tick<H: Handler>(g: &Group<H>, stop: &tokio_util::sync::CancellationToken) -> bool {
    let Some(every) = g.handler.tick_every() else {
        return false;
    };
    let mut cut = false;
    let cfg = &g.config;
    let key = crate::keys::tick_key(&cfg.stream, &cfg.name);
    // A tick in progress at shutdown may run until the shutdown deadline, then it is
    // dropped: shutdown keeps its deadline whatever the handler's periodic work does.
    let past_deadline = async {
        g.shutdown.triggered().await;
        if let Some(deadline) = g.shutdown.deadline() {
            tokio::time::sleep_until(deadline).await;
        }
    };
    tokio::pin!(past_deadline);
    loop {
        let jitter = every.mul_f64(fastrand::f64() * 0.1);
        tokio::select! {
            _ = tokio::time::sleep(every + jitter) => {}
            _ = stop.cancelled() => break,
            _ = g.shutdown.triggered() => break,
        }
        match g
            .client
            .lease(
                &key,
                &g.lease_token,
                tick_lease_ttl(every, cfg.handler_timeout),
            )
            .await
        {
            Ok(None) => {
                let ticking = tokio::time::timeout(
                    cfg.handler_timeout,
                    AssertUnwindSafe(g.handler.tick()).catch_unwind(),
                );
                let outcome = tokio::select! {
                    outcome = ticking => outcome,
                    _ = &mut past_deadline => {
                        tracing::warn!(stream = %cfg.stream, group = %cfg.name, "the handler's periodic work was cut off at the shutdown deadline");
                        cut = true;
                        break;
                    }
                };
                match outcome {
                    Ok(Ok(Ok(()))) => {}
                    Ok(Ok(Err(e))) => {
                        tracing::warn!(stream = %cfg.stream, group = %cfg.name, error = %e, "the handler's periodic work failed")
                    }
                    Ok(Err(panic)) => {
                        tracing::error!(stream = %cfg.stream, group = %cfg.name, panic = %panic_message(panic.as_ref()), "the handler's periodic work panicked")
                    }
                    Err(_) => {
                        tracing::warn!(stream = %cfg.stream, group = %cfg.name, "the handler's periodic work timed out (handler_timeout)")
                    }
                }
            }
            Ok(Some(_)) => {} // another replica ticks this turn
            Err(e) => {
                tracing::debug!(stream = %cfg.stream, group = %cfg.name, error = %e, "could not take the tick lease")
            }
        }
    }
    // Bounded: with Redis down the lease simply expires.
    let _ = tokio::time::timeout(LAST_WORDS, g.client.release_lease(&key, &g.lease_token)).await;
    cut
}

/// How long the last calls of a stopping group (lease releases, the final settlement
/// after a cut-off) may take: the process exits within `shutdown_timeout` plus a little.
const LAST_WORDS: Duration = Duration::from_millis(500);

/// How long a tick lease lasts: a few turns, so the holder keeps it from turn to turn,
/// and never less than one tick may run (`handler_timeout`) plus a turn, so that a slow
/// tick is not joined by another replica's.
fn tick_lease_ttl(every: Duration, handler_timeout: Duration) -> Duration {
    (every * 3).max(handler_timeout + every * 2)
}

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

/// How often Redis may refuse an entry's settlement before the entry is dead-lettered with
/// the refusal (issue: a forward target of the wrong type retried without end).
const MAX_REFUSALS: u32 = 3;
/// The wait before sending a refused settlement again.
const REFUSAL_RETRY: Duration = Duration::from_millis(250);

fn reconnect_delays() -> impl Iterator<Item = Duration> {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// A handler call's result.
struct Done {
    entry: Entry,
    result: Result<Effects, HandlerError>,
    elapsed: Duration,
    /// The entry's consumer span (`Span::none()` when traces are off); it ends when the
    /// entry's fate is decided.
    span: tracing::Span,
}

/// Runs one handler call under `timeout`, turning a panic or a timeout into a retryable
/// failure so neither takes anything else down.
async fn call<H: Handler>(
    handler: &H,
    entry: Entry,
    timeout: Duration,
    span: tracing::Span,
) -> Done {
    let started = std::time::Instant::now();
    let outcome = tokio::time::timeout(
        timeout,
        AssertUnwindSafe(handler.handle(&entry).instrument(span.clone())).catch_unwind(),
    )
    .await;
    let result = match outcome {
        Ok(Ok(result)) => result,
        Ok(Err(panic)) => Err(panicked(panic.as_ref())),
        Err(_) => Err(timed_out(timeout)),
    };
    Done {
        entry,
        result,
        elapsed: started.elapsed(),
        span,
    }
}

/// Runs one batch under `timeout` (the whole batch): a panic, a timeout or a wrong number
/// of results fails every entry of the batch, retryably.
async fn call_batch<H: Handler>(
    handler: &H,
    batch: Vec<(Entry, tracing::Span)>,
    timeout: Duration,
) -> Vec<Done> {
    let (entries, spans): (Vec<Entry>, Vec<tracing::Span>) = batch.into_iter().unzip();
    let started = std::time::Instant::now();
    let outcome = tokio::time::timeout(
        timeout,
        AssertUnwindSafe(handler.handle_batch(&entries)).catch_unwind(),
    )
    .await;
    let elapsed = started.elapsed();
    let results = match outcome {
        Ok(Ok(results)) if results.len() == entries.len() => results,
        Ok(Ok(results)) => {
            let e = HandlerError::retry(format!(
                "handler returned {} results for a batch of {}",
                results.len(),
                entries.len()
            ));
            vec![Err(e); entries.len()]
        }
        Ok(Err(panic)) => vec![Err(panicked(panic.as_ref())); entries.len()],
        Err(_) => vec![Err(timed_out(timeout)); entries.len()],
    };
    entries
        .into_iter()
        .zip(results)
        .zip(spans)
        .map(|((entry, result), span)| Done {
            entry,
            result,
            elapsed,
            span,
        })
        .collect()
}

fn panicked(panic: &(dyn std::any::Any + Send)) -> HandlerError {
    HandlerError::retry(format!("handler panicked: {}", panic_message(panic)))
}

fn timed_out(timeout: Duration) -> HandlerError {
    HandlerError::retry(format!(
        "handler timed out after {}",
        streamworker_handlers::duration::format(timeout)
    ))
}

type Read = BoxFuture<'static, (usize, crate::client::Result<Vec<RawEntry>>)>;

/// Re-reading this consumer's own pending entries, at startup and after a reconnect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resync {
    /// Waiting until nothing is in flight here, so every own pending entry is one this
    /// process has lost track of.
    Needed,
    /// Paging through the pending list; `after` is the last id re-delivered.
    Paging {
        after: Option<EntryId>,
    },
    Done,
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
}

impl<'g, H: Handler> Loop<'g, H> {
    fn new(g: &'g Group<H>) -> Self {
        let cfg = &g.config;
        let now = Instant::now();
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
            claiming: None,
            claim_cursor: EntryId::ZERO,
            claim_at: now,
            claim_woke_reader: false,
            resync: Resync::Needed,
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
            resync_counts: true,
            circuit_refresh_at: now,
            buffer: Vec::new(),
            buffer_since: None,
            batched: 0,
            paused: None,
            pause_checking: None,
            pause_check_at: now,
        }
    }

    async fn run(mut self, lease: &Lease) -> Result<GroupExit, GroupError> {
        let g = self.g;
        let timeout = g.config.handler_timeout;
        let batching = g.handler.batching();
        // Single entries and batches run side by side as futures of this task; a group
        // uses one or the other, depending on its handler.
        let mut running = FuturesUnordered::new();
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
            for raw in admitted {
                if let Some((entry, span)) = self.admit(raw) {
                    self.breaker.started(entry.id);
                    if batching.is_some() {
                        if self.buffer.is_empty() {
                            self.buffer_since = Some(Instant::now());
                        }
                        self.buffer.push((entry, span));
                    } else {
                        running.push(call(&g.handler, entry, timeout, span));
                    }
                }
            }
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
        if self.pending.len() + self.flushing_len >= self.max_unsent() {
            return 0;
        }
        let free = self.concurrency().saturating_sub(running + self.reserved);
        match self.breaker.may_fetch(running) {
            Some(limit) => free.min(limit.saturating_sub(self.reserved)),
            None => free,
        }
    }

    /// Starts whatever can start now.
    fn pump(&mut self, running: usize, now: Instant) {
        let cfg = &self.g.config;
        if let Some(t) = self.breaker.tick(now) {
            self.on_transition(t);
        }
        if !self.breaker.is_closed() && now >= self.circuit_refresh_at {
            self.report_circuit();
        }
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
                    let (min_idle, cursor) = (cfg.claim_idle, self.claim_cursor);
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
                } else {
                    let start_read = match self.reads.len() {
                        0 => roomy(free),
                        1 => self.backlog && free >= want,
                        _ => false,
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
        if self.flushing.is_none() && !self.pending.is_empty() && now >= self.flush_at {
            let batch = std::mem::take(&mut self.pending);
            self.requeued.clear();
            self.flushing_len = batch.len();
            self.flushing = Some(Box::pin(settle::flush(
                self.g.client.clone(),
                self.target.clone(),
                batch,
            )));
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
    fn may_claim(&self) -> bool {
        self.breaker.is_closed() || self.probe_claims
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

    /// The deadline passed: leave the running handlers' entries pending (others reclaim
    /// them after `claim_idle`) and make one last attempt to settle what is decided.
    async fn cut_off(mut self, abandoned: usize) -> GroupExit {
        // One budget for both attempts, so the process exits within shutdown_timeout + 2 s.
        let until = Instant::now() + LAST_WORDS * 2;
        if let Some(flushing) = self.flushing.take() {
            let flushed = tokio::time::timeout_at(until, flushing).await;
            if let Ok(flushed) = flushed {
                self.on_flush(flushed);
            }
        }
        let mut unsettled = self.pending.len();
        if !self.pending.is_empty() {
            let batch = std::mem::take(&mut self.pending);
            let flush = settle::flush(self.g.client.clone(), self.target.clone(), batch);
            if let Ok(mut flushed) = tokio::time::timeout_at(until, flush).await {
                let mut rest = Settlements::default();
                flushed.requeue_into(&mut rest);
                unsettled = rest.len();
                self.on_flush(flushed);
            }
        }
        tracing::warn!(
            stream = %self.g.config.stream, group = %self.g.config.name,
            abandoned, unsettled,
            "shutdown deadline reached: cut off in-flight handlers; their entries stay pending for other replicas"
        );
        GroupExit::CutOff {
            abandoned,
            unsettled,
        }
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

    fn on_connect(&mut self, result: crate::client::Result<Reader>) -> Result<(), GroupError> {
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

    fn on_read(
        &mut self,
        count: usize,
        result: crate::client::Result<Vec<RawEntry>>,
    ) -> Result<Vec<RawEntry>, GroupError> {
        self.reserved -= count;
        match result {
            Ok(entries) => {
                self.backlog = entries.len() == count;
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

    fn on_claim(
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
                self.claim_at = if more {
                    now
                } else {
                    now + self.g.claim_interval
                };
                self.note_deleted(&claimed.deleted, "reclaim");
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

    fn on_resync(
        &mut self,
        count: usize,
        result: crate::client::Result<Claimed>,
    ) -> Result<Vec<RawEntry>, GroupError> {
        self.reserved -= count;
        match result {
            Ok(page) => {
                self.note_deleted(&page.deleted, "own pending re-read");
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

    /// Entries deleted or trimmed while pending: Redis already dropped them from the
    /// pending list; count and log them so nobody waits for them.
    fn note_deleted(&self, deleted: &[EntryId], during: &'static str) {
        if deleted.is_empty() {
            return;
        }
        self.g.metrics.deleted.inc_by(deleted.len() as u64);
        tracing::warn!(
            stream = %self.g.config.stream, group = %self.g.config.name, consumer = %self.g.consumer,
            count = deleted.len(), first_id = %deleted[0], during,
            "entries were deleted or trimmed from the stream while pending; acknowledged without handling"
        );
    }

    /// A new decision about `id` replaces one put back after a failed send (the entry was
    /// reclaimed and handled again meanwhile), so the queue never holds an entry twice.
    /// Costs a lookup in an empty set unless sends are failing.
    fn supersede(&mut self, id: EntryId) {
        if !self.requeued.is_empty() && self.requeued.remove(&id) {
            self.pending.retain(|queued| queued != id);
        }
    }

    /// Decodes an entry for a handler, or decides its fate at once: handed back when
    /// shutting down, dead-lettered when its payload cannot be decoded.
    /// Fetched but never started: give the delivery back and make the entry reclaimable
    /// at the next claim_interval of any replica.
    fn hand_back(&mut self, id: EntryId, delivery_count: u64) {
        self.supersede(id);
        self.pending.hand_backs.push(Release {
            id,
            idle: self.g.config.claim_idle,
            delivery_count: Some(delivery_count.saturating_sub(1)),
        });
    }

    fn admit(&mut self, raw: RawEntry) -> Option<(Entry, tracing::Span)> {
        let cfg = &self.g.config;
        if self.draining {
            self.hand_back(raw.id, raw.delivery_count);
            return None;
        }
        let mut entry = Entry::new(
            Arc::clone(&self.origin),
            raw.id,
            raw.delivery_count,
            raw.fields,
        );
        let span = if crate::telemetry::traces_on() {
            let (span, traceparent) = crate::telemetry::entry_span(
                &cfg.stream,
                &cfg.name,
                &self.g.consumer,
                &entry.id,
                entry.delivery_count,
                &entry.fields,
            );
            entry.traceparent = traceparent;
            span
        } else {
            tracing::Span::none()
        };
        // A dead letter replayed to the stream is meant for one group; the others
        // acknowledge it without calling their handler. `dlq replay` appends its fields
        // last, so only entries whose last field is a `dlq_` one need a look.
        if entry
            .fields
            .last()
            .is_some_and(|(name, _)| crate::dead_letter::is_own_field(name))
            && let Some(target) = entry.field(REPLAY_GROUP_FIELD)
            && target != cfg.name.as_bytes()
        {
            let reason = format!(
                "a replay meant for group {}",
                String::from_utf8_lossy(target)
            );
            self.settle(Done {
                entry,
                result: Err(HandlerError::Drop(reason)),
                elapsed: Duration::ZERO,
                span,
            });
            return None;
        }
        match entry.decode(&cfg.payload) {
            Ok(()) => Some((entry, span)),
            Err(error) => {
                self.settle(Done {
                    entry,
                    result: Err(error),
                    elapsed: Duration::ZERO,
                    span,
                });
                None
            }
        }
    }

    /// Decides a finished entry's fate (the retry policy) and queues it for the next flush.
    fn settle(&mut self, done: Done) {
        let Done {
            entry,
            result,
            elapsed,
            span,
        } = done;
        self.supersede(entry.id);
        let cfg = Arc::clone(&self.g.config);
        if !elapsed.is_zero() {
            self.g
                .metrics
                .handler_seconds
                .observe(elapsed.as_secs_f64());
        }
        let failed = matches!(result, Err(HandlerError::Retry(_)));
        let outcome = if failed {
            Outcome::Failed {
                first_delivery: entry.delivery_count <= 1,
            }
        } else {
            Outcome::Answered
        };
        let circuit_was_closed = self.breaker.is_closed();
        if let Some(t) = self.breaker.record(entry.id, outcome, Instant::now()) {
            self.on_transition(t);
        }
        if failed && !circuit_was_closed && self.give_backs.take(entry.id, cfg.max_deliveries) {
            // The circuit had already opened: the downstream is down, not this entry.
            // Give the delivery back so an outage cannot use up its attempts — a bounded
            // number of times, so an entry that fails only while the circuit is open (a
            // probe, again and again) still reaches its dead letter.
            let after = retry::delay(&cfg.retry_backoff, entry.delivery_count, fastrand::f64());
            tracing::debug!(stream = %cfg.stream, group = %cfg.name, consumer = %self.g.consumer, id = %entry.id, delivery_count = entry.delivery_count, "failed while the circuit is open; the attempt is given back");
            if let Err(e) = &result {
                crate::telemetry::finish_span(&span, "retried", Some(e.reason()));
            }
            // Never below 1: reclaimed, the entry then counts at least 2, so it is never
            // taken for a first delivery. Otherwise poison given back while the circuit was
            // open would come back looking fresh, bunched, and open the circuit again (seen
            // in the fault matrix's Redis restart without persistence). An outage so costs
            // an entry at most one attempt.
            self.pending.parks.push(Release {
                id: entry.id,
                idle: park_idle(cfg.claim_idle, after),
                delivery_count: Some(entry.delivery_count.saturating_sub(1).max(1)),
            });
            return;
        }
        self.give_backs.forget(entry.id);
        let (result, effects) = match result {
            Ok(effects) => (Ok(()), effects),
            Err(e) => (Err(e), Effects::new()),
        };
        let fate = retry::decide(
            result,
            entry.delivery_count,
            cfg.max_deliveries,
            &cfg.retry_backoff,
            fastrand::f64(),
        );
        if !span.is_none() {
            let (outcome, error) = match &fate {
                Fate::Ack => ("acked", None),
                Fate::Drop { .. } => ("dropped", None),
                Fate::Retry { reason, .. } => ("retried", Some(reason.as_str())),
                Fate::DeadLetter { reason } => ("dead_lettered", Some(reason.as_str())),
            };
            crate::telemetry::finish_span(&span, outcome, error);
        }
        match fate {
            Fate::Ack if effects.is_empty() => self.pending.acks.push((entry.id, AckKind::Acked)),
            Fate::Ack => {
                let kind = if effects
                    .iter()
                    .any(|e| matches!(e, Effect::StreamAdd { .. }))
                {
                    AckKind::Forwarded
                } else {
                    AckKind::Acked
                };
                self.pending.effectful.push((entry.id, kind, effects));
            }

            Fate::Drop { reason } => {
                tracing::debug!(stream = %cfg.stream, group = %cfg.name, consumer = %self.g.consumer, id = %entry.id, delivery_count = entry.delivery_count, reason = %reason, "handler dropped the entry");
                self.pending.acks.push((entry.id, AckKind::Dropped));
            }
            Fate::Retry { after, reason } => {
                tracing::warn!(
                    stream = %cfg.stream, group = %cfg.name, consumer = %self.g.consumer, id = %entry.id,
                    delivery_count = entry.delivery_count, max_deliveries = cfg.max_deliveries,
                    retry_in_ms = after.as_millis() as u64, error = %reason,
                    "handler failed; the entry will be retried"
                );
                self.pending.parks.push(Release {
                    id: entry.id,
                    idle: park_idle(cfg.claim_idle, after),
                    delivery_count: None,
                });
            }
            Fate::DeadLetter { reason } => {
                self.pending.dead_letters.push(DeadLetter {
                    id: entry.id,
                    delivery_count: entry.delivery_count,
                    fields: entry.fields,
                    error: reason,
                });
            }
        }
    }

    fn on_transition(&mut self, transition: Transition) {
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

    /// Acts on what the pause key says: stop fetching (in-flight entries finish) or start
    /// again at once.
    fn set_paused(&mut self, paused: bool) {
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

    /// Acts on what a flush achieved: metrics and logs, and what to send again.
    fn on_flush(&mut self, mut flushed: Flushed) {
        self.flushing_len = 0;
        let cfg = &self.g.config;
        let metrics = &self.g.metrics;
        let now = SystemTime::now();
        for (id, kind) in &flushed.acked {
            match kind {
                AckKind::Acked => metrics.acked.inc(),
                AckKind::Dropped => metrics.dropped.inc(),
                AckKind::Forwarded => metrics.forwarded.inc(),
            };
            metrics
                .end_to_end_seconds
                .observe(id.age(now).as_secs_f64());
        }
        for id in &flushed.already_acked {
            tracing::debug!(stream = %cfg.stream, group = %cfg.name, id = %id, "already acknowledged by another consumer; its effects were not applied twice");
        }

        metrics.retried.inc_by(flushed.parked as u64);
        self.note_deleted(&flushed.deleted, "settlement");
        if flushed.handed_back > 0 {
            tracing::info!(stream = %cfg.stream, group = %cfg.name, count = flushed.handed_back, "handed back entries fetched but never started");
        }
        for (dead, dead_id) in &flushed.dead_lettered {
            metrics.dead_lettered.inc();
            tracing::error!(
                stream = %cfg.stream, group = %cfg.name, consumer = %self.g.consumer, id = %dead.id,
                delivery_count = dead.delivery_count, error = %dead.error,
                dead_letter_stream = %self.target.dead_letter_stream, dead_letter_id = %dead_id,
                "entry dead-lettered"
            );
        }
        for (id, delivery_count) in &flushed.not_ours {
            tracing::warn!(stream = %cfg.stream, group = %cfg.name, consumer = %self.g.consumer, id = %id, delivery_count, "not dead-lettered: another consumer owns the entry now and will decide");
        }

        for (id, error) in &flushed.dead_letter_refused {
            metrics.redis_error(error.kind());
            metrics.dead_letter_refused.inc();
            tracing::error!(stream = %cfg.stream, group = %cfg.name, consumer = %self.g.consumer, id = %id, dead_letter_stream = %self.target.dead_letter_stream, error = %error, "Redis refused the dead letter; the entry stays pending and will be retried after claim_idle");
        }
        if flushed.group_gone {
            // Redis lost the group (a restart without persistence, XGROUP DESTROY): the
            // entries these settlements were for are no longer pending anywhere, so
            // sending them again would fail forever. Drop them, recreate the group.
            metrics.redis_error("nogroup");
            metrics.deleted.inc_by(flushed.gone as u64);
            tracing::warn!(
                stream = %cfg.stream, group = %cfg.name, dropped = flushed.gone,
                "the consumer group is gone (NOGROUP): dropped the settlements of entries Redis no longer has; recreating the group"
            );
            self.reader = None;
            self.recreate = true;
            self.claim_cursor = EntryId::ZERO;
        }
        let refused = !flushed.refused.is_empty();
        if refused {
            // Not an outage: Redis answered with an error (WRONGTYPE, OOM, a script error).
            // Sent again a few times (the cause may pass, e.g. memory freed), then the
            // entry is dead-lettered with the refusal, to be replayed once it is fixed.
            let mut batch = std::mem::take(&mut flushed.refused);
            let refusals = &mut self.refusals;
            let give_up = batch.give_up(|id| {
                let n = refusals.entry(id).or_insert(0);
                *n += 1;
                *n >= MAX_REFUSALS
            });
            tracing::error!(
                stream = %cfg.stream, group = %cfg.name, consumer = %self.g.consumer,
                refused = batch.len() + give_up.len(), dead_lettering = give_up.len(),
                error = flushed.refusals.values().next().map(String::as_str).unwrap_or_default(),
                "Redis refused to settle entries; sending again, and dead-lettering those refused {MAX_REFUSALS} times"
            );
            for id in give_up {
                self.refusals.remove(&id);
                let error = flushed
                    .refusals
                    .remove(&id)
                    .unwrap_or_else(|| "Redis refused the settlement".into());
                self.pending.burials.push(Burial {
                    id,
                    error: format!(
                        "Redis refused to settle the entry {MAX_REFUSALS} times: {error}"
                    ),
                });
            }
            self.requeued.extend(batch.ids());
            self.pending.absorb(batch);
        }
        let retry = !flushed.retry.is_empty();
        if let Some(error) = flushed.error.take() {
            metrics.redis_error(error.kind());
            if retry && !self.outage_logged {
                tracing::warn!(stream = %cfg.stream, group = %cfg.name, error = %error, pending = flushed.retry.len(), "could not settle entries; will send again when Redis is back");
            }
        }
        if retry {
            self.requeued.extend(flushed.retry.ids());
        }
        flushed.requeue_into(&mut self.pending);
        if !refused && self.pending.is_empty() {
            // Nothing refused is waiting any more.
            self.refusals.clear();
        }
        if !retry && !refused {
            self.g.heartbeat.progress();
        }
        self.flush_at = if retry {
            // An outage: back off, growing.
            Instant::now() + self.flush_delays.next().unwrap_or(Duration::from_secs(5))
        } else if refused {
            // Redis answered: a refusal is cheap to try again, and waiting long would let
            // claim_idle pass and another replica take the entry.
            Instant::now() + REFUSAL_RETRY
        } else {
            self.flush_delays = Box::new(reconnect_delays());
            Instant::now()
        };
    }
}

/// Awaits an optional future; pending forever when there is none.
async fn maybe<T>(slot: &mut Option<BoxFuture<'static, T>>) -> T {
    match slot {
        Some(future) => Pin::new(future).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::tick_lease_ttl;
    use std::time::Duration;

    #[test]
    fn a_tick_lease_outlives_the_longest_tick() {
        let s = Duration::from_secs;
        // A slow tick (up to handler_timeout) keeps its lease past its end.
        assert!(tick_lease_ttl(s(1), s(30)) > s(30) + s(1));
        // A fast handler still holds the lease for a few turns.
        assert_eq!(tick_lease_ttl(s(10), s(1)), s(30));
    }
}
