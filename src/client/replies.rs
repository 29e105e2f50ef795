//! Reply parsers: Redis's replies to reads and the fetching scripts, straight from
//! [`redis::Value`] into [`RawEntry`]s, moving the field bytes instead of building a map of
//! owned strings per entry. (The lean read connection has its own parser, `wire.rs`; these
//! serve redis-rs connections: TLS and the scripts.)

use redis::Value;
use streamworker_handlers::EntryId;

use super::error::{Result, protocol};

/// An entry as read from Redis, before its payload is decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEntry {
    pub id: EntryId,
    pub delivery_count: u64,
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
}

/// What a page of reclaiming or re-reading found.
#[derive(Debug, Default)]
pub struct Claimed {
    /// Where the next page starts; `None` when the scan is complete.
    pub next: Option<EntryId>,
    pub entries: Vec<RawEntry>,
    /// Entries deleted or trimmed from the stream while pending: Redis removed them from
    /// the pending list; there is nothing left to handle.
    pub deleted: Vec<EntryId>,
    /// The group is paused (`streamworker pause`): nothing was claimed (`claim.lua` only).
    pub paused: bool,
}

/// A stream entry with its id as text, as XRANGE returns it.
pub type StreamEntry = (String, Vec<(Vec<u8>, Vec<u8>)>);

pub(super) fn parse_id(value: &Value, command: &'static str) -> Result<EntryId> {
    let bytes = match value {
        Value::BulkString(b) => b.as_slice(),
        Value::SimpleString(s) => s.as_bytes(),
        other => {
            return Err(protocol(
                command,
                format!("expected an entry id, got {other:?}"),
            ));
        }
    };
    EntryId::parse(bytes).ok_or_else(|| {
        protocol(
            command,
            format!("`{}` is not an entry id", String::from_utf8_lossy(bytes)),
        )
    })
}

pub(super) fn into_bytes(value: Value) -> Vec<u8> {
    match value {
        Value::BulkString(b) => b,
        Value::SimpleString(s) => s.into_bytes(),
        Value::Int(i) => i.to_string().into_bytes(),
        Value::Double(d) => d.to_string().into_bytes(),
        Value::Okay => b"OK".to_vec(),
        _ => Vec::new(),
    }
}

/// `[f1, v1, f2, v2, …]` → pairs, moving the bytes.
pub(super) fn parse_fields(value: Value) -> Vec<(Vec<u8>, Vec<u8>)> {
    let flat = match value {
        Value::Array(items) => items,
        Value::Map(pairs) => {
            return pairs
                .into_iter()
                .map(|(k, v)| (into_bytes(k), into_bytes(v)))
                .collect();
        }
        _ => return Vec::new(),
    };
    let mut fields = Vec::with_capacity(flat.len() / 2);
    let mut items = flat.into_iter();
    while let (Some(k), Some(v)) = (items.next(), items.next()) {
        fields.push((into_bytes(k), into_bytes(v)));
    }
    fields
}

/// XREADGROUP's reply: nil on timeout, else `[[stream, [[id, [f, v, …]], …]]]` (RESP2) or
/// `{stream: [[id, [f, v, …]], …]}` (RESP3).
pub(super) fn parse_read(reply: Value) -> Result<Vec<RawEntry>> {
    const CMD: &str = "XREADGROUP";
    let entries = match reply {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(streams) => match streams.into_iter().next() {
            Some(Value::Array(pair)) => pair.into_iter().nth(1),
            Some(other) => return Err(protocol(CMD, format!("unexpected stream reply {other:?}"))),
            None => return Ok(Vec::new()),
        },
        Value::Map(pairs) => pairs.into_iter().next().map(|(_, v)| v),
        other => return Err(protocol(CMD, format!("unexpected reply {other:?}"))),
    };
    let Some(Value::Array(entries)) = entries else {
        return Ok(Vec::new());
    };
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        let Value::Array(parts) = entry else {
            return Err(protocol(CMD, "entry is not an array"));
        };
        let mut parts = parts.into_iter();
        let id = parse_id(&parts.next().unwrap_or(Value::Nil), CMD)?;
        out.push(RawEntry {
            id,
            delivery_count: 1,
            fields: parse_fields(parts.next().unwrap_or(Value::Nil)),
        });
    }
    Ok(out)
}

/// The reply of `claim.lua` and `own_pending.lua`:
/// `{cursor or nil, {{id, count, {f, v, …}}, …}, {deleted id, …}}`.
pub(super) fn parse_claimed(reply: Value, command: &'static str) -> Result<Claimed> {
    let Value::Array(parts) = reply else {
        return Err(protocol(command, format!("unexpected reply {reply:?}")));
    };
    let mut parts = parts.into_iter();
    let next = match parts.next() {
        Some(Value::Nil) | None => None,
        Some(v) => Some(parse_id(&v, command)?),
    };
    let mut claimed = Claimed {
        next,
        ..Claimed::default()
    };
    if let Some(Value::Array(entries)) = parts.next() {
        for entry in entries {
            let Value::Array(triple) = entry else {
                return Err(protocol(command, "entry is not an array"));
            };
            let mut triple = triple.into_iter();
            let id = parse_id(&triple.next().unwrap_or(Value::Nil), command)?;
            let delivery_count = match triple.next() {
                Some(Value::Int(n)) => n.max(1) as u64,
                other => return Err(protocol(command, format!("bad delivery count {other:?}"))),
            };
            claimed.entries.push(RawEntry {
                id,
                delivery_count,
                fields: parse_fields(triple.next().unwrap_or(Value::Nil)),
            });
        }
    }
    if let Some(Value::Array(deleted)) = parts.next() {
        for id in deleted {
            claimed.deleted.push(parse_id(&id, command)?);
        }
    }
    claimed.paused = matches!(parts.next(), Some(Value::Int(1)));
    Ok(claimed)
}

pub(super) fn text_of(value: Value) -> String {
    String::from_utf8_lossy(&into_bytes(value)).into_owned()
}

/// Entry ids a script returned as text.
pub(super) fn parse_ids(ids: &[String]) -> Vec<EntryId> {
    ids.iter()
        .filter_map(|s| EntryId::parse(s.as_bytes()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn reads_parse_without_maps() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("s"),
            Value::Array(vec![
                Value::Array(vec![
                    bulk("1-0"),
                    Value::Array(vec![bulk("a"), bulk("1"), bulk("b"), bulk("2")]),
                ]),
                Value::Array(vec![bulk("2-5"), Value::Array(vec![bulk("a"), bulk("3")])]),
            ]),
        ])]);
        let entries = parse_read(reply).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].id, EntryId::new(1, 0));
        assert_eq!(
            entries[0].fields,
            vec![
                (b"a".to_vec(), b"1".to_vec()),
                (b"b".to_vec(), b"2".to_vec())
            ]
        );
        assert_eq!(entries[1].id, EntryId::new(2, 5));
        assert!(parse_read(Value::Nil).unwrap().is_empty());
    }

    #[test]
    fn claims_parse_with_counts_and_deleted_ids() {
        let reply = Value::Array(vec![
            bulk("7-0"),
            Value::Array(vec![Value::Array(vec![
                bulk("3-0"),
                Value::Int(4),
                Value::Array(vec![bulk("k"), bulk("v")]),
            ])]),
            Value::Array(vec![bulk("2-0")]),
        ]);
        let c = parse_claimed(reply, "test").unwrap();
        assert_eq!(c.next, Some(EntryId::new(7, 0)));
        assert_eq!(c.entries[0].delivery_count, 4);
        assert_eq!(c.deleted, vec![EntryId::new(2, 0)]);
        assert!(
            !c.paused,
            "own_pending.lua's three-part reply is never paused"
        );
    }

    #[test]
    fn a_paused_claim_reply_says_so_and_holds_nothing() {
        let reply = Value::Array(vec![
            bulk("0-0"),
            Value::Array(vec![]),
            Value::Array(vec![]),
            Value::Int(1),
        ]);
        let c = parse_claimed(reply, "test").unwrap();
        assert!(c.paused);
        assert!(c.entries.is_empty() && c.deleted.is_empty());
    }
}
