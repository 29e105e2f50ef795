//! The daemon's stream commands: creating its group, reading new entries, reclaiming and
//! re-reading pending ones, and settling them (acknowledge with effects, park or hand back,
//! dead-letter). Each change of an entry's owner or state checks first that the entry is
//! still pending for this consumer, in the same script.

use std::time::Duration;

use redis::{RedisError, Value};
use streamworker_handlers::{Effect, EntryId};

use super::connection::{ReadConnection, Reader};
use super::error::{ClientError, Result};
use super::replies::{Claimed, RawEntry, parse_claimed, parse_ids, parse_read};
use super::{Client, large, scripts, wire};

/// What `ack_with_effects` did besides acknowledging.
#[derive(Debug, Default)]
pub struct Applied {
    /// No longer pending: acknowledged elsewhere first; effects not applied.
    pub skipped: Vec<EntryId>,
    /// Effects Redis refused (e.g. WRONGTYPE): nothing applied, not acknowledged.
    pub refused: Vec<(EntryId, String)>,
}

/// One entry to hand over with `release`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Release {
    pub id: EntryId,
    pub idle: Duration,
    /// The delivery count to set, or `None` to keep it.
    pub delivery_count: Option<u64>,
}

impl Client {
    /// XGROUP CREATE … MKSTREAM. Returns false when the group already existed.
    pub async fn create_group(&self, stream: &str, group: &str, start: &str) -> Result<bool> {
        let created: Result<(), RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stream)
            .arg(group)
            .arg(start)
            .arg("MKSTREAM")
            .query_async(&mut self.commands())
            .await;
        match created {
            Ok(()) => Ok(true),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// XACK in one command. Returns how many were still pending.
    pub async fn ack(&self, stream: &str, group: &str, ids: &[EntryId]) -> Result<u64> {
        let mut cmd = redis::cmd("XACK");
        cmd.arg(stream).arg(group);
        let mut buf = Vec::with_capacity(24);
        for id in ids {
            buf.clear();
            id.write_to(&mut buf);
            cmd.arg(&buf[..]);
        }
        Ok(cmd.query_async(&mut self.commands()).await?)
    }

    /// Hands entries this consumer owns to `target`; see `release.lua`. Returns how many
    /// moved, and the entries found deleted from the stream (no longer pending).
    pub async fn release(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        target: &str,
        entries: &[Release],
    ) -> Result<(u64, Vec<EntryId>)> {
        let mut inv = scripts::RELEASE.key(stream);
        inv.arg(group).arg(consumer).arg(target);
        for r in entries {
            inv.arg(r.id.to_string())
                .arg(r.idle.as_millis() as u64)
                .arg(r.delivery_count.map_or(-1, |c| c as i64));
        }
        let (moved, deleted): (u64, Vec<String>) = inv.invoke_async(&mut self.commands()).await?;
        Ok((moved, parse_ids(&deleted)))
    }

    /// Moves one entry to `dead_letter_stream`; see `dead_letter.lua`. `Ok(None)` when the
    /// entry is no longer pending for this consumer.
    pub async fn dead_letter(
        &self,
        stream: &str,
        dead_letter_stream: &str,
        group: &str,
        consumer: &str,
        id: EntryId,
        fields: &[(&[u8], &[u8])],
    ) -> Result<Option<String>> {
        if 2 + 2 * fields.len() > large::MAX_SCRIPT_ARGS {
            // Boxed: rare, and it keeps the consumer loop's future type shallow.
            return Box::pin(self.dead_letter_large(
                stream,
                dead_letter_stream,
                group,
                consumer,
                id,
                fields,
            ))
            .await;
        }
        let mut inv = scripts::DEAD_LETTER.key(stream);
        inv.key(dead_letter_stream)
            .arg(group)
            .arg(consumer)
            .arg(id.to_string());
        for (name, value) in fields {
            inv.arg(*name).arg(*value);
        }
        Ok(inv.invoke_async(&mut self.commands()).await?)
    }

    /// One page of XAUTOCLAIM from `cursor`; see `claim.lua`.
    pub async fn claim(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        cursor: EntryId,
        count: usize,
    ) -> Result<Claimed> {
        let reply: Value = scripts::CLAIM
            .key(stream)
            .key(crate::keys::pause_key(stream, group))
            .arg(group)
            .arg(consumer)
            .arg(min_idle.as_millis() as u64)
            .arg(cursor.to_string())
            .arg(count)
            .invoke_async(&mut self.commands())
            .await?;
        let mut claimed = parse_claimed(reply, "XAUTOCLAIM")?;
        if claimed.next == Some(EntryId::ZERO) {
            claimed.next = None;
        }
        Ok(claimed)
    }

    /// Keeps entries pending on `consumer` with their idle time reset (XCLAIM min-idle 0
    /// JUSTID), each with the delivery count given (RETRYCOUNT) or its count kept; an
    /// entry no longer pending is left alone. Ordered groups hold entries waiting for their
    /// key this way, so that no reclaim takes them.
    pub async fn touch(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        entries: &[(EntryId, Option<u64>)],
    ) -> Result<()> {
        let mut pipe = redis::pipe();
        let kept: Vec<String> = entries
            .iter()
            .filter(|(_, count)| count.is_none())
            .map(|(id, _)| id.to_string())
            .collect();
        for ids in kept.chunks(512) {
            let cmd = pipe
                .cmd("XCLAIM")
                .arg(stream)
                .arg(group)
                .arg(consumer)
                .arg(0);
            cmd.arg(ids).arg("JUSTID").ignore();
        }
        for (id, count) in entries {
            if let Some(count) = count {
                pipe.cmd("XCLAIM")
                    .arg(stream)
                    .arg(group)
                    .arg(consumer)
                    .arg(0)
                    .arg(id.to_string())
                    .arg("RETRYCOUNT")
                    .arg(*count)
                    .arg("JUSTID")
                    .ignore();
            }
        }
        pipe.query_async::<()>(&mut self.commands()).await?;
        Ok(())
    }

    /// One page of this consumer's own pending entries after `after`; see
    /// `own_pending.lua`. `counts`: whether this re-delivery counts as a delivery (at
    /// startup, when a crash may have cut a handler call short) or keeps the count (after
    /// a reconnect, when the entries' handlers never ran here).
    pub async fn own_pending(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        after: Option<EntryId>,
        count: usize,
        counts: bool,
    ) -> Result<Claimed> {
        let start = after.map_or_else(|| "-".to_owned(), |id| format!("({id}"));
        let reply: Value = scripts::OWN_PENDING
            .key(stream)
            .arg(group)
            .arg(consumer)
            .arg(start)
            .arg(count)
            .arg(if counts { "count" } else { "keep" })
            .invoke_async(&mut self.commands())
            .await?;
        let mut claimed = parse_claimed(reply, "own pending")?;
        if claimed.entries.len() + claimed.deleted.len() < count {
            claimed.next = None;
        }
        Ok(claimed)
    }

    /// Acknowledges entries and applies their effects atomically; see `ack_effects.lua`
    /// (and `large.rs` for an entry whose effects are too large for a script).
    /// Returns the ids that were no longer pending (their effects were not applied) and
    /// those whose effects Redis refused (not applied, not acknowledged).
    pub async fn ack_with_effects(
        &self,
        stream: &str,
        group: &str,
        entries: &[(EntryId, &[Effect])],
    ) -> Result<Applied> {
        let adds_first = entries.iter().any(|(_, effects)| {
            effects
                .iter()
                .any(|e| matches!(e, Effect::StreamAddAt { .. }))
        });
        if !adds_first {
            return self.ack_in_slot(stream, group, entries).await;
        }
        // XADDs with explicit ids (a partitioned forward) go first, each on its own (their
        // keys may be in other cluster slots), in id order; an entry is acknowledged only
        // once its XADDs took or were found already made.
        let mut sorted: Vec<&(EntryId, &[Effect])> = entries.iter().collect();
        sorted.sort_by_key(|(id, _)| *id);
        let mut refused = Vec::new();
        let mut rest: Vec<(EntryId, Vec<Effect>)> = Vec::with_capacity(sorted.len());
        'entries: for (id, effects) in sorted {
            let mut others = Vec::new();
            for effect in effects.iter() {
                match effect {
                    Effect::StreamAddAt {
                        key,
                        id: at,
                        fields,
                    } => match self.add_at(key, *at, fields).await {
                        Ok(()) => {}
                        Err(ClientError::Command(e)) => {
                            refused.push((*id, e.to_string()));
                            continue 'entries;
                        }
                        Err(e) => return Err(e),
                    },
                    other => others.push(other.clone()),
                }
            }
            rest.push((*id, others));
        }
        let rest: Vec<(EntryId, &[Effect])> =
            rest.iter().map(|(id, e)| (*id, e.as_slice())).collect();
        let mut applied = self.ack_in_slot(stream, group, &rest).await?;
        applied.refused.extend(refused);
        Ok(applied)
    }

    /// XADD `key` `id` `fields`, exactly once: when the stream already has an entry at or
    /// after `id`, the XADD fails and `id` is looked up. Found: added before (a crash
    /// between the XADD and the acknowledgement); fine. Not found: an out-of-order id,
    /// refused — never dropped (the caller retries, then dead-letters it).
    async fn add_at(&self, key: &str, id: EntryId, fields: &[(Vec<u8>, Vec<u8>)]) -> Result<()> {
        let id = id.to_string();
        let mut cmd = redis::cmd("XADD");
        cmd.arg(key).arg(&id);
        for (k, v) in fields {
            cmd.arg(&k[..]).arg(&v[..]);
        }
        match cmd.query_async::<Value>(&mut self.commands()).await {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("equal or smaller") => {
                let found: Vec<Value> = redis::cmd("XRANGE")
                    .arg(key)
                    .arg(&id)
                    .arg(&id)
                    .query_async(&mut self.commands())
                    .await?;
                if found.is_empty() {
                    Err(ClientError::Command(RedisError::from((
                        redis::ErrorKind::Client,
                        "out of order",
                        format!(
                            "{key} already has entries after {id}, but not {id}: something else writes to this partition, or it was forwarded out of order; the entry is kept (dead-lettered after retries), never dropped"
                        ),
                    ))))
                } else {
                    Ok(())
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn ack_in_slot(
        &self,
        stream: &str,
        group: &str,
        entries: &[(EntryId, &[Effect])],
    ) -> Result<Applied> {
        let (small, large): (Vec<_>, Vec<_>) = entries
            .iter()
            .partition(|(_, effects)| large::fits_a_script(effects));
        let mut applied = if small.is_empty() {
            Applied::default()
        } else {
            self.ack_effects_script(stream, group, &small).await?
        };
        for (id, effects) in large {
            match Box::pin(self.ack_large(stream, group, *id, effects)).await {
                Ok(true) => {}
                Ok(false) => applied.skipped.push(*id),
                // A refusal concerns this entry alone; outages and a lost group concern all.
                Err(ClientError::Command(e)) => applied.refused.push((*id, e.to_string())),
                Err(e) => return Err(e),
            }
        }
        Ok(applied)
    }

    async fn ack_effects_script(
        &self,
        stream: &str,
        group: &str,
        entries: &[&(EntryId, &[Effect])],
    ) -> Result<Applied> {
        let mut inv = scripts::ACK_EFFECTS.key(stream);
        inv.arg(group);
        for (id, effects) in entries {
            inv.arg(id.to_string()).arg(effects.len());
            for effect in effects.iter() {
                let (name, args) = super::effects::command(effect);
                inv.arg(name).arg(args.len());
                for a in args {
                    inv.arg(a);
                }
            }
        }
        let (_acked, skipped, refused): (u64, Vec<String>, Vec<String>) =
            inv.invoke_async(&mut self.commands()).await?;
        Ok(Applied {
            skipped: parse_ids(&skipped),
            refused: refused
                .chunks_exact(2)
                .filter_map(|pair| Some((pair[0].parse().ok()?, pair[1].clone())))
                .collect(),
        })
    }

    /// An entry still pending in `group`, with its delivery count and fields; `None` when
    /// it is not pending any more or no longer in the stream.
    pub async fn pending_entry(
        &self,
        stream: &str,
        group: &str,
        id: EntryId,
    ) -> Result<Option<RawEntry>> {
        let id_text = id.to_string();
        type Rows = Vec<(String, Vec<(Vec<u8>, Vec<u8>)>)>;
        type Pending = Vec<(String, String, u64, u64)>;
        let (rows, pending): (Rows, Pending) = redis::pipe()
            .cmd("XRANGE")
            .arg(stream)
            .arg(&id_text)
            .arg(&id_text)
            .cmd("XPENDING")
            .arg(stream)
            .arg(group)
            .arg(&id_text)
            .arg(&id_text)
            .arg(1)
            .query_async(&mut self.commands())
            .await?;
        Ok(match (rows.into_iter().next(), pending.first()) {
            (Some((_, fields)), Some((_, _, _, delivery_count))) => Some(RawEntry {
                id,
                delivery_count: *delivery_count,
                fields,
            }),
            _ => None,
        })
    }
}

impl Reader {
    /// XREADGROUP GROUP g c COUNT n BLOCK ms STREAMS s >. Several may be in flight at once:
    /// they are pipelined on the one connection. Entries read this way are new to the group,
    /// so their delivery count is 1.
    pub fn read_new(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> impl Future<Output = Result<Vec<RawEntry>>> + Send + 'static {
        let conn = self.conn.clone();
        let timeout = self.response_timeout;
        let count = count.to_string();
        let block = (block.as_millis().max(1) as u64).to_string();
        let args: [&[u8]; 10] = [
            b"XREADGROUP",
            b"GROUP",
            group.as_bytes(),
            consumer.as_bytes(),
            b"COUNT",
            count.as_bytes(),
            b"BLOCK",
            block.as_bytes(),
            b"STREAMS",
            stream.as_bytes(),
        ];
        let mut cmd = redis::cmd("XREADGROUP");
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.arg(">");
        let mut packed = args.to_vec();
        packed.push(b">");
        let wire_command = wire::encode(&packed);
        async move {
            match conn {
                ReadConnection::Wire(wire) => {
                    tokio::time::timeout(timeout, wire.read(wire_command))
                        .await
                        .map_err(|_| {
                            ClientError::Unavailable(RedisError::from((
                                redis::ErrorKind::Io,
                                "timed out",
                                "no reply to XREADGROUP within block + command_timeout".to_owned(),
                            )))
                        })?
                }
                ReadConnection::Redis(mut conn) => {
                    let reply: Value = cmd.query_async(&mut conn).await?;
                    parse_read(reply)
                }
            }
        }
    }
}
