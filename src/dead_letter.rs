//! What a dead letter is made of: the names of the fields the daemon adds to an entry it
//! dead-letters (and to a replay of one), and the dead-letter stream's default name.
//!
//! The consumer writes these fields (`consumer::settle::dead_letter_fields`), `dlq` reads
//! them, a replay strips them (`replay.lua`, `client/large.rs`), and the loop drops replays
//! meant for another group. The two replay markers are read by handlers too (idempotency
//! keys), so their owner is the handlers crate (`Entry::replay_of`); they are re-exported
//! here so the daemon names every `dlq_` field through this module.

pub use streamworker_handlers::{REPLAY_GROUP_FIELD as REPLAY_GROUP, REPLAY_OF_FIELD as REPLAY_OF};

/// Every field the daemon adds starts with this; a replay keeps the others.
pub const PREFIX: &str = "dlq_";

/// The stream the entry came from.
pub const ORIGIN_STREAM: &str = "dlq_origin_stream";
/// The entry's id in its stream.
pub const ORIGIN_ID: &str = "dlq_origin_id";
/// The consumer group that gave up on it.
pub const GROUP: &str = "dlq_group";
/// Its delivery count when it was dead-lettered.
pub const DELIVERIES: &str = "dlq_deliveries";
/// The last error, on one line.
pub const ERROR: &str = "dlq_error";
/// When it was dead-lettered (RFC 3339).
pub const FAILED_AT: &str = "dlq_failed_at";
/// The consumer that dead-lettered it.
pub const CONSUMER: &str = "dlq_consumer";

/// Every field a dead letter carries besides the entry's own, in the order they are added.
pub const FIELDS: [&str; 7] = [
    ORIGIN_STREAM,
    ORIGIN_ID,
    GROUP,
    DELIVERIES,
    ERROR,
    FAILED_AT,
    CONSUMER,
];

/// Whether a field is one the daemon added (a dead letter's or a replay's).
pub fn is_own_field(name: &[u8]) -> bool {
    name.starts_with(PREFIX.as_bytes())
}

/// The dead-letter stream of a group that names none: `{<stream>}:dlq:<group>`, in the
/// stream's cluster slot so that one script can move an entry there.
pub fn default_stream(stream: &str, group: &str) -> String {
    format!("{}:dlq:{group}", streamworker_handlers::slot_tag(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_has_the_prefix_a_replay_strips() {
        for name in FIELDS.iter().chain([&REPLAY_OF, &REPLAY_GROUP]) {
            assert!(is_own_field(name.as_bytes()), "{name}");
        }
    }

    /// `replay.lua` cannot import Rust constants: it spells the names it reads and writes,
    /// and this test keeps them in step with the owner.
    #[test]
    fn the_replay_script_names_the_same_fields() {
        let lua = include_str!("client/replay.lua");
        for name in [ORIGIN_ID, REPLAY_OF, REPLAY_GROUP] {
            assert!(
                lua.contains(&format!("'{name}'")),
                "replay.lua does not name {name}"
            );
        }
        assert!(
            lua.contains(&format!("string.sub(k, 1, {}) ~= '{PREFIX}'", PREFIX.len())),
            "replay.lua does not strip the {PREFIX} prefix"
        );
    }

    #[test]
    fn the_default_stream_is_in_the_streams_slot() {
        assert_eq!(default_stream("orders", "billing"), "{orders}:dlq:billing");
        assert_eq!(
            default_stream("{orders}:events", "billing"),
            "{orders}:dlq:billing"
        );
    }
}
