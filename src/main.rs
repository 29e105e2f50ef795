//! The `streamworker` binary: command line, logging, runtime, exit codes. Everything else
//! lives in the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use streamworker::config::{self, ConfigError};
use streamworker::health::Health;
use streamworker::metrics::Metrics;
use streamworker::shutdown::{self, Shutdown};
use streamworker::supervisor::{self, Outcome};

/// Runs Redis Streams consumer groups: reclaim, retries, dead letters, graceful shutdown.
#[derive(Parser)]
#[command(name = "streamworker", version = streamworker::version(), about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every group in the configuration until SIGTERM or SIGINT.
    Run {
        /// The TOML configuration file.
        #[arg(short, long, env = "STREAMWORKER_CONFIG")]
        config: PathBuf,
    },
    /// Validate a configuration, report every problem at once, and print it resolved
    /// (defaults filled in, environment overrides applied, secrets redacted).
    Check {
        #[arg(short, long, env = "STREAMWORKER_CONFIG")]
        config: PathBuf,
    },
}

/// Exit codes of DESIGN §1.
const EXIT_FAILURE: u8 = 1;
const EXIT_BAD_CONFIG: u8 = 2;
const EXIT_CUT_OFF: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Run { config } => run(&config),
    }
}

fn load(path: &Path) -> Result<config::Config, ExitCode> {
    config::load(path).map_err(|e: ConfigError| {
        eprintln!("error: {e}");
        ExitCode::from(EXIT_BAD_CONFIG)
    })
}

fn check(path: &Path) -> ExitCode {
    match load(path) {
        Ok(config) => {
            print!("{}", config.to_redacted_toml());
            eprintln!("{} is valid", path.display());
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

fn run(path: &Path) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    streamworker::telemetry::init_logging(config.telemetry.log_format);
    match serve(config) {
        Ok(Outcome::Clean) => {
            tracing::info!("shut down cleanly");
            ExitCode::SUCCESS
        }
        Ok(Outcome::CutOff) => ExitCode::from(EXIT_CUT_OFF),
        Ok(Outcome::Failed(reason)) => {
            tracing::error!(error = %reason, "streamworker stopped");
            ExitCode::from(EXIT_FAILURE)
        }
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "streamworker could not start");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn serve(config: config::Config) -> anyhow::Result<Outcome> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("streamworker")
        .build()
        .context("cannot start the async runtime")?;
    let shutdown = Shutdown::new(config.worker.shutdown_timeout);
    shutdown::listen_for_signals(shutdown.clone()).context("cannot install signal handlers")?;
    let metrics = Metrics::new();
    let health = Health::new();
    runtime.block_on(async {
        if !config.http.listen.is_empty() {
            let addr = streamworker::http::serve(
                &config.http.listen,
                metrics.clone(),
                health.clone(),
                shutdown.clone(),
            )
            .await
            .with_context(|| {
                format!(
                    "cannot listen on http.listen = {:?}; choose a free port or set it to \"\" to turn the listener off",
                    config.http.listen
                )
            })?;
            tracing::info!(address = %addr, "serving /metrics, /livez and /readyz");
        }
        Ok(supervisor::run(config, shutdown, metrics, health).await)
    })
}
