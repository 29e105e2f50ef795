//! Commands only the operator tools send: a group's pending list as rows (`pending`), moving
//! a group's position (`rewind`), and dead letters read a few fields at a time (`dlq replay
//! --error`/`--dry-run`). The daemon never calls these.

use std::time::Duration;

use redis::Value;
use streamworker_handlers::EntryId;

use super::error::{Result, protocol};
use super::replies::{StreamEntry, into_bytes, parse_fields};
use super::scripts::{RANGE_FIELDS, REPLAY, REWIND};
use super::{Client, large};

/// How many ids one round trip of [`Client::count_after`] pages through: ids only, so a
/// page is about 20 bytes an entry.
const COUNT_PAGE: usize = 10_000;

/// One pending entry, as extended XPENDING reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingRow {
    pub id: String,
    /// The consumer that holds it (`streamworker:backoff` for a parked retry).
    pub consumer: String,
    /// Time since it was last delivered (or, for a parked entry, the idle time the park
    /// set, which counts up to `claim_idle`).
    pub idle: Duration,
    /// Redis's delivery count: the attempts made so far.
    pub deliveries: u64,
}

/// The short form of XPENDING: how many entries are pending, and for whom.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PendingSummary {
    pub total: u64,
    /// (consumer, entries it holds), as Redis lists them.
    pub consumers: Vec<(String, u64)>,
}

impl Client {
    /// XPENDING `stream` `group`: the total and the count per consumer.
    pub async fn pending_summary(&self, stream: &str, group: &str) -> Result<PendingSummary> {
        type Summary = (
            u64,
            Option<String>,
            Option<String>,
            Option<Vec<(String, u64)>>,
        );
        let (total, _, _, consumers): Summary = redis::cmd("XPENDING")
            .arg(stream)
            .arg(group)
            .query_async(&mut self.commands())
            .await?;
        Ok(PendingSummary {
            total,
            consumers: consumers.unwrap_or_default(),
        })
    }

    /// The oldest `count` pending entries (extended XPENDING), only those idle for at least
    /// `min_idle` and held by `consumer` when given.
    pub async fn pending_rows(
        &self,
        stream: &str,
        group: &str,
        min_idle: Option<Duration>,
        count: usize,
        consumer: Option<&str>,
    ) -> Result<Vec<PendingRow>> {
        let mut cmd = redis::cmd("XPENDING");
        cmd.arg(stream).arg(group);
        if let Some(idle) = min_idle {
            cmd.arg("IDLE").arg(idle.as_millis() as u64);
        }
        cmd.arg("-").arg("+").arg(count);
        if let Some(consumer) = consumer {
            cmd.arg(consumer);
        }
        let rows: Vec<(String, String, u64, u64)> = cmd.query_async(&mut self.commands()).await?;
        Ok(rows
            .into_iter()
            .map(|(id, consumer, idle_ms, deliveries)| PendingRow {
                id,
                consumer,
                idle: Duration::from_millis(idle_ms),
                deliveries,
            })
            .collect())
    }

    /// XRANGE `start` `end` COUNT `count`, answering each entry's id and the last value of
    /// each of `names` (`None` when the entry has no such field), without the other fields.
    pub async fn range_fields(
        &self,
        key: &str,
        start: &str,
        end: &str,
        count: usize,
        names: &[&str],
    ) -> Result<Vec<(String, Vec<Option<String>>)>> {
        let mut inv = RANGE_FIELDS.key(key);
        inv.arg(start).arg(end).arg(count);
        for name in names {
            inv.arg(*name);
        }
        let reply: Value = inv.invoke_async(&mut self.commands()).await?;
        let Value::Array(rows) = reply else {
            return Err(protocol("range_fields", format!("not a list: {reply:?}")));
        };
        let text = |v: Value| match v {
            Value::BulkString(b) => Some(String::from_utf8_lossy(&b).into_owned()),
            Value::SimpleString(s) => Some(s),
            _ => None,
        };
        rows.into_iter()
            .map(|row| {
                let Value::Array(cells) = row else {
                    return Err(protocol("range_fields", "a row is not a list"));
                };
                let mut cells = cells.into_iter();
                let id = cells
                    .next()
                    .and_then(text)
                    .ok_or_else(|| protocol("range_fields", "a row without an id"))?;
                Ok((id, cells.map(text).collect()))
            })
            .collect()
    }

    /// How many entries of `key` have ids after `after` and up to `last` (inclusive),
    /// paging through ids only.
    pub async fn count_after(&self, key: &str, after: EntryId, last: EntryId) -> Result<u64> {
        let mut counted = 0;
        let mut from = after;
        while from < last {
            let page = self
                .range_ids(key, &format!("({from}"), &last.to_string(), COUNT_PAGE)
                .await?;
            counted += page.len() as u64;
            match page.last().map(|id| EntryId::parse(id.as_bytes())) {
                Some(Some(id)) if page.len() == COUNT_PAGE => from = id,
                Some(None) => return Err(protocol("XRANGE", "an entry id that is not ms-seq")),
                _ => break,
            }
        }
        Ok(counted)
    }

    /// XGROUP SETID `stream` `group` `to`, answering the last-delivered id it replaced;
    /// `None` (and nothing changed) when the stream or the group does not exist.
    pub async fn rewind(&self, stream: &str, group: &str, to: EntryId) -> Result<Option<String>> {
        Ok(REWIND
            .key(stream)
            .arg(group)
            .arg(to.to_string())
            .invoke_async(&mut self.commands())
            .await?)
    }
}

// Dead letters, and what the operator reads of streams (`dlq`, the demo's report).
impl Client {
    /// Replays one dead letter; see `replay.lua`. `None` when it is gone already.
    pub async fn replay(
        &self,
        dead_letter_stream: &str,
        stream: &str,
        id: &str,
        group: &str,
    ) -> Result<Option<String>> {
        let reply: Value = REPLAY
            .key(dead_letter_stream)
            .key(stream)
            .arg(id)
            .arg(group)
            .arg(large::MAX_SCRIPT_ARGS - 2)
            .invoke_async(&mut self.commands())
            .await?;
        match reply {
            Value::Nil => Ok(None),
            Value::BulkString(new_id) => Ok(Some(String::from_utf8_lossy(&new_id).into_owned())),
            // Too many fields for one script.
            Value::Int(_) => {
                Box::pin(self.replay_large(dead_letter_stream, stream, id, group)).await
            }
            other => Err(protocol(
                "dlq replay",
                format!("unexpected reply {other:?}"),
            )),
        }
    }

    /// XRANGE (or XREVRANGE when `reverse`) with a count.
    pub async fn range(
        &self,
        key: &str,
        start: &str,
        end: &str,
        count: usize,
        reverse: bool,
    ) -> Result<Vec<StreamEntry>> {
        let (cmd, from, to) = if reverse {
            ("XREVRANGE", end, start)
        } else {
            ("XRANGE", start, end)
        };
        let reply: Value = redis::cmd(cmd)
            .arg(key)
            .arg(from)
            .arg(to)
            .arg("COUNT")
            .arg(count)
            .query_async(&mut self.commands())
            .await?;
        let Value::Array(entries) = reply else {
            return Ok(Vec::new());
        };
        let mut out = Vec::with_capacity(entries.len());
        for entry in entries {
            let Value::Array(parts) = entry else { continue };
            let mut parts = parts.into_iter();
            let id = String::from_utf8_lossy(&into_bytes(parts.next().unwrap_or(Value::Nil)))
                .into_owned();
            out.push((id, parse_fields(parts.next().unwrap_or(Value::Nil))));
        }
        Ok(out)
    }

    pub async fn xdel(&self, key: &str, ids: &[String]) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        Ok(redis::cmd("XDEL")
            .arg(key)
            .arg(ids)
            .query_async(&mut self.commands())
            .await?)
    }
}
