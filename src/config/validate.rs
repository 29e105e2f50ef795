//! The rules serde cannot express: ranges, and the cross-field rules of DESIGN §2, each
//! explained so the operator knows what to change.

use std::net::SocketAddr;
use std::time::Duration;

use redis::IntoConnectionInfo;

use super::{Config, redact_url};
use streamworker_handlers::duration::format as human;

/// Every rule broken by `config`, as (key, message).
pub(super) fn validate(config: &Config) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    let mut problem = |key: String, message: String| problems.push((key, message));

    let redis = &config.redis;
    let url = &redis.url;
    if let Err(e) = url.as_str().into_connection_info() {
        problem(
            "redis.url".into(),
            format!(
                "= {:?}: not a Redis URL ({e}); expected redis://[user:password@]host:port/db, rediss://… for TLS or redis+unix:///path",
                redact_url(url)
            ),
        );
    }
    let custom_url = url != super::DEFAULT_REDIS_URL;
    if !redis.cluster.is_empty() && redis.sentinel.is_some() {
        problem(
            "redis.cluster".into(),
            "and redis.sentinel are both set: a deployment is one or the other".into(),
        );
    } else if custom_url && (!redis.cluster.is_empty() || redis.sentinel.is_some()) {
        let other = if redis.cluster.is_empty() {
            "sentinel"
        } else {
            "cluster"
        };
        problem(
            "redis.url".into(),
            format!(
                "is set together with redis.{other}: use one of them (credentials go in the cluster node URLs, or redis.password_file)"
            ),
        );
    }
    for (i, node) in redis.cluster.iter().enumerate() {
        if let Err(e) = node.as_str().into_connection_info() {
            problem(
                format!("redis.cluster.{i}"),
                format!("= {:?}: not a Redis URL ({e})", redact_url(node)),
            );
        }
    }
    if let Some(s) = &redis.sentinel {
        if s.master.is_empty() {
            problem(
                "redis.sentinel.master".into(),
                "is missing: the name the sentinels monitor the primary under, e.g. \"mymaster\""
                    .into(),
            );
        }
        if s.nodes.is_empty() {
            problem(
                "redis.sentinel.nodes".into(),
                "is empty: list some sentinels, e.g. [\"redis://sentinel-1:26379\"]".into(),
            );
        }
        for (i, node) in s.nodes.iter().enumerate() {
            if let Err(e) = node.as_str().into_connection_info() {
                problem(
                    format!("redis.sentinel.nodes.{i}"),
                    format!("= {:?}: not a Redis URL ({e})", redact_url(node)),
                );
            }
        }
    }
    if let Some(tls) = &redis.tls
        && tls.cert_file.is_some() != tls.key_file.is_some()
    {
        problem(
            "redis.tls".into(),
            "sets only one of cert_file and key_file: a client certificate needs both".into(),
        );
    }

    for (key, d) in [
        ("redis.command_timeout", config.redis.command_timeout),
        ("redis.connect_timeout", config.redis.connect_timeout),
        ("worker.shutdown_timeout", config.worker.shutdown_timeout),
        ("worker.claim_interval", config.worker.claim_interval),
    ] {
        if d.is_zero() {
            problem(key.into(), "must be greater than zero".into());
        }
    }
    if config.worker.consumer.trim().is_empty() {
        problem(
            "worker.consumer".into(),
            "is empty: leave it out for \"{hostname}-{pid}\" or set a name unique to this process"
                .into(),
        );
    }
    let listen = &config.http.listen;
    if !listen.is_empty() && listen.parse::<SocketAddr>().is_err() {
        problem(
            "http.listen".into(),
            format!(
                "= {listen:?}: not an address; write ip:port such as \"0.0.0.0:9464\", or \"\" to turn the listener off"
            ),
        );
    }
    let otlp = &config.telemetry.otlp_endpoint;
    if !(otlp.is_empty() || otlp.starts_with("http://") || otlp.starts_with("https://")) {
        problem(
            "telemetry.otlp_endpoint".into(),
            format!(
                "= {:?}: must be an http(s) URL of an OTLP/HTTP receiver, e.g. \"http://otel-collector:4318\"",
                redact_url(otlp)
            ),
        );
    }
    for (name, stream) in &config.streams {
        if name.trim().is_empty() {
            problem(
                format!("streams.{name}"),
                "has an empty name: write the stream's name, e.g. [streams.user_logs]".into(),
            );
        }
        if let Some(r) = &stream.retention {
            let key = format!("streams.{name}.retention");
            if r.max_len.is_none() && r.max_age.is_none() {
                problem(key, "sets neither max_len nor max_age".into());
            } else if r.max_len == Some(0) {
                problem(format!("{key}.max_len"), "must be at least 1".into());
            } else if r.max_age.is_some_and(|d| d.is_zero()) {
                problem(format!("{key}.max_age"), "must be greater than zero".into());
            }
        }
    }

    for (name, g) in &config.groups {
        let key = |k: &str| format!("groups.{name}.{k}");
        if name.trim().is_empty() {
            problem(
                format!("groups.{name}"),
                "has an empty name: the table's name is the consumer group's, e.g. [groups.billing]".into(),
            );
        }
        if g.stream.trim().is_empty() {
            problem(
                key("stream"),
                "is missing: set the stream this group reads, e.g. stream = \"user_logs\"".into(),
            );
        }
        if !(1..=100_000).contains(&g.concurrency) {
            problem(
                key("concurrency"),
                format!("= {}: must be between 1 and 100000", g.concurrency),
            );
        }
        if !(1..=100_000).contains(&g.batch_size) {
            problem(
                key("batch_size"),
                format!("= {}: must be between 1 and 100000", g.batch_size),
            );
        }
        if g.block < Duration::from_millis(1) {
            problem(
                key("block"),
                "must be at least 1ms (Redis reads \"0\" as block forever, which would stall shutdown)".into(),
            );
        }
        if g.block >= config.worker.shutdown_timeout {
            problem(
                key("block"),
                format!(
                    "({}) must be shorter than worker.shutdown_timeout ({}), or a blocked read could outlast shutdown",
                    human(g.block),
                    human(config.worker.shutdown_timeout)
                ),
            );
        }
        if g.handler_timeout.is_zero() {
            problem(key("handler_timeout"), "must be greater than zero".into());
        }
        if g.max_deliveries == 0 {
            problem(
                key("max_deliveries"),
                "must be at least 1 (the first delivery counts)".into(),
            );
        }
        let b = &g.retry_backoff;
        if b.initial.is_zero() {
            problem(
                key("retry_backoff.initial"),
                "must be greater than zero".into(),
            );
        }
        if b.max < b.initial {
            problem(
                key("retry_backoff.max"),
                format!(
                    "({}) is shorter than retry_backoff.initial ({})",
                    human(b.max),
                    human(b.initial)
                ),
            );
        }
        if !(b.multiplier.is_finite() && b.multiplier >= 1.0) {
            problem(
                key("retry_backoff.multiplier"),
                format!("= {}: must be at least 1.0", b.multiplier),
            );
        }
        if !(0.0..=1.0).contains(&b.jitter) {
            problem(
                key("retry_backoff.jitter"),
                format!(
                    "= {}: must be between 0.0 and 1.0 (a fraction added to each delay)",
                    b.jitter
                ),
            );
        }
        if g.claim_idle <= g.handler_timeout {
            problem(
                key("claim_idle"),
                format!(
                    "({}) must be greater than handler_timeout ({}): otherwise another replica reclaims an entry while its handler is still running",
                    human(g.claim_idle),
                    human(g.handler_timeout)
                ),
            );
        }
        // A jitter out of range (NaN included, which `clamp` passes through and `mul_f64`
        // panics on) is reported above; judge the backoff with the largest valid one.
        let jitter = if (0.0..=1.0).contains(&b.jitter) {
            b.jitter
        } else {
            1.0
        };
        let longest_backoff = b.max.mul_f64(1.0 + jitter);
        if longest_backoff >= g.claim_idle {
            problem(
                key("retry_backoff.max"),
                format!(
                    "× (1 + jitter) = {} must be shorter than claim_idle ({}): a failed entry waits out its backoff as an idle pending entry, and claim_idle is when it is taken again",
                    human(longest_backoff),
                    human(g.claim_idle)
                ),
            );
        }
        if g.consumer_ttl <= g.claim_idle {
            problem(
                key("consumer_ttl"),
                format!(
                    "({}) must be longer than claim_idle ({}), so that only consumers long gone are deleted",
                    human(g.consumer_ttl),
                    human(g.claim_idle)
                ),
            );
        }
        let dlq = g.dead_letter_stream();
        if dlq.is_empty() {
            problem(
                key("dead_letter_stream"),
                "is empty: leave it out for the default {<stream>}:dlq:<group>".into(),
            );
        } else if dlq == g.stream {
            problem(
                key("dead_letter_stream"),
                format!(
                    "= {dlq:?}: must differ from the group's stream, or dead letters would be consumed again"
                ),
            );
        } else if !redis.cluster.is_empty() && !same_slot(&dlq, &g.stream) {
            problem(
                key("dead_letter_stream"),
                format!(
                    "= {dlq:?} is in another Redis Cluster hash slot than {:?}: the dead-letter move (XADD there, XACK here) is one script and needs both keys in one slot; leave it out for the default {}",
                    g.stream,
                    super::default_dead_letter_stream(&g.stream, &g.name)
                ),
            );
        }
        if !streamworker_handlers::slot_tag_reaches(&g.stream) {
            problem(
                key("stream"),
                format!(
                    "= {:?}: Redis hashes this whole name (its first braces are empty), and no key streamworker derives from it (dead letters, leases, handler state) can be put in its cluster slot; rename the stream, e.g. with a hash tag such as \"{{orders}}:events\"",
                    g.stream
                ),
            );
        }
        if !redis.cluster.is_empty() {
            for (option, target) in g.handler.acked_with() {
                if !target.is_empty() && !same_slot(target, &g.stream) {
                    problem(
                        key(&format!("options.{option}")),
                        format!(
                            "= {target:?} is in another Redis Cluster hash slot than {:?}: the XADD there and the XACK here run in one script; give both the same hash tag, e.g. \"{}:out\"",
                            g.stream,
                            streamworker_handlers::slot_tag(&g.stream)
                        ),
                    );
                }
            }
        }
        if g.circuit_breaker.threshold > 0 && g.circuit_breaker.pause.is_zero() {
            problem(
                key("circuit_breaker.pause"),
                "must be greater than zero (or set circuit_breaker.threshold = 0 to turn the breaker off)".into(),
            );
        }
        if let Some(window) = g.circuit_breaker.window
            && window < g.circuit_breaker.threshold
        {
            problem(
                key("circuit_breaker.window"),
                format!(
                    "= {window} is smaller than circuit_breaker.threshold ({}): the circuit could never open; make the window at least the threshold, or leave it out (twice the threshold)",
                    g.circuit_breaker.threshold
                ),
            );
        }
        let limits = streamworker_handlers::Limits {
            handler_timeout: g.handler_timeout,
            claim_idle: g.claim_idle,
        };
        let stream_problems = g.handler.validate_with_stream(&g.stream);
        for p in g
            .handler
            .validate(&limits)
            .into_iter()
            .chain(stream_problems)
        {
            problem(key(&format!("options.{}", p.key)), p.message);
        }
    }
    problems
}

/// Whether two keys live in the same Redis Cluster hash slot.
pub fn same_slot(a: &str, b: &str) -> bool {
    use redis::cluster_routing::Slot;
    Slot::for_key(a) == Slot::for_key(b)
}

#[cfg(test)]
mod tests {
    use super::same_slot;

    #[test]
    fn hash_tags_share_a_slot() {
        assert!(same_slot("{orders}:dlq:billing", "orders"));
        assert!(!same_slot("orders:dlq", "orders"));
    }

    /// Derived keys land in the stream's slot by Redis's own reckoning, whatever braces
    /// the stream's name already holds.
    #[test]
    fn derived_keys_share_the_streams_slot() {
        use streamworker_handlers::{slot_tag, slot_tag_reaches};
        for stream in [
            "orders",
            "{orders}:events",
            "events:{eu}:clicks",
            "half{open",
            "}close{",
            "a{}b",
            "{}",
            "user:activity",
        ] {
            let derived = format!("{}:dlq:billing", slot_tag(stream));
            assert_eq!(
                same_slot(&derived, stream),
                slot_tag_reaches(stream),
                "{stream} → {derived}"
            );
        }
        let dlq = crate::config::default_dead_letter_stream("{orders}:events", "billing");
        assert_eq!(dlq, "{orders}:dlq:billing");
    }
}
