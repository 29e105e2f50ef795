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

#[test]
fn the_demo_runs_all_four_groups_and_reports_their_work() {
    let server = server_binary();
    let (code, out, err) = run_cli(
        &["demo", "--duration", "7s", "--redis-server", &server],
        &[],
    );
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    for prefix in ["analytics: ", "alerts: ", "warehouse: ", "learning: "] {
        assert!(
            count_after(&out, prefix) > 0,
            "{prefix} did no work:\n{out}"
        );
    }
    assert!(out.contains("rows written"), "{out}");
    assert!(out.contains("adaptation event"), "{out}");
    // Each group caught up with what was produced.
    assert!(
        out.contains("errors"),
        "the analytics summary is printed:\n{out}"
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
    let (code, out, err) = run_cli(
        &[
            "demo",
            "--duration",
            "3s",
            "--redis-server",
            "/nonexistent/redis-server",
        ],
        &[("STREAMWORKER__REDIS__URL", &redis.url())],
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
