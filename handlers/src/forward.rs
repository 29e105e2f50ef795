//! `handler = "forward"`: maps, renames, filters and enriches an entry's fields and appends
//! the result to another stream, exactly once.
//!
//! The XADD is not made here: it is returned as an [`Effect::StreamAdd`], which the runtime
//! applies in the same server-side script as the source entry's XACK, and only if that XACK
//! took. A redelivered entry (crash, timeout, reclaim) is therefore forwarded once or not at
//! all, never twice.
//!
//! Per entry, in this order:
//!
//! 1. `filter`: every listed key must have one of its listed values, or the entry is
//!    dropped (acknowledged, counted as `dropped`, not forwarded).
//! 2. The entry's fields, in their original order: `keep` (only these) or `drop` (all but
//!    these), then `rename`. All three name the *original* fields. The runtime's replay
//!    markers (`dlq_replay_of`, `dlq_replay_group`) are never passed on: they address the
//!    source stream's groups, and a downstream group would drop an entry carrying another
//!    group's name.
//! 3. Then the added fields: `extract` (sorted by name), `set` (sorted by name) and the
//!    source id (`source_id_field`, default `source_id`). An added field replaces a passed-on
//!    field of the same name.
//!
//! Values are looked up (for `filter` and `extract`) with [`Entry::get`], as by every
//! handler: a field for `payload = "fields"` (or a path into a field holding JSON text), a
//! key or dotted path of the JSON document for `payload = "json:<field>"`, falling back to
//! a flat field of that exact name when the document has no such key (so a `json:payload`
//! source can still filter on its flat `event_type`).
//!
//! The source id is [`Entry::idempotency_id`]: the entry's id, or for a replayed dead letter
//! the id of the original entry, so a consumer of the target can dedupe on
//! `(source stream, source_id)` and trace every entry back.
//!
//! Under Redis Cluster the target must hash to the source stream's slot (give both the same
//! hash tag, e.g. `{events}.raw` and `{events}.normalized`), since the XADD and the XACK run
//! in one script.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::{
    Effect, Effects, Entry, Handler, HandlerError, Limits, OptionProblem, REPLAY_GROUP_FIELD,
    REPLAY_OF_FIELD,
};

/// Field names and values, bytes as stored, in order.
pub type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// `[groups.<name>.options]` for `handler = "forward"`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardOptions {
    /// The stream each result is appended to. Required; must differ from the group's
    /// stream. Under Redis Cluster it must share the group's stream's hash slot.
    #[serde(default)]
    pub to: String,
    /// Only entries whose every key has one of the listed values are forwarded, e.g.
    /// `{ event_type = ["purchase", "page_view"], brand_id = "b1" }`; the others are
    /// dropped (acknowledged, counted as `dropped`). A missing key does not match. Empty:
    /// forward everything.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub filter: BTreeMap<String, FilterValues>,
    /// Original field name → new name, e.g. `{ payload = "normalized_payload" }`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rename: BTreeMap<String, String>,
    /// Original fields left out, e.g. `["client_ip"]`. Cannot be combined with `keep`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drop: Vec<String>,
    /// When not empty, only these original fields are passed on (added fields always are).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keep: Vec<String>,
    /// Constant fields added to every forwarded entry, e.g. `{ source = "web" }`. Values
    /// may use `{stream}`, `{group}`, `{id}` (this entry's id), `{source_id}` (the original
    /// id for a replayed dead letter, else `{id}`) and `{time}` (the source id's time, RFC
    /// 3339 UTC with milliseconds); `{{` and `}}` are literal braces.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    /// New field ← value at a key or dotted JSON path, e.g. `{ model = "data.model" }`.
    /// Objects and arrays are written as JSON text; a missing or `null` value adds nothing.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extract: BTreeMap<String, String>,
    /// The field carrying the source id downstream; `""` to leave it out.
    #[serde(default = "default_source_id_field")]
    pub source_id_field: String,
    /// Caps the target with `MAXLEN ~ <max_len>` on every XADD. Unset: never trimmed here
    /// (use `[streams.<to>] retention`, which respects the target's groups).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_len: Option<u64>,
    /// Fan out into a partitioned stream: each entry goes to partition
    /// `crc32(value of this field) % partitions` of `to` (`<to>:p<n>`), exactly once, in
    /// id order per partition. Needs `partitions`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition_by: Option<String>,
    /// How many partitions `to` has (with `partition_by`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<u32>,
}

fn default_source_id_field() -> String {
    "source_id".into()
}

impl Default for ForwardOptions {
    fn default() -> Self {
        Self {
            to: String::new(),
            filter: BTreeMap::new(),
            rename: BTreeMap::new(),
            drop: Vec::new(),
            keep: Vec::new(),
            set: BTreeMap::new(),
            extract: BTreeMap::new(),
            source_id_field: default_source_id_field(),
            max_len: None,
            partition_by: None,
            partitions: None,
        }
    }
}

/// The accepted values of one filter key: one scalar or a list of scalars. Numbers and
/// booleans are compared as text (`200`, `1.5`, `true`), as Redis and JSON print them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FilterValues(pub Vec<String>);

impl Serialize for FilterValues {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => s.serialize_str(one),
            many => many.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for FilterValues {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Scalar(String);
        impl<'de> Deserialize<'de> for Scalar {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_any(ValuesVisitor { nested: true })
                    .map(|v| Scalar(v.0.into_iter().next().unwrap_or_default()))
            }
        }
        struct ValuesVisitor {
            nested: bool,
        }
        impl<'de> Visitor<'de> for ValuesVisitor {
            type Value = FilterValues;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                if self.nested {
                    f.write_str("a string, number or boolean")
                } else {
                    f.write_str("a value or a list of values, e.g. \"purchase\" or [\"purchase\", \"refund\"]")
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<FilterValues, E> {
                Ok(FilterValues(vec![v.to_owned()]))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<FilterValues, E> {
                Ok(FilterValues(vec![v.to_string()]))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<FilterValues, E> {
                Ok(FilterValues(vec![v.to_string()]))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<FilterValues, E> {
                Ok(FilterValues(vec![v.to_string()]))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<FilterValues, E> {
                Ok(FilterValues(vec![v.to_string()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<FilterValues, A::Error> {
                if self.nested {
                    return Err(de::Error::invalid_type(de::Unexpected::Seq, &self));
                }
                let mut out = Vec::new();
                while let Some(Scalar(v)) = seq.next_element()? {
                    out.push(v);
                }
                Ok(FilterValues(out))
            }
        }
        d.deserialize_any(ValuesVisitor { nested: false })
    }
}

/// One piece of a `set` value.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Stream,
    Group,
    Id,
    SourceId,
    Time,
}

const PLACEHOLDERS: &str = "{stream}, {group}, {id}, {source_id}, {time}";

/// A `set` value, parsed once.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Template(Vec<Part>);

impl Template {
    fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = text.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|&(_, c)| c) == Some('{') => {
                    chars.next();
                    literal.push('{');
                }
                '{' => {
                    let rest = &text[at + 1..];
                    let Some(end) = rest.find('}') else {
                        return Err(format!(
                            "= {text:?}: `{{` at byte {at} is not closed; write {{{{ for a literal brace"
                        ));
                    };
                    let part = match &rest[..end] {
                        "stream" => Part::Stream,
                        "group" => Part::Group,
                        "id" => Part::Id,
                        "source_id" => Part::SourceId,
                        "time" => Part::Time,
                        other => {
                            return Err(format!(
                                "= {text:?}: unknown placeholder `{{{other}}}`; use {PLACEHOLDERS}, or {{{{ and }}}} for literal braces"
                            ));
                        }
                    };
                    if !literal.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut literal)));
                    }
                    parts.push(part);
                    for _ in 0..=end {
                        chars.next();
                    }
                }
                '}' if chars.peek().map(|&(_, c)| c) == Some('}') => {
                    chars.next();
                    literal.push('}');
                }
                '}' => {
                    return Err(format!(
                        "= {text:?}: a lone `}}` at byte {at}; write }}}} for a literal brace"
                    ));
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Text(literal));
        }
        Ok(Self(parts))
    }

    fn render(&self, entry: &Entry, out: &mut Vec<u8>) {
        for part in &self.0 {
            match part {
                Part::Text(t) => out.extend_from_slice(t.as_bytes()),
                Part::Stream => out.extend_from_slice(entry.stream().as_bytes()),
                Part::Group => out.extend_from_slice(entry.group().as_bytes()),
                Part::Id => entry.id.write_to(out),
                Part::SourceId => entry.idempotency_id().write_to(out),
                Part::Time => out.extend_from_slice(
                    humantime::format_rfc3339_millis(entry.idempotency_id().time())
                        .to_string()
                        .as_bytes(),
                ),
            }
        }
    }
}

impl ForwardOptions {
    pub(crate) fn validate(&self, _limits: &Limits) -> Vec<OptionProblem> {
        let mut problems = Vec::new();
        let mut problem =
            |key: String, message: String| problems.push(OptionProblem { key, message });
        if self.to.is_empty() {
            problem(
                "to".into(),
                "is missing: set the stream forwarded entries are appended to, e.g. to = \"events.normalized\"".into(),
            );
        }
        if self.max_len == Some(0) {
            problem(
                "max_len".into(),
                "= 0: must be at least 1 (leave it out to never trim the target here)".into(),
            );
        }
        for (key, values) in &self.filter {
            if values.0.is_empty() {
                problem(
                    format!("filter.{key}"),
                    "lists no values, so no entry could pass: list at least one value or remove the key".into(),
                );
            }
        }
        if !self.keep.is_empty() && !self.drop.is_empty() {
            problem(
                "keep".into(),
                "cannot be combined with drop: keep lists the fields to pass on (leaving out all others), drop the ones to leave out; use one of them".into(),
            );
        }
        let mut targets: BTreeMap<&str, &str> = BTreeMap::new();
        for (old, new) in &self.rename {
            let key = format!("rename.{old}");
            if new.is_empty() {
                problem(key, "the new name is empty".into());
                continue;
            }
            if self.drop.contains(old) {
                problem(
                    key.clone(),
                    format!(
                        "renames `{old}`, which drop leaves out; remove it from rename or from drop"
                    ),
                );
            }
            if !self.keep.is_empty() && !self.keep.contains(old) {
                problem(
                    key.clone(),
                    format!(
                        "renames `{old}`, which keep leaves out; add it to keep or remove the rename"
                    ),
                );
            }
            if let Some(other) = targets.insert(new, old) {
                problem(
                    key.clone(),
                    format!(
                        "= {new:?}: `{other}` is renamed to {new:?} too; two fields cannot get one name"
                    ),
                );
            }
            if self.set.contains_key(new)
                || self.extract.contains_key(new)
                || *new == self.source_id_field
            {
                problem(
                    key,
                    format!(
                        "= {new:?}: a field of that name is added (set, extract or source_id_field) and would replace it; choose another name"
                    ),
                );
            }
        }
        for (name, path) in &self.extract {
            if path.is_empty() {
                problem(
                    format!("extract.{name}"),
                    "the path is empty: name a field or a dotted JSON path, e.g. \"data.model\""
                        .into(),
                );
            }
            if self.set.contains_key(name) {
                problem(
                    format!("extract.{name}"),
                    format!("`{name}` is also in set; keep one of them"),
                );
            }
        }
        for (name, value) in &self.set {
            if let Err(message) = Template::parse(value) {
                problem(format!("set.{name}"), message);
            }
        }
        if !self.source_id_field.is_empty()
            && (self.set.contains_key(&self.source_id_field)
                || self.extract.contains_key(&self.source_id_field))
        {
            problem(
                "source_id_field".into(),
                format!(
                    "= {:?}: set or extract adds a field of that name too; choose another name, or source_id_field = \"\" to leave the source id out",
                    self.source_id_field
                ),
            );
        }
        for (key, names) in [("keep", &self.keep), ("drop", &self.drop)] {
            if names.iter().any(String::is_empty) {
                problem(key.into(), "lists an empty field name".into());
            }
        }
        match (&self.partition_by, self.partitions) {
            (None, None) => {}
            (Some(field), Some(n)) => {
                if field.is_empty() {
                    problem("partition_by".into(), "is empty: name the field whose value picks the partition".into());
                }
                if n == 0 {
                    problem("partitions".into(), "= 0: a partitioned stream has at least 1 partition".into());
                }
                if self.max_len.is_some() {
                    problem(
                        "max_len".into(),
                        format!("cannot be combined with partition_by: cap the partitions with [streams.\"{}\"] retention instead (split over its partitions)", self.to),
                    );
                }
                if crate::hash_input(&self.to) != self.to {
                    problem(
                        "to".into(),
                        format!(
                            "= {:?} has a hash tag, so all its partitions would share one Redis Cluster slot; name it without braces (each partition `<to>:p<n>` is hashed whole)",
                            self.to
                        ),
                    );
                }
            }
            (Some(_), None) => problem(
                "partitions".into(),
                "is missing: partition_by needs the number of partitions of `to`, e.g. partitions = 16".into(),
            ),
            (None, Some(_)) => problem(
                "partition_by".into(),
                "is missing: partitions needs the field whose value picks the partition, e.g. partition_by = \"customer_id\"".into(),
            ),
        }
        problems
    }

    /// The checks that need the group's stream.
    pub(crate) fn validate_with_stream(&self, stream: &str) -> Vec<OptionProblem> {
        if self.to == stream {
            vec![OptionProblem {
                key: "to".into(),
                message: format!(
                    "= {:?}: must differ from the group's stream, or every forwarded entry would be read and forwarded again",
                    self.to
                ),
            }]
        } else {
            Vec::new()
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("forward: {0}")]
pub struct ForwardBuildError(String);

/// The forward handler for one group: the options, compiled for the hot path.
#[derive(Debug)]
pub struct Forward {
    to: String,
    max_len: Option<u64>,
    filter: Vec<(String, Vec<String>)>,
    keep: Option<HashSet<Vec<u8>>>,
    drop: HashSet<Vec<u8>>,
    rename: HashMap<Vec<u8>, Vec<u8>>,
    /// New names that are also original names not renamed away: such a field is left out
    /// when the renamed field is present (the rename wins).
    contested: HashSet<Vec<u8>>,
    extract: Vec<(Vec<u8>, String)>,
    set: Vec<(Vec<u8>, Template)>,
    source_id_field: Option<Vec<u8>>,
    /// `partition_by` and `partitions`.
    partition: Option<(String, u32)>,
}

impl Forward {
    /// Builds the handler for a group reading `stream`.
    pub fn new(options: &ForwardOptions, stream: &str) -> Result<Self, ForwardBuildError> {
        let limits = Limits {
            handler_timeout: std::time::Duration::MAX,
            claim_idle: std::time::Duration::MAX,
        };
        let problems: Vec<String> = options
            .validate(&limits)
            .into_iter()
            .chain(options.validate_with_stream(stream))
            .map(|p| format!("{} {}", p.key, p.message))
            .collect();
        if !problems.is_empty() {
            return Err(ForwardBuildError(problems.join("; ")));
        }
        let bytes = |s: &String| s.as_bytes().to_vec();
        let rename: HashMap<Vec<u8>, Vec<u8>> = options
            .rename
            .iter()
            .map(|(old, new)| (bytes(old), bytes(new)))
            .collect();
        let contested = rename
            .values()
            .filter(|new| !rename.contains_key(*new))
            .cloned()
            .collect();
        Ok(Self {
            to: options.to.clone(),
            max_len: options.max_len,
            partition: options.partition_by.clone().zip(options.partitions),
            filter: options
                .filter
                .iter()
                .map(|(k, v)| (k.clone(), v.0.clone()))
                .collect(),
            keep: (!options.keep.is_empty()).then(|| options.keep.iter().map(bytes).collect()),
            drop: options.drop.iter().map(bytes).collect(),
            rename,
            contested,
            extract: options
                .extract
                .iter()
                .map(|(name, path)| (bytes(name), path.clone()))
                .collect(),
            set: options
                .set
                .iter()
                .map(|(name, value)| {
                    Template::parse(value)
                        .map(|t| (bytes(name), t))
                        .map_err(|e| ForwardBuildError(format!("set.{name} {e}")))
                })
                .collect::<Result<_, _>>()?,
            source_id_field: (!options.source_id_field.is_empty())
                .then(|| bytes(&options.source_id_field)),
        })
    }

    /// Whether an original field is passed on (before renaming).
    fn passes(&self, name: &[u8]) -> bool {
        if name == REPLAY_OF_FIELD.as_bytes() || name == REPLAY_GROUP_FIELD.as_bytes() {
            return false;
        }
        match &self.keep {
            Some(keep) => keep.contains(name),
            None => !self.drop.contains(name),
        }
    }

    /// The fields to append downstream, or why the entry is not forwarded.
    pub fn transform(&self, entry: &Entry) -> Result<Fields, HandlerError> {
        for (key, accepted) in &self.filter {
            let pass = entry
                .get(key)
                .is_some_and(|v| accepted.iter().any(|a| *a == *v));
            if !pass {
                return Err(HandlerError::Drop(format!("filtered out by filter.{key}")));
            }
        }
        let mut added: Fields = Vec::with_capacity(self.extract.len() + self.set.len() + 1);
        for (name, path) in &self.extract {
            if let Some(value) = entry.get(path) {
                added.push((name.clone(), value.into_owned().into_bytes()));
            }
        }
        for (name, template) in &self.set {
            let mut value = Vec::new();
            template.render(entry, &mut value);
            added.push((name.clone(), value));
        }
        if let Some(name) = &self.source_id_field {
            let mut value = Vec::with_capacity(24);
            entry.idempotency_id().write_to(&mut value);
            added.push((name.clone(), value));
        }

        let mut out = Vec::with_capacity(entry.fields.len() + added.len());
        for (name, value) in &entry.fields {
            if !self.passes(name) {
                continue;
            }
            let renamed = self.rename.get(name.as_slice());
            let new_name = renamed.unwrap_or(name);
            if added.iter().any(|(n, _)| n == new_name) {
                continue;
            }
            if renamed.is_none()
                && self.contested.contains(name.as_slice())
                && entry.fields.iter().any(|(other, _)| {
                    self.rename.get(other.as_slice()) == Some(name) && self.passes(other)
                })
            {
                continue;
            }
            out.push((new_name.clone(), value.clone()));
        }
        out.extend(added);
        if out.is_empty() {
            return Err(HandlerError::permanent(
                "forward: nothing left to forward (keep/drop left out every field and source_id_field is \"\")",
            ));
        }
        Ok(out)
    }
}

impl Handler for Forward {
    async fn handle(&self, entry: &Entry) -> Result<Effects, HandlerError> {
        let fields = self.transform(entry)?;
        if let Some((field, partitions)) = &self.partition {
            let Some(value) = entry.get(field) else {
                return Err(HandlerError::permanent(format!(
                    "forward: no field `{field}` to partition by"
                )));
            };
            let p = crate::partition_of(value.as_bytes(), *partitions);
            // The source id as the partition entry's id: the runtime adds it before the
            // acknowledgement, and a repeat after a crash is recognised (Effect docs).
            return Ok(vec![Effect::StreamAddAt {
                key: format!("{}:p{p}", self.to),
                id: entry.id,
                fields,
            }]);
        }
        Ok(vec![Effect::StreamAdd {
            key: self.to.clone(),
            fields,
            max_len: self.max_len,
        }])
    }

    /// A partitioned forward adds each partition's entries in id order, one at a time:
    /// that is what makes a repeated XADD of the same id recognisable.
    fn ordering(&self) -> Option<crate::Ordering> {
        self.partition
            .as_ref()
            .map(|(field, partitions)| crate::Ordering {
                field: field.clone(),
                partitions: Some(*partitions),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EntryId, PayloadFormat};
    use std::time::Duration;

    #[tokio::test]
    async fn partition_by_adds_to_the_keys_partition_under_the_source_id() {
        let options = ForwardOptions {
            to: "orders".into(),
            partition_by: Some("customer".into()),
            partitions: Some(16),
            ..ForwardOptions::default()
        };
        let forward = Forward::new(&options, "events").unwrap();
        let origin = std::sync::Arc::new(crate::Origin {
            stream: "events".into(),
            group: "fanout".into(),
            consumer: "c".into(),
        });
        let id = EntryId { ms: 7, seq: 1 };
        let mut entry = Entry::new(
            origin.clone(),
            id,
            1,
            vec![(b"customer".to_vec(), b"customer-42".to_vec())],
        );
        entry.decode(&PayloadFormat::Fields).unwrap();
        let effects = forward.handle(&entry).await.unwrap();
        // crc32("customer-42") % 16 = 5 (Python's zlib.crc32).
        assert!(
            matches!(&effects[..], [Effect::StreamAddAt { key, id: at, .. }] if key == "orders:p5" && *at == id),
            "{effects:?}"
        );
        assert_eq!(
            forward.ordering(),
            Some(crate::Ordering {
                field: "customer".into(),
                partitions: Some(16)
            })
        );
        let mut keyless = Entry::new(origin, id, 1, vec![(b"n".to_vec(), b"1".to_vec())]);
        keyless.decode(&PayloadFormat::Fields).unwrap();
        let error = forward.handle(&keyless).await.unwrap_err();
        assert!(
            matches!(error, HandlerError::Permanent(ref m) if m.contains("no field `customer`")),
            "{error:?}"
        );

        let limits = Limits {
            handler_timeout: Duration::from_secs(1),
            claim_idle: Duration::from_secs(2),
        };
        let refused = |o: ForwardOptions| {
            o.validate(&limits)
                .into_iter()
                .map(|p| p.key)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            refused(ForwardOptions {
                partitions: None,
                ..options.clone()
            }),
            ["partitions"]
        );
        assert_eq!(
            refused(ForwardOptions {
                to: "{orders}".into(),
                max_len: Some(10),
                ..options.clone()
            }),
            ["max_len", "to"]
        );
    }

    fn limits() -> Limits {
        Limits {
            handler_timeout: Duration::from_secs(30),
            claim_idle: Duration::from_secs(120),
        }
    }

    fn entry(id: EntryId, pairs: &[(&str, &str)], format: &PayloadFormat) -> Entry {
        Entry::for_test("events.raw", "normalize", id, 1, pairs, format)
    }

    fn names_values(fields: &[(Vec<u8>, Vec<u8>)]) -> Vec<(String, String)> {
        fields
            .iter()
            .map(|(k, v)| {
                (
                    String::from_utf8_lossy(k).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            })
            .collect()
    }

    fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
        expected
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn commerce() -> ForwardOptions {
        toml_options(
            r#"
            to = "events.normalized"
            filter = { event_type = ["purchase", "page_view"] }
            rename = { payload = "normalized_payload" }
            drop = ["client_ip"]
            extract = { profile_id = "customer.profile_id", total = "order.total" }
            set = { source = "web", normalized_by = "{group}", received_at = "{time}" }
            "#,
        )
    }

    fn toml_options(text: &str) -> ForwardOptions {
        toml::from_str(text).expect("options parse")
    }

    #[test]
    fn commerce_entry_is_mapped_in_order() {
        let options = commerce();
        assert!(options.validate(&limits()).is_empty());
        let forward = Forward::new(&options, "events.raw").unwrap();
        let doc = r#"{"customer":{"profile_id":"p-7"},"order":{"total":12.5,"items":[1,2]}}"#;
        let e = entry(
            EntryId::new(1_700_000_000_123, 4),
            &[
                ("event_id", "e1"),
                ("brand_id", "b1"),
                ("event_type", "purchase"),
                ("payload", doc),
                ("client_ip", "10.0.0.1"),
                ("timestamp", "2024-12-01T10:00:00Z"),
            ],
            &PayloadFormat::Json("payload".into()),
        );
        let out = forward.transform(&e).unwrap();
        assert_eq!(
            names_values(&out),
            pairs(&[
                ("event_id", "e1"),
                ("brand_id", "b1"),
                ("event_type", "purchase"),
                ("normalized_payload", doc),
                ("timestamp", "2024-12-01T10:00:00Z"),
                ("profile_id", "p-7"),
                ("total", "12.5"),
                ("normalized_by", "normalize"),
                ("received_at", "2023-11-14T22:13:20.123Z"),
                ("source", "web"),
                ("source_id", "1700000000123-4"),
            ])
        );
    }

    #[test]
    fn filter_drops_entries_that_do_not_match_or_lack_the_key() {
        let forward = Forward::new(&commerce(), "events.raw").unwrap();
        let format = PayloadFormat::Fields;
        let chat = entry(
            EntryId::new(1, 0),
            &[("event_type", "whatsapp_message")],
            &format,
        );
        let err = forward.transform(&chat).unwrap_err();
        assert!(matches!(err, HandlerError::Drop(_)), "{err:?}");
        assert_eq!(err.reason(), "filtered out by filter.event_type");
        let none = entry(EntryId::new(1, 0), &[("brand_id", "b")], &format);
        assert!(matches!(
            forward.transform(&none),
            Err(HandlerError::Drop(_))
        ));
        let view = entry(EntryId::new(1, 0), &[("event_type", "page_view")], &format);
        assert!(forward.transform(&view).is_ok());
    }

    #[test]
    fn filter_values_may_be_numbers_and_json_paths() {
        let options = toml_options(
            r#"
            to = "out"
            filter = { "data.status" = 200, ok = [true], ratio = 1.5 }
            "#,
        );
        let forward = Forward::new(&options, "in").unwrap();
        let format = PayloadFormat::Json("event".into());
        let pass = entry(
            EntryId::new(1, 0),
            &[("event", r#"{"data":{"status":200},"ok":true,"ratio":1.5}"#)],
            &format,
        );
        assert!(forward.transform(&pass).is_ok());
        let fail = entry(
            EntryId::new(1, 0),
            &[("event", r#"{"data":{"status":500},"ok":true,"ratio":1.5}"#)],
            &format,
        );
        assert_eq!(
            forward.transform(&fail).unwrap_err().reason(),
            "filtered out by filter.data.status"
        );
    }

    #[test]
    fn keep_passes_only_the_listed_fields_and_added_fields_win() {
        let options = toml_options(
            r#"
            to = "out"
            keep = ["b", "a", "source"]
            rename = { a = "alpha" }
            set = { source = "web" }
            source_id_field = "origin"
            "#,
        );
        let forward = Forward::new(&options, "in").unwrap();
        let e = entry(
            EntryId::new(5, 1),
            &[("a", "1"), ("b", "2"), ("c", "3"), ("source", "app")],
            &PayloadFormat::Fields,
        );
        assert_eq!(
            names_values(&forward.transform(&e).unwrap()),
            pairs(&[
                ("alpha", "1"),
                ("b", "2"),
                ("source", "web"),
                ("origin", "5-1")
            ])
        );
    }

    #[test]
    fn a_rename_wins_over_an_original_field_of_its_new_name() {
        let options = toml_options(
            r#"
            to = "out"
            rename = { uid = "user_id" }
            source_id_field = ""
            "#,
        );
        let forward = Forward::new(&options, "in").unwrap();
        let both = entry(
            EntryId::new(1, 0),
            &[("user_id", "old"), ("uid", "42"), ("x", "1")],
            &PayloadFormat::Fields,
        );
        assert_eq!(
            names_values(&forward.transform(&both).unwrap()),
            pairs(&[("user_id", "42"), ("x", "1")])
        );
        // Without the renamed field, the original one stays.
        let only = entry(
            EntryId::new(1, 0),
            &[("user_id", "old"), ("x", "1")],
            &PayloadFormat::Fields,
        );
        assert_eq!(
            names_values(&forward.transform(&only).unwrap()),
            pairs(&[("user_id", "old"), ("x", "1")])
        );
    }

    #[test]
    fn extract_writes_json_text_and_skips_missing_values() {
        let options = toml_options(
            r#"
            to = "out"
            extract = { model = "data.model", tags = "data.tags", gone = "data.nothing", nil = "data.nil" }
            drop = ["event"]
            "#,
        );
        let forward = Forward::new(&options, "in").unwrap();
        let e = entry(
            EntryId::new(1, 0),
            &[(
                "event",
                r#"{"data":{"model":"gpt-4","tags":["a","b"],"nil":null}}"#,
            )],
            &PayloadFormat::Json("event".into()),
        );
        assert_eq!(
            names_values(&forward.transform(&e).unwrap()),
            pairs(&[
                ("model", "gpt-4"),
                ("tags", r#"["a","b"]"#),
                ("source_id", "1-0")
            ])
        );
    }

    #[test]
    fn replays_carry_the_original_id_and_lose_their_markers() {
        let options = toml_options(
            r#"
            to = "out"
            set = { at = "{time}", this = "{id}", origin = "{source_id}", from = "{stream}/{group}", raw = "{{id}}" }
            "#,
        );
        let forward = Forward::new(&options, "in").unwrap();
        let e = entry(
            EntryId::new(1_700_000_999_000, 0),
            &[
                ("a", "1"),
                (REPLAY_OF_FIELD, "1700000000000-3"),
                (REPLAY_GROUP_FIELD, "normalize"),
            ],
            &PayloadFormat::Fields,
        );
        assert_eq!(
            names_values(&forward.transform(&e).unwrap()),
            pairs(&[
                ("a", "1"),
                ("at", "2023-11-14T22:13:20.000Z"),
                ("from", "events.raw/normalize"),
                ("origin", "1700000000000-3"),
                ("raw", "{id}"),
                ("this", "1700000999000-0"),
                ("source_id", "1700000000000-3"),
            ])
        );
    }

    #[test]
    fn the_effect_is_one_capped_xadd_to_the_target() {
        let mut options = toml_options(r#"to = "out""#);
        options.max_len = Some(1000);
        let forward = Forward::new(&options, "in").unwrap();
        let e = entry(EntryId::new(2, 0), &[("a", "1")], &PayloadFormat::Fields);
        let effects = futures_util::FutureExt::now_or_never(forward.handle(&e))
            .unwrap()
            .unwrap();
        assert_eq!(
            effects,
            vec![Effect::StreamAdd {
                key: "out".into(),
                fields: vec![
                    (b"a".to_vec(), b"1".to_vec()),
                    (b"source_id".to_vec(), b"2-0".to_vec())
                ],
                max_len: Some(1000),
            }]
        );
    }

    #[test]
    fn nothing_to_forward_is_permanent() {
        let options = toml_options(
            r#"
            to = "out"
            keep = ["a"]
            source_id_field = ""
            "#,
        );
        let forward = Forward::new(&options, "in").unwrap();
        let e = entry(EntryId::new(1, 0), &[("b", "1")], &PayloadFormat::Fields);
        assert!(matches!(
            forward.transform(&e),
            Err(HandlerError::Permanent(_))
        ));
    }

    #[test]
    fn templates_parse_and_reject_what_they_cannot_render() {
        assert_eq!(
            Template::parse("a{id}b").unwrap().0,
            vec![Part::Text("a".into()), Part::Id, Part::Text("b".into())]
        );
        assert_eq!(
            Template::parse("{{x}}").unwrap().0,
            vec![Part::Text("{x}".into())]
        );
        assert!(
            Template::parse("{nope}")
                .unwrap_err()
                .contains("unknown placeholder `{nope}`")
        );
        assert!(Template::parse("{id").unwrap_err().contains("not closed"));
        assert!(Template::parse("x}").unwrap_err().contains("lone"));
        assert_eq!(
            Template::parse("é{time}").unwrap().0[0],
            Part::Text("é".into())
        );
    }

    #[test]
    fn validation_names_each_problem() {
        let keys = |o: &ForwardOptions| -> Vec<String> {
            o.validate(&limits()).into_iter().map(|p| p.key).collect()
        };
        assert_eq!(keys(&ForwardOptions::default()), vec!["to"]);
        let bad = toml_options(
            r#"
            to = "out"
            filter = { kind = [] }
            rename = { a = "x", b = "x", c = "source" }
            drop = ["a"]
            keep = ["b"]
            set = { source = "{host}", model = "m" }
            extract = { model = "data.model", source_id = "id" }
            max_len = 0
            "#,
        );
        let mut found = keys(&bad);
        found.sort();
        found.dedup();
        assert_eq!(
            found,
            vec![
                "extract.model",
                "filter.kind",
                "keep",
                "max_len",
                "rename.a",
                "rename.b",
                "rename.c",
                "set.source",
                "source_id_field",
            ]
        );
        let same = toml_options(r#"to = "in""#);
        assert_eq!(same.validate_with_stream("in")[0].key, "to");
        assert!(same.validate_with_stream("other").is_empty());
        assert!(Forward::new(&same, "in").is_err());
    }

    #[test]
    fn options_round_trip_for_check() {
        let options = commerce();
        let json = serde_json::to_value(&options).unwrap();
        assert_eq!(json["filter"]["event_type"][1], "page_view");
        assert_eq!(json["source_id_field"], "source_id");
        let back: ForwardOptions = serde_json::from_value(json).unwrap();
        assert_eq!(back, options);
        let single: FilterValues = serde_json::from_str(r#""x""#).unwrap();
        assert_eq!(serde_json::to_string(&single).unwrap(), r#""x""#);
        assert!(serde_json::from_str::<FilterValues>(r#"[["x"]]"#).is_err());
    }
}
