//! A streamworker binary with every command and one more handler kind: `handler = "convert"`.

use std::process::ExitCode;

fn main() -> ExitCode {
    streamworker::App::new()
        .handler::<custom_handler::Convert>("convert")
        .main()
}
