//! The options of an alerts group (`[groups.<name>.options]`), their checks against the
//! group's limits, and their redacted form for `check`.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{Derived, Limits, Needs, OptionProblem};

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
pub(super) const MIN_WINDOW: Duration = Duration::from_secs(5);
const MIN_WINDOW_TICKS: u32 = 5;
const MAX_WINDOW: Duration = Duration::from_secs(24 * 3600);
const REDACTED: &str = "<redacted>";

pub(super) fn human(d: Duration) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::tests::{EXAMPLE, limits, options};

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
}
