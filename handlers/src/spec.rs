//! What a handler kind is: its options (`[groups.<name>.options]`, [`HandlerOptions`]),
//! how one is built from them ([`HandlerKind`], with the group's [`HandlerContext`]), and
//! the checks options make against the group's limits. The built-in kinds implement these
//! traits like a user's own; the runtime keeps a registry of kinds by name
//! (`handler = "…"`), so a new kind is one registration.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Handler, Store};

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
    pub fn new(key: &str, from: &str) -> Self {
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

/// A problem with one option, found at load time. `check` reports it as
/// `groups.<name>.options.<key>` with the message, like a type error in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionProblem {
    /// The option's key below `options`, e.g. `url`.
    pub key: String,
    pub message: String,
}

impl OptionProblem {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// The options of a handler kind: what `[groups.<name>.options]` deserializes into.
///
/// Every method has a default, so options without cross-key rules need only
/// `impl HandlerOptions for MyOptions {}`. `Serialize` is for `check`, which prints the
/// resolved configuration (after [`HandlerOptions::redacted`]). Mark the struct
/// `#[serde(deny_unknown_fields)]` so a misspelt option is an error, as it is for the
/// built-ins.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use streamworker_handlers::{HandlerOptions, Limits, OptionProblem};
///
/// #[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
/// #[serde(deny_unknown_fields)]
/// struct Options {
///     factor: f64,
/// }
///
/// impl HandlerOptions for Options {
///     fn validate(&self, _limits: &Limits) -> Vec<OptionProblem> {
///         if self.factor.is_finite() && self.factor > 0.0 {
///             Vec::new()
///         } else {
///             vec![OptionProblem::new("factor", "must be a positive number")]
///         }
///     }
/// }
///
/// let bad = Options { factor: -1.0 };
/// let limits = Limits {
///     handler_timeout: std::time::Duration::from_secs(30),
///     claim_idle: std::time::Duration::from_secs(120),
/// };
/// assert_eq!(bad.validate(&limits)[0].key, "factor");
/// ```
pub trait HandlerOptions:
    Serialize + DeserializeOwned + Clone + Debug + PartialEq + Send + Sync + 'static
{
    /// Checks serde cannot express, including against the group's limits. Each problem
    /// names the option's key; `check` reports them all at once.
    fn validate(&self, _limits: &Limits) -> Vec<OptionProblem> {
        Vec::new()
    }

    /// What the options the user set (`is_set("timeout")`) require of the group's limits.
    fn needs(&self, _is_set: &dyn Fn(&str) -> bool) -> Needs {
        Needs::default()
    }

    /// Replaces every option the user left out (`!is_set(key)`) whose default would
    /// break one of `validate`'s rules by a value derived from the key it conflicts with.
    /// Options the user set are never changed: a conflict between them stays an error.
    fn derive(&mut self, _limits: &Limits, _is_set: &dyn Fn(&str) -> bool) -> Vec<Derived> {
        Vec::new()
    }

    /// Checks against the group's stream, for options that name other streams.
    fn validate_with_stream(&self, _stream: &str) -> Vec<OptionProblem> {
        Vec::new()
    }

    /// Streams the handler's effects append to in the same server-side script as the
    /// entry's acknowledgement, by option key: under Redis Cluster each must share the
    /// group's stream's hash slot, which `check` verifies.
    fn acked_with(&self) -> Vec<(&'static str, &str)> {
        Vec::new()
    }

    /// A copy safe to print: every secret replaced by `"<redacted>"`.
    fn redacted(&self) -> Self {
        self.clone()
    }
}

/// What the runtime knows about a group that its options do not say, given to
/// [`HandlerKind::build`].
#[derive(Clone)]
#[non_exhaustive]
pub struct HandlerContext {
    /// The stream the group reads.
    pub stream: String,
    /// The consumer group's name.
    pub group: String,
    /// This replica's consumer name (unique among live processes).
    pub consumer: String,
    /// How many handler calls may run at once in this replica (`concurrency`).
    pub concurrency: usize,
    /// The narrow view of Redis for state a handler keeps outside its effects.
    pub store: Arc<dyn Store>,
}

impl HandlerContext {
    /// A context for `group` on `stream`, with consumer `"test"` and a concurrency of 1
    /// (set the fields to change them). The runtime builds its own; this one is for tests.
    pub fn new(stream: impl Into<String>, group: impl Into<String>, store: Arc<dyn Store>) -> Self {
        Self {
            stream: stream.into(),
            group: group.into(),
            consumer: "test".to_owned(),
            concurrency: 1,
            store,
        }
    }
}

impl Debug for HandlerContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandlerContext")
            .field("stream", &self.stream)
            .field("group", &self.group)
            .field("consumer", &self.consumer)
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

/// Why a handler could not be built from valid options (a URL that does not parse, a
/// directory that cannot be created). The group fails to start with this message, and
/// the supervisor retries it with backoff.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BuildError(String);

impl BuildError {
    pub fn new(message: impl std::fmt::Display) -> Self {
        Self(message.to_string())
    }
}

/// A handler kind: its options and how a handler is built from them, once per group (and
/// again when the group restarts after a failure).
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use streamworker_handlers::{
///     BuildError, Effects, Entry, Handler, HandlerContext, HandlerError, HandlerKind,
///     HandlerOptions,
/// };
///
/// #[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
/// #[serde(deny_unknown_fields)]
/// struct Options {}
/// impl HandlerOptions for Options {}
///
/// struct Nothing;
///
/// impl Handler for Nothing {
///     async fn handle(&self, _entry: &Entry) -> Result<Effects, HandlerError> {
///         Ok(Effects::new())
///     }
/// }
///
/// impl HandlerKind for Nothing {
///     type Options = Options;
///     fn build(_options: &Options, _context: &HandlerContext) -> Result<Self, BuildError> {
///         Ok(Nothing)
///     }
/// }
/// ```
pub trait HandlerKind: Handler + Sized {
    type Options: HandlerOptions;

    fn build(options: &Self::Options, context: &HandlerContext) -> Result<Self, BuildError>;
}

/// Something that collects handler kinds by name: the runtime's registry. The built-ins
/// register through it ([`crate::register_builtins`]) exactly as `App::handler` does for
/// a user's kind.
pub trait Register {
    fn kind<H: HandlerKind>(&mut self, name: &'static str);
}
