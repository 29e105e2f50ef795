//! Handler kinds as configuration sees them: which names `handler = "…"` accepts, how each
//! kind's `[groups.<name>.options]` are read, and [`HandlerSpec`], a group's kind with its
//! options behind one object-safe interface (so `check`'s rules, derivations and redaction
//! treat a user's kind exactly like a built-in).
//!
//! The names are process-wide: `App::main` installs its kinds before any command loads a
//! file; without an `App` (the library's own tests), the built-ins.

use std::any::Any;
use std::fmt;
use std::sync::OnceLock;

use config::Value;
use streamworker_handlers::{
    Derived, HandlerKind, HandlerOptions, Limits, Needs, OptionProblem, Register,
};

/// Reads one kind's options, through the loader's path-tracking deserializer.
type Reader = for<'a, 'b> fn(
    serde_path_to_error::Deserializer<'a, 'b, Value>,
) -> Result<Box<dyn AnyOptions>, config::ConfigError>;

/// The option readers of every kind, by name, in registration order.
#[derive(Default)]
pub(crate) struct OptionKinds(Vec<(&'static str, Reader)>);

impl Register for OptionKinds {
    fn kind<H: HandlerKind>(&mut self, name: &'static str) {
        self.0.push((name, read::<H::Options>));
    }
}

impl OptionKinds {
    /// Makes these the kinds of this process. The first call wins; `false` after that.
    pub(crate) fn install(self) -> bool {
        INSTALLED.set(self).is_ok()
    }
}

static INSTALLED: OnceLock<OptionKinds> = OnceLock::new();

fn installed() -> &'static OptionKinds {
    INSTALLED.get_or_init(|| {
        let mut kinds = OptionKinds::default();
        streamworker_handlers::register_builtins(&mut kinds);
        kinds
    })
}

/// The names `handler = "…"` accepts, in registration order (built-ins first).
pub fn names() -> Vec<&'static str> {
    installed().0.iter().map(|(name, _)| *name).collect()
}

/// Reads the options of kind `name` (one of [`names`]).
pub(super) fn read_options(
    name: &str,
    options: serde_path_to_error::Deserializer<'_, '_, Value>,
) -> Result<HandlerSpec, config::ConfigError> {
    let Some((kind, reader)) = installed().0.iter().find(|(n, _)| *n == name) else {
        return Err(serde::de::Error::unknown_variant(name, &[]));
    };
    Ok(HandlerSpec {
        kind,
        options: reader(options)?,
    })
}

fn read<O: HandlerOptions>(
    options: serde_path_to_error::Deserializer<'_, '_, Value>,
) -> Result<Box<dyn AnyOptions>, config::ConfigError> {
    Ok(Box::new(<O as serde::Deserialize>::deserialize(options)?))
}

/// A group's handler kind and its options, as configured.
pub struct HandlerSpec {
    kind: &'static str,
    options: Box<dyn AnyOptions>,
}

impl HandlerSpec {
    /// Kind `kind` with these options (tests, and the stand-in for a group whose handler
    /// is unusable).
    pub fn new<O: HandlerOptions>(kind: &'static str, options: O) -> Self {
        Self {
            kind,
            options: Box::new(options),
        }
    }

    /// The name `handler = "…"` gave.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// The options, when they are of type `O`.
    pub fn options<O: HandlerOptions>(&self) -> Option<&O> {
        self.options.as_any().downcast_ref()
    }

    /// Cross-field checks serde cannot express, including against the group's limits.
    pub fn validate(&self, limits: &Limits) -> Vec<OptionProblem> {
        self.options.validate(limits)
    }

    /// See [`HandlerOptions::needs`].
    pub fn needs(&self, is_set: &dyn Fn(&str) -> bool) -> Needs {
        self.options.needs(is_set)
    }

    /// See [`HandlerOptions::derive`].
    pub fn derive(&mut self, limits: &Limits, is_set: &dyn Fn(&str) -> bool) -> Vec<Derived> {
        self.options.derive(limits, is_set)
    }

    /// See [`HandlerOptions::validate_with_stream`].
    pub fn validate_with_stream(&self, stream: &str) -> Vec<OptionProblem> {
        self.options.validate_with_stream(stream)
    }

    /// See [`HandlerOptions::acked_with`].
    pub fn acked_with(&self) -> Vec<(&'static str, &str)> {
        self.options.acked_with()
    }

    /// `handler = "…"` and `[options]`, every secret replaced by `"<redacted>"`, for
    /// `check`'s view.
    pub fn redacted_table(&self) -> toml::Table {
        let mut table = toml::Table::new();
        table.insert("handler".into(), toml::Value::String(self.kind.into()));
        table.insert(
            "options".into(),
            toml::Value::Table(self.options.redacted_table()),
        );
        table
    }
}

impl Clone for HandlerSpec {
    fn clone(&self) -> Self {
        Self {
            kind: self.kind,
            options: self.options.clone_box(),
        }
    }
}

impl PartialEq for HandlerSpec {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind && self.options.eq_box(other.options.as_ref())
    }
}

impl fmt::Debug for HandlerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerSpec")
            .field("kind", &self.kind)
            .field("options", &self.options)
            .finish()
    }
}

/// [`HandlerOptions`] of any kind, object-safe.
trait AnyOptions: fmt::Debug + Send + Sync {
    fn as_any(&self) -> &dyn Any;
    fn clone_box(&self) -> Box<dyn AnyOptions>;
    fn eq_box(&self, other: &dyn AnyOptions) -> bool;
    fn validate(&self, limits: &Limits) -> Vec<OptionProblem>;
    fn needs(&self, is_set: &dyn Fn(&str) -> bool) -> Needs;
    fn derive(&mut self, limits: &Limits, is_set: &dyn Fn(&str) -> bool) -> Vec<Derived>;
    fn validate_with_stream(&self, stream: &str) -> Vec<OptionProblem>;
    fn acked_with(&self) -> Vec<(&'static str, &str)>;
    fn redacted_table(&self) -> toml::Table;
}

impl<O: HandlerOptions> AnyOptions for O {
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn clone_box(&self) -> Box<dyn AnyOptions> {
        Box::new(self.clone())
    }
    fn eq_box(&self, other: &dyn AnyOptions) -> bool {
        other.as_any().downcast_ref::<O>() == Some(self)
    }
    fn validate(&self, limits: &Limits) -> Vec<OptionProblem> {
        HandlerOptions::validate(self, limits)
    }
    fn needs(&self, is_set: &dyn Fn(&str) -> bool) -> Needs {
        HandlerOptions::needs(self, is_set)
    }
    fn derive(&mut self, limits: &Limits, is_set: &dyn Fn(&str) -> bool) -> Vec<Derived> {
        HandlerOptions::derive(self, limits, is_set)
    }
    fn validate_with_stream(&self, stream: &str) -> Vec<OptionProblem> {
        HandlerOptions::validate_with_stream(self, stream)
    }
    fn acked_with(&self) -> Vec<(&'static str, &str)> {
        HandlerOptions::acked_with(self)
    }
    fn redacted_table(&self) -> toml::Table {
        toml::Table::try_from(HandlerOptions::redacted(self)).expect("options serialize")
    }
}
