//! The command line: configuration errors, `check`'s output, exit codes.

use crate::support::*;

#[test]
fn bad_configurations_report_every_problem_at_once_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        r#"
[redis]
url = "redis://127.0.0.1:6379/0"

[groups.a]
handler = "noop"
blokc = "2s"

[groups.b]
stream = "s"
handler = "nope"

[groups.c]
stream = "s"
handler = "noop"
block = "2 parsecs"
handler_timeout = "30s"
claim_idle = "10s"
"#,
    );
    let (code, stdout, stderr) = run_cli(
        &["check", "-c", &path],
        &[("STREAMWORKER__GROUPS__C__MAX_DELIVERIES", "five")],
    );
    assert_eq!(code, 2, "stdout: {stdout}\nstderr: {stderr}");
    for needle in [
        "groups.a.blokc",
        "unknown key",
        "groups.a.stream",
        "is missing",
        "groups.b.handler",
        "\"nope\"",
        "unknown handler",
        "groups.c.block",
        "2 parsecs",
        "groups.c.claim_idle",
        "must be greater than handler_timeout",
        "environment variable STREAMWORKER__GROUPS__C__MAX_DELIVERIES",
        "\"five\"",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in:\n{stderr}");
    }
    assert!(stderr.contains(&path), "names the file: {stderr}");
    assert!(stdout.is_empty());
}

/// Under Redis Cluster, scripts touch a stream and its derived keys together: `check`
/// refuses what would put them in different slots, and accepts a stream that already has
/// a hash tag (its derived keys take the same one).
#[test]
fn check_keeps_each_groups_keys_in_one_cluster_slot() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        r#"
[redis]
cluster = ["redis://127.0.0.1:7000"]

[groups.normalize]
stream = "{events}.raw"
handler = "forward"
[groups.normalize.options]
to = "events.normalized"

[groups.odd]
stream = "a{}b"
handler = "noop"

[groups.tagged]
stream = "{orders}:events"
handler = "noop"
"#,
    );
    let (code, stdout, stderr) = run_cli(&["check", "-c", &path], &[]);
    assert_eq!(code, 2, "stdout: {stdout}\nstderr: {stderr}");
    for needle in [
        "groups.normalize.options.to = \"events.normalized\" is in another Redis Cluster hash slot",
        "\"{events}:out\"",
        "groups.odd.stream = \"a{}b\"",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in:\n{stderr}");
    }
    assert!(!stderr.contains("groups.tagged"), "{stderr}");

    // With the target in the source's slot, and a stream every key can follow, it passes.
    let path = write_config(
        &dir,
        r#"
[redis]
cluster = ["redis://127.0.0.1:7000"]

[groups.normalize]
stream = "{events}.raw"
handler = "forward"
[groups.normalize.options]
to = "{events}.normalized"

[groups.tagged]
stream = "{orders}:events"
handler = "noop"
"#,
    );
    let (code, stdout, stderr) = run_cli(&["check", "-c", &path], &[]);
    assert_eq!(code, 0, "stderr: {stderr}");
    assert!(
        stdout.contains("dead_letter_stream = \"{orders}:dlq:tagged\""),
        "{stdout}"
    );
}

#[test]
fn check_prints_the_resolved_configuration_with_secrets_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        r#"
[redis]
url = "redis://:hunter2@127.0.0.1:6379/0"

[groups.billing]
stream = "orders"
handler = "webhook"
[groups.billing.options]
url = "http://127.0.0.1:8080/events"
secret = "s3cr3t-signing-key"
"#,
    );
    let (code, stdout, stderr) = run_cli(
        &["check", "-c", &path],
        &[
            // Kubernetes injects these for a Service named "streamworker": ignored.
            ("STREAMWORKER_SERVICE_HOST", "10.0.0.1"),
            ("STREAMWORKER_PORT", "tcp://10.0.0.1:9464"),
            ("STREAMWORKER__GROUPS__BILLING__CONCURRENCY", "7"),
        ],
    );
    assert_eq!(code, 0, "stderr: {stderr}");
    assert!(!stdout.contains("hunter2") && !stderr.contains("hunter2"));
    assert!(!stdout.contains("s3cr3t") && !stderr.contains("s3cr3t"));
    assert!(stdout.contains("<redacted>"));
    assert!(
        stdout.contains("concurrency = 7"),
        "env override applied:\n{stdout}"
    );
    assert!(
        stdout.contains("dead_letter_stream = \"{orders}:dlq:billing\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("claim_idle = \"2m\""),
        "defaults filled in:\n{stdout}"
    );
}

/// A partitioned group keeps its dead letters per partition (`{orders:p<N>}:dlq:<group>`),
/// so `check` must not print the unpartitioned stream's `{orders}:dlq:billing`, and its
/// output must load again: an explicit `dead_letter_stream` on a partitioned group is
/// refused, so printing one would make the resolved configuration invalid.
#[test]
fn check_names_a_partitioned_groups_dead_letter_streams_and_its_output_loads_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        r#"
[groups.billing]
stream = "orders"
handler = "noop"
partitions = 4
"#,
    );
    let (code, stdout, stderr) = run_cli(&["check", "-c", &path], &[]);
    assert_eq!(code, 0, "stderr: {stderr}");
    assert!(!stdout.contains("{orders}:dlq:billing"), "{stdout}");
    assert!(
        stdout.contains("dead letters {orders:p0}:dlq:billing … {orders:p3}:dlq:billing"),
        "{stdout}"
    );

    let again = dir.path().join("resolved.toml");
    std::fs::write(&again, &stdout).unwrap();
    let again = again.to_str().unwrap();
    let (code, _, stderr) = run_cli(&["check", "-c", again], &[]);
    assert_eq!(
        code, 0,
        "check's own output is refused:\n{stderr}\n{stdout}"
    );

    // The same values (the TOML's comments aside: a derived value is explicit now).
    let json = |path: &str| {
        let (code, out, stderr) = run_cli(&["check", "-c", path, "--json"], &[]);
        assert_eq!(code, 0, "stderr: {stderr}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let resolved = json(&path);
    assert_eq!(json(again), resolved, "the output loads to the same values");
    let out = resolved.to_string();
    assert_eq!(resolved["groups"]["billing"]["partitions"], 4);
    assert!(
        resolved["groups"]["billing"]
            .get("dead_letter_stream")
            .is_none(),
        "{out}"
    );
}

#[test]
fn version_and_usage() {
    let (code, stdout, _) = run_cli(&["--version"], &[]);
    assert_eq!(code, 0);
    assert!(stdout.starts_with("streamworker "), "{stdout}");
    let (code, _, stderr) = run_cli(&["run"], &[]);
    assert_eq!(code, 2, "missing -c is a usage error: {stderr}");
    let (code, _, stderr) = run_cli(&["check", "-c", "/nonexistent/streamworker.toml"], &[]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("/nonexistent/streamworker.toml"),
        "{stderr}"
    );
}
