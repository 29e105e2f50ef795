//! Writes a handler asks the runtime to make *together with the acknowledgement*.
//!
//! A handler that keeps state in Redis (aggregates, counters, a forwarded copy) returns
//! its writes as [`Effect`]s instead of making them itself. The runtime applies them in the
//! same server-side script that acknowledges the entry, and only if that acknowledgement
//! took (the entry was still pending). So a redelivered entry — after a crash, a timeout,
//! a reclaim — can never be counted twice: its effects exist exactly when it is
//! acknowledged.

use std::time::Duration;

/// One write. The set is closed on purpose: each maps to one Redis command.
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
    /// The command name and its arguments, as the runtime sends them.
    pub fn command(&self) -> (&'static str, Vec<Vec<u8>>) {
        fn s(v: &str) -> Vec<u8> {
            v.as_bytes().to_vec()
        }
        match self {
            Self::HashIncr { key, field, by } => {
                ("HINCRBY", vec![s(key), s(field), s(&by.to_string())])
            }
            Self::HashIncrFloat { key, field, by } => (
                "HINCRBYFLOAT",
                vec![s(key), s(field), s(&format_float(*by))],
            ),
            Self::HashSet { key, field, value } => ("HSET", vec![s(key), s(field), s(value)]),
            Self::Expire { key, ttl } => (
                "PEXPIRE",
                vec![s(key), s(&ttl.as_millis().max(1).to_string())],
            ),
            Self::StreamAdd {
                key,
                fields,
                max_len,
            } => {
                let mut args = vec![s(key)];
                if let Some(n) = max_len {
                    args.extend([s("MAXLEN"), s("~"), s(&n.to_string())]);
                }
                args.push(s("*"));
                for (k, v) in fields {
                    args.push(k.clone());
                    args.push(v.clone());
                }
                ("XADD", args)
            }
            Self::Publish { channel, message } => ("PUBLISH", vec![s(channel), s(message)]),
            Self::StreamAddAt { key, id, fields } => {
                let mut args = vec![s(key), s(&id.to_string())];
                for (k, v) in fields {
                    args.push(k.clone());
                    args.push(v.clone());
                }
                ("XADD", args)
            }
        }
    }

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

/// Floats as Redis reads them back: no exponent, no trailing noise.
fn format_float(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        let text = format!("{x:.12}");
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effects_become_commands() {
        let (name, args) = Effect::HashIncrFloat {
            key: "k".into(),
            field: "f".into(),
            by: 0.0023,
        }
        .command();
        assert_eq!(name, "HINCRBYFLOAT");
        assert_eq!(args[2], b"0.0023");
        let (name, args) = Effect::StreamAdd {
            key: "out".into(),
            fields: vec![(b"a".to_vec(), b"1".to_vec())],
            max_len: Some(100),
        }
        .command();
        assert_eq!(name, "XADD");
        assert_eq!(
            args,
            vec![
                b"out".to_vec(),
                b"MAXLEN".to_vec(),
                b"~".to_vec(),
                b"100".to_vec(),
                b"*".to_vec(),
                b"a".to_vec(),
                b"1".to_vec()
            ]
        );
        assert_eq!(format_float(3.0), "3");
    }
}
