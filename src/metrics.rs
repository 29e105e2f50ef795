//! The metrics of DESIGN §5, registered once; each group resolves its label sets at start
//! so the hot path only touches atomics.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabels {
    pub stream: String,
    pub group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub stream: String,
    pub group: String,
    pub outcome: &'static str,
}

/// A partitioned group, whatever its partitions' streams.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionedLabels {
    pub group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
    pub commit: &'static str,
}

/// Handler durations from a tenth of a millisecond to two minutes.
const HANDLER_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 120.0,
];
/// Entry age at acknowledgement; ids have millisecond resolution, so nothing finer than a
/// millisecond, but every millisecond up to 5 (where latency targets live).
const END_TO_END_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

fn handler_histogram() -> Histogram {
    Histogram::new(HANDLER_BUCKETS.iter().copied())
}
fn end_to_end_histogram() -> Histogram {
    Histogram::new(END_TO_END_BUCKETS.iter().copied())
}

/// Every metric the daemon exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    entries: Family<OutcomeLabels, Counter>,
    handler_seconds: Family<GroupLabels, Histogram, fn() -> Histogram>,
    end_to_end_seconds: Family<GroupLabels, Histogram, fn() -> Histogram>,
    inflight: Family<GroupLabels, Gauge>,
    reclaimed: Family<GroupLabels, Counter>,
    group_recreated: Family<GroupLabels, Counter>,
    dead_letter_refused: Family<GroupLabels, Counter>,
    circuit_open: Family<GroupLabels, Gauge>,
    group_paused: Family<GroupLabels, Gauge>,
    redis_errors: Family<ErrorLabels, Counter>,
    pub up: Gauge,
    group_lag: Family<GroupLabels, Gauge>,
    group_pending: Family<GroupLabels, Gauge>,
    group_consumers: Family<GroupLabels, Gauge>,
    oldest_pending_seconds: Family<GroupLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    dead_letter_length: Family<GroupLabels, Gauge>,
    retention_blocked: Family<GroupLabels, Gauge>,
    partitions_owned: Family<PartitionedLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let entries = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "streamworker_entries",
            "Entries settled, by outcome: acked, dropped, retried, dead_lettered, deleted, forwarded",
            entries.clone(),
        );
        let handler_seconds =
            Family::<GroupLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                handler_histogram as fn() -> Histogram,
            );
        registry.register(
            "streamworker_handler_seconds",
            "Time spent in the handler per entry",
            handler_seconds.clone(),
        );
        let end_to_end_seconds =
            Family::<GroupLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                end_to_end_histogram as fn() -> Histogram,
            );
        registry.register(
            "streamworker_end_to_end_seconds",
            "From the entry id's timestamp to the XACK reply (ids have millisecond resolution)",
            end_to_end_seconds.clone(),
        );
        let inflight = Family::<GroupLabels, Gauge>::default();
        registry.register(
            "streamworker_inflight",
            "Handler calls in flight on this replica",
            inflight.clone(),
        );
        let reclaimed = Family::<GroupLabels, Counter>::default();
        registry.register(
            "streamworker_reclaimed",
            "Entries this replica reclaimed from idle consumers (XAUTOCLAIM)",
            reclaimed.clone(),
        );
        let group_recreated = Family::<GroupLabels, Counter>::default();
        registry.register(
            "streamworker_group_recreated",
            "Consumer groups recreated after Redis lost them (NOGROUP)",
            group_recreated.clone(),
        );
        let dead_letter_refused = Family::<GroupLabels, Counter>::default();
        registry.register(
            "streamworker_dead_letters_refused",
            "Dead letters Redis refused (the dead-letter key's type, OOM): the entry stays pending and is retried after claim_idle",
            dead_letter_refused.clone(),
        );
        let circuit_open = Family::<GroupLabels, Gauge>::default();
        registry.register(
            "streamworker_circuit_open",
            "1 while this replica's circuit breaker for the group is open or half-open",
            circuit_open.clone(),
        );
        let group_paused = Family::<GroupLabels, Gauge>::default();
        registry.register(
            "streamworker_group_paused",
            "1 while this replica holds the group paused (`streamworker pause`): in-flight entries finish, nothing new is read or reclaimed",
            group_paused.clone(),
        );
        let redis_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "streamworker_redis_errors",
            "Failed Redis commands, by kind: unavailable, nogroup, command, protocol",
            redis_errors.clone(),
        );
        let up = Gauge::default();
        registry.register(
            "streamworker_up",
            "1 while Redis is reachable and every group runs",
            up.clone(),
        );
        let group_lag = Family::<GroupLabels, Gauge>::default();
        registry.register(
            "streamworker_group_lag",
            "Entries not yet delivered to the group (XINFO GROUPS lag); no sample when Redis cannot tell. Any replica may export it: aggregate with max by (stream, group)",
            group_lag.clone(),
        );
        let group_pending = Family::<GroupLabels, Gauge>::default();
        registry.register(
            "streamworker_group_pending",
            "Entries delivered and not yet acknowledged (aggregate with max by (stream, group))",
            group_pending.clone(),
        );
        let group_consumers = Family::<GroupLabels, Gauge>::default();
        registry.register(
            "streamworker_group_consumers",
            "Consumers in the group (aggregate with max by (stream, group))",
            group_consumers.clone(),
        );
        let oldest_pending_seconds =
            Family::<GroupLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "streamworker_oldest_pending_seconds",
            "Idle time of the longest-idle pending entry (aggregate with max by (stream, group))",
            oldest_pending_seconds.clone(),
        );
        let dead_letter_length = Family::<GroupLabels, Gauge>::default();
        registry.register(
            "streamworker_dead_letter_length",
            "Entries in the group's dead-letter stream (aggregate with max by (stream, group))",
            dead_letter_length.clone(),
        );
        let retention_blocked = Family::<GroupLabels, Gauge>::default();
        registry.register(
            "streamworker_retention_blocked",
            "1 while this group's unacknowledged or undelivered entries hold back the stream's retention",
            retention_blocked.clone(),
        );
        let partitions_owned = Family::<PartitionedLabels, Gauge>::default();
        registry.register(
            "streamworker_partitions_owned",
            "Partitions of a partitioned group this replica runs",
            partitions_owned.clone(),
        );
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                commit: option_env!("STREAMWORKER_COMMIT").unwrap_or("unknown"),
            })
            .set(1);
        registry.register(
            "streamworker_build_info",
            "Version of this binary",
            build_info,
        );
        Self {
            registry: Arc::new(registry),
            entries,
            handler_seconds,
            end_to_end_seconds,
            inflight,
            reclaimed,
            group_recreated,
            dead_letter_refused,
            circuit_open,
            group_paused,
            redis_errors,
            up,
            group_lag,
            group_pending,
            group_consumers,
            oldest_pending_seconds,
            dead_letter_length,
            retention_blocked,
            partitions_owned,
        }
    }

    /// Refreshes the group gauges from what Redis reported. Groups are the ones on the
    /// configured streams, including groups of other applications.
    pub fn set_group_gauges(&self, reports: &[crate::inspect::StreamReport]) {
        for stream in reports {
            for g in &stream.groups {
                let labels = GroupLabels {
                    stream: stream.stream.clone(),
                    group: g.group.clone(),
                };
                match g.lag {
                    Some(lag) => {
                        self.group_lag.get_or_create(&labels).set(lag as i64);
                    }
                    None => {
                        self.group_lag.remove(&labels);
                    }
                }
                self.group_pending
                    .get_or_create(&labels)
                    .set(g.pending as i64);
                self.group_consumers
                    .get_or_create(&labels)
                    .set(g.consumers.len() as i64);
                self.oldest_pending_seconds
                    .get_or_create(&labels)
                    .set(g.oldest_pending_seconds.unwrap_or(0.0));
                if let Some(len) = g.dead_letter_length {
                    self.dead_letter_length
                        .get_or_create(&labels)
                        .set(len as i64);
                }
            }
        }
    }

    /// Marks which groups on `stream` hold back its retention.
    pub fn set_retention_blocked(&self, stream: &str, groups: &[String], blocking: &[String]) {
        for group in groups {
            let labels = GroupLabels {
                stream: stream.to_owned(),
                group: group.clone(),
            };
            self.retention_blocked
                .get_or_create(&labels)
                .set(i64::from(blocking.contains(group)));
        }
    }

    /// How many partitions of `group` this replica runs (`crate::partition::owner`).
    pub fn partitions_owned(&self, group: &str) -> Gauge {
        self.partitions_owned
            .get_or_create(&PartitionedLabels {
                group: group.to_owned(),
            })
            .clone()
    }

    /// The handles one group updates.
    pub fn group(&self, stream: &str, group: &str) -> GroupMetrics {
        let labels = GroupLabels {
            stream: stream.to_owned(),
            group: group.to_owned(),
        };
        let outcome = |outcome: &'static str| {
            self.entries
                .get_or_create(&OutcomeLabels {
                    stream: stream.to_owned(),
                    group: group.to_owned(),
                    outcome,
                })
                .clone()
        };
        GroupMetrics {
            acked: outcome("acked"),
            dropped: outcome("dropped"),
            retried: outcome("retried"),
            dead_lettered: outcome("dead_lettered"),
            deleted: outcome("deleted"),
            forwarded: outcome("forwarded"),
            handler_seconds: self.handler_seconds.get_or_create(&labels).clone(),
            end_to_end_seconds: self.end_to_end_seconds.get_or_create(&labels).clone(),
            inflight: self.inflight.get_or_create(&labels).clone(),
            reclaimed: self.reclaimed.get_or_create(&labels).clone(),
            group_recreated: self.group_recreated.get_or_create(&labels).clone(),
            dead_letter_refused: self.dead_letter_refused.get_or_create(&labels).clone(),
            circuit_open: self.circuit_open.get_or_create(&labels).clone(),
            paused: self.group_paused.get_or_create(&labels).clone(),
            redis_errors: self.redis_errors.clone(),
        }
    }

    pub fn redis_error(&self, kind: &'static str) {
        self.redis_errors.get_or_create(&ErrorLabels { kind }).inc();
    }

    /// `streamworker_entries_total` of one group and outcome, as counted so far.
    pub fn entries(&self, stream: &str, group: &str, outcome: &'static str) -> u64 {
        self.entries
            .get_or_create(&OutcomeLabels {
                stream: stream.to_owned(),
                group: group.to_owned(),
                outcome,
            })
            .get()
    }

    /// The exposition text (OpenMetrics).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// One group's metric handles, resolved once.
#[derive(Clone)]
pub struct GroupMetrics {
    pub acked: Counter,
    pub dropped: Counter,
    pub retried: Counter,
    pub dead_lettered: Counter,
    pub deleted: Counter,
    pub forwarded: Counter,

    pub handler_seconds: Histogram,
    pub end_to_end_seconds: Histogram,
    pub inflight: Gauge,
    pub reclaimed: Counter,
    pub group_recreated: Counter,
    pub dead_letter_refused: Counter,
    pub circuit_open: Gauge,
    pub paused: Gauge,
    redis_errors: Family<ErrorLabels, Counter>,
}

impl GroupMetrics {
    pub fn redis_error(&self, kind: &'static str) {
        self.redis_errors.get_or_create(&ErrorLabels { kind }).inc();
    }
}
