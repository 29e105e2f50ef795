//! What the test binaries share: the repository's files, free ports, the built binary as a
//! daemon that is killed when its handle drops, a throwaway `redis-server`, YAML documents
//! and promtool.
//!
//! Included with `mod common;` by the asset tests (`tests/deploy.rs`,
//! `tests/observability_assets.rs`) and with `#[path = "../common/mod.rs"] mod common;` by
//! `tests/it` (whose `support::free_port` is this one).

// Each test binary uses a part of this module; the rest would be dead code there.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use yaml_rust2::{Yaml, YamlLoader};

// ---- files ---------------------------------------------------------------------------------

/// The repository's root (the root crate's manifest directory).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A path relative to the repository's root.
pub fn repo_path(relative: &str) -> PathBuf {
    repo().join(relative)
}

/// A file of the repository, by its path relative to the root.
pub fn read(relative: &str) -> String {
    let path = repo_path(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The documents of a YAML file (empty documents left out), merge keys (`<<: *anchor`)
/// resolved as Compose resolves them.
pub fn yaml_docs(path: &Path) -> Vec<Yaml> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let docs = YamlLoader::load_from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()));
    docs.into_iter()
        .filter(|d| !d.is_null())
        .map(resolve_merge_keys)
        .collect()
}

fn resolve_merge_keys(y: Yaml) -> Yaml {
    match y {
        Yaml::Array(items) => Yaml::Array(items.into_iter().map(resolve_merge_keys).collect()),
        Yaml::Hash(hash) => {
            let merge_key = Yaml::String("<<".into());
            let mut merged = yaml_rust2::yaml::Hash::new();
            if let Some(base) = hash.get(&merge_key) {
                let bases = match base {
                    Yaml::Array(list) => list.clone(),
                    other => vec![other.clone()],
                };
                for base in bases {
                    let Yaml::Hash(base) = resolve_merge_keys(base) else {
                        panic!("a merge key must name a mapping");
                    };
                    for (k, v) in base {
                        merged.entry(k).or_insert(v);
                    }
                }
            }
            for (k, v) in hash {
                if k != merge_key {
                    merged.insert(k, resolve_merge_keys(v));
                }
            }
            Yaml::Hash(merged)
        }
        other => other,
    }
}

// ---- ports ---------------------------------------------------------------------------------

/// A port nobody listens on right now. Ports are handed out from a counter (starting at a
/// random point below the kernel's ephemeral range), so two tests of this process never get
/// the same one; there is still a window before the caller binds it, and callers that start
/// servers retry on failure.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let _ = NEXT.compare_exchange(
        0,
        20_000 + fastrand::u32(0..10_000),
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let port = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = 20_000 + (port - 20_000) % 12_000;
        if TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
}

// ---- processes -----------------------------------------------------------------------------

/// A child process (the daemon, as a test runs it) with its stderr in a log file; killed if
/// a test fails while it runs.
pub struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Starts `command` with stdout discarded and stderr written to `log`.
    pub fn spawn(mut command: Command, log: &Path) -> Daemon {
        let file = std::fs::File::create(log)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let child = command
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        Daemon {
            child,
            log: log.to_owned(),
        }
    }

    /// What it wrote to stderr so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("wait for the child")
    }

    /// Waits up to `timeout` for it to exit by itself; `what` names it in the panic.
    pub fn wait_exit(&mut self, timeout: Duration, what: &str) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: still running after {timeout:?}:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM and waits (generously) for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        if let Some(status) = self.exited() {
            return status;
        }
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) with a pid this handle still owns: the child has not been reaped
        // (checked just above), so the pid cannot have been reused.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        self.wait_exit(Duration::from_secs(15), "SIGTERM did not stop it")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The environment that points a daemon at a configuration file, a Redis and an HTTP port,
/// with traces off (an exporter would wait for a collector nobody runs).
pub fn daemon_env(config: &Path, redis_url: &str, http_port: u16) -> BTreeMap<String, String> {
    [
        ("STREAMWORKER_CONFIG", config.display().to_string()),
        ("STREAMWORKER__REDIS__URL", redis_url.to_owned()),
        (
            "STREAMWORKER__HTTP__LISTEN",
            format!("127.0.0.1:{http_port}"),
        ),
        ("STREAMWORKER__TELEMETRY__OTLP_ENDPOINT", String::new()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// A throwaway `redis-server` on a free loopback port, without persistence.
pub struct Redis {
    child: Child,
    pub port: u16,
}

impl Redis {
    pub fn start(dir: &Path) -> Self {
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (is it installed?)");
        let redis = Redis { child, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        redis
    }

    /// `redis://127.0.0.1:<port>/<db>`.
    pub fn url(&self, db: u32) -> String {
        format!("redis://127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- promtool ------------------------------------------------------------------------------

/// Fails the test unless promtool runs. A skipped check would pass silently on a machine
/// without it, and that green would say nothing about the rules.
pub fn require_promtool(check: &str) {
    let found = Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "`{check}` needs promtool, which is not on PATH: install it with \
         `apt-get install prometheus` (Debian; scripts/test does this) or put the `promtool` \
         of a Prometheus release (https://prometheus.io/download/) on PATH"
    );
}

/// Runs promtool with `args`, asserting that it succeeds; what it printed.
pub fn promtool(args: &[&str]) -> String {
    let output = Command::new("promtool")
        .args(args)
        .output()
        .expect("running promtool");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "promtool {} failed ({}):\n{stdout}\n{stderr}",
        args.join(" "),
        output.status
    );
    format!("{stdout}{stderr}")
}
