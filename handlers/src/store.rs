//! The narrow store the runtime gives handlers that keep state. Handlers never see the
//! Redis client: they can read hashes and small values, set markers, and apply effects —
//! nothing that could acknowledge an entry or reach another group's data by accident.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use crate::Effect;

#[derive(Debug, Clone, thiserror::Error)]
#[error("store: {0}")]
pub struct StoreError(pub String);

pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

pub trait Store: Send + Sync + 'static {
    /// Applies effects now, atomically, not tied to any entry's acknowledgement (for
    /// periodic work such as firing an alert).
    fn apply(&self, effects: Vec<Effect>) -> StoreFuture<'_, ()>;
    /// The fields of each hash (empty for a missing key), in the order asked.
    fn hashes(&self, keys: Vec<String>) -> StoreFuture<'_, Vec<Vec<(String, String)>>>;
    /// A string value.
    fn get(&self, key: String) -> StoreFuture<'_, Option<String>>;
    /// Sets a string value, with an optional time to live.
    fn set(&self, key: String, value: String, ttl: Option<Duration>) -> StoreFuture<'_, ()>;
    /// Sets `key` only if it does not exist (SET NX PX): `true` when this call set it.
    /// For markers that make side effects outside Redis idempotent.
    fn mark(&self, key: String, ttl: Duration) -> StoreFuture<'_, bool>;
    /// The lag of a consumer group (XINFO GROUPS), `None` when Redis cannot tell or the
    /// group does not exist.
    fn lag(&self, stream: String, group: String) -> StoreFuture<'_, Option<u64>>;
    /// The consumers of a group with the time since Redis last saw each read (XINFO
    /// CONSUMERS `idle`, milliseconds); `None` when the stream or the group does not exist.
    /// Readers only: the runtime leaves out the consumer it parks retries with.
    fn consumers(
        &self,
        stream: String,
        group: String,
    ) -> StoreFuture<'_, Option<Vec<(String, u64)>>>;
}

/// A [`Store`] call, to make it fail in a [`MemoryStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoreCall {
    Apply,
    Hashes,
    Get,
    Set,
    Mark,
    Lag,
    Consumers,
}

/// An in-memory [`Store`], for testing a handler without Redis.
///
/// It keeps what Redis would keep for the calls handlers make — strings, hashes, the
/// entries added to streams, the messages published — and applies [`Effect`]s as Redis
/// applies their commands. Time does not pass: TTLs are recorded ([`MemoryStore::ttl`])
/// but nothing expires; [`MemoryStore::remove`] forgets a key as its expiry would.
///
/// A handler's test drives it the way the runtime does: call [`crate::Handler::handle`],
/// then [`MemoryStore::commit`] the effects of an `Ok` (the runtime applies them with the
/// entry's acknowledgement), and call [`crate::Handler::tick`] for periodic work, which
/// reaches the store through [`Store::apply`] and the reads. For example:
///
/// ```
/// use std::sync::Arc;
/// use streamworker_handlers::{Effect, MemoryStore, Store};
///
/// let store = Arc::new(MemoryStore::new());
/// // What a handler's `Ok(effects)` asks for, applied as the runtime would at the XACK.
/// store
///     .commit(&[Effect::HashIncr { key: "k".into(), field: "n".into(), by: 2 }])
///     .unwrap();
/// assert_eq!(store.hash("k")["n"], "2");
/// // The handler itself holds the store as `Arc<dyn Store>`.
/// let _for_the_handler: Arc<dyn Store> = store.clone();
/// ```
///
/// Lags and consumers of groups are what the test sets ([`MemoryStore::set_lag`],
/// [`MemoryStore::set_consumers`]); unset, a group is unknown (`None`). Any call can be
/// made to fail with [`MemoryStore::fail`], as it would with Redis unreachable.
#[derive(Debug, Default)]
pub struct MemoryStore {
    data: Mutex<Data>,
}

#[derive(Debug, Default)]
struct Data {
    strings: HashMap<String, String>,
    hashes: HashMap<String, BTreeMap<String, String>>,
    streams: HashMap<String, Vec<Vec<(String, String)>>>,
    published: Vec<(String, String)>,
    ttls: HashMap<String, Duration>,
    applied: Vec<Effect>,
    lags: HashMap<(String, String), u64>,
    consumers: HashMap<(String, String), Vec<(String, u64)>>,
    failing: HashSet<StoreCall>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn data(&self) -> MutexGuard<'_, Data> {
        // A test that panicked while holding the lock leaves consistent data behind.
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `effects` as the runtime does when it acknowledges the entry whose handler
    /// returned them, in order; stops at the first that Redis would refuse (an increment
    /// of a field that is not a number).
    pub fn commit(&self, effects: &[Effect]) -> Result<(), StoreError> {
        let mut data = self.data();
        effects.iter().try_for_each(|e| data.run(e))
    }

    /// The fields of a hash (empty when it does not exist).
    pub fn hash(&self, key: &str) -> BTreeMap<String, String> {
        self.data().hashes.get(key).cloned().unwrap_or_default()
    }

    /// Sets fields of a hash, as HSET would.
    pub fn set_hash<K: Into<String>, V: Into<String>>(
        &self,
        key: &str,
        fields: impl IntoIterator<Item = (K, V)>,
    ) {
        let mut data = self.data();
        let hash = data.hashes.entry(key.to_owned()).or_default();
        for (field, value) in fields {
            hash.insert(field.into(), value.into());
        }
    }

    /// A string value ([`Store::set`], [`Store::mark`]).
    pub fn value(&self, key: &str) -> Option<String> {
        self.data().strings.get(key).cloned()
    }

    /// Forgets a key of any type, as its expiry (or a DEL) would.
    pub fn remove(&self, key: &str) {
        let mut data = self.data();
        data.strings.remove(key);
        data.hashes.remove(key);
        data.streams.remove(key);
        data.ttls.remove(key);
    }

    /// The fields of each entry added to a stream, oldest first (invalid UTF-8 replaced).
    pub fn stream(&self, key: &str) -> Vec<Vec<(String, String)>> {
        self.data().streams.get(key).cloned().unwrap_or_default()
    }

    /// The messages published on a channel, oldest first.
    pub fn published(&self, channel: &str) -> Vec<String> {
        self.data()
            .published
            .iter()
            .filter(|(c, _)| c == channel)
            .map(|(_, m)| m.clone())
            .collect()
    }

    /// The time to live last given to a key.
    pub fn ttl(&self, key: &str) -> Option<Duration> {
        self.data().ttls.get(key).copied()
    }

    /// Every effect applied through [`Store::apply`] (periodic work, not entries'
    /// effects), in order.
    pub fn applied(&self) -> Vec<Effect> {
        self.data().applied.clone()
    }

    /// What [`Store::lag`] answers for a group; `None` for a group Redis does not know.
    pub fn set_lag(&self, stream: &str, group: &str, lag: Option<u64>) {
        let key = (stream.to_owned(), group.to_owned());
        let mut data = self.data();
        match lag {
            Some(lag) => data.lags.insert(key, lag),
            None => data.lags.remove(&key),
        };
    }

    /// What [`Store::consumers`] answers for a group: each consumer's name and idle time
    /// (ms); `None` for a group Redis does not know.
    pub fn set_consumers(&self, stream: &str, group: &str, consumers: Option<Vec<(String, u64)>>) {
        let key = (stream.to_owned(), group.to_owned());
        let mut data = self.data();
        match consumers {
            Some(consumers) => data.consumers.insert(key, consumers),
            None => data.consumers.remove(&key),
        };
    }

    /// Makes every `call` fail (`true`) or work again (`false`), as with Redis unreachable.
    pub fn fail(&self, call: StoreCall, failing: bool) {
        let mut data = self.data();
        if failing {
            data.failing.insert(call);
        } else {
            data.failing.remove(&call);
        }
    }

    /// The data, unless `call` was made to fail.
    fn serve(&self, call: StoreCall) -> Result<MutexGuard<'_, Data>, StoreError> {
        let data = self.data();
        if data.failing.contains(&call) {
            return Err(StoreError(format!(
                "{call:?} failed: the MemoryStore was told to fail it"
            )));
        }
        Ok(data)
    }
}

impl Data {
    fn run(&mut self, effect: &Effect) -> Result<(), StoreError> {
        let not_a_number = |key: &str, field: &str| {
            StoreError(format!("{key} {field}: hash value is not a number"))
        };
        match effect {
            Effect::HashIncr { key, field, by } => {
                let value = self.field(key, field);
                let n: i64 = value.parse().map_err(|_| not_a_number(key, field))?;
                *value = (n + by).to_string();
            }
            Effect::HashIncrFloat { key, field, by } => {
                let value = self.field(key, field);
                let x: f64 = value.parse().map_err(|_| not_a_number(key, field))?;
                // Rust prints an f64 without exponent or trailing zeros, as Redis does.
                *value = (x + by).to_string();
            }
            Effect::HashSet { key, field, value } => {
                *self.field(key, field) = value.clone();
            }
            Effect::Expire { key, ttl } => {
                // PEXPIRE on a missing key does nothing.
                let exists = self.strings.contains_key(key)
                    || self.hashes.contains_key(key)
                    || self.streams.contains_key(key);
                if exists {
                    self.ttls.insert(key.clone(), *ttl);
                }
            }
            Effect::StreamAdd {
                key,
                fields,
                max_len,
            } => {
                let lossy = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
                let entries = self.streams.entry(key.clone()).or_default();
                entries.push(fields.iter().map(|(k, v)| (lossy(k), lossy(v))).collect());
                if let Some(max) = max_len.and_then(|m| usize::try_from(m).ok()) {
                    let over = entries.len().saturating_sub(max);
                    entries.drain(..over);
                }
            }
            Effect::Publish { channel, message } => {
                self.published.push((channel.clone(), message.clone()));
            }
            Effect::StreamAddAt { key, fields, .. } => {
                let lossy = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
                let entries = self.streams.entry(key.clone()).or_default();
                entries.push(fields.iter().map(|(k, v)| (lossy(k), lossy(v))).collect());
            }
        }
        Ok(())
    }

    /// A hash field, "0" when new (as HINCRBY starts from).
    fn field(&mut self, key: &str, field: &str) -> &mut String {
        self.hashes
            .entry(key.to_owned())
            .or_default()
            .entry(field.to_owned())
            .or_insert_with(|| "0".to_owned())
    }
}

impl Store for MemoryStore {
    fn apply(&self, effects: Vec<Effect>) -> StoreFuture<'_, ()> {
        let result = self.serve(StoreCall::Apply).and_then(|mut data| {
            data.applied.extend(effects.iter().cloned());
            effects.iter().try_for_each(|e| data.run(e))
        });
        Box::pin(async move { result })
    }

    fn hashes(&self, keys: Vec<String>) -> StoreFuture<'_, Vec<Vec<(String, String)>>> {
        let result = self.serve(StoreCall::Hashes).map(|data| {
            keys.iter()
                .map(|k| {
                    data.hashes
                        .get(k)
                        .map(|h| h.iter().map(|(f, v)| (f.clone(), v.clone())).collect())
                        .unwrap_or_default()
                })
                .collect()
        });
        Box::pin(async move { result })
    }

    fn get(&self, key: String) -> StoreFuture<'_, Option<String>> {
        let result = self
            .serve(StoreCall::Get)
            .map(|data| data.strings.get(&key).cloned());
        Box::pin(async move { result })
    }

    fn set(&self, key: String, value: String, ttl: Option<Duration>) -> StoreFuture<'_, ()> {
        let result = self.serve(StoreCall::Set).map(|mut data| {
            // SET without a TTL clears an earlier one.
            match ttl {
                Some(ttl) => data.ttls.insert(key.clone(), ttl),
                None => data.ttls.remove(&key),
            };
            data.strings.insert(key, value);
        });
        Box::pin(async move { result })
    }

    fn mark(&self, key: String, ttl: Duration) -> StoreFuture<'_, bool> {
        let result = self.serve(StoreCall::Mark).map(|mut data| {
            if data.strings.contains_key(&key) {
                return false;
            }
            data.ttls.insert(key.clone(), ttl);
            data.strings.insert(key, "1".to_owned());
            true
        });
        Box::pin(async move { result })
    }

    fn lag(&self, stream: String, group: String) -> StoreFuture<'_, Option<u64>> {
        let result = self
            .serve(StoreCall::Lag)
            .map(|data| data.lags.get(&(stream, group)).copied());
        Box::pin(async move { result })
    }

    fn consumers(
        &self,
        stream: String,
        group: String,
    ) -> StoreFuture<'_, Option<Vec<(String, u64)>>> {
        let result = self
            .serve(StoreCall::Consumers)
            .map(|data| data.consumers.get(&(stream, group)).cloned());
        Box::pin(async move { result })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn effects_apply_as_redis_applies_their_commands() {
        let store = MemoryStore::new();
        let incr = |by| Effect::HashIncr {
            key: "h".into(),
            field: "n".into(),
            by,
        };
        store.commit(&[incr(2), incr(3)]).unwrap();
        store
            .commit(&[
                Effect::HashIncrFloat {
                    key: "h".into(),
                    field: "x".into(),
                    by: 0.5,
                },
                Effect::HashIncrFloat {
                    key: "h".into(),
                    field: "x".into(),
                    by: 2.5,
                },
                Effect::Expire {
                    key: "h".into(),
                    ttl: Duration::from_secs(9),
                },
                Effect::Expire {
                    key: "missing".into(),
                    ttl: Duration::from_secs(9),
                },
            ])
            .unwrap();
        assert_eq!(store.hash("h")["n"], "5");
        assert_eq!(store.hash("h")["x"], "3");
        assert_eq!(store.ttl("h"), Some(Duration::from_secs(9)));
        assert_eq!(store.ttl("missing"), None, "PEXPIRE of a missing key");
        store.set_hash("h", [("s", "text")]);
        let refused = Effect::HashIncr {
            key: "h".into(),
            field: "s".into(),
            by: 1,
        };
        assert!(store.commit(&[refused]).is_err());

        let add = |n: &str| Effect::StreamAdd {
            key: "out".into(),
            fields: vec![(b"n".to_vec(), n.as_bytes().to_vec())],
            max_len: Some(2),
        };
        store.commit(&[add("1"), add("2"), add("3")]).unwrap();
        let ns: Vec<String> = store
            .stream("out")
            .into_iter()
            .map(|e| e[0].1.clone())
            .collect();
        assert_eq!(ns, ["2", "3"], "MAXLEN keeps the newest");
        store
            .commit(&[Effect::Publish {
                channel: "c".into(),
                message: "m".into(),
            }])
            .unwrap();
        assert_eq!(store.published("c"), ["m"]);
        assert!(store.applied().is_empty(), "commit is not Store::apply");
    }

    #[test]
    fn calls_read_and_write_like_redis_and_fail_on_demand() {
        let store = MemoryStore::new();
        block_on(async {
            assert!(
                store
                    .mark("m".into(), Duration::from_secs(5))
                    .await
                    .unwrap()
            );
            assert!(
                !store
                    .mark("m".into(), Duration::from_secs(5))
                    .await
                    .unwrap()
            );
            assert_eq!(store.value("m").as_deref(), Some("1"));
            store.remove("m");
            assert_eq!(store.get("m".into()).await.unwrap(), None);
            store.set("s".into(), "v".into(), None).await.unwrap();
            assert_eq!(store.get("s".into()).await.unwrap().as_deref(), Some("v"));
            store.set_hash("h", [("a", "1")]);
            let got = store.hashes(vec!["h".into(), "none".into()]).await.unwrap();
            assert_eq!(got, vec![vec![("a".to_owned(), "1".to_owned())], vec![]]);
            assert_eq!(store.lag("s".into(), "g".into()).await.unwrap(), None);
            store.set_lag("s", "g", Some(7));
            assert_eq!(store.lag("s".into(), "g".into()).await.unwrap(), Some(7));
            store.set_consumers("s", "g", Some(vec![("c".into(), 10)]));
            let consumers = store.consumers("s".into(), "g".into()).await.unwrap();
            assert_eq!(consumers, Some(vec![("c".to_owned(), 10)]));
            let event = Effect::Publish {
                channel: "c".into(),
                message: "m".into(),
            };
            store.apply(vec![event.clone()]).await.unwrap();
            assert_eq!(store.applied(), vec![event.clone()]);
            store.fail(StoreCall::Apply, true);
            assert!(store.apply(vec![event.clone()]).await.is_err());
            assert_eq!(
                store.published("c").len(),
                1,
                "a failed call changes nothing"
            );
            store.fail(StoreCall::Apply, false);
            store.apply(vec![event]).await.unwrap();
            assert_eq!(store.published("c").len(), 2);
        });
    }
}
