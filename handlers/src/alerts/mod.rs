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
//!
//! # Layout
//!
//! - `options.rs`: `[groups.<name>.options]`, their checks and redaction;
//! - `buckets.rs`: the bucket widths windows are counted in, and bucket families;
//! - `state.rs`: a rule's state machine and what one evaluation observes;
//! - `notify.rs`: the events, messages and webhook posts of a transition;
//! - this file: the handler (counting entries, evaluating the rules).

mod buckets;
mod notify;
mod options;
mod state;

pub use buckets::{bucket_widths, buckets_for};
pub use options::{
    AlertsOptions, DEFAULT_MIN_EVENTS, RuleKind, RuleOptions, Values, redact_webhook,
};
pub use state::{Alert, Change, Observation, Phase, RuleState, step};

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::{Effect, Effects, Entry, Handler, HandlerError, Store};
use buckets::Family;
use notify::{number, show};
use options::{MIN_WINDOW, human};
use state::{observe_window, unknown};

#[derive(Debug, thiserror::Error)]
#[error("alerts: {0}")]
pub struct AlertsBuildError(String);

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
    use crate::Limits;
    use crate::{EntryId, MemoryStore, PayloadFormat};

    /// "rule:state" of each event on the alerts stream, oldest first.
    fn states(store: &MemoryStore) -> Vec<String> {
        store
            .stream("alerts")
            .iter()
            .map(|e| {
                let get = |k: &str| e.iter().find(|(n, _)| n == k).unwrap().1.clone();
                format!("{}:{}", get("rule"), get("state"))
            })
            .collect()
    }

    pub(super) fn options(toml_rules: &str) -> AlertsOptions {
        let text = format!("channel = \"live\"\n{toml_rules}");
        toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    pub(super) fn limits() -> Limits {
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

    pub(super) const EXAMPLE: &str = r#"
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
        let store = Arc::new(MemoryStore::new());
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
        let store = Arc::new(MemoryStore::new());
        let a = Alerts::new(&o, "logs", "alerts", store.clone()).unwrap();
        let t0: u64 = 1_700_000_000_000;
        let fields = PayloadFormat::Fields;
        let feed = |at: u64, kind: &str| {
            store
                .commit(&a.count(&entry(at, &[("event_type", kind)], &fields), at))
                .unwrap()
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
            states(&store),
            vec!["error-rate:firing", "error-rate:resolved"]
        );
        assert_eq!(store.published("live").len(), 2);
        let json: serde_json::Value = serde_json::from_str(&store.published("live")[1]).unwrap();
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
        let store = Arc::new(MemoryStore::new());
        let a = Alerts::new(&o, "logs", "alerts", store.clone()).unwrap();
        let t0: u64 = 1_700_000_000_000;
        block_on(async {
            for s in 0..5 {
                assert!(a.evaluate(t0 + s * 1_000).await.unwrap().is_empty(), "{s}");
            }
            let fired = a.evaluate(t0 + 5_000).await.unwrap();
            assert_eq!(fired[0].rule, "silence");
            assert_eq!(fired[0].change, Change::Firing);
            store
                .commit(&a.count(
                    &entry(t0 + 5_500, &[("x", "1")], &PayloadFormat::Fields),
                    t0 + 5_500,
                ))
                .unwrap();
            store.set_lag("logs", "analytics", Some(150));
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
        let store = Arc::new(MemoryStore::new());
        let a = Alerts::new(&o, "logs", "alerts", store.clone()).unwrap();
        let set = |consumers: &[(&str, u64)]| {
            store.set_consumers(
                "user:feedback",
                "learning",
                Some(consumers.iter().map(|(n, i)| (n.to_string(), *i)).collect()),
            );
        };
        let t0: u64 = 1_700_000_000_000;
        block_on(async {
            // No such group: unknown, nothing fires.
            assert!(a.evaluate(t0).await.unwrap().is_empty());
            set(&[("pod-a", 1_000)]);
            assert!(a.evaluate(t0 + 1_000).await.unwrap().is_empty());
            // The only reader went quiet, but nothing waits for it (a quiet stream): fine.
            let lag = |n: u64| store.set_lag("user:feedback", "learning", Some(n));
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
        let e = Alerts::new(&o, "alerts", "g", Arc::new(MemoryStore::new())).unwrap_err();
        assert!(e.to_string().contains("own stream"), "{e}");
    }
}
