//! Partitioned streams: how a key picks its partition, and what a partition's stream is
//! called. Producers in any language must agree with this byte for byte, so both rules are
//! deliberately plain and written down in docs (see `docs/partitions.md`):
//!
//! - **partition of a key** = CRC-32 (IEEE 802.3, the checksum of zlib's `crc32`, Python's
//!   `zlib.crc32`, Go's `crc32.ChecksumIEEE`, Java's `java.util.zip.CRC32`) of the key's
//!   UTF-8 bytes, modulo the number of partitions;
//! - **partition `p` of stream `orders`** is the stream `orders:p<p>` (`orders:p0` …
//!   `orders:p15`). Such a name has no `{…}` hash tag, so Redis Cluster hashes all of it
//!   and the partitions spread over the cluster's primaries; each partition's own derived
//!   keys (dead letters, leases) carry `{orders:p3}` and stay in its slot.

pub mod owner;

use std::sync::Arc;
use std::time::Duration;

use crate::config::GroupConfig;

/// The most partitions a group may have.
pub const MAX_PARTITIONS: u32 = 1024;
/// A partition lease's lifetime when neither it nor a long `handler_timeout` says otherwise.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);
/// The shortest partition lease: renewals go out every third of it.
pub const MIN_LEASE: Duration = Duration::from_secs(1);

/// The default partition lease for a group: [`DEFAULT_LEASE`], or three handler timeouts
/// when longer, so a replica that stops reading with a third of its lease left has its
/// handlers ended before the lease expires.
pub fn default_lease(handler_timeout: Duration) -> Duration {
    DEFAULT_LEASE.max(handler_timeout.saturating_mul(3))
}

/// The configuration partition `p` of `group` runs with: the same group, reading the
/// partition's stream (so its dead letters, leases and metrics are the partition's).
pub fn group_of(group: &GroupConfig, p: u32) -> Arc<GroupConfig> {
    let mut partition = group.clone();
    partition.settings.stream = partition_stream(&group.stream, p);
    // The partition runs as an ordinary group on its own stream.
    partition.settings.partitions = None;
    Arc::new(partition)
}

/// How the partition function is named in `check`, `status` and the docs.
pub const PARTITION_FUNCTION: &str = "crc32(key) % partitions";

/// The partition (0-based) that `key` belongs to among `partitions` (at least 1). The
/// handlers crate owns it (its `forward` fans out by it); this is the same function.
pub use streamworker_handlers::partition_of;

/// The stream key of partition `p` of `stream`.
pub fn partition_stream(stream: &str, p: u32) -> String {
    format!("{stream}:p{p}")
}

/// The stream keys of all `partitions` partitions of `stream`, in partition order.
pub fn partition_streams(stream: &str, partitions: u32) -> impl Iterator<Item = String> + '_ {
    (0..partitions).map(move |p| partition_stream(stream, p))
}

/// Whether `stream` can be partitioned so that its partitions spread over a cluster: a
/// name with its own hash tag (`{orders}`) would put every partition in one slot.
pub fn spreads(stream: &str) -> bool {
    streamworker_handlers::hash_input(stream) == stream
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known answers computed with Python's `zlib.crc32`, so a producer in another language
    /// can check its own implementation against the same table (docs/partitions.md).
    #[test]
    fn partitions_match_zlib_crc32() {
        assert_eq!(partition_of(b"customer-42", u32::MAX), 1_241_360_405);
        assert_eq!(partition_of(b"customer-42", 16), 5);
        assert_eq!(partition_of(b"customer-42", 4), 1);
        assert_eq!(partition_of(b"order-1", 16), 15);
        assert_eq!(partition_of(b"order-1", 4), 3);
        assert_eq!(partition_of("ü".as_bytes(), 16), 5);
        assert_eq!(partition_of(b"", 16), 0);
        assert_eq!(partition_of(b"anything", 1), 0);
    }

    #[test]
    fn partition_streams_are_named_and_spread() {
        assert_eq!(partition_stream("orders", 3), "orders:p3");
        assert_eq!(
            partition_streams("orders", 3).collect::<Vec<_>>(),
            ["orders:p0", "orders:p1", "orders:p2"]
        );
        // Each partition is hashed by its whole name: its own slot, its own derived keys.
        assert_eq!(
            streamworker_handlers::slot_tag(&partition_stream("orders", 3)),
            "{orders:p3}"
        );
        assert!(spreads("orders"));
        assert!(!spreads("{orders}"));
        assert!(!spreads("events:{eu}"));
    }

    #[test]
    fn the_default_lease_outlasts_three_handler_timeouts() {
        assert_eq!(default_lease(Duration::from_secs(1)), DEFAULT_LEASE);
        assert_eq!(
            default_lease(Duration::from_secs(30)),
            Duration::from_secs(90)
        );
    }
}
