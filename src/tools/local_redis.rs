//! A private `redis-server` on a free port, for `streamworker bench` and
//! `streamworker demo`: nothing on disk, gone when dropped. And a private Redis Cluster of
//! such servers, for the bench's scale-out drain.

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
        Self::start_with(binary, &[])
    }

    /// Starts `binary` on a free loopback port with `extra` arguments.
    pub fn start_with(binary: &str, extra: &[String]) -> Result<Self, LocalRedisError> {
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
                .args(extra)
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

/// Free loopback ports, each distinct from the others.
fn free_ports(n: usize) -> Result<Vec<u16>, LocalRedisError> {
    // Hold every listener until all are chosen, so no port comes up twice.
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| LocalRedisError::Start(e.to_string()))?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<_, _>>()
        .map_err(|e| LocalRedisError::Start(e.to_string()))
}

/// A private Redis Cluster: `n` primaries, no replicas, the slots split evenly in order
/// (node 0 serves the first third with three nodes, and so on).
pub struct LocalCluster {
    pub nodes: Vec<LocalRedis>,
    /// The first and last slot each node serves.
    pub ranges: Vec<(u16, u16)>,
}

impl LocalCluster {
    pub fn start(binary: &str, n: usize) -> Result<Self, LocalRedisError> {
        let n = n.max(1);
        // The cluster bus listens on a port of its own; by default port + 10000, which may
        // not exist for a high free port, so each node is given a free one.
        let bus = free_ports(n)?;
        let nodes = bus
            .iter()
            .map(|bus| {
                let extra = [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "5000",
                    "--cluster-port",
                    &bus.to_string(),
                ]
                .map(String::from);
                LocalRedis::start_with(binary, &extra)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let start = |e: crate::client::ClientError| LocalRedisError::Start(e.to_string());
        let per = 16384 / n as u32;
        let ranges: Vec<(u16, u16)> = (0..n as u32)
            .map(|i| {
                let last = if i + 1 == n as u32 {
                    16383
                } else {
                    (i + 1) * per - 1
                };
                ((i * per) as u16, last as u16)
            })
            .collect();
        let mut probes = nodes
            .iter()
            .map(|node| Probe::connect(&node.url(), Some(Duration::from_secs(2))))
            .collect::<Result<Vec<_>, _>>()
            .map_err(start)?;
        for (probe, &(first, last)) in probes.iter_mut().zip(&ranges) {
            probe.cluster_add_slots(first, last).map_err(start)?;
        }
        for (node, bus) in nodes.iter().zip(&bus).skip(1) {
            probes[0]
                .cluster_meet("127.0.0.1", node.port, *bus)
                .map_err(start)?;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if probes.iter_mut().all(|p| p.cluster_ok().unwrap_or(false)) {
                break;
            }
            if Instant::now() > deadline {
                return Err(LocalRedisError::Start(
                    "the private cluster did not reach cluster_state:ok within 30 s".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self { nodes, ranges })
    }

    /// Node URLs, for `[redis] cluster`.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect()
    }

    /// The node serving `slot`.
    pub fn owner(&self, slot: u16) -> usize {
        self.ranges
            .iter()
            .position(|&(first, last)| (first..=last).contains(&slot))
            .unwrap_or(0)
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
