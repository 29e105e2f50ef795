//! Writes a handler asks the runtime to make *together with the acknowledgement*.
//!
//! A handler that keeps state in Redis (aggregates, counters, a forwarded copy) returns
//! its writes as [`Effect`]s instead of making them itself. The runtime applies them in the
//! same server-side script that acknowledges the entry, and only if that acknowledgement
//! took (the entry was still pending). So a redelivered entry — after a crash, a timeout,
//! a reclaim — can never be counted twice: its effects exist exactly when it is
//! acknowledged.

use std::time::Duration;

/// One write, described: the runtime turns each into one Redis command. The set is closed
/// on purpose, so a handler cannot reach anything but these writes.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// HINCRBY
    HashIncr { key: String, field: String, by: i64 },
    /// HINCRBYFLOAT
    HashIncrFloat { key: String, field: String, by: f64 },
    /// HSET
    HashSet {
        key: String,
        field: String,
        value: String,
    },
    /// PEXPIRE: keep the key for `ttl` from now.
    Expire { key: String, ttl: Duration },
    /// XADD, optionally capped with `MAXLEN ~`.
    StreamAdd {
        key: String,
        fields: Vec<(Vec<u8>, Vec<u8>)>,
        max_len: Option<u64>,
    },
    /// PUBLISH
    Publish { channel: String, message: String },
    /// XADD with an explicit id, applied *before* the acknowledgement and outside its
    /// script, so `key` may be in another Redis Cluster slot (a partition of a forward's
    /// target). Exactly once without a shared script: ids only grow in a stream, so a
    /// repeat of the same XADD fails, and the runtime then looks the id up (`XRANGE id
    /// id`) to tell "already added" (acknowledge) from "out of order" (refused, never
    /// dropped).
    StreamAddAt {
        key: String,
        id: crate::EntryId,
        fields: Vec<(Vec<u8>, Vec<u8>)>,
    },
}

/// What a successful handler call leaves behind; usually nothing.
pub type Effects = Vec<Effect>;

impl Effect {
    /// The key written (the channel for Publish), for checks such as hash slots.
    pub fn key(&self) -> &str {
        match self {
            Self::HashIncr { key, .. }
            | Self::HashIncrFloat { key, .. }
            | Self::HashSet { key, .. }
            | Self::Expire { key, .. }
            | Self::StreamAdd { key, .. }
            | Self::StreamAddAt { key, .. } => key,
            Self::Publish { channel, .. } => channel,
        }
    }
}
