//! `streamworker stats -c FILE --group NAME --since 1h [--top N] [--json]`: what a group's
//! handler has aggregated, read from its aggregates in Redis, never by rereading the stream.
//!
//! One submodule per handler kind that keeps statistics, dispatched on the group's handler.
//! To add a kind: a submodule with its `run`, a branch in [`run`] and its name in [`KINDS`];
//! [`minutes`] and [`read_hashes`] are there for any kind that keeps per-minute hashes.

mod analytics;
mod learning;

use std::ops::RangeInclusive;
use std::time::Duration;

use futures_util::StreamExt;
use streamworker_handlers::analytics::AnalyticsOptions;
use streamworker_handlers::learning::LearningOptions;

use crate::client::{Client, ClientError};
use crate::config::GroupConfig;

/// The handler kinds `stats` reports on.
pub const KINDS: &[&str] = &["analytics", "learning"];

/// What the operator asked for.
#[derive(Debug, Clone)]
pub struct Query {
    /// How far back: every minute from `now − since` to the current one, both included.
    pub since: Duration,
    /// How many values of each dimension to show, most entries first; 0 for all.
    pub top: usize,
    pub json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// `Ok` when `stats` can report on this group; otherwise why not, naming the kinds it can.
pub fn supported(group: &GroupConfig) -> Result<(), String> {
    let kind = group.handler.kind();
    if KINDS.contains(&kind) {
        return Ok(());
    }
    Err(format!(
        "group {:?} runs handler \"{kind}\", which keeps no statistics; `stats` reports on groups whose handler is {}",
        group.name,
        KINDS
            .iter()
            .map(|k| format!("\"{k}\""))
            .collect::<Vec<_>>()
            .join(" or ")
    ))
}

/// Reads the group's aggregates for the query and renders them (a table, or JSON).
pub async fn run(
    client: &Client,
    group: &GroupConfig,
    query: &Query,
) -> Result<String, StatsError> {
    if let Some(options) = group.handler.options::<AnalyticsOptions>() {
        Ok(analytics::run(client, group, options, query).await?)
    } else if let Some(options) = group.handler.options::<LearningOptions>() {
        Ok(learning::run(client, group, options, query).await?)
    } else {
        Err(StatsError::Unsupported(
            supported(group).err().unwrap_or_default(),
        ))
    }
}

const MINUTE_MS: u64 = 60_000;

/// The unix minutes a query covers, as of `now_ms` (the server's clock).
pub fn minutes(now_ms: u64, since: Duration) -> RangeInclusive<u64> {
    let since_ms = since.as_millis() as u64;
    (now_ms.saturating_sub(since_ms) / MINUTE_MS)..=(now_ms / MINUTE_MS)
}

/// Keys read per pipeline, and pipelines in flight at once: a week of minutes (10,080 keys)
/// is 40 pipelines, four at a time, each well under the command timeout.
const KEYS_PER_PIPELINE: usize = 256;
const PIPELINES_IN_FLIGHT: usize = 4;

/// HGETALL of every key, pipelined, handing each non-empty hash to `each` as it arrives
/// (in no particular order), so memory holds a few pipelines' replies, not all of them.
pub async fn read_hashes(
    client: &Client,
    keys: Vec<String>,
    mut each: impl FnMut(Vec<(String, String)>),
) -> Result<(), ClientError> {
    let chunks: Vec<Vec<String>> = keys
        .chunks(KEYS_PER_PIPELINE)
        .map(<[String]>::to_vec)
        .collect();
    let mut replies = futures_util::stream::iter(chunks)
        .map(|chunk| async move { client.hashes(&chunk).await })
        .buffer_unordered(PIPELINES_IN_FLIGHT);
    while let Some(reply) = replies.next().await {
        for hash in reply? {
            if !hash.is_empty() {
                each(hash);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minutes_cover_since_and_the_current_minute() {
        let now = 1_700_000_061_234; // 1.234 s into minute 28333334
        assert_eq!(
            minutes(now, Duration::from_secs(3600)),
            28_333_274..=28_333_334
        );
        assert_eq!(
            minutes(now, Duration::from_secs(1)),
            28_333_334..=28_333_334
        );
        assert_eq!(minutes(5, Duration::from_secs(60)), 0..=0);
    }
}
