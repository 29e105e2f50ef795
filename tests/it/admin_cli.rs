//! The operator commands that replace redis-cli: `pending`, `rewind`, and `dlq replay`'s
//! `--dry-run`/`--error`/`--rate`, `dlq purge`'s `--yes`, driven as an operator would.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::support::*;

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

fn last_delivered(con: &mut redis::Connection, stream: &str, group: &str) -> String {
    let groups: Vec<redis::Value> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query(con)
        .unwrap();
    groups
        .into_iter()
        .map(value_map)
        .find(|g| g["name"] == group)
        .map(|g| g["last-delivered-id"].clone())
        .unwrap_or_else(|| panic!("no group {group} on {stream}"))
}

const BILLING: &str = r#"
[groups.billing]
stream = "orders"
handler = "noop"
"#;

#[test]
fn pending_shows_owner_idle_deliveries_and_when_a_parked_retry_is_due() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    // Entries held by two consumers that are not running (as after a crash): pod-a's idle
    // for 20 s, pod-b's just read.
    let held = produce(
        &mut con,
        "orders",
        &(0..3)
            .map(|i| vec![("n", i.to_string())])
            .collect::<Vec<_>>(),
    );
    create_group(&mut con, "orders", "billing", "0");
    for (consumer, count) in [("pod-a", 2), ("pod-b", 1)] {
        read_as(&mut con, "orders", "billing", consumer, count);
    }
    let _: redis::Value = redis::cmd("XCLAIM")
        .arg("orders")
        .arg("billing")
        .arg("pod-a")
        .arg(0)
        .arg(&held[0])
        .arg(&held[1])
        .arg("IDLE")
        .arg(20_000)
        .query(&mut con)
        .unwrap();

    // A replica whose webhook fails: the next entry is parked for a 5 s backoff. claim_idle
    // (60 s) keeps the replica from reclaiming pod-a's and pod-b's entries meanwhile.
    let hook = WebhookServer::start_with(|_| (503, Duration::ZERO));
    let cfg = config(
        &redis.url(),
        "r1",
        &format!(
            r#"
[groups.billing]
stream = "orders"
handler = "webhook"
block = "500ms"
handler_timeout = "1s"
claim_idle = "60s"
max_deliveries = 5
retry_backoff = {{ initial = "5s", max = "5s", jitter = 0.0 }}
[groups.billing.options]
url = "{}"
timeout = "1s"
"#,
            hook.url("billing")
        ),
    );
    let daemon = Daemon::start(&cfg);
    let path = daemon.config_path.to_str().unwrap().to_owned();
    // The group exists: the replica reads this entry whenever it has started.
    let failing = produce(&mut con, "orders", &[vec![("n", "3".into())]])[0].clone();
    wait_until(Duration::from_secs(20), "the entry parked", || {
        pending_of(&mut con, "orders", "billing", "streamworker:backoff") == 1
    });
    let failed_at = hook.hits()[0].at;

    let (code, out, err) = run_cli(&["pending", "-c", &path, "--group", "billing"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("4 pending"), "{out}");
    for (id, owner) in [
        (&held[0], "pod-a"),
        (&held[2], "pod-b"),
        (&failing, "streamworker:backoff"),
    ] {
        let line = out
            .lines()
            .find(|l| l.starts_with(id.as_str()))
            .unwrap_or_else(|| panic!("no row for {id}:\n{out}"));
        assert!(line.contains(owner), "{line}");
    }
    let parked_line = out.lines().find(|l| l.starts_with(&failing)).unwrap();
    assert!(parked_line.contains(" in "), "a due time: {parked_line}");

    let (code, out, err) = run_cli(
        &["pending", "-c", &path, "--group", "billing", "--json"],
        &[],
    );
    let asked = Instant::now();
    assert_eq!(code, 0, "{err}");
    let report = json(&out);
    assert_eq!(report["total"], 4);
    let rows: HashMap<String, serde_json::Value> = report["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["id"].as_str().unwrap().to_owned(), r.clone()))
        .collect();
    assert_eq!(rows.len(), 4, "{out}");
    let a = &rows[&held[0]];
    assert_eq!(a["consumer"], "pod-a");
    assert!(a["idle_ms"].as_u64().unwrap() >= 20_000, "{a}");
    assert_eq!(a["deliveries"], 2, "XCLAIM counts a delivery: {a}");
    assert_eq!(a["parked"], false);
    assert!(a["retry_due_in_ms"].is_null());
    assert_eq!(rows[&held[2]]["consumer"], "pod-b");
    assert_eq!(rows[&held[2]]["deliveries"], 1);
    let parked = &rows[&failing];
    assert_eq!(parked["consumer"], "streamworker:backoff");
    assert_eq!(parked["parked"], true);
    assert_eq!(parked["deliveries"], 1, "one attempt so far: {parked}");
    assert!(parked["retry_due_at"].is_string(), "{parked}");
    // Due 5 s after the failure, by the wall clock: what the command says must land there.
    let due_in = Duration::from_millis(parked["retry_due_in_ms"].as_u64().unwrap());
    let due_by = Duration::from_millis(parked["retry_due_by_ms"].as_u64().unwrap());
    let expected = failed_at + Duration::from_secs(5);
    let said = asked + due_in;
    let off = if said > expected {
        said - expected
    } else {
        expected - said
    };
    assert!(
        off < Duration::from_millis(1500),
        "due in {due_in:?} is {off:?} off the 5 s backoff"
    );
    assert_eq!(
        due_by - due_in,
        Duration::from_millis(200),
        "claim_interval"
    );
    // Filters: by consumer, by idle time, by count.
    let ids = |args: &[&str]| -> Vec<String> {
        let mut all = vec!["pending", "-c", &path, "--group", "billing", "--json"];
        all.extend_from_slice(args);
        let (code, out, err) = run_cli(&all, &[]);
        assert_eq!(code, 0, "{args:?}: {err}");
        json(&out)["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ids(&["--consumer", "pod-b"]), vec![held[2].clone()]);
    // A parked entry's idle time is set to claim_idle − backoff (55 s), so it counts too.
    assert_eq!(
        ids(&["--min-idle", "15s"]),
        vec![held[0].clone(), held[1].clone(), failing.clone()]
    );
    assert_eq!(ids(&["--count", "1"]), vec![held[0].clone()]);
    assert_eq!(ids(&["--consumer", "nobody"]), Vec::<String>::new());

    // And the retry does come then.
    wait_until(Duration::from_secs(20), "the retry", || hook.count() >= 2);
    let retried_at = hook.hits()[1].at;
    assert!(
        retried_at + Duration::from_millis(500) >= asked + due_in
            && retried_at <= asked + due_by + Duration::from_secs(3),
        "retried {:?} after the query, said {due_in:?}..{due_by:?}",
        retried_at.saturating_duration_since(asked)
    );

    // A group Redis does not have (yet) is named, with what creates it.
    let dir = tempfile::tempdir().unwrap();
    let other = write_config(
        &dir,
        &config(&redis.url(), "r2", BILLING).replace("orders", "nothing"),
    );
    let (code, _, err) = run_cli(&["pending", "-c", &other, "--group", "billing"], &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("no consumer group") && err.contains("streamworker run"),
        "{err}"
    );
}

#[test]
fn rewind_by_id_time_and_duration_redelivers_exactly_what_it_counted() {
    let redis = RedisServer::start();
    let hook = WebhookServer::start();
    let cfg = config(
        &redis.url(),
        "r1",
        &format!(
            r#"
[groups.billing]
stream = "orders"
handler = "webhook"
start_id = "0"
block = "500ms"
handler_timeout = "1s"
claim_idle = "5s"
[groups.billing.options]
url = "{}"
timeout = "1s"
"#,
            hook.url("billing")
        ),
    );
    let daemon = Daemon::start(&cfg);
    let path = daemon.config_path.to_str().unwrap().to_owned();
    let mut con = redis.connection();
    let batch = |n: std::ops::Range<i32>| -> Vec<Vec<(&str, String)>> {
        n.map(|i| vec![("n", i.to_string())]).collect()
    };
    let mut ids = produce(&mut con, "orders", &batch(0..5));
    // Entry ids carry the server's clock: the second batch starts in a later millisecond.
    std::thread::sleep(Duration::from_millis(20));
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query(&mut con).unwrap();
    let middle = std::time::UNIX_EPOCH + Duration::from_micros(secs * 1_000_000 + micros);
    std::thread::sleep(Duration::from_millis(20));
    ids.extend(produce(&mut con, "orders", &batch(5..10)));
    let handled = |hook: &WebhookServer| -> HashMap<String, usize> { hook.handled() };
    wait_until(Duration::from_secs(20), "all ten handled", || {
        hook.count() == 10 && group_info(&mut con, "orders", "billing") == Some((0, Some(0)))
    });
    let at_end = last_delivered(&mut con, "orders", "billing");
    assert_eq!(at_end, ids[9]);

    // Each rewind: without --yes it says what it would do, changes nothing and exits 2;
    // with it, the daemon delivers exactly the entries it counted, once each.
    let cases: Vec<(String, Vec<String>)> = vec![
        (ids[6].clone(), ids[7..].to_vec()),
        (
            humantime::format_rfc3339_millis(middle).to_string(),
            ids[5..].to_vec(),
        ),
        ("1h".into(), ids.clone()),
    ];
    let mut expected: HashMap<String, usize> = ids.iter().map(|id| (id.clone(), 1)).collect();
    for (to, again) in cases {
        let (code, out, err) = run_cli(
            &["rewind", "-c", &path, "--group", "billing", "--to", &to],
            &[],
        );
        assert_eq!(code, 2, "{out}{err}");
        assert!(err.contains("--yes"), "{err}");
        let n = again.len();
        assert!(
            out.contains(&format!("{n} entries will be delivered again")),
            "--to {to}: {out}"
        );
        assert_eq!(last_delivered(&mut con, "orders", "billing"), at_end);

        let (code, out, err) = run_cli(
            &[
                "rewind", "-c", &path, "--group", "billing", "--to", &to, "--yes", "--json",
            ],
            &[],
        );
        assert_eq!(code, 0, "{err}");
        let plan = json(&out);
        assert_eq!(plan["applied"], true);
        assert_eq!(plan["redelivered"], n as u64, "--to {to}: {plan}");
        assert_eq!(plan["from"], at_end.as_str());
        for id in &again {
            *expected.get_mut(id).unwrap() += 1;
        }
        wait_until(
            Duration::from_secs(20),
            &format!("{n} redelivered after --to {to}"),
            || handled(&hook) == expected,
        );
        assert_eq!(last_delivered(&mut con, "orders", "billing"), at_end);
        // Redis cannot tell the lag right after the SETID; once the group has read up to
        // the end it can again (docs/operations.md says so).
        wait_until(Duration::from_secs(20), "the lag known again", || {
            group_info(&mut con, "orders", "billing") == Some((0, Some(0)))
        });
    }
    // Nothing beyond what was counted arrives later.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(handled(&hook), expected);
}

/// Dead letters as the daemon writes them: the original fields, then the dlq_ ones.
fn dead_letters(con: &mut redis::Connection, errors: &[&str]) -> Vec<String> {
    let entries: Vec<Vec<(&str, String)>> = errors
        .iter()
        .enumerate()
        .map(|(i, error)| {
            vec![
                ("n", i.to_string()),
                ("dlq_origin_stream", "orders".into()),
                ("dlq_origin_id", format!("{}-0", i + 1)),
                ("dlq_group", "billing".into()),
                ("dlq_deliveries", "5".into()),
                ("dlq_error", error.to_string()),
                ("dlq_failed_at", "2024-05-01T12:00:00Z".into()),
                ("dlq_consumer", "r1".into()),
            ]
        })
        .collect();
    produce(con, "{orders}:dlq:billing", &entries)
}

#[test]
fn dlq_replay_dry_run_changes_nothing_error_filters_and_rate_paces() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, &config(&redis.url(), "r1", BILLING));
    let dlq = "{orders}:dlq:billing";
    let mut errors = vec!["webhook answered 503 Service Unavailable"; 10];
    errors.extend(["webhook answered 400 Bad Request: no field amount"; 3]);
    let ids = dead_letters(&mut con, &errors);
    let replay = |extra: &[&str]| {
        let mut args = vec!["dlq", "replay", "-c", &path, "--group", "billing", "--all"];
        args.extend_from_slice(extra);
        run_cli(&args, &[])
    };

    let (code, out, err) = replay(&["--dry-run"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.lines()
            .filter(|l| l.starts_with("would replay"))
            .count(),
        13,
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "would replay {} (origin 1-0, 5 deliveries): webhook answered 503",
            ids[0]
        )),
        "{out}"
    );
    assert!(err.contains("nothing changed"), "{err}");
    let (code, out, err) = replay(&["--dry-run", "--error", "400", "--json"]);
    assert_eq!(code, 0, "{err}");
    let report = json(&out);
    assert_eq!(report["dry_run"], true);
    assert_eq!(report["replayed"], 3);
    assert_eq!(report["not_matching"], 10);
    let listed: Vec<&str> = report["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        listed,
        ids[10..].iter().map(String::as_str).collect::<Vec<_>>()
    );
    assert_eq!(
        entries(&mut con, dlq).len(),
        13,
        "a dry run leaves the dead letters"
    );
    assert!(
        entries(&mut con, "orders").is_empty(),
        "and replays nothing"
    );

    // --error: only the 400s go back, with their fields.
    let (code, out, err) = replay(&["--error", "400 Bad Request", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["replayed"], 3, "{out}");
    let replayed = entries(&mut con, "orders");
    let ns: Vec<String> = replayed
        .iter()
        .map(|(_, f)| String::from_utf8_lossy(&f[0].1).into_owned())
        .collect();
    assert_eq!(ns, vec!["10", "11", "12"]);
    let left = entries(&mut con, dlq);
    assert_eq!(left.len(), 10);
    assert!(left.iter().all(|(_, f)| {
        f.iter()
            .any(|(k, v)| k == b"dlq_error" && v.starts_with(b"webhook answered 503"))
    }));

    // --rate: 10 at 5/s start 0.2 s apart, so the last starts 1.8 s after the first.
    let started = Instant::now();
    let (code, _, err) = replay(&["--rate", "5/s"]);
    let took = started.elapsed();
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("replayed 10 dead letters"), "{err}");
    assert!(
        !err.contains('\r'),
        "no progress line off a terminal: {err:?}"
    );
    assert!(
        took >= Duration::from_millis(1800),
        "10 at 5/s took {took:?}"
    );
    assert!(took < Duration::from_secs(20), "10 at 5/s took {took:?}");
    assert_eq!(entries(&mut con, "orders").len(), 13);
    assert!(entries(&mut con, dlq).is_empty());

    // On a terminal (util-linux `script` gives the command a pseudo-terminal), a progress
    // line on stderr, redrawn in place.
    if std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_ok()
    {
        dead_letters(&mut con, &["boom"; 3]);
        let command = format!(
            "{} dlq replay -c {path} --group billing --all >/dev/null",
            binary()
        );
        let out = std::process::Command::new("script")
            .args(["-qec", &command, "/dev/null"])
            .output()
            .unwrap();
        let shown = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{shown}");
        assert!(
            shown.contains("\r\x1b[2Kreplayed 3 dead letters to orders ("),
            "{shown:?}"
        );
    } else {
        eprintln!("no `script` to make a terminal: the progress line is not checked");
    }

    let (code, _, err) = replay(&["--rate", "fast"]);
    assert_eq!(code, 2);
    assert!(err.contains("50/s"), "{err}");
}

#[test]
fn dlq_purge_needs_yes_when_stdin_is_not_a_terminal() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, &config(&redis.url(), "r1", BILLING));
    dead_letters(&mut con, &["boom", "boom", "boom"]);
    let purge = |extra: &[&str]| {
        let mut args = vec!["dlq", "purge", "-c", &path, "--group", "billing", "--all"];
        args.extend_from_slice(extra);
        // run_cli gives the command no stdin (not a terminal), as in a script or CI job.
        run_cli(&args, &[])
    };
    let (code, out, err) = purge(&[]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("not a terminal") && err.contains("--yes"),
        "{err}"
    );
    assert_eq!(entries(&mut con, "{orders}:dlq:billing").len(), 3);

    let (code, out, err) = purge(&["--yes", "--json"]);
    assert_eq!(code, 0, "{err}");
    let report = json(&out);
    assert_eq!(report["purged"], 3);
    assert_eq!(report["dead_letter_stream"], "{orders}:dlq:billing");
    assert!(entries(&mut con, "{orders}:dlq:billing").is_empty());
}

/// The least-privilege ACL user of the README can run `pending` and `rewind`.
#[test]
fn pending_and_rewind_work_for_the_documented_acl_user() {
    let rules = readme_acl_rules();
    let mut args = vec!["--user", "streamworker", ">acl-pw"];
    args.extend(rules.split_whitespace());
    let redis = RedisServer::start_with(&args);
    let mut con = redis.connection();
    let ids = produce(
        &mut con,
        "orders",
        &(0..4)
            .map(|i| vec![("n", i.to_string())])
            .collect::<Vec<_>>(),
    );
    create_group(&mut con, "orders", "billing", "$");
    let dir = tempfile::tempdir().unwrap();
    let url = format!("redis://streamworker:acl-pw@127.0.0.1:{}/0", redis.port);
    let path = write_config(&dir, &config(&url, "r1", BILLING));
    let (code, out, err) = run_cli(&["pending", "-c", &path, "--group", "billing"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("0 pending"), "{out}");
    let (code, out, err) = run_cli(
        &[
            "rewind", "-c", &path, "--group", "billing", "--to", &ids[1], "--yes",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("2 entries will be delivered again"), "{out}");
    assert_eq!(last_delivered(&mut con, "orders", "billing"), ids[1]);
}

/// The alert runbooks send operators to streamworker's commands, not redis-cli, and every
/// command line they show parses (an option that does not exist would fail as usage).
#[test]
fn alert_runbooks_use_streamworker_commands_that_parse() {
    let alerts = include_str!("../../deploy/prometheus/alerts.yml");
    assert!(
        !alerts.contains("XPENDING"),
        "a runbook still says XPENDING"
    );
    assert!(alerts.contains("streamworker pending -c FILE --group {{ $labels.group }}"));
    // The descriptions are folded (`>-`): one line per alert, as Alertmanager shows them.
    let text = alerts.split_whitespace().collect::<Vec<_>>().join(" ");
    let commands: Vec<&str> = text
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|c| c.starts_with("streamworker ") && c.contains("-c FILE"))
        .collect();
    assert!(commands.len() >= 5, "{commands:?}");
    for command in commands {
        let args: Vec<String> = command
            .replace("{{ $labels.group }}", "billing")
            .replace("FILE", "/nonexistent/streamworker.toml")
            .split_whitespace()
            .skip(1)
            .map(str::to_owned)
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, _, err) = run_cli(&args, &[]);
        // Parsed: it got as far as reading the (missing) configuration.
        assert_eq!(code, 2, "{command}: {err}");
        assert!(
            err.contains("/nonexistent/streamworker.toml") && !err.contains("Usage:"),
            "{command}: {err}"
        );
    }
}

/// A partitioned group has a dead-letter stream per partition (`{orders:p<N>}:dlq:billing`)
/// and no `{orders}:dlq:billing`: `dlq` must not report that one as empty, but say which
/// streams hold the dead letters, and reach one with `--partition N`, replaying to the
/// partition's own stream.
#[test]
fn dlq_on_a_partitioned_group_names_its_partitions_and_works_on_one() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        &config(
            &redis.url(),
            "r1",
            &format!(
                "{BILLING}partitions = 4\n[groups.plain]\nstream = \"other\"\nhandler = \"noop\"\n"
            ),
        ),
    );
    let fields = vec![
        ("n", "7".to_owned()),
        ("dlq_origin_stream", "orders:p2".into()),
        ("dlq_origin_id", "1-0".into()),
        ("dlq_group", "billing".into()),
        ("dlq_deliveries", "5".into()),
        ("dlq_error", "boom".into()),
        ("dlq_failed_at", "2024-05-01T12:00:00Z".into()),
        ("dlq_consumer", "r1".into()),
    ];
    let ids = produce(&mut con, "{orders:p2}:dlq:billing", &[fields]);
    let dlq = |args: &[&str]| {
        let mut all = vec!["dlq", args[0], "-c", &path];
        all.extend_from_slice(&args[1..]);
        run_cli(&all, &[])
    };

    // Without a partition: refused, naming the streams and the way to reach one.
    for command in [
        &["list", "--group", "billing"][..],
        &["show", "--group", "billing", &ids[0]],
        &["replay", "--group", "billing", "--all"],
        &["purge", "--group", "billing", "--all", "--yes"],
    ] {
        let (code, out, err) = dlq(command);
        assert_eq!(code, 2, "{command:?}: {out}{err}");
        assert!(!out.contains("{orders}:dlq:billing"), "{out}");
        assert!(
            err.contains("{orders:p0}:dlq:billing … {orders:p3}:dlq:billing")
                && err.contains("--partition"),
            "{command:?}: {err}"
        );
    }
    // `pending` and `rewind` too: the group has no pending list or position on `orders`.
    for command in [
        &["pending", "-c", &path, "--group", "billing"][..],
        &["rewind", "-c", &path, "--group", "billing", "--to", "0"],
    ] {
        let (code, out, err) = run_cli(command, &[]);
        assert_eq!(code, 2, "{command:?}: {out}{err}");
        assert!(err.contains("--partition"), "{command:?}: {err}");
    }
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg("orders:p2")
        .arg("billing")
        .arg("0")
        .arg("MKSTREAM")
        .query(&mut con)
        .unwrap();
    let (code, out, err) = run_cli(
        &[
            "pending",
            "-c",
            &path,
            "--group",
            "billing",
            "--partition",
            "2",
            "--json",
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, err) = dlq(&["list", "--group", "billing", "--partition", "4"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("0 to 3"), "{err}");
    let (code, _, err) = dlq(&["list", "--group", "plain", "--partition", "0"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not partitioned"), "{err}");

    // With one, the partition's own dead letters, replayed to the partition's stream.
    let (code, out, err) = dlq(&["list", "--group", "billing", "--partition", "2"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("{orders:p2}:dlq:billing: 1 dead letter"),
        "{out}"
    );
    let (code, out, err) = dlq(&["list", "--group", "billing", "--partition", "1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("{orders:p1}:dlq:billing is empty"), "{out}");
    let (code, out, err) = dlq(&["replay", "--group", "billing", "--partition", "2", "--all"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("replayed 1 dead letter to orders:p2"), "{err}");
    assert!(entries(&mut con, "{orders:p2}:dlq:billing").is_empty());
    let replayed = entries(&mut con, "orders:p2");
    assert_eq!(replayed.len(), 1, "{replayed:?}");
    assert!(entries(&mut con, "orders").is_empty());
}
