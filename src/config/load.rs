//! Reading a configuration: the TOML file, then `STREAMWORKER__…` environment overrides
//! (and nothing else from the environment), then every rule, reporting every problem at
//! once with the file or variable, the key and the value at fault.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use config::{File, FileFormat, Source, Value, ValueKind};
use serde::de::DeserializeOwned;
use streamworker_handlers::noop::NoopOptions;

use super::HandlerSpec;

use super::validate::Explicit;
use super::{
    Config, ENV_PREFIX, ENV_SEPARATOR, GroupConfig, GroupSettings, HttpConfig, RedisConfig,
    StreamConfig, TelemetryConfig, WorkerConfig,
};

/// One thing wrong with a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where the bad value came from: the file's path or an environment variable's name.
    pub source: String,
    /// The dotted key, e.g. `groups.analytics.block`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            return write!(f, "{}: {}", self.source, self.message);
        }
        // Messages that start with the value or a parenthesis read on from the key:
        // `groups.c.block = "2 parsecs": …`, `groups.c.claim_idle (10s) must be …`.
        let joiner = if self.message.starts_with(['=', '(', '×']) {
            " "
        } else {
            ": "
        };
        write!(f, "{}: {}{joiner}{}", self.source, self.key, self.message)
    }
}

/// Why a configuration could not be used. Exits with code 2.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {path}: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error("{}", render(.path, .problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

fn render(path: &Path, problems: &[Problem]) -> String {
    let mut text = format!(
        "{} has {} problem{}:",
        path.display(),
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    for p in problems {
        text.push_str("\n  - ");
        text.push_str(&p.to_string());
    }
    text
}

impl ConfigError {
    pub fn problems(&self) -> &[Problem] {
        match self {
            Self::Invalid { problems, .. } => problems,
            Self::Unreadable { .. } => &[],
        }
    }
}

/// Loads `path` with overrides from this process's environment.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    load_with_env(path, std::env::vars().collect())
}

/// Loads `path` with overrides from `env` (tests pass their own).
pub fn load_with_env(path: &Path, env: HashMap<String, String>) -> Result<Config, ConfigError> {
    if let Err(e) = std::fs::metadata(path) {
        return Err(ConfigError::Unreadable {
            path: path.to_owned(),
            reason: format!("{e}; pass the path of a TOML file with -c (examples in config/)"),
        });
    }
    let prefix = format!("{ENV_PREFIX}{ENV_SEPARATOR}");
    // Sorted, so that problems and the order overrides apply in do not depend on the
    // process's environment order.
    let overrides: BTreeMap<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(&prefix))
        .collect();
    let mut report = Report {
        file: path.display().to_string(),
        env: Vec::new(),
        problems: Vec::new(),
    };
    let built = config::Config::builder()
        .add_source(File::from(path).format(FileFormat::Toml).required(true))
        .build()
        .and_then(|b| b.collect());
    let mut root = match built {
        Ok(b) => b,
        Err(e) => {
            report.problems.push(Problem {
                source: report.file.clone(),
                key: String::new(),
                // The parser quotes the offending line, which may hold a credential.
                message: format!(
                    "is not valid TOML: {}",
                    streamworker_handlers::redact::redact_text(&e.to_string())
                ),
            });
            return Err(report.into_error(path));
        }
    };

    for (var, value) in overrides {
        match apply_override(&mut root, &var[prefix.len()..], &var, value) {
            Ok(key) => report.env.push((key, var)),
            Err(message) => report.problems.push(Problem {
                source: format!("environment variable {var}"),
                key: String::new(),
                message,
            }),
        }
    }
    let mut explicit = Explicit::default();
    record_keys(&root, "", &mut explicit);

    for key in root.keys() {
        if !["redis", "worker", "http", "telemetry", "streams", "groups"].contains(&key.as_str()) {
            report.push(
                // A problem without a key reads as one about the whole file.
                if key.is_empty() { "\"\"" } else { key },
                "unknown section; expected one of: redis, worker, http, telemetry, streams, groups"
                    .into(),
            );
        }
    }
    let section = |name: &str| {
        root.get(name)
            .and_then(|v| v.clone().into_table().ok())
            .unwrap_or_default()
    };

    let redis: RedisConfig = report
        .deserialize("redis", section("redis"))
        .unwrap_or_default();
    let worker: WorkerConfig = report
        .deserialize("worker", section("worker"))
        .unwrap_or_default();
    let http: HttpConfig = report
        .deserialize("http", section("http"))
        .unwrap_or_default();
    let telemetry: TelemetryConfig = report
        .deserialize("telemetry", section("telemetry"))
        .unwrap_or_default();

    let mut streams = BTreeMap::new();
    for (name, value) in section("streams") {
        let key = format!("streams.{name}");
        if let Some(table) = report.table(&key, value)
            && let Some(stream) = report.deserialize::<StreamConfig>(&key, table)
        {
            streams.insert(name, stream);
        }
    }

    let mut groups = BTreeMap::new();
    let group_tables = section("groups");
    if group_tables.is_empty() {
        report.push(
            "groups",
            "no groups are configured: add at least one [groups.<name>] table with a stream and a handler".into(),
        );
    }
    for (name, value) in group_tables {
        let key = format!("groups.{name}");
        let Some(mut table) = report.table(&key, value) else {
            continue;
        };
        let handler = table.remove("handler");
        let options = table.remove("options");
        let settings = report.deserialize::<GroupSettings>(&key, table);
        // A group whose handler is unusable still has its settings checked, against a
        // stand-in handler.
        let handler = report
            .handler_spec(&key, handler, options)
            .unwrap_or_else(|| HandlerSpec::new("noop", NoopOptions::default()));
        if let Some(settings) = settings {
            groups.insert(
                name.clone(),
                GroupConfig {
                    name,
                    settings,
                    handler,
                },
            );
        }
    }

    let mut config = Config {
        path: path.to_owned(),
        redis,
        worker,
        http,
        telemetry,
        streams,
        groups,
        derived: BTreeMap::new(),
    };
    // Defaults that would break a rule against what the user set follow it instead;
    // what the user set is then checked as written.
    config.derived = super::validate::derive(&mut config, &explicit);
    for (key, message) in super::validate::validate(&config) {
        report.push(&key, message);
    }
    report.problems.sort_by(|a, b| a.key.cmp(&b.key));
    if report.problems.is_empty() {
        Ok(config)
    } else {
        Err(report.into_error(path))
    }
}

/// Applies one `STREAMWORKER__…` variable (`rest` is the part after the prefix) to the
/// file's tree, returning the dotted key it set.
///
/// Each level's name is matched against the keys already there ignoring case and taking
/// `_` for `-`, since variable names are upper case and shells accept no hyphens:
/// `GROUPS__ORDER_EVENTS__CONCURRENCY` sets `[groups.order-events]`. A name that matches
/// nothing is taken lower-cased, as a new key. The value stays text (numbers and booleans
/// are read from text as needed); where a list or a table is expected, `Report` reads it
/// as one (`expand_text`).
fn apply_override(
    root: &mut config::Map<String, Value>,
    rest: &str,
    var: &str,
    value: String,
) -> Result<String, String> {
    let segments: Vec<&str> = rest.split(ENV_SEPARATOR).collect();
    let mut table = root;
    let mut path: Vec<String> = Vec::new();
    for (i, segment) in segments.iter().enumerate() {
        let name = match_key(table, segment).map_err(|candidates| {
            format!(
                "`{segment}` matches several keys at {}: {}; rename one of them so that upper case and `_` for `-` tell them apart",
                if path.is_empty() { "the top level".to_owned() } else { path.join(".") },
                candidates.join(", ")
            )
        })?;
        path.push(name.clone());
        if i + 1 == segments.len() {
            table.insert(
                name,
                Value::new(Some(&var.to_owned()), ValueKind::String(value)),
            );
            break;
        }
        let entry = table
            .entry(name)
            .or_insert_with(|| Value::new(None, ValueKind::Table(Default::default())));
        if !matches!(entry.kind, ValueKind::Table(_)) {
            // A deeper key replaces a value that was not a table, as a file would
            // have to.
            entry.kind = ValueKind::Table(Default::default());
        }
        let ValueKind::Table(inner) = &mut entry.kind else {
            unreachable!("made a table above")
        };
        table = inner;
    }
    Ok(path.join("."))
}

/// The key of `table` a variable's `segment` names: an exact match, else the one key equal
/// to it ignoring case with `-` read as `_`, else the segment lower-cased (a new key).
/// Several such keys: their names, for the problem.
fn match_key(table: &config::Map<String, Value>, segment: &str) -> Result<String, Vec<String>> {
    if table.contains_key(segment) {
        return Ok(segment.to_owned());
    }
    let wanted = segment.to_lowercase().replace('-', "_");
    let mut matches: Vec<&String> = table
        .keys()
        .filter(|k| k.to_lowercase().replace('-', "_") == wanted)
        .collect();
    matches.sort();
    match matches.as_slice() {
        [] => Ok(segment.to_lowercase()),
        [one] => Ok((*one).clone()),
        many => Err(many.iter().map(|k| format!("`{k}`")).collect()),
    }
}

/// Every key set (by the file or the environment) below `table`, dotted.
fn record_keys(table: &config::Map<String, Value>, prefix: &str, explicit: &mut Explicit) {
    for (key, value) in table {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        if let ValueKind::Table(inner) = &value.kind {
            record_keys(inner, &path, explicit);
        }
        explicit.insert(path);
    }
}

/// An environment value where a list or a table is expected: a TOML array or inline
/// table when it is written as one (`["a", "b"]`, `{ master = "m" }`), else for a list its
/// comma-separated items (`redis://a:6379,redis://b:6379`). `None` when it is neither.
fn expand_text(text: &str, list: bool) -> Option<Value> {
    let trimmed = text.trim();
    if trimmed.starts_with('[') || trimmed.starts_with('{') {
        let parsed: toml::Table = toml::from_str(&format!("v = {trimmed}")).ok()?;
        return Some(from_toml(parsed.get("v")?.clone()));
    }
    list.then(|| {
        let items = trimmed
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| Value::new(None, ValueKind::String(s.to_owned())))
            .collect();
        Value::new(None, ValueKind::Array(items))
    })
}

fn from_toml(value: toml::Value) -> Value {
    let kind = match value {
        toml::Value::String(s) => ValueKind::String(s),
        toml::Value::Integer(i) => ValueKind::I64(i),
        toml::Value::Float(f) => ValueKind::Float(f),
        toml::Value::Boolean(b) => ValueKind::Boolean(b),
        toml::Value::Datetime(d) => ValueKind::String(d.to_string()),
        toml::Value::Array(a) => ValueKind::Array(a.into_iter().map(from_toml).collect()),
        toml::Value::Table(t) => {
            ValueKind::Table(t.into_iter().map(|(k, v)| (k, from_toml(v))).collect())
        }
    };
    Value::new(None, kind)
}

/// Collects problems, naming for each key the source it came from.
struct Report {
    file: String,
    /// (the dotted key each variable set, the variable).
    env: Vec<(String, String)>,
    problems: Vec<Problem>,
}

impl Report {
    fn into_error(self, path: &Path) -> ConfigError {
        ConfigError::Invalid {
            path: path.to_owned(),
            problems: self.problems,
        }
    }

    /// The environment variable that sets `key`, a key below it (for a problem with a
    /// table) or a table or list containing it.
    fn source_of(&self, key: &str) -> String {
        self.env
            .iter()
            .find(|(set, _)| {
                set == key
                    || set.starts_with(&format!("{key}."))
                    || key.starts_with(&format!("{set}."))
            })
            .map(|(_, var)| format!("environment variable {var}"))
            .unwrap_or_else(|| self.file.clone())
    }

    fn push(&mut self, key: &str, message: String) {
        let problem = Problem {
            source: self.source_of(key),
            key: key.to_owned(),
            message,
        };
        if !self.problems.contains(&problem) {
            self.problems.push(problem);
        }
    }

    fn table(&mut self, key: &str, value: Value) -> Option<config::Map<String, Value>> {
        match value.into_table() {
            Ok(t) => Some(t),
            Err(_) => {
                self.push(key, "must be a table".into());
                None
            }
        }
    }

    /// Deserializes `table` into `T`, reporting every bad key rather than only the first:
    /// after each error the offending key is taken out (so its default applies) and the
    /// rest is tried again. The result then still feeds the cross-field rules, so those are
    /// reported too; the configuration as a whole is rejected by the problems recorded.
    fn deserialize<T: DeserializeOwned>(
        &mut self,
        prefix: &str,
        table: config::Map<String, Value>,
    ) -> Option<T> {
        self.deserialize_with(prefix, table, |d| T::deserialize(d))
    }

    /// [`Self::deserialize`] with the deserializing function given, for types picked at
    /// run time (a handler's options).
    fn deserialize_with<T>(
        &mut self,
        prefix: &str,
        mut table: config::Map<String, Value>,
        read: impl Fn(
            serde_path_to_error::Deserializer<'_, '_, Value>,
        ) -> Result<T, config::ConfigError>,
    ) -> Option<T> {
        let mut budget = table_size(&table) + 1;
        while budget > 0 {
            budget -= 1;
            let value = Value::new(None, ValueKind::Table(table.clone()));
            let mut track = serde_path_to_error::Track::new();
            let result = read(serde_path_to_error::Deserializer::new(value, &mut track))
                .map_err(|e| serde_path_to_error::Error::new(track.path(), e));
            match result {
                Ok(v) => return Some(v),
                Err(e) => {
                    let path: Vec<String> = e
                        .path()
                        .iter()
                        .filter_map(|seg| match seg {
                            serde_path_to_error::Segment::Map { key } => Some(key.clone()),
                            serde_path_to_error::Segment::Seq { index } => Some(index.to_string()),
                            _ => None,
                        })
                        .collect();
                    let message = clean_serde_message(&e.into_inner().to_string());
                    // Environment values are text: where a list or a table is expected,
                    // read the text as one and try again.
                    let wants_list = message.ends_with("expected a sequence")
                        || message.ends_with("expected an array");
                    let wants_table = message.ends_with("expected a map");
                    if (wants_list || wants_table)
                        && let Some(found) = lookup(&table, &path)
                        && self.env.iter().any(|(_, var)| found.origin() == Some(var))
                        && let ValueKind::String(text) = &found.kind
                        && let Some(expanded) = expand_text(text, wants_list)
                    {
                        budget += value_size(&expanded);
                        replace(&mut table, &path, expanded);
                        continue;
                    }
                    let mut full = prefix.to_owned();
                    for seg in &path {
                        full.push('.');
                        full.push_str(seg);
                    }
                    // A value is echoed only when its key is a known one not named like a
                    // secret: an unknown key may be a misspelt `password`, and serde's own
                    // message quotes the value it could not take.
                    let unknown = message.starts_with("unknown key");
                    let message = match lookup(&table, &path) {
                        Some(v) if unknown => format!("({}) {message}", type_of(v)),
                        Some(v) if is_secret_key(&full) => {
                            format!("({}) {}", type_of(v), elide_quoted(&message))
                        }
                        Some(v) => format!("= {}: {message}", show(v)),
                        None if is_secret_key(&full) => elide_quoted(&message),
                        None => message,
                    };
                    self.push(&full, message);
                    if path.is_empty() || !remove(&mut table, &path) {
                        return None;
                    }
                }
            }
        }
        None
    }

    fn handler_spec(
        &mut self,
        prefix: &str,
        handler: Option<Value>,
        options: Option<Value>,
    ) -> Option<HandlerSpec> {
        let key = format!("{prefix}.handler");
        let known = super::kinds::names();
        let kinds = known.join(", ");
        let Some(handler) = handler else {
            self.push(&key, format!("is missing: choose one of {kinds}"));
            return None;
        };
        let name = match handler.clone().into_string() {
            Ok(name) if known.contains(&name.as_str()) => name,
            Ok(name) => {
                self.push(
                    &key,
                    format!("= \"{name}\": unknown handler; choose one of {kinds}"),
                );
                return None;
            }
            Err(_) => {
                self.push(&key, format!("must be a string, one of {kinds}"));
                return None;
            }
        };
        let options =
            options.unwrap_or_else(|| Value::new(None, ValueKind::Table(Default::default())));
        let prefix = format!("{prefix}.options");
        let options = self.table(&prefix, options)?;
        self.deserialize_with(&prefix, options, |d| super::kinds::read_options(&name, d))
    }
}

/// Keys and array elements below `table`, bounding how many bad keys one table can hold.
fn table_size(table: &config::Map<String, Value>) -> usize {
    table.values().map(value_size).sum()
}

fn value_size(value: &Value) -> usize {
    match &value.kind {
        ValueKind::Table(t) => 1 + table_size(t),
        ValueKind::Array(a) => 1 + a.iter().map(value_size).sum::<usize>(),
        _ => 1,
    }
}

/// The value at `path`, through tables (by key) and arrays (by index, as serde's path
/// names them: `rules.0.window`).
fn lookup<'a>(table: &'a config::Map<String, Value>, path: &[String]) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    lookup_in(table.get(first)?, rest)
}

fn lookup_in<'a>(value: &'a Value, path: &[String]) -> Option<&'a Value> {
    let Some((first, rest)) = path.split_first() else {
        return Some(value);
    };
    match &value.kind {
        ValueKind::Table(t) => lookup_in(t.get(first)?, rest),
        ValueKind::Array(a) => lookup_in(a.get(first.parse::<usize>().ok()?)?, rest),
        _ => None,
    }
}

/// Puts `value` at `path` (which `lookup` found).
fn replace(table: &mut config::Map<String, Value>, path: &[String], value: Value) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    let Some(mut at) = table.get_mut(first) else {
        return;
    };
    for seg in rest {
        let next = match &mut at.kind {
            ValueKind::Table(t) => t.get_mut(seg),
            ValueKind::Array(a) => seg.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
            _ => None,
        };
        let Some(next) = next else { return };
        at = next;
    }
    *at = value;
}

/// Takes out the value at `path` (or, failing that, the nearest enclosing one) so that
/// the next attempt gets past it and reports the keys after it.
fn remove(table: &mut config::Map<String, Value>, path: &[String]) -> bool {
    let Some((first, rest)) = path.split_first() else {
        return false;
    };
    if !rest.is_empty()
        && let Some(value) = table.get_mut(first)
        && remove_in(value, rest)
    {
        return true;
    }
    table.remove(first).is_some()
}

fn remove_in(value: &mut Value, path: &[String]) -> bool {
    match &mut value.kind {
        ValueKind::Table(t) => remove(t, path),
        ValueKind::Array(a) => {
            let Some((first, rest)) = path.split_first() else {
                return false;
            };
            let Some(index) = first.parse::<usize>().ok().filter(|i| *i < a.len()) else {
                return false;
            };
            if !rest.is_empty() && remove_in(&mut a[index], rest) {
                return true;
            }
            a.remove(index);
            true
        }
        _ => false,
    }
}

fn show(value: &Value) -> String {
    match &value.kind {
        ValueKind::String(s) => format!("{s:?}"),
        ValueKind::Table(_) => "{…}".into(),
        ValueKind::Array(_) => "[…]".into(),
        other => other.to_string(),
    }
}

/// Whether a dotted key holds a secret: any part named like one (`redis.password_file`,
/// `options.secret`), or an HTTP header (`options.headers.X-Api-Key`, often credentials).
fn is_secret_key(key: &str) -> bool {
    key.split('.')
        .any(|part| part == "headers" || streamworker_handlers::redact::is_secret_name(part))
}

/// What kind of value a key holds, for messages that must not show the value.
fn type_of(value: &Value) -> &'static str {
    match &value.kind {
        ValueKind::Nil => "no value",
        ValueKind::Boolean(_) => "a boolean",
        ValueKind::I64(_) | ValueKind::I128(_) | ValueKind::U64(_) | ValueKind::U128(_) => {
            "an integer"
        }
        ValueKind::Float(_) => "a float",
        ValueKind::String(_) => "a string",
        ValueKind::Table(_) => "a table",
        ValueKind::Array(_) => "an array",
    }
}

/// `invalid type: integer `5`, expected a string` → `invalid type: integer …, expected a
/// string`: serde quotes the value it could not take, in backticks or double quotes.
fn elide_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut open: Option<char> = None;
    for c in message.chars() {
        match open {
            Some(q) if c == q => open = None,
            Some(_) => {}
            None if c == '`' || c == '"' => {
                open = Some(c);
                out.push('…');
            }
            None => out.push(c),
        }
    }
    out
}

/// serde's messages say "field"; ours say "key", and drop config's " for key …" suffix
/// since the key is already named.
fn clean_serde_message(message: &str) -> String {
    let message = match message.find(" for key `") {
        Some(i) => &message[..i],
        None => message,
    };
    message
        .replace("unknown field", "unknown key")
        .replace(", expected one of", "; expected one of")
        .replace(", expected", "; expected")
}

/// `groups.analytics.block` → `STREAMWORKER__GROUPS__ANALYTICS__BLOCK`.
#[cfg(test)]
pub fn env_var_for(key: &str) -> String {
    let mut var = format!("{ENV_PREFIX}{ENV_SEPARATOR}");
    var.push_str(&key.replace('.', ENV_SEPARATOR).to_uppercase());
    var
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("streamworker.toml");
        std::fs::write(&path, text).unwrap();
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        load_with_env(&path, env)
    }

    fn problems(result: Result<Config, ConfigError>) -> Vec<Problem> {
        match result {
            Err(ConfigError::Invalid { problems, .. }) => problems,
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[test]
    fn environment_overrides_reach_numeric_handler_options() {
        // Environment values are text; each must still become the option's number,
        // whatever order the loader's maps happen to hold `handler` and `options` in.
        for _ in 0..20 {
            let config = load_text(
                "[groups.learn]\nstream = \"feedback\"\nhandler = \"learning\"\n",
                &[
                    ("STREAMWORKER__GROUPS__LEARN__OPTIONS__THRESHOLD", "2.5"),
                    ("STREAMWORKER__GROUPS__LEARN__OPTIONS__MIN_FEEDBACK", "7"),
                ],
            )
            .unwrap();
            let Some(options) = config.groups["learn"]
                .handler
                .options::<streamworker_handlers::learning::LearningOptions>()
            else {
                panic!("learning handler expected");
            };
            assert_eq!(options.threshold, 2.5);
            assert_eq!(options.min_feedback, 7);
        }
    }

    #[test]
    fn option_problems_name_the_full_key_including_array_elements() {
        let problems = problems(load_text(
            r#"
[groups.alerts]
stream = "events"
handler = "alerts"
[[groups.alerts.options.rules]]
name = "errors"
kind = "count"
window = "1m"
threshold = 10
colour = "red"
[[groups.alerts.options.rules]]
name = "slow"
kind = "count"
window = "soon"
threshold = 3
"#,
            &[("STREAMWORKER__GROUPS__ALERTS__OPTIONS__MAX_LEN", "lots")],
        ));
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        for wanted in [
            "groups.alerts.options.rules.0.colour",
            "groups.alerts.options.rules.1.window",
            "groups.alerts.options.max_len",
        ] {
            assert!(
                keys.contains(&wanted),
                "{wanted} missing from {problems:#?}"
            );
        }
        let max_len = problems
            .iter()
            .find(|p| p.key == "groups.alerts.options.max_len")
            .unwrap();
        assert_eq!(
            max_len.source,
            "environment variable STREAMWORKER__GROUPS__ALERTS__OPTIONS__MAX_LEN"
        );
        let window = problems
            .iter()
            .find(|p| p.key == "groups.alerts.options.rules.1.window")
            .unwrap();
        assert!(window.message.contains("\"soon\""), "{window:?}");
    }

    /// A value under a key named like a secret, or under a key that does not exist (a
    /// misspelt `pasword`), is never echoed: the key and the value's type are.
    #[test]
    fn problems_never_echo_secret_or_unknown_values() {
        let result = load_text(
            r#"
[redis]
password = "hunter2-file"
[telemetry]
otlp_endpoint = "grpc://collector:s3cret-otlp@host:4317"
[groups.hook]
stream = "events"
handler = "webhook"
colour = "green-secret"
[groups.hook.options]
url = "http://127.0.0.1:9/x"
secret = ["12345678987"]
headers = { Authorization = ["Bearer abc"] }
"#,
            &[("STREAMWORKER__WORKER__AUTH_TOKEN", "env-t0ken")],
        );
        let text = result.as_ref().unwrap_err().to_string();
        for secret in [
            "hunter2",
            "s3cret-otlp",
            "green-secret",
            "12345678987",
            "Bearer abc",
            "env-t0ken",
        ] {
            assert!(!text.contains(secret), "{secret} echoed:\n{text}");
        }
        let problems = problems(result);
        let find = |key: &str| {
            problems
                .iter()
                .find(|p| p.key == key)
                .unwrap_or_else(|| panic!("{key} missing from {problems:#?}"))
        };
        assert!(
            find("redis.password").message.contains("a string"),
            "{problems:#?}"
        );
        assert!(
            find("groups.hook.colour").message.contains("a string"),
            "{problems:#?}"
        );
        assert!(
            find("groups.hook.options.secret")
                .message
                .contains("an array"),
            "{problems:#?}"
        );
        assert!(
            find("worker.auth_token").message.contains("a string"),
            "{problems:#?}"
        );
        assert!(
            find("telemetry.otlp_endpoint")
                .message
                .contains("grpc://collector:<redacted>@host:4317"),
            "{problems:#?}"
        );
    }

    #[test]
    fn quoted_values_are_elided() {
        assert_eq!(
            elide_quoted("invalid type: integer `5`, expected a string"),
            "invalid type: integer …, expected a string"
        );
        assert_eq!(
            elide_quoted(r#"invalid value: string "pw", expected x"#),
            "invalid value: string …, expected x"
        );
    }

    fn keys_of(result: Result<Config, ConfigError>) -> Vec<String> {
        problems(result).into_iter().map(|p| p.key).collect()
    }

    /// Values that used to panic `check`: NaN and infinite floats, durations so long that
    /// sums and products of them overflow.
    #[test]
    fn absurd_numbers_are_problems_not_panics() {
        let group =
            |extra: &str| format!("[groups.g]\nstream = \"s\"\nhandler = \"noop\"\n{extra}\n");
        for (extra, key) in [
            (
                "retry_backoff = { jitter = nan }",
                "groups.g.retry_backoff.jitter",
            ),
            (
                "retry_backoff = { jitter = -inf }",
                "groups.g.retry_backoff.jitter",
            ),
            (
                "retry_backoff = { multiplier = nan }",
                "groups.g.retry_backoff.multiplier",
            ),
            (
                "claim_idle = \"500000000y\"\nconsumer_ttl = \"500000001y\"\nhandler_timeout = \"400000000y\"",
                "groups.g.claim_idle",
            ),
            (
                "circuit_breaker = { threshold = 1, pause = \"500000000y\" }",
                "groups.g.circuit_breaker.pause",
            ),
        ] {
            let keys = keys_of(load_text(&group(extra), &[]));
            assert!(keys.iter().any(|k| k == key), "{extra}: {keys:?}");
        }
        let keys = keys_of(load_text(
            "[worker]\nclaim_interval = \"500000000y\"\n[streams.s]\nretention = { max_age = \"500000000y\" }\n[groups.g]\nstream = \"s\"\nhandler = \"noop\"\n",
            &[],
        ));
        for key in ["worker.claim_interval", "streams.s.retention.max_age"] {
            assert!(keys.iter().any(|k| k == key), "{key}: {keys:?}");
        }
    }

    /// Names Redis would take but nobody means: an empty group or stream name.
    #[test]
    fn empty_names_are_problems() {
        let keys = keys_of(load_text(
            "[streams.\"\"]\nretention = { max_len = 5 }\n[groups.\"\"]\nstream = \"s\"\nhandler = \"noop\"\n",
            &[],
        ));
        assert!(keys.iter().any(|k| k == "groups."), "{keys:?}");
        assert!(keys.iter().any(|k| k == "streams."), "{keys:?}");
    }
}
