//! The only module that sends commands to Redis.
//!
//! Two kinds of connection, because a blocking XREADGROUP stalls every other request
//! multiplexed on its socket (and redis-rs gives up on a reply after its response timeout):
//! - one shared connection for short commands (acknowledgements, claims, scripts, leases),
//!   reconnecting by itself, with `command_timeout` per reply;
//! - one [`Reader`] per group for blocking reads, whose response timeout exceeds `block`,
//!   and whose client id lets shutdown unblock it with CLIENT UNBLOCK.
//!
//! `connection` hides whether that is one server, Redis Cluster or a Sentinel-managed
//! primary.
//!
//! Replies are parsed straight from [`redis::Value`] into [`RawEntry`]s, moving the field
//! bytes instead of building a map of owned strings per entry.

use std::time::Duration;

use std::sync::Arc;

use redis::{RedisError, RedisResult, Script, Value};

use streamworker_handlers::{Effect, EntryId};

pub mod admin;
mod connection;
mod effects;
mod large;
mod wire;

pub use connection::Reader;
use connection::{Commands, Deployment, ReadConnection};

use crate::config::{RedisConfig, redact_url};

/// An entry as read from Redis, before its payload is decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEntry {
    pub id: EntryId,
    pub delivery_count: u64,
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
}

/// What `ack_with_effects` did besides acknowledging.
#[derive(Debug, Default)]
pub struct Applied {
    /// No longer pending: acknowledged elsewhere first; effects not applied.
    pub skipped: Vec<EntryId>,
    /// Effects Redis refused (e.g. WRONGTYPE): nothing applied, not acknowledged.
    pub refused: Vec<(EntryId, String)>,
}

/// What a page of reclaiming or re-reading found.
#[derive(Debug, Default)]
pub struct Claimed {
    /// Where the next page starts; `None` when the scan is complete.
    pub next: Option<EntryId>,
    pub entries: Vec<RawEntry>,
    /// Entries deleted or trimmed from the stream while pending: Redis removed them from
    /// the pending list; there is nothing left to handle.
    pub deleted: Vec<EntryId>,
    /// The group is paused (`streamworker pause`): nothing was claimed (`claim.lua` only).
    pub paused: bool,
}

/// Why talking to Redis failed, sorted by what the caller should do about it.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The connection broke or the server is not serving (loading, failing over): back off,
    /// reconnect, try again.
    #[error("Redis is unreachable: {0}")]
    Unavailable(RedisError),
    /// The group (or its stream) does not exist, e.g. after a restart of a Redis without
    /// persistence.
    #[error("the consumer group does not exist (NOGROUP): {0}")]
    NoGroup(RedisError),
    /// Anything else: a bug, a wrong key type, a permission missing from the ACL user.
    #[error("Redis refused a command: {0}")]
    Command(RedisError),
    #[error("unexpected reply from Redis to {command}: {detail}")]
    Protocol {
        command: &'static str,
        detail: String,
    },
}

impl From<RedisError> for ClientError {
    fn from(e: RedisError) -> Self {
        if e.code() == Some("NOGROUP") {
            Self::NoGroup(e)
        } else if e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || matches!(
                e.code(),
                Some(
                    "LOADING"
                        | "BUSY"
                        | "MASTERDOWN"
                        | "TRYAGAIN"
                        | "CLUSTERDOWN"
                        | "READONLY"
                        | "MOVED"
                        | "ASK"
                )
            )
        {
            Self::Unavailable(e)
        } else {
            Self::Command(e)
        }
    }
}

impl ClientError {
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
    /// A short label for `streamworker_redis_errors_total{kind}`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Unavailable(_) => "unavailable",
            Self::NoGroup(_) => "nogroup",
            Self::Command(_) => "command",
            Self::Protocol { .. } => "protocol",
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

struct Scripts {
    release: Script,
    dead_letter: Script,
    claim: Script,
    own_pending: Script,
    lease: Script,
    lease_release: Script,
    retention: Script,
    forget_consumers: Script,
    replay: Script,
    ack_effects: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            release: Script::new(include_str!("release.lua")),
            dead_letter: Script::new(include_str!("dead_letter.lua")),
            claim: Script::new(include_str!("claim.lua")),
            own_pending: Script::new(include_str!("own_pending.lua")),
            lease: Script::new(include_str!("lease.lua")),
            lease_release: Script::new(include_str!("lease_release.lua")),
            retention: Script::new(include_str!("retention.lua")),
            forget_consumers: Script::new(include_str!("forget_consumers.lua")),
            replay: Script::new(include_str!("replay.lua")),
            ack_effects: Script::new(include_str!("ack_effects.lua")),
        }
    }
}

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

/// One consumer of a group, as XINFO CONSUMERS reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConsumerInfo {
    pub name: String,
    pub pending: u64,
    pub idle_ms: u64,
}

/// A stream entry with its id as text, as XRANGE returns it.
pub type StreamEntry = (String, Vec<(Vec<u8>, Vec<u8>)>);

/// What one retention pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retained {
    pub trimmed: u64,
    /// Groups that hold back trimming (unacknowledged or undelivered entries).
    pub blocking: Vec<String>,
}

/// The hash where each replica records a circuit that is not closed.
pub fn circuit_key(stream: &str, group: &str) -> String {
    format!(
        "streamworker:circuit:{}:{group}",
        streamworker_handlers::slot_tag(stream)
    )
}

/// The key whose presence pauses a group on every replica (`streamworker pause`).
pub fn pause_key(stream: &str, group: &str) -> String {
    format!(
        "{}:streamworker:paused:{group}",
        streamworker_handlers::slot_tag(stream)
    )
}

/// A handle on one Redis deployment; cheap to clone.
#[derive(Clone)]
pub struct Client {
    deployment: Arc<Deployment>,
    commands: Commands,
    scripts: Arc<Scripts>,
    command_timeout: Duration,
    connect_timeout: Duration,
    /// Where it connects, passwords hidden, for messages.
    pub display_url: String,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("url", &self.display_url)
            .finish()
    }
}

/// The oldest servers whose stream commands streamworker relies on (XAUTOCLAIM's
/// deleted-id list, XINFO GROUPS lag).
const MIN_REDIS: (u64, u64) = (7, 0);
const MIN_VALKEY: (u64, u64) = (7, 2);

/// How to name a deployment in messages, without its passwords.
pub fn describe(config: &RedisConfig) -> String {
    if !config.cluster.is_empty() {
        let nodes: Vec<String> = config.cluster.iter().map(|u| redact_url(u)).collect();
        format!("Redis Cluster via {}", nodes.join(", "))
    } else if let Some(s) = &config.sentinel {
        let nodes: Vec<String> = s.nodes.iter().map(|u| redact_url(u)).collect();
        format!("primary {:?} via Sentinel {}", s.master, nodes.join(", "))
    } else {
        redact_url(&config.url)
    }
}

impl Client {
    /// Connects and checks the server version. Fails fast when Redis is unreachable; the
    /// caller decides whether to wait and try again.
    pub async fn connect(config: &RedisConfig) -> Result<Self> {
        let (deployment, commands) = connection::open(config).await?;
        let client = Self {
            deployment: Arc::new(deployment),
            commands,
            scripts: Arc::new(Scripts::new()),
            command_timeout: config.command_timeout,
            connect_timeout: config.connect_timeout,
            display_url: describe(config),
        };
        client.check_version().await?;
        Ok(client)
    }

    fn commands(&self) -> Commands {
        self.commands.clone()
    }

    async fn check_version(&self) -> Result<()> {
        // Under Cluster, INFO goes to every node and comes back as a map of replies:
        // check them all.
        let reply: Value = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut self.commands())
            .await?;
        let texts: Vec<String> = match reply {
            Value::Map(nodes) => nodes.into_iter().map(|(_, v)| text_of(v)).collect(),
            other => vec![text_of(other)],
        };
        for info in texts {
            self.check_one_version(&info)?;
        }
        Ok(())
    }

    fn check_one_version(&self, info: &str) -> Result<()> {
        supported(info, &self.display_url).map_err(|detail| {
            ClientError::Command(RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "server too old",
                detail,
            )))
        })
    }

    /// PING through the shared connection: is Redis serving us? (Under Cluster, every
    /// node answers.)
    pub async fn ping(&self) -> Result<()> {
        let _: Value = redis::cmd("PING").query_async(&mut self.commands()).await?;
        Ok(())
    }

    /// Opens a dedicated connection for blocking reads of one group's stream (under
    /// Cluster, to the node that owns the stream's slot).
    pub async fn reader(&self, stream: &str, block: Duration, name: &str) -> Result<Reader> {
        self.deployment
            .reader(
                stream,
                &self.commands,
                (self.connect_timeout, block + self.command_timeout),
                &client_name(name),
            )
            .await
    }

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

    /// Takes or renews a lease. `Ok(None)` when ours, `Ok(Some(ttl))` when another live
    /// process holds it for `ttl` more.
    pub async fn lease(&self, key: &str, token: &str, ttl: Duration) -> Result<Option<Duration>> {
        let (ours, ttl_ms): (i64, i64) = self
            .scripts
            .lease
            .key(key)
            .arg(token)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut self.commands())
            .await?;
        Ok((ours == 0).then(|| Duration::from_millis(ttl_ms.max(0) as u64)))
    }

    pub async fn release_lease(&self, key: &str, token: &str) -> Result<()> {
        let _: i64 = self
            .scripts
            .lease_release
            .key(key)
            .arg(token)
            .invoke_async(&mut self.commands())
            .await?;
        Ok(())
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
        let mut inv = self.scripts.release.key(stream);
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
        let mut inv = self.scripts.dead_letter.key(stream);
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
        let reply: Value = self
            .scripts
            .claim
            .key(stream)
            .key(pause_key(stream, group))
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
        let reply: Value = self
            .scripts
            .own_pending
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
}

impl Client {
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
        let mut inv = self.scripts.ack_effects.key(stream);
        inv.arg(group);
        for (id, effects) in entries {
            inv.arg(id.to_string()).arg(effects.len());
            for effect in effects.iter() {
                let (name, args) = effects::command(effect);
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
            let (name, args) = effects::command(effect);
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

    /// Trims `stream` per its retention; see `retention.lua`.
    pub async fn retain(
        &self,
        stream: &str,
        max_len: Option<u64>,
        max_age: Option<Duration>,
        now_ms: u64,
        step: usize,
    ) -> Result<Retained> {
        let (trimmed, blocking): (u64, Vec<String>) = self
            .scripts
            .retention
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
        let mut inv = self.scripts.forget_consumers.key(stream);
        inv.arg(group).arg(ttl.as_millis() as u64);
        for name in keep {
            inv.arg(*name);
        }
        Ok(inv.invoke_async(&mut self.commands()).await?)
    }

    /// Replays one dead letter; see `replay.lua`. `None` when it is gone already.
    pub async fn replay(
        &self,
        dead_letter_stream: &str,
        stream: &str,
        id: &str,
        group: &str,
    ) -> Result<Option<String>> {
        let reply: Value = self
            .scripts
            .replay
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

    /// The server's clock (TIME) in unix milliseconds: the clock entry ids are stamped with.
    pub async fn time_ms(&self) -> Result<u64> {
        let (seconds, micros): (u64, u64) =
            redis::cmd("TIME").query_async(&mut self.commands()).await?;
        Ok(seconds * 1000 + micros / 1000)
    }

    pub async fn xlen(&self, key: &str) -> Result<u64> {
        Ok(redis::cmd("XLEN")
            .arg(key)
            .query_async(&mut self.commands())
            .await?)
    }

    /// XINFO GROUPS; empty when the stream does not exist.
    pub async fn groups(&self, stream: &str) -> Result<Vec<GroupInfo>> {
        let reply: RedisResult<Value> = redis::cmd("XINFO")
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
        Ok(rows(reply)
            .into_iter()
            .map(|m| GroupInfo {
                name: m.text("name"),
                consumers: m.number("consumers").unwrap_or(0),
                pending: m.number("pending").unwrap_or(0),
                last_delivered_id: m.text("last-delivered-id"),
                entries_read: m.number("entries-read"),
                lag: m.number("lag"),
            })
            .collect())
    }

    /// XINFO CONSUMERS; `None` when the stream or the group does not exist.
    pub async fn consumers(&self, stream: &str, group: &str) -> Result<Option<Vec<ConsumerInfo>>> {
        let reply: RedisResult<Value> = redis::cmd("XINFO")
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
            rows(reply)
                .into_iter()
                .map(|m| ConsumerInfo {
                    name: m.text("name"),
                    pending: m.number("pending").unwrap_or(0),
                    idle_ms: m.number("idle").unwrap_or(0),
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

/// A row of an XINFO reply: `[k, v, k, v, …]` (RESP2) or a map (RESP3).
struct Row(Vec<(String, Value)>);

impl Row {
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
    fn text(&self, key: &str) -> String {
        self.get(key)
            .map(|v| String::from_utf8_lossy(&into_bytes(v.clone())).into_owned())
            .unwrap_or_default()
    }
    fn number(&self, key: &str) -> Option<u64> {
        match self.get(key)? {
            Value::Int(i) => u64::try_from(*i).ok(),
            Value::Nil => None,
            other => String::from_utf8_lossy(&into_bytes(other.clone()))
                .parse()
                .ok(),
        }
    }
}

fn rows(reply: Value) -> Vec<Row> {
    let Value::Array(items) = reply else {
        return Vec::new();
    };
    items
        .into_iter()
        .map(|item| {
            let pairs = match item {
                Value::Map(pairs) => pairs,
                Value::Array(flat) => {
                    let mut it = flat.into_iter();
                    let mut pairs = Vec::new();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        pairs.push((k, v));
                    }
                    pairs
                }
                _ => Vec::new(),
            };
            Row(pairs
                .into_iter()
                .map(|(k, v)| (String::from_utf8_lossy(&into_bytes(k)).into_owned(), v))
                .collect())
        })
        .collect()
}

/// One entry to hand over with `release`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Release {
    pub id: EntryId,
    pub idle: Duration,
    /// The delivery count to set, or `None` to keep it.
    pub delivery_count: Option<u64>,
}

fn client_name(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '_' })
        .collect()
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

fn protocol(command: &'static str, detail: impl Into<String>) -> ClientError {
    ClientError::Protocol {
        command,
        detail: detail.into(),
    }
}

fn parse_id(value: &Value, command: &'static str) -> Result<EntryId> {
    let bytes = match value {
        Value::BulkString(b) => b.as_slice(),
        Value::SimpleString(s) => s.as_bytes(),
        other => {
            return Err(protocol(
                command,
                format!("expected an entry id, got {other:?}"),
            ));
        }
    };
    EntryId::parse(bytes).ok_or_else(|| {
        protocol(
            command,
            format!("`{}` is not an entry id", String::from_utf8_lossy(bytes)),
        )
    })
}

fn into_bytes(value: Value) -> Vec<u8> {
    match value {
        Value::BulkString(b) => b,
        Value::SimpleString(s) => s.into_bytes(),
        Value::Int(i) => i.to_string().into_bytes(),
        Value::Double(d) => d.to_string().into_bytes(),
        Value::Okay => b"OK".to_vec(),
        _ => Vec::new(),
    }
}

/// `[f1, v1, f2, v2, …]` → pairs, moving the bytes.
fn parse_fields(value: Value) -> Vec<(Vec<u8>, Vec<u8>)> {
    let flat = match value {
        Value::Array(items) => items,
        Value::Map(pairs) => {
            return pairs
                .into_iter()
                .map(|(k, v)| (into_bytes(k), into_bytes(v)))
                .collect();
        }
        _ => return Vec::new(),
    };
    let mut fields = Vec::with_capacity(flat.len() / 2);
    let mut items = flat.into_iter();
    while let (Some(k), Some(v)) = (items.next(), items.next()) {
        fields.push((into_bytes(k), into_bytes(v)));
    }
    fields
}

/// XREADGROUP's reply: nil on timeout, else `[[stream, [[id, [f, v, …]], …]]]` (RESP2) or
/// `{stream: [[id, [f, v, …]], …]}` (RESP3).
fn parse_read(reply: Value) -> Result<Vec<RawEntry>> {
    const CMD: &str = "XREADGROUP";
    let entries = match reply {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(streams) => match streams.into_iter().next() {
            Some(Value::Array(pair)) => pair.into_iter().nth(1),
            Some(other) => return Err(protocol(CMD, format!("unexpected stream reply {other:?}"))),
            None => return Ok(Vec::new()),
        },
        Value::Map(pairs) => pairs.into_iter().next().map(|(_, v)| v),
        other => return Err(protocol(CMD, format!("unexpected reply {other:?}"))),
    };
    let Some(Value::Array(entries)) = entries else {
        return Ok(Vec::new());
    };
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        let Value::Array(parts) = entry else {
            return Err(protocol(CMD, "entry is not an array"));
        };
        let mut parts = parts.into_iter();
        let id = parse_id(&parts.next().unwrap_or(Value::Nil), CMD)?;
        out.push(RawEntry {
            id,
            delivery_count: 1,
            fields: parse_fields(parts.next().unwrap_or(Value::Nil)),
        });
    }
    Ok(out)
}

/// The reply of `claim.lua` and `own_pending.lua`:
/// `{cursor or nil, {{id, count, {f, v, …}}, …}, {deleted id, …}}`.
fn parse_claimed(reply: Value, command: &'static str) -> Result<Claimed> {
    let Value::Array(parts) = reply else {
        return Err(protocol(command, format!("unexpected reply {reply:?}")));
    };
    let mut parts = parts.into_iter();
    let next = match parts.next() {
        Some(Value::Nil) | None => None,
        Some(v) => Some(parse_id(&v, command)?),
    };
    let mut claimed = Claimed {
        next,
        ..Claimed::default()
    };
    if let Some(Value::Array(entries)) = parts.next() {
        for entry in entries {
            let Value::Array(triple) = entry else {
                return Err(protocol(command, "entry is not an array"));
            };
            let mut triple = triple.into_iter();
            let id = parse_id(&triple.next().unwrap_or(Value::Nil), command)?;
            let delivery_count = match triple.next() {
                Some(Value::Int(n)) => n.max(1) as u64,
                other => return Err(protocol(command, format!("bad delivery count {other:?}"))),
            };
            claimed.entries.push(RawEntry {
                id,
                delivery_count,
                fields: parse_fields(triple.next().unwrap_or(Value::Nil)),
            });
        }
    }
    if let Some(Value::Array(deleted)) = parts.next() {
        for id in deleted {
            claimed.deleted.push(parse_id(&id, command)?);
        }
    }
    claimed.paused = matches!(parts.next(), Some(Value::Int(1)));
    Ok(claimed)
}

/// Whether the server behind an `INFO server` reply is new enough.
fn supported(info: &str, display_url: &str) -> std::result::Result<(), String> {
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    let (product, version, minimum) = match field("valkey_version") {
        Some(v) => ("Valkey", v, MIN_VALKEY),
        None => (
            "Redis",
            field("redis_version").unwrap_or("0.0.0"),
            MIN_REDIS,
        ),
    };
    let mut parts = version.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if found < minimum {
        return Err(format!(
            "{display_url} runs {product} {version}; streamworker needs {product} {}.{} or later (XAUTOCLAIM's deleted-id list, XINFO GROUPS lag): upgrade the server",
            minimum.0, minimum.1
        ));
    }
    Ok(())
}

fn text_of(value: Value) -> String {
    String::from_utf8_lossy(&into_bytes(value)).into_owned()
}

/// Entry ids a script returned as text.
fn parse_ids(ids: &[String]) -> Vec<EntryId> {
    ids.iter()
        .filter_map(|s| EntryId::parse(s.as_bytes()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn old_servers_are_refused_by_name() {
        assert!(supported("# Server\r\nredis_version:7.0.15\r\n", "x").is_ok());
        assert!(supported("redis_version:7.2.4\r\nvalkey_version:9.1.2\r\n", "x").is_ok());
        let e = supported("redis_version:6.2.14\r\n", "redis://db:6379").unwrap_err();
        assert!(
            e.contains("redis://db:6379 runs Redis 6.2.14") && e.contains("7.0 or later"),
            "{e}"
        );
        let e = supported("redis_version:7.2.4\r\nvalkey_version:7.0.0\r\n", "x").unwrap_err();
        assert!(
            e.contains("Valkey 7.0.0") && e.contains("7.2 or later"),
            "{e}"
        );
    }

    #[test]
    fn reads_parse_without_maps() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("s"),
            Value::Array(vec![
                Value::Array(vec![
                    bulk("1-0"),
                    Value::Array(vec![bulk("a"), bulk("1"), bulk("b"), bulk("2")]),
                ]),
                Value::Array(vec![bulk("2-5"), Value::Array(vec![bulk("a"), bulk("3")])]),
            ]),
        ])]);
        let entries = parse_read(reply).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].id, EntryId::new(1, 0));
        assert_eq!(
            entries[0].fields,
            vec![
                (b"a".to_vec(), b"1".to_vec()),
                (b"b".to_vec(), b"2".to_vec())
            ]
        );
        assert_eq!(entries[1].id, EntryId::new(2, 5));
        assert!(parse_read(Value::Nil).unwrap().is_empty());
    }

    #[test]
    fn claims_parse_with_counts_and_deleted_ids() {
        let reply = Value::Array(vec![
            bulk("7-0"),
            Value::Array(vec![Value::Array(vec![
                bulk("3-0"),
                Value::Int(4),
                Value::Array(vec![bulk("k"), bulk("v")]),
            ])]),
            Value::Array(vec![bulk("2-0")]),
        ]);
        let c = parse_claimed(reply, "test").unwrap();
        assert_eq!(c.next, Some(EntryId::new(7, 0)));
        assert_eq!(c.entries[0].delivery_count, 4);
        assert_eq!(c.deleted, vec![EntryId::new(2, 0)]);
        assert!(
            !c.paused,
            "own_pending.lua's three-part reply is never paused"
        );
    }

    #[test]
    fn a_paused_claim_reply_says_so_and_holds_nothing() {
        let reply = Value::Array(vec![
            bulk("0-0"),
            Value::Array(vec![]),
            Value::Array(vec![]),
            Value::Int(1),
        ]);
        let c = parse_claimed(reply, "test").unwrap();
        assert!(c.paused);
        assert!(c.entries.is_empty() && c.deleted.is_empty());
    }

    #[test]
    fn the_pause_key_is_in_the_streams_slot() {
        assert_eq!(
            pause_key("orders", "billing"),
            "{orders}:streamworker:paused:billing"
        );
        assert_eq!(
            pause_key("{orders}:events", "billing"),
            "{orders}:streamworker:paused:billing"
        );
    }
}
