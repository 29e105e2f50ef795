//! Helpers for the integration tests: real `redis-server` processes on free ports, the
//! built `streamworker` binary as a child process, a webhook server that records what it
//! receives, and a TCP proxy that can hold replies back.
//!
//! Everything a test starts is stopped when its handle drops.

#![allow(dead_code)]

pub mod otlp;
pub mod postgres;
pub mod proxy;
pub mod topology;
pub mod webhook;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use otlp::OtlpReceiver;
pub use proxy::Proxy;
pub use webhook::WebhookServer;

/// The binary under test.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_streamworker")
}

/// The server the tests start: `redis-server`, or `STREAMWORKER_TEST_SERVER` (e.g. a
/// `valkey-server`, to run the suite against Valkey).
pub fn server_binary() -> String {
    std::env::var("STREAMWORKER_TEST_SERVER").unwrap_or_else(|_| "redis-server".into())
}

/// A port nobody listens on right now (shared with the asset tests: `tests/common`).
pub use crate::common::free_port;

/// Polls `check` until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {timeout:?} waiting for: {what}");
}

/// A private `redis-server`.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    args: Vec<String>,
    child: Option<Child>,
    probe: bool,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts with extra arguments, e.g. `["--appendonly", "yes"]`.
    pub fn start_with(args: &[&str]) -> Self {
        Self::start_probed(args, true)
    }

    /// Starts a server that answers PING only over a protocol the probe does not speak
    /// (TLS): waits until the port accepts connections instead.
    pub fn start_unprobed(args: &[&str]) -> Self {
        Self::start_probed(args, false)
    }

    fn start_probed(args: &[&str], probe: bool) -> Self {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        for _ in 0..10 {
            let mut server = Self {
                port: free_port(),
                dir: tempfile::tempdir().expect("temp dir"),
                args: args.clone(),
                child: None,
                probe,
            };
            if server.spawn() {
                return server;
            }
        }
        panic!("could not start redis-server (is it installed? scripts/test installs it)");
    }

    fn spawn(&mut self) -> bool {
        let log = self.dir.path().join("redis.log");
        let child = Command::new(server_binary())
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log)
            .args(
                self.args
                    .iter()
                    .map(|a| a.replace("{port}", &self.port.to_string())),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                // Exited: most likely the port was taken in the meantime.
                let _ = status;
                self.child = None;
                return false;
            }
            if !self.probe {
                if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                    return true;
                }
            } else if let Ok(mut con) = self.try_connection()
                && redis::cmd("PING").query::<String>(&mut con).is_ok()
            {
                return true;
            }

            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn url(&self) -> String {
        match self.password() {
            Some(password) => format!("redis://:{password}@127.0.0.1:{}/0", self.port),
            None => format!("redis://127.0.0.1:{}/0", self.port),
        }
    }

    /// The `--requirepass` it was started with, if any.
    pub fn password(&self) -> Option<&str> {
        self.args
            .iter()
            .position(|a| a == "--requirepass")
            .and_then(|i| self.args.get(i + 1))
            .map(String::as_str)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn try_connection(&self) -> redis::RedisResult<redis::Connection> {
        redis::Client::open(self.url())?.get_connection_with_timeout(Duration::from_secs(2))
    }

    /// A plain connection for setting up and checking.
    pub fn connection(&self) -> redis::Connection {
        self.try_connection()
            .expect("connect to the test redis-server")
    }

    /// Kills the server with SIGKILL (as a crash would).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port with the same data directory.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.spawn() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("redis-server did not restart on port {}", self.port);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running `streamworker` process.
pub struct Daemon {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub config_path: PathBuf,
    log_path: PathBuf,
    status: Option<ExitStatus>,
}

impl Daemon {
    pub fn start(config: &str) -> Self {
        Self::start_with_env(config, &[])
    }

    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let config_path = dir.path().join("streamworker.toml");
        std::fs::write(&config_path, config).expect("write config");
        let log_path = dir.path().join("streamworker.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        let child = Command::new(binary())
            .arg("run")
            .arg("-c")
            .arg(&config_path)
            .env(
                "RUST_LOG",
                std::env::var("TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            // After RUST_LOG, so a test can raise one daemon's log level.
            .envs(env.iter().copied())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("the streamworker binary runs");
        Self {
            child: Some(child),
            dir,
            config_path,
            log_path,
            status: None,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(-1)
    }

    pub fn signal(&self, signal: i32) {
        if let Some(child) = &self.child {
            unsafe {
                libc::kill(child.id() as i32, signal);
            }
        }
    }

    pub fn terminate(&self) {
        self.signal(libc::SIGTERM);
    }

    /// SIGKILL: no shutdown at all, as a crash or an OOM kill.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            self.status = child.wait().ok();
        }
    }

    /// Waits for the process to exit; `None` if it is still running after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.status.is_some() {
            return self.status;
        }
        let deadline = Instant::now() + timeout;
        // Checked at least once, so a zero timeout still notices an exit.
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait().unwrap()
            {
                self.status = Some(status);
                self.child = None;
                return self.status;
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.wait(Duration::ZERO).is_none() && self.child.is_some()
    }

    /// Everything the process logged so far.
    pub fn logs(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log_path) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    /// Waits until a log line contains `needle`.
    pub fn wait_for_log(&self, timeout: Duration, needle: &str) {
        wait_until(timeout, &format!("log line containing {needle:?}"), || {
            self.logs().contains(needle)
        });
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- streamworker log ({}) ---\n{}",
                self.config_path.display(),
                self.logs()
            );
        }
    }
}

/// Runs the binary to completion with `args`, returning (exit code, stdout, stderr).
pub fn run_cli(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(binary())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("the streamworker binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Adds entries in one round trip per 1,000; returns their ids.
pub fn produce(
    con: &mut redis::Connection,
    stream: &str,
    entries: &[Vec<(&str, String)>],
) -> Vec<String> {
    let mut ids = Vec::with_capacity(entries.len());
    for chunk in entries.chunks(1000) {
        let mut pipe = redis::pipe();
        for fields in chunk {
            let mut cmd = redis::cmd("XADD");
            cmd.arg(stream).arg("*");
            for (k, v) in fields {
                cmd.arg(*k).arg(v);
            }
            pipe.add_command(cmd);
        }
        let chunk_ids: Vec<String> = pipe.query(con).expect("XADD");
        ids.extend(chunk_ids);
    }
    ids
}

/// Writes `text` as `streamworker.toml` in `dir` (a temporary directory the test owns) and
/// returns its path, for `-c`.
pub fn write_config(dir: impl AsRef<Path>, text: &str) -> String {
    let path = dir.as_ref().join("streamworker.toml");
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    path.display().to_string()
}

/// Creates `group` on `stream` (and the stream if missing) from `start` (`0`, `$` or an id):
/// a group made by an operator or another service before the daemon starts.
pub fn create_group(con: &mut redis::Connection, stream: &str, group: &str, start: &str) {
    redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg(start)
        .arg("MKSTREAM")
        .query::<()>(con)
        .unwrap_or_else(|e| panic!("XGROUP CREATE {stream} {group} {start}: {e}"));
}

/// Reads up to `count` new entries (`usize::MAX`: all) as `consumer` of `group`, leaving
/// them pending on it: a replica that read and died, or another service's consumer.
pub fn read_as(
    con: &mut redis::Connection,
    stream: &str,
    group: &str,
    consumer: &str,
    count: usize,
) {
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP").arg(group).arg(consumer);
    if count != usize::MAX {
        cmd.arg("COUNT").arg(count);
    }
    cmd.arg("STREAMS").arg(stream).arg(">");
    cmd.query::<redis::Value>(con)
        .unwrap_or_else(|e| panic!("XREADGROUP {group} {consumer} {stream}: {e}"));
}

/// Acknowledges `ids` (one id or a slice) in `group`, as another consumer would.
pub fn ack(
    con: &mut redis::Connection,
    stream: &str,
    group: &str,
    ids: impl redis::ToRedisArgs,
) -> u64 {
    redis::cmd("XACK")
        .arg(stream)
        .arg(group)
        .arg(ids)
        .query(con)
        .unwrap_or_else(|e| panic!("XACK {stream} {group}: {e}"))
}

/// The pending count and lag of a group, from XINFO GROUPS; `None` when the stream or the
/// group does not exist (yet). Any other failure (Redis unreachable, a wrong type, a reply
/// without `pending`) fails the test: it must not read as an answer.
pub fn group_info(
    con: &mut redis::Connection,
    stream: &str,
    group: &str,
) -> Option<(u64, Option<u64>)> {
    let groups: Vec<redis::Value> = match redis::cmd("XINFO").arg("GROUPS").arg(stream).query(con) {
        Ok(groups) => groups,
        Err(e) if e.to_string().contains("no such key") => return None,
        Err(e) => panic!("XINFO GROUPS {stream}: {e}"),
    };
    for g in groups {
        let map = value_map(g);
        if map.get("name").map(|v| v.as_str()) == Some(group) {
            let pending = map
                .get("pending")
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("XINFO GROUPS {stream}: no pending count in {map:?}"));
            // `lag` is nil when Redis cannot tell: that is an answer (None), not an error.
            let lag = map.get("lag").filter(|v| !v.is_empty()).map(|v| {
                v.parse()
                    .unwrap_or_else(|e| panic!("XINFO GROUPS {stream}: lag {v:?}: {e}"))
            });
            return Some((pending, lag));
        }
    }
    None
}

/// Pending entries of one consumer (extended XPENDING). A missing group or any other error
/// fails the test instead of reading as "nothing pending".
pub fn pending_of(con: &mut redis::Connection, stream: &str, group: &str, consumer: &str) -> u64 {
    let rows: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .arg("-")
        .arg("+")
        .arg(100_000)
        .arg(consumer)
        .query(con)
        .unwrap_or_else(|e| panic!("XPENDING {stream} {group} - + 100000 {consumer}: {e}"));
    rows.len() as u64
}

/// A flat `[k, v, k, v]` reply (RESP2 map) as strings.
pub fn value_map(v: redis::Value) -> std::collections::HashMap<String, String> {
    let mut out = std::collections::HashMap::new();
    let items = match v {
        redis::Value::Array(items) => items,
        redis::Value::Map(pairs) => {
            for (k, v) in pairs {
                out.insert(text(&k), text(&v));
            }
            return out;
        }
        _ => return out,
    };
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.insert(text(&k), text(&v));
    }
    out
}

pub fn text(v: &redis::Value) -> String {
    match v {
        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        redis::Value::SimpleString(s) => s.clone(),
        redis::Value::Int(i) => i.to_string(),
        redis::Value::Nil => String::new(),
        other => format!("{other:?}"),
    }
}

/// A configuration with settings that make tests fast; `groups` is TOML appended as is.
pub fn config(redis_url: &str, consumer: &str, groups: &str) -> String {
    format!(
        r#"
[redis]
url = "{redis_url}"
command_timeout = "2s"
connect_timeout = "1s"

[worker]
consumer = "{consumer}"
shutdown_timeout = "10s"
claim_interval = "200ms"

[http]
listen = ""

[telemetry]
log_format = "json"

{groups}
"#
    )
}

/// A plain HTTP/1.1 GET; returns (status, body).
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw).ok()?;
    let status = raw.split(' ').nth(1)?.parse().ok()?;
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// `streamworker_entries_total{labels…}` from the daemon's `/metrics` at `http`. The
/// daemon's listener may not be up yet and a group's samples appear when the group starts,
/// so this waits up to 30 s for the sample; then it fails the test (a daemon that died or a
/// label that does not exist must not read as 0).
pub fn entries_total(http: &str, labels: &[(&str, &str)]) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::from("no answer");
    loop {
        match http_get(http, "/metrics") {
            Some((200, text)) => {
                if let Some(v) = metric(&text, "streamworker_entries_total", labels) {
                    return v;
                }
                last = format!("no such sample in:\n{text}");
            }
            Some((status, body)) => last = format!("status {status}: {body}"),
            None => {}
        }
        if Instant::now() >= deadline {
            panic!("streamworker_entries_total{labels:?} from http://{http}/metrics: {last}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The value of the sample `name{labels…}` in exposition text, matching every given label.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            return None;
        }
        if !labels
            .iter()
            .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        {
            return None;
        }
        rest.rsplit(' ').next()?.parse().ok()
    })
}

/// Delivery counts of the group's pending entries, by id (extended XPENDING).
pub fn delivery_counts(
    con: &mut redis::Connection,
    stream: &str,
    group: &str,
) -> std::collections::HashMap<String, u64> {
    let rows: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .arg("-")
        .arg("+")
        .arg(100_000)
        .query(con)
        .unwrap_or_else(|e| panic!("XPENDING {stream} {group} - + 100000: {e}"));
    rows.into_iter()
        .map(|(id, _, _, count)| (id, count))
        .collect()
}

/// Fields of an entry, bytes as stored, in order.
pub type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// All entries of a stream as (id, fields); none when the key does not exist, and a
/// failure (a wrong type, Redis unreachable) fails the test.
pub fn entries(con: &mut redis::Connection, key: &str) -> Vec<(String, Fields)> {
    redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query(con)
        .unwrap_or_else(|e| panic!("XRANGE {key} - +: {e}"))
}

/// A configuration whose HTTP listener is on a free port; returns it with the address.
pub fn config_with_http(redis_url: &str, consumer: &str, groups: &str) -> (String, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let text = config(redis_url, consumer, groups)
        .replace("listen = \"\"", &format!("listen = \"{addr}\""));
    (text, addr)
}

/// The ACL rule the docs document (`user streamworker on >PASSWORD …`), read from
/// docs/configuration.md itself, so the tests exercise exactly what users are told to configure: `on`
/// followed by the rule's selectors and permissions.
pub fn readme_acl_rules() -> String {
    const PREFIX: &str = "user streamworker on >PASSWORD ";
    let line = include_str!("../../../docs/configuration.md")
        .lines()
        .find(|l| l.starts_with(PREFIX))
        .expect("docs/configuration.md documents the ACL user");
    format!("on {}", &line[PREFIX.len()..])
}

/// What the server refused since it started, from `ACL LOG`, one line per entry.
pub fn acl_refusals(con: &mut redis::Connection) -> Vec<String> {
    let log: Vec<redis::Value> = redis::cmd("ACL").arg("LOG").query(con).unwrap();
    log.into_iter()
        .map(|entry| {
            let e = value_map(entry);
            format!(
                "{} refused ({}) {:?} for user {} ({} times): {}",
                e.get("context").map_or("?", String::as_str),
                e.get("reason").map_or("?", String::as_str),
                e.get("object").map_or("?", String::as_str),
                e.get("username").map_or("?", String::as_str),
                e.get("count").map_or("?", String::as_str),
                e.get("client-info").map_or("?", String::as_str),
            )
        })
        .collect()
}

/// `streamworker dlq replay -c CONFIG --group GROUP --all`, which must succeed; returns
/// (stdout, stderr).
pub fn dlq_replay_all(config: &Path, group: &str) -> (String, String) {
    let (code, out, err) = run_cli(
        &[
            "dlq",
            "replay",
            "-c",
            config.to_str().expect("a UTF-8 path"),
            "--group",
            group,
            "--all",
        ],
        &[],
    );
    assert_eq!(code, 0, "dlq replay --all --group {group}: {out}\n{err}");
    (out, err)
}
