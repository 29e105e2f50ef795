//! README promises that had no test of their own (see tests/claims.toml): the webhook's
//! retryable answers and redirects, each cross-key rule of `check`, the dead-letter commands'
//! selections and output formats, `password_file`, `STREAMWORKER_CONFIG`, the `OTEL_*`
//! variables and `produce`. Each drives the binary against a real redis-server.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::support::*;

/// A webhook group on `orders` with fast retries: three deliveries at most, backoffs of a
/// few hundred milliseconds, far below `claim_idle`.
fn webhook_group(name: &str, url: &str) -> String {
    format!(
        r#"
[groups.{name}]
stream = "orders"
handler = "webhook"
block = "500ms"
handler_timeout = "2s"
claim_idle = "5s"
consumer_ttl = "1m"
max_deliveries = 3
retry_backoff = {{ initial = "100ms", max = "400ms", multiplier = 2.0, jitter = 0.0 }}
[groups.{name}.options]
url = "{url}"
timeout = "500ms"
"#
    )
}

fn fields_of(con: &mut redis::Connection, key: &str) -> Vec<HashMap<String, String>> {
    entries(con, key)
        .into_iter()
        .map(|(_, fields)| {
            fields
                .into_iter()
                .map(|(k, v)| {
                    (
                        String::from_utf8_lossy(&k).into_owned(),
                        String::from_utf8_lossy(&v).into_owned(),
                    )
                })
                .collect()
        })
        .collect()
}

/// README: "429, 5xx, a timeout or a refused connection is retried". Each group's endpoint
/// fails the first delivery its own way and answers 200 to the second; the refused one never
/// listens, so its entry is retried up to `max_deliveries` and only then dead-lettered.
#[test]
fn webhook_429_5xx_timeouts_and_refused_connections_are_retried() {
    let redis = RedisServer::start();
    let hook = WebhookServer::start_with(|hit| match (hit.path.as_str(), hit.delivery_count) {
        ("busy", 1) => (429, Duration::ZERO),
        ("broken", 1) => (503, Duration::ZERO),
        // Longer than the webhook's 500ms timeout: the request is abandoned.
        ("slow", 1) => (200, Duration::from_secs(3)),
        _ => (200, Duration::ZERO),
    });
    let refused = format!("http://127.0.0.1:{}/nobody", free_port());
    let groups = [
        webhook_group("busy", &hook.url("busy")),
        webhook_group("broken", &hook.url("broken")),
        webhook_group("slow", &hook.url("slow")),
        webhook_group("refused", &refused),
    ]
    .concat();
    let daemon = Daemon::start(&config(&redis.url(), "r1", &groups));
    let mut con = redis.connection();
    wait_until(Duration::from_secs(20), "the groups exist", || {
        group_info(&mut con, "orders", "refused").is_some()
    });
    let ids = produce(&mut con, "orders", &[vec![("order", "1".to_owned())]]);

    // The abandoned request never reaches the test server's log of answered requests, so
    // the timeout is read from the daemon's.
    let mut daemon_logs = String::new();
    wait_until(Duration::from_secs(20), "the slow call times out", || {
        daemon_logs = daemon.logs();
        daemon_logs.contains("/slow timed out after 500ms")
    });
    for group in ["busy", "broken", "slow"] {
        wait_until(
            Duration::from_secs(30),
            &format!("{group} acknowledges the entry"),
            || group_info(&mut con, "orders", group) == Some((0, Some(0))),
        );
        let deliveries: Vec<u64> = hook
            .hits()
            .iter()
            .filter(|h| h.path == group && h.id == ids[0])
            .map(|h| h.delivery_count)
            .collect();
        let expected = if group == "slow" { vec![2] } else { vec![1, 2] };
        assert_eq!(
            deliveries, expected,
            "{group}: the failed first delivery is retried once, then succeeds"
        );
        let dlq = format!("{{orders}}:dlq:{group}");
        assert!(
            fields_of(&mut con, &dlq).is_empty(),
            "{group}: a retryable failure is not dead-lettered"
        );
    }

    // Nothing listens: every delivery is refused, each is retried, the last dead-letters.
    let mut dead = Vec::new();
    wait_until(
        Duration::from_secs(30),
        "the refused entry is dead-lettered",
        || {
            dead = fields_of(&mut con, "{orders}:dlq:refused");
            !dead.is_empty()
        },
    );
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["dlq_origin_id"], ids[0]);
    assert_eq!(
        dead[0]["dlq_deliveries"], "3",
        "a refused connection is retried up to max_deliveries: {:?}",
        dead[0]
    );
    assert_eq!(
        group_info(&mut con, "orders", "refused"),
        Some((0, Some(0)))
    );
}

/// A raw HTTP server that answers every request with `status` and a `Location` header;
/// returns its URL and a counter of requests.
fn redirecting_server(
    status: &str,
    location: String,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = count.clone();
    let status = status.to_owned();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            // Read the whole request (headers, then Content-Length bytes of body) before
            // answering, so the client sees the answer and not a reset.
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            while let Ok(n) = stream.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).to_lowercase();
                if let Some(end) = text.find("\r\n\r\n") {
                    let length: usize = text
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + length {
                        break;
                    }
                }
            }
            let reply = format!(
                "HTTP/1.1 {status}\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            let _ = stream.write_all(reply.as_bytes());
        }
    });
    (format!("http://{addr}/events"), count)
}

/// README: "Redirects are not followed." A 307 (which would repeat the POST) and a 302
/// point at a working endpoint; the endpoint never hears of the entries, which are
/// dead-lettered at once ("any other status dead-letters the entry at once").
#[test]
fn webhook_redirects_are_not_followed() {
    let redis = RedisServer::start();
    let target = WebhookServer::start();
    let (temporary, temporary_hits) = redirecting_server("307 Temporary Redirect", target.url("t"));
    let (found, found_hits) = redirecting_server("302 Found", target.url("f"));
    let groups = [
        webhook_group("temporary", &temporary),
        webhook_group("found", &found),
    ]
    .concat();
    let _daemon = Daemon::start(&config(&redis.url(), "r1", &groups));
    let mut con = redis.connection();
    wait_until(Duration::from_secs(20), "the groups exist", || {
        group_info(&mut con, "orders", "found").is_some()
    });
    let ids = produce(&mut con, "orders", &[vec![("order", "1".to_owned())]]);
    for (group, hits) in [("temporary", &temporary_hits), ("found", &found_hits)] {
        let dlq = format!("{{orders}}:dlq:{group}");
        let mut dead = Vec::new();
        wait_until(
            Duration::from_secs(20),
            &format!("{group} dead-letters the entry"),
            || {
                dead = fields_of(&mut con, &dlq);
                !dead.is_empty()
            },
        );
        assert_eq!(dead[0]["dlq_origin_id"], ids[0]);
        assert_eq!(dead[0]["dlq_deliveries"], "1", "permanent: {:?}", dead[0]);
        assert!(
            dead[0]["dlq_error"].contains("redirects are not followed"),
            "the error says why: {:?}",
            dead[0]["dlq_error"]
        );
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
    assert_eq!(target.count(), 0, "the redirect target was never called");
}

/// A valid configuration; each case of [`check_enforces_each_cross_key_rule`] changes one
/// thing in it.
const VALID: &str = r#"
[redis]
url = "redis://127.0.0.1:6379/0"

[worker]
shutdown_timeout = "30s"

[groups.g]
stream = "orders"
handler = "webhook"
handler_timeout = "5s"
claim_idle = "1m"
consumer_ttl = "1h"
block = "2s"
retry_backoff = { initial = "1s", max = "20s", multiplier = 2.0, jitter = 0.2 }
[groups.g.options]
url = "http://127.0.0.1:8080/events"
timeout = "5s"
"#;

/// README: "Rules `check` enforces across keys" — one bad configuration per rule, each
/// differing from a valid one in one value, each refused (exit 2) with a message naming the
/// key and the rule.
#[test]
fn check_enforces_each_cross_key_rule() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, stderr) = run_cli(&["check", "-c", &write_config(&dir, VALID)], &[]);
    assert_eq!(code, 0, "the baseline is valid: {stderr}");

    let cases: [(&str, &str, &str, &[&str]); 7] = [
        (
            "claim_idle > handler_timeout",
            "handler_timeout = \"5s\"",
            "handler_timeout = \"1m\"",
            &["groups.g.claim_idle (1m) must be greater than handler_timeout (1m)"],
        ),
        (
            "retry_backoff.max × (1 + jitter) < claim_idle",
            "max = \"20s\"",
            "max = \"50s\"",
            &[
                "groups.g.retry_backoff.max",
                "= 1m must be shorter than claim_idle (1m)",
            ],
        ),
        (
            "block < shutdown_timeout",
            "block = \"2s\"",
            "block = \"30s\"",
            &["groups.g.block (30s) must be shorter than worker.shutdown_timeout (30s)"],
        ),
        (
            "consumer_ttl > claim_idle",
            "consumer_ttl = \"1h\"",
            "consumer_ttl = \"1m\"",
            &["groups.g.consumer_ttl (1m) must be longer than claim_idle (1m)"],
        ),
        (
            "the dead-letter stream differs from its source",
            "consumer_ttl = \"1h\"",
            "consumer_ttl = \"1h\"\ndead_letter_stream = \"orders\"",
            &["groups.g.dead_letter_stream = \"orders\": must differ from the group's stream"],
        ),
        (
            "a webhook's timeout is at most handler_timeout",
            "\ntimeout = \"5s\"",
            "\ntimeout = \"6s\"",
            &[
                "groups.g.options.timeout",
                "(6s) exceeds the group's handler_timeout (5s)",
            ],
        ),
        (
            "under Redis Cluster, the dead-letter stream shares the stream's hash slot",
            "url = \"redis://127.0.0.1:6379/0\"",
            "cluster = [\"redis://127.0.0.1:7000\"]",
            // The default is derived into the slot; an explicit one elsewhere is refused.
            &[],
        ),
    ];
    for (rule, from, to, needles) in cases {
        assert!(VALID.contains(from), "{rule}: {from:?} not in the baseline");
        let text = VALID.replacen(from, to, 1);
        let (code, stdout, stderr) = run_cli(&["check", "-c", &write_config(&dir, &text)], &[]);
        if needles.is_empty() {
            // The cluster case: valid with the default dead-letter stream…
            assert_eq!(code, 0, "{rule}: {stderr}");
            assert!(
                stdout.contains("dead_letter_stream = \"{orders}:dlq:g\""),
                "{stdout}"
            );
            // …refused with one in another slot.
            let text = text.replacen(
                "consumer_ttl = \"1h\"",
                "consumer_ttl = \"1h\"\ndead_letter_stream = \"orders-dead\"",
                1,
            );
            let (code, _, stderr) = run_cli(&["check", "-c", &write_config(&dir, &text)], &[]);
            assert_eq!(code, 2, "{rule}: {stderr}");
            assert!(
                stderr.contains("groups.g.dead_letter_stream = \"orders-dead\" is in another Redis Cluster hash slot"),
                "{rule}: {stderr}"
            );
            continue;
        }
        assert_eq!(
            code, 2,
            "{rule}: exit 2\nstdout: {stdout}\nstderr: {stderr}"
        );
        for needle in needles {
            assert!(
                stderr.contains(needle),
                "{rule}: missing {needle:?} in:\n{stderr}"
            );
        }
        assert_eq!(
            stderr.matches("\n  - ").count(),
            1,
            "{rule}: exactly one problem:\n{stderr}"
        );
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Adds a dead letter as the daemon writes them, with an explicit id (so its age is known).
fn add_dead_letter(con: &mut redis::Connection, id: &str, order: &str, origin_id: &str) {
    let _: String = redis::cmd("XADD")
        .arg("{orders}:dlq:billing")
        .arg(id)
        .arg(&[
            ("order", order),
            ("dlq_origin_stream", "orders"),
            ("dlq_origin_id", origin_id),
            ("dlq_group", "billing"),
            ("dlq_deliveries", "5"),
            ("dlq_error", "HTTP 503 from the endpoint"),
            ("dlq_failed_at", "2025-01-01T00:00:00Z"),
            ("dlq_consumer", "r1"),
        ])
        .query(con)
        .unwrap();
}

/// README: `dlq list [--count 20] [--json]`, `dlq show … [--json]`, `dlq replay --since`,
/// `dlq purge (--all | --id ID… | --before 7d)`. Dead letters three hours old and fresh ones
/// tell the time selections apart.
#[test]
fn dlq_list_show_replay_since_and_purge_select_what_they_name() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        &config(
            &redis.url(),
            "r1",
            &webhook_group("billing", "http://127.0.0.1:9/never"),
        ),
    );
    let old = now_ms() - 3 * 3_600_000;
    add_dead_letter(&mut con, &format!("{old}-0"), "old-1", "1-1");
    add_dead_letter(&mut con, &format!("{old}-1"), "old-2", "1-2");
    for n in 1..=3 {
        // Origin ids no stream id of this test can contain by chance.
        add_dead_letter(&mut con, "*", &format!("new-{n}"), &format!("77777-{n}"));
    }
    let dlq = |args: &[&str]| {
        let mut all = vec!["dlq"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-c", &path, "--group", "billing"]);
        let (code, stdout, stderr) = run_cli(&all, &[]);
        assert_eq!(code, 0, "dlq {args:?}: {stderr}");
        (stdout, stderr)
    };

    // --count: the oldest N, and the header says how many there are.
    let (out, _) = dlq(&["list", "--count", "2"]);
    assert!(
        out.contains("5 dead letters (oldest 2 shown; --count to see more)"),
        "{out}"
    );
    assert!(
        out.contains(&format!("{old}-0")) && out.contains(&format!("{old}-1")),
        "{out}"
    );
    assert!(!out.contains("77777-1"), "only the oldest two: {out}");

    // --json: every field a machine needs.
    let (out, _) = dlq(&["list", "--json"]);
    let listed: Vec<serde_json::Value> = serde_json::from_str(&out).expect("list --json is JSON");
    assert_eq!(listed.len(), 5);
    assert_eq!(listed[0]["id"], format!("{old}-0"));
    assert_eq!(listed[0]["origin_id"], "1-1");
    assert_eq!(listed[0]["deliveries"], "5");
    assert_eq!(listed[0]["error"], "HTTP 503 from the endpoint");
    let (out, _) = dlq(&["show", &format!("{old}-1"), "--json"]);
    let shown: serde_json::Value = serde_json::from_str(&out).expect("show --json is JSON");
    assert_eq!(shown["id"], format!("{old}-1"));
    assert_eq!(shown["fields"]["order"], "old-2");
    assert_eq!(shown["fields"]["dlq_origin_id"], "1-2");

    // --since 1h: the three fresh ones go back to the stream, the old ones stay.
    let (_, err) = dlq(&["replay", "--since", "1h"]);
    assert!(err.contains("replayed 3 dead letters to orders"), "{err}");
    let replayed = fields_of(&mut con, "orders");
    let orders: Vec<&str> = replayed.iter().map(|f| f["order"].as_str()).collect();
    assert_eq!(orders, ["new-1", "new-2", "new-3"]);
    assert_eq!(replayed[0]["dlq_replay_of"], "77777-1");
    assert_eq!(replayed[0]["dlq_replay_group"], "billing");
    let left: Vec<String> = fields_of(&mut con, "{orders}:dlq:billing")
        .into_iter()
        .map(|f| f["order"].clone())
        .collect();
    assert_eq!(left, ["old-1", "old-2"]);

    // purge --before 2h: only what is older; --id: exactly that one; --all: the rest.
    add_dead_letter(&mut con, "*", "new-4", "77777-4");
    add_dead_letter(&mut con, "*", "new-5", "77777-5");
    let (out, _) = dlq(&["purge", "--yes", "--before", "2h"]);
    assert!(
        out.contains("purged 2 dead letters from {orders}:dlq:billing"),
        "{out}"
    );
    let left = entries(&mut con, "{orders}:dlq:billing");
    assert_eq!(left.len(), 2);
    let (out, _) = dlq(&["purge", "--yes", "--id", &left[0].0]);
    assert!(out.contains("purged 1 dead letter from"), "{out}");
    let rest = fields_of(&mut con, "{orders}:dlq:billing");
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0]["order"], "new-5");
    let (out, _) = dlq(&["purge", "--yes", "--all"]);
    assert!(out.contains("purged 1 dead letter from"), "{out}");
    assert!(entries(&mut con, "{orders}:dlq:billing").is_empty());
    assert_eq!(
        fields_of(&mut con, "orders").len(),
        3,
        "purging replays nothing"
    );
}

/// README: `password_file` — "read the password from this file (trailing newline
/// ignored)"; docs/operations.md: "`redis.password_file` is only read by `run`".
#[test]
fn password_file_is_read_by_run_with_its_newline_ignored() {
    let redis = RedisServer::start_with(&["--requirepass", "correct horse"]);
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("redis-password");
    std::fs::write(&secret, "correct horse\n").unwrap();
    let groups = r#"
[groups.sink]
stream = "jobs"
handler = "noop"
block = "500ms"
"#;
    let with_file = |file: &std::path::Path| {
        config(&format!("redis://127.0.0.1:{}/0", redis.port), "r1", groups).replacen(
            "[redis]\n",
            &format!("[redis]\npassword_file = \"{}\"\n", file.display()),
            1,
        )
    };
    let _daemon = Daemon::start(&with_file(&secret));
    let mut con = redis.connection();
    wait_until(Duration::from_secs(20), "the group exists", || {
        group_info(&mut con, "jobs", "sink").is_some()
    });
    produce(&mut con, "jobs", &[vec![("n", "1".to_owned())]]);
    wait_until(Duration::from_secs(20), "the entry is acknowledged", || {
        group_info(&mut con, "jobs", "sink") == Some((0, Some(0)))
    });

    // `check` does not read it: a file that is not there yet (a secret mounted only in the
    // pod) passes.
    let missing = dir.path().join("not-mounted-here");
    let (code, _, stderr) = run_cli(
        &["check", "-c", &write_config(&dir, &with_file(&missing))],
        &[],
    );
    assert_eq!(code, 0, "check does not read password_file: {stderr}");

    // A wrong password in the file: run refuses (exit 1) naming the credentials problem.
    std::fs::write(&secret, "wrong\n").unwrap();
    let mut wrong = Daemon::start(&with_file(&secret));
    let status = wrong.wait(Duration::from_secs(30)).expect("run exits");
    assert_eq!(status.code(), Some(1), "{}", wrong.logs());
    assert!(
        !wrong.logs().contains("wrong\n"),
        "the password is not logged"
    );
}

/// README: "`-c` can also come from `STREAMWORKER_CONFIG`" (the image sets it; operators
/// run `kubectl exec … streamworker status` without `-c`).
#[test]
fn streamworker_config_stands_in_for_dash_c() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        &config(
            &redis.url(),
            "r1",
            &webhook_group("from-env", "http://127.0.0.1:9/never"),
        ),
    );
    let env = [("STREAMWORKER_CONFIG", path.as_str())];
    let (code, stdout, stderr) = run_cli(&["check"], &env);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("[groups.from-env]"), "{stdout}");
    let mut con = redis.connection();
    produce(&mut con, "orders", &[vec![("n", "1".to_owned())]]);
    let (code, stdout, stderr) = run_cli(&["status", "--json"], &env);
    assert_eq!(code, 0, "{stderr}");
    let status: serde_json::Value = serde_json::from_str(&stdout).expect("status --json");
    assert_eq!(
        status[0]["stream"], "orders",
        "the configured stream: {stdout}"
    );
    assert_eq!(status[0]["length"], 1, "{stdout}");
    let (code, _, stderr) = run_cli(
        &["dlq", "list", "--group", "from-env"],
        &[("STREAMWORKER_CONFIG", path.as_str())],
    );
    assert_eq!(code, 0, "{stderr}");

    // Without either, the usage error says what is missing.
    let (code, _, stderr) = run_cli(&["check"], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("--config") || stderr.contains("-c"),
        "{stderr}"
    );
}

/// README: `telemetry.otlp_endpoint` "empty = off unless
/// `OTEL_EXPORTER_OTLP_ENDPOINT`/`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set";
/// `service_name` (`OTEL_SERVICE_NAME` wins); `resource_attributes`
/// (`OTEL_RESOURCE_ATTRIBUTES` adds more).
#[test]
fn otel_variables_turn_traces_on_and_name_the_service() {
    let redis = RedisServer::start();
    let hook = WebhookServer::start();
    let group = webhook_group("billing", &hook.url("r1"));
    let cfg = config(&redis.url(), "r1", &group).replace(
        "log_format = \"json\"",
        "log_format = \"json\"\nservice_name = \"from-config\"\nresource_attributes = { \"team\" = \"payments\" }",
    );
    let mut con = redis.connection();
    for (variable, value, service) in [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "", "from-env"),
        (
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "/v1/traces",
            "from-config",
        ),
    ] {
        let receiver = OtlpReceiver::start();
        let endpoint = format!("{}{value}", receiver.endpoint());
        let mut env = vec![(variable, endpoint.as_str())];
        if service == "from-env" {
            env.push(("OTEL_SERVICE_NAME", "from-env"));
            env.push((
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment=otel-test",
            ));
        }
        let before = hook.count();
        let mut daemon = Daemon::start_with_env(&cfg, &env);
        produce(&mut con, "orders", &[vec![("n", variable.to_owned())]]);
        wait_until(Duration::from_secs(20), "the entry is handled", || {
            hook.count() > before
        });
        wait_until(Duration::from_secs(10), "acknowledged", || {
            group_info(&mut con, "orders", "billing").is_some_and(|(pending, _)| pending == 0)
        });
        daemon.terminate();
        assert_eq!(
            daemon.wait(Duration::from_secs(20)).and_then(|s| s.code()),
            Some(0)
        );
        // Flushed at shutdown.
        let spans: Vec<_> = receiver
            .spans()
            .into_iter()
            .filter(|s| s.name == "process orders")
            .collect();
        assert_eq!(spans.len(), 1, "{variable}: one consumer span exported");
        assert_eq!(spans[0].service_name, service, "{variable}");
        assert_eq!(
            spans[0].resource.get("team").map(String::as_str),
            Some("payments")
        );
        if service == "from-env" {
            assert_eq!(
                spans[0]
                    .resource
                    .get("deployment.environment")
                    .map(String::as_str),
                Some("otel-test"),
                "OTEL_RESOURCE_ATTRIBUTES adds: {:?}",
                spans[0].resource
            );
        }
    }
}

/// README: "`produce` writes events in the shapes of the five seed write-ups … at a steady
/// rate".
#[test]
fn produce_writes_each_scenario_to_its_stream_at_the_rate_asked() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut con = redis.connection();
    for (scenario, stream, json_field) in [
        ("user-activity", "user_logs", None),
        ("llm-observability", "ml_events", Some("event")),
        ("commerce", "events.raw", Some("payload")),
        ("feedback", "user:feedback", None),
        ("memory", "memory:events", None),
    ] {
        let (code, _, stderr) = run_cli(
            &[
                "produce",
                "--scenario",
                scenario,
                "--url",
                &url,
                "--count",
                "25",
                "--rate",
                "5000",
            ],
            &[],
        );
        assert_eq!(code, 0, "{scenario}: {stderr}");
        let written = fields_of(&mut con, stream);
        assert_eq!(written.len(), 25, "{scenario} writes to {stream}");
        if let Some(field) = json_field {
            for f in &written {
                let doc: serde_json::Value = serde_json::from_str(&f[field])
                    .unwrap_or_else(|e| panic!("{scenario}: {field} is JSON: {e}: {f:?}"));
                assert!(doc.is_object(), "{scenario}: {doc}");
            }
        } else {
            assert!(
                written
                    .iter()
                    .all(|f| f.len() > 1 && !f.contains_key("event")),
                "{scenario}: flat fields: {:?}",
                written[0]
            );
        }
    }
    assert!(
        fields_of(&mut con, "ml_events")
            .iter()
            .all(|f| f.contains_key("event") && f.len() == 1)
    );

    // A steady rate: 40 events at 20/s take about two seconds (never much less: a loaded
    // machine can only make it slower).
    let start = Instant::now();
    let (code, _, stderr) = run_cli(
        &[
            "produce",
            "--scenario",
            "feedback",
            "--url",
            &url,
            "--count",
            "40",
            "--rate",
            "20",
        ],
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1_700),
        "40 at 20/s took {took:?}"
    );
    assert_eq!(fields_of(&mut con, "user:feedback").len(), 65);

    // --duration stops it; at most rate × duration (with one tick of slack) are written.
    let (code, _, stderr) = run_cli(
        &[
            "produce",
            "--scenario",
            "memory",
            "--url",
            &url,
            "--duration",
            "1s",
            "--rate",
            "50",
        ],
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    let n = fields_of(&mut con, "memory:events").len() - 25;
    assert!((1..=60).contains(&n), "1s at 50/s wrote {n}");
}

/// README: "`stats` on a group whose handler keeps no aggregates exits 2 and names the
/// handlers that do."
#[test]
fn stats_on_a_group_without_aggregates_exits_2_naming_the_handlers_that_keep_them() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        &config(
            &redis.url(),
            "r1",
            &webhook_group("billing", "http://127.0.0.1:9/never"),
        ),
    );
    let (code, stdout, stderr) = run_cli(&["stats", "-c", &path, "--group", "billing"], &[]);
    assert_eq!(code, 2, "stdout: {stdout}\nstderr: {stderr}");
    assert!(
        stderr.contains("analytics") && stderr.contains("learning"),
        "names the handlers that keep aggregates: {stderr}"
    );
    assert!(
        stderr.contains("billing") || stderr.contains("webhook"),
        "{stderr}"
    );
}
