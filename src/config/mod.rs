//! The configuration of DESIGN §2: types, defaults, loading (`load`), the rules `check`
//! enforces (`validate`) and the redacted view it prints.
//!
//! Every group is a table keyed by its consumer group's name, as Vector keys its
//! components; each component's settings are a struct with `deny_unknown_fields`, checked
//! when the file is loaded rather than when the group first runs.

mod kinds;
mod load;
#[cfg(test)]
mod proptests;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use streamworker_handlers::{EntryId, PayloadFormat};

pub(crate) use kinds::OptionKinds;
pub use kinds::{HandlerSpec, names as handler_kinds};
pub use load::{ConfigError, Problem, load, load_with_env};

/// The prefix of environment variables that override configuration keys, with `__`
/// between levels: `STREAMWORKER__GROUPS__ANALYTICS__CONCURRENCY=128`.
pub const ENV_PREFIX: &str = "STREAMWORKER";
pub const ENV_SEPARATOR: &str = "__";

/// A whole, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from, for messages.
    pub path: PathBuf,
    pub redis: RedisConfig,
    pub worker: WorkerConfig,
    pub http: HttpConfig,
    pub telemetry: TelemetryConfig,
    pub streams: BTreeMap<String, StreamConfig>,
    pub groups: BTreeMap<String, GroupConfig>,
    /// Keys left out whose default would have broken a rule against a key that was set,
    /// and that took a value derived from it instead: dotted key → the key it follows
    /// (`groups.g.retry_backoff.max` → `claim_idle`). `check` marks them.
    pub derived: BTreeMap<String, String>,
}

/// `[redis]`: where the streams live. One of `url` (a single server), `cluster` (Redis
/// Cluster) or `sentinel` (a primary followed through Sentinel).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port/db`, `rediss://` for TLS, `redis+unix:///path`.
    pub url: String,
    /// Redis Cluster: some node URLs (`redis://[user:password@]host:port`, `rediss://` for
    /// TLS); the rest of the cluster is discovered.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cluster: Vec<String>,
    /// Redis Sentinel: the primary's name and some sentinel URLs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sentinel: Option<SentinelConfig>,
    /// Read the password from this file instead of putting it in the URL (for Sentinel:
    /// the primary's password).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Certificates for `rediss://`: a CA to trust instead of the system's, and a client
    /// certificate for servers that require one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// How long a command (acknowledgements, claims, scripts) may wait for its reply before
    /// the connection is considered broken. Blocking reads get `block` plus this.
    #[serde(with = "streamworker_handlers::duration")]
    pub command_timeout: Duration,
    /// How long establishing a connection may take.
    #[serde(with = "streamworker_handlers::duration")]
    pub connect_timeout: Duration,
}

/// `[redis] sentinel = { master = "mymaster", nodes = ["redis://s1:26379", …] }`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SentinelConfig {
    /// The name the sentinels monitor the primary under.
    pub master: String,
    /// Sentinel URLs (`redis://[user:password@]host:port`, their own credentials).
    pub nodes: Vec<String>,
    /// The primary's ACL user (its password: `redis.password_file`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// The primary's database number.
    pub db: i64,
}

/// `[redis] tls = { ca_file = "…", cert_file = "…", key_file = "…" }` (PEM files).
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Trust this CA instead of the system's roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// A client certificate and its key, for servers started with `tls-auth-clients yes`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: DEFAULT_REDIS_URL.into(),
            cluster: Vec::new(),
            sentinel: None,
            tls: None,
            password_file: None,
            command_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// `[worker]`: settings of this process, shared by its groups.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// The consumer name in every group; `{hostname}` and `{pid}` are expanded. Two live
    /// processes never share a name: each holds a lease on it.
    pub consumer: String,
    /// How long in-flight handlers get to finish after SIGTERM.
    #[serde(with = "streamworker_handlers::duration")]
    pub shutdown_timeout: Duration,
    /// How often each group looks for idle entries to reclaim.
    #[serde(with = "streamworker_handlers::duration")]
    pub claim_interval: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            consumer: "{hostname}-{pid}".into(),
            shutdown_timeout: Duration::from_secs(30),
            claim_interval: Duration::from_secs(1),
        }
    }
}

impl WorkerConfig {
    /// The consumer name with `{hostname}` and `{pid}` filled in.
    pub fn consumer_name(&self) -> String {
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        self.consumer
            .replace("{hostname}", &host)
            .replace("{pid}", &std::process::id().to_string())
    }
}

/// `[http]`: the listener for `/metrics`, `/livez` and `/readyz`, and the web console.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// `host:port`; an empty string turns the listener off.
    pub listen: String,
    /// Serve the web console at `/` (off by default: it shows entry fields).
    pub console: bool,
    /// A file holding the bearer token the console's actions (replay, purge, pause,
    /// resume) require; without it the console is read-only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub console_token_file: Option<PathBuf>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:9464".into(),
            console: false,
            console_token_file: None,
        }
    }
}

/// `[telemetry]`: logs and traces.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    pub log_format: LogFormat,
    /// OTLP/HTTP endpoint for traces, e.g. `http://otel-collector:4318` (`/v1/traces` is
    /// appended); empty = off unless `OTEL_EXPORTER_OTLP_ENDPOINT` or
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set.
    pub otlp_endpoint: String,
    /// `service.name` of the traces (`OTEL_SERVICE_NAME` wins when set).
    pub service_name: String,
    /// Extra resource attributes, e.g. `{ "deployment.environment" = "prod" }`
    /// (`OTEL_RESOURCE_ATTRIBUTES` adds more).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub resource_attributes: BTreeMap<String, String>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Json,
            otlp_endpoint: String::new(),
            service_name: "streamworker".into(),
            resource_attributes: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One JSON object a line: for log collectors.
    Json,
    /// Coloured, multi-field lines: for a terminal.
    Pretty,
}

/// `[streams.<name>]`: per-stream settings.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retention>,
}

/// Trim entries every group on the stream has acknowledged, beyond a length or an age.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retention {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_len: Option<u64>,
    #[serde(
        with = "streamworker_handlers::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_age: Option<Duration>,
}

/// Where a newly created group starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartId {
    /// `"0"`: everything already in the stream.
    Beginning,
    /// `"$"`: only entries added from now on.
    End,
    /// An explicit id: entries after it.
    After(EntryId),
}

impl StartId {
    pub fn as_arg(&self) -> String {
        match self {
            Self::Beginning => "0".into(),
            Self::End => "$".into(),
            Self::After(id) => id.to_string(),
        }
    }
}

impl Serialize for StartId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.as_arg())
    }
}

impl<'de> Deserialize<'de> for StartId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "0" | "0-0" => Ok(Self::Beginning),
            "$" => Ok(Self::End),
            other => other.parse().map(Self::After).map_err(|_| {
                serde::de::Error::custom(format!(
                    "`{other}` is not a start id: use \"0\" (everything in the stream), \"$\" (only new entries) or an entry id"
                ))
            }),
        }
    }
}

/// Exponential backoff between attempts of a failing entry. Jitter only adds.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryBackoff {
    #[serde(with = "streamworker_handlers::duration")]
    pub initial: Duration,
    #[serde(with = "streamworker_handlers::duration")]
    pub max: Duration,
    pub multiplier: f64,
    /// Up to this fraction of the delay is added at random (0.2 = up to 20 % longer).
    pub jitter: f64,
}

impl Default for RetryBackoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

/// Pauses a group whose downstream is failing, so an outage does not burn every entry's
/// attempts (DESIGN §3, downstream outages). See `circuit.rs` for the rule.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitBreakerConfig {
    /// Retryable failures (errors, timeouts, panics, webhook 429/5xx) among the last
    /// `window` results that open the circuit; 0 turns the breaker off. Failures of
    /// entries that already failed before (retries) are not counted.
    pub threshold: u32,
    /// How many of the latest results are judged; twice `threshold` unless set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<u32>,
    /// How long an open circuit stops reading before one entry probes the downstream.
    #[serde(with = "streamworker_handlers::duration")]
    pub pause: Duration,
}

impl CircuitBreakerConfig {
    /// `window`, or twice `threshold` when not set.
    pub fn window(&self) -> u32 {
        self.window
            .unwrap_or_else(|| self.threshold.saturating_mul(2))
            .max(self.threshold)
    }
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        Self {
            threshold: 10,
            window: None,
            pause: Duration::from_secs(5),
        }
    }
}

/// `[groups.<name>]` without `handler` and `options`, which `HandlerSpec` owns.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GroupSettings {
    /// `false`: `run` skips the group (`check` still checks it).
    pub enabled: bool,
    pub stream: String,
    pub start_id: StartId,
    pub concurrency: usize,
    pub batch_size: usize,
    #[serde(with = "streamworker_handlers::duration")]
    pub block: Duration,
    #[serde(with = "streamworker_handlers::duration")]
    pub handler_timeout: Duration,
    pub max_deliveries: u64,
    pub retry_backoff: RetryBackoff,
    #[serde(with = "streamworker_handlers::duration")]
    pub claim_idle: Duration,
    #[serde(with = "streamworker_handlers::duration")]
    pub consumer_ttl: Duration,
    /// Defaults to `{<stream>}:dlq:<group>`, in the stream's hash slot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letter_stream: Option<String>,
    pub payload: PayloadFormat,
    pub circuit_breaker: CircuitBreakerConfig,
    /// Splits the group's stream into this many partition streams (`<stream>:p<n>`), each
    /// run by one replica at a time (`crate::partition`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partitions: Option<u32>,
    /// How long a replica's hold on a partition lives without renewal; defaults to
    /// [`crate::partition::DEFAULT_LEASE`] or three handler timeouts, the longer.
    #[serde(
        with = "streamworker_handlers::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub partition_lease: Option<Duration>,
    /// Per-key order: entries with the same value of this field are handled one at a
    /// time, in id order, even across retries (`src/consumer/order.rs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_by: Option<String>,
}

impl Default for GroupSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            stream: String::new(),
            start_id: StartId::Beginning,
            concurrency: 64,
            batch_size: 256,
            block: Duration::from_secs(2),
            handler_timeout: Duration::from_secs(30),
            max_deliveries: 5,
            retry_backoff: RetryBackoff::default(),
            claim_idle: Duration::from_secs(120),
            consumer_ttl: Duration::from_secs(3600),
            dead_letter_stream: None,
            payload: PayloadFormat::Fields,
            circuit_breaker: CircuitBreakerConfig::default(),
            partitions: None,
            partition_lease: None,
            order_by: None,
        }
    }
}

/// One consumer group: its name, its settings and its handler.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupConfig {
    pub name: String,
    pub settings: GroupSettings,
    pub handler: HandlerSpec,
}

impl GroupConfig {
    /// The dead-letter stream: configured, or `{<stream>}:dlq:<group>`.
    pub fn dead_letter_stream(&self) -> String {
        self.settings.dead_letter_stream.clone().unwrap_or_else(|| {
            crate::dead_letter::default_stream(&self.settings.stream, &self.name)
        })
    }
}

impl GroupConfig {
    /// A partitioned group's dead-letter streams, one per partition, as the first and the
    /// last (`{orders:p0}:dlq:billing … {orders:p3}:dlq:billing`), for messages; a group of
    /// 1024 partitions would not fit a line if each were named.
    pub fn partition_dead_letter_streams(&self, partitions: u32) -> String {
        let dlq = |p| {
            crate::dead_letter::default_stream(
                &crate::partition::partition_stream(&self.stream, p),
                &self.name,
            )
        };
        match partitions {
            0 | 1 => dlq(0),
            n => format!("{} … {}", dlq(0), dlq(n - 1)),
        }
    }

    /// The partition lease: configured, or the default for this group's handler timeout.
    pub fn partition_lease(&self) -> Duration {
        self.settings
            .partition_lease
            .unwrap_or_else(|| crate::partition::default_lease(self.handler_timeout))
    }
}

impl std::ops::Deref for GroupConfig {
    type Target = GroupSettings;
    fn deref(&self) -> &GroupSettings {
        &self.settings
    }
}

/// `redis.url` when nothing else is said.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/0";

impl Config {
    /// Who in this configuration says how many partitions the stream `stream` has, and how
    /// many: each group reading it partitioned (`groups.<name>.partitions`) and each forward
    /// fanning out into it (`groups.<name>.options.partitions` with `partition_by`), as
    /// (key, count). `check` refuses counts that disagree: a key's partition is
    /// `crc32(key) % partitions`, so writers and readers must share one count.
    pub fn partition_counts(&self, stream: &str) -> Vec<(String, u32)> {
        let mut counts = Vec::new();
        for (name, g) in &self.groups {
            if let (Some(n), true) = (g.partitions, g.stream == stream) {
                counts.push((format!("groups.{name}.partitions"), n));
            }
            if let Some(f) = g
                .handler
                .options::<streamworker_handlers::forward::ForwardOptions>()
                .filter(|f| f.to == stream && f.partition_by.is_some())
                && let Some(n) = f.partitions
            {
                counts.push((format!("groups.{name}.options.partitions"), n));
            }
        }
        counts
    }

    /// How many partitions the stream `stream` has by this configuration, if it is
    /// partitioned here (read by a partitioned group, or a forward's partitioned target).
    pub fn partitions_of(&self, stream: &str) -> Option<u32> {
        self.partition_counts(stream).first().map(|(_, n)| *n)
    }

    /// The resolved configuration as TOML, every secret replaced by `<redacted>`.
    pub fn to_redacted_toml(&self) -> String {
        #[derive(Serialize)]
        struct View<'a> {
            redis: RedisConfig,
            worker: &'a WorkerConfig,
            http: &'a HttpConfig,
            telemetry: &'a TelemetryConfig,
            #[serde(skip_serializing_if = "BTreeMap::is_empty")]
            streams: &'a BTreeMap<String, StreamConfig>,
            groups: BTreeMap<&'a str, toml::Table>,
        }
        let mut redis = self.redis.clone();
        redis.url = redact_url(&redis.url);
        redis.cluster = redis.cluster.iter().map(|u| redact_url(u)).collect();
        if let Some(s) = redis.sentinel.as_mut() {
            s.nodes = s.nodes.iter().map(|u| redact_url(u)).collect();
        }

        let groups = self
            .groups
            .iter()
            .map(|(name, g)| {
                let mut table = toml::Table::try_from(&g.settings).expect("settings serialize");
                // A partitioned group has no one dead-letter stream (each partition has its
                // own, named in the note on `partitions`), and `check` refuses an explicit
                // one on it: printing one would be untrue and would not load again.
                if g.partitions.is_none() {
                    table.insert(
                        "dead_letter_stream".into(),
                        toml::Value::String(g.dead_letter_stream()),
                    );
                }
                let handler = g.handler.redacted_table();
                table.extend(handler);
                (name.as_str(), table)
            })
            .collect();
        let view = View {
            redis,
            worker: &self.worker,
            http: &self.http,
            telemetry: &self.telemetry,
            streams: &self.streams,
            groups,
        };
        let text = toml::to_string_pretty(&view).expect("configuration serializes to TOML");
        let mut notes: BTreeMap<String, String> = self
            .derived
            .iter()
            .map(|(key, from)| (key.clone(), format!("derived from {from}")))
            .collect();
        for (name, g) in &self.groups {
            if let Some(n) = g.partitions {
                let last = n.saturating_sub(1);
                notes.insert(
                    format!("groups.{name}.partitions"),
                    format!(
                        "partition of a key: {}; streams {} … {}; dead letters {}",
                        crate::partition::PARTITION_FUNCTION,
                        crate::partition::partition_stream(&g.stream, 0),
                        crate::partition::partition_stream(&g.stream, last),
                        g.partition_dead_letter_streams(n)
                    ),
                );
            }
        }
        mark_derived(&text, &notes)
    }
}

/// Appends `# derived from <key>` to the line of each derived key in `check`'s TOML (and
/// `# partition of a key: …` to a group's `partitions`), so the output stays valid TOML
/// (and loads to the same values) while saying which values nobody wrote. `notes` maps a
/// dotted key to its comment.
fn mark_derived(text: &str, notes: &BTreeMap<String, String>) -> String {
    let derived = notes;
    if derived.is_empty() {
        return text.to_owned();
    }
    // Each line is read with the TOML parser itself, so quoted names (`[groups."a.b"]`)
    // come out as the loader's keys.
    let parse = |line: &str| toml::from_str::<toml::Table>(line).ok();
    let mut table: Option<Vec<String>> = Some(Vec::new());
    let mut out: Vec<String> = Vec::new();
    for line in text.lines() {
        let mut line = line.to_owned();
        if line.starts_with("[[") {
            // Arrays of tables (alert rules) hold nothing derived.
            table = None;
        } else if line.starts_with('[') {
            table = parse(&line).map(|mut t| {
                let mut path = Vec::new();
                while t.len() == 1 {
                    let (key, value) = t.into_iter().next().expect("one key");
                    path.push(key);
                    match value {
                        toml::Value::Table(inner) => t = inner,
                        _ => break,
                    }
                }
                path
            });
        } else if let Some(path) = &table
            && let Some(parsed) = parse(&line)
            && parsed.len() == 1
            && let Some(key) = parsed.keys().next()
        {
            let full = path
                .iter()
                .chain([key])
                .cloned()
                .collect::<Vec<_>>()
                .join(".");
            if let Some(note) = derived.get(&full) {
                line.push_str(&format!(" # {note}"));
            }
        }
        out.push(line);
    }
    let mut marked = out.join("\n");
    if text.ends_with('\n') {
        marked.push('\n');
    }
    marked
}

/// Hides the password in a `redis://user:password@host` URL (and query parameters named
/// like secrets): the one redaction every crate uses.
pub use streamworker_handlers::redact::redact_url;

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Json => "json",
            Self::Pretty => "pretty",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_passwords() {
        assert_eq!(
            redact_url("redis://:hunter2@redis:6379/0"),
            "redis://:<redacted>@redis:6379/0"
        );
        assert_eq!(
            redact_url("rediss://app:p@ss@redis:6380"),
            "rediss://app:<redacted>@redis:6380"
        );
        assert_eq!(redact_url("redis://redis:6379/0"), "redis://redis:6379/0");
        assert_eq!(redact_url("redis://tok@redis"), "redis://<redacted>@redis");
    }
}
