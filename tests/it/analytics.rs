//! The analytics handler and `streamworker stats`: known input in, the seed's questions
//! answered from the aggregates; counted once however often delivered; kept `retention`.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::Value;

use crate::support::*;

/// The p95 error bound the bucket layout gives: (1.1 − 1) / (1.1 + 1).
const BOUND: f64 = 0.1 / 2.1;

const MODELS: [&str; 3] = ["gpt-4o", "claude-3-5-sonnet", "gemini/gemini-2.0-flash"];

fn llm_group(name: &str, extra: &str) -> String {
    format!(
        r#"
[groups.{name}]
stream = "ml_events"
handler = "analytics"
payload = "json:event"
block = "500ms"
{extra}
[groups.{name}.options]
dimensions = ["data.model"]
sums = ["data.tokens_used", "data.cost_usd"]
latency = "data.response_time_ms"
error_types = ["error"]
"#
    )
}

/// A deterministic spread of numbers in [0, 1).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// What the seed's `analyze_llm_usage` would compute, and more.
#[derive(Debug, Default)]
struct Expected {
    entries: u64,
    errors: u64,
    types: BTreeMap<String, u64>,
    tokens: f64,
    cost: f64,
    latencies: Vec<f64>,
    /// model → (entries, llm_call entries, errors)
    models: BTreeMap<String, (u64, u64, u64)>,
}

/// LLM events in the seed's shape (`event` holds the JSON document), with the irregular
/// ones real streams carry: errors, token events, missing and non-numeric values.
fn llm_events(n: usize, seed: u64) -> (Vec<Vec<(&'static str, String)>>, Expected) {
    let mut rng = Rng(seed);
    let mut out = Vec::new();
    let mut x = Expected::default();
    for i in 0..n {
        let model = MODELS[(rng.next() * 3.0) as usize % 3];
        let (doc, kind) = match i % 20 {
            // An error event, sometimes without a model.
            7 | 13 => {
                let doc = if i % 40 == 7 {
                    serde_json::json!({"event_type": "error", "data": {"error_type": "rate_limit"}})
                } else {
                    serde_json::json!({"event_type": "error", "data": {"model": model, "error_type": "timeout"}})
                };
                (doc, "error")
            }
            // A streamed token: counted, has a model, no usage numbers.
            11 => (
                serde_json::json!({"event_type": "token", "data": {"model": model, "token": "Hel"}}),
                "token",
            ),
            _ => {
                let tokens = 20 + (rng.next() * 4000.0) as u64;
                let cost = (tokens as f64 * 0.000_002_5 * 1e7).round() / 1e7;
                // Log-spread from ~30 ms to ~60 s, with decimals.
                let ms = ((3.4 + rng.next() * 7.7).exp() * 10.0).round() / 10.0;
                let mut data = serde_json::json!({"model": model});
                match i % 20 {
                    3 => data["tokens_used"] = "n/a".into(),
                    5 => {}
                    _ => {
                        data["tokens_used"] = tokens.into();
                        x.tokens += tokens as f64;
                    }
                }
                if i % 20 != 5 {
                    data["cost_usd"] = cost.into();
                    x.cost += cost;
                }
                match i % 20 {
                    9 => data["response_time_ms"] = "slow".into(),
                    17 => {}
                    _ => {
                        data["response_time_ms"] = ms.into();
                        x.latencies.push(ms);
                    }
                }
                (
                    serde_json::json!({
                        "event_id": format!("ev-{i}"),
                        "event_type": "llm_call",
                        "timestamp": "2024-01-15T16:30:45.123456Z",
                        "data": data,
                        "tags": {"environment": "production", "user_id": format!("user_{}", i % 11)}
                    }),
                    "llm_call",
                )
            }
        };
        x.entries += 1;
        *x.types.entry(kind.into()).or_default() += 1;
        if kind == "error" {
            x.errors += 1;
        }
        if let Some(m) = doc["data"]["model"].as_str() {
            let e = x.models.entry(m.into()).or_default();
            e.0 += 1;
            e.1 += u64::from(kind == "llm_call");
            e.2 += u64::from(kind == "error");
        }
        out.push(vec![("event", doc.to_string())]);
    }
    x.latencies.sort_by(f64::total_cmp);
    (out, x)
}

/// The exact nearest-rank quantile.
fn exact_quantile(sorted: &[f64], q: f64) -> f64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn stats_json(config_path: &str, group: &str, since: &str) -> Value {
    let (code, stdout, stderr) = run_cli(
        &[
            "stats",
            "-c",
            config_path,
            "--group",
            group,
            "--since",
            since,
            "--json",
            "--top",
            "0",
        ],
        &[],
    );
    assert_eq!(code, 0, "stats failed: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn wait_all_acked(con: &mut redis::Connection, stream: &str, group: &str, timeout: Duration) {
    wait_until(
        timeout,
        &format!("{group} to acknowledge everything"),
        || group_info(con, stream, group) == Some((0, Some(0))),
    );
}

fn close(a: f64, b: f64, relative: f64) -> bool {
    (a - b).abs() <= relative * a.abs().max(b.abs()).max(1e-12)
}

/// Asserts the stats JSON answers what the input says.
fn assert_answers(s: &Value, x: &Expected) {
    assert_eq!(s["entries"], x.entries, "{s:#}");
    assert_eq!(s["errors"], x.errors);
    assert_eq!(
        s["error_rate"].as_f64(),
        Some(x.errors as f64 / x.entries as f64)
    );
    for (t, n) in &x.types {
        assert_eq!(s["event_types"][t], *n, "type {t}");
    }
    assert_eq!(s["sums"]["data.tokens_used"].as_f64(), Some(x.tokens));
    let cost = s["sums"]["data.cost_usd"].as_f64().unwrap();
    assert!(close(cost, x.cost, 1e-9), "cost {cost} vs {}", x.cost);
    let lat = &s["latency_ms"];
    assert_eq!(lat["count"], x.latencies.len());
    let avg = x.latencies.iter().sum::<f64>() / x.latencies.len() as f64;
    assert!(close(lat["avg"].as_f64().unwrap(), avg, 1e-9), "avg {lat}");
    assert!((lat["relative_error"].as_f64().unwrap() - BOUND).abs() < 1e-12);
    for (q, name) in [(0.5, "p50"), (0.95, "p95"), (0.99, "p99"), (1.0, "max")] {
        let exact = exact_quantile(&x.latencies, q);
        let got = lat[name].as_f64().unwrap();
        assert!(
            (got - exact).abs() <= BOUND * exact,
            "{name}: {got} vs exact {exact}, outside ±{:.2} %",
            BOUND * 100.0
        );
    }
    let values = s["dimensions"]["data.model"]["values"].as_array().unwrap();
    let by_model: HashMap<&str, &Value> = values
        .iter()
        .map(|v| (v["value"].as_str().unwrap(), v))
        .collect();
    assert_eq!(by_model.len(), x.models.len(), "{values:#?}");
    for (model, (entries, calls, errors)) in &x.models {
        let v = by_model[model.as_str()];
        assert_eq!(v["entries"], *entries, "{model}");
        assert_eq!(v["event_types"]["llm_call"], *calls, "calls of {model}");
        assert_eq!(v["errors"], *errors, "errors of {model}");
    }
    let tokens_by_model: f64 = values
        .iter()
        .map(|v| v["sums"]["data.tokens_used"].as_f64().unwrap_or(0.0))
        .sum();
    assert_eq!(tokens_by_model, x.tokens, "per-model tokens add up");
}

#[test]
fn stats_answers_the_llm_usage_questions_from_the_aggregates() {
    let redis = RedisServer::start();
    let groups = format!(
        "{}{}",
        llm_group("usage", ""),
        r#"
[groups.activity]
stream = "user_logs"
handler = "analytics"
block = "500ms"
[groups.activity.options]
dimensions = ["user_id"]
error_types = ["error", "failure"]

[groups.archive]
stream = "user_logs"
handler = "noop"
"#
    );
    let cfg = config(&redis.url(), "r1", &groups);
    let _daemon = Daemon::start(&cfg);
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, &cfg);
    let mut con = redis.connection();

    let (events, expected) = llm_events(600, 0x9e37_79b9_7f4a_7c15);
    produce(&mut con, "ml_events", &events);
    // The flat-field shape of the user-logging write-up.
    let kinds = ["prompt", "response", "failure", "prompt", "response"];
    let logs: Vec<Vec<(&str, String)>> = (0..50)
        .map(|i| {
            vec![
                ("user_id", format!("{}", 40 + i % 4)),
                ("event_type", kinds[i % 5].to_owned()),
                ("message", "What is quantum computing?".to_owned()),
                ("timestamp", "2025-07-25T18:00:00Z".to_owned()),
            ]
        })
        .collect();
    produce(&mut con, "user_logs", &logs);
    wait_all_acked(&mut con, "ml_events", "usage", Duration::from_secs(15));
    wait_all_acked(&mut con, "user_logs", "activity", Duration::from_secs(5));

    let s = stats_json(&path, "usage", "1h");
    assert_answers(&s, &expected);
    eprintln!(
        "p95: {} (exact {}), {} latencies",
        s["latency_ms"]["p95"],
        exact_quantile(&expected.latencies, 0.95),
        expected.latencies.len()
    );

    let a = stats_json(&path, "activity", "10m");
    assert_eq!(a["entries"], 50);
    assert_eq!(a["errors"], 10, "failure is an error type here");
    assert_eq!(a["error_rate"].as_f64(), Some(0.2));
    assert_eq!(a["event_types"]["prompt"], 20);
    assert_eq!(a["event_types"]["response"], 20);
    assert!(a["latency_ms"].is_null());
    for v in a["dimensions"]["user_id"]["values"].as_array().unwrap() {
        assert!(["40", "41", "42", "43"].contains(&v["value"].as_str().unwrap()));
        assert!(
            v["entries"] == 12 || v["entries"] == 13,
            "user {}: {}",
            v["value"],
            v["entries"]
        );
    }

    // The table a person reads.
    let (code, table, stderr) = run_cli(&["stats", "-c", &path, "-g", "usage"], &[]);
    assert_eq!(code, 0, "{stderr}");
    for needle in [
        "ml_events / usage: last 1h",
        "sum data.tokens_used",
        "p95",
        "by data.model: 3 values",
        "gemini/gemini-2.0-flash",
        "ERROR RATE",
    ] {
        assert!(table.contains(needle), "missing {needle:?} in:\n{table}");
    }

    let entries_line = table
        .lines()
        .find(|l| l.starts_with("entries"))
        .unwrap_or("");
    assert!(
        entries_line.ends_with(&format!(" {}", expected.entries)),
        "{table}"
    );

    // A group whose handler keeps no statistics: a clear error naming the kinds that do.
    let (code, _, stderr) = run_cli(&["stats", "-c", &path, "-g", "archive"], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("\"noop\"") && stderr.contains("\"analytics\""),
        "{stderr}"
    );
    let (code, _, stderr) = run_cli(&["stats", "-c", &path, "-g", "nope"], &[]);
    assert_eq!(code, 2);
    assert!(stderr.contains("no group \"nope\""), "{stderr}");
}

/// The minute hashes of a group, field → value.
fn minute_hashes(
    con: &mut redis::Connection,
    group: &str,
) -> BTreeMap<String, BTreeMap<String, String>> {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{{ml_events}}:analytics:{group}:m:*"))
        .query(con)
        .unwrap();
    keys.into_iter()
        .map(|k| {
            let fields: BTreeMap<String, String> =
                redis::cmd("HGETALL").arg(&k).query(con).unwrap();
            (k.rsplit(':').next().unwrap().to_owned(), fields)
        })
        .collect()
}

const TIMING: &str = r#"handler_timeout = "1s"
claim_idle = "2s"
retry_backoff = { initial = "100ms", max = "1s" }"#;

/// Replica `a` reads through `proxy`; once its read is blocked, the proxy holds its
/// requests and 60 LLM events are added at once, so `a` handles them all while its
/// acknowledgement (carrying the effects) waits in the proxy. Returns the group table used.
fn delivered_to_a_whose_ack_is_held(
    redis: &RedisServer,
    proxy: &Proxy,
    con: &mut redis::Connection,
) -> (Daemon, String, Expected, String) {
    let group = llm_group("usage", TIMING).replace("block = \"500ms\"", "block = \"5s\"");
    let (a_config, a_http) = config_with_http(&proxy.url(), "a", &group);
    let a = Daemon::start(&a_config);
    wait_until(Duration::from_secs(20), "a's read to block", || {
        let list: String = redis::cmd("CLIENT").arg("LIST").query(con).unwrap();
        list.lines().any(|l| {
            l.contains("name=streamworker:usage:a")
                && l.contains("cmd=xreadgroup")
                && l.contains(" flags=b ")
        })
    });
    proxy.hold_requests(true);
    // Fewer than `concurrency` (64), so one read takes them all.
    let (events, expected) = llm_events(60, 0x0123_4567_89ab_cdef);
    let mut tx = redis::pipe();
    tx.atomic();
    for fields in &events {
        tx.cmd("XADD")
            .arg("ml_events")
            .arg("*")
            .arg(fields[0].0)
            .arg(&fields[0].1);
    }
    let _: Vec<String> = tx.query(con).unwrap();
    wait_until(Duration::from_secs(5), "the entries delivered to a", || {
        pending_of(con, "ml_events", "usage", "a") == 60
    });
    // a has handled all 60 (its effects are decided and on their way with the
    // acknowledgement), yet none of them reached Redis.
    wait_until(Duration::from_secs(10), "a to handle them all", || {
        http_get(&a_http, "/metrics")
            .and_then(|(_, body)| {
                metric(
                    &body,
                    "streamworker_handler_seconds_count",
                    &[("group", "usage")],
                )
            })
            .unwrap_or(0.0)
            == 60.0
    });
    assert!(
        minute_hashes(con, "usage").is_empty(),
        "a's effects wait in the proxy with its acknowledgement"
    );
    let _ = redis;
    (a, group, expected, a_http)
}

/// Starts replica `b` directly against Redis, with a `control` group that sees every entry
/// once; waits until both groups acknowledged everything.
fn b_handles_everything_again(
    redis: &RedisServer,
    con: &mut redis::Connection,
    group: &str,
) -> (Daemon, String) {
    let groups = format!("{group}{}", llm_group("control", ""));
    let cfg = config(&redis.url(), "b", &groups);
    let b = Daemon::start(&cfg);
    wait_all_acked(con, "ml_events", "usage", Duration::from_secs(15));
    wait_all_acked(con, "ml_events", "control", Duration::from_secs(5));
    (b, cfg)
}

/// The stats answer the input, and field by field the group's hashes equal those of the
/// control group, which saw every entry once.
fn assert_counted_once(con: &mut redis::Connection, cfg: &str, expected: &Expected) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, cfg);
    assert_answers(&stats_json(&path, "usage", "1h"), expected);
    let twice = minute_hashes(con, "usage");
    let once = minute_hashes(con, "control");
    assert!(!once.is_empty());
    assert_eq!(
        twice.keys().collect::<Vec<_>>(),
        once.keys().collect::<Vec<_>>()
    );
    for (minute, fields) in &once {
        let other = &twice[minute];
        assert_eq!(
            fields.keys().collect::<Vec<_>>(),
            other.keys().collect::<Vec<_>>()
        );
        for (field, value) in fields {
            let (x, y): (f64, f64) = (value.parse().unwrap(), other[field].parse().unwrap());
            assert!(close(x, y, 1e-9), "{minute} {field}: once {x}, here {y}");
        }
    }
}

#[test]
fn an_entry_delivered_twice_is_counted_once() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(format!("127.0.0.1:{}", redis.port).parse().unwrap());
    let mut con = redis.connection();
    let (mut a, group, expected, _) = delivered_to_a_whose_ack_is_held(&redis, &proxy, &mut con);
    // SIGKILL: a's held acknowledgement is discarded; b reclaims and handles every entry.
    a.kill();
    let (_b, cfg) = b_handles_everything_again(&redis, &mut con, &group);
    assert_counted_once(&mut con, &cfg, &expected);
}

/// XPENDING calls so far: the acknowledgement script checks each entry with one before it
/// applies its effects and acknowledges it (and skips both for an entry no longer pending).
fn xack_calls(con: &mut redis::Connection) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query(con).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_xpending:calls="))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_late_acknowledgement_does_not_count_entries_again() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(format!("127.0.0.1:{}", redis.port).parse().unwrap());
    let mut con = redis.connection();
    let (a, group, expected, a_http) = delivered_to_a_whose_ack_is_held(&redis, &proxy, &mut con);
    // a stays alive; b reclaims, handles and acknowledges every entry first.
    let (_b, cfg) = b_handles_everything_again(&redis, &mut con, &group);
    // Now a's acknowledgement with its effects reaches Redis: every XACK in it finds the
    // entry acknowledged already, so none of its effects may apply.
    let before = xack_calls(&mut con);
    proxy.hold_requests(false);
    wait_until(
        Duration::from_secs(10),
        "a's late acknowledgement to reach Redis",
        || xack_calls(&mut con) >= before + 60,
    );
    // INFO runs between scripts, never inside one: the scripts whose XACKs it counted
    // have finished, effects and all, so what they changed is visible now.
    assert_counted_once(&mut con, &cfg, &expected);
    // Nor does a count them as acknowledged: b did, and counted them.
    let (_, text) = http_get(&a_http, "/metrics").expect("a serves its metrics");
    assert_eq!(
        metric(
            &text,
            "streamworker_entries_total",
            &[("group", "usage"), ("outcome", "acked")]
        ),
        Some(0.0),
        "a's late acknowledgement found every entry acknowledged already"
    );
    drop(a);
}

#[test]
fn aggregates_expire_retention_after_their_minute() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let time: (u64, u64) = redis::cmd("TIME").query(&mut con).unwrap();
    let now_ms = time.0 * 1000 + time.1 / 1000;
    // Added before the daemon starts, with an id three hours old: past retention.
    let old_id = format!("{}-0", now_ms - 3 * 3_600_000);
    let _: String = redis::cmd("XADD")
        .arg("ml_events")
        .arg(&old_id)
        .arg("event")
        .arg(r#"{"event_type":"llm_call","data":{"model":"old"}}"#)
        .query(&mut con)
        .unwrap();
    let group = llm_group("usage", "").replace(
        "error_types = [\"error\"]",
        "error_types = [\"error\"]\nretention = \"2h\"",
    );
    let cfg = config(&redis.url(), "r1", &group);
    let _daemon = Daemon::start(&cfg);
    let (events, _) = llm_events(20, 7);
    produce(&mut con, "ml_events", &events);
    wait_all_acked(&mut con, "ml_events", "usage", Duration::from_secs(15));

    let time: (u64, u64) = redis::cmd("TIME").query(&mut con).unwrap();
    let now_ms = time.0 * 1000 + time.1 / 1000;
    let retention = 2 * 3_600_000;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("{ml_events}:analytics:usage:m:*")
        .query(&mut con)
        .unwrap();
    assert!(!keys.is_empty() && keys.len() <= 2, "{keys:?}");
    for key in &keys {
        let minute: u64 = key.rsplit(':').next().unwrap().parse().unwrap();
        assert!(
            minute * 60_000 <= now_ms && now_ms - minute * 60_000 < 300_000,
            "{key}"
        );
        let pttl: i64 = redis::cmd("PTTL").arg(key).query(&mut con).unwrap();
        let expected = ((minute + 1) * 60_000 + retention - now_ms) as i64;
        assert!(
            pttl > 0 && (pttl - expected).abs() < 10_000,
            "{key}: PTTL {pttl} ms, expected about {expected} ms (2h after the end of its minute)"
        );
    }
    // The three-hour-old entry was acknowledged but not aggregated: its hash would have
    // expired at once.
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, &cfg);
    let s = stats_json(&path, "usage", "4h");
    assert_eq!(s["entries"], 20);
    assert!(
        s["note"].as_str().is_some_and(|n| n.contains("kept 2h")),
        "{s:#}"
    );
}
