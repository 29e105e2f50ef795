//! The consumer loop run inside the test process against a real `redis-server`: one group,
//! a scripted handler, and the loop's own events (`consumer::LoopEvent`) to wait on
//! instead of sleeps and polls. Each test reads the story of its entries from the events
//! (fetched, fate decided, flushed, circuit changes), then checks Redis.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use redis::Commands;
use streamworker::consumer::{self, Fate, Group, GroupExit, LoopEvent, Source};
use streamworker::handlers::{Batching, Effects, Entry, EntryId, Handler, HandlerError};
use streamworker::{config, health::Health, metrics::Metrics, shutdown::Shutdown};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use crate::support::{self, RedisServer};

const STREAM: &str = "orders";
const GROUP: &str = "billing";

/// What the scripted handler answers for an entry.
type Script = dyn Fn(&Entry) -> Result<(), HandlerError> + Send + Sync;

struct Scripted {
    script: Box<Script>,
    calls: Arc<AtomicU32>,
    batching: Option<Batching>,
}

impl Handler for Scripted {
    fn handle(&self, entry: &Entry) -> impl Future<Output = Result<Effects, HandlerError>> + Send {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let result = (self.script)(entry).map(|()| Effects::new());
        async move { result }
    }

    fn batching(&self) -> Option<Batching> {
        self.batching
    }
}

/// One group's loop running in this process, and what it reports.
struct InProcess {
    events: UnboundedReceiver<LoopEvent>,
    seen: Vec<LoopEvent>,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<Result<GroupExit, consumer::GroupError>>,
    calls: Arc<AtomicU32>,
    _dir: tempfile::TempDir,
}

/// Fast settings: a reclaim every 200 ms, a parked retry due 100 ms later (no jitter).
fn group_toml(extra: &str) -> String {
    format!(
        r#"
[groups.{GROUP}]
stream = "{STREAM}"
handler = "noop"
start_id = "0"
concurrency = 8
batch_size = 16
block = "200ms"
handler_timeout = "1s"
claim_idle = "2s"
retry_backoff = {{ initial = "100ms", max = "100ms", multiplier = 1.0, jitter = 0.0 }}
{extra}
"#
    )
}

impl InProcess {
    /// Starts the loop of group `billing` on stream `orders` with `script`'s answers.
    async fn start(server: &RedisServer, extra: &str, script: Box<Script>) -> Self {
        Self::start_with(server, extra, script, None).await
    }

    async fn start_with(
        server: &RedisServer,
        extra: &str,
        script: Box<Script>,
        batching: Option<Batching>,
    ) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = support::write_config(
            &dir,
            &support::config(&server.url(), "inproc-1", &group_toml(extra)),
        );
        let config = config::load(path.as_ref()).expect("a valid configuration");
        let client = streamworker::client::Client::connect(&config.redis)
            .await
            .expect("Redis reachable");
        let (tx, events) = unbounded_channel();
        let calls = Arc::new(AtomicU32::new(0));
        let shutdown = Shutdown::new(config.worker.shutdown_timeout);
        let group = Group {
            config: Arc::new(config.groups[GROUP].clone()),
            consumer: config.worker.consumer_name(),
            claim_interval: config.worker.claim_interval,
            client,
            handler: Scripted {
                script,
                calls: Arc::clone(&calls),
                batching,
            },
            metrics: Metrics::new().group(STREAM, GROUP),
            shutdown: shutdown.clone(),
            heartbeat: Health::new().register(
                GROUP,
                Duration::from_secs(60),
                Duration::from_secs(60),
            ),
            lease_token: format!("inprocess-{}", fastrand::u64(..)),
            events: Some(tx),
        };
        let task = tokio::spawn(async move { consumer::run(&group).await });
        Self {
            events,
            seen: Vec::new(),
            shutdown,
            task,
            calls,
            _dir: dir,
        }
    }

    /// Waits for the next event `pick` accepts (the ones before it are kept in `seen`).
    async fn next<T>(&mut self, what: &str, mut pick: impl FnMut(&LoopEvent) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(event)) => {
                    let picked = pick(&event);
                    self.seen.push(event);
                    if let Some(t) = picked {
                        return t;
                    }
                }
                Ok(None) => panic!("the loop ended while waiting for {what}: {:#?}", self.seen),
                Err(_) => panic!("no {what} within 15 s; events so far: {:#?}", self.seen),
            }
        }
    }

    /// The fate of `id` at delivery `count`, once decided (entries settle in any order,
    /// so an event already seen counts).
    async fn fate(&mut self, id: EntryId, count: u64) -> Fate {
        let pick = |e: &LoopEvent| match e {
            LoopEvent::Settled {
                id: i,
                delivery_count,
                fate,
            } if *i == id && *delivery_count == count => Some(fate.clone()),
            _ => None,
        };
        if let Some(fate) = self.seen.iter().find_map(pick) {
            return fate;
        }
        self.next(&format!("the fate of {id} at delivery {count}"), pick)
            .await
    }

    /// Waits until flushes (seen or to come) have acknowledged every id of `ids`.
    async fn acked(&mut self, ids: &[EntryId]) {
        let mut left: Vec<EntryId> = ids.to_vec();
        for e in &self.seen {
            if let LoopEvent::Flushed { acked, .. } = e {
                left.retain(|id| !acked.contains(id));
            }
        }
        while !left.is_empty() {
            let acked = self
                .next("an acknowledgement", |e| match e {
                    LoopEvent::Flushed { acked, .. } if !acked.is_empty() => Some(acked.clone()),
                    _ => None,
                })
                .await;
            left.retain(|id| !acked.contains(id));
        }
    }

    /// Shuts the loop down and expects a clean drain.
    async fn stop(self) {
        self.shutdown.trigger();
        let exit = tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("the loop drains within 15 s")
            .expect("the loop task did not panic")
            .expect("the loop ends without error");
        assert_eq!(exit, GroupExit::Drained);
    }
}

fn add(con: &mut redis::Connection, fields: &[(&str, &str)]) -> EntryId {
    let id: String = con.xadd(STREAM, "*", fields).expect("XADD");
    id.parse().expect("an entry id")
}

/// The group's pending count (XINFO GROUPS).
fn pending_count(con: &mut redis::Connection) -> u64 {
    support::group_info(con, STREAM, GROUP)
        .expect("the group exists")
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_entry_is_parked_for_its_backoff_then_succeeds() {
    let server = RedisServer::start();
    let mut con = server.connection();
    let id = add(&mut con, &[("order", "1")]);
    let mut run = InProcess::start(
        &server,
        "",
        Box::new(|entry| {
            if entry.delivery_count < 2 {
                Err(HandlerError::retry("payment service busy"))
            } else {
                Ok(())
            }
        }),
    )
    .await;

    assert_eq!(
        run.fate(id, 1).await,
        Fate::Park {
            after: Duration::from_millis(100),
            idle: Duration::from_millis(1900),
            reason: "payment service busy".into()
        }
    );
    run.next("the park reaching Redis", |e| match e {
        LoopEvent::Flushed { parked: 1, .. } => Some(()),
        _ => None,
    })
    .await;
    let parked_at = tokio::time::Instant::now();
    // Taken back by a reclaim (not a read, not a resync), once its backoff has passed.
    run.next("the reclaim of the parked entry", |e| match e {
        LoopEvent::Fetched {
            from: Source::Reclaim,
            ids,
        } if ids == &[id] => Some(()),
        _ => None,
    })
    .await;
    assert!(
        parked_at.elapsed() >= Duration::from_millis(80),
        "reclaimed {:?} after parking, before its 100 ms backoff",
        parked_at.elapsed()
    );
    assert_eq!(run.fate(id, 2).await, Fate::Ack);
    run.acked(&[id]).await;
    assert_eq!(pending_count(&mut con), 0);
    assert_eq!(run.calls.load(Ordering::SeqCst), 2);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_entry_is_dead_lettered_at_max_deliveries() {
    let server = RedisServer::start();
    let mut con = server.connection();
    let id = add(&mut con, &[("order", "poison")]);
    let mut run = InProcess::start(
        &server,
        "max_deliveries = 3\ncircuit_breaker = { threshold = 0 }",
        Box::new(|_| Err(HandlerError::retry("cannot parse the amount"))),
    )
    .await;

    for count in 1..=2 {
        assert!(
            matches!(run.fate(id, count).await, Fate::Park { .. }),
            "delivery {count} is retried"
        );
    }
    assert_eq!(
        run.fate(id, 3).await,
        Fate::DeadLetter {
            reason: "cannot parse the amount (gave up after 3 deliveries)".into()
        }
    );
    run.next("the dead letter reaching Redis", |e| match e {
        LoopEvent::Flushed { dead_lettered, .. } if dead_lettered == &[id] => Some(()),
        _ => None,
    })
    .await;

    assert_eq!(
        pending_count(&mut con),
        0,
        "dead-lettered means acknowledged"
    );
    let dead = support::entries(&mut con, &format!("{{{STREAM}}}:dlq:{GROUP}"));
    assert_eq!(dead.len(), 1, "{dead:?}");
    let fields: std::collections::HashMap<String, String> = dead[0]
        .1
        .iter()
        .map(|(k, v)| {
            (
                String::from_utf8_lossy(k).into_owned(),
                String::from_utf8_lossy(v).into_owned(),
            )
        })
        .collect();
    assert_eq!(fields["order"], "poison");
    assert_eq!(fields["dlq_origin_id"], id.to_string());
    assert_eq!(fields["dlq_deliveries"], "3");
    assert_eq!(run.calls.load(Ordering::SeqCst), 3);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_while_the_circuit_is_open_are_given_back_and_handled_once_it_closes() {
    let server = RedisServer::start();
    let mut con = server.connection();
    let ids: Vec<EntryId> = (0..5)
        .map(|n| add(&mut con, &[("order", &n.to_string())]))
        .collect();
    let down = Arc::new(AtomicBool::new(true));
    let downstream = Arc::clone(&down);
    let mut run = InProcess::start(
        &server,
        "max_deliveries = 3\ncircuit_breaker = { threshold = 3, window = 5, pause = \"300ms\" }",
        Box::new(move |_| {
            if downstream.load(Ordering::SeqCst) {
                Err(HandlerError::retry("503 from the payment service"))
            } else {
                Ok(())
            }
        }),
    )
    .await;

    // All five arrive in one read and fail at once: the third failure opens the circuit,
    // so the fourth and fifth failures are the downstream's, not the entries'.
    let mut fates = Vec::new();
    for id in &ids {
        fates.push((*id, run.fate(*id, 1).await));
    }
    assert!(
        run.seen
            .iter()
            .any(|e| matches!(e, LoopEvent::Circuit(t) if matches!(t, streamworker::circuit::Transition::Opened { .. }))),
        "the circuit opened: {:#?}",
        run.seen
    );
    let parked = fates
        .iter()
        .filter(|(_, f)| matches!(f, Fate::Park { .. }))
        .count();
    let given_back: Vec<EntryId> = fates
        .iter()
        .filter_map(|(id, f)| match f {
            Fate::GiveBack { delivery_count, .. } => {
                assert_eq!(*delivery_count, 1, "a first delivery stays counted once");
                Some(*id)
            }
            _ => None,
        })
        .collect();
    assert_eq!((parked, given_back.len()), (3, 2), "{fates:#?}");

    // The downstream recovers: after the pause one parked entry probes, its success
    // closes the circuit, and every entry is handled.
    down.store(false, Ordering::SeqCst);
    run.next("the circuit closing", |e| {
        matches!(
            e,
            LoopEvent::Circuit(streamworker::circuit::Transition::Closed)
        )
        .then_some(())
    })
    .await;
    run.acked(&ids).await;
    assert_eq!(pending_count(&mut con), 0);
    let dead = support::entries(&mut con, &format!("{{{STREAM}}}:dlq:{GROUP}"));
    assert!(dead.is_empty(), "nothing dead-lettered: {dead:?}");
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_entry_is_dead_lettered_without_calling_the_handler() {
    let server = RedisServer::start();
    let mut con = server.connection();
    let bad = add(&mut con, &[("event", "{not json")]);
    let good = add(&mut con, &[("event", r#"{"order": 2}"#)]);
    let mut run = InProcess::start(&server, "payload = \"json:event\"", Box::new(|_| Ok(()))).await;

    assert!(
        matches!(run.fate(bad, 1).await, Fate::DeadLetter { .. }),
        "{:#?}",
        run.seen
    );
    assert_eq!(run.fate(good, 1).await, Fate::Ack);
    run.acked(&[good]).await;
    assert_eq!(
        run.calls.load(Ordering::SeqCst),
        1,
        "only the decodable entry reached the handler"
    );
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_fetched_but_never_started_are_handed_back_at_shutdown() {
    let server = RedisServer::start();
    let mut con = server.connection();
    let ids: Vec<EntryId> = (0..2)
        .map(|n| add(&mut con, &[("order", &n.to_string())]))
        .collect();
    // A batch handler that waits a minute for a full batch: the entries sit fetched, not
    // started, when shutdown comes.
    let mut run = InProcess::start_with(
        &server,
        "",
        Box::new(|_| Ok(())),
        Some(Batching {
            max_entries: 10,
            max_wait: Duration::from_secs(60),
        }),
    )
    .await;
    let mut fetched = Vec::new();
    while fetched.len() < ids.len() {
        let more = run
            .next("the entries read", |e| match e {
                LoopEvent::Fetched {
                    from: Source::Read,
                    ids,
                } => Some(ids.clone()),
                _ => None,
            })
            .await;
        fetched.extend(more);
    }
    assert_eq!(fetched, ids);

    run.shutdown.trigger();
    for id in &ids {
        assert_eq!(
            run.fate(*id, 1).await,
            Fate::HandBack {
                idle: Duration::from_secs(2),
                delivery_count: 0
            }
        );
    }
    let mut handed_back = 0;
    while handed_back < ids.len() {
        handed_back += run
            .next("the hand-back reaching Redis", |e| match e {
                LoopEvent::Flushed { handed_back, .. } => Some(*handed_back),
                _ => None,
            })
            .await;
    }
    let calls = Arc::clone(&run.calls);
    run.stop().await;

    assert_eq!(calls.load(Ordering::SeqCst), 0, "no handler ran");
    // Still pending (for any replica's next reclaim), the delivery that never ran given back.
    let counts = support::delivery_counts(&mut con, STREAM, GROUP);
    for id in &ids {
        assert_eq!(counts.get(&id.to_string()), Some(&0), "{counts:?}");
    }
}
