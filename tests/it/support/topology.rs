//! Deployments beyond one server, started by the tests: a Redis Cluster of three
//! primaries, a primary with a replica and three sentinels, and a TLS server with a test CA.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{RedisServer, free_port, server_binary, wait_until};

/// Three cluster-enabled primaries joined with `redis-cli --cluster create`.
pub struct Cluster {
    pub nodes: Vec<RedisServer>,
}

impl Cluster {
    pub fn start() -> Self {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ])
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli runs");
        assert!(
            out.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = Self { nodes };
        wait_until(
            Duration::from_secs(20),
            "cluster_state:ok everywhere",
            || {
                cluster.nodes.iter().all(|n| {
                    let mut con = n.connection();
                    let info: String = redis::cmd("CLUSTER")
                        .arg("INFO")
                        .query(&mut con)
                        .unwrap_or_default();
                    info.contains("cluster_state:ok")
                })
            },
        );
        cluster
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect()
    }

    /// A cluster-aware connection for setting up and checking.
    pub fn connection(&self) -> redis::cluster::ClusterConnection {
        redis::cluster::ClusterClient::new(self.urls())
            .unwrap()
            .get_connection()
            .unwrap()
    }
}

/// A sentinel process.
pub struct Sentinel {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A primary, its replica and three sentinels watching it as `mymaster`.
pub struct SentinelSet {
    pub primary: RedisServer,
    pub replica: RedisServer,
    pub sentinels: Vec<Sentinel>,
}

impl SentinelSet {
    pub fn start() -> Self {
        let primary = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
        let replicaof = format!("127.0.0.1 {}", primary.port);
        let replica = RedisServer::start_with(&[
            "--replicaof",
            &replicaof,
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
        ]);
        let sentinels = (0..3)
            .map(|_| {
                let dir = tempfile::tempdir().unwrap();
                let port = free_port();
                let conf = dir.path().join("sentinel.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor mymaster 127.0.0.1 {} 2\nsentinel down-after-milliseconds mymaster 1000\nsentinel failover-timeout mymaster 4000\nsentinel parallel-syncs mymaster 1\n",
                        dir.path().display(),
                        primary.port
                    ),
                )
                .unwrap();
                let child = Command::new(server_binary())
                    .arg(&conf)
                    .arg("--sentinel")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("redis-server --sentinel runs");
                Sentinel { port, child, _dir: dir }
            })
            .collect::<Vec<_>>();
        let set = Self {
            primary,
            replica,
            sentinels,
        };
        wait_until(
            Duration::from_secs(20),
            "the replica in sync and the sentinels watching",
            || {
                let mut con = set.replica.connection();
                let info: String = redis::cmd("INFO")
                    .arg("replication")
                    .query(&mut con)
                    .unwrap_or_default();
                info.contains("master_link_status:up") && set.sentinel_count_ok()
            },
        );
        set
    }

    fn sentinel_count_ok(&self) -> bool {
        self.sentinels.iter().all(|s| {
            let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{}", s.port)) else {
                return false;
            };
            let Ok(mut con) = client.get_connection_with_timeout(Duration::from_secs(1)) else {
                return false;
            };
            let replicas: redis::RedisResult<Vec<redis::Value>> = redis::cmd("SENTINEL")
                .arg("REPLICAS")
                .arg("mymaster")
                .query(&mut con);
            let sentinels: redis::RedisResult<Vec<redis::Value>> = redis::cmd("SENTINEL")
                .arg("SENTINELS")
                .arg("mymaster")
                .query(&mut con);
            matches!(replicas, Ok(r) if !r.is_empty()) && matches!(sentinels, Ok(s) if s.len() == 2)
        })
    }

    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|s| format!("redis://127.0.0.1:{}", s.port))
            .collect()
    }

    /// The port the sentinels currently name as the primary.
    pub fn current_primary_port(&self) -> Option<u16> {
        let client =
            redis::Client::open(format!("redis://127.0.0.1:{}", self.sentinels[0].port)).ok()?;
        let mut con = client
            .get_connection_with_timeout(Duration::from_secs(1))
            .ok()?;
        let addr: Vec<String> = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg("mymaster")
            .query(&mut con)
            .ok()?;
        addr.get(1)?.parse().ok()
    }
}

/// A test CA with a server certificate for 127.0.0.1 and a client certificate, made with
/// the `openssl` command line.
pub struct Certificates {
    pub dir: tempfile::TempDir,
}

impl Certificates {
    pub fn generate() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .expect("openssl runs");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=streamworker test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ]);
        // X.509 v3 with the right key usages: rustls refuses v1 certificates.
        std::fs::write(
            dir.path().join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("client.ext"),
            "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
        )
        .unwrap();
        for name in ["server", "client"] {
            run(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ]);
            let mut args = vec![
                "x509",
                "-req",
                "-in",
                &*format!("{name}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &*format!("{name}.crt"),
            ]
            .into_iter()
            .map(str::to_owned)
            .collect::<Vec<_>>();
            args.extend(["-extfile".to_owned(), format!("{name}.ext")]);

            run(&args.iter().map(String::as_str).collect::<Vec<_>>());
        }
        Self { dir }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// Arguments for a TLS-only `redis-server` that requires client certificates.
    pub fn server_args(&self) -> Vec<String> {
        let p = |f: &str| self.path(f).display().to_string();
        vec![
            "--port".into(),
            "0".into(),
            "--tls-port".into(),
            "{port}".into(),
            "--tls-cert-file".into(),
            p("server.crt"),
            "--tls-key-file".into(),
            p("server.key"),
            "--tls-ca-cert-file".into(),
            p("ca.crt"),
            "--tls-auth-clients".into(),
            "yes".into(),
        ]
    }
}

/// `redis-cli` against a TLS server, for setting up and checking.
pub fn tls_cli(
    certs: &Certificates,
    port: u16,
    user: &str,
    password: &str,
    args: &[&str],
) -> String {
    let p = |f: &str| certs.path(f).display().to_string();
    let out = Command::new("redis-cli")
        .args([
            "--tls",
            "--cacert",
            &p("ca.crt"),
            "--cert",
            &p("client.crt"),
            "--key",
            &p("client.key"),
        ])
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "--user",
            user,
            "--pass",
            password,
            "--no-auth-warning",
        ])
        .args(args)
        .output()
        .expect("redis-cli runs");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}
