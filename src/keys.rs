//! Every key the daemon derives from a stream's name, and the names it gives consumers.
//!
//! Each key carries the stream's hash tag ([`slot_tag`]), so under Redis Cluster it lives
//! in its stream's slot and a script may touch both. Most put the tag first; the lease,
//! tick and circuit keys put `streamworker:<kind>:` first (operators match them with
//! `streamworker:lease:*`, as README.md shows), which lands in the same slot: Cluster
//! hashes the first `{…}` of a key wherever it stands.
//!
//! The handlers' own keys (`analytics`, `alerts`, `learning`, `warehouse`) belong to the
//! handlers crate, each beside the code that reads it; the dead-letter stream's default
//! name belongs to [`crate::dead_letter`].

use streamworker_handlers::slot_tag;

/// The consumer that holds failed entries while their backoff runs: `release.lua` parks
/// them with it, and any replica's reclaim takes them when the backoff ends.
pub const BACKOFF_CONSUMER: &str = "streamworker:backoff";

/// The lease on a consumer name: one live process per name (`crate::lease`).
pub fn lease_key(stream: &str, group: &str, consumer: &str) -> String {
    format!("streamworker:lease:{}:{group}:{consumer}", slot_tag(stream))
}

/// The lease under which one replica at a time runs a group's handler tick.
pub fn tick_key(stream: &str, group: &str) -> String {
    format!("streamworker:tick:{}:{group}", slot_tag(stream))
}

/// The hash where each replica records a circuit that is not closed.
pub fn circuit_key(stream: &str, group: &str) -> String {
    format!("streamworker:circuit:{}:{group}", slot_tag(stream))
}

/// The lease on one partition of a partitioned group: its value is the consumer name of
/// the replica that runs the partition (`crate::partition::owner`). `partition_stream` is
/// the partition's own stream (`orders:p3`), so the key sits in the partition's slot.
pub fn partition_lease_key(partition_stream: &str, group: &str) -> String {
    format!(
        "streamworker:partition:{}:{group}",
        slot_tag(partition_stream)
    )
}

/// The sorted set of a partitioned group's live replicas, each scored by when its last
/// heartbeat expires (milliseconds, the server's clock). `stream` is the base stream.
pub fn members_key(stream: &str, group: &str) -> String {
    format!("streamworker:members:{}:{group}", slot_tag(stream))
}

/// The key whose presence pauses a group on every replica (`streamworker pause`).
pub fn pause_key(stream: &str, group: &str) -> String {
    format!("{}:streamworker:paused:{group}", slot_tag(stream))
}

#[cfg(test)]
mod tests {
    use streamworker_handlers::hash_input;

    use super::*;

    /// Every derived key of `stream`, by name.
    fn every_key(stream: &str) -> Vec<(&'static str, String)> {
        vec![
            ("lease", lease_key(stream, "billing", "pod-1")),
            ("tick", tick_key(stream, "billing")),
            ("circuit", circuit_key(stream, "billing")),
            ("pause", pause_key(stream, "billing")),
            ("partition lease", partition_lease_key(stream, "billing")),
            ("members", members_key(stream, "billing")),
            (
                "dead letters",
                crate::dead_letter::default_stream(stream, "billing"),
            ),
        ]
    }

    #[test]
    fn every_key_of_a_stream_is_in_the_streams_slot() {
        for stream in ["orders", "{orders}:events", "events.raw", "a:b:c"] {
            let tag = slot_tag(stream);
            for (name, key) in every_key(stream) {
                // The tag is the first `{…}` of the key, so Cluster hashes exactly it.
                let first_brace = key.find('{').expect("a hash tag");
                assert!(
                    key[first_brace..].starts_with(&tag),
                    "the {name} key {key:?} of {stream:?} does not carry {tag:?} first"
                );
                assert_eq!(
                    hash_input(&key),
                    hash_input(stream),
                    "the {name} key {key:?} is not in the slot of {stream:?}"
                );
            }
        }
    }

    #[test]
    fn each_partitions_lease_is_in_that_partitions_slot() {
        for p in 0..8 {
            let stream = crate::partition::partition_stream("orders", p);
            let key = partition_lease_key(&stream, "billing");
            assert_eq!(
                key,
                format!("streamworker:partition:{{orders:p{p}}}:billing")
            );
            assert_eq!(hash_input(&key), hash_input(&stream));
        }
        assert_eq!(
            members_key("orders", "billing"),
            "streamworker:members:{orders}:billing"
        );
    }

    #[test]
    fn keys_read_by_operators_start_with_the_slot_tag() {
        // ACL patterns (`~{events}:streamworker:paused:*`) and docs name these forms.
        for stream in ["orders", "{orders}:events"] {
            assert!(pause_key(stream, "g").starts_with(&slot_tag(stream)));
            assert!(crate::dead_letter::default_stream(stream, "g").starts_with(&slot_tag(stream)));
        }
        assert_eq!(
            pause_key("{orders}:events", "billing"),
            "{orders}:streamworker:paused:billing"
        );
        assert_eq!(
            lease_key("orders", "billing", "pod-1"),
            "streamworker:lease:{orders}:billing:pod-1"
        );
    }
}
