//! `streamworker bench`: measures streamworker against the consumers people write by hand,
//! side by side in one run, on a private `redis-server`.
//!
//! - drain: N pre-loaded entries, `noop` handler, `batch_size` 512, concurrency 2048 (`DRAIN_BATCH`),
//!   reclaim and metrics on as in production; 1 and 3 replicas; entries/s, Redis
//!   main-thread CPU per entry (`INFO cpu`), how busy Redis's main thread was while the
//!   drain ran (its CPU time ÷ wall time, from `/proc`), the consumer's own CPU per entry,
//!   peak RSS; once per entry size (`--entry-size`);
//! - the same for three contenders: the write-ups' Python loop (COUNT 100, XACK per
//!   entry), a careful Python loop (COUNT 500, one XACK per batch) and the loop a Rust
//!   engineer would hand-write with redis-rs (COUNT 512, one XACK per batch, read then ack);
//! - steady state: entries produced at a fixed rate, end-to-end latency from the entry id's
//!   time to the XACK reply (ids have millisecond resolution), and idle CPU;
//! - scale-out (`--partitions`, see `cluster.rs`): the same drain from a group with
//!   `partitions = 1, 4, 16` on a private three-primary Redis Cluster, through partition
//!   ownership as users run it.
//!
//! Every consumer runs as its own process, so CPU and memory are its own.

pub mod cluster;
pub mod contender;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::client::Probe;
use crate::tools::local_redis::LocalRedis;

const STREAM: &str = "bench";
const GROUP: &str = "bench";

#[derive(Debug, Clone)]
pub struct Options {
    pub entries: usize,
    pub runs: usize,
    pub replicas: Vec<usize>,
    pub rate: u64,
    pub duration: Duration,
    pub python: bool,
    pub redis_server: String,
    /// Entry sizes to drain, in bytes (field names and values together).
    pub entry_sizes: Vec<usize>,
    /// Partition counts for the scale-out drain on a local cluster (none: skipped).
    pub partitions: Vec<u32>,
}

/// At most this many bytes of entries are pre-loaded per drain, so that 16 KB entries do
/// not need gigabytes: big entries drain fewer of them (the report says how many).
const PRELOAD_BYTES: usize = 320 << 20;

/// The entries a drain of `size`-byte entries pre-loads, out of the `entries` asked for.
pub(crate) fn entries_for(entries: usize, size: usize) -> usize {
    entries.min(PRELOAD_BYTES / size.max(1)).max(1)
}

/// One consumer setup to measure.
#[derive(Debug, Clone, PartialEq)]
enum Contender {
    Streamworker { replicas: usize },
    RustLoop,
    PythonCareful,
    PythonNaive,
}

impl Contender {
    fn name(&self) -> String {
        match self {
            Self::Streamworker { replicas: 1 } => "streamworker".into(),
            Self::Streamworker { replicas } => format!("streamworker ×{replicas}"),
            Self::RustLoop => "hand-written redis-rs loop".into(),
            Self::PythonCareful => "Python, COUNT 500, XACK per batch".into(),
            Self::PythonNaive => "Python, COUNT 100, XACK per entry".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Drain {
    rate: f64,
    redis_us: f64,
    /// Redis main-thread CPU time ÷ wall time, from the first entry read to the last acked.
    busy: f64,
    consumer_us: f64,
    rss_mb: f64,
}

pub(crate) fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    if xs.is_empty() {
        return 0.0;
    }
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// CPU seconds (user + system) a process has used, from /proc.
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    stat_cpu_seconds(&format!("/proc/{pid}/stat"))
}

/// CPU seconds (user + system) of a process's main thread alone (its thread id is its
/// pid): for redis-server, the thread that runs every command, without the background
/// threads that free memory and close files.
pub(crate) fn main_thread_cpu_seconds(pid: u32) -> f64 {
    stat_cpu_seconds(&format!("/proc/{pid}/task/{pid}/stat"))
}

fn stat_cpu_seconds(path: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(path) else {
        return 0.0;
    };
    // Fields after the command name (which may contain spaces) start after ") ".
    let after = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields
        .get(11)
        .and_then(|f| f.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0);
    ticks / clock_ticks()
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Peak resident memory of a process in MiB (VmHWM).
pub(crate) fn peak_rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn redis_main_cpu(con: &mut Probe) -> f64 {
    con.main_thread_cpu().unwrap_or_default()
}

/// (entries read, pending, lag) of the bench group.
fn progress(con: &mut Probe) -> (u64, u64, Option<u64>) {
    match con.groups(STREAM).unwrap_or_default().first() {
        Some(g) => (g.entries_read.unwrap_or(0), g.pending, g.lag),
        None => (0, 0, None),
    }
}

/// The message field of a `size`-byte entry: the other three fields and the four names
/// take 61 bytes (with a three-digit user id), the message the rest.
fn message(size: usize) -> String {
    let mut m = String::from("What is quantum computing?");
    let want = size.saturating_sub(61);
    while m.len() < want {
        m.push_str(" Tell me more.");
    }
    m.truncate(want.max(26));
    m
}

/// Entries `from..to` of a drain, with `message` (see [`message`]) setting their size.
pub(crate) fn entries(
    from: usize,
    to: usize,
    message: &str,
) -> impl Iterator<Item = [(&'static str, String); 4]> + '_ {
    let types = ["click", "prompt", "pageview", "feedback"];
    (from..to).map(move |j| {
        [
            ("user_id", (100 + j % 900).to_string()),
            ("event_type", types[j % 4].to_owned()),
            ("message", message.to_owned()),
            ("timestamp", "2025-07-25T18:00:00Z".to_owned()),
        ]
    })
}

/// Pipelined XADDs per round trip: fewer for big entries, so a pipeline stays near 5 MB.
pub(crate) fn preload_chunk(size: usize) -> usize {
    (5 << 20) / size.max(1)
}

fn preload(con: &mut Probe, n: usize, size: usize) {
    con.flush_all().expect("FLUSHALL");
    let message = message(size);
    let chunk = preload_chunk(size).clamp(1, 5000);
    let mut i = 0;
    while i < n {
        con.add_all(STREAM, entries(i, (i + chunk).min(n), &message))
            .expect("XADD");
        i += chunk;
    }
    con.create_group(STREAM, GROUP, "0", false)
        .expect("XGROUP CREATE");
}

/// Where redis-py lives for the Python contenders (installed from PyPI on first use).
fn python_path() -> Option<PathBuf> {
    let dir = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(".cache/streamworker/pylib");
    let works = |dir: &PathBuf| {
        Command::new("python3")
            .args(["-c", "import redis"])
            .env("PYTHONPATH", dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if works(&dir) {
        return Some(dir);
    }
    eprintln!(
        "installing redis-py for the Python contenders (pip install --target {})…",
        dir.display()
    );
    let _ = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "--target",
        ])
        .arg(&dir)
        .arg("redis")
        .status();
    works(&dir).then_some(dir)
}

struct Running {
    children: Vec<Child>,
    http: Option<String>,
    _files: tempfile::TempDir,
}

impl Running {
    fn pids(&self) -> Vec<u32> {
        self.children.iter().map(|c| c.id()).collect()
    }

    fn stop(mut self) {
        for child in &mut self.children {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for child in &mut self.children {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The drained group's batch size and concurrency, one-stream and scale-out alike: room
/// for four batches in flight, so that the loop keeps up to four reads queued at Redis
/// while the backlog is deep (`src/consumer/fetch.rs`, BENCHMARKS.md 2026-12-01).
pub(crate) const DRAIN_BATCH: usize = 512;
pub(crate) const DRAIN_CONCURRENCY: usize = 4 * DRAIN_BATCH;

/// [`DRAIN_BATCH`] and [`DRAIN_CONCURRENCY`] as lines of a group's table.
pub(crate) fn drain_settings() -> String {
    format!("batch_size = {DRAIN_BATCH}\nconcurrency = {DRAIN_CONCURRENCY}\n")
}

fn daemon_config(url: &str, consumer: &str, listen: &str) -> String {
    format!(
        r#"[redis]
url = "{url}"
[worker]
consumer = "{consumer}"
[http]
listen = "{listen}"
[telemetry]
log_format = "json"
[groups.{GROUP}]
stream = "{STREAM}"
handler = "noop"
{}"#,
        drain_settings()
    )
}

pub(crate) fn spawn_daemon(config: &std::path::Path) -> Child {
    let exe = std::env::current_exe().expect("the streamworker binary");
    Command::new(&exe)
        .arg("run")
        .arg("-c")
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("streamworker runs")
}

fn start(contender: &Contender, url: &str, python: Option<&PathBuf>) -> Running {
    let files = tempfile::tempdir().expect("temp dir");
    let exe = std::env::current_exe().expect("the streamworker binary");
    let mut children = Vec::new();
    let mut http = None;
    match contender {
        Contender::Streamworker { replicas } => {
            for r in 0..*replicas {
                let listen = format!("127.0.0.1:{}", free_port());
                let path = files.path().join(format!("replica-{r}.toml"));
                std::fs::write(&path, daemon_config(url, &format!("bench-{r}"), &listen))
                    .expect("config");
                if r == 0 {
                    http = Some(listen);
                }
                children.push(spawn_daemon(&path));
            }
        }
        Contender::RustLoop => children.push(
            Command::new(&exe)
                .args(["bench-contender", url, STREAM, GROUP, "rust-1"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("the contender runs"),
        ),
        Contender::PythonCareful | Contender::PythonNaive => {
            let (name, code) = match contender {
                Contender::PythonCareful => ("careful.py", include_str!("careful.py")),
                _ => ("naive.py", include_str!("naive.py")),
            };
            let script = files.path().join(name);
            std::fs::write(&script, code).expect("script");
            children.push(
                Command::new("python3")
                    .arg(&script)
                    .args([url, STREAM, GROUP, "py-1"])
                    .env("PYTHONPATH", python.expect("redis-py"))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("python3 runs"),
            );
        }
    }
    Running {
        children,
        http,
        _files: files,
    }
}

fn drain_once(
    contender: &Contender,
    (url, redis_pid): (&str, u32),
    con: &mut Probe,
    (n, size): (usize, usize),
    python: Option<&PathBuf>,
) -> Option<Drain> {
    preload(con, n, size);
    let cpu0 = redis_main_cpu(con);
    let mut busy0 = 0.0;
    let running = start(contender, url, python);
    let pids = running.pids();
    // Time from the first entry read to the last acknowledged; startup is not counted.
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut started: Option<Instant> = None;
    let finished = loop {
        let (read, pending, lag) = progress(con);
        let now = Instant::now();
        if started.is_none() && read > 0 {
            started = Some(now);
            busy0 = main_thread_cpu_seconds(redis_pid);
        }
        if lag == Some(0) && pending == 0 && read as usize >= n {
            break Some(now);
        }
        if now > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let busy1 = main_thread_cpu_seconds(redis_pid);
    let cpu1 = redis_main_cpu(con);
    let consumer_cpu: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum();
    let rss = pids.iter().map(|p| peak_rss_mb(*p)).fold(0.0, f64::max);
    running.stop();
    let (started, finished) = (started?, finished?);
    let secs = (finished - started).as_secs_f64().max(1e-6);
    Some(Drain {
        rate: n as f64 / secs,
        redis_us: (cpu1 - cpu0) * 1e6 / n as f64,
        busy: (busy1 - busy0) / secs,
        consumer_us: consumer_cpu * 1e6 / n as f64,
        rss_mb: rss,
    })
}

/// Quantile of a Prometheus histogram from its cumulative buckets, interpolating inside
/// the bucket as `histogram_quantile` does.
fn quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let total = buckets.last().map_or(0.0, |b| b.1);
    if total == 0.0 {
        return f64::NAN;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return prev.0;
            }
            let width = count - prev.1;
            let into = if width > 0.0 {
                (rank - prev.1) / width
            } else {
                0.0
            };
            return prev.0 + (le - prev.0) * into;
        }
        prev = (le, count);
    }
    prev.0
}

fn end_to_end_buckets(metrics: &str) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = metrics
        .lines()
        .filter(|l| l.starts_with("streamworker_end_to_end_seconds_bucket{"))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count = l.rsplit(' ').next()?.parse().ok()?;
            Some((le, count))
        })
        .collect();
    out.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal));
    out
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    );
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body
}

struct Steady {
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    produced: u64,
    idle_cpu_ms_per_s: f64,
}

fn steady(url: &str, con: &mut Probe, rate: u64, duration: Duration) -> Steady {
    con.flush_all().expect("FLUSHALL");
    con.create_group(STREAM, GROUP, "$", true).expect("XGROUP");
    let running = start(&Contender::Streamworker { replicas: 1 }, url, None);
    let http = running.http.clone().expect("metrics address");
    std::thread::sleep(Duration::from_secs(1));
    // Produce `rate` entries a second, in slices every millisecond.
    let started = Instant::now();
    let mut produced = 0u64;
    while started.elapsed() < duration {
        let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
        if due > produced {
            let entries = (produced..due).map(|_| {
                [
                    ("user_id", (produced % 1000).to_string()),
                    ("event_type", "click".to_owned()),
                ]
            });
            con.add_all(STREAM, entries).expect("XADD");
            produced = due;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && progress(con).1 > 0 {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let buckets = end_to_end_buckets(&http_get(&http, "/metrics"));
    // Idle: no traffic for a while.
    let pid = running.pids()[0];
    let cpu0 = cpu_seconds(pid);
    let idle = Duration::from_secs(5);
    std::thread::sleep(idle);
    let idle_cpu = cpu_seconds(pid) - cpu0;
    running.stop();
    Steady {
        p50_ms: quantile(&buckets, 0.5) * 1e3,
        p99_ms: quantile(&buckets, 0.99) * 1e3,
        p999_ms: quantile(&buckets, 0.999) * 1e3,
        produced,
        idle_cpu_ms_per_s: idle_cpu * 1e3 / idle.as_secs_f64(),
    }
}

/// Drains `n` entries of `size` bytes with every contender, `options.runs` times
/// interleaved (so a noisy moment hurts every contender alike); the medians.
fn drain_table(
    options: &Options,
    redis: (&str, u32),
    con: &mut Probe,
    (n, size): (usize, usize),
    contenders: &[Contender],
    python: Option<&PathBuf>,
) -> Vec<(Contender, Drain)> {
    let mut results: Vec<(Contender, Vec<Drain>)> =
        contenders.iter().map(|c| (c.clone(), Vec::new())).collect();
    for run in 0..options.runs {
        for (contender, drains) in &mut results {
            eprintln!(
                "run {}/{}: {} draining {n} entries of {size} bytes…",
                run + 1,
                options.runs,
                contender.name(),
            );
            if let Some(d) = drain_once(contender, redis, con, (n, size), python) {
                eprintln!(
                    "  {:.0} entries/s, Redis busy {:.0} %",
                    d.rate,
                    d.busy * 100.0
                );
                drains.push(d);
            }
        }
    }
    results
        .into_iter()
        .map(|(c, ds)| {
            let d = Drain {
                rate: median(ds.iter().map(|d| d.rate).collect()),
                redis_us: median(ds.iter().map(|d| d.redis_us).collect()),
                busy: median(ds.iter().map(|d| d.busy).collect()),
                consumer_us: median(ds.iter().map(|d| d.consumer_us).collect()),
                rss_mb: median(ds.iter().map(|d| d.rss_mb).collect()),
            };
            (c, d)
        })
        .collect()
}

/// The drain table of one entry size, in Markdown.
fn table(summary: &[(Contender, Drain)]) -> String {
    let baseline = summary
        .iter()
        .find(|(c, _)| *c == Contender::Streamworker { replicas: 1 })
        .map(|(_, d)| *d)
        .unwrap_or_default();
    let rust = summary
        .iter()
        .find(|(c, _)| *c == Contender::RustLoop)
        .map(|(_, d)| *d)
        .unwrap_or_default();
    let mut out = String::from(
        "| consumer | entries/s | streamworker (1 replica) ÷ this | Redis CPU µs/entry | ÷ hand-written Rust's | Redis busy | consumer CPU µs/entry | peak RSS MiB |\n",
    );
    out.push_str("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    for (c, d) in summary {
        out.push_str(&format!(
            "| {} | {:.0} | {} | {:.2} | {:.2}× | {:.0} % | {:.2} | {:.1} |\n",
            c.name(),
            d.rate,
            if *c == (Contender::Streamworker { replicas: 1 }) {
                "—".to_owned()
            } else {
                format!("{:.2}×", baseline.rate / d.rate)
            },
            d.redis_us,
            if rust.redis_us > 0.0 {
                d.redis_us / rust.redis_us
            } else {
                f64::NAN
            },
            d.busy * 100.0,
            d.consumer_us,
            d.rss_mb
        ));
    }
    out
}

/// Runs the benchmark and returns its report (Markdown).
pub fn run(options: &Options) -> Result<String, crate::tools::local_redis::LocalRedisError> {
    let redis = LocalRedis::start(&options.redis_server)?;
    let url = redis.url();
    let mut con = Probe::connect(&url, None)
        .map_err(|e| crate::tools::local_redis::LocalRedisError::Start(e.to_string()))?;
    let python = if options.python { python_path() } else { None };
    if options.python && python.is_none() {
        eprintln!("redis-py is not available: skipping the Python contenders");
    }
    let mut contenders: Vec<Contender> = options
        .replicas
        .iter()
        .map(|&replicas| Contender::Streamworker { replicas })
        .collect();
    contenders.push(Contender::RustLoop);
    if python.is_some() {
        contenders.push(Contender::PythonCareful);
        contenders.push(Contender::PythonNaive);
    }

    let mut out = format!(
        "Drain: pre-loaded entries of 4 fields, noop handler, batch_size {DRAIN_BATCH}, concurrency {DRAIN_CONCURRENCY}, reclaim and metrics on; median of {} runs, interleaved. One private redis-server on the same machine. Redis busy = its main thread's CPU time ÷ the drain's wall time.\n",
        options.runs
    );
    for &size in &options.entry_sizes {
        let n = entries_for(options.entries, size);
        let summary = drain_table(
            options,
            (&url, redis.pid()),
            &mut con,
            (n, size),
            &contenders,
            python.as_ref(),
        );
        out.push_str(&format!("\n{size}-byte entries, {n} of them:\n\n"));
        out.push_str(&table(&summary));
    }
    eprintln!(
        "steady state: {} entries/s for {:?}…",
        options.rate, options.duration
    );
    let s = steady(&url, &mut con, options.rate, options.duration);
    out.push_str(&format!(
        "\nSteady state: {} entries/s for {} s ({} entries), one replica: end-to-end (entry id time → XACK reply; ids have millisecond resolution, so add up to 1 ms) p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms. Idle afterwards: {:.2} ms of CPU per second.\n",
        options.rate,
        options.duration.as_secs(),
        s.produced,
        s.p50_ms,
        s.p99_ms,
        s.p999_ms,
        s.idle_cpu_ms_per_s
    ));
    drop(con);
    drop(redis);
    if !options.partitions.is_empty() {
        out.push_str(&cluster::run(options)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An entry of `--entry-size N` has N bytes of field names and values, give or take
    /// the event type's length (5 to 8 bytes).
    #[test]
    fn entries_have_the_size_asked_for() {
        for size in [100, 1024, 16384] {
            let message = message(size);
            for fields in entries(0, 8, &message) {
                let bytes: usize = fields.iter().map(|(k, v)| k.len() + v.len()).sum();
                assert!(bytes >= size && bytes <= size + 3, "{size}: {bytes}");
            }
        }
        assert_eq!(entries_for(200_000, 100), 200_000);
        assert_eq!(entries_for(200_000, 16384), 20_480);
    }
}
