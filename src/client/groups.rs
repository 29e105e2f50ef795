//! What Redis says about streams and groups (XINFO, XLEN, the oldest pending entry), the
//! group-wide state replicas share (circuit reports, the pause key), and the housekeeping
//! every replica does (retention, forgetting consumers).

use std::time::Duration;

use redis::RedisResult;
use redis::streams::{StreamInfoConsumersReply, StreamInfoGroup, StreamInfoGroupsReply};

use super::error::Result;
use super::{Client, scripts};
use crate::keys::{circuit_key, pause_key};

/// One consumer group on a stream, as XINFO GROUPS reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GroupInfo {
    pub name: String,
    pub consumers: u64,
    pub pending: u64,
    pub last_delivered_id: String,
    pub entries_read: Option<u64>,
    /// `None` when Redis cannot tell (e.g. after XDEL or a trim below the group).
    pub lag: Option<u64>,
}

// redis-rs's reply has every field we need, `lag` and `entries-read` included (Redis 7.0+).
impl From<StreamInfoGroup> for GroupInfo {
    fn from(g: StreamInfoGroup) -> Self {
        Self {
            name: g.name,
            consumers: g.consumers as u64,
            pending: g.pending as u64,
            last_delivered_id: g.last_delivered_id,
            entries_read: g.entries_read.map(|n| n as u64),
            lag: g.lag.map(|n| n as u64),
        }
    }
}

/// One consumer of a group, as XINFO CONSUMERS reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConsumerInfo {
    pub name: String,
    pub pending: u64,
    pub idle_ms: u64,
}

/// What one retention pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retained {
    pub trimmed: u64,
    /// Groups that hold back trimming (unacknowledged or undelivered entries).
    pub blocking: Vec<String>,
}

impl Client {
    /// XLEN: how many entries the stream holds (0 when it does not exist).
    pub async fn xlen(&self, key: &str) -> Result<u64> {
        Ok(redis::cmd("XLEN")
            .arg(key)
            .query_async(&mut self.commands())
            .await?)
    }

    /// XINFO GROUPS; empty when the stream does not exist.
    pub async fn groups(&self, stream: &str) -> Result<Vec<GroupInfo>> {
        let reply: RedisResult<StreamInfoGroupsReply> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(stream)
            .query_async(&mut self.commands())
            .await;
        let reply = match reply {
            Err(e) if e.code() == Some("ERR") && e.to_string().contains("no such key") => {
                return Ok(Vec::new());
            }
            other => other?,
        };
        Ok(reply.groups.into_iter().map(GroupInfo::from).collect())
    }

    /// XINFO CONSUMERS; `None` when the stream or the group does not exist.
    pub async fn consumers(&self, stream: &str, group: &str) -> Result<Option<Vec<ConsumerInfo>>> {
        let reply: RedisResult<StreamInfoConsumersReply> = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(stream)
            .arg(group)
            .query_async(&mut self.commands())
            .await;
        let reply = match reply {
            Err(e)
                if e.code() == Some("NOGROUP")
                    || (e.code() == Some("ERR") && e.to_string().contains("no such key")) =>
            {
                return Ok(None);
            }
            other => other?,
        };
        Ok(Some(
            reply
                .consumers
                .into_iter()
                .map(|c| ConsumerInfo {
                    name: c.name,
                    pending: c.pending as u64,
                    idle_ms: c.idle as u64,
                })
                .collect(),
        ))
    }

    /// The longest idle time among the group's `sample` oldest pending entries: the age
    /// of the oldest pending work, without scanning a long pending list.
    pub async fn oldest_pending_idle(
        &self,
        stream: &str,
        group: &str,
        sample: usize,
    ) -> Result<Option<Duration>> {
        let rows: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
            .arg(stream)
            .arg(group)
            .arg("-")
            .arg("+")
            .arg(sample)
            .query_async(&mut self.commands())
            .await?;
        Ok(rows
            .iter()
            .map(|(_, _, idle, _)| *idle)
            .max()
            .map(Duration::from_millis))
    }

    /// Records (`Some(state)`) or clears (`None`) this consumer's circuit state.
    pub async fn report_circuit(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        state: Option<&str>,
    ) -> Result<()> {
        let key = circuit_key(stream, group);
        let cmd = match state {
            Some(state) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_millis();
                let mut c = redis::cmd("HSET");
                c.arg(&key).arg(consumer).arg(format!("{state} {now}"));
                c
            }
            None => {
                let mut c = redis::cmd("HDEL");
                c.arg(&key).arg(consumer);
                c
            }
        };
        let _: i64 = cmd.query_async(&mut self.commands()).await?;
        Ok(())
    }

    /// Every replica's recorded circuit state: (consumer, state, recorded at unix ms).
    pub async fn circuits(&self, stream: &str, group: &str) -> Result<Vec<(String, String, u64)>> {
        let raw: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg(circuit_key(stream, group))
            .query_async(&mut self.commands())
            .await?;
        Ok(raw
            .into_iter()
            .map(|(consumer, value)| {
                let mut parts = value.splitn(2, ' ');
                let state = parts.next().unwrap_or_default().to_owned();
                let at = parts.next().and_then(|t| t.parse().ok()).unwrap_or(0);
                (consumer, state, at)
            })
            .collect())
    }

    /// Pauses (`true`) or resumes a group on every replica; answers whether that changed
    /// anything. The key holds when the pause began (unix ms), for `status`.
    pub async fn set_paused(&self, stream: &str, group: &str, paused: bool) -> Result<bool> {
        let key = pause_key(stream, group);
        if paused {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as u64;
            let set: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(now)
                .arg("NX")
                .query_async(&mut self.commands())
                .await?;
            Ok(set.is_some())
        } else {
            let deleted: i64 = redis::cmd("DEL")
                .arg(&key)
                .query_async(&mut self.commands())
                .await?;
            Ok(deleted > 0)
        }
    }

    /// Since when (unix ms) the group has been paused, `None` when it is not.
    pub async fn paused_since(&self, stream: &str, group: &str) -> Result<Option<u64>> {
        let value: Option<String> = redis::cmd("GET")
            .arg(pause_key(stream, group))
            .query_async(&mut self.commands())
            .await?;
        Ok(value.map(|v| v.parse().unwrap_or(0)))
    }

    /// Trims `stream` per its retention; see `retention.lua`.
    pub async fn retain(
        &self,
        stream: &str,
        max_len: Option<u64>,
        max_age: Option<Duration>,
        now_ms: u64,
        step: usize,
    ) -> Result<Retained> {
        let (trimmed, blocking): (u64, Vec<String>) = scripts::RETENTION
            .key(stream)
            .arg(max_len.unwrap_or(0))
            .arg(max_age.map_or(0, |d| d.as_millis() as u64))
            .arg(now_ms)
            .arg(step)
            .invoke_async(&mut self.commands())
            .await?;
        Ok(Retained { trimmed, blocking })
    }

    /// Deletes consumers with nothing pending idle longer than `ttl`; see
    /// `forget_consumers.lua`.
    pub async fn forget_consumers(
        &self,
        stream: &str,
        group: &str,
        ttl: Duration,
        keep: &[&str],
    ) -> Result<Vec<String>> {
        let mut inv = scripts::FORGET_CONSUMERS.key(stream);
        inv.arg(group).arg(ttl.as_millis() as u64);
        for name in keep {
            inv.arg(*name);
        }
        Ok(inv.invoke_async(&mut self.commands()).await?)
    }
}

#[cfg(test)]
mod tests {
    use redis::{FromRedisValue, Value};

    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    /// XINFO GROUPS as Redis 7 sends it over RESP2 (a flat array per group), with the lag
    /// Redis cannot tell after an XDEL (nil): every field the gauges and `status` use.
    #[test]
    fn xinfo_groups_replies_keep_lag_and_entries_read() {
        let group = |name: &str, lag: Value| {
            Value::Array(vec![
                bulk("name"),
                bulk(name),
                bulk("consumers"),
                Value::Int(2),
                bulk("pending"),
                Value::Int(3),
                bulk("last-delivered-id"),
                bulk("5-0"),
                bulk("entries-read"),
                Value::Int(5),
                bulk("lag"),
                lag,
            ])
        };
        let reply = Value::Array(vec![group("a", Value::Int(7)), group("b", Value::Nil)]);
        let groups: Vec<GroupInfo> = StreamInfoGroupsReply::from_redis_value(reply)
            .unwrap()
            .groups
            .into_iter()
            .map(GroupInfo::from)
            .collect();
        assert_eq!(
            groups[0],
            GroupInfo {
                name: "a".into(),
                consumers: 2,
                pending: 3,
                last_delivered_id: "5-0".into(),
                entries_read: Some(5),
                lag: Some(7),
            }
        );
        assert_eq!(groups[1].lag, None);
    }
}
