//! The lease on a consumer name. Two live processes sharing a name would read each other's
//! pending entries as their own; so a process takes `SET NX PX` on
//! `streamworker:lease:{<stream>}:<group>:<consumer>` before it reads, renews it while it
//! runs and gives it up at shutdown.
//!
//! At startup a lease still held by a process that died (SIGKILL, OOM) is waited out: its
//! remaining time only falls. A lease whose remaining time goes *up* is being renewed by a
//! live process, and startup is refused.

use std::time::Duration;

use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;

use crate::client::{Client, ClientError};

/// How long a lease lives without renewal.
pub const TTL: Duration = Duration::from_secs(10);
/// How often it is renewed.
pub const RENEW_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(
        "consumer name {consumer:?} of group {group:?} on stream {stream:?} is in use by another live process (lease {key} is being renewed); two processes sharing a consumer name would take each other's pending entries. Give each process its own name with worker.consumer (default \"{{hostname}}-{{pid}}\") or STREAMWORKER__WORKER__CONSUMER"
    )]
    Held {
        stream: String,
        group: String,
        consumer: String,
        key: String,
    },
    #[error(transparent)]
    Redis(#[from] ClientError),
}

/// A lease this process holds.
#[derive(Debug)]
pub struct Lease {
    client: Client,
    key: String,
    token: String,
    lost: CancellationToken,
    renewer: tokio::task::JoinHandle<()>,
}

impl Lease {
    /// Takes the lease, waiting out one left by a dead process.
    pub async fn acquire(
        client: &Client,
        stream: &str,
        group: &str,
        consumer: &str,
        token: &str,
    ) -> Result<Self, LeaseError> {
        let key = crate::keys::lease_key(stream, group, consumer);
        let started = Instant::now();
        let mut last_ttl: Option<Duration> = None;
        let mut logged = false;
        loop {
            match client.lease(&key, token, TTL).await? {
                None => break,
                Some(ttl) => {
                    let renewed =
                        last_ttl.is_some_and(|last| ttl > last + Duration::from_millis(200));
                    if renewed || started.elapsed() > TTL + RENEW_EVERY * 2 {
                        return Err(LeaseError::Held {
                            stream: stream.into(),
                            group: group.into(),
                            consumer: consumer.into(),
                            key,
                        });
                    }
                    if !logged {
                        tracing::warn!(
                            stream, group, consumer, lease = %key,
                            expires_in_ms = ttl.as_millis() as u64,
                            "consumer name is leased by another process; waiting to see whether it is still alive"
                        );
                        logged = true;
                    }
                    last_ttl = Some(ttl);
                    sleep(Duration::from_millis(250)).await;
                }
            }
        }
        let lost = CancellationToken::new();
        let renewer = tokio::spawn(renew(
            client.clone(),
            key.clone(),
            token.to_owned(),
            lost.clone(),
        ));
        Ok(Self {
            client: client.clone(),
            key,
            token: token.to_owned(),
            lost,
            renewer,
        })
    }

    /// Resolves if another process took the lease (ours expired during a long outage).
    pub async fn lost(&self) {
        self.lost.cancelled().await
    }

    /// Gives the lease up so a successor with the same name need not wait.
    pub async fn release(self) {
        self.renewer.abort();
        if let Err(e) = self.client.release_lease(&self.key, &self.token).await {
            tracing::debug!(error = %e, lease = %self.key, "could not release the lease; it expires by itself");
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

async fn renew(client: Client, key: String, token: String, lost: CancellationToken) {
    loop {
        sleep(RENEW_EVERY).await;
        match client.lease(&key, &token, TTL).await {
            Ok(None) => {}
            Ok(Some(_)) => {
                tracing::error!(lease = %key, "another process took this consumer name's lease");
                lost.cancel();
                return;
            }
            // Redis unreachable: keep trying; the group notices the outage by itself.
            Err(e) => tracing::debug!(error = %e, lease = %key, "could not renew the lease"),
        }
    }
}
