//! The shipped `streamworker` binary: the built-in handlers and nothing else. A binary with
//! handlers of its own is the same line with `.handler::<H>("name")` before `.main()`.

use std::process::ExitCode;

/// mimalloc instead of glibc's malloc: a drain allocates and frees a few small buffers per
/// entry on two threads, and glibc's malloc (with its consolidation and arena locks) took
/// about a fifth of the daemon's CPU doing it (profile in BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    streamworker::App::new().main()
}
