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
