//! [`MemoryStore`]: a [`Store`] in memory, for testing handlers without Redis.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::{Effect, Store, StoreFuture};

/// A [`Store`] that keeps everything in memory, for a handler's unit tests: hand it to
/// the handler through [`crate::HandlerContext::new`], apply the effects the handler
/// returns with [`Store::apply`] (as the runtime does with the acknowledgement), then look
/// at what was written.
///
/// Time to live is recorded, never enforced; `lag` and `consumers` answer what
/// [`MemoryStore::set_lag`] and [`MemoryStore::set_consumers`] said.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use streamworker_handlers::{Effect, MemoryStore, Store};
///
/// let store = MemoryStore::new();
/// store
///     .apply(vec![Effect::HashIncr { key: "totals".into(), field: "eur".into(), by: 5 }])
///     .await
///     .unwrap();
/// assert_eq!(store.hash("totals")["eur"], "5");
/// # });
/// ```
#[derive(Clone, Default)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
}

/// One stream entry's fields, in order.
type Fields = Vec<(Vec<u8>, Vec<u8>)>;

#[derive(Default)]
struct State {
    hashes: HashMap<String, BTreeMap<String, String>>,
    strings: HashMap<String, String>,
    streams: HashMap<String, Vec<Fields>>,
    published: Vec<(String, String)>,
    ttls: HashMap<String, Duration>,
    lags: HashMap<(String, String), u64>,
    consumers: HashMap<(String, String), Vec<(String, u64)>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock has failed already; its state is
        // still worth reading.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The fields of a hash (empty when missing).
    pub fn hash(&self, key: &str) -> BTreeMap<String, String> {
        self.state().hashes.get(key).cloned().unwrap_or_default()
    }

    /// A string value.
    pub fn string(&self, key: &str) -> Option<String> {
        self.state().strings.get(key).cloned()
    }

    /// The entries appended to a stream, oldest first.
    pub fn stream(&self, key: &str) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
        self.state().streams.get(key).cloned().unwrap_or_default()
    }

    /// The messages published, as `(channel, message)`, in order.
    pub fn published(&self) -> Vec<(String, String)> {
        self.state().published.clone()
    }

    /// The last time to live set on a key.
    pub fn ttl(&self, key: &str) -> Option<Duration> {
        self.state().ttls.get(key).copied()
    }

    /// What [`Store::lag`] answers for a group.
    pub fn set_lag(&self, stream: &str, group: &str, lag: u64) {
        self.state()
            .lags
            .insert((stream.to_owned(), group.to_owned()), lag);
    }

    /// What [`Store::consumers`] answers for a group: names with idle milliseconds.
    pub fn set_consumers(&self, stream: &str, group: &str, consumers: Vec<(String, u64)>) {
        self.state()
            .consumers
            .insert((stream.to_owned(), group.to_owned()), consumers);
    }

    fn apply_now(&self, effects: Vec<Effect>) {
        let mut state = self.state();
        for effect in effects {
            match effect {
                Effect::HashIncr { key, field, by } => {
                    let value = state
                        .hashes
                        .entry(key)
                        .or_default()
                        .entry(field)
                        .or_default();
                    let now = value.parse::<i64>().unwrap_or(0) + by;
                    *value = now.to_string();
                }
                Effect::HashIncrFloat { key, field, by } => {
                    let value = state
                        .hashes
                        .entry(key)
                        .or_default()
                        .entry(field)
                        .or_default();
                    let now = value.parse::<f64>().unwrap_or(0.0) + by;
                    *value = now.to_string();
                }
                Effect::HashSet { key, field, value } => {
                    state.hashes.entry(key).or_default().insert(field, value);
                }
                Effect::Expire { key, ttl } => {
                    state.ttls.insert(key, ttl);
                }
                Effect::StreamAdd {
                    key,
                    fields,
                    max_len,
                } => {
                    let stream = state.streams.entry(key).or_default();
                    stream.push(fields);
                    if let Some(max) = max_len.and_then(|n| usize::try_from(n).ok())
                        && stream.len() > max
                    {
                        let excess = stream.len() - max;
                        stream.drain(..excess);
                    }
                }
                Effect::Publish { channel, message } => {
                    state.published.push((channel, message));
                }
            }
        }
    }
}

impl Store for MemoryStore {
    fn apply(&self, effects: Vec<Effect>) -> StoreFuture<'_, ()> {
        self.apply_now(effects);
        Box::pin(async { Ok(()) })
    }

    fn hashes(&self, keys: Vec<String>) -> StoreFuture<'_, Vec<Vec<(String, String)>>> {
        let state = self.state();
        let out = keys
            .iter()
            .map(|k| {
                state
                    .hashes
                    .get(k)
                    .map(|h| h.iter().map(|(f, v)| (f.clone(), v.clone())).collect())
                    .unwrap_or_default()
            })
            .collect();
        Box::pin(async { Ok(out) })
    }

    fn get(&self, key: String) -> StoreFuture<'_, Option<String>> {
        let value = self.string(&key);
        Box::pin(async { Ok(value) })
    }

    fn set(&self, key: String, value: String, ttl: Option<Duration>) -> StoreFuture<'_, ()> {
        let mut state = self.state();
        if let Some(ttl) = ttl {
            state.ttls.insert(key.clone(), ttl);
        }
        state.strings.insert(key, value);
        Box::pin(async { Ok(()) })
    }

    fn mark(&self, key: String, ttl: Duration) -> StoreFuture<'_, bool> {
        let mut state = self.state();
        let fresh = !state.strings.contains_key(&key);
        if fresh {
            state.ttls.insert(key.clone(), ttl);
            state.strings.insert(key, "1".to_owned());
        }
        Box::pin(async move { Ok(fresh) })
    }

    fn lag(&self, stream: String, group: String) -> StoreFuture<'_, Option<u64>> {
        let lag = self.state().lags.get(&(stream, group)).copied();
        Box::pin(async move { Ok(lag) })
    }

    fn consumers(
        &self,
        stream: String,
        group: String,
    ) -> StoreFuture<'_, Option<Vec<(String, u64)>>> {
        let consumers = self.state().consumers.get(&(stream, group)).cloned();
        Box::pin(async move { Ok(consumers) })
    }
}
