//! `handler = "warehouse"`: batches entries into durable storage, idempotent by stream and
//! entry id, so that a redelivery never leaves a second copy.
//!
//! Two sinks:
//!
//! - `sink = "file"` (the default): rotated JSON Lines files, one line per entry, written,
//!   `fsync`ed, then acknowledged. Files belong to one replica; markers in Redis
//!   (`{<stream>}:warehouse:<group>:seen:<id>`) keep a redelivery to *any* replica from
//!   writing a second line. See [`file`](mod@file) for the order of writes and markers.
//! - `sink = "postgres"`: one transaction per batch, `INSERT … ON CONFLICT DO NOTHING` on the
//!   primary key `(stream, id)`. See [`postgres`].
//!
//! Both record the same thing per entry: the stream, the entry's id (the original id for a
//! replayed dead letter, [`Entry::idempotency_id`]), its time (from the id), its event type
//! (`event_type` option, a field or a dotted JSON path) and its payload — the fields as a JSON
//! object, or the decoded document for `payload = "json:<field>"`.
//!
//! An entry whose id is already stored is *dropped* (acknowledged, counted as `dropped`,
//! no dead letter): it is a duplicate.

pub mod file;
pub mod postgres;

use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};

use crate::{
    Batching, Derived, Effects, Entry, EntryId, Handler, HandlerError, Limits, Needs,
    OptionProblem, Payload, REPLAY_GROUP_FIELD, REPLAY_OF_FIELD, Store, batch_wait,
};

/// Where a warehouse group's batches go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    /// Rotated JSON Lines files in `directory`.
    #[default]
    File,
    /// A PostgreSQL table.
    Postgres,
}

impl SinkKind {
    fn name(self) -> &'static str {
        match self {
            Self::File => "file",
            Self::Postgres => "postgres",
        }
    }
}

/// `[groups.<name>.options]` for `handler = "warehouse"`.
///
/// Options of one sink are refused with the other (`check` says which sink they belong
/// to). Unset sink options take the defaults below; `check` prints them resolved.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WarehouseOptions {
    /// `"file"` (rotated JSON Lines files, the default) or `"postgres"`.
    #[serde(default)]
    pub sink: SinkKind,
    /// Entries per batch: one write and fsync, or one transaction. Batches never hold more
    /// than the group's `concurrency`, so set that at least this high (twice is better: the
    /// next batch fills while one commits).
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// How long the first entry of a batch waits for the batch to fill. Entries wait in
    /// the batch before their handler starts, so `claim_idle` must exceed
    /// `handler_timeout + max_wait`.
    #[serde(with = "crate::duration", default = "default_max_wait")]
    pub max_wait: Duration,
    /// Where the event type is: a field name, or a dotted path into the JSON document for
    /// `payload = "json:…"` (e.g. `data.kind`). Missing → null.
    #[serde(default = "default_event_type")]
    pub event_type: String,

    /// file: the directory the files are written to (created if missing). Default
    /// `"warehouse"`, relative to the working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory: Option<PathBuf>,
    /// file: start a new file once the current one would grow past this many bytes.
    /// Default 64 MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotate_bytes: Option<u64>,
    /// file: start a new file for the first batch after the current one is this old.
    /// Default `"1h"`.
    #[serde(
        default,
        with = "crate::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub rotate_interval: Option<Duration>,
    /// file: how long the "already written" marker of an entry lives in Redis. A
    /// redelivery (or a dead-letter replay) later than this writes a second line. Default
    /// `"24h"`; must exceed the group's `claim_idle`.
    #[serde(
        default,
        with = "crate::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub dedupe_window: Option<Duration>,

    /// postgres: the server, `postgres://user:password@host:5432/db` or
    /// `host=… user=… dbname=…`. TLS as libpq's `sslmode`: `disable`, `prefer` (the
    /// default), `require` (encrypted, certificate unchecked), `verify-ca` or `verify-full`
    /// with the CA in `sslrootcert=/path/to/ca.pem` (or `system`). The password is
    /// redacted when `check` prints the configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// postgres: the table (optionally `schema.table`, lower case), created if missing.
    /// Default `"streamworker_events"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
}

fn default_batch_size() -> usize {
    500
}

fn default_max_wait() -> Duration {
    Duration::from_secs(1)
}

fn default_event_type() -> String {
    "event_type".to_owned()
}

pub const DEFAULT_DIRECTORY: &str = "warehouse";
pub const DEFAULT_ROTATE_BYTES: u64 = 64 * 1024 * 1024;
pub const DEFAULT_ROTATE_INTERVAL: Duration = Duration::from_secs(3600);
pub const DEFAULT_DEDUPE_WINDOW: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_TABLE: &str = "streamworker_events";

const REDACTED: &str = "<redacted>";

impl Default for WarehouseOptions {
    fn default() -> Self {
        Self {
            sink: SinkKind::File,
            batch_size: default_batch_size(),
            max_wait: default_max_wait(),
            event_type: default_event_type(),
            directory: None,
            rotate_bytes: None,
            rotate_interval: None,
            dedupe_window: None,
            url: None,
            table: None,
        }
    }
}

impl WarehouseOptions {
    pub fn directory(&self) -> PathBuf {
        self.directory
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DIRECTORY))
    }
    pub fn rotate_bytes(&self) -> u64 {
        self.rotate_bytes.unwrap_or(DEFAULT_ROTATE_BYTES)
    }
    pub fn rotate_interval(&self) -> Duration {
        self.rotate_interval.unwrap_or(DEFAULT_ROTATE_INTERVAL)
    }
    pub fn dedupe_window(&self) -> Duration {
        self.dedupe_window.unwrap_or(DEFAULT_DEDUPE_WINDOW)
    }
    pub fn table(&self) -> &str {
        self.table.as_deref().unwrap_or(DEFAULT_TABLE)
    }

    /// The options set that belong to the other sink, as (key, its sink).
    fn foreign_keys(&self) -> Vec<(&'static str, SinkKind)> {
        let file = [
            ("directory", self.directory.is_some()),
            ("rotate_bytes", self.rotate_bytes.is_some()),
            ("rotate_interval", self.rotate_interval.is_some()),
            ("dedupe_window", self.dedupe_window.is_some()),
        ];
        let postgres = [("url", self.url.is_some()), ("table", self.table.is_some())];
        let (others, kind) = match self.sink {
            SinkKind::File => (&postgres[..], SinkKind::Postgres),
            SinkKind::Postgres => (&file[..], SinkKind::File),
        };
        others
            .iter()
            .filter(|(_, set)| *set)
            .map(|(key, _)| (*key, kind))
            .collect()
    }

    /// `max_wait` (set or not) and an explicit `dedupe_window` bound the group's
    /// `claim_idle` (the rules in `validate`).
    pub(crate) fn needs(&self, is_set: &dyn Fn(&str) -> bool) -> Needs {
        let dedupe = self.sink == SinkKind::File && is_set("dedupe_window");
        Needs {
            claim_idle_below: dedupe.then(|| (self.dedupe_window(), "dedupe_window")),
            ..batch_wait::needs(self.max_wait, is_set)
        }
    }

    /// `max_wait` and `dedupe_window` left out follow the group's limits (the rules in
    /// `validate`).
    pub(crate) fn derive(
        &mut self,
        limits: &Limits,
        is_set: &dyn Fn(&str) -> bool,
    ) -> Vec<Derived> {
        let mut derived: Vec<Derived> = batch_wait::derive(&mut self.max_wait, limits, is_set)
            .into_iter()
            .collect();
        if self.sink == SinkKind::File
            && !is_set("dedupe_window")
            && self.dedupe_window() <= limits.claim_idle
        {
            self.dedupe_window = Some(limits.claim_idle.saturating_mul(2));
            derived.push(Derived::new("dedupe_window", "claim_idle"));
        }
        derived
    }

    pub(crate) fn validate(&self, limits: &Limits) -> Vec<OptionProblem> {
        let mut problems = Vec::new();
        let mut problem = |key: &str, message: String| {
            problems.push(OptionProblem {
                key: key.to_owned(),
                message,
            })
        };
        let human = crate::duration::format;
        if !(1..=100_000).contains(&self.batch_size) {
            problem(
                "batch_size",
                format!("= {}: must be between 1 and 100000", self.batch_size),
            );
        }
        if let Some(p) = batch_wait::check(self.max_wait, limits) {
            problem(&p.key, p.message);
        }
        if self.event_type.trim().is_empty() {
            problem(
                "event_type",
                "is empty: name the field (or JSON path) holding the event type, e.g. \"event_type\"".into(),
            );
        }
        for (key, sink) in self.foreign_keys() {
            problem(
                key,
                format!(
                    "applies to sink = \"{}\" only (this group has sink = \"{}\"): remove it",
                    sink.name(),
                    self.sink.name()
                ),
            );
        }
        match self.sink {
            SinkKind::File => {
                if self.directory().as_os_str().is_empty() {
                    problem(
                        "directory",
                        "is empty: set the directory the files are written to".into(),
                    );
                }
                if self.rotate_bytes() == 0 {
                    problem("rotate_bytes", "= 0: must be greater than zero".into());
                }
                if self.rotate_interval().is_zero() {
                    problem("rotate_interval", "must be greater than zero".into());
                }
                if self.dedupe_window() <= limits.claim_idle {
                    problem(
                        "dedupe_window",
                        format!(
                            "= \"{}\": must exceed the group's claim_idle ({}), or a redelivered entry finds its marker gone and is written twice",
                            human(self.dedupe_window()),
                            human(limits.claim_idle)
                        ),
                    );
                }
            }
            SinkKind::Postgres => {
                match self.url.as_deref() {
                    None | Some("") => problem(
                        "url",
                        "is missing: set the PostgreSQL server, e.g. url = \"postgres://streamworker:…@db:5432/events\"".into(),
                    ),
                    Some(url) => {
                        if let Err(message) = postgres::parse_url(url) {
                            problem("url", format!("= {:?}: {message}", postgres::redact_url(url)));
                        }
                    }
                }
                if let Err(message) = postgres::check_table_name(self.table()) {
                    problem("table", format!("= {:?}: {message}", self.table()));
                }
            }
        }
        problems
    }

    /// A copy safe to print, with the chosen sink's defaults filled in.
    pub(crate) fn redacted(&self) -> Self {
        let mut out = self.clone();
        match self.sink {
            SinkKind::File => {
                out.directory = Some(self.directory());
                out.rotate_bytes = Some(self.rotate_bytes());
                out.rotate_interval = Some(self.rotate_interval());
                out.dedupe_window = Some(self.dedupe_window());
            }
            SinkKind::Postgres => {
                out.table = Some(self.table().to_owned());
            }
        }
        out.url = self.url.as_deref().map(postgres::redact_url);
        out
    }
}

/// What the runtime knows about the group that the options do not say.
pub struct Context {
    pub stream: String,
    pub group: String,
    /// This replica's consumer name: file names carry it, so replicas sharing a volume
    /// never write the same file.
    pub consumer: String,
    pub concurrency: usize,
    pub store: Arc<dyn Store>,
}

#[derive(Debug, thiserror::Error)]
#[error("warehouse: {0}")]
pub struct WarehouseBuildError(String);

/// The warehouse handler of one group.
pub struct Warehouse {
    sink: Sink,
    batching: Batching,
}

enum Sink {
    File(file::FileSink),
    Postgres(Box<postgres::PostgresSink>),
}

impl Warehouse {
    pub fn new(options: &WarehouseOptions, context: Context) -> Result<Self, WarehouseBuildError> {
        // The runtime fetches at most `concurrency` entries, batched ones included: a batch
        // can never be larger, and would only start on `max_wait`.
        let max_entries = options.batch_size.min(context.concurrency.max(1));
        if max_entries < options.batch_size {
            tracing::warn!(
                stream = %context.stream, group = %context.group,
                batch_size = options.batch_size, concurrency = context.concurrency,
                "warehouse batches are capped by the group's concurrency; set concurrency to at least batch_size (2 × batch_size lets a batch fill while another commits)"
            );
        }
        let recorder = Recorder {
            event_type: options.event_type.clone(),
        };
        let sink = match options.sink {
            SinkKind::File => Sink::File(
                file::FileSink::new(options, &context, recorder)
                    .map_err(|e| WarehouseBuildError(e.to_string()))?,
            ),
            SinkKind::Postgres => Sink::Postgres(Box::new(
                postgres::PostgresSink::new(options, &context, recorder)
                    .map_err(WarehouseBuildError)?,
            )),
        };
        Ok(Self {
            sink,
            batching: Batching {
                max_entries,
                max_wait: options.max_wait,
            },
        })
    }
}

impl Handler for Warehouse {
    async fn handle(&self, entry: &Entry) -> Result<Effects, HandlerError> {
        self.handle_batch(std::slice::from_ref(entry))
            .await
            .pop()
            .unwrap_or_else(|| Err(HandlerError::retry("warehouse: no result for the entry")))
    }

    fn batching(&self) -> Option<Batching> {
        Some(self.batching)
    }

    async fn handle_batch(&self, entries: &[Entry]) -> Vec<Result<Effects, HandlerError>> {
        match &self.sink {
            Sink::File(sink) => sink.write_batch(entries).await,
            Sink::Postgres(sink) => sink.write_batch(entries).await,
        }
    }
}

/// Turns entries into what the sinks store; shared so both store the same thing.
#[derive(Debug, Clone)]
pub(crate) struct Recorder {
    event_type: String,
}

impl Recorder {
    /// The entry's event type, if it has one.
    pub(crate) fn event_type<'e>(&self, entry: &'e Entry) -> Option<Cow<'e, str>> {
        entry.get(&self.event_type)
    }

    /// One JSON Lines record: `{"stream","id","time","event_type","delivery_count",
    /// ["replay_id",] "payload"}`.
    pub(crate) fn line(&self, entry: &Entry, out: &mut Vec<u8>) -> serde_json::Result<()> {
        serde_json::to_writer(
            &mut *out,
            &Line {
                entry,
                event_type: self.event_type(entry),
            },
        )?;
        out.push(b'\n');
        Ok(())
    }
}

/// An entry's time as RFC 3339 with milliseconds (ids have millisecond resolution).
pub(crate) fn rfc3339(id: EntryId) -> String {
    humantime::format_rfc3339_millis(id.time()).to_string()
}

/// The fields `dlq replay` adds; a replay is stored as the event it replays.
fn is_replay_field(name: &[u8]) -> bool {
    name == REPLAY_OF_FIELD.as_bytes() || name == REPLAY_GROUP_FIELD.as_bytes()
}

/// The payload as JSON: the decoded document, or the fields as an object (first of a
/// repeated name wins, as [`Entry::field`] reads them; invalid UTF-8 replaced).
pub(crate) struct PayloadJson<'a>(pub &'a Entry);

impl Serialize for PayloadJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let entry = self.0;
        match &entry.payload {
            Payload::Json(doc) => doc.serialize(s),
            Payload::Fields => {
                let fields = &entry.fields;
                let mut map = s.serialize_map(None)?;
                for (i, (name, value)) in fields.iter().enumerate() {
                    if is_replay_field(name) || fields[..i].iter().any(|(n, _)| n == name) {
                        continue;
                    }
                    map.serialize_entry(
                        &String::from_utf8_lossy(name),
                        &String::from_utf8_lossy(value),
                    )?;
                }
                map.end()
            }
        }
    }
}

struct Line<'a> {
    entry: &'a Entry,
    event_type: Option<Cow<'a, str>>,
}

impl Serialize for Line<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let e = self.entry;
        let id = e.idempotency_id();
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("stream", e.stream())?;
        map.serialize_entry("id", &id)?;
        map.serialize_entry("time", &rfc3339(id))?;
        map.serialize_entry("event_type", &self.event_type)?;
        map.serialize_entry("delivery_count", &e.delivery_count)?;
        if id != e.id {
            map.serialize_entry("replay_id", &e.id)?;
        }
        map.serialize_entry("payload", &PayloadJson(e))?;
        map.end()
    }
}

/// Marks entries whose id appeared earlier in the same batch (a replay next to its
/// original): they are stored once.
pub(crate) fn duplicates_in_batch(ids: &[EntryId]) -> Vec<bool> {
    let mut seen = std::collections::HashSet::with_capacity(ids.len());
    ids.iter().map(|id| !seen.insert(*id)).collect()
}

pub(crate) fn duplicate_in_batch(id: EntryId) -> HandlerError {
    HandlerError::drop_entry(format!(
        "duplicate: entry {id} appears twice in the batch and is stored once"
    ))
}

pub(crate) fn already_stored(id: EntryId) -> HandlerError {
    HandlerError::drop_entry(format!("duplicate: entry {id} is already stored"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PayloadFormat;

    pub(crate) fn entry(id: EntryId, fields: &[(&str, &str)], format: &PayloadFormat) -> Entry {
        Entry::for_test("ml_events", "warehouse", id, 1, fields, format)
    }

    fn limits() -> Limits {
        Limits {
            handler_timeout: Duration::from_secs(30),
            claim_idle: Duration::from_secs(120),
        }
    }

    fn line(recorder: &Recorder, e: &Entry) -> String {
        let mut out = Vec::new();
        recorder.line(e, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn lines_for_flat_fields() {
        let r = Recorder {
            event_type: "event_type".into(),
        };
        let e = entry(
            EntryId::new(1_700_000_000_123, 4),
            &[
                ("user_id", "42"),
                ("event_type", "prompt"),
                ("user_id", "x"),
            ],
            &PayloadFormat::Fields,
        );
        assert_eq!(
            line(&r, &e),
            "{\"stream\":\"ml_events\",\"id\":\"1700000000123-4\",\"time\":\"2023-11-14T22:13:20.123Z\",\"event_type\":\"prompt\",\"delivery_count\":1,\"payload\":{\"user_id\":\"42\",\"event_type\":\"prompt\"}}\n"
        );
    }

    #[test]
    fn lines_for_json_documents_and_replays() {
        let r = Recorder {
            event_type: "data.kind".into(),
        };
        let e = entry(
            EntryId::new(1_700_000_000_000, 0),
            &[
                ("event", r#"{"data":{"kind":"llm_call","tokens":3}}"#),
                (REPLAY_OF_FIELD, "1600000000000-1"),
                (REPLAY_GROUP_FIELD, "warehouse"),
            ],
            &PayloadFormat::Json("event".into()),
        );
        assert_eq!(
            line(&r, &e),
            "{\"stream\":\"ml_events\",\"id\":\"1600000000000-1\",\"time\":\"2020-09-13T12:26:40.000Z\",\"event_type\":\"llm_call\",\"delivery_count\":1,\"replay_id\":\"1700000000000-0\",\"payload\":{\"data\":{\"kind\":\"llm_call\",\"tokens\":3}}}\n"
        );
        let missing = Recorder {
            event_type: "nope".into(),
        };
        assert!(line(&missing, &e).contains("\"event_type\":null"));
    }

    #[test]
    fn replay_fields_are_not_payload() {
        let e = entry(
            EntryId::new(5, 0),
            &[
                ("a", "1"),
                (REPLAY_OF_FIELD, "1-0"),
                (REPLAY_GROUP_FIELD, "g"),
            ],
            &PayloadFormat::Fields,
        );
        assert_eq!(
            serde_json::to_string(&PayloadJson(&e)).unwrap(),
            r#"{"a":"1"}"#
        );
    }

    #[test]
    fn duplicates_within_a_batch_are_found() {
        let a = EntryId::new(1, 0);
        let b = EntryId::new(2, 0);
        assert_eq!(
            duplicates_in_batch(&[a, b, a, b, a]),
            vec![false, false, true, true, true]
        );
    }

    #[test]
    fn defaults_validate() {
        assert!(WarehouseOptions::default().validate(&limits()).is_empty());
        let pg = WarehouseOptions {
            sink: SinkKind::Postgres,
            url: Some("postgres://u:pw@127.0.0.1:5432/db".into()),
            ..Default::default()
        };
        assert!(
            pg.validate(&limits()).is_empty(),
            "{:?}",
            pg.validate(&limits())
        );
    }

    #[test]
    fn batches_must_fit_in_claim_idle() {
        let o = WarehouseOptions {
            max_wait: Duration::from_secs(5),
            ..Default::default()
        };
        let tight = Limits {
            handler_timeout: Duration::from_secs(30),
            claim_idle: Duration::from_secs(35),
        };
        let problems = o.validate(&tight);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].key, "max_wait");
        assert!(
            problems[0].message.contains("claim_idle (35s)"),
            "{problems:?}"
        );
    }

    #[test]
    fn sink_options_only_with_their_sink() {
        let file_with_pg = WarehouseOptions {
            url: Some("postgres://x/y".into()),
            table: Some("t".into()),
            ..Default::default()
        };
        let keys: Vec<String> = file_with_pg
            .validate(&limits())
            .into_iter()
            .map(|p| p.key)
            .collect();
        assert_eq!(keys, ["url", "table"]);
        let pg_with_file = WarehouseOptions {
            sink: SinkKind::Postgres,
            url: Some("postgres://x/y".into()),
            directory: Some("d".into()),
            rotate_bytes: Some(10),
            ..Default::default()
        };
        let problems = pg_with_file.validate(&limits());
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["directory", "rotate_bytes"]);
        assert!(problems[0].message.contains("sink = \"file\" only"));
    }

    #[test]
    fn sink_specific_checks() {
        let o = WarehouseOptions {
            rotate_bytes: Some(0),
            dedupe_window: Some(Duration::from_secs(60)),
            ..Default::default()
        };
        let keys: Vec<String> = o.validate(&limits()).into_iter().map(|p| p.key).collect();
        assert_eq!(keys, ["rotate_bytes", "dedupe_window"]);
        let pg = WarehouseOptions {
            sink: SinkKind::Postgres,
            table: Some("Bad-Name".into()),
            ..Default::default()
        };
        let keys: Vec<String> = pg.validate(&limits()).into_iter().map(|p| p.key).collect();
        assert_eq!(keys, ["url", "table"]);
        let tls = WarehouseOptions {
            sink: SinkKind::Postgres,
            url: Some("postgres://u:secret@h/db?sslmode=require".into()),
            ..Default::default()
        };
        assert!(
            tls.validate(&limits()).is_empty(),
            "{:?}",
            tls.validate(&limits())
        );
        let no_ca = WarehouseOptions {
            sink: SinkKind::Postgres,
            url: Some("postgres://u:secret@h/db?sslmode=verify-full".into()),
            ..Default::default()
        };
        let problems = no_ca.validate(&limits());
        assert_eq!(problems[0].key, "url");
        assert!(problems[0].message.contains("sslrootcert="), "{problems:?}");
        assert!(!problems[0].message.contains("secret"), "{problems:?}");
        let missing_ca = WarehouseOptions {
            sink: SinkKind::Postgres,
            url: Some("postgres://h/db?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        let problems = missing_ca.validate(&limits());
        assert_eq!(problems[0].key, "url");
        assert!(
            problems[0].message.contains("/nonexistent/ca.pem"),
            "{problems:?}"
        );
    }

    #[test]
    fn redaction_hides_the_password_and_shows_defaults() {
        let pg = WarehouseOptions {
            sink: SinkKind::Postgres,
            url: Some("postgres://u:s3cret@h:5432/db".into()),
            ..Default::default()
        };
        let r = pg.redacted();
        assert!(!format!("{r:?}").contains("s3cret"));
        assert_eq!(r.table.as_deref(), Some(DEFAULT_TABLE));
        assert_eq!(r.directory, None);
        let file = WarehouseOptions::default().redacted();
        assert_eq!(file.rotate_bytes, Some(DEFAULT_ROTATE_BYTES));
        assert_eq!(file.url, None);
    }

    #[test]
    fn options_parse_from_toml() {
        let o: WarehouseOptions = toml_like(
            r#"{"sink":"postgres","url":"postgres://h/db","batch_size":100,"max_wait":"250ms"}"#,
        );
        assert_eq!(o.sink, SinkKind::Postgres);
        assert_eq!(o.batch_size, 100);
        assert_eq!(o.max_wait, Duration::from_millis(250));
        let o: WarehouseOptions = toml_like(r#"{"rotate_interval":"10m"}"#);
        assert_eq!(o.rotate_interval(), Duration::from_secs(600));
        assert_eq!(o.rotate_bytes(), DEFAULT_ROTATE_BYTES);
        assert!(serde_json::from_str::<WarehouseOptions>(r#"{"sink":"s3"}"#).is_err());
        assert!(serde_json::from_str::<WarehouseOptions>(r#"{"nope":1}"#).is_err());
    }

    fn toml_like(json: &str) -> WarehouseOptions {
        serde_json::from_str(json).unwrap()
    }
}
