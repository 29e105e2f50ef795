//! Signals and the shutdown sequence, done visibly.
//!
//! The first SIGTERM or SIGINT starts a drain: groups stop reading, in-flight handlers get
//! `shutdown_timeout` to finish, acknowledgements are flushed and entries fetched but never
//! started are handed back. A second signal exits at once with 130. Signals are caught on a
//! thread of their own (signal-hook), so the hard exit works even if the runtime is stuck.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Exit status of a second signal.
pub const EXIT_SECOND_SIGNAL: i32 = 130;

/// A handle every task holds: tells whether and since when shutdown was requested.
#[derive(Clone, Debug)]
pub struct Shutdown {
    token: CancellationToken,
    started: Arc<OnceLock<Instant>>,
    timeout: Duration,
}

impl Shutdown {
    pub fn new(timeout: Duration) -> Self {
        Self {
            token: CancellationToken::new(),
            started: Arc::new(OnceLock::new()),
            timeout,
        }
    }

    /// Starts the drain (idempotent).
    pub fn trigger(&self) {
        let _ = self.started.set(Instant::now());
        self.token.cancel();
    }

    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves once shutdown was requested.
    pub async fn triggered(&self) {
        self.token.cancelled().await
    }

    /// When in-flight work is cut off: `shutdown_timeout` after the first signal.
    pub fn deadline(&self) -> Option<Instant> {
        self.started.get().map(|t| *t + self.timeout)
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// Catches SIGTERM and SIGINT on a dedicated thread: the first triggers `shutdown`, the
/// second exits the process with 130.
pub fn listen_for_signals(shutdown: Shutdown) -> std::io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    use signal_hook::iterator::Signals;

    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut seen = 0;
            for signal in signals.forever() {
                let name = if signal == SIGTERM { "SIGTERM" } else { "SIGINT" };
                seen += 1;
                if seen == 1 {
                    tracing::info!(
                        signal = name,
                        timeout = %streamworker_handlers::duration::format(shutdown.timeout()),
                        "shutting down: reading stopped, waiting for in-flight handlers (a second signal exits at once)"
                    );
                    shutdown.trigger();
                } else {
                    tracing::warn!(signal = name, "second signal: exiting now; unfinished entries stay pending for other replicas");
                    std::process::exit(EXIT_SECOND_SIGNAL);
                }
            }
        })?;
    Ok(())
}
