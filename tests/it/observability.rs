//! Metrics, traces, health endpoints and logs as an operator sees them (DESIGN §5).

use std::collections::HashMap;
use std::time::Duration;

use crate::support::*;

fn webhook_group(url: &str, extra: &str) -> String {
    format!(
        r#"
[groups.billing]
stream = "orders"
handler = "webhook"
block = "500ms"
handler_timeout = "1s"
claim_idle = "3s"
consumer_ttl = "1m"
max_deliveries = 2
retry_backoff = {{ initial = "200ms", max = "1s" }}
{extra}
[groups.billing.options]
url = "{url}"
timeout = "1s"
"#
    )
}

/// A structural check of OpenMetrics text: families declared before their samples, every
/// sample a valid name with labels and a number, counters ending in `_total`, `# EOF` last.
fn check_exposition(text: &str) {
    let mut families: HashMap<String, String> = HashMap::new();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "ends with # EOF");
    for line in &lines[..lines.len() - 1] {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name type");
            assert!(
                ["counter", "gauge", "histogram", "info", "unknown"].contains(&kind),
                "{line}"
            );
            families.insert(name.to_owned(), kind.to_owned());
            continue;
        }
        if line.starts_with("# HELP ") || line.starts_with("# UNIT ") {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("a sample");
        assert!(value.parse::<f64>().is_ok(), "numeric value: {line}");
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{line}"
        );
        if let Some(labels) = series.strip_prefix(name)
            && !labels.is_empty()
        {
            assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
        }

        let family = families
            .iter()
            .filter(|(f, _)| name.starts_with(f.as_str()))
            .max_by_key(|(f, _)| f.len())
            .unwrap_or_else(|| panic!("sample of an undeclared family: {line}"));
        if family.1 == "counter" {
            assert!(
                name.ends_with("_total") || name.ends_with("_created"),
                "{line}"
            );
        }
    }
}

#[test]
fn metrics_count_what_happened_and_parse() {
    let redis = RedisServer::start();
    let hook = WebhookServer::start_with(|hit| match hit.body["fields"]["kind"].as_str() {
        Some("poison") => (503, Duration::ZERO),
        Some("flaky") if hit.delivery_count == 1 => (503, Duration::ZERO),
        _ => (200, Duration::ZERO),
    });
    let (cfg, http) = config_with_http(&redis.url(), "r1", &webhook_group(&hook.url("r1"), ""));
    let _daemon = Daemon::start(&cfg);
    let mut con = redis.connection();
    let mut entries: Vec<Vec<(&str, String)>> = (0..10)
        .map(|i| vec![("kind", "fine".to_owned()), ("n", i.to_string())])
        .collect();
    entries.push(vec![("kind", "flaky".to_owned())]);
    entries.push(vec![("kind", "poison".to_owned())]);
    produce(&mut con, "orders", &entries);

    let count = |text: &str, outcome: &str| {
        metric(
            text,
            "streamworker_entries_total",
            &[("group", "billing"), ("outcome", outcome)],
        )
    };
    wait_until(
        Duration::from_secs(20),
        "every entry settled and the gauges refreshed",
        || {
            let Some((_, text)) = http_get(&http, "/metrics") else {
                return false;
            };

            count(&text, "dead_lettered") == Some(1.0)
                && count(&text, "acked") == Some(11.0)
                && metric(
                    &text,
                    "streamworker_dead_letter_length",
                    &[("group", "billing")],
                ) == Some(1.0)
                && metric(&text, "streamworker_group_pending", &[("group", "billing")]) == Some(0.0)
        },
    );
    let (status, text) = http_get(&http, "/metrics").unwrap();
    assert_eq!(status, 200);
    check_exposition(&text);
    assert_eq!(
        count(&text, "retried"),
        Some(2.0),
        "flaky once, poison once (max_deliveries 2)"
    );
    assert_eq!(count(&text, "dropped"), Some(0.0));
    assert_eq!(
        metric(
            &text,
            "streamworker_handler_seconds_count",
            &[("group", "billing")]
        ),
        Some(14.0),
        "10 + 2 + 2 handler calls"
    );
    assert_eq!(
        metric(
            &text,
            "streamworker_end_to_end_seconds_count",
            &[("group", "billing")]
        ),
        Some(11.0),
        "one per acknowledged entry"
    );
    assert_eq!(
        metric(&text, "streamworker_group_lag", &[("group", "billing")]),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &text,
            "streamworker_group_consumers",
            &[("group", "billing")]
        ),
        Some(1.0)
    );
    assert_eq!(metric(&text, "streamworker_up", &[]), Some(1.0));
    assert_eq!(
        metric(&text, "streamworker_inflight", &[("group", "billing")]),
        Some(0.0)
    );
    assert!(text.contains("streamworker_build_info{"), "{text}");
    assert!(
        text.contains("streamworker_handler_seconds_bucket{le=\"0.0001\""),
        "sub-millisecond buckets"
    );
    assert!(text.contains("le=\"120.0\""), "minute-long buckets");
}

#[test]
fn each_entry_gets_a_consumer_span_under_its_producers_trace() {
    let redis = RedisServer::start();
    let receiver = OtlpReceiver::start();
    let hook = WebhookServer::start();
    let cfg = config(&redis.url(), "r1", &webhook_group(&hook.url("r1"), "")).replace(
        "log_format = \"json\"",
        &format!("log_format = \"json\"\notlp_endpoint = \"{}\"\nservice_name = \"billing-consumer\"\nresource_attributes = {{ \"deployment.environment\" = \"test\" }}", receiver.endpoint()),
    );
    // A long export delay: the spans can only arrive through the flush at shutdown.
    let mut daemon = Daemon::start_with_env(&cfg, &[("OTEL_BSP_SCHEDULE_DELAY", "60000")]);
    let mut con = redis.connection();
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_id = "00f067aa0ba902b7";
    let traced = produce(
        &mut con,
        "orders",
        &[vec![
            ("order", "1".to_owned()),
            ("traceparent", format!("00-{trace_id}-{parent_id}-01")),
        ]],
    );
    let plain = produce(
        &mut con,
        "orders",
        &[
            vec![("order", "2".to_owned())],
            vec![("order", "3".to_owned())],
        ],
    );
    wait_until(Duration::from_secs(20), "three entries handled", || {
        hook.count() == 3
    });
    wait_until(Duration::from_secs(10), "acknowledged", || {
        group_info(&mut con, "orders", "billing") == Some((0, Some(0)))
    });
    daemon.terminate();
    assert_eq!(
        daemon.wait(Duration::from_secs(15)).and_then(|s| s.code()),
        Some(0)
    );

    let spans: Vec<_> = receiver
        .spans()
        .into_iter()
        .filter(|s| s.name == "process orders")
        .collect();
    assert_eq!(
        spans.len(),
        3,
        "one consumer span per entry: {:?}",
        receiver.spans()
    );
    for span in &spans {
        assert_eq!(span.kind, 5, "SPAN_KIND_CONSUMER");
        assert_eq!(span.attributes["messaging.system"], "redis");
        assert_eq!(span.attributes["messaging.destination.name"], "orders");
        assert_eq!(span.attributes["messaging.consumer.group.name"], "billing");
        assert_eq!(span.attributes["messaging.redis.delivery_count"], "1");
        assert_eq!(span.attributes["streamworker.outcome"], "acked");
        assert_eq!(span.service_name, "billing-consumer");
    }
    let child = spans
        .iter()
        .find(|s| s.attributes["messaging.message.id"] == traced[0])
        .expect("the traced entry's span");
    assert_eq!(child.trace_id, trace_id);
    assert_eq!(child.parent_span_id, parent_id);
    for id in &plain {
        let span = spans
            .iter()
            .find(|s| &s.attributes["messaging.message.id"] == id)
            .unwrap();
        assert_ne!(span.trace_id, trace_id);
        assert!(span.parent_span_id.is_empty(), "a root span");
    }
    // The webhook got a traceparent of the same trace, naming the consumer span.
    let hit = hook.hits().into_iter().find(|h| h.id == traced[0]).unwrap();
    assert_eq!(
        hit.headers["traceparent"],
        format!("00-{trace_id}-{}-01", child.span_id)
    );
}

#[test]
fn readiness_follows_redis_and_shutdown() {
    let mut redis = RedisServer::start();
    let groups = r#"
[groups.work]
stream = "jobs"
handler = "noop"
block = "500ms"
[groups.work.options]
sleep = "3s"
"#;
    let (cfg, http) = config_with_http(&redis.url(), "r1", groups);
    let daemon = Daemon::start(&cfg);
    let ready = || http_get(&http, "/readyz").map(|(s, _)| s);
    wait_until(Duration::from_secs(20), "ready", || ready() == Some(200));
    assert_eq!(http_get(&http, "/livez").map(|(s, _)| s), Some(200));

    redis.kill();
    wait_until(
        Duration::from_secs(10),
        "not ready while Redis is down",
        || ready() == Some(503),
    );
    let (_, why) = http_get(&http, "/readyz").unwrap();
    assert!(why.contains("Redis is unreachable"), "{why}");
    assert_eq!(
        http_get(&http, "/livez").map(|(s, _)| s),
        Some(200),
        "liveness does not follow Redis"
    );
    redis.restart();
    wait_until(Duration::from_secs(20), "ready again", || {
        ready() == Some(200)
    });

    // A handler in flight keeps the process draining for a while after SIGTERM.
    let mut con = redis.connection();
    produce(&mut con, "jobs", &[vec![("n", "1".to_owned())]]);
    wait_until(Duration::from_secs(10), "the entry in flight", || {
        group_info(&mut con, "jobs", "work").map(|(p, _)| p) == Some(1)
    });
    daemon.terminate();
    wait_until(
        Duration::from_secs(2),
        "not ready once shutting down",
        || ready() == Some(503),
    );
    let (_, why) = http_get(&http, "/readyz").unwrap();
    assert!(why.contains("shutting down"), "{why}");
}

#[test]
fn liveness_fails_when_a_group_is_wedged() {
    let redis = RedisServer::start();
    let groups = r#"
[groups.stuck]
stream = "jobs"
handler = "noop"
block = "500ms"
handler_timeout = "1m"
claim_idle = "2m"
[groups.stuck.options]
busy = "40s"

[groups.fine]
stream = "other"
handler = "noop"
block = "500ms"
"#;
    let (cfg, http) = config_with_http(&redis.url(), "r1", groups);
    let _daemon = Daemon::start(&cfg);
    let live = || http_get(&http, "/livez");
    wait_until(Duration::from_secs(20), "live", || {
        live().map(|(s, _)| s) == Some(200)
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(live().map(|(s, _)| s), Some(200), "idle groups are live");
    let mut con = redis.connection();
    produce(&mut con, "jobs", &[vec![("n", "1".to_owned())]]);
    wait_until(Duration::from_secs(25), "the wedged group reported", || {
        live().is_some_and(|(s, why)| s == 503 && why.contains("stuck"))
    });
}

/// A partitioned group's partition loop wedged on one replica: the owner of the partitions
/// and the other partition keep beating, yet `/livez` names the wedged partition, as it
/// names an ordinary group's wedged loop.
#[test]
fn liveness_fails_when_a_partition_loop_is_wedged() {
    let redis = RedisServer::start();
    let groups = r#"
[groups.stuck]
stream = "jobs"
handler = "noop"
partitions = 2
block = "500ms"
handler_timeout = "1m"
claim_idle = "2m"
[groups.stuck.options]
busy = "40s"
"#;
    let (cfg, http) = config_with_http(&redis.url(), "r1", groups);
    let _daemon = Daemon::start(&cfg);
    let live = || http_get(&http, "/livez");
    let ready = || http_get(&http, "/readyz").map(|(s, _)| s);
    let mut con = redis.connection();
    wait_until(Duration::from_secs(20), "both partitions taken", || {
        ready() == Some(200)
            && (0..2).all(|p| group_info(&mut con, &format!("jobs:p{p}"), "stuck").is_some())
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        live().map(|(s, _)| s),
        Some(200),
        "idle partitions are live"
    );
    produce(&mut con, "jobs:p1", &[vec![("n", "1".to_owned())]]);
    // The blocked thread may hold up other tasks too (the owner, partition 0, through a
    // connection whose driver waits behind it), so only the wedged partition is certain.
    wait_until(
        Duration::from_secs(25),
        "the wedged partition reported",
        || live().is_some_and(|(s, why)| s == 503 && why.contains("stuck (jobs:p1)")),
    );
}

/// What docs/partitions.md and deploy/kubernetes/examples/keda-partitioned.yaml scale a
/// partitioned group on: every replica exports `streamworker_group_lag{group, stream}` for
/// every partition of the group, those it runs or not, so
/// `sum(max by (stream) (streamworker_group_lag{group="billing"}))` is the group's backlog.
#[test]
fn every_replica_exports_the_lag_of_every_partition() {
    const PARTITIONS: u32 = 4;
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let groups = format!(
        r#"
[groups.billing]
stream = "orders"
handler = "noop"
partitions = {PARTITIONS}
block = "500ms"
"#
    );
    let (cfg_a, http_a) = config_with_http(&redis.url(), "a", &groups);
    let (cfg_b, http_b) = config_with_http(&redis.url(), "b", &groups);
    let a = Daemon::start(&cfg_a);
    let _b = Daemon::start(&cfg_b);
    let part = |p: u32| streamworker::partition::partition_stream("orders", p);
    wait_until(Duration::from_secs(30), "every partition's group", || {
        (0..PARTITIONS).all(|p| group_info(&mut con, &part(p), "billing").is_some())
    });
    let path = a.config_path.to_str().unwrap();
    let (code, out, err) = run_cli(&["pause", "-c", path, "--group", "billing"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    // Every replica stops reading within claim_interval (200 ms here).
    std::thread::sleep(Duration::from_secs(1));
    let backlog = [3_usize, 0, 5, 9];
    for (p, n) in backlog.iter().enumerate() {
        let entries: Vec<_> = (0..*n).map(|i| vec![("n", i.to_string())]).collect();
        produce(&mut con, &part(p as u32), &entries);
    }
    let total: usize = backlog.iter().sum();
    let lags = |text: &str| -> Vec<Option<f64>> {
        (0..PARTITIONS)
            .map(|p| {
                metric(
                    text,
                    "streamworker_group_lag",
                    &[("group", "billing"), ("stream", &part(p))],
                )
            })
            .collect()
    };
    let want: Vec<Option<f64>> = backlog.iter().map(|n| Some(*n as f64)).collect();
    let mut texts = Vec::new();
    for http in [&http_a, &http_b] {
        let mut last = String::new();
        wait_until(
            Duration::from_secs(20),
            "each partition's lag on /metrics",
            || {
                last = http_get(http, "/metrics")
                    .map(|(_, t)| t)
                    .unwrap_or_default();
                lags(&last) == want
            },
        );
        texts.push(last);
    }
    // The query, evaluated over both replicas' samples: the max per stream, summed.
    let mut per_stream: std::collections::BTreeMap<String, f64> = Default::default();
    for text in &texts {
        for line in text
            .lines()
            .filter(|l| l.starts_with("streamworker_group_lag{") && l.contains("group=\"billing\""))
        {
            let stream = line
                .split("stream=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap()
                .to_owned();
            let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
            let max = per_stream.entry(stream).or_insert(value);
            *max = max.max(value);
        }
    }
    assert_eq!(
        per_stream.keys().cloned().collect::<Vec<_>>(),
        (0..PARTITIONS).map(part).collect::<Vec<_>>(),
        "one series per partition, none for the base stream"
    );
    let undelivered: u64 = (0..PARTITIONS)
        .map(|p| {
            group_info(&mut con, &part(p), "billing")
                .and_then(|(_, lag)| lag)
                .unwrap()
        })
        .sum();
    assert_eq!(undelivered, total as u64);
    assert_eq!(per_stream.values().sum::<f64>(), total as f64);
}

#[test]
fn logs_are_json_with_entry_fields_and_never_show_the_password() {
    let password = "pw-Zq8-never-logged";
    let redis = RedisServer::start_with(&["--requirepass", password]);
    let hook = WebhookServer::start_with(|hit| {
        if hit.delivery_count == 1 {
            (503, Duration::ZERO)
        } else {
            (200, Duration::ZERO)
        }
    });
    let mut daemon = Daemon::start(&config(
        &redis.url(),
        "r1",
        &webhook_group(&hook.url("r1"), ""),
    ));
    let mut con = redis.connection();
    let ids = produce(&mut con, "orders", &[vec![("order", "1".to_owned())]]);
    wait_until(Duration::from_secs(20), "the retry succeeded", || {
        hook.handled().len() == 1
    });
    daemon.terminate();
    daemon.wait(Duration::from_secs(15));
    // And a run with the wrong password, whose errors must not echo it either.
    let wrong = redis.url().replace(password, "wrong-pw-also-secret");
    let mut failing = Daemon::start(&config(&wrong, "r2", &webhook_group(&hook.url("r2"), "")));
    failing.wait(Duration::from_secs(15));

    for (logs, secret) in [
        (daemon.logs(), password),
        (failing.logs(), "wrong-pw-also-secret"),
    ] {
        assert!(!logs.is_empty());
        assert!(!logs.contains(secret), "the password leaked:\n{logs}");
        for line in logs.lines() {
            let v: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            assert!(
                v["timestamp"].is_string() && v["level"].is_string() && v["message"].is_string(),
                "{line}"
            );
        }
    }
    let failing_logs = failing.logs();
    assert!(
        failing_logs.contains("<redacted>") || failing_logs.contains("cannot use Redis"),
        "{failing_logs}"
    );
    let retry: serde_json::Value = daemon
        .logs()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| {
            v["message"]
                .as_str()
                .unwrap_or_default()
                .contains("will be retried")
        })
        .expect("a log line about the failed entry");
    assert_eq!(retry["stream"], "orders");
    assert_eq!(retry["group"], "billing");
    assert_eq!(retry["consumer"], "r1");
    assert_eq!(retry["id"], ids[0].as_str());
    assert_eq!(retry["delivery_count"], 1);
    assert!(retry["error"].as_str().unwrap().contains("503"));
}
