//! The scale-out drain of `streamworker bench --partitions 1,4,16`: the same entries
//! drained from one stream on one server, and from 1, 4 and 16 partition streams
//! (`bench:p0` …, see `crate::partition`) on a private three-primary Redis Cluster, in one
//! run, interleaved.
//!
//! Each partition stream gets one consumer loop (one group per partition in one daemon),
//! which is what partition ownership runs: one loop per owned partition. Entries go to the
//! partition of their `user_id` (`crc32(user_id) % partitions`), as a producer using
//! `--partition-by user_id` would put them.
//!
//! Reported per setup: entries/s, Redis main-thread CPU per entry summed over the
//! primaries, and how busy each primary's main thread was while the drain ran.

use std::time::{Duration, Instant};

use super::{
    GROUP, Options, STREAM, entries, entries_for, free_port, main_thread_cpu_seconds, median,
    preload_chunk, spawn_daemon,
};
use crate::client::Probe;
use crate::partition::{partition_of, partition_stream};
use crate::tools::local_redis::{LocalCluster, LocalRedis, LocalRedisError};

const PRIMARIES: usize = 3;

/// One drain's figures.
#[derive(Debug, Clone, Default)]
struct Drain {
    rate: f64,
    redis_us: f64,
    /// Main-thread CPU ÷ wall time of each server, while the drain ran.
    busy: Vec<f64>,
    consumer_us: f64,
}

/// Where the streams of a setup live.
struct Servers<'a> {
    /// One server, or the cluster's primaries.
    nodes: Vec<(&'a LocalRedis, Probe)>,
    /// `None` for the single server; the cluster (for slot owners and its URLs).
    cluster: Option<&'a LocalCluster>,
}

fn probe(node: &LocalRedis) -> Result<Probe, LocalRedisError> {
    Probe::connect(&node.url(), None).map_err(|e| LocalRedisError::Start(e.to_string()))
}

/// The daemon configuration: one group per stream, as the bench's single-stream drain
/// configures its one group.
fn config(servers: &Servers<'_>, streams: &[String], listen: &str) -> String {
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
    let mut out = format!(
        "[redis]\n{redis}\n[worker]\nconsumer = \"bench-0\"\n[http]\nlisten = \"{listen}\"\n[telemetry]\nlog_format = \"json\"\n"
    );
    for (i, stream) in streams.iter().enumerate() {
        out.push_str(&format!(
            "[groups.{}]\nstream = {stream:?}\nhandler = \"noop\"\nbatch_size = 512\nconcurrency = 1024\n",
            group(i)
        ));
    }
    out
}

/// The group of the `i`th stream: a daemon's groups are named by their table, so each
/// partition's loop is a group of its own name.
fn group(i: usize) -> String {
    format!("{GROUP}-p{i}")
}

/// Drains `n` entries of `size` bytes spread over `streams` (by `user_id`), with one
/// daemon running a loop per stream.
fn drain_once(
    servers: &mut Servers<'_>,
    streams: &[String],
    (n, size): (usize, usize),
) -> Option<Drain> {
    // Which node holds each stream.
    let owners: Vec<usize> = streams
        .iter()
        .map(|s| match servers.cluster {
            Some(cluster) => servers.nodes[0]
                .1
                .key_slot(s)
                .map(|slot| cluster.owner(slot))
                .unwrap_or(0),
            None => 0,
        })
        .collect();
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
    for (p, stream) in streams.iter().enumerate() {
        servers.nodes[owners[p]]
            .1
            .create_group(stream, &group(p), "0", true)
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
    std::fs::write(&path, config(servers, streams, &listen)).expect("config");
    let mut child = spawn_daemon(&path);
    let pid = child.id();

    let deadline = Instant::now() + Duration::from_secs(600);
    let mut started: Option<(Instant, Vec<f64>)> = None;
    let finished = loop {
        let mut read = 0;
        let mut done = true;
        for (p, stream) in streams.iter().enumerate() {
            let probe = &mut servers.nodes[owners[p]].1;
            match probe.groups(stream).unwrap_or_default().first() {
                Some(g) => {
                    read += g.entries_read.unwrap_or(0);
                    done &= g.lag == Some(0) && g.pending == 0;
                }
                None => done = false,
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
    })
}

/// A setup of the scale-out table: one stream on one server, or partitions on the cluster.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Setup {
    OneServer,
    Partitions(u32),
}

/// Runs the scale-out drain and returns its section of the report (Markdown).
pub fn run(options: &Options) -> Result<String, LocalRedisError> {
    let size = options.entry_sizes.first().copied().unwrap_or(100);
    let n = entries_for(options.entries, size);
    let single = LocalRedis::start(&options.redis_server)?;
    let cluster = LocalCluster::start(&options.redis_server, PRIMARIES)?;
    let mut one = Servers {
        nodes: vec![(&single, probe(&single)?)],
        cluster: None,
    };
    let mut many = Servers {
        nodes: cluster
            .nodes
            .iter()
            .map(|node| Ok((node, probe(node)?)))
            .collect::<Result<_, LocalRedisError>>()?,
        cluster: Some(&cluster),
    };
    let setups: Vec<Setup> = std::iter::once(Setup::OneServer)
        .chain(
            options
                .partitions
                .iter()
                .map(|&p| Setup::Partitions(p.max(1))),
        )
        .collect();
    let mut results: Vec<Vec<Drain>> = vec![Vec::new(); setups.len()];
    let mut spread: Vec<String> = vec![String::new(); setups.len()];
    for run in 0..options.runs {
        for (i, setup) in setups.iter().enumerate() {
            let (servers, streams) = match setup {
                Setup::OneServer => (&mut one, vec![STREAM.to_owned()]),
                Setup::Partitions(p) => (
                    &mut many,
                    (0..*p).map(|p| partition_stream(STREAM, p)).collect(),
                ),
            };
            if spread[i].is_empty() {
                let mut counts = vec![0; servers.nodes.len()];
                for s in &streams {
                    let owner = match servers.cluster {
                        Some(c) => servers.nodes[0]
                            .1
                            .key_slot(s)
                            .map(|slot| c.owner(slot))
                            .unwrap_or(0),
                        None => 0,
                    };
                    counts[owner] += 1;
                }
                spread[i] = counts
                    .iter()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(" / ");
            }
            eprintln!(
                "run {}/{}: scale-out, {:?}, draining {n} entries of {size} bytes…",
                run + 1,
                options.runs,
                setup
            );
            if let Some(d) = drain_once(servers, &streams, (n, size)) {
                eprintln!(
                    "  {:.0} entries/s, {:.2} µs Redis CPU/entry, busy {:?}",
                    d.rate, d.redis_us, d.busy
                );
                results[i].push(d);
            }
        }
    }

    let mut out = format!(
        "\nScale-out: {n} entries of {size} bytes, spread over the partitions by `crc32(user_id) % partitions` (900 distinct user ids); one daemon with one group (one loop) per partition stream, noop handler, batch_size 512, concurrency 1024 each; median of {} runs, interleaved. One private redis-server, and a private cluster of {PRIMARIES} primaries (no replicas), all on this machine. Redis CPU is summed over the primaries; busy is each primary's main thread CPU time ÷ the drain's wall time.\n\n",
        options.runs
    );
    out.push_str("| setup | partitions per primary | entries/s | ÷ one stream | Redis CPU µs/entry (all primaries) | busy per primary | consumer CPU µs/entry |\n");
    out.push_str("| --- | --- | ---: | ---: | ---: | --- | ---: |\n");
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
            }
        })
        .collect();
    let base = medians.first().map_or(0.0, |d| d.rate);
    for ((setup, d), spread) in setups.iter().zip(&medians).zip(&spread) {
        let name = match setup {
            Setup::OneServer => "one stream, one server".to_owned(),
            Setup::Partitions(1) => "1 partition, cluster".to_owned(),
            Setup::Partitions(p) => format!("{p} partitions, cluster"),
        };
        out.push_str(&format!(
            "| {name} | {spread} | {:.0} | {:.2}× | {:.2} | {} | {:.2} |\n",
            d.rate,
            if base > 0.0 { d.rate / base } else { f64::NAN },
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
