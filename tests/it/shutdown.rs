//! Shutdown, fully (README "Graceful shutdown", docs/operations.md "Rolling deploys" and
//! "Exit codes"): in-flight entries finish and are acknowledged; the time from the signal
//! to the exit is bounded when idle, when handlers (or a tick) outlast `shutdown_timeout`,
//! and when Redis is down; every exit code of `run`; SIGINT as SIGTERM; a group lost to
//! NOGROUP is recreated; and the whole path under the README's least-privilege ACL user,
//! with the server's ACL log as the witness that nothing was refused.
//!
//! Entries fetched but never started are handed back: that is
//! `delivery::sigterm_hands_back_entries_fetched_but_never_started` (and the ACL test
//! below hands back a warehouse batch).

use std::collections::HashSet;
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::support::*;

/// Added to every upper bound on a duration: the suite runs on a loaded 2-core machine.
const SLACK: Duration = Duration::from_secs(3);

/// The promised bound on the time from the first signal to the exit: the deadline, then at
/// most 2 s to settle what was decided and to stop.
fn shutdown_bound(shutdown_timeout: Duration) -> Duration {
    shutdown_timeout + Duration::from_secs(2) + SLACK
}

/// `config(…)` with another `worker.shutdown_timeout`.
fn with_shutdown_timeout(config: &str, timeout: &str) -> String {
    const DEFAULT: &str = "shutdown_timeout = \"10s\"";
    assert!(
        config.contains(DEFAULT),
        "support::config changed: {config}"
    );
    config.replace(DEFAULT, &format!("shutdown_timeout = \"{timeout}\""))
}

/// Sends `signal` and waits for the exit; fails unless it came within `bound`. Waits a
/// while longer than `bound` before giving up, so a failure reports how long it did take.
fn signal_and_wait(daemon: &mut Daemon, signal: i32, bound: Duration) -> (ExitStatus, Duration) {
    let sent = Instant::now();
    daemon.signal(signal);
    let status = daemon.wait(bound + Duration::from_secs(20));
    let took = sent.elapsed();
    let Some(status) = status else {
        panic!(
            "still running {took:?} after signal {signal} (bound {bound:?}):\n{}",
            daemon.logs()
        );
    };
    assert!(
        took <= bound,
        "exited ({status}) {took:?} after signal {signal}, more than {bound:?}:\n{}",
        daemon.logs()
    );
    eprintln!("signal {signal}: exited ({status}) after {took:?} (bound {bound:?})");
    (status, took)
}

/// Ids pending for `consumer` (extended XPENDING); a missing group fails the test.
fn pending_ids(
    con: &mut redis::Connection,
    stream: &str,
    group: &str,
    consumer: &str,
) -> Vec<String> {
    let rows: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .arg("-")
        .arg("+")
        .arg(100_000)
        .arg(consumer)
        .query(con)
        .unwrap_or_else(|e| panic!("XPENDING {stream} {group} - + 100000 {consumer}: {e}"));
    rows.into_iter().map(|(id, ..)| id).collect()
}

/// Pending entries of the group as (id, owner, idle ms, delivery count).
fn pending_rows(
    con: &mut redis::Connection,
    stream: &str,
    group: &str,
) -> Vec<(String, String, u64, u64)> {
    redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .arg("-")
        .arg("+")
        .arg(100_000)
        .query(con)
        .unwrap_or_else(|e| panic!("XPENDING {stream} {group} - + 100000: {e}"))
}

/// Whether `group`'s read connection for `consumer` is blocked in XREADGROUP right now.
fn read_blocked(con: &mut redis::Connection, group: &str, consumer: &str) -> bool {
    let list: String = redis::cmd("CLIENT").arg("LIST").query(con).unwrap();
    list.lines().any(|l| {
        l.contains(&format!("name=streamworker:{group}:{consumer} "))
            && l.contains("cmd=xreadgroup")
            && l.contains(" flags=b ")
    })
}

fn numbered(n: usize) -> Vec<Vec<(&'static str, String)>> {
    (0..n).map(|i| vec![("n", i.to_string())]).collect()
}

/// A webhook group on `orders` whose calls may run up to `timeout`.
fn webhook_group(
    group: &str,
    url: &str,
    concurrency: usize,
    timeout: &str,
    claim_idle: &str,
) -> String {
    format!(
        r#"
[groups.{group}]
stream = "orders"
handler = "webhook"
concurrency = {concurrency}
block = "500ms"
handler_timeout = "{timeout}"
claim_idle = "{claim_idle}"
retry_backoff = {{ initial = "100ms", max = "1s" }}
[groups.{group}.options]
url = "{url}"
timeout = "{timeout}"
"#
    )
}

/// The first signal (SIGTERM or SIGINT) while every handler slot is busy with a 1.5 s
/// call: the calls finish, their entries are acknowledged (nothing pending for the
/// consumer or the group), nothing new starts, each entry was handled exactly once, the
/// process exits 0 as soon as the work is done (not at the deadline).
fn in_flight_entries_finish_and_are_acknowledged(signal: i32) {
    const CALL: Duration = Duration::from_millis(1500);
    let redis = RedisServer::start();
    let hook = WebhookServer::start_with(|_| (200, CALL));
    let group = webhook_group("billing", &hook.url("a"), 4, "5s", "10s");
    let mut daemon = Daemon::start(&config(&redis.url(), "a", &group));
    let mut con = redis.connection();
    let ids = produce(&mut con, "orders", &numbered(10));
    // An entry is fetched only into a free slot, so what is pending for `a` is running.
    wait_until(Duration::from_secs(20), "four calls in flight", || {
        group_info(&mut con, "orders", "billing").is_some()
            && pending_of(&mut con, "orders", "billing", "a") == 4
    });
    let in_flight = pending_ids(&mut con, "orders", "billing", "a");
    let sent = Instant::now();
    // The work left is at most one call; the deadline (10 s) is far away.
    let (status, _) = signal_and_wait(&mut daemon, signal, CALL + SLACK);
    let logs = daemon.logs();
    assert_eq!(status.code(), Some(0), "{logs}");
    assert!(
        logs.contains("stopped reading; finishing in-flight entries"),
        "{logs}"
    );
    assert!(logs.contains("shut down cleanly"), "{logs}");

    let hits = hook.hits();
    assert!(hits.iter().all(|h| h.status == 200), "{hits:?}");
    let handled = hook.handled();
    assert_eq!(
        hits.len(),
        handled.len(),
        "each entry handled exactly once: {handled:?}"
    );
    for id in &in_flight {
        assert!(
            handled.contains_key(id),
            "{id} was in flight before the signal and never finished: {handled:?}"
        );
    }
    let running_at_signal = hits.iter().filter(|h| h.at + CALL > sent).count();
    assert!(
        running_at_signal >= 1,
        "some call was running at the signal: {hits:?}"
    );
    let late: Vec<_> = hits
        .iter()
        .filter(|h| h.at > sent + Duration::from_millis(500))
        .collect();
    assert!(late.is_empty(), "calls started after the signal: {late:?}");

    // Acknowledged: nothing pending at all; the entries never fetched wait for others.
    assert_eq!(pending_of(&mut con, "orders", "billing", "a"), 0);
    assert_eq!(pending_rows(&mut con, "orders", "billing"), vec![]);
    let handled_ids: HashSet<&String> = handled.keys().collect();
    assert!(handled_ids.iter().all(|id| ids.contains(id)));
    assert_eq!(
        group_info(&mut con, "orders", "billing"),
        Some((0, Some((ids.len() - handled.len()) as u64))),
        "the {} entries never fetched are still there for other replicas",
        ids.len() - handled.len()
    );
}

#[test]
fn sigterm_finishes_in_flight_entries_and_acknowledges_them() {
    in_flight_entries_finish_and_are_acknowledged(libc::SIGTERM);
}

#[test]
fn sigint_finishes_in_flight_entries_like_sigterm() {
    in_flight_entries_finish_and_are_acknowledged(libc::SIGINT);
}

/// An alerts group: a tick every 200 ms, and an alert event per firing of `count`.
fn alerts_group(group: &str, extra_options: &str) -> String {
    format!(
        r#"
[groups.{group}]
stream = "orders"
handler = "alerts"
block = "500ms"
[groups.{group}.options]
stream = "alerts"
evaluate_every = "200ms"
{extra_options}
[[groups.{group}.options.rules]]
name = "any-entry"
kind = "count"
window = "5s"
threshold = 1
"#
    )
}

#[test]
fn an_idle_daemon_exits_at_once_waking_its_blocked_reads() {
    let redis = RedisServer::start();
    let hook = WebhookServer::start();
    // Reads block for 15 s: only CLIENT UNBLOCK lets the process exit sooner.
    let groups = format!(
        "{}{}",
        webhook_group("billing", &hook.url("a"), 4, "2s", "5s")
            .replace("block = \"500ms\"", "block = \"15s\""),
        alerts_group("watch", "").replace("block = \"500ms\"", "block = \"15s\""),
    );
    let cfg = with_shutdown_timeout(&config(&redis.url(), "a", &groups), "20s");
    let mut daemon = Daemon::start(&cfg);
    let mut con = redis.connection();
    produce(&mut con, "orders", &numbered(1));
    wait_until(Duration::from_secs(20), "the entry handled", || {
        hook.handled().len() == 1
    });
    wait_until(Duration::from_secs(20), "the alert (a tick ran)", || {
        redis::cmd("XLEN")
            .arg("alerts")
            .query::<u64>(&mut con)
            .unwrap()
            == 1
    });
    wait_until(Duration::from_secs(20), "both reads blocked", || {
        read_blocked(&mut con, "billing", "a") && read_blocked(&mut con, "watch", "a")
    });
    let (status, _) = signal_and_wait(&mut daemon, libc::SIGTERM, Duration::from_secs(2) + SLACK);
    assert_eq!(status.code(), Some(0), "{}", daemon.logs());
    assert_eq!(
        group_info(&mut con, "orders", "billing"),
        Some((0, Some(0)))
    );
    // The leases (consumer name, tick) are given back, not left to expire.
    for pattern in ["streamworker:lease:*", "streamworker:tick:*"] {
        let leases: Vec<String> = redis::cmd("KEYS").arg(pattern).query(&mut con).unwrap();
        assert_eq!(leases, Vec::<String>::new(), "leases released at shutdown");
    }
}

#[test]
fn handlers_slower_than_shutdown_timeout_are_cut_off_with_exit_3_and_others_take_their_entries() {
    let redis = RedisServer::start();
    // a's calls would take 30 s; b answers at once.
    let hook = WebhookServer::start_with(|hit| match hit.path.as_str() {
        "a" => (200, Duration::from_secs(30)),
        _ => (200, Duration::ZERO),
    });
    let group = |path: &str| webhook_group("billing", &hook.url(path), 2, "4s", "5s");
    let cfg = with_shutdown_timeout(&config(&redis.url(), "a", &group("a")), "1s");
    let mut daemon = Daemon::start(&cfg);
    let mut con = redis.connection();
    let ids = produce(&mut con, "orders", &numbered(2));
    wait_until(Duration::from_secs(20), "both calls in flight", || {
        group_info(&mut con, "orders", "billing").is_some()
            && pending_of(&mut con, "orders", "billing", "a") == 2
    });
    let (status, _) = signal_and_wait(
        &mut daemon,
        libc::SIGTERM,
        shutdown_bound(Duration::from_secs(1)),
    );
    let logs = daemon.logs();
    assert_eq!(status.code(), Some(3), "cut off at the deadline:\n{logs}");
    assert!(logs.contains("shutdown deadline reached"), "{logs}");
    assert!(!logs.contains("shut down cleanly"), "{logs}");
    // Their entries stay pending for a, attempt counted, until another replica claims them.
    let rows = pending_rows(&mut con, "orders", "billing");
    assert_eq!(
        rows.iter()
            .map(|(id, owner, _, count)| (id.clone(), owner.clone(), *count))
            .collect::<Vec<_>>(),
        ids.iter()
            .map(|id| (id.clone(), "a".to_owned(), 1))
            .collect::<Vec<_>>(),
    );

    let _b = Daemon::start(&config(&redis.url(), "b", &group("b")));
    wait_until(
        Duration::from_secs(30),
        "b to handle the cut-off entries",
        || hook.hits().iter().filter(|h| h.path == "b").count() == 2,
    );
    for hit in hook.hits().iter().filter(|h| h.path == "b") {
        assert!(ids.contains(&hit.id), "{hit:?}");
        assert_eq!(hit.delivery_count, 2, "the cut-off attempt counts: {hit:?}");
    }
    wait_until(Duration::from_secs(10), "nothing pending", || {
        group_info(&mut con, "orders", "billing").map(|(p, _)| p) == Some(0)
    });
}

#[test]
fn a_tick_slower_than_shutdown_timeout_is_cut_off_at_the_deadline() {
    let redis = RedisServer::start();
    // The alert's Slack-style webhook hangs; the tick waits for it up to webhook_timeout.
    let started = Arc::new(AtomicUsize::new(0));
    let seen = started.clone();
    let slack = WebhookServer::start_with(move |_| {
        seen.fetch_add(1, Ordering::SeqCst);
        (200, Duration::from_secs(60))
    });
    let group = alerts_group(
        "watch",
        &format!(
            "webhook = \"{}\"\nwebhook_timeout = \"20s\"",
            slack.url("slack")
        ),
    )
    .replace(
        "block = \"500ms\"",
        "block = \"500ms\"\nhandler_timeout = \"25s\"\nclaim_idle = \"30s\"\nretry_backoff = { initial = \"100ms\", max = \"1s\" }",
    );
    let cfg = with_shutdown_timeout(&config(&redis.url(), "a", &group), "1s");
    let mut daemon = Daemon::start(&cfg);
    let mut con = redis.connection();
    produce(&mut con, "orders", &numbered(1));
    wait_until(
        Duration::from_secs(20),
        "the tick calling the alert webhook",
        || started.load(Ordering::SeqCst) == 1,
    );
    let (status, _) = signal_and_wait(
        &mut daemon,
        libc::SIGTERM,
        shutdown_bound(Duration::from_secs(1)),
    );
    assert_eq!(
        status.code(),
        Some(3),
        "work still running at the deadline was cut off:\n{}",
        daemon.logs()
    );
}

#[test]
fn shutdown_with_redis_down_is_bounded() {
    let mut redis = RedisServer::start();
    let hook = WebhookServer::start();
    let groups = format!(
        "{}{}",
        webhook_group("billing", &hook.url("a"), 4, "2s", "5s"),
        alerts_group("watch", "")
    );
    let cfg = with_shutdown_timeout(&config(&redis.url(), "a", &groups), "3s");
    let mut daemon = Daemon::start(&cfg);
    let mut con = redis.connection();
    produce(&mut con, "orders", &numbered(1));
    wait_until(Duration::from_secs(20), "the entry handled", || {
        hook.handled().len() == 1
    });
    wait_until(Duration::from_secs(20), "acknowledged", || {
        group_info(&mut con, "orders", "billing") == Some((0, Some(0)))
    });
    drop(con);
    redis.kill();
    daemon.wait_for_log(
        Duration::from_secs(20),
        "lost Redis; reconnecting with backoff",
    );
    let (status, _) = signal_and_wait(
        &mut daemon,
        libc::SIGTERM,
        shutdown_bound(Duration::from_secs(3)),
    );
    assert_eq!(
        status.code(),
        Some(0),
        "nothing was in flight or left to tell Redis:\n{}",
        daemon.logs()
    );
}

/// Redis goes down while a call runs: its acknowledgement cannot be sent. The drain waits
/// for Redis until the deadline, makes one last bounded attempt, and exits 3: the entry
/// stays pending (for this consumer) and is handled again after recovery.
#[test]
fn an_acknowledgement_unsent_because_redis_is_down_is_cut_off_at_the_deadline() {
    let mut redis = RedisServer::start();
    let started = Arc::new(AtomicUsize::new(0));
    let seen = started.clone();
    let hook = WebhookServer::start_with(move |_| {
        seen.fetch_add(1, Ordering::SeqCst);
        (200, Duration::from_secs(2))
    });
    let group = webhook_group("billing", &hook.url("a"), 4, "5s", "10s");
    let (cfg, http) = config_with_http(&redis.url(), "a", &group);
    let mut daemon = Daemon::start(&with_shutdown_timeout(&cfg, "3s"));
    let mut con = redis.connection();
    produce(&mut con, "orders", &numbered(1));
    wait_until(Duration::from_secs(20), "the call in flight", || {
        started.load(Ordering::SeqCst) == 1
    });
    drop(con);
    redis.kill();
    // The call's result is in; its acknowledgement waits for Redis.
    wait_until(
        Duration::from_secs(20),
        "the call settled in the process",
        || {
            hook.handled().len() == 1
                && http_get(&http, "/metrics").is_some_and(|(_, text)| {
                    metric(&text, "streamworker_inflight", &[("group", "billing")]) == Some(0.0)
                })
        },
    );
    assert_eq!(hook.handled().len(), 1, "the call succeeded");
    let (status, _) = signal_and_wait(
        &mut daemon,
        libc::SIGTERM,
        shutdown_bound(Duration::from_secs(3)),
    );
    let logs = daemon.logs();
    assert_eq!(status.code(), Some(3), "{logs}");
    assert!(logs.contains("shutdown deadline reached"), "{logs}");
    assert!(logs.contains("\"unsettled\":1"), "{logs}");
    assert!(!logs.contains("shut down cleanly"), "{logs}");
}

#[test]
fn a_second_signal_exits_at_once_with_130_leaving_the_entry_pending() {
    let redis = RedisServer::start();
    let started = Arc::new(AtomicUsize::new(0));
    let seen = started.clone();
    let hook = WebhookServer::start_with(move |_| {
        seen.fetch_add(1, Ordering::SeqCst);
        (200, Duration::from_secs(30))
    });
    let group = webhook_group("billing", &hook.url("a"), 4, "25s", "30s");
    let cfg = with_shutdown_timeout(&config(&redis.url(), "a", &group), "20s");
    let mut daemon = Daemon::start(&cfg);
    let mut con = redis.connection();
    let ids = produce(&mut con, "orders", &numbered(1));
    wait_until(Duration::from_secs(20), "the call in flight", || {
        started.load(Ordering::SeqCst) == 1
    });
    daemon.terminate();
    daemon.wait_for_log(Duration::from_secs(10), "shutting down: reading stopped");
    assert!(
        daemon.is_running(),
        "the first signal waits for the call:\n{}",
        daemon.logs()
    );
    // The second may be the other kind: SIGINT after SIGTERM.
    let (status, _) = signal_and_wait(&mut daemon, libc::SIGINT, SLACK);
    let logs = daemon.logs();
    assert_eq!(status.code(), Some(130), "{logs}");
    assert!(logs.contains("second signal: exiting now"), "{logs}");
    let rows = pending_rows(&mut con, "orders", "billing");
    assert_eq!(
        rows.iter()
            .map(|(id, owner, _, count)| (id.clone(), owner.clone(), *count))
            .collect::<Vec<_>>(),
        vec![(ids[0].clone(), "a".to_owned(), 1)],
        "the unfinished entry stays pending for other replicas"
    );
}

#[test]
fn run_exits_2_on_a_bad_configuration_without_touching_redis() {
    let redis = RedisServer::start();
    let hook = WebhookServer::start();
    // A read blocking as long as shutdown may take could outlast the shutdown.
    let group = webhook_group("billing", &hook.url("a"), 4, "2s", "5s")
        .replace("block = \"500ms\"", "block = \"10s\"");
    let mut daemon = Daemon::start(&config(&redis.url(), "a", &group));
    let status = daemon
        .wait(Duration::from_secs(15))
        .expect("a bad configuration ends the process");
    let logs = daemon.logs();
    assert_eq!(status.code(), Some(2), "{logs}");
    assert!(
        logs.contains("groups.billing.block") && logs.contains("worker.shutdown_timeout"),
        "the message names both keys: {logs}"
    );
    let mut con = redis.connection();
    let exists: u64 = redis::cmd("EXISTS").arg("orders").query(&mut con).unwrap();
    assert_eq!(exists, 0, "no group was created");
}

/// Exit 1 for a consumer name held by a live process is
/// `delivery::a_consumer_name_held_by_a_live_process_is_refused`.
#[test]
fn run_exits_1_when_redis_rejects_the_credentials() {
    let redis = RedisServer::start_with(&["--requirepass", "right-password"]);
    let group = r#"
[groups.billing]
stream = "orders"
handler = "noop"
"#;
    let url = format!("redis://:wrong-password@127.0.0.1:{}/0", redis.port);
    let mut daemon = Daemon::start(&config(&url, "a", group));
    let status = daemon
        .wait(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("waiting cannot fix a wrong password:\n{}", daemon.logs()));
    let logs = daemon.logs();
    assert_eq!(status.code(), Some(1), "{logs}");
    assert!(
        !logs.contains("wrong-password"),
        "the password is redacted: {logs}"
    );
    let port = redis.port;
    assert!(
        logs.contains("Password authentication failed")
            && logs.contains(&format!("redis://:<redacted>@127.0.0.1:{port}/0")),
        "the message says what is wrong and with which server: {logs}"
    );
}

#[test]
fn a_destroyed_group_is_recreated_logged_and_counted() {
    let redis = RedisServer::start();
    let hook = WebhookServer::start();
    let (cfg, http) = config_with_http(
        &redis.url(),
        "a",
        &webhook_group("billing", &hook.url("a"), 4, "2s", "5s"),
    );
    let daemon = Daemon::start(&cfg);
    let recreated = || {
        let (status, text) = http_get(&http, "/metrics").expect("the daemon serves /metrics");
        assert_eq!(status, 200, "{text}");
        metric(
            &text,
            "streamworker_group_recreated_total",
            &[("group", "billing")],
        )
        .unwrap_or_else(|| panic!("no streamworker_group_recreated_total for billing in:\n{text}"))
    };
    let mut con = redis.connection();
    let before = produce(&mut con, "orders", &numbered(1));
    wait_until(Duration::from_secs(20), "the first entry handled", || {
        hook.handled().len() == 1
    });
    assert_eq!(recreated(), 0.0);

    let _: () = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg("orders")
        .arg("billing")
        .query(&mut con)
        .unwrap();
    daemon.wait_for_log(
        Duration::from_secs(20),
        "recreated the consumer group, which Redis had lost (NOGROUP)",
    );
    wait_until(Duration::from_secs(10), "the re-creation counted", || {
        recreated() == 1.0
    });
    let after = produce(&mut con, "orders", &numbered(3));
    wait_until(Duration::from_secs(20), "the new entries handled", || {
        let handled = hook.handled();
        after.iter().all(|id| handled.contains_key(id))
    });
    // Recreated at its start_id ("0"): the whole stream is delivered again.
    wait_until(
        Duration::from_secs(10),
        "the old entry handled again",
        || hook.handled().get(&before[0]) == Some(&2),
    );
    wait_until(Duration::from_secs(10), "nothing pending", || {
        group_info(&mut con, "orders", "billing") == Some((0, Some(0)))
    });
    assert_eq!(recreated(), 1.0, "recreated once");
}

/// Every kind of Redis work the daemon does, under the README's least-privilege user,
/// without TLS: startup (group creation, lease, own-pending resync), handling with effects
/// (analytics), a retry (park, reclaim), a dead letter, the housekeeping (retention,
/// consumer cleanup, group gauges), a leased tick (alerts, reading lags and consumers),
/// lease renewals, a warehouse batch written, and SIGTERM with a blocked read woken and a
/// batch handed back. Then the server's ACL log must be empty: nothing was refused,
/// including the calls whose failures are only logged at debug.
#[test]
fn the_whole_shutdown_path_runs_under_the_readme_acl_user() {
    let user = format!("streamworker >acl-user-pw {}", readme_acl_rules());
    let mut args = vec!["--user".to_owned()];
    args.extend(user.split_whitespace().map(str::to_owned));
    // The default user stays as it is (no password, all commands): the test's own connection.
    let redis = RedisServer::start_with(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let mut con = redis.connection();
    let _: () = redis::cmd("ACL")
        .arg("LOG")
        .arg("RESET")
        .query(&mut con)
        .unwrap();

    let hook = WebhookServer::start_with(|hit| {
        if hit.body["fields"]["kind"] == "bad" {
            (400, Duration::ZERO)
        } else if hit.delivery_count == 1 && hit.body["fields"]["kind"] == "flaky" {
            (503, Duration::ZERO)
        } else {
            (200, Duration::ZERO)
        }
    });
    let exports = tempfile::tempdir().unwrap();
    let groups = format!(
        r#"
[streams.orders]
retention = {{ max_len = 5 }}

[groups.billing]
stream = "orders"
handler = "webhook"
block = "500ms"
handler_timeout = "1s"
claim_idle = "2s"
consumer_ttl = "3s"
retry_backoff = {{ initial = "100ms", max = "500ms" }}
[groups.billing.options]
url = "{url}"
timeout = "1s"

[groups.usage]
stream = "orders"
handler = "analytics"
block = "500ms"
[groups.usage.options]
dimensions = ["kind"]

[groups.watch]
stream = "orders"
handler = "alerts"
block = "500ms"
[groups.watch.options]
stream = "alerts"
channel = "streamworker:alerts"
evaluate_every = "200ms"
[[groups.watch.options.rules]]
name = "bad-entries"
kind = "count"
when = {{ kind = "bad" }}
window = "10s"
threshold = 1
[[groups.watch.options.rules]]
name = "billing-lag"
kind = "lag"
group = "billing"
threshold = 1000
[[groups.watch.options.rules]]
name = "billing-consumers"
kind = "consumers"
group = "billing"
window = "10s"
threshold = 1

[groups.exports]
stream = "exports"
handler = "warehouse"
concurrency = 100
block = "500ms"
handler_timeout = "2s"
claim_idle = "30s"
retry_backoff = {{ initial = "100ms", max = "1s" }}
[groups.exports.options]
directory = "{dir}"
batch_size = 3
max_wait = "20s"
"#,
        url = hook.url("a"),
        dir = exports.path().display()
    );
    let url = format!(
        "redis://streamworker:acl-user-pw@127.0.0.1:{}/0",
        redis.port
    );
    let (cfg, http) = config_with_http(&url, "a", &groups);

    // A consumer left by a replica long gone, for the cleanup to delete.
    create_group(&mut con, "orders", "billing", "0");
    let _: i64 = redis::cmd("XGROUP")
        .arg("CREATECONSUMER")
        .arg("orders")
        .arg("billing")
        .arg("gone-replica")
        .query(&mut con)
        .unwrap();

    // Debug logs too: several housekeeping failures are logged only at debug.
    let mut daemon = Daemon::start_with_env(
        &cfg,
        &[(
            "RUST_LOG",
            "info,streamworker=debug,streamworker_handlers=debug",
        )],
    );
    daemon.wait_for_log(Duration::from_secs(20), "streamworker started");
    let kinds = [
        "fine", "flaky", "bad", "fine", "fine", "fine", "fine", "fine",
    ];
    let orders: Vec<Vec<(&str, String)>> = kinds
        .iter()
        .enumerate()
        .map(|(i, kind)| vec![("kind", kind.to_string()), ("n", i.to_string())])
        .collect();
    produce(&mut con, "orders", &orders);
    let exported = produce(&mut con, "exports", &numbered(3));

    let billing =
        |outcome: &str| entries_total(&http, &[("group", "billing"), ("outcome", outcome)]);
    wait_until(
        Duration::from_secs(30),
        "billing settled: 7 acked (one after a retry), 1 dead-lettered",
        || billing("acked") == 7.0 && billing("retried") == 1.0 && billing("dead_lettered") == 1.0,
    );
    wait_until(Duration::from_secs(20), "usage counted every entry", || {
        entries_total(&http, &[("group", "usage"), ("outcome", "acked")]) == 8.0
    });
    // The tick: the count rule fired, an event added (and published).
    wait_until(Duration::from_secs(20), "the alert event", || {
        let events = entries(&mut con, "alerts");
        events.iter().any(|(_, fields)| {
            fields
                .iter()
                .any(|(k, v)| k == b"rule" && v == b"bad-entries")
        })
    });
    // Housekeeping: retention (down to max_len once every group acknowledged), the gone
    // consumer deleted, the group gauges exported.
    wait_until(
        Duration::from_secs(30),
        "retention trimmed orders to 5",
        || {
            redis::cmd("XLEN")
                .arg("orders")
                .query::<u64>(&mut con)
                .unwrap()
                == 5
        },
    );
    daemon.wait_for_log(
        Duration::from_secs(30),
        "deleted consumers with nothing pending",
    );
    assert!(daemon.logs().contains("gone-replica"), "{}", daemon.logs());
    wait_until(Duration::from_secs(20), "the group gauges", || {
        let Some((200, text)) = http_get(&http, "/metrics") else {
            return false;
        };
        metric(
            &text,
            "streamworker_dead_letter_length",
            &[("group", "billing")],
        ) == Some(1.0)
            && metric(&text, "streamworker_group_pending", &[("group", "exports")]).is_some()
    });
    // The warehouse: a full batch written at once.
    wait_until(Duration::from_secs(20), "the first batch written", || {
        entries_total(&http, &[("group", "exports"), ("outcome", "acked")]) == 3.0
    });
    let _ = exported;

    // Two more exports wait in a batch (max_wait 20 s) when SIGTERM comes: handed back.
    let waiting = produce(&mut con, "exports", &numbered(2));
    wait_until(
        Duration::from_secs(10),
        "the two entries fetched into the batch",
        || pending_of(&mut con, "exports", "exports", "a") == 2,
    );
    let (status, _) = signal_and_wait(
        &mut daemon,
        libc::SIGTERM,
        shutdown_bound(Duration::from_secs(10)),
    );
    let logs = daemon.logs();
    assert_eq!(status.code(), Some(0), "{logs}");
    assert!(
        logs.contains("handed back entries fetched but never started"),
        "{logs}"
    );
    // Handed back: still a's (reclaimable at once, idle = claim_idle), the delivery given back.
    let rows = pending_rows(&mut con, "exports", "exports");
    assert_eq!(
        rows.iter()
            .map(|(id, _, _, count)| (id.clone(), *count))
            .collect::<Vec<_>>(),
        waiting.iter().map(|id| (id.clone(), 0)).collect::<Vec<_>>(),
        "{logs}"
    );
    assert!(
        rows.iter().all(|(_, _, idle, _)| *idle >= 30_000),
        "{rows:?}"
    );

    let refused = acl_refusals(&mut con);
    assert!(
        refused.is_empty(),
        "the README's ACL user was refused:\n{}\n--- log ---\n{logs}",
        refused.join("\n")
    );
    assert!(
        !logs.contains("NOPERM") && !logs.contains("no permissions"),
        "the ACL user lacked a command:\n{logs}"
    );
    assert!(!logs.contains("acl-user-pw"), "the password is redacted");
}
