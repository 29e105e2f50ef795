//! The example binary against a real `redis-server`: `check` reports a bad option like a
//! built-in's, and `run` converts orders, retries one whose rate is missing until the rate
//! arrives, and dead-letters a malformed one and one whose rate never comes.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use redis::Commands;

const BIN: &str = env!("CARGO_BIN_EXE_custom-handler");
const NOTHING: &str = env!("CARGO_BIN_EXE_drain-nothing");

struct Server {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Server {
    /// A private `redis-server` on a free port (retried: the port may be taken between
    /// finding it and binding it).
    fn start() -> Self {
        for _ in 0..20 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let dir = tempfile::tempdir().unwrap();
            let mut child = Command::new(
                std::env::var("STREAMWORKER_TEST_SERVER").unwrap_or_else(|_| "redis-server".into()),
            )
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (scripts/test installs it)");
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                if let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}/0"))
                    && let Ok(mut con) = client.get_connection()
                    && redis::cmd("PING").query::<String>(&mut con).is_ok()
                {
                    return Self {
                        port,
                        child,
                        _dir: dir,
                    };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("could not start redis-server");
    }

    fn con(&self) -> redis::Connection {
        redis::Client::open(format!("redis://127.0.0.1:{}/0", self.port))
            .unwrap()
            .get_connection()
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(port: u16, options: &str) -> String {
    config_listening(port, "", options)
}

fn config_listening(port: u16, listen: &str, options: &str) -> String {
    config_for("convert", port, listen, options)
}

fn config_for(kind: &str, port: u16, listen: &str, options: &str) -> String {
    format!(
        r#"[redis]
url = "redis://127.0.0.1:{port}/0"

[worker]
claim_interval = "100ms"
shutdown_timeout = "5s"

[http]
listen = "{listen}"

[telemetry]
log_format = "json"

[groups.convert]
stream = "{{orders}}"
handler = "{kind}"
block = "200ms"
handler_timeout = "1s"
claim_idle = "2s"
max_deliveries = 3
retry_backoff = {{ initial = "100ms", max = "200ms", multiplier = 2.0, jitter = 0.0 }}

[groups.convert.options]
{options}
"#
    )
}

fn cli(args: &[&str], file: &Path) -> Output {
    Command::new(BIN)
        .args(args)
        .arg("-c")
        .arg(file)
        .output()
        .unwrap()
}

/// `GET /metrics` from the daemon's listener.
fn metrics(addr: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    let mut body = String::new();
    let _ = stream.read_to_string(&mut body);
    body
}

fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if ready() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting until {what}");
}

#[test]
fn check_reports_a_bad_option_with_file_key_and_value() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        config(
            6379,
            "output = \"{orders}\"\ntotals = \"{orders}:totals\"\ncolour = \"red\"",
        ),
    )
    .unwrap();
    let out = cli(&["check"], &file);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&file.display().to_string()), "{stderr}");
    assert!(stderr.contains("groups.convert.options.colour"), "{stderr}");

    std::fs::write(
        &file,
        config(6379, "output = \"{orders}\"\ntotals = \"{orders}:totals\""),
    )
    .unwrap();
    let out = cli(&["check"], &file);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("groups.convert.options.output") && stderr.contains("\"{orders}\""),
        "{stderr}"
    );

    // A valid file: the resolved view names the kind and its options.
    std::fs::write(
        &file,
        config(
            6379,
            "output = \"{orders}:eur\"\ntotals = \"{orders}:totals\"",
        ),
    )
    .unwrap();
    let out = cli(&["check"], &file);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("handler = \"convert\""), "{stdout}");
    assert!(stdout.contains("rates = \"rates\""), "{stdout}");
}

#[test]
fn run_converts_retries_and_dead_letters() {
    let server = Server::start();
    let mut con = server.con();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("convert.toml");
    let http = format!(
        "127.0.0.1:{}",
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    );
    std::fs::write(
        &file,
        config_listening(
            server.port,
            &http,
            "output = \"{orders}:eur\"\ntotals = \"{orders}:totals\"\nrates = \"rates\"",
        ),
    )
    .unwrap();

    let add = |con: &mut redis::Connection, fields: &[(&str, &str)]| -> String {
        con.xadd("{orders}", "*", fields).unwrap()
    };
    let eur = add(&mut con, &[("amount", "10"), ("currency", "EUR")]);
    let usd = add(&mut con, &[("amount", "20"), ("currency", "USD")]);
    let bad = add(&mut con, &[("amount", "ten"), ("currency", "EUR")]);
    let gbp = add(&mut con, &[("amount", "5"), ("currency", "GBP")]);

    let mut daemon = Command::new(BIN)
        .args(["run", "-c"])
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    // The EUR order is converted at once.
    wait_until("the EUR order is converted", || {
        con.xlen::<_, u64>("{orders}:eur").unwrap() >= 1
    });
    // The USD order has no rate yet: it is retried (delivered again) ...
    wait_until("the USD order is delivered a second time", || {
        let pending: redis::streams::StreamPendingCountReply = con
            .xpending_count("{orders}", "convert", "-", "+", 10)
            .unwrap();
        pending
            .ids
            .iter()
            .any(|p| p.id == usd && p.times_delivered >= 2)
    });
    // ... and converted once the rate arrives.
    let _: () = con.set("rates:USD", "0.5").unwrap();
    wait_until("the USD order is converted", || {
        con.xlen::<_, u64>("{orders}:eur").unwrap() == 2
    });
    // The malformed order and the order whose rate never comes are dead letters.
    wait_until("two dead letters", || {
        con.xlen::<_, u64>("{orders}:dlq:convert").unwrap() == 2
    });

    let totals: std::collections::HashMap<String, String> = con.hgetall("{orders}:totals").unwrap();
    assert_eq!(totals["eur"], "20", "{totals:?}");
    assert_eq!(totals["orders"], "2", "{totals:?}");
    let converted: redis::streams::StreamRangeReply = con.xrange_all("{orders}:eur").unwrap();
    let orders: Vec<String> = converted
        .ids
        .iter()
        .map(|e| e.get::<String>("order").unwrap())
        .collect();
    assert_eq!(orders, vec![eur.clone(), usd.clone()]);

    let dead: redis::streams::StreamRangeReply = con.xrange_all("{orders}:dlq:convert").unwrap();
    let by_id = |id: &str| {
        dead.ids
            .iter()
            .find(|e| e.get::<String>("dlq_origin_id").as_deref() == Some(id))
            .unwrap_or_else(|| panic!("no dead letter for {id}: {:?}", dead.ids))
    };
    let malformed = by_id(&bad);
    assert!(
        malformed
            .get::<String>("dlq_error")
            .unwrap()
            .contains("not a number")
    );
    assert_eq!(
        malformed.get::<String>("dlq_deliveries").as_deref(),
        Some("1")
    );
    let never = by_id(&gbp);
    assert!(
        never
            .get::<String>("dlq_error")
            .unwrap()
            .contains("rates:GBP")
    );
    assert_eq!(never.get::<String>("dlq_deliveries").as_deref(), Some("3"));

    // The group's metrics count the custom kind's outcomes like a built-in's (an entry
    // whose effects append to a stream counts as forwarded).
    let outcome = |text: &str, outcome: &str| {
        text.lines().any(|l| {
            l.starts_with("streamworker_entries_total{")
                && l.contains("group=\"convert\"")
                && l.contains(&format!("outcome=\"{outcome}\""))
                && !l.ends_with(" 0")
        })
    };
    let mut last = String::new();
    let counted = |last: &mut String| {
        *last = metrics(&http);
        outcome(last, "forwarded") && outcome(last, "retried") && outcome(last, "dead_lettered")
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !counted(&mut last) {
        assert!(
            Instant::now() < deadline,
            "the metrics do not count forwards, retries and dead letters: {last}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Everything is settled: nothing pending, and SIGTERM ends the daemon cleanly.
    let pending: redis::streams::StreamPendingReply = con.xpending("{orders}", "convert").unwrap();
    assert_eq!(pending.count(), 0);
    let _ = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status();
    let status = daemon.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

#[test]
fn a_registered_kind_gets_batches_and_ticks() {
    let server = Server::start();
    let mut con = server.con();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("nothing.toml");
    std::fs::write(
        &file,
        config_for("nothing", server.port, "", "batch = 10\ntick_ms = 100"),
    )
    .unwrap();
    for i in 0..50 {
        let _: String = con.xadd("{orders}", "*", &[("n", i)]).unwrap();
    }
    let mut daemon = Command::new(NOTHING)
        .args(["run", "-c"])
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("every entry is handled in batches", || {
        let counts: std::collections::HashMap<String, u64> =
            con.hgetall("{orders}:nothing").unwrap();
        counts.get("entries") == Some(&50)
    });
    let counts: std::collections::HashMap<String, u64> = con.hgetall("{orders}:nothing").unwrap();
    // 50 entries in batches of at most 10: at least 5 batches, and far fewer than 50.
    assert!((5..50).contains(&counts["batches"]), "{counts:?}");
    wait_until("the kind's tick ran", || {
        con.exists::<_, bool>("{orders}:nothing:ticked").unwrap()
    });
    let _ = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status();
    assert_eq!(daemon.wait().unwrap().code(), Some(0));
}
