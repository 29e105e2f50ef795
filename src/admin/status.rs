//! `streamworker status -c FILE [--json] [--watch [--interval 2s]]`: per stream and group,
//! what Redis says; with `--watch`, again every interval until stopped.

use std::future::Future;
use std::io::Write;
use std::time::{Duration, SystemTime};

use crate::client::{Client, ClientError};
use crate::config::Config;
use crate::inspect::{StreamReport, inspect};

use super::{human, table};

pub async fn run(client: &Client, config: &Config, json: bool) -> Result<String, ClientError> {
    let reports = inspect(client, config).await?;
    if json {
        return Ok(serde_json::to_string_pretty(&reports).expect("reports serialize") + "\n");
    }
    Ok(render(&reports))
}

/// How `status --watch` shows each refresh.
#[derive(Debug, Clone)]
pub struct Watch {
    /// One JSON document per line and interval (JSON Lines), for `jq` and scripts.
    pub json: bool,
    pub interval: Duration,
    /// Redraw in place (clear the screen first); off a terminal, frames follow each other.
    pub terminal: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot write the status: {0}")]
    Output(#[from] std::io::Error),
}

/// Shows the status every `options.interval` until `stop` completes; returns how many
/// refreshes it showed. A Redis error does not end the watch (Redis may be restarting,
/// which is when people watch): it is shown in place of that refresh, and the next one
/// tries again. A closed output (`| head`) ends it quietly.
pub async fn watch(
    client: &Client,
    config: &Config,
    options: &Watch,
    stop: impl Future<Output = ()>,
    out: &mut impl Write,
) -> Result<u64, WatchError> {
    let mut ticks = tokio::time::interval(options.interval);
    // A slow refresh (Redis far away or busy) delays the next one instead of bunching them.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    let mut shown = 0;
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(shown),
            _ = ticks.tick() => {}
        }
        let reports = tokio::select! {
            _ = &mut stop => return Ok(shown),
            r = inspect(client, config) => r,
        };
        // In JSON, stdout carries only status documents; an error goes to stderr.
        if let (Err(e), true) = (&reports, options.json) {
            eprintln!("error: {e} (trying again in {})", human(options.interval));
            continue;
        }
        let frame = frame(&reports, options);
        match out.write_all(frame.as_bytes()).and_then(|()| out.flush()) {
            Ok(()) => shown += 1,
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(shown),
            Err(e) => return Err(e.into()),
        }
    }
}

/// One refresh of `--watch`.
fn frame(reports: &Result<Vec<StreamReport>, ClientError>, options: &Watch) -> String {
    if let (Ok(reports), true) = (reports, options.json) {
        return serde_json::to_string(reports).expect("reports serialize") + "\n";
    }
    let mut text = String::new();
    if options.terminal {
        // Clear the screen and go home: the refresh replaces the last one.
        text.push_str("\x1b[2J\x1b[H");
    }
    text.push_str(&format!(
        "every {}  {}  (Ctrl-C stops)\n\n",
        human(options.interval),
        humantime::format_rfc3339_seconds(SystemTime::now())
    ));
    match reports {
        Ok(reports) => text.push_str(&render(reports)),
        Err(e) => text.push_str(&format!(
            "error: {e}\n(trying again in {})\n\n",
            human(options.interval)
        )),
    }
    text
}

pub fn render(reports: &[StreamReport]) -> String {
    let mut out = String::new();
    for stream in reports {
        out.push_str(&format!(
            "stream {}  length {}\n",
            stream.stream, stream.length
        ));
        if stream.groups.is_empty() {
            out.push_str("  (no consumer groups yet)\n\n");
            continue;
        }
        let rows: Vec<Vec<String>> = stream
            .groups
            .iter()
            .map(|g| {
                vec![
                    format!("{}{}", g.group, if g.managed { "" } else { " (not ours)" }),
                    g.lag.map_or("?".into(), |l| l.to_string()),
                    g.pending.to_string(),
                    g.oldest_pending_seconds
                        .map_or("-".into(), |s| human(Duration::from_secs_f64(s))),
                    g.retrying.to_string(),
                    g.dead_letter_length.map_or("-".into(), |l| l.to_string()),
                    g.consumers.len().to_string(),
                    if g.managed {
                        g.circuit_summary()
                    } else {
                        "-".into()
                    },
                    match (g.managed, g.paused) {
                        (false, _) => "-".into(),
                        (true, true) => "paused".into(),
                        (true, false) => "running".into(),
                    },
                ]
            })
            .collect();
        let text = table(
            &[
                "GROUP",
                "LAG",
                "PENDING",
                "OLDEST PENDING",
                "RETRYING",
                "DEAD LETTERS",
                "CONSUMERS",
                "CIRCUIT",
                "STATE",
            ],
            &rows,
        );
        for line in text.lines() {
            out.push_str("  ");
            out.push_str(line);
            out.push('\n');
        }
        for g in &stream.groups {
            if let Some(p) = &g.partition {
                out.push_str(&format!(
                    "  {}: partition {} of {} of stream {}, owner {}\n",
                    g.group,
                    p.partition,
                    p.partitions,
                    p.stream,
                    p.owner.as_deref().unwrap_or("none (free)")
                ));
            }
        }
        for g in &stream.groups {
            if g.consumers.is_empty() {
                continue;
            }
            out.push_str(&format!("  consumers of {}:\n", g.group));
            let rows: Vec<Vec<String>> = g
                .consumers
                .iter()
                .map(|c| {
                    vec![
                        c.name.clone(),
                        c.pending.to_string(),
                        human(Duration::from_millis(c.idle_ms)),
                    ]
                })
                .collect();
            for line in table(&["CONSUMER", "PENDING", "IDLE"], &rows).lines() {
                out.push_str("    ");
                out.push_str(line);
                out.push('\n');
            }
        }
        out.push('\n');
    }
    out
}
