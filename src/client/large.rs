//! Settlements too large for one script.
//!
//! The scripts (`dead_letter.lua`, `ack_effects.lua`, `replay.lua`) make an XADD and an
//! XACK (or XDEL) one atomic step. But a script passes a command's arguments on Lua's C
//! stack, which holds ~8,000 values (LUAI_MAXCSTACK): an entry with more fields than that
//! cannot be written from Lua at all. Such an XADD goes out as a plain command inside a
//! MULTI, followed in the same MULTI by a small script (`settle_large.lua`,
//! `replay_large.lua`) that makes the decision the whole script used to make: acknowledge
//! the entry when it is still pending, or take the XADD back. EXEC runs them back to
//! back, so the guarantees are those of the scripts:
//! - a dead letter exists iff its entry was acknowledged, only while it was pending for
//!   this consumer; effects exist iff the acknowledgement took;
//! - a refused XADD leaves nothing acknowledged: WRONGTYPE is seen by the script (the key
//!   is not a stream), OOM refuses the whole MULTI before any of it runs.
//!
//! Why not WATCH: XCLAIM, XAUTOCLAIM and XACK by another consumer do not invalidate a
//! WATCH on the stream (checked on Redis 7.0), while every producer's XADD does; it would
//! guard nothing that matters and fail under load.
//!
//! Ordinary entries keep the one-script path; only an XADD with more than
//! [`MAX_SCRIPT_ARGS`] arguments comes here.

use redis::{Pipeline, Value};
use streamworker_handlers::{Effect, EntryId};

use super::Client;
use super::error::{ClientError, Result, protocol};
use super::scripts::{RANGE_IDS, REPLAY_LARGE as REPLAY, SETTLE_LARGE as SETTLE};
use crate::dead_letter;

/// The most arguments a script passes to one command: Lua's C stack holds 8,000 values
/// (LUAI_MAXCSTACK), minus what the script itself keeps there.
pub const MAX_SCRIPT_ARGS: usize = 7_000;

/// How many arguments `effect`'s command takes, without building them (a forwarded
/// entry's values may be megabytes).
fn argument_count(effect: &Effect) -> usize {
    match effect {
        Effect::StreamAdd {
            fields, max_len, ..
        } => 2 + 2 * fields.len() + if max_len.is_some() { 3 } else { 0 },
        // Key, field and value at most.
        _ => 3,
    }
}

/// Whether an entry's effects can go through `ack_effects.lua`.
pub fn fits_a_script(effects: &[Effect]) -> bool {
    effects.iter().all(|e| argument_count(e) <= MAX_SCRIPT_ARGS)
}

fn xadd(key: &str, fields: &[(&[u8], &[u8])]) -> redis::Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(key).arg("*");
    for (k, v) in fields {
        cmd.arg(*k).arg(*v);
    }
    cmd
}

/// The script's reply (the last of the transaction), as a result.
fn last_reply(mut replies: Vec<Value>, command: &'static str) -> Result<(Value, Vec<Value>)> {
    match replies.pop() {
        Some(Value::ServerError(e)) => Err(ClientError::from(redis::RedisError::from(e))),
        Some(v) => Ok((v, replies)),
        None => Err(protocol(command, "EXEC answered nothing")),
    }
}

impl Client {
    /// The ids XRANGE `start` `end` COUNT `count` would list, without their fields.
    pub async fn range_ids(
        &self,
        key: &str,
        start: &str,
        end: &str,
        count: usize,
    ) -> Result<Vec<String>> {
        Ok(RANGE_IDS
            .key(key)
            .arg(start)
            .arg(end)
            .arg(count)
            .invoke_async(&mut self.commands())
            .await?)
    }

    /// Runs `pipe` as MULTI … EXEC on a connection that serves `stream`'s slot, keeping
    /// each command's error in the reply instead of failing the lot.
    async fn transaction(&self, stream: &str, mut pipe: Pipeline) -> Result<Vec<Value>> {
        pipe.atomic().ignore_errors();
        if self.commands.supports_transactions() {
            Ok(pipe.query_async(&mut self.commands()).await?)
        } else {
            // Cluster: the cluster connection does not route MULTI, so the transaction
            // goes straight to the node that owns the slot (every key shares it).
            let mut conn = self
                .deployment
                .connection_for(stream, &self.commands)
                .await?;
            Ok(pipe.query_async(&mut conn).await?)
        }
    }

    /// [`Client::dead_letter`] for an entry with too many fields for `dead_letter.lua`.
    pub(super) async fn dead_letter_large(
        &self,
        stream: &str,
        dead_letter_stream: &str,
        group: &str,
        consumer: &str,
        id: EntryId,
        fields: &[(&[u8], &[u8])],
    ) -> Result<Option<String>> {
        let mut pipe = redis::pipe();
        pipe.add_command(xadd(dead_letter_stream, fields));
        pipe.cmd("EVAL")
            .arg(SETTLE)
            .arg(2)
            .arg(stream)
            .arg(dead_letter_stream)
            .arg(group)
            .arg(id.to_string())
            .arg(consumer);
        let replies = self.transaction(stream, pipe).await?;
        let (decision, mut rest) = last_reply(replies, "dead letter")?;
        match (decision, rest.pop()) {
            (Value::Int(1), Some(Value::BulkString(dead))) => {
                Ok(Some(String::from_utf8_lossy(&dead).into_owned()))
            }
            (Value::Int(0), _) => Ok(None),
            (decision, xadd) => Err(protocol(
                "dead letter",
                format!("the transaction answered {xadd:?}, {decision:?}"),
            )),
        }
    }

    /// Acknowledges one entry with effects too large for `ack_effects.lua`: the large
    /// XADDs as plain commands, its other effects and the XACK in `settle_large.lua`.
    /// Returns false when the entry was no longer pending (nothing applied).
    pub(super) async fn ack_large(
        &self,
        stream: &str,
        group: &str,
        id: EntryId,
        effects: &[Effect],
    ) -> Result<bool> {
        let mut pipe = redis::pipe();
        let mut written = Vec::new();
        let mut others = Vec::new();
        for effect in effects {
            let (name, args) = super::effects::command(effect);
            if matches!(effect, Effect::StreamAdd { .. }) {
                let mut cmd = redis::cmd(name);
                for a in &args {
                    cmd.arg(a);
                }
                pipe.add_command(cmd);
                written.push(effect.key().to_owned());
            } else {
                others.push((name, args));
            }
        }
        let mut gate = redis::cmd("EVAL");
        gate.arg(SETTLE).arg(1 + written.len()).arg(stream);
        for key in &written {
            gate.arg(key);
        }
        gate.arg(group).arg(id.to_string()).arg("");
        for (name, args) in &others {
            gate.arg(*name).arg(args.len());
            for a in args {
                gate.arg(a);
            }
        }
        pipe.add_command(gate);
        let replies = self.transaction(stream, pipe).await?;
        match last_reply(replies, "effects")?.0 {
            Value::Int(1) => Ok(true),
            Value::Int(0) => Ok(false),
            other => Err(protocol(
                "effects",
                format!("the script answered {other:?}"),
            )),
        }
    }

    /// [`Client::replay`] for a dead letter with too many fields for `replay.lua`.
    pub(super) async fn replay_large(
        &self,
        dead_letter_stream: &str,
        stream: &str,
        id: &str,
        group: &str,
    ) -> Result<Option<String>> {
        let Some((_, fields)) = self
            .range(dead_letter_stream, id, id, 1, false)
            .await?
            .into_iter()
            .next()
        else {
            return Ok(None);
        };
        // What replay.lua does: the original fields, then where the replay comes from.
        let field = |name: &str| {
            fields
                .iter()
                .find(|(k, _)| k == name.as_bytes())
                .map(|(_, v)| v.as_slice())
        };
        let replay_of = field(dead_letter::REPLAY_OF)
            .or_else(|| field(dead_letter::ORIGIN_ID))
            .unwrap_or(id.as_bytes())
            .to_vec();
        let mut out: Vec<(&[u8], &[u8])> = fields
            .iter()
            .filter(|(k, _)| !dead_letter::is_own_field(k))
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
            .collect();
        out.push((dead_letter::REPLAY_OF.as_bytes(), &replay_of));
        out.push((dead_letter::REPLAY_GROUP.as_bytes(), group.as_bytes()));
        let mut pipe = redis::pipe();
        pipe.add_command(xadd(stream, &out));
        pipe.cmd("EVAL")
            .arg(REPLAY)
            .arg(2)
            .arg(dead_letter_stream)
            .arg(stream)
            .arg(id);
        let replies = self.transaction(stream, pipe).await?;
        let (decision, mut rest) = last_reply(replies, "dlq replay")?;
        match (decision, rest.pop()) {
            (Value::Int(1), Some(Value::BulkString(new_id))) => {
                Ok(Some(String::from_utf8_lossy(&new_id).into_owned()))
            }
            (Value::Int(0), _) => Ok(None),
            (decision, xadd) => Err(protocol(
                "dlq replay",
                format!("the transaction answered {xadd:?}, {decision:?}"),
            )),
        }
    }
}

/// The guarantees of the large path, against a real `redis-server`: what a race or a
/// refusal leaves behind.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RedisConfig;
    use crate::tools::local_redis::LocalRedis;
    use redis::AsyncCommands;

    const STREAM: &str = "{s}.in";
    const DLQ: &str = "{s}.dlq";
    const OUT: &str = "{s}.out";

    /// More fields than a script can pass.
    fn many() -> Vec<(Vec<u8>, Vec<u8>)> {
        (0..MAX_SCRIPT_ARGS)
            .map(|i| {
                (
                    format!("f{i}").into_bytes(),
                    vec![0xff, b'\r', b'\n', i as u8],
                )
            })
            .collect()
    }

    fn borrowed(fields: &[(Vec<u8>, Vec<u8>)]) -> Vec<(&[u8], &[u8])> {
        fields
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
            .collect()
    }

    struct Setup {
        _server: LocalRedis,
        client: Client,
        con: redis::aio::MultiplexedConnection,
        fields: Vec<(Vec<u8>, Vec<u8>)>,
        id: EntryId,
    }

    /// A server with one large entry in `STREAM`, delivered to `consumer` of group `g`.
    async fn setup(consumer: &str) -> Setup {
        let server = LocalRedis::start("redis-server").expect("redis-server starts");
        let config = RedisConfig {
            url: server.url(),
            ..RedisConfig::default()
        };
        let client = Client::connect(&config).await.expect("connects");
        let mut con = redis::Client::open(server.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let fields = many();
        let mut add = redis::cmd("XADD");
        add.arg(STREAM).arg("*");
        for (k, v) in &fields {
            add.arg(k).arg(v);
        }
        let id: String = add.query_async(&mut con).await.unwrap();
        let _: () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(STREAM)
            .arg("g")
            .arg("0")
            .query_async(&mut con)
            .await
            .unwrap();
        let _: redis::Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("g")
            .arg(consumer)
            .arg("STREAMS")
            .arg(STREAM)
            .arg(">")
            .query_async(&mut con)
            .await
            .unwrap();
        Setup {
            _server: server,
            client,
            con,
            fields,
            id: EntryId::parse(id.as_bytes()).unwrap(),
        }
    }

    /// Who holds the entry pending, if anyone.
    async fn owner(s: &mut Setup) -> Option<String> {
        let rows: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
            .arg(STREAM)
            .arg("g")
            .arg("-")
            .arg("+")
            .arg(10)
            .query_async(&mut s.con)
            .await
            .unwrap();
        rows.into_iter().next().map(|(_, owner, _, _)| owner)
    }

    async fn len(s: &mut Setup, key: &str) -> u64 {
        s.con.xlen(key).await.unwrap()
    }

    async fn dead_letter(s: &Setup) -> Result<Option<String>> {
        s.client
            .dead_letter(STREAM, DLQ, "g", "me", s.id, &borrowed(&s.fields))
            .await
    }

    fn forward(s: &Setup) -> Vec<Effect> {
        vec![
            Effect::StreamAdd {
                key: OUT.into(),
                fields: s.fields.clone(),
                max_len: None,
            },
            Effect::HashIncr {
                key: "{s}.count".into(),
                field: "n".into(),
                by: 1,
            },
        ]
    }

    #[tokio::test]
    async fn a_large_dead_letter_is_written_whole_and_the_entry_acknowledged() {
        let mut s = setup("me").await;
        let dead = dead_letter(&s).await.unwrap().expect("ours");
        let letters = s.client.range(DLQ, "-", "+", 10, false).await.unwrap();
        assert_eq!(letters.len(), 1);
        assert_eq!(letters[0].0, dead);
        assert_eq!(letters[0].1, s.fields);
        assert_eq!(owner(&mut s).await, None, "acknowledged");
    }

    #[tokio::test]
    async fn a_large_dead_letter_of_an_entry_another_consumer_holds_is_taken_back() {
        let mut s = setup("other").await;
        assert_eq!(dead_letter(&s).await.unwrap(), None);
        assert_eq!(
            len(&mut s, DLQ).await,
            0,
            "nothing left in the dead-letter stream"
        );
        assert_eq!(owner(&mut s).await.as_deref(), Some("other"));
    }

    #[tokio::test]
    async fn a_refused_large_dead_letter_acknowledges_nothing() {
        let mut s = setup("me").await;
        let _: () = s.con.set(DLQ, "not a stream").await.unwrap();
        let err = dead_letter(&s).await.unwrap_err();
        assert!(matches!(err, ClientError::Command(_)), "{err:?}");
        assert!(err.to_string().contains(DLQ), "names the key: {err}");
        assert_eq!(owner(&mut s).await.as_deref(), Some("me"), "still pending");
        let kept: String = s.con.get(DLQ).await.unwrap();
        assert_eq!(kept, "not a stream");

        // Out of memory (maxmemory, noeviction): the whole MULTI is refused.
        let _: () = s.con.del(DLQ).await.unwrap();
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory")
            .arg("1")
            .query_async(&mut s.con)
            .await
            .unwrap();
        let err = dead_letter(&s).await.unwrap_err();
        assert!(err.to_string().contains("OOM"), "{err}");
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory")
            .arg("0")
            .query_async(&mut s.con)
            .await
            .unwrap();
        assert_eq!(owner(&mut s).await.as_deref(), Some("me"), "still pending");
        assert_eq!(len(&mut s, DLQ).await, 0);
    }

    #[tokio::test]
    async fn large_effects_are_applied_with_the_acknowledgement_once() {
        let mut s = setup("me").await;
        let effects = forward(&s);
        // With an ordinary entry in the same batch, which takes the script.
        let small = EntryId::new(1, 1);
        let skipped = s
            .client
            .ack_with_effects(STREAM, "g", &[(small, &[][..]), (s.id, &effects[..])])
            .await
            .unwrap();
        assert_eq!(skipped.skipped, vec![small], "never delivered: not pending");
        assert!(skipped.refused.is_empty());
        let out = s.client.range(OUT, "-", "+", 10, false).await.unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].1, s.fields);
        let n: i64 = s.con.hget("{s}.count", "n").await.unwrap();
        assert_eq!(n, 1);
        assert_eq!(owner(&mut s).await, None, "acknowledged");

        // Settled again (a redelivery another consumer settled first): nothing twice.
        let skipped = s
            .client
            .ack_with_effects(STREAM, "g", &[(s.id, &effects[..])])
            .await
            .unwrap();
        assert_eq!(skipped.skipped, vec![s.id]);
        assert_eq!(len(&mut s, OUT).await, 1, "the copy taken back");
        let n: i64 = s.con.hget("{s}.count", "n").await.unwrap();
        assert_eq!(n, 1);
    }

    #[tokio::test]
    async fn refused_large_effects_acknowledge_nothing() {
        let mut s = setup("me").await;
        let _: () = s.con.set(OUT, "not a stream").await.unwrap();
        let effects = forward(&s);
        let applied = s
            .client
            .ack_with_effects(STREAM, "g", &[(s.id, &effects[..])])
            .await
            .unwrap();
        // Refused for this entry alone: the loop retries it, then dead-letters it.
        assert_eq!(applied.refused.len(), 1, "{applied:?}");
        let (id, err) = &applied.refused[0];
        assert_eq!(*id, s.id);
        assert!(err.contains(OUT), "names the key: {err}");
        assert_eq!(owner(&mut s).await.as_deref(), Some("me"), "still pending");
        let count: Option<i64> = s.con.hget("{s}.count", "n").await.unwrap();
        assert_eq!(count, None, "no effect applied");
    }

    #[tokio::test]
    async fn a_large_replay_happens_once_and_never_into_the_wrong_type() {
        let mut s = setup("me").await;
        let dead = dead_letter(&s).await.unwrap().unwrap();
        let _: () = s.con.set("{s}.elsewhere", "x").await.unwrap();
        let err = s
            .client
            .replay(DLQ, "{s}.elsewhere", &dead, "g")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("{s}.elsewhere"), "{err}");
        assert_eq!(len(&mut s, DLQ).await, 1, "the dead letter is kept");

        let before = len(&mut s, STREAM).await;
        let replayed = s.client.replay(DLQ, STREAM, &dead, "g").await.unwrap();
        assert!(replayed.is_some());
        assert_eq!(len(&mut s, DLQ).await, 0);
        assert_eq!(len(&mut s, STREAM).await, before + 1);
        let again = s.client.replay(DLQ, STREAM, &dead, "g").await.unwrap();
        assert_eq!(again, None);
        assert_eq!(len(&mut s, STREAM).await, before + 1, "replayed once");
    }
}
