//! Issue 15, producers and per-key order: `produce --partition-by`, and groups with
//! `order_by` (entries of one key handled one at a time, in id order, across retries,
//! dead letters and a SIGKILL).

use streamworker::partition::{partition_of, partition_stream};

use crate::support::*;
use std::time::Duration;

fn field<'a>(fields: &'a Fields, name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == name.as_bytes())
        .map(|(_, v)| std::str::from_utf8(v).unwrap())
}

#[test]
fn produce_partition_by_writes_each_event_to_its_keys_partition() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut con = redis.connection();
    let (code, out, err) = run_cli(
        &[
            "produce",
            "--scenario",
            "user-activity",
            "--url",
            &url,
            "--count",
            "200",
            "--rate",
            "100000",
            "--stream",
            "clicks",
            "--partition-by",
            "user_id",
            "--partitions",
            "4",
            "--json",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["added"], 200);
    assert_eq!(summary["partitions"], 4);
    let mut total = 0;
    for p in 0..4 {
        let stream = partition_stream("clicks", p);
        for (_, fields) in entries(&mut con, &stream) {
            let user = field(&fields, "user_id").expect("user_id");
            assert_eq!(
                partition_of(user.as_bytes(), 4),
                p,
                "user {user} is in {stream}"
            );
            total += 1;
        }
    }
    assert_eq!(total, 200, "every event in exactly one partition");
    let exists: u64 = redis::cmd("EXISTS").arg("clicks").query(&mut con).unwrap();
    assert_eq!(exists, 0, "nothing goes to the unpartitioned stream");

    // The rule for events without the key: an error naming the field, nothing guessed.
    let (code, _, err) = run_cli(
        &[
            "produce",
            "--scenario",
            "llm-observability",
            "--url",
            &url,
            "--count",
            "5",
            "--partition-by",
            "user_id",
            "--partitions",
            "4",
        ],
        &[],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("has no field `user_id` to partition by"),
        "{err}"
    );
    for p in 0..4 {
        assert!(entries(&mut con, &partition_stream("ml_events", p)).is_empty());
    }
    // --partitions without --partition-by (and 0 partitions) are refused by the CLI.
    let (code, _, _) = run_cli(
        &[
            "produce",
            "--scenario",
            "memory",
            "--url",
            &url,
            "--partitions",
            "4",
        ],
        &[],
    );
    assert_ne!(code, 0);
}

/// An ordered webhook group on `orders`: per-key order by field `key`.
fn ordered_group(url: &str, extra: &str) -> String {
    format!(
        r#"
[groups.billing]
stream = "orders"
start_id = "0"
handler = "webhook"
order_by = "key"
concurrency = 8
block = "200ms"
handler_timeout = "2s"
claim_idle = "3s"
consumer_ttl = "1m"
{extra}
[groups.billing.options]
url = "{url}"
timeout = "2s"
"#
    )
}

fn key_of(hit: &webhook::Hit) -> String {
    hit.body["fields"]["key"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn id_of(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap();
    (ms.parse().unwrap(), seq.parse().unwrap())
}

/// Every request per key, in the order they reached the webhook, must be in id order: an
/// entry may come again (a retry, or after a crash the entry that was in flight), but
/// never an older entry after a newer one of its key.
fn assert_per_key_order(hits: &[webhook::Hit]) {
    let mut hits = hits.to_vec();
    hits.sort_by_key(|h| h.at);
    let mut last: std::collections::HashMap<String, (u64, u64)> = Default::default();
    for h in &hits {
        let id = id_of(&h.id);
        if let Some(prev) = last.insert(key_of(h), id) {
            assert!(
                prev <= id,
                "key {} saw {} after {:?}: {:#?}",
                key_of(h),
                h.id,
                prev,
                hits.iter()
                    .filter(|x| key_of(x) == key_of(h))
                    .map(|x| (&x.id, x.delivery_count, x.status))
                    .collect::<Vec<_>>()
            );
        }
    }
}

#[test]
fn order_by_holds_a_failing_keys_later_entries_while_other_keys_flow() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    // Interleaved keys; a0 fails twice then succeeds, d0 is poison.
    let mut ids: Vec<(String, String)> = Vec::new();
    for i in 0..8 {
        for key in ["a", "b", "c", "d"] {
            let id = produce(
                &mut con,
                "orders",
                &[vec![("key", key.to_owned()), ("n", i.to_string())]],
            )[0]
            .clone();
            ids.push((key.to_owned(), id));
        }
    }
    let a0 = ids[0].1.clone();
    let d0 = ids[3].1.clone();
    let hook = {
        let (a0, d0) = (a0.clone(), d0.clone());
        webhook::WebhookServer::start_with(move |hit| {
            if hit.id == d0 || (hit.id == a0 && hit.delivery_count < 3) {
                (500, Duration::ZERO)
            } else {
                (200, Duration::from_millis(5 + fastrand::u64(..10)))
            }
        })
    };
    let _daemon = Daemon::start(&config(
        &redis.url(),
        "r1",
        &ordered_group(
            &hook.url("orders"),
            "max_deliveries = 3\nretry_backoff = { initial = \"400ms\", max = \"400ms\", multiplier = 1.0, jitter = 0.0 }",
        ),
    ));
    wait_until(
        Duration::from_secs(30),
        "every entry handled or dead-lettered",
        || {
            let handled = hook.handled();
            ids.iter()
                .all(|(_, id)| *id == d0 || handled.contains_key(id))
                && entries(&mut con, "{orders}:dlq:billing").len() == 1
                && group_info(&mut con, "orders", "billing")
                    .is_some_and(|(pending, _)| pending == 0)
        },
    );
    let hits = hook.hits();
    assert_per_key_order(&hits);
    // Each entry handled once (no duplicates without a crash); a0 took three calls.
    let handled = hook.handled();
    assert!(handled.values().all(|n| *n == 1), "{handled:?}");
    let calls = |id: &str| hits.iter().filter(|h| h.id == id).count();
    assert_eq!(calls(&a0), 3);
    assert_eq!(calls(&d0), 3, "the poison entry used its max_deliveries");
    let dead = entries(&mut con, "{orders}:dlq:billing");
    assert!(
        dead[0]
            .1
            .iter()
            .any(|(k, v)| k == b"dlq_origin_id" && v == d0.as_bytes()),
        "{dead:?}"
    );
    // Other keys flowed while a0 waited for its retries: keys b and c were done before
    // a0 succeeded (its retries are 400 ms apart).
    let a0_success = hits
        .iter()
        .find(|h| h.id == a0 && h.status == 200)
        .unwrap()
        .at;
    let last_of = |key: &str| {
        hits.iter()
            .filter(|h| key_of(h) == key)
            .map(|h| h.at)
            .max()
            .unwrap()
    };
    assert!(last_of("b") < a0_success && last_of("c") < a0_success);
    // And a1 only after a0 succeeded; d1 only after d0's last attempt.
    let first_of = |id: &str| {
        hits.iter()
            .filter(|h| h.id == id)
            .map(|h| h.at)
            .min()
            .unwrap()
    };
    assert!(first_of(&ids[4].1) > a0_success);
    let d0_last = hits
        .iter()
        .filter(|h| h.id == d0)
        .map(|h| h.at)
        .max()
        .unwrap();
    assert!(
        first_of(&ids[7].1) > d0_last,
        "the dead-lettered entry released its key"
    );
}

#[test]
fn order_by_survives_sigkill_no_key_sees_its_entries_out_of_order_nothing_lost() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let keys: Vec<String> = (0..12).map(|k| format!("customer-{k}")).collect();
    let mut ids: Vec<String> = Vec::new();
    for i in 0..300 {
        let key = keys[fastrand::usize(..keys.len())].clone();
        ids.extend(produce(
            &mut con,
            "orders",
            &[vec![("key", key), ("n", i.to_string())]],
        ));
    }
    // Slow-ish answers so that many entries are in flight at the kill, and one in ten
    // fails its first delivery (retries held in process when the kill comes).
    let hook = webhook::WebhookServer::start_with(|hit| {
        let (ms, seq) = id_of(&hit.id);
        if (ms + seq) % 10 == 0 && hit.delivery_count == 1 {
            (500, Duration::from_millis(5))
        } else {
            (200, Duration::from_millis(5 + fastrand::u64(..25)))
        }
    });
    let group = ordered_group(
        &hook.url("orders"),
        "retry_backoff = { initial = \"200ms\", max = \"200ms\", multiplier = 1.0, jitter = 0.0 }",
    );
    let mut first = Daemon::start(&config(&redis.url(), "r1", &group));
    wait_until(Duration::from_secs(30), "a third handled", || {
        hook.handled().len() >= 100
    });
    first.kill();
    // A replacement with another consumer name: it takes the dead one's pending entries
    // over before reading anything new.
    let _second = Daemon::start(&config(&redis.url(), "r2", &group));
    wait_until(Duration::from_secs(60), "every entry handled", || {
        let handled = hook.handled();
        ids.iter().all(|id| handled.contains_key(id))
            && group_info(&mut con, "orders", "billing").is_some_and(|(pending, _)| pending == 0)
    });
    assert_per_key_order(&hook.hits());
}

#[test]
fn check_refuses_order_by_on_a_partitioned_forward_and_an_empty_order_by() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        &config(
            "redis://127.0.0.1:1/0",
            "r1",
            r#"
[groups.fanout]
stream = "events"
handler = "forward"
order_by = "customer"
[groups.fanout.options]
to = "orders"
partition_by = "customer"
partitions = 4

[groups.billing]
stream = "orders:p1"
handler = "noop"
order_by = ""
"#,
        ),
    );
    let (code, _, err) = run_cli(&["check", "-c", &path], &[]);
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("groups.fanout.order_by")
            && err.contains("cannot be combined with a forward's partition_by"),
        "{err}"
    );
    assert!(
        err.contains("groups.billing.order_by") && err.contains("is empty"),
        "{err}"
    );
}

#[test]
fn entries_waiting_for_their_key_stay_pending_here_with_their_idle_time_refreshed() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let a0 = produce(&mut con, "orders", &[vec![("key", "a".to_owned())]])[0].clone();
    let a1 = produce(&mut con, "orders", &[vec![("key", "a".to_owned())]])[0].clone();
    // a0 fails four times, 1.2 s apart: a1 waits over 3.6 s, longer than claim_idle (3 s).
    let hook = {
        let a0 = a0.clone();
        webhook::WebhookServer::start_with(move |hit| {
            if hit.id == a0 && hit.delivery_count < 5 {
                (500, Duration::ZERO)
            } else {
                (200, Duration::ZERO)
            }
        })
    };
    let group = ordered_group(
        &hook.url("orders"),
        "max_deliveries = 6\nretry_backoff = { initial = \"1200ms\", max = \"1200ms\", multiplier = 1.0, jitter = 0.0 }",
    );
    let _daemon = Daemon::start(&config(&redis.url(), "r1", &group));
    wait_until(Duration::from_secs(10), "a0's fourth attempt", || {
        hook.hits().iter().filter(|h| h.id == a0).count() >= 4
    });
    // Both entries are pending on r1, idle less than claim_idle; a0's delivery count in
    // Redis follows its in-process retries.
    let rows: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg("orders")
        .arg("billing")
        .arg("-")
        .arg("+")
        .arg(10)
        .query(&mut con)
        .unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    for (id, consumer, idle_ms, count) in &rows {
        assert_eq!(consumer, "r1", "{rows:?}");
        assert!(*idle_ms < 3_000, "{id} idle {idle_ms} ms: {rows:?}");
        if *id == a0 {
            assert!(*count >= 3, "{rows:?}");
        } else {
            // Kept by a refresh of its idle time, not reclaimed (which would count a
            // delivery).
            assert_eq!(*count, 1, "{rows:?}");
        }
    }
    assert!(hook.hits().iter().all(|h| h.id != a1), "a1 waits for a0");
    wait_until(Duration::from_secs(15), "both handled", || {
        let handled = hook.handled();
        handled.contains_key(&a0) && handled.contains_key(&a1)
    });
    let hits = hook.hits();
    assert_per_key_order(&hits);
    let a1_hits: Vec<u64> = hits
        .iter()
        .filter(|h| h.id == a1)
        .map(|h| h.delivery_count)
        .collect();
    assert_eq!(a1_hits, [1]);
}

/// docs/ordering.md: with a partitioned stream, per-key order holds across replicas and
/// through rebalances. Two replicas share 8 partitions of an ordered group; one is
/// SIGKILLed mid-stream (its partitions are taken over when their leases expire), a third
/// joins (partitions move to it), and one is SIGTERMed (it hands its partitions over at
/// once). No key ever sees an older entry after a newer one; every entry is handled.
#[test]
fn order_by_on_a_partitioned_stream_holds_across_sigkill_joins_and_handovers() {
    const PARTITIONS: u32 = 8;
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let keys: Vec<String> = (0..24).map(|k| format!("customer-{k}")).collect();
    let total = 600;
    let mut produced = 0;
    let mut produce_some = |con: &mut redis::Connection, n: usize| {
        for _ in 0..n {
            let key = &keys[fastrand::usize(..keys.len())];
            let stream = partition_stream("orders", partition_of(key.as_bytes(), PARTITIONS));
            let _: String = redis::cmd("XADD")
                .arg(&stream)
                .arg("*")
                .arg("key")
                .arg(key)
                .arg("n")
                .arg(produced)
                .query(con)
                .expect("XADD");
            produced += 1;
        }
    };
    // Slow-ish answers so that entries are in flight at the kill and the handovers, and a
    // few fail their first delivery (retries held in process when ownership moves).
    let hook = webhook::WebhookServer::start_with(|hit| {
        let n: u64 = hit.body["fields"]["n"].as_str().unwrap().parse().unwrap();
        if n % 13 == 0 && hit.delivery_count == 1 {
            (500, Duration::from_millis(5))
        } else {
            (200, Duration::from_millis(5 + fastrand::u64(..20)))
        }
    });
    let group = ordered_group(
        &hook.url("orders"),
        &format!(
            "partitions = {PARTITIONS}\npartition_lease = \"6s\"\nretry_backoff = {{ initial = \"200ms\", max = \"200ms\", multiplier = 1.0, jitter = 0.0 }}"
        ),
    );
    let handled_n = |hook: &webhook::WebhookServer| -> std::collections::HashSet<u64> {
        hook.hits()
            .iter()
            .filter(|h| (200..300).contains(&h.status))
            .map(|h| h.body["fields"]["n"].as_str().unwrap().parse().unwrap())
            .collect()
    };

    produce_some(&mut con, total / 3);
    let mut r1 = Daemon::start(&config(&redis.url(), "r1", &group));
    let r2 = Daemon::start(&config(&redis.url(), "r2", &group));
    wait_until(Duration::from_secs(30), "a first share handled", || {
        handled_n(&hook).len() >= total / 6
    });
    produce_some(&mut con, total / 3);
    r1.kill();
    let _r3 = Daemon::start(&config(&redis.url(), "r3", &group));
    wait_until(
        Duration::from_secs(60),
        "half handled after the kill",
        || handled_n(&hook).len() >= total / 2,
    );
    produce_some(&mut con, total - 2 * (total / 3));
    r2.terminate();
    wait_until(Duration::from_secs(90), "every entry handled", || {
        let handled = handled_n(&hook);
        (0..total as u64).all(|n| handled.contains(&n))
            && (0..PARTITIONS).all(|p| {
                group_info(&mut con, &partition_stream("orders", p), "billing")
                    .is_some_and(|(pending, _)| pending == 0)
            })
    });
    // Per key, by production order `n` (ids are per partition stream; a key has one).
    let mut hits = hook.hits();
    hits.sort_by_key(|h| h.at);
    let mut last: std::collections::HashMap<String, u64> = Default::default();
    for h in &hits {
        let n: u64 = h.body["fields"]["n"].as_str().unwrap().parse().unwrap();
        if let Some(prev) = last.insert(key_of(h), n) {
            assert!(
                prev <= n,
                "key {} saw entry {n} after entry {prev}: {:?}",
                key_of(h),
                hits.iter()
                    .filter(|x| key_of(x) == key_of(h))
                    .map(|x| (
                        x.body["fields"]["n"].as_str().unwrap().to_owned(),
                        x.delivery_count,
                        x.status
                    ))
                    .collect::<Vec<_>>()
            );
        }
    }
}
