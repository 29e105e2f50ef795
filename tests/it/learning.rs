//! The `learning` handler against a real Redis: exact aggregates and dataset lines, one
//! adaptation event per crossing, and nothing doubled when every entry is handled twice.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use crate::support::{
    Daemon, Proxy, RedisServer, config, entries, group_info, pending_of, produce, wait_until,
};

const STREAM: &str = "user:feedback";
const GROUP: &str = "learning";

// The expectations are written out, not computed with the handler's own `Keys` and
// `prompt_id`: a wrong key layout or hash would otherwise agree with itself.

/// `{<stream>}:learning:<group>`, the prefix of every key of the group.
const P: &str = "{user:feedback}:learning:learning";

fn key(suffix: &str) -> String {
    format!("{P}:{suffix}")
}

/// The first 16 hex digits of the SHA-256 of each prompt the tests send (`printf %s PROMPT
/// | sha256sum | cut -c1-16`).
fn prompt_id(prompt: &str) -> &'static str {
    match prompt {
        "How do I reverse a list?" => "c6a859eb5a835d42",
        "What is a monad?" => "d05e003befdc5300",
        "prompt 0" => "481d04be4cdbb88b",
        "prompt 1" => "7e5b8ad56422e58b",
        "prompt 2" => "259a648c77377794",
        other => panic!("no expected prompt id written down for {other:?}"),
    }
}

fn group(options: &str, settings: &str) -> String {
    format!(
        r#"
[groups.{GROUP}]
stream = "{STREAM}"
handler = "learning"
{settings}
[groups.{GROUP}.options]
{options}
"#
    )
}

fn hgetall(con: &mut redis::Connection, key: &str) -> BTreeMap<String, String> {
    redis::cmd("HGETALL").arg(key).query(con).unwrap()
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Every line of every dataset file of the group, parsed.
fn dataset(dir: &Path) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let Ok(files) = std::fs::read_dir(dir.join(GROUP)) else {
        return out;
    };
    for file in files {
        let text = std::fs::read_to_string(file.unwrap().path()).unwrap();
        for line in text.lines() {
            out.push(serde_json::from_str(line).expect("every dataset line is JSON"));
        }
    }
    out
}

/// Sums the per-minute buckets of the group (whatever minutes the entries fell in).
fn minute_totals(con: &mut redis::Connection) -> BTreeMap<String, f64> {
    let names: Vec<String> = redis::cmd("KEYS")
        .arg("\\{user:feedback\\}:learning:learning:minute:*")
        .query(con)
        .unwrap();
    assert!(!names.is_empty(), "minute buckets exist");
    let mut out = BTreeMap::new();
    for name in names {
        for (field, value) in hgetall(con, &name) {
            *out.entry(field).or_insert(0.0) += value.parse::<f64>().unwrap();
        }
    }
    out
}

fn feedback(
    model: &str,
    prompt: &str,
    response: &str,
    user: &str,
    rating: Option<&str>,
    thumbs: Option<&str>,
) -> Vec<(&'static str, String)> {
    let mut f = vec![
        ("model", model.to_owned()),
        ("prompt", prompt.to_owned()),
        ("response", response.to_owned()),
        ("user", user.to_owned()),
    ];
    if let Some(r) = rating {
        f.push(("rating", r.to_owned()));
    }
    if let Some(t) = thumbs {
        f.push(("thumbs", t.to_owned()));
    }
    f
}

fn done(con: &mut redis::Connection) -> bool {
    group_info(con, STREAM, GROUP) == Some((0, Some(0)))
}

#[test]
fn aggregates_and_dataset_lines_are_exact() {
    let redis = RedisServer::start();
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().display().to_string();
    let _daemon = Daemon::start(&config(
        &redis.url(),
        "r1",
        &group(&format!("dataset_dir = \"{dir}\""), ""),
    ));
    let mut con = redis.connection();
    let (p1, p2) = ("How do I reverse a list?", "What is a monad?");
    let set = [
        feedback("m-good", p1, "xs[::-1]", "u1", Some("5"), None),
        feedback("m-good", p1, "reversed(xs)", "u2", Some("4"), None),
        feedback("m-good", p2, "A monoid in…", "u1", None, Some("up")),
        feedback("m-bad", p1, "Use a loop.", "u3", Some("2"), None),
        feedback("m-bad", p2, "No idea.", "u2", None, Some("down")),
        feedback("m-bad", p2, "A burrito.", "u3", Some("1"), Some("0")),
    ];
    let ids = produce(&mut con, STREAM, &set);
    // Not feedback (dropped) and a broken rating (dead-lettered): no line, no aggregate.
    produce(
        &mut con,
        STREAM,
        &[
            feedback("m-good", p1, "?", "u9", None, None),
            feedback("m-good", p1, "?", "u9", Some("11"), None),
        ],
    );
    wait_until(Duration::from_secs(10), "every entry settled", || {
        done(&mut con)
    });

    assert_eq!(
        hgetall(&mut con, &key("model:m-good")),
        map(&[("count", "3"), ("rating_sum", "14"), ("thumbs_up", "1")])
    );
    assert_eq!(
        hgetall(&mut con, &key("model:m-bad")),
        map(&[("count", "3"), ("rating_sum", "4"), ("thumbs_down", "2")])
    );
    assert_eq!(
        hgetall(&mut con, &key(&format!("prompt:{}", prompt_id(p1)))),
        map(&[("count", "3"), ("rating_sum", "11")])
    );
    assert_eq!(
        hgetall(&mut con, &key(&format!("prompt:{}", prompt_id(p2)))),
        map(&[
            ("count", "3"),
            ("rating_sum", "7"),
            ("thumbs_up", "1"),
            ("thumbs_down", "2")
        ])
    );
    assert_eq!(
        hgetall(&mut con, &key("models")),
        map(&[("m-good", "3"), ("m-bad", "3")])
    );
    let minutes = minute_totals(&mut con);
    let expected: BTreeMap<String, f64> = [
        ("count:m-good", 3.0),
        ("rating_sum:m-good", 14.0),
        ("thumbs_up:m-good", 1.0),
        ("count:m-bad", 3.0),
        ("rating_sum:m-bad", 4.0),
        ("thumbs_down:m-bad", 2.0),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(minutes, expected);
    let ttl: i64 = redis::cmd("PTTL")
        .arg(key("model:m-good"))
        .query(&mut con)
        .unwrap();
    assert!(
        ttl > 6 * 24 * 3600 * 1000,
        "aggregates live `retention` (7d): {ttl}"
    );
    let dead: Vec<_> = entries(&mut con, &format!("{{{STREAM}}}:dlq:{GROUP}"));
    assert_eq!(dead.len(), 1, "the out-of-scale rating is dead-lettered");

    // One line per feedback, exactly.
    let mut lines: BTreeMap<String, serde_json::Value> = dataset(data.path())
        .into_iter()
        .map(|l| (l["id"].as_str().unwrap().to_owned(), l))
        .collect();
    assert_eq!(lines.len(), 6, "{lines:#?}");
    let ratings = [5.0, 4.0, 5.0, 2.0, 1.0, 1.0];
    let thumbs = [None, None, Some("up"), None, Some("down"), Some("down")];
    for (i, (id, fields)) in ids.iter().zip(&set).enumerate() {
        let get = |k: &str| fields.iter().find(|(n, _)| *n == k).unwrap().1.clone();
        let ms: u64 = id.split('-').next().unwrap().parse().unwrap();
        let time = humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms));
        let expected = serde_json::json!({
            "prompt": get("prompt"),
            "response": get("response"),
            "rating": ratings[i],
            "thumbs": thumbs[i],
            "model": get("model"),
            "user": get("user"),
            "prompt_id": prompt_id(&get("prompt")),
            "stream": STREAM,
            "id": id,
            "idempotency_id": id,
            "time": time.to_string(),
        });
        assert_eq!(lines.remove(id), Some(expected), "line of entry {i}");
    }
}

#[test]
fn one_adaptation_event_per_crossing() {
    let redis = RedisServer::start();
    let data = tempfile::tempdir().unwrap();
    let options = format!(
        r#"dataset_dir = "{}"
threshold = 3.0
window = "10m"
min_feedback = 5
check_every = "1s""#,
        data.path().display()
    );
    let _daemon = Daemon::start(&config(&redis.url(), "r1", &group(&options, "")));
    let mut con = redis.connection();
    let rate = |con: &mut redis::Connection, model: &str, ratings: &[u32]| {
        let set: Vec<_> = ratings
            .iter()
            .map(|r| feedback(model, "p", "r", "u", Some(&r.to_string()), None))
            .collect();
        produce(con, STREAM, &set);
    };
    // m-bad averages 2.0 over 6 ratings, m-good 4.5; m-few is bad but has too few ratings.
    rate(&mut con, "m-bad", &[2, 2, 3, 1, 2, 2]);
    rate(&mut con, "m-good", &[5, 4, 5, 4, 5, 4]);
    rate(&mut con, "m-few", &[1, 1, 1, 1]);
    let events = |con: &mut redis::Connection| entries(con, "ai:adaptations");
    wait_until(Duration::from_secs(10), "an adaptation event", || {
        !events(&mut con).is_empty()
    });
    // Two more ticks (1 s each, ≤ 10 % jitter) pass without a repeat.
    std::thread::sleep(Duration::from_millis(2600));
    let got = events(&mut con);
    assert_eq!(got.len(), 1, "{got:?}");
    let fields: BTreeMap<String, String> = got[0]
        .1
        .iter()
        .map(|(k, v)| {
            (
                String::from_utf8_lossy(k).into_owned(),
                String::from_utf8_lossy(v).into_owned(),
            )
        })
        .collect();
    assert_eq!(fields["model"], "m-bad");
    assert_eq!(fields["rating"], "2");
    assert_eq!(fields["feedback"], "6");
    assert_eq!(fields["threshold"], "3");
    assert_eq!(fields["window"], "10m");
    assert_eq!(fields["stream"], STREAM);
    assert_eq!(fields["group"], GROUP);
    assert!(
        humantime::parse_rfc3339(&fields["at"]).is_ok(),
        "{fields:?}"
    );
    assert!(
        fields["reason"].contains("at or below the threshold 3"),
        "{fields:?}"
    );
    let state: String = redis::cmd("GET")
        .arg(key("state:m-bad"))
        .query(&mut con)
        .unwrap();
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert_eq!(state["low"], true);
    assert_eq!(state["emitted"], true);

    // It recovers (no event) and crosses again (a second event).
    rate(&mut con, "m-bad", &[5; 10]); // 62 / 16 = 3.875
    wait_until(Duration::from_secs(10), "m-bad to recover", || {
        redis::cmd("GET")
            .arg(key("state:m-bad"))
            .query::<String>(&mut con)
            .is_ok_and(|s| s.contains("\"low\":false"))
    });
    assert_eq!(events(&mut con).len(), 1, "recovering sends nothing");
    rate(&mut con, "m-bad", &[1; 20]); // 82 / 36 = 2.28
    wait_until(Duration::from_secs(10), "a second crossing", || {
        events(&mut con).len() == 2
    });
    let second = &events(&mut con)[1].1;
    assert!(
        second.contains(&(b"feedback".to_vec(), b"36".to_vec())),
        "{second:?}"
    );
    let models: BTreeMap<String, String> = hgetall(&mut con, &key("models"));
    assert_eq!(models["m-good"], "6");
    assert!(
        events(&mut con)
            .iter()
            .all(|(_, f)| f.contains(&(b"model".to_vec(), b"m-bad".to_vec()))),
        "the healthy model and the one with too few ratings never fire"
    );
}

#[test]
fn delivered_twice_changes_nothing() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(format!("127.0.0.1:{}", redis.port).parse().unwrap());
    let data = tempfile::tempdir().unwrap();
    let groups = group(
        &format!("dataset_dir = \"{}\"", data.path().display()),
        r#"block = "8s"
handler_timeout = "1s"
claim_idle = "2s"
retry_backoff = { initial = "100ms", max = "1s" }"#,
    );
    let mut a = Daemon::start(&config(&proxy.url(), "a", &groups));
    let mut con = redis.connection();
    wait_until(Duration::from_secs(20), "a's read to block", || {
        let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut con).unwrap();
        list.lines().any(|l| {
            l.contains(&format!("name=streamworker:{GROUP}:a"))
                && l.contains("cmd=xreadgroup")
                && l.contains(" flags=b ")
                && l.split(' ').any(|f| f == "idle=0" || f == "idle=1")
        })
    });
    proxy.hold_requests(true);
    let n = 12;
    let mut tx = redis::pipe();
    tx.atomic();
    let mut expected_sum = 0;
    let mut ups = 0;
    for i in 0..n {
        let rating = i % 5 + 1;
        expected_sum += rating;
        tx.cmd("XADD")
            .arg(STREAM)
            .arg("*")
            .arg("model")
            .arg("m")
            .arg("prompt")
            .arg(format!("prompt {}", i % 3))
            .arg("response")
            .arg(format!("response {i}"))
            .arg("rating")
            .arg(rating);
        if i % 4 == 0 {
            tx.arg("thumbs").arg("up");
            ups += 1;
        }
    }
    let ids: Vec<String> = tx.query(&mut con).unwrap();
    wait_until(Duration::from_secs(5), "the entries delivered to a", || {
        pending_of(&mut con, STREAM, GROUP, "a") == n
    });
    // a handles them: its lines reach the disk, but its markers and acknowledgements
    // are held in the proxy.
    wait_until(Duration::from_secs(10), "a's dataset lines", || {
        dataset(data.path()).len() == n as usize
    });
    std::thread::sleep(Duration::from_millis(300));
    a.kill();
    assert!(
        hgetall(&mut con, &key("model:m")).is_empty(),
        "a's effects never reached Redis"
    );

    let _b = Daemon::start(&config(&redis.url(), "b", &groups));
    wait_until(
        Duration::from_secs(15),
        "b to handle every entry again",
        || done(&mut con),
    );
    let mut model = map(&[
        ("count", &n.to_string()),
        ("rating_sum", &expected_sum.to_string()),
    ]);
    model.insert("thumbs_up".into(), ups.to_string());
    assert_eq!(hgetall(&mut con, &key("model:m")), model);
    let prompts: u64 = (0..3)
        .map(|p| {
            hgetall(
                &mut con,
                &key(&format!("prompt:{}", prompt_id(&format!("prompt {p}")))),
            )["count"]
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    assert_eq!(prompts, n);
    let minutes = minute_totals(&mut con);
    assert_eq!(minutes["count:m"], n as f64);
    assert_eq!(minutes["rating_sum:m"], expected_sum as f64);
    let lines = dataset(data.path());
    let line_ids: HashSet<&str> = lines.iter().map(|l| l["id"].as_str().unwrap()).collect();
    assert_eq!(lines.len(), n as usize, "no line written twice");
    assert_eq!(line_ids, ids.iter().map(String::as_str).collect());
    for id in &ids {
        let marker: Option<String> = redis::cmd("GET")
            .arg(key(&format!("written:{id}")))
            .query(&mut con)
            .unwrap();
        assert!(marker.is_some(), "b marked the line of {id} found on disk");
    }
}

/// A batch cannot grow past the group's `concurrency` (nothing more is fetched while the
/// buffer is full), so a full buffer starts at once instead of waiting out `max_wait`.
#[test]
fn a_buffer_that_fills_concurrency_does_not_wait_for_max_wait() {
    let redis = RedisServer::start();
    let _daemon = Daemon::start(&config(
        &redis.url(),
        "r1",
        &group(
            "dataset_dir = \"\"\nmax_batch = 100\nmax_wait = \"60s\"",
            "concurrency = 4\nclaim_idle = \"5m\"",
        ),
    ));
    let mut con = redis.connection();
    let set: Vec<_> = (0..8)
        .map(|i| feedback("m", "p", "r", &format!("u{i}"), Some("4"), None))
        .collect();
    produce(&mut con, STREAM, &set);
    // Two full buffers of four; with max_wait honoured alone this takes a minute.
    wait_until(Duration::from_secs(20), "both batches settled", || {
        done(&mut con)
    });
    assert_eq!(hgetall(&mut con, &key("model:m"))["count"], "8");
}

/// The words of a shell command line: whitespace-separated, `'…'` quoted.
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                word.get_or_insert_with(String::new);
            }
            c if c.is_whitespace() && !quoted => {
                if let Some(w) = word.take() {
                    words.push(w);
                }
            }
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    assert!(!quoted, "an unbalanced quote in {line:?}");
    words.extend(word);
    words
}

/// docs/handlers.md's learning example runs as shown: its two XADDs, fed to the daemon, give the
/// HGETALL reply and the dataset line (prompt_id included) docs/handlers.md prints, except for
/// the entry's id and time.
#[test]
fn the_readme_example_is_what_the_daemon_writes() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/handlers.md"))
        .expect("docs/handlers.md");
    let section = &readme[readme
        .find("### learning")
        .expect("docs/handlers.md has ### learning")..];
    let block = section
        .split("```console\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a console block in docs/handlers.md's learning section");
    // Commands, their continuation lines joined, each with the output lines after it.
    let mut commands: Vec<(String, Vec<&str>)> = Vec::new();
    let mut continued = false;
    for line in block.lines() {
        if let Some(cmd) = line.strip_prefix("$ ") {
            commands.push((cmd.trim_end_matches('\\').to_owned(), Vec::new()));
        } else if continued {
            let last = commands.last_mut().unwrap();
            last.0.push(' ');
            last.0.push_str(line.trim().trim_end_matches('\\'));
        } else if let Some(last) = commands.last_mut() {
            last.1.push(line);
        }
        continued = line.ends_with('\\');
    }
    let command = |prefix: &str| -> Vec<&(String, Vec<&str>)> {
        commands
            .iter()
            .filter(|(c, _)| c.starts_with(prefix))
            .collect()
    };

    let redis = RedisServer::start();
    let data = tempfile::tempdir().unwrap();
    let _daemon = Daemon::start(&config(
        &redis.url(),
        "r1",
        &group(&format!("dataset_dir = \"{}\"", data.path().display()), ""),
    ));
    let mut con = redis.connection();
    let adds = command("redis-cli XADD ");
    assert_eq!(adds.len(), 2, "docs/handlers.md's two XADDs: {commands:?}");
    let mut ids = Vec::new();
    for (cmd, _) in adds {
        let words = shell_words(cmd);
        assert_eq!(&words[..4], ["redis-cli", "XADD", STREAM, "*"], "{cmd}");
        let fields: Vec<(&str, String)> = words[4..]
            .chunks(2)
            .map(|kv| (kv[0].as_str(), kv[1].clone()))
            .collect();
        ids.extend(produce(&mut con, STREAM, &[fields]));
    }
    wait_until(Duration::from_secs(10), "both entries settled", || {
        done(&mut con)
    });

    let hgetall_cmd = command("redis-cli HGETALL ");
    let (cmd, output) = hgetall_cmd.first().expect("docs/handlers.md's HGETALL");
    let words = shell_words(cmd);
    let reply = output.concat();
    let printed: Vec<&str> = reply.split('"').skip(1).step_by(2).collect::<Vec<_>>();
    let printed: BTreeMap<String, String> = printed
        .chunks(2)
        .map(|kv| (kv[0].to_owned(), kv[1].to_owned()))
        .collect();
    assert_eq!(
        hgetall(&mut con, &words[2]),
        printed,
        "docs/handlers.md's HGETALL {} reply",
        words[2]
    );

    let tail = command("tail -1 ");
    let (_, output) = tail
        .first()
        .expect("docs/handlers.md's tail -1 of the dataset");
    let mut shown: serde_json::Value =
        serde_json::from_str(output[0]).expect("docs/handlers.md's dataset line is JSON");
    let mut lines = dataset(data.path());
    lines.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    let mut written = lines.pop().expect("a dataset line");
    assert_eq!(written["id"], ids[1].as_str());
    // The id and time are the entry's own; everything else must read as in docs/handlers.md.
    for field in ["id", "idempotency_id", "time"] {
        assert!(
            shown.get(field).is_some(),
            "docs/handlers.md's line has {field}"
        );
        shown[field] = serde_json::Value::Null;
        written[field] = serde_json::Value::Null;
    }
    assert_eq!(
        written, shown,
        "docs/handlers.md's dataset line (prompt_id included)"
    );
}
