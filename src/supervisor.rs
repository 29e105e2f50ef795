//! Starts one task per configured group and keeps it running: a group whose task fails is
//! logged and restarted with capped backoff, and never takes the other groups down. Also
//! owns the process-wide pieces: the Redis client, the readiness probe and the exit status.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use streamworker_handlers::{HandlerContext, HandlerKind, Register, Store};
use tokio_util::task::TaskTracker;

use crate::client::{Client, ClientError};
use crate::config::{Config, GroupConfig};
use crate::consumer::{self, Group, GroupError, GroupExit};
use crate::health::{Health, Heartbeat};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// How the daemon ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every group drained: exit 0.
    Clean,
    /// The shutdown deadline cut work off: exit 3.
    CutOff,
    /// Something no restart can fix: exit 1.
    Failed(String),
}

/// The process-wide context the groups share.
#[derive(Clone)]
struct Shared {
    client: Client,
    /// What stateful handlers read and write through.
    store: Arc<dyn Store>,

    consumer: String,
    lease_token: String,
    claim_interval: Duration,
    metrics: Metrics,
    shutdown: Shutdown,
}

/// Why `run` has no group to run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    #[error("--groups names {unknown}, which the file does not configure; its groups: {known}")]
    Unknown { unknown: String, known: String },
    #[error(
        "no group to run: {disabled} {verb} enabled = false; set enabled = true in the group's table, or run other groups"
    )]
    NothingEnabled {
        disabled: String,
        verb: &'static str,
    },
}

/// The groups `run` runs, and those it leaves out with the reason, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub run: BTreeSet<String>,
    pub skipped: Vec<(String, &'static str)>,
}

/// Picks the groups this process runs: those named by `run --groups` (all when empty),
/// without those with `enabled = false`.
pub fn select_groups(config: &Config, only: &[String]) -> Result<Selection, SelectError> {
    let unknown: Vec<&str> = only
        .iter()
        .filter(|name| !config.groups.contains_key(*name))
        .map(String::as_str)
        .collect();
    if !unknown.is_empty() {
        return Err(SelectError::Unknown {
            unknown: unknown.join(", "),
            known: config.groups.keys().cloned().collect::<Vec<_>>().join(", "),
        });
    }
    let mut selection = Selection {
        run: BTreeSet::new(),
        skipped: Vec::new(),
    };
    let mut disabled = Vec::new();
    for (name, group) in &config.groups {
        if !only.is_empty() && !only.contains(name) {
            selection
                .skipped
                .push((name.clone(), "not named by --groups"));
        } else if !group.enabled {
            selection.skipped.push((name.clone(), "enabled = false"));
            disabled.push(name.clone());
        } else {
            selection.run.insert(name.clone());
        }
    }
    if selection.run.is_empty() {
        return Err(SelectError::NothingEnabled {
            verb: if disabled.len() == 1 { "has" } else { "have" },
            disabled: disabled.join(", "),
        });
    }
    Ok(selection)
}

/// Runs every enabled group until shutdown.
pub async fn run(config: Config, shutdown: Shutdown, metrics: Metrics, health: Health) -> Outcome {
    let groups = config
        .groups
        .iter()
        .filter(|(_, g)| g.enabled)
        .map(|(name, _)| name.clone())
        .collect();
    run_groups(config, groups, shutdown, metrics, health).await
}

/// Runs `groups` of the configuration until shutdown. Housekeeping covers every enabled
/// group of the file, not only these: with one Deployment per group, retention must still
/// wait for the groups the other Deployments have not created yet.
pub async fn run_groups(
    mut config: Config,
    groups: BTreeSet<String>,
    shutdown: Shutdown,
    metrics: Metrics,
    health: Health,
) -> Outcome {
    config.groups.retain(|_, g| g.enabled);
    let Some(client) = connect(&config, &shutdown, &metrics).await else {
        return match shutdown.is_triggered() {
            true => Outcome::Clean,
            false => Outcome::Failed("could not connect to Redis".into()),
        };
    };
    let client = match client {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(format!("cannot use Redis at {}: {e}", redact(&config))),
    };
    health.set_redis_up(true);
    let consumer = config.worker.consumer_name();
    tracing::info!(
        consumer = %consumer, redis = %client.display_url, groups = groups.len(),
        "streamworker started"
    );
    let shared = Shared {
        client: client.clone(),
        store: Arc::new(crate::store::RedisStore::new(client.clone())),
        consumer,
        lease_token: format!(
            "{:016x}{:016x}-{}",
            fastrand::u64(..),
            fastrand::u64(..),
            std::process::id()
        ),
        claim_interval: config.worker.claim_interval,
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
    };

    let prober = tokio::spawn(probe(
        client.clone(),
        health.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    let housekeeping = tokio::spawn(crate::maintenance::run(
        client,
        Arc::new(config.clone()),
        shared.consumer.clone(),
        metrics.clone(),
        health.clone(),
        shutdown.clone(),
    ));
    let tracker = TaskTracker::new();
    let mut outcomes = Vec::new();
    for group in config.groups.values().filter(|g| groups.contains(&g.name)) {
        let stall_after =
            Duration::from_secs(10).max(group.block * 2 + config.worker.claim_interval * 2);
        // Lag is read every housekeeping turn; a healthy loop fetches or settles something
        // well within a handler_timeout of entries waiting.
        let idle_after = stall_after.max(group.handler_timeout * 2 + Duration::from_secs(30));
        let heartbeat = health.register(&group.name, stall_after, idle_after);
        outcomes.push(tracker.spawn(supervise(
            Arc::new(group.clone()),
            shared.clone(),
            heartbeat,
        )));
    }
    tracker.close();
    let finishing = async {
        let mut result = Outcome::Clean;
        for outcome in outcomes {
            let outcome = outcome
                .await
                .unwrap_or_else(|e| Outcome::Failed(format!("group supervisor panicked: {e}")));
            result = match (result, outcome) {
                (Outcome::Failed(a), _) => Outcome::Failed(a),
                (_, Outcome::Failed(b)) => Outcome::Failed(b),
                (Outcome::CutOff, _) | (_, Outcome::CutOff) => Outcome::CutOff,
                _ => Outcome::Clean,
            };
        }
        tracker.wait().await;
        result
    };
    // Every group bounds its own shutdown; this is the backstop that keeps the promise
    // (SIGTERM to exit within shutdown_timeout + 2 s) whatever a group is stuck in.
    let backstop = async {
        shutdown.triggered().await;
        if let Some(deadline) = shutdown.deadline() {
            tokio::time::sleep_until(deadline + Duration::from_millis(1500)).await;
        }
    };
    let result = tokio::select! {
        result = finishing => result,
        _ = backstop => {
            tracing::error!("shutdown deadline passed and a group has still not stopped; exiting anyway (its in-flight entries stay pending for other replicas)");
            Outcome::CutOff
        }
    };
    prober.abort();
    housekeeping.abort();
    health.set_redis_up(false);
    metrics.up.set(0);
    result
}

fn redact(config: &Config) -> String {
    crate::client::describe(&config.redis)
}

/// Connects, waiting out an unreachable Redis (with capped, jittered backoff) until
/// shutdown. `None` when shutdown came first; `Some(Err)` for errors waiting cannot fix
/// (authentication, a server too old).
async fn connect(
    config: &Config,
    shutdown: &Shutdown,
    metrics: &Metrics,
) -> Option<Result<Client, ClientError>> {
    use backon::BackoffBuilder;
    let mut delays = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
        .build();
    loop {
        let attempt = tokio::select! {
            r = Client::connect(&config.redis) => r,
            _ = shutdown.triggered() => return None,
        };
        match attempt {
            Ok(client) => return Some(Ok(client)),
            Err(e) if e.is_unavailable() => {
                metrics.redis_error(e.kind());
                let delay = delays.next().unwrap_or(Duration::from_secs(10));
                tracing::warn!(redis = %redact(config), error = %e, retry_in_ms = delay.as_millis() as u64, "cannot reach Redis; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.triggered() => return None,
                }
            }
            Err(e) => return Some(Err(e)),
        }
    }
}

/// Keeps `/readyz` and `streamworker_up` true to Redis's reachability.
async fn probe(client: Client, health: Health, metrics: Metrics, shutdown: Shutdown) {
    loop {
        let up = matches!(
            tokio::time::timeout(Duration::from_secs(2), client.ping()).await,
            Ok(Ok(()))
        );
        if up != health.redis_up() {
            if up {
                tracing::info!("Redis is reachable again");
            } else {
                tracing::warn!("Redis does not answer PING");
            }
        }
        health.set_redis_up(up);
        let all_running = health.not_running().is_empty();
        metrics
            .up
            .set(i64::from(up && all_running && !shutdown.is_triggered()));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Runs one group, restarting it after failures (capped, jittered backoff) until it ends
/// by shutdown or fails for good.
async fn supervise(group: Arc<GroupConfig>, shared: Shared, heartbeat: Heartbeat) -> Outcome {
    use backon::BackoffBuilder;
    let mut delays = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_secs(1))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times()
        .build();
    loop {
        let attempt = match group.partitions {
            Some(_) => tokio::spawn(run_partitions(
                Arc::clone(&group),
                shared.clone(),
                heartbeat.clone(),
            )),
            None => tokio::spawn(run_group(
                Arc::clone(&group),
                shared.clone(),
                heartbeat.clone(),
            )),
        };
        let failure = match attempt.await {
            Ok(Ok(GroupExit::Drained)) => return Outcome::Clean,
            Ok(Ok(GroupExit::CutOff { .. })) => return Outcome::CutOff,
            Ok(Err(e)) if e.is_fatal() => {
                tracing::error!(stream = %group.stream, group = %group.name, error = %e, "group cannot run; shutting down");
                shared.shutdown.trigger();
                return Outcome::Failed(e.to_string());
            }
            Ok(Err(e)) => e.to_string(),
            Err(e) if e.is_panic() => format!(
                "the group's task panicked: {}",
                crate::telemetry::panic_message(e.into_panic().as_ref())
            ),
            Err(e) => format!("the group's task ended: {e}"),
        };
        heartbeat.set_running(false);
        if shared.shutdown.is_triggered() {
            return Outcome::CutOff;
        }
        let delay = delays.next().unwrap_or(Duration::from_secs(30));
        tracing::error!(stream = %group.stream, group = %group.name, error = %failure, restart_in_ms = delay.as_millis() as u64, "group failed; restarting");
        let until = tokio::time::Instant::now() + delay;
        while tokio::time::Instant::now() < until {
            heartbeat.beat();
            tokio::select! {
                _ = tokio::time::sleep_until(until.min(tokio::time::Instant::now() + Duration::from_secs(1))) => {}
                _ = shared.shutdown.triggered() => return Outcome::Clean,
            }
        }
    }
}

/// Runs this replica's share of a partitioned group's partitions, each an ordinary group
/// (`run_group`) on the partition's stream with a shutdown of its own.
async fn run_partitions(
    config: Arc<GroupConfig>,
    shared: Shared,
    heartbeat: Heartbeat,
) -> Result<GroupExit, GroupError> {
    let start: crate::partition::owner::Start = {
        let (shared, heartbeat) = (shared.clone(), heartbeat.clone());
        Arc::new(move |partition, stop| {
            let shared = Shared {
                shutdown: stop,
                ..shared.clone()
            };
            // Each partition's loop beats its own heartbeat, so a wedged one fails
            // `/livez` though the owner and the other partitions keep beating.
            let (beat, stopped) = heartbeat.partition(&partition.stream);
            Box::pin(async move {
                let _stopped = stopped;
                run_group(partition, shared, beat).await
            })
        })
    };
    crate::partition::owner::Owner {
        owned: shared.metrics.partitions_owned(&config.name),
        group: config,
        client: shared.client.clone(),
        consumer: shared.consumer.clone(),
        shutdown: shared.shutdown.clone(),
        heartbeat,
        start,
    }
    .run()
    .await
}

/// Builds the group's handler and runs the consumer loop with it, through the launcher its
/// kind registered.
async fn run_group(
    config: Arc<GroupConfig>,
    shared: Shared,
    heartbeat: Heartbeat,
) -> Result<GroupExit, GroupError> {
    let kind = config.handler.kind();
    let Some(launch) = launcher(kind) else {
        return Err(GroupError::Handler(format!(
            "no handler is registered as {kind:?} in this binary"
        )));
    };
    let mut context = HandlerContext::new(
        config.stream.clone(),
        config.name.clone(),
        Arc::clone(&shared.store),
    );
    context.consumer = shared.consumer.clone();
    context.concurrency = config.concurrency;
    let group = Group {
        metrics: shared.metrics.group(&config.stream, &config.name),
        config: Arc::clone(&config),
        consumer: shared.consumer.clone(),
        claim_interval: shared.claim_interval,
        client: shared.client.clone(),
        handler: (),
        shutdown: shared.shutdown.clone(),
        heartbeat: heartbeat.clone(),
        lease_token: shared.lease_token.clone(),
        events: None,
    };
    launch(context, group).await
}

type GroupRun = Pin<Box<dyn Future<Output = Result<GroupExit, GroupError>> + Send>>;

/// Builds a kind's handler for a group and runs the group's loop with it. One
/// instantiation per kind, so the hot path calls the handler without dynamic dispatch.
type Launch = fn(HandlerContext, Group<()>) -> GroupRun;

fn launch<H: HandlerKind>(context: HandlerContext, group: Group<()>) -> GroupRun {
    Box::pin(async move {
        let Some(options) = group.config.handler.options::<H::Options>() else {
            return Err(GroupError::Handler(format!(
                "the options of handler {:?} are not the kind's own",
                group.config.handler.kind()
            )));
        };
        let handler =
            H::build(options, &context).map_err(|e| GroupError::Handler(e.to_string()))?;
        let Group {
            config,
            consumer,
            claim_interval,
            client,
            handler: (),
            metrics,
            shutdown,
            heartbeat,
            lease_token,
            events,
        } = group;
        consumer::run(&Group {
            config,
            consumer,
            claim_interval,
            client,
            handler,
            metrics,
            shutdown,
            heartbeat,
            lease_token,
            events,
        })
        .await
    })
}

/// The launchers of every handler kind, by name.
#[derive(Default)]
pub(crate) struct Launchers(Vec<(&'static str, Launch)>);

impl Register for Launchers {
    fn kind<H: HandlerKind>(&mut self, name: &'static str) {
        self.0.push((name, launch::<H>));
    }
}

impl Launchers {
    /// Makes these the launchers of this process. The first call wins; `false` after that.
    pub(crate) fn install(self) -> bool {
        LAUNCHERS.set(self).is_ok()
    }
}

/// Process-wide like the kinds configuration accepts (`config::handler_kinds`): `App::main`
/// installs both from the same registrations; without an `App`, the built-ins.
static LAUNCHERS: OnceLock<Launchers> = OnceLock::new();

fn launcher(kind: &str) -> Option<Launch> {
    let launchers = LAUNCHERS.get_or_init(|| {
        let mut launchers = Launchers::default();
        streamworker_handlers::register_builtins(&mut launchers);
        launchers
    });
    launchers
        .0
        .iter()
        .find(|(name, _)| *name == kind)
        .map(|(_, launch)| *launch)
}
