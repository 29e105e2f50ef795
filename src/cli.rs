//! The command line every streamworker binary shares (the shipped one and a user's own,
//! built with [`crate::App`]): clap, logging, the runtime, exit codes. The edge of the
//! program, and the only module that uses `anyhow`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use streamworker::client::Client;
use streamworker::config::{self, ConfigError};
use streamworker::health::Health;
use streamworker::metrics::Metrics;
use streamworker::shutdown::{self, Shutdown};
use streamworker::supervisor::{self, Outcome};

/// Runs Redis Streams consumer groups: reclaim, retries, dead letters, graceful shutdown.
#[derive(Parser)]
#[command(
    name = "streamworker",
    version = streamworker::version(),
    about,
    after_help = "Examples:\n  streamworker demo --duration 15s\n  streamworker check -c streamworker.toml\n  streamworker run -c streamworker.toml\n  streamworker status -c streamworker.toml --watch\n\n`streamworker <command> --help` shows each command's flags and examples."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every group in the configuration (or those named by --groups) until SIGTERM or
    /// SIGINT. Groups with `enabled = false` are skipped.
    #[command(
        after_help = "Examples:\n  streamworker run -c streamworker.toml\n  STREAMWORKER_CONFIG=/etc/streamworker.toml streamworker run\n  streamworker run -c streamworker.toml --groups billing,audit   # one Deployment per group set"
    )]
    Run {
        /// The TOML configuration file.
        #[arg(short, long, env = "STREAMWORKER_CONFIG")]
        config: PathBuf,
        /// Run only these groups of the file (comma-separated), e.g. `billing,audit`.
        #[arg(long, value_delimiter = ',', value_name = "GROUP,...")]
        groups: Vec<String>,
    },
    /// Validate a configuration, report every problem at once, and print it resolved
    /// (defaults filled in, environment overrides applied, secrets redacted).
    #[command(
        after_help = "Examples:\n  streamworker check -c streamworker.toml\n  streamworker check -c streamworker.toml --json | jq '.groups'"
    )]
    Check {
        /// The TOML configuration file.
        #[arg(short, long, env = "STREAMWORKER_CONFIG")]
        config: PathBuf,
        /// Print the resolved configuration as JSON instead of TOML.
        #[arg(long)]
        json: bool,
    },
    /// Ask the running daemon's /livez (or /readyz) on its http.listen: exit 0 when it
    /// answers 200, else 1 with the reason. The image's HEALTHCHECK runs it, so the image
    /// needs no shell or curl.
    #[command(
        after_help = "Examples:\n  streamworker healthcheck -c streamworker.toml\n  streamworker healthcheck --ready --addr 127.0.0.1:9464 --timeout 2s"
    )]
    Healthcheck {
        /// The TOML configuration file the daemon runs (its http.listen is asked).
        #[arg(
            short,
            long,
            env = "STREAMWORKER_CONFIG",
            required_unless_present = "addr"
        )]
        config: Option<PathBuf>,
        /// Ask /readyz (Redis reachable, every group running) instead of /livez.
        #[arg(long)]
        ready: bool,
        /// host:port to ask instead of the configuration's http.listen, e.g. 127.0.0.1:9464.
        #[arg(long)]
        addr: Option<String>,
        /// Give up (unhealthy) after this long, e.g. 2s.
        #[arg(long, value_parser = streamworker_handlers::duration::parse, default_value = "2s")]
        timeout: std::time::Duration,
    },
    /// Per stream and group: length, lag, pending, oldest pending age, entries waiting
    /// for a retry, dead letters, consumers with idle times, circuit state.
    #[command(
        after_help = "Examples:\n  streamworker status -c streamworker.toml\n  streamworker status -c streamworker.toml --watch --interval 5s\n  streamworker status -c streamworker.toml --watch --json | jq -c '.[].groups[] | {group, lag, pending}'\n\nWith --watch, Ctrl-C (SIGINT) or SIGTERM stops it with exit code 0; a second signal exits at once with 130."
    )]
    Status {
        /// The TOML configuration file.
        #[arg(short, long, env = "STREAMWORKER_CONFIG")]
        config: PathBuf,
        /// Machine-readable output (with --watch: one JSON document per line and interval).
        #[arg(long)]
        json: bool,
        /// Refresh every --interval until Ctrl-C (redrawn in place on a terminal).
        #[arg(short, long)]
        watch: bool,
        /// How often --watch refreshes, e.g. `500ms`, `2s`, `1m` (at least 100ms).
        #[arg(long, default_value = "2s", value_parser = parse_interval, requires = "watch")]
        interval: std::time::Duration,
    },
    /// Inspect, replay and purge a group's dead letters.
    #[command(
        after_help = "Examples:\n  streamworker dlq list   -c streamworker.toml --group billing\n  streamworker dlq replay -c streamworker.toml --group billing --all --error 503 --rate 50/s"
    )]
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Measure throughput, cost per entry and latency against hand-written consumers, on
    /// a private redis-server (build with --release first).
    #[command(
        after_help = "Examples:\n  streamworker bench\n  streamworker bench --entries 50000 --runs 1 --replicas 1 --no-python\n  streamworker bench --entry-size 100 --partitions 1,4,16 --no-python"
    )]
    Bench {
        /// Pre-loaded entries each consumer drains.
        #[arg(long, default_value_t = 200_000)]
        entries: usize,
        /// Runs per consumer; the report shows medians.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// streamworker replica counts to measure.
        #[arg(long, value_delimiter = ',', default_value = "1,3")]
        replicas: Vec<usize>,
        /// Entries per second for the steady-state latency run.
        #[arg(long, default_value_t = 20_000)]
        rate: u64,
        /// How long the steady-state run produces.
        #[arg(long, value_parser = streamworker_handlers::duration::parse, default_value = "10s")]
        duration: std::time::Duration,
        /// Leave out the Python contenders (they need python3 and redis-py from PyPI).
        #[arg(long)]
        no_python: bool,
        /// The redis-server binary to start.
        #[arg(long, default_value = "redis-server")]
        redis_server: String,
        /// Entry sizes to drain, in bytes (4 fields; big entries drain fewer, at most
        /// 320 MB of them), each reported in a table of its own.
        #[arg(long, value_delimiter = ',', default_value = "100,1024,16384")]
        entry_size: Vec<usize>,
        /// Also drain this many partition streams (e.g. 1,4,16) on a private three-primary
        /// Redis Cluster, side by side with one stream on one server.
        #[arg(long, value_delimiter = ',')]
        partitions: Vec<u32>,
    },
    /// The product on a fresh machine: a private redis-server, realistic events, the four
    /// built-in groups (analytics, alerts, warehouse, learning) with a live summary, and a
    /// report of what each did.
    #[command(
        after_help = "Examples:\n  streamworker demo --duration 15s\n  streamworker demo --url redis://127.0.0.1:6379/15     # a Redis you started, until Ctrl-C"
    )]
    Demo {
        /// How long to run; until Ctrl-C when left out.
        #[arg(long, value_parser = streamworker_handlers::duration::parse)]
        duration: Option<std::time::Duration>,
        /// The redis-server binary to start.
        #[arg(long, default_value = "redis-server")]
        redis_server: String,
        /// Use this Redis instead of starting one (the demo writes to `ml_events`,
        /// `user:feedback`, `alerts` and `ai:adaptations` there and creates its groups).
        /// Only this flag: the environment's `STREAMWORKER__REDIS__URL` is production's, and
        /// the demo never writes there because it happens to be set in the shell.
        #[arg(long)]
        url: Option<String>,
    },
    /// Write realistic events of a seed scenario to its stream, at a rate.
    #[command(
        after_help = "Examples:\n  streamworker produce --scenario llm-observability --rate 500 --duration 30s\n  streamworker produce --scenario commerce --url redis://127.0.0.1:6379/0 --count 10000 --json"
    )]
    Produce {
        /// Which write-up's events.
        #[arg(long, value_enum)]
        scenario: streamworker::tools::produce::Scenario,
        /// The Redis to write to.
        #[arg(
            long,
            default_value = "redis://127.0.0.1:6379/0",
            env = "STREAMWORKER_PRODUCE_URL"
        )]
        url: String,
        /// Events per second.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this long (default: 10s when --count is not given).
        #[arg(long, value_parser = streamworker_handlers::duration::parse)]
        duration: Option<std::time::Duration>,
        /// Add a W3C `traceparent` field to each event (a producer span to link to).
        #[arg(long)]
        traceparent: bool,
        /// Produce the incident variant (failing LLM calls, one model rated poorly).
        #[arg(long)]
        incident: bool,
        /// The stream to write to (default: the scenario's).
        #[arg(long)]
        stream: Option<String>,
        /// Write each event to the partition of the stream its value of FIELD picks
        /// (`<stream>:p<crc32(value) % partitions>`); an event without FIELD is an error.
        #[arg(long, value_name = "FIELD", requires = "partitions")]
        partition_by: Option<String>,
        /// How many partitions the stream has (with --partition-by).
        #[arg(long, value_name = "N", requires = "partition_by", value_parser = clap::value_parser!(u32).range(1..))]
        partitions: Option<u32>,
        /// Print the summary (stream, events added) as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// The hand-written redis-rs consumer loop `bench` compares against.
    #[command(hide = true)]
    BenchContender {
        /// The Redis to read from.
        url: String,
        /// The stream to drain.
        stream: String,
        /// The consumer group to read as.
        group: String,
        /// The consumer name to read as.
        consumer: String,
    },
    /// Print a shell completion script, generated from these definitions, to stdout.
    #[command(
        after_help = "Examples:\n  streamworker completions bash > /etc/bash_completion.d/streamworker\n  streamworker completions zsh  > \"${fpath[1]}/_streamworker\"\n  streamworker completions fish > ~/.config/fish/completions/streamworker.fish"
    )]
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), generated from these definitions, to stdout.
    #[command(
        after_help = "Examples:\n  streamworker man | man -l -\n  streamworker man > /usr/local/share/man/man1/streamworker.1"
    )]
    Man,
    /// A group's pending entries, oldest first: who holds each, how long it has been idle,
    /// how often it was delivered and, for a retry waiting out its backoff (held by
    /// `streamworker:backoff`), when the retry is due.
    #[command(
        after_help = "Examples:\n  streamworker pending -c streamworker.toml --group billing\n  streamworker pending -c streamworker.toml --group billing --min-idle 1m --count 50 --json\n  streamworker pending -c streamworker.toml --group billing --consumer streamworker:backoff"
    )]
    Pending {
        #[command(flatten)]
        target: DlqTarget,
        /// Only entries held by this consumer, e.g. a pod name, or `streamworker:backoff`
        /// for the retries waiting out their backoff.
        #[arg(long)]
        consumer: Option<String>,
        /// Only entries idle for at least this long, e.g. `1m`.
        #[arg(long, value_parser = streamworker_handlers::duration::parse)]
        min_idle: Option<std::time::Duration>,
        /// At most this many rows (the oldest ids that match).
        #[arg(long, default_value_t = 100)]
        count: usize,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Move a group's position (XGROUP SETID) so that the entries after it are delivered to
    /// the group again; prints how many. Entries already pending stay with their owners.
    /// Changes nothing without --yes.
    #[command(
        after_help = "Examples:\n  streamworker rewind -c streamworker.toml --group billing --to 10m          # what the last 10 minutes added\n  streamworker rewind -c streamworker.toml --group billing --to 2024-05-01T12:00:00Z --yes\n  streamworker rewind -c streamworker.toml --group billing --to 1714564800000-0 --yes   # entries after this id"
    )]
    Rewind {
        #[command(flatten)]
        target: DlqTarget,
        /// The new position: an entry id (the entries after it are delivered again), an RFC
        /// 3339 time in UTC (entries added at or after it) or a duration ago, e.g. `10m`
        /// (entries added within it, by Redis's clock).
        #[arg(long, value_parser = streamworker::admin::rewind::parse_target)]
        to: streamworker::admin::rewind::Target,
        /// Move the group; without it, print what would happen and exit 2.
        #[arg(long)]
        yes: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Pause a group on every replica: within a claim_interval each stops reading and
    /// reclaiming; entries in flight finish and are settled. Lag grows until `resume`.
    #[command(
        after_help = "Examples:\n  streamworker pause  -c streamworker.toml --group billing\n  streamworker status -c streamworker.toml          # STATE shows paused\n  streamworker resume -c streamworker.toml --group billing"
    )]
    Pause {
        #[command(flatten)]
        target: DlqTarget,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Resume a paused group: every replica reads again within a claim_interval.
    #[command(after_help = "Example:\n  streamworker resume -c streamworker.toml --group billing")]
    Resume {
        #[command(flatten)]
        target: DlqTarget,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// What a group's handler has aggregated, read from its aggregates in Redis (analytics:
    /// entries, errors and error rate, event types, sums, latency percentiles, top values
    /// of each dimension).
    #[command(
        after_help = "Examples:\n  streamworker stats -c streamworker.toml --group llm-usage --since 1h --top 3\n  streamworker stats -c streamworker.toml --group llm-usage --since 7d --json"
    )]
    Stats {
        /// The TOML configuration file.
        #[arg(short, long, env = "STREAMWORKER_CONFIG")]
        config: PathBuf,
        /// The consumer group (a `[groups.<name>]` table of the configuration).
        #[arg(short, long)]
        group: String,
        /// How far back, e.g. `15m`, `1h`, `7d` (whole minutes, the current one included).
        #[arg(long, default_value = "1h", value_parser = streamworker_handlers::duration::parse)]
        since: std::time::Duration,
        /// Values shown per dimension, most entries first; 0 shows all.
        #[arg(long, default_value_t = 10)]
        top: usize,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct DlqTarget {
    /// The TOML configuration file.
    #[arg(short, long, env = "STREAMWORKER_CONFIG")]
    config: PathBuf,
    /// The consumer group (a `[groups.<name>]` table of the configuration).
    #[arg(short, long)]
    group: String,
    /// For a partitioned group (`partitions = N`): the partition, 0 to N-1, whose stream,
    /// dead letters and pending entries to work on (each partition has its own).
    #[arg(long, value_name = "P")]
    partition: Option<u32>,
}

#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct Which {
    /// Every dead letter.
    #[arg(long)]
    all: bool,
    /// These dead letters (ids in the dead-letter stream); repeatable.
    #[arg(long = "id", value_name = "ID")]
    ids: Vec<String>,
    /// Dead letters added within this long, e.g. `1h`.
    #[arg(long, value_parser = streamworker_handlers::duration::parse)]
    since: Option<std::time::Duration>,
    /// Dead letters added longer ago than this, e.g. `7d`.
    #[arg(long, value_parser = streamworker_handlers::duration::parse)]
    before: Option<std::time::Duration>,
}

impl Which {
    /// The selection as the operator gave it, for a confirmation question.
    fn describe(&self) -> String {
        if self.all {
            "every dead letter".into()
        } else if let Some(d) = self.since {
            format!(
                "the dead letters added within {}",
                streamworker::admin::human(d)
            )
        } else if let Some(d) = self.before {
            format!(
                "the dead letters added more than {} ago",
                streamworker::admin::human(d)
            )
        } else {
            format!("the dead letters {}", self.ids.join(", "))
        }
    }

    fn selection(self) -> streamworker::admin::dlq::Selection {
        use streamworker::admin::dlq::Selection;
        if self.all {
            Selection::All
        } else if let Some(d) = self.since {
            Selection::Since(d)
        } else if let Some(d) = self.before {
            Selection::Before(d)
        } else {
            Selection::Ids(self.ids)
        }
    }
}

#[derive(Subcommand)]
enum DlqAction {
    /// The oldest dead letters with their error and attempts.
    #[command(
        after_help = "Example:\n  streamworker dlq list -c streamworker.toml --group billing --count 50"
    )]
    List {
        #[command(flatten)]
        target: DlqTarget,
        /// How many to show.
        #[arg(long, default_value_t = 20)]
        count: usize,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// One dead letter in full.
    #[command(
        after_help = "Example:\n  streamworker dlq show -c streamworker.toml --group billing 1714564800000-0"
    )]
    Show {
        #[command(flatten)]
        target: DlqTarget,
        /// Its id in the dead-letter stream.
        id: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Re-add dead letters to their origin stream for this group (the other groups on the
    /// stream skip them); each dead letter is removed in the same step, so a replay can be
    /// interrupted and run again. On a terminal, a progress line on stderr.
    #[command(
        after_help = "Examples:\n  streamworker dlq replay -c streamworker.toml --group billing --all --dry-run\n  streamworker dlq replay -c streamworker.toml --group billing --since 1h --error \"503\" --rate 20/s"
    )]
    Replay {
        #[command(flatten)]
        target: DlqTarget,
        #[command(flatten)]
        which: Which,
        /// List what would be replayed (id, origin id, deliveries, error); change nothing.
        #[arg(long)]
        dry_run: bool,
        /// At most this many replays a second, e.g. `50/s`, to spare the downstream.
        #[arg(long, value_parser = parse_rate, value_name = "N/s")]
        rate: Option<f64>,
        /// Only dead letters whose `dlq_error` contains this text, e.g. `503`.
        #[arg(long, value_name = "SUBSTRING")]
        error: Option<String>,
        /// Machine-readable output: one JSON document at the end.
        #[arg(long)]
        json: bool,
    },
    /// Delete dead letters for good. Asks first on a terminal; elsewhere needs --yes.
    #[command(
        after_help = "Example:\n  streamworker dlq purge -c streamworker.toml --group billing --before 7d --yes"
    )]
    Purge {
        #[command(flatten)]
        target: DlqTarget,
        #[command(flatten)]
        which: Which,
        /// Delete without asking (required when stdin is not a terminal, e.g. in scripts).
        #[arg(long)]
        yes: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// Exit codes of DESIGN §1.
const EXIT_FAILURE: u8 = 1;
const EXIT_BAD_CONFIG: u8 = 2;
const EXIT_CUT_OFF: u8 = 3;

pub(crate) fn main() -> ExitCode {
    let cli = Cli::parse();
    // One TLS provider (ring) for every HTTPS client in the process: webhooks and the
    // OTLP exporter.
    streamworker_handlers::webhook::install_tls_provider();

    match cli.command {
        Command::Check { config, json } => check(&config, json),
        Command::Healthcheck {
            config,
            ready,
            addr,
            timeout,
        } => healthcheck(config.as_deref(), ready, addr.as_deref(), timeout),
        Command::Run { config, groups } => run(&config, &groups),
        Command::Status {
            config,
            json,
            watch: false,
            ..
        } => admin(&config, |client, config| {
            Box::pin(async move {
                let text = streamworker::admin::status::run(&client, &config, json).await?;
                print!("{text}");
                Ok(())
            })
        }),
        Command::Status {
            config,
            json,
            watch: true,
            interval,
        } => admin(&config, move |client, config| {
            Box::pin(async move {
                use std::io::IsTerminal;
                // The daemon's signal handling: the first Ctrl-C ends the watch cleanly
                // (exit 0), a second one exits at once with 130.
                let stop = Shutdown::new(std::time::Duration::ZERO);
                shutdown::listen_for_signals(stop.clone())
                    .context("cannot install signal handlers")?;
                let options = streamworker::admin::status::Watch {
                    json,
                    interval,
                    terminal: std::io::stdout().is_terminal(),
                };
                streamworker::admin::status::watch(
                    &client,
                    &config,
                    &options,
                    stop.triggered(),
                    &mut std::io::stdout(),
                )
                .await?;
                Ok(())
            })
        }),
        Command::Dlq { action } => dlq(action),
        Command::Pending {
            target,
            consumer,
            min_idle,
            count,
            json,
        } => {
            let query = streamworker::admin::pending::Query {
                consumer,
                min_idle,
                count,
                json,
            };
            on_group(target, false, move |client, config, group| {
                Box::pin(async move {
                    let text = streamworker::admin::pending::run(
                        &client,
                        &group,
                        config.worker.claim_interval,
                        &query,
                    )
                    .await?;
                    print!("{text}");
                    Ok(())
                })
            })
        }
        Command::Rewind {
            target,
            to,
            yes,
            json,
        } => on_group(target, false, move |client, _, group| {
            Box::pin(async move {
                let plan = streamworker::admin::rewind::run(&client, &group, &to, yes).await?;
                if json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&plan).expect("serializes")
                    );
                } else {
                    print!("{}", plan.render());
                }
                if !yes {
                    return Err(Refused(format!(
                        "nothing changed: moving group {} changes what it reads next; run again with --yes to do it",
                        group.name
                    ))
                    .into());
                }
                Ok(())
            })
        }),
        Command::Pause { target, json } => pause(target, json, true),
        Command::Resume { target, json } => pause(target, json, false),
        Command::Bench {
            entries,
            runs,
            replicas,
            rate,
            duration,
            no_python,
            redis_server,
            entry_size,
            partitions,
        } => {
            let options = streamworker::tools::bench::Options {
                entries,
                runs,
                replicas,
                rate,
                duration,
                python: !no_python,
                redis_server,
                entry_sizes: entry_size,
                partitions,
            };
            match streamworker::tools::bench::run(&options) {
                Ok(report) => {
                    print!("{report}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
        Command::Demo {
            duration,
            redis_server,
            url,
        } => match streamworker::tools::demo::run(streamworker::tools::demo::Options {
            duration,
            redis_server,
            url,
        }) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(EXIT_FAILURE)
            }
        },
        Command::Produce {
            scenario,
            url,
            rate,
            count,
            duration,
            traceparent,
            incident,
            stream,
            partition_by,
            partitions,
            json,
        } => {
            let stream = stream.unwrap_or_else(|| scenario.stream().to_owned());
            let partitioning = partition_by.zip(partitions).map(|(field, partitions)| {
                streamworker::tools::produce::Partitioning { field, partitions }
            });
            match produce(
                scenario,
                &stream,
                partitioning.as_ref(),
                &url,
                rate,
                count,
                duration,
                traceparent,
                incident,
            ) {
                Ok(n) => {
                    let partitions = partitioning.as_ref().map(|p| p.partitions);
                    if json {
                        let value = serde_json::json!({ "stream": stream, "partitions": partitions, "added": n });
                        println!("{value}");
                    } else if let Some(p) = partitions {
                        eprintln!("added {n} events to the {p} partitions of {stream}");
                    } else {
                        eprintln!("added {n} events to {stream}");
                    }
                    ExitCode::SUCCESS
                }
                Err(code) => code,
            }
        }
        Command::BenchContender {
            url,
            stream,
            group,
            consumer,
        } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            match runtime.block_on(streamworker::tools::bench::contender::hand_written_loop(
                &url, &stream, &group, &consumer,
            )) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "streamworker", &mut script);
            print_generated("completion script", Ok(script))
        }
        Command::Man => {
            use clap::CommandFactory;
            print_generated("manual page", man_page(Cli::command()))
        }
        Command::Stats {
            config,
            group,
            since,
            top,
            json,
        } => stats(
            &config,
            group,
            streamworker::admin::stats::Query { since, top, json },
        ),
    }
}

type AdminFuture = std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>>>>;

/// A command that changes something and was not told to go ahead (`--yes`): it exits 2,
/// bad usage, after saying what it would have done.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refused(String);

/// `--interval 2s` of `status --watch`: a human duration, not so short that the watch
/// becomes load on Redis.
fn parse_interval(text: &str) -> Result<std::time::Duration, String> {
    let d = streamworker_handlers::duration::parse(text)?;
    if d < std::time::Duration::from_millis(100) {
        return Err(format!(
            "`{text}` is too short an interval; use 100ms or more, e.g. `2s`"
        ));
    }
    Ok(d)
}

/// The manual page: `streamworker(1)`, then a section per subcommand (nested ones
/// included) with its synopsis, flags and examples, so one page documents the whole CLI.
fn man_page(cli: clap::Command) -> std::io::Result<Vec<u8>> {
    let cli = cli.disable_help_subcommand(true);
    let mut out = Vec::new();
    let man = clap_mangen::Man::new(cli.clone());
    man.render_title(&mut out)?;
    let mut roff = Vec::new();
    man.render_name_section(&mut roff)?;
    man.render_synopsis_section(&mut roff)?;
    man.render_description_section(&mut roff)?;
    man.render_options_section(&mut roff)?;
    out.extend(without_preamble(&roff).into_bytes());
    out.extend(examples(&man, ".SH")?);
    let mut roff = Vec::new();
    man.render_version_section(&mut roff)?;
    out.extend(without_preamble(&roff).into_bytes());
    let mut pending: Vec<(String, clap::Command)> = cli
        .get_subcommands()
        .filter(|c| !c.is_hide_set())
        .map(|c| (format!("streamworker {}", c.get_name()), c.clone()))
        .collect();
    while !pending.is_empty() {
        let (path, sub) = pending.remove(0);
        let children: Vec<(String, clap::Command)> = sub
            .get_subcommands()
            .filter(|c| !c.is_hide_set() && c.get_name() != "help")
            .map(|c| (format!("{path} {}", c.get_name()), c.clone()))
            .collect();
        let page = clap_mangen::Man::new(sub.bin_name(path.clone()));
        let mut roff = Vec::new();
        page.render_synopsis_section(&mut roff)?;
        page.render_description_section(&mut roff)?;
        page.render_options_section(&mut roff)?;
        // Each part opens its own `.SH`: here the command is the section, the parts its
        // subsections (synopsis and description need no heading of their own).
        let text = without_preamble(&roff)
            .replace(".SH SYNOPSIS\n", "")
            .replace(".SH DESCRIPTION\n", ".PP\n")
            .replace(".SH ", ".SS ");
        out.extend(format!(".SH \"{}\"\n", path.to_uppercase()).into_bytes());
        out.extend(text.into_bytes());
        out.extend(examples(&page, ".SS")?);
        pending.splice(0..0, children);
    }
    Ok(out)
}

/// A command's `after_help` (its examples) as an EXAMPLES section under `heading`
/// (`.SH`/`.SS`), lines kept as written (`.nf`).
fn examples(page: &clap_mangen::Man, heading: &str) -> std::io::Result<Vec<u8>> {
    let mut roff = Vec::new();
    page.render_extra_section(&mut roff)?;
    let text = without_preamble(&roff);
    let body = text.strip_prefix(".SH EXTRA\n").unwrap_or(&text);
    let body = body.strip_prefix("Examples:\n").unwrap_or(body);
    let body = body.strip_prefix("Example:\n").unwrap_or(body);
    if body.trim().is_empty() {
        return Ok(Vec::new());
    }
    Ok(format!("{heading} EXAMPLES\n.nf\n{body}.fi\n").into_bytes())
}

/// Rendered roff without the string definitions clap_mangen starts every render with
/// (`.ie \n(.g .ds Aq …`): the page's title render has them once.
fn without_preamble(roff: &[u8]) -> String {
    String::from_utf8_lossy(roff)
        .lines()
        .filter(|l| !l.starts_with(".ie \\n(.g .ds Aq") && !l.starts_with(".el .ds Aq"))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Writes generated text to stdout; a reader that went away (`| head`) is not an error.
fn print_generated(what: &str, bytes: std::io::Result<Vec<u8>>) -> ExitCode {
    use std::io::Write;
    let written = bytes.and_then(|b| {
        let mut out = std::io::stdout().lock();
        out.write_all(&b)?;
        out.flush()
    });
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: cannot write the {what} to stdout: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// `--rate 50/s` (or `50`): replays per second.
fn parse_rate(text: &str) -> Result<f64, String> {
    let number = text.trim().strip_suffix("/s").unwrap_or(text.trim());
    match number.parse::<f64>() {
        Ok(n) if n.is_finite() && n > 0.0 => Ok(n),
        _ => Err(format!(
            "`{text}` is not a rate; write replays per second like `50/s` or `0.5/s`"
        )),
    }
}

/// Runs an operator command: loads the configuration, connects once, runs `body`.
fn admin(path: &Path, body: impl FnOnce(Client, config::Config) -> AdminFuture) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let result = runtime.block_on(async {
        let client = Client::connect(&config.redis).await.with_context(|| {
            format!(
                "cannot use Redis at {}",
                streamworker::client::describe(&config.redis)
            )
        })?;
        body(client, config).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<Refused>() => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_BAD_CONFIG)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Asks `question` on the terminal; true when the answer is yes.
fn confirm(question: &str) -> bool {
    use std::io::Write;
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer).is_ok()
        && matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes")
}

fn dlq(action: DlqAction) -> ExitCode {
    use std::io::IsTerminal;
    type Work = Box<dyn FnOnce(Client, config::GroupConfig) -> AdminFuture>;
    let (target, work): (DlqTarget, Work) = match action {
        DlqAction::List {
            target,
            count,
            json,
        } => (
            target,
            Box::new(move |client, group| {
                Box::pin(async move {
                    print!(
                        "{}",
                        streamworker::admin::dlq::list(&client, &group, count, json).await?
                    );
                    Ok(())
                })
            }),
        ),
        DlqAction::Show { target, id, json } => (
            target,
            Box::new(move |client, group| {
                Box::pin(async move {
                    match streamworker::admin::dlq::show(&client, &group, &id, json).await? {
                        Some(text) => {
                            print!("{text}");
                            Ok(())
                        }
                        None => anyhow::bail!(
                            "no dead letter {id} in {}; `streamworker dlq list` shows the ids",
                            group.dead_letter_stream()
                        ),
                    }
                })
            }),
        ),
        DlqAction::Replay {
            target,
            which,
            dry_run,
            rate,
            error,
            json,
        } => (
            target,
            Box::new(move |client, group| {
                Box::pin(async move {
                    let selection = which.selection();
                    let options = streamworker::admin::dlq::ReplayOptions {
                        dry_run,
                        rate,
                        error,
                        json,
                        progress: std::io::stderr().is_terminal(),
                    };
                    let mut out = std::io::stdout();
                    let report = streamworker::admin::dlq::replay(
                        &client, &group, &selection, &options, &mut out,
                    )
                    .await?;
                    if json {
                        println!(
                            "{}",
                            serde_json::to_string_pretty(&report).expect("serializes")
                        );
                    }
                    let n = report.replayed;
                    let mut summary = format!(
                        "{} {n} dead letter{} to {}",
                        if dry_run { "would replay" } else { "replayed" },
                        if n == 1 { "" } else { "s" },
                        group.stream
                    );
                    if options.error.is_some() {
                        summary
                            .push_str(&format!("; {} did not match --error", report.not_matching));
                    }
                    if dry_run {
                        summary.push_str(" (dry run: nothing changed)");
                    }
                    eprintln!("{summary}");
                    Ok(())
                })
            }),
        ),
        DlqAction::Purge {
            target,
            which,
            yes,
            json,
        } => {
            // Purged dead letters are gone for good: a person confirms, or a script says so.
            if !yes {
                if !std::io::stdin().is_terminal() {
                    eprintln!(
                        "error: dlq purge deletes dead letters for good and stdin is not a terminal to confirm on; add --yes to purge without asking"
                    );
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
                let question = format!(
                    "Delete {} of group {} for good?",
                    which.describe(),
                    target.group
                );
                if !confirm(&question) {
                    eprintln!("not confirmed: nothing purged");
                    return ExitCode::from(EXIT_FAILURE);
                }
            }
            (
                target,
                Box::new(move |client, group| {
                    Box::pin(async move {
                        let selection = which.selection();
                        let n =
                            streamworker::admin::dlq::purge(&client, &group, &selection).await?;
                        let dlq = group.dead_letter_stream();
                        if json {
                            let value = serde_json::json!({
                                "dead_letter_stream": dlq,
                                "purged": n,
                            });
                            println!(
                                "{}",
                                serde_json::to_string_pretty(&value).expect("serializes")
                            );
                        } else {
                            println!(
                                "purged {n} dead letter{} from {dlq}",
                                if n == 1 { "" } else { "s" },
                            );
                        }
                        Ok(())
                    })
                }),
            )
        }
    };
    on_group(target, false, move |client, _, group| work(client, group))
}

/// Runs an operator command on one group of the configuration: a group the file does not
/// have is bad usage (exit 2), named with the groups it has. On a partitioned group the
/// command works on the partition `--partition` names, as the ordinary group that partition
/// runs as; without it, only a command that acts on the `whole` group (pause, resume) runs,
/// since there is no one stream, pending list or dead-letter stream to show.
fn on_group(
    target: DlqTarget,
    whole: bool,
    work: impl FnOnce(Client, config::Config, config::GroupConfig) -> AdminFuture + 'static,
) -> ExitCode {
    let group_name = target.group.clone();
    let path = target.config.clone();
    let partition = target.partition;
    let config = match load(&path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Some(group) = config.groups.get(&group_name) else {
        eprintln!(
            "error: {} has no group {group_name:?}; its groups: {}",
            path.display(),
            config.groups.keys().cloned().collect::<Vec<_>>().join(", ")
        );
        return ExitCode::from(EXIT_BAD_CONFIG);
    };
    match (group.partitions, partition) {
        (Some(n), None) if !whole => {
            eprintln!(
                "error: group {group_name:?} is partitioned: it has {n} streams ({} … {}), with their own pending entries and dead letters ({}); add --partition P (0 to {}) to choose one",
                streamworker::partition::partition_stream(&group.stream, 0),
                streamworker::partition::partition_stream(&group.stream, n.saturating_sub(1)),
                group.partition_dead_letter_streams(n),
                n.saturating_sub(1)
            );
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
        (Some(n), Some(p)) if p >= n => {
            eprintln!(
                "error: --partition {p}: group {group_name:?} has {n} partitions, numbered 0 to {}",
                n - 1
            );
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
        (None, Some(p)) => {
            eprintln!(
                "error: --partition {p}: group {group_name:?} is not partitioned (no `partitions` in its table); leave --partition out"
            );
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
        _ => {}
    }
    admin(&path, move |client, config| {
        let group = config.groups[&group_name].clone();
        // A partition runs as an ordinary group on its own stream, with its own dead
        // letters: the command works on exactly that.
        let group = match partition {
            Some(p) => (*streamworker::partition::group_of(&group, p)).clone(),
            None => group,
        };
        work(client, config, group)
    })
}

fn stats(path: &Path, group_name: String, query: streamworker::admin::stats::Query) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Some(group) = config.groups.get(&group_name) else {
        eprintln!(
            "error: {} has no group {group_name:?}; its groups: {}",
            path.display(),
            config.groups.keys().cloned().collect::<Vec<_>>().join(", ")
        );
        return ExitCode::from(EXIT_BAD_CONFIG);
    };
    if let Err(why) = streamworker::admin::stats::supported(group) {
        eprintln!("error: {why}");
        return ExitCode::from(EXIT_BAD_CONFIG);
    }
    admin(path, move |client, config| {
        Box::pin(async move {
            let group = &config.groups[&group_name];
            print!(
                "{}",
                streamworker::admin::stats::run(&client, group, &query).await?
            );
            Ok(())
        })
    })
}

fn load(path: &Path) -> Result<config::Config, ExitCode> {
    config::load(path).map_err(|e: ConfigError| {
        eprintln!("error: {e}");
        ExitCode::from(EXIT_BAD_CONFIG)
    })
}

fn check(path: &Path, json: bool) -> ExitCode {
    match load(path) {
        Ok(config) => {
            let text = config.to_redacted_toml();
            if json {
                // The same view as the TOML: one source, so the two never disagree.
                let value: toml::Value = match toml::from_str(&text) {
                    Ok(v) => v,
                    Err(e) => {
                        eprintln!(
                            "error: the resolved configuration does not read back (a bug): {e}"
                        );
                        return ExitCode::from(EXIT_FAILURE);
                    }
                };
                println!(
                    "{}",
                    serde_json::to_string_pretty(&value).expect("serializes")
                );
            } else {
                print!("{text}");
            }
            eprintln!("{} is valid", path.display());
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// Exits 0 or 1 only, whatever went wrong: Docker reserves a HEALTHCHECK's exit code 2.
fn healthcheck(
    config: Option<&Path>,
    ready: bool,
    addr: Option<&str>,
    timeout: std::time::Duration,
) -> ExitCode {
    use streamworker::healthcheck::{self, Probe};
    let listen = match (addr, config) {
        (Some(addr), _) => addr.to_owned(),
        (None, Some(path)) => match config::load(path) {
            Ok(config) => config.http.listen,
            Err(e) => {
                eprintln!("unhealthy: {e}");
                return ExitCode::from(EXIT_FAILURE);
            }
        },
        (None, None) => unreachable!("clap requires --config or --addr"),
    };
    let probe = if ready { Probe::Ready } else { Probe::Live };
    match healthcheck::target(&listen).and_then(|a| healthcheck::probe(a, probe, timeout)) {
        Ok(body) => {
            println!("healthy: {} {body}", probe.path());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("unhealthy: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn pause(target: DlqTarget, json: bool, pause: bool) -> ExitCode {
    on_group(target, true, move |client, config, group| {
        Box::pin(async move {
            let outcome = streamworker::admin::pause::run(
                &client,
                &group,
                config.worker.claim_interval,
                pause,
            )
            .await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&outcome).expect("serializes")
                );
            } else {
                print!("{}", outcome.render());
            }
            Ok(())
        })
    })
}

fn run(path: &Path, only: &[String]) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let selection = match supervisor::select_groups(&config, only) {
        Ok(selection) => selection,
        Err(e) => {
            eprintln!("error: {}: {e}", path.display());
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    let telemetry = match streamworker::telemetry::init(&config.telemetry) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    for (group, why) in &selection.skipped {
        tracing::info!(group = %group, reason = why, "not running this group");
    }
    let outcome = serve(config, selection.run);
    // Traces buffered in the exporter go out before the process ends.
    telemetry.shutdown();
    match outcome {
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

fn serve(
    config: config::Config,
    groups: std::collections::BTreeSet<String>,
) -> anyhow::Result<Outcome> {
    // Multi-threaded: measured faster than a single thread for draining (the connection
    // drivers parse while the groups' loops run), see BENCHMARKS.md.
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
            let console = config
                .http
                .console
                .then(|| streamworker::console::Console::new(&config))
                .transpose()?;
            let addr = streamworker::http::serve(
                &config.http.listen,
                metrics.clone(),
                health.clone(),
                shutdown.clone(),
                console,
            )
            .with_context(|| {
                format!(
                    "cannot listen on http.listen = {:?}; choose a free port or set it to \"\" to turn the listener off",
                    config.http.listen
                )
            })?;
            tracing::info!(address = %addr, "serving /metrics, /livez and /readyz");
            if config.http.console {
                tracing::info!(
                    address = %addr,
                    actions = config.http.console_token_file.is_some(),
                    "serving the web console at /"
                );
            }
        }
        Ok(supervisor::run_groups(config, groups, shutdown, metrics, health).await)
    })
}

#[allow(clippy::too_many_arguments)]
fn produce(
    scenario: streamworker::tools::produce::Scenario,
    stream: &str,
    partitioning: Option<&streamworker::tools::produce::Partitioning>,
    url: &str,
    rate: u64,
    count: Option<u64>,
    duration: Option<std::time::Duration>,
    traceparent: bool,
    incident: bool,
) -> Result<u64, ExitCode> {
    let duration = duration.or(count
        .is_none()
        .then_some(std::time::Duration::from_secs(10)));
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return Err(ExitCode::from(EXIT_FAILURE));
        }
    };
    let mood = if incident {
        streamworker::tools::produce::Mood::Incident
    } else {
        streamworker::tools::produce::Mood::Normal
    };
    let result = runtime.block_on(async {
        let mut producer = streamworker::client::Producer::connect(url)
            .await
            .map_err(streamworker::tools::produce::ProduceError::from)?;
        let until = duration.map(|d| std::time::Instant::now() + d);
        streamworker::tools::produce::produce(
            &mut producer,
            scenario,
            stream,
            partitioning,
            rate,
            count,
            until,
            traceparent,
            || mood,
        )
        .await
    });
    match result {
        Ok(n) => Ok(n),
        Err(e @ streamworker::tools::produce::ProduceError::MissingKey { .. }) => {
            eprintln!("error: {e}");
            Err(ExitCode::from(EXIT_FAILURE))
        }
        Err(e) => {
            eprintln!(
                "error: cannot write to {}: {e}",
                streamworker::config::redact_url(url)
            );
            Err(ExitCode::from(EXIT_FAILURE))
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// Every visible command with its path, nested ones included.
    fn commands() -> Vec<(String, clap::Command)> {
        let mut out = Vec::new();
        let mut todo = vec![("streamworker".to_owned(), Cli::command())];
        while let Some((path, command)) = todo.pop() {
            for sub in command.get_subcommands() {
                if sub.get_name() != "help" && !sub.is_hide_set() {
                    todo.push((format!("{path} {}", sub.get_name()), sub.clone()));
                }
            }
            out.push((path, command));
        }
        out
    }

    #[test]
    fn the_cli_definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    /// `--help` explains every flag and argument: none is left with a bare name.
    #[test]
    fn every_flag_of_every_command_has_help_text() {
        let mut missing = Vec::new();
        for (path, command) in commands() {
            for arg in command.get_arguments() {
                let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
                if help.trim().is_empty() && !arg.is_hide_set() {
                    missing.push(format!("{path} {}", arg.get_id()));
                }
            }
        }
        assert!(missing.is_empty(), "flags without help text: {missing:?}");
    }

    /// Every command's `--help` ends with at least one example of that command (a leaf
    /// command's examples start with its own path; a parent's with one of its children).
    #[test]
    fn every_command_has_an_example() {
        let mut missing = Vec::new();
        for (path, command) in commands() {
            let after = command
                .get_after_help()
                .map(|h| h.to_string())
                .unwrap_or_default();
            let examples = after
                .lines()
                .filter(|l| {
                    l.trim_start().starts_with(&format!("{path} "))
                        || l.contains(&format!(" {path} "))
                })
                .count();
            if examples == 0 {
                missing.push(path);
            }
        }
        assert!(
            missing.is_empty(),
            "commands without an example: {missing:?}"
        );
    }

    #[test]
    fn status_watch_intervals_are_human_and_not_too_short() {
        assert_eq!(parse_interval("2s"), Ok(std::time::Duration::from_secs(2)));
        assert_eq!(
            parse_interval("500ms"),
            Ok(std::time::Duration::from_millis(500))
        );
        let err = parse_interval("10ms").unwrap_err();
        assert!(err.contains("100ms or more"), "{err}");
        assert!(parse_interval("soon").is_err());
    }
}
