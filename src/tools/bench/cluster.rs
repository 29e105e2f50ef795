//! The scale-out drain of `streamworker bench --partitions 1,4,16`: the same entries
//! drained from one stream on one server, and from a partitioned stream of 1, 4 and 16
//! partitions (`bench:p0` …, see `crate::partition`) on a private three-primary Redis
//! Cluster, in one run, interleaved.
//!
//! A partitioned setup runs the daemon as users do: one group with `stream = "bench"` and
//! `partitions = P`, so the partition owner (`crate::partition::owner`) joins the group's
//! members, takes every partition's lease and runs one consumer loop per partition it holds.
//! The bench does not create the partitions' consumer groups: each partition's loop creates
//! its own when it takes the partition, as it does in production, so the drain also shows
//! that the one daemon took every partition. Timing starts at the first entry read, so
//! process start-up is not counted; taking the leases is. When the drain is done, the bench
//! reads every partition's lease and reports how many the daemon held. Entries go to the
//! partition of their `user_id` (`crc32(user_id) % partitions`), as a producer using
//! `--partition-by user_id` would put them.
//!
//! Partition names hash to slots, so a few partitions spread unevenly over three primaries
//! (16 land 7 / 3 / 6 on evenly split slots). Where hashing leaves a primary more than its
//! even share, the drain is run again on a second private cluster whose slots put
//! partition `p` on primary `p mod 3` (assigned before the nodes meet, nothing migrates),
//! so the table shows the hashed layout against an even one.
//!
//! Reported per setup: entries/s, Redis main-thread CPU per entry summed over the
//! primaries, and how busy each primary's main thread was while the drain ran.

use std::time::{Duration, Instant};

use super::{
    GROUP, Options, STREAM, entries, entries_for, free_port, main_thread_cpu_seconds, median,
    preload_chunk, spawn_daemon,
};
use crate::client::Probe;
use crate::keys::partition_lease_key;
use crate::partition::{partition_of, partition_stream};
use crate::tools::local_redis::{LocalCluster, LocalRedis, LocalRedisError};

const PRIMARIES: usize = 3;
/// The daemon's consumer name: the value of every lease it holds.
const CONSUMER: &str = "bench-0";

/// One drain's figures.
#[derive(Debug, Clone, Default)]
struct Drain {
    rate: f64,
    redis_us: f64,
    /// Main-thread CPU ÷ wall time of each server, while the drain ran.
    busy: Vec<f64>,
    consumer_us: f64,
    /// Partitions whose lease the daemon held when the drain was done.
    leased: usize,
    /// From the first entry read until every partition's loop had created its group, in
    /// ms: how long taking the partitions held back the drain.
    taken_ms: f64,
    /// Entries/s from then on: the drain with every partition running.
    rate_all: f64,
}

/// Where the streams of a setup live.
struct Servers<'a> {
    /// One server, or the cluster's primaries.
    nodes: Vec<(&'a LocalRedis, Probe)>,
    /// `None` for the single server; the cluster (for slot owners and its URLs).
    cluster: Option<&'a LocalCluster>,
}

impl<'a> Servers<'a> {
    fn one(node: &'a LocalRedis) -> Result<Self, LocalRedisError> {
        Ok(Self {
            nodes: vec![(node, probe(node)?)],
            cluster: None,
        })
    }

    fn cluster(cluster: &'a LocalCluster) -> Result<Self, LocalRedisError> {
        Ok(Self {
            nodes: cluster
                .nodes
                .iter()
                .map(|node| Ok((node, probe(node)?)))
                .collect::<Result<_, LocalRedisError>>()?,
            cluster: Some(cluster),
        })
    }

    /// The node holding `key`.
    fn node_of(&mut self, key: &str) -> usize {
        match self.cluster {
            Some(cluster) => self.nodes[0]
                .1
                .key_slot(key)
                .map(|slot| cluster.owner(slot))
                .unwrap_or(0),
            None => 0,
        }
    }

    /// How many of `streams` each node holds.
    fn spread(&mut self, streams: &[String]) -> Vec<u32> {
        let mut counts = vec![0; self.nodes.len()];
        for s in streams {
            counts[self.node_of(s)] += 1;
        }
        counts
    }
}

fn probe(node: &LocalRedis) -> Result<Probe, LocalRedisError> {
    Probe::connect(&node.url(), None).map_err(|e| LocalRedisError::Start(e.to_string()))
}

/// The daemon configuration: one group on `bench`, partitioned into `partitions` when
/// given, configured as the bench's single-stream drain configures its group.
fn config(servers: &Servers<'_>, partitions: Option<u32>, listen: &str) -> String {
    let redis = match servers.cluster {
        Some(cluster) => format!(
            "cluster = [{}]",
            cluster
                .urls()
                .iter()
                .map(|u| format!("{u:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => format!("url = {:?}", servers.nodes[0].0.url()),
    };
    let partitions = partitions.map_or(String::new(), |p| format!("partitions = {p}\n"));
    format!(
        "[redis]\n{redis}\n[worker]\nconsumer = {CONSUMER:?}\n[http]\nlisten = \"{listen}\"\n[telemetry]\nlog_format = \"json\"\n[groups.{GROUP}]\nstream = {STREAM:?}\n{partitions}handler = \"noop\"\n{}",
        super::drain_settings()
    )
}

/// Drains `n` entries of `size` bytes spread over the partitions of `bench` (by
/// `user_id`), or from `bench` itself when `partitions` is `None`, with one daemon.
fn drain_once(
    servers: &mut Servers<'_>,
    partitions: Option<u32>,
    (n, size): (usize, usize),
) -> Option<Drain> {
    let streams: Vec<String> = match partitions {
        Some(p) => (0..p).map(|p| partition_stream(STREAM, p)).collect(),
        None => vec![STREAM.to_owned()],
    };
    // Which node holds each stream.
    let owners: Vec<usize> = streams.iter().map(|s| servers.node_of(s)).collect();
    for (_, probe) in &mut servers.nodes {
        probe.flush_all().expect("FLUSHALL");
    }
    let message = super::message(size);
    let parts = streams.len() as u32;
    let chunk = preload_chunk(size).clamp(1, 5000);
    let mut i = 0;
    while i < n {
        let to = (i + chunk).min(n);
        let mut per: Vec<Vec<[(&'static str, String); 4]>> = vec![Vec::new(); streams.len()];
        for fields in entries(i, to, &message) {
            let p = partition_of(fields[0].1.as_bytes(), parts) as usize;
            per[p].push(fields);
        }
        for (p, batch) in per.into_iter().enumerate() {
            if !batch.is_empty() {
                servers.nodes[owners[p]]
                    .1
                    .add_all(&streams[p], batch)
                    .expect("XADD");
            }
        }
        i = to;
    }
    if partitions.is_none() {
        // A partitioned group's loops create their partition's group when they take it
        // (see the module's doc); the plain group is created as the other drains do.
        servers.nodes[0]
            .1
            .create_group(STREAM, GROUP, "0", true)
            .expect("XGROUP CREATE");
    }
    let cpu0: Vec<f64> = servers
        .nodes
        .iter_mut()
        .map(|(_, p)| p.main_thread_cpu().unwrap_or_default())
        .collect();
    let files = tempfile::tempdir().expect("temp dir");
    let path = files.path().join("bench.toml");
    let listen = format!("127.0.0.1:{}", free_port());
    std::fs::write(&path, config(servers, partitions, &listen)).expect("config");
    let mut child = spawn_daemon(&path);
    let pid = child.id();

    let deadline = Instant::now() + Duration::from_secs(600);
    let mut started: Option<(Instant, Vec<f64>)> = None;
    let mut all_taken: Option<(Instant, u64)> = None;
    let finished = loop {
        let mut read = 0;
        let mut done = true;
        let mut taken = true;
        for (p, stream) in streams.iter().enumerate() {
            let probe = &mut servers.nodes[owners[p]].1;
            // Until a partition's loop has created its group, the partition is not done.
            match probe.groups(stream).unwrap_or_default().first() {
                Some(g) => {
                    read += g.entries_read.unwrap_or(0);
                    done &= g.lag == Some(0) && g.pending == 0;
                }
                None => {
                    done = false;
                    taken = false;
                }
            }
        }
        let now = Instant::now();
        if started.is_none() && read > 0 {
            let busy0 = servers
                .nodes
                .iter()
                .map(|(node, _)| main_thread_cpu_seconds(node.pid()))
                .collect();
            started = Some((now, busy0));
        }
        if taken && started.is_some() && all_taken.is_none() {
            all_taken = Some((now, read));
        }
        if done && read as usize >= n {
            break Some(now);
        }
        if now > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let busy1: Vec<f64> = servers
        .nodes
        .iter()
        .map(|(node, _)| main_thread_cpu_seconds(node.pid()))
        .collect();
    let cpu1: Vec<f64> = servers
        .nodes
        .iter_mut()
        .map(|(_, p)| p.main_thread_cpu().unwrap_or_default())
        .collect();
    let consumer = super::cpu_seconds(pid);
    // Read after the figures, before the daemon stops (which hands its leases back).
    let leased = match partitions {
        Some(_) => streams
            .iter()
            .zip(&owners)
            .filter(|(stream, owner)| {
                servers.nodes[**owner]
                    .1
                    .get(&partition_lease_key(stream, GROUP))
                    .ok()
                    .flatten()
                    .is_some_and(|holder| holder == CONSUMER)
            })
            .count(),
        None => 0,
    };
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(pid as i32, libc::SIGTERM);
    }
    let stop = Instant::now() + Duration::from_secs(10);
    while Instant::now() < stop && !matches!(child.try_wait(), Ok(Some(_))) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    let ((started, busy0), finished) = (started?, finished?);
    let secs = (finished - started).as_secs_f64().max(1e-6);
    Some(Drain {
        rate: n as f64 / secs,
        redis_us: cpu1.iter().zip(&cpu0).map(|(a, b)| a - b).sum::<f64>() * 1e6 / n as f64,
        busy: busy1
            .iter()
            .zip(&busy0)
            .map(|(a, b)| (a - b) / secs)
            .collect(),
        consumer_us: consumer * 1e6 / n as f64,
        leased,
        taken_ms: all_taken.map_or(f64::NAN, |(t, _)| (t - started).as_secs_f64() * 1e3),
        rate_all: all_taken.map_or(f64::NAN, |(t, read)| {
            n.saturating_sub(read as usize) as f64 / (finished - t).as_secs_f64().max(1e-6)
        }),
    })
}

/// A setup of the scale-out table: one stream on one server, or a partitioned stream on
/// the cluster, its slots as hashed or laid out evenly.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Setup {
    OneServer,
    Partitions { partitions: u32, even: bool },
}

impl Setup {
    fn name(&self) -> String {
        match self {
            Self::OneServer => "one stream, one server".to_owned(),
            Self::Partitions {
                partitions: 1,
                even: false,
            } => "1 partition, cluster".to_owned(),
            Self::Partitions {
                partitions,
                even: false,
            } => format!("{partitions} partitions, cluster"),
            Self::Partitions {
                partitions,
                even: true,
            } => format!("{partitions} partitions, cluster, even slots"),
        }
    }
}

/// The most partitions any primary holds when `partitions` spread as evenly as they can.
fn even_share(partitions: u32) -> u32 {
    partitions.div_ceil(PRIMARIES as u32)
}

/// Runs the scale-out drain and returns its section of the report (Markdown).
pub fn run(options: &Options) -> Result<String, LocalRedisError> {
    let size = options.entry_sizes.first().copied().unwrap_or(100);
    let n = entries_for(options.entries, size);
    let counts: Vec<u32> = options.partitions.iter().map(|&p| p.max(1)).collect();
    let single = LocalRedis::start(&options.redis_server)?;
    let cluster = LocalCluster::start(&options.redis_server, PRIMARIES)?;
    let mut one = Servers::one(&single)?;
    let mut hashed = Servers::cluster(&cluster)?;
    let stream_names =
        |p: u32| -> Vec<String> { (0..p).map(|p| partition_stream(STREAM, p)).collect() };
    // The partition counts that hashing spreads unevenly get a row on an even layout too.
    let mut spreads: Vec<(Setup, Vec<u32>)> = vec![(Setup::OneServer, vec![1])];
    let mut uneven = Vec::new();
    for &p in &counts {
        let spread = hashed.spread(&stream_names(p));
        if spread.iter().max().copied().unwrap_or(0) > even_share(p) {
            uneven.push(p);
        }
        let setup = Setup::Partitions {
            partitions: p,
            even: false,
        };
        spreads.push((setup, spread));
    }
    let even_cluster = match uneven.iter().max() {
        Some(&most) => {
            let placed: Vec<(String, usize)> = (0..most)
                .map(|p| (partition_stream(STREAM, p), p as usize % PRIMARIES))
                .collect();
            Some(LocalCluster::start_placing(
                &options.redis_server,
                PRIMARIES,
                &placed,
            )?)
        }
        None => None,
    };
    let mut even = match &even_cluster {
        Some(c) => Some(Servers::cluster(c)?),
        None => None,
    };
    if let Some(servers) = &mut even {
        for &p in &uneven {
            let setup = Setup::Partitions {
                partitions: p,
                even: true,
            };
            let at = spreads
                .iter()
                .position(|(s, _)| {
                    *s == Setup::Partitions {
                        partitions: p,
                        even: false,
                    }
                })
                .map_or(spreads.len(), |i| i + 1);
            spreads.insert(at, (setup, servers.spread(&stream_names(p))));
        }
    }

    let mut results: Vec<Vec<Drain>> = vec![Vec::new(); spreads.len()];
    for run in 0..options.runs {
        for (i, (setup, _)) in spreads.iter().enumerate() {
            let (servers, partitions) = match *setup {
                Setup::OneServer => (&mut one, None),
                Setup::Partitions {
                    partitions,
                    even: false,
                } => (&mut hashed, Some(partitions)),
                Setup::Partitions {
                    partitions,
                    even: true,
                } => (even.as_mut().expect("started above"), Some(partitions)),
            };
            eprintln!(
                "run {}/{}: scale-out, {}, draining {n} entries of {size} bytes…",
                run + 1,
                options.runs,
                setup.name()
            );
            if let Some(d) = drain_once(servers, partitions, (n, size)) {
                eprintln!(
                    "  {:.0} entries/s ({:.0} once all partitions ran), {:.2} µs Redis CPU/entry, busy {:?}, {} partitions leased, all taken {:.0} ms after the first read",
                    d.rate, d.rate_all, d.redis_us, d.busy, d.leased, d.taken_ms
                );
                results[i].push(d);
            }
        }
    }

    let mut out = format!(
        "\nScale-out: {n} entries of {size} bytes, spread over the partitions by `crc32(user_id) % partitions` (900 distinct user ids). One daemon, one group `{GROUP}` on stream `{STREAM}` (with `partitions = P` on the cluster: the daemon takes every partition's lease and runs a loop per partition), noop handler, batch_size {}, concurrency {}; median of {} runs, interleaved. One private redis-server, and a private cluster of {PRIMARIES} primaries (no replicas, slots split in thirds; \"even slots\": a second cluster whose slots put partition p on primary p mod {PRIMARIES}), all on this machine. Redis CPU is summed over the primaries; busy is each primary's main thread CPU time ÷ the drain's wall time; leased is how many partitions' leases the daemon held when the drain was done (the fewest in any run); taken is how long after the first entry read every partition's loop had created its group, part of the drain's time; \"once all ran\" is the rate of the entries left from then on.\n\n",
        super::DRAIN_BATCH,
        super::DRAIN_CONCURRENCY,
        options.runs
    );
    out.push_str("| setup | partitions per primary | leased | taken ms | entries/s | ÷ one stream | entries/s once all ran | ÷ one stream | Redis CPU µs/entry (all primaries) | busy per primary | consumer CPU µs/entry |\n");
    out.push_str("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |\n");
    let medians: Vec<Drain> = results
        .iter()
        .map(|ds| {
            let servers = ds.first().map_or(0, |d| d.busy.len());
            Drain {
                rate: median(ds.iter().map(|d| d.rate).collect()),
                redis_us: median(ds.iter().map(|d| d.redis_us).collect()),
                busy: (0..servers)
                    .map(|s| median(ds.iter().map(|d| d.busy[s]).collect()))
                    .collect(),
                consumer_us: median(ds.iter().map(|d| d.consumer_us).collect()),
                leased: ds.iter().map(|d| d.leased).min().unwrap_or(0),
                taken_ms: median(ds.iter().map(|d| d.taken_ms).collect()),
                rate_all: median(ds.iter().map(|d| d.rate_all).collect()),
            }
        })
        .collect();
    let base = medians.first().map_or(0.0, |d| d.rate);
    let base_all = medians.first().map_or(0.0, |d| d.rate_all);
    let ratio = |rate: f64, base: f64| if base > 0.0 { rate / base } else { f64::NAN };
    for ((setup, spread), d) in spreads.iter().zip(&medians) {
        let (leased, taken) = match setup {
            Setup::OneServer => ("—".to_owned(), "—".to_owned()),
            Setup::Partitions { partitions, .. } => (
                format!("{} / {partitions}", d.leased),
                format!("{:.0}", d.taken_ms),
            ),
        };
        out.push_str(&format!(
            "| {} | {} | {leased} | {taken} | {:.0} | {:.2}× | {:.0} | {:.2}× | {:.2} | {} | {:.2} |\n",
            setup.name(),
            spread
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(" / "),
            d.rate,
            ratio(d.rate, base),
            d.rate_all,
            ratio(d.rate_all, base_all),
            d.redis_us,
            d.busy
                .iter()
                .map(|b| format!("{:.0} %", b * 100.0))
                .collect::<Vec<_>>()
                .join(" / "),
            d.consumer_us
        ));
    }
    Ok(out)
}
