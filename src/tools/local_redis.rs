//! A private `redis-server` on a free port, for `streamworker bench` and
//! `streamworker demo`: nothing on disk, gone when dropped.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::client::Probe;

#[derive(Debug, thiserror::Error)]
pub enum LocalRedisError {
    #[error(
        "redis-server is not installed ({0}); install it with `sudo apt-get install redis-server` (Debian/Ubuntu) or your package manager, or set [redis] url to a server you run"
    )]
    Missing(std::io::Error),
    #[error("redis-server did not start on a free port: {0}")]
    Start(String),
}

pub struct LocalRedis {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl LocalRedis {
    /// Starts `binary` (normally `redis-server`) on a free loopback port.
    pub fn start(binary: &str) -> Result<Self, LocalRedisError> {
        let mut last = String::new();
        for _ in 0..5 {
            let dir = tempfile::tempdir().map_err(|e| LocalRedisError::Start(e.to_string()))?;
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .map_err(|e| LocalRedisError::Start(e.to_string()))?;
            let mut child = Command::new(binary)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .arg("--dir")
                .arg(dir.path())
                .args(["--logfile", ""])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(LocalRedisError::Missing)?;
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(status)) = child.try_wait() {
                    last = format!("it exited with {status}");
                    break;
                }
                if ping(port) {
                    return Ok(Self {
                        port,
                        child,
                        _dir: dir,
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        Err(LocalRedisError::Start(last))
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

fn ping(port: u16) -> bool {
    Probe::connect(
        &format!("redis://127.0.0.1:{port}/0"),
        Some(Duration::from_millis(200)),
    )
    .and_then(|mut p| p.ping())
    .is_ok()
}

impl Drop for LocalRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
