//! Plain keys and hashes: leases (one process per consumer name, one tick at a time), the
//! handlers' narrow `Store` (hashes, markers, effects as one transaction), and the
//! server's clock.

use std::time::Duration;

use streamworker_handlers::Effect;

use super::error::Result;
use super::{Client, scripts};

impl Client {
    /// Takes or renews a lease. `Ok(None)` when ours, `Ok(Some(ttl))` when another live
    /// process holds it for `ttl` more.
    pub async fn lease(&self, key: &str, token: &str, ttl: Duration) -> Result<Option<Duration>> {
        let (ours, ttl_ms): (i64, i64) = scripts::LEASE
            .key(key)
            .arg(token)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut self.commands())
            .await?;
        Ok((ours == 0).then(|| Duration::from_millis(ttl_ms.max(0) as u64)))
    }

    pub async fn release_lease(&self, key: &str, token: &str) -> Result<()> {
        let _: i64 = scripts::LEASE_RELEASE
            .key(key)
            .arg(token)
            .invoke_async(&mut self.commands())
            .await?;
        Ok(())
    }

    /// Heartbeats `consumer` into a partitioned group's members (or removes it when
    /// `leave`), returning the live members sorted by name; see `members.lua`.
    pub async fn members(
        &self,
        key: &str,
        consumer: &str,
        ttl: Duration,
        leave: bool,
    ) -> Result<Vec<String>> {
        let mut names: Vec<String> = scripts::MEMBERS
            .key(key)
            .arg(consumer)
            .arg(ttl.as_millis() as u64)
            .arg(if leave { "1" } else { "0" })
            .invoke_async(&mut self.commands())
            .await?;
        names.sort();
        Ok(names)
    }

    /// Applies effects at once in a MULTI transaction (not tied to an acknowledgement;
    /// under Cluster, where keys may live on several nodes, a plain pipeline).
    pub async fn apply(&self, effects: &[Effect]) -> Result<()> {
        if effects.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        if self.commands.supports_transactions() {
            pipe.atomic();
        }
        for effect in effects {
            let (name, args) = super::effects::command(effect);
            let mut cmd = redis::cmd(name);
            for a in args {
                cmd.arg(a);
            }
            pipe.add_command(cmd).ignore();
        }
        pipe.query_async::<()>(&mut self.commands()).await?;
        Ok(())
    }

    /// HGETALL of each key, in one round trip.
    pub async fn hashes(&self, keys: &[String]) -> Result<Vec<Vec<(String, String)>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("HGETALL").arg(key);
        }
        Ok(pipe.query_async(&mut self.commands()).await?)
    }

    pub async fn get(&self, key: &str) -> Result<Option<String>> {
        Ok(redis::cmd("GET")
            .arg(key)
            .query_async(&mut self.commands())
            .await?)
    }

    pub async fn set(&self, key: &str, value: &str, ttl: Option<Duration>) -> Result<()> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(value);
        if let Some(ttl) = ttl {
            cmd.arg("PX").arg(ttl.as_millis().max(1) as u64);
        }
        let _: () = cmd.query_async(&mut self.commands()).await?;
        Ok(())
    }

    /// SET NX PX: true when this call set the key.
    pub async fn mark(&self, key: &str, ttl: Duration) -> Result<bool> {
        let set: Option<String> = redis::cmd("SET")
            .arg(key)
            .arg("1")
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64)
            .query_async(&mut self.commands())
            .await?;
        Ok(set.is_some())
    }

    /// The server's clock (TIME) in unix milliseconds: the clock entry ids are stamped with.
    pub async fn time_ms(&self) -> Result<u64> {
        let (seconds, micros): (u64, u64) =
            redis::cmd("TIME").query_async(&mut self.commands()).await?;
        Ok(seconds * 1000 + micros / 1000)
    }
}
