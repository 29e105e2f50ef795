//! Property tests of configuration loading: for random values under every key the loader
//! knows (and keys it does not), from the file and from `STREAMWORKER__…` variables,
//! `load_with_env` reports problems or returns a configuration; it never panics. Run
//! in-process, so thousands of configurations take seconds.

use std::collections::HashMap;

use proptest::prelude::*;
use toml::{Table, Value};

use super::{Config, ConfigError, load_with_env};

/// Leaf values of every kind, biased towards the ones that break arithmetic: NaN and
/// infinite floats, integer extremes, durations from nothing to absurdly long.
fn leaf() -> impl Strategy<Value = Value> {
    let duration = (
        prop_oneof![
            Just(0u128),
            0u128..1_000,
            Just(500_000_000),
            Just(u64::MAX as u128),
            Just(u128::MAX),
        ],
        prop::sample::select(vec![
            "ns", "us", "ms", "s", "m", "h", "d", "w", "M", "y", "", " parsecs",
        ]),
    )
        .prop_map(|(n, unit)| Value::String(format!("{n}{unit}")));
    let text = prop::sample::select(vec![
        "",
        " ",
        "0",
        "$",
        "0-0",
        "18446744073709551615-18446744073709551615",
        "{}",
        "{a}b",
        "noop",
        "webhook",
        "forward",
        "analytics",
        "alerts",
        "learning",
        "warehouse",
        "json",
        "fields",
        "pretty",
        "redis://127.0.0.1:6379/0",
        "redis://:pw@127.0.0.1:6379",
        "rediss://u:p@h:1",
        "redis+unix:///tmp/r.sock",
        "http://127.0.0.1:1/x",
        "http://u:pw@h/x?token=t",
        "ftp://x",
        "0.0.0.0:9464",
        "not an address",
        "/nonexistent/file",
        "é\u{0}\u{7f}",
    ])
    .prop_map(|s| Value::String(s.to_owned()));
    prop_oneof![
        3 => duration,
        3 => text,
        1 => any::<String>().prop_map(Value::String),
        2 => prop_oneof![
            Just(0i64),
            Just(1),
            Just(-1),
            Just(i64::MAX),
            Just(i64::MIN),
            any::<i64>(),
            0i64..200_000,
        ]
        .prop_map(Value::Integer),
        2 => prop_oneof![
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY),
            Just(0.0),
            Just(-0.0),
            Just(1.0),
            Just(1e300),
            any::<f64>(),
            -2.0f64..3.0,
        ]
        .prop_map(Value::Float),
        1 => any::<bool>().prop_map(Value::Boolean),
    ]
}

/// Any value: a leaf, or arrays and tables of them (tables keyed like real options).
fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(key(OPTION_KEYS), inner, 0..4)
                .prop_map(|m| Value::Table(m.into_iter().collect())),
        ]
    })
}

fn key(known: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop_oneof![
        9 => prop::sample::select(known).prop_map(str::to_owned),
        1 => prop::sample::select(vec!["password", "colour", "", "x.y", "URL"]).prop_map(str::to_owned),
    ]
}

/// A table holding some of `keys`, each with a random value.
fn table(keys: &'static [&'static str]) -> impl Strategy<Value = Table> {
    prop::collection::btree_map(key(keys), value(), 0..keys.len().min(8) + 1)
        .prop_map(|m| m.into_iter().collect())
}

const REDIS_KEYS: &[&str] = &[
    "url",
    "cluster",
    "sentinel",
    "password_file",
    "tls",
    "command_timeout",
    "connect_timeout",
];
const SENTINEL_KEYS: &[&str] = &["master", "nodes", "username", "db"];
const TLS_KEYS: &[&str] = &["ca_file", "cert_file", "key_file"];
const WORKER_KEYS: &[&str] = &["consumer", "shutdown_timeout", "claim_interval"];
const HTTP_KEYS: &[&str] = &["listen"];
const TELEMETRY_KEYS: &[&str] = &[
    "log_format",
    "otlp_endpoint",
    "service_name",
    "resource_attributes",
];
const RETENTION_KEYS: &[&str] = &["max_len", "max_age"];
const GROUP_KEYS: &[&str] = &[
    "stream",
    "start_id",
    "concurrency",
    "batch_size",
    "block",
    "handler_timeout",
    "max_deliveries",
    "claim_idle",
    "consumer_ttl",
    "dead_letter_stream",
    "payload",
];
const BACKOFF_KEYS: &[&str] = &["initial", "max", "multiplier", "jitter"];
const BREAKER_KEYS: &[&str] = &["threshold", "pause"];
/// Every option name of every built-in handler.
const OPTION_KEYS: &[&str] = &[
    "adaptations_max_len",
    "adaptations_stream",
    "batch_size",
    "busy",
    "channel",
    "check_every",
    "cooldown",
    "dataset_dir",
    "dedupe_window",
    "description",
    "dimensions",
    "directory",
    "drop",
    "error_types",
    "evaluate_every",
    "event_type",
    "extract",
    "filter",
    "fired_at",
    "group",
    "headers",
    "hold",
    "keep",
    "kind",
    "latency",
    "marker_ttl",
    "max_batch",
    "max_len",
    "max_wait",
    "measure_by",
    "min_events",
    "min_feedback",
    "model",
    "name",
    "pending_since",
    "prompt",
    "prompt_id",
    "rating",
    "rating_max",
    "rating_min",
    "rename",
    "response",
    "retention",
    "rotate_bytes",
    "rotate_interval",
    "rules",
    "secret",
    "set",
    "since",
    "sink",
    "sleep",
    "source_id_field",
    "state",
    "stream",
    "sums",
    "table",
    "threshold",
    "thumbs",
    "timeout",
    "to",
    "url",
    "user",
    "value",
    "webhook",
    "webhook_timeout",
    "when",
    "window",
];

fn group() -> impl Strategy<Value = Table> {
    (
        table(GROUP_KEYS),
        prop::option::of(table(BACKOFF_KEYS)),
        prop::option::of(table(BREAKER_KEYS)),
        prop::option::of(leaf()),
        prop::sample::select(super::handler_kinds()),
        prop::option::of(table(OPTION_KEYS)),
    )
        .prop_map(|(mut g, backoff, breaker, handler, kind, options)| {
            if let Some(b) = backoff {
                g.insert("retry_backoff".into(), Value::Table(b));
            }
            if let Some(b) = breaker {
                g.insert("circuit_breaker".into(), Value::Table(b));
            }
            g.insert(
                "handler".into(),
                handler.unwrap_or_else(|| Value::String(kind.to_owned())),
            );
            if let Some(o) = options {
                g.insert("options".into(), Value::Table(o));
            }
            g
        })
}

fn document() -> impl Strategy<Value = Table> {
    (
        (
            table(REDIS_KEYS),
            prop::option::of(table(SENTINEL_KEYS)),
            prop::option::of(table(TLS_KEYS)),
        ),
        table(WORKER_KEYS),
        table(HTTP_KEYS),
        table(TELEMETRY_KEYS),
        prop::collection::btree_map(key(&["events", "orders", ""]), table(RETENTION_KEYS), 0..2),
        prop::collection::btree_map(key(&["billing", "audit", ""]), group(), 0..3),
        prop::option::of((key(&["extra"]), value())),
    )
        .prop_map(
            |((mut redis, sentinel, tls), worker, http, telemetry, streams, groups, extra)| {
                if let Some(s) = sentinel {
                    redis.insert("sentinel".into(), Value::Table(s));
                }
                if let Some(t) = tls {
                    redis.insert("tls".into(), Value::Table(t));
                }
                let mut doc = Table::new();
                doc.insert("redis".into(), Value::Table(redis));
                doc.insert("worker".into(), Value::Table(worker));
                doc.insert("http".into(), Value::Table(http));
                doc.insert("telemetry".into(), Value::Table(telemetry));
                let streams: Table = streams
                    .into_iter()
                    .map(|(name, r)| {
                        let mut t = Table::new();
                        t.insert("retention".into(), Value::Table(r));
                        (name, Value::Table(t))
                    })
                    .collect();
                doc.insert("streams".into(), Value::Table(streams));
                doc.insert(
                    "groups".into(),
                    Value::Table(
                        groups
                            .into_iter()
                            .map(|(n, g)| (n, Value::Table(g)))
                            .collect(),
                    ),
                );
                if let Some((k, v)) = extra {
                    doc.insert(k, v);
                }
                doc
            },
        )
}

/// `STREAMWORKER__…` overrides: a dotted key the loader knows, and a text value.
fn overrides() -> impl Strategy<Value = HashMap<String, String>> {
    let path = prop_oneof![
        key(REDIS_KEYS).prop_map(|k| format!("redis.{k}")),
        key(WORKER_KEYS).prop_map(|k| format!("worker.{k}")),
        key(GROUP_KEYS).prop_map(|k| format!("groups.billing.{k}")),
        key(BACKOFF_KEYS).prop_map(|k| format!("groups.billing.retry_backoff.{k}")),
        key(OPTION_KEYS).prop_map(|k| format!("groups.billing.options.{k}")),
        key(RETENTION_KEYS).prop_map(|k| format!("streams.events.retention.{k}")),
    ];
    let text = leaf().prop_map(|v| match v {
        Value::String(s) => s,
        other => other.to_string(),
    });
    prop::collection::hash_map(path, text, 0..4).prop_map(|m| {
        m.into_iter()
            .map(|(k, v)| (super::load::env_var_for(&k), v))
            .collect()
    })
}

fn load_text(text: &str, env: HashMap<String, String>) -> Result<Config, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("streamworker.toml");
    std::fs::write(&path, text).unwrap();
    load_with_env(&path, env)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 768, ..ProptestConfig::default() })]

    /// Whatever the file and the environment say, loading answers; and when it rejects the
    /// configuration, every problem names a key or says the file is not TOML.
    #[test]
    fn loading_never_panics(doc in document(), env in overrides()) {
        let text = toml::to_string(&doc).unwrap();
        match load_text(&text, env) {
            Ok(config) => {
                // A configuration that loads can also be printed by `check`.
                let _ = config.to_redacted_toml();
            }
            Err(ConfigError::Invalid { problems, .. }) => {
                prop_assert!(!problems.is_empty());
                for p in &problems {
                    prop_assert!(
                        !p.key.is_empty() || p.message.starts_with("is not valid TOML"),
                        "{p:?} names no key"
                    );
                }
            }
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }

    /// Any text at all, TOML or not.
    #[test]
    fn loading_arbitrary_text_never_panics(text in any::<String>()) {
        let _ = load_text(&text, HashMap::new());
    }
}
