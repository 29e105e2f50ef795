//! The rules serde cannot express: ranges, and the cross-field rules of DESIGN §2, each
//! explained so the operator knows what to change.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use redis::IntoConnectionInfo;

use super::{Config, GroupSettings, RetryBackoff, redact_url};
use streamworker_handlers::duration::{format as human, whole_ms};
use streamworker_handlers::{Limits, Needs};

/// The keys a configuration sets itself, in its file or the environment, dotted
/// (`groups.billing.retry_backoff.max`); a table counts as set when any key in it is.
#[derive(Debug, Clone, Default)]
pub(super) struct Explicit(BTreeSet<String>);

impl Explicit {
    pub(super) fn insert(&mut self, key: String) {
        self.0.insert(key);
    }

    pub(super) fn has(&self, key: &str) -> bool {
        self.0.contains(key)
    }
}

// ---- Derivations ------------------------------------------------------------------------
//
// A rule of `validate` that relates two keys is broken by defaults only when the user set
// one of them to a value the other's default cannot live with (`claim_idle = "2s"` and the
// default backoff of 1m). Then the default gives way: the key left out takes a value
// derived from the one set. Each derivation below serves one rule of `validate` and is
// written next to nothing else; keys the user set are never changed, so explicit values
// that conflict are still reported, with the rule's own message.

/// Records a derived key of a group: (key below the group, the key it follows).
type Note<'a> = &'a mut dyn FnMut(&str, &str);

/// Replaces defaults that would break a rule against explicit values, returning each
/// derived key (dotted) with the key it was derived from, for `check` to mark.
pub(super) fn derive(config: &mut Config, explicit: &Explicit) -> BTreeMap<String, String> {
    let mut derived = BTreeMap::new();
    derive_shutdown_timeout(config, explicit, &mut derived);
    let shutdown_timeout = config.worker.shutdown_timeout;
    for (name, g) in config.groups.iter_mut() {
        let set = |k: &str| explicit.has(&format!("groups.{name}.{k}"));
        let option_set = |k: &str| set(&format!("options.{k}"));
        let mut note = |k: &str, from: &str| {
            derived.insert(format!("groups.{name}.{k}"), from.to_owned());
        };
        let needs = g.handler.needs(&option_set);
        let s = &mut g.settings;
        derive_handler_timeout(s, &needs, &set, &mut note);
        derive_claim_idle(s, &needs, &set, &mut note);
        derive_consumer_ttl(s, &set, &mut note);
        derive_backoff(s, &set, &mut note);
        derive_block(s, shutdown_timeout, &set, &mut note);
        derive_partition_lease(s, &set, &mut note);
        let limits = Limits {
            handler_timeout: s.handler_timeout,
            claim_idle: s.claim_idle,
        };
        for d in g.handler.derive(&limits, &option_set) {
            note(&format!("options.{}", d.key), &d.from);
        }
    }
    derived
}

/// Rule `block < worker.shutdown_timeout`, from the groups' side: a shutdown timeout left
/// out outlasts every explicit `block` (twice the longest).
fn derive_shutdown_timeout(
    config: &mut Config,
    explicit: &Explicit,
    derived: &mut BTreeMap<String, String>,
) {
    if explicit.has("worker.shutdown_timeout") {
        return;
    }
    let longest = config
        .groups
        .iter()
        .filter(|(name, _)| explicit.has(&format!("groups.{name}.block")))
        .max_by_key(|(_, g)| g.block);
    if let Some((name, g)) = longest
        && g.block >= config.worker.shutdown_timeout
    {
        config.worker.shutdown_timeout = g.block.saturating_mul(2);
        derived.insert(
            "worker.shutdown_timeout".into(),
            format!("groups.{name}.block"),
        );
    }
}

/// Rule `partition_lease >= 3 × handler_timeout`: a partitioned group's lease left out is
/// the default or three handler timeouts, the longer (written out, so `check` shows it).
fn derive_partition_lease(s: &mut GroupSettings, set: &dyn Fn(&str) -> bool, note: Note) {
    if s.partitions.is_none() || set("partition_lease") {
        return;
    }
    let lease = crate::partition::default_lease(s.handler_timeout);
    s.partition_lease = Some(lease);
    if lease > crate::partition::DEFAULT_LEASE {
        note("partition_lease", "handler_timeout");
    }
}

/// Rule `block < worker.shutdown_timeout`: a block left out is half a shorter shutdown
/// timeout.
fn derive_block(
    s: &mut GroupSettings,
    shutdown_timeout: Duration,
    set: &dyn Fn(&str) -> bool,
    note: Note,
) {
    if !set("block") && s.block >= shutdown_timeout {
        s.block = whole_ms(shutdown_timeout / 2).max(Duration::from_millis(1));
        note("block", "worker.shutdown_timeout");
    }
}

/// Rules `claim_idle > handler_timeout (+ a batch handler's max_wait)` and a handler's
/// timeouts within `handler_timeout`: a handler timeout left out is at least what the
/// handler's explicit options need, and fits below an explicit `claim_idle` (half the
/// room, or just what the options need when that is more).
fn derive_handler_timeout(
    s: &mut GroupSettings,
    needs: &Needs,
    set: &dyn Fn(&str) -> bool,
    note: Note,
) {
    if set("handler_timeout") {
        return;
    }
    let least = needs.handler_timeout_at_least;
    if let Some((least, option)) = least
        && s.handler_timeout < least
    {
        s.handler_timeout = least;
        note("handler_timeout", &format!("options.{option}"));
    }
    // Twice a timeout it must exceed: an alerts evaluation has time besides its post.
    let least = least.or(needs
        .handler_timeout_above
        .map(|(d, option)| (d.saturating_mul(2), option)));
    if let Some((above, option)) = needs.handler_timeout_above
        && s.handler_timeout <= above
    {
        s.handler_timeout = above.saturating_mul(2);
        note("handler_timeout", &format!("options.{option}"));
    }
    if set("claim_idle") && s.claim_idle <= s.handler_timeout + needs.claim_idle_margin {
        let room = s.claim_idle.saturating_sub(needs.claim_idle_margin);
        let fit = whole_ms(room / 2).max(least.map_or(Duration::ZERO, |(d, _)| d));
        if !fit.is_zero() && fit < room {
            s.handler_timeout = fit;
            note("handler_timeout", "claim_idle");
        }
    }
}

/// Rules `claim_idle > handler_timeout (+ max_wait)`, `retry_backoff.max × (1 + jitter) <
/// claim_idle`, `consumer_ttl > claim_idle` and a handler's markers outliving it: a claim
/// idle left out lies between what must stay below it and what must outlive it — twice
/// the largest lower bound, else half the smallest upper one, else the middle.
fn derive_claim_idle(s: &mut GroupSettings, needs: &Needs, set: &dyn Fn(&str) -> bool, note: Note) {
    if set("claim_idle") {
        return;
    }
    let margin_from = match needs.claim_idle_margin_key {
        Some(option) => format!("handler_timeout + options.{option}"),
        None => "handler_timeout".into(),
    };
    let mut lower = vec![(s.handler_timeout + needs.claim_idle_margin, margin_from)];
    if set("retry_backoff.max") {
        lower.push((
            longest_backoff(&s.retry_backoff),
            "retry_backoff.max".into(),
        ));
    } else if set("retry_backoff.initial") {
        // The backoff's max will be at least the initial delay.
        let b = RetryBackoff {
            max: s.retry_backoff.initial,
            ..s.retry_backoff
        };
        lower.push((longest_backoff(&b), "retry_backoff.initial".into()));
    }
    let mut upper = Vec::new();
    if set("consumer_ttl") {
        upper.push((s.consumer_ttl, "consumer_ttl".to_owned()));
    }
    if let Some((d, option)) = needs.claim_idle_below {
        upper.push((d, format!("options.{option}")));
    }
    let (low, low_from) = lower
        .into_iter()
        .max_by_key(|(d, _)| *d)
        .expect("one bound");
    let high = upper.into_iter().min_by_key(|(d, _)| *d);
    let fits = |c: Duration| c > low && high.as_ref().is_none_or(|(h, _)| c < *h);
    if fits(s.claim_idle) {
        return;
    }
    let mut candidates = vec![(low.saturating_mul(2), low_from.clone())];
    if let Some((h, h_from)) = &high {
        candidates.push((*h / 2, h_from.clone()));
        candidates.push(((low + *h) / 2, format!("{low_from} and {h_from}")));
    }
    if let Some((c, from)) = candidates
        .into_iter()
        .map(|(c, from)| (whole_ms(c), from))
        .find(|(c, _)| fits(*c))
    {
        s.claim_idle = c;
        note("claim_idle", &from);
    }
}

/// Rule `consumer_ttl > claim_idle`: a consumer TTL left out is twice a longer claim idle.
fn derive_consumer_ttl(s: &mut GroupSettings, set: &dyn Fn(&str) -> bool, note: Note) {
    if !set("consumer_ttl") && s.consumer_ttl <= s.claim_idle {
        s.consumer_ttl = s.claim_idle.saturating_mul(2);
        note("consumer_ttl", "claim_idle");
    }
}

/// Rules `retry_backoff.max ≥ initial` and `max × (1 + jitter) < claim_idle`: a max left
/// out is at least an explicit initial delay and the longest that fits in claim_idle;
/// an initial delay left out is at most the max.
fn derive_backoff(s: &mut GroupSettings, set: &dyn Fn(&str) -> bool, note: Note) {
    let claim_idle = s.claim_idle;
    let b = &mut s.retry_backoff;
    if !set("retry_backoff.max") {
        if set("retry_backoff.initial") && b.max < b.initial {
            b.max = b.initial;
            note("retry_backoff.max", "retry_backoff.initial");
        }
        if longest_backoff(b) >= claim_idle {
            let fit = longest_fitting_backoff(b, claim_idle);
            let floor = if set("retry_backoff.initial") {
                b.initial
            } else {
                Duration::from_millis(1)
            };
            if fit >= floor {
                b.max = fit;
                note("retry_backoff.max", "claim_idle");
            }
        }
    }
    if !set("retry_backoff.initial") && b.initial > b.max && !b.max.is_zero() {
        b.initial = b.max;
        note("retry_backoff.initial", "retry_backoff.max");
    }
}

/// A jitter out of range (NaN included, which `clamp` passes through and `mul_f64` panics
/// on) is reported on its own; the backoff is judged with the largest valid one.
fn valid_jitter(b: &RetryBackoff) -> f64 {
    if (0.0..=1.0).contains(&b.jitter) {
        b.jitter
    } else {
        1.0
    }
}

/// The longest delay a failed entry waits: `max × (1 + jitter)`.
fn longest_backoff(b: &RetryBackoff) -> Duration {
    b.max.mul_f64(1.0 + valid_jitter(b))
}

/// The longest whole-millisecond `max` whose `longest_backoff` is below `claim_idle`.
fn longest_fitting_backoff(b: &RetryBackoff, claim_idle: Duration) -> Duration {
    let factor = 1.0 + valid_jitter(b);
    let mut fit = whole_ms(claim_idle.div_f64(factor));
    while !fit.is_zero() && fit.mul_f64(factor) >= claim_idle {
        fit -= Duration::from_millis(1);
    }
    fit
}

/// Every rule broken by `config`, as (key, message).
pub(super) fn validate(config: &Config) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    let mut problem = |key: String, message: String| problems.push((key, message));

    let redis = &config.redis;
    let url = &redis.url;
    if let Err(e) = url.as_str().into_connection_info() {
        problem(
            "redis.url".into(),
            format!(
                "= {:?}: not a Redis URL ({e}); expected redis://[user:password@]host:port/db, rediss://… for TLS or redis+unix:///path",
                redact_url(url)
            ),
        );
    }
    let custom_url = url != super::DEFAULT_REDIS_URL;
    if !redis.cluster.is_empty() && redis.sentinel.is_some() {
        problem(
            "redis.cluster".into(),
            "and redis.sentinel are both set: a deployment is one or the other".into(),
        );
    } else if custom_url && (!redis.cluster.is_empty() || redis.sentinel.is_some()) {
        let other = if redis.cluster.is_empty() {
            "sentinel"
        } else {
            "cluster"
        };
        problem(
            "redis.url".into(),
            format!(
                "is set together with redis.{other}: use one of them (credentials go in the cluster node URLs, or redis.password_file)"
            ),
        );
    }
    for (i, node) in redis.cluster.iter().enumerate() {
        if let Err(e) = node.as_str().into_connection_info() {
            problem(
                format!("redis.cluster.{i}"),
                format!("= {:?}: not a Redis URL ({e})", redact_url(node)),
            );
        }
    }
    if let Some(s) = &redis.sentinel {
        if s.master.is_empty() {
            problem(
                "redis.sentinel.master".into(),
                "is missing: the name the sentinels monitor the primary under, e.g. \"mymaster\""
                    .into(),
            );
        }
        if s.nodes.is_empty() {
            problem(
                "redis.sentinel.nodes".into(),
                "is empty: list some sentinels, e.g. [\"redis://sentinel-1:26379\"]".into(),
            );
        }
        for (i, node) in s.nodes.iter().enumerate() {
            if let Err(e) = node.as_str().into_connection_info() {
                problem(
                    format!("redis.sentinel.nodes.{i}"),
                    format!("= {:?}: not a Redis URL ({e})", redact_url(node)),
                );
            }
        }
    }
    if let Some(tls) = &redis.tls
        && tls.cert_file.is_some() != tls.key_file.is_some()
    {
        problem(
            "redis.tls".into(),
            "sets only one of cert_file and key_file: a client certificate needs both".into(),
        );
    }

    for (key, d) in [
        ("redis.command_timeout", config.redis.command_timeout),
        ("redis.connect_timeout", config.redis.connect_timeout),
        ("worker.shutdown_timeout", config.worker.shutdown_timeout),
        ("worker.claim_interval", config.worker.claim_interval),
    ] {
        if d.is_zero() {
            problem(key.into(), "must be greater than zero".into());
        }
    }
    if config.worker.consumer.trim().is_empty() {
        problem(
            "worker.consumer".into(),
            "is empty: leave it out for \"{hostname}-{pid}\" or set a name unique to this process"
                .into(),
        );
    }
    let listen = &config.http.listen;
    if !listen.is_empty() && listen.parse::<SocketAddr>().is_err() {
        problem(
            "http.listen".into(),
            format!(
                "= {listen:?}: not an address; write ip:port such as \"0.0.0.0:9464\", or \"\" to turn the listener off"
            ),
        );
    }
    if config.http.console && listen.is_empty() {
        problem(
            "http.console".into(),
            "= true but http.listen = \"\" turns the listener off: set http.listen, e.g. \"0.0.0.0:9464\", or leave the console off".into(),
        );
    }
    if let Some(path) = &config.http.console_token_file {
        // Read now, so a missing or empty token fails `check` and startup rather than
        // every action an operator tries later.
        match std::fs::read_to_string(path) {
            Ok(token) if token.trim().is_empty() => problem(
                "http.console_token_file".into(),
                format!(
                    "= {path:?} is empty: write a long random token in it (e.g. `openssl rand -hex 32 > {}`), or leave the key out for a read-only console",
                    path.display()
                ),
            ),
            Ok(_) => {}
            Err(e) => problem(
                "http.console_token_file".into(),
                format!(
                    "= {path:?} cannot be read ({e}): create it with a long random token (e.g. `openssl rand -hex 32`), or leave the key out for a read-only console"
                ),
            ),
        }
    }
    let otlp = &config.telemetry.otlp_endpoint;
    if !(otlp.is_empty() || otlp.starts_with("http://") || otlp.starts_with("https://")) {
        problem(
            "telemetry.otlp_endpoint".into(),
            format!(
                "= {:?}: must be an http(s) URL of an OTLP/HTTP receiver, e.g. \"http://otel-collector:4318\"",
                redact_url(otlp)
            ),
        );
    }
    for (name, stream) in &config.streams {
        if name.trim().is_empty() {
            problem(
                format!("streams.{name}"),
                "has an empty name: write the stream's name, e.g. [streams.user_logs]".into(),
            );
        }
        if let Some(r) = &stream.retention {
            let key = format!("streams.{name}.retention");
            if r.max_len.is_none() && r.max_age.is_none() {
                problem(key, "sets neither max_len nor max_age".into());
            } else if r.max_len == Some(0) {
                problem(format!("{key}.max_len"), "must be at least 1".into());
            } else if r.max_age.is_some_and(|d| d.is_zero()) {
                problem(format!("{key}.max_age"), "must be greater than zero".into());
            }
        }
    }

    for (name, g) in &config.groups {
        let key = |k: &str| format!("groups.{name}.{k}");
        if name.trim().is_empty() {
            problem(
                format!("groups.{name}"),
                "has an empty name: the table's name is the consumer group's, e.g. [groups.billing]".into(),
            );
        }
        if g.stream.trim().is_empty() {
            problem(
                key("stream"),
                "is missing: set the stream this group reads, e.g. stream = \"user_logs\"".into(),
            );
        }
        if !(1..=100_000).contains(&g.concurrency) {
            problem(
                key("concurrency"),
                format!("= {}: must be between 1 and 100000", g.concurrency),
            );
        }
        if !(1..=100_000).contains(&g.batch_size) {
            problem(
                key("batch_size"),
                format!("= {}: must be between 1 and 100000", g.batch_size),
            );
        }
        if g.block < Duration::from_millis(1) {
            problem(
                key("block"),
                "must be at least 1ms (Redis reads \"0\" as block forever, which would stall shutdown)".into(),
            );
        }
        if g.block >= config.worker.shutdown_timeout {
            problem(
                key("block"),
                format!(
                    "({}) must be shorter than worker.shutdown_timeout ({}), or a blocked read could outlast shutdown",
                    human(g.block),
                    human(config.worker.shutdown_timeout)
                ),
            );
        }
        if g.order_by.is_some()
            && g.handler
                .options::<streamworker_handlers::forward::ForwardOptions>()
                .is_some_and(|o| o.partition_by.is_some())
        {
            problem(
                key("order_by"),
                "cannot be combined with a forward's partition_by: the forward already adds each partition's entries one at a time in id order, which is what makes it exactly once; remove order_by".into(),
            );
        }
        if g.order_by.as_ref().is_some_and(|f| f.trim().is_empty()) {
            problem(
                key("order_by"),
                "is empty: name the field whose value is the key to keep in order, e.g. order_by = \"customer_id\"".into(),
            );
        }
        if g.handler_timeout.is_zero() {
            problem(key("handler_timeout"), "must be greater than zero".into());
        }
        if g.max_deliveries == 0 {
            problem(
                key("max_deliveries"),
                "must be at least 1 (the first delivery counts)".into(),
            );
        }
        let b = &g.retry_backoff;
        if b.initial.is_zero() {
            problem(
                key("retry_backoff.initial"),
                "must be greater than zero".into(),
            );
        }
        if b.max < b.initial {
            problem(
                key("retry_backoff.max"),
                format!(
                    "({}) is shorter than retry_backoff.initial ({})",
                    human(b.max),
                    human(b.initial)
                ),
            );
        }
        if !(b.multiplier.is_finite() && b.multiplier >= 1.0) {
            problem(
                key("retry_backoff.multiplier"),
                format!("= {}: must be at least 1.0", b.multiplier),
            );
        }
        if !(0.0..=1.0).contains(&b.jitter) {
            problem(
                key("retry_backoff.jitter"),
                format!(
                    "= {}: must be between 0.0 and 1.0 (a fraction added to each delay)",
                    b.jitter
                ),
            );
        }
        if g.claim_idle <= g.handler_timeout {
            problem(
                key("claim_idle"),
                format!(
                    "({}) must be greater than handler_timeout ({}): otherwise another replica reclaims an entry while its handler is still running",
                    human(g.claim_idle),
                    human(g.handler_timeout)
                ),
            );
        }
        let longest_backoff = longest_backoff(b);
        if longest_backoff >= g.claim_idle {
            problem(
                key("retry_backoff.max"),
                format!(
                    "× (1 + jitter) = {} must be shorter than claim_idle ({}): a failed entry waits out its backoff as an idle pending entry, and claim_idle is when it is taken again",
                    human(longest_backoff),
                    human(g.claim_idle)
                ),
            );
        }
        if g.consumer_ttl <= g.claim_idle {
            problem(
                key("consumer_ttl"),
                format!(
                    "({}) must be longer than claim_idle ({}), so that only consumers long gone are deleted",
                    human(g.consumer_ttl),
                    human(g.claim_idle)
                ),
            );
        }
        if let Some(n) = g.partitions {
            if !(1..=crate::partition::MAX_PARTITIONS).contains(&n) {
                problem(
                    key("partitions"),
                    format!(
                        "= {n}: must be between 1 and {}",
                        crate::partition::MAX_PARTITIONS
                    ),
                );
            }
            if !crate::partition::spreads(&g.stream) {
                problem(
                    key("partitions"),
                    format!(
                        "is set, but stream {:?} carries its own hash tag, which would put every partition in one Redis Cluster slot: name the stream without braces (e.g. \"orders\"), its partitions are then \"orders:p0\", \"orders:p1\", …",
                        g.stream
                    ),
                );
            }
            if g.settings.dead_letter_stream.is_some() {
                problem(
                    key("dead_letter_stream"),
                    format!(
                        "is set, but a partitioned group keeps dead letters per partition ({}): leave it out",
                        g.partition_dead_letter_streams(n)
                    ),
                );
            }
        }
        if let Some(lease) = g.settings.partition_lease {
            if g.partitions.is_none() {
                problem(
                    key("partition_lease"),
                    "is set, but the group has no partitions: set partitions = N too, or leave it out".into(),
                );
            } else if lease < crate::partition::MIN_LEASE {
                problem(
                    key("partition_lease"),
                    format!(
                        "= {}: must be at least {}",
                        human(lease),
                        human(crate::partition::MIN_LEASE)
                    ),
                );
            } else if lease < g.handler_timeout.saturating_mul(3) {
                problem(
                    key("partition_lease"),
                    format!(
                        "({}) must be at least three handler_timeouts ({}): a replica that cannot renew stops reading a partition when a third of its lease is left, and its handlers must end before the lease expires; raise partition_lease or lower handler_timeout",
                        human(lease),
                        human(g.handler_timeout.saturating_mul(3))
                    ),
                );
            }
        }
        // Readers and writers of one partitioned stream must agree on its partitions: a
        // key's partition is `crc32(key) % partitions`. Each count that differs from the
        // first one stated for the stream is refused where it is written.
        let forward_to = g
            .handler
            .options::<streamworker_handlers::forward::ForwardOptions>()
            .filter(|f| f.partition_by.is_some())
            .map(|f| (f.to.as_str(), key("options.partitions")));
        let partitioned = g.partitions.map(|_| (g.stream.as_str(), key("partitions")));
        for (stream, mine) in partitioned.into_iter().chain(forward_to) {
            let counts = config.partition_counts(stream);
            if let Some((first, n)) = counts.first()
                && let Some((_, m)) = counts.iter().find(|(k, m)| *k == mine && m != n)
            {
                problem(
                    mine,
                    format!(
                        "= {m}, but {first} = {n} for the same stream {stream:?}: a key's partition is crc32(key) % partitions, so every group and forward on one partitioned stream must use the same number; make them equal"
                    ),
                );
            }
        }
        let dlq = g.dead_letter_stream();
        if dlq.is_empty() {
            problem(
                key("dead_letter_stream"),
                "is empty: leave it out for the default {<stream>}:dlq:<group>".into(),
            );
        } else if dlq == g.stream {
            problem(
                key("dead_letter_stream"),
                format!(
                    "= {dlq:?}: must differ from the group's stream, or dead letters would be consumed again"
                ),
            );
        } else if !redis.cluster.is_empty() && !same_slot(&dlq, &g.stream) {
            problem(
                key("dead_letter_stream"),
                format!(
                    "= {dlq:?} is in another Redis Cluster hash slot than {:?}: the dead-letter move (XADD there, XACK here) is one script and needs both keys in one slot; leave it out for the default {}",
                    g.stream,
                    crate::dead_letter::default_stream(&g.stream, &g.name)
                ),
            );
        }
        if !streamworker_handlers::slot_tag_reaches(&g.stream) {
            problem(
                key("stream"),
                format!(
                    "= {:?}: Redis hashes this whole name (its first braces are empty), and no key streamworker derives from it (dead letters, leases, handler state) can be put in its cluster slot; rename the stream, e.g. with a hash tag such as \"{{orders}}:events\"",
                    g.stream
                ),
            );
        }
        if !redis.cluster.is_empty() {
            for (option, target) in g.handler.acked_with() {
                if !target.is_empty() && !same_slot(target, &g.stream) {
                    problem(
                        key(&format!("options.{option}")),
                        format!(
                            "= {target:?} is in another Redis Cluster hash slot than {:?}: the XADD there and the XACK here run in one script; give both the same hash tag, e.g. \"{}:out\"",
                            g.stream,
                            streamworker_handlers::slot_tag(&g.stream)
                        ),
                    );
                }
            }
        }
        if g.circuit_breaker.threshold > 0 && g.circuit_breaker.pause.is_zero() {
            problem(
                key("circuit_breaker.pause"),
                "must be greater than zero (or set circuit_breaker.threshold = 0 to turn the breaker off)".into(),
            );
        }
        if let Some(window) = g.circuit_breaker.window
            && window < g.circuit_breaker.threshold
        {
            problem(
                key("circuit_breaker.window"),
                format!(
                    "= {window} is smaller than circuit_breaker.threshold ({}): the circuit could never open; make the window at least the threshold, or leave it out (twice the threshold)",
                    g.circuit_breaker.threshold
                ),
            );
        }
        let limits = streamworker_handlers::Limits {
            handler_timeout: g.handler_timeout,
            claim_idle: g.claim_idle,
        };
        let stream_problems = g.handler.validate_with_stream(&g.stream);
        for p in g
            .handler
            .validate(&limits)
            .into_iter()
            .chain(stream_problems)
        {
            problem(key(&format!("options.{}", p.key)), p.message);
        }
    }
    problems
}

/// Whether two keys live in the same Redis Cluster hash slot.
pub fn same_slot(a: &str, b: &str) -> bool {
    use redis::cluster_routing::Slot;
    Slot::for_key(a) == Slot::for_key(b)
}

#[cfg(test)]
mod tests {
    use super::same_slot;
    use crate::config::{Config, ConfigError, load_with_env};
    use std::time::Duration;
    use streamworker_handlers::alerts::AlertsOptions;
    use streamworker_handlers::learning::LearningOptions;
    use streamworker_handlers::warehouse::WarehouseOptions;
    use streamworker_handlers::webhook::WebhookOptions;

    fn load(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("streamworker.toml");
        std::fs::write(&path, text).unwrap();
        load_with_env(&path, Default::default())
    }

    /// A group `g` reading `s` with `handler` and the extra lines; must be valid.
    fn group(handler: &str, extra: &str) -> Config {
        let text = format!("[groups.g]\nstream = \"s\"\nhandler = \"{handler}\"\n{extra}\n");
        load(&text).unwrap_or_else(|e| panic!("{text}\n→ {e}"))
    }

    fn from<'a>(config: &'a Config, key: &str) -> Option<&'a str> {
        config.derived.get(key).map(String::as_str)
    }

    const S: fn(u64) -> Duration = Duration::from_secs;
    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn a_short_claim_idle_shortens_what_was_left_out() {
        let c = group("noop", "claim_idle = \"2s\"");
        let g = &c.groups["g"];
        assert_eq!(g.handler_timeout, S(1));
        assert_eq!(from(&c, "groups.g.handler_timeout"), Some("claim_idle"));
        // The longest backoff that fits: 1.666 s × 1.2 < 2 s.
        assert_eq!(g.retry_backoff.max, MS(1666));
        assert_eq!(from(&c, "groups.g.retry_backoff.max"), Some("claim_idle"));
        assert_eq!(g.retry_backoff.initial, S(1), "still within max");
        assert_eq!(from(&c, "groups.g.retry_backoff.initial"), None);
        assert_eq!(g.consumer_ttl, S(3600), "1h already outlives 2s");
    }

    #[test]
    fn the_backoffs_initial_delay_follows_a_derived_max() {
        let c = group("noop", "claim_idle = \"1s\"\nhandler_timeout = \"500ms\"");
        let b = &c.groups["g"].retry_backoff;
        assert_eq!(b.max, MS(833));
        assert_eq!(b.initial, MS(833));
        assert_eq!(
            from(&c, "groups.g.retry_backoff.initial"),
            Some("retry_backoff.max")
        );
    }

    #[test]
    fn any_sane_pair_of_claim_idle_and_handler_timeout_is_enough() {
        for (idle, timeout) in [("2s", "1s"), ("10s", "5s"), ("5m", "1m"), ("3s", "2s")] {
            for handler in ["noop", "webhook", "warehouse", "learning"] {
                let extra = format!(
                    "claim_idle = \"{idle}\"\nhandler_timeout = \"{timeout}\"\noptions = {{ url = \"http://127.0.0.1:9/x\" }}"
                );
                let extra = if handler == "webhook" {
                    extra
                } else {
                    extra.replace("options = { url = \"http://127.0.0.1:9/x\" }", "")
                };
                group(handler, &extra);
            }
        }
    }

    #[test]
    fn a_long_handler_timeout_lengthens_claim_idle_and_what_follows_it() {
        let c = group("noop", "handler_timeout = \"5m\"");
        assert_eq!(c.groups["g"].claim_idle, S(600));
        assert_eq!(from(&c, "groups.g.claim_idle"), Some("handler_timeout"));
        let c = group("noop", "handler_timeout = \"1h\"");
        assert_eq!(c.groups["g"].claim_idle, S(7200));
        assert_eq!(c.groups["g"].consumer_ttl, S(14400));
        assert_eq!(from(&c, "groups.g.consumer_ttl"), Some("claim_idle"));
    }

    #[test]
    fn claim_idle_fits_between_handler_timeout_and_an_explicit_consumer_ttl() {
        let c = group("noop", "consumer_ttl = \"1m\"");
        let g = &c.groups["g"];
        assert_eq!(g.claim_idle, S(45));
        assert_eq!(
            from(&c, "groups.g.claim_idle"),
            Some("handler_timeout and consumer_ttl")
        );
        assert_eq!(g.retry_backoff.max, MS(37499));
    }

    #[test]
    fn an_explicit_initial_delay_raises_the_backoffs_max_and_claim_idle() {
        let c = group("noop", "retry_backoff = { initial = \"2m\" }");
        let g = &c.groups["g"];
        assert_eq!(g.retry_backoff.max, S(120));
        assert_eq!(
            from(&c, "groups.g.retry_backoff.max"),
            Some("retry_backoff.initial")
        );
        assert_eq!(g.claim_idle, MS(288_000));
        assert_eq!(
            from(&c, "groups.g.claim_idle"),
            Some("retry_backoff.initial")
        );
    }

    #[test]
    fn block_and_shutdown_timeout_follow_each_other() {
        let c = group("noop", "").clone();
        assert!(c.derived.is_empty(), "{:?}", c.derived);
        let c = load(
            "[worker]\nshutdown_timeout = \"1s\"\n[groups.g]\nstream = \"s\"\nhandler = \"noop\"\n",
        )
        .unwrap();
        assert_eq!(c.groups["g"].block, MS(500));
        assert_eq!(from(&c, "groups.g.block"), Some("worker.shutdown_timeout"));
        let c = group("noop", "block = \"40s\"");
        assert_eq!(c.worker.shutdown_timeout, S(80));
        assert_eq!(from(&c, "worker.shutdown_timeout"), Some("groups.g.block"));
    }

    #[test]
    fn handler_timeouts_follow_handler_timeout_and_the_reverse() {
        let c = group(
            "webhook",
            "handler_timeout = \"3s\"\noptions = { url = \"http://127.0.0.1:9/x\" }",
        );
        let Some(o) = c.groups["g"].handler.options::<WebhookOptions>() else {
            panic!()
        };
        assert_eq!(o.timeout, S(3));
        assert_eq!(
            from(&c, "groups.g.options.timeout"),
            Some("handler_timeout")
        );

        let c = group(
            "webhook",
            "options = { url = \"http://127.0.0.1:9/x\", timeout = \"1m\" }",
        );
        assert_eq!(c.groups["g"].handler_timeout, S(60));
        assert_eq!(
            from(&c, "groups.g.handler_timeout"),
            Some("options.timeout")
        );

        let alerts = "[[groups.g.options.rules]]\nname = \"n\"\nkind = \"count\"\nwindow = \"1m\"\nthreshold = 5";
        let c = group(
            "alerts",
            &format!(
                "handler_timeout = \"2s\"\noptions.webhook = \"http://127.0.0.1:9/x\"\n{alerts}"
            ),
        );
        let Some(o) = c.groups["g"].handler.options::<AlertsOptions>() else {
            panic!()
        };
        assert_eq!(o.webhook_timeout, S(1));
        assert_eq!(
            from(&c, "groups.g.options.webhook_timeout"),
            Some("handler_timeout")
        );
        let c = group(
            "alerts",
            &format!(
                "options.webhook = \"http://127.0.0.1:9/x\"\noptions.webhook_timeout = \"30s\"\n{alerts}"
            ),
        );
        assert_eq!(c.groups["g"].handler_timeout, S(60));
        assert_eq!(
            from(&c, "groups.g.handler_timeout"),
            Some("options.webhook_timeout")
        );
        // 20s is already below the default 30s: nothing changes.
        let c = group(
            "alerts",
            &format!(
                "options.webhook = \"http://127.0.0.1:9/x\"\noptions.webhook_timeout = \"20s\"\n{alerts}"
            ),
        );
        assert_eq!(c.groups["g"].handler_timeout, S(30));
        assert!(c.derived.is_empty(), "{:?}", c.derived);
    }

    #[test]
    fn batch_handlers_options_follow_the_groups_limits_and_the_reverse() {
        let c = group("warehouse", "claim_idle = \"2s\"\nhandler_timeout = \"1s\"");
        let Some(o) = c.groups["g"].handler.options::<WarehouseOptions>() else {
            panic!()
        };
        assert_eq!(o.max_wait, MS(500));
        assert_eq!(from(&c, "groups.g.options.max_wait"), Some("claim_idle"));

        let c = group("warehouse", "claim_idle = \"2d\"");
        let Some(o) = c.groups["g"].handler.options::<WarehouseOptions>() else {
            panic!()
        };
        assert_eq!(o.dedupe_window(), S(4 * 86_400));
        assert_eq!(
            from(&c, "groups.g.options.dedupe_window"),
            Some("claim_idle")
        );

        let c = group("warehouse", "options = { max_wait = \"5m\" }");
        assert_eq!(c.groups["g"].claim_idle, S(660));
        assert_eq!(
            from(&c, "groups.g.claim_idle"),
            Some("handler_timeout + options.max_wait")
        );
        let c = group("warehouse", "options = { dedupe_window = \"1m\" }");
        assert_eq!(c.groups["g"].claim_idle, MS(45_500));

        let c = group("learning", "claim_idle = \"2d\"");
        let Some(o) = c.groups["g"].handler.options::<LearningOptions>() else {
            panic!()
        };
        assert_eq!(o.marker_ttl, S(4 * 86_400));
        assert_eq!(from(&c, "groups.g.options.marker_ttl"), Some("claim_idle"));
    }

    #[test]
    fn learning_options_follow_each_other() {
        let c = group(
            "learning",
            "options = { rating_min = 0.0, rating_max = 1.0 }",
        );
        let Some(o) = c.groups["g"].handler.options::<LearningOptions>() else {
            panic!()
        };
        assert_eq!(o.threshold, 0.5);
        assert_eq!(
            from(&c, "groups.g.options.threshold"),
            Some("options.rating_min")
        );

        let c = group("learning", "options = { rating_min = 6.0 }");
        let Some(o) = c.groups["g"].handler.options::<LearningOptions>() else {
            panic!()
        };
        assert_eq!((o.rating_max, o.threshold), (10.0, 8.0));

        let c = group("learning", "options = { retention = \"30m\" }");
        let Some(o) = c.groups["g"].handler.options::<LearningOptions>() else {
            panic!()
        };
        assert_eq!(o.window, S(1800));
        assert_eq!(
            from(&c, "groups.g.options.window"),
            Some("options.retention")
        );

        let c = group(
            "learning",
            "options = { window = \"24h\", retention = \"2d\", check_every = \"90m\" }",
        );
        assert!(c.derived.is_empty(), "{:?}", c.derived);
        let c = group("learning", "options = { check_every = \"90m\" }");
        let Some(o) = c.groups["g"].handler.options::<LearningOptions>() else {
            panic!()
        };
        assert_eq!(o.window, S(5400));
        assert_eq!(
            from(&c, "groups.g.options.window"),
            Some("options.check_every")
        );
    }

    /// What the user wrote is never changed: explicit values that conflict stay errors,
    /// with the rule's message.
    #[test]
    fn explicit_conflicts_remain_errors() {
        for (extra, key, says) in [
            (
                "claim_idle = \"2s\"\nretry_backoff = { max = \"1m\" }",
                "groups.g.retry_backoff.max",
                "must be shorter than claim_idle (2s)",
            ),
            (
                "claim_idle = \"2s\"\nhandler_timeout = \"3s\"",
                "groups.g.claim_idle",
                "must be greater than handler_timeout (3s)",
            ),
            (
                "handler_timeout = \"1s\"\noptions = { url = \"http://127.0.0.1:9/x\", timeout = \"2s\" }",
                "groups.g.options.timeout",
                "exceeds the group's handler_timeout (1s)",
            ),
            (
                "claim_idle = \"2h\"\nconsumer_ttl = \"1h\"",
                "groups.g.consumer_ttl",
                "must be longer than claim_idle (2h)",
            ),
        ] {
            let text = format!(
                "[worker]\nshutdown_timeout = \"30s\"\n[groups.g]\nstream = \"s\"\nhandler = \"webhook\"\noptions = {{ url = \"http://127.0.0.1:9/x\" }}\n{extra}\n"
            );
            let text = if extra.contains("options =") {
                text.replacen("options = { url = \"http://127.0.0.1:9/x\" }\n", "", 1)
            } else {
                text
            };
            let err = load(&text).unwrap_err();
            let p = err
                .problems()
                .iter()
                .find(|p| p.key == key)
                .unwrap_or_else(|| panic!("{extra}: {err}"));
            assert!(p.message.contains(says), "{extra}: {p}");
        }
        let err = load("[worker]\nshutdown_timeout = \"1s\"\n[groups.g]\nstream = \"s\"\nhandler = \"noop\"\nblock = \"2s\"\n").unwrap_err();
        assert!(
            err.to_string()
                .contains("must be shorter than worker.shutdown_timeout"),
            "{err}"
        );
    }

    /// `check` marks derived values; its output stays TOML and loads to the same values.
    #[test]
    fn check_marks_derived_values_and_reads_back() {
        let c = load("[groups.order-events]\nstream = \"s\"\nhandler = \"webhook\"\nclaim_idle = \"2s\"\nhandler_timeout = \"1s\"\noptions.url = \"http://127.0.0.1:9/x\"\n").unwrap();
        let text = c.to_redacted_toml();
        assert!(
            text.contains("\ntimeout = \"1s\" # derived from handler_timeout\n"),
            "{text}"
        );
        assert!(
            text.contains("\nmax = \"1s 666ms\" # derived from claim_idle"),
            "{text}"
        );
        assert_eq!(text.matches("# derived").count(), c.derived.len(), "{text}");
        let again = load(&text).unwrap();
        let resolved = |c: &Config| {
            let mut g = c.groups["order-events"].clone();
            g.settings.dead_letter_stream = Some(g.dead_letter_stream());
            g
        };
        assert_eq!(resolved(&again), resolved(&c));
        assert!(again.derived.is_empty(), "everything is explicit now");
    }

    #[test]
    fn hash_tags_share_a_slot() {
        assert!(same_slot("{orders}:dlq:billing", "orders"));
        assert!(!same_slot("orders:dlq", "orders"));
    }

    /// Derived keys land in the stream's slot by Redis's own reckoning, whatever braces
    /// the stream's name already holds.
    #[test]
    fn derived_keys_share_the_streams_slot() {
        use streamworker_handlers::{slot_tag, slot_tag_reaches};
        for stream in [
            "orders",
            "{orders}:events",
            "events:{eu}:clicks",
            "half{open",
            "}close{",
            "a{}b",
            "{}",
            "user:activity",
        ] {
            let derived = format!("{}:dlq:billing", slot_tag(stream));
            assert_eq!(
                same_slot(&derived, stream),
                slot_tag_reaches(stream),
                "{stream} → {derived}"
            );
        }
        let dlq = crate::dead_letter::default_stream("{orders}:events", "billing");
        assert_eq!(dlq, "{orders}:dlq:billing");
    }

    #[test]
    fn the_console_token_file_must_exist_and_hold_a_token() {
        let dir = tempfile::tempdir().unwrap();
        let group = "[groups.g]\nstream = \"s\"\nhandler = \"noop\"\n";
        let with = |http: &str| load(&format!("[http]\n{http}\n{group}"));
        let c = with("").unwrap();
        assert!(!c.http.console, "off by default");
        assert_eq!(c.http.console_token_file, None);

        let missing = dir.path().join("missing");
        let e = with(&format!(
            "console = true\nconsole_token_file = {:?}",
            missing.display().to_string()
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("http.console_token_file") && e.contains("cannot be read"),
            "{e}"
        );

        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let e = with(&format!(
            "console = true\nconsole_token_file = {:?}",
            empty.display().to_string()
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("http.console_token_file") && e.contains("is empty"),
            "{e}"
        );

        let token = dir.path().join("token");
        std::fs::write(&token, "s3cret\n").unwrap();
        let c = with(&format!(
            "console = true\nconsole_token_file = {:?}",
            token.display().to_string()
        ))
        .unwrap();
        assert!(c.http.console);
        // check shows both keys (the path, never the token).
        let shown = c.to_redacted_toml();
        assert!(shown.contains("console = true"), "{shown}");
        assert!(shown.contains("console_token_file"), "{shown}");
        assert!(!shown.contains("s3cret"), "{shown}");

        let e = with("listen = \"\"\nconsole = true")
            .unwrap_err()
            .to_string();
        assert!(e.contains("http.console"), "{e}");
    }

    #[test]
    fn partitioned_groups_are_checked() {
        // The lease defaults to 10 s, or three handler timeouts when longer (marked).
        let c = group("noop", "partitions = 8\nhandler_timeout = \"2s\"");
        assert_eq!(c.groups["g"].partition_lease(), S(10));
        assert_eq!(from(&c, "groups.g.partition_lease"), None);
        let c = group("noop", "partitions = 8");
        assert_eq!(c.groups["g"].partition_lease(), S(90));
        assert_eq!(
            from(&c, "groups.g.partition_lease"),
            Some("handler_timeout")
        );
        let text = c.to_redacted_toml();
        assert!(
            text.contains(
                "\npartitions = 8 # partition of a key: crc32(key) % partitions; streams s:p0 … s:p7; dead letters {s:p0}:dlq:g … {s:p7}:dlq:g\n"
            ),
            "{text}"
        );
        // No one dead-letter stream (`{s}:dlq:g` holds nothing), and the output loads again:
        // an explicit dead_letter_stream on a partitioned group is refused.
        assert!(!text.contains("dead_letter_stream"), "{text}");
        let again = load(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(again.groups["g"].settings, c.groups["g"].settings);
        assert!(
            text.contains("\npartition_lease = \"1m 30s\" # derived from handler_timeout\n"),
            "{text}"
        );
        let c = group("noop", "");
        assert!(!c.to_redacted_toml().contains("partition"));

        let refused = |text: &str, key: &str, says: &str| {
            let err = load(text).unwrap_err();
            let p = err
                .problems()
                .iter()
                .find(|p| p.key == key)
                .unwrap_or_else(|| panic!("{text}: {err}"));
            assert!(p.message.contains(says), "{text}: {p}");
        };
        let partitioned = |stream: &str, extra: &str| {
            format!("[groups.g]\nstream = \"{stream}\"\nhandler = \"noop\"\n{extra}\n")
        };
        refused(
            &partitioned("s", "partitions = 0"),
            "groups.g.partitions",
            "must be between 1 and 1024",
        );
        refused(
            &partitioned("s", "partitions = 1025"),
            "groups.g.partitions",
            "must be between 1 and 1024",
        );
        refused(
            &partitioned("{orders}:events", "partitions = 4"),
            "groups.g.partitions",
            "carries its own hash tag",
        );
        refused(
            &partitioned("s", "partitions = 4\ndead_letter_stream = \"dlq\""),
            "groups.g.dead_letter_stream",
            "{s:p0}:dlq:g",
        );
        refused(
            &partitioned("s", "partition_lease = \"10s\""),
            "groups.g.partition_lease",
            "the group has no partitions",
        );
        refused(
            &partitioned("s", "partitions = 4\npartition_lease = \"10s\""),
            "groups.g.partition_lease",
            "must be at least three handler_timeouts (1m 30s)",
        );
        refused(
            &partitioned(
                "s",
                "partitions = 4\npartition_lease = \"500ms\"\nhandler_timeout = \"100ms\"",
            ),
            "groups.g.partition_lease",
            "must be at least 1s",
        );

        // Every reader and writer of one partitioned stream uses the same count.
        let on_s = |name: &str, extra: &str| {
            format!("[groups.{name}]\nstream = \"s\"\nhandler = \"noop\"\n{extra}\n")
        };
        let a4 = on_s("a", "partitions = 4");
        refused(
            &format!("{a4}{}", on_s("b", "partitions = 8")),
            "groups.b.partitions",
            "= 8, but groups.a.partitions = 4 for the same stream \"s\"",
        );
        let forward = |n: u32| {
            format!(
                "[groups.f]\nstream = \"in\"\nhandler = \"forward\"\n[groups.f.options]\nto = \"s\"\npartition_by = \"k\"\npartitions = {n}\n"
            )
        };
        refused(
            &format!("{a4}{}", forward(2)),
            "groups.f.options.partitions",
            "= 2, but groups.a.partitions = 4",
        );
        // Agreeing counts, and a plain group reading the stream's own key, are fine.
        let fine = format!(
            "{a4}{}{}{}",
            on_s("b", "partitions = 4"),
            on_s("c", ""),
            forward(4)
        );
        let c = load(&fine).unwrap_or_else(|e| panic!("{fine}\n→ {e}"));
        assert_eq!(c.partitions_of("s"), Some(4));
        assert_eq!(c.partitions_of("in"), None);
    }
}
