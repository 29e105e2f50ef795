//! Partitioned groups (docs/partitions.md): replicas share a group's partitions, each run by
//! exactly one replica at a time; a replica joining takes its share; a SIGKILLed replica's
//! partitions are taken over once their leases expire, with nothing lost; a SIGTERMed
//! replica hands its partitions over at once.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::support::topology::Cluster;
use crate::support::*;

/// Added to every upper bound on a duration: the suite runs on a loaded 2-core machine.
const SLACK: Duration = Duration::from_secs(3);
const PARTITIONS: u32 = 8;

fn group(lease: &str) -> String {
    format!(
        r#"
[groups.billing]
stream = "orders"
handler = "noop"
partitions = {PARTITIONS}
partition_lease = "{lease}"
handler_timeout = "1s"
claim_idle = "3s"
block = "200ms"
"#
    )
}

fn lease_key(p: u32) -> String {
    format!("streamworker:partition:{{orders:p{p}}}:billing")
}

/// Each partition's lease holder (`None`: nobody).
fn owners(con: &mut redis::Connection) -> Vec<Option<String>> {
    (0..PARTITIONS)
        .map(|p| {
            redis::cmd("GET")
                .arg(lease_key(p))
                .query(con)
                .expect("GET lease")
        })
        .collect()
}

/// How many partitions each replica holds, when every partition is held.
fn shares(con: &mut redis::Connection) -> Option<BTreeMap<String, u32>> {
    let mut shares = BTreeMap::new();
    for owner in owners(con) {
        *shares.entry(owner?).or_insert(0) += 1;
    }
    Some(shares)
}

fn wait_for_shares(con: &mut redis::Connection, want: &[(&str, u32)], timeout: Duration) {
    let want: BTreeMap<String, u32> = want.iter().map(|(c, n)| (c.to_string(), *n)).collect();
    let mut last = None;
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        last = shares(con);
        if last.as_ref() == Some(&want) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("partitions not shared as {want:?} within {timeout:?}; last seen {last:?}");
}

/// Adds `n` entries spread over the partitions by the partition function producers use.
fn produce_keyed(con: &mut redis::Connection, from: usize, n: usize) {
    for i in from..from + n {
        let key = format!("customer-{i}");
        let p = streamworker::partition::partition_of(key.as_bytes(), PARTITIONS);
        let stream = streamworker::partition::partition_stream("orders", p);
        let _: String = redis::cmd("XADD")
            .arg(&stream)
            .arg("*")
            .arg("key")
            .arg(&key)
            .query(con)
            .expect("XADD");
    }
}

/// Every entry of every partition acknowledged: nothing pending, nothing undelivered.
fn wait_all_handled(con: &mut redis::Connection, timeout: Duration) {
    wait_until(timeout, "every partition's entries acknowledged", || {
        (0..PARTITIONS).all(|p| {
            let stream = streamworker::partition::partition_stream("orders", p);
            matches!(group_info(con, &stream, "billing"), Some((0, Some(0))))
        })
    });
}

fn entries_in_partitions(con: &mut redis::Connection) -> u64 {
    (0..PARTITIONS)
        .map(|p| {
            let stream = streamworker::partition::partition_stream("orders", p);
            redis::cmd("XLEN").arg(&stream).query::<u64>(con).unwrap()
        })
        .sum()
}

#[test]
fn replicas_share_the_partitions_and_a_joining_replica_takes_its_share() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let url = redis.url();
    let group = group("3s");
    let (a_config, a_http) = config_with_http(&url, "a", &group);
    let a = Daemon::start(&a_config);
    let _b = Daemon::start(&config(&url, "b", &group));
    let _c = Daemon::start(&config(&url, "c", &group));
    // 8 over 3 replicas sorted by name: 3, 3, 2; each partition has exactly one holder.
    wait_for_shares(
        &mut con,
        &[("a", 3), ("b", 3), ("c", 2)],
        Duration::from_secs(15) + SLACK,
    );
    produce_keyed(&mut con, 0, 400);
    assert_eq!(entries_in_partitions(&mut con), 400);
    wait_all_handled(&mut con, Duration::from_secs(10) + SLACK);
    // Each partition was read by its holder only, once the shares had settled.
    for (p, owner) in owners(&mut con).into_iter().enumerate() {
        let stream = streamworker::partition::partition_stream("orders", p as u32);
        let owner = owner.expect("held");
        let readers: Vec<redis::Value> = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(&stream)
            .arg("billing")
            .query(&mut con)
            .unwrap();
        assert!(
            readers
                .into_iter()
                .map(value_map)
                .any(|c| c["name"] == owner),
            "partition {p}'s holder {owner} never read it"
        );
    }

    // `status` shows every partition with its owner, lag and pending, in text and JSON.
    let path = a.config_path.to_str().unwrap();
    let (code, out, err) = run_cli(&["status", "-c", path, "--json"], &[]);
    assert_eq!(code, 0, "{err}");
    let reports: serde_json::Value = serde_json::from_str(&out).expect(&out);
    let holders = owners(&mut con);
    for p in 0..PARTITIONS {
        let stream = streamworker::partition::partition_stream("orders", p);
        let report = reports
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["stream"] == stream.as_str())
            .unwrap_or_else(|| panic!("no report of {stream}: {out}"));
        let g = &report["groups"][0];
        assert_eq!(g["group"], "billing");
        assert_eq!(
            (g["lag"].as_u64(), g["pending"].as_u64()),
            (Some(0), Some(0))
        );
        assert_eq!(g["partition"]["partition"], p);
        assert_eq!(g["partition"]["partitions"], PARTITIONS);
        assert_eq!(g["partition"]["stream"], "orders");
        assert_eq!(
            g["partition"]["owner"].as_str(),
            holders[p as usize].as_deref(),
            "{out}"
        );
    }
    let (code, out, err) = run_cli(&["status", "-c", path], &[]);
    assert_eq!(code, 0, "{err}");
    let line = format!(
        "billing: partition 5 of 8 of stream orders, owner {}",
        holders[5].as_deref().unwrap()
    );
    assert!(out.contains(&line), "{out}");
    // Metrics: how many partitions a replica runs, and each partition's stream as a label.
    wait_until(Duration::from_secs(10), "a's partition metrics", || {
        let Some((200, text)) = http_get(&a_http, "/metrics") else {
            return false;
        };
        metric(
            &text,
            "streamworker_partitions_owned",
            &[("group", "billing")],
        ) == Some(3.0)
            && (0..PARTITIONS).all(|p| {
                let stream = streamworker::partition::partition_stream("orders", p);
                metric(
                    &text,
                    "streamworker_group_lag",
                    &[("stream", &stream), ("group", "billing")],
                ) == Some(0.0)
            })
    });

    let _d = Daemon::start(&config(&url, "d", &group));
    wait_for_shares(
        &mut con,
        &[("a", 2), ("b", 2), ("c", 2), ("d", 2)],
        Duration::from_secs(10) + SLACK,
    );
    produce_keyed(&mut con, 400, 400);
    wait_all_handled(&mut con, Duration::from_secs(10) + SLACK);
}

#[test]
fn a_killed_replicas_partitions_are_taken_over_within_a_lease_and_nothing_is_lost() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let url = redis.url();
    let lease = Duration::from_secs(3);
    let group = group("3s");
    let a = Daemon::start(&config(&url, "a", &group));
    let mut b = Daemon::start(&config(&url, "b", &group));
    wait_for_shares(
        &mut con,
        &[("a", 4), ("b", 4)],
        Duration::from_secs(15) + SLACK,
    );
    produce_keyed(&mut con, 0, 300);
    b.kill();
    let killed = Instant::now();
    produce_keyed(&mut con, 300, 300);
    // b's leases expire at most a lease after the kill; a takes them at its next turn (a
    // third of a lease) after that.
    wait_for_shares(&mut con, &[("a", 8)], lease + lease / 3 + SLACK);
    let took = killed.elapsed();
    assert!(
        took >= lease / 2,
        "partitions were taken over after {took:?}, before b's leases could expire"
    );
    // Whatever b had fetched and not acknowledged is reclaimed after claim_idle.
    wait_all_handled(&mut con, Duration::from_secs(10) + SLACK);
    assert_eq!(entries_in_partitions(&mut con), 600);
    assert!(a.logs().contains("partition taken"), "{}", a.logs());
}

#[test]
fn a_terminated_replica_hands_its_partitions_over_at_once() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let url = redis.url();
    // A long lease: a hand-over that waited for expiry would take 9 s.
    let lease = Duration::from_secs(9);
    let group = group("9s");
    let _a = Daemon::start(&config(&url, "a", &group));
    let mut b = Daemon::start(&config(&url, "b", &group));
    wait_for_shares(
        &mut con,
        &[("a", 4), ("b", 4)],
        Duration::from_secs(30) + SLACK,
    );
    produce_keyed(&mut con, 0, 200);
    wait_all_handled(&mut con, Duration::from_secs(10) + SLACK);
    b.terminate();
    let status = b
        .wait(Duration::from_secs(10) + SLACK)
        .unwrap_or_else(|| panic!("b did not exit:\n{}", b.logs()));
    assert!(status.success(), "{status:?}\n{}", b.logs());
    let exited = Instant::now();
    // b deleted its leases and left the members before exiting.
    assert!(
        owners(&mut con).iter().all(|o| o.as_deref() != Some("b")),
        "b exited still holding {:?}",
        owners(&mut con)
    );
    let members: Vec<String> = redis::cmd("ZRANGE")
        .arg("streamworker:members:{orders}:billing")
        .arg(0)
        .arg(-1)
        .query(&mut con)
        .unwrap();
    assert_eq!(members, ["a"]);
    // a takes them at its next turn (a third of the lease), not after the lease.
    wait_for_shares(&mut con, &[("a", 8)], lease / 3 + SLACK);
    assert!(exited.elapsed() < lease, "took {:?}", exited.elapsed());
    produce_keyed(&mut con, 200, 200);
    wait_all_handled(&mut con, Duration::from_secs(10) + SLACK);
}

/// The port of the primary serving `key`'s slot.
fn primary_of(con: &mut redis::cluster::ClusterConnection, key: &str) -> i64 {
    let slot: i64 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query(con)
        .unwrap();
    let ranges: Vec<redis::Value> = redis::cmd("CLUSTER").arg("SLOTS").query(con).unwrap();
    ranges
        .into_iter()
        .find_map(|r| match r {
            redis::Value::Array(p) => match (&p[0], &p[1], &p[2]) {
                (redis::Value::Int(a), redis::Value::Int(b), redis::Value::Array(node))
                    if (*a..=*b).contains(&slot) =>
                {
                    match node.get(1) {
                        Some(redis::Value::Int(port)) => Some(*port),
                        _ => None,
                    }
                }
                _ => None,
            },
            _ => None,
        })
        .expect("a primary serves every slot")
}

#[test]
fn on_a_cluster_partitions_spread_over_the_primaries_and_each_dead_letters_in_its_slot() {
    let cluster = Cluster::start();
    let hook = WebhookServer::start_with(|hit| {
        if hit.body["fields"]["kind"] == "poison" {
            (400, Duration::ZERO)
        } else {
            (200, Duration::ZERO)
        }
    });
    let group = format!(
        r#"
[groups.billing]
stream = "orders"
handler = "webhook"
partitions = {PARTITIONS}
partition_lease = "3s"
handler_timeout = "1s"
claim_idle = "3s"
block = "500ms"
retry_backoff = {{ initial = "100ms", max = "1s" }}
[groups.billing.options]
url = "{}"
timeout = "1s"
"#,
        hook.url("billing")
    );
    let with_cluster = |consumer: &str| {
        let text = config("unused", consumer, &group);
        let start = text.find("[redis]").unwrap();
        let end = text.find("[worker]").unwrap();
        format!(
            "{}[redis]\ncluster = {:?}\ncommand_timeout = \"2s\"\nconnect_timeout = \"1s\"\n\n{}",
            &text[..start],
            cluster.urls(),
            &text[end..]
        )
    };
    let mut con = cluster.connection();
    // The premise: the partitions' streams live on every primary.
    let primaries: std::collections::HashSet<i64> = (0..PARTITIONS)
        .map(|p| {
            primary_of(
                &mut con,
                &streamworker::partition::partition_stream("orders", p),
            )
        })
        .collect();
    assert_eq!(
        primaries.len(),
        3,
        "the partitions hash to all three primaries"
    );
    let _a = Daemon::start(&with_cluster("a"));
    let _b = Daemon::start(&with_cluster("b"));
    let held = |con: &mut redis::cluster::ClusterConnection| -> BTreeMap<String, u32> {
        let mut shares = BTreeMap::new();
        for p in 0..PARTITIONS {
            let owner: Option<String> = redis::cmd("GET").arg(lease_key(p)).query(con).unwrap();
            if let Some(owner) = owner {
                *shares.entry(owner).or_insert(0) += 1;
            }
        }
        shares
    };
    let want: BTreeMap<String, u32> = [("a".to_string(), 4), ("b".to_string(), 4)].into();
    wait_until(
        Duration::from_secs(20) + SLACK,
        "a and b hold 4 each",
        || held(&mut con) == want,
    );
    // One poison entry per partition, among 50 good ones each.
    let mut produced = 0;
    for p in 0..PARTITIONS {
        let stream = streamworker::partition::partition_stream("orders", p);
        for i in 0..51 {
            let kind = if i == 25 { "poison" } else { "fine" };
            let _: String = redis::cmd("XADD")
                .arg(&stream)
                .arg("*")
                .arg("kind")
                .arg(kind)
                .query(&mut con)
                .unwrap();
            produced += 1;
        }
    }
    wait_until(
        Duration::from_secs(60),
        "every entry handed to the webhook",
        || hook.hits().len() >= produced,
    );
    for p in 0..PARTITIONS {
        let stream = streamworker::partition::partition_stream("orders", p);
        // Dead letters stay in the partition's slot (and node).
        let dlq = format!("{{orders:p{p}}}:dlq:billing");
        assert_eq!(primary_of(&mut con, &dlq), primary_of(&mut con, &stream));
        wait_until(
            Duration::from_secs(20),
            "the poison entry dead-lettered, nothing pending",
            || {
                let len: u64 = redis::cmd("XLEN").arg(&dlq).query(&mut con).unwrap_or(0);
                let pending: Vec<redis::Value> = redis::cmd("XPENDING")
                    .arg(&stream)
                    .arg("billing")
                    .query(&mut con)
                    .unwrap();
                len == 1 && matches!(pending.first(), Some(redis::Value::Int(0)))
            },
        );
    }
}

#[test]
fn a_replica_stops_a_partition_whose_lease_it_lost_or_cannot_renew() {
    let redis = RedisServer::start_with(&["--enable-debug-command", "yes"]);
    let mut con = redis.connection();
    let url = redis.url();
    let a = Daemon::start(&config(&url, "a", &group("3s")));
    wait_for_shares(&mut con, &[("a", 8)], Duration::from_secs(15) + SLACK);

    // Fencing: Redis stops answering for most of a lease. Renewals time out, and a stops
    // reading its partitions before the leases can expire; once Redis answers again it
    // takes them back and handles what came meanwhile.
    let sleeper = {
        let mut con = redis.connection();
        std::thread::spawn(move || {
            let _: redis::RedisResult<()> =
                redis::cmd("DEBUG").arg("SLEEP").arg(2.5).query(&mut con);
        })
    };
    sleeper.join().unwrap();
    a.wait_for_log(
        Duration::from_secs(5),
        "the partition's lease could not be renewed and may expire; stopping the partition",
    );
    produce_keyed(&mut con, 0, 200);
    wait_for_shares(&mut con, &[("a", 8)], Duration::from_secs(10) + SLACK);
    wait_all_handled(&mut con, Duration::from_secs(10) + SLACK);

    // Another holder of partition 0's lease (an operator, a replica that saw it expire): a
    // stops reading the partition at its next renewal and leaves the lease alone.
    let _: () = redis::cmd("SET")
        .arg(lease_key(0))
        .arg("intruder")
        .arg("PX")
        .arg(60_000)
        .query(&mut con)
        .unwrap();
    a.wait_for_log(
        Duration::from_secs(5),
        "another replica holds this partition's lease now; stopping the partition",
    );
    // Give the partition's loop time to drain and stop.
    std::thread::sleep(Duration::from_secs(2));
    let p0 = streamworker::partition::partition_stream("orders", 0);
    let p1 = streamworker::partition::partition_stream("orders", 1);
    for stream in [&p0, &p1] {
        let _: String = redis::cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg("k")
            .arg("v")
            .query(&mut con)
            .unwrap();
    }
    wait_until(Duration::from_secs(5), "partition 1 still handled", || {
        group_info(&mut con, &p1, "billing") == Some((0, Some(0)))
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        group_info(&mut con, &p0, "billing"),
        Some((0, Some(1))),
        "partition 0 was read though another replica holds it"
    );
    let holder: String = redis::cmd("GET").arg(lease_key(0)).query(&mut con).unwrap();
    assert_eq!(holder, "intruder");
}

#[test]
fn pause_stops_every_partition_and_resume_restarts_them() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let a = Daemon::start(&config(&redis.url(), "a", &group("3s")));
    wait_for_shares(&mut con, &[("a", 8)], Duration::from_secs(15) + SLACK);
    let path = a.config_path.to_str().unwrap();
    let (code, out, err) = run_cli(&["pause", "-c", path, "--group", "billing"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    // Every replica stops reading within claim_interval (200 ms here).
    std::thread::sleep(Duration::from_secs(1));
    produce_keyed(&mut con, 0, 100);
    std::thread::sleep(Duration::from_secs(2));
    let undelivered: u64 = (0..PARTITIONS)
        .map(|p| {
            let stream = streamworker::partition::partition_stream("orders", p);
            group_info(&mut con, &stream, "billing")
                .and_then(|(_, lag)| lag)
                .unwrap_or(0)
        })
        .sum();
    assert_eq!(undelivered, 100, "a paused partition was read");
    let (code, out, err) = run_cli(&["resume", "-c", path, "--group", "billing"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    wait_all_handled(&mut con, Duration::from_secs(10) + SLACK);
}

#[test]
fn consumers_of_a_gone_replica_are_forgotten_on_every_partition() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let url = redis.url();
    let group = format!("{}consumer_ttl = \"4s\"\n", group("3s"));
    let _a = Daemon::start(&config(&url, "a", &group));
    let mut b = Daemon::start(&config(&url, "b", &group));
    wait_for_shares(
        &mut con,
        &[("a", 4), ("b", 4)],
        Duration::from_secs(15) + SLACK,
    );
    produce_keyed(&mut con, 0, 100);
    wait_all_handled(&mut con, Duration::from_secs(10) + SLACK);
    b.kill();
    wait_for_shares(&mut con, &[("a", 8)], Duration::from_secs(5) + SLACK);
    let b_on = |con: &mut redis::Connection| -> Vec<u32> {
        (0..PARTITIONS)
            .filter(|p| {
                let stream = streamworker::partition::partition_stream("orders", *p);
                let consumers: Vec<redis::Value> = redis::cmd("XINFO")
                    .arg("CONSUMERS")
                    .arg(&stream)
                    .arg("billing")
                    .query(con)
                    .unwrap();
                consumers
                    .into_iter()
                    .map(value_map)
                    .any(|c| c["name"] == "b")
            })
            .collect()
    };
    assert!(!b_on(&mut con).is_empty(), "b never read a partition");
    // Idle past consumer_ttl with nothing pending: gone at a's next cleanup (every 10 s).
    wait_until(
        Duration::from_secs(25) + SLACK,
        "b forgotten on every partition",
        || b_on(&mut con).is_empty(),
    );
}

#[test]
fn partitions_run_under_the_documented_acl_user() {
    let user = format!("streamworker >acl-user-pw {}", readme_acl_rules());
    let mut args = vec!["--user".to_owned()];
    args.extend(user.split_whitespace().map(str::to_owned));
    let redis = RedisServer::start_with(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let mut con = redis.connection();
    let _: () = redis::cmd("ACL")
        .arg("LOG")
        .arg("RESET")
        .query(&mut con)
        .unwrap();
    let url = format!(
        "redis://streamworker:acl-user-pw@127.0.0.1:{}/0",
        redis.port
    );
    let a = Daemon::start(&config(&url, "a", &group("3s")));
    let mut b = Daemon::start(&config(&url, "b", &group("3s")));
    wait_for_shares(
        &mut con,
        &[("a", 4), ("b", 4)],
        Duration::from_secs(15) + SLACK,
    );
    produce_keyed(&mut con, 0, 100);
    wait_all_handled(&mut con, Duration::from_secs(10) + SLACK);
    let path = a.config_path.to_str().unwrap();
    let (code, out, err) = run_cli(&["status", "-c", path], &[]);
    assert_eq!(code, 0, "{out}{err}");
    b.terminate();
    b.wait(Duration::from_secs(10) + SLACK)
        .unwrap_or_else(|| panic!("b did not exit:\n{}", b.logs()));
    wait_for_shares(&mut con, &[("a", 8)], Duration::from_secs(2) + SLACK);
    let refused = acl_refusals(&mut con);
    let logs = format!("{}{}", a.logs(), b.logs());
    assert!(
        refused.is_empty(),
        "the documented ACL user was refused:\n{}\n--- log ---\n{logs}",
        refused.join("\n")
    );
    assert!(
        !logs.contains("NOPERM") && !logs.contains("no permissions"),
        "the ACL user lacked a command:\n{logs}"
    );
}
