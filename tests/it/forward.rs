//! `handler = "forward"`: the commerce pipeline's `events.raw` → `events.normalized` step,
//! checked the way a user would: what the target stream holds, what `/metrics` says, and
//! that every source entry appears downstream exactly once even when it is handled twice.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, UNIX_EPOCH};

use crate::support::*;

const RAW: &str = "events.raw";
const NORMALIZED: &str = "events.normalized";

/// The normalize group: raw commerce events (one JSON document in `payload`) become
/// normalized ones; WhatsApp messages are not forwarded.
fn normalize_group(settings: &str) -> String {
    format!(
        r#"
[groups.normalize]
stream = "{RAW}"
handler = "forward"
payload = "json:payload"
{settings}
[groups.normalize.options]
to = "{NORMALIZED}"
filter = {{ event_type = ["purchase", "page_view"] }}
rename = {{ payload = "normalized_payload" }}
drop = ["client_ip"]
extract = {{ profile_id = "customer.profile_id" }}
set = {{ source = "web", normalized_by = "{{group}}", received_at = "{{time}}" }}
max_len = 100000
"#
    )
}

const FAST: &str = r#"block = "500ms"
handler_timeout = "1s"
claim_idle = "2s"
consumer_ttl = "1m"
retry_backoff = { initial = "100ms", max = "1s" }"#;

/// Raw events as the ingestion service writes them; every third one is a WhatsApp
/// message, every fifth has no profile.
fn raw_events(n: usize) -> Vec<Vec<(&'static str, String)>> {
    (0..n)
        .map(|i| {
            let profile = if i.is_multiple_of(5) {
                String::new()
            } else {
                format!(r#""profile_id":"p-{i}""#)
            };
            vec![
                ("event_id", format!("evt-{i}")),
                ("brand_id", format!("b{}", i % 2)),
                (
                    "event_type",
                    ["purchase", "page_view", "whatsapp_message"][i % 3].to_owned(),
                ),
                (
                    "payload",
                    format!(r#"{{"customer":{{{profile}}},"amount":{i}}}"#),
                ),
                ("client_ip", format!("10.0.0.{i}")),
                ("timestamp", format!("2024-12-01T10:00:{:02}Z", i % 60)),
            ]
        })
        .collect()
}

fn passes(i: usize) -> bool {
    i % 3 != 2
}

/// What the normalize group must write for raw event `i` with id `id`.
fn expected(i: usize, id: &str, event: &[(&str, String)]) -> Vec<(String, String)> {
    let value = |name: &str| {
        event
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    let ms: u64 = id.split('-').next().unwrap().parse().unwrap();
    let time = humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms));
    let mut out = vec![
        ("event_id".to_owned(), value("event_id")),
        ("brand_id".to_owned(), value("brand_id")),
        ("event_type".to_owned(), value("event_type")),
        ("normalized_payload".to_owned(), value("payload")),
        ("timestamp".to_owned(), value("timestamp")),
    ];
    if !i.is_multiple_of(5) {
        out.push(("profile_id".into(), format!("p-{i}")));
    }
    out.extend([
        ("normalized_by".into(), "normalize".into()),
        ("received_at".into(), time.to_string()),
        ("source".into(), "web".into()),
        ("source_id".into(), id.to_owned()),
    ]);
    out
}

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

/// `source_id` of every target entry, in order.
fn source_ids(con: &mut redis::Connection) -> Vec<String> {
    entries(con, NORMALIZED)
        .iter()
        .map(|(_, fields)| {
            strings(fields)
                .into_iter()
                .find(|(k, _)| k == "source_id")
                .map(|(_, v)| v)
                .unwrap_or_default()
        })
        .collect()
}

fn xlen(con: &mut redis::Connection, key: &str) -> u64 {
    redis::cmd("XLEN").arg(key).query(con).unwrap_or(0)
}

fn entries_metric(addr: &str, outcome: &str) -> f64 {
    entries_total(
        addr,
        &[
            ("stream", RAW),
            ("group", "normalize"),
            ("outcome", outcome),
        ],
    )
}

#[test]
fn raw_events_become_normalized_ones_in_order_and_filtered_ones_are_dropped() {
    let redis = RedisServer::start();
    let (cfg, http) = config_with_http(&redis.url(), "r1", &normalize_group(FAST));
    let daemon = Daemon::start(&cfg);
    let mut con = redis.connection();
    let events = raw_events(30);
    let ids = produce(&mut con, RAW, &events);
    let forwarded = (0..30).filter(|&i| passes(i)).count();

    wait_until(Duration::from_secs(10), "every raw event settled", || {
        group_info(&mut con, RAW, "normalize") == Some((0, Some(0)))
            && entries_metric(&http, "forwarded") as usize == forwarded
            && entries_metric(&http, "dropped") as usize == 30 - forwarded
    });
    let target = entries(&mut con, NORMALIZED);
    let want: Vec<Vec<(String, String)>> = (0..30)
        .filter(|&i| passes(i))
        .map(|i| expected(i, &ids[i], &events[i]))
        .collect();
    let got: Vec<Vec<(String, String)>> = target.iter().map(|(_, f)| strings(f)).collect();
    assert_eq!(
        got.len(),
        want.len(),
        "one target entry per forwarded event:\n{}",
        daemon.logs()
    );
    // Forwarded in source order by one replica; compare as sets anyway, since concurrent
    // handlers may settle out of order.
    let by_source: HashMap<String, Vec<(String, String)>> = got
        .into_iter()
        .map(|f| (f.last().unwrap().1.clone(), f))
        .collect();
    for fields in &want {
        let id = &fields.last().unwrap().1;
        assert_eq!(by_source.get(id), Some(fields), "target entry for {id}");
    }
    assert_eq!(
        entries_metric(&http, "acked"),
        0.0,
        "every ack was counted as forwarded or dropped"
    );
    assert_eq!(entries_metric(&http, "dead_lettered"), 0.0);
}

/// Consumers of `group` whose read connection is blocked in XREADGROUP with most of its
/// `block` still ahead.
fn read_blocked(con: &mut redis::Connection, group: &str, consumer: &str) -> bool {
    let list: String = redis::cmd("CLIENT").arg("LIST").query(con).unwrap();
    list.lines().any(|l| {
        l.contains(&format!("name=streamworker:{group}:{consumer}"))
            && l.contains("cmd=xreadgroup")
            && l.contains(" flags=b ")
            && l.split(' ').any(|f| f == "idle=0" || f == "idle=1")
    })
}

#[test]
fn entries_handled_twice_appear_downstream_once() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(format!("127.0.0.1:{}", redis.port).parse().unwrap());
    let events = raw_events(24);
    let (mut a, ids) = a_handles_with_its_acks_held(&redis, &proxy, &events, &[]);
    // Held commands die with a.
    a.kill();

    let mut con = redis.connection();
    let (b_cfg, b_http) = config_with_http(&redis.url(), "b", &normalize_group(FAST));
    let b = Daemon::start(&b_cfg);
    let forwarded = (0..24).filter(|&i| passes(i)).count();
    wait_until(
        Duration::from_secs(15),
        "b to settle every entry again",
        || {
            group_info(&mut con, RAW, "normalize") == Some((0, Some(0)))
                && entries_metric(&b_http, "forwarded") as usize == forwarded
        },
    );
    // a is dead (its held commands died with it) and b has settled every entry: each
    // forward's XADD ran in the script that acknowledged it, so nothing can arrive late.
    let reclaimed = http_get(&b_http, "/metrics")
        .and_then(|(_, body)| {
            metric(
                &body,
                "streamworker_reclaimed_total",
                &[("group", "normalize")],
            )
        })
        .unwrap_or(0.0);
    assert_eq!(reclaimed, 24.0, "b handled a's entries as redeliveries");
    let downstream = source_ids(&mut con);
    let unique: HashSet<&String> = downstream.iter().collect();
    assert_eq!(
        unique.len(),
        downstream.len(),
        "a source entry appears twice downstream: {downstream:?}\n{}",
        b.logs()
    );
    let want: HashSet<&String> = (0..24).filter(|&i| passes(i)).map(|i| &ids[i]).collect();
    assert_eq!(unique, want);
    assert_eq!(entries_metric(&b_http, "dropped") as usize, 24 - forwarded);
}

#[test]
fn a_late_acknowledgement_after_a_reclaim_forwards_nothing_again() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(format!("127.0.0.1:{}", redis.port).parse().unwrap());
    let events = raw_events(12);
    let (a, ids) = a_handles_with_its_acks_held(
        &redis,
        &proxy,
        &events,
        &[("RUST_LOG", "info,streamworker::consumer=debug")],
    );
    // a is alive but silent: b reclaims and forwards everything first.
    let mut con = redis.connection();
    let _b = Daemon::start(&config(&redis.url(), "b", &normalize_group(FAST)));
    let forwarded = (0..12).filter(|&i| passes(i)).count();
    wait_until(Duration::from_secs(15), "b to forward a's entries", || {
        group_info(&mut con, RAW, "normalize") == Some((0, Some(0)))
            && xlen(&mut con, NORMALIZED) as usize == forwarded
    });
    // Now a's acknowledgements (with their XADDs) reach Redis, after b's.
    proxy.hold_requests(false);
    // One line per forwarded entry, each logged after Redis answered its script (which
    // would have added the XADD): once all are there, nothing of a's is still on its way.
    wait_until(
        Duration::from_secs(10),
        "a to learn each forward was settled by b",
        || {
            a.logs()
                .matches("already acknowledged by another consumer")
                .count()
                >= forwarded
        },
    );
    let downstream = source_ids(&mut con);
    let want: HashSet<&String> = (0..12).filter(|&i| passes(i)).map(|i| &ids[i]).collect();
    let got: HashSet<&String> = downstream.iter().collect();
    assert_eq!(
        downstream.len(),
        forwarded,
        "each entry once:\n{}",
        a.logs()
    );
    assert_eq!(got, want);
}

/// Starts replica a through `proxy`, lets it handle `events` (added in one transaction to
/// its blocked read) and holds everything it sends afterwards, its acknowledgements and
/// their XADDs included. Returns a and the ids.
fn a_handles_with_its_acks_held(
    redis: &RedisServer,
    proxy: &Proxy,
    events: &[Vec<(&str, String)>],
    env: &[(&str, &str)],
) -> (Daemon, Vec<String>) {
    let a_settings = FAST.replace("block = \"500ms\"", "block = \"8s\"");
    let (a_cfg, a_http) = config_with_http(&proxy.url(), "a", &normalize_group(&a_settings));
    let a = Daemon::start_with_env(&a_cfg, env);
    let mut con = redis.connection();
    wait_until(Duration::from_secs(20), "a's read to block", || {
        read_blocked(&mut con, "normalize", "a")
    });
    proxy.hold_requests(true);
    // One transaction, so the blocked read is served all of them at once.
    let mut tx = redis::pipe();
    tx.atomic();
    for fields in events {
        let cmd = tx.cmd("XADD").arg(RAW).arg("*");
        for (k, v) in fields {
            cmd.arg(*k).arg(v);
        }
    }
    let ids: Vec<String> = tx.query(&mut con).unwrap();
    let n = events.len() as u64;
    wait_until(Duration::from_secs(5), "the entries delivered to a", || {
        pending_of(&mut con, RAW, "normalize", "a") == n
    });
    wait_until(Duration::from_secs(5), "a to handle them all", || {
        http_get(&a_http, "/metrics")
            .and_then(|(_, body)| {
                metric(
                    &body,
                    "streamworker_handler_seconds_count",
                    &[("group", "normalize")],
                )
            })
            .unwrap_or(0.0)
            == n as f64
    });
    // Long enough for a to have sent its acknowledgement into the proxy.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(xlen(&mut con, NORMALIZED), 0, "a's forwards are held");
    assert_eq!(pending_of(&mut con, RAW, "normalize", "a"), n);
    (a, ids)
}

#[test]
fn a_webhook_group_on_the_target_sees_each_forwarded_event_once() {
    let redis = RedisServer::start();
    let hook = WebhookServer::start();
    let billing = |url: &str| {
        format!(
            r#"
[groups.billing]
stream = "{NORMALIZED}"
handler = "webhook"
{FAST}
[groups.billing.options]
url = "{url}"
timeout = "1s"
"#
        )
    };
    let _replicas: Vec<Daemon> = ["r1", "r2"]
        .iter()
        .map(|r| {
            let groups = normalize_group(FAST) + &billing(&hook.url(r));
            Daemon::start(&config(&redis.url(), r, &groups))
        })
        .collect();
    let mut con = redis.connection();
    let events = raw_events(60);
    let ids = produce(&mut con, RAW, &events);
    let forwarded = (0..60).filter(|&i| passes(i)).count();
    wait_until(
        Duration::from_secs(15),
        "billing to see every forwarded event",
        || {
            // normalize idle first: no forward can come after, so billing idle after it
            // means every forwarded event was handled (a duplicate would have been too).
            hook.handled().len() == forwarded
                && group_info(&mut con, RAW, "normalize") == Some((0, Some(0)))
                && group_info(&mut con, NORMALIZED, "billing") == Some((0, Some(0)))
        },
    );

    let target_ids: HashSet<String> = entries(&mut con, NORMALIZED)
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let handled = hook.handled();
    assert_eq!(hook.count(), forwarded, "one request per forwarded event");
    assert!(handled.values().all(|&n| n == 1), "{handled:?}");
    assert_eq!(handled.keys().cloned().collect::<HashSet<_>>(), target_ids);
    let mut seen = HashSet::new();
    for hit in hook.hits() {
        let fields = &hit.body["fields"];
        let source = fields["source_id"].as_str().unwrap().to_owned();
        assert!(seen.insert(source.clone()), "{source} twice");
        assert!(fields.get("client_ip").is_none(), "{fields}");
        assert_eq!(fields["source"], "web");
        let i = ids.iter().position(|id| *id == source).unwrap();
        assert!(passes(i));
        assert_eq!(fields["event_id"], format!("evt-{i}"));
    }
    let want: HashSet<String> = (0..60)
        .filter(|&i| passes(i))
        .map(|i| ids[i].clone())
        .collect();
    assert_eq!(seen, want);
}

#[test]
fn a_target_redis_refuses_is_dead_lettered_and_forwarded_once_when_fixed_and_replayed() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    // Someone left a string where the target stream should be.
    let _: () = redis::cmd("SET")
        .arg(NORMALIZED)
        .arg("not a stream")
        .query(&mut con)
        .unwrap();
    let daemon = Daemon::start(&config(&redis.url(), "r1", &normalize_group(FAST)));
    let events: Vec<_> = raw_events(6)
        .into_iter()
        .filter(|e| e[2].1 != "whatsapp_message")
        .collect();
    let ids = produce(&mut con, RAW, &events);
    wait_until(Duration::from_secs(10), "the refusal to be logged", || {
        daemon.logs().contains("WRONGTYPE")
    });
    // Logged as a refusal to fix, not as an outage to wait out.
    let logs = daemon.logs();
    assert!(
        logs.contains("Redis refused to settle entries") && !logs.contains("when Redis is back"),
        "{logs}"
    );
    // A bounded number of refusals later, every entry is a dead letter carrying the
    // refusal, and nothing was acknowledged without its forward or its dead letter.
    wait_until(Duration::from_secs(20), "every entry dead-lettered", || {
        entries(&mut con, &format!("{{{RAW}}}:dlq:normalize")).len() >= ids.len()
    });
    wait_until(Duration::from_secs(5), "nothing pending", || {
        group_info(&mut con, RAW, "normalize").map(|(pending, _)| pending) == Some(0)
    });
    let _: () = redis::cmd("DEL").arg(NORMALIZED).query(&mut con).unwrap();
    dlq_replay_all(&daemon.config_path, "normalize");
    wait_until(Duration::from_secs(15), "every entry forwarded", || {
        source_ids(&mut con).len() >= ids.len()
    });
    // Every replay settled (each forward's XADD is in the script that acknowledged it):
    // a duplicate would be downstream by now.
    wait_until(Duration::from_secs(15), "the replays settled", || {
        group_info(&mut con, RAW, "normalize") == Some((0, Some(0)))
    });
    let downstream = source_ids(&mut con);
    assert_eq!(
        downstream.len(),
        ids.len(),
        "each entry exactly once:\n{}",
        daemon.logs()
    );
    assert_eq!(
        downstream.iter().collect::<HashSet<_>>(),
        ids.iter().collect::<HashSet<_>>()
    );
}

#[test]
fn check_names_each_bad_forward_option() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("streamworker.toml");
    std::fs::write(
        &path,
        r#"
[groups.normalize]
stream = "events.raw"
handler = "forward"
[groups.normalize.options]
to = "events.raw"
rename = { payload = "normalized_payload" }
drop = ["payload"]
set = { source = "{host}" }
"#,
    )
    .unwrap();
    let (code, stdout, stderr) = run_cli(&["check", "-c", &path.display().to_string()], &[]);
    assert_eq!(code, 2, "stdout: {stdout}\nstderr: {stderr}");
    for needle in [
        "groups.normalize.options.to = \"events.raw\": must differ from the group's stream",
        "groups.normalize.options.rename.payload: renames `payload`, which drop leaves out",
        "groups.normalize.options.set.source = \"{host}\": unknown placeholder `{host}`",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in:\n{stderr}");
    }
}

/// A forward fanning `events` out into 4 partitions of `orders` by `customer`.
fn fan_out_group(extra: &str) -> String {
    format!(
        r#"
[groups.fanout]
stream = "events"
start_id = "0"
handler = "forward"
concurrency = 8
block = "200ms"
handler_timeout = "1s"
claim_idle = "2s"
consumer_ttl = "1m"
retry_backoff = {{ initial = "100ms", max = "100ms", multiplier = 1.0, jitter = 0.0 }}
{extra}
[groups.fanout.options]
to = "orders"
partition_by = "customer"
partitions = 4
"#
    )
}

/// Every partition's entries as (id, customer, source_id).
fn partitions_of(con: &mut impl redis::ConnectionLike) -> Vec<Vec<(String, String, String)>> {
    (0..4)
        .map(|p| {
            let rows: Vec<(String, Fields)> = redis::cmd("XRANGE")
                .arg(format!("orders:p{p}"))
                .arg("-")
                .arg("+")
                .query(con)
                .unwrap();
            rows.into_iter()
                .map(|(id, fields)| {
                    let get = |name: &str| {
                        fields
                            .iter()
                            .find(|(k, _)| k == name.as_bytes())
                            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                            .unwrap_or_default()
                    };
                    (id, get("customer"), get("source_id"))
                })
                .collect()
        })
        .collect()
}

/// Adds 400 events for 20 customers, runs the fan-out, SIGKILLs it a third of the way in
/// and starts another replica: every source entry ends up exactly once across the
/// partitions, in the partition the function picks, under its own id.
fn fan_out_survives_sigkill(
    con: &mut impl redis::ConnectionLike,
    config_for: impl Fn(&str) -> String,
) {
    let mut ids = Vec::new();
    for i in 0..400 {
        let id: String = redis::cmd("XADD")
            .arg("events")
            .arg("*")
            .arg("customer")
            .arg(format!("customer-{}", i % 20))
            .arg("n")
            .arg(i)
            .query(con)
            .unwrap();
        ids.push(id);
    }
    let total = |con: &mut dyn redis::ConnectionLike| -> usize {
        (0..4)
            .map(|p| {
                redis::cmd("XLEN")
                    .arg(format!("orders:p{p}"))
                    .query::<usize>(con)
                    .unwrap()
            })
            .sum()
    };
    let mut first = Daemon::start(&config_for("r1"));
    wait_until(Duration::from_secs(30), "a third forwarded", || {
        total(con) >= 130
    });
    first.kill();
    let _second = Daemon::start(&config_for("r2"));
    wait_until(Duration::from_secs(60), "everything forwarded", || {
        total(con) >= 400
    });
    // Settled: the source group has nothing pending.
    wait_until(Duration::from_secs(20), "nothing pending", || {
        let info: redis::Value = redis::cmd("XPENDING")
            .arg("events")
            .arg("fanout")
            .query(con)
            .unwrap();
        matches!(&info, redis::Value::Array(v) if matches!(v.first(), Some(redis::Value::Int(0))))
    });
    let partitions = partitions_of(con);
    let mut seen = HashSet::new();
    for (p, rows) in partitions.iter().enumerate() {
        for (id, customer, source_id) in rows {
            assert_eq!(id, source_id, "each partition entry keeps its source id");
            assert!(seen.insert(id.clone()), "{id} forwarded twice");
            assert_eq!(
                streamworker::partition::partition_of(customer.as_bytes(), 4) as usize,
                p,
                "{customer} in orders:p{p}"
            );
        }
    }
    assert_eq!(seen.len(), 400, "every source entry forwarded exactly once");
    assert_eq!(seen, ids.into_iter().collect::<HashSet<_>>());
}

#[test]
fn partition_by_fans_out_exactly_once_through_a_sigkill() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let url = redis.url();
    fan_out_survives_sigkill(&mut con, |consumer| {
        config(&url, consumer, &fan_out_group(""))
    });
}

#[test]
fn partition_by_fans_out_exactly_once_through_a_sigkill_on_a_cluster() {
    let cluster = topology::Cluster::start();
    let mut con = cluster.connection();
    let redis_table = format!("[redis]\ncluster = {:?}", cluster.urls());
    fan_out_survives_sigkill(&mut con, |consumer| {
        let text = config("unused", consumer, &fan_out_group(""));
        let start = text.find("[redis]").unwrap();
        let end = text.find("[worker]").unwrap();
        format!(
            "{}{redis_table}\ncommand_timeout = \"2s\"\nconnect_timeout = \"1s\"\n\n{}",
            &text[..start],
            &text[end..]
        )
    });
}

#[test]
fn partition_by_recognises_an_entry_already_forwarded_and_never_drops_an_out_of_order_one() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let p = |customer: &str| streamworker::partition::partition_of(customer.as_bytes(), 4);
    // Two customers in different partitions.
    let (a, b) = ("customer-1", "customer-2");
    assert_ne!(p(a), p(b));
    let first = produce(&mut con, "events", &[vec![("customer", a.to_owned())]])[0].clone();
    let second = produce(&mut con, "events", &[vec![("customer", b.to_owned())]])[0].clone();
    // As if a forwarder had added `first` and died before acknowledging it.
    let _: String = redis::cmd("XADD")
        .arg(format!("orders:p{}", p(a)))
        .arg(&first)
        .arg("customer")
        .arg(a)
        .arg("source_id")
        .arg(&first)
        .query(&mut con)
        .unwrap();
    // And something else wrote to b's partition after `second`'s id: `second` cannot be
    // added in order.
    let (ms, _) = second.split_once('-').unwrap();
    let later = format!("{}-0", ms.parse::<u64>().unwrap() + 1000);
    let _: String = redis::cmd("XADD")
        .arg(format!("orders:p{}", p(b)))
        .arg(&later)
        .arg("foreign")
        .arg("1")
        .query(&mut con)
        .unwrap();
    let _daemon = Daemon::start(&config(&redis.url(), "r1", &fan_out_group("")));
    wait_until(Duration::from_secs(20), "both settled", || {
        !entries(&mut con, "{events}:dlq:fanout").is_empty()
            && pending_of(&mut con, "events", "fanout", "r1") == 0
    });
    // `first` was recognised: still one copy, and acknowledged.
    assert_eq!(entries(&mut con, &format!("orders:p{}", p(a))).len(), 1);
    // `second` was not dropped: dead-lettered with the reason, after retries.
    let dead = entries(&mut con, "{events}:dlq:fanout");
    assert_eq!(dead.len(), 1);
    let text = format!(
        "{:?}",
        String::from_utf8_lossy(
            &dead[0]
                .1
                .iter()
                .flat_map(|(k, v)| [k.clone(), v.clone()].concat())
                .collect::<Vec<u8>>()
        )
    );
    assert!(
        text.contains(&second) && text.contains("out of order"),
        "{text}"
    );
    assert_eq!(entries(&mut con, &format!("orders:p{}", p(b))).len(), 1);
}
