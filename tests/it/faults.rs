//! A group never stalls (issue 10): the failure policy under poison, data loss, refusals
//! and idleness, run with the default circuit breaker.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::support::*;

/// A webhook group that leaves the failure policy at its defaults but for what a test of
/// seconds needs: short `claim_idle`, `handler_timeout` and backoff.
fn webhook_group(url: &str, extra: &str) -> String {
    format!(
        r#"
[groups.billing]
stream = "orders"
handler = "webhook"
handler_timeout = "1s"
claim_idle = "3s"
retry_backoff = {{ initial = "100ms", max = "500ms" }}
{extra}
[groups.billing.options]
url = "{url}"
timeout = "1s"
"#
    )
}

fn dead_letter_ids(con: &mut redis::Connection) -> Vec<String> {
    entries(con, "{orders}:dlq:billing")
        .into_iter()
        .map(|(_, fields)| {
            let origin = fields
                .iter()
                .find(|(k, _)| k == b"dlq_origin_id")
                .expect("dlq_origin_id");
            String::from_utf8_lossy(&origin.1).into_owned()
        })
        .collect()
}

/// 2,000 entries, every 50th answered 500, `max_deliveries = 3`, the circuit breaker at
/// its default: every poison entry reaches the handler exactly three times and is
/// dead-lettered once; every other entry is handled; nothing stays pending.
fn retryable_poison_with_default_breaker(replicas: usize) {
    let redis = RedisServer::start();
    let hook = WebhookServer::start_with(|hit| {
        if hit.body["fields"]["poison"] == "1" {
            (500, Duration::ZERO)
        } else {
            (200, Duration::ZERO)
        }
    });
    let mut con = redis.connection();
    let events: Vec<Vec<(&str, String)>> = (0..2000)
        .map(|i| {
            vec![
                ("n", i.to_string()),
                ("poison", u8::from(i % 50 == 49).to_string()),
            ]
        })
        .collect();
    let ids = produce(&mut con, "orders", &events);
    let poison: HashSet<String> = ids.iter().skip(49).step_by(50).cloned().collect();
    assert_eq!(poison.len(), 40);
    let _daemons: Vec<Daemon> = (0..replicas)
        .map(|r| {
            let name = format!("r{r}");
            Daemon::start(&config(
                &redis.url(),
                &name,
                &webhook_group(&hook.url(&name), "max_deliveries = 3"),
            ))
        })
        .collect();
    wait_until(
        Duration::from_secs(60),
        "every poison entry dead-lettered and nothing pending",
        || {
            dead_letter_ids(&mut con).len() >= 40
                && group_info(&mut con, "orders", "billing").map(|(p, _)| p) == Some(0)
        },
    );
    let dead = dead_letter_ids(&mut con);
    assert_eq!(dead.len(), 40, "each poison entry dead-lettered once");
    assert_eq!(dead.into_iter().collect::<HashSet<_>>(), poison);
    let mut calls: HashMap<String, usize> = HashMap::new();
    for hit in hook.hits() {
        *calls.entry(hit.id).or_default() += 1;
    }
    for id in &poison {
        assert_eq!(
            calls.get(id).copied(),
            Some(3),
            "poison entry {id} reached the handler max_deliveries times"
        );
    }
    let healthy = ids.iter().filter(|id| !poison.contains(*id));
    for id in healthy {
        assert!(calls.contains_key(id), "healthy entry {id} handled");
    }
}

#[test]
fn retryable_poison_under_the_default_breaker_is_dead_lettered_with_one_replica() {
    retryable_poison_with_default_breaker(1);
}

#[test]
fn retryable_poison_under_the_default_breaker_is_dead_lettered_with_two_replicas() {
    retryable_poison_with_default_breaker(2);
}

#[test]
fn retryable_poison_under_the_default_breaker_is_dead_lettered_with_three_replicas() {
    retryable_poison_with_default_breaker(3);
}

/// A real outage still pauses the group with the default breaker: after it opens, at most
/// about one call per pause reaches the endpoint, and nothing is dead-lettered.
#[test]
fn an_outage_opens_the_default_breaker_and_probes_once_per_pause() {
    let redis = RedisServer::start();
    let hook = WebhookServer::start_with(|_| (503, Duration::ZERO));
    let (cfg, http) = config_with_http(
        &redis.url(),
        "r1",
        &webhook_group(&hook.url("r1"), "max_deliveries = 3"),
    );
    let daemon = Daemon::start(&cfg);
    let mut con = redis.connection();
    let ids = produce(
        &mut con,
        "orders",
        &(0..100)
            .map(|i| vec![("n", i.to_string())])
            .collect::<Vec<_>>(),
    );
    daemon.wait_for_log(Duration::from_secs(10), "circuit opened");
    wait_until(Duration::from_secs(5), "the circuit metric", || {
        http_get(&http, "/metrics").and_then(|(_, t)| metric(&t, "streamworker_circuit_open", &[]))
            == Some(1.0)
    });
    // Everything in flight when it opened has finished within handler_timeout.
    std::thread::sleep(Duration::from_millis(1500));
    let before = hook.count();
    std::thread::sleep(Duration::from_secs(11));
    let during = hook.count() - before;
    // The default pause is 5 s: two or three probes in 11 s (one more for slack).
    assert!(
        during <= 4,
        "{during} calls in 11 s while the circuit was open"
    );
    assert!(
        dead_letter_ids(&mut con).is_empty(),
        "an outage dead-letters nothing"
    );
    hook.set_responder(|_| (200, Duration::ZERO));
    wait_until(Duration::from_secs(60), "every entry handled", || {
        let handled = hook.handled();
        ids.iter().all(|id| handled.contains_key(id))
    });
    wait_until(Duration::from_secs(10), "nothing pending", || {
        group_info(&mut con, "orders", "billing").map(|(p, _)| p) == Some(0)
    });
    assert!(
        dead_letter_ids(&mut con).is_empty(),
        "nothing dead-lettered"
    );
}

/// Redis restarts without persistence while failed entries are parked, and the failing
/// handler calls finish while Redis is down: the group is recreated, the settlements for
/// entries Redis no longer has are dropped with a count, and entries produced afterwards
/// are handled within seconds.
#[test]
fn a_redis_that_lost_its_data_is_survived_even_with_settlements_queued() {
    let mut redis = RedisServer::start();
    // Slow failures: they finish while Redis is down.
    let started_calls = Arc::new(AtomicUsize::new(0));
    let counter = started_calls.clone();
    let hook = WebhookServer::start_with(move |hit| {
        counter.fetch_add(1, Ordering::SeqCst);
        if hit.body["fields"]["phase"] == "before" {
            (500, Duration::from_millis(600))
        } else {
            (200, Duration::ZERO)
        }
    });
    let (cfg, http) = config_with_http(
        &redis.url(),
        "r1",
        &webhook_group(&hook.url("r1"), "max_deliveries = 3"),
    );
    let daemon = Daemon::start(&cfg);
    let mut con = redis.connection();
    produce(
        &mut con,
        "orders",
        &(0..10)
            .map(|i| vec![("n", i.to_string()), ("phase", "before".into())])
            .collect::<Vec<_>>(),
    );
    wait_until(Duration::from_secs(10), "handler calls in flight", || {
        started_calls.load(Ordering::SeqCst) >= 1
    });
    redis.kill();
    // The calls fail while Redis is down; their parks queue up.
    std::thread::sleep(Duration::from_millis(1500));
    redis.restart();
    let mut con = redis.connection();
    let ids = produce(
        &mut con,
        "orders",
        &(0..20)
            .map(|i| vec![("n", i.to_string()), ("phase", "after".into())])
            .collect::<Vec<_>>(),
    );
    let started = Instant::now();
    wait_until(
        Duration::from_secs(20),
        "entries produced after the restart handled",
        || {
            let handled = hook.handled();
            ids.iter().all(|id| handled.contains_key(id))
        },
    );
    eprintln!(
        "handled 20 entries {:?} after the restart",
        started.elapsed()
    );
    wait_until(Duration::from_secs(5), "the recreation counted", || {
        http_get(&http, "/metrics")
            .and_then(|(_, t)| metric(&t, "streamworker_group_recreated_total", &[]))
            .is_some_and(|n| n >= 1.0)
    });
    assert!(
        daemon.logs().contains("recreated the consumer group"),
        "{}",
        daemon.logs()
    );
}

/// Redis refuses a forward's XADD (the target holds a string): after a bounded number of
/// attempts each entry is dead-lettered with the refusal as `dlq_error`; the queue of
/// unsent settlements does not grow; once the key is fixed, a replay forwards each entry
/// exactly once.
#[test]
fn refused_forwards_are_dead_lettered_after_bounded_attempts_and_replayable() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let _: () = redis::cmd("SET")
        .arg("{orders}:out")
        .arg("not a stream")
        .query(&mut con)
        .unwrap();
    let group = r#"
[groups.fwd]
stream = "orders"
handler = "forward"
handler_timeout = "1s"
claim_idle = "3s"
retry_backoff = { initial = "100ms", max = "500ms" }
[groups.fwd.options]
to = "{orders}:out"
"#;
    let (cfg, http) = config_with_http(&redis.url(), "r1", group);
    let daemon = Daemon::start(&cfg);
    let ids = produce(
        &mut con,
        "orders",
        &(0..200)
            .map(|i| vec![("n", i.to_string())])
            .collect::<Vec<_>>(),
    );
    wait_until(Duration::from_secs(30), "every entry dead-lettered", || {
        let n: u64 = redis::cmd("XLEN")
            .arg("{orders}:dlq:fwd")
            .query(&mut con)
            .unwrap();
        n >= 200
    });
    let dead = entries(&mut con, "{orders}:dlq:fwd");
    assert_eq!(dead.len(), 200, "each entry dead-lettered once");
    for (_, fields) in &dead {
        let error = fields
            .iter()
            .find(|(k, _)| k == b"dlq_error")
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .unwrap();
        assert!(error.contains("WRONGTYPE"), "{error}");
    }
    wait_until(Duration::from_secs(5), "nothing pending", || {
        group_info(&mut con, "orders", "fwd").map(|(p, _)| p) == Some(0)
    });
    let counts = delivery_counts(&mut con, "orders", "fwd");
    assert!(counts.is_empty(), "{counts:?}");
    let metrics = http_get(&http, "/metrics").unwrap().1;
    assert_eq!(
        metric(
            &metrics,
            "streamworker_entries_total",
            &[("outcome", "dead_lettered")]
        ),
        Some(200.0)
    );
    assert!(
        daemon.logs().contains("WRONGTYPE"),
        "the refusal is logged:\n{}",
        daemon.logs()
    );
    // Fix the key, replay once: every entry forwarded exactly once.
    let _: () = redis::cmd("DEL")
        .arg("{orders}:out")
        .query(&mut con)
        .unwrap();
    dlq_replay_all(&daemon.config_path, "fwd");
    wait_until(Duration::from_secs(20), "every entry forwarded", || {
        let n: u64 = redis::cmd("XLEN")
            .arg("{orders}:out")
            .query(&mut con)
            .unwrap_or(0);
        n >= 200
    });
    std::thread::sleep(Duration::from_millis(500));
    let forwarded = entries(&mut con, "{orders}:out");
    let sources: HashSet<String> = forwarded
        .iter()
        .map(|(_, f)| {
            let v = &f.iter().find(|(k, _)| k == b"source_id").unwrap().1;
            String::from_utf8_lossy(v).into_owned()
        })
        .collect();
    assert_eq!(forwarded.len(), 200, "each entry forwarded once");
    assert_eq!(sources, ids.into_iter().collect::<HashSet<_>>());
}

/// CPU time (user + system) the process used so far, from /proc.
fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/<pid>/stat");
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let utime: u64 = fields[11].parse().unwrap();
    let stime: u64 = fields[12].parse().unwrap();
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis((utime + stime) * 1000 / hz)
}

/// The share of one core the process uses over `window`.
fn cpu_share(pid: i32, window: Duration) -> f64 {
    let before = cpu_time(pid);
    std::thread::sleep(window);
    (cpu_time(pid) - before).as_secs_f64() / window.as_secs_f64()
}

/// The loop sleeps until something can change: with Redis down, with the circuit open,
/// with the group paused, and with every handler slot busy while a claim is due. The target is under 1 % of a
/// core; the bound leaves room for a loaded machine and still catches a polling loop.
#[test]
fn an_idle_loop_does_not_poll() {
    const BOUND: f64 = 0.03;
    let window = Duration::from_secs(8);

    // Every slot busy (a hanging webhook) while reclaims fall due every 200 ms.
    let redis = RedisServer::start();
    let started_calls = Arc::new(AtomicUsize::new(0));
    let counter = started_calls.clone();
    let hook = WebhookServer::start_with(move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
        (200, Duration::from_secs(30))
    });
    let group = webhook_group(&hook.url("r1"), "concurrency = 2")
        .replace("handler_timeout = \"1s\"", "handler_timeout = \"20s\"")
        .replace("claim_idle = \"3s\"", "claim_idle = \"30s\"")
        .replace("timeout = \"1s\"", "timeout = \"15s\"");
    let busy = Daemon::start(&config(&redis.url(), "r1", &group));
    let mut con = redis.connection();
    produce(
        &mut con,
        "orders",
        &[vec![("n", "1".into())], vec![("n", "2".into())]],
    );
    wait_until(Duration::from_secs(10), "both slots busy", || {
        started_calls.load(Ordering::SeqCst) == 2
    });
    let share = cpu_share(busy.pid(), window);
    eprintln!("every slot busy: {:.2} % of a core", share * 100.0);
    assert!(
        share < BOUND,
        "busy slots: {:.1} % of a core",
        share * 100.0
    );
    drop(busy);

    // The circuit open (the endpoint down, a long pause).
    let redis = RedisServer::start();
    let hook = WebhookServer::start_with(|_| (503, Duration::ZERO));
    let group = webhook_group(
        &hook.url("r2"),
        "circuit_breaker = { threshold = 2, pause = \"1m\" }",
    );
    let open = Daemon::start(&config(&redis.url(), "r2", &group));
    let mut con = redis.connection();
    produce(
        &mut con,
        "orders",
        &(0..5)
            .map(|i| vec![("n", i.to_string())])
            .collect::<Vec<_>>(),
    );
    open.wait_for_log(Duration::from_secs(10), "circuit opened");
    std::thread::sleep(Duration::from_millis(500));
    let share = cpu_share(open.pid(), window);
    eprintln!("circuit open: {:.2} % of a core", share * 100.0);
    assert!(
        share < BOUND,
        "circuit open: {:.1} % of a core",
        share * 100.0
    );
    drop(open);

    // Paused (`streamworker pause`) while entries wait: the loop only looks at the pause
    // key once per claim_interval.
    let redis = RedisServer::start();
    let hook = WebhookServer::start();
    let paused = Daemon::start(&config(
        &redis.url(),
        "r4",
        &webhook_group(&hook.url("r4"), ""),
    ));
    let config_path = paused.config_path.to_str().unwrap().to_owned();
    let (code, out, err) = run_cli(&["pause", "-c", &config_path, "--group", "billing"], &[]);
    assert_eq!(code, 0, "pause: {out}{err}");
    paused.wait_for_log(Duration::from_secs(10), "group paused");
    let mut con = redis.connection();
    produce(
        &mut con,
        "orders",
        &(0..50)
            .map(|i| vec![("n", i.to_string())])
            .collect::<Vec<_>>(),
    );
    let share = cpu_share(paused.pid(), window);
    eprintln!(
        "paused with 50 entries waiting: {:.2} % of a core",
        share * 100.0
    );
    assert_eq!(hook.count(), 0, "a paused group called its handler");
    assert!(share < BOUND, "paused: {:.1} % of a core", share * 100.0);
    drop(paused);

    // Redis down.
    let mut redis = RedisServer::start();
    let hook = WebhookServer::start();
    let down = Daemon::start(&config(
        &redis.url(),
        "r3",
        &webhook_group(&hook.url("r3"), ""),
    ));
    let mut con = redis.connection();
    produce(&mut con, "orders", &[vec![("n", "1".into())]]);
    wait_until(Duration::from_secs(10), "the entry handled", || {
        hook.count() == 1
    });
    redis.kill();
    down.wait_for_log(Duration::from_secs(10), "lost Redis");
    // Past the first reconnect attempts, which back off towards 5 s.
    std::thread::sleep(Duration::from_secs(3));
    let share = cpu_share(down.pid(), window);
    eprintln!("Redis down: {:.2} % of a core", share * 100.0);
    assert!(
        share < BOUND,
        "Redis down: {:.1} % of a core",
        share * 100.0
    );
}

/// An entry whose read reply was lost (the connection broke after Redis delivered it) is
/// re-read from the consumer's own pending list, and the handler sees delivery count 1:
/// the delivery it never saw is not charged.
#[test]
fn a_lost_read_reply_is_not_charged_as_an_attempt() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(format!("127.0.0.1:{}", redis.port).parse().unwrap());
    let hook = WebhookServer::start();
    let group = r#"
[groups.billing]
stream = "orders"
handler = "webhook"
block = "1s"
handler_timeout = "2s"
claim_idle = "90s"
[groups.billing.options]
url = "URL"
timeout = "2s"
"#
    .replace("URL", &hook.url("r1"));
    let daemon = Daemon::start(&config(&proxy.url(), "r1", &group));
    let mut con = redis.connection();
    wait_until(Duration::from_secs(10), "the read to block", || {
        let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut con).unwrap();
        list.lines()
            .any(|l| l.contains("name=streamworker:billing:r1") && l.contains("cmd=xreadgroup"))
    });
    // The read's reply never arrives: the connection times out and reconnects.
    proxy.hold_replies(true);
    let ids = produce(&mut con, "orders", &[vec![("n", "1".into())]]);
    wait_until(Duration::from_secs(5), "the entry delivered to r1", || {
        pending_of(&mut con, "orders", "billing", "r1") == 1
    });
    std::thread::sleep(Duration::from_secs(4));
    proxy.hold_replies(false);
    wait_until(Duration::from_secs(20), "the entry handled", || {
        hook.count() >= 1
    });
    let hits = hook.hits();
    assert_eq!(hits[0].id, ids[0]);
    assert_eq!(
        hits[0].delivery_count,
        1,
        "the handler's first call is attempt 1:\n{}",
        daemon.logs()
    );
}

/// SIGTERM while the handler's periodic work hangs: the process still exits within
/// `shutdown_timeout` + 2 s.
#[test]
fn shutdown_keeps_its_deadline_while_a_tick_hangs() {
    let redis = RedisServer::start();
    // The alert's webhook hangs far longer than the shutdown deadline.
    let slack = WebhookServer::start_with(|_| (200, Duration::from_secs(60)));
    let group = format!(
        r#"
[groups.alerts]
stream = "orders"
handler = "alerts"
block = "500ms"
handler_timeout = "20s"
claim_idle = "90s"
[groups.alerts.options]
evaluate_every = "200ms"
webhook = "{}"
webhook_timeout = "15s"
[[groups.alerts.options.rules]]
name = "quiet"
kind = "absence"
window = "5s"
"#,
        slack.url("slack")
    );
    let cfg = config(&redis.url(), "r1", &group)
        .replace("shutdown_timeout = \"10s\"", "shutdown_timeout = \"2s\"");
    let mut daemon = Daemon::start(&cfg);
    daemon.wait_for_log(Duration::from_secs(20), "firing");
    let started = Instant::now();
    daemon.terminate();
    let status = daemon
        .wait(Duration::from_secs(30))
        .expect("the daemon exits");
    let took = started.elapsed();
    eprintln!("SIGTERM to exit: {took:?} (status {status:?})");
    assert!(
        took <= Duration::from_secs(4) + Duration::from_millis(1500),
        "shutdown took {took:?}, shutdown_timeout is 2 s:\n{}",
        daemon.logs()
    );
}
