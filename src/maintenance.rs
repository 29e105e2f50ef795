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

/// One stream key retention trims, with the bounds that apply to it and the configured
/// groups that read it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target<'a> {
    key: String,
    max_len: Option<u64>,
    max_age: Option<Duration>,
    /// Configured groups reading `key`: trimming waits until each exists on it.
    groups: Vec<&'a str>,
}

/// What `[streams.<name>] retention` trims. The stream `<name>` itself, as written; and when
/// `<name>` is partitioned (a group reads it partitioned, or a forward fans out into it),
/// each of its partition streams: `max_age` as is, and
/// `max_len` split evenly, `ceil(max_len / partitions)` each, so the partitions together
/// keep at least `max_len` entries (and at most `partitions - 1` more), as one stream
/// would. A partition with a `[streams.<name>:p<n>] retention` of its own is left to that.
fn targets(config: &Config) -> Vec<Target<'_>> {
    let mut targets = Vec::new();
    for (stream, settings) in &config.streams {
        let Some(retention) = &settings.retention else {
            continue;
        };
        targets.push(Target {
            key: stream.clone(),
            max_len: retention.max_len,
            max_age: retention.max_age,
            groups: readers(config, stream),
        });
        // Partitioned by a group reading it or by a forward writing it (a forward-only
        // deployment trims the partitions it fills); `check` makes them agree on the count.
        let Some(partitions) = config.partitions_of(stream) else {
            continue;
        };
        for key in crate::partition::partition_streams(stream, partitions) {
            if config
                .streams
                .get(&key)
                .is_some_and(|s| s.retention.is_some())
            {
                continue;
            }
            targets.push(Target {
                max_len: retention
                    .max_len
                    .map(|n| n.div_ceil(u64::from(partitions.max(1)))),
                max_age: retention.max_age,
                groups: readers(config, &key),
                key,
            });
        }
    }
    targets
}

/// The configured groups that read the stream `key`: ordinary groups on it, and
/// partitioned groups with `key` among their partition streams.
fn readers<'a>(config: &'a Config, key: &str) -> Vec<&'a str> {
    config
        .groups
        .values()
        .filter(|g| match g.partitions {
            None => g.stream == key,
            Some(n) => key
                .strip_prefix(g.stream.as_str())
                .and_then(|rest| rest.strip_prefix(":p"))
                .and_then(|p| p.parse::<u32>().ok())
                .is_some_and(|p| p < n && crate::partition::partition_stream(&g.stream, p) == key),
        })
        .map(|g| g.name.as_str())
        .collect()
}

async fn retention(client: &Client, config: &Config, metrics: &Metrics) {
    for target in targets(config) {
        let stream = &target.key;
        let groups: Vec<String> = match client.groups(stream).await {
            Ok(groups) => groups.into_iter().map(|g| g.name).collect(),
            Err(_) => continue,
        };
        // A configured group that does not exist yet (its replica has not started, or no
        // replica has taken this partition yet) would lose everything trimmed now: wait
        // for it.
        if let Some(missing) = target
            .groups
            .iter()
            .find(|g| !groups.iter().any(|have| have == *g))
        {
            tracing::debug!(stream = %stream, group = %missing, "retention waits until every configured group exists");
            continue;
        }
        let mut total = 0;
        for _ in 0..TRIM_CALLS {
            let now_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as u64;
            match client
                .retain(stream, target.max_len, target.max_age, now_ms, TRIM_STEP)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Config {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("streamworker.toml");
        std::fs::write(&path, text).unwrap();
        crate::config::load_with_env(&path, Default::default())
            .unwrap_or_else(|e| panic!("{text}\n→ {e}"))
    }

    fn target(key: &str, max_len: Option<u64>, groups: &[&'static str]) -> Target<'static> {
        Target {
            key: key.into(),
            max_len,
            max_age: Some(Duration::from_secs(3600)),
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn a_partitioned_streams_retention_is_split_over_its_partitions() {
        let config = load(
            r#"
[streams.orders]
retention = { max_len = 10, max_age = "1h" }

[groups.billing]
stream = "orders"
handler = "noop"
partitions = 4

[groups.audit]
stream = "orders"
handler = "noop"
"#,
        );
        assert_eq!(
            targets(&config),
            vec![
                target("orders", Some(10), &["audit"]),
                target("orders:p0", Some(3), &["billing"]),
                target("orders:p1", Some(3), &["billing"]),
                target("orders:p2", Some(3), &["billing"]),
                target("orders:p3", Some(3), &["billing"]),
            ]
        );
    }

    #[test]
    fn a_partitions_own_retention_wins() {
        let config = load(
            r#"
[streams.orders]
retention = { max_len = 5, max_age = "1h" }

[streams."orders:p1"]
retention = { max_len = 100, max_age = "1h" }

[groups.billing]
stream = "orders"
handler = "noop"
partitions = 3

[groups.shipping]
stream = "orders"
handler = "noop"
partitions = 3
"#,
        );
        assert_eq!(
            targets(&config),
            vec![
                target("orders", Some(5), &[]),
                // ceil(5 / 3)
                target("orders:p0", Some(2), &["billing", "shipping"]),
                target("orders:p2", Some(2), &["billing", "shipping"]),
                target("orders:p1", Some(100), &["billing", "shipping"]),
            ]
        );
    }

    /// A forward fanning out into a partitioned stream, deployed without its readers: the
    /// target's retention trims the partitions the forward fills, not a bare `events:byuser`
    /// that nobody writes.
    #[test]
    fn a_forwards_partitioned_target_is_trimmed_per_partition() {
        let config = load(
            r#"
[streams."events:byuser"]
retention = { max_len = 8, max_age = "1h" }

[groups.fanout]
stream = "events"
handler = "forward"
[groups.fanout.options]
to = "events:byuser"
partition_by = "user_id"
partitions = 2
"#,
        );
        assert_eq!(
            targets(&config),
            vec![
                target("events:byuser", Some(8), &[]),
                target("events:byuser:p0", Some(4), &[]),
                target("events:byuser:p1", Some(4), &[]),
            ]
        );
    }

    #[test]
    fn max_len_below_the_partition_count_keeps_one_per_partition() {
        let config = load(
            "[streams.s]\nretention = { max_len = 1 }\n[groups.g]\nstream = \"s\"\nhandler = \"noop\"\npartitions = 3\n",
        );
        let lens: Vec<_> = targets(&config).iter().map(|t| t.max_len).collect();
        assert_eq!(lens, vec![Some(1), Some(1), Some(1), Some(1)]);
    }
}
