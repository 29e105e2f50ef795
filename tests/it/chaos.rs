//! The soak behind `scripts/chaos` (not part of the default run: `#[ignore]`): several
//! replicas, random SIGKILLs, one restart of a Redis running with AOF and
//! `appendfsync always`, while entries flow and 2 % of them are poison. Reports produced,
//! handled, dead-lettered, lost (confirmed XADDs neither handled nor dead-lettered) and
//! duplicates; fails if anything is lost.
//!
//! Tuning: CHAOS_SECONDS (default 60), CHAOS_REPLICAS (4), CHAOS_RATE entries/s (400).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::support::*;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
#[ignore = "a soak of a minute or more: run scripts/chaos"]
fn chaos_soak_loses_nothing() {
    let seconds = env("CHAOS_SECONDS", 60);
    let replicas = env("CHAOS_REPLICAS", 4) as usize;
    let rate = env("CHAOS_RATE", 400);
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let hook = WebhookServer::start_with(|hit| {
        if hit.body["fields"]["poison"] == "1" {
            (500, Duration::ZERO)
        } else {
            (200, Duration::from_millis(fastrand::u64(0..5)))
        }
    });
    let group = format!(
        r#"
[groups.billing]
stream = "orders"
handler = "webhook"
block = "500ms"
concurrency = 32
batch_size = 32
handler_timeout = "1s"
claim_idle = "3s"
max_deliveries = 3
consumer_ttl = "1m"
retry_backoff = {{ initial = "200ms", max = "1s" }}
circuit_breaker = {{ threshold = 50, pause = "1s" }}
[groups.billing.options]
url = "{}"
timeout = "1s"
"#,
        hook.url("hook")
    );
    let url = redis.url();
    let start = |n: usize| Daemon::start(&config(&url, &format!("replica-{n}"), &group));
    let mut running: Vec<Daemon> = (0..replicas).map(start).collect();
    let mut next_name = replicas;

    let producing = Arc::new(AtomicBool::new(true));
    let producer = {
        let url = url.clone();
        let producing = producing.clone();
        std::thread::spawn(move || {
            let client = redis::Client::open(url).unwrap();
            let mut con = None;
            let mut confirmed: Vec<(String, bool)> = Vec::new();
            let mut n = 0u64;
            let started = Instant::now();
            while producing.load(Ordering::Relaxed) {
                if con.is_none() {
                    con = client
                        .get_connection_with_timeout(Duration::from_millis(200))
                        .ok();
                }
                let poison = fastrand::u8(0..100) < 2;
                if let Some(c) = con.as_mut() {
                    let added: redis::RedisResult<String> = redis::cmd("XADD")
                        .arg("orders")
                        .arg("*")
                        .arg("n")
                        .arg(n)
                        .arg("poison")
                        .arg(if poison { "1" } else { "0" })
                        .query(c);
                    match added {
                        Ok(id) => confirmed.push((id, poison)),
                        Err(_) => con = None,
                    }
                }
                n += 1;
                let due = started + Duration::from_secs_f64(n as f64 / rate as f64);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            confirmed
        })
    };

    let deadline = Instant::now() + Duration::from_secs(seconds);
    let restart_redis_at = Instant::now() + Duration::from_secs(seconds / 2);
    let mut redis_restarted = false;
    let mut kills = 0;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(fastrand::u64(2_000..6_000)));
        if !redis_restarted && Instant::now() >= restart_redis_at {
            eprintln!("chaos: killing redis-server");
            redis.kill();
            std::thread::sleep(Duration::from_secs(1));
            redis.restart();
            redis_restarted = true;
            continue;
        }
        let victim = fastrand::usize(..running.len());
        eprintln!("chaos: SIGKILL replica {victim}");
        running[victim].kill();
        kills += 1;
        running[victim] = start(next_name);
        next_name += 1;
    }
    producing.store(false, Ordering::Relaxed);
    let confirmed = producer.join().unwrap();
    let poison: HashSet<&str> = confirmed
        .iter()
        .filter(|(_, p)| *p)
        .map(|(id, _)| id.as_str())
        .collect();

    let mut con = redis.connection();
    let dead_lettered = |con: &mut redis::Connection| -> HashMap<String, usize> {
        let mut out = HashMap::new();
        for (_, fields) in entries(con, "{orders}:dlq:billing") {
            if let Some((_, v)) = fields.iter().find(|(k, _)| k == b"dlq_origin_id") {
                *out.entry(String::from_utf8_lossy(v).into_owned())
                    .or_default() += 1;
            }
        }
        out
    };
    let settle_deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let handled = hook.handled();
        let dead = dead_lettered(&mut con);
        let open = confirmed
            .iter()
            .filter(|(id, _)| !handled.contains_key(id) && !dead.contains_key(id))
            .count();
        if open == 0 || Instant::now() > settle_deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let handled = hook.handled();
    let dead = dead_lettered(&mut con);
    let lost: Vec<&String> = confirmed
        .iter()
        .map(|(id, _)| id)
        .filter(|id| !handled.contains_key(*id) && !dead.contains_key(*id))
        .collect();
    let duplicates: usize = handled.values().map(|n| n - 1).sum();
    let healthy_dead = dead
        .keys()
        .filter(|id| !poison.contains(id.as_str()))
        .count();
    let poison_dead = dead
        .keys()
        .filter(|id| poison.contains(id.as_str()))
        .count();
    let doubly_dead: usize = dead.values().map(|n| n - 1).sum();
    eprintln!(
        "chaos report: {seconds}s, {replicas} replicas, {kills} SIGKILLs, 1 Redis restart\n  produced (confirmed XADDs) {}\n  handled (2xx, unique) {}\n  dead-lettered {} ({} poison of {}, {} healthy)\n  lost {}\n  duplicate deliveries {}\n  dead letters written twice {}",
        confirmed.len(),
        handled.len(),
        dead.len(),
        poison_dead,
        poison.len(),
        healthy_dead,
        lost.len(),
        duplicates,
        doubly_dead
    );
    assert!(
        lost.is_empty(),
        "lost entries: {:?}",
        &lost[..lost.len().min(20)]
    );
    for d in running.iter_mut() {
        d.terminate();
    }
}
