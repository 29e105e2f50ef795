//! The connections of the tools around the daemon (`produce`, `demo`, `bench`, a private
//! server's start-up probe), so that they too reach Redis only through this module.
//!
//! They need little: add entries fast, create a group, and read a few facts back. They
//! connect to one server by URL, without the daemon's topology, leases or version check:
//! a load generator or a benchmark should not refuse a server the daemon would refuse
//! later with a better message.
//!
//! The one exception is `tools/bench/contender.rs`, which is the loop a Rust engineer
//! writes with redis-rs by hand: it is what the benchmark measures streamworker against,
//! so it must stay plain redis-rs.

use std::time::Duration;

use redis::streams::StreamInfoGroupsReply;

use super::error::Result;
use super::groups::GroupInfo;

/// One XADD per entry, pipelined: `entries` are each a list of field/value pairs.
fn xadds<E, K, V>(stream: &str, entries: impl IntoIterator<Item = E>) -> redis::Pipeline
where
    E: IntoIterator<Item = (K, V)>,
    K: AsRef<[u8]>,
    V: AsRef<[u8]>,
{
    let mut pipe = redis::pipe();
    for fields in entries {
        let cmd = pipe.cmd("XADD").arg(stream).arg("*");
        for (k, v) in fields {
            cmd.arg(k.as_ref()).arg(v.as_ref());
        }
        cmd.ignore();
    }
    pipe
}

/// An async connection that adds entries (`produce`, the demo's producers).
pub struct Producer {
    con: redis::aio::MultiplexedConnection,
}

impl Producer {
    pub async fn connect(url: &str) -> Result<Self> {
        let client = redis::Client::open(url)?;
        Ok(Self {
            con: client.get_multiplexed_async_connection().await?,
        })
    }

    /// Adds `entries` to `stream` in one round trip.
    pub async fn add_all<E, K, V>(
        &mut self,
        stream: &str,
        entries: impl IntoIterator<Item = E>,
    ) -> Result<()>
    where
        E: IntoIterator<Item = (K, V)>,
        K: AsRef<[u8]>,
        V: AsRef<[u8]>,
    {
        xadds(stream, entries)
            .query_async::<()>(&mut self.con)
            .await?;
        Ok(())
    }
}

/// A blocking connection to one server, for `bench` (which measures from a plain thread,
/// so that no runtime of its own competes with what it measures) and for the start-up
/// probe of a private `redis-server`.
pub struct Probe {
    con: redis::Connection,
}

impl Probe {
    /// Connects to `url`, giving up after `timeout` when one is given.
    pub fn connect(url: &str, timeout: Option<Duration>) -> Result<Self> {
        let client = redis::Client::open(url)?;
        let con = match timeout {
            Some(t) => client.get_connection_with_timeout(t)?,
            None => client.get_connection()?,
        };
        Ok(Self { con })
    }

    pub fn ping(&mut self) -> Result<()> {
        let _: String = redis::cmd("PING").query(&mut self.con)?;
        Ok(())
    }

    /// FLUSHALL: a private server's data, between two benchmark runs.
    pub fn flush_all(&mut self) -> Result<()> {
        let _: () = redis::cmd("FLUSHALL").query(&mut self.con)?;
        Ok(())
    }

    /// XGROUP CREATE at `start`, creating the stream when `make_stream`.
    pub fn create_group(
        &mut self,
        stream: &str,
        group: &str,
        start: &str,
        make_stream: bool,
    ) -> Result<()> {
        let mut cmd = redis::cmd("XGROUP");
        cmd.arg("CREATE").arg(stream).arg(group).arg(start);
        if make_stream {
            cmd.arg("MKSTREAM");
        }
        let _: () = cmd.query(&mut self.con)?;
        Ok(())
    }

    /// Adds `entries` to `stream` in one round trip.
    pub fn add_all<E, K, V>(
        &mut self,
        stream: &str,
        entries: impl IntoIterator<Item = E>,
    ) -> Result<()>
    where
        E: IntoIterator<Item = (K, V)>,
        K: AsRef<[u8]>,
        V: AsRef<[u8]>,
    {
        let _: () = xadds(stream, entries).query(&mut self.con)?;
        Ok(())
    }

    /// The CPU seconds the server's main thread has used (user + system, `INFO cpu`).
    pub fn main_thread_cpu(&mut self) -> Result<f64> {
        let info: String = redis::cmd("INFO").arg("cpu").query(&mut self.con)?;
        Ok(["used_cpu_user_main_thread", "used_cpu_sys_main_thread"]
            .iter()
            .filter_map(|k| {
                info.lines()
                    .find_map(|l| l.strip_prefix(*k)?.strip_prefix(':'))
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })
            .sum())
    }

    /// CLUSTER ADDSLOTSRANGE: this node serves slots `first..=last` (a private cluster).
    pub fn cluster_add_slots(&mut self, first: u16, last: u16) -> Result<()> {
        let _: () = redis::cmd("CLUSTER")
            .arg("ADDSLOTSRANGE")
            .arg(first)
            .arg(last)
            .query(&mut self.con)?;
        Ok(())
    }

    /// CLUSTER MEET: joins the node at `host:port` (cluster bus on `bus`) to this one's.
    pub fn cluster_meet(&mut self, host: &str, port: u16, bus: u16) -> Result<()> {
        let _: () = redis::cmd("CLUSTER")
            .arg("MEET")
            .arg(host)
            .arg(port)
            .arg(bus)
            .query(&mut self.con)?;
        Ok(())
    }

    /// Whether CLUSTER INFO says `cluster_state:ok` and every slot is served.
    pub fn cluster_ok(&mut self) -> Result<bool> {
        let info: String = redis::cmd("CLUSTER").arg("INFO").query(&mut self.con)?;
        Ok(info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384"))
    }

    /// CLUSTER KEYSLOT: the slot of `key`.
    pub fn key_slot(&mut self, key: &str) -> Result<u16> {
        Ok(redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut self.con)?)
    }

    /// GET `key` as text, `None` when it does not exist (the bench reads a partition's
    /// lease to see who holds it).
    pub fn get(&mut self, key: &str) -> Result<Option<String>> {
        Ok(redis::cmd("GET").arg(key).query(&mut self.con)?)
    }

    /// XINFO GROUPS of `stream`: its groups as [`Client::groups`](super::Client::groups)
    /// reports them.
    pub fn groups(&mut self, stream: &str) -> Result<Vec<GroupInfo>> {
        let reply: StreamInfoGroupsReply = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(stream)
            .query(&mut self.con)?;
        Ok(reply.groups.into_iter().map(GroupInfo::from).collect())
    }
}
