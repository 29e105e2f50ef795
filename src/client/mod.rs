//! The only module that sends commands to Redis.
//!
//! Two kinds of connection, because a blocking XREADGROUP stalls every other request
//! multiplexed on its socket (and redis-rs gives up on a reply after its response timeout):
//! - one shared connection for short commands (acknowledgements, claims, scripts, leases),
//!   reconnecting by itself, with `command_timeout` per reply;
//! - one [`Reader`] per group for blocking reads, whose response timeout exceeds `block`,
//!   and whose client id lets shutdown unblock it with CLIENT UNBLOCK.
//!
//! `connection` hides whether that is one server, Redis Cluster or a Sentinel-managed
//! primary. This file holds the handle ([`Client`]): connecting and checking the server's
//! version. The commands live by concern, each file an `impl Client` block:
//!
//! | file | what |
//! | --- | --- |
//! | `streams.rs` | the daemon's stream commands: create the group, read, reclaim, settle |
//! | `large.rs` | settlements too large for one script |
//! | `groups.rs` | XINFO and other facts about groups, circuit and pause state, housekeeping |
//! | `kv.rs` | leases, the handlers' `Store`, the server's clock |
//! | `admin.rs` | the operator's commands (`pending`, `rewind`, `dlq`) |
//! | `tools.rs` | the tools' connections (`produce`, `demo`, `bench`, a private server's probe) |
//! | `scripts.rs` | every `.lua` script |
//! | `replies.rs`, `wire.rs` | reply parsers (redis-rs values; the lean read connection) |
//! | `error.rs` | [`ClientError`]: what a failure means for the caller |

use std::sync::Arc;
use std::time::Duration;

use redis::{RedisError, Value};

pub mod admin;
mod connection;
mod effects;
mod error;
mod groups;
mod kv;
mod large;
mod replies;
mod scripts;
mod streams;
mod tools;
mod wire;

pub use connection::Reader;
pub use error::{ClientError, Result};
pub use groups::{ConsumerInfo, GroupInfo, Retained};
pub use replies::{Claimed, RawEntry, StreamEntry};
pub use streams::{Applied, Release};
pub use tools::{Probe, Producer};

use connection::{Commands, Deployment};
use replies::text_of;

use crate::config::{RedisConfig, redact_url};

/// A handle on one Redis deployment; cheap to clone.
#[derive(Clone)]
pub struct Client {
    deployment: Arc<Deployment>,
    commands: Commands,
    command_timeout: Duration,
    connect_timeout: Duration,
    /// Where it connects, passwords hidden, for messages.
    pub display_url: String,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("url", &self.display_url)
            .finish()
    }
}

/// The oldest servers whose stream commands streamworker relies on (XAUTOCLAIM's
/// deleted-id list, XINFO GROUPS lag).
const MIN_REDIS: (u64, u64) = (7, 0);
const MIN_VALKEY: (u64, u64) = (7, 2);

/// How to name a deployment in messages, without its passwords.
pub fn describe(config: &RedisConfig) -> String {
    if !config.cluster.is_empty() {
        let nodes: Vec<String> = config.cluster.iter().map(|u| redact_url(u)).collect();
        format!("Redis Cluster via {}", nodes.join(", "))
    } else if let Some(s) = &config.sentinel {
        let nodes: Vec<String> = s.nodes.iter().map(|u| redact_url(u)).collect();
        format!("primary {:?} via Sentinel {}", s.master, nodes.join(", "))
    } else {
        redact_url(&config.url)
    }
}

impl Client {
    /// Connects and checks the server version. Fails fast when Redis is unreachable; the
    /// caller decides whether to wait and try again.
    pub async fn connect(config: &RedisConfig) -> Result<Self> {
        let (deployment, commands) = connection::open(config).await?;
        let client = Self {
            deployment: Arc::new(deployment),
            commands,
            command_timeout: config.command_timeout,
            connect_timeout: config.connect_timeout,
            display_url: describe(config),
        };
        client.check_version().await?;
        Ok(client)
    }

    fn commands(&self) -> Commands {
        self.commands.clone()
    }

    async fn check_version(&self) -> Result<()> {
        // Under Cluster, INFO goes to every node and comes back as a map of replies:
        // check them all.
        let reply: Value = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut self.commands())
            .await?;
        let texts: Vec<String> = match reply {
            Value::Map(nodes) => nodes.into_iter().map(|(_, v)| text_of(v)).collect(),
            other => vec![text_of(other)],
        };
        for info in texts {
            self.check_one_version(&info)?;
        }
        Ok(())
    }

    fn check_one_version(&self, info: &str) -> Result<()> {
        supported(info, &self.display_url).map_err(|detail| {
            ClientError::Command(RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "server too old",
                detail,
            )))
        })
    }

    /// PING through the shared connection: is Redis serving us? (Under Cluster, every
    /// node answers.)
    pub async fn ping(&self) -> Result<()> {
        let _: Value = redis::cmd("PING").query_async(&mut self.commands()).await?;
        Ok(())
    }

    /// Opens a dedicated connection for blocking reads of one group's stream (under
    /// Cluster, to the node that owns the stream's slot).
    pub async fn reader(&self, stream: &str, block: Duration, name: &str) -> Result<Reader> {
        self.deployment
            .reader(
                stream,
                &self.commands,
                (self.connect_timeout, block + self.command_timeout),
                &client_name(name),
            )
            .await
    }
}

/// The name a connection gives itself (CLIENT SETNAME takes no spaces).
fn client_name(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '_' })
        .collect()
}

/// Whether the server behind an `INFO server` reply is new enough.
fn supported(info: &str, display_url: &str) -> std::result::Result<(), String> {
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    let (product, version, minimum) = match field("valkey_version") {
        Some(v) => ("Valkey", v, MIN_VALKEY),
        None => (
            "Redis",
            field("redis_version").unwrap_or("0.0.0"),
            MIN_REDIS,
        ),
    };
    let mut parts = version.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if found < minimum {
        return Err(format!(
            "{display_url} runs {product} {version}; streamworker needs {product} {}.{} or later (XAUTOCLAIM's deleted-id list, XINFO GROUPS lag): upgrade the server",
            minimum.0, minimum.1
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_servers_are_refused_by_name() {
        assert!(supported("# Server\r\nredis_version:7.0.15\r\n", "x").is_ok());
        assert!(supported("redis_version:7.2.4\r\nvalkey_version:9.1.2\r\n", "x").is_ok());
        let e = supported("redis_version:6.2.14\r\n", "redis://db:6379").unwrap_err();
        assert!(
            e.contains("redis://db:6379 runs Redis 6.2.14") && e.contains("7.0 or later"),
            "{e}"
        );
        let e = supported("redis_version:7.2.4\r\nvalkey_version:7.0.0\r\n", "x").unwrap_err();
        assert!(
            e.contains("Valkey 7.0.0") && e.contains("7.2 or later"),
            "{e}"
        );
    }
}
