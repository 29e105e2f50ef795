//! The `Store` handlers get: a narrow view of Redis through `client`, so a handler can keep
//! state without holding the client (and so without being able to acknowledge anything).

use std::time::Duration;

use streamworker_handlers::{Effect, Store, StoreError, StoreFuture};

use crate::client::{Client, ClientError};

pub struct RedisStore {
    client: Client,
}

impl RedisStore {
    pub fn new(client: Client) -> Self {
        Self { client }
    }
}

fn store_error(e: ClientError) -> StoreError {
    StoreError(e.to_string())
}

impl Store for RedisStore {
    fn apply(&self, effects: Vec<Effect>) -> StoreFuture<'_, ()> {
        Box::pin(async move { self.client.apply(&effects).await.map_err(store_error) })
    }

    fn hashes(&self, keys: Vec<String>) -> StoreFuture<'_, Vec<Vec<(String, String)>>> {
        Box::pin(async move { self.client.hashes(&keys).await.map_err(store_error) })
    }

    fn get(&self, key: String) -> StoreFuture<'_, Option<String>> {
        Box::pin(async move { self.client.get(&key).await.map_err(store_error) })
    }

    fn set(&self, key: String, value: String, ttl: Option<Duration>) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            self.client
                .set(&key, &value, ttl)
                .await
                .map_err(store_error)
        })
    }

    fn mark(&self, key: String, ttl: Duration) -> StoreFuture<'_, bool> {
        Box::pin(async move { self.client.mark(&key, ttl).await.map_err(store_error) })
    }

    fn lag(&self, stream: String, group: String) -> StoreFuture<'_, Option<u64>> {
        Box::pin(async move {
            let groups = self.client.groups(&stream).await.map_err(store_error)?;
            Ok(groups
                .into_iter()
                .find(|g| g.name == group)
                .and_then(|g| g.lag))
        })
    }

    fn consumers(
        &self,
        stream: String,
        group: String,
    ) -> StoreFuture<'_, Option<Vec<(String, u64)>>> {
        Box::pin(async move {
            let consumers = self
                .client
                .consumers(&stream, &group)
                .await
                .map_err(store_error)?;
            // The parking consumer holds retries waiting out their backoff; it reads
            // nothing, so it is no consumer a handler (alerts' consumer rules) should count.
            Ok(consumers.map(|c| {
                c.into_iter()
                    .filter(|c| c.name != crate::keys::BACKOFF_CONSUMER)
                    .map(|c| (c.name, c.idle_ms))
                    .collect()
            }))
        })
    }
}
