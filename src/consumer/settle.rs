//! Booking results: what the loop has decided about entries (`Loop::settle`, from
//! [`fate::decide`]), the queue of settlements not yet told Redis, the flush that sends
//! them, and what a flush's outcome means (`Loop::on_flush`).
//!
//! Decisions accumulate while one flush is in flight and go out together in the next one,
//! so acknowledgements batch themselves under load (hundreds per XACK) and leave at once
//! when the group is quiet. What a flush could not send is sorted by why:
//!
//! - **Redis unreachable**: put back and sent after the outage, as often as it takes.
//! - **The group is gone** (NOGROUP: Redis lost its data, or someone destroyed the group):
//!   the entries no longer exist as far as the group knows; the settlements are dropped
//!   with a count and the loop recreates the group.
//! - **Refused** (WRONGTYPE, OOM, a script error): put back a bounded number of times by
//!   the loop, then the entry is dead-lettered with the refusal as its error.
//!
//! Nothing is acknowledged that was not handled, dropped or dead-lettered.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::future::join_all;
use streamworker_handlers::{Effect, Effects, EntryId, Handler, HandlerError, one_line};
use tokio::time::Instant;

use super::fate::{self, Fate};
use super::run::Done;
use super::{GroupExit, LAST_WORDS, Loop, LoopEvent, reconnect_delays};
use crate::circuit::Outcome;
use crate::client::{Client, ClientError, Release};
use crate::dead_letter;

pub use crate::keys::BACKOFF_CONSUMER;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckKind {
    Acked,
    Dropped,
    /// Acknowledged with a copy added to another stream (the `forward` handler).
    Forwarded,
}

/// An entry on its way to the dead-letter stream.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub id: EntryId,
    pub delivery_count: u64,
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
    pub error: String,
}

#[derive(Debug, Default)]
pub struct Settlements {
    pub acks: Vec<(EntryId, AckKind)>,
    /// Acknowledgements that carry effects, applied in the same script.
    pub effectful: Vec<(EntryId, AckKind, Effects)>,
    /// Failed entries to park with the backoff consumer.
    pub parks: Vec<Release>,
    /// Entries fetched but never started, given back at shutdown.
    pub hand_backs: Vec<Release>,
    pub dead_letters: Vec<DeadLetter>,
    /// Entries whose settlement Redis kept refusing: dead-lettered from what the stream
    /// holds (the loop no longer has their fields).
    pub burials: Vec<Burial>,
}

/// An entry to dead-letter by id; see [`Settlements::burials`].
#[derive(Debug, Clone)]
pub struct Burial {
    pub id: EntryId,
    pub error: String,
}

impl Settlements {
    pub fn is_empty(&self) -> bool {
        self.acks.is_empty()
            && self.effectful.is_empty()
            && self.parks.is_empty()
            && self.hand_backs.is_empty()
            && self.dead_letters.is_empty()
            && self.burials.is_empty()
    }

    pub fn len(&self) -> usize {
        self.acks.len()
            + self.effectful.len()
            + self.parks.len()
            + self.hand_backs.len()
            + self.dead_letters.len()
            + self.burials.len()
    }

    /// Every entry something is decided for.
    pub fn ids(&self) -> HashSet<EntryId> {
        let mut ids = HashSet::with_capacity(self.len());
        ids.extend(self.acks.iter().map(|(id, _)| *id));
        ids.extend(self.effectful.iter().map(|(id, _, _)| *id));
        ids.extend(self.parks.iter().map(|r| r.id));
        ids.extend(self.hand_backs.iter().map(|r| r.id));
        ids.extend(self.dead_letters.iter().map(|d| d.id));
        ids.extend(self.burials.iter().map(|b| b.id));
        ids
    }

    /// Keeps only the settlements `keep` says yes to.
    pub fn retain(&mut self, mut keep: impl FnMut(EntryId) -> bool) {
        self.acks.retain(|(id, _)| keep(*id));
        self.effectful.retain(|(id, _, _)| keep(*id));
        self.parks.retain(|r| keep(r.id));
        self.hand_backs.retain(|r| keep(r.id));
        self.dead_letters.retain(|d| keep(d.id));
        self.burials.retain(|b| keep(b.id));
    }

    /// Adds `older` (settlements sent before and put back) to these, newer, ones. An entry
    /// decided twice (reclaimed and handled again while its first settlement waited) keeps
    /// only its newer decision, so the queue never holds an entry twice.
    pub fn absorb(&mut self, mut older: Settlements) {
        if older.is_empty() {
            return;
        }
        if !self.is_empty() {
            let newer = self.ids();
            older.retain(|id| !newer.contains(&id));
        }
        self.acks.extend(older.acks);
        self.effectful.extend(older.effectful);
        self.parks.extend(older.parks);
        self.hand_backs.extend(older.hand_backs);
        self.dead_letters.extend(older.dead_letters);
        self.burials.extend(older.burials);
    }

    /// Removes and returns the ids `give_up` picks.
    pub fn give_up(&mut self, mut give_up: impl FnMut(EntryId) -> bool) -> Vec<EntryId> {
        let mut gone = Vec::new();
        self.retain(|id| {
            let drop = give_up(id);
            if drop {
                gone.push(id);
            }
            !drop
        });
        gone
    }
}

/// Names a flush needs; cloned once per flush, not per entry.
#[derive(Debug, Clone)]
pub struct Target {
    pub stream: String,
    pub group: String,
    pub consumer: String,
    pub dead_letter_stream: String,
}

/// What a flush achieved.
#[derive(Debug, Default)]
pub struct Flushed {
    pub acked: Vec<(EntryId, AckKind)>,
    /// Acknowledged by another consumer first: their effects were not applied again.
    pub already_acked: Vec<EntryId>,
    pub parked: usize,
    pub handed_back: usize,
    /// Entries found deleted or trimmed from the stream while being parked or handed
    /// back: no longer pending, never to be handled.
    pub deleted: Vec<EntryId>,
    /// Entries moved: the dead letter as sent, and its id in the dead-letter stream.
    pub dead_lettered: Vec<(DeadLetter, String)>,
    /// Dead letters skipped because another consumer owns the entry now.
    pub not_ours: Vec<(EntryId, u64)>,
    /// What must be sent again (Redis unreachable).
    pub retry: Settlements,
    /// The first error, for the log.
    pub error: Option<ClientError>,
    /// Settlements Redis refused (not an outage, not a missing group), with each entry's
    /// refusal: the loop sends them again a bounded number of times, then buries them.
    pub refused: Settlements,
    pub refusals: HashMap<EntryId, String>,
    /// Settlements dropped because the group (or its stream) no longer exists in Redis.
    pub gone: usize,
    /// Redis answered NOGROUP: the group must be recreated.
    pub group_gone: bool,
    /// Dead letters Redis refused (e.g. the dead-letter key has the wrong type, OOM): the
    /// entries stay pending and will be reclaimed.
    pub dead_letter_refused: Vec<(EntryId, ClientError)>,
}

/// Why a command of a flush failed, which decides what becomes of its settlements.
enum Failure {
    Outage(ClientError),
    Gone,
    Refused(ClientError),
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Unavailable(_) => Self::Outage(e),
            ClientError::NoGroup(_) => Self::Gone,
            other => Self::Refused(other),
        }
    }
}

impl Flushed {
    /// Files `batch` (one command's worth, which failed) by why it failed.
    fn failed(&mut self, error: ClientError, batch: Settlements) {
        let n = batch.len();
        match Failure::from(error) {
            Failure::Outage(e) => {
                self.retry.absorb(batch);
                self.note(e);
            }
            Failure::Gone => {
                self.gone += n;
                self.group_gone = true;
            }
            Failure::Refused(e) => {
                let reason = one_line(e.to_string());
                for id in batch.ids() {
                    self.refusals.entry(id).or_insert_with(|| reason.clone());
                }
                self.refused.absorb(batch);
                self.note(e);
            }
        }
    }

    fn note(&mut self, e: ClientError) {
        if self.error.is_none() {
            self.error = Some(e);
        }
    }
}

/// Sends everything in `batch` at once: one XACK, one release script per target, one
/// dead-letter script per entry, all pipelined on the shared connection.
pub async fn flush(client: Client, target: Target, batch: Settlements) -> Flushed {
    let Settlements {
        acks,
        effectful,
        parks,
        hand_backs,
        mut dead_letters,
        burials,
    } = batch;
    let mut out = Flushed::default();
    // Entries to bury by id: read what the stream holds of them first (rare: only after
    // Redis refused their settlement again and again).
    for burial in burials {
        match client
            .pending_entry(&target.stream, &target.group, burial.id)
            .await
        {
            Ok(Some(entry)) => dead_letters.push(DeadLetter {
                id: entry.id,
                delivery_count: entry.delivery_count,
                fields: entry.fields,
                error: burial.error,
            }),
            // Acknowledged meanwhile, or deleted from the stream: nothing left to bury.
            Ok(None) => out.deleted.push(burial.id),
            Err(e) => out.failed(
                e,
                Settlements {
                    burials: vec![burial],
                    ..Settlements::default()
                },
            ),
        }
    }
    let applying = async {
        if effectful.is_empty() {
            Ok(Default::default())
        } else {
            let entries: Vec<(EntryId, &[Effect])> = effectful
                .iter()
                .map(|(id, _, e)| (*id, e.as_slice()))
                .collect();
            client
                .ack_with_effects(&target.stream, &target.group, &entries)
                .await
        }
    };
    let ack_ids: Vec<EntryId> = acks.iter().map(|(id, _)| *id).collect();
    let acking = async {
        if ack_ids.is_empty() {
            Ok(0)
        } else {
            client.ack(&target.stream, &target.group, &ack_ids).await
        }
    };
    let parking = async {
        if parks.is_empty() {
            Ok((0, Vec::new()))
        } else {
            client
                .release(
                    &target.stream,
                    &target.group,
                    &target.consumer,
                    BACKOFF_CONSUMER,
                    &parks,
                )
                .await
        }
    };
    let handing_back = async {
        if hand_backs.is_empty() {
            Ok((0, Vec::new()))
        } else {
            client
                .release(
                    &target.stream,
                    &target.group,
                    &target.consumer,
                    &target.consumer,
                    &hand_backs,
                )
                .await
        }
    };
    let failed_at = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
    let burying = join_all(dead_letters.iter().map(|d| {
        let fields = dead_letter_fields(d, &target, &failed_at);
        let client = client.clone();
        let target = &target;
        async move {
            let borrowed: Vec<(&[u8], &[u8])> = fields
                .iter()
                .map(|(k, v)| (k.as_slice(), v.as_slice()))
                .collect();
            client
                .dead_letter(
                    &target.stream,
                    &target.dead_letter_stream,
                    &target.group,
                    &target.consumer,
                    d.id,
                    &borrowed,
                )
                .await
        }
    }));
    let (acked, applied, parked, handed_back, buried) =
        tokio::join!(acking, applying, parking, handing_back, burying);

    match acked {
        Ok(_) => out.acked = acks,
        Err(e) => out.failed(
            e,
            Settlements {
                acks,
                ..Settlements::default()
            },
        ),
    }
    match applied {
        Ok(applied) => {
            let crate::client::Applied { skipped, refused } = applied;
            let mut refused_effectful = Vec::new();
            for (id, kind, effects) in effectful {
                if let Some(reason) = refused.iter().find(|(r, _)| *r == id).map(|(_, e)| e) {
                    out.refusals.insert(id, reason.clone());
                    refused_effectful.push((id, kind, effects));
                } else if !skipped.contains(&id) {
                    // An entry another consumer acknowledged first was counted there;
                    // its effects were not applied here, so it is not counted again.
                    out.acked.push((id, kind));
                }
            }
            if !refused_effectful.is_empty() {
                out.refused.effectful.extend(refused_effectful);
            }
            out.already_acked = skipped;
        }
        Err(e) => out.failed(
            e,
            Settlements {
                effectful,
                ..Settlements::default()
            },
        ),
    }
    match parked {
        Ok((n, deleted)) => {
            out.parked = n as usize;
            out.deleted.extend(deleted);
        }
        Err(e) => out.failed(
            e,
            Settlements {
                parks,
                ..Settlements::default()
            },
        ),
    }
    match handed_back {
        Ok((n, deleted)) => {
            out.handed_back = n as usize;
            out.deleted.extend(deleted);
        }
        Err(e) => out.failed(
            e,
            Settlements {
                hand_backs,
                ..Settlements::default()
            },
        ),
    }
    for (d, result) in dead_letters.into_iter().zip(buried) {
        match result {
            Ok(Some(dead_id)) => out.dead_lettered.push((d, dead_id)),
            Ok(None) => out.not_ours.push((d.id, d.delivery_count)),
            Err(e) => match Failure::from(e) {
                Failure::Outage(e) => {
                    out.retry.dead_letters.push(d);
                    out.note(e);
                }
                Failure::Gone => {
                    out.gone += 1;
                    out.group_gone = true;
                }
                // Refused for good: the entry stays pending; the loop logs it.
                Failure::Refused(e) => out.dead_letter_refused.push((d.id, e)),
            },
        }
    }
    out
}

impl Flushed {
    /// Puts back what must be sent again.
    pub fn requeue_into(&mut self, pending: &mut Settlements) {
        pending.absorb(std::mem::take(&mut self.retry));
    }
}

/// The dead letter: the original fields, then every `dlq_*` field of DESIGN §3
/// (named by `crate::dead_letter`).
pub fn dead_letter_fields(
    d: &DeadLetter,
    target: &Target,
    failed_at: &str,
) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut fields = Vec::with_capacity(d.fields.len() + dead_letter::FIELDS.len());
    fields.extend(d.fields.iter().cloned());
    let mut add =
        |name: &str, value: String| fields.push((name.as_bytes().to_vec(), value.into_bytes()));
    add(dead_letter::ORIGIN_STREAM, target.stream.clone());
    add(dead_letter::ORIGIN_ID, d.id.to_string());
    add(dead_letter::GROUP, target.group.clone());
    add(dead_letter::DELIVERIES, d.delivery_count.to_string());
    add(dead_letter::ERROR, one_line(&d.error));
    add(dead_letter::FAILED_AT, failed_at.to_owned());
    add(dead_letter::CONSUMER, target.consumer.clone());
    fields
}

/// How often Redis may refuse an entry's settlement before the entry is dead-lettered with
/// the refusal (issue: a forward target of the wrong type retried without end).
const MAX_REFUSALS: u32 = 3;

/// The wait before sending a refused settlement again.
const REFUSAL_RETRY: Duration = Duration::from_millis(250);

impl<H: Handler> Loop<'_, H> {
    /// Sends what is decided, when no flush is in flight and the backoff after a failed
    /// one has passed.
    pub(super) fn start_flush(&mut self, now: Instant) {
        if self.flushing.is_none() && !self.pending.is_empty() && now >= self.flush_at {
            let batch = std::mem::take(&mut self.pending);
            self.requeued.clear();
            self.flushing_len = batch.len();
            self.flushing = Some(Box::pin(flush(
                self.g.client.clone(),
                self.target.clone(),
                batch,
            )));
        }
    }

    /// Books a finished entry: feeds the circuit breaker, asks [`fate::decide`] what
    /// becomes of the entry, and queues that for the next flush.
    pub(super) fn settle(&mut self, done: Done) {
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
        let outcome = if matches!(result, Err(HandlerError::Retry(_))) {
            Outcome::Failed {
                first_delivery: entry.delivery_count <= 1,
            }
        } else {
            Outcome::Answered
        };
        // The fate depends on the circuit as it was when the result came in: the failure
        // that opens the circuit is the entry's own, like the failures before it.
        let circuit = self.breaker.state();
        if let Some(t) = self.breaker.record(entry.id, outcome, Instant::now) {
            self.on_transition(t);
        }
        let (result, effects) = match result {
            Ok(effects) => (Ok(()), effects),
            Err(e) => (Err(e), Effects::new()),
        };
        let fate = fate::decide(
            result,
            entry.delivery_count,
            circuit,
            self.give_backs.given(entry.id),
            &self.policy,
            fastrand::f64(),
        );
        if matches!(fate, Fate::GiveBack { .. }) {
            self.give_backs.record(entry.id);
        } else {
            self.give_backs.forget(entry.id);
        }
        if !span.is_none() {
            crate::telemetry::finish_span(&span, fate.outcome(), fate.error());
        }
        self.emit(|| LoopEvent::Settled {
            id: entry.id,
            delivery_count: entry.delivery_count,
            fate: fate.clone(),
        });
        if let Some(order) = &mut self.order {
            match &fate {
                Fate::Park { after, reason, .. } | Fate::GiveBack { after, reason, .. } => {
                    // An ordered entry's retry stays here, its key busy: parked in Redis,
                    // a reclaim could run it after later entries of its key.
                    tracing::warn!(
                        stream = %cfg.stream, group = %cfg.name, consumer = %self.g.consumer, id = %entry.id,
                        delivery_count = entry.delivery_count, max_deliveries = cfg.max_deliveries,
                        retry_in_ms = after.as_millis() as u64, error = %reason,
                        "handler failed; the entry will be retried, and later entries of its key wait"
                    );
                    let mut entry = entry;
                    entry.delivery_count = match &fate {
                        Fate::GiveBack { delivery_count, .. } => delivery_count + 1,
                        _ => entry.delivery_count + 1,
                    };
                    order.hold(entry, *after, Instant::now());
                    if matches!(fate, Fate::Park { .. }) {
                        self.g.metrics.retried.inc();
                    }
                    return;
                }
                Fate::HandBack { .. } => order.forget(entry.id),
                _ => order.settled(entry.id),
            }
        }
        match fate {
            Fate::Ack if effects.is_empty() => self.pending.acks.push((entry.id, AckKind::Acked)),
            Fate::Ack => {
                let kind = if effects
                    .iter()
                    .any(|e| matches!(e, Effect::StreamAdd { .. } | Effect::StreamAddAt { .. }))
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
            Fate::Park {
                after,
                idle,
                reason,
            } => {
                tracing::warn!(
                    stream = %cfg.stream, group = %cfg.name, consumer = %self.g.consumer, id = %entry.id,
                    delivery_count = entry.delivery_count, max_deliveries = cfg.max_deliveries,
                    retry_in_ms = after.as_millis() as u64, error = %reason,
                    "handler failed; the entry will be retried"
                );
                self.pending.parks.push(Release {
                    id: entry.id,
                    idle,
                    delivery_count: None,
                });
            }
            Fate::GiveBack {
                idle,
                delivery_count,
                ..
            } => {
                tracing::debug!(stream = %cfg.stream, group = %cfg.name, consumer = %self.g.consumer, id = %entry.id, delivery_count = entry.delivery_count, "failed while the circuit is open; the attempt is given back");
                self.pending.parks.push(Release {
                    id: entry.id,
                    idle,
                    delivery_count: Some(delivery_count),
                });
            }
            Fate::HandBack {
                idle,
                delivery_count,
            } => self.pending.hand_backs.push(Release {
                id: entry.id,
                idle,
                delivery_count: Some(delivery_count),
            }),
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

    /// Fetched but never started: give the delivery back and make the entry reclaimable
    /// at the next claim_interval of any replica.
    pub(super) fn hand_back(&mut self, id: EntryId, delivery_count: u64) {
        self.supersede(id);
        if let Some(order) = &mut self.order {
            order.forget(id);
        }
        let fate = fate::hand_back(delivery_count, &self.policy);
        self.emit(|| LoopEvent::Settled {
            id,
            delivery_count,
            fate: fate.clone(),
        });
        if let Fate::HandBack {
            idle,
            delivery_count,
        } = fate
        {
            self.pending.hand_backs.push(Release {
                id,
                idle,
                delivery_count: Some(delivery_count),
            });
        }
    }

    /// A new decision about `id` replaces one put back after a failed send (the entry was
    /// reclaimed and handled again meanwhile), so the queue never holds an entry twice.
    /// Costs a lookup in an empty set unless sends are failing.
    fn supersede(&mut self, id: EntryId) {
        if !self.requeued.is_empty() && self.requeued.remove(&id) {
            self.pending.retain(|queued| queued != id);
        }
    }

    /// Entries deleted or trimmed while pending: Redis already dropped them from the
    /// pending list; count and log them so nobody waits for them.
    pub(super) fn note_deleted(&self, deleted: &[EntryId], during: &'static str) {
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

    /// Acts on what a flush achieved: metrics and logs, and what to send again.
    pub(super) fn on_flush(&mut self, mut flushed: Flushed) {
        self.flushing_len = 0;
        self.emit(|| LoopEvent::Flushed {
            acked: flushed.acked.iter().map(|(id, _)| *id).collect(),
            parked: flushed.parked,
            handed_back: flushed.handed_back,
            dead_lettered: flushed.dead_lettered.iter().map(|(d, _)| d.id).collect(),
            unsent: flushed.retry.len() + flushed.refused.len(),
        });
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
        if let Some(order) = &mut self.order {
            // Settlements that reached Redis pass their keys on to the next entry.
            order.flushed(&self.pending.ids());
        }
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

    /// The deadline passed: leave the running handlers' entries pending (others reclaim
    /// them after `claim_idle`) and make one last attempt to settle what is decided.
    pub(super) async fn cut_off(mut self, abandoned: usize) -> GroupExit {
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
            let flush = flush(self.g.client.clone(), self.target.clone(), batch);
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
}
