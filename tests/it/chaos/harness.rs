//! The machinery of the fault matrix: one [`Case`] is a Redis, some replicas of the daemon,
//! a producer, the faults of the case at their moments, and a final account of what became
//! of every entry produced, as a [`Report`].
//!
//! What is counted, per group:
//! - **produced**: XADDs the producer saw confirmed (an XADD whose reply was lost is not
//!   counted, so it cannot be "lost");
//! - **handled**: distinct entries the sink took: the webhook answered them 2xx in time
//!   (counted by the receiver, so a late 2xx the daemon never saw does not count), or the
//!   forward target holds them (`source_id`);
//! - **dead-lettered**: distinct `dlq_origin_id`s in the group's dead-letter stream;
//! - **lost**: produced, neither handled nor dead-lettered once everything settled;
//! - **duplicates**: extra takes of an entry by its sink; allowed up to the entries the
//!   group had in flight at the kills (a SIGKILLed replica's or a killed Redis' pending
//!   entries: their handler may have finished without the acknowledgement being sent);
//! - **stalled**: the group's lag (XINFO GROUPS) was not back to 0 within `claim_idle` +
//!   the longest backoff after producing stopped (plus [`LOAD_SLACK`]; for a partitioned
//!   group, plus a partition lease and a third, the most a SIGKILLed replica's partition
//!   may wait for a new owner), or the group was missing;
//! - **out of order** (groups with `order_by`): requests the receiver took for an entry of
//!   a key after it had taken a newer entry of that key (every attempt counts, as in
//!   `tests/it/ordering.rs`: an entry may come again, never an older one after a newer);
//! - **unowned** (partitioned groups): partitions whose lease no live replica held once
//!   everything settled.
//!
//! A partitioned case ([`Case::partitions`]) writes each entry to the partition of its
//! [`KEY_FIELD`] (`partition_of`, as `produce --partition-by` does), and every account is
//! kept per partition stream: ids are only unique within one stream.
//!
//! Every group runs with the default failure policy: a case may only shorten
//! `handler_timeout`, `claim_idle` and the backoff's `initial`/`max` (so that it finishes
//! in seconds) and set its handler's options. [`Case::run`] checks that with
//! `streamworker check`: the resolved group must equal the one resolved from a group that
//! sets nothing but `stream`, `handler` and the options, apart from those keys.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use streamworker::partition::{partition_of, partition_stream};

use crate::support::*;

/// The shortened timings every case uses (consistent with the defaults left alone:
/// `claim_idle` > `handler_timeout`, `max × (1 + jitter)` < `claim_idle`), given the
/// case's `handler_timeout` (which the webhook's own `timeout` equals: at most
/// `handler_timeout`, as `check` demands).
fn timings(handler_timeout: &str) -> String {
    format!(
        "handler_timeout = \"{handler_timeout}\"\nclaim_idle = \"5s\"\nretry_backoff = {{ initial = \"200ms\", max = \"2s\" }}"
    )
}

/// `handler_timeout` unless a case needs longer.
pub const HANDLER_TIMEOUT: &str = "1s";

/// Keys a case may change from their defaults (dotted below `groups.<name>`).
const ALLOWED_OVERRIDES: &[&str] = &[
    "handler_timeout",
    "claim_idle",
    "retry_backoff.initial",
    "retry_backoff.max",
];

/// Added to every time bound: the machine that runs CI has two loaded cores.
pub const LOAD_SLACK: Duration = Duration::from_secs(3);

/// How long a slow webhook reply takes: well past `handler_timeout`.
const SLOW_REPLY: Duration = Duration::from_secs(3);

/// How long a late failure takes: shorter than the webhook's timeout.
const LATE_FAILURE: Duration = Duration::from_millis(700);

/// How long a hung webhook holds a request (the daemon gives up long before).
const HUNG_REPLY: Duration = Duration::from_secs(30);

/// The field a partitioned case's entries carry their key in (the group's `order_by`).
pub const KEY_FIELD: &str = "key";

/// What an entry is, for the webhook receiver (field `chaos`) and for the account.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Answered 2xx at once.
    Healthy,
    /// Answered 500 every time: retryable poison.
    Retryable,
    /// Answered 500 the first time the receiver sees it, 2xx after: a retry that
    /// succeeds, holding its key meanwhile in an ordered group.
    RetryableOnce,
    /// Answered 500 every time, after [`LATE_FAILURE`]: retryable poison whose calls are
    /// still running when something else happens (Redis goes down).
    RetryableLate,
    /// Answered 422 (a 4xx the webhook handler treats as permanent).
    Permanent,
    /// The first request for it takes [`SLOW_REPLY`]; later ones are answered at once.
    SlowOnce,
    /// Every request takes [`SLOW_REPLY`]: it can only time out.
    SlowAlways,
}

impl Kind {
    pub fn tag(self) -> &'static str {
        match self {
            Kind::Healthy => "ok",
            Kind::Retryable => "p500",
            Kind::RetryableOnce => "p500once",
            Kind::RetryableLate => "p500late",
            Kind::Permanent => "p422",
            Kind::SlowOnce => "slow1",
            Kind::SlowAlways => "slowall",
        }
    }

    fn from_tag(tag: &str) -> Kind {
        match tag {
            "p500" => Kind::Retryable,
            "p500once" => Kind::RetryableOnce,
            "p500late" => Kind::RetryableLate,
            "p422" => Kind::Permanent,
            "slow1" => Kind::SlowOnce,
            "slowall" => Kind::SlowAlways,
            _ => Kind::Healthy,
        }
    }

    /// Entries a webhook group must dead-letter.
    pub fn is_poison(self) -> bool {
        matches!(
            self,
            Kind::Retryable | Kind::RetryableLate | Kind::Permanent | Kind::SlowAlways
        )
    }

    /// What `dlq_error` of such an entry must say.
    fn dlq_error(self) -> &'static str {
        match self {
            Kind::Retryable | Kind::RetryableLate => "answered 500",
            Kind::Permanent => "answered 422",
            Kind::SlowAlways => "timed out",
            Kind::Healthy | Kind::SlowOnce | Kind::RetryableOnce => "",
        }
    }
}

/// Where a group's handled entries are seen.
pub enum Sink {
    /// `handler = "webhook"`, POSTing to the case's receiver at path `/<group>`.
    Webhook,
    /// `handler = "forward"` to this stream (no transformation; `source_id` added).
    Forward { to: &'static str },
}

pub struct Group {
    pub name: &'static str,
    pub sink: Sink,
    /// The entries this group must dead-letter (exactly once each).
    pub dead: fn(Kind) -> bool,
    /// What their `dlq_error` must contain; `None`: what the kind implies.
    pub dlq_error: Option<&'static str>,
    /// More TOML for the group (the policy self-test sets keys the matrix must refuse).
    pub extra: &'static str,
    /// `order_by`: its entries' calls are checked for per-key id order.
    pub order_by: Option<&'static str>,
}

impl Group {
    pub fn webhook(name: &'static str) -> Self {
        Self {
            name,
            sink: Sink::Webhook,
            dead: Kind::is_poison,
            dlq_error: None,
            extra: "",
            order_by: None,
        }
    }

    pub fn forward(name: &'static str, to: &'static str) -> Self {
        Self {
            name,
            sink: Sink::Forward { to },
            dead: |_| false,
            dlq_error: None,
            extra: "",
            order_by: None,
        }
    }
}

/// A fault, at an offset from the start of producing.
pub enum Fault {
    /// SIGKILL a random replica about every `every` (±40 %) and start a new one under a
    /// new consumer name (the old name's lease outlives it by up to 10 s).
    KillReplicas { every: Duration },
    /// SIGTERM a random replica about every `every` (±40 %) and start a new one at once:
    /// the stopped one drains and hands its partitions over. Not counted in flight: a
    /// graceful stop must not cause duplicates.
    TerminateReplicas { every: Duration },
    /// SIGKILL redis-server, keep it down for `down`, start it again on the same port and
    /// directory. `erases` says whether the restart loses the data (no persistence).
    RestartRedis {
        at: Duration,
        down: Duration,
        erases: bool,
    },
    /// `maxmemory` at the memory in use (policy `noeviction`: writes are refused) from
    /// `from` to `until`, when an operator lifts it.
    Oom { from: Duration, until: Duration },
    /// The webhook receiver accepts requests and does not answer, from `from` to `until`.
    WebhookHangs { from: Duration, until: Duration },
}

/// Produces entry `n`: its kind and the fields after `n` and `chaos`.
pub type EntryMaker = Box<dyn Fn(u64) -> (Kind, Fields) + Send + Sync>;

pub struct Case {
    pub name: String,
    pub replicas: usize,
    /// How long entries are produced.
    pub seconds: f64,
    /// Entries per second.
    pub rate: u64,
    pub redis_args: Vec<&'static str>,
    pub stream: &'static str,
    /// `partitions = N` on every group: entries go to `stream:p<partition_of(key)>`.
    pub partitions: Option<u32>,
    pub groups: Vec<Group>,
    pub entry: EntryMaker,
    pub faults: Vec<Fault>,
    /// Run against the fresh Redis before anything starts.
    pub setup: Option<fn(&mut redis::Connection)>,
    /// `handler_timeout` (and the webhook's `timeout`): [`HANDLER_TIMEOUT`] unless the
    /// case's healthy calls need longer.
    pub handler_timeout: &'static str,
}

/// Healthy entries, except every 50th (2 %), which is `poison`.
pub fn two_percent(poison: Kind) -> EntryMaker {
    Box::new(move |n| {
        let kind = if n % 50 == 17 { poison } else { Kind::Healthy };
        (
            kind,
            vec![(b"payload".to_vec(), format!("order {n}").into_bytes())],
        )
    })
}

/// What became of one group's entries.
#[derive(Debug, Default, Clone)]
pub struct GroupReport {
    pub group: String,
    pub produced: usize,
    pub handled: usize,
    pub dead_lettered: usize,
    pub poison: usize,
    pub poison_dead_once: usize,
    pub healthy_dead: usize,
    pub dead_twice: usize,
    pub lost: usize,
    pub duplicates: usize,
    pub in_flight_at_kills: usize,
    /// Dead letters or forwarded entries whose fields differ from what was produced.
    pub altered: usize,
    /// Dead letters of expected poison whose `dlq_error` does not say why.
    pub wrong_error: usize,
    /// Produced before a restart that erased Redis, never settled: Redis lost them.
    pub erased: usize,
    /// From the end of producing until the lag was 0; `None`: never within the wait.
    pub lag_zero_after: Option<Duration>,
    pub stall_bound: Duration,
    pub stalled: bool,
    pub pending_at_end: Option<u64>,
    /// A few of the lost ids, for the failure message.
    pub lost_sample: Vec<String>,
    /// A few of the duplicated ids.
    pub duplicate_sample: Vec<String>,
    /// The group has `order_by`: `out_of_order` was checked.
    pub ordered: bool,
    /// Calls for an entry of a key after a newer entry of that key had been called.
    pub out_of_order: usize,
    /// A few of them, for the failure message.
    pub order_sample: Vec<String>,
    /// The group is partitioned: `unowned` was checked.
    pub partitioned: bool,
    /// Partitions no live replica held at the end, with the lease's holder if any.
    pub unowned: Vec<String>,
}

#[derive(Debug, Default)]
pub struct Report {
    pub case: String,
    pub replicas: usize,
    pub seconds: f64,
    pub kills: usize,
    pub terminations: usize,
    /// SIGTERMed replicas still running `shutdown_timeout` + [`LOAD_SLACK`] after the
    /// signal.
    pub stuck_on_sigterm: usize,
    pub redis_restarts: usize,
    /// XADDs not confirmed (Redis down or refusing writes).
    pub unconfirmed: usize,
    /// From the end of producing until every entry had its fate and nothing was pending.
    pub settled_after: Option<Duration>,
    pub groups: Vec<GroupReport>,
    /// The configuration overrides more than the failure policy allows.
    pub policy_problems: Vec<String>,
    /// Distinct WARN/ERROR messages the replicas logged, with counts (most frequent first).
    pub log_summary: Vec<(usize, String)>,
}

impl Report {
    /// Every broken rule, with its figures; empty when the case passes.
    pub fn failures(&self) -> Vec<String> {
        let mut out: Vec<String> = self.policy_problems.clone();
        if self.stuck_on_sigterm > 0 {
            out.push(format!(
                "{} SIGTERMed replicas did not exit within shutdown_timeout",
                self.stuck_on_sigterm
            ));
        }
        for g in &self.groups {
            let name = &g.group;
            if g.lost > 0 {
                out.push(format!(
                    "{name}: lost {} of {} (e.g. {:?})",
                    g.lost, g.produced, g.lost_sample
                ));
            }
            if g.stalled {
                out.push(format!(
                    "{name}: stalled: lag not 0 within {:?} after producing stopped ({})",
                    g.stall_bound,
                    match g.lag_zero_after {
                        Some(d) => format!("it took {d:.1?}"),
                        None => "it never was".into(),
                    }
                ));
            }
            if g.poison_dead_once != g.poison {
                out.push(format!(
                    "{name}: {} of {} poison entries dead-lettered exactly once",
                    g.poison_dead_once, g.poison
                ));
            }
            if g.healthy_dead > 0 {
                out.push(format!(
                    "{name}: {} healthy entries dead-lettered",
                    g.healthy_dead
                ));
            }
            if g.dead_twice > 0 {
                out.push(format!(
                    "{name}: {} entries dead-lettered more than once",
                    g.dead_twice
                ));
            }
            if g.duplicates > g.in_flight_at_kills {
                out.push(format!(
                    "{name}: {} duplicates, more than the {} entries in flight at the kills (e.g. {:?})",
                    g.duplicates, g.in_flight_at_kills, g.duplicate_sample
                ));
            }
            if g.altered > 0 {
                out.push(format!(
                    "{name}: {} dead letters or forwarded entries differ from the entry produced",
                    g.altered
                ));
            }
            if g.wrong_error > 0 {
                out.push(format!(
                    "{name}: {} dead letters whose dlq_error does not name the cause",
                    g.wrong_error
                ));
            }
            if g.out_of_order > 0 {
                out.push(format!(
                    "{name}: {} calls out of id order for their key: an older entry after a newer one (e.g. {:?})",
                    g.out_of_order, g.order_sample
                ));
            }
            if !g.unowned.is_empty() {
                out.push(format!(
                    "{name}: partitions unowned by any live replica at the end: {:?}",
                    g.unowned
                ));
            }
        }
        out
    }

    pub fn passed(&self) -> bool {
        self.failures().is_empty()
    }

    /// The report as text: a header, one table row per group, the daemons' warnings.
    pub fn render(&self) -> String {
        let mut s = format!(
            "chaos case {}: {:.0} s of producing, {} replicas, {} SIGKILLs, {} SIGTERMs, {} Redis restarts, {} XADDs unconfirmed; settled {}\n",
            self.case,
            self.seconds,
            self.replicas,
            self.kills,
            self.terminations,
            self.redis_restarts,
            self.unconfirmed,
            match self.settled_after {
                Some(d) => format!("{d:.1?} after producing stopped"),
                None => "never (gave up waiting)".into(),
            }
        );
        s.push_str(&table_header());
        for g in &self.groups {
            s.push_str(&table_row(&self.case, g, self.passed()));
        }
        for (n, message) in self.log_summary.iter().take(8) {
            s.push_str(&format!("  log ×{n}: {message}\n"));
        }
        for f in self.failures() {
            s.push_str(&format!("  FAIL {f}\n"));
        }
        s
    }
}

pub fn table_header() -> String {
    format!(
        "  {:<30} {:<10} {:>8} {:>8} {:>6} {:>9} {:>6} {:>5} {:>9} {:>8} {:>7} {:>5} {:>7} {:>5} {:>5}\n",
        "case",
        "group",
        "produced",
        "handled",
        "dead",
        "poison",
        "h.dead",
        "lost",
        "dup/infl",
        "lag0",
        "stalled",
        "pend",
        "order",
        "unown",
        "ok"
    )
}

pub fn table_row(case: &str, g: &GroupReport, passed: bool) -> String {
    format!(
        "  {:<30} {:<10} {:>8} {:>8} {:>6} {:>9} {:>6} {:>5} {:>9} {:>8} {:>7} {:>5} {:>7} {:>5} {:>5}\n",
        case,
        g.group,
        g.produced,
        g.handled,
        g.dead_lettered,
        format!("{}/{}", g.poison_dead_once, g.poison),
        g.healthy_dead,
        g.lost,
        format!("{}/{}", g.duplicates, g.in_flight_at_kills),
        g.lag_zero_after
            .map(|d| format!("{:.1}s", d.as_secs_f64()))
            .unwrap_or_else(|| "never".into()),
        if g.stalled { "STALLED" } else { "no" },
        g.pending_at_end
            .map(|p| p.to_string())
            .unwrap_or_else(|| "-".into()),
        // Calls out of id order, or `-` for a group without `order_by`.
        if g.ordered {
            g.out_of_order.to_string()
        } else {
            "-".into()
        },
        if g.partitioned {
            g.unowned.len().to_string()
        } else {
            "-".into()
        },
        if passed { "pass" } else { "FAIL" }
    )
}

/// One produced entry, as confirmed.
struct Produced {
    id: String,
    /// Index of its stream among the case's streams (its partition; 0 unpartitioned).
    part: usize,
    kind: Kind,
    /// Of its fields, bytes as sent, in order.
    hash: u64,
    at: Instant,
}

fn fields_hash<'a>(fields: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> u64 {
    // SipHash with fixed keys: the same fields hash the same in this process.
    let mut h = std::hash::DefaultHasher::new();
    for (k, v) in fields {
        k.hash(&mut h);
        v.hash(&mut h);
    }
    h.finish()
}

/// A connection for observing, opened again after Redis restarts.
struct Probe {
    url: String,
    con: Option<redis::Connection>,
}

impl Probe {
    fn with<T>(
        &mut self,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Option<T> {
        if self.con.is_none() {
            self.con = redis::Client::open(self.url.as_str())
                .ok()?
                .get_connection_with_timeout(Duration::from_millis(500))
                .ok();
            if let Some(c) = &mut self.con {
                let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
            }
        }
        let con = self.con.as_mut()?;
        match f(con) {
            Ok(v) => Some(v),
            Err(e) => {
                if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
                    self.con = None;
                }
                None
            }
        }
    }
}

/// A group's pending count and whether its lag is 0; `None` when the stream or the group
/// does not exist (or Redis is down).
fn group_state(probe: &mut Probe, stream: &str, group: &str) -> Option<(u64, bool)> {
    let groups: Vec<redis::Value> =
        probe.with(|c| redis::cmd("XINFO").arg("GROUPS").arg(stream).query(c))?;
    let map = groups
        .into_iter()
        .map(value_map)
        .find(|m| m.get("name").map(String::as_str) == Some(group))?;
    let pending = map.get("pending")?.parse().ok()?;
    if let Some(lag) = map.get("lag").and_then(|l| l.parse::<u64>().ok()) {
        return Some((pending, lag == 0));
    }
    // Redis cannot always tell the lag (after deletions): is anything past the last
    // delivered id?
    let last = map.get("last-delivered-id")?.clone();
    let next: Vec<redis::Value> = probe.with(|c| {
        redis::cmd("XRANGE")
            .arg(stream)
            .arg(format!("({last}"))
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .query(c)
    })?;
    Some((pending, next.is_empty()))
}

/// [`group_state`] over every stream of a group (its partitions): pending summed, lag 0
/// when every one's is; `None` when any is missing.
fn groups_state(probe: &mut Probe, streams: &[String], group: &str) -> Option<(u64, bool)> {
    let mut total = (0, true);
    for stream in streams {
        let (pending, zero) = group_state(probe, stream, group)?;
        total = (total.0 + pending, total.1 && zero);
    }
    Some(total)
}

/// The partitions of `group` whose lease no replica in `live` holds, as `stream (holder)`;
/// `None` when Redis does not answer.
fn unowned(
    probe: &mut Probe,
    streams: &[String],
    group: &str,
    live: &HashSet<&str>,
) -> Option<Vec<String>> {
    let mut out = Vec::new();
    for stream in streams {
        let key = streamworker::keys::partition_lease_key(stream, group);
        let holder: Option<String> = probe.with(|c| redis::cmd("GET").arg(&key).query(c))?;
        match holder {
            Some(h) if live.contains(h.as_str()) => {}
            Some(h) => out.push(format!("{stream} (held by {h}, not running)")),
            None => out.push(format!("{stream} (no lease)")),
        }
    }
    Some(out)
}

/// One request the receiver took for an entry with a [`KEY_FIELD`]: for the per-key
/// order check.
pub struct Call {
    pub group: String,
    pub key: String,
    /// The entry's id as (ms, seq): a key's entries are all in one stream (its partition),
    /// where ids order them.
    pub id: (u64, u64),
    pub at: Instant,
}

fn id_parts(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// The calls of `group` that came for an entry of a key after a newer entry of that key
/// had been called (by arrival at the receiver): how many, and a few described. A call
/// for the same entry again (a retry, or after a SIGKILL the entry that was in flight) is
/// in order.
pub fn out_of_order(calls: &[Call], group: &str) -> (usize, Vec<String>) {
    let mut mine: Vec<&Call> = calls.iter().filter(|c| c.group == group).collect();
    mine.sort_by_key(|c| c.at);
    let mut newest: HashMap<&str, (u64, u64)> = HashMap::new();
    let mut count = 0;
    let mut sample = Vec::new();
    for c in mine {
        let seen = newest.entry(c.key.as_str()).or_insert(c.id);
        if c.id < *seen {
            count += 1;
            if sample.len() < 5 {
                sample.push(format!(
                    "key {}: {}-{} after {}-{}",
                    c.key, c.id.0, c.id.1, seen.0, seen.1
                ));
            }
        } else {
            *seen = c.id;
        }
    }
    (count, sample)
}

/// One observed take of an entry: how often, and the fields' hash of the first.
#[derive(Default)]
struct Seen {
    count: usize,
    hash: u64,
    error: String,
}

/// Reads a stream incrementally, keying entries by the id in `origin_field` and hashing the
/// fields that are not bookkeeping (`skip`).
struct StreamReader {
    key: String,
    origin_field: &'static [u8],
    skip: fn(&[u8]) -> bool,
    cursor: String,
    seen: HashMap<String, Seen>,
}

impl StreamReader {
    fn new(key: String, origin_field: &'static [u8], skip: fn(&[u8]) -> bool) -> Self {
        Self {
            key,
            origin_field,
            skip,
            cursor: "-".into(),
            seen: HashMap::new(),
        }
    }

    fn poll(&mut self, probe: &mut Probe) {
        loop {
            let start = if self.cursor == "-" {
                "-".to_owned()
            } else {
                format!("({}", self.cursor)
            };
            let Some(batch) = probe.with(|c| {
                redis::cmd("XRANGE")
                    .arg(&self.key)
                    .arg(&start)
                    .arg("+")
                    .arg("COUNT")
                    .arg(200)
                    .query::<Vec<(String, Fields)>>(c)
            }) else {
                return;
            };
            let Some((last, _)) = batch.last() else {
                return;
            };
            self.cursor = last.clone();
            for (_, fields) in batch {
                let Some((_, origin)) = fields.iter().find(|(k, _)| k == self.origin_field) else {
                    continue;
                };
                let origin = String::from_utf8_lossy(origin).into_owned();
                let error = fields
                    .iter()
                    .find(|(k, _)| k == b"dlq_error")
                    .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default();
                let hash = fields_hash(
                    fields
                        .iter()
                        .filter(|(k, _)| !(self.skip)(k))
                        .map(|(k, v)| (k.as_slice(), v.as_slice())),
                );
                let seen = self.seen.entry(origin).or_default();
                if seen.count == 0 {
                    seen.hash = hash;
                    seen.error = error;
                }
                seen.count += 1;
            }
        }
    }
}

/// The policy a group resolves to, as `streamworker check` prints it: dotted key → value.
type Resolved = BTreeMap<String, String>;

/// Parses `check`'s TOML output into one `Resolved` per group.
fn resolved_groups(text: &str) -> HashMap<String, Resolved> {
    let mut out: HashMap<String, Resolved> = HashMap::new();
    let mut section: Option<(String, String)> = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = header.strip_prefix("groups.").map(|rest| {
                let (group, sub) = rest.split_once('.').unwrap_or((rest, ""));
                (group.to_owned(), sub.to_owned())
            });
            continue;
        }
        let (Some((group, sub)), Some((k, v))) = (&section, line.split_once(" = ")) else {
            continue;
        };
        let key = if sub.is_empty() {
            k.to_owned()
        } else {
            format!("{sub}.{k}")
        };
        out.entry(group.clone())
            .or_default()
            .insert(key, v.trim_matches('"').to_owned());
    }
    out
}

/// `"200ms"`, `"5s"`, `"2m"`, `"1h"` as check prints them.
fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim_matches('"');
    let digits = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let value: f64 = digits.parse().ok()?;
    let secs = match &text[digits.len()..] {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86400.0,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

/// What the run needs from a group's resolved policy.
struct Policy {
    dead_letter_stream: String,
    claim_idle: Duration,
    longest_backoff: Duration,
    handler_timeout: Duration,
    max_deliveries: u32,
    pause: Duration,
    /// A partitioned group's `partition_lease` (set or derived from `handler_timeout`).
    partition_lease: Option<Duration>,
}

impl Policy {
    fn from(resolved: &Resolved, stream: &str, group: &str, partitioned: bool) -> Self {
        let d = |k: &str, default: Duration| {
            resolved
                .get(k)
                .and_then(|v| parse_duration(v))
                .unwrap_or(default)
        };
        let jitter: f64 = resolved
            .get("retry_backoff.jitter")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.2);
        let handler_timeout = d("handler_timeout", Duration::from_secs(30));
        Self {
            dead_letter_stream: resolved
                .get("dead_letter_stream")
                .cloned()
                .unwrap_or_else(|| format!("{{{stream}}}:dlq:{group}")),
            claim_idle: d("claim_idle", Duration::from_secs(120)),
            longest_backoff: d("retry_backoff.max", Duration::from_secs(60)).mul_f64(1.0 + jitter),
            handler_timeout,
            max_deliveries: resolved
                .get("max_deliveries")
                .and_then(|v| v.parse().ok())
                .unwrap_or(5),
            pause: d("circuit_breaker.pause", Duration::from_secs(5)),
            partition_lease: partitioned.then(|| {
                d(
                    "partition_lease",
                    streamworker::partition::default_lease(handler_timeout),
                )
            }),
        }
    }

    /// How long a SIGKILLed replica's partition may wait for a new owner: its lease's
    /// lifetime, then a third of one for a survivor's next turn (docs/partitions.md).
    fn handover(&self) -> Duration {
        self.partition_lease
            .map(|lease| lease + lease / 3)
            .unwrap_or_default()
    }

    /// The stall rule's bound: `claim_idle` + the longest backoff (+ the handover of a
    /// partition).
    fn stall_bound(&self) -> Duration {
        self.claim_idle + self.longest_backoff + self.handover()
    }

    /// Long enough for an entry produced last to go through every attempt: a reclaim
    /// after a kill, each delivery timing out and backing off, one circuit pause.
    fn settle_limit(&self) -> Duration {
        self.claim_idle
            + (self.handler_timeout + self.longest_backoff + Duration::from_secs(1))
                * self.max_deliveries
            + self.pause
            + self.handover()
    }
}

fn group_toml(case: &Case, g: &Group, hook: Option<&WebhookServer>, timings: bool) -> String {
    let (handler, options) = match &g.sink {
        Sink::Webhook => (
            "webhook",
            format!(
                "url = \"{}\"{}",
                hook.expect("a webhook group has a receiver").url(g.name),
                if timings {
                    format!("\ntimeout = \"{}\"", case.handler_timeout)
                } else {
                    String::new()
                }
            ),
        ),
        Sink::Forward { to } => ("forward", format!("to = \"{to}\"")),
    };
    // The group's shape, not its failure policy: in the baseline too.
    let partitions = case
        .partitions
        .map(|n| format!("partitions = {n}\n"))
        .unwrap_or_default();
    let order_by = g
        .order_by
        .map(|f| format!("order_by = \"{f}\"\n"))
        .unwrap_or_default();
    format!(
        "[groups.{name}]\nstream = \"{stream}\"\nhandler = \"{handler}\"\n{partitions}{order_by}{timings}\n{extra}\n[groups.{name}.options]\n{options}\n",
        name = g.name,
        stream = case.stream,
        timings = if timings {
            self::timings(case.handler_timeout)
        } else {
            String::new()
        },
        extra = if timings { g.extra } else { "" },
    )
}

/// Whether a partitioned group's lease is the default for its (shortened)
/// `handler_timeout`, as `check` derives it: not something the case set.
fn lease_is_derived(resolved: &Resolved) -> bool {
    let get = |k: &str| resolved.get(k).and_then(|v| parse_duration(v));
    match (get("handler_timeout"), get("partition_lease")) {
        (Some(timeout), Some(lease)) => lease == streamworker::partition::default_lease(timeout),
        _ => false,
    }
}

/// Runs `streamworker check` on `config`; the resolved groups, or what check said.
fn check(config: &str) -> Result<HashMap<String, Resolved>, String> {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("check.toml");
    std::fs::write(&path, config).expect("write config");
    let (code, stdout, stderr) = run_cli(&["check", "-c", path.to_str().unwrap()], &[]);
    if code != 0 {
        return Err(format!("streamworker check exits {code}: {stderr}"));
    }
    Ok(resolved_groups(&stdout))
}

/// What the case's configuration changes beyond the allowed keys, by group.
fn policy_problems(
    case: &Case,
    hook: Option<&WebhookServer>,
    url: &str,
) -> (Vec<String>, HashMap<String, Resolved>) {
    let full = |timings: bool| {
        let groups: String = case
            .groups
            .iter()
            .map(|g| group_toml(case, g, hook, timings))
            .collect();
        config(url, "check", &groups)
    };
    let (actual, baseline) = match (check(&full(true)), check(&full(false))) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return (vec![e], HashMap::new()),
    };
    let mut problems = Vec::new();
    for g in &case.groups {
        let (Some(a), Some(b)) = (actual.get(g.name), baseline.get(g.name)) else {
            problems.push(format!("check does not print group {}", g.name));
            continue;
        };
        let keys: HashSet<&String> = a.keys().chain(b.keys()).collect();
        for key in keys {
            if key.starts_with("options.")
                || ALLOWED_OVERRIDES.contains(&key.as_str())
                || (key == "partition_lease" && lease_is_derived(a))
            {
                continue;
            }
            if a.get(key) != b.get(key) {
                problems.push(format!(
                    "{}: {key} is {:?}, not the default {:?}: the matrix runs the default failure policy",
                    g.name,
                    a.get(key),
                    b.get(key)
                ));
            }
        }
    }
    (problems, actual)
}

/// Counts distinct WARN/ERROR messages in a daemon's JSON log.
fn tally_log(text: &str, into: &mut HashMap<String, usize>) {
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if !matches!(v["level"].as_str(), Some("WARN" | "ERROR")) {
            continue;
        }
        let mut message = v["message"].as_str().unwrap_or("?").to_owned();
        if let Some(e) = v["error"].as_str() {
            let e: String = e.chars().take(120).collect();
            message.push_str(&format!(" (error: {e})"));
        }
        *into.entry(message).or_default() += 1;
    }
}

/// The producer thread: XADDs at `rate` until `stop`; the confirmed entries and the count
/// of unconfirmed XADDs.
fn spawn_producer(
    url: String,
    streams: Vec<String>,
    partitions: Option<u32>,
    rate: u64,
    entry: Arc<EntryMaker>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(Vec<Produced>, usize)> {
    std::thread::spawn(move || {
        let client = redis::Client::open(url).unwrap();
        let mut con: Option<redis::Connection> = None;
        let mut produced = Vec::new();
        let mut unconfirmed = 0;
        let started = Instant::now();
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            if con.is_none() {
                con = client
                    .get_connection_with_timeout(Duration::from_millis(200))
                    .ok();
                if let Some(c) = &mut con {
                    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                }
            }
            let (kind, extra) = entry(n);
            let mut fields: Fields = vec![
                (b"n".to_vec(), n.to_string().into_bytes()),
                (b"chaos".to_vec(), kind.tag().as_bytes().to_vec()),
            ];
            fields.extend(extra);
            // The partition of the entry's key, as `produce --partition-by` picks it.
            let part = partitions.map_or(0, |n| {
                let key = fields
                    .iter()
                    .find(|(k, _)| k == KEY_FIELD.as_bytes())
                    .map(|(_, v)| v.as_slice())
                    .expect("a partitioned case's entries carry a key");
                partition_of(key, n) as usize
            });
            match con.as_mut() {
                Some(c) => {
                    let mut cmd = redis::cmd("XADD");
                    cmd.arg(&streams[part]).arg("*");
                    for (k, v) in &fields {
                        cmd.arg(k.as_slice()).arg(v.as_slice());
                    }
                    match cmd.query::<String>(c) {
                        Ok(id) => produced.push(Produced {
                            id,
                            part,
                            kind,
                            hash: fields_hash(
                                fields.iter().map(|(k, v)| (k.as_slice(), v.as_slice())),
                            ),
                            at: Instant::now(),
                        }),
                        Err(e) => {
                            unconfirmed += 1;
                            // A refusal (OOM) keeps the connection; a broken one is
                            // opened again.
                            if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
                                con = None;
                            }
                        }
                    }
                }
                None => unconfirmed += 1,
            }
            n += 1;
            let due = started + Duration::from_secs_f64(n as f64 / rate as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        (produced, unconfirmed)
    })
}

/// 2xx answered in time, by (group, stream, id).
type Taken = HashMap<(String, String, String), usize>;

/// The webhook receiver of a case: answers by the entry's `chaos` field, hangs while
/// `hang` is set, counts the 2xx it answered in time, by (group, stream, id), and records
/// every call for an entry with a key.
fn receiver(
    hang: Arc<AtomicBool>,
    taken: Arc<Mutex<Taken>>,
    calls: Arc<Mutex<Vec<Call>>>,
) -> WebhookServer {
    let slowed: Mutex<HashSet<String>> = Mutex::default();
    let failed_once: Mutex<HashSet<(String, String)>> = Mutex::default();
    WebhookServer::start_with(move |hit| {
        let stream = hit.body["stream"].as_str().unwrap_or_default().to_owned();
        if let (Some(key), Some(id)) = (hit.body["fields"][KEY_FIELD].as_str(), id_parts(&hit.id)) {
            calls.lock().unwrap().push(Call {
                group: hit.path.clone(),
                key: key.to_owned(),
                id,
                at: hit.at,
            });
        }
        if hang.load(Ordering::Relaxed) {
            return (503, HUNG_REPLY);
        }
        let kind = Kind::from_tag(hit.body["fields"]["chaos"].as_str().unwrap_or("ok"));
        let (status, delay) = match kind {
            Kind::Retryable => (500, Duration::ZERO),
            Kind::RetryableOnce
                if failed_once
                    .lock()
                    .unwrap()
                    .insert((stream.clone(), hit.id.clone())) =>
            {
                (500, Duration::ZERO)
            }
            Kind::RetryableLate => (500, LATE_FAILURE),
            Kind::Permanent => (422, Duration::ZERO),
            Kind::SlowAlways => (503, SLOW_REPLY),
            // Slow the first time the receiver sees it, whatever its delivery count says
            // (a given-back attempt does not count).
            Kind::SlowOnce if slowed.lock().unwrap().insert(hit.id.clone()) => (503, SLOW_REPLY),
            Kind::SlowOnce | Kind::Healthy | Kind::RetryableOnce => {
                (200, Duration::from_millis(fastrand::u64(0..5)))
            }
        };
        if status == 200 {
            *taken
                .lock()
                .unwrap()
                .entry((hit.path.clone(), stream, hit.id.clone()))
                .or_default() += 1;
        }
        (status, delay)
    })
}

impl Case {
    pub fn run(self) -> Report {
        let case = self;
        let mut redis = RedisServer::start_with(&case.redis_args);
        let url = redis.url();
        if let Some(setup) = case.setup {
            setup(&mut redis.connection());
        }
        // The streams entries go to: the case's stream, or each of its partitions.
        let streams: Vec<String> = match case.partitions {
            Some(n) => (0..n).map(|p| partition_stream(case.stream, p)).collect(),
            None => vec![case.stream.to_owned()],
        };
        if case.partitions.is_some() {
            // A forward's `source_id` does not say which partition an entry came from, and
            // a restart's check reads the one stream.
            assert!(
                case.groups.iter().all(|g| matches!(g.sink, Sink::Webhook))
                    && !case
                        .faults
                        .iter()
                        .any(|f| matches!(f, Fault::RestartRedis { .. })),
                "a partitioned case runs webhook groups without Redis restarts"
            );
        }
        let hang = Arc::new(AtomicBool::new(false));
        let taken: Arc<Mutex<Taken>> = Arc::default();
        let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
        let hook = case
            .groups
            .iter()
            .any(|g| matches!(g.sink, Sink::Webhook))
            .then(|| receiver(hang.clone(), taken.clone(), calls.clone()));

        let mut report = Report {
            case: case.name.clone(),
            replicas: case.replicas,
            seconds: case.seconds,
            ..Default::default()
        };
        let (problems, resolved) = policy_problems(&case, hook.as_ref(), &url);
        report.policy_problems = problems;
        if !report.policy_problems.is_empty() {
            return report;
        }
        let policies: Vec<Policy> = case
            .groups
            .iter()
            .map(|g| {
                Policy::from(
                    &resolved[g.name],
                    case.stream,
                    g.name,
                    case.partitions.is_some(),
                )
            })
            .collect();

        let groups_toml: String = case
            .groups
            .iter()
            .map(|g| group_toml(&case, g, hook.as_ref(), true))
            .collect();
        let mut next_name = 0;
        let mut start_replica = || {
            next_name += 1;
            (
                format!("replica-{next_name}"),
                Daemon::start(&config(&url, &format!("replica-{next_name}"), &groups_toml)),
            )
        };
        let mut replicas: Vec<(String, Daemon)> =
            (0..case.replicas).map(|_| start_replica()).collect();
        let mut logs: HashMap<String, usize> = HashMap::new();
        let mut probe = Probe {
            url: url.clone(),
            con: None,
        };
        wait_until(Duration::from_secs(30), "every group created", || {
            case.groups
                .iter()
                .all(|g| groups_state(&mut probe, &streams, g.name).is_some())
        });

        // Produce, and inject the faults on schedule.
        let stop = Arc::new(AtomicBool::new(false));
        let entry = Arc::new(case.entry);
        let producer = spawn_producer(
            url.clone(),
            streams.clone(),
            case.partitions,
            case.rate,
            entry,
            stop.clone(),
        );
        let started = Instant::now();
        let producing = Duration::from_secs_f64(case.seconds);
        let mut in_flight = vec![0usize; case.groups.len()];
        // When each fault that stops replicas strikes next.
        let mut next_stop: Vec<Option<Duration>> = case
            .faults
            .iter()
            .map(|f| match f {
                Fault::KillReplicas { every } | Fault::TerminateReplicas { every } => {
                    Some(every.mul_f64(0.6 + 0.8 * fastrand::f64()))
                }
                _ => None,
            })
            .collect();
        // SIGTERMed replicas draining, with when they were told.
        let mut stopping: Vec<(Instant, Daemon)> = Vec::new();
        // (scope starts at, because a restart erased what came before)
        let mut scope_from: Option<Instant> = None;
        let mut done: HashSet<usize> = HashSet::new();
        let mut oom_on = false;
        while started.elapsed() < producing {
            let now = started.elapsed();
            for (i, fault) in case.faults.iter().enumerate() {
                match fault {
                    Fault::KillReplicas { every } => {
                        if next_stop[i].is_some_and(|at| now >= at) {
                            let victim = fastrand::usize(..replicas.len());
                            let (name, mut daemon) =
                                std::mem::replace(&mut replicas[victim], start_replica());
                            daemon.kill();
                            tally_log(&daemon.logs(), &mut logs);
                            // Frozen now: nobody claims its entries before claim_idle.
                            for (gi, g) in case.groups.iter().enumerate() {
                                for stream in &streams {
                                    let n = probe
                                        .with(|c| {
                                            redis::cmd("XPENDING")
                                                .arg(stream)
                                                .arg(g.name)
                                                .arg("-")
                                                .arg("+")
                                                .arg(100_000)
                                                .arg(&name)
                                                .query::<Vec<redis::Value>>(c)
                                        })
                                        .map(|rows| rows.len())
                                        .unwrap_or(0);
                                    in_flight[gi] += n;
                                }
                            }
                            report.kills += 1;
                            next_stop[i] = Some(now + every.mul_f64(0.6 + 0.8 * fastrand::f64()));
                        }
                    }
                    Fault::TerminateReplicas { every } => {
                        if next_stop[i].is_some_and(|at| now >= at) {
                            let victim = fastrand::usize(..replicas.len());
                            let (_, daemon) =
                                std::mem::replace(&mut replicas[victim], start_replica());
                            daemon.terminate();
                            stopping.push((Instant::now(), daemon));
                            report.terminations += 1;
                            next_stop[i] = Some(now + every.mul_f64(0.6 + 0.8 * fastrand::f64()));
                        }
                    }
                    Fault::RestartRedis { at, down, erases } => {
                        if now >= *at && done.insert(i) {
                            for (gi, g) in case.groups.iter().enumerate() {
                                in_flight[gi] += groups_state(&mut probe, &streams, g.name)
                                    .map(|(p, _)| p as usize)
                                    .unwrap_or(0);
                            }
                            // The oldest entry: still there after the restart unless
                            // Redis lost its data.
                            let first = |probe: &mut Probe| {
                                probe.with(|c| {
                                    redis::cmd("XRANGE")
                                        .arg(case.stream)
                                        .arg("-")
                                        .arg("+")
                                        .arg("COUNT")
                                        .arg(1)
                                        .query::<Vec<(String, Fields)>>(c)
                                })
                            };
                            let oldest = first(&mut probe)
                                .and_then(|e| e.into_iter().next())
                                .map(|(id, _)| id)
                                .expect("the stream has entries before the restart");
                            // Whatever is confirmed from now on, the restarted server holds.
                            let killed_at = Instant::now();
                            redis.kill();
                            std::thread::sleep(*down);
                            redis.restart();
                            report.redis_restarts += 1;
                            // The probe's first command after the restart may meet the
                            // connection the kill broke.
                            let mut after = None;
                            for _ in 0..20 {
                                after = first(&mut probe);
                                if after.is_some() {
                                    break;
                                }
                                std::thread::sleep(Duration::from_millis(50));
                            }
                            let kept = after
                                .expect("XRANGE after the restart")
                                .first()
                                .is_some_and(|(id, _)| *id == oldest);
                            assert_eq!(
                                kept,
                                !*erases,
                                "a restart of this redis-server should {} the stream",
                                if *erases { "erase" } else { "keep" }
                            );
                            if *erases {
                                scope_from = Some(killed_at);
                            }
                        }
                    }
                    Fault::Oom { from, until } => {
                        if !oom_on && now >= *from && now < *until && done.insert(i) {
                            let used: u64 = probe
                                .with(|c| redis::cmd("INFO").arg("memory").query::<String>(c))
                                .and_then(|info| {
                                    info.lines().find_map(|l| {
                                        l.strip_prefix("used_memory:")?.trim().parse().ok()
                                    })
                                })
                                .expect("INFO memory");
                            probe
                                .with(|c| {
                                    redis::cmd("CONFIG")
                                        .arg("SET")
                                        .arg("maxmemory")
                                        .arg(used)
                                        .query::<()>(c)
                                })
                                .expect("CONFIG SET maxmemory");
                            oom_on = true;
                        } else if oom_on && now >= *until {
                            probe
                                .with(|c| {
                                    redis::cmd("CONFIG")
                                        .arg("SET")
                                        .arg("maxmemory")
                                        .arg(0)
                                        .query::<()>(c)
                                })
                                .expect("CONFIG SET maxmemory 0");
                            oom_on = false;
                        }
                    }
                    Fault::WebhookHangs { from, until } => {
                        hang.store(now >= *from && now < *until, Ordering::Relaxed);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Ordering::Relaxed);
        let (produced, unconfirmed) = producer.join().expect("the producer thread");
        let ended = Instant::now();
        report.unconfirmed = unconfirmed;
        // Faults end with producing.
        hang.store(false, Ordering::Relaxed);
        if oom_on {
            probe.with(|c| {
                redis::cmd("CONFIG")
                    .arg("SET")
                    .arg("maxmemory")
                    .arg(0)
                    .query::<()>(c)
            });
        }

        // Watch until every entry has its fate and nothing is pending, or time is up.
        // Per group, per stream: a partition's dead letters are its own.
        let mut dlqs: Vec<Vec<StreamReader>> = case
            .groups
            .iter()
            .zip(&policies)
            .map(|(g, policy)| {
                streams
                    .iter()
                    .map(|stream| {
                        let key = match case.partitions {
                            Some(_) => streamworker::dead_letter::default_stream(stream, g.name),
                            None => policy.dead_letter_stream.clone(),
                        };
                        StreamReader::new(key, b"dlq_origin_id", |k| k.starts_with(b"dlq_"))
                    })
                    .collect()
            })
            .collect();
        let mut targets: Vec<Option<StreamReader>> = case
            .groups
            .iter()
            .map(|g| match g.sink {
                Sink::Forward { to } => Some(StreamReader::new(to.into(), b"source_id", |k| {
                    k == b"source_id"
                })),
                Sink::Webhook => None,
            })
            .collect();
        let handled_of = |gi: usize, targets: &Vec<Option<StreamReader>>, p: &Produced| -> usize {
            match &targets[gi] {
                Some(t) => t.seen.get(&p.id).map(|s| s.count).unwrap_or(0),
                None => taken
                    .lock()
                    .unwrap()
                    .get(&(
                        case.groups[gi].name.to_owned(),
                        streams[p.part].clone(),
                        p.id.clone(),
                    ))
                    .copied()
                    .unwrap_or(0),
            }
        };
        // Where an entry is, for messages.
        let describe = |p: &Produced| match case.partitions {
            Some(_) => format!("{}/{} ({})", streams[p.part], p.id, p.kind.tag()),
            None => format!("{} ({})", p.id, p.kind.tag()),
        };
        let in_scope = |p: &Produced| scope_from.is_none_or(|from| p.at >= from);
        let settle_limit = policies
            .iter()
            .map(Policy::settle_limit)
            .max()
            .unwrap_or_default()
            + LOAD_SLACK * 2;
        let mut lag_zero: Vec<Option<Duration>> = vec![None; case.groups.len()];
        let mut pending: Vec<Option<u64>> = vec![None; case.groups.len()];
        let mut next_account = Instant::now();
        loop {
            for (gi, g) in case.groups.iter().enumerate() {
                let state = groups_state(&mut probe, &streams, g.name);
                pending[gi] = state.map(|(p, _)| p);
                if lag_zero[gi].is_none() && state.is_some_and(|(_, zero)| zero) {
                    lag_zero[gi] = Some(ended.elapsed());
                }
            }
            if Instant::now() >= next_account {
                next_account = Instant::now() + Duration::from_millis(250);
                for r in dlqs
                    .iter_mut()
                    .flatten()
                    .chain(targets.iter_mut().flatten())
                {
                    r.poll(&mut probe);
                }
                let live: HashSet<&str> = replicas.iter().map(|(n, _)| n.as_str()).collect();
                let settled = case.groups.iter().enumerate().all(|(gi, g)| {
                    pending[gi] == Some(0)
                        && lag_zero[gi].is_some()
                        && produced.iter().filter(|p| in_scope(p)).all(|p| {
                            handled_of(gi, &targets, p) > 0
                                || dlqs[gi][p.part].seen.contains_key(&p.id)
                        })
                        && (case.partitions.is_none()
                            || unowned(&mut probe, &streams, g.name, &live)
                                .is_some_and(|u| u.is_empty()))
                });
                if settled {
                    report.settled_after = Some(ended.elapsed());
                    break;
                }
            }
            if ended.elapsed() > settle_limit {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for r in dlqs
            .iter_mut()
            .flatten()
            .chain(targets.iter_mut().flatten())
        {
            r.poll(&mut probe);
        }
        // The SIGTERMed replicas must have exited (drained) by now.
        let shutdown_timeout = Duration::from_secs(10);
        for (told, mut daemon) in stopping {
            let left =
                (told + shutdown_timeout + LOAD_SLACK).saturating_duration_since(Instant::now());
            if daemon.wait(left).is_none() {
                report.stuck_on_sigterm += 1;
                daemon.kill();
            }
            tally_log(&daemon.logs(), &mut logs);
        }
        let live: HashSet<&str> = replicas.iter().map(|(n, _)| n.as_str()).collect();
        let calls = std::mem::take(&mut *calls.lock().unwrap());

        // The account.
        for (gi, g) in case.groups.iter().enumerate() {
            let policy = &policies[gi];
            let mut r = GroupReport {
                group: g.name.to_owned(),
                in_flight_at_kills: in_flight[gi],
                lag_zero_after: lag_zero[gi],
                stall_bound: policy.stall_bound() + LOAD_SLACK,
                pending_at_end: pending[gi],
                ordered: g.order_by.is_some(),
                partitioned: case.partitions.is_some(),
                ..Default::default()
            };
            if r.ordered {
                (r.out_of_order, r.order_sample) = out_of_order(&calls, g.name);
            }
            if r.partitioned {
                r.unowned = unowned(&mut probe, &streams, g.name, &live)
                    .unwrap_or_else(|| vec!["(Redis did not answer)".into()]);
            }
            r.stalled = lag_zero[gi].is_none_or(|d| d > r.stall_bound);
            for p in &produced {
                let handled = handled_of(gi, &targets, p);
                let dead = dlqs[gi][p.part].seen.get(&p.id);
                if !in_scope(p) {
                    if handled == 0 && dead.is_none() {
                        r.erased += 1;
                    }
                    continue;
                }
                r.produced += 1;
                if handled > 0 {
                    r.handled += 1;
                    r.duplicates += handled - 1;
                    if handled > 1 && r.duplicate_sample.len() < 5 {
                        r.duplicate_sample
                            .push(format!("{} ×{handled}", describe(p)));
                    }
                    if let Some(t) = &targets[gi]
                        && t.seen[&p.id].hash != p.hash
                    {
                        r.altered += 1;
                    }
                }
                let expect_dead = (g.dead)(p.kind);
                if expect_dead {
                    r.poison += 1;
                }
                if let Some(dead) = dead {
                    r.dead_lettered += 1;
                    if dead.count > 1 {
                        r.dead_twice += 1;
                    }
                    if dead.hash != p.hash {
                        r.altered += 1;
                    }
                    if expect_dead {
                        if dead.count == 1 {
                            r.poison_dead_once += 1;
                        }
                        let why = g.dlq_error.unwrap_or(p.kind.dlq_error());
                        if !dead.error.contains(why) {
                            r.wrong_error += 1;
                        }
                    } else {
                        r.healthy_dead += 1;
                    }
                }
                if handled == 0 && dead.is_none() {
                    r.lost += 1;
                    if r.lost_sample.len() < 5 {
                        r.lost_sample.push(describe(p));
                    }
                }
            }
            report.groups.push(r);
        }
        for (_, d) in &replicas {
            tally_log(&d.logs(), &mut logs);
        }
        let mut summary: Vec<(usize, String)> = logs.into_iter().map(|(m, n)| (n, m)).collect();
        summary.sort_by(|a, b| b.cmp(a));
        report.log_summary = summary;
        report
    }
}
