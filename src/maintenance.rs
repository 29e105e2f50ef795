//! Housekeeping each replica does on a jittered interval, none of it on an entry's path:
//! - retention: trim streams per `[streams.<name>] retention`, never below what any group
//!   still needs (`retention.lua`);
//! - forgetting consumers of replicas long gone (nothing pending, idle past
//!   `consumer_ttl`), so `XINFO CONSUMERS` does not grow forever under autoscaling;
//! - refreshing the group gauges from what Redis reports (any replica may export them).
//!
//! Every step is idempotent, so replicas doing it concurrently do no harm.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::{Instant, sleep};

use crate::client::Client;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// How often the housekeeping runs (plus up to 20 % jitter).
pub const INTERVAL: Duration = Duration::from_secs(5);
/// The most entries one retention call reads for a length bound. The call is a script, and
/// Redis serves nothing else while it runs (100,000 entries of 1 KB took ~2 s), so a stream
/// far over its length is trimmed in steps of this size, one right after the other.
const TRIM_STEP: usize = 1_000;
/// The most retention calls per stream in one housekeeping round (a million entries);
/// whatever is left, say because producers outpace the trim, waits for the next round.
const TRIM_CALLS: usize = 1_000;

pub async fn run(
    client: Client,
    config: Arc<Config>,
    consumer: String,
    metrics: Metrics,
    health: crate::health::Health,
    shutdown: Shutdown,
) {
    let mut forget_at: Vec<Instant> = config.groups.values().map(|_| Instant::now()).collect();
    loop {
        retention(&client, &config, &metrics).await;
        for (group, due) in config.groups.values().zip(forget_at.iter_mut()) {
            if Instant::now() < *due {
                continue;
            }
            *due = Instant::now()
                + (group.consumer_ttl / 10)
                    .clamp(Duration::from_secs(10), Duration::from_secs(300));
            // A partitioned group's consumers live on its partitions' streams.
            let streams: Vec<String> = match group.partitions {
                Some(n) => crate::partition::partition_streams(&group.stream, n).collect(),
                None => vec![group.stream.clone()],
            };
            for stream in &streams {
                match client
                    .forget_consumers(stream, &group.name, group.consumer_ttl, &[&consumer])
                    .await
                {
                    Ok(gone) if !gone.is_empty() => tracing::info!(
                        stream = %stream, group = %group.name, consumers = ?gone,
                        "deleted consumers with nothing pending, idle longer than consumer_ttl"
                    ),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(stream = %stream, group = %group.name, error = %e, "could not clean up consumers")
                    }
                }
            }
        }
        match crate::inspect::inspect(&client, &config).await {
            Ok(reports) => {
                metrics.set_group_gauges(&reports);
                health.set_lags(&reports);
            }
            Err(e) => tracing::debug!(error = %e, "could not refresh the group gauges"),
        }
        let jitter = INTERVAL.mul_f64(fastrand::f64() * 0.2);
        tokio::select! {
            _ = sleep(INTERVAL + jitter) => {}
            _ = shutdown.triggered() => return,
        }
    }
}

async fn retention(client: &Client, config: &Config, metrics: &Metrics) {
    for (stream, settings) in &config.streams {
        let Some(retention) = &settings.retention else {
            continue;
        };
        let groups: Vec<String> = match client.groups(stream).await {
            Ok(groups) => groups.into_iter().map(|g| g.name).collect(),
            Err(_) => continue,
        };
        // A configured group that does not exist yet (its replica has not started) would
        // lose everything trimmed now: wait for it.
        if let Some(missing) = config
            .groups
            .values()
            .find(|g| &g.stream == stream && !groups.contains(&g.name))
        {
            tracing::debug!(stream = %stream, group = %missing.name, "retention waits until every configured group exists");
            continue;
        }
        let mut total = 0;
        for _ in 0..TRIM_CALLS {
            let now_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as u64;
            match client
                .retain(
                    stream,
                    retention.max_len,
                    retention.max_age,
                    now_ms,
                    TRIM_STEP,
                )
                .await
            {
                Ok(done) => {
                    total += done.trimmed;
                    metrics.set_retention_blocked(stream, &groups, &done.blocking);
                    if !done.blocking.is_empty() {
                        tracing::debug!(stream = %stream, groups = ?done.blocking, "retention held back by groups with unacknowledged or undelivered entries");
                    }
                    if done.trimmed < TRIM_STEP as u64 {
                        break;
                    }
                }
                Err(e) => {
                    tracing::debug!(stream = %stream, error = %e, "retention pass failed");
                    break;
                }
            }
        }
        if total > 0 {
            tracing::debug!(stream = %stream, trimmed = total, "retention trimmed the stream");
        }
    }
}
