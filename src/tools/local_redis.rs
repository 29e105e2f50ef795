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
/// (node 0 serves the first third with three nodes, and so on), except the slots of keys
/// placed on a chosen node ([`LocalCluster::start_placing`]).
pub struct LocalCluster {
    pub nodes: Vec<LocalRedis>,
    /// The node serving each slot.
    owners: Vec<u8>,
}

/// Slots in a Redis Cluster.
const SLOTS: usize = 16384;

impl LocalCluster {
    pub fn start(binary: &str, n: usize) -> Result<Self, LocalRedisError> {
        Self::start_placing(binary, n, &[])
    }

    /// Starts a cluster of `n` primaries whose slots are split evenly, except that the
    /// slot of each key in `placed` is served by the node given with it: the bench uses it
    /// to lay partition streams out evenly over the primaries, which hashing does not do
    /// for a few partitions. Slots are assigned before the nodes meet, so nothing migrates.
    pub fn start_placing(
        binary: &str,
        n: usize,
        placed: &[(String, usize)],
    ) -> Result<Self, LocalRedisError> {
        let n = n.clamp(1, u8::MAX as usize);
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
        let per = SLOTS / n;
        let mut owners: Vec<u8> = (0..SLOTS).map(|s| (s / per).min(n - 1) as u8).collect();
        let mut probes = nodes
            .iter()
            .map(|node| Probe::connect(&node.url(), Some(Duration::from_secs(2))))
            .collect::<Result<Vec<_>, _>>()
            .map_err(start)?;
        for (key, node) in placed {
            let slot = probes[0].key_slot(key).map_err(start)?;
            owners[usize::from(slot)] = (*node).min(n - 1) as u8;
        }
        // Each node adds its runs of consecutive slots.
        let mut first = 0;
        for slot in 1..=SLOTS {
            if slot == SLOTS || owners[slot] != owners[first] {
                probes[usize::from(owners[first])]
                    .cluster_add_slots(first as u16, (slot - 1) as u16)
                    .map_err(start)?;
                first = slot;
            }
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
        Ok(Self { nodes, owners })
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
        self.owners
            .get(usize::from(slot))
            .map_or(0, |&o| usize::from(o))
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
