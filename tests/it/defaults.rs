//! From a few lines of configuration to a running group: defaults that follow what the
//! user set, environment overrides for every key, and a demo that stays on its own Redis.

use std::time::Duration;

use crate::support::*;

/// `check -c <text>` with `env`: (exit code, stdout, stderr).
fn check(text: &str, env: &[(&str, &str)]) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("streamworker.toml");
    std::fs::write(&path, text).unwrap();
    run_cli(&["check", "-c", path.to_str().unwrap()], env)
}

/// `check`'s output as TOML (it must stay valid with the derived marks in it).
fn resolved(stdout: &str) -> toml::Table {
    toml::from_str(stdout).unwrap_or_else(|e| panic!("check printed invalid TOML: {e}\n{stdout}"))
}

fn at<'a>(t: &'a toml::Table, path: &[&str]) -> &'a toml::Value {
    let (last, parents) = path.split_last().unwrap();
    let mut table = t;
    for key in parents {
        table = table[*key].as_table().unwrap();
    }
    &table[*last]
}

fn webhook_group(claim_idle: &str, handler_timeout: &str) -> String {
    format!(
        "[groups.orders]\nstream = \"orders\"\nhandler = \"webhook\"\noptions.url = \"http://127.0.0.1:9/hook\"\nclaim_idle = \"{claim_idle}\"\nhandler_timeout = \"{handler_timeout}\"\n"
    )
}

/// A group of only stream, handler, claim_idle and handler_timeout passes `check` for any
/// sane pair; what was derived to make it so is printed with its value and marked.
#[test]
fn check_accepts_claim_idle_and_handler_timeout_alone_and_marks_what_it_derived() {
    for (idle, timeout, webhook_timeout, backoff_max) in [
        ("2s", "1s", Some("1s"), Some("1s 666ms")),
        ("10s", "5s", Some("5s"), Some("8s 333ms")),
        ("5m", "1m", None, None),
    ] {
        let (code, out, err) = check(&webhook_group(idle, timeout), &[]);
        assert_eq!(code, 0, "{idle}/{timeout}: {err}");
        let t = resolved(&out);
        let timeout_line = format!(
            "timeout = \"{}\" # derived from handler_timeout",
            webhook_timeout.unwrap_or("")
        );
        let max_line = format!(
            "max = \"{}\" # derived from claim_idle",
            backoff_max.unwrap_or("")
        );
        match webhook_timeout {
            Some(w) => {
                assert!(out.contains(&timeout_line), "{idle}/{timeout}:\n{out}");
                assert_eq!(
                    at(&t, &["groups", "orders", "options", "timeout"]).as_str(),
                    Some(w)
                );
            }
            // 10s already fits within 1m: the default stays, unmarked.
            None => assert!(out.contains("\ntimeout = \"10s\"\n"), "{out}"),
        }
        match backoff_max {
            Some(m) => {
                assert!(out.contains(&max_line), "{idle}/{timeout}:\n{out}");
                assert_eq!(
                    at(&t, &["groups", "orders", "retry_backoff", "max"]).as_str(),
                    Some(m)
                );
            }
            None => assert!(out.contains("\nmax = \"1m\"\n"), "{out}"),
        }
        // What the user wrote is printed as written, unmarked.
        assert!(
            out.contains(&format!("\nclaim_idle = \"{idle}\"\n")),
            "{out}"
        );
    }
}

/// Explicit values that conflict are still refused, with the rule's message.
#[test]
fn check_still_refuses_explicit_values_that_conflict() {
    let text = format!(
        "{}retry_backoff = {{ max = \"1m\" }}\n",
        webhook_group("2s", "1s")
    );
    let (code, _, err) = check(&text, &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("groups.orders.retry_backoff.max × (1 + jitter) = 1m 12s must be shorter than claim_idle (2s)"),
        "{err}"
    );
    let text = webhook_group("2s", "1s").replace(
        "options.url = \"http://127.0.0.1:9/hook\"",
        "options = { url = \"http://127.0.0.1:9/hook\", timeout = \"3s\" }",
    );
    let (code, _, err) = check(&text, &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("groups.orders.options.timeout (3s) exceeds the group's handler_timeout (1s)"),
        "{err}"
    );
}

/// The five lines a newcomer writes run against a real Redis: the entry is handled, and a
/// failed attempt is retried within the short claim_idle, not after the default minute.
#[test]
fn a_five_line_config_handles_and_retries_an_entry() {
    let redis = RedisServer::start();
    // Every entry fails once (500), then succeeds.
    let hook = WebhookServer::start_with(|hit| {
        if hit.delivery_count <= 1 {
            (500, Duration::ZERO)
        } else {
            (200, Duration::ZERO)
        }
    });
    let text = format!(
        "[groups.orders]\nstream = \"orders\"\nhandler = \"webhook\"\noptions.url = \"{}\"\nclaim_idle = \"2s\"\nhandler_timeout = \"1s\"\n",
        hook.url("/orders")
    );
    let url = redis.url();
    let daemon = Daemon::start_with_env(
        &text,
        &[
            ("STREAMWORKER__REDIS__URL", url.as_str()),
            // Tests run side by side: no fixed port.
            ("STREAMWORKER__HTTP__LISTEN", ""),
        ],
    );
    let mut con = redis.connection();
    let ids = produce(
        &mut con,
        "orders",
        &[vec![("n", "1".to_string())], vec![("n", "2".to_string())]],
    );
    wait_until(
        Duration::from_secs(30),
        "both entries handled after a retry",
        || {
            let handled = hook.handled();
            ids.iter().all(|id| handled.get(id) == Some(&1))
        },
    );
    let hits = hook.hits();
    for id in &ids {
        let mine: Vec<_> = hits.iter().filter(|h| &h.id == id).collect();
        assert_eq!(
            mine.iter()
                .map(|h| (h.delivery_count, h.status))
                .collect::<Vec<_>>(),
            vec![(1, 500), (2, 200)],
            "{id}: {mine:#?}"
        );
        // Backoff 1s (× up to 1.2), within claim_idle 2s; generous slack for a loaded
        // machine, still far below the default claim_idle of 2 minutes.
        let waited = mine[1].at - mine[0].at;
        assert!(
            waited < Duration::from_secs(15),
            "{id} retried after {waited:?}"
        );
    }
    wait_until(Duration::from_secs(10), "nothing pending", || {
        let (count, ..): (u64, redis::Value, redis::Value, redis::Value) = redis::cmd("XPENDING")
            .arg("orders")
            .arg("orders")
            .query(&mut con)
            .unwrap();
        count == 0
    });
    drop(daemon);
}

/// Hyphenated and upper-case names are reached from the environment the way shells and
/// Kubernetes can write them; lists are written comma-separated or as a TOML array.
#[test]
fn environment_overrides_reach_hyphenated_groups_and_lists() {
    let text = "[groups.order-events]\nstream = \"{orders}:in\"\nhandler = \"forward\"\noptions = { to = \"{orders}:out\", drop = [\"secret\"] }\n[groups.Billing]\nstream = \"billing\"\nhandler = \"noop\"\n";
    let (code, out, err) = check(
        text,
        &[
            ("STREAMWORKER__GROUPS__ORDER_EVENTS__CONCURRENCY", "7"),
            (
                "STREAMWORKER__GROUPS__ORDER_EVENTS__OPTIONS__DROP",
                "debug, trace",
            ),
            ("STREAMWORKER__GROUPS__BILLING__BATCH_SIZE", "9"),
            (
                "STREAMWORKER__REDIS__CLUSTER",
                "redis://node-1:6379,redis://node-2:6379",
            ),
            // Not a list: text with a comma stays text.
            ("STREAMWORKER__TELEMETRY__SERVICE_NAME", "a,b"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    let t = resolved(&out);
    assert_eq!(
        at(&t, &["groups", "order-events", "concurrency"]).as_integer(),
        Some(7)
    );
    assert_eq!(
        at(&t, &["groups", "order-events", "options", "drop"]),
        &toml::Value::from(vec!["debug", "trace"])
    );
    assert_eq!(
        at(&t, &["groups", "Billing", "batch_size"]).as_integer(),
        Some(9)
    );
    assert_eq!(
        at(&t, &["redis", "cluster"]),
        &toml::Value::from(vec!["redis://node-1:6379", "redis://node-2:6379"])
    );
    assert_eq!(at(&t, &["telemetry", "service_name"]).as_str(), Some("a,b"));
    assert!(
        !t["groups"].as_table().unwrap().contains_key("order_events"),
        "{out}"
    );

    // A TOML array keeps items that hold commas.
    let (code, out, err) = check(
        text,
        &[(
            "STREAMWORKER__GROUPS__ORDER_EVENTS__OPTIONS__DROP",
            "[\"a,b\", \"c\"]",
        )],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        at(
            &resolved(&out),
            &["groups", "order-events", "options", "drop"]
        ),
        &toml::Value::from(vec!["a,b", "c"])
    );

    // A bad item is reported against the variable that set it.
    let (code, _, err) = check(
        text,
        &[(
            "STREAMWORKER__REDIS__CLUSTER",
            "redis://node-1:6379,not a url",
        )],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("environment variable STREAMWORKER__REDIS__CLUSTER: redis.cluster.1"),
        "{err}"
    );

    // Two groups one variable could mean: refused, naming both.
    let (code, _, err) = check(
        "[groups.a-b]\nstream = \"s\"\nhandler = \"noop\"\n[groups.A-B]\nstream = \"t\"\nhandler = \"noop\"\n",
        &[("STREAMWORKER__GROUPS__A_B__CONCURRENCY", "3")],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("STREAMWORKER__GROUPS__A_B__CONCURRENCY") && err.contains("`A-B`, `a-b`"),
        "{err}"
    );
}

/// A production variable in the shell does not send the demo's writes there.
#[test]
fn the_demo_uses_another_redis_only_when_given_url() {
    let server = server_binary();
    let (code, out, err) = run_cli(
        &["demo", "--duration", "2s", "--redis-server", &server],
        // Nothing listens there: the demo would fail if it used it.
        &[("STREAMWORKER__REDIS__URL", "redis://127.0.0.1:9/0")],
    );
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("a private redis-server on"), "{out}");
    assert!(!out.contains("127.0.0.1:9/"), "{out}");
}
