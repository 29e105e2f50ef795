//! The ready configurations in `config/`, one per seed write-up: `check` accepts each file
//! as written and prints every group it declares, and each one, run for real against a
//! private redis-server, handles events of its write-up's shape — every group acknowledges
//! them, none is dead-lettered, and what each handler is configured to produce is there.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::support::*;

/// One file of `config/`: the write-up it implements and the groups it must declare, as
/// (group, stream, handler).
struct Scenario {
    file: &'static str,
    seed: &'static str,
    groups: &'static [(&'static str, &'static str, &'static str)],
}

/// Exactly the files `config/` holds: a new configuration is added here deliberately.
const SCENARIOS: &[Scenario] = &[
    Scenario {
        file: "commerce-pipeline.toml",
        seed: "seeds/event-pipeline-architecture.md",
        groups: &[
            ("normalize", "events.raw", "forward"),
            ("event-processors", "events.normalized", "webhook"),
            ("analytics", "events.normalized", "analytics"),
        ],
    },
    Scenario {
        file: "event-sourcing.toml",
        seed: "seeds/event-streaming-memory.md",
        groups: &[
            ("analytics-group", "memory:events", "analytics"),
            ("audit-group", "memory:events", "warehouse"),
        ],
    },
    Scenario {
        file: "learning-loop.toml",
        seed: "seeds/redis-beta-readiness.md",
        groups: &[
            ("learning-group", "user:feedback", "learning"),
            ("learning-alerts", "user:feedback", "alerts"),
        ],
    },
    Scenario {
        file: "llm-observability.toml",
        seed: "seeds/production-redis-sink.md",
        groups: &[
            ("analytics", "ml_events", "analytics"),
            ("alerts", "ml_events", "alerts"),
            ("warehouse", "ml_events", "warehouse"),
        ],
    },
    Scenario {
        file: "user-activity.toml",
        seed: "seeds/user-logging-redis-streams.md",
        groups: &[
            ("activity", "user_logs", "webhook"),
            ("analytics_group", "user_logs", "analytics"),
        ],
    },
];

const SETTLE: Duration = Duration::from_secs(15);

fn config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config")
}

fn scenario(file: &str) -> &'static Scenario {
    SCENARIOS
        .iter()
        .find(|s| s.file == file)
        .unwrap_or_else(|| panic!("{file} is not in SCENARIOS"))
}

fn path_of(file: &str) -> String {
    config_dir().join(file).display().to_string()
}

/// `table.groups` as name → (stream, handler).
fn groups_of(table: &toml::Table) -> BTreeMap<String, (String, String)> {
    let Some(groups) = table.get("groups").and_then(|g| g.as_table()) else {
        return BTreeMap::new();
    };
    groups
        .iter()
        .map(|(name, g)| {
            let get = |k: &str| {
                g.get(k)
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_owned()
            };
            (name.clone(), (get("stream"), get("handler")))
        })
        .collect()
}

fn expected_groups(s: &Scenario) -> BTreeMap<String, (String, String)> {
    s.groups
        .iter()
        .map(|(g, stream, handler)| (g.to_string(), (stream.to_string(), handler.to_string())))
        .collect()
}

#[test]
fn config_holds_exactly_the_five_scenarios_and_check_accepts_each_as_written() {
    let files: BTreeSet<String> = std::fs::read_dir(config_dir())
        .expect("config/ exists")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let expected: BTreeSet<String> = SCENARIOS.iter().map(|s| s.file.to_owned()).collect();
    assert_eq!(
        files, expected,
        "config/ must hold exactly the scenarios listed in tests/it/scenarios.rs"
    );

    for s in SCENARIOS {
        let path = path_of(s.file);
        let text = std::fs::read_to_string(&path).unwrap();
        let first_line = text.lines().next().unwrap_or_default();
        assert!(
            first_line.starts_with('#') && first_line.contains(s.seed),
            "{}: the header names the write-up it implements ({}): {first_line:?}",
            s.file,
            s.seed
        );
        let declared: toml::Table =
            toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", s.file));
        assert_eq!(groups_of(&declared), expected_groups(s), "{}", s.file);

        let (code, stdout, stderr) = run_cli(&["check", "-c", &path], &[]);
        assert_eq!(code, 0, "{}: check failed:\n{stderr}", s.file);
        let resolved: toml::Table = toml::from_str(&stdout)
            .unwrap_or_else(|e| panic!("{}: check printed no TOML ({e}):\n{stdout}", s.file));
        assert_eq!(
            groups_of(&resolved),
            expected_groups(s),
            "{}: the resolved configuration shows every group:\n{stdout}",
            s.file
        );
        for (name, _, _) in s.groups {
            assert!(
                stdout.contains(&format!("[groups.{name}]"))
                    || stdout.contains(&format!("[groups.\"{name}\"]")),
                "{}: group {name} printed:\n{stdout}",
                s.file
            );
        }
        let streams = |t: &toml::Table| -> BTreeSet<String> {
            t.get("streams")
                .and_then(|s| s.as_table())
                .map(|s| s.keys().cloned().collect())
                .unwrap_or_default()
        };
        assert_eq!(streams(&resolved), streams(&declared), "{}", s.file);
        assert!(
            !stdout.contains("change-me"),
            "{}: placeholder secrets are redacted",
            s.file
        );
    }
}

/// A scenario's configuration running against its own redis-server.
struct Running {
    redis: RedisServer,
    daemon: Daemon,
    con: redis::Connection,
    file: &'static str,
}

/// Runs `config/<file>` (or `text`, a variant of it) against a fresh redis-server, with
/// the URL and the listener overridden and `env` on top; waits until every group of the
/// scenario exists.
fn run(file: &'static str, text: Option<String>, env: &[(String, String)]) -> Running {
    let redis = RedisServer::start();
    run_on(redis, file, text, env)
}

fn run_on(
    redis: RedisServer,
    file: &'static str,
    text: Option<String>,
    env: &[(String, String)],
) -> Running {
    let text = text.unwrap_or_else(|| std::fs::read_to_string(path_of(file)).unwrap());
    let mut vars = vec![
        ("STREAMWORKER__REDIS__URL".to_owned(), redis.url()),
        ("STREAMWORKER__HTTP__LISTEN".to_owned(), String::new()),
    ];
    vars.extend(env.iter().cloned());
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let daemon = Daemon::start_with_env(&text, &vars);
    let mut running = Running {
        con: redis.connection(),
        redis,
        daemon,
        file,
    };
    for (group, stream, _) in scenario(file).groups {
        let deadline = Instant::now() + SETTLE;
        while group_state(&mut running.con, stream, group).is_none() {
            assert!(
                running.daemon.is_running(),
                "{file}: the daemon exited:\n{}",
                running.daemon.logs()
            );
            assert!(
                Instant::now() < deadline,
                "{file}: group {group} on {stream} was not created"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    running
}

impl Running {
    /// Waits until every group of the scenario has read at least `read[stream]` entries of
    /// its stream and has nothing pending and no lag; then checks no dead letters.
    fn settle(&mut self, read: &[(&str, u64)]) {
        for (group, stream, _) in scenario(self.file).groups {
            let at_least = read
                .iter()
                .find(|(s, _)| s == stream)
                .map(|(_, n)| *n)
                .unwrap_or_else(|| panic!("how many entries should {stream} have?"));
            self.settle_group(stream, group, at_least);
        }
    }

    fn settle_group(&mut self, stream: &str, group: &str, at_least: u64) {
        let deadline = Instant::now() + SETTLE;
        loop {
            let state = group_state(&mut self.con, stream, group);
            if let Some(GroupState {
                pending: 0,
                lag: Some(0),
                entries_read: Some(read),
            }) = state
                && read >= at_least
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: group {group} on {stream} did not acknowledge {at_least} entries within {SETTLE:?}: {state:?}",
                self.file
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let dlq = format!("{{{stream}}}:dlq:{group}");
        let dead: u64 = redis::cmd("XLEN").arg(&dlq).query(&mut self.con).unwrap();
        assert_eq!(
            dead,
            0,
            "{}: {group} dead-lettered entries: {:?}",
            self.file,
            entries(&mut self.con, &dlq)
        );
    }

    /// `streamworker stats --json` for an analytics group of the scenario's file.
    fn stats(&self, group: &str) -> Value {
        let url = self.redis.url();
        let (code, stdout, stderr) = run_cli(
            &[
                "stats",
                "-c",
                &path_of(self.file),
                "--group",
                group,
                "--since",
                "15m",
                "--json",
                "--top",
                "0",
            ],
            &[("STREAMWORKER__REDIS__URL", url.as_str())],
        );
        assert_eq!(code, 0, "{}: stats --group {group}: {stderr}", self.file);
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct GroupState {
    pending: u64,
    lag: Option<u64>,
    entries_read: Option<u64>,
}

/// XINFO GROUPS of one group; `None` while the group does not exist.
fn group_state(con: &mut redis::Connection, stream: &str, group: &str) -> Option<GroupState> {
    let groups: Vec<redis::Value> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query(con)
        .ok()?;
    groups.into_iter().map(value_map).find_map(|g| {
        (g.get("name").map(String::as_str) == Some(group)).then(|| GroupState {
            pending: g.get("pending").and_then(|v| v.parse().ok()).unwrap_or(0),
            lag: g.get("lag").and_then(|v| v.parse().ok()),
            entries_read: g.get("entries-read").and_then(|v| v.parse().ok()),
        })
    })
}

fn field<'a>(fields: &'a Fields, name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k.as_slice() == name.as_bytes())
        .map(|(_, v)| std::str::from_utf8(v).unwrap())
}

fn names(fields: &Fields) -> Vec<&str> {
    fields
        .iter()
        .map(|(k, _)| std::str::from_utf8(k).unwrap())
        .collect()
}

/// Every line of every `.jsonl` file below `dir`, parsed.
fn jsonl_lines(dir: &Path) -> Vec<Value> {
    let mut files = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else if p.extension().is_some_and(|x| x == "jsonl") {
                files.push(p);
            }
        }
    }
    files.sort();
    files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).expect("every line is JSON"))
                .collect::<Vec<Value>>()
        })
        .collect()
}

fn wait_for_lines(dir: &Path, n: usize) -> Vec<Value> {
    wait_until(SETTLE, &format!("{n} lines in {}", dir.display()), || {
        jsonl_lines(dir).len() >= n
    });
    jsonl_lines(dir)
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

/// The values of one dimension in a stats report, by value.
fn dimension(stats: &Value, path: &str) -> BTreeMap<String, Value> {
    stats["dimensions"][path]["values"]
        .as_array()
        .unwrap_or_else(|| panic!("dimension {path} in {stats:#}"))
        .iter()
        .map(|v| (v["value"].as_str().unwrap().to_owned(), v.clone()))
        .collect()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn env(pairs: &[(&str, String)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

#[test]
fn user_activity_runs_the_webhook_and_the_analytics_group() {
    let hook = WebhookServer::start();
    let mut run = run(
        "user-activity.toml",
        None,
        &env(&[(
            "STREAMWORKER__GROUPS__ACTIVITY__OPTIONS__URL",
            hook.url("/events"),
        )]),
    );
    // The write-up's event: user_id, event_type, message, timestamp.
    let types = ["prompt", "click", "pageview", "feedback"];
    let events: Vec<Vec<(&str, String)>> = (0..20)
        .map(|i| {
            vec![
                ("user_id", format!("{}", 40 + i % 5)),
                ("event_type", types[i % 4].to_owned()),
                ("message", format!("What is quantum computing? ({i})")),
                ("timestamp", "2025-07-25T18:00:00Z".to_owned()),
            ]
        })
        .collect();
    let ids = produce(&mut run.con, "user_logs", &events);
    run.settle(&[("user_logs", 20)]);

    let handled = hook.handled();
    let want: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(handled.keys().collect::<BTreeSet<_>>(), want);
    let hit = hook.hits().into_iter().find(|h| h.id == ids[0]).unwrap();
    assert_eq!(hit.body["fields"]["user_id"], "40");
    assert!(
        hit.headers.contains_key("x-streamworker-signature"),
        "the placeholder secret signs requests"
    );

    let s = run.stats("analytics_group");
    assert_eq!(s["entries"], 20, "{s:#}");
    for t in types {
        assert_eq!(s["event_types"][t], 5, "{t}: {s:#}");
    }
    let users = dimension(&s, "user_id");
    assert_eq!(users.len(), 5, "{s:#}");
    assert!(users.values().all(|v| v["entries"] == 4), "{s:#}");
}

const MODELS: [&str; 3] = ["gpt-4o", "claude-3-5-sonnet", "gemini/gemini-2.0-flash"];

#[test]
fn llm_observability_fans_out_to_analytics_alerts_and_warehouse() {
    let archive = tempfile::tempdir().unwrap();
    let mut run = run(
        "llm-observability.toml",
        None,
        &env(&[(
            "STREAMWORKER__GROUPS__WAREHOUSE__OPTIONS__DIRECTORY",
            archive.path().display().to_string(),
        )]),
    );
    // The write-up's event shape in field `event`: 24 calls, 3 errors (10 %), 3 tokens.
    let (mut tokens, mut cost, mut calls) = (0.0, 0.0, BTreeMap::<&str, u64>::new());
    let docs: Vec<Value> = (0..30usize)
        .map(|i| {
            let model = MODELS[i % 3];
            let tags = json!({"environment": "production", "user_id": format!("user_{}", i % 4)});
            match i % 10 {
                3 => json!({"event_id": format!("e{i}"), "event_type": "error",
                    "timestamp": "2024-01-15T16:30:45.123456Z", "execution_id": "exec_abc123",
                    "data": {"model": model, "error_type": "rate_limit"}, "tags": tags}),
                7 => json!({"event_id": format!("e{i}"), "event_type": "token",
                    "data": {"model": model, "token": "Hel"}, "tags": tags}),
                _ => {
                    let (t, c) = (200 + i as u64, 0.0001 * (i + 1) as f64);
                    tokens += t as f64;
                    cost += c;
                    *calls.entry(model).or_default() += 1;
                    json!({"event_id": format!("e{i}"), "event_type": "llm_call",
                        "timestamp": "2024-01-15T16:30:45.123456Z", "execution_id": "exec_abc123",
                        "operation": "answer_generation",
                        "data": {"model": model, "tokens_used": t, "cost_usd": c,
                                 "response_time_ms": 300 + 10 * i},
                        "tags": tags})
                }
            }
        })
        .collect();
    let events: Vec<Vec<(&str, String)>> = docs
        .iter()
        .map(|d| vec![("event", d.to_string())])
        .collect();
    let ids = produce(&mut run.con, "ml_events", &events);
    run.settle(&[("ml_events", 30)]);

    // analytics: the write-up's analyze_llm_usage, from the aggregates.
    let s = run.stats("analytics");
    assert_eq!(s["entries"], 30, "{s:#}");
    assert_eq!(s["errors"], 3);
    assert_eq!(s["event_types"]["llm_call"], 24);
    assert_eq!(s["event_types"]["token"], 3);
    assert_eq!(s["sums"]["data.tokens_used"].as_f64(), Some(tokens));
    assert!(close(s["sums"]["data.cost_usd"].as_f64().unwrap(), cost));
    assert_eq!(s["latency_ms"]["count"], 24);
    let models = dimension(&s, "data.model");
    for (model, n) in &calls {
        assert_eq!(models[*model]["event_types"]["llm_call"], *n, "{model}");
        assert!(models[*model]["latency_ms"]["count"].as_u64() == Some(*n));
    }
    assert_eq!(dimension(&s, "tags.user_id").len(), 4);
    assert_eq!(dimension(&s, "data.error_type")["rate_limit"]["entries"], 3);

    // warehouse: every event once, in the files under the overridden directory.
    let lines = wait_for_lines(archive.path(), 30);
    let stored: Vec<&str> = lines.iter().map(|l| l["id"].as_str().unwrap()).collect();
    assert_eq!(
        stored.iter().copied().collect::<BTreeSet<_>>(),
        ids.iter().map(String::as_str).collect::<BTreeSet<_>>()
    );
    assert_eq!(stored.len(), 30, "no duplicates");
    let first = lines.iter().find(|l| l["id"] == ids[0].as_str()).unwrap();
    assert_eq!(first["stream"], "ml_events");
    assert_eq!(first["event_type"], "llm_call");
    assert_eq!(first["payload"], docs[0]);

    // alerts: 10 % errors over the last minute (30 events ≥ min_events 20) fires the
    // error-rate rule, once; nothing else fires.
    wait_until(SETTLE, "an alert event", || {
        !entries(&mut run.con, "alerts").is_empty()
    });
    let alerts = entries(&mut run.con, "alerts");
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    let (_, fields) = &alerts[0];
    assert_eq!(field(fields, "rule"), Some("error-rate"));
    assert_eq!(field(fields, "state"), Some("firing"));
    assert_eq!(field(fields, "stream"), Some("ml_events"));
}

#[test]
fn commerce_pipeline_normalizes_raw_events_for_the_downstream_groups() {
    let hook = WebhookServer::start();
    let mut run = run(
        "commerce-pipeline.toml",
        None,
        &env(&[(
            "STREAMWORKER__GROUPS__EVENT-PROCESSORS__OPTIONS__URL",
            hook.url("/api/streams/events"),
        )]),
    );
    // The write-up's raw message format; `payload` is JSON text. Two event types the
    // pipeline does not know, and a field outside the raw schema.
    let raw = [
        (
            "b1",
            "purchase",
            json!({"profile_id": "p-1", "identifiers": {"phone": "+1234567890"}, "total": 99.99}),
        ),
        (
            "b1",
            "page_view",
            json!({"identifiers": {"email": "a@example.com"}, "url": "/shoes"}),
        ),
        (
            "b2",
            "whatsapp_message",
            json!({"identifiers": {"phone": "+15550001"}, "text": "hi"}),
        ),
        (
            "b2",
            "purchase",
            json!({"profile_id": "p-2", "identifiers": {"phone": "+15550002"}, "total": 20.01}),
        ),
        ("b1", "cart_abandoned", json!({"profile_id": "p-1"})),
        ("b2", "page_view", json!({"url": "/"})),
        (
            "b1",
            "purchase",
            json!({"identifiers": {"phone": "+15550003"}, "total": 0.5}),
        ),
        ("b2", "debug_ping", json!({})),
    ];
    let events: Vec<Vec<(&str, String)>> = raw
        .iter()
        .enumerate()
        .map(|(i, (brand, kind, payload))| {
            vec![
                ("event_id", format!("evt-{i}")),
                ("brand_id", brand.to_string()),
                ("event_type", kind.to_string()),
                ("payload", payload.to_string()),
                ("client_ip", "10.0.0.1".to_owned()),
                ("timestamp", "2024-12-01T10:00:01Z".to_owned()),
            ]
        })
        .collect();
    let ids = produce(&mut run.con, "events.raw", &events);
    let forwarded: Vec<usize> = (0..raw.len())
        .filter(|&i| ["purchase", "page_view", "whatsapp_message"].contains(&raw[i].1))
        .collect();
    run.settle_group("events.raw", "normalize", raw.len() as u64);
    run.settle(&[
        ("events.raw", raw.len() as u64),
        ("events.normalized", forwarded.len() as u64),
    ]);

    let normalized = entries(&mut run.con, "events.normalized");
    assert_eq!(normalized.len(), forwarded.len(), "{normalized:?}");
    for ((_, fields), &i) in normalized.iter().zip(&forwarded) {
        assert_eq!(field(fields, "source_id"), Some(ids[i].as_str()));
        assert_eq!(field(fields, "event_id"), Some(format!("evt-{i}").as_str()));
        assert_eq!(field(fields, "normalized_by"), Some("normalize"));
        assert!(field(fields, "client_ip").is_none() && field(fields, "payload").is_none());
        let payload: Value =
            serde_json::from_str(field(fields, "normalized_payload").unwrap()).unwrap();
        assert_eq!(payload, raw[i].2);
    }
    let (_, first) = &normalized[0];
    assert_eq!(
        names(first),
        [
            "event_id",
            "brand_id",
            "event_type",
            "normalized_payload",
            "timestamp",
            "identifiers",
            "profile_id",
            "total",
            "normalized_by",
            "received_at",
            "source_id",
        ]
    );
    assert_eq!(field(first, "profile_id"), Some("p-1"));
    assert_eq!(field(first, "total"), Some("99.99"));
    let identifiers: Value = serde_json::from_str(field(first, "identifiers").unwrap()).unwrap();
    assert_eq!(identifiers, json!({"phone": "+1234567890"}));
    let (_, page_view) = &normalized[1];
    assert!(field(page_view, "profile_id").is_none() && field(page_view, "total").is_none());

    // event-processors: every normalized event POSTed once to the backend.
    let handled = hook.handled();
    assert_eq!(handled.len(), forwarded.len(), "{handled:?}");
    assert!(handled.values().all(|&n| n == 1));
    assert!(
        hook.hits()
            .iter()
            .all(|h| h.body["stream"] == "events.normalized"
                && h.body["group"] == "event-processors"
                && h.body["fields"]["normalized_by"] == "normalize")
    );

    // analytics: per brand and event type, revenue summed from the extracted total.
    let s = run.stats("analytics");
    assert_eq!(s["entries"], 6, "{s:#}");
    assert_eq!(s["event_types"]["purchase"], 3);
    assert_eq!(s["event_types"]["page_view"], 2);
    assert_eq!(s["event_types"]["whatsapp_message"], 1);
    assert!(close(s["sums"]["total"].as_f64().unwrap(), 120.5), "{s:#}");
    let brands = dimension(&s, "brand_id");
    assert_eq!(brands["b1"]["entries"], 3);
    assert!(close(
        brands["b1"]["sums"]["total"].as_f64().unwrap(),
        100.49
    ));
    assert!(close(
        brands["b2"]["sums"]["total"].as_f64().unwrap(),
        20.01
    ));
}

#[test]
fn learning_loop_learns_from_feedback_and_emits_one_adaptation() {
    let data = tempfile::tempdir().unwrap();
    let mut run = run(
        "learning-loop.toml",
        None,
        &env(&[(
            "STREAMWORKER__GROUPS__LEARNING-GROUP__OPTIONS__DATASET_DIR",
            data.path().display().to_string(),
        )]),
    );
    // 22 poor ratings of one model (≥ min_feedback 20, average 2 ≤ threshold 3) and three
    // thumbs-up for another (too few to be judged).
    let mut events: Vec<Vec<(&str, String)>> = (0..22)
        .map(|i| {
            vec![
                ("model", "gpt-4o".to_owned()),
                ("user", format!("u{i}")),
                ("rating", "2".to_owned()),
                ("prompt", "How do I reverse a list?".to_owned()),
                ("response", "Use a loop.".to_owned()),
            ]
        })
        .collect();
    events.extend((0..3).map(|i| {
        vec![
            ("model", "claude-3-5-sonnet".to_owned()),
            ("user", format!("u{i}")),
            ("thumbs", "up".to_owned()),
            ("prompt", "What is a monad?".to_owned()),
            (
                "response",
                "A monoid in the category of endofunctors.".to_owned(),
            ),
        ]
    }));
    let ids = produce(&mut run.con, "user:feedback", &events);
    run.settle(&[("user:feedback", 25)]);

    let model: BTreeMap<String, String> = redis::cmd("HGETALL")
        .arg("{user:feedback}:learning:learning-group:model:gpt-4o")
        .query(&mut run.con)
        .unwrap();
    assert_eq!(
        model.get("count").map(String::as_str),
        Some("22"),
        "{model:?}"
    );
    assert_eq!(model.get("rating_sum").map(String::as_str), Some("44"));

    let lines = wait_for_lines(&data.path().join("learning-group"), 25);
    let mut written: Vec<&str> = lines.iter().map(|l| l["id"].as_str().unwrap()).collect();
    written.sort();
    let mut want: Vec<&str> = ids.iter().map(String::as_str).collect();
    want.sort();
    assert_eq!(written, want, "one dataset line per feedback");

    wait_until(SETTLE, "an adaptation event", || {
        !entries(&mut run.con, "ai:adaptations").is_empty()
    });
    let adaptations = entries(&mut run.con, "ai:adaptations");
    assert_eq!(adaptations.len(), 1, "{adaptations:?}");
    let (_, fields) = &adaptations[0];
    assert_eq!(field(fields, "model"), Some("gpt-4o"));
    assert_eq!(field(fields, "group"), Some("learning-group"));
    assert_eq!(
        field(fields, "rating").map(|r| r.parse::<f64>().unwrap()),
        Some(2.0)
    );
    // The lag rule sees no lag: nothing on the alerts stream.
    assert!(entries(&mut run.con, "alerts").is_empty());
}

/// The replay group of the comment in config/event-sourcing.toml, uncommented.
fn replay_example(text: &str) -> String {
    let uncommented = text
        .lines()
        .map(|line| line.trim_start_matches('#').trim())
        .skip_while(|line| *line != "[groups.rebuild-2025-01]");
    let mut out = String::new();
    for line in uncommented {
        out.push_str(line);
        out.push('\n');
        if line.starts_with("url = ") {
            return out;
        }
    }
    panic!("config/event-sourcing.toml has no replay example ending with its url");
}

#[test]
fn event_sourcing_archives_counts_trims_by_age_and_replays_from_a_time() {
    const STREAM: &str = "memory:events";
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let event = |kind: &str, agent: &str, data: Value| -> Vec<(&'static str, String)> {
        vec![
            ("type", kind.to_owned()),
            ("session_id", "session-123".to_owned()),
            ("user_id", "user-456".to_owned()),
            ("agent_id", agent.to_owned()),
            ("timestamp", "2025-01-01T10:00:00Z".to_owned()),
            ("data", data.to_string()),
        ]
    };
    // An old session, 40 days ago: beyond the 30-day retention.
    let old_ms = now_ms() - 40 * 24 * 3600 * 1000;
    let mut old_ids = Vec::new();
    for (seq, kind) in ["session.started", "message.added", "session.ended"]
        .iter()
        .enumerate()
    {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(STREAM).arg(format!("{old_ms}-{seq}"));
        for (k, v) in event(kind, "support-bot", json!({})) {
            cmd.arg(k).arg(v);
        }
        old_ids.push(cmd.query::<String>(&mut con).unwrap());
    }
    // Today's session timeline, in two halves with a point in time between them.
    let timeline = [
        ("session.started", "support-bot", json!({})),
        (
            "message.added",
            "support-bot",
            json!({"message_id": "msg-789", "role": "user", "tokens": 150}),
        ),
        (
            "message.added",
            "support-bot",
            json!({"message_id": "msg-790", "role": "assistant", "tokens": 90}),
        ),
        (
            "search.performed",
            "research-bot",
            json!({"query": "redis streams"}),
        ),
        (
            "error.occurred",
            "research-bot",
            json!({"error": "timeout"}),
        ),
        ("summary.created", "research-bot", json!({"tokens": 40})),
        (
            "message.added",
            "support-bot",
            json!({"message_id": "msg-791", "role": "assistant"}),
        ),
        ("session.ended", "support-bot", json!({})),
    ];
    let events: Vec<_> = timeline
        .iter()
        .map(|(k, a, d)| event(k, a, d.clone()))
        .collect();
    let before = produce(&mut con, STREAM, &events[..4]);
    std::thread::sleep(Duration::from_millis(20));
    let point = now_ms();
    std::thread::sleep(Duration::from_millis(20));
    let after = produce(&mut con, STREAM, &events[4..]);

    // The header's replay example, pointed at that time and at a webhook.
    let hook = WebhookServer::start();
    let text = std::fs::read_to_string(path_of("event-sourcing.toml")).unwrap();
    let replay = replay_example(&text)
        .replace("1735689599999-0", &format!("{}-0", point - 1))
        .replace("http://127.0.0.1:8080/rebuild", &hook.url("/rebuild"));
    let audit = tempfile::tempdir().unwrap();
    let mut run = run_on(
        redis,
        "event-sourcing.toml",
        Some(format!("{text}\n{replay}")),
        &env(&[(
            "STREAMWORKER__GROUPS__AUDIT-GROUP__OPTIONS__DIRECTORY",
            audit.path().display().to_string(),
        )]),
    );
    run.settle(&[(STREAM, 11)]);

    // The audit archive holds every event, old ones included, once each.
    let lines = wait_for_lines(audit.path(), 11);
    let archived: Vec<&str> = lines.iter().map(|l| l["id"].as_str().unwrap()).collect();
    let all: Vec<&str> = old_ids
        .iter()
        .chain(&before)
        .chain(&after)
        .map(String::as_str)
        .collect();
    assert_eq!(archived, all, "archived once each, in stream order");
    assert!(
        lines
            .iter()
            .zip(["session.started", "message.added", "session.ended"])
            .all(|(l, kind)| l["event_type"] == kind && l["payload"]["agent_id"] == "support-bot")
    );

    // Analytics per type and agent; the 40-day-old events are past its 7-day retention.
    let s = run.stats("analytics-group");
    assert_eq!(s["entries"], 8, "{s:#}");
    assert_eq!(s["errors"], 1);
    assert_eq!(s["event_types"]["message.added"], 3);
    // `tokens` inside the JSON text of the flat field `data`: 150 + 90 + 40.
    assert_eq!(s["sums"]["data.tokens"].as_f64(), Some(280.0), "{s:#}");
    let agents = dimension(&s, "agent_id");
    assert_eq!(agents["support-bot"]["entries"], 5);
    assert_eq!(agents["research-bot"]["entries"], 3);
    assert_eq!(agents["research-bot"]["errors"], 1);

    // Retention by age: the old session is trimmed once both groups have acknowledged it.
    let ids_left = |con: &mut redis::Connection| -> Vec<String> {
        entries(con, STREAM).into_iter().map(|(id, _)| id).collect()
    };
    wait_until(SETTLE, "the old session trimmed", || {
        ids_left(&mut run.con).len() == 8
    });
    let remaining = ids_left(&mut run.con);
    assert_eq!(
        remaining,
        before.iter().chain(&after).cloned().collect::<Vec<_>>()
    );

    // The replay group created at a time-based id got exactly the events after that time.
    wait_until(
        SETTLE,
        "the replay group to handle the later events",
        || hook.handled().len() >= after.len(),
    );
    let replayed: BTreeSet<String> = hook.handled().into_keys().collect();
    assert_eq!(replayed, after.iter().cloned().collect::<BTreeSet<_>>());
    assert_eq!(
        group_state(&mut run.con, STREAM, "rebuild-2025-01").map(|g| g.pending),
        Some(0)
    );
}
