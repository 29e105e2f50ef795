//! The cases of the fault matrix, each at a [`Scale`]: the short form CI runs, or the full
//! form `scripts/chaos` runs by hand.

use std::time::Duration;

use super::harness::{Case, Fault, Group, HANDLER_TIMEOUT, KEY_FIELD, Kind, two_percent};
use crate::support::Fields;

/// How big a run is.
#[derive(Clone, Copy, Debug)]
pub struct Scale {
    /// Seconds of producing.
    pub seconds: f64,
    pub replicas: usize,
    /// Entries per second.
    pub rate: u64,
    /// The full form: longer, and the huge entries are huger.
    pub full: bool,
}

impl Scale {
    /// CI's form: a few seconds a case.
    pub fn short() -> Self {
        Self {
            seconds: 4.0,
            replicas: 2,
            rate: 200,
            full: false,
        }
    }
}

/// Every case, in the order the full matrix runs them.
pub const CASES: &[&str] = &[
    "replica_kills",
    "redis_restart_aof",
    "redis_restart_no_persistence",
    "poison_retryable_1_replica",
    "poison_retryable",
    "poison_retryable_3_replicas",
    "poison_permanent",
    "slow_handlers",
    "forward_refused",
    "maxmemory_noeviction",
    "huge_entries",
    "non_utf8",
    "webhook_hangs",
    "soak",
    "partitioned_ordered",
];

const AOF: &[&str] = &["--appendonly", "yes", "--appendfsync", "always"];

/// The case `name` at scale `s`.
pub fn case(name: &str, s: &Scale) -> Case {
    let at = |fraction: f64| Duration::from_secs_f64(s.seconds * fraction);
    // About three kills in the short form, one every 5 s in the full form.
    let kill_every = if s.full {
        Duration::from_secs(5)
    } else {
        at(0.25)
    };
    let mut c = Case {
        name: name.to_owned(),
        replicas: s.replicas,
        seconds: s.seconds,
        rate: s.rate,
        redis_args: Vec::new(),
        stream: "orders",
        partitions: None,
        groups: vec![Group::webhook("billing")],
        entry: two_percent(Kind::Retryable),
        faults: Vec::new(),
        setup: None,
        handler_timeout: HANDLER_TIMEOUT,
    };
    match name {
        // SIGKILLed replicas, healthy entries only: nothing lost, duplicates bounded by
        // what the victims held.
        "replica_kills" => {
            c.entry = two_percent(Kind::Healthy);
            c.faults = vec![Fault::KillReplicas { every: kill_every }];
        }
        // Redis killed and restarted from its AOF while retries are parked.
        "redis_restart_aof" => {
            c.redis_args = AOF.to_vec();
            c.faults = vec![Fault::RestartRedis {
                at: at(0.4),
                down: Duration::from_secs(1),
                erases: false,
            }];
        }
        // Redis killed and restarted empty while retries are parked and failing calls
        // are running (5 % of entries fail after 700 ms, so some finish while Redis is
        // down): what was produced before is gone (counted as erased); what is produced
        // after must all be handled or dead-lettered.
        "redis_restart_no_persistence" => {
            c.entry = Box::new(|n| {
                let kind = if n % 20 == 7 {
                    Kind::RetryableLate
                } else {
                    Kind::Healthy
                };
                (
                    kind,
                    vec![(b"payload".to_vec(), format!("order {n}").into_bytes())],
                )
            });
            c.faults = vec![Fault::RestartRedis {
                at: at(0.3),
                down: Duration::from_secs(2),
                erases: true,
            }];
        }
        // 2 % of entries answered 500: each dead-lettered once after max_deliveries, the
        // group keeps moving (issue 10: 1, 2 and 3 replicas).
        "poison_retryable_1_replica" => c.replicas = 1,
        "poison_retryable" => {}
        "poison_retryable_3_replicas" => c.replicas = 3,
        // 2 % answered 422: dead-lettered at once.
        "poison_permanent" => c.entry = two_percent(Kind::Permanent),
        // 5 % answer after handler_timeout the first time, 1 % every time.
        "slow_handlers" => {
            c.entry = Box::new(|n| {
                let kind = match n {
                    n if n % 100 == 41 => Kind::SlowAlways,
                    n if n % 20 == 3 => Kind::SlowOnce,
                    _ => Kind::Healthy,
                };
                (kind, vec![(b"payload".to_vec(), b"order".to_vec())])
            });
        }
        // A forward whose target key is a string: every write is refused (WRONGTYPE), so
        // every entry must end as a dead letter saying so, once.
        "forward_refused" => {
            c.rate = (s.rate / 2).max(1);
            c.groups = vec![Group {
                dead: |_| true,
                dlq_error: Some("WRONGTYPE"),
                ..Group::forward("normalize", "orders.normalized")
            }];
            c.entry = two_percent(Kind::Healthy);
            c.setup = Some(|con| {
                redis::cmd("SET")
                    .arg("orders.normalized")
                    .arg("not a stream")
                    .query::<()>(con)
                    .expect("SET the wrong-type target");
            });
        }
        // `maxmemory` reached with `noeviction` for the middle 40 % of the run (dead
        // letters and forwards refused, the producer too), then lifted.
        "maxmemory_noeviction" => {
            c.redis_args = vec!["--maxmemory-policy", "noeviction"];
            c.groups = vec![
                Group::webhook("billing"),
                Group::forward("copy", "orders.copy"),
            ];
            c.faults = vec![Fault::Oom {
                from: at(0.3),
                until: at(0.7),
            }];
        }
        // Entries with 20,000 fields and with a 5 MB field (full form: 100,000 fields and
        // 50 MB), healthy and poison, posted, forwarded and dead-lettered.
        "huge_entries" => {
            let (many, big) = if s.full {
                (100_000, 50 << 20)
            } else {
                (20_000, 5 << 20)
            };
            c.groups = vec![
                Group::webhook("billing"),
                Group::forward("copy", "orders.copy"),
            ];
            // Posting 5 MB takes more than a second on a loaded machine, and a healthy
            // call cut off after its receiver answered would be a duplicate that says
            // nothing about the daemon. (Still below claim_idle.)
            c.handler_timeout = "4s";
            c.entry = Box::new(move |n| match n {
                20 => (Kind::Healthy, many_fields(many)),
                40 => (Kind::Retryable, many_fields(many)),
                60 => (Kind::Healthy, one_big_field(big)),
                80 => (Kind::Retryable, one_big_field(big)),
                n => (
                    if n % 50 == 17 {
                        Kind::Retryable
                    } else {
                        Kind::Healthy
                    },
                    vec![(b"payload".to_vec(), b"order".to_vec())],
                ),
            });
        }
        // Field names and values that are not UTF-8 (and NUL bytes): posted, forwarded
        // and dead-lettered byte for byte.
        "non_utf8" => {
            c.groups = vec![
                Group::webhook("billing"),
                Group::forward("copy", "orders.copy"),
            ];
            c.entry = Box::new(|n| {
                let kind = if n % 50 == 17 {
                    Kind::Retryable
                } else {
                    Kind::Healthy
                };
                (kind, not_utf8(n))
            });
        }
        // The webhook accepts requests and answers none for the middle half of the run:
        // an outage, not poison; nothing healthy may be dead-lettered.
        "webhook_hangs" => {
            c.entry = two_percent(Kind::Healthy);
            c.faults = vec![Fault::WebhookHangs {
                from: at(0.25),
                until: at(0.75),
            }];
        }
        // The old soak: kills, a Redis restart with AOF and 2 % poison at once.
        "soak" => {
            c.replicas = s.replicas + 1;
            c.redis_args = AOF.to_vec();
            c.faults = vec![
                Fault::KillReplicas { every: kill_every },
                Fault::RestartRedis {
                    at: at(0.5),
                    down: Duration::from_secs(1),
                    erases: false,
                },
            ];
        }
        // A partitioned group (4 partitions) with per-key order, its 3 replicas SIGKILLed
        // and SIGTERMed (each replaced at once) while entries keyed by 256 customers are
        // produced into their partitions: the partitions rebalance at every stop and
        // join. 5 % of entries fail once then succeed, 2 % always fail (dead-lettered after
        // max_deliveries, holding their key meanwhile), 2 % are refused (dead-lettered at
        // once). Beyond the usual rule: no key's entries called out of id order, and
        // every partition held by a live replica at the end.
        "partitioned_ordered" => {
            c.replicas = s.replicas.max(3);
            c.partitions = Some(4);
            c.groups = vec![Group {
                order_by: Some(KEY_FIELD),
                ..Group::webhook("billing")
            }];
            c.entry = Box::new(|n| {
                let kind = match n {
                    n if n % 50 == 17 => Kind::Retryable,
                    n if n % 50 == 33 => Kind::Permanent,
                    n if n % 20 == 5 => Kind::RetryableOnce,
                    _ => Kind::Healthy,
                };
                // Keys in no pattern of n (Fibonacci hashing), so each partition gets
                // its keys' entries interleaved.
                let customer = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56;
                (
                    kind,
                    vec![
                        (
                            KEY_FIELD.as_bytes().to_vec(),
                            format!("customer-{customer}").into_bytes(),
                        ),
                        (b"payload".to_vec(), format!("order {n}").into_bytes()),
                    ],
                )
            });
            // SIGTERMs less often than SIGKILLs: a kill leaves partitions to their
            // leases, a SIGTERM hands them over at once.
            c.faults = vec![
                Fault::KillReplicas { every: kill_every },
                Fault::TerminateReplicas {
                    every: kill_every * 2,
                },
            ];
        }
        other => panic!("no chaos case {other:?}; the cases are {CASES:?}"),
    }
    c
}

fn many_fields(count: usize) -> Fields {
    (0..count)
        .map(|i| (format!("f{i}").into_bytes(), format!("v{i}").into_bytes()))
        .collect()
}

fn one_big_field(bytes: usize) -> Fields {
    let mut value = vec![b'x'; bytes];
    // Not all one byte, so that a shifted copy would not compare equal.
    for (i, b) in value.iter_mut().enumerate().step_by(4093) {
        *b = b'a' + (i % 26) as u8;
    }
    vec![(b"blob".to_vec(), value)]
}

fn not_utf8(n: u64) -> Fields {
    let mut bin: Vec<u8> = n.to_le_bytes().to_vec();
    bin.extend_from_slice(&[0x00, 0xff, 0xfe, 0x80, 0xc3, 0x28, 0x00]);
    vec![
        (b"\xffname\xfe".to_vec(), b"\xc3\x28value\x80".to_vec()),
        (b"caf\xe9".to_vec(), b"cr\xe8me br\xfbl\xe9e".to_vec()),
        (b"bin\x00ary".to_vec(), bin),
    ]
}
