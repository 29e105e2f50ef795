//! Groups controlled one at a time (issue 13, point 3): `streamworker pause|resume` across
//! every replica, `run --groups`, and `enabled = false`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::support::*;

/// A webhook group that holds each call for `hold`, with a claim_idle long enough that
/// nothing is reclaimed during a test (so every handler call is a read's).
fn webhook_group(url: &str) -> String {
    format!(
        r#"
[groups.billing]
stream = "orders"
handler = "webhook"
concurrency = 4
handler_timeout = "5s"
claim_idle = "30s"
[groups.billing.options]
url = "{url}"
timeout = "5s"
"#
    )
}

fn paused_gauge(http: &str) -> Option<f64> {
    let (status, text) = http_get(http, "/metrics")?;
    (status == 200)
        .then(|| {
            metric(
                &text,
                "streamworker_group_paused",
                &[("stream", "orders"), ("group", "billing")],
            )
        })
        .flatten()
}

fn cli(args: &[&str], config: &Path) -> (i32, String, String) {
    let config = config.to_str().unwrap();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["-c", config]);
    run_cli(&all, &[])
}

/// The ACL rules the docs document (`user streamworker on >PASSWORD …`), from
/// docs/configuration.md itself.
fn readme_acl_rules() -> Vec<String> {
    const PREFIX: &str = "user streamworker on >PASSWORD ";
    let line = include_str!("../../docs/configuration.md")
        .lines()
        .find(|l| l.starts_with(PREFIX))
        .expect("docs/configuration.md documents the ACL user");
    std::iter::once("on")
        .chain(line[PREFIX.len()..].split_whitespace())
        .map(str::to_owned)
        .collect()
}

/// Two replicas (as the README's least-privilege ACL user); `pause` lets the calls in
/// flight finish and settle, then nothing is read while entries arrive (the lag grows),
/// not by a replica started meanwhile either; `status` and the gauge say paused; `resume`
/// handles everything that waited.
#[test]
fn pause_holds_every_replica_and_resume_handles_what_waited() {
    let redis = RedisServer::start();
    // Calls are counted when they arrive (the hook records a hit when it answers).
    let started = Arc::new(AtomicUsize::new(0));
    let counter = started.clone();
    let hook = WebhookServer::start_with(move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
        (200, Duration::from_secs(3))
    });
    let mut con = redis.connection();
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("streamworker")
        .arg(">acl-pw")
        .arg(readme_acl_rules())
        .query(&mut con)
        .expect("ACL SETUSER with the README's rules");
    let url = format!("redis://streamworker:acl-pw@127.0.0.1:{}/0", redis.port);
    let (cfg1, http1) = config_with_http(&url, "r1", &webhook_group(&hook.url("r1")));
    let (cfg2, http2) = config_with_http(&url, "r2", &webhook_group(&hook.url("r2")));
    let r1 = Daemon::start(&cfg1);
    let r2 = Daemon::start(&cfg2);
    wait_until(
        Duration::from_secs(20),
        "both replicas report the group running",
        || paused_gauge(&http1) == Some(0.0) && paused_gauge(&http2) == Some(0.0),
    );

    // Four calls in flight (each held 3 s), then the pause.
    let first = produce(
        &mut con,
        "orders",
        &(0..4)
            .map(|i| vec![("n", i.to_string())])
            .collect::<Vec<_>>(),
    );
    wait_until(
        Duration::from_secs(10),
        "four handler calls in flight",
        || started.load(Ordering::SeqCst) == 4,
    );
    let (code, out, err) = cli(&["pause", "--group", "billing"], &r1.config_path);
    assert_eq!(code, 0, "pause failed: {out}{err}");
    assert!(
        out.contains("paused group billing on stream orders"),
        "{out}"
    );
    wait_until(
        Duration::from_secs(10),
        "both replicas hold the group paused",
        || paused_gauge(&http1) == Some(1.0) && paused_gauge(&http2) == Some(1.0),
    );
    assert!(
        hook.count() < 4,
        "the calls finished before the pause took hold; nothing was in flight to finish"
    );
    // The calls in flight finish and their acknowledgements go out while paused.
    wait_until(
        Duration::from_secs(15),
        "the in-flight entries acknowledged",
        || group_info(&mut con, "orders", "billing") == Some((0, Some(0))),
    );
    let handled = hook.handled();
    assert!(
        first.iter().all(|id| handled.get(id) == Some(&1)),
        "{handled:?}"
    );
    let key_exists: bool = redis::cmd("EXISTS")
        .arg("{orders}:streamworker:paused:billing")
        .query(&mut con)
        .unwrap();
    assert!(key_exists, "the pause key is not where the docs say");

    // A replica started while paused reads nothing either.
    let (cfg3, http3) = config_with_http(&url, "r3", &webhook_group(&hook.url("r3")));
    let r3 = Daemon::start(&cfg3);
    wait_until(
        Duration::from_secs(20),
        "the new replica holds the group paused",
        || paused_gauge(&http3) == Some(1.0),
    );

    // Entries produced while paused are not read by either replica: the lag grows.
    let later = produce(
        &mut con,
        "orders",
        &(0..20)
            .map(|i| vec![("n", (100 + i).to_string())])
            .collect::<Vec<_>>(),
    );
    // A negative: give both loops several claim_intervals (200 ms) and a whole `block`.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        started.load(Ordering::SeqCst),
        4,
        "a paused group called its handler"
    );
    assert_eq!(
        group_info(&mut con, "orders", "billing"),
        Some((0, Some(20)))
    );

    let (code, out, err) = cli(&["status"], &r1.config_path);
    assert_eq!(code, 0, "{err}");
    let row = out
        .lines()
        .find(|l| l.trim_start().starts_with("billing"))
        .unwrap_or_else(|| panic!("no billing row in:\n{out}"));
    assert!(row.trim_end().ends_with("paused"), "{out}");
    let (code, out, err) = cli(&["status", "--json"], &r1.config_path);
    assert_eq!(code, 0, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).expect("status --json is JSON");
    assert_eq!(json[0]["groups"][0]["paused"], true, "{out}");

    // Pausing twice says so and changes nothing.
    let (code, out, _) = cli(&["pause", "--group", "billing", "--json"], &r1.config_path);
    assert_eq!(code, 0);
    let again: serde_json::Value = serde_json::from_str(&out).expect("pause --json is JSON");
    assert_eq!(again["changed"], false, "{out}");

    let resumed_at = Instant::now();
    let (code, out, err) = cli(&["resume", "--group", "billing"], &r1.config_path);
    assert_eq!(code, 0, "resume failed: {out}{err}");
    assert!(
        out.contains("resumed group billing on stream orders"),
        "{out}"
    );
    let cli_took = resumed_at.elapsed();
    wait_until(
        Duration::from_secs(10),
        "the first call after resume",
        || started.load(Ordering::SeqCst) > 4,
    );
    let first_call = resumed_at.elapsed();
    eprintln!(
        "first handler call {first_call:?} after `resume` started ({cli_took:?} of it the command itself; claim_interval 200 ms)"
    );
    wait_until(
        Duration::from_secs(30),
        "everything produced while paused handled",
        || {
            let handled = hook.handled();
            later.iter().all(|id| handled.contains_key(id))
                && group_info(&mut con, "orders", "billing") == Some((0, Some(0)))
        },
    );
    assert!(
        [&http1, &http2, &http3]
            .iter()
            .all(|http| paused_gauge(http) == Some(0.0))
    );
    for daemon in [&r1, &r2, &r3] {
        assert!(!daemon.logs().contains("NOPERM"), "{}", daemon.logs());
    }
    let (_, out, _) = cli(&["status"], &r1.config_path);
    assert!(
        out.lines()
            .any(|l| l.trim_start().starts_with("billing") && l.trim_end().ends_with("running")),
        "{out}"
    );
}

/// A `streamworker run -c FILE <args…>` child, stopped when dropped.
struct Run {
    child: Child,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Run {
    fn start(config: &str, args: &[&str]) -> Self {
        Self::start_logging(config, args, "info")
    }

    fn start_logging(config: &str, args: &[&str], rust_log: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("streamworker.toml");
        std::fs::write(&path, config).expect("write config");
        let log = dir.path().join("streamworker.log");
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(binary())
            .arg("run")
            .arg("-c")
            .arg(&path)
            .args(args)
            .env("RUST_LOG", rust_log)
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .stdin(Stdio::null())
            .spawn()
            .expect("the streamworker binary runs");
        Self {
            child,
            log,
            _dir: dir,
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn three_groups(disabled: &str) -> String {
    let mut out = String::new();
    for name in ["a", "b", "c"] {
        out.push_str(&format!(
            "[groups.{name}]\nstream = \"s_{name}\"\nhandler = \"noop\"\n{}\n",
            if name == disabled {
                "enabled = false"
            } else {
                ""
            }
        ));
    }
    out
}

/// `run --groups a,b` runs a and not c; b has `enabled = false` and is skipped all the
/// same. Without `--groups`, every enabled group runs. A name the file lacks is refused.
#[test]
fn run_groups_runs_only_the_named_enabled_groups() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    for name in ["a", "b", "c"] {
        produce(&mut con, &format!("s_{name}"), &[vec![("n", "1".into())]]);
    }
    let cfg = config(&redis.url(), "r1", &three_groups("b"));

    let only = Run::start(&cfg, &["--groups", "a,b"]);
    wait_until(Duration::from_secs(20), "group a handled its entry", || {
        group_info(&mut con, "s_a", "a") == Some((0, Some(0)))
    });
    // Setup creates a group before reading; give the others time they would have needed.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        group_info(&mut con, "s_b", "b"),
        None,
        "the disabled group ran"
    );
    assert_eq!(
        group_info(&mut con, "s_c", "c"),
        None,
        "a group --groups left out ran"
    );
    let logs = only.logs();
    assert!(
        logs.contains("not running this group") && logs.contains("enabled = false"),
        "{logs}"
    );
    drop(only);

    let all = Run::start(&cfg, &[]);
    wait_until(Duration::from_secs(20), "group c handled its entry", || {
        group_info(&mut con, "s_c", "c") == Some((0, Some(0)))
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        group_info(&mut con, "s_b", "b"),
        None,
        "the disabled group ran"
    );
    drop(all);

    // Names the file lacks, and nothing left to run, are usage errors (exit 2).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("streamworker.toml");
    std::fs::write(&path, &cfg).unwrap();
    let path = path.to_str().unwrap();
    let (code, _, err) = run_cli(&["run", "-c", path, "--groups", "a,nope"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("nope") && err.contains("its groups: a, b, c"),
        "{err}"
    );
    let (code, _, err) = run_cli(&["run", "-c", path, "--groups", "b"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("no group to run: b has enabled = false"),
        "{err}"
    );
}

/// `check` still checks a disabled group, and prints `enabled`.
#[test]
fn check_checks_disabled_groups() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("streamworker.toml");
    std::fs::write(
        &path,
        config("redis://127.0.0.1:1", "r1", &three_groups("b")),
    )
    .unwrap();
    let (code, out, err) = run_cli(&["check", "-c", path.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("enabled = false"), "{out}");

    let broken = three_groups("b").replace(
        "[groups.b]\n",
        "[groups.b]\nhandler_timeout = \"10s\"\nclaim_idle = \"5s\"\n",
    );
    std::fs::write(&path, config("redis://127.0.0.1:1", "r1", &broken)).unwrap();
    let (code, _, err) = run_cli(&["check", "-c", path.to_str().unwrap()], &[]);
    assert_eq!(
        code, 2,
        "a disabled group's problems must still be reported: {err}"
    );
    assert!(err.contains("groups.b"), "{err}");
}

/// With one Deployment per group, retention on a shared stream waits for the groups the
/// other Deployments run (not yet created), but not for a group with `enabled = false`.
#[test]
fn retention_waits_for_groups_another_deployment_runs() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let ids = produce(
        &mut con,
        "events",
        &(0..100)
            .map(|i| vec![("n", i.to_string())])
            .collect::<Vec<_>>(),
    );
    let groups = r#"
[streams.events]
retention = { max_len = 10 }

[groups.a]
stream = "events"
handler = "noop"

[groups.b]
stream = "events"
handler = "noop"
enabled = false

[groups.c]
stream = "events"
handler = "noop"
"#;
    let xlen =
        |con: &mut redis::Connection| redis::cmd("XLEN").arg("events").query::<u64>(con).unwrap();
    let waits = |run: &Run| {
        run.logs()
            .lines()
            .filter(|l| l.contains("retention waits until every configured group exists"))
            .filter(|l| l.contains(r#""group":"c""#))
            .count()
    };
    let a = Run::start_logging(
        &config(&redis.url(), "a1", groups),
        &["--groups", "a"],
        "info,streamworker::maintenance=debug",
    );
    wait_until(
        Duration::from_secs(20),
        "group a handled everything",
        || group_info(&mut con, "events", "a") == Some((0, Some(0))),
    );
    let before = waits(&a);
    wait_until(
        Duration::from_secs(20),
        "a retention pass after group a caught up",
        || waits(&a) > before,
    );
    assert_eq!(xlen(&mut con), 100, "trimmed before group c existed");

    let _c = Run::start(&config(&redis.url(), "c1", groups), &["--groups", "c"]);
    wait_until(
        Duration::from_secs(30),
        "trimmed to max_len once c caught up",
        || xlen(&mut con) == 10,
    );
    assert_eq!(entries(&mut con, "events")[0].0, ids[90]);
    assert_eq!(group_info(&mut con, "events", "b"), None);
}

/// A paused group with lag is waiting on purpose: `/livez` stays 200 past the
/// `2 × handler_timeout + 30s` after which a loop that fetches nothing while its group has
/// lag counts as stalled (Kubernetes would otherwise restart every paused pod).
#[test]
fn a_paused_group_with_lag_stays_live() {
    let redis = RedisServer::start();
    let groups = r#"
[groups.billing]
stream = "orders"
handler = "noop"
handler_timeout = "1s"
claim_idle = "5s"
block = "500ms"
"#;
    let (cfg, http) = config_with_http(&redis.url(), "r1", groups);
    let daemon = Daemon::start(&cfg);
    wait_until(Duration::from_secs(20), "live", || {
        http_get(&http, "/livez").map(|(s, _)| s) == Some(200)
    });
    let (code, out, err) = cli(&["pause", "--group", "billing"], &daemon.config_path);
    assert_eq!(code, 0, "{out}{err}");
    wait_until(Duration::from_secs(10), "paused", || {
        paused_gauge(&http) == Some(1.0)
    });
    let mut con = redis.connection();
    produce(
        &mut con,
        "orders",
        &(0..10)
            .map(|i| vec![("n", i.to_string())])
            .collect::<Vec<_>>(),
    );
    // 2 × 1 s + 30 s, plus a housekeeping turn (5 s) to see the lag, plus slack.
    let until = Instant::now() + Duration::from_secs(42);
    while Instant::now() < until {
        let live = http_get(&http, "/livez");
        assert_eq!(
            live.as_ref().map(|(s, _)| *s),
            Some(200),
            "a paused group was reported stalled: {live:?}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    assert_eq!(
        group_info(&mut con, "orders", "billing"),
        Some((0, Some(10)))
    );
}
