//! Keeping a group's companion keys in its stream's cluster slot.
//!
//! Every key streamworker derives from a stream (dead letters, leases, the circuit,
//! handler aggregates) is touched by the same Lua scripts as the stream, and Redis
//! Cluster runs a script only when all its keys share one slot. Redis hashes only the
//! first non-empty `{…}` of a key when there is one, so a derived key starts with a
//! `{…}` holding exactly what the stream's name is hashed by.

/// The part of `key` Redis Cluster hashes: the text inside its first `{…}` when that is
/// non-empty, otherwise the whole key.
pub fn hash_input(key: &str) -> &str {
    if let Some(open) = key.find('{')
        && let Some(len) = key[open + 1..].find('}')
        && len > 0
    {
        return &key[open + 1..open + 1 + len];
    }
    key
}

/// The `{…}` prefix that puts a key in `stream`'s slot: `{orders}` for `orders` and for
/// `{orders}:events` alike.
///
/// When the stream is hashed by text that itself holds a `}` (a name such as `a{}b`,
/// whose empty braces make Redis hash all of it), no tag can reproduce it; configuration
/// loading refuses such names (see [`slot_tag_reaches`]).
pub fn slot_tag(stream: &str) -> String {
    format!("{{{}}}", hash_input(stream))
}

/// Whether [`slot_tag`] puts keys in `stream`'s slot.
pub fn slot_tag_reaches(stream: &str) -> bool {
    !hash_input(stream).contains('}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_follow_the_streams_own_hash_tag() {
        assert_eq!(slot_tag("orders"), "{orders}");
        assert_eq!(slot_tag("{orders}:events"), "{orders}");
        assert_eq!(slot_tag("events:{eu}:clicks"), "{eu}");
        // Empty braces do not count: Redis hashes the whole name, and so do we.
        assert_eq!(hash_input("a{}b{c}"), "a{}b{c}");
        assert!(!slot_tag_reaches("a{}b{c}"));
        assert_eq!(slot_tag("half{open"), "{half{open}");
        assert!(slot_tag_reaches("half{open"));
        assert!(slot_tag_reaches("{orders}:events"));
    }
}
