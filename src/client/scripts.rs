//! Every server-side script, loaded from its `.lua` file next to this one.
//!
//! A script is how a check and its writes happen atomically (an entry still pending for
//! this consumer, then XACK; a lease still ours, then renewed). Each `.lua` file starts
//! with what it takes (KEYS, ARGV) and returns. [`Script`] sends EVALSHA and falls back to
//! EVAL once when the server lacks the script (a restart, a failover).
//!
//! Two scripts are not [`Script`]s: `settle_large.lua` and `replay_large.lua` run with EVAL
//! inside a MULTI (see `large.rs`), where a NOSCRIPT fallback is impossible.

use std::sync::LazyLock;

use redis::Script;

macro_rules! script {
    ($name:ident, $file:literal) => {
        pub(super) static $name: LazyLock<Script> =
            LazyLock::new(|| Script::new(include_str!($file)));
    };
}

// The daemon: settling entries.
script!(ACK_EFFECTS, "ack_effects.lua");
script!(RELEASE, "release.lua");
script!(DEAD_LETTER, "dead_letter.lua");
// The daemon: fetching entries.
script!(CLAIM, "claim.lua");
script!(OWN_PENDING, "own_pending.lua");
// The daemon: leases and housekeeping.
script!(LEASE, "lease.lua");
script!(LEASE_RELEASE, "lease_release.lua");
script!(MEMBERS, "members.lua");
script!(RETENTION, "retention.lua");
script!(FORGET_CONSUMERS, "forget_consumers.lua");
// The operator's commands.
script!(REPLAY, "replay.lua");
script!(RANGE_FIELDS, "range_fields.lua");
script!(REWIND, "rewind.lua");
script!(RANGE_IDS, "range_ids.lua");

/// The closing scripts of the large settlements' MULTI (see `large.rs`), sent as EVAL.
pub(super) const SETTLE_LARGE: &str = include_str!("settle_large.lua");
pub(super) const REPLAY_LARGE: &str = include_str!("replay_large.lua");
