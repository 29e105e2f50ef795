//! Guards on operator commands and housekeeping: they finish, and they stay small, whatever
//! the daemon does meanwhile (issue 10, point 6).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

/// Runs `streamworker args…` for at most `limit`; returns (exit code or None when it had to
/// be killed, stdout, stderr).
fn run_cli_within(args: &[&str], limit: Duration) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("out");
    let err_path = dir.path().join("err");
    let mut child = Command::new(binary())
        .args(args)
        .stdout(Stdio::from(std::fs::File::create(&out_path).unwrap()))
        .stderr(Stdio::from(std::fs::File::create(&err_path).unwrap()))
        .spawn()
        .expect("the streamworker binary runs");
    let deadline = Instant::now() + limit;
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (
        code,
        std::fs::read_to_string(out_path).unwrap_or_default(),
        std::fs::read_to_string(err_path).unwrap_or_default(),
    )
}

/// A replayed entry that fails again is dead-lettered again while the replay is still
/// running; `--all` and `--since` must stop at the dead letters there were when they
/// started, not chase their own output forever.
#[test]
fn dlq_replay_stops_at_the_dead_letters_present_when_it_started() {
    let redis = RedisServer::start();
    // Every delivery is refused for good (400): dead-lettered at once, again and again.
    let hook = WebhookServer::start_with(|_| (400, Duration::ZERO));
    let groups = format!(
        r#"
[groups.billing]
stream = "orders"
handler = "webhook"
concurrency = 64
block = "500ms"
handler_timeout = "1s"
claim_idle = "3s"
consumer_ttl = "1m"
retry_backoff = {{ initial = "200ms", max = "1s" }}
[groups.billing.options]
url = "{}"
timeout = "1s"
"#,
        hook.url("billing")
    );
    let daemon = Daemon::start(&config(&redis.url(), "r1", &groups));
    let mut con = redis.connection();
    const N: usize = 400;
    produce(
        &mut con,
        "orders",
        &(0..N)
            .map(|i| vec![("n", i.to_string())])
            .collect::<Vec<_>>(),
    );
    let dlq = "{orders}:dlq:billing";
    let xlen =
        |con: &mut redis::Connection| redis::cmd("XLEN").arg(dlq).query::<usize>(con).unwrap();
    wait_until(Duration::from_secs(30), "every entry dead-lettered", || {
        xlen(&mut con) == N
    });

    let path = daemon.config_path.to_str().unwrap().to_owned();
    for which in [&["--all"][..], &["--since", "1h"][..]] {
        let mut args = vec!["dlq", "replay", "-c", &path, "--group", "billing"];
        args.extend_from_slice(which);
        let (code, out, err) = run_cli_within(&args, Duration::from_secs(60));
        let replayed = out.lines().filter(|l| l.starts_with("replayed ")).count();
        assert_eq!(
            code,
            Some(0),
            "`dlq replay {which:?}` did not finish (replayed {replayed} so far): {err}"
        );
        assert_eq!(
            replayed, N,
            "{which:?} replays each dead letter once: {err}"
        );
        assert!(
            err.contains(&format!("replayed {N} dead letters")),
            "{which:?}: {err}"
        );
        // The replays fail again and come back as N new dead letters, for the next round.
        wait_until(
            Duration::from_secs(30),
            "the replays dead-lettered again",
            || xlen(&mut con) == N,
        );
    }
}
