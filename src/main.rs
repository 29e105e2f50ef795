//! The shipped `streamworker` binary: the built-in handlers and nothing else. A binary with
//! handlers of its own is the same line with `.handler::<H>("name")` before `.main()`.

use std::process::ExitCode;

fn main() -> ExitCode {
    streamworker::App::new().main()
}
