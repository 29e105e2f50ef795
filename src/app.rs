//! [`App`]: a streamworker binary, built-in handlers included.

use std::process::ExitCode;

/// A streamworker binary: every command (`run`, `check`, `status`, `dlq`, …).
#[derive(Debug, Default)]
pub struct App {}

impl App {
    pub fn new() -> Self {
        Self {}
    }

    /// Parses the command line, runs the command and answers the exit code.
    pub fn main(self) -> ExitCode {
        crate::cli::main()
    }
}
