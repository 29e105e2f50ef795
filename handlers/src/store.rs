//! The narrow store the runtime gives handlers that keep state. Handlers never see the
//! Redis client: they can read hashes and small values, set markers, and apply effects —
//! nothing that could acknowledge an entry or reach another group's data by accident.

use std::future::Future;
use std::pin::Pin;
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
