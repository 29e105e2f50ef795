//! `streamworker demo`: the product's main job with nothing configured.

use crate::support::*;

/// The number in a report line such as "warehouse: 3995 rows written …".
fn count_after(report: &str, prefix: &str) -> u64 {
    report
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in:\n{report}"))
}

/// The number just before `suffix` in the report line starting with `prefix`, e.g. 1 in
/// "alerts: … ; 1 alert event on stream `alerts`".
fn count_before(report: &str, prefix: &str, suffix: &str) -> u64 {
    let line = report
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in:\n{report}"));
    let before = &line[..line
        .find(suffix)
        .unwrap_or_else(|| panic!("no {suffix:?} in {line:?}"))];
    let number = before.split_whitespace().last().unwrap_or("");
    number
        .trim_start_matches('(')
        .parse()
        .unwrap_or_else(|e| panic!("{number:?} before {suffix:?} in {line:?}: {e}"))
}

#[test]
fn the_demo_runs_all_four_groups_and_reports_their_work() {
    let server = server_binary();
    // Long enough for the incident that starts at 2 s to fire an alert and flag a model.
    let (code, out, err) = run_cli(
        &["demo", "--duration", "8s", "--redis-server", &server],
        &[],
    );
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    for prefix in ["analytics: ", "alerts: ", "warehouse: ", "learning: "] {
        assert!(
            count_after(&out, prefix) > 0,
            "{prefix} did no work:\n{out}"
        );
    }
    // The three groups on ml_events caught up with the same entries before the report,
    // and every entry the warehouse took is a line on disk.
    let aggregated = count_after(&out, "analytics: ");
    assert_eq!(count_after(&out, "alerts: "), aggregated, "{out}");
    assert_eq!(count_after(&out, "warehouse: "), aggregated, "{out}");
    assert_eq!(
        count_before(&out, "warehouse: ", " JSON lines"),
        aggregated,
        "{out}"
    );
    assert_eq!(
        count_before(&out, "learning: ", " dataset lines"),
        count_after(&out, "learning: "),
        "one dataset line per feedback event:\n{out}"
    );
    // The incident shows: failing calls in the analytics, an alert, a flagged model.
    assert!(
        count_after(&out, "    errors ") > 0,
        "the incident's errors are counted:\n{out}"
    );
    assert!(
        count_before(&out, "alerts: ", " alert event") >= 1,
        "an alert fired during the incident:\n{out}"
    );
    assert!(
        out.contains(" firing: "),
        "the report names the alert:\n{out}"
    );
    assert!(
        count_before(&out, "learning: ", " adaptation event") >= 1,
        "a model was flagged for adaptation:\n{out}"
    );
}

#[test]
fn the_demo_explains_a_missing_redis_server() {
    let (code, _, err) = run_cli(
        &[
            "demo",
            "--duration",
            "1s",
            "--redis-server",
            "/nonexistent/redis-server",
        ],
        &[],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("redis-server is not installed")
            && err.contains("apt-get install redis-server"),
        "{err}"
    );
}

#[test]
fn the_demo_uses_a_configured_redis_instead_of_starting_one() {
    let redis = RedisServer::start();
    let url = redis.url();
    let (code, out, err) = run_cli(
        &[
            "demo",
            "--duration",
            "3s",
            "--redis-server",
            "/nonexistent/redis-server",
            "--url",
            &url,
        ],
        &[],
    );
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("the Redis at"), "{out}");
    let mut con = redis.connection();
    for (stream, group) in [
        ("ml_events", "analytics"),
        ("ml_events", "alerts"),
        ("ml_events", "warehouse"),
        ("user:feedback", "learning"),
    ] {
        let (pending, _) = group_info(&mut con, stream, group)
            .unwrap_or_else(|| panic!("group {group} on {stream} in the given Redis"));
        assert_eq!(pending, 0, "{stream}/{group} settled at shutdown");
    }
}
