//! The entry a handler sees: where it came from, how often Redis has delivered it, its
//! fields exactly as stored, and its payload decoded once per the group's `payload` key.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::HandlerError;

/// A stream entry id, `<milliseconds>-<sequence>`. Ordered as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct EntryId {
    pub ms: u64,
    pub seq: u64,
}

impl EntryId {
    pub const ZERO: EntryId = EntryId { ms: 0, seq: 0 };

    pub fn new(ms: u64, seq: u64) -> Self {
        Self { ms, seq }
    }

    /// Parses `ms-seq` (or a bare `ms`, which Redis accepts as `ms-0`).
    pub fn parse(text: &[u8]) -> Option<Self> {
        fn number(digits: &[u8]) -> Option<u64> {
            if digits.is_empty() || digits.len() > 20 {
                return None;
            }
            let mut n: u64 = 0;
            for &d in digits {
                if !d.is_ascii_digit() {
                    return None;
                }
                n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
            }
            Some(n)
        }
        match text.iter().position(|&b| b == b'-') {
            Some(dash) => Some(Self {
                ms: number(&text[..dash])?,
                seq: number(&text[dash + 1..])?,
            }),
            None => Some(Self {
                ms: number(text)?,
                seq: 0,
            }),
        }
    }

    /// The wall-clock time Redis stamped on the entry (millisecond resolution).
    pub fn time(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.ms)
    }

    /// How long ago the entry was added, as of `now` (zero if its clock is ahead of ours).
    pub fn age(&self, now: SystemTime) -> Duration {
        now.duration_since(self.time()).unwrap_or_default()
    }

    /// Writes `ms-seq` into `out` without allocating a `String`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        // itoa, not `write!`: an acknowledgement writes one id per entry, and the
        // formatting machinery was a few per cent of the daemon's CPU while draining.
        let mut digits = itoa::Buffer::new();
        out.extend_from_slice(digits.format(self.ms).as_bytes());
        out.push(b'-');
        out.extend_from_slice(digits.format(self.seq).as_bytes());
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl FromStr for EntryId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s.as_bytes())
            .ok_or_else(|| format!("`{s}` is not a stream entry id (expected <ms>-<seq>)"))
    }
}

impl Serialize for EntryId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for EntryId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Cow::<str>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// How a group's entries carry their data (`payload = "fields" | "json:<field>"`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PayloadFormat {
    /// Flat fields: `user_id`, `event_type`, … (the user-logging write-up).
    #[default]
    Fields,
    /// One JSON document in the named field (the LLM-observability write-up's `event`).
    Json(String),
}

impl FromStr for PayloadFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fields" => Ok(Self::Fields),
            _ => match s.strip_prefix("json:") {
                Some(field) if !field.is_empty() => Ok(Self::Json(field.to_owned())),
                _ => Err(format!(
                    "`{s}` is not a payload format: use \"fields\" or \"json:<field>\" (e.g. \"json:event\")"
                )),
            },
        }
    }
}

impl fmt::Display for PayloadFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fields => f.write_str("fields"),
            Self::Json(field) => write!(f, "json:{field}"),
        }
    }
}

impl Serialize for PayloadFormat {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PayloadFormat {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Cow::<str>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The decoded payload. For `fields` the fields themselves are the payload.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Payload {
    #[default]
    Fields,
    Json(serde_json::Value),
}

/// Where an entry came from; shared by every entry of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub stream: String,
    pub group: String,
    pub consumer: String,
}

/// One stream entry as a handler sees it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub origin: Arc<Origin>,
    pub id: EntryId,
    /// How many times Redis has delivered this entry to the group, this delivery included.
    pub delivery_count: u64,
    /// The fields in the order they were added, bytes as stored.
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
    pub payload: Payload,
    /// The W3C `traceparent` of the consumer span handling this entry, when tracing is on;
    /// handlers that call out (the webhook) pass it on.
    pub traceparent: Option<String>,
    /// Fields holding JSON objects or arrays, parsed once, on the first dotted lookup that
    /// needs one (flat payloads only; see [`Entry::get`]). Indexed like `fields`.
    field_docs: OnceLock<Vec<Option<serde_json::Value>>>,
}

/// The field that marks an entry re-added by `streamworker dlq replay`.
pub const REPLAY_OF_FIELD: &str = "dlq_replay_of";
/// The field naming the group a replayed entry is meant for.
pub const REPLAY_GROUP_FIELD: &str = "dlq_replay_group";

impl Entry {
    /// An entry with its fields as read; call [`Entry::decode`] for the payload.
    pub fn new(
        origin: Arc<Origin>,
        id: EntryId,
        delivery_count: u64,
        fields: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Self {
        Self {
            origin,
            id,
            delivery_count,
            fields,
            payload: Payload::Fields,
            traceparent: None,
            field_docs: OnceLock::new(),
        }
    }

    /// Decodes the payload per the group's `payload` format. A payload that cannot be
    /// decoded is a permanent failure: retrying will not make the JSON valid.
    pub fn decode(&mut self, format: &PayloadFormat) -> Result<(), HandlerError> {
        let PayloadFormat::Json(name) = format else {
            self.payload = Payload::Fields;
            return Ok(());
        };
        let raw = self.field(name).ok_or_else(|| {
            HandlerError::permanent(format!(
                "payload: the entry has no field `{name}` (the group is configured with payload = \"json:{name}\")"
            ))
        })?;
        let doc = serde_json::from_slice(raw).map_err(|e| {
            HandlerError::permanent(format!("payload: field `{name}` is not valid JSON: {e}"))
        })?;
        self.payload = Payload::Json(doc);
        Ok(())
    }

    pub fn stream(&self) -> &str {
        &self.origin.stream
    }

    pub fn group(&self) -> &str {
        &self.origin.group
    }

    /// The raw bytes of the first field with this name.
    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(n, _)| n.as_slice() == name.as_bytes())
            .map(|(_, v)| v.as_slice())
    }

    /// The first field with this name as text (invalid UTF-8 replaced).
    pub fn field_str(&self, name: &str) -> Option<Cow<'_, str>> {
        self.field(name).map(String::from_utf8_lossy)
    }

    /// A value by name, the one lookup every built-in handler uses, in either payload
    /// shape:
    ///
    /// - `json:<field>`: a key, or a dotted path such as `usage.total_tokens` or
    ///   `items.0.sku`, of the decoded document; when the document has no such key, a flat
    ///   field of that exact name (so `event_type` can sit beside the JSON field);
    /// - `fields`: the field of that name; when there is none and the name is dotted, a
    ///   path into a field holding JSON text (`data.tokens` reads `tokens` of the JSON in
    ///   field `data`, as `memory:events` entries carry it).
    ///
    /// Scalars come back as text (objects and arrays as JSON text); `null` and missing
    /// keys as `None`.
    pub fn get(&self, key: &str) -> Option<Cow<'_, str>> {
        match self.find(key)? {
            Found::Text(text) => Some(text),
            Found::Json(serde_json::Value::Null) => None,
            Found::Json(serde_json::Value::String(s)) => Some(Cow::Borrowed(s.as_str())),
            Found::Json(other) => Some(Cow::Owned(other.to_string())),
        }
    }

    /// A numeric value by name, found as [`Entry::get`] finds it; numbers given as text
    /// are parsed, `true`/`false` count as 1/0.
    pub fn get_f64(&self, key: &str) -> Option<f64> {
        match self.find(key)? {
            Found::Text(text) => text.trim().parse().ok(),
            Found::Json(v) => match v {
                serde_json::Value::Number(n) => n.as_f64(),
                serde_json::Value::String(s) => s.trim().parse().ok(),
                serde_json::Value::Bool(b) => Some(f64::from(u8::from(*b))),
                _ => None,
            },
        }
        .filter(|n: &f64| n.is_finite())
    }

    fn find(&self, key: &str) -> Option<Found<'_>> {
        match &self.payload {
            Payload::Json(doc) => match json_path(doc, key) {
                Some(v) => Some(Found::Json(v)),
                None => self.field_str(key).map(Found::Text),
            },
            Payload::Fields => match self.field_str(key) {
                Some(text) => Some(Found::Text(text)),
                None => self.json_in_field(key).map(Found::Json),
            },
        }
    }

    /// `data.tokens` with flat fields: `tokens` of the JSON text in field `data` (the
    /// shortest field name that exists and holds JSON wins). Only for a dotted name no
    /// field has; the entry's JSON fields are parsed once, whatever the number of lookups.
    fn json_in_field(&self, key: &str) -> Option<&serde_json::Value> {
        if !key.contains('.') {
            return None;
        }
        let docs = self.field_docs.get_or_init(|| {
            self.fields
                .iter()
                .map(|(_, value)| {
                    // Only objects and arrays can hold a path; skip the rest unparsed.
                    let first = value.iter().find(|b| !b.is_ascii_whitespace());
                    matches!(first, Some(b'{' | b'['))
                        .then(|| serde_json::from_slice(value).ok())
                        .flatten()
                })
                .collect()
        });
        key.match_indices('.').find_map(|(i, _)| {
            let name = &key.as_bytes()[..i];
            let index = self.fields.iter().position(|(n, _)| n.as_slice() == name)?;
            json_path(docs[index].as_ref()?, &key[i + 1..])
        })
    }

    /// The original id when this entry is a replay of a dead letter.
    pub fn replay_of(&self) -> Option<EntryId> {
        self.field(REPLAY_OF_FIELD).and_then(EntryId::parse)
    }

    /// The id that identifies this entry's business event: the original id for a replay.
    /// Idempotent handlers key on this.
    pub fn idempotency_id(&self) -> EntryId {
        self.replay_of().unwrap_or(self.id)
    }
}

#[cfg(test)]
impl Entry {
    /// An entry of `stream`/`group` with these fields, decoded as `format`: what the
    /// handlers' unit tests feed them.
    pub(crate) fn for_test(
        stream: &str,
        group: &str,
        id: EntryId,
        delivery_count: u64,
        pairs: &[(&str, &str)],
        format: &PayloadFormat,
    ) -> Entry {
        let mut e = Entry::new(
            Arc::new(Origin {
                stream: stream.into(),
                group: group.into(),
                consumer: "c".into(),
            }),
            id,
            delivery_count,
            pairs
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect(),
        );
        e.decode(format).unwrap();
        e
    }
}

/// What a lookup found: a flat field's text, or a JSON value.
enum Found<'a> {
    Text(Cow<'a, str>),
    Json(&'a serde_json::Value),
}

fn json_path<'a>(doc: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
    if let Some(v) = doc.get(key) {
        return Some(v);
    }
    if !key.contains('.') {
        return None;
    }
    key.split('.').try_fold(doc, |node, part| match node {
        serde_json::Value::Array(items) => items.get(part.parse::<usize>().ok()?),
        _ => node.get(part),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin() -> Arc<Origin> {
        Arc::new(Origin {
            stream: "s".into(),
            group: "g".into(),
            consumer: "c".into(),
        })
    }

    fn decoded(
        id: EntryId,
        fields: Vec<(Vec<u8>, Vec<u8>)>,
        format: &PayloadFormat,
    ) -> Result<Entry, HandlerError> {
        let mut e = Entry::new(origin(), id, 1, fields);
        e.decode(format).map(|()| e)
    }

    fn fields(pairs: &[(&str, &str)]) -> Vec<(Vec<u8>, Vec<u8>)> {
        pairs
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn ids_parse_order_and_print() {
        let a = EntryId::parse(b"1700000000000-5").unwrap();
        assert_eq!(a, EntryId::new(1_700_000_000_000, 5));
        assert_eq!(a.to_string(), "1700000000000-5");
        assert_eq!(EntryId::parse(b"42"), Some(EntryId::new(42, 0)));
        assert!(EntryId::parse(b"1-x").is_none());
        assert!(EntryId::parse(b"").is_none());
        assert!(EntryId::parse(b"99999999999999999999999-0").is_none());
        assert!(EntryId::new(1, 9) < EntryId::new(2, 0));
        let mut buf = Vec::new();
        a.write_to(&mut buf);
        assert_eq!(buf, b"1700000000000-5");
    }

    #[test]
    fn payload_formats_parse() {
        assert_eq!("fields".parse(), Ok(PayloadFormat::Fields));
        assert_eq!(
            "json:event".parse(),
            Ok(PayloadFormat::Json("event".into()))
        );
        assert!("json:".parse::<PayloadFormat>().is_err());
        assert!("xml".parse::<PayloadFormat>().is_err());
    }

    #[test]
    fn flat_fields_are_read_by_name() {
        let e = decoded(
            EntryId::new(1, 0),
            fields(&[("user_id", "42"), ("latency_ms", "12.5")]),
            &PayloadFormat::Fields,
        )
        .unwrap();
        assert_eq!(e.get("user_id").as_deref(), Some("42"));
        assert_eq!(e.get_f64("latency_ms"), Some(12.5));
        assert_eq!(e.get("missing"), None);
    }

    #[test]
    fn json_payload_is_decoded_once_and_read_by_path() {
        let doc = r#"{"event_type":"end","data":{"model":"gpt-4","tokens":[3,4]},"ok":true}"#;
        let e = decoded(
            EntryId::new(1, 0),
            fields(&[("event", doc)]),
            &PayloadFormat::Json("event".into()),
        )
        .unwrap();
        assert_eq!(e.get("event_type").as_deref(), Some("end"));
        assert_eq!(e.get("data.model").as_deref(), Some("gpt-4"));
        assert_eq!(e.get_f64("data.tokens.1"), Some(4.0));
        assert_eq!(e.get_f64("ok"), Some(1.0));
    }

    #[test]
    fn lookups_cross_payload_shapes() {
        // A JSON payload: keys the document lacks fall back to flat fields.
        let e = decoded(
            EntryId::new(1, 0),
            fields(&[
                ("event_type", "purchase"),
                ("payload", r#"{"total": 12.5, "event_type": null}"#),
            ]),
            &PayloadFormat::Json("payload".into()),
        )
        .unwrap();
        assert_eq!(e.get_f64("total"), Some(12.5));
        assert_eq!(e.get("event_type"), None, "null in the document wins");
        let e = decoded(
            EntryId::new(1, 0),
            fields(&[("brand_id", "b1"), ("payload", r#"{"total": 3}"#)]),
            &PayloadFormat::Json("payload".into()),
        )
        .unwrap();
        assert_eq!(e.get("brand_id").as_deref(), Some("b1"));
        // Flat fields: a dotted name reads into a field holding JSON text.
        let e = decoded(
            EntryId::new(1, 0),
            fields(&[
                ("type", "agent.step"),
                ("data", r#"{"tokens": 42, "tool": {"name": "search"}}"#),
                ("a.b", "literal"),
            ]),
            &PayloadFormat::Fields,
        )
        .unwrap();
        assert_eq!(e.get_f64("data.tokens"), Some(42.0));
        assert_eq!(e.get("data.tool.name").as_deref(), Some("search"));
        assert_eq!(
            e.get("a.b").as_deref(),
            Some("literal"),
            "an exact field first"
        );
        assert_eq!(e.get("type.x"), None, "not JSON: nothing");
        assert_eq!(e.get("data.missing"), None);
    }

    #[test]
    fn undecodable_json_is_permanent() {
        let err = decoded(
            EntryId::new(1, 0),
            fields(&[("event", "{nope")]),
            &PayloadFormat::Json("event".into()),
        )
        .unwrap_err();
        assert!(matches!(err, HandlerError::Permanent(_)), "{err:?}");
        let err = decoded(
            EntryId::new(1, 0),
            fields(&[("other", "{}")]),
            &PayloadFormat::Json("event".into()),
        )
        .unwrap_err();
        assert!(err.reason().contains("no field `event`"), "{err}");
    }

    #[test]
    fn replays_keep_their_original_identity() {
        let e = decoded(
            EntryId::new(9, 0),
            fields(&[("a", "1"), (REPLAY_OF_FIELD, "5-1")]),
            &PayloadFormat::Fields,
        )
        .unwrap();
        assert_eq!(e.idempotency_id(), EntryId::new(5, 1));
    }
}
