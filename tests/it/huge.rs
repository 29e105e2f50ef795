//! Entries of any size (issue 10, point 4): an entry with 100,000 fields and one with a
//! single 50 MB field are read, acknowledged, dead-lettered, forwarded and replayed like
//! any other. A Lua script cannot pass more than ~8,000 values to one command, so these
//! go another atomic way; what a user checks is that nothing of the entry is lost and
//! nothing is left pending.

use std::time::Duration;

use crate::support::*;

const STREAM: &str = "{big}.in";
const DLQ: &str = "{big}.in:dlq:bury";
const FORWARDED: &str = "{big}.out";

/// Far more fields than Lua's C stack (LUAI_MAXCSTACK, 8,000) lets one call take.
const MANY: usize = 100_000;
/// One field of 50 MB: the size, not the count, is what is big.
const LARGE: usize = 50 * 1024 * 1024;

/// The two entries: 100,000 small fields (names and values not UTF-8 every so often), and
/// one 50 MB `payload`. Neither `payload` is JSON, so a `json:payload` group fails them
/// permanently.
fn huge_entries() -> [Fields; 2] {
    let many: Fields = (0..MANY)
        .map(|i| {
            let mut name = format!("f{i:06}").into_bytes();
            let mut value = format!("value {i}").into_bytes();
            if i % 1000 == 7 {
                name.push(0xff);
                value.extend_from_slice(&[0xc3, 0x28, b'\r', b'\n']);
            }
            (name, value)
        })
        .chain([(b"payload".to_vec(), b"not json".to_vec())])
        .collect();
    let mut big = vec![b'x'; LARGE];
    // Something in the middle and at the end that a careless parser would trip on.
    big[LARGE / 2..LARGE / 2 + 4].copy_from_slice(b"\r\n\xff$");
    big[LARGE - 1] = 0xfe;
    let large: Fields = vec![(b"payload".to_vec(), big)];
    [many, large]
}

fn add(con: &mut redis::Connection, stream: &str, fields: &Fields) -> String {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (k, v) in fields {
        cmd.arg(&k[..]).arg(&v[..]);
    }
    cmd.query(con).expect("XADD of a huge entry")
}

fn value<'a>(fields: &'a Fields, name: &str) -> Option<&'a [u8]> {
    fields
        .iter()
        .find(|(k, _)| k == name.as_bytes())
        .map(|(_, v)| v.as_slice())
}

/// `fields` starts with every field of `original`, byte for byte and in order; returns the
/// rest.
fn after_original<'a>(
    fields: &'a Fields,
    original: &Fields,
    what: &str,
) -> &'a [(Vec<u8>, Vec<u8>)] {
    assert!(
        fields.len() >= original.len(),
        "{what}: {} fields, the original had {}",
        fields.len(),
        original.len()
    );
    // Compare without printing 50 MB on failure.
    let differs = fields.iter().zip(original).position(|(a, b)| a != b);
    assert_eq!(differs, None, "{what}: the first field that differs");
    &fields[original.len()..]
}

fn names(rest: &[(Vec<u8>, Vec<u8>)]) -> Vec<String> {
    rest.iter()
        .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
        .collect()
}

/// The support configuration with a command timeout that a 50 MB command meets even in a
/// debug build on a loaded machine: these tests are about size, not about timeouts.
fn roomy(config: String) -> String {
    assert!(config.contains("command_timeout = \"2s\""));
    config.replace("command_timeout = \"2s\"", "command_timeout = \"30s\"")
}

const FAST: &str = r#"block = "500ms"
handler_timeout = "5s"
claim_idle = "20s"
consumer_ttl = "1m"
max_deliveries = 1
retry_backoff = { initial = "100ms", max = "1s" }"#;

#[test]
fn huge_entries_are_dead_lettered_whole_then_replayed() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let groups = format!(
        r#"
[groups.bury]
stream = "{STREAM}"
handler = "noop"
payload = "json:payload"
dead_letter_stream = "{DLQ}"
{FAST}
"#
    );
    let daemon = Daemon::start(&roomy(config(&redis.url(), "r1", &groups)));
    wait_until(Duration::from_secs(20), "the group", || {
        group_info(&mut con, STREAM, "bury").is_some()
    });
    let originals = huge_entries();
    let ids: Vec<String> = originals.iter().map(|f| add(&mut con, STREAM, f)).collect();

    wait_until(Duration::from_secs(120), "both dead-lettered", || {
        redis::cmd("XLEN").arg(DLQ).query::<u64>(&mut con).ok() == Some(2)
    });
    wait_until(Duration::from_secs(30), "both acknowledged", || {
        group_info(&mut con, STREAM, "bury") == Some((0, Some(0)))
    });
    let dead = entries(&mut con, DLQ);
    assert_eq!(dead.len(), 2);
    for ((id, original), (_, letter)) in ids.iter().zip(&originals).zip(&dead) {
        let rest = after_original(letter, original, "the dead letter");
        assert_eq!(
            names(rest),
            [
                "dlq_origin_stream",
                "dlq_origin_id",
                "dlq_group",
                "dlq_deliveries",
                "dlq_error",
                "dlq_failed_at",
                "dlq_consumer"
            ]
        );
        assert_eq!(value(letter, "dlq_origin_id"), Some(id.as_bytes()));
        assert_eq!(value(letter, "dlq_group"), Some(&b"bury"[..]));
    }
    drop(daemon);

    let cfg = roomy(config(&redis.url(), "r1", &groups));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("streamworker.toml");
    std::fs::write(&path, cfg).unwrap();
    let (out, err) = dlq_replay_all(&path, "bury");
    assert!(err.contains("replayed 2 dead letters"), "{out}\n{err}");
    assert_eq!(
        redis::cmd("XLEN").arg(DLQ).query::<u64>(&mut con).unwrap(),
        0,
        "replayed dead letters are deleted"
    );
    let all = entries(&mut con, STREAM);
    assert_eq!(all.len(), 4, "the two originals and their two replays");
    for ((id, original), (_, replay)) in ids.iter().zip(&originals).zip(&all[2..]) {
        let rest = after_original(replay, original, "the replay");
        assert_eq!(
            rest,
            [
                (b"dlq_replay_of".to_vec(), id.as_bytes().to_vec()),
                (b"dlq_replay_group".to_vec(), b"bury".to_vec())
            ]
        );
    }
}

#[test]
fn huge_entries_are_forwarded_whole_and_acknowledged_by_every_group() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let groups = format!(
        r#"
[groups.copy]
stream = "{STREAM}"
handler = "forward"
{FAST}
[groups.copy.options]
to = "{FORWARDED}"

[groups.count]
stream = "{STREAM}"
handler = "noop"
{FAST}
"#
    );
    let (cfg, http) = config_with_http(&redis.url(), "r1", &groups);
    let _daemon = Daemon::start(&roomy(cfg));
    wait_until(Duration::from_secs(20), "the groups", || {
        group_info(&mut con, STREAM, "copy").is_some()
            && group_info(&mut con, STREAM, "count").is_some()
    });
    let originals = huge_entries();
    let ids: Vec<String> = originals.iter().map(|f| add(&mut con, STREAM, f)).collect();

    wait_until(Duration::from_secs(120), "both groups settled both", || {
        group_info(&mut con, STREAM, "copy") == Some((0, Some(0)))
            && group_info(&mut con, STREAM, "count") == Some((0, Some(0)))
    });
    let out = entries(&mut con, FORWARDED);
    assert_eq!(out.len(), 2, "each entry forwarded once");
    for ((id, original), (_, copy)) in ids.iter().zip(&originals).zip(&out) {
        let rest = after_original(copy, original, "the forwarded copy");
        assert_eq!(
            rest,
            [(b"source_id".to_vec(), id.as_bytes().to_vec())],
            "the source id is added"
        );
    }
    wait_until(Duration::from_secs(10), "the counters", || {
        entries_total(&http, &[("group", "count"), ("outcome", "acked")]) == 2.0
            && entries_total(&http, &[("group", "copy"), ("outcome", "forwarded")]) == 2.0
    });
}

#[test]
fn huge_entries_left_pending_by_a_dead_replica_are_reclaimed_and_acknowledged() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let originals = huge_entries();
    create_group(&mut con, STREAM, "count", "0");
    for fields in &originals {
        add(&mut con, STREAM, fields);
    }
    // A replica that read them and died.
    read_as(&mut con, STREAM, "count", "gone", usize::MAX);
    assert_eq!(pending_of(&mut con, STREAM, "count", "gone"), 2);
    let groups = format!(
        r#"
[groups.count]
stream = "{STREAM}"
handler = "noop"
block = "500ms"
handler_timeout = "1s"
claim_idle = "3s"
consumer_ttl = "1m"
retry_backoff = {{ initial = "100ms", max = "1s" }}
"#
    );
    let (cfg, http) = config_with_http(&redis.url(), "r1", &groups);
    let daemon = Daemon::start(&roomy(cfg));
    wait_until(
        Duration::from_secs(60),
        "both reclaimed and acknowledged",
        || group_info(&mut con, STREAM, "count") == Some((0, Some(0))),
    );
    wait_until(Duration::from_secs(10), "the counter", || {
        entries_total(&http, &[("group", "count"), ("outcome", "acked")]) == 2.0
    });
    assert!(!daemon.logs().contains("reconnecting"), "{}", daemon.logs());
}

/// Under Cluster the MULTI goes to the node that owns the stream's slot (the cluster
/// connection does not route transactions).
#[test]
fn huge_entries_are_dead_lettered_and_forwarded_on_a_cluster() {
    let cluster = crate::support::topology::Cluster::start();
    let groups = format!(
        r#"
[groups.bury]
stream = "{STREAM}"
handler = "noop"
payload = "json:payload"
dead_letter_stream = "{DLQ}"
{FAST}

[groups.copy]
stream = "{STREAM}"
handler = "forward"
{FAST}
[groups.copy.options]
to = "{FORWARDED}"
"#
    );
    let text = config("unused", "r1", &groups);
    let (start, end) = (
        text.find("[redis]").unwrap(),
        text.find("[worker]").unwrap(),
    );
    let text = format!(
        "{}[redis]\ncluster = {:?}\ncommand_timeout = \"30s\"\nconnect_timeout = \"1s\"\n\n{}",
        &text[..start],
        cluster.urls(),
        &text[end..]
    );
    let _daemon = Daemon::start(&text);
    let mut con = cluster.connection();
    let pending = |con: &mut redis::cluster::ClusterConnection, group: &str| -> Option<i64> {
        let summary: redis::Value = redis::cmd("XPENDING")
            .arg(STREAM)
            .arg(group)
            .query(con)
            .ok()?;
        match summary {
            redis::Value::Array(v) => match v.first() {
                Some(redis::Value::Int(n)) => Some(*n),
                _ => None,
            },
            _ => None,
        }
    };
    wait_until(Duration::from_secs(30), "the groups", || {
        pending(&mut con, "bury").is_some() && pending(&mut con, "copy").is_some()
    });
    let [many, _] = huge_entries();
    let mut cmd = redis::cmd("XADD");
    cmd.arg(STREAM).arg("*");
    for (k, v) in &many {
        cmd.arg(&k[..]).arg(&v[..]);
    }
    let id: String = cmd.query(&mut con).unwrap();
    let len = |con: &mut redis::cluster::ClusterConnection, key: &str| -> u64 {
        redis::cmd("XLEN").arg(key).query(con).unwrap_or(0)
    };
    wait_until(
        Duration::from_secs(60),
        "dead-lettered and forwarded",
        || {
            len(&mut con, DLQ) == 1
                && len(&mut con, FORWARDED) == 1
                && pending(&mut con, "bury") == Some(0)
                && pending(&mut con, "copy") == Some(0)
        },
    );
    let dead: Vec<(String, Fields)> = redis::cmd("XRANGE")
        .arg(DLQ)
        .arg("-")
        .arg("+")
        .query(&mut con)
        .unwrap();
    after_original(&dead[0].1, &many, "the dead letter on a cluster");
    assert_eq!(value(&dead[0].1, "dlq_origin_id"), Some(id.as_bytes()));
}
