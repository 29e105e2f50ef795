//! The `alerts` handler: windowed rate rules shared by replicas, absence and lag rules,
//! cooldown and resolution, and exact counts when entries are delivered twice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::*;

/// Group settings that make tests fast.
const FAST: &str = r#"
block = "500ms"
handler_timeout = "2s"
claim_idle = "3s"
retry_backoff = { initial = "100ms", max = "1s" }
"#;

fn alerts_group(stream: &str, settings: &str, options: &str) -> String {
    format!(
        r#"
[groups.alerts]
stream = "{stream}"
handler = "alerts"
{settings}
[groups.alerts.options]
stream = "alerts:out"
{options}
"#
    )
}

/// The alert events so far, each as a field map.
fn alert_events(con: &mut redis::Connection) -> Vec<HashMap<String, String>> {
    entries(con, "alerts:out")
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

/// `rule:state` of each alert event, in order.
fn transitions(con: &mut redis::Connection) -> Vec<String> {
    alert_events(con)
        .iter()
        .map(|e| format!("{}:{}", e["rule"], e["state"]))
        .collect()
}

/// Records every message published on `channel`; ends when the server goes away.
struct Subscriber {
    messages: Arc<Mutex<Vec<String>>>,
}

impl Subscriber {
    fn start(redis: &RedisServer, channel: &str) -> Self {
        let messages = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let mut con = redis.connection();
        let (sink, channel) = (messages.clone(), channel.to_owned());
        std::thread::spawn(move || {
            let mut pubsub = con.as_pubsub();
            pubsub.subscribe(&channel).expect("SUBSCRIBE");
            ready_tx.send(()).unwrap();
            while let Ok(msg) = pubsub.get_message() {
                if let Ok(text) = msg.get_payload::<String>() {
                    sink.lock().unwrap().push(text);
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("subscribed");
        Self { messages }
    }

    fn messages(&self) -> Vec<serde_json::Value> {
        self.messages
            .lock()
            .unwrap()
            .iter()
            .map(|m| serde_json::from_str(m).expect("published alerts are JSON"))
            .collect()
    }
}

fn acked(http: &str) -> f64 {
    entries_total(http, &[("group", "alerts"), ("outcome", "acked")])
}

#[test]
fn a_burst_of_errors_over_two_replicas_is_one_firing_and_one_resolved() {
    let redis = RedisServer::start();
    let hook = WebhookServer::start();
    let subscriber = Subscriber::start(&redis, "test:alerts");
    let group = alerts_group(
        "ml_events",
        &format!("{FAST}payload = \"json:event\"\nbatch_size = 4"),
        &format!(
            r#"
channel = "test:alerts"
webhook = "{}"
webhook_timeout = "1s"
[[groups.alerts.options.rules]]
name = "error-rate"
kind = "rate"
when = {{ event_type = "error" }}
window = "5s"
threshold = 0.5
min_events = 10
cooldown = "3s"
"#,
            hook.url("services/T000/B000/SECRETPATH")
        ),
    );
    let (c1, http1) = config_with_http(&redis.url(), "r1", &group);
    let (c2, http2) = config_with_http(&redis.url(), "r2", &group);
    let r1 = Daemon::start(&c1);
    let r2 = Daemon::start(&c2);
    let mut con = redis.connection();
    wait_until(Duration::from_secs(20), "both replicas up", || {
        http_get(&http1, "/readyz").is_some_and(|(s, _)| s == 200)
            && http_get(&http2, "/readyz").is_some_and(|(s, _)| s == 200)
    });
    let event = |kind: &str| {
        vec![(
            "event",
            format!(r#"{{"event_type":"{kind}","data":{{"model":"gpt-4"}}}}"#),
        )]
    };

    // 7 s of 75 % errors (80 entries a second, one XADD each so both readers get some).
    let started = Instant::now();
    let mut fired_after = None;
    while started.elapsed() < Duration::from_secs(7) {
        for kind in ["error", "error", "error", "start"] {
            produce(&mut con, "ml_events", &[event(kind)]);
        }
        if fired_after.is_none() && !transitions(&mut con).is_empty() {
            fired_after = Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let fired_after = fired_after.expect("the rule fired while errors were flowing");
    assert_eq!(
        transitions(&mut con),
        vec!["error-rate:firing"],
        "one alert for the incident, nothing more while errors continue past the cooldown"
    );

    // Then only good entries: one resolution once the window's rate drops.
    let calm = Instant::now();
    let mut resolved_after = None;
    while calm.elapsed() < Duration::from_secs(9) {
        for _ in 0..4 {
            produce(&mut con, "ml_events", &[event("end")]);
        }
        if resolved_after.is_none() && transitions(&mut con).len() > 1 {
            resolved_after = Some(calm.elapsed());
        }
        if let Some(after) = resolved_after
            && calm.elapsed() > after + Duration::from_secs(2)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let resolved_after = resolved_after.expect("the rule resolved after the errors stopped");
    let events = alert_events(&mut con);
    assert_eq!(
        transitions(&mut con),
        vec!["error-rate:firing", "error-rate:resolved"]
    );
    let firing = &events[0];
    assert_eq!(firing["kind"], "rate");
    assert_eq!(firing["stream"], "ml_events");
    assert_eq!(firing["group"], "alerts");
    assert_eq!(firing["threshold"], "0.5");
    assert_eq!(firing["window"], "5s");
    let value: f64 = firing["value"].parse().unwrap();
    assert!((0.5..=1.0).contains(&value), "firing value {value}");
    assert!(firing["at"].ends_with('Z'), "{firing:?}");
    assert_eq!(events[1]["fired_at"], firing["at"]);
    assert!(events[1]["value"].parse::<f64>().unwrap() < 0.5);

    // Both replicas counted into the same window.
    let (a1, a2) = (acked(&http1), acked(&http2));
    assert!(
        a1 > 20.0 && a2 > 20.0,
        "entries spread over both replicas: r1 acked {a1}, r2 acked {a2}"
    );

    // The same two events were published and POSTed, Slack-style.
    wait_until(Duration::from_secs(5), "two published messages", || {
        subscriber.messages().len() == 2
    });
    let published = subscriber.messages();
    assert_eq!(published[0]["state"], "firing");
    assert_eq!(published[0]["rule"], "error-rate");
    assert_eq!(published[0]["threshold"], 0.5);
    assert_eq!(published[1]["state"], "resolved");
    wait_until(Duration::from_secs(5), "two webhook posts", || {
        hook.count() == 2
    });
    let hits = hook.hits();
    assert_eq!(hits[0].path, "services/T000/B000/SECRETPATH");
    assert_eq!(hits[0].headers["content-type"], "application/json");
    let text = |i: usize| hits[i].body["text"].as_str().unwrap_or_default().to_owned();
    assert!(
        text(0).contains("error-rate firing on ml_events"),
        "{}",
        text(0)
    );
    assert!(text(1).contains("error-rate resolved"), "{}", text(1));
    assert_eq!(
        hits[0].body.as_object().unwrap().len(),
        1,
        "{:?}",
        hits[0].body
    );
    for daemon in [&r1, &r2] {
        assert!(
            !daemon.logs().contains("SECRETPATH"),
            "the webhook URL is never logged"
        );
    }
    eprintln!(
        "fired {fired_after:?} into the errors, resolved {resolved_after:?} after they stopped; r1 acked {a1}, r2 acked {a2}"
    );
}

#[test]
fn an_absence_rule_fires_when_nothing_ever_arrives() {
    let redis = RedisServer::start();
    let daemon = Daemon::start(&config(
        &redis.url(),
        "r1",
        &alerts_group(
            "user_logs",
            FAST,
            r#"
[[groups.alerts.options.rules]]
name = "silence"
kind = "absence"
window = "5s"
cooldown = "1s"
description = "is the producer down?"
"#,
        ),
    ));
    let mut con = redis.connection();
    wait_until(Duration::from_secs(20), "the group to exist", || {
        group_info(&mut con, "user_logs", "alerts").is_some()
    });
    let up = Instant::now();
    wait_until(Duration::from_secs(12), "the absence alert", || {
        !transitions(&mut con).is_empty()
    });
    let took = up.elapsed();
    assert!(
        took >= Duration::from_secs(4),
        "fired only after a whole window of watching, not at once: {took:?}"
    );
    let events = alert_events(&mut con);
    assert_eq!(transitions(&mut con), vec!["silence:firing"]);
    assert_eq!(events[0]["kind"], "absence");
    assert_eq!(events[0]["value"], "0");
    assert!(!events[0].contains_key("threshold"), "{:?}", events[0]);
    assert!(
        events[0]["message"].contains("no matching entry for 5s — is the producer down?"),
        "{:?}",
        events[0]
    );

    // One entry ends the silence.
    produce(
        &mut con,
        "user_logs",
        &[vec![
            ("user_id", "42".into()),
            ("event_type", "login".into()),
        ]],
    );
    wait_until(Duration::from_secs(8), "the resolution", || {
        transitions(&mut con).len() == 2
    });
    assert_eq!(
        transitions(&mut con),
        vec!["silence:firing", "silence:resolved"]
    );
    drop(daemon);
}

#[test]
fn a_lag_rule_fires_for_a_group_with_a_backlog() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    // Another application's group that reads nothing.
    create_group(&mut con, "user_logs", "analytics", "$");
    let _daemon = Daemon::start(&config(
        &redis.url(),
        "r1",
        &alerts_group(
            "user_logs",
            FAST,
            r#"
[[groups.alerts.options.rules]]
name = "lagging-analytics"
kind = "lag"
group = "analytics"
threshold = 20
cooldown = "1s"
[[groups.alerts.options.rules]]
name = "own-lag"
kind = "lag"
threshold = 1000
"#,
        ),
    ));
    wait_until(Duration::from_secs(20), "the group to exist", || {
        group_info(&mut con, "user_logs", "alerts").is_some()
    });
    let events: Vec<Vec<(&str, String)>> = (0..50)
        .map(|i| vec![("user_id", i.to_string()), ("event_type", "view".into())])
        .collect();
    produce(&mut con, "user_logs", &events);
    wait_until(Duration::from_secs(10), "the lag alert", || {
        !transitions(&mut con).is_empty()
    });
    let fired = alert_events(&mut con);
    assert_eq!(transitions(&mut con), vec!["lagging-analytics:firing"]);
    assert_eq!(fired[0]["value"], "50");
    assert_eq!(fired[0]["threshold"], "20");
    assert!(!fired[0].contains_key("window"));
    assert!(
        fired[0]["message"]
            .contains("group analytics on user_logs has 50 entries not yet delivered"),
        "{:?}",
        fired[0]
    );
    wait_until(
        Duration::from_secs(5),
        "the alerts group itself keeps up",
        || group_info(&mut con, "user_logs", "alerts") == Some((0, Some(0))),
    );

    // The analytics group catches up: resolved.
    read_as(&mut con, "user_logs", "analytics", "c1", 100);
    wait_until(Duration::from_secs(8), "the resolution", || {
        transitions(&mut con).len() == 2
    });
    assert_eq!(
        transitions(&mut con),
        vec!["lagging-analytics:firing", "lagging-analytics:resolved"]
    );
}

/// "Alert if no consumers active": another application's group whose only reader stops
/// taking entries while entries wait fires once, and resolves when a reader takes them.
#[test]
fn a_consumers_rule_fires_when_a_group_has_no_active_reader() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let read_as = |con: &mut redis::Connection, consumer: &str| {
        read_as(con, "user:feedback", "learning", consumer, 10);
    };
    create_group(&mut con, "user:feedback", "learning", "$");
    let feedback = || vec![vec![("rating", "4".to_owned())]];
    // Redis creates (and refreshes) a consumer only when a read hands it entries.
    produce(&mut con, "user:feedback", &feedback());
    read_as(&mut con, "worker-1");
    let _daemon = Daemon::start(&config(
        &redis.url(),
        "r1",
        &alerts_group(
            "user_logs",
            FAST,
            r#"
[[groups.alerts.options.rules]]
name = "nobody-learning"
kind = "consumers"
stream = "user:feedback"
group = "learning"
window = "5s"
threshold = 1
cooldown = "1s"
# A group that does not exist: nothing to judge, never an alert (checked below: only
# nobody-learning ever changes).
[[groups.alerts.options.rules]]
name = "ghost"
kind = "consumers"
stream = "user:feedback"
group = "no-such-group"
window = "5s"
threshold = 1
"#,
        ),
    ));
    // Quiet for a while: worker-1 goes idle past the window (as Redis tells it), but
    // nothing waits for it, so three evaluations after that bring no alert.
    wait_until(
        Duration::from_secs(20),
        "worker-1 idle past the window",
        || {
            let consumers: Vec<redis::Value> = redis::cmd("XINFO")
                .arg("CONSUMERS")
                .arg("user:feedback")
                .arg("learning")
                .query(&mut con)
                .unwrap();
            consumers.into_iter().map(value_map).any(|c| {
                c.get("name").map(String::as_str) == Some("worker-1")
                    && c.get("idle").and_then(|i| i.parse::<u64>().ok()) > Some(5_000)
            })
        },
    );
    let mut stamps = std::collections::HashSet::new();
    wait_until(Duration::from_secs(15), "three more evaluations", || {
        let at: Option<String> = redis::cmd("HGET")
            .arg("{user_logs}:alerts:alerts:state")
            .arg("_evaluated_at")
            .query(&mut con)
            .unwrap();
        stamps.extend(at);
        stamps.len() >= 4
    });
    assert!(
        transitions(&mut con).is_empty(),
        "{:?}",
        alert_events(&mut con)
    );
    produce(&mut con, "user:feedback", &feedback());
    wait_until(Duration::from_secs(10), "the alert", || {
        !transitions(&mut con).is_empty()
    });
    let fired = alert_events(&mut con);
    assert_eq!(transitions(&mut con), vec!["nobody-learning:firing"]);
    assert_eq!(fired[0]["kind"], "consumers");
    assert_eq!(fired[0]["value"], "0");
    assert_eq!(fired[0]["window"], "5s");
    assert!(
        fired[0]["message"].contains(
            "group learning on user:feedback has 0 consumers active in the last 5s (1 known; at least 1 wanted) and 1 entries waiting"
        ),
        "{:?}",
        fired[0]
    );
    read_as(&mut con, "worker-2");
    wait_until(Duration::from_secs(8), "the resolution", || {
        transitions(&mut con).len() == 2
    });
    assert_eq!(
        transitions(&mut con),
        vec!["nobody-learning:firing", "nobody-learning:resolved"]
    );
}

/// The count of `field` across the group's one-second buckets.
fn bucket_total(con: &mut redis::Connection, stream: &str, field: &str) -> i64 {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{{{stream}}}:alerts:alerts:bucket:1s:*"))
        .query(con)
        .unwrap();
    keys.iter()
        .map(|k| {
            redis::cmd("HGET")
                .arg(k)
                .arg(field)
                .query::<Option<i64>>(con)
                .unwrap()
                .unwrap_or(0)
        })
        .sum()
}

#[test]
fn entries_delivered_twice_are_counted_once() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(format!("127.0.0.1:{}", redis.port).parse().unwrap());
    let options = r#"
[[groups.alerts.options.rules]]
name = "burst"
kind = "count"
when = { level = "error" }
window = "1m"
threshold = 10
"#;
    // a logs at debug the acknowledgement that arrives too late.
    let a = Daemon::start_with_env(
        &config(
            &proxy.url(),
            "a",
            &alerts_group("app_logs", "block = \"8s\"", options),
        ),
        &[("RUST_LOG", "info,streamworker=debug")],
    );
    let mut con = redis.connection();
    wait_until(Duration::from_secs(20), "a's read to block", || {
        let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut con).unwrap();
        list.lines().any(|l| {
            l.contains("name=streamworker:alerts:a")
                && l.contains("cmd=xreadgroup")
                && l.contains(" flags=b ")
        })
    });
    proxy.hold_requests(true);
    // One transaction, so a's blocked read is served all nine at once.
    let mut tx = redis::pipe();
    tx.atomic();
    for i in 0..9 {
        tx.cmd("XADD")
            .arg("app_logs")
            .arg("*")
            .arg("level")
            .arg("error")
            .arg("n")
            .arg(i);
    }
    let _: Vec<String> = tx.query(&mut con).unwrap();
    wait_until(Duration::from_secs(5), "the entries delivered to a", || {
        pending_of(&mut con, "app_logs", "alerts", "a") == 9
    });
    // a handles them; its acknowledgement (and the counts with it) stays in the proxy
    // while b takes the entries over and counts them.

    let _b = Daemon::start(&config(
        &redis.url(),
        "b",
        &alerts_group(
            "app_logs",
            "block = \"500ms\"\nhandler_timeout = \"1s\"\nclaim_idle = \"2s\"\nretry_backoff = { initial = \"100ms\", max = \"1s\" }",
            options,
        ),
    ));
    wait_until(
        Duration::from_secs(15),
        "b to handle every entry again",
        || group_info(&mut con, "app_logs", "alerts") == Some((0, Some(0))),
    );
    assert_eq!(bucket_total(&mut con, "app_logs", "m:burst"), 9);
    // Now a's acknowledgement, with the counts of the same nine entries, reaches Redis:
    // late, after b's. It must change nothing.
    proxy.hold_requests(false);
    wait_until(
        Duration::from_secs(20),
        "a's late acknowledgement to arrive",
        || {
            a.logs()
                .contains("already acknowledged by another consumer")
                || bucket_total(&mut con, "app_logs", "m:burst") != 9
        },
    );
    assert_eq!(
        bucket_total(&mut con, "app_logs", "m:burst"),
        9,
        "a late acknowledgement counts nothing again"
    );
    // A few evaluations (every 1 s) with 9 of 10 in the window: nothing fires. Each
    // evaluation stamps `_evaluated_at` in the state hash; three new stamps, three
    // evaluations.
    let mut stamps = std::collections::HashSet::new();
    wait_until(Duration::from_secs(15), "three more evaluations", || {
        let at: Option<String> = redis::cmd("HGET")
            .arg("{app_logs}:alerts:alerts:state")
            .arg("_evaluated_at")
            .query(&mut con)
            .unwrap();
        stamps.extend(at);
        stamps.len() >= 4
    });
    assert_eq!(bucket_total(&mut con, "app_logs", "m:burst"), 9);
    assert_eq!(transitions(&mut con), Vec::<String>::new());

    // The tenth entry reaches the threshold.
    produce(&mut con, "app_logs", &[vec![("level", "error".into())]]);
    wait_until(Duration::from_secs(5), "the count alert", || {
        !transitions(&mut con).is_empty()
    });
    assert_eq!(alert_events(&mut con)[0]["value"], "10");
    assert_eq!(bucket_total(&mut con, "app_logs", "m:burst"), 10);
}

#[test]
fn check_explains_bad_rules() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("streamworker.toml");
    std::fs::write(
        &path,
        r#"
[redis]
url = "redis://127.0.0.1:6379/0"

[groups.empty]
stream = "s"
handler = "alerts"

[groups.bad]
stream = "s"
handler = "alerts"
[groups.bad.options]
webhook = "https://hooks.slack.com/services/T0/B0/SECRETPATH"
evaluate_every = "2s"
[[groups.bad.options.rules]]
name = "error-rate"
kind = "rate"
when = { event_type = "error" }
window = "5s"
threshold = 5
[[groups.bad.options.rules]]
name = "error-rate"
kind = "absence"
window = "1m"

[groups.kind]
stream = "s"
handler = "alerts"
[[groups.kind.options.rules]]
name = "x"
kind = "ratio"
"#,
    )
    .unwrap();
    let path = path.display().to_string();
    let (code, stdout, stderr) = run_cli(&["check", "-c", &path], &[]);
    assert_eq!(code, 2, "stdout: {stdout}\nstderr: {stderr}");
    for needle in [
        "groups.empty.options.rules: has no usable rule",
        "groups.bad.options.rules.0.window = \"5s\": too short",
        "a window must be at least 10s",
        "groups.bad.options.rules.0.threshold = 5: a rate threshold is a fraction above 0 and at most 1",
        "groups.bad.options.rules.1.name = \"error-rate\": another rule has this name",
        "`ratio` is not a rule kind; choose count, rate, absence, lag or consumers",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in:\n{stderr}");
    }
    assert!(!stderr.contains("SECRETPATH"), "{stderr}");
}

#[test]
fn the_readme_example_is_valid() {
    let readme = include_str!("../../docs/handlers.md");
    let section = &readme[readme.find("### alerts").expect("an alerts section")..];
    let start = section.find("```toml\n").expect("a TOML example") + "```toml\n".len();
    let example = &section[start..start + section[start..].find("```").unwrap()];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("streamworker.toml");
    std::fs::write(
        &path,
        format!("[redis]\nurl = \"redis://127.0.0.1:6379/0\"\n{example}"),
    )
    .unwrap();
    let (code, stdout, stderr) = run_cli(&["check", "-c", &path.display().to_string()], &[]);
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("kind = \"lag\""), "{stdout}");
}
