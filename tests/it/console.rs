//! The web console (`http.console = true`) in a real browser: headless Chromium driven over
//! WebDriver (chromedriver), against the daemon binary and a real `redis-server`.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};

use crate::support::webhook::WebhookServer;
use crate::support::*;

const TOKEN: &str = "0123456789abcdef-console-test-token";

/// A chromedriver on a free port and one headless Chromium session through it.
struct Browser {
    driver: Child,
    client: Option<Client>,
}

impl Browser {
    async fn start() -> Self {
        let chromedriver =
            std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".into());
        let port = free_port();
        let driver = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{chromedriver} does not run ({e}): install chromium and chromium-driver (scripts/test does)")
            });
        let address = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        // chromedriver keeps connections open, so a plain GET would wait for the close: the
        // open port is the sign it is up.
        while std::net::TcpStream::connect(&address).is_err() {
            assert!(
                Instant::now() < deadline,
                "chromedriver did not answer on {address}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()),
                // --no-sandbox: tests may run as root, where Chromium's sandbox refuses to start.
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1280,1100", "--hide-scrollbars"]
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://{address}"))
            .await
            .expect("a Chromium session");
        Self {
            driver,
            client: Some(client),
        }
    }

    fn client(&self) -> &Client {
        self.client.as_ref().expect("open")
    }

    async fn text(&self, css: &str) -> String {
        match self.client().find(Locator::Css(css)).await {
            Ok(e) => e.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// Waits until the element's text satisfies `ok`; the page updates itself (no reload).
    async fn wait_text(&self, css: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = self.text(css).await;
            if ok(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what} in {css}; it says {text:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn js(&self, script: &str) -> serde_json::Value {
        self.client()
            .execute(script, Vec::new())
            .await
            .unwrap_or_else(|e| panic!("{script}: {e}"))
    }

    async fn close(mut self) {
        if let Some(client) = self.client.take() {
            let _ = client.close().await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A daemon with the console on (and a token file when `token` is given).
fn console_daemon(
    redis: &RedisServer,
    groups: &str,
    token: Option<&str>,
) -> (Daemon, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (text, addr) = config_with_http(&redis.url(), "console-1", groups);
    let mut http = format!("listen = \"{addr}\"\nconsole = true\n");
    if let Some(token) = token {
        let path = dir.path().join("console-token");
        std::fs::write(&path, format!("{token}\n")).unwrap();
        http.push_str(&format!(
            "console_token_file = {:?}\n",
            path.display().to_string()
        ));
    }
    let text = text.replace(&format!("listen = \"{addr}\"\n"), &http);
    let daemon = Daemon::start(&text);
    wait_until(Duration::from_secs(20), "the console answers", || {
        http_get(&addr, "/").is_some_and(|(s, _)| s == 200)
    });
    (daemon, addr, dir)
}

/// A POST as a script or a form would send it; returns (status, body).
fn http_post(addr: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    let status = raw.split(' ').nth(1).unwrap().parse().unwrap();
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A GET's status line and headers.
fn http_head(addr: &str, path: &str) -> String {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    raw.split_once("\r\n\r\n")
        .map_or(raw.clone(), |(h, _)| h.to_owned())
}

#[test]
fn without_http_console_the_listener_serves_no_console() {
    let redis = RedisServer::start();
    let (text, addr) = config_with_http(
        &redis.url(),
        "console-off",
        "[groups.billing]\nstream = \"orders\"\nhandler = \"noop\"\n",
    );
    let _daemon = Daemon::start(&text);
    wait_until(Duration::from_secs(20), "the listener answers", || {
        http_get(&addr, "/livez").is_some()
    });
    for path in ["/", "/console/live", "/console/console.js"] {
        assert_eq!(http_get(&addr, path).map(|(s, _)| s), Some(404), "{path}");
    }
    let (status, _) = http_post(
        &addr,
        "/console/groups/billing/pause",
        &[("Authorization", "Bearer x")],
        "",
    );
    assert_eq!(status, 404);
}

fn xlen(con: &mut redis::Connection, key: &str) -> u64 {
    redis::cmd("XLEN").arg(key).query(con).unwrap()
}

/// Where the screenshot goes: `docs/console.png` when `UPDATE_CONSOLE_SCREENSHOT=1`
/// (to refresh the README's picture), else the test's scratch directory.
fn save_screenshot(png: &[u8]) {
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "the screenshot is a PNG"
    );
    let path = if std::env::var_os("UPDATE_CONSOLE_SCREENSHOT").is_some() {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/console.png")
    } else {
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console.png")
    };
    std::fs::write(&path, png).unwrap();
}

#[test]
fn the_console_shows_a_group_live_and_replays_purges_pauses_and_resumes_with_the_token() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    // The webhook refuses (400: a permanent failure, dead-lettered at once) while told to.
    let refuse = Arc::new(AtomicBool::new(true));
    let hook = {
        let refuse = refuse.clone();
        WebhookServer::start_with(move |_| {
            let status = if refuse.load(Ordering::SeqCst) {
                400
            } else {
                200
            };
            (status, Duration::ZERO)
        })
    };
    let groups = format!(
        r#"
[groups.billing]
stream = "orders"
handler = "webhook"
block = "200ms"
[groups.billing.options]
url = "{}"
"#,
        hook.url("billing")
    );
    let (daemon, addr, _dir) = console_daemon(&redis, &groups, Some(TOKEN));
    let dlq = "{orders}:dlq:billing";
    let ids = produce(
        &mut con,
        "orders",
        &[vec![("order", "A-1".into()), ("amount", "12.50".into())]],
    );
    wait_until(Duration::from_secs(20), "the entry dead-lettered", || {
        xlen(&mut con, dlq) == 1
    });

    // Cross-site requests are refused before the token is looked at; tokenless ones too.
    let pause = "/console/groups/billing/pause";
    let (status, body) = http_post(&addr, pause, &[], "");
    assert_eq!(status, 401, "{body}");
    let bearer = format!("Bearer {TOKEN}");
    for (name, value) in [
        ("Origin", "https://evil.example"),
        ("Sec-Fetch-Site", "cross-site"),
    ] {
        for auth in [bearer.as_str(), "Bearer wrong"] {
            let (status, body) =
                http_post(&addr, pause, &[("Authorization", auth), (name, value)], "");
            assert_eq!(status, 403, "{name}: {value}: {body}");
        }
    }
    let (status, body) = http_post(&addr, pause, &[("Authorization", "Bearer wrong")], "");
    assert_eq!(status, 401, "{body}");
    let paused: Option<String> = redis::cmd("GET")
        .arg("{orders}:streamworker:paused:billing")
        .query(&mut con)
        .unwrap_or(None);
    assert_eq!(paused, None, "a refused POST changed nothing");

    let dead_id = runtime().block_on(async {
        let browser = Browser::start().await;
        let b = &browser;
        b.client().goto(&format!("http://{addr}/")).await.unwrap();
        assert_eq!(b.client().title().await.unwrap(), "streamworker console");
        let row = r#"#groups tr[data-group="billing"]"#;
        let cell = |name: &str| format!("{row} td.{name}");
        assert_eq!(b.text(&cell("stream")).await, "orders");
        assert_eq!(b.text(&cell("lag")).await, "0");
        assert_eq!(b.text(&cell("dead")).await, "1");
        assert_eq!(b.text(&cell("state")).await, "running");
        assert_eq!(b.text(&cell("circuit")).await, "closed");
        let letter = b.text("article.letter").await;
        assert!(
            letter.contains("dlq_origin_id") && letter.contains(&ids[0]),
            "the dead letter's fields name its origin id: {letter}"
        );
        let dead_id = b
            .client()
            .find(Locator::Css("article.letter"))
            .await
            .unwrap()
            .attr("data-id")
            .await
            .unwrap()
            .unwrap();
        assert!(
            letter.contains("A-1") && letter.contains("12.50"),
            "its fields: {letter}"
        );
        assert!(
            b.text("article.letter .dlq-error").await.contains("400"),
            "its dlq_error"
        );
        // A marker the page keeps for as long as it is not reloaded.
        b.js("window.notReloaded = true; return null;").await;

        // Replay from the console: the entry is handled again, this time successfully.
        refuse.store(false, Ordering::SeqCst);
        b.client()
            .find(Locator::Id("token"))
            .await
            .unwrap()
            .send_keys(TOKEN)
            .await
            .unwrap();
        click(b, r#"article.letter button[data-action="replay"]"#).await;
        b.wait_text("#status", "the replay's outcome", |t| {
            t.contains("replayed 1 dead letter to orders")
        })
        .await;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !hook
            .hits()
            .iter()
            .any(|h| h.status == 200 && h.body["fields"]["dlq_replay_of"] == ids[0].as_str())
        {
            assert!(
                Instant::now() < deadline,
                "the replayed entry was not handled: {:?}",
                hook.hits()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        b.wait_text(&cell("dead"), "no dead letters", |t| t == "0")
            .await;
        assert_eq!(xlen(&mut con, dlq), 0);

        // Purge a selection of two dead letters (of three); the page shows them live.
        refuse.store(true, Ordering::SeqCst);
        produce(
            &mut con,
            "orders",
            &[
                vec![("order", "B-1".into())],
                vec![("order", "B-2".into())],
                vec![("order", "B-3".into())],
            ],
        );
        b.wait_text(&cell("dead"), "three dead letters", |t| t == "3")
            .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let letters = b
            .client()
            .find_all(Locator::Css("article.letter"))
            .await
            .unwrap();
        assert_eq!(letters.len(), 3);
        let mut picked = Vec::new();
        for letter in &letters[..2] {
            picked.push(letter.attr("data-id").await.unwrap().unwrap());
            letter
                .find(Locator::Css("input.pick"))
                .await
                .unwrap()
                .click()
                .await
                .unwrap();
        }
        let hits_before = hook.count();
        // A purge takes a second click on the same button.
        let purge = r#"button[data-action="purge"][data-selection]"#;
        click(b, purge).await;
        b.wait_text(purge, "the purge armed", |t| t == "click again to purge 2")
            .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(xlen(&mut con, dlq), 3, "one click purges nothing");
        click(b, purge).await;
        b.wait_text("#status", "the purge's outcome", |t| {
            t.contains("purged 2 dead letters")
        })
        .await;
        b.wait_text(&cell("dead"), "one dead letter", |t| t == "1")
            .await;
        let left: Vec<(String, Fields)> = entries(&mut con, dlq);
        assert_eq!(left.len(), 1);
        assert!(!picked.contains(&left[0].0), "the unselected one stays");
        assert_eq!(
            hook.count(),
            hits_before,
            "purged dead letters are not handled"
        );

        // Pause: the state, the lag and a pending entry show without a reload.
        click(b, &format!(r#"{row} button[data-action="pause"]"#)).await;
        b.wait_text(&cell("state"), "paused", |t| t == "paused")
            .await;
        // Longer than claim_interval and block: every read in flight has ended.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let handled = hook.count();
        let late = produce(
            &mut con,
            "orders",
            &[
                vec![("order", "C-1".into())],
                vec![("order", "C-2".into())],
                vec![("order", "C-3".into())],
            ],
        );
        // Another application's consumer takes one: it stays pending (claim_idle is 2m).
        let _: redis::Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("billing")
            .arg("pod-x")
            .arg("COUNT")
            .arg(1)
            .arg("STREAMS")
            .arg("orders")
            .arg(">")
            .query(&mut con)
            .unwrap();
        b.wait_text(&cell("lag"), "a lag of 2", |t| t == "2").await;
        b.wait_text(&cell("pending"), "one pending", |t| t == "1")
            .await;
        b.wait_text("table.pending", "the pending entry and its holder", |t| {
            t.contains(&late[0]) && t.contains("pod-x")
        })
        .await;
        assert_eq!(hook.count(), handled, "a paused group handles nothing");
        // The chart and the rate need two samples (one every 10 s).
        b.wait_text(&cell("rate"), "a rate", |t| t.ends_with("/s"))
            .await;
        let points = b
            .js("return document.querySelector('polyline.lag').getAttribute('points');")
            .await;
        assert!(
            points.as_str().unwrap_or_default().split(' ').count() >= 2,
            "the chart draws the lag: {points}"
        );
        assert_eq!(
            b.js("return window.notReloaded === true;").await,
            serde_json::json!(true)
        );
        let png = b.client().screenshot().await.unwrap();
        save_screenshot(&png);

        refuse.store(false, Ordering::SeqCst);
        click(b, &format!(r#"{row} button[data-action="resume"]"#)).await;
        b.wait_text(&cell("state"), "running", |t| t == "running")
            .await;
        b.wait_text(&cell("lag"), "the lag drained", |t| t == "0")
            .await;
        browser.close().await;
        dead_id
    });

    // Each action is logged with the token's id (never the token), what and which ids.
    let logs = daemon.logs();
    let id = &sha256_hex(TOKEN)[..8];
    for action in ["replay", "purge", "pause", "resume"] {
        assert!(
            logs.lines().any(|l| l.contains("console action")
                && l.contains(id)
                && l.contains(&format!("\"action\":\"{action}\""))),
            "no log line for {action} by token {id}:\n{logs}"
        );
    }
    assert!(
        logs.lines()
            .any(|l| l.contains("console action") && l.contains(&dead_id)),
        "the replay's log line names the dead letter's id:\n{logs}"
    );
    assert!(!logs.contains(TOKEN), "the token never appears in the logs");
}

async fn click(b: &Browser, css: &str) {
    b.client()
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css}: {e}"))
        .click()
        .await
        .unwrap();
}

#[test]
fn hostile_fields_are_text_and_a_console_without_a_token_is_read_only() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let groups = r#"
[groups.billing]
stream = "orders"
handler = "noop"
block = "200ms"
"#;
    let (_daemon, addr, _dir) = console_daemon(&redis, groups, None);
    // A dead letter whose fields and error try to break out of the markup.
    let script = "<script>document.title='pwned';alert(1)</script>";
    let img = r#""><img src=x onerror="document.title='pwned';alert(2)">"#;
    let error = "<img src=x onerror=alert(3)> bad payload";
    let id: String = redis::cmd("XADD")
        .arg("{orders}:dlq:billing")
        .arg("*")
        .arg("note")
        .arg(script)
        .arg(img)
        .arg(img)
        .arg("dlq_origin_stream")
        .arg("orders")
        .arg("dlq_origin_id")
        .arg("1-0")
        .arg("dlq_group")
        .arg("billing")
        .arg("dlq_error")
        .arg(error)
        .query(&mut con)
        .unwrap();

    // Without the token file the actions are refused, whoever asks.
    for action in ["replay", "purge", "pause", "resume"] {
        let (status, body) = http_post(
            &addr,
            &format!("/console/groups/billing/{action}"),
            &[
                ("Authorization", &format!("Bearer {TOKEN}")),
                ("Content-Type", "application/json"),
            ],
            &format!("{{\"ids\":[\"{id}\"]}}"),
        );
        assert_eq!(status, 401, "{action}: {body}");
    }
    assert_eq!(xlen(&mut con, "{orders}:dlq:billing"), 1);
    let (_, page) = http_get(&addr, "/").unwrap();
    assert!(
        !page.contains("<script>document"),
        "the field is escaped in the markup"
    );
    // Every console response forbids everything but the console's own files.
    for path in [
        "/",
        "/console/live",
        "/console/console.js",
        "/console/console.css",
    ] {
        let head = http_head(&addr, path);
        assert!(
            head.lines().any(|l| l
                .to_ascii_lowercase()
                .starts_with("content-security-policy: default-src 'self'")),
            "{path}:\n{head}"
        );
    }

    runtime().block_on(async {
        let browser = Browser::start().await;
        let b = &browser;
        b.client().goto(&format!("http://{addr}/")).await.unwrap();
        let check = || async {
            let fields = b.text("article.letter table.fields").await;
            assert!(fields.contains(script), "the script is shown as text: {fields}");
            assert!(fields.contains(img), "the image markup is shown as text: {fields}");
            assert_eq!(b.text("article.letter .dlq-error .text").await, error);
            assert_eq!(b.js("return document.querySelectorAll('img').length;").await, serde_json::json!(0));
            assert_eq!(
                b.js("return document.querySelectorAll('script').length;").await,
                serde_json::json!(1),
                "only the console's own script"
            );
            assert!(b.client().get_alert_text().await.is_err(), "no dialog opened");
            assert_eq!(b.client().title().await.unwrap(), "streamworker console", "no script ran");
            // Read-only: no buttons, no token field.
            assert!(b.client().find_all(Locator::Css("button")).await.unwrap().is_empty());
            assert!(b.client().find_all(Locator::Id("token")).await.unwrap().is_empty());
        };
        check().await;
        // Again after the page refreshed itself (the live part is replaced by the script).
        b.js("document.body.dataset.refreshed = ''; return null;").await;
        let deadline = Instant::now() + Duration::from_secs(20);
        while b.js("return document.body.dataset.refreshed || '';").await == serde_json::json!("") {
            assert!(Instant::now() < deadline, "the page never refreshed itself");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        check().await;
        // The policy is in force: an inline script slipped into the page does not run.
        b.js("const s = document.createElement('script'); s.textContent = \"document.title = 'pwned'\"; document.body.appendChild(s); return null;").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            b.client().title().await.unwrap(),
            "streamworker console",
            "the CSP blocked the inline script"
        );
        // The console's own script cannot act either.
        let status = b
            .js("const r = new XMLHttpRequest(); r.open('POST', '/console/groups/billing/pause', false); r.setRequestHeader('Authorization', 'Bearer x'); r.send(''); return r.status;")
            .await;
        assert_eq!(status, serde_json::json!(401));
        browser.close().await;
    });
    let paused: Option<String> = redis::cmd("GET")
        .arg("{orders}:streamworker:paused:billing")
        .query(&mut con)
        .unwrap_or(None);
    assert_eq!(paused, None);
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
