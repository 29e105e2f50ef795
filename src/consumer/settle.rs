//! Settlements: what the loop has decided about entries and not yet told Redis.
//!
//! Decisions accumulate while one flush is in flight and go out together in the next one,
//! so acknowledgements batch themselves under load (hundreds per XACK) and leave at once
//! when the group is quiet. A flush that fails because Redis is unreachable is put back and
//! sent after the outage; nothing is acknowledged that was not handled, dropped or
//! dead-lettered.

use std::time::{Duration, SystemTime};

use futures_util::future::join_all;
use streamworker_handlers::{Effect, Effects, EntryId, one_line};

use crate::client::{Client, ClientError, Release};

pub use streamworker_handlers::BACKOFF_CONSUMER;

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
}

impl Settlements {
    pub fn is_empty(&self) -> bool {
        self.acks.is_empty()
            && self.effectful.is_empty()
            && self.parks.is_empty()
            && self.hand_backs.is_empty()
            && self.dead_letters.is_empty()
    }

    pub fn len(&self) -> usize {
        self.acks.len()
            + self.effectful.len()
            + self.parks.len()
            + self.hand_backs.len()
            + self.dead_letters.len()
    }

    fn absorb(&mut self, other: Settlements) {
        self.acks.extend(other.acks);
        self.effectful.extend(other.effectful);
        self.parks.extend(other.parks);
        self.hand_backs.extend(other.hand_backs);
        self.dead_letters.extend(other.dead_letters);
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
    /// Dead letters Redis refused for good (e.g. the dead-letter key has the wrong type):
    /// the entries stay pending and will be reclaimed.
    pub refused: Vec<(EntryId, ClientError)>,
}

/// Sends everything in `batch` at once: one XACK, one release script per target, one
/// dead-letter script per entry, all pipelined on the shared connection.
pub async fn flush(client: Client, target: Target, batch: Settlements) -> Flushed {
    let Settlements {
        acks,
        effectful,
        parks,
        hand_backs,
        dead_letters,
    } = batch;
    let applying = async {
        if effectful.is_empty() {
            Ok(Vec::new())
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

    let mut out = Flushed::default();
    let note = |e: ClientError, out: &mut Flushed| {
        if out.error.is_none() {
            out.error = Some(e);
        }
    };
    match acked {
        Ok(_) => out.acked = acks,
        Err(e) => {
            out.retry.acks = acks;
            note(e, &mut out);
        }
    }
    match applied {
        Ok(skipped) => {
            // An entry another consumer acknowledged first was counted there; its
            // effects were not applied here, so it is not counted again.
            out.acked.extend(
                effectful
                    .iter()
                    .filter(|(id, _, _)| !skipped.contains(id))
                    .map(|(id, kind, _)| (*id, *kind)),
            );
            out.already_acked = skipped;
        }
        Err(e) => {
            out.retry.effectful = effectful;
            note(e, &mut out);
        }
    }
    match parked {
        Ok((n, deleted)) => {
            out.parked = n as usize;
            out.deleted.extend(deleted);
        }
        Err(e) => {
            out.retry.parks = parks;
            note(e, &mut out);
        }
    }
    match handed_back {
        Ok((n, deleted)) => {
            out.handed_back = n as usize;
            out.deleted.extend(deleted);
        }
        Err(e) => {
            out.retry.hand_backs = hand_backs;
            note(e, &mut out);
        }
    }
    for (d, result) in dead_letters.into_iter().zip(buried) {
        match result {
            Ok(Some(dead_id)) => out.dead_lettered.push((d, dead_id)),

            Ok(None) => out.not_ours.push((d.id, d.delivery_count)),

            Err(e) if e.is_unavailable() => {
                out.retry.dead_letters.push(d);
                note(e, &mut out);
            }
            Err(e) => out.refused.push((d.id, e)),
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

/// The dead letter: the original fields, then every `dlq_*` field of DESIGN §3.
pub fn dead_letter_fields(
    d: &DeadLetter,
    target: &Target,
    failed_at: &str,
) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut fields = Vec::with_capacity(d.fields.len() + 7);
    fields.extend(d.fields.iter().cloned());
    let mut add =
        |name: &str, value: String| fields.push((name.as_bytes().to_vec(), value.into_bytes()));
    add("dlq_origin_stream", target.stream.clone());
    add("dlq_origin_id", d.id.to_string());
    add("dlq_group", target.group.clone());
    add("dlq_deliveries", d.delivery_count.to_string());
    add("dlq_error", one_line(&d.error));
    add("dlq_failed_at", failed_at.to_owned());
    add("dlq_consumer", target.consumer.clone());
    fields
}

/// The idle time that makes a reclaim take a parked entry `backoff` from now.
pub fn park_idle(claim_idle: Duration, backoff: Duration) -> Duration {
    claim_idle.saturating_sub(backoff)
}
