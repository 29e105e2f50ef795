//! Issue 15, producers and per-key order: `produce --partition-by`, and groups with
//! `order_by` (entries of one key handled one at a time, in id order, across retries,
//! dead letters and a SIGKILL).

use streamworker::partition::{partition_of, partition_stream};

use crate::support::*;

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
