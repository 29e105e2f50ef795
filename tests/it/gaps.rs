//! README promises that `tests/claims.toml` listed as untested: each test here drives the
//! promise against a real `redis-server` and checks what an operator would look at (the
//! streams, the keys, `/metrics`, the log, the process's fate).

use std::collections::{BTreeMap, HashMap};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::support::*;

/// A page of the documentation (`README.md`, `docs/handlers.md`, …).
fn doc(path: &str) -> String {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Fields as (name, value) strings, in order.
fn strings(fields: &Fields) -> Vec<(String, String)> {
    fields
        .iter()
        .map(|(k, v)| {
            (
                String::from_utf8_lossy(k).into_owned(),
                String::from_utf8_lossy(v).into_owned(),
            )
        })
        .collect()
}

fn stream_strings(con: &mut redis::Connection, key: &str) -> Vec<(String, Vec<(String, String)>)> {
    entries(con, key)
        .into_iter()
        .map(|(id, fields)| (id, strings(&fields)))
        .collect()
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn metric_now(http: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let (status, text) = http_get(http, "/metrics")?;
    assert_eq!(status, 200, "/metrics: {text}");
    metric(&text, name, labels)
}

const FAST: &str = r#"block = "500ms"
handler_timeout = "1s"
claim_idle = "2s"
consumer_ttl = "1m"
retry_backoff = { initial = "100ms", max = "1s" }"#;

/// The `billing` group on `orders`, calling the webhook at `url` with `timeout`, with the
/// FAST timings and `extra` group keys (one per line).
fn billing(url: String, timeout: &str, extra: &str) -> String {
    format!(
        r#"
[groups.billing]
stream = "orders"
handler = "webhook"
{extra}
{FAST}
[groups.billing.options]
url = "{url}"
timeout = "{timeout}"
"#
    )
}

// ---------------------------------------------------------------------------------------
// Refused dead letters

/// README, "Refused writes": if even the dead letter is refused, the entry stays pending
/// (reclaimed after `claim_idle`), counted in `streamworker_dead_letters_refused_total` and
/// logged with its id.
#[test]
fn a_dead_letter_redis_refuses_leaves_the_entry_pending_counted_and_logged() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    // The dead-letter key holds a string, so the dead letter's XADD gets WRONGTYPE.
    let dlq = "{orders}:dlq:billing";
    let _: () = redis::cmd("SET")
        .arg(dlq)
        .arg("not a stream")
        .query(&mut con)
        .unwrap();
    // Every call is a permanent failure: each delivery goes straight to the dead letter.
    let hook = WebhookServer::start_with(|_| (400, Duration::ZERO));
    let group = billing(hook.url("r1"), "1s", "");
    let (cfg, http) = config_with_http(&redis.url(), "r1", &group);
    let daemon = Daemon::start(&cfg);
    let ids = produce(&mut con, "orders", &[vec![("n", "1".into())]]);
    let id = &ids[0];

    let labels = [("stream", "orders"), ("group", "billing")];
    wait_until(
        Duration::from_secs(20),
        "a refused dead letter counted",
        || {
            metric_now(&http, "streamworker_dead_letters_refused_total", &labels)
                .is_some_and(|v| v >= 1.0)
        },
    );
    let logs = daemon.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("refused the dead letter"))
        .unwrap_or_else(|| panic!("no log line about the refused dead letter:\n{logs}"));
    assert!(
        line.contains(id.as_str()),
        "the line names the entry: {line}"
    );
    assert!(line.contains("WRONGTYPE"), "the line says why: {line}");
    // Not acknowledged: still pending, and the handler saw it.
    assert_eq!(
        delivery_counts(&mut con, "orders", "billing").len(),
        1,
        "the entry stays pending"
    );
    assert!(hook.count() >= 1);
    let acked = metric_now(
        &http,
        "streamworker_entries_total",
        &[("group", "billing"), ("outcome", "acked")],
    )
    .unwrap_or(0.0);
    assert_eq!(acked, 0.0, "nothing acknowledged");

    // Once the key is fixed, the reclaim after claim_idle delivers it again and this time
    // the dead letter takes.
    let _: () = redis::cmd("DEL").arg(dlq).query(&mut con).unwrap();
    wait_until(Duration::from_secs(20), "the dead letter written", || {
        redis::cmd("EXISTS")
            .arg(dlq)
            .query::<i64>(&mut con)
            .unwrap()
            == 1
            && !entries(&mut con, dlq).is_empty()
    });
    let dead = stream_strings(&mut con, dlq);
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(field(&dead[0].1, "dlq_origin_id"), Some(id.as_str()));
    assert!(
        field(&dead[0].1, "dlq_deliveries")
            .and_then(|d| d.parse::<u64>().ok())
            .is_some_and(|d| d >= 2),
        "delivered again after the refusal: {dead:?}"
    );
    wait_until(Duration::from_secs(10), "nothing pending", || {
        group_info(&mut con, "orders", "billing").map(|(p, _)| p) == Some(0)
    });
}

// ---------------------------------------------------------------------------------------
// forward

/// The fenced block after `marker` in `text`.
fn block_after<'a>(text: &'a str, marker: &str) -> &'a str {
    let rest = &text[text
        .find(marker)
        .unwrap_or_else(|| panic!("the page has {marker:?}"))..];
    let start = rest.find("```").expect("a code block") + 3;
    let rest = &rest[start..];
    let rest = &rest[rest.find('\n').unwrap() + 1..];
    &rest[..rest.find("```").expect("the block ends")]
}

/// `name value  name value …` lines (pairs separated by two spaces) as fields.
fn shown_fields(block: &str) -> Vec<(String, String)> {
    block
        .lines()
        .flat_map(|line| line.split("  "))
        .filter(|pair| !pair.trim().is_empty())
        .map(|pair| {
            let (k, v) = pair.trim().split_once(' ').expect("name value");
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

/// README, forward: the example configuration turns the example entry (id
/// `1733047201000-0`) into exactly the fields shown, in that order.
#[test]
fn the_readme_forward_example_is_what_the_daemon_writes() {
    let text = doc("docs/handlers.md");
    let section = &text[text
        .find("### forward")
        .expect("docs/handlers.md has ### forward")..];
    let toml_block = block_after(section, "```toml");
    assert!(toml_block.contains("[groups.normalize]"), "{toml_block}");
    let input = shown_fields(block_after(section, "\nturns"));
    let output = shown_fields(block_after(section, "(id `1733047201000-0`) into"));
    // README elides the rest of the payload; the test sends a complete document.
    let payload = r#"{"customer":{"profile_id":"p-1"},"amount":42}"#;
    let complete = |fields: Vec<(String, String)>| -> Vec<(String, String)> {
        fields
            .into_iter()
            .map(|(k, v)| {
                let v = if v.contains('…') {
                    assert_eq!(
                        v, r#"{"customer":{"profile_id":"p-1"},…}"#,
                        "README's payload"
                    );
                    payload.to_owned()
                } else {
                    v
                };
                (k, v)
            })
            .collect()
    };
    let input = complete(input);
    let output = complete(output);
    assert!(
        input.len() >= 5 && output.len() >= 8,
        "{input:?} {output:?}"
    );

    let redis = RedisServer::start();
    let mut con = redis.connection();
    let mut add = redis::cmd("XADD");
    add.arg("events.raw").arg("1733047201000-0");
    for (k, v) in &input {
        add.arg(k).arg(v);
    }
    let _: String = add.query(&mut con).unwrap();
    let group = toml_block.replace("[groups.normalize]", &format!("[groups.normalize]\n{FAST}"));
    // The group reads from the start of the stream, so the entry added first is seen.
    let _daemon = Daemon::start(&config(&redis.url(), "r1", &group));
    wait_until(Duration::from_secs(15), "the entry forwarded", || {
        redis::cmd("XLEN")
            .arg("events.normalized")
            .query::<u64>(&mut con)
            .unwrap()
            >= 1
    });
    let written = stream_strings(&mut con, "events.normalized");
    assert_eq!(written.len(), 1, "{written:?}");
    assert_eq!(
        written[0].1, output,
        "README's forwarded entry, field by field"
    );
}

fn forward_group(name: &str, stream: &str, options: &str) -> String {
    format!(
        r#"
[groups.{name}]
stream = "{stream}"
handler = "forward"
{FAST}
[groups.{name}.options]
{options}
"#
    )
}

/// README, "The source id": in a chain each hop writes its own source's id; renaming the
/// incoming `source_id` keeps both.
#[test]
fn a_chain_of_forwards_writes_each_hops_source_id_and_a_rename_keeps_both() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let groups = format!(
        "{}{}",
        forward_group("first", "a", r#"to = "b""#),
        forward_group(
            "second",
            "b",
            r#"to = "c"
rename = { source_id = "raw_id" }"#
        )
    );
    let _daemon = Daemon::start(&config(&redis.url(), "r1", &groups));
    let ids = produce(
        &mut con,
        "a",
        &(0..3)
            .map(|i| vec![("n", i.to_string())])
            .collect::<Vec<_>>(),
    );
    wait_until(Duration::from_secs(15), "three entries at the end", || {
        entries(&mut con, "c").len() >= 3
    });
    let middle = stream_strings(&mut con, "b");
    let end = stream_strings(&mut con, "c");
    assert_eq!(end.len(), 3);
    for (i, ((b_id, b_fields), (_, c_fields))) in middle.iter().zip(&end).enumerate() {
        assert_eq!(field(b_fields, "source_id"), Some(ids[i].as_str()));
        let n = i.to_string();
        assert_eq!(
            c_fields,
            &vec![
                ("n".to_owned(), n),
                ("raw_id".to_owned(), ids[i].clone()),
                ("source_id".to_owned(), b_id.clone()),
            ],
            "the second hop writes its own source's id and keeps the first as raw_id"
        );
    }
}

/// README, "Field order": an added field replaces a passed-on field of the same name, and a
/// renamed field replaces an original field that already had its new name.
#[test]
fn added_and_renamed_fields_replace_passed_on_fields_of_the_same_name() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let options = r#"to = "out"
rename = { a = "b" }
extract = { doc = "payload.x" }
set = { kind = "fixed" }"#;
    let _daemon = Daemon::start(&config(
        &redis.url(),
        "r1",
        &forward_group("fwd", "in", options),
    ));
    let ids = produce(
        &mut con,
        "in",
        &[vec![
            ("kind", "original".into()),
            ("a", "from-a".into()),
            ("b", "original-b".into()),
            ("doc", "passed-on".into()),
            ("payload", r#"{"x":"extracted"}"#.into()),
        ]],
    );
    wait_until(Duration::from_secs(15), "the entry forwarded", || {
        !entries(&mut con, "out").is_empty()
    });
    let out = stream_strings(&mut con, "out");
    let fields = &out[0].1;
    let mut names: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
    names.sort_unstable();
    let before = names.len();
    names.dedup();
    assert_eq!(before, names.len(), "every name once: {fields:?}");
    let got: BTreeMap<&str, &str> = fields
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let want: BTreeMap<&str, &str> = [
        ("kind", "fixed"),
        ("b", "from-a"),
        ("doc", "extracted"),
        ("payload", r#"{"x":"extracted"}"#),
        ("source_id", ids[0].as_str()),
    ]
    .into_iter()
    .collect();
    assert_eq!(got, want, "{fields:?}");
}

/// README, forward "Failures": an entry left with no field at all is dead-lettered.
#[test]
fn a_forward_left_with_no_field_dead_letters_the_entry() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let options = r#"to = "out"
keep = ["wanted"]
source_id_field = """#;
    let _daemon = Daemon::start(&config(
        &redis.url(),
        "r1",
        &forward_group("fwd", "in", options),
    ));
    let ids = produce(
        &mut con,
        "in",
        &[
            vec![("other", "x".into())],
            vec![("wanted", "y".into()), ("other", "z".into())],
        ],
    );
    wait_until(Duration::from_secs(15), "both settled", || {
        group_info(&mut con, "in", "fwd") == Some((0, Some(0)))
    });
    let dead = stream_strings(&mut con, "{in}:dlq:fwd");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(field(&dead[0].1, "dlq_origin_id"), Some(ids[0].as_str()));
    let out = stream_strings(&mut con, "out");
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].1, vec![("wanted".to_owned(), "y".to_owned())]);
}

/// README, "The source id": a replayed dead letter is forwarded with the original entry's
/// id as `source_id` and without `dlq_replay_of`/`dlq_replay_group`.
#[test]
fn a_replayed_dead_letter_is_forwarded_without_its_replay_markers() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    // The target is a string at first: the forward is refused and the entry dead-lettered.
    let _: () = redis::cmd("SET")
        .arg("out")
        .arg("not a stream")
        .query(&mut con)
        .unwrap();
    let daemon = Daemon::start(&config(
        &redis.url(),
        "r1",
        &forward_group("fwd", "in", r#"to = "out""#),
    ));
    let ids = produce(&mut con, "in", &[vec![("n", "1".into())]]);
    wait_until(Duration::from_secs(30), "the entry dead-lettered", || {
        !entries(&mut con, "{in}:dlq:fwd").is_empty()
    });
    let _: () = redis::cmd("DEL").arg("out").query(&mut con).unwrap();
    dlq_replay_all(&daemon.config_path, "fwd");
    // The replayed copy carries the markers on the source stream...
    let replayed = stream_strings(&mut con, "in");
    assert_eq!(replayed.len(), 2, "{replayed:?}");
    assert_eq!(field(&replayed[1].1, "dlq_replay_group"), Some("fwd"));
    assert_eq!(
        field(&replayed[1].1, "dlq_replay_of"),
        Some(ids[0].as_str())
    );
    // ...and the forward passes on neither.
    wait_until(Duration::from_secs(15), "the replay forwarded", || {
        redis::cmd("TYPE")
            .arg("out")
            .query::<String>(&mut con)
            .unwrap()
            == "stream"
            && !entries(&mut con, "out").is_empty()
    });
    let forwarded = stream_strings(&mut con, "out");
    assert_eq!(
        forwarded[0].1,
        vec![
            ("n".to_owned(), "1".to_owned()),
            ("source_id".to_owned(), ids[0].clone()),
        ]
    );
}

// ---------------------------------------------------------------------------------------
// learning

const LEARNING_P: &str = "{user:feedback}:learning:learning";

fn learning_group(options: &str) -> String {
    format!(
        r#"
[groups.learning]
stream = "user:feedback"
handler = "learning"
{FAST}
[groups.learning.options]
{options}
"#
    )
}

/// README, learning: an entry with neither rating nor thumbs is dropped; a rating that is
/// not a number or off the scale, or an unknown thumbs value, is dead-lettered; feedback
/// without a model is aggregated as `unknown`.
#[test]
fn learning_drops_empty_feedback_dead_letters_bad_values_and_files_modelless_under_unknown() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let data = tempfile::tempdir().unwrap();
    let (cfg, http) = config_with_http(
        &redis.url(),
        "r1",
        &learning_group(&format!("dataset_dir = \"{}\"", data.path().display())),
    );
    let _daemon = Daemon::start(&cfg);
    let fb = |pairs: &[(&'static str, &str)]| -> Vec<(&'static str, String)> {
        pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
    };
    let ids = produce(
        &mut con,
        "user:feedback",
        &[
            fb(&[("model", "m1"), ("prompt", "p")]),
            fb(&[("model", "m1"), ("prompt", "p"), ("rating", "great")]),
            fb(&[("model", "m1"), ("prompt", "p"), ("rating", "9")]),
            fb(&[("model", "m1"), ("prompt", "p"), ("thumbs", "sideways")]),
            fb(&[("prompt", "p"), ("rating", "4")]),
        ],
    );
    wait_until(Duration::from_secs(20), "every entry settled", || {
        group_info(&mut con, "user:feedback", "learning") == Some((0, Some(0)))
    });
    let dead: Vec<String> = stream_strings(&mut con, "{user:feedback}:dlq:learning")
        .into_iter()
        .map(|(_, f)| field(&f, "dlq_origin_id").unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        dead,
        ids[1..4].to_vec(),
        "the three bad values dead-lettered"
    );
    let unknown: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(format!("{LEARNING_P}:model:unknown"))
        .query(&mut con)
        .unwrap();
    assert_eq!(
        unknown.get("count").map(String::as_str),
        Some("1"),
        "{unknown:?}"
    );
    assert_eq!(unknown.get("rating_sum").map(String::as_str), Some("4"));
    let m1: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(format!("{LEARNING_P}:model:m1"))
        .query(&mut con)
        .unwrap();
    assert!(m1.is_empty(), "nothing of m1 was aggregated: {m1:?}");
    wait_until(Duration::from_secs(10), "the outcome counters", || {
        let count = |outcome| {
            metric_now(
                &http,
                "streamworker_entries_total",
                &[("group", "learning"), ("outcome", outcome)],
            )
        };
        count("dropped") == Some(1.0)
            && count("dead_lettered") == Some(3.0)
            && count("acked") == Some(1.0)
    });
}

/// A path that cannot be a directory, even for root: its parent is a regular file.
fn impossible_dir(tmp: &tempfile::TempDir) -> String {
    let file = tmp.path().join("a-file");
    std::fs::write(&file, "not a directory").unwrap();
    file.join("data").display().to_string()
}

/// README, learning: "The directory must be writable: the group refuses to start
/// otherwise, naming it." The entry is never taken.
#[test]
fn a_learning_group_refuses_to_start_on_a_dataset_dir_it_cannot_create() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let tmp = tempfile::tempdir().unwrap();
    let dir = impossible_dir(&tmp);
    let mut daemon = Daemon::start(&config(
        &redis.url(),
        "r1",
        &learning_group(&format!("dataset_dir = \"{dir}\"")),
    ));
    produce(
        &mut con,
        "user:feedback",
        &[vec![("model", "m".into()), ("rating", "4".into())]],
    );
    wait_until(
        Duration::from_secs(15),
        "the directory named in the log",
        || daemon.logs().contains(&dir),
    );
    assert_refused_without_handling(&mut daemon, &mut con, "user:feedback", "learning");
}

/// docs/operations.md: the daemon refuses to start a warehouse group whose directory cannot
/// be created, naming it.
#[test]
fn a_warehouse_group_refuses_to_start_on_a_directory_it_cannot_create() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let tmp = tempfile::tempdir().unwrap();
    let dir = impossible_dir(&tmp);
    let group = format!(
        r#"
[groups.archive]
stream = "events"
handler = "warehouse"
{FAST}
[groups.archive.options]
sink = "file"
directory = "{dir}"
"#
    );
    let mut daemon = Daemon::start(&config(&redis.url(), "r1", &group));
    produce(&mut con, "events", &[vec![("n", "1".into())]]);
    wait_until(
        Duration::from_secs(15),
        "the directory named in the log",
        || daemon.logs().contains(&dir),
    );
    assert_refused_without_handling(&mut daemon, &mut con, "events", "archive");
}

/// The group took nothing: no entry of `stream` was delivered to `group` (if it exists).
fn assert_refused_without_handling(
    daemon: &mut Daemon,
    con: &mut redis::Connection,
    stream: &str,
    group: &str,
) {
    // A runtime failure: exit code 1 (README's exit codes), not a wait forever.
    let status = daemon
        .wait(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("still running:\n{}", daemon.logs()));
    assert_eq!(status.code(), Some(1), "{}", daemon.logs());
    let logs = daemon.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("\"level\":\"ERROR\"") && l.contains("cannot"))
        .unwrap_or_else(|| panic!("an error line saying what cannot be done:\n{logs}"));
    assert!(line.contains(&format!("\"group\":\"{group}\"")), "{line}");
    match group_info(con, stream, group) {
        None => {}
        Some((pending, lag)) => {
            assert_eq!(pending, 0, "nothing delivered");
            assert_eq!(lag, Some(1), "the entry still waits");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Startup before Redis

/// A `redis-server` on a port chosen before it starts; killed on drop.
struct LateRedis(Child, #[allow(dead_code)] tempfile::TempDir);

impl LateRedis {
    fn start(port: u16) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new(server_binary())
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs");
        Self(child, dir)
    }
}

impl Drop for LateRedis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// docs/operations.md: a replica started while Redis is down waits for it rather than
/// exiting, then handles entries.
#[test]
fn a_daemon_started_before_its_redis_waits_and_then_handles_entries() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}/0");
    let hook = WebhookServer::start_with(|_| (200, Duration::ZERO));
    let group = billing(hook.url("r1"), "500ms", "");
    let mut daemon = Daemon::start(&config(&url, "r1", &group));
    // It has tried and failed to connect at least twice, and is still running.
    wait_until(
        Duration::from_secs(20),
        "two failed connection attempts",
        || {
            daemon
                .logs()
                .matches("cannot reach Redis; retrying")
                .count()
                >= 2
        },
    );
    assert!(
        daemon.is_running(),
        "exited instead of waiting:\n{}",
        daemon.logs()
    );

    let _redis = LateRedis::start(port);
    let mut con = None;
    wait_until(Duration::from_secs(10), "the late redis-server", || {
        con = redis::Client::open(url.as_str())
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(1))
            .ok();
        con.is_some()
    });
    let mut con = con.unwrap();
    let ids = produce(
        &mut con,
        "orders",
        &(0..5)
            .map(|i| vec![("n", i.to_string())])
            .collect::<Vec<_>>(),
    );
    wait_until(Duration::from_secs(30), "every entry handled", || {
        let handled = hook.handled();
        ids.iter().all(|id| handled.contains_key(id))
    });
    wait_until(Duration::from_secs(10), "nothing pending", || {
        group_info(&mut con, "orders", "billing") == Some((0, Some(0)))
    });
    assert!(daemon.is_running());
}

// ---------------------------------------------------------------------------------------
// Scaling: entries are fetched only into free slots

/// docs/operations.md, Scaling: a replica runs up to `concurrency` handler calls and
/// fetches entries only into free slots, so what it cannot start stays in Redis as lag
/// (what KEDA scales on) rather than pending on a busy replica.
#[test]
fn a_busy_replica_runs_at_most_concurrency_calls_and_leaves_the_rest_as_lag() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let hook = WebhookServer::start_with(|_| (200, Duration::from_millis(300)));
    let group = billing(hook.url("r1"), "900ms", "concurrency = 3");
    let _daemon = Daemon::start(&config(&redis.url(), "r1", &group));
    wait_until(Duration::from_secs(10), "the group created", || {
        group_info(&mut con, "orders", "billing").is_some()
    });
    let n = 24;
    let ids = produce(
        &mut con,
        "orders",
        &(0..n)
            .map(|i| vec![("n", i.to_string())])
            .collect::<Vec<_>>(),
    );
    let mut most_pending = 0;
    let mut samples_with_lag = 0;
    let mut samples = 0;
    // Sampled every 50 ms while the replica works through the backlog.
    wait_until(Duration::from_secs(60), "every entry handled", || {
        let pending = pending_of(&mut con, "orders", "billing", "r1");
        let (_, lag) = group_info(&mut con, "orders", "billing").unwrap();
        most_pending = most_pending.max(pending);
        samples += 1;
        if lag.is_some_and(|l| l > 0) {
            samples_with_lag += 1;
        }
        hook.handled().len() >= n
    });
    let hits = hook.hits();
    assert!(ids.iter().all(|id| hits.iter().any(|h| &h.id == id)));
    // Calls in flight: each call occupies [arrival, arrival + 300 ms), the time the
    // receiver holds its answer; the next call into that slot can only arrive after it.
    let hold = Duration::from_millis(300);
    let most_in_flight = hits
        .iter()
        .map(|h| {
            hits.iter()
                .filter(|o| o.at <= h.at && h.at < o.at + hold)
                .count()
        })
        .max()
        .unwrap();
    eprintln!(
        "at most {most_in_flight} calls in flight, {most_pending} pending; \
         lag seen in {samples_with_lag}/{samples} samples"
    );
    assert!(
        most_in_flight <= 3,
        "{most_in_flight} calls at once with concurrency 3"
    );
    assert_eq!(most_in_flight, 3, "all three slots were used");
    // Pending may briefly count a finished call whose XACK waits for the next flush, but
    // the backlog itself is never fetched onto the busy replica.
    assert!(
        most_pending <= 6,
        "a replica with concurrency 3 held {most_pending} entries"
    );
    assert!(
        samples_with_lag * 2 >= samples,
        "the backlog stayed in Redis as lag: {samples_with_lag}/{samples} samples"
    );
}

// ---------------------------------------------------------------------------------------
// The settlement queue's bound

/// README, "Refused writes": while more than `max(2 × concurrency, batch_size, 1024)`
/// settlements wait to be sent (the flush in flight counts), reading pauses, so memory
/// stays bounded: at most that many settlements plus twice `concurrency` entries. A
/// forward whose target Redis refuses (WRONGTYPE) keeps each settlement for three
/// refusals, 250 ms apart; with 20,000 entries waiting, the replica holds a bounded number
/// at any time, not the backlog. (Measured on a 2-core machine: 4,848–5,120 at once before
/// the flush in flight counted, 1,024 after, and all 20,000 with the bound removed.)
#[test]
fn reading_pauses_while_the_settlement_queue_is_full() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let _: () = redis::cmd("SET")
        .arg("out")
        .arg("not a stream")
        .query(&mut con)
        .unwrap();
    // concurrency 64, batch_size at most 64: the bound is 1024.
    let group = r#"
[groups.fwd]
stream = "in"
handler = "forward"
concurrency = 64
batch_size = 64
handler_timeout = "5s"
claim_idle = "60s"
[groups.fwd.options]
to = "out"
"#;
    let n = 20_000;
    let _ = produce(
        &mut con,
        "in",
        &(0..n)
            .map(|i| vec![("n", i.to_string())])
            .collect::<Vec<_>>(),
    );
    let _daemon = Daemon::start(&config(&redis.url(), "r1", group));
    let dlq = "{in}:dlq:fwd";
    let mut most = 0;
    let mut samples = 0;
    // Sampled every 50 ms until every entry is a dead letter (three refusals each).
    wait_until(
        Duration::from_secs(180),
        "every entry dead-lettered",
        || {
            let pending = group_info(&mut con, "in", "fwd").map_or(0, |(p, _)| p);
            most = most.max(pending);
            samples += 1;
            let dead: u64 = redis::cmd("XLEN").arg(dlq).query(&mut con).unwrap();
            dead >= n as u64
        },
    );
    eprintln!("at most {most} entries pending at once ({samples} samples)");
    assert!(
        most <= 1024 + 2 * 64,
        "{most} of {n} entries held while their settlements waited (bound 1024)"
    );
    assert!(
        most >= 1024,
        "the queue did fill ({most} at most): the test tests nothing"
    );
}

// ---------------------------------------------------------------------------------------
// analytics

/// Every minute hash of an analytics group, summed field by field (the entries may fall in
/// two minutes).
fn analytics_fields(
    con: &mut redis::Connection,
    stream: &str,
    group: &str,
) -> BTreeMap<String, f64> {
    let pattern = format!("\\{{{stream}\\}}:analytics:{group}:m:*");
    let keys: Vec<String> = redis::cmd("KEYS").arg(&pattern).query(con).unwrap();
    assert!(!keys.is_empty(), "no minute hash matches {pattern}");
    let mut out = BTreeMap::new();
    for key in keys {
        let minute = key.rsplit(':').next().unwrap();
        assert!(
            minute.parse::<u64>().is_ok(),
            "{key}: the last part is the unix minute"
        );
        let fields: HashMap<String, String> = redis::cmd("HGETALL").arg(&key).query(con).unwrap();
        for (k, v) in fields {
            *out.entry(k).or_insert(0.0) += v
                .parse::<f64>()
                .unwrap_or_else(|e| panic!("{key} {v:?}: {e}"));
        }
    }
    out
}

/// README, analytics: a missing field skips that part of the aggregate (the entry still
/// counts); a non-numeric value, a negative latency and a number beyond ±10¹⁵ are skipped.
/// The hash field names are `n`, `err`, `type|<type>`, `sum|<path>`, `lat|sum`,
/// `lat|<bucket>` and the same under `dim|<path>|<value>|`, with `|` and `%` written `%7C`
/// and `%25`.
#[test]
fn analytics_skips_missing_and_bad_values_and_names_fields_as_documented() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let group = r#"
[groups.usage]
stream = "calls"
handler = "analytics"
block = "500ms"
[groups.usage.options]
dimensions = ["k"]
sums = ["v"]
latency = "lat"
"#;
    let _daemon = Daemon::start(&config(&redis.url(), "r1", group));
    let e = |pairs: &[(&'static str, &str)]| -> Vec<(&'static str, String)> {
        pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
    };
    produce(
        &mut con,
        "calls",
        &[
            e(&[
                ("event_type", "call"),
                ("k", "x|y%z"),
                ("v", "2"),
                ("lat", "10"),
            ]),
            e(&[("event_type", "call"), ("v", "abc"), ("lat", "-5")]),
            e(&[("event_type", "other"), ("k", "x|y%z"), ("v", "2e15")]),
            e(&[("v", "3"), ("lat", "1e16")]),
            e(&[("event_type", "error"), ("k", "plain"), ("lat", "20")]),
        ],
    );
    wait_until(Duration::from_secs(15), "every entry settled", || {
        group_info(&mut con, "calls", "usage") == Some((0, Some(0)))
    });
    let got = analytics_fields(&mut con, "calls", "usage");
    let at = |f: &str| got.get(f).copied();
    assert_eq!(at("n"), Some(5.0), "every entry counts: {got:#?}");
    assert_eq!(at("err"), Some(1.0), "{got:#?}");
    assert_eq!(at("type|call"), Some(2.0), "{got:#?}");
    assert_eq!(at("type|other"), Some(1.0), "{got:#?}");
    assert_eq!(at("type|error"), Some(1.0), "{got:#?}");
    // 2 + 3: "abc" is not a number, 2e15 is beyond 10^15, the error has no v.
    assert_eq!(at("sum|v"), Some(5.0), "{got:#?}");
    // 10 + 20: -5 is negative, 1e16 is beyond 10^15.
    assert_eq!(at("lat|sum"), Some(30.0), "{got:#?}");
    let buckets: f64 = got
        .iter()
        .filter(|(k, _)| k.starts_with("lat|") && *k != "lat|sum")
        .map(|(_, v)| v)
        .sum();
    assert_eq!(buckets, 2.0, "two latencies in the histogram: {got:#?}");

    let escaped = "dim|k|x%7Cy%25z|";
    assert_eq!(at(&format!("{escaped}n")), Some(2.0), "{got:#?}");
    assert_eq!(at(&format!("{escaped}type|call")), Some(1.0), "{got:#?}");
    assert_eq!(at(&format!("{escaped}sum|v")), Some(2.0), "{got:#?}");
    assert_eq!(at(&format!("{escaped}lat|sum")), Some(10.0), "{got:#?}");
    assert_eq!(at("dim|k|plain|n"), Some(1.0), "{got:#?}");
    assert_eq!(at("dim|k|plain|err"), Some(1.0), "{got:#?}");
    // Nothing under another spelling of the value.
    assert!(
        got.keys()
            .filter(|k| k.starts_with("dim|"))
            .all(|k| k.starts_with(escaped) || k.starts_with("dim|k|plain|")),
        "{got:#?}"
    );
}

/// Calls of the commands an analytics entry's increments use, from INFO commandstats
/// (commands run by scripts count there too).
fn increments(con: &mut redis::Connection) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query(con).unwrap();
    info.lines()
        .filter(|l| {
            l.starts_with("cmdstat_hincrby:")
                || l.starts_with("cmdstat_hincrbyfloat:")
                || l.starts_with("cmdstat_pexpire:")
        })
        .map(|l| {
            l.split([':', ','])
                .find_map(|p| p.strip_prefix("calls="))
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .sum()
}

/// README, analytics: "Cost per entry: 4 + (number of sums) hash increments and one
/// PEXPIRE, plus 2 per dimension present and another 2 + (number of sums) per measured one
/// — 15 writes for a call in the example above (an error adds one, and one per dimension
/// present)."
#[test]
fn an_analytics_entry_costs_the_documented_number_of_writes() {
    let text = doc("docs/handlers.md");
    let section = &text[text
        .find("### analytics")
        .expect("docs/handlers.md has ### analytics")..];
    let example = block_after(section, "```toml");
    assert!(example.contains("[groups.llm-usage]"), "{example}");
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let group = example.replace(
        "[groups.llm-usage]",
        "[groups.llm-usage]\nblock = \"500ms\"",
    );
    let _daemon = Daemon::start(&config(&redis.url(), "r1", &group));
    wait_until(Duration::from_secs(10), "the group created", || {
        group_info(&mut con, "ml_events", "llm-usage").is_some()
    });
    let event = |kind: &str| {
        vec![(
            "event",
            format!(
                r#"{{"event_type":"{kind}","data":{{"model":"gpt-4o","tokens_used":812,"cost_usd":0.0081,"response_time_ms":930}},"tags":{{"user_id":"user_7"}}}}"#
            ),
        )]
    };
    let mut cost = |kind: &str| {
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query(&mut con)
            .unwrap();
        produce(&mut con, "ml_events", &[event(kind)]);
        wait_until(Duration::from_secs(10), "the entry settled", || {
            group_info(&mut con, "ml_events", "llm-usage") == Some((0, Some(0)))
        });
        increments(&mut con)
    };
    assert_eq!(cost("llm_call"), 15, "README: 15 writes for a call");
    assert_eq!(
        cost("error"),
        15 + 1 + 2,
        "README: an error adds one, and one per dimension"
    );
}

// ---------------------------------------------------------------------------------------
// alerts

fn alerts_group(stream: &str, options: &str) -> String {
    format!(
        r#"
[groups.alerts]
stream = "{stream}"
handler = "alerts"
block = "500ms"
handler_timeout = "2s"
claim_idle = "3s"
[groups.alerts.options]
stream = "alerts:out"
evaluate_every = "200ms"
{options}
"#
    )
}

/// The `alerts:out` events as field maps.
fn alert_events(con: &mut redis::Connection) -> Vec<HashMap<String, String>> {
    stream_strings(con, "alerts:out")
        .into_iter()
        .map(|(_, f)| f.into_iter().collect())
        .collect()
}

/// README, alerts: "The webhook gets `{"text": ":rotating_light: <message>"}` (or
/// `:white_check_mark:` when resolved)."
#[test]
fn the_alert_webhook_gets_the_firing_and_resolved_messages() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let hook = WebhookServer::start();
    let group = alerts_group(
        "logs",
        &format!(
            r#"webhook = "{}"
webhook_timeout = "1s"
[[groups.alerts.options.rules]]
name = "errors"
kind = "count"
when = {{ level = "error" }}
window = "5s"
threshold = 3
cooldown = "1s"
"#,
            hook.url("services/T0/B0/X")
        ),
    );
    let _daemon = Daemon::start(&config(&redis.url(), "r1", &group));
    produce(
        &mut con,
        "logs",
        &(0..3)
            .map(|_| vec![("level", "error".to_owned())])
            .collect::<Vec<_>>(),
    );
    // Fires, then resolves once the entries leave the 5 s window.
    wait_until(Duration::from_secs(30), "firing and resolved", || {
        alert_events(&mut con).len() >= 2
    });
    wait_until(Duration::from_secs(10), "two webhook calls", || {
        hook.count() >= 2
    });
    let events = alert_events(&mut con);
    assert_eq!(events[0]["state"], "firing", "{events:?}");
    assert_eq!(events[1]["state"], "resolved", "{events:?}");
    let texts: Vec<String> = hook
        .hits()
        .iter()
        .map(|h| {
            assert_eq!(
                h.body.as_object().map(|o| o.len()),
                Some(1),
                "only `text`: {}",
                h.body
            );
            h.body["text"].as_str().expect("a text").to_owned()
        })
        .collect();
    assert_eq!(
        texts,
        vec![
            format!(":rotating_light: {}", events[0]["message"]),
            format!(":white_check_mark: {}", events[1]["message"]),
        ]
    );
}

/// README, alerts: a window's buckets are about a sixtieth of it (at least 1 s), longer
/// windows share a shorter one's buckets while that reads them as at most 600 (so `1m` and
/// `5m` share one-second buckets: one `PEXPIRE` per entry).
#[test]
fn alert_windows_share_buckets_as_documented() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let rules = |windows: &[&str]| -> String {
        windows
            .iter()
            .enumerate()
            .map(|(i, w)| {
                format!(
                    "[[groups.alerts.options.rules]]\nname = \"r{i}\"\nkind = \"count\"\nwindow = \"{w}\"\nthreshold = 1000000\n"
                )
            })
            .collect()
    };
    let _daemon = Daemon::start(&config(
        &redis.url(),
        "r1",
        &alerts_group("logs", &rules(&["1m", "5m", "1h"])),
    ));
    wait_until(Duration::from_secs(10), "the group created", || {
        group_info(&mut con, "logs", "alerts").is_some()
    });
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query(&mut con)
        .unwrap();
    produce(&mut con, "logs", &[vec![("level", "info".to_owned())]]);
    wait_until(Duration::from_secs(10), "the entry settled", || {
        group_info(&mut con, "logs", "alerts") == Some((0, Some(0)))
    });
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("\\{logs\\}:alerts:alerts:bucket:*")
        .query(&mut con)
        .unwrap();
    let mut widths: Vec<String> = keys
        .iter()
        .map(|k| k.split(':').nth_back(1).unwrap().to_owned())
        .collect();
    widths.sort();
    // 1m and 5m: 1 s buckets (5m reads 300 of them); 1h would read 3,600: its own 60 s.
    assert_eq!(widths, ["1s", "60s"], "{keys:?}");
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut con)
        .unwrap();
    let pexpires = info
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_pexpire:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse::<u64>().unwrap());
    assert_eq!(pexpires, 2, "one PEXPIRE per bucket width: {info}");
}

/// README, alerts: a replayed dead letter counts at its original time (or not at all once
/// that is outside every window). The dead letters are replayed with `streamworker dlq
/// replay`.
#[test]
fn a_replayed_dead_letter_counts_at_its_original_time() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let daemon = Daemon::start(&config(
        &redis.url(),
        "r1",
        &alerts_group(
            "logs",
            "[[groups.alerts.options.rules]]\nname = \"r\"\nkind = \"count\"\nwhen = { level = \"error\" }\nwindow = \"1h\"\nthreshold = 1000000\n",
        ),
    ));
    wait_until(Duration::from_secs(10), "the group created", || {
        group_info(&mut con, "logs", "alerts").is_some()
    });
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    // Two dead letters as the runtime writes them: one from 30 minutes ago (inside the
    // hour), one from two days ago (outside every window).
    let recent = format!("{}-0", now_ms - 30 * 60_000);
    let old = format!("{}-0", now_ms - 2 * 86_400_000);
    for origin in [&recent, &old] {
        let _: String = redis::cmd("XADD")
            .arg("{logs}:dlq:alerts")
            .arg("*")
            .arg("level")
            .arg("error")
            .arg("dlq_origin_stream")
            .arg("logs")
            .arg("dlq_origin_id")
            .arg(origin)
            .arg("dlq_group")
            .arg("alerts")
            .arg("dlq_deliveries")
            .arg("1")
            .arg("dlq_error")
            .arg("test")
            .arg("dlq_failed_at")
            .arg("2026-01-01T00:00:00Z")
            .arg("dlq_consumer")
            .arg("r1")
            .query(&mut con)
            .unwrap();
    }
    dlq_replay_all(&daemon.config_path, "alerts");
    wait_until(Duration::from_secs(10), "both replays settled", || {
        group_info(&mut con, "logs", "alerts") == Some((0, Some(0)))
    });
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("\\{logs\\}:alerts:alerts:bucket:*")
        .query(&mut con)
        .unwrap();
    assert_eq!(keys.len(), 1, "one bucket, the recent entry's: {keys:?}");
    let key = &keys[0];
    let width_s: u64 = key
        .split(':')
        .nth_back(1)
        .unwrap()
        .trim_end_matches('s')
        .parse()
        .unwrap();
    let start: u64 = key.rsplit(':').next().unwrap().parse().unwrap();
    // The start may be in seconds or milliseconds; either way it must hold the original
    // time, 30 minutes ago, not now.
    let recent_ms = now_ms - 30 * 60_000;
    let start_ms = if start < 10_000_000_000 {
        start * 1000
    } else {
        start
    };
    assert!(
        start_ms <= recent_ms && recent_ms < start_ms + width_s * 1000,
        "bucket {key} does not hold {recent_ms}"
    );
    let count: Option<i64> = redis::cmd("HGET")
        .arg(key)
        .arg("m:r")
        .query(&mut con)
        .unwrap();
    assert_eq!(count, Some(1), "{key}");
}

/// README, alerts: a lag or consumer list that cannot be read (no such stream or group)
/// changes nothing. Both rules fire on a group with a backlog and no reader; then the group
/// is destroyed: however many evaluations and cooldowns pass, they stay firing (an
/// unreadable lag read as 0 would resolve them).
#[test]
fn lag_and_consumers_rules_on_a_group_that_vanished_change_nothing() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    create_group(&mut con, "jobs", "other", "0");
    produce(
        &mut con,
        "jobs",
        &(0..5)
            .map(|i| vec![("n", i.to_string())])
            .collect::<Vec<_>>(),
    );
    let _daemon = Daemon::start(&config(
        &redis.url(),
        "r1",
        &alerts_group(
            "logs",
            r#"[[groups.alerts.options.rules]]
name = "lag"
kind = "lag"
stream = "jobs"
group = "other"
threshold = 3
cooldown = "1s"
[[groups.alerts.options.rules]]
name = "readers"
kind = "consumers"
stream = "jobs"
group = "other"
window = "5s"
threshold = 1
cooldown = "1s"
"#,
        ),
    ));
    let state_key = "{logs}:alerts:alerts:state";
    let state = |con: &mut redis::Connection| -> HashMap<String, String> {
        redis::cmd("HGETALL").arg(state_key).query(con).unwrap()
    };
    wait_until(Duration::from_secs(15), "both rules firing", || {
        let events = alert_events(&mut con);
        ["lag", "readers"].iter().all(|r| {
            events
                .iter()
                .any(|e| e["rule"] == *r && e["state"] == "firing")
        })
    });
    let _: i64 = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg("jobs")
        .arg("other")
        .query(&mut con)
        .unwrap();
    // Many evaluations (every 200 ms) and several cooldowns later...
    let mut seen = std::collections::HashSet::new();
    wait_until(Duration::from_secs(20), "15 more evaluations", || {
        if let Some(at) = state(&mut con).remove("_evaluated_at") {
            seen.insert(at);
        }
        seen.len() >= 15
    });
    // ...nothing resolved and both are still firing.
    let events = alert_events(&mut con);
    assert_eq!(events.len(), 2, "{events:?}");
    let now = state(&mut con);
    for rule in ["lag", "readers"] {
        let json: serde_json::Value =
            serde_json::from_str(&now[&format!("rule:{rule}")]).expect("rule state is JSON");
        assert_eq!(json["state"], "firing", "{rule}: {now:?}");
    }
}

// ---------------------------------------------------------------------------------------
// rewind forward

/// docs/operations.md: "A position later than the group's moves it forward and the entries
/// in between are never delivered; `rewind` says so."
#[test]
fn rewinding_to_a_later_position_skips_the_entries_in_between_and_says_so() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let ids = produce(
        &mut con,
        "orders",
        &(0..10)
            .map(|i| vec![("n", i.to_string())])
            .collect::<Vec<_>>(),
    );
    // The group exists and has delivered nothing yet.
    create_group(&mut con, "orders", "billing", "0");
    let hook = WebhookServer::start();
    let cfg = config(
        &redis.url(),
        "r1",
        &billing(hook.url("billing"), "500ms", ""),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("streamworker.toml");
    std::fs::write(&path, &cfg).unwrap();
    let path = path.to_str().unwrap();
    let (code, out, err) = run_cli(
        &[
            "rewind", "-c", path, "--group", "billing", "--to", &ids[6], "--yes",
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    let said = format!("{out}{err}");
    assert!(
        said.contains("7 entries") && said.contains("never"),
        "rewind says that 7 entries will be skipped, never delivered: {said}"
    );

    let _daemon = Daemon::start(&cfg);
    wait_until(
        Duration::from_secs(20),
        "the entries after the position",
        || {
            let handled = hook.handled();
            ids[7..].iter().all(|id| handled.contains_key(id))
        },
    );
    wait_until(Duration::from_secs(10), "the group idle", || {
        group_info(&mut con, "orders", "billing") == Some((0, Some(0)))
    });
    // Entries are read in order, so anything before ids[7] would have come first.
    let mut handled: Vec<String> = hook.handled().into_keys().collect();
    handled.sort();
    assert_eq!(
        handled,
        ids[7..].to_vec(),
        "only the entries after the new position"
    );
}

// ---------------------------------------------------------------------------------------
// learning: a shared dataset directory

/// README, learning: "Replicas may share `dataset_dir` (appends are single `O_APPEND`
/// writes)." Two replicas append to the same directory; every line is whole JSON and every
/// entry has exactly one line.
#[test]
fn two_learning_replicas_share_one_dataset_dir() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let data = tempfile::tempdir().unwrap();
    let group = learning_group(&format!(
        "dataset_dir = \"{}\"\nmax_batch = 5",
        data.path().display()
    ));
    let (c1, http1) = config_with_http(&redis.url(), "r1", &group);
    let (c2, http2) = config_with_http(&redis.url(), "r2", &group);
    let r1 = Daemon::start(&c1);
    let r2 = Daemon::start(&c2);
    let n = 400;
    let ids = produce(
        &mut con,
        "user:feedback",
        &(0..n)
            .map(|i| {
                vec![
                    ("model", "m".to_owned()),
                    ("prompt", format!("prompt {i} {}", "x".repeat(i % 200))),
                    ("response", "y".repeat(1000 + i)),
                    ("rating", (1 + i % 5).to_string()),
                ]
            })
            .collect::<Vec<_>>(),
    );
    wait_until(Duration::from_secs(60), "every entry settled", || {
        group_info(&mut con, "user:feedback", "learning") == Some((0, Some(0)))
    });
    let mut lines = Vec::new();
    for file in std::fs::read_dir(data.path().join("learning")).unwrap() {
        let text = std::fs::read_to_string(file.unwrap().path()).unwrap();
        lines.extend(text.lines().map(str::to_owned));
    }
    let mut seen: Vec<String> = lines
        .iter()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("a torn line ({e}): {l}"));
            v["id"].as_str().unwrap().to_owned()
        })
        .collect();
    seen.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(seen, want, "one line per entry");
    let files: Vec<String> = std::fs::read_dir(data.path().join("learning"))
        .unwrap()
        .map(|f| f.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    eprintln!("dataset files: {files:?}");
    // Both replicas wrote: the directory really was shared.
    for http in [&http1, &http2] {
        let acked = entries_total(http, &[("group", "learning"), ("outcome", "acked")]);
        assert!(
            acked > 0.0,
            "a replica that wrote nothing ({http}): {acked}"
        );
    }
    drop((r1, r2));
}

// ---------------------------------------------------------------------------------------
// Old servers

/// A relay to a real `redis-server` that makes it look like Redis 6: every reply has
/// `redis_version:7.` rewritten to `redis_version:6.` (same length, so RESP stays valid).
struct PosingAsRedis6 {
    addr: std::net::SocketAddr,
}

impl PosingAsRedis6 {
    fn start(upstream: u16) -> Self {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { return };
                let Ok(mut server) = std::net::TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c2, &mut s2);
                    let _ = s2.shutdown(std::net::Shutdown::Both);
                });
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = server.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        let chunk = &mut buf[..n];
                        let needle = b"redis_version:7.";
                        let mut i = 0;
                        while i + needle.len() <= chunk.len() {
                            if &chunk[i..i + needle.len()] == needle {
                                chunk[i + needle.len() - 2] = b'6';
                            }
                            i += 1;
                        }
                        if client.write_all(chunk).is_err() {
                            break;
                        }
                    }
                    let _ = client.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        Self { addr }
    }
}

/// README: "Supported servers: Redis 7.0 and later … refuses older servers at startup with
/// a message naming the version found."
#[test]
fn a_server_older_than_redis_7_is_refused_at_startup_naming_its_version() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let info: String = redis::cmd("INFO").arg("server").query(&mut con).unwrap();
    let real = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .expect("redis_version in INFO")
        .trim()
        .to_owned();
    assert!(
        real.starts_with("7."),
        "this test poses a Redis 7 as Redis 6; the server is {real}"
    );
    let posing = format!("6{}", &real[1..]);
    let relay = PosingAsRedis6::start(redis.port);
    let url = format!("redis://{}/0", relay.addr);
    let mut daemon = Daemon::start(&config(
        &url,
        "r1",
        "[groups.g]\nstream = \"s\"\nhandler = \"noop\"\n",
    ));
    let status = daemon
        .wait(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("still running against Redis {posing}:\n{}", daemon.logs()));
    assert_ne!(status.code(), Some(0), "{}", daemon.logs());
    let logs = daemon.logs();
    assert!(
        logs.contains(&format!("Redis {posing}")) && logs.contains("7.0 or later"),
        "the refusal names the version found and the one needed:\n{logs}"
    );
    // Nothing was set up on the server.
    let exists: i64 = redis::cmd("EXISTS").arg("s").query(&mut con).unwrap();
    assert_eq!(exists, 0, "no stream or group created");

    // The same server, not posing, is accepted: the relay is the only difference.
    let _ok = Daemon::start(&config(
        &redis.url(),
        "r1",
        "[groups.g]\nstream = \"s\"\nhandler = \"noop\"\n",
    ));
    wait_until(Duration::from_secs(20), "the group created", || {
        group_info(&mut con, "s", "g").is_some()
    });
}

// ---------------------------------------------------------------------------------------
// scripts/webhook-receiver.py

/// `python3 scripts/webhook-receiver.py PORT SECRET`; killed on drop.
struct Receiver(Child, u16);

impl Receiver {
    fn start(secret: &str) -> Self {
        let port = free_port();
        let child = Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/scripts/webhook-receiver.py"
            ))
            .arg(port.to_string())
            .arg(secret)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 runs (scripts/test installs it)");
        let receiver = Self(child, port);
        wait_until(Duration::from_secs(10), "the receiver listening", || {
            receiver.counts().is_some()
        });
        receiver
    }

    /// Its `{"handled": …, "rejected": …}` counters.
    fn counts(&self) -> Option<serde_json::Value> {
        let (status, body) = http_get(&format!("127.0.0.1:{}", self.1), "/")?;
        assert_eq!(status, 200, "{body}");
        Some(serde_json::from_str(&body).expect("the receiver's counters are JSON"))
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// README: "`scripts/webhook-receiver.py` is a complete receiver." It verifies the daemon's
/// signature, acknowledges what it handles and dead-letters what it rejects; a daemon with
/// the wrong secret gets nothing acknowledged.
#[test]
fn the_example_receiver_verifies_signatures_and_answers_as_documented() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let receiver = Receiver::start("s3cret");
    let group = |name: &str, stream: &str, secret: &str| {
        format!(
            r#"
[groups.{name}]
stream = "{stream}"
handler = "webhook"
{FAST}
[groups.{name}.options]
url = "http://127.0.0.1:{}/hook"
timeout = "900ms"
secret = "{secret}"
"#,
            receiver.1
        )
    };
    let groups = group("good", "events", "s3cret") + &group("forged", "other", "wrong");
    let _daemon = Daemon::start(&config(&redis.url(), "r1", &groups));
    let kinds = ["purchase", "malformed", "page_view", "purchase"];
    let ids = produce(
        &mut con,
        "events",
        &kinds
            .iter()
            .map(|k| vec![("event_type", k.to_string())])
            .collect::<Vec<_>>(),
    );
    let forged = produce(
        &mut con,
        "other",
        &[vec![("event_type", "purchase".into())]],
    );
    wait_until(Duration::from_secs(20), "both groups settled", || {
        group_info(&mut con, "events", "good") == Some((0, Some(0)))
            && group_info(&mut con, "other", "forged") == Some((0, Some(0)))
    });
    assert_eq!(
        receiver.counts().unwrap(),
        serde_json::json!({"handled": 3, "rejected": 1})
    );
    let dead = stream_strings(&mut con, "{events}:dlq:good");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(field(&dead[0].1, "dlq_origin_id"), Some(ids[1].as_str()));
    assert!(
        field(&dead[0].1, "dlq_error").unwrap().contains("422"),
        "{dead:?}"
    );
    let dead = stream_strings(&mut con, "{other}:dlq:forged");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(field(&dead[0].1, "dlq_origin_id"), Some(forged[0].as_str()));
    assert!(
        field(&dead[0].1, "dlq_error").unwrap().contains("401"),
        "{dead:?}"
    );
}

// ---------------------------------------------------------------------------------------
// The Kubernetes rollout

/// docs/operations.md: "`maxSurge: 1, maxUnavailable: 0`: a new pod must be ready (Redis
/// reachable, every group running) before an old one drains." The Deployment says so, and
/// its readiness is the daemon's `/readyz`.
#[test]
fn the_deployment_rolls_out_one_ready_pod_before_draining_one() {
    use yaml_rust2::{Yaml, YamlLoader};
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/kubernetes/deployment.yaml"
    ))
    .expect("deploy/kubernetes/deployment.yaml");
    let docs = YamlLoader::load_from_str(&text).expect("the Deployment is YAML");
    let deployment = docs
        .iter()
        .find(|d| d["kind"].as_str() == Some("Deployment"))
        .expect("a Deployment");
    let strategy = &deployment["spec"]["strategy"];
    assert_eq!(strategy["type"].as_str(), Some("RollingUpdate"));
    assert_eq!(strategy["rollingUpdate"]["maxSurge"], Yaml::Integer(1));
    assert_eq!(
        strategy["rollingUpdate"]["maxUnavailable"],
        Yaml::Integer(0)
    );
    let containers = deployment["spec"]["template"]["spec"]["containers"]
        .as_vec()
        .expect("containers");
    let probe = &containers[0]["readinessProbe"]["httpGet"];
    assert_eq!(probe["path"].as_str(), Some("/readyz"), "{probe:?}");
}

// ---------------------------------------------------------------------------------------
// config/user-activity.toml

/// Every leaf of a TOML table as `dotted.key = value`.
fn leaves(prefix: &str, value: &toml::Value, out: &mut BTreeMap<String, toml::Value>) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                leaves(&key, v, out);
            }
        }
        other => {
            out.insert(prefix.to_owned(), other.clone());
        }
    }
}

/// README: "See `config/user-activity.toml`: every key, commented, with its default." Every
/// key `check` prints for that file (the resolved configuration, defaults filled in) is
/// written in the file, for one of its groups, with the value `check` prints, or shown in a
/// comment (`# key = value`) with it; secrets, which `check` redacts, just have to be there.
#[test]
fn config_user_activity_writes_every_key_check_prints_with_its_value() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/user-activity.toml");
    let (code, out, err) = run_cli(&["check", "-c", path], &[]);
    assert_eq!(code, 0, "{err}");
    let text = std::fs::read_to_string(path).unwrap();
    let printed: toml::Value = toml::from_str(&out).expect("check prints TOML");
    let written: toml::Value = toml::from_str(&text).expect("the file is TOML");
    let (mut p, mut w) = (BTreeMap::new(), BTreeMap::new());
    leaves("", &printed, &mut p);
    leaves("", &written, &mut w);
    // `groups.<name>.key` → `groups.*.key`: a key is shown once, in any group.
    let general = |key: &str| -> String {
        let parts: Vec<&str> = key.split('.').collect();
        match parts.as_slice() {
            ["groups" | "streams", _, rest @ ..] => format!("{}.*.{}", parts[0], rest.join(".")),
            _ => key.to_owned(),
        }
    };
    let mut shown: HashMap<String, Vec<toml::Value>> = HashMap::new();
    for (key, value) in &w {
        shown.entry(general(key)).or_default().push(value.clone());
    }
    // Per general key: shown at all, and where check filled in a default (a group that
    // does not set the key), shown with that default for at least one such group.
    let mut found: BTreeMap<String, (Option<bool>, Vec<String>)> = BTreeMap::new();
    for (key, value) in &p {
        let gen_key = general(key);
        let leaf = key.rsplit('.').next().unwrap();
        let commented = text.contains(&format!("# {leaf} = "));
        let entry = found.entry(gen_key.clone()).or_default();
        if !shown.contains_key(&gen_key) && !commented {
            entry.0 = Some(false);
            entry.1.push(format!("{key} = {value}: not in the file"));
            continue;
        }
        if w.contains_key(key) || value.as_str() == Some("<redacted>") {
            // Set by the file itself: trivially what check prints.
            continue;
        }
        let ok = shown.get(&gen_key).is_some_and(|vs| vs.contains(value))
            || text.contains(&format!("# {leaf} = {value}"));
        if entry.0 != Some(false) {
            entry.0 = Some(entry.0.unwrap_or(false) || ok);
        }
        entry.1.push(format!("{key} = {value} (a default)"));
    }
    let missing: Vec<String> = found
        .into_iter()
        .filter(|(_, (ok, _))| *ok == Some(false))
        .map(|(key, (_, printed))| format!("{key}: {printed:?}"))
        .collect();
    assert!(
        missing.is_empty(),
        "config/user-activity.toml lacks what check prints:\n{}",
        missing.join("\n")
    );
}

// ---------------------------------------------------------------------------------------
// warehouse: a marker that cannot be set

/// README, warehouse: "A live process that wrote a line but could not set its marker
/// remembers it and does not write it again." The ACL user may read the markers but not
/// set them: every delivery writes nothing more, the entry reaches its dead letter after
/// `max_deliveries` attempts, and its line is in the file once. Once the markers can be
/// set, the replayed dead letter is acknowledged, still without a second line.
#[test]
fn a_warehouse_that_cannot_set_its_marker_does_not_write_the_line_again() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let commands = doc("docs/configuration.md")
        .lines()
        .find_map(|l| l.strip_prefix("user streamworker on >PASSWORD "))
        .expect("docs/configuration.md's ACL line")
        .split(' ')
        .filter(|r| r.starts_with('+') || r.starts_with('-') || r.starts_with('&'))
        .collect::<Vec<_>>()
        .join(" ");
    // Every key but the markers, which it may only read: keys not starting with `{`
    // (the stream, the lease), the dead letters, the group's pause switch (a script key, so read and write), and
    // `{events}:warehouse:*` read-only.
    let rules = format!(
        "sw on >pw resetkeys ~[^{{]* ~{{events}}:dlq:* ~{{events}}:streamworker:paused:* %R~{{events}}:warehouse:* resetchannels {commands}"
    );
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(rules.split(' ').collect::<Vec<_>>())
        .query(&mut con)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let group = format!(
        r#"
[groups.archive]
stream = "events"
handler = "warehouse"
block = "500ms"
handler_timeout = "1s"
claim_idle = "2s"
max_deliveries = 3
retry_backoff = {{ initial = "100ms", max = "300ms" }}
[groups.archive.options]
directory = "{}"
max_wait = "50ms"
"#,
        dir.path().display()
    );
    let url = format!("redis://sw:pw@127.0.0.1:{}/0", redis.port);
    let daemon = Daemon::start(&config(&url, "r1", &group));
    let ids = produce(
        &mut con,
        "events",
        &[vec![("n", "1".into())], vec![("n", "2".into())]],
    );
    let dlq = "{events}:dlq:archive";
    wait_until(
        Duration::from_secs(30),
        "both entries dead-lettered",
        || entries(&mut con, dlq).len() >= 2,
    );
    let lines = || -> Vec<String> {
        let mut ids = Vec::new();
        for file in std::fs::read_dir(dir.path()).unwrap() {
            let text = std::fs::read_to_string(file.unwrap().path()).unwrap();
            for line in text.lines() {
                let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
                ids.push(v["id"].as_str().unwrap().to_owned());
            }
        }
        ids.sort();
        ids
    };
    assert_eq!(
        lines(),
        ids,
        "one line per entry after three deliveries each"
    );
    for (_, fields) in stream_strings(&mut con, dlq) {
        assert_eq!(field(&fields, "dlq_deliveries"), Some("3"), "{fields:?}");
        assert!(
            field(&fields, "dlq_error").is_some_and(|e| e.contains("marker could not be set")),
            "{fields:?}"
        );
        assert!(
            field(&fields, "dlq_error").is_some_and(|e| e.contains("NoPerm")),
            "the refusal is the ACL's: {fields:?}"
        );
    }

    // Markers allowed again: the replays are acknowledged, still one line each.
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("sw")
        .arg("~{events}:warehouse:*")
        .query(&mut con)
        .unwrap();
    dlq_replay_all(&daemon.config_path, "archive");
    wait_until(Duration::from_secs(20), "the replays acknowledged", || {
        group_info(&mut con, "events", "archive") == Some((0, Some(0)))
            && entries(&mut con, dlq).is_empty()
    });
    assert_eq!(lines(), ids, "the replays wrote nothing again");
}

// ---------------------------------------------------------------------------------------
// warehouse on PostgreSQL: nothing local

/// docs/operations.md: "For PostgreSQL (`sink = "postgres"`) nothing is written locally."
/// The daemon runs in an empty working directory, stores rows, and leaves it empty.
#[test]
fn a_postgres_warehouse_writes_nothing_in_its_working_directory() {
    let redis = RedisServer::start();
    let pg = super::warehouse::Postgres::start();
    let cwd = tempfile::tempdir().unwrap();
    let group = format!(
        r#"
[groups.warehouse]
stream = "ml_events"
handler = "warehouse"
payload = "json:event"
block = "500ms"
handler_timeout = "2s"
claim_idle = "3s"
[groups.warehouse.options]
sink = "postgres"
url = "{}"
table = "{}"
max_wait = "50ms"
"#,
        pg.url, pg.table
    );
    let config_dir = tempfile::tempdir().unwrap();
    let config_path = config_dir.path().join("streamworker.toml");
    std::fs::write(&config_path, config(&redis.url(), "r1", &group)).unwrap();
    let mut daemon = Command::new(binary())
        .arg("run")
        .arg("-c")
        .arg(&config_path)
        .current_dir(cwd.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the streamworker binary runs");
    let mut con = redis.connection();
    produce(
        &mut con,
        "ml_events",
        &(0..5)
            .map(|i| vec![("event", format!(r#"{{"event_type":"llm_call","n":{i}}}"#))])
            .collect::<Vec<_>>(),
    );
    wait_until(Duration::from_secs(30), "five rows", || pg.count() == 5);
    wait_until(Duration::from_secs(10), "the group idle", || {
        group_info(&mut con, "ml_events", "warehouse") == Some((0, Some(0)))
    });
    let left: Vec<_> = std::fs::read_dir(cwd.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let _ = daemon.kill();
    let _ = daemon.wait();
    assert!(left.is_empty(), "written locally: {left:?}");
}
