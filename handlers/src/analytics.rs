//! `handler = "analytics"`: rolling per-minute aggregates in Redis, the questions of the
//! LLM-observability write-up (calls, tokens, cost, average and p95 latency, calls per model,
//! error rate) answered without rereading the stream. `streamworker stats` reads them.
//!
//! Every entry adds to **one hash per minute**, chosen by the minute of the entry's id (the
//! original id for a replayed dead letter), so a redelivery lands in the same hash. The adds
//! are returned as [`Effect`]s, which the runtime applies in the script that acknowledges the
//! entry and only if that acknowledgement took: an entry is counted exactly once, however
//! often it is delivered. The handler itself never writes.
//!
//! # Layout
//!
//! Key: `{<stream>}:analytics:<group>:m:<unix minute>` (the stream's hash slot). It expires
//! `retention` after the end of its minute. Fields (user-supplied parts are escaped, see
//! [`escape`]):
//!
//! | field | kind | what |
//! | --- | --- | --- |
//! | `n` | HINCRBY | entries |
//! | `err` | HINCRBY | entries whose event type is one of `error_types` |
//! | `type\|<type>` | HINCRBY | entries per event type |
//! | `sum\|<path>` | HINCRBYFLOAT | sum of a numeric path |
//! | `lat\|sum` | HINCRBYFLOAT | sum of the latency values (ms) |
//! | `lat\|<i>` | HINCRBY | latency values in bucket `i` (see [`bucket_of`]) |
//! | `dim\|<path>\|<value>\|<metric>` | | any of the above for the entries whose dimension `path` has `value` |
//!
//! Per dimension value, `n`, `err` and `type|…` are always kept; `sum|…` and `lat|…` only
//! for the dimensions in `measure_by` (every dimension by default).
//!
//! # Latency buckets and the error bound
//!
//! Bucket 0 holds values in [0, 1] ms; bucket `i` in 1..=[`TOP_BUCKET`] holds
//! (1.1^(i−1), 1.1^i] ms, so the top bucket ends at 1.1^159 ms ≈ 63.5 min; bucket
//! `TOP_BUCKET + 1` holds anything longer. A quantile is read as the representative value of
//! the bucket holding its rank, 2·lo·hi/(lo+hi), which is within
//! [`RELATIVE_ERROR`] = (1.1 − 1)/(1.1 + 1) ≈ 4.76 % of every value in the bucket, and so of
//! the exact (nearest-rank) quantile. Below 1 ms the error is at most 0.5 ms; above the top
//! bucket the figure is a lower bound. The average is exact (sum / count). Redis has no
//! "keep the maximum" increment, so min and max come from the histogram too, with the same
//! bound.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::{Effect, Effects, Entry, Handler, HandlerError, OptionProblem};

/// The handler kind, also the second part of every key.
pub const KIND: &str = "analytics";

/// Ratio between the bounds of consecutive latency buckets.
pub const GAMMA: f64 = 1.1;
/// The last bucket with an upper bound (1.1^159 ms ≈ 63.5 min); the next one is overflow.
pub const TOP_BUCKET: usize = 159;
/// The bound on the relative error of every latency quantile above 1 ms.
pub const RELATIVE_ERROR: f64 = (GAMMA - 1.0) / (GAMMA + 1.0);

/// Dimension values longer than this (bytes) are cut, so a stray document in a dimension
/// path cannot make field names of arbitrary size.
pub const MAX_VALUE_BYTES: usize = 200;

/// Values further from zero than this in numeric paths are skipped: they are not plausible
/// tokens, costs or milliseconds, and a sum of them could overflow (which Redis refuses).
pub const MAX_NUMBER: f64 = 1e15;

const MINUTE_MS: u64 = 60_000;

/// The hash holding one minute's aggregates.
pub fn minute_key(stream: &str, group: &str, minute: u64) -> String {
    format!("{}:{KIND}:{group}:m:{minute}", crate::slot_tag(stream))
}

/// `[groups.<name>.options]` for `handler = "analytics"`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AnalyticsOptions {
    /// Field (or JSON path) holding the event type, counted per value.
    #[serde(default = "default_event_type")]
    pub event_type: String,
    /// Fields or JSON paths to count by, e.g. `["data.model", "tags.user_id"]`.
    #[serde(default)]
    pub dimensions: Vec<String>,
    /// The dimensions whose values also get the sums and the latency histogram; the others
    /// get counts only. Default: every dimension. Leave high-cardinality dimensions (user
    /// ids) out: each value costs up to ~2 fields per sum plus one per latency bucket, per
    /// minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measure_by: Option<Vec<String>>,
    /// Numeric fields or JSON paths to sum, e.g. `["data.tokens_used", "data.cost_usd"]`.
    #[serde(default)]
    pub sums: Vec<String>,
    /// Numeric field or JSON path holding a duration in milliseconds, kept as a histogram
    /// for average and percentiles, e.g. `"data.response_time_ms"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<String>,
    /// Event types counted as errors (for the error rate).
    #[serde(default = "default_error_types")]
    pub error_types: Vec<String>,
    /// How long each minute's aggregates are kept after the minute ends.
    #[serde(with = "crate::duration", default = "default_retention")]
    pub retention: Duration,
}

fn default_event_type() -> String {
    "event_type".into()
}

fn default_error_types() -> Vec<String> {
    vec!["error".into()]
}

fn default_retention() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}

impl Default for AnalyticsOptions {
    fn default() -> Self {
        Self {
            event_type: default_event_type(),
            dimensions: Vec::new(),
            measure_by: None,
            sums: Vec::new(),
            latency: None,
            error_types: default_error_types(),
            retention: default_retention(),
        }
    }
}

impl AnalyticsOptions {
    pub(crate) fn validate(&self) -> Vec<OptionProblem> {
        let mut problems = Vec::new();
        let mut problem = |key: &str, message: String| {
            problems.push(OptionProblem {
                key: key.to_owned(),
                message,
            })
        };
        if self.event_type.trim().is_empty() {
            problem(
                "event_type",
                "is empty: name the field (or JSON path) holding the event type, e.g. event_type = \"event_type\"".into(),
            );
        }
        for (key, paths) in [("dimensions", &self.dimensions), ("sums", &self.sums)] {
            let mut seen = std::collections::HashSet::new();
            for path in paths {
                if path.trim().is_empty() {
                    problem(
                        key,
                        "contains an empty path: remove it or name a field (or JSON path such as \"data.model\")".into(),
                    );
                } else if !seen.insert(path) {
                    problem(
                        key,
                        format!("lists \"{path}\" twice: each path once, please"),
                    );
                }
            }
        }
        if let Some(measured) = &self.measure_by {
            for path in measured {
                if !self.dimensions.contains(path) {
                    problem(
                        "measure_by",
                        format!(
                            "lists \"{path}\", which is not one of dimensions ({}): add it to dimensions or remove it here",
                            list(&self.dimensions)
                        ),
                    );
                }
            }
        }
        if matches!(&self.latency, Some(p) if p.trim().is_empty()) {
            problem(
                "latency",
                "is empty: name a numeric field in milliseconds (e.g. \"data.response_time_ms\") or remove the key".into(),
            );
        }
        if self.retention < Duration::from_secs(60) {
            problem(
                "retention",
                format!(
                    "({}) is shorter than the one-minute buckets: use at least \"1m\", e.g. \"7d\"",
                    crate::duration::format(self.retention)
                ),
            );
        }
        problems
    }
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items
            .iter()
            .map(|i| format!("\"{i}\""))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Escapes a user-supplied part of a field name: `%` → `%25`, `|` → `%7C`.
pub fn escape(part: &str) -> Cow<'_, str> {
    if !part.contains(['%', '|']) {
        return Cow::Borrowed(part);
    }
    Cow::Owned(part.replace('%', "%25").replace('|', "%7C"))
}

/// Reverses [`escape`].
pub fn unescape(part: &str) -> Cow<'_, str> {
    if !part.contains('%') {
        return Cow::Borrowed(part);
    }
    Cow::Owned(part.replace("%7C", "|").replace("%25", "%"))
}

/// Cuts `text` to at most `max` bytes on a character boundary.
fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

static BOUNDS: LazyLock<Vec<f64>> = LazyLock::new(|| {
    let mut bounds = Vec::with_capacity(TOP_BUCKET + 1);
    let mut b = 1.0;
    for _ in 0..=TOP_BUCKET {
        bounds.push(b);
        b *= GAMMA;
    }
    bounds
});

/// The bucket of a latency in milliseconds (non-negative): 0 for [0, 1], `i` for
/// (1.1^(i−1), 1.1^i], `TOP_BUCKET + 1` above.
pub fn bucket_of(ms: f64) -> usize {
    BOUNDS.partition_point(|&upper| upper < ms)
}

/// The (lower, upper) bounds of a bucket; the overflow bucket's upper bound is infinite.
pub fn bucket_bounds(i: usize) -> (f64, f64) {
    match i {
        0 => (0.0, 1.0),
        i if i <= TOP_BUCKET => (BOUNDS[i - 1], BOUNDS[i]),
        _ => (BOUNDS[TOP_BUCKET], f64::INFINITY),
    }
}

/// The value a bucket stands for: within [`RELATIVE_ERROR`] of anything in it (above 1 ms).
pub fn bucket_value(i: usize) -> f64 {
    match bucket_bounds(i) {
        (_, hi) if i == 0 => hi / 2.0,
        (lo, hi) if hi.is_finite() => 2.0 * lo * hi / (lo + hi),
        (lo, _) => lo,
    }
}

/// A latency histogram merged from any number of minutes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    /// Count per bucket index.
    pub buckets: BTreeMap<usize, u64>,
    /// Sum of the values, ms.
    pub sum: f64,
}

impl Histogram {
    pub fn add(&mut self, bucket: usize, count: u64) {
        if count > 0 {
            *self.buckets.entry(bucket).or_default() += count;
        }
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (&b, &n) in &other.buckets {
            self.add(b, n);
        }
        self.sum += other.sum;
    }

    pub fn count(&self) -> u64 {
        self.buckets.values().sum()
    }

    pub fn mean(&self) -> Option<f64> {
        let n = self.count();
        (n > 0).then(|| self.sum / n as f64)
    }

    /// The nearest-rank quantile `q` in [0, 1] (the value at rank ⌈q·n⌉), read from its
    /// bucket.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as u64).clamp(1, n);
        let mut seen = 0;
        for (&bucket, &count) in &self.buckets {
            seen += count;
            if seen >= rank {
                return Some(bucket_value(bucket));
            }
        }
        None
    }

    pub fn min(&self) -> Option<f64> {
        self.buckets.keys().next().map(|&b| bucket_value(b))
    }

    pub fn max(&self) -> Option<f64> {
        self.buckets.keys().next_back().map(|&b| bucket_value(b))
    }
}

/// One aggregate below `dim|<path>|<value>|` or at the top of the hash. Borrows from the
/// field name where it can: `stats` parses every field of up to a week of minutes.
#[derive(Debug, Clone, PartialEq)]
pub enum Metric<'a> {
    Entries,
    Errors,
    Type(Cow<'a, str>),
    Sum(Cow<'a, str>),
    LatencySum,
    LatencyBucket(usize),
}

/// A field of a minute hash, parsed.
#[derive(Debug, Clone, PartialEq)]
pub enum Field<'a> {
    Total(Metric<'a>),
    Dimension {
        path: Cow<'a, str>,
        value: Cow<'a, str>,
        metric: Metric<'a>,
    },
}

impl<'a> Field<'a> {
    /// Parses a field name; `None` for names this version does not know.
    pub fn parse(name: &'a str) -> Option<Self> {
        let mut parts = name.split('|');
        let first = parts.next()?;
        if first == "dim" {
            let path = unescape(parts.next()?);
            let value = unescape(parts.next()?);
            let metric = parse_metric(parts.next()?, parts)?;
            return Some(Self::Dimension {
                path,
                value,
                metric,
            });
        }
        parse_metric(first, parts).map(Self::Total)
    }
}

fn parse_metric<'a>(first: &str, mut rest: impl Iterator<Item = &'a str>) -> Option<Metric<'a>> {
    let metric = match first {
        "n" => Metric::Entries,
        "err" => Metric::Errors,
        "type" => Metric::Type(unescape(rest.next()?)),
        "sum" => Metric::Sum(unescape(rest.next()?)),
        "lat" => match rest.next()? {
            "sum" => Metric::LatencySum,
            i => Metric::LatencyBucket(i.parse().ok()?),
        },
        _ => return None,
    };
    rest.next().is_none().then_some(metric)
}

struct Dimension {
    path: String,
    /// `dim|<escaped path>|`
    prefix: String,
    measured: bool,
}

struct Summed {
    path: String,
    /// `sum|<escaped path>`
    field: String,
}

/// The analytics handler for one group.
pub struct Analytics {
    event_type: String,
    dimensions: Vec<Dimension>,
    sums: Vec<Summed>,
    latency: Option<String>,
    error_types: Vec<String>,
    retention_ms: u64,
    clock: Arc<dyn Fn() -> SystemTime + Send + Sync>,
}

impl std::fmt::Debug for Analytics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Analytics")
            .field("event_type", &self.event_type)
            .field("retention_ms", &self.retention_ms)
            .finish_non_exhaustive()
    }
}

impl Analytics {
    pub fn new(options: &AnalyticsOptions) -> Self {
        let measured = |path: &String| {
            options
                .measure_by
                .as_ref()
                .is_none_or(|list| list.contains(path))
        };
        Self {
            event_type: options.event_type.clone(),
            dimensions: options
                .dimensions
                .iter()
                .map(|path| Dimension {
                    path: path.clone(),
                    prefix: format!("dim|{}|", escape(path)),
                    measured: measured(path),
                })
                .collect(),
            sums: options
                .sums
                .iter()
                .map(|path| Summed {
                    path: path.clone(),
                    field: format!("sum|{}", escape(path)),
                })
                .collect(),
            latency: options.latency.clone(),
            error_types: options.error_types.clone(),
            retention_ms: options.retention.as_millis() as u64,
            clock: Arc::new(SystemTime::now),
        }
    }

    /// Replaces the clock (tests).
    pub fn with_clock(mut self, clock: impl Fn() -> SystemTime + Send + Sync + 'static) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// The effects of one entry: increments on its minute's hash and the hash's expiry.
    /// Empty when the minute is already past `retention` (the hash would expire at once).
    pub fn effects(&self, entry: &Entry) -> Effects {
        let minute = entry.idempotency_id().ms / MINUTE_MS;
        let now_ms = (self.clock)()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let expires_ms = (minute + 1) * MINUTE_MS + self.retention_ms;
        if expires_ms <= now_ms {
            return Effects::new();
        }
        let key = minute_key(entry.stream(), entry.group(), minute);

        let event_type = entry.get(&self.event_type);
        let type_field = event_type
            .as_deref()
            .map(|t| format!("type|{}", escape(truncate(t, MAX_VALUE_BYTES))));
        let is_error = event_type
            .as_deref()
            .is_some_and(|t| self.error_types.iter().any(|e| e == t));
        let sums: Vec<(&str, f64)> = self
            .sums
            .iter()
            .filter_map(|s| Some((s.field.as_str(), number(entry, &s.path)?)))
            .collect();
        let latency = self
            .latency
            .as_deref()
            .and_then(|path| number(entry, path))
            .filter(|ms| *ms >= 0.0);
        let lat_bucket = latency.map(|ms| format!("lat|{}", bucket_of(ms)));
        // The prefixes of the dimension values present on this entry.
        let values: Vec<(String, bool)> = self
            .dimensions
            .iter()
            .filter_map(|d| {
                let value = entry.get(&d.path)?;
                Some((
                    format!("{}{}|", d.prefix, escape(truncate(&value, MAX_VALUE_BYTES))),
                    d.measured,
                ))
            })
            .collect();

        let mut w = Writes {
            out: Effects::with_capacity(6 + sums.len() + values.len() * (4 + sums.len())),
            key,
        };
        w.incr("n".into());
        if let Some(t) = &type_field {
            w.incr(t.clone());
        }
        if is_error {
            w.incr("err".into());
        }
        for &(field, by) in &sums {
            w.add(field.to_owned(), by);
        }
        if let (Some(ms), Some(bucket)) = (latency, &lat_bucket) {
            w.add("lat|sum".into(), ms);
            w.incr(bucket.clone());
        }
        for (prefix, measured) in &values {
            w.incr(format!("{prefix}n"));
            if let Some(t) = &type_field {
                w.incr(format!("{prefix}{t}"));
            }
            if is_error {
                w.incr(format!("{prefix}err"));
            }
            if !measured {
                continue;
            }
            for &(field, by) in &sums {
                w.add(format!("{prefix}{field}"), by);
            }
            if let (Some(ms), Some(bucket)) = (latency, &lat_bucket) {
                w.add(format!("{prefix}lat|sum"), ms);
                w.incr(format!("{prefix}{bucket}"));
            }
        }
        let Writes { mut out, key } = w;
        out.push(Effect::Expire {
            key,
            ttl: Duration::from_millis(expires_ms - now_ms),
        });
        out
    }
}

/// Increments on one key.
struct Writes {
    out: Effects,
    key: String,
}

impl Writes {
    fn incr(&mut self, field: String) {
        self.out.push(Effect::HashIncr {
            key: self.key.clone(),
            field,
            by: 1,
        });
    }

    fn add(&mut self, field: String, by: f64) {
        self.out.push(Effect::HashIncrFloat {
            key: self.key.clone(),
            field,
            by,
        });
    }
}

/// A plausible finite number at `path`, or `None` (missing, not numeric, absurd).
fn number(entry: &Entry, path: &str) -> Option<f64> {
    entry.get_f64(path).filter(|n| n.abs() <= MAX_NUMBER)
}

impl Handler for Analytics {
    async fn handle(&self, entry: &Entry) -> Result<Effects, HandlerError> {
        Ok(self.effects(entry))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EntryId, PayloadFormat};
    use std::collections::HashMap;

    const NOW_MS: u64 = 1_700_000_100_000;

    fn handler(options: &AnalyticsOptions) -> Analytics {
        Analytics::new(options).with_clock(|| UNIX_EPOCH + Duration::from_millis(NOW_MS))
    }

    fn llm_options() -> AnalyticsOptions {
        AnalyticsOptions {
            dimensions: vec!["data.model".into(), "tags.user_id".into()],
            measure_by: Some(vec!["data.model".into()]),
            sums: vec!["data.tokens_used".into(), "data.cost_usd".into()],
            latency: Some("data.response_time_ms".into()),
            ..AnalyticsOptions::default()
        }
    }

    fn entry(ms: u64, fields: &[(&str, &str)], format: &PayloadFormat) -> Entry {
        Entry::for_test("ml_events", "usage", EntryId::new(ms, 0), 1, fields, format)
    }

    fn json(ms: u64, doc: &str) -> Entry {
        entry(ms, &[("event", doc)], &PayloadFormat::Json("event".into()))
    }

    /// Applies effects to an in-memory "Redis": key → field → value.
    fn apply(db: &mut HashMap<String, HashMap<String, f64>>, effects: &[Effect]) {
        for e in effects {
            match e {
                Effect::HashIncr { key, field, by } => {
                    *db.entry(key.clone())
                        .or_default()
                        .entry(field.clone())
                        .or_default() += *by as f64
                }
                Effect::HashIncrFloat { key, field, by } => {
                    *db.entry(key.clone())
                        .or_default()
                        .entry(field.clone())
                        .or_default() += by
                }
                Effect::Expire { .. } => {}
                other => panic!("unexpected effect {other:?}"),
            }
        }
    }

    #[test]
    fn an_llm_call_adds_to_its_minute() {
        let h = handler(&llm_options());
        let e = json(
            1_700_000_061_234,
            r#"{"event_type":"llm_call","data":{"model":"gpt-4","tokens_used":287,"cost_usd":0.0023,"response_time_ms":1234},"tags":{"user_id":"u|1"}}"#,
        );
        let effects = h.effects(&e);
        // 4 + 2 sums overall, 2 + 2 + 2 for the measured model, 2 for the user, the expiry.
        assert_eq!(effects.len(), 15, "{effects:#?}");
        let key = "{ml_events}:analytics:usage:m:28333334";
        assert!(effects.iter().all(|e| e.key() == key), "{effects:?}");
        let mut db = HashMap::new();
        apply(&mut db, &effects);
        let m = &db[key];
        let b = bucket_of(1234.0);
        for (field, value) in [
            ("n", 1.0),
            ("type|llm_call", 1.0),
            ("sum|data.tokens_used", 287.0),
            ("sum|data.cost_usd", 0.0023),
            ("lat|sum", 1234.0),
            (&format!("lat|{b}"), 1.0),
            ("dim|data.model|gpt-4|n", 1.0),
            ("dim|data.model|gpt-4|type|llm_call", 1.0),
            ("dim|data.model|gpt-4|sum|data.tokens_used", 287.0),
            ("dim|data.model|gpt-4|lat|sum", 1234.0),
            (&format!("dim|data.model|gpt-4|lat|{b}"), 1.0),
            ("dim|tags.user_id|u%7C1|n", 1.0),
            ("dim|tags.user_id|u%7C1|type|llm_call", 1.0),
        ] {
            assert_eq!(m.get(field), Some(&value), "{field} in {m:?}");
        }
        // user_id is not in measure_by: counts only.
        assert!(
            !m.keys()
                .any(|f| f.starts_with("dim|tags.user_id|u%7C1|sum"))
        );
        assert!(!m.contains_key("err"));
        // The expiry: retention after the end of the entry's minute.
        let Some(Effect::Expire { ttl, .. }) = effects.last() else {
            panic!("expiry last: {effects:?}")
        };
        let expires = (28_333_334 + 1) * 60_000 + 7 * 24 * 3_600_000;
        assert_eq!(ttl.as_millis() as u64, expires - NOW_MS);
        // Every field parses back to what it means.
        for field in m.keys() {
            assert!(Field::parse(field).is_some(), "{field}");
        }
        assert_eq!(
            Field::parse("dim|tags.user_id|u%7C1|type|llm_call"),
            Some(Field::Dimension {
                path: "tags.user_id".into(),
                value: "u|1".into(),
                metric: Metric::Type("llm_call".into())
            })
        );
    }

    #[test]
    fn errors_missing_and_non_numeric_values() {
        let h = handler(&llm_options());
        let mut db = HashMap::new();
        let ms = NOW_MS - 1000;
        for doc in [
            r#"{"event_type":"error","data":{"model":"gpt-4","error_type":"timeout"}}"#,
            r#"{"event_type":"llm_call","data":{"model":"gpt-4","tokens_used":"lots","cost_usd":null,"response_time_ms":-5}}"#,
            r#"{"data":{"tokens_used":"12"}}"#,
            r#"{"event_type":"llm_call","data":{"tokens_used":1e300,"response_time_ms":"0.5"}}"#,
        ] {
            apply(&mut db, &h.effects(&json(ms, doc)));
        }
        let m = db.values().next().unwrap();
        assert_eq!(m["n"], 4.0);
        assert_eq!(m["err"], 1.0);
        assert_eq!(m["type|error"], 1.0);
        assert_eq!(m["type|llm_call"], 2.0);
        assert_eq!(m["dim|data.model|gpt-4|n"], 2.0);
        assert_eq!(m["dim|data.model|gpt-4|err"], 1.0);
        assert_eq!(m["sum|data.tokens_used"], 12.0, "numeric strings count");
        assert!(!m.contains_key("sum|data.cost_usd"));
        assert_eq!(m["lat|0"], 1.0, "only the 0.5 ms value");
        assert_eq!(m["lat|sum"], 0.5);
    }

    #[test]
    fn flat_fields_work_the_same() {
        let h = handler(&AnalyticsOptions {
            dimensions: vec!["user_id".into()],
            latency: Some("latency_ms".into()),
            ..AnalyticsOptions::default()
        });
        let e = entry(
            NOW_MS,
            &[
                ("user_id", "42"),
                ("event_type", "prompt"),
                ("latency_ms", "80"),
            ],
            &PayloadFormat::Fields,
        );
        let mut db = HashMap::new();
        apply(&mut db, &h.effects(&e));
        let m = db.values().next().unwrap();
        assert_eq!(m["type|prompt"], 1.0);
        assert_eq!(m["dim|user_id|42|type|prompt"], 1.0);
        assert_eq!(m[&format!("dim|user_id|42|lat|{}", bucket_of(80.0))], 1.0);
    }

    #[test]
    fn entries_older_than_retention_are_not_aggregated() {
        let h = handler(&AnalyticsOptions {
            retention: Duration::from_secs(3600),
            ..AnalyticsOptions::default()
        });
        let old = json(NOW_MS - 2 * 3_600_000, r#"{"event_type":"x"}"#);
        assert!(h.effects(&old).is_empty());
        let recent = json(NOW_MS - 1_800_000, r#"{"event_type":"x"}"#);
        assert!(!h.effects(&recent).is_empty());
    }

    #[test]
    fn a_replay_counts_in_its_original_minute() {
        let h = handler(&AnalyticsOptions::default());
        let e = entry(
            NOW_MS,
            &[("event_type", "x"), ("dlq_replay_of", "1700000000000-3")],
            &PayloadFormat::Fields,
        );
        assert!(h.effects(&e)[0].key().ends_with(":m:28333333"));
    }

    #[test]
    fn buckets_cover_the_range_without_gaps() {
        assert_eq!(bucket_of(0.0), 0);
        assert_eq!(bucket_of(1.0), 0);
        assert_eq!(bucket_of(1.0000001), 1);
        assert_eq!(bucket_of(1.1), 1);
        assert_eq!(bucket_of(1.2), 2);
        assert_eq!(bucket_of(600_000.0), 140);
        assert_eq!(bucket_of(1e12), TOP_BUCKET + 1);
        for i in 1..=TOP_BUCKET + 1 {
            let (lo, hi) = bucket_bounds(i);
            assert_eq!(lo, bucket_bounds(i - 1).1);
            assert_eq!(bucket_of(hi.min(1e13)), i.min(TOP_BUCKET + 1));
            let v = bucket_value(i);
            assert!(lo < v && v <= hi || i == TOP_BUCKET + 1 && v == lo, "{i}");
        }
        assert!(bucket_bounds(TOP_BUCKET).1 > 3_600_000.0);
    }

    #[test]
    fn quantiles_stay_within_the_stated_bound() {
        // A deterministic spread from 1 ms to 10 min, several shapes.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 11) as f64 / (1u64 << 53) as f64
        };
        for n in [1usize, 2, 7, 100, 1000, 5000] {
            let mut values: Vec<f64> = (0..n)
                .map(|_| (1.0 + next() * 13.3).exp().min(600_000.0))
                .collect();
            let mut h = Histogram::default();
            for v in &values {
                h.add(bucket_of(*v), 1);
                h.sum += v;
            }
            values.sort_by(f64::total_cmp);
            for q in [0.0, 0.5, 0.95, 0.99, 1.0] {
                let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
                let exact = values[rank - 1];
                let estimate = h.quantile(q).unwrap();
                let error = (estimate - exact).abs() / exact;
                assert!(
                    error <= RELATIVE_ERROR + 1e-12,
                    "n={n} q={q}: {estimate} vs {exact} ({error})"
                );
            }
            assert!((h.mean().unwrap() - values.iter().sum::<f64>() / n as f64).abs() < 1e-6);
            let max = *values.last().unwrap();
            assert!((h.max().unwrap() - max).abs() / max <= RELATIVE_ERROR + 1e-12);
        }
        assert!((RELATIVE_ERROR - 0.047_619).abs() < 1e-6);
        assert_eq!(Histogram::default().quantile(0.5), None);
    }

    #[test]
    fn escaping_round_trips() {
        for s in ["plain", "a|b", "100%", "%7C", "|%|"] {
            assert_eq!(unescape(&escape(s)), s);
            assert!(!escape(s).contains('|'));
        }
        assert_eq!(truncate("ééé", 3), "é");
        assert_eq!(
            Field::parse("lat|12"),
            Some(Field::Total(Metric::LatencyBucket(12)))
        );
        assert_eq!(Field::parse("lat|x"), None);
        assert_eq!(Field::parse("n|extra"), None);
        assert_eq!(Field::parse("what"), None);
    }

    #[test]
    fn validation_names_each_problem() {
        assert!(llm_options().validate().is_empty());
        assert!(AnalyticsOptions::default().validate().is_empty());
        let bad = AnalyticsOptions {
            event_type: " ".into(),
            dimensions: vec!["a".into(), "a".into()],
            measure_by: Some(vec!["b".into()]),
            sums: vec!["".into()],
            latency: Some("".into()),
            retention: Duration::from_secs(10),
            ..AnalyticsOptions::default()
        }
        .validate();
        let keys: Vec<&str> = bad.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "event_type",
                "dimensions",
                "sums",
                "measure_by",
                "latency",
                "retention"
            ]
        );
        assert!(bad[3].message.contains("\"b\""), "{}", bad[3].message);
    }

    #[test]
    fn options_deserialize_with_defaults_and_reject_unknown_keys() {
        let o: AnalyticsOptions = serde_json::from_str(r#"{"retention":"2h"}"#).unwrap();
        assert_eq!(o.event_type, "event_type");
        assert_eq!(o.error_types, ["error"]);
        assert_eq!(o.retention, Duration::from_secs(7200));
        assert!(serde_json::from_str::<AnalyticsOptions>(r#"{"dimension":["x"]}"#).is_err());
    }
}
