//! The built-in handler kinds, registered by name through the same traits as a user's own
//! ([`HandlerOptions`], [`HandlerKind`]): one line in [`register_builtins`] per kind. Each
//! impl delegates to the kind's own file, which owns its options' rules.

use std::sync::Arc;

use crate::alerts::{Alerts, AlertsOptions};
use crate::analytics::{Analytics, AnalyticsOptions};
use crate::forward::{Forward, ForwardOptions};
use crate::learning::{Learning, LearningOptions};
use crate::noop::{Noop, NoopOptions};
use crate::warehouse::{self, Warehouse, WarehouseOptions};
use crate::webhook::{Webhook, WebhookOptions};
use crate::{
    BuildError, Derived, HandlerContext, HandlerKind, HandlerOptions, Limits, Needs, OptionProblem,
    Register,
};

/// Registers every built-in kind under its `handler = "…"` name, in the order error
/// messages list them.
pub fn register_builtins(kinds: &mut impl Register) {
    kinds.kind::<Noop>("noop");
    kinds.kind::<Webhook>("webhook");
    kinds.kind::<Forward>("forward");
    kinds.kind::<Learning>("learning");
    kinds.kind::<Analytics>("analytics");
    kinds.kind::<Warehouse>("warehouse");
    kinds.kind::<Alerts>("alerts");
}

impl HandlerOptions for NoopOptions {}

impl HandlerKind for Noop {
    type Options = NoopOptions;
    fn build(options: &NoopOptions, _context: &HandlerContext) -> Result<Self, BuildError> {
        Ok(Noop::new(options))
    }
}

impl HandlerOptions for WebhookOptions {
    fn validate(&self, limits: &Limits) -> Vec<OptionProblem> {
        WebhookOptions::validate(self, limits)
    }
    fn needs(&self, is_set: &dyn Fn(&str) -> bool) -> Needs {
        WebhookOptions::needs(self, is_set)
    }
    fn derive(&mut self, limits: &Limits, is_set: &dyn Fn(&str) -> bool) -> Vec<Derived> {
        WebhookOptions::derive(self, limits, is_set)
    }
    fn redacted(&self) -> Self {
        WebhookOptions::redacted(self)
    }
}

impl HandlerKind for Webhook {
    type Options = WebhookOptions;
    fn build(options: &WebhookOptions, context: &HandlerContext) -> Result<Self, BuildError> {
        Webhook::new(options, context.concurrency).map_err(BuildError::new)
    }
}

impl HandlerOptions for ForwardOptions {
    fn validate(&self, limits: &Limits) -> Vec<OptionProblem> {
        ForwardOptions::validate(self, limits)
    }
    fn validate_with_stream(&self, stream: &str) -> Vec<OptionProblem> {
        ForwardOptions::validate_with_stream(self, stream)
    }
    fn acked_with(&self) -> Vec<(&'static str, &str)> {
        // A partitioned forward adds outside the acknowledgement's script (its partitions
        // spread over slots on purpose).
        if self.partition_by.is_some() {
            return Vec::new();
        }
        vec![("to", self.to.as_str())]
    }
}

impl HandlerKind for Forward {
    type Options = ForwardOptions;
    fn build(options: &ForwardOptions, context: &HandlerContext) -> Result<Self, BuildError> {
        Forward::new(options, &context.stream).map_err(BuildError::new)
    }
}

impl HandlerOptions for LearningOptions {
    fn validate(&self, limits: &Limits) -> Vec<OptionProblem> {
        LearningOptions::validate(self, limits)
    }
    fn needs(&self, is_set: &dyn Fn(&str) -> bool) -> Needs {
        LearningOptions::needs(self, is_set)
    }
    fn derive(&mut self, limits: &Limits, is_set: &dyn Fn(&str) -> bool) -> Vec<Derived> {
        LearningOptions::derive(self, limits, is_set)
    }
    fn redacted(&self) -> Self {
        LearningOptions::redacted(self)
    }
}

impl HandlerKind for Learning {
    type Options = LearningOptions;
    fn build(options: &LearningOptions, context: &HandlerContext) -> Result<Self, BuildError> {
        Learning::new(
            options,
            &context.stream,
            &context.group,
            Arc::clone(&context.store),
        )
        .map_err(BuildError::new)
    }
}

impl HandlerOptions for AnalyticsOptions {
    fn validate(&self, _limits: &Limits) -> Vec<OptionProblem> {
        AnalyticsOptions::validate(self)
    }
}

impl HandlerKind for Analytics {
    type Options = AnalyticsOptions;
    fn build(options: &AnalyticsOptions, _context: &HandlerContext) -> Result<Self, BuildError> {
        Ok(Analytics::new(options))
    }
}

impl HandlerOptions for WarehouseOptions {
    fn validate(&self, limits: &Limits) -> Vec<OptionProblem> {
        WarehouseOptions::validate(self, limits)
    }
    fn needs(&self, is_set: &dyn Fn(&str) -> bool) -> Needs {
        WarehouseOptions::needs(self, is_set)
    }
    fn derive(&mut self, limits: &Limits, is_set: &dyn Fn(&str) -> bool) -> Vec<Derived> {
        WarehouseOptions::derive(self, limits, is_set)
    }
    fn redacted(&self) -> Self {
        WarehouseOptions::redacted(self)
    }
}

impl HandlerKind for Warehouse {
    type Options = WarehouseOptions;
    fn build(options: &WarehouseOptions, context: &HandlerContext) -> Result<Self, BuildError> {
        let context = warehouse::Context {
            stream: context.stream.clone(),
            group: context.group.clone(),
            consumer: context.consumer.clone(),
            concurrency: context.concurrency,
            store: Arc::clone(&context.store),
        };
        Warehouse::new(options, context).map_err(BuildError::new)
    }
}

impl HandlerOptions for AlertsOptions {
    fn validate(&self, limits: &Limits) -> Vec<OptionProblem> {
        AlertsOptions::validate(self, limits)
    }
    fn needs(&self, is_set: &dyn Fn(&str) -> bool) -> Needs {
        AlertsOptions::needs(self, is_set)
    }
    fn derive(&mut self, limits: &Limits, is_set: &dyn Fn(&str) -> bool) -> Vec<Derived> {
        AlertsOptions::derive(self, limits, is_set)
    }
    fn redacted(&self) -> Self {
        AlertsOptions::redacted(self)
    }
}

impl HandlerKind for Alerts {
    type Options = AlertsOptions;
    fn build(options: &AlertsOptions, context: &HandlerContext) -> Result<Self, BuildError> {
        Alerts::new(
            options,
            &context.stream,
            &context.group,
            Arc::clone(&context.store),
        )
        .map_err(BuildError::new)
    }
}
