//! `handler = "alerts"`: rules on the group's entries (windowed counts and rates, absence)
//! and on consumer lag; each incident is one `firing` event and, when it clears, one
//! `resolved` event, on an alerts stream, a Pub/Sub channel and/or a Slack-style webhook.
//!
//! **Counting (per entry, cheap).** An entry only returns effects: one HINCRBY per rule it
//! matches (and one for the total, for rate rules) into a time bucket keyed by the entry id's
//! time, and a PEXPIRE. Effects are applied with the entry's acknowledgement, so replicas
//! share the windows and a redelivery never counts twice. Buckets are
//! `{<stream>}:alerts:<group>:bucket:<width>s:<start>` hashes (fields `m:<rule>` and `all`);
//! a rule's bucket width is about a sixtieth of its window (at least 1 s), so a window is
//! read as at most ~60 keys whatever its length.
//!
//! **Evaluating (in `tick`, one replica at a time).** Every `evaluate_every` the rules are
//! judged from the buckets, the lag of the watched groups and each rule's state (one hash,
//! `{<stream>}:alerts:<group>:state`), read in one round trip. Transitions are added to the
//! alerts stream and published, then the new state is written, then the webhook is called.
//!
//! **One incident, one alert.** A rule that fires stays firing for at least `cooldown`
//! whatever its condition does, and then resolves (one `resolved` event) as soon as the
//! condition is clear; it never repeats `firing` while it is firing. So flapping produces at
//! most one firing/resolved pair per `cooldown`, and what the events say is always true at
//! the time (a rule is never shown resolved while it would fire).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{
    Derived, Effect, Effects, Entry, Handler, HandlerError, Limits, Needs, OptionProblem, Store,
};

/// `[groups.<name>.options]` for `handler = "alerts"`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsOptions {
    /// The stream alert events are added to (XADD at evaluation time, so any key; it must
    /// not be the group's own stream).
    #[serde(default = "default_stream")]
    pub stream: String,
    /// Caps the alerts stream (`XADD MAXLEN ~`); 0 leaves it uncapped.
    #[serde(default = "default_max_len")]
    pub max_len: u64,
    /// Each alert event is also PUBLISHed here as one JSON object, for live dashboards;
    /// `""` (the default) publishes nothing.
    #[serde(default)]
    pub channel: String,
    /// A Slack-compatible incoming webhook: each alert event is POSTed as `{"text": "…"}`.
    /// Failures are logged, never retried. Redacted when the configuration is printed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
    /// The webhook request's timeout, below `handler_timeout` (which bounds an evaluation).
    #[serde(with = "crate::duration", default = "default_webhook_timeout")]
    pub webhook_timeout: Duration,
    /// How often the rules are judged, by one replica at a time.
    #[serde(with = "crate::duration", default = "default_evaluate_every")]
    pub evaluate_every: Duration,
    /// The rules, `[[groups.<name>.options.rules]]`; at least one.
    #[serde(default)]
    pub rules: Vec<RuleOptions>,
}

/// One `[[groups.<name>.options.rules]]` table.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleOptions {
    /// Names the rule in events, keys and messages: letters, digits, `-`, `_`, `.`.
    pub name: String,
    /// `count`, `rate`, `absence`, `lag` or `consumers`.
    pub kind: RuleKind,
    /// Which entries match (count, rate, absence): every listed field must have one of its
    /// values, compared as text; a key may be a dotted path into a JSON payload
    /// (`"data.model"`). Empty matches every entry.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub when: BTreeMap<String, Values>,
    /// The sliding window (count, rate, absence): at least 5 s and 5 × `evaluate_every`.
    /// For consumers: a consumer that took entries within this long counts as active.
    #[serde(
        default,
        with = "crate::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub window: Option<Duration>,
    /// Fires at or above: matching entries (count), matching ÷ all entries in the window,
    /// in (0, 1] (rate), entries not yet delivered to the group (lag). Absence has none.
    /// Consumers fires *below* it: fewer active consumers than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// Rate only: a window with fewer entries is not judged (counts as clear). Default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_events: Option<u64>,
    /// A firing rule stays firing (and silent) at least this long; default 5m.
    #[serde(with = "crate::duration", default = "default_cooldown")]
    pub cooldown: Duration,
    /// The condition must hold this long before the rule fires; default 0 (at once).
    #[serde(rename = "for", with = "crate::duration", default)]
    pub hold: Duration,
    /// Lag and consumers: the consumer group watched; default this group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Lag and consumers: the stream of that group; default this group's stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// Free text added to every event of this rule (what to do, a runbook link).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// What a rule measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleKind {
    /// Matching entries in the window reach `threshold`.
    Count,
    /// Matching entries ÷ all entries in the window reach `threshold`.
    Rate,
    /// No matching entry for `window`.
    Absence,
    /// A consumer group's lag (entries not yet delivered to it) reaches `threshold`.
    Lag,
    /// Entries wait for a group and fewer than `threshold` of its consumers took any
    /// within `window` (`threshold = 1`: nobody is consuming).
    Consumers,
}

impl<'de> Deserialize<'de> for RuleKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<str>::deserialize(d)?;
        Self::ALL
            .iter()
            .copied()
            .find(|k| k.as_str() == text)
            .ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "`{text}` is not a rule kind; choose count, rate, absence, lag or consumers"
                ))
            })
    }
}

impl RuleKind {
    pub const ALL: [RuleKind; 5] = [
        Self::Count,
        Self::Rate,
        Self::Absence,
        Self::Lag,
        Self::Consumers,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Count => "count",
            Self::Rate => "rate",
            Self::Absence => "absence",
            Self::Lag => "lag",
            Self::Consumers => "consumers",
        }
    }

    /// Rules that read a consumer group (`group`, `stream`) rather than count entries.
    pub fn watches_a_group(self) -> bool {
        matches!(self, Self::Lag | Self::Consumers)
    }
}

/// The accepted values of one `when` field: a string, number or boolean, or a list of them
/// (any of which matches).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Values(pub Vec<String>);

impl Serialize for Values {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => s.serialize_str(one),
            many => many.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Values {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Values;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, number or boolean, or a list of them")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Values, E> {
                Ok(Values(vec![v.to_owned()]))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Values, E> {
                Ok(Values(vec![v.to_string()]))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Values, E> {
                Ok(Values(vec![v.to_string()]))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Values, E> {
                Ok(Values(vec![v.to_string()]))
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Values, E> {
                Ok(Values(vec![v.to_string()]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Values, A::Error> {
                let mut out = Vec::new();
                while let Some(Values(one)) = seq.next_element::<Values>()? {
                    if one.len() != 1 {
                        return Err(serde::de::Error::custom(
                            "a list of values cannot contain lists",
                        ));
                    }
                    out.extend(one);
                }
                Ok(Values(out))
            }
        }
        d.deserialize_any(Visit)
    }
}

fn default_stream() -> String {
    "alerts".into()
}
fn default_max_len() -> u64 {
    10_000
}
fn default_webhook_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_evaluate_every() -> Duration {
    Duration::from_secs(1)
}
fn default_cooldown() -> Duration {
    Duration::from_secs(300)
}
/// `min_events` of a rate rule when not set.
pub const DEFAULT_MIN_EVENTS: u64 = 10;
/// Windows are at least this long (and at least `MIN_WINDOW_TICKS` evaluations).
const MIN_WINDOW: Duration = Duration::from_secs(5);
const MIN_WINDOW_TICKS: u32 = 5;
const MAX_WINDOW: Duration = Duration::from_secs(24 * 3600);
const REDACTED: &str = "<redacted>";

fn human(d: Duration) -> String {
    crate::duration::format(d)
}

impl Default for AlertsOptions {
    fn default() -> Self {
        Self {
            stream: default_stream(),
            max_len: default_max_len(),
            channel: String::new(),
            webhook: None,
            webhook_timeout: default_webhook_timeout(),
            evaluate_every: default_evaluate_every(),
            rules: Vec::new(),
        }
    }
}

impl AlertsOptions {
    /// The shortest window the rules may have.
    pub fn min_window(&self) -> Duration {
        MIN_WINDOW.max(self.evaluate_every * MIN_WINDOW_TICKS)
    }

    /// An explicit `webhook_timeout` asks for a `handler_timeout` above it (the rule in
    /// `validate`).
    pub(crate) fn needs(&self, is_set: &dyn Fn(&str) -> bool) -> Needs {
        let explicit = self.webhook.is_some() && is_set("webhook_timeout");
        Needs {
            handler_timeout_above: explicit.then_some((self.webhook_timeout, "webhook_timeout")),
            ..Needs::default()
        }
    }

    /// A `webhook_timeout` left out stays below a short `handler_timeout` (the rule in
    /// `validate`): half of it.
    pub(crate) fn derive(
        &mut self,
        limits: &Limits,
        is_set: &dyn Fn(&str) -> bool,
    ) -> Vec<Derived> {
        if self.webhook.is_some()
            && !is_set("webhook_timeout")
            && self.webhook_timeout >= limits.handler_timeout
        {
            self.webhook_timeout = crate::duration::whole_ms(limits.handler_timeout / 2);
            return vec![Derived::new("webhook_timeout", "handler_timeout")];
        }
        Vec::new()
    }

    pub(crate) fn validate(&self, limits: &Limits) -> Vec<OptionProblem> {
        let mut problems = Vec::new();
        let mut problem =
            |key: String, message: String| problems.push(OptionProblem { key, message });
        if self.stream.trim().is_empty() {
            problem(
                "stream".into(),
                "is empty: name the stream alert events are added to, e.g. stream = \"alerts\""
                    .into(),
            );
        }
        if let Some(url) = &self.webhook {
            match reqwest::Url::parse(url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.has_host() => {}
                Ok(u) => problem(
                    "webhook".into(),
                    format!(
                        "= \"{}\": not an http(s) URL (scheme `{}`); use the incoming-webhook URL, e.g. \"https://hooks.slack.com/services/…\"",
                        redact_webhook(url),
                        u.scheme()
                    ),
                ),
                Err(e) => problem(
                    "webhook".into(),
                    format!("= \"{}\": not a URL ({e})", redact_webhook(url)),
                ),
            }
        }
        if self.webhook.is_none() {
            // Unused without a webhook.
        } else if self.webhook_timeout.is_zero() {
            problem("webhook_timeout".into(), "must be greater than zero".into());
        } else if self.webhook_timeout >= limits.handler_timeout {
            problem(
                "webhook_timeout".into(),
                format!(
                    "({}) must be below the group's handler_timeout ({}), which bounds each evaluation; lower it or raise handler_timeout",
                    human(self.webhook_timeout),
                    human(limits.handler_timeout)
                ),
            );
        }
        if self.evaluate_every < Duration::from_millis(100)
            || self.evaluate_every > Duration::from_secs(60)
        {
            problem(
                "evaluate_every".into(),
                format!(
                    "= \"{}\": must be between 100ms and 1m (the default, 1s, suits most rules)",
                    human(self.evaluate_every)
                ),
            );
        }
        if self.rules.is_empty() {
            problem(
                "rules".into(),
                "has no usable rule: add at least one [[groups.<name>.options.rules]] table with a name and a kind (count, rate, absence, lag or consumers), and fix the problems reported for rules".into(),
            );
        }
        let min_window = self.min_window();
        let mut seen = HashSet::new();
        for (i, rule) in self.rules.iter().enumerate() {
            for (key, message) in rule.problems(min_window) {
                problem(format!("rules.{i}.{key}"), message);
            }
            if !rule.name.is_empty() && !seen.insert(rule.name.as_str()) {
                problem(
                    format!("rules.{i}.name"),
                    format!(
                        "= \"{}\": another rule has this name; names identify rules in events and in Redis, so each must be unique",
                        rule.name
                    ),
                );
            }
        }
        problems
    }

    pub(crate) fn redacted(&self) -> Self {
        Self {
            webhook: self.webhook.as_deref().map(redact_webhook),
            ..self.clone()
        }
    }
}

impl RuleOptions {
    /// Problems as (key below the rule, message).
    fn problems(&self, min_window: Duration) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let rule = &self.name;
        if rule.is_empty() {
            out.push((
                "name",
                "is empty: name the rule, e.g. name = \"error-rate\"".into(),
            ));
        } else if rule.len() > 64
            || !rule
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            out.push((
                "name",
                format!(
                    "= \"{rule}\": use at most 64 letters, digits, `-`, `_` or `.` (the name appears in Redis keys and alert events)"
                ),
            ));
        }
        let kind = self.kind.as_str();
        let not_for = |key: &'static str, out: &mut Vec<(&'static str, String)>, why: &str| {
            out.push((key, format!("does not apply to {kind} rules: {why}")));
        };
        // Windows.
        match (self.kind, self.window) {
            (RuleKind::Lag, Some(_)) => not_for(
                "window",
                &mut out,
                "lag is read as it is now; use `for` to require it to last",
            ),
            (RuleKind::Lag, None) => {}
            (RuleKind::Consumers, None) => out.push((
                "window",
                "is missing: a consumer counts as active when it took entries within this long, e.g. window = \"1m\"".into(),
            )),
            (_, None) => out.push((
                "window",
                format!(
                    "is missing: a {kind} rule judges a sliding window, e.g. window = \"1m\""
                ),
            )),
            (_, Some(w)) if w < min_window => out.push((
                "window",
                format!(
                    "= \"{}\": too short; rules are judged every evaluate_every in buckets of at least 1s, so a window must be at least {}",
                    human(w),
                    human(min_window)
                ),
            )),
            (_, Some(w)) if w > MAX_WINDOW => out.push((
                "window",
                format!("= \"{}\": at most 24h", human(w)),
            )),
            _ => {}
        }
        // Thresholds.
        match (self.kind, self.threshold) {
            (RuleKind::Absence, Some(_)) => not_for(
                "threshold",
                &mut out,
                "it fires when no matching entry arrived for `window`",
            ),
            (RuleKind::Absence, None) => {}
            (_, None) => out.push((
                "threshold",
                match self.kind {
                    RuleKind::Rate => "is missing: the fraction of entries at which the rule fires, e.g. threshold = 0.05 for 5 %".into(),
                    RuleKind::Count => "is missing: the number of matching entries in the window at which the rule fires, e.g. threshold = 100".into(),
                    RuleKind::Consumers => "is missing: the number of active consumers below which the rule fires, e.g. threshold = 1 (fires when none is active)".into(),
                    _ => "is missing: the lag (entries not yet delivered to the group) at which the rule fires, e.g. threshold = 10000".into(),
                },
            )),
            (RuleKind::Rate, Some(t)) if !(t > 0.0 && t <= 1.0) => out.push((
                "threshold",
                format!(
                    "= {t}: a rate threshold is a fraction above 0 and at most 1 (0.05 = 5 % of the window's entries)"
                ),
            )),
            (RuleKind::Count | RuleKind::Lag, Some(t))
                if !(t >= 1.0 && t.fract() == 0.0 && t < 1e15) =>
            {
                out.push((
                    "threshold",
                    format!("= {t}: a {kind} threshold is a whole number of entries, at least 1"),
                ))
            }
            (RuleKind::Consumers, Some(t)) if !(t >= 1.0 && t.fract() == 0.0 && t < 1e6) => out
                .push((
                    "threshold",
                    format!(
                        "= {t}: a consumers threshold is a whole number of consumers, at least 1"
                    ),
                )),
            _ => {}
        }
        match (self.kind, self.min_events) {
            (RuleKind::Rate, Some(0)) => out.push((
                "min_events",
                "= 0: must be at least 1 (a rate of an empty window means nothing)".into(),
            )),
            (RuleKind::Rate, _) | (_, None) => {}
            (_, Some(_)) => not_for(
                "min_events",
                &mut out,
                "only rate rules skip windows with few entries",
            ),
        }
        match self.kind {
            RuleKind::Lag | RuleKind::Consumers => {
                if !self.when.is_empty() {
                    not_for("when", &mut out, "it reads the consumer group, not entries");
                }
                if matches!(&self.group, Some(g) if g.is_empty()) {
                    out.push((
                        "group",
                        "is empty: leave it out to watch this group, or name a consumer group"
                            .into(),
                    ));
                }
                if matches!(&self.stream, Some(s) if s.is_empty()) {
                    out.push((
                        "stream",
                        "is empty: leave it out to watch this group's stream, or name one".into(),
                    ));
                }
            }
            _ => {
                if self.group.is_some() {
                    not_for(
                        "group",
                        &mut out,
                        "only lag and consumers rules watch a group",
                    );
                }
                if self.stream.is_some() {
                    not_for(
                        "stream",
                        &mut out,
                        "only lag and consumers rules watch another stream",
                    );
                }
                if self.kind == RuleKind::Rate && self.when.is_empty() {
                    out.push((
                        "when",
                        "is missing: a rate rule divides the entries matching `when` by all entries, e.g. when = { event_type = \"error\" }".into(),
                    ));
                }
                for (field, values) in &self.when {
                    if field.is_empty() {
                        out.push(("when", "has an empty field name".into()));
                    } else if values.0.is_empty() {
                        out.push((
                            "when",
                            format!("`{field}` has an empty list of values: nothing could match"),
                        ));
                    }
                }
            }
        }
        if self.cooldown > Duration::from_secs(7 * 24 * 3600) {
            out.push((
                "cooldown",
                format!("= \"{}\": at most 7d", human(self.cooldown)),
            ));
        }
        if self.hold > MAX_WINDOW {
            out.push(("for", format!("= \"{}\": at most 24h", human(self.hold))));
        }
        out
    }
}

/// Hides everything after the host of a webhook URL: Slack-style URLs carry their secret in
/// the path.
pub fn redact_webhook(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) if u.has_host() => {
            let port = u.port().map(|p| format!(":{p}")).unwrap_or_default();
            let bare = u.path() == "/" && u.query().is_none() && u.password().is_none();
            if bare {
                format!(
                    "{}://{}{port}/",
                    u.scheme(),
                    u.host_str().unwrap_or_default()
                )
            } else {
                format!(
                    "{}://{}{port}/{REDACTED}",
                    u.scheme(),
                    u.host_str().unwrap_or_default()
                )
            }
        }
        _ => REDACTED.to_owned(),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("alerts: {0}")]
pub struct AlertsBuildError(String);

/// Bucket widths, in seconds; a rule ideally uses the largest one at most a sixtieth of its
/// window.
const WIDTHS: &[u64] = &[1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600];
const BUCKETS_PER_WINDOW: u64 = 60;
/// A longer window still shares a shorter one's buckets when it is read as at most this
/// many: every width costs each entry one more PEXPIRE, while reading a few hundred small
/// hashes once a second costs Redis well under a millisecond.
const MAX_BUCKETS: u64 = 600;

/// The ideal bucket width (ms) of a window and the number of buckets it is read as.
pub fn buckets_for(window: Duration) -> (u64, u64) {
    let window_ms = window.as_millis().max(1) as u64;
    let width_s = WIDTHS
        .iter()
        .copied()
        .rev()
        .find(|w| w * 1000 * BUCKETS_PER_WINDOW <= window_ms)
        .unwrap_or(1);
    let width_ms = width_s * 1000;
    (width_ms, window_ms.div_ceil(width_ms))
}

/// The bucket width (ms) of each window: windows are taken shortest first, each starting a
/// new width only when the current one would read it as more than `MAX_BUCKETS` buckets.
pub fn bucket_widths(windows: &[Duration]) -> Vec<u64> {
    let mut order: Vec<usize> = (0..windows.len()).collect();
    order.sort_by_key(|&i| windows[i]);
    let mut out = vec![0; windows.len()];
    let mut current: Option<u64> = None;
    for i in order {
        let window_ms = windows[i].as_millis().max(1) as u64;
        let width = match current {
            Some(w) if window_ms.div_ceil(w) <= MAX_BUCKETS => w,
            _ => buckets_for(windows[i]).0,
        };
        current = Some(width);
        out[i] = width;
    }
    out
}

/// Rules that share a bucket width share the bucket keys.
#[derive(Debug)]
struct Family {
    width_ms: u64,
    /// Buckets read per evaluation: the most any of its rules needs.
    buckets: u64,
    /// Entries older than this (ms) fall in no window any more: not counted.
    keep_ms: u64,
    ttl: Duration,
    /// Count every entry in the field `all`: the family has a rate rule or a rule that
    /// matches every entry (which then reads `all` instead of a field of its own).
    all: bool,
    /// The rules counted in a field of their own (`m:<name>`).
    counted: Vec<usize>,
    prefix: String,
}

impl Family {
    fn key(&self, bucket: u64) -> String {
        format!("{}{}", self.prefix, bucket * (self.width_ms / 1000))
    }
}

/// A rule ready to count and judge.
#[derive(Debug)]
struct Rule {
    name: String,
    kind: RuleKind,
    when: Vec<(String, Vec<String>)>,
    window: Duration,
    threshold: f64,
    min_events: u64,
    cooldown_ms: u64,
    hold_ms: u64,
    /// For lag rules: the watched stream and group.
    watched: Option<(String, String)>,
    description: Option<String>,
    /// For windowed rules: the family and how many of its buckets make the window.
    family: usize,
    buckets: u64,
    /// `m:<name>`, the bucket field; `all` for a rule without `when`.
    field: String,
    /// `rule:<name>`, the state field.
    state_field: String,
}

impl Rule {
    fn matches(&self, entry: &Entry) -> bool {
        self.when.iter().all(|(path, values)| {
            entry
                .get(path)
                .is_some_and(|v| values.iter().any(|x| x == v.as_ref()))
        })
    }
}

/// Where a rule stands; kept in Redis so any replica can continue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    #[default]
    Ok,
    /// The condition holds but not yet for `for`.
    Pending,
    Firing,
}

/// A rule's state, one JSON value in the state hash.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RuleState {
    pub state: Phase,
    /// Since when the rule has been watched without interruption (ms): an absence rule
    /// fires only after watching a whole window.
    pub since: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_since: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fired_at: Option<u64>,
    /// The last value judged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
}

/// What one evaluation saw for a rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub value: f64,
    /// `None`: cannot tell (lag unknown, absence not watched long enough): nothing changes.
    pub firing: Option<bool>,
    /// For messages: what the value is made of.
    pub detail: String,
}

/// A change announced to the world.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Firing,
    Resolved,
}

impl Change {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Firing => "firing",
            Self::Resolved => "resolved",
        }
    }
}

/// Advances a rule's state machine; returns the change to announce, if any.
///
/// `fresh`: nobody evaluated the rules for a while (or ever), so what happened meanwhile is
/// unknown: watching starts over.
pub fn step(
    state: &mut RuleState,
    seen: Option<bool>,
    now: u64,
    fresh: bool,
    hold_ms: u64,
    cooldown_ms: u64,
) -> Option<Change> {
    if fresh {
        state.since = now;
        if state.state == Phase::Pending {
            state.state = Phase::Ok;
            state.pending_since = None;
        }
    }
    let fire = |state: &mut RuleState| {
        state.state = Phase::Firing;
        state.fired_at = Some(now);
        state.pending_since = None;
        Some(Change::Firing)
    };
    match (state.state, seen?) {
        (Phase::Ok, true) if hold_ms == 0 => fire(state),
        (Phase::Ok, true) => {
            state.state = Phase::Pending;
            state.pending_since = Some(now);
            None
        }
        (Phase::Pending, true) => {
            let since = *state.pending_since.get_or_insert(now);
            if now.saturating_sub(since) >= hold_ms {
                fire(state)
            } else {
                None
            }
        }
        (Phase::Pending, false) => {
            state.state = Phase::Ok;
            state.pending_since = None;
            None
        }
        (Phase::Firing, false) => {
            let fired = state.fired_at.unwrap_or(0);
            if now.saturating_sub(fired) >= cooldown_ms {
                state.state = Phase::Ok;
                Some(Change::Resolved)
            } else {
                None
            }
        }
        (Phase::Ok, false) | (Phase::Firing, true) => None,
    }
}

/// A transition found by one evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    pub rule: String,
    pub kind: RuleKind,
    pub change: Change,
    pub value: f64,
    pub threshold: Option<f64>,
    pub window: Option<Duration>,
    pub at: u64,
    pub fired_at: Option<u64>,
    pub message: String,
}

/// The alerts handler for one group.
pub struct Alerts {
    store: Arc<dyn Store>,
    stream: String,
    group: String,
    rules: Vec<Rule>,
    families: Vec<Family>,
    state_key: String,
    alerts_stream: String,
    max_len: Option<u64>,
    channel: String,
    webhook: Option<(reqwest::Client, reqwest::Url)>,
    evaluate_every: Duration,
    /// After this long without an evaluation, watching starts over.
    gap_ms: u64,
}

impl fmt::Debug for Alerts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Alerts")
            .field("stream", &self.stream)
            .field("group", &self.group)
            .field("rules", &self.rules.len())
            .finish_non_exhaustive()
    }
}

/// The state hash lives this long after the last evaluation.
const STATE_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
const TICK_FIELD: &str = "_evaluated_at";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

impl Alerts {
    /// Builds the handler for the group `group` on `stream`.
    pub fn new(
        options: &AlertsOptions,
        stream: &str,
        group: &str,
        store: Arc<dyn Store>,
    ) -> Result<Self, AlertsBuildError> {
        if options.stream == stream {
            return Err(AlertsBuildError(format!(
                "options.stream = \"{}\" is the group's own stream: alert events would be counted as entries; name another stream, e.g. \"alerts\"",
                options.stream
            )));
        }
        let base = format!("{}:alerts:{group}:", crate::slot_tag(stream));
        let mut rules = Vec::new();
        let mut families: Vec<Family> = Vec::new();
        let windowed: Vec<Duration> = options
            .rules
            .iter()
            .filter(|r| !r.kind.watches_a_group())
            .map(|r| r.window.unwrap_or(MIN_WINDOW))
            .collect();
        let mut widths = bucket_widths(&windowed).into_iter();
        for r in &options.rules {
            let missing = |what: &str| {
                AlertsBuildError(format!(
                    "rule `{}` has no {what} (run `streamworker check`)",
                    r.name
                ))
            };
            let (window, family, buckets) = if r.kind == RuleKind::Lag {
                (Duration::ZERO, usize::MAX, 0)
            } else if r.kind == RuleKind::Consumers {
                let window = r.window.ok_or_else(|| missing("window"))?;
                (window, usize::MAX, 0)
            } else {
                let window = r.window.ok_or_else(|| missing("window"))?;
                let width_ms = widths.next().unwrap_or(1000);
                let buckets = (window.as_millis() as u64).div_ceil(width_ms).max(1);
                let family = match families.iter().position(|f| f.width_ms == width_ms) {
                    Some(i) => i,
                    None => {
                        families.push(Family {
                            width_ms,
                            buckets: 0,
                            keep_ms: 0,
                            ttl: Duration::ZERO,
                            all: false,
                            counted: Vec::new(),
                            prefix: format!("{base}bucket:{}s:", width_ms / 1000),
                        });
                        families.len() - 1
                    }
                };
                let f = &mut families[family];
                f.buckets = f.buckets.max(buckets);
                f.keep_ms = f.buckets * width_ms + width_ms;
                f.ttl = Duration::from_millis(f.keep_ms + 5_000);
                if r.when.is_empty() {
                    f.all = true;
                } else {
                    f.all |= r.kind == RuleKind::Rate;
                    f.counted.push(rules.len());
                }
                (window, family, buckets)
            };
            let threshold = match r.kind {
                RuleKind::Absence => 0.0,
                _ => r.threshold.ok_or_else(|| missing("threshold"))?,
            };
            rules.push(Rule {
                name: r.name.clone(),
                kind: r.kind,
                when: r
                    .when
                    .iter()
                    .map(|(k, v)| (k.clone(), v.0.clone()))
                    .collect(),
                window,
                threshold,
                min_events: r.min_events.unwrap_or(DEFAULT_MIN_EVENTS),
                cooldown_ms: r.cooldown.as_millis() as u64,
                hold_ms: r.hold.as_millis() as u64,
                watched: r.kind.watches_a_group().then(|| {
                    (
                        r.stream.clone().unwrap_or_else(|| stream.to_owned()),
                        r.group.clone().unwrap_or_else(|| group.to_owned()),
                    )
                }),
                description: r.description.clone().filter(|d| !d.trim().is_empty()),
                family,
                buckets,
                field: if r.when.is_empty() {
                    "all".into()
                } else {
                    format!("m:{}", r.name)
                },
                state_field: format!("rule:{}", r.name),
            });
        }
        let webhook = match &options.webhook {
            None => None,
            Some(url) => {
                crate::webhook::install_tls_provider();
                let parsed = reqwest::Url::parse(url).map_err(|e| {
                    AlertsBuildError(format!("webhook {}: {e}", redact_webhook(url)))
                })?;
                let client = reqwest::Client::builder()
                    .timeout(options.webhook_timeout)
                    .connect_timeout(options.webhook_timeout)
                    .redirect(reqwest::redirect::Policy::none())
                    .user_agent(concat!("streamworker/", env!("CARGO_PKG_VERSION")))
                    .build()
                    .map_err(|e| AlertsBuildError(format!("cannot build the HTTP client: {e}")))?;
                Some((client, parsed))
            }
        };
        Ok(Self {
            store,
            stream: stream.to_owned(),
            group: group.to_owned(),
            rules,
            families,
            state_key: format!("{base}state"),
            alerts_stream: options.stream.clone(),
            max_len: (options.max_len > 0).then_some(options.max_len),
            channel: options.channel.clone(),
            webhook,
            evaluate_every: options.evaluate_every,
            gap_ms: (options.evaluate_every * 10)
                .max(Duration::from_secs(30))
                .as_millis() as u64,
        })
    }

    /// The effects that count `entry`, as of `now` (ms): per bucket family, one HINCRBY per
    /// matching rule, one for the total when a rate rule needs it, and a PEXPIRE.
    pub fn count(&self, entry: &Entry, now: u64) -> Effects {
        // A replayed dead letter counts when it first happened.
        let at = entry.idempotency_id().ms;
        let mut effects = Effects::new();
        for family in &self.families {
            if at.saturating_add(family.keep_ms) < now {
                continue; // too old for any window: counting it would only make garbage
            }
            let key = family.key(at / family.width_ms);
            let before = effects.len();
            for &r in &family.counted {
                let rule = &self.rules[r];
                if rule.matches(entry) {
                    effects.push(Effect::HashIncr {
                        key: key.clone(),
                        field: rule.field.clone(),
                        by: 1,
                    });
                }
            }
            if family.all {
                effects.push(Effect::HashIncr {
                    key: key.clone(),
                    field: "all".into(),
                    by: 1,
                });
            }
            if effects.len() > before {
                effects.push(Effect::Expire {
                    key,
                    ttl: family.ttl,
                });
            }
        }
        effects
    }

    /// Judges every rule as of `now` (ms), announces the transitions (alerts stream,
    /// channel) and saves the rules' state. Returns the transitions; the caller sends the
    /// webhook.
    pub async fn evaluate(&self, now: u64) -> Result<Vec<Alert>, HandlerError> {
        // One round trip: the state hash and every bucket any rule needs.
        let mut keys = vec![self.state_key.clone()];
        let mut firsts = Vec::with_capacity(self.families.len());
        for f in &self.families {
            let last = now / f.width_ms;
            let first = last.saturating_sub(f.buckets - 1);
            firsts.push((keys.len(), first, last));
            keys.extend((first..=last).map(|b| f.key(b)));
        }
        let hashes = self
            .store
            .hashes(keys)
            .await
            .map_err(|e| HandlerError::retry(format!("cannot read the alert windows: {e}")))?;
        let state_hash: HashMap<&str, &str> = hashes
            .first()
            .map(|h| h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect())
            .unwrap_or_default();
        let fresh = state_hash
            .get(TICK_FIELD)
            .and_then(|t| t.parse::<u64>().ok())
            .is_none_or(|t| now.saturating_sub(t) > self.gap_ms);

        let mut writes = Vec::with_capacity(self.rules.len() + 2);
        let mut alerts = Vec::new();
        for rule in &self.rules {
            let stored = state_hash
                .get(rule.state_field.as_str())
                .and_then(|s| serde_json::from_str::<RuleState>(s).ok());
            let new = stored.is_none();
            let mut state = stored.unwrap_or_default();
            // Judge absence against the watching time after a restart has reset it.
            if fresh || new {
                state.since = now;
            }
            let seen = match rule.kind {
                RuleKind::Lag => self.observe_lag(rule).await,
                RuleKind::Consumers => self.observe_consumers(rule).await,
                _ => {
                    let (index, first, last) = firsts[rule.family];
                    let from = last.saturating_sub(rule.buckets - 1).max(first);
                    let mut matched = 0u64;
                    let mut all = 0u64;
                    for b in from..=last {
                        let bucket = hashes.get(index + (b - first) as usize);
                        for (field, value) in bucket.into_iter().flatten() {
                            if *field == rule.field {
                                matched += value.parse::<u64>().unwrap_or(0);
                            }
                            if field == "all" {
                                all += value.parse::<u64>().unwrap_or(0);
                            }
                        }
                    }
                    observe_window(rule, matched, all, now.saturating_sub(state.since))
                }
            };
            let change = step(
                &mut state,
                seen.firing,
                now,
                fresh || new,
                rule.hold_ms,
                rule.cooldown_ms,
            );
            if seen.firing.is_some() {
                state.value = Some(seen.value);
            }
            if let Some(change) = change {
                alerts.push(self.alert(rule, change, &seen, &state, now));
            }
            writes.push(Effect::HashSet {
                key: self.state_key.clone(),
                field: rule.state_field.clone(),
                value: serde_json::to_string(&state).unwrap_or_default(),
            });
        }
        writes.push(Effect::HashSet {
            key: self.state_key.clone(),
            field: TICK_FIELD.into(),
            value: now.to_string(),
        });
        writes.push(Effect::Expire {
            key: self.state_key.clone(),
            ttl: STATE_TTL,
        });

        // The events first: if saving the state then fails, the next evaluation announces
        // the change again (a duplicate) rather than never.
        if !alerts.is_empty() {
            let mut events = Vec::with_capacity(alerts.len() * 2);
            for alert in &alerts {
                events.push(Effect::StreamAdd {
                    key: self.alerts_stream.clone(),
                    fields: self.event_fields(alert),
                    max_len: self.max_len,
                });
                if !self.channel.is_empty() {
                    events.push(Effect::Publish {
                        channel: self.channel.clone(),
                        message: self.event_json(alert).to_string(),
                    });
                }
            }
            self.store.apply(events).await.map_err(|e| {
                HandlerError::retry(format!(
                    "cannot add alert events to {}: {e}",
                    self.alerts_stream
                ))
            })?;
            for a in &alerts {
                tracing::info!(stream = %self.stream, group = %self.group, rule = %a.rule, state = a.change.as_str(), value = a.value, message = %a.message, "alert");
            }
        }
        self.store
            .apply(writes)
            .await
            .map_err(|e| HandlerError::retry(format!("cannot save the alert rules' state: {e}")))?;
        Ok(alerts)
    }

    async fn observe_lag(&self, rule: &Rule) -> Observation {
        let Some((stream, group)) = &rule.watched else {
            return unknown();
        };
        match self.store.lag(stream.clone(), group.clone()).await {
            Ok(Some(lag)) => Observation {
                value: lag as f64,
                firing: Some(lag as f64 >= rule.threshold),
                detail: format!(
                    "group {group} on {stream} has {lag} entries not yet delivered (threshold {})",
                    show(rule.kind, rule.threshold)
                ),
            },
            Ok(None) => unknown(),
            Err(e) => {
                tracing::debug!(stream = %self.stream, group = %self.group, rule = %rule.name, error = %e, "cannot read a group's lag");
                unknown()
            }
        }
    }

    /// Consumers that received entries within the rule's window, judged only while
    /// entries wait for the group.
    ///
    /// Redis (before 7.2) refreshes a consumer's idle time only when a read or claim
    /// hands it entries, so a healthy consumer of a quiet stream looks idle; the rule
    /// therefore fires only while the group has entries not yet delivered (lag > 0, or lag
    /// unknown) and too few consumers took any within `window`. Idle times are the
    /// server's, so replicas' clocks do not matter; streamworker's parking consumer is
    /// not a reader.
    async fn observe_consumers(&self, rule: &Rule) -> Observation {
        let Some((stream, group)) = &rule.watched else {
            return unknown();
        };
        let (consumers, lag) = match tokio::join!(
            self.store.consumers(stream.clone(), group.clone()),
            self.store.lag(stream.clone(), group.clone())
        ) {
            (Ok(Some(consumers)), Ok(lag)) => (consumers, lag),
            (Ok(None), _) => return unknown(),
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!(stream = %self.stream, group = %self.group, rule = %rule.name, error = %e, "cannot read a group's consumers");
                return unknown();
            }
        };
        let within = rule.window.as_millis() as u64;
        // The store lists readers only: the daemon leaves out its parking consumer.
        let readers = || consumers.iter();
        let active = readers().filter(|(_, idle)| *idle < within).count();
        let wanted = rule.threshold;
        let waiting = match lag {
            Some(0) => "nothing waiting".to_owned(),
            Some(n) => format!("{n} entries waiting"),
            None => "an unknown number of entries waiting".to_owned(),
        };
        Observation {
            value: active as f64,
            firing: Some((active as f64) < wanted && lag != Some(0)),
            detail: format!(
                "group {group} on {stream} has {active} consumer{} active in the last {} ({} known; at least {} wanted) and {waiting}",
                if active == 1 { "" } else { "s" },
                human(rule.window),
                readers().count(),
                number(wanted)
            ),
        }
    }

    fn alert(
        &self,
        rule: &Rule,
        change: Change,
        seen: &Observation,
        state: &RuleState,
        now: u64,
    ) -> Alert {
        let mut message = format!(
            "{} {} on {} (group {}): {}",
            rule.name,
            change.as_str(),
            self.stream,
            self.group,
            seen.detail
        );
        if change == Change::Resolved
            && let Some(fired) = state.fired_at
        {
            message.push_str(&format!(
                "; fired {} ago",
                human(Duration::from_secs(now.saturating_sub(fired) / 1000))
            ));
        }
        if let Some(d) = &rule.description {
            message.push_str(" — ");
            message.push_str(d);
        }
        Alert {
            rule: rule.name.clone(),
            kind: rule.kind,
            change,
            value: seen.value,
            threshold: (rule.kind != RuleKind::Absence).then_some(rule.threshold),
            window: (rule.kind != RuleKind::Lag).then_some(rule.window),
            at: now,
            fired_at: state.fired_at,
            message,
        }
    }

    fn event_fields(&self, a: &Alert) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out: Vec<(&str, String)> = vec![
            ("rule", a.rule.clone()),
            ("kind", a.kind.as_str().into()),
            ("state", a.change.as_str().into()),
            ("stream", self.stream.clone()),
            ("group", self.group.clone()),
            ("value", number(a.value)),
        ];
        if let Some(t) = a.threshold {
            out.push(("threshold", number(t)));
        }
        if let Some(w) = a.window {
            out.push(("window", human(w)));
        }
        out.push(("at", rfc3339(a.at)));
        if let (Change::Resolved, Some(f)) = (a.change, a.fired_at) {
            out.push(("fired_at", rfc3339(f)));
        }
        out.push(("message", a.message.clone()));
        out.into_iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.into_bytes()))
            .collect()
    }

    fn event_json(&self, a: &Alert) -> serde_json::Value {
        let mut v = serde_json::json!({
            "rule": a.rule,
            "kind": a.kind.as_str(),
            "state": a.change.as_str(),
            "stream": self.stream,
            "group": self.group,
            "value": a.value,
            "threshold": a.threshold,
            "window": a.window.map(human),
            "at": rfc3339(a.at),
            "message": a.message,
        });
        if let (Change::Resolved, Some(f)) = (a.change, a.fired_at) {
            v["fired_at"] = rfc3339(f).into();
        }
        v
    }

    /// POSTs `{"text": …}` for each alert, all at once; failures are logged.
    async fn notify(&self, alerts: &[Alert]) {
        let Some((client, url)) = &self.webhook else {
            return;
        };
        let posts = alerts.iter().map(|a| async move {
            let icon = match a.change {
                Change::Firing => ":rotating_light:",
                Change::Resolved => ":white_check_mark:",
            };
            let body = serde_json::json!({ "text": format!("{icon} {}", a.message) });
            let result = client
                .post(url.clone())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string())
                .send()
                .await;
            let problem = match result {
                Ok(r) if r.status().is_success() => None,
                Ok(r) => Some(format!("answered {}", r.status())),
                Err(e) => Some(crate::one_line(e.without_url())),
            };
            if let Some(error) = problem {
                tracing::warn!(stream = %self.stream, group = %self.group, rule = %a.rule, state = a.change.as_str(), webhook = %redact_webhook(url.as_str()), error = %error, "could not deliver an alert to the webhook (the event is on the alerts stream)");
            }
        });
        futures_util::future::join_all(posts).await;
    }
}

fn unknown() -> Observation {
    Observation {
        value: 0.0,
        firing: None,
        detail: String::new(),
    }
}

/// Judges a windowed rule from its counts; `watched_ms` is how long the rule has been
/// watched without interruption.
fn observe_window(rule: &Rule, matched: u64, all: u64, watched_ms: u64) -> Observation {
    let window = human(rule.window);
    match rule.kind {
        RuleKind::Count => Observation {
            value: matched as f64,
            firing: Some(matched as f64 >= rule.threshold),
            detail: format!(
                "{matched} matching entries in the last {window} (threshold {})",
                show(rule.kind, rule.threshold)
            ),
        },
        RuleKind::Rate => {
            let rate = if all == 0 {
                0.0
            } else {
                matched as f64 / all as f64
            };
            Observation {
                value: rate,
                firing: Some(all >= rule.min_events && rate >= rule.threshold),
                detail: format!(
                    "{} of entries match ({matched} of {all}) in the last {window} (threshold {}, judged from {} entries)",
                    percent(rate),
                    percent(rule.threshold),
                    rule.min_events
                ),
            }
        }
        RuleKind::Absence => Observation {
            value: matched as f64,
            firing: if matched > 0 {
                Some(false)
            } else if watched_ms >= rule.window.as_millis() as u64 {
                Some(true)
            } else {
                None // not watched for a whole window yet
            },
            detail: if matched > 0 {
                format!("{matched} matching entries in the last {window}")
            } else {
                format!("no matching entry for {window}")
            },
        },
        RuleKind::Lag | RuleKind::Consumers => unknown(),
    }
}

fn show(kind: RuleKind, x: f64) -> String {
    match kind {
        RuleKind::Rate => percent(x),
        _ => number(x),
    }
}

fn number(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        let text = format!("{x:.6}");
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

fn percent(x: f64) -> String {
    let text = format!("{:.2}", x * 100.0);
    format!("{} %", text.trim_end_matches('0').trim_end_matches('.'))
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

impl Handler for Alerts {
    async fn handle(&self, entry: &Entry) -> Result<Effects, HandlerError> {
        Ok(self.count(entry, now_ms()))
    }

    fn tick_every(&self) -> Option<Duration> {
        Some(self.evaluate_every)
    }

    async fn tick(&self) -> Result<(), HandlerError> {
        let alerts = self.evaluate(now_ms()).await?;
        self.notify(&alerts).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EntryId, PayloadFormat, StoreError, StoreFuture};
    use std::sync::Mutex;

    /// An in-memory store that applies effects as Redis would.
    #[derive(Default)]
    struct FakeStore {
        hashes: Mutex<HashMap<String, BTreeMap<String, String>>>,
        events: Mutex<Vec<Vec<(String, String)>>>,
        published: Mutex<Vec<String>>,
        lag: Mutex<HashMap<(String, String), u64>>,
        consumers: Mutex<HashMap<(String, String), Consumers>>,
    }

    /// Each consumer's name and idle time, as XINFO CONSUMERS gives them.
    type Consumers = Vec<(String, u64)>;

    impl FakeStore {
        fn run(&self, effects: &[Effect]) {
            let mut hashes = self.hashes.lock().unwrap();
            for e in effects {
                match e {
                    Effect::HashIncr { key, field, by } => {
                        let v = hashes
                            .entry(key.clone())
                            .or_default()
                            .entry(field.clone())
                            .or_insert_with(|| "0".into());
                        *v = (v.parse::<i64>().unwrap() + by).to_string();
                    }
                    Effect::HashSet { key, field, value } => {
                        hashes
                            .entry(key.clone())
                            .or_default()
                            .insert(field.clone(), value.clone());
                    }
                    Effect::StreamAdd { fields, .. } => self.events.lock().unwrap().push(
                        fields
                            .iter()
                            .map(|(k, v)| {
                                (
                                    String::from_utf8_lossy(k).into_owned(),
                                    String::from_utf8_lossy(v).into_owned(),
                                )
                            })
                            .collect(),
                    ),
                    Effect::Publish { message, .. } => {
                        self.published.lock().unwrap().push(message.clone())
                    }
                    Effect::Expire { .. } | Effect::HashIncrFloat { .. } => {}
                }
            }
        }

        fn states(&self) -> Vec<String> {
            self.events
                .lock()
                .unwrap()
                .iter()
                .map(|e| {
                    let get = |k: &str| e.iter().find(|(n, _)| n == k).unwrap().1.clone();
                    format!("{}:{}", get("rule"), get("state"))
                })
                .collect()
        }
    }

    impl Store for FakeStore {
        fn apply(&self, effects: Vec<Effect>) -> StoreFuture<'_, ()> {
            self.run(&effects);
            Box::pin(async { Ok(()) })
        }
        fn hashes(&self, keys: Vec<String>) -> StoreFuture<'_, Vec<Vec<(String, String)>>> {
            let hashes = self.hashes.lock().unwrap();
            let out = keys
                .iter()
                .map(|k| {
                    hashes
                        .get(k)
                        .map(|h| h.iter().map(|(a, b)| (a.clone(), b.clone())).collect())
                        .unwrap_or_default()
                })
                .collect();
            Box::pin(async { Ok(out) })
        }
        fn get(&self, _key: String) -> StoreFuture<'_, Option<String>> {
            Box::pin(async { Ok(None) })
        }
        fn set(&self, _key: String, _value: String, _ttl: Option<Duration>) -> StoreFuture<'_, ()> {
            Box::pin(async { Ok(()) })
        }
        fn mark(&self, _key: String, _ttl: Duration) -> StoreFuture<'_, bool> {
            Box::pin(async { Err(StoreError("unused".into())) })
        }
        fn lag(&self, stream: String, group: String) -> StoreFuture<'_, Option<u64>> {
            let lag = self.lag.lock().unwrap().get(&(stream, group)).copied();
            Box::pin(async move { Ok(lag) })
        }
        fn consumers(
            &self,
            stream: String,
            group: String,
        ) -> StoreFuture<'_, Option<Vec<(String, u64)>>> {
            let consumers = self
                .consumers
                .lock()
                .unwrap()
                .get(&(stream, group))
                .cloned();
            Box::pin(async move { Ok(consumers) })
        }
    }

    fn options(toml_rules: &str) -> AlertsOptions {
        let text = format!("channel = \"live\"\n{toml_rules}");
        toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    fn limits() -> Limits {
        Limits {
            handler_timeout: Duration::from_secs(30),
            claim_idle: Duration::from_secs(120),
        }
    }

    fn entry(ms: u64, fields: &[(&str, &str)], format: &PayloadFormat) -> Entry {
        Entry::for_test(
            "ml_events",
            "alerts",
            EntryId::new(ms, 0),
            1,
            fields,
            format,
        )
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    const EXAMPLE: &str = r#"
stream = "alerts"
webhook = "https://hooks.slack.com/services/T000/B000/XXXXSECRET"
[[rules]]
name = "error-rate"
kind = "rate"
when = { event_type = "error" }
window = "1m"
threshold = 0.05
min_events = 20
cooldown = "10m"
[[rules]]
name = "silence"
kind = "absence"
window = "5m"
[[rules]]
name = "lagging-analytics"
kind = "lag"
group = "analytics"
threshold = 10000
"#;

    #[test]
    fn the_readme_example_is_valid() {
        let o = options(EXAMPLE);
        assert_eq!(o.validate(&limits()), vec![]);
        assert_eq!(o.rules[2].threshold, Some(10000.0));
        assert_eq!(o.rules[0].when["event_type"], Values(vec!["error".into()]));
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let o = options(
            r#"
evaluate_every = "2s"
[[rules]]
name = "a"
kind = "rate"
window = "5s"
threshold = 5
[[rules]]
name = "a"
kind = "absence"
window = "1m"
threshold = 3
min_events = 4
[[rules]]
name = "bad name!"
kind = "lag"
window = "1m"
when = { x = [] }
[[rules]]
name = "c"
kind = "count"
threshold = 2.5
"#,
        );
        let problems: Vec<String> = o
            .validate(&limits())
            .into_iter()
            .map(|p| format!("{} {}", p.key, p.message))
            .collect();
        let has = |needle: &str| {
            assert!(
                problems.iter().any(|p| p.contains(needle)),
                "no problem mentions {needle:?}: {problems:#?}"
            )
        };
        has("rules.0.window = \"5s\": too short");
        has("at least 10s");
        has("rules.0.threshold = 5: a rate threshold is a fraction");
        has("rules.0.when is missing");
        has("rules.1.name = \"a\": another rule has this name");
        has("rules.1.threshold does not apply to absence rules");
        has("rules.1.min_events does not apply");
        has("rules.2.name = \"bad name!\"");
        has("rules.2.window does not apply to lag rules");
        has("rules.2.threshold is missing");
        has("rules.2.when does not apply");
        has("rules.3.window is missing");
        has("rules.3.threshold = 2.5");
        assert_eq!(problems.len(), 12, "{problems:#?}");

        let empty = AlertsOptions::default().validate(&limits());
        assert_eq!(empty[0].key, "rules");
        let slow = AlertsOptions {
            webhook_timeout: Duration::from_secs(30),
            ..options(EXAMPLE)
        };
        assert_eq!(slow.validate(&limits())[0].key, "webhook_timeout");
    }

    #[test]
    fn unknown_kinds_and_keys_are_rejected_by_name() {
        let e = toml::from_str::<AlertsOptions>("[[rules]]\nname = \"x\"\nkind = \"ratio\"")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`ratio` is not a rule kind; choose count, rate, absence, lag or consumers"),
            "{e}"
        );
        let e = toml::from_str::<AlertsOptions>(
            "[[rules]]\nname = \"x\"\nkind = \"count\"\nthreshhold = 3",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown field `threshhold`"), "{e}");
    }

    #[test]
    fn the_webhook_url_is_redacted() {
        let r = options(EXAMPLE).redacted();
        let printed = format!("{r:?}");
        assert!(!printed.contains("SECRET"), "{printed}");
        assert_eq!(
            r.webhook.as_deref(),
            Some("https://hooks.slack.com/<redacted>")
        );
        assert_eq!(redact_webhook("not a url"), "<redacted>");
        // And the problem message of a bad URL does not print it either.
        let bad = AlertsOptions {
            webhook: Some("ftp://host/secret-path".into()),
            ..options(EXAMPLE)
        };
        let p = &bad.validate(&limits())[0];
        assert!(!p.message.contains("secret-path"), "{}", p.message);
    }

    #[test]
    fn windows_are_read_as_about_sixty_buckets() {
        let s = Duration::from_secs;
        assert_eq!(buckets_for(s(5)), (1000, 5));
        assert_eq!(buckets_for(s(60)), (1000, 60));
        assert_eq!(buckets_for(s(90)), (1000, 90));
        assert_eq!(buckets_for(s(300)), (5000, 60));
        assert_eq!(buckets_for(s(3600)), (60_000, 60));
        assert_eq!(buckets_for(s(24 * 3600)), (900_000, 96));
        assert_eq!(buckets_for(Duration::from_millis(5500)), (1000, 6));
        // Longer windows share shorter ones' buckets up to 600 of them.
        assert_eq!(bucket_widths(&[s(300), s(60)]), vec![1000, 1000]);
        assert_eq!(bucket_widths(&[s(60), s(3600)]), vec![1000, 60_000]);
        assert_eq!(
            bucket_widths(&[s(24 * 3600), s(5), s(600), s(3600), s(7200)]),
            vec![900_000, 1000, 1000, 60_000, 60_000]
        );
    }

    #[test]
    fn entries_only_count_matching_rules_into_their_bucket() {
        let o = options(
            r#"
[[rules]]
name = "errors"
kind = "rate"
when = { "data.level" = ["error", "fatal"], model = "gpt-4" }
window = "1m"
threshold = 0.1
[[rules]]
name = "quiet"
kind = "absence"
window = "10m"
"#,
        );
        let store = Arc::new(FakeStore::default());
        let a = Alerts::new(&o, "ml_events", "alerts", store).unwrap();
        let json = PayloadFormat::Json("event".into());
        let t = 1_700_000_012_345;
        let hit = entry(
            t,
            &[("event", r#"{"model":"gpt-4","data":{"level":"fatal"}}"#)],
            &json,
        );
        let effects = a.count(&hit, t + 10);
        // Both windows share one-second buckets; `quiet` matches everything, so it reads
        // the total instead of a field of its own.
        let key = "{ml_events}:alerts:alerts:bucket:1s:1700000012";
        assert_eq!(
            effects,
            vec![
                Effect::HashIncr {
                    key: key.into(),
                    field: "m:errors".into(),
                    by: 1
                },
                Effect::HashIncr {
                    key: key.into(),
                    field: "all".into(),
                    by: 1
                },
                Effect::Expire {
                    key: key.into(),
                    ttl: Duration::from_secs(606)
                },
            ]
        );
        let miss = entry(
            t,
            &[("event", r#"{"model":"gpt-4","data":{"level":"info"}}"#)],
            &json,
        );
        let effects = a.count(&miss, t);
        assert_eq!(effects.len(), 2, "{effects:?}");
        assert!(
            !effects
                .iter()
                .any(|e| matches!(e, Effect::HashIncr { field, .. } if field == "m:errors"))
        );
        // Too old for any window: nothing at all.
        assert_eq!(a.count(&miss, t + 3_600_000), vec![]);
    }

    #[test]
    fn one_incident_is_one_firing_and_one_resolved() {
        let (hold, cooldown) = (0, 10_000);
        let mut s = RuleState::default();
        assert_eq!(
            step(&mut s, Some(true), 1_000, true, hold, cooldown),
            Some(Change::Firing)
        );
        for t in (2_000..30_000).step_by(1_000) {
            assert_eq!(
                step(&mut s, Some(true), t, false, hold, cooldown),
                None,
                "at {t}"
            );
        }
        // Clear, but inside the cooldown: still firing, silently.
        let mut s2 = s.clone();
        s2.fired_at = Some(25_000);
        assert_eq!(
            step(&mut s2, Some(false), 30_000, false, hold, cooldown),
            None
        );
        assert_eq!(s2.state, Phase::Firing);
        // Unknown changes nothing.
        assert_eq!(step(&mut s, None, 31_000, false, hold, cooldown), None);
        assert_eq!(
            step(&mut s, Some(false), 32_000, false, hold, cooldown),
            Some(Change::Resolved)
        );
        assert_eq!(
            step(&mut s, Some(false), 33_000, false, hold, cooldown),
            None
        );
        assert_eq!(s.state, Phase::Ok);
        assert_eq!(s.fired_at, Some(1_000), "resolved events say when it fired");
    }

    #[test]
    fn for_requires_the_condition_to_last() {
        let mut s = RuleState::default();
        assert_eq!(step(&mut s, Some(true), 0, true, 5_000, 0), None);
        assert_eq!(s.state, Phase::Pending);
        assert_eq!(step(&mut s, Some(false), 1_000, false, 5_000, 0), None);
        assert_eq!(s.state, Phase::Ok);
        assert_eq!(step(&mut s, Some(true), 2_000, false, 5_000, 0), None);
        assert_eq!(step(&mut s, Some(true), 6_000, false, 5_000, 0), None);
        assert_eq!(
            step(&mut s, Some(true), 7_000, false, 5_000, 0),
            Some(Change::Firing)
        );
    }

    #[test]
    fn rate_rules_fire_once_and_resolve_across_evaluations() {
        let o = options(
            r#"
[[rules]]
name = "error-rate"
kind = "rate"
when = { event_type = "error" }
window = "10s"
threshold = 0.5
min_events = 4
cooldown = "5s"
"#,
        );
        let store = Arc::new(FakeStore::default());
        let a = Alerts::new(&o, "logs", "alerts", store.clone()).unwrap();
        let t0: u64 = 1_700_000_000_000;
        let fields = PayloadFormat::Fields;
        let feed = |at: u64, kind: &str| {
            store.run(&a.count(&entry(at, &[("event_type", kind)], &fields), at))
        };
        block_on(async {
            // Three errors: too few entries to judge.
            for i in 0..3 {
                feed(t0 + i * 100, "error");
            }
            assert!(a.evaluate(t0 + 1_000).await.unwrap().is_empty());
            feed(t0 + 1_100, "error");
            let fired = a.evaluate(t0 + 2_000).await.unwrap();
            assert_eq!(fired.len(), 1);
            assert_eq!(fired[0].change, Change::Firing);
            assert_eq!(fired[0].value, 1.0);
            assert!(
                fired[0].message.contains("100 % of entries match (4 of 4)"),
                "{}",
                fired[0].message
            );
            // Errors keep coming: silent.
            for s in 3..12 {
                feed(t0 + s * 1_000, "error");
                assert!(a.evaluate(t0 + s * 1_000 + 500).await.unwrap().is_empty());
            }
            // Then only good entries: resolves once the window's rate drops.
            let mut resolved = Vec::new();
            for s in 12..30 {
                for i in 0..3 {
                    feed(t0 + s * 1_000 + i * 10, "ok");
                }
                resolved.extend(a.evaluate(t0 + s * 1_000 + 500).await.unwrap());
            }
            assert_eq!(resolved.len(), 1, "{resolved:?}");
            assert_eq!(resolved[0].change, Change::Resolved);
        });
        assert_eq!(
            store.states(),
            vec!["error-rate:firing", "error-rate:resolved"]
        );
        assert_eq!(store.published.lock().unwrap().len(), 2);
        let json: serde_json::Value =
            serde_json::from_str(&store.published.lock().unwrap()[1]).unwrap();
        assert_eq!(json["state"], "resolved");
        assert_eq!(json["window"], "10s");
        assert!(
            json["fired_at"]
                .as_str()
                .unwrap()
                .starts_with("2023-11-14T22:13:2")
        );
    }

    #[test]
    fn absence_fires_after_a_whole_window_of_nothing_and_lag_reads_the_group() {
        let o = options(
            r#"
[[rules]]
name = "silence"
kind = "absence"
window = "5s"
cooldown = "0s"
[[rules]]
name = "backlog"
kind = "lag"
group = "analytics"
threshold = 100
"#,
        );
        let store = Arc::new(FakeStore::default());
        let a = Alerts::new(&o, "logs", "alerts", store.clone()).unwrap();
        let t0: u64 = 1_700_000_000_000;
        block_on(async {
            for s in 0..5 {
                assert!(a.evaluate(t0 + s * 1_000).await.unwrap().is_empty(), "{s}");
            }
            let fired = a.evaluate(t0 + 5_000).await.unwrap();
            assert_eq!(fired[0].rule, "silence");
            assert_eq!(fired[0].change, Change::Firing);
            store.run(&a.count(
                &entry(t0 + 5_500, &[("x", "1")], &PayloadFormat::Fields),
                t0 + 5_500,
            ));
            store
                .lag
                .lock()
                .unwrap()
                .insert(("logs".into(), "analytics".into()), 150);
            let changes = a.evaluate(t0 + 6_000).await.unwrap();
            let got: Vec<_> = changes
                .iter()
                .map(|c| (c.rule.as_str(), c.change))
                .collect();
            assert_eq!(
                got,
                vec![("silence", Change::Resolved), ("backlog", Change::Firing)]
            );
            assert_eq!(changes[1].value, 150.0);
            // A long gap without evaluations: watching starts over.
            assert!(a.evaluate(t0 + 600_000).await.unwrap().is_empty());
            assert!(a.evaluate(t0 + 604_000).await.unwrap().is_empty());
            assert_eq!(a.evaluate(t0 + 605_000).await.unwrap()[0].rule, "silence");
        });
    }

    #[test]
    fn a_consumers_rule_fires_when_nobody_has_read_within_its_window() {
        let o = options(
            r#"
[[rules]]
name = "nobody-learning"
kind = "consumers"
group = "learning"
stream = "user:feedback"
window = "30s"
threshold = 1
cooldown = "0s"
"#,
        );
        assert!(
            o.validate(&limits()).is_empty(),
            "{:?}",
            o.validate(&limits())
        );
        let store = Arc::new(FakeStore::default());
        let a = Alerts::new(&o, "logs", "alerts", store.clone()).unwrap();
        let set = |consumers: &[(&str, u64)]| {
            store.consumers.lock().unwrap().insert(
                ("user:feedback".into(), "learning".into()),
                consumers.iter().map(|(n, i)| (n.to_string(), *i)).collect(),
            );
        };
        let t0: u64 = 1_700_000_000_000;
        block_on(async {
            // No such group: unknown, nothing fires.
            assert!(a.evaluate(t0).await.unwrap().is_empty());
            set(&[("pod-a", 1_000)]);
            assert!(a.evaluate(t0 + 1_000).await.unwrap().is_empty());
            // The only reader went quiet, but nothing waits for it (a quiet stream): fine.
            let lag = |n: u64| {
                store
                    .lag
                    .lock()
                    .unwrap()
                    .insert(("user:feedback".into(), "learning".into()), n)
            };
            lag(0);
            set(&[("pod-a", 31_000)]);
            assert!(a.evaluate(t0 + 1_500).await.unwrap().is_empty());
            // Entries arrive and nobody takes them.
            lag(3);
            let fired = a.evaluate(t0 + 2_000).await.unwrap();
            assert_eq!(fired.len(), 1);
            assert_eq!(fired[0].change, Change::Firing);
            assert_eq!(fired[0].value, 0.0);
            assert!(
                fired[0]
                    .message
                    .contains("0 consumers active in the last 30s (1 known; at least 1 wanted) and 3 entries waiting"),
                "{}",
                fired[0].message
            );
            set(&[("pod-a", 31_000), ("pod-b", 200)]);
            let resolved = a.evaluate(t0 + 3_000).await.unwrap();
            assert_eq!(resolved[0].change, Change::Resolved);
        });
        let bad = options(
            r#"
[[rules]]
name = "c"
kind = "consumers"
threshold = 0.5
when = { a = "b" }
"#,
        );
        let keys: Vec<String> = bad.validate(&limits()).into_iter().map(|p| p.key).collect();
        for key in ["rules.0.window", "rules.0.threshold", "rules.0.when"] {
            assert!(keys.iter().any(|k| k == key), "{key} in {keys:?}");
        }
    }

    #[test]
    fn an_alerts_stream_equal_to_the_source_is_refused() {
        let o = options(EXAMPLE);
        let e = Alerts::new(&o, "alerts", "g", Arc::new(FakeStore::default())).unwrap_err();
        assert!(e.to_string().contains("own stream"), "{e}");
    }
}
