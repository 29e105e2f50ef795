//! The tools operators use: `status`, `dlq`, retention and consumer cleanup.

use std::collections::HashMap;
use std::time::Duration;

use crate::support::*;

fn xadd(con: &mut redis::Connection, stream: &str, fields: &[(&[u8], &[u8])]) -> String {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (k, v) in fields {
        cmd.arg(*k).arg(*v);
    }
    cmd.query(con).unwrap()
}

#[test]
fn dlq_replay_restores_fields_exactly_for_its_group_only_and_can_be_repeated() {
    let redis = RedisServer::start();
    // billing rejects everything at first (400: dead-lettered at once); audit accepts all.
    let hook = WebhookServer::start_with(|hit| {
        if hit.path == "billing" {
            (400, Duration::ZERO)
        } else {
            (200, Duration::ZERO)
        }
    });
    let group = |name: &str| {
        format!(
            r#"
[groups.{name}]
stream = "orders"
handler = "webhook"
block = "500ms"
handler_timeout = "1s"
claim_idle = "3s"
consumer_ttl = "1m"
retry_backoff = {{ initial = "200ms", max = "1s" }}
[groups.{name}.options]
url = "{}"
timeout = "1s"
"#,
            hook.url(name)
        )
    };
    let cfg = config(
        &redis.url(),
        "r1",
        &format!("{}{}", group("billing"), group("audit")),
    );
    let daemon = Daemon::start(&cfg);
    let mut con = redis.connection();
    // Field order and raw bytes must survive: a binary value, a repeated name, odd order.
    let originals: Vec<Vec<(Vec<u8>, Vec<u8>)>> = vec![
        vec![
            (b"z".to_vec(), b"last".to_vec()),
            (b"a".to_vec(), vec![0, 159, 146, 150, 255]),
            (b"z".to_vec(), b"again".to_vec()),
        ],
        vec![(b"order".to_vec(), b"2".to_vec())],
        vec![(b"order".to_vec(), b"3".to_vec())],
    ];
    let ids: Vec<String> = originals
        .iter()
        .map(|f| {
            let refs: Vec<(&[u8], &[u8])> = f
                .iter()
                .map(|(k, v)| (k.as_slice(), v.as_slice()))
                .collect();
            xadd(&mut con, "orders", &refs)
        })
        .collect();
    let dlq = "{orders}:dlq:billing";
    wait_until(Duration::from_secs(20), "three dead letters", || {
        entries(&mut con, dlq).len() == 3
    });
    wait_until(
        Duration::from_secs(10),
        "audit handled the originals",
        || hook.hits().iter().filter(|h| h.path == "audit").count() == 3,
    );

    let dead_ids: Vec<String> = entries(&mut con, dlq)
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let path = daemon.config_path.to_str().unwrap().to_owned();
    let (code, out, err) = run_cli(&["dlq", "list", "-c", &path, "--group", "billing"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&ids[0]) && out.contains("400"), "{out}");
    let (code, out, _) = run_cli(
        &[
            "dlq",
            "show",
            "-c",
            &path,
            "--group",
            "billing",
            &dead_ids[1],
        ],
        &[],
    );
    assert_eq!(code, 0);
    assert!(out.contains(&format!("{dlq} {}", dead_ids[1])), "{out}");
    assert!(
        ids.iter()
            .any(|id| out.contains(&format!("dlq_origin_id = {id}"))),
        "{out}"
    );

    hook.set_responder(|_| (200, Duration::ZERO));
    // An interrupted replay: only the first dead letter went back ...
    let (code, out, err) = run_cli(
        &[
            "dlq",
            "replay",
            "-c",
            &path,
            "--group",
            "billing",
            "--id",
            &dead_ids[0],
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("replayed"), "{out}");
    // ... and running it again for all neither loses nor duplicates.
    let (code, _, err) = run_cli(
        &["dlq", "replay", "-c", &path, "--group", "billing", "--all"],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("replayed 2 dead letters"), "{err}");
    let (code, _, err) = run_cli(
        &["dlq", "replay", "-c", &path, "--group", "billing", "--all"],
        &[],
    );
    assert_eq!(code, 0);
    assert!(err.contains("replayed 0 dead letters"), "{err}");
    assert!(entries(&mut con, dlq).is_empty());

    let replays: Vec<(String, Fields)> = entries(&mut con, "orders")
        .into_iter()
        .filter(|(_, f)| f.iter().any(|(k, _)| k == b"dlq_replay_of"))
        .collect();
    assert_eq!(replays.len(), 3, "each dead letter replayed exactly once");
    for (original_id, original) in ids.iter().zip(&originals) {
        let (_, fields) = replays
            .iter()
            .find(|(_, f)| {
                f.contains(&(b"dlq_replay_of".to_vec(), original_id.as_bytes().to_vec()))
            })
            .expect("a replay of every original");
        let n = original.len();
        assert_eq!(
            &fields[..n],
            &original[..],
            "fields restored byte for byte, in order"
        );
        assert_eq!(
            fields[n..].to_vec(),
            vec![
                (b"dlq_replay_of".to_vec(), original_id.as_bytes().to_vec()),
                (b"dlq_replay_group".to_vec(), b"billing".to_vec()),
            ]
        );
    }
    // billing handles the replays (keyed on the original id); audit does not call its handler.
    wait_until(
        Duration::from_secs(20),
        "billing handled the replays",
        || {
            hook.hits()
                .iter()
                .filter(|h| h.path == "billing" && h.status == 200)
                .count()
                == 3
        },
    );
    wait_until(Duration::from_secs(10), "both groups settled", || {
        group_info(&mut con, "orders", "billing") == Some((0, Some(0)))
            && group_info(&mut con, "orders", "audit") == Some((0, Some(0)))
    });
    assert_eq!(
        hook.hits().iter().filter(|h| h.path == "audit").count(),
        3,
        "audit never saw the replays"
    );
    let keys: Vec<String> = hook
        .hits()
        .iter()
        .filter(|h| h.path == "billing" && h.status == 200)
        .map(|h| h.headers["idempotency-key"].clone())
        .collect();
    for id in &ids {
        assert!(
            keys.contains(&format!("orders/{id}")),
            "idempotency key of the original: {keys:?}"
        );
    }
}

#[test]
fn retention_trims_only_what_every_group_acknowledged_or_never_needs() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let hook = WebhookServer::start();
    create_group(&mut con, "events", "outsider", "0");
    let ids = produce(
        &mut con,
        "events",
        &(0..100)
            .map(|i| vec![("n", i.to_string())])
            .collect::<Vec<_>>(),
    );
    // A group streamworker does not run: read 30, acknowledged the first 20.
    read_as(&mut con, "events", "outsider", "x", 30);
    ack(&mut con, "events", "outsider", &ids[..20]);
    // Another created later, at entry 50: entries after it are undelivered for it.
    create_group(&mut con, "events", "late", &ids[49]);

    let groups = format!(
        r#"
[streams.events]
retention = {{ max_len = 10 }}

[groups.fast]
stream = "events"
handler = "webhook"
block = "500ms"
[groups.fast.options]
url = "{}"
"#,
        hook.url("fast")
    );
    let (cfg, http) = config_with_http(&redis.url(), "r1", &groups);
    let _daemon = Daemon::start(&cfg);
    wait_until(Duration::from_secs(20), "fast handled everything", || {
        hook.count() == 100
    });
    // Entries 21–30 are pending for outsider: nothing from there on may go.
    wait_until(Duration::from_secs(20), "the first trim", || {
        entries(&mut con, "events")
            .first()
            .map(|(id, _)| id.clone())
            == Some(ids[20].clone())
    });
    let xlen =
        |con: &mut redis::Connection| redis::cmd("XLEN").arg("events").query::<u64>(con).unwrap();
    assert_eq!(xlen(&mut con), 80);
    let (_, text) = http_get(&http, "/metrics").unwrap();
    assert_eq!(
        metric(
            &text,
            "streamworker_retention_blocked",
            &[("group", "outsider")]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "streamworker_retention_blocked",
            &[("group", "fast")]
        ),
        Some(0.0)
    );

    // outsider catches up; late still has 51–100 undelivered.
    ack(&mut con, "events", "outsider", &ids[20..30]);
    read_as(&mut con, "events", "outsider", "x", 100);
    ack(&mut con, "events", "outsider", &ids[30..]);
    wait_until(Duration::from_secs(20), "the second trim", || {
        xlen(&mut con) == 50
    });
    assert_eq!(entries(&mut con, "events")[0].0, ids[50]);

    // late reads and acknowledges everything: down to max_len.
    read_as(&mut con, "events", "late", "y", 100);
    ack(&mut con, "events", "late", &ids[50..]);
    wait_until(Duration::from_secs(20), "the last trim", || {
        xlen(&mut con) == 10
    });
    assert_eq!(entries(&mut con, "events")[0].0, ids[90]);
}

#[test]
fn status_reports_what_the_test_set_up() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    create_group(&mut con, "user_logs", "analytics", "0");
    produce(
        &mut con,
        "user_logs",
        &(0..12)
            .map(|i| vec![("user_id", i.to_string())])
            .collect::<Vec<_>>(),
    );
    read_as(&mut con, "user_logs", "analytics", "worker-1", 5);
    produce(
        &mut con,
        "{user_logs}:dlq:analytics",
        &[
            vec![("dlq_error", "x".to_owned())],
            vec![("dlq_error", "y".to_owned())],
        ],
    );
    std::thread::sleep(Duration::from_millis(1100));

    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        &config(
            &redis.url(),
            "r1",
            "[groups.analytics]\nstream = \"user_logs\"\nhandler = \"noop\"\n",
        ),
    );
    let (code, out, err) = run_cli(&["status", "-c", &path, "--json"], &[]);
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let g = &report[0]["groups"][0];
    assert_eq!(report[0]["stream"], "user_logs");
    assert_eq!(report[0]["length"], 12);
    assert_eq!(g["group"], "analytics");
    assert_eq!(g["managed"], true);
    assert_eq!(g["lag"], 7);
    assert_eq!(g["pending"], 5);
    assert_eq!(g["dead_letter_length"], 2);
    assert_eq!(g["consumers"][0]["name"], "worker-1");
    assert_eq!(g["consumers"][0]["pending"], 5);
    assert!(g["oldest_pending_seconds"].as_f64().unwrap() >= 1.0, "{g}");

    let (code, text, _) = run_cli(&["status", "-c", &path], &[]);
    assert_eq!(code, 0);
    assert!(text.contains("stream user_logs  length 12"), "{text}");
    assert!(text.contains("worker-1"), "{text}");
}

#[test]
fn consumers_left_behind_by_gone_replicas_are_deleted() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    create_group(&mut con, "user_logs", "analytics", "0");
    let ids = produce(
        &mut con,
        "user_logs",
        &[vec![("n", "1".to_owned())], vec![("n", "2".to_owned())]],
    );
    let read = |con: &mut redis::Connection, consumer: &str| {
        read_as(con, "user_logs", "analytics", consumer, 1);
    };
    read(&mut con, "gone-empty");
    ack(&mut con, "user_logs", "analytics", &ids[0]);
    read(&mut con, "gone-holding");
    std::thread::sleep(Duration::from_millis(2500));
    let groups = r#"
[groups.analytics]
stream = "user_logs"
handler = "noop"
block = "200ms"
handler_timeout = "300ms"
claim_idle = "1s"
consumer_ttl = "2s"
retry_backoff = { initial = "100ms", max = "200ms" }
"#;
    let daemon = Daemon::start(&config(&redis.url(), "r1", groups));
    daemon.wait_for_log(Duration::from_secs(20), "deleted consumers");
    let names: Vec<String> = {
        let rows: Vec<redis::Value> = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg("user_logs")
            .arg("analytics")
            .query(&mut con)
            .unwrap();
        rows.into_iter()
            .filter_map(|r| value_map(r).remove("name"))
            .collect()
    };
    assert!(!names.contains(&"gone-empty".to_owned()), "{names:?}");
    // (gone-holding's entry is reclaimed after claim_idle; then it too is forgotten.)
    let _ = ids;
}

/// The cleanup script itself: only consumers with nothing pending and idle past the TTL go,
/// never this process's own.
#[test]
fn forgetting_consumers_keeps_those_holding_entries_and_our_own() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    create_group(&mut con, "s", "g", "0");
    let ids = produce(
        &mut con,
        "s",
        &(0..4)
            .map(|i| vec![("n", i.to_string())])
            .collect::<Vec<_>>(),
    );
    for consumer in ["idle-empty", "idle-holding", "me"] {
        read_as(&mut con, "s", "g", consumer, 1);
    }
    let _: u64 = redis::cmd("XACK")
        .arg("s")
        .arg("g")
        .arg(&ids[0])
        .arg(&ids[2])
        .query(&mut con)
        .unwrap();
    std::thread::sleep(Duration::from_millis(600));
    read_as(&mut con, "s", "g", "fresh", 1);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let deleted = rt.block_on(async {
        let config = streamworker::config::RedisConfig {
            url: redis.url(),
            ..Default::default()
        };
        let client = streamworker::client::Client::connect(&config)
            .await
            .unwrap();
        client
            .forget_consumers("s", "g", Duration::from_millis(500), &["me"])
            .await
            .unwrap()
    });
    assert_eq!(deleted, vec!["idle-empty".to_owned()]);
    let names: Vec<String> = {
        let rows: Vec<redis::Value> = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg("s")
            .arg("g")
            .query(&mut con)
            .unwrap();
        rows.into_iter()
            .filter_map(|r| value_map(r).remove("name"))
            .collect()
    };
    names.iter().for_each(|n| assert_ne!(n, "idle-empty"));
    assert_eq!(names.len(), 3, "idle-holding, me and fresh stay: {names:?}");
    let counts: HashMap<String, u64> = delivery_counts(&mut con, "s", "g");
    assert!(
        counts.contains_key(&ids[1]),
        "the holder's entry is still pending"
    );
}

/// `[streams.orders] retention` with a partitioned group on `orders`: every partition
/// stream is trimmed to its share of `max_len` (ceil(max_len / partitions)), never below
/// what a group on that partition still needs, and `orders` itself, read by an ordinary
/// group, keeps the whole `max_len`.
#[test]
fn retention_trims_every_partition_of_a_partitioned_stream() {
    const PARTITIONS: u32 = 4;
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let part = |p: u32| streamworker::partition::partition_stream("orders", p);
    let numbered = |n: usize| {
        (0..n)
            .map(|i| vec![("n", i.to_string())])
            .collect::<Vec<_>>()
    };
    let mut ids = Vec::new();
    for p in 0..PARTITIONS {
        ids.push(produce(&mut con, &part(p), &numbered(20)));
    }
    produce(&mut con, "orders", &numbered(25));
    // Another application's group on partition 1 read 8 entries and acknowledged 5.
    create_group(&mut con, &part(1), "outsider", "0");
    read_as(&mut con, &part(1), "outsider", "x", 8);
    ack(&mut con, &part(1), "outsider", &ids[1][..5]);

    // max_len 10 over 4 partitions: 3 each (ceil), so together they keep at least 10.
    let groups = format!(
        r#"
[streams.orders]
retention = {{ max_len = 10 }}

[groups.billing]
stream = "orders"
handler = "noop"
partitions = {PARTITIONS}
block = "500ms"

[groups.audit]
stream = "orders"
handler = "noop"
block = "500ms"
"#
    );
    let (cfg, http) = config_with_http(&redis.url(), "r1", &groups);
    let _daemon = Daemon::start(&cfg);
    let xlen = |con: &mut redis::Connection, key: &str| {
        redis::cmd("XLEN").arg(key).query::<u64>(con).unwrap()
    };
    wait_until(Duration::from_secs(30), "every partition trimmed", || {
        [0, 2, 3].iter().all(|p| xlen(&mut con, &part(*p)) == 3) && xlen(&mut con, "orders") == 10
    });
    for p in [0, 2, 3] {
        assert_eq!(entries(&mut con, &part(p))[0].0, ids[p as usize][17]);
    }
    // Partition 1: entries 6–8 are pending for outsider, 9–20 undelivered to it.
    assert_eq!(xlen(&mut con, &part(1)), 15);
    assert_eq!(entries(&mut con, &part(1))[0].0, ids[1][5]);
    let (_, text) = http_get(&http, "/metrics").unwrap();
    let blocked = |stream: &str, group: &str| {
        metric(
            &text,
            "streamworker_retention_blocked",
            &[("stream", stream), ("group", group)],
        )
    };
    assert_eq!(blocked(&part(1), "outsider"), Some(1.0), "{text}");
    assert_eq!(blocked(&part(1), "billing"), Some(0.0), "{text}");
    assert_eq!(blocked(&part(0), "billing"), Some(0.0), "{text}");
    assert_eq!(blocked("orders", "audit"), Some(0.0), "{text}");

    // outsider catches up: partition 1 goes down to its share too.
    read_as(&mut con, &part(1), "outsider", "x", usize::MAX);
    ack(&mut con, &part(1), "outsider", &ids[1][5..]);
    wait_until(Duration::from_secs(20), "partition 1 trimmed", || {
        xlen(&mut con, &part(1)) == 3
    });
}
