//! The closed set of handler kinds, selected by a group's `handler = "…"` key, each with its
//! own options struct (`[groups.<name>.options]`). A new handler is one file, one variant
//! here and one match arm in the runtime; the compiler catches a missing arm.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use crate::alerts::AlertsOptions;
use crate::analytics::AnalyticsOptions;
use crate::forward::ForwardOptions;
use crate::learning::LearningOptions;
use crate::noop::NoopOptions;
use crate::warehouse::WarehouseOptions;
use crate::webhook::WebhookOptions;

/// A handler kind and its options, as configured.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "handler", content = "options", rename_all = "snake_case")]
pub enum HandlerSpec {
    Noop(NoopOptions),
    Webhook(WebhookOptions),
    Forward(ForwardOptions),
    /// Boxed: its options are large next to the others'.
    Learning(Box<LearningOptions>),
    Analytics(AnalyticsOptions),
    Warehouse(WarehouseOptions),
    Alerts(AlertsOptions),
}

/// The group settings a handler's options are checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub handler_timeout: Duration,
    /// Entries a batch handler holds before starting add their wait to their idle time,
    /// which must stay below this.
    pub claim_idle: Duration,
}

/// An option left out whose default would break a rule against another key, and that
/// therefore took a value derived from that key instead (`check` prints it marked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Derived {
    /// The option's key below `options`, e.g. `timeout`.
    pub key: String,
    /// The key it was derived from, as the group names it: `handler_timeout`,
    /// `claim_idle`, `options.window`.
    pub from: String,
}

impl Derived {
    pub(crate) fn new(key: &str, from: &str) -> Self {
        Self {
            key: key.to_owned(),
            from: from.to_owned(),
        }
    }
}

/// What a handler's options require of the group's limits. The group derives a limit the
/// user left out from these (e.g. `handler_timeout` from a webhook's explicit `timeout`),
/// so an explicit option never meets a default limit it cannot live with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Needs {
    /// `handler_timeout` must be at least this; with the option that asks for it.
    pub handler_timeout_at_least: Option<(Duration, &'static str)>,
    /// `handler_timeout` must be longer than this (a derived one is twice it); with the
    /// option that asks for it.
    pub handler_timeout_above: Option<(Duration, &'static str)>,
    /// `claim_idle` must exceed `handler_timeout` plus this (how long a batch handler holds
    /// an entry before it starts), whether the option is set or not.
    pub claim_idle_margin: Duration,
    /// The option behind `claim_idle_margin`, when the user set it.
    pub claim_idle_margin_key: Option<&'static str>,
    /// `claim_idle` must stay below this; with the option that asks for it.
    pub claim_idle_below: Option<(Duration, &'static str)>,
}

/// A problem with one option, found at load time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionProblem {
    /// The option's key below `options`, e.g. `url`.
    pub key: String,
    pub message: String,
}

impl HandlerSpec {
    /// The names `handler = "…"` accepts.
    pub const KINDS: &'static [&'static str] = &[
        "noop",
        "webhook",
        "forward",
        "learning",
        "analytics",
        "warehouse",
        "alerts",
    ];

    /// Deserializes the options of handler `kind` straight into its options struct.
    ///
    /// The configuration loader uses this rather than the enum's derived (adjacently
    /// tagged) `Deserialize`: that one buffers `options` whenever it comes before
    /// `handler` in the map, and the buffer loses the loader's string-to-number coercion,
    /// so an environment override such as `…__OPTIONS__THRESHOLD=0.4` (always a string)
    /// would be refused depending on map order.
    pub fn from_options<'de, D: Deserializer<'de>>(
        kind: &str,
        options: D,
    ) -> Result<Self, D::Error> {
        Ok(match kind {
            "noop" => Self::Noop(Deserialize::deserialize(options)?),
            "webhook" => Self::Webhook(Deserialize::deserialize(options)?),
            "forward" => Self::Forward(Deserialize::deserialize(options)?),
            "learning" => Self::Learning(Deserialize::deserialize(options)?),
            "analytics" => Self::Analytics(Deserialize::deserialize(options)?),
            "warehouse" => Self::Warehouse(Deserialize::deserialize(options)?),
            "alerts" => Self::Alerts(Deserialize::deserialize(options)?),
            other => return Err(serde::de::Error::unknown_variant(other, Self::KINDS)),
        })
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Self::Noop(_) => "noop",
            Self::Webhook(_) => "webhook",
            Self::Forward(_) => "forward",
            Self::Learning(_) => "learning",
            Self::Analytics(_) => "analytics",
            Self::Warehouse(_) => "warehouse",
            Self::Alerts(_) => "alerts",
        }
    }

    /// Cross-field checks serde cannot express, including against the group's limits.
    pub fn validate(&self, limits: &Limits) -> Vec<OptionProblem> {
        match self {
            Self::Noop(_) => Vec::new(),
            Self::Webhook(o) => o.validate(limits),
            Self::Forward(o) => o.validate(limits),
            Self::Learning(o) => o.validate(limits),
            Self::Analytics(o) => o.validate(),
            Self::Warehouse(o) => o.validate(limits),
            Self::Alerts(o) => o.validate(limits),
        }
    }

    /// What the options the user set (`is_set("timeout")`) require of the group's limits.
    pub fn needs(&self, is_set: &dyn Fn(&str) -> bool) -> Needs {
        match self {
            Self::Webhook(o) => o.needs(is_set),
            Self::Learning(o) => o.needs(is_set),
            Self::Warehouse(o) => o.needs(is_set),
            Self::Alerts(o) => o.needs(is_set),
            Self::Noop(_) | Self::Forward(_) | Self::Analytics(_) => Needs::default(),
        }
    }

    /// Replaces every option the user left out (`!is_set(key)`) whose default would
    /// break one of `validate`'s rules by a value derived from the key it conflicts with.
    /// Options the user set are never changed: a conflict between them stays an error.
    pub fn derive(&mut self, limits: &Limits, is_set: &dyn Fn(&str) -> bool) -> Vec<Derived> {
        match self {
            Self::Webhook(o) => o.derive(limits, is_set),
            Self::Learning(o) => o.derive(limits, is_set),
            Self::Warehouse(o) => o.derive(limits, is_set),
            Self::Alerts(o) => o.derive(limits, is_set),
            Self::Noop(_) | Self::Forward(_) | Self::Analytics(_) => Vec::new(),
        }
    }

    /// Checks against the group's stream, for options that name other streams (a
    /// forward's target must not be its source).
    pub fn validate_with_stream(&self, stream: &str) -> Vec<OptionProblem> {
        match self {
            Self::Forward(o) => o.validate_with_stream(stream),
            _ => Vec::new(),
        }
    }

    /// Streams the handler's effects append to in the same server-side script as the
    /// entry's XACK, by option key: under Redis Cluster each must share the group's
    /// stream's hash slot.
    pub fn acked_with(&self) -> Vec<(&'static str, &str)> {
        match self {
            // A partitioned forward adds outside the acknowledgement's script.
            Self::Forward(o) if o.partition_by.is_some() => Vec::new(),
            Self::Forward(o) => vec![("to", o.to.as_str())],
            _ => Vec::new(),
        }
    }

    /// A copy safe to print: every secret replaced by `"<redacted>"`.
    pub fn redacted(&self) -> Self {
        match self {
            Self::Noop(o) => Self::Noop(o.clone()),
            Self::Webhook(o) => Self::Webhook(o.redacted()),
            Self::Forward(o) => Self::Forward(o.clone()),
            Self::Learning(o) => Self::Learning(Box::new(o.redacted())),
            Self::Analytics(o) => Self::Analytics(o.clone()),
            Self::Warehouse(o) => Self::Warehouse(o.redacted()),
            Self::Alerts(o) => Self::Alerts(o.redacted()),
        }
    }
}
