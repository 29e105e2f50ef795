//! [`App`]: a streamworker binary, built-in handlers included, plus the handler kinds a
//! user's crate registers.

use std::process::ExitCode;

use streamworker_handlers::{HandlerKind, Register};

use crate::config::OptionKinds;
use crate::supervisor::Launchers;

/// A streamworker binary: every command (`run`, `check`, `status`, `dlq`, `pending`, …),
/// the built-in handler kinds, and the kinds added with [`App::handler`].
///
/// ```no_run
/// # use serde::{Deserialize, Serialize};
/// # use streamworker::{BuildError, Effects, Entry, Handler, HandlerContext, HandlerError,
/// #     HandlerKind, HandlerOptions};
/// # #[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
/// # struct Options {}
/// # impl HandlerOptions for Options {}
/// # struct Enrich;
/// # impl Handler for Enrich {
/// #     async fn handle(&self, _: &Entry) -> Result<Effects, HandlerError> { Ok(Effects::new()) }
/// # }
/// # impl HandlerKind for Enrich {
/// #     type Options = Options;
/// #     fn build(_: &Options, _: &HandlerContext) -> Result<Self, BuildError> { Ok(Enrich) }
/// # }
/// fn main() -> std::process::ExitCode {
///     streamworker::App::new().handler::<Enrich>("enrich").main()
/// }
/// ```
pub struct App {
    kinds: Kinds,
}

/// Every registration goes to both sides: configuration reads the kind's options, the
/// supervisor builds and runs its handler.
#[derive(Default)]
struct Kinds {
    names: Vec<&'static str>,
    options: OptionKinds,
    launchers: Launchers,
}

impl Register for Kinds {
    fn kind<H: HandlerKind>(&mut self, name: &'static str) {
        self.names.push(name);
        self.options.kind::<H>(name);
        self.launchers.kind::<H>(name);
    }
}

impl App {
    /// The shipped binary: every built-in handler kind (`noop`, `webhook`, `forward`,
    /// `learning`, `analytics`, `warehouse`, `alerts`).
    pub fn new() -> Self {
        let mut kinds = Kinds::default();
        streamworker_handlers::register_builtins(&mut kinds);
        Self { kinds }
    }

    /// Adds handler kind `H` under `name`: groups with `handler = "<name>"` run it, with
    /// their `[groups.<group>.options]` read into `H::Options`.
    ///
    /// # Panics
    ///
    /// When `name` is already taken (by a built-in or an earlier call): a group must know
    /// which handler it runs.
    pub fn handler<H: HandlerKind>(mut self, name: &'static str) -> Self {
        assert!(
            !self.kinds.names.contains(&name),
            "streamworker::App::handler: a handler kind named {name:?} is already registered; choose another name"
        );
        self.kinds.kind::<H>(name);
        self
    }

    /// The names `handler = "…"` accepts in this binary, in registration order.
    pub fn handler_names(&self) -> &[&'static str] {
        &self.kinds.names
    }

    /// Parses the command line, runs the command and answers the exit code. Call it once
    /// per process, from `main`.
    pub fn main(self) -> ExitCode {
        let Kinds {
            options, launchers, ..
        } = self.kinds;
        if !options.install() || !launchers.install() {
            eprintln!(
                "error: streamworker::App::main ran twice in one process; the handler kinds of the first run stay"
            );
            return ExitCode::from(1);
        }
        crate::cli::main()
    }
}

impl Default for App {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use streamworker_handlers::noop::Noop;

    use super::*;

    #[test]
    fn kinds_are_the_built_ins_then_the_added_ones() {
        let app = App::new().handler::<Noop>("nothing");
        assert_eq!(
            app.handler_names(),
            [
                "noop",
                "webhook",
                "forward",
                "learning",
                "analytics",
                "warehouse",
                "alerts",
                "nothing"
            ]
        );
    }

    #[test]
    #[should_panic(expected = "a handler kind named \"webhook\" is already registered")]
    fn a_taken_handler_name_is_refused() {
        let _ = App::new().handler::<Noop>("webhook");
    }
}
