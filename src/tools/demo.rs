//! `streamworker demo [--duration 15s]`: the product's main job on a fresh machine, with
//! nothing configured. It starts a private `redis-server`, produces LLM-observability
//! events and user feedback (with an incident in the middle: failing calls and one model's
//! ratings collapsing), runs the four built-in groups — analytics, alerts, warehouse,
//! learning — with a live one-screen summary, and ends with what each group did.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::admin::stats;
use crate::client::{Client, Producer};
use crate::config::{self, Config};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::supervisor::{self, Outcome};
use crate::tools::local_redis::{LocalRedis, LocalRedisError};
use crate::tools::produce::{Mood, Scenario};

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Redis(#[from] LocalRedisError),
    #[error("the demo's configuration is invalid (a bug): {0}")]
    Config(#[from] config::ConfigError),
    #[error("{0}")]
    Other(String),
}

pub struct Options {
    /// `None`: until Ctrl-C.
    pub duration: Option<Duration>,
    pub redis_server: String,
    /// A Redis to use instead of a private one.
    pub url: Option<String>,
}

const EVENTS_PER_SECOND: u64 = 400;
const FEEDBACK_PER_SECOND: u64 = 60;

/// The incident: from 2 s to 6 s into every 20 s.
fn mood(started: Instant) -> Mood {
    let t = started.elapsed().as_secs_f64() % 20.0;
    if (2.0..6.0).contains(&t) {
        Mood::Incident
    } else {
        Mood::Normal
    }
}

struct Paths {
    root: PathBuf,
}

pub fn run(options: Options) -> Result<(), DemoError> {
    // Kept alive (and stopped on drop) for the whole run when started here.
    let (_private, url) = match &options.url {
        Some(url) => (None, url.clone()),
        None => {
            let redis = LocalRedis::start(&options.redis_server)?;
            let url = redis.url();
            (Some(redis), url)
        }
    };
    let root = std::env::temp_dir().join(format!("streamworker-demo-{}", std::process::id()));
    std::fs::create_dir_all(&root)
        .map_err(|e| DemoError::Other(format!("{}: {e}", root.display())))?;
    let paths = Paths { root };
    let text = include_str!("demo.toml")
        .replace("{url}", &url)
        .replace("{dir}", &paths.root.display().to_string());
    let config_path = paths.root.join("streamworker.toml");
    std::fs::write(&config_path, text).map_err(|e| DemoError::Other(e.to_string()))?;
    let config = config::load_with_env(&config_path, Default::default())?;
    // Warnings and errors only: the summary is the demo's output.
    let telemetry = crate::telemetry::init_with_default(&config.telemetry, "warn")
        .map_err(|e| DemoError::Other(e.to_string()))?;

    let whose = if options.url.is_some() {
        "the Redis at"
    } else {
        "a private redis-server on"
    };
    println!(
        "streamworker demo: {whose} {}, the groups of {}",
        crate::config::redact_url(&url),
        config_path.display()
    );
    println!(
        "producing {EVENTS_PER_SECOND} LLM events/s to ml_events and {FEEDBACK_PER_SECOND} feedback events/s to user:feedback; an incident every 20 s (2 s–6 s)"
    );
    match options.duration {
        Some(d) => println!(
            "running for {}…\n",
            streamworker_handlers::duration::format(d)
        ),
        None => println!("running until Ctrl-C…\n"),
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| DemoError::Other(e.to_string()))?;
    let shutdown = Shutdown::new(config.worker.shutdown_timeout);
    let _ = crate::shutdown::listen_for_signals(shutdown.clone());
    let metrics = Metrics::new();
    let health = Health::new();
    let outcome = runtime.block_on(async {
        let daemon = tokio::spawn(supervisor::run(config.clone(), shutdown.clone(), metrics.clone(), health.clone()));
        let client = Client::connect(&config.redis).await.map_err(|e| DemoError::Other(e.to_string()))?;
        let started = Instant::now();
        let until = options.duration.map(|d| started + d);
        let produce = |scenario: Scenario, rate: u64| {
            let url = url.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let Ok(mut producer) = Producer::connect(&url).await else { return };

                tokio::select! {
                    _ = crate::tools::produce::produce(&mut producer, scenario, scenario.stream(), None, rate, None, until, false, || mood(started)) => {}
                    _ = shutdown.triggered() => {}
                }
            })
        };
        let producers = [
            produce(Scenario::LlmObservability, EVENTS_PER_SECOND),
            produce(Scenario::Feedback, FEEDBACK_PER_SECOND),
        ];
        let terminal = std::io::stdout().is_terminal();
        let mut last = Handled::default();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.triggered() => break,
            }
            let now = summary(&client, &metrics, &config, started, &last).await;
            if terminal {
                print!("\x1b[2J\x1b[H{}", now.screen());
            } else {
                println!("{}", now.line());
            }
            last = now.handled;
            let _ = std::io::stdout().flush();
            if until.is_some_and(|u| Instant::now() >= u) {
                break;
            }
        }
        for p in producers {
            p.abort();
        }
        // Let the groups catch up with what was produced, then stop them.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && !caught_up(&client, &config).await {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        shutdown.trigger();
        let outcome = daemon.await.unwrap_or(Outcome::Failed("the daemon task panicked".into()));
        println!("\n{}", report(&client, &metrics, &config, &paths).await);
        Ok::<Outcome, DemoError>(outcome)
    })?;
    telemetry.shutdown();
    match outcome {
        Outcome::Clean => Ok(()),

        Outcome::CutOff => Err(DemoError::Other("the groups did not finish in time".into())),
        Outcome::Failed(e) => Err(DemoError::Other(e)),
    }
}

async fn caught_up(client: &Client, config: &Config) -> bool {
    for g in config.groups.values() {
        match client.groups(&g.stream).await {
            Ok(groups) => {
                if !groups
                    .iter()
                    .any(|i| i.name == g.name && i.pending == 0 && i.lag == Some(0))
                {
                    return false;
                }
            }
            Err(_) => return false,
        }
    }
    true
}

/// Entries each group had handled, and when: the previous sample, for the rates.
#[derive(Default)]
struct Handled {
    at: Option<Instant>,
    by_group: std::collections::HashMap<String, u64>,
}

/// One group's figures in a sample.
struct Row {
    group: String,
    handler: &'static str,
    stream: String,
    handled: u64,
    /// Entries per second since the previous sample (the average since the start for the
    /// first one).
    per_second: f64,
    lag: Option<u64>,
    pending: Option<u64>,
    dead_letters: u64,
}

/// One sample of the live summary.
struct Sample {
    seconds: f64,
    rows: Vec<Row>,
    alerts: u64,
    adaptations: u64,
    incident: bool,
    handled: Handled,
}

impl Sample {
    fn header(&self) -> String {
        format!(
            "t = {:>4.0} s  alert events {}  adaptation events {}{}",
            self.seconds,
            self.alerts,
            self.adaptations,
            if self.incident {
                "  [incident: calls failing, one model rated poorly]"
            } else {
                ""
            }
        )
    }

    /// The line printed each second off a terminal (logs, CI, `| tee`): the header, then
    /// per group its throughput, lag and pending.
    fn line(&self) -> String {
        let mut out = self.header();
        for r in &self.rows {
            out.push_str(&format!(
                " | {} {:.0}/s lag {} pending {}",
                r.group,
                r.per_second,
                r.lag.map_or("?".into(), |l| l.to_string()),
                r.pending.map_or("?".into(), |p| p.to_string()),
            ));
        }
        out
    }

    /// The screen redrawn each second on a terminal.
    fn screen(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| {
                vec![
                    r.group.clone(),
                    r.handler.to_owned(),
                    r.stream.clone(),
                    r.handled.to_string(),
                    format!("{:.0}", r.per_second),
                    r.lag.map_or("?".into(), |l| l.to_string()),
                    r.pending.map_or("?".into(), |p| p.to_string()),
                    r.dead_letters.to_string(),
                ]
            })
            .collect();
        let mut out = format!("{}\n\n", self.header());
        out.push_str(&crate::admin::table(
            &[
                "GROUP",
                "HANDLER",
                "STREAM",
                "HANDLED",
                "PER SECOND",
                "LAG",
                "PENDING",
                "DEAD LETTERS",
            ],
            &rows,
        ));
        out
    }
}

/// Per group: entries handled so far and the rate since `last`, lag and pending; alert
/// and adaptation events so far.
async fn summary(
    client: &Client,
    metrics: &Metrics,
    config: &Config,
    started: Instant,
    last: &Handled,
) -> Sample {
    let now = Instant::now();
    let since = last.at.unwrap_or(started);
    let secs = now.duration_since(since).as_secs_f64().max(0.001);
    let mut handled = Handled {
        at: Some(now),
        by_group: Default::default(),
    };
    let mut rows = Vec::new();
    for g in config.groups.values() {
        let done = metrics.entries(&g.stream, &g.name, "acked")
            + metrics.entries(&g.stream, &g.name, "dropped");
        let before = last.by_group.get(&g.name).copied().unwrap_or(0);
        handled.by_group.insert(g.name.clone(), done);
        let info = client
            .groups(&g.stream)
            .await
            .ok()
            .and_then(|gs| gs.into_iter().find(|i| i.name == g.name));
        rows.push(Row {
            group: g.name.clone(),
            handler: g.handler.kind(),
            stream: g.stream.clone(),
            handled: done,
            per_second: done.saturating_sub(before) as f64 / secs,
            lag: info.as_ref().and_then(|i| i.lag),
            pending: info.as_ref().map(|i| i.pending),
            dead_letters: metrics.entries(&g.stream, &g.name, "dead_lettered"),
        });
    }
    Sample {
        seconds: started.elapsed().as_secs_f64(),
        rows,
        alerts: client.xlen("alerts").await.unwrap_or(0),
        adaptations: client.xlen("ai:adaptations").await.unwrap_or(0),
        incident: mood(started) == Mood::Incident,
        handled,
    }
}

fn count_lines(dir: &std::path::Path) -> (u64, Vec<PathBuf>) {
    let mut lines = 0;
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "jsonl") {
                lines += std::fs::read_to_string(&p)
                    .map(|t| t.lines().count() as u64)
                    .unwrap_or(0);
                files.push(p);
            }
        }
    }
    (lines, files)
}

/// What each group did.
async fn report(client: &Client, metrics: &Metrics, config: &Config, paths: &Paths) -> String {
    let handled = |name: &str| {
        let g = &config.groups[name];
        metrics.entries(&g.stream, name, "acked") + metrics.entries(&g.stream, name, "dropped")
    };
    let mut out = String::from("== what each group did\n\n");
    out.push_str(&format!(
        "analytics: {} entries aggregated into per-minute hashes\n",
        handled("analytics")
    ));
    let query = stats::Query {
        since: Duration::from_secs(3600),
        top: 3,
        json: false,
    };
    if let Ok(text) = stats::run(client, &config.groups["analytics"], &query).await {
        out.push_str(&indent(&text));
    }
    let alerts = client
        .range("alerts", "-", "+", 100, false)
        .await
        .unwrap_or_default();
    out.push_str(&format!(
        "\nalerts: {} entries counted into shared windows; {} alert event{} on stream `alerts`\n",
        handled("alerts"),
        alerts.len(),
        plural(alerts.len())
    ));
    for (_, fields) in &alerts {
        let get = |k: &str| crate::admin::field(fields, k);
        out.push_str(&format!(
            "    {} {}: {}\n",
            get("rule"),
            get("state"),
            get("message")
        ));
    }
    let (lines, files) = count_lines(&paths.root.join("warehouse"));
    out.push_str(&format!(
        "\nwarehouse: {} rows written ({lines} JSON lines in {} file{} under {})\n",
        handled("warehouse"),
        files.len(),
        plural(files.len()),
        paths.root.join("warehouse").display()
    ));
    let (dataset, _) = count_lines(&paths.root.join("learning"));
    let adaptations = client
        .range("ai:adaptations", "-", "+", 100, false)
        .await
        .unwrap_or_default();
    out.push_str(&format!(
        "\nlearning: {} feedback events aggregated; {dataset} dataset lines under {}; {} adaptation event{} on `ai:adaptations`\n",
        handled("learning"),
        paths.root.join("learning").display(),
        adaptations.len(),
        plural(adaptations.len())
    ));
    for (_, fields) in &adaptations {
        let get = |k: &str| crate::admin::field(fields, k);
        out.push_str(&format!(
            "    {}: rating {} over {} feedback (threshold {})\n",
            get("model"),
            get("rating"),
            get("feedback"),
            get("threshold")
        ));
    }
    if let Ok(text) = stats::run(client, &config.groups["learning"], &query).await {
        out.push_str(&indent(&text));
    }
    out
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}
