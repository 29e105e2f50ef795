//! What Redis says about the configured streams and their groups: the facts behind
//! `streamworker status` and behind the group gauges on `/metrics` (one place serves both).

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::client::{Client, ClientError, ConsumerInfo};
use crate::config::Config;
use crate::keys::BACKOFF_CONSUMER;

/// A recorded circuit older than this is from a replica that stopped refreshing it.
const CIRCUIT_STALE: Duration = Duration::from_secs(15);
/// How many of the oldest pending entries are looked at for the oldest-pending age.
const PENDING_SAMPLE: usize = 100;

#[derive(Debug, Clone, Serialize)]
pub struct StreamReport {
    pub stream: String,
    pub length: u64,
    pub groups: Vec<GroupReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GroupReport {
    pub group: String,
    /// Configured in this file (false: a group of another application on the stream).
    pub managed: bool,
    /// Entries not yet delivered to the group; `None` when Redis cannot tell.
    pub lag: Option<u64>,
    pub pending: u64,
    /// Of `pending`, entries waiting out a retry backoff.
    pub retrying: u64,
    pub last_delivered_id: String,
    /// Idle time of the longest-idle of the oldest pending entries.
    pub oldest_pending_seconds: Option<f64>,
    pub consumers: Vec<ConsumerInfo>,
    pub dead_letter_stream: Option<String>,
    pub dead_letter_length: Option<u64>,
    /// Replicas whose circuit breaker is not closed: (consumer, state).
    pub circuits: Vec<CircuitReport>,
    /// Paused by `streamworker pause` (every replica stops reading within a
    /// `claim_interval`); always false for a group not configured in this file.
    pub paused: bool,
    /// For a partition of a partitioned group: which partition, and who runs it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<PartitionReport>,
}

/// One partition of a partitioned group, as its lease says.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionReport {
    /// The partition's number, from 0.
    pub partition: u32,
    /// Of how many.
    pub partitions: u32,
    /// The base stream the partition belongs to.
    pub stream: String,
    /// The consumer name of the replica holding the partition's lease; `None`: nobody.
    pub owner: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CircuitReport {
    pub consumer: String,
    /// `open` or `half_open`.
    pub state: String,
}

impl GroupReport {
    /// `closed` unless some replica's breaker is open or half-open.
    pub fn circuit_summary(&self) -> String {
        if self.circuits.is_empty() {
            "closed".into()
        } else {
            self.circuits
                .iter()
                .map(|c| format!("{}:{}", c.consumer, c.state))
                .collect::<Vec<_>>()
                .join(",")
        }
    }
}

/// The streams the configuration names: every group's stream (each partition's, for a
/// partitioned group), then `[streams.*]` tables.
pub fn streams_of(config: &Config) -> Vec<String> {
    let mut seen = BTreeSet::new();
    config
        .groups
        .values()
        .flat_map(|g| match g.partitions {
            Some(n) => crate::partition::partition_streams(&g.stream, n).collect(),
            None => vec![g.stream.clone()],
        })
        .chain(config.streams.keys().cloned())
        .filter(|s| seen.insert(s.clone()))
        .collect()
}

pub async fn inspect(client: &Client, config: &Config) -> Result<Vec<StreamReport>, ClientError> {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    let mut reports = Vec::new();
    for stream in streams_of(config) {
        let length = client.xlen(&stream).await?;
        let mut groups = Vec::new();
        for info in client.groups(&stream).await? {
            // A partition of a configured group counts as that group on that stream.
            let configured = config
                .groups
                .values()
                .filter(|g| g.name == info.name)
                .find_map(|g| match g.partitions {
                    None => (g.stream == stream).then_some((std::borrow::Cow::Borrowed(g), None)),
                    Some(n) => (0..n)
                        .find(|p| crate::partition::partition_stream(&g.stream, *p) == stream)
                        .map(|p| {
                            let part = PartitionReport {
                                partition: p,
                                partitions: n,
                                stream: g.stream.clone(),
                                owner: None,
                            };
                            let config = crate::partition::group_of(g, p);
                            (std::borrow::Cow::Owned((*config).clone()), Some(part))
                        }),
                });
            let (configured, partition) = match configured {
                Some((g, part)) => (Some(g), part),
                None => (None, None),
            };
            let partition = match partition {
                Some(mut part) => {
                    let key = crate::keys::partition_lease_key(&stream, &info.name);
                    part.owner = client.get(&key).await?;
                    Some(part)
                }
                None => None,
            };
            // None: the group was destroyed since XINFO GROUPS listed it.
            let consumers = client
                .consumers(&stream, &info.name)
                .await?
                .unwrap_or_default();
            let retrying = consumers
                .iter()
                .find(|c| c.name == BACKOFF_CONSUMER)
                .map_or(0, |c| c.pending);
            let oldest_pending_seconds = if info.pending > 0 {
                client
                    .oldest_pending_idle(&stream, &info.name, PENDING_SAMPLE)
                    .await?
                    .map(|d| d.as_secs_f64())
            } else {
                None
            };
            let paused = match configured {
                Some(_) => client.paused_since(&stream, &info.name).await?.is_some(),
                None => false,
            };
            let (dead_letter_stream, dead_letter_length, circuits) = match &configured {
                Some(g) => {
                    let dlq = g.dead_letter_stream();
                    let length = client.xlen(&dlq).await?;
                    let circuits = client
                        .circuits(&stream, &info.name)
                        .await?
                        .into_iter()
                        .filter(|(_, _, at)| {
                            now_ms.saturating_sub(*at) < CIRCUIT_STALE.as_millis() as u64
                        })
                        .map(|(consumer, state, _)| CircuitReport { consumer, state })
                        .collect();
                    (Some(dlq), Some(length), circuits)
                }
                None => (None, None, Vec::new()),
            };
            groups.push(GroupReport {
                group: info.name.clone(),
                managed: configured.is_some(),
                lag: info.lag,
                pending: info.pending,
                retrying,
                last_delivered_id: info.last_delivered_id,
                oldest_pending_seconds,
                consumers: consumers
                    .into_iter()
                    .filter(|c| c.name != BACKOFF_CONSUMER)
                    .collect(),
                dead_letter_stream,
                dead_letter_length,
                circuits,
                paused,
                partition,
            });
        }
        reports.push(StreamReport {
            stream,
            length,
            groups,
        });
    }
    Ok(reports)
}
