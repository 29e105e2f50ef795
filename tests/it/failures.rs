//! The failure half of the delivery contract (DESIGN §3): retries counted by Redis with
//! backoff held in Redis, dead letters, drops, entries trimmed while pending, and the
//! circuit breaker.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::support::*;

/// A webhook group with fast retry settings; `extra` lines go into the group table.
fn group(url: &str, extra: &str) -> String {
    group_claiming_after(url, extra, "3s")
}

/// [`group`] with another `claim_idle`: tests that time retries use one far above their
/// backoffs, so that a retry waiting for a claim to expire cannot pass for a slow one.
fn group_claiming_after(url: &str, extra: &str, claim_idle: &str) -> String {
    format!(
        r#"
[groups.billing]
stream = "orders"
handler = "webhook"
block = "500ms"
handler_timeout = "1s"
claim_idle = "{claim_idle}"
consumer_ttl = "1m"
{extra}
[groups.billing.options]
url = "{url}"
timeout = "1s"
"#
    )
}

fn dead_letters(con: &mut redis::Connection) -> Vec<HashMap<String, String>> {
    entries(con, "{orders}:dlq:billing")
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

#[test]
fn a_poison_entry_is_tried_exactly_max_deliveries_times_with_backoff_then_dead_lettered() {
    let redis = RedisServer::start();
    let hook = WebhookServer::start_with(|_| (503, Duration::ZERO));
    let extra = r#"max_deliveries = 4
retry_backoff = { initial = "300ms", max = "1500ms", multiplier = 2.0, jitter = 0.5 }"#;
    let _daemon = Daemon::start(&config(
        &redis.url(),
        "r1",
        &group_claiming_after(&hook.url("r1"), extra, "8s"),
    ));
    let mut con = redis.connection();
    let ids = produce(
        &mut con,
        "orders",
        &[vec![
            ("order", "poison".to_owned()),
            ("amount", "12.50".to_owned()),
        ]],
    );

    wait_until(Duration::from_secs(30), "the entry dead-lettered", || {
        !dead_letters(&mut con).is_empty()
    });
    // The receiver records each call before answering it, and the dead letter is written
    // after the last answer (acknowledging the entry in the same script): every call the
    // entry got is recorded by now, and none can follow.
    let hits = hook.hits();
    assert_eq!(
        hits.len(),
        4,
        "handed to the handler exactly max_deliveries times: {hits:?}"
    );
    for (n, hit) in hits.iter().enumerate() {
        assert_eq!(
            hit.delivery_count,
            n as u64 + 1,
            "the handler sees Redis's delivery count"
        );
    }
    // Gaps: at least the backoff; at most backoff × (1 + jitter) + claim_interval, plus
    // slack for a loaded machine, all far below claim_idle.
    for n in 1..4u32 {
        let backoff = Duration::from_millis(300) * 2u32.pow(n - 1);
        let gap = hits[n as usize].at - hits[n as usize - 1].at;
        let most = backoff.mul_f64(1.5) + Duration::from_secs(1) + Duration::from_secs(2);
        assert!(
            gap >= backoff && gap <= most,
            "gap {n}: {gap:?} not within [{backoff:?}, {most:?}]"
        );
    }
    let dead = dead_letters(&mut con);
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(d["order"], "poison");
    assert_eq!(d["amount"], "12.50");
    assert_eq!(d["dlq_origin_stream"], "orders");
    assert_eq!(d["dlq_origin_id"], ids[0]);
    assert_eq!(d["dlq_group"], "billing");
    assert_eq!(d["dlq_deliveries"], "4");
    assert_eq!(d["dlq_consumer"], "r1");
    assert!(d["dlq_error"].contains("503"), "{d:?}");
    assert!(!d["dlq_error"].contains('\n'));
    let failed_at = humantime::parse_rfc3339(&d["dlq_failed_at"]).expect("RFC 3339");
    assert!(failed_at <= std::time::SystemTime::now());
    assert_eq!(
        group_info(&mut con, "orders", "billing").map(|(p, _)| p),
        Some(0),
        "nothing pending"
    );
}

#[test]
fn a_replica_killed_during_a_backoff_does_not_delay_the_retry() {
    let redis = RedisServer::start();
    // Fail the first attempt, succeed afterwards.
    let hook = WebhookServer::start_with(|hit| {
        if hit.delivery_count == 1 {
            (503, Duration::ZERO)
        } else {
            (200, Duration::ZERO)
        }
    });
    let extra = r#"max_deliveries = 3
retry_backoff = { initial = "1500ms", max = "2s", multiplier = 2.0, jitter = 0.2 }"#;
    // A claim_idle far above the backoff: a retry that waited for the dead replica's
    // claim to expire (the failure this test catches) comes 8 s late, not a hair late.
    let settings = |r: &str| group_claiming_after(&hook.url(r), extra, "8s");
    let mut replicas: HashMap<String, Daemon> = ["a", "b"]
        .iter()
        .map(|r| {
            (
                r.to_string(),
                Daemon::start(&config(&redis.url(), r, &settings(r))),
            )
        })
        .collect();
    let mut con = redis.connection();
    wait_until(Duration::from_secs(20), "both replicas reading", || {
        let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut con).unwrap();
        list.lines()
            .filter(|l| l.contains("name=streamworker:billing:") && l.contains("cmd=xreadgroup"))
            .count()
            == 2
    });
    produce(&mut con, "orders", &[vec![("order", "1".to_owned())]]);
    wait_until(Duration::from_secs(10), "the first attempt", || {
        hook.count() == 1
    });
    let first = hook.hits()[0].clone();
    // Kill the replica that failed it, during its backoff: once the failure is parked.
    // (Killed before that, the replica still owns the entry, and it is reclaimed after
    // claim_idle like any entry of a dead replica.)
    wait_until(Duration::from_secs(5), "the failure parked", || {
        pending_of(&mut con, "orders", "billing", "streamworker:backoff") == 1
    });
    replicas.get_mut(&first.path).unwrap().kill();
    wait_until(Duration::from_secs(10), "the retry", || hook.count() == 2);
    let retry = hook.hits()[1].clone();
    assert_ne!(retry.path, first.path, "the surviving replica retried");
    assert_eq!(retry.delivery_count, 2);
    let gap = retry.at - first.at;
    // Backoff with jitter, one claim_interval, and slack for a loaded machine; far below
    // claim_idle.
    let most =
        Duration::from_millis(1500).mul_f64(1.2) + Duration::from_secs(1) + Duration::from_secs(2);
    assert!(
        gap >= Duration::from_millis(1500) && gap <= most,
        "retry after {gap:?}, expected within [1.5s, {most:?}]"
    );
    wait_until(Duration::from_secs(10), "nothing pending", || {
        group_info(&mut con, "orders", "billing").map(|(p, _)| p) == Some(0)
    });
}

#[test]
fn permanent_failures_dead_letter_at_once_retryable_ones_retry_and_drops_are_acknowledged() {
    let redis = RedisServer::start();
    let hook = WebhookServer::start_with(|hit| match hit.body["fields"]["kind"].as_str() {
        Some("bad-request") => (400, Duration::ZERO),
        Some("flaky") if hit.delivery_count == 1 => (503, Duration::ZERO),
        Some("not-mine") => (webhook::DROP, Duration::ZERO), // 200 with X-Streamworker-Drop
        _ => (200, Duration::ZERO),
    });
    let extra = r#"retry_backoff = { initial = "200ms", max = "1s" }"#;
    let (cfg, http) = config_with_http(&redis.url(), "r1", &group(&hook.url("r1"), extra));
    let _daemon = Daemon::start(&cfg);
    let mut con = redis.connection();
    let kinds = ["bad-request", "flaky", "not-mine", "fine"];
    let ids = produce(
        &mut con,
        "orders",
        &kinds
            .iter()
            .map(|k| vec![("kind", k.to_string())])
            .collect::<Vec<_>>(),
    );
    wait_until(Duration::from_secs(20), "every entry settled", || {
        group_info(&mut con, "orders", "billing") == Some((0, Some(0)))
    });
    let attempts = |id: &str| hook.hits().iter().filter(|h| h.id == id).count();
    assert_eq!(attempts(&ids[0]), 1, "a 400 is not retried");
    assert_eq!(attempts(&ids[1]), 2, "a 503 is retried");
    assert_eq!(attempts(&ids[2]), 1);
    let dead = dead_letters(&mut con);
    assert_eq!(dead.len(), 1, "only the 400 is dead-lettered: {dead:?}");
    assert_eq!(dead[0]["dlq_origin_id"], ids[0]);
    assert_eq!(dead[0]["dlq_deliveries"], "1");
    assert!(dead[0]["dlq_error"].contains("400"));
    wait_until(Duration::from_secs(10), "the counters", || {
        let (_, text) = http_get(&http, "/metrics").unwrap();
        let count = |outcome: &str| {
            metric(
                &text,
                "streamworker_entries_total",
                &[("group", "billing"), ("outcome", outcome)],
            )
        };
        count("acked") == Some(2.0)
            && count("dropped") == Some(1.0)
            && count("dead_lettered") == Some(1.0)
            && count("retried") == Some(1.0)
    });
}

#[test]
fn replicas_reclaiming_the_same_idle_entries_never_run_one_delivery_twice() {
    let redis = RedisServer::start();
    // Handlers run just under handler_timeout (1.5 s); claim_idle is 2 s.
    let hook = WebhookServer::start_with(|_| (200, Duration::from_millis(1400)));
    let mut con = redis.connection();
    create_group(&mut con, "orders", "billing", "0");
    let ids = produce(
        &mut con,
        "orders",
        &(0..60)
            .map(|i| vec![("n", i.to_string())])
            .collect::<Vec<_>>(),
    );
    // A consumer that died holding every entry.
    read_as(&mut con, "orders", "billing", "ghost", 100);
    let g = r#"
[groups.billing]
stream = "orders"
handler = "webhook"
block = "500ms"
concurrency = 10
batch_size = 10
handler_timeout = "1500ms"
claim_idle = "2s"
consumer_ttl = "1m"
retry_backoff = { initial = "100ms", max = "1s" }
[groups.billing.options]
url = "URL"
timeout = "1500ms"
"#;
    let _replicas: Vec<Daemon> = ["a", "b"]
        .iter()
        .map(|r| Daemon::start(&config(&redis.url(), r, &g.replace("URL", &hook.url(r)))))
        .collect();
    wait_until(Duration::from_secs(60), "every entry handled", || {
        let handled = hook.handled();
        ids.iter().all(|id| handled.contains_key(id))
    });
    wait_until(Duration::from_secs(10), "nothing pending", || {
        group_info(&mut con, "orders", "billing").map(|(p, _)| p) == Some(0)
    });
    let mut seen = HashSet::new();
    for hit in hook.hits() {
        assert!(
            seen.insert((hit.id.clone(), hit.delivery_count)),
            "{} was handed out twice with delivery count {}",
            hit.id,
            hit.delivery_count
        );
    }
    let by_replica = |r: &str| hook.hits().iter().filter(|h| h.path == r).count();
    eprintln!(
        "reclaimed 60 entries: a handled {}, b handled {}",
        by_replica("a"),
        by_replica("b")
    );
}

#[test]
fn an_entry_trimmed_while_pending_is_acknowledged_counted_and_not_retried() {
    let redis = RedisServer::start();
    let hook = WebhookServer::start_with(|_| (503, Duration::ZERO));
    let extra = r#"retry_backoff = { initial = "1s", max = "1s", jitter = 0.0 }"#;
    let (cfg, http) = config_with_http(&redis.url(), "r1", &group(&hook.url("r1"), extra));
    let daemon = Daemon::start(&cfg);
    let mut con = redis.connection();
    let ids = produce(&mut con, "orders", &[vec![("n", "1".to_owned())]]);
    wait_until(
        Duration::from_secs(10),
        "the entry parked for its backoff",
        || {
            hook.count() == 1
                && pending_of(&mut con, "orders", "billing", "streamworker:backoff") == 1
        },
    );
    // While it waits out its backoff, the entry disappears from the stream.
    let deleted: u64 = redis::cmd("XDEL")
        .arg("orders")
        .arg(&ids[0])
        .query(&mut con)
        .unwrap();
    assert_eq!(deleted, 1);
    wait_until(Duration::from_secs(10), "the deletion counted", || {
        entries_total(&http, &[("outcome", "deleted")]) == 1.0
    });
    assert_eq!(
        group_info(&mut con, "orders", "billing").map(|(p, _)| p),
        Some(0),
        "nothing pending"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(hook.count(), 1, "never handed to the handler again");
    let logs = daemon.logs();
    assert_eq!(
        logs.matches("deleted or trimmed from the stream while pending")
            .count(),
        1,
        "{logs}"
    );
}

/// The same, but the entry disappears while its handler runs: parking it for a retry
/// finds it gone, and it is counted then.
#[test]
fn an_entry_deleted_while_its_handler_runs_is_counted_when_parked() {
    let redis = RedisServer::start();
    let url = redis.url();
    let hook = WebhookServer::start_with(move |hit| {
        let mut con = redis::Client::open(url.as_str())
            .unwrap()
            .get_connection()
            .unwrap();
        let _: u64 = redis::cmd("XDEL")
            .arg("orders")
            .arg(&hit.id)
            .query(&mut con)
            .unwrap();
        (503, Duration::ZERO)
    });
    let extra = r#"retry_backoff = { initial = "1s", max = "1s", jitter = 0.0 }"#;
    let (cfg, http) = config_with_http(&redis.url(), "r1", &group(&hook.url("r1"), extra));
    let daemon = Daemon::start(&cfg);
    let mut con = redis.connection();
    produce(&mut con, "orders", &[vec![("n", "1".to_owned())]]);
    wait_until(Duration::from_secs(10), "the deletion counted", || {
        entries_total(&http, &[("outcome", "deleted")]) == 1.0
    });
    assert_eq!(
        group_info(&mut con, "orders", "billing").map(|(p, _)| p),
        Some(0)
    );
    assert_eq!(
        entries_total(&http, &[("outcome", "retried")]),
        0.0,
        "a deleted entry is not parked for a retry"
    );
    assert_eq!(hook.count(), 1);
    assert!(
        daemon
            .logs()
            .contains("deleted or trimmed from the stream while pending"),
        "{}",
        daemon.logs()
    );
}

#[test]
fn the_circuit_opens_when_the_endpoint_is_down_and_nothing_is_dead_lettered() {
    let redis = RedisServer::start();
    let hook = WebhookServer::start_with(|_| (503, Duration::ZERO));
    let extra = r#"max_deliveries = 3
retry_backoff = { initial = "200ms", max = "1s" }
circuit_breaker = { threshold = 3, pause = "500ms" }"#;
    let cfg = config(&redis.url(), "r1", &group(&hook.url("r1"), extra));
    let daemon = Daemon::start(&cfg);
    let mut con = redis.connection();
    let ids = produce(
        &mut con,
        "orders",
        &(0..20)
            .map(|i| vec![("n", i.to_string())])
            .collect::<Vec<_>>(),
    );
    daemon.wait_for_log(Duration::from_secs(10), "circuit opened");

    // While the endpoint stays down, attempts stop climbing: measured over probe cycles
    // (each a failed probe after a 500 ms pause), once the circuit has settled into them.
    let probes = || {
        daemon
            .logs()
            .matches("probe failed; circuit open again")
            .count()
    };
    wait_until(Duration::from_secs(15), "two failed probes", || {
        probes() >= 2
    });
    let before = delivery_counts(&mut con, "orders", "billing");
    let (code, status, _) = run_cli(&["status", "-c", daemon.config_path.to_str().unwrap()], &[]);
    assert_eq!(code, 0);
    assert!(
        status.contains("r1:open") || status.contains("r1:half_open"),
        "status shows the circuit:\n{status}"
    );
    let seen = probes();
    wait_until(Duration::from_secs(15), "four more failed probes", || {
        probes() >= seen + 4
    });
    let after = delivery_counts(&mut con, "orders", "billing");
    let max_before = before.values().copied().max().unwrap_or(0);
    let max_after = after.values().copied().max().unwrap_or(0);
    assert!(
        max_after <= max_before.max(2),
        "attempts kept climbing: {max_before} → {max_after}"
    );
    assert!(max_after < 3, "no entry is near max_deliveries: {after:?}");
    assert!(dead_letters(&mut con).is_empty());
    let calls_while_open = hook.count();
    // 20 first attempts (a few retries among them), then one call per probe.
    assert!(
        calls_while_open <= 40,
        "{calls_while_open} calls while the circuit was open"
    );

    // The endpoint comes back: everything is handled, nothing dead-lettered.
    hook.set_responder(|_| (200, Duration::ZERO));
    wait_until(Duration::from_secs(30), "every entry handled", || {
        let handled = hook.handled();
        ids.iter().all(|id| handled.contains_key(id))
    });
    wait_until(Duration::from_secs(10), "nothing pending", || {
        group_info(&mut con, "orders", "billing") == Some((0, Some(0)))
    });
    assert!(dead_letters(&mut con).is_empty(), "nothing dead-lettered");
    daemon.wait_for_log(Duration::from_secs(5), "circuit closed");
    eprintln!("{calls_while_open} calls reached the endpoint while it was down (20 entries)");
}
