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

/// Retention's script runs inside Redis, where nothing else runs meanwhile: it must find
/// the groups' bound before reading anything, and read a bounded number of entries per
/// call. A stream far over its length is then trimmed in many short calls, not one long
/// one (which stalls every client for as long as it takes to copy the entries).
#[test]
fn retention_reads_a_bounded_number_of_entries_per_script_call() {
    // Every command slower than 150 ms is logged; a bounded retention call takes a few ms.
    const SLOW_US: u64 = 150_000;
    let redis = RedisServer::start_with(&[
        "--slowlog-log-slower-than",
        &SLOW_US.to_string(),
        "--slowlog-max-len",
        "1000",
    ]);
    let mut con = redis.connection();
    let retention_sha = redis::Script::new(include_str!("../../src/client/retention.lua"))
        .get_hash()
        .to_owned();
    // A group streamworker does not run, that has read nothing yet: retention may not
    // trim anything, and has no reason to look at any entry.
    create_group(&mut con, "events", "outsider", "0");
    const N: usize = 120_000;
    let pad = "x".repeat(1000);
    for chunk in (0..N).collect::<Vec<_>>().chunks(10_000) {
        produce(
            &mut con,
            "events",
            &chunk
                .iter()
                .map(|i| vec![("n", i.to_string()), ("pad", pad.clone())])
                .collect::<Vec<_>>(),
        );
    }
    let hook = WebhookServer::start();
    let groups = format!(
        r#"
[streams.events]
retention = {{ max_len = 10 }}

[groups.other]
stream = "other"
handler = "webhook"
block = "500ms"
[groups.other.options]
url = "{}"
"#,
        hook.url("other")
    );
    let (cfg, http) = config_with_http(&redis.url(), "r1", &groups);
    let _daemon = Daemon::start(&cfg);
    let blocked = || {
        http_get(&http, "/metrics").and_then(|(_, text)| {
            metric(
                &text,
                "streamworker_retention_blocked",
                &[("group", "outsider")],
            )
        })
    };
    wait_until(
        Duration::from_secs(30),
        "a retention pass held back by outsider",
        || blocked() == Some(1.0),
    );
    let xlen = |con: &mut redis::Connection| {
        redis::cmd("XLEN")
            .arg("events")
            .query::<usize>(con)
            .unwrap()
    };
    assert_eq!(
        xlen(&mut con),
        N,
        "outsider has read nothing: nothing may go"
    );

    // outsider has now handled everything: all but 10 entries go, in bounded steps.
    redis::cmd("XGROUP")
        .arg("SETID")
        .arg("events")
        .arg("outsider")
        .arg("$")
        .query::<()>(&mut con)
        .unwrap();
    wait_until(
        Duration::from_secs(60),
        "the stream trimmed to max_len",
        || xlen(&mut con) == 10,
    );
    assert_eq!(blocked(), Some(0.0));

    // SLOWLOG GET: [id, time, duration µs, [command, args…], …]
    let slow: Vec<(u64, u64, u64, Vec<String>)> = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(1000)
        .query::<Vec<redis::Value>>(&mut con)
        .unwrap()
        .into_iter()
        .filter_map(|v| {
            let redis::Value::Array(parts) = v else {
                return None;
            };
            let num = |v: &redis::Value| text(v).parse::<u64>().unwrap_or(0);
            let args = match parts.get(3) {
                Some(redis::Value::Array(a)) => a.iter().map(text).collect(),
                _ => Vec::new(),
            };
            Some((num(&parts[0]), num(&parts[1]), num(&parts[2]), args))
        })
        .collect();
    let retention_calls: Vec<_> = slow
        .iter()
        .filter(|(_, _, _, args)| args.iter().any(|a| a.eq_ignore_ascii_case(&retention_sha)))
        .collect();
    assert!(
        retention_calls.is_empty(),
        "retention calls slower than {SLOW_US} µs: {:?}",
        retention_calls
            .iter()
            .map(|(_, _, us, _)| us)
            .collect::<Vec<_>>()
    );
}

/// Credentials in a webhook URL (userinfo, a `token` query parameter) appear nowhere the
/// daemon writes: not in its logs, not in a dead letter's `dlq_error`, not in `check`.
#[test]
fn webhook_credentials_reach_no_log_and_no_dead_letter() {
    const PASSWORD: &str = "s3cr3t-pw";
    const TOKEN: &str = "t0k3n-value";
    let redis = RedisServer::start();
    // Refused for good: the error names the URL and the reply.
    let hook = WebhookServer::start_with(|_| (400, Duration::ZERO));
    let with_credentials = |url: &str| {
        format!(
            "{}?token={TOKEN}",
            url.replacen("http://", &format!("http://ops:{PASSWORD}@"), 1)
        )
    };
    let refusing = with_credentials(&hook.url("refusing"));
    // Nobody listens there: the HTTP client's own error names the URL.
    let unreachable = with_credentials(&format!("http://127.0.0.1:{}/x", free_port()));
    let group = |name: &str, url: &str| {
        format!(
            r#"
[groups.{name}]
stream = "{name}"
handler = "webhook"
block = "500ms"
handler_timeout = "2s"
claim_idle = "4s"
max_deliveries = 1
retry_backoff = {{ initial = "100ms", max = "1s" }}
[groups.{name}.options]
url = "{url}"
timeout = "1s"
"#
        )
    };
    let cfg = config(
        &redis.url(),
        "r1",
        &format!(
            "{}{}",
            group("refusing", &refusing),
            group("unreachable", &unreachable)
        ),
    );
    let daemon = Daemon::start(&cfg);
    let mut con = redis.connection();
    for stream in ["refusing", "unreachable"] {
        produce(&mut con, stream, &[vec![("n", "1".to_owned())]]);
    }
    let mut errors = Vec::new();
    for stream in ["refusing", "unreachable"] {
        let dlq = format!("{{{stream}}}:dlq:{stream}");
        wait_until(Duration::from_secs(30), "a dead letter", || {
            !entries(&mut con, &dlq).is_empty()
        });
        let (_, fields) = entries(&mut con, &dlq).remove(0);
        let error = fields
            .iter()
            .find(|(k, _)| k == b"dlq_error")
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .expect("dlq_error");
        errors.push(error);
    }
    // The errors still say which endpoint failed, and how.
    assert!(
        errors[0].contains("http://ops:<redacted>@127.0.0.1") && errors[0].contains("400"),
        "{}",
        errors[0]
    );
    assert!(
        errors[1].contains("http://ops:<redacted>@127.0.0.1") && errors[1].contains("unreachable"),
        "{}",
        errors[1]
    );
    let (code, checked, err) = run_cli(&["check", "-c", daemon.config_path.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    let logs = daemon.logs();
    for (what, text) in [
        ("refusing dlq_error", &errors[0]),
        ("unreachable dlq_error", &errors[1]),
        ("logs", &logs),
        ("check", &checked),
    ] {
        for secret in [PASSWORD, TOKEN] {
            assert!(!text.contains(secret), "{secret} in {what}: {text}");
        }
    }
}

/// A Redis password in the URL, right or wrong, appears in no log line and no command's
/// output: connection errors name the server, never the credentials.
#[test]
fn redis_passwords_reach_no_log_and_no_command_output() {
    const WRONG: &str = "wr0ng-pw";
    let redis = RedisServer::start_with(&["--requirepass", "r1ght-pw"]);
    let url = redis.url().replace("r1ght-pw", WRONG);
    let mut daemon = Daemon::start(&config(
        &url,
        "r1",
        "[groups.g]\nstream = \"s\"\nhandler = \"noop\"\nblock = \"500ms\"\n",
    ));
    // A refused password is not an outage: the daemon stops and says where it failed.
    assert!(
        daemon.wait(Duration::from_secs(30)).is_some(),
        "stops on a refused password: {}",
        daemon.logs()
    );
    assert!(
        daemon.logs().contains("redis://:<redacted>@127.0.0.1"),
        "{}",
        daemon.logs()
    );
    let path = daemon.config_path.to_str().unwrap().to_owned();
    let mut outputs = vec![("daemon logs".to_owned(), daemon.logs())];
    for args in [
        &["status", "-c", &path][..],
        &["check", "-c", &path][..],
        &["dlq", "list", "-c", &path, "--group", "g"][..],
    ] {
        let (_, out, err) = run_cli(args, &[]);
        outputs.push((format!("{args:?}"), format!("{out}{err}")));
    }
    // And the right password, once a command gets through, is no more visible.
    let (code, out, err) = run_cli(&["status", "-c", &path], &[]);
    assert_ne!(code, 0, "the wrong password is refused: {out}{err}");
    std::fs::write(
        &daemon.config_path,
        std::fs::read_to_string(&daemon.config_path)
            .unwrap()
            .replace(WRONG, "r1ght-pw"),
    )
    .unwrap();
    let (code, out, err) = run_cli(&["status", "-c", &path], &[]);
    assert_eq!(code, 0, "{err}");
    outputs.push((
        "status with the right password".into(),
        format!("{out}{err}"),
    ));
    for (what, text) in &outputs {
        for secret in [WRONG, "r1ght-pw"] {
            assert!(!text.contains(secret), "{secret} in {what}: {text}");
        }
    }
}

/// Absurd values make `check` and `run` exit 2 naming the key, never panic (exit 101).
#[test]
fn absurd_configuration_values_exit_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("streamworker.toml");
    let path = path.to_str().unwrap();
    for (extra, key) in [
        (
            "retry_backoff = { jitter = nan }",
            "groups.g.retry_backoff.jitter",
        ),
        (
            "retry_backoff = { jitter = inf }",
            "groups.g.retry_backoff.jitter",
        ),
        (
            "claim_idle = \"500000000y\"\nconsumer_ttl = \"500000001y\"\nhandler_timeout = \"400000000y\"",
            "groups.g.claim_idle",
        ),
        ("stream = \"\"", "groups.g.stream"),
    ] {
        std::fs::write(
            path,
            format!(
                "[redis]\nurl = \"redis://127.0.0.1:1/0\"\n[groups.g]\nhandler = \"noop\"\nstream = \"s\"\n{extra}\n"
            )
            .replacen("stream = \"s\"\nstream = \"\"", "stream = \"\"", 1),
        )
        .unwrap();
        for command in ["check", "run"] {
            let (code, out, err) = run_cli(&[command, "-c", path], &[]);
            assert_eq!(code, 2, "{command} with {extra}: {out}{err}");
            assert!(err.contains(key), "{command} with {extra}: {err}");
            assert!(!err.contains("panicked"), "{command} with {extra}: {err}");
        }
    }
}
