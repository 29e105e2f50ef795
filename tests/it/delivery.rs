//! The delivery contract of DESIGN §3 for the success path, crashes, restarts and
//! shutdown: every entry handled, nothing lost.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::support::*;

fn webhook_group(group: &str, stream: &str, url: &str, extra: &str) -> String {
    format!(
        r#"
[groups.{group}]
stream = "{stream}"
handler = "webhook"
block = "500ms"
handler_timeout = "2s"
claim_idle = "3s"
consumer_ttl = "1m"
retry_backoff = {{ initial = "100ms", max = "1s" }}
{extra}
[groups.{group}.options]
url = "{url}"
timeout = "2s"
"#
    )
}

/// Consumers of `group` whose read connection is blocked in XREADGROUP right now. (Redis
/// lists a consumer in XINFO CONSUMERS only once something was delivered to it.)
fn blocked_readers(con: &mut redis::Connection, group: &str) -> usize {
    let list: String = redis::cmd("CLIENT").arg("LIST").query(con).unwrap();
    list.lines()
        .filter(|l| {
            l.contains(&format!("name=streamworker:{group}:")) && l.contains("cmd=xreadgroup")
        })
        .count()
}

fn events(n: usize) -> Vec<Vec<(&'static str, String)>> {
    (0..n)
        .map(|i| {
            vec![
                ("user_id", (i % 97).to_string()),
                (
                    "event_type",
                    if i % 3 == 0 { "prompt" } else { "click" }.to_owned(),
                ),
                ("n", i.to_string()),
            ]
        })
        .collect()
}

#[test]
fn three_replicas_handle_every_entry_and_share_the_work() {
    let redis = RedisServer::start();
    let hook = WebhookServer::start_with(|_| (200, Duration::from_millis(1)));
    let daemons: Vec<Daemon> = ["r1", "r2", "r3"]
        .iter()
        .map(|r| {
            let group = webhook_group(
                "billing",
                "orders",
                &hook.url(r),
                "concurrency = 16\nbatch_size = 16",
            );
            Daemon::start(&config(&redis.url(), r, &group))
        })
        .collect();
    let mut con = redis.connection();
    wait_until(Duration::from_secs(30), "three replicas reading", || {
        blocked_readers(&mut con, "billing") == 3
    });

    let ids = produce(&mut con, "orders", &events(10_000));
    wait_until(Duration::from_secs(120), "10,000 entries handled", || {
        hook.handled().len() == 10_000
    });
    wait_until(Duration::from_secs(10), "nothing pending", || {
        group_info(&mut con, "orders", "billing") == Some((0, Some(0)))
    });

    let handled = hook.handled();
    assert!(ids.iter().all(|id| handled.contains_key(id)));
    let mut per_replica: HashMap<String, usize> = HashMap::new();
    for hit in hook.hits() {
        *per_replica.entry(hit.path.clone()).or_default() += 1;
    }
    for r in ["r1", "r2", "r3"] {
        let share = per_replica.get(r).copied().unwrap_or(0);
        assert!(
            share >= 1_500,
            "replica {r} handled only {share} of 10,000: {per_replica:?}"
        );
    }
    drop(daemons);
}

#[test]
fn a_killed_replicas_pending_entries_are_handled_by_the_survivors() {
    let redis = RedisServer::start();
    // r1's endpoint never answers in time: it holds its entries until it is killed.
    let hook = WebhookServer::start_with(|hit| {
        if hit.path == "slow" {
            (200, Duration::from_secs(60))
        } else {
            (200, Duration::from_millis(2))
        }
    });
    let mut con = redis.connection();
    let ids = produce(&mut con, "orders", &events(2_000));

    let mut r1 = Daemon::start(&config(
        &redis.url(),
        "r1",
        &webhook_group(
            "billing",
            "orders",
            &hook.url("slow"),
            "concurrency = 40\nbatch_size = 40",
        ),
    ));
    wait_until(
        Duration::from_secs(20),
        "r1 to hold at least 20 entries",
        || {
            group_info(&mut con, "orders", "billing").is_some()
                && pending_of(&mut con, "orders", "billing", "r1") >= 20
        },
    );
    let survivors: Vec<Daemon> = ["r2", "r3"]
        .iter()
        .map(|r| {
            Daemon::start(&config(
                &redis.url(),
                r,
                &webhook_group(
                    "billing",
                    "orders",
                    &hook.url(r),
                    "concurrency = 8\nbatch_size = 8",
                ),
            ))
        })
        .collect();
    let held = pending_of(&mut con, "orders", "billing", "r1");
    assert!(
        held >= 20,
        "r1 holds {held} pending entries just before the kill"
    );
    r1.kill();

    wait_until(
        Duration::from_secs(60),
        "every entry handled by the survivors",
        || {
            let handled = hook.handled();
            ids.iter().all(|id| handled.contains_key(id))
        },
    );
    wait_until(Duration::from_secs(10), "nothing pending", || {
        group_info(&mut con, "orders", "billing").map(|(p, _)| p) == Some(0)
    });
    let handled = hook.handled();
    let duplicates = handled.values().filter(|&&n| n > 1).count();
    eprintln!(
        "r1 held {held} entries when killed; survivors handled all {} entries with {duplicates} duplicates",
        ids.len()
    );
    drop(survivors);
}

#[test]
fn sigterm_hands_back_entries_fetched_but_never_started() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(format!("127.0.0.1:{}", redis.port).parse().unwrap());
    let hook = WebhookServer::start();
    // claim_idle is longer than this test: only a hand-back can make the entries
    // reclaimable this soon.
    let group = |url: &str| {
        format!(
            r#"
[groups.billing]
stream = "orders"
handler = "webhook"
block = "8s"
handler_timeout = "5s"
claim_idle = "90s"
[groups.billing.options]
url = "{url}"
timeout = "5s"
"#
        )
    };
    let a_config = config(&proxy.url(), "a", &group(&hook.url("a")))
        .replace("shutdown_timeout = \"10s\"", "shutdown_timeout = \"20s\"");
    let mut a = Daemon::start(&a_config);
    let mut con = redis.connection();
    // Wait until a's read is blocked with most of its 8 s still ahead.
    wait_until(Duration::from_secs(20), "a's read to block", || {
        let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut con).unwrap();
        list.lines().any(|l| {
            l.contains("name=streamworker:billing:a")
                && l.contains("cmd=xreadgroup")
                && l.contains(" flags=b ")
                && l.split(' ').any(|f| f == "idle=0" || f == "idle=1")
        })
    });
    proxy.hold_replies(true);
    // One transaction, so the blocked read is served all 20 at once.
    let mut tx = redis::pipe();
    tx.atomic();
    for i in 0..20 {
        tx.cmd("XADD").arg("orders").arg("*").arg("n").arg(i);
    }
    let ids: Vec<String> = tx.query(&mut con).unwrap();
    wait_until(Duration::from_secs(5), "the entries delivered to a", || {
        pending_of(&mut con, "orders", "billing", "a") == 20
    });
    // a learns of its entries only after it was told to stop.
    a.terminate();
    a.wait_for_log(Duration::from_secs(10), "shutting down: reading stopped");
    proxy.hold_replies(false);
    let status = a.wait(Duration::from_secs(15)).expect("a exits");
    assert_eq!(status.code(), Some(0), "a exits 0:\n{}", a.logs());
    assert!(a.logs().contains("handed back"), "{}", a.logs());
    assert_eq!(hook.count(), 0, "a never started the entries");

    let started = std::time::Instant::now();
    let _b = Daemon::start(&config(&redis.url(), "b", &group(&hook.url("b"))));
    wait_until(
        Duration::from_secs(10),
        "b to handle the handed-back entries",
        || hook.handled().len() == 20,
    );
    let took = started.elapsed();
    for hit in hook.hits() {
        assert_eq!(hit.path, "b");
        assert_eq!(
            hit.delivery_count, 1,
            "the delivery that never ran was given back: {hit:?}"
        );
    }
    let handled: HashSet<String> = hook.handled().into_keys().collect();
    assert_eq!(handled, ids.into_iter().collect());
    eprintln!("b handled the 20 handed-back entries {took:?} after it started");
}

#[test]
fn a_redis_restart_mid_run_loses_nothing_the_producer_saw_succeed() {
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let hook = WebhookServer::start();
    let url = redis.url();
    let mut daemon = Daemon::start(&config(
        &url,
        "r1",
        &webhook_group(
            "billing",
            "orders",
            &hook.url("r1"),
            "concurrency = 32\nbatch_size = 32",
        ),
    ));
    let mut con = redis.connection();
    wait_until(Duration::from_secs(20), "the group to exist", || {
        group_info(&mut con, "orders", "billing").is_some()
    });

    let producer = std::thread::spawn(move || {
        let client = redis::Client::open(url).unwrap();
        let mut confirmed = Vec::new();
        let mut con = None;
        for i in 0..3_000 {
            if con.is_none() {
                con = client
                    .get_connection_with_timeout(Duration::from_millis(200))
                    .ok();
            }
            if let Some(c) = con.as_mut() {
                let added: redis::RedisResult<String> = redis::cmd("XADD")
                    .arg("orders")
                    .arg("*")
                    .arg("n")
                    .arg(i)
                    .query(c);
                match added {
                    Ok(id) => confirmed.push(id),
                    Err(_) => con = None,
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        confirmed
    });
    // Mid-run: the daemon is handling what the producer writes.
    wait_until(
        Duration::from_secs(20),
        "entries handled before the crash",
        || hook.count() >= 200,
    );
    redis.kill();
    // Redis stays down until the daemon has noticed.
    daemon.wait_for_log(Duration::from_secs(20), "lost Redis");
    redis.restart();
    let confirmed = producer.join().unwrap();
    assert!(
        confirmed.len() > 1_000,
        "the producer got {} entries in",
        confirmed.len()
    );

    wait_until(
        Duration::from_secs(60),
        "every confirmed entry handled",
        || {
            let handled = hook.handled();
            confirmed.iter().all(|id| handled.contains_key(id))
        },
    );
    assert!(
        daemon.is_running(),
        "the daemon survived the outage:\n{}",
        daemon.logs()
    );
    let logs = daemon.logs();
    assert!(logs.contains("lost Redis"), "{logs}");
    daemon.terminate();
    assert_eq!(
        daemon.wait(Duration::from_secs(15)).and_then(|s| s.code()),
        Some(0)
    );
    let handled = hook.handled();
    let duplicates = handled.values().filter(|&&n| n > 1).count();
    eprintln!(
        "{} confirmed entries all handled after a Redis restart; {duplicates} duplicates",
        confirmed.len()
    );
}

#[test]
fn a_consumer_name_held_by_a_live_process_is_refused() {
    let redis = RedisServer::start();
    let group = r#"
[groups.analytics]
stream = "user_logs"
handler = "noop"
"#;
    let cfg = config(&redis.url(), "shared-name", group);
    let mut first = Daemon::start(&cfg);
    first.wait_for_log(Duration::from_secs(20), "created consumer group");
    // The second process must find the first one's lease in Redis, not race it.
    let mut con = redis.connection();
    wait_until(Duration::from_secs(20), "the first process's lease", || {
        redis::cmd("EXISTS")
            .arg("streamworker:lease:{user_logs}:analytics:shared-name")
            .query::<u64>(&mut con)
            .expect("EXISTS")
            == 1
    });

    let mut second = Daemon::start(&cfg);
    let status = second
        .wait(Duration::from_secs(15))
        .expect("the second process gives up");
    assert_eq!(status.code(), Some(1));
    let logs = second.logs();
    assert!(logs.contains("in use by another live process"), "{logs}");
    assert!(
        logs.contains("worker.consumer"),
        "the message says how to fix it: {logs}"
    );
    assert!(first.is_running(), "the first process is unaffected");

    // A holder that died without releasing its lease is waited out.
    first.kill();
    let (third_cfg, http) = config_with_http(&redis.url(), "shared-name", group);
    let mut third = Daemon::start(&third_cfg);
    third.wait_for_log(
        Duration::from_secs(20),
        "waiting to see whether it is still alive",
    );
    let ids = produce(&mut con, "user_logs", &events(5));
    wait_until(
        Duration::from_secs(20),
        "the successor to take over",
        || group_info(&mut con, "user_logs", "analytics") == Some((0, Some(0))),
    );
    assert!(third.is_running());
    assert_eq!(
        entries_total(&http, &[("group", "analytics"), ("outcome", "acked")]),
        ids.len() as f64,
        "the successor, under the same name, handled every entry"
    );
}

#[test]
fn both_payload_shapes_are_handled_and_bad_json_is_dead_lettered_at_once() {
    let redis = RedisServer::start();
    let hook = WebhookServer::start();
    let groups = format!(
        "{}{}",
        webhook_group("activity", "user_logs", &hook.url("flat"), ""),
        webhook_group(
            "warehouse",
            "ml_events",
            &hook.url("json"),
            "payload = \"json:event\""
        ),
    );
    let _daemon = Daemon::start(&config(&redis.url(), "r1", &groups));
    let mut con = redis.connection();
    let flat = produce(
        &mut con,
        "user_logs",
        &[vec![
            ("user_id", "42".to_owned()),
            ("event_type", "prompt".to_owned()),
            ("message", "What is quantum computing?".to_owned()),
            ("timestamp", "2025-07-25T18:00:00Z".to_owned()),
        ]],
    );
    let llm_event = serde_json::json!({
        "event_id": "a1b2c3d4-e5f6-7890-1234-567890abcdef",
        "event_type": "llm_call",
        "timestamp": "2024-01-15T16:30:45.123456Z",
        "execution_id": "exec_abc123",
        "operation": "answer_generation",
        "data": {"model": "gemini/gemini-2.0-flash", "tokens_used": 287, "cost_usd": 0.0023, "response_time_ms": 1234},
        "tags": {"environment": "production", "user_id": "user_123"}
    });
    let good = produce(
        &mut con,
        "ml_events",
        &[vec![("event", llm_event.to_string())]],
    );
    let bad = produce(
        &mut con,
        "ml_events",
        &[vec![(
            "event",
            "{\"event_type\": \"llm_call\", ".to_owned(),
        )]],
    );

    // (Ids are per stream: the two entries may well share one.)
    wait_until(Duration::from_secs(20), "both good entries handled", || {
        hook.count() == 2
    });
    let hits = hook.hits();
    let flat_hit = hits
        .iter()
        .find(|h| h.path == "flat")
        .expect("flat entry delivered");
    assert_eq!(flat_hit.id, flat[0]);
    assert_eq!(flat_hit.body["fields"]["user_id"], "42");
    assert_eq!(
        flat_hit.body["fields"]["message"],
        "What is quantum computing?"
    );
    let json_hit = hits
        .iter()
        .find(|h| h.path == "json")
        .expect("json entry delivered");
    assert_eq!(json_hit.id, good[0]);
    let event: serde_json::Value =
        serde_json::from_str(json_hit.body["fields"]["event"].as_str().unwrap()).unwrap();
    assert_eq!(event, llm_event);

    // The malformed document never reaches the handler: it is dead-lettered at once.
    let dlq = "{ml_events}:dlq:warehouse";
    wait_until(
        Duration::from_secs(20),
        "the bad entry dead-lettered",
        || {
            redis::cmd("XLEN")
                .arg(dlq)
                .query::<u64>(&mut con)
                .unwrap_or(0)
                == 1
        },
    );
    let dead: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(dlq)
        .arg("-")
        .arg("+")
        .query(&mut con)
        .unwrap();
    let fields: HashMap<String, String> = dead[0].1.iter().cloned().collect();
    assert_eq!(fields["dlq_origin_id"], bad[0]);
    assert_eq!(fields["dlq_deliveries"], "1");
    assert!(fields["dlq_error"].contains("not valid JSON"), "{fields:?}");
    assert!(hits.iter().all(|h| h.id != bad[0]));
    wait_until(Duration::from_secs(10), "nothing pending", || {
        group_info(&mut con, "ml_events", "warehouse") == Some((0, Some(0)))
    });
}
