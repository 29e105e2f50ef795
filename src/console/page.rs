//! The console's HTML, from maud templates: every value goes through maud's escaping,
//! and the page carries no inline script or style (the CSP would refuse them anyway).

use std::time::{Duration, SystemTime};

use maud::{DOCTYPE, Markup, html};

use crate::admin;
use crate::inspect::{GroupReport, StreamReport, inspect};

use super::history::{SAMPLE_EVERY, Sample, WINDOW};
use super::{Console, ago, now_ms};

/// Pending entries shown per group (oldest first), as `streamworker pending --count`.
const PENDING_SHOWN: usize = 50;
/// Dead letters shown per group (oldest first), as `streamworker dlq list --count`.
const DEAD_SHOWN: usize = 20;

/// What one refresh of the page shows, read from Redis through the admin commands.
pub struct Snapshot {
    at: SystemTime,
    reports: Result<Vec<StreamReport>, String>,
    groups: Vec<GroupView>,
}

struct GroupView {
    name: String,
    stream: String,
    dead_letter_stream: String,
    /// `streamworker pending --json`.
    pending: Result<serde_json::Value, String>,
    dead: Result<Vec<DeadLetter>, String>,
    samples: Vec<Sample>,
}

struct DeadLetter {
    id: String,
    error: String,
    /// Every field, as `dlq show` prints them.
    fields: Vec<(String, String)>,
}

impl Snapshot {
    pub async fn gather(console: &Console) -> Snapshot {
        let at = SystemTime::now();
        let config = &console.inner.config;
        let client = match console.client().await {
            Ok(c) => c,
            Err(e) => {
                return Snapshot {
                    at,
                    reports: Err(format!("cannot use Redis: {e}")),
                    groups: Vec::new(),
                };
            }
        };
        let reports = inspect(client, config).await.map_err(|e| e.to_string());
        let mut groups = Vec::new();
        for group in config.groups.values() {
            let query = admin::pending::Query {
                consumer: None,
                min_idle: None,
                count: PENDING_SHOWN,
                json: true,
            };
            let pending = admin::pending::run(client, group, config.worker.claim_interval, &query)
                .await
                .map_err(|e| e.to_string())
                .and_then(|text| serde_json::from_str(&text).map_err(|e| e.to_string()));
            let dead = dead_letters(client, group).await;
            let samples = console
                .inner
                .history
                .lock()
                .expect("history lock")
                .samples(&group.stream, &group.name);
            groups.push(GroupView {
                name: group.name.clone(),
                stream: group.stream.clone(),
                dead_letter_stream: group.dead_letter_stream(),
                pending,
                dead,
                samples,
            });
        }
        Snapshot {
            at,
            reports,
            groups,
        }
    }
}

/// The oldest dead letters with their fields: `dlq list --json`, then `dlq show --json`
/// for each.
async fn dead_letters(
    client: &crate::client::Client,
    group: &crate::config::GroupConfig,
) -> Result<Vec<DeadLetter>, String> {
    let listed = admin::dlq::list(client, group, DEAD_SHOWN, true)
        .await
        .map_err(|e| e.to_string())?;
    let listed: serde_json::Value = serde_json::from_str(&listed).map_err(|e| e.to_string())?;
    let mut letters = Vec::new();
    for item in listed.as_array().into_iter().flatten() {
        let id = item["id"].as_str().unwrap_or_default().to_owned();
        let shown = admin::dlq::show(client, group, &id, true)
            .await
            .map_err(|e| e.to_string())?;
        // None: replayed or purged since the listing.
        let Some(shown) = shown else { continue };
        let shown: serde_json::Value = serde_json::from_str(&shown).map_err(|e| e.to_string())?;
        let fields = shown["fields"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        letters.push(DeadLetter {
            error: item["error"].as_str().unwrap_or_default().to_owned(),
            id,
            fields,
        });
    }
    Ok(letters)
}

/// The whole page.
pub fn full(console: &Console, snapshot: &Snapshot) -> String {
    let actions = console.actions();
    let consumer = console.inner.config.worker.consumer_name();
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "streamworker console" }
                link rel="stylesheet" href="/console/console.css";
                script src="/console/console.js" defer {}
            }
            body data-actions=(if actions { "on" } else { "off" }) {
                header {
                    h1 { "streamworker" }
                    span.replica { "replica " (consumer) }
                    @if actions {
                        label.token {
                            "Token "
                            input #token type="password" autocomplete="off" placeholder="http.console_token_file";
                        }
                    } @else {
                        span.readonly { "read-only (no http.console_token_file)" }
                    }
                    span #status role="status" {}
                }
                main #live { (live_markup(console, snapshot)) }
            }
        }
    }
    .into_string()
}

/// The part of the page the script replaces every few seconds.
pub fn live(console: &Console, snapshot: &Snapshot) -> String {
    live_markup(console, snapshot).into_string()
}

fn live_markup(console: &Console, snapshot: &Snapshot) -> Markup {
    let actions = console.actions();
    html! {
        p.updated { "as of " (humantime::format_rfc3339_seconds(snapshot.at)) }
        @match &snapshot.reports {
            Err(e) => p.error { (e) }
            Ok(reports) => (overview(console, reports, actions))
        }
        @for (i, g) in snapshot.groups.iter().enumerate() {
            (group_section(i, g, actions))
        }
    }
}

fn overview(console: &Console, reports: &[StreamReport], actions: bool) -> Markup {
    let history = console.inner.history.lock().expect("history lock");
    html! {
        table #groups {
            thead { tr {
                th { "group" } th { "stream" } th { "rate" } th { "lag" } th { "pending" }
                th { "oldest pending" } th { "retrying" } th { "dead letters" }
                th { "consumers" } th { "circuit" } th { "state" }
                @if actions { th { "actions" } }
            } }
            tbody {
                @for stream in reports {
                    @for g in &stream.groups {
                        (group_row(&stream.stream, g, history.rate(&stream.stream, &g.group), actions))
                    }
                }
            }
        }
    }
}

fn group_row(stream: &str, g: &GroupReport, rate: Option<f64>, actions: bool) -> Markup {
    let state = match (g.managed, g.paused) {
        (false, _) => "-",
        (true, true) => "paused",
        (true, false) => "running",
    };
    html! {
        tr data-group=(g.group) data-stream=(stream) {
            td.group { (g.group) @if !g.managed { " (not ours)" } }
            td.stream { (stream) }
            td.rate { (rate.map_or("-".into(), |r| format!("{r:.1}/s"))) }
            td.lag { (g.lag.map_or("?".into(), |l| l.to_string())) }
            td.pending { (g.pending) }
            td.oldest { (g.oldest_pending_seconds.map_or("-".into(), |s| admin::human(Duration::from_secs_f64(s)))) }
            td.retrying { (g.retrying) }
            td.dead { (g.dead_letter_length.map_or("-".into(), |l| l.to_string())) }
            td.consumers { (g.consumers.len()) }
            td.circuit { (if g.managed { g.circuit_summary() } else { "-".into() }) }
            td.state { (state) }
            @if actions {
                td.actions {
                    @if g.managed {
                        @if g.paused {
                            button type="button" data-action="resume" data-group=(g.group) { "resume" }
                        } @else {
                            button type="button" data-action="pause" data-group=(g.group) { "pause" }
                        }
                    }
                }
            }
        }
    }
}

fn group_section(i: usize, g: &GroupView, actions: bool) -> Markup {
    html! {
        section.group data-group=(g.name) {
            h2 { (g.name) span.on { " on " (g.stream) } }
            (chart(&g.samples))
            details #(format!("pending-{i}")) open {
                summary { "pending entries" }
                (pending_table(&g.pending))
            }
            details #(format!("dead-{i}")) open {
                summary { "dead letters in " (g.dead_letter_stream) }
                @match &g.dead {
                    Err(e) => p.error { (e) }
                    Ok(letters) if letters.is_empty() => p.empty { "none" }
                    Ok(letters) => {
                        @if actions {
                            p.bulk {
                                button type="button" data-action="replay" data-group=(g.name) data-selection="1" { "replay selected" }
                                " "
                                button type="button" data-action="purge" data-group=(g.name) data-selection="1" { "purge selected" }
                            }
                        }
                        @for letter in letters {
                            (dead_letter(&g.name, letter, actions))
                        }
                    }
                }
            }
        }
    }
}

fn dead_letter(group: &str, letter: &DeadLetter, actions: bool) -> Markup {
    html! {
        article.letter data-id=(letter.id) {
            h3 {
                @if actions {
                    input.pick type="checkbox" data-group=(group) data-id=(letter.id) data-key=(format!("{group}/{}", letter.id)) aria-label="select";
                    " "
                }
                code.id { (letter.id) }
                @if actions {
                    " "
                    button type="button" data-action="replay" data-group=(group) data-id=(letter.id) { "replay" }
                    " "
                    button type="button" data-action="purge" data-group=(group) data-id=(letter.id) { "purge" }
                }
            }
            p.dlq-error { "dlq_error: " span.text { (letter.error) } }
            table.fields {
                @for (k, v) in &letter.fields {
                    tr { th { (k) } td { (v) } }
                }
            }
        }
    }
}

fn pending_table(pending: &Result<serde_json::Value, String>) -> Markup {
    let report = match pending {
        Err(e) => return html! { p.error { (e) } },
        Ok(r) => r,
    };
    let entries = report["entries"].as_array().cloned().unwrap_or_default();
    let total = report["total"].as_u64().unwrap_or(0);
    let ms = |v: &serde_json::Value| admin::human(Duration::from_millis(v.as_u64().unwrap_or(0)));
    html! {
        p.total {
            (total) " pending"
            @for c in report["consumers"].as_array().into_iter().flatten() {
                " · " (c["name"].as_str().unwrap_or_default()) " " (c["pending"].as_u64().unwrap_or(0))
            }
            @if entries.len() < total as usize { " (the oldest " (entries.len()) " shown)" }
        }
        @if !entries.is_empty() {
            table.pending {
                thead { tr { th { "id" } th { "consumer" } th { "idle" } th { "deliveries" } th { "retry due" } } }
                tbody {
                    @for e in &entries {
                        tr {
                            td { code { (e["id"].as_str().unwrap_or_default()) } }
                            td { (e["consumer"].as_str().unwrap_or_default()) }
                            td { (ms(&e["idle_ms"])) }
                            td { (e["deliveries"].as_u64().unwrap_or(0)) }
                            td {
                                @match (e["retry_due_in_ms"].as_u64(), e["retry_due_by_ms"].as_u64()) {
                                    (Some(0), Some(by)) => { "now (by " (ms(&by.into())) ")" }
                                    (Some(from), Some(by)) => { "in " (ms(&from.into())) " (by " (ms(&by.into())) ")" }
                                    _ => "-"
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Rate and lag over the last hour as two lines, each scaled to its own maximum.
fn chart(samples: &[Sample]) -> Markup {
    const W: f64 = 720.0;
    const H: f64 = 80.0;
    let now = now_ms();
    let window = WINDOW.as_millis() as f64;
    let x = |at: u64| W - (now.saturating_sub(at) as f64 / window * W).min(W);
    let line = |values: Vec<(u64, f64)>| -> (String, f64) {
        let max = values.iter().map(|(_, v)| *v).fold(0.0, f64::max);
        let points = values
            .iter()
            .map(|(at, v)| {
                let y = if max > 0.0 {
                    H - v / max * (H - 4.0) - 2.0
                } else {
                    H - 2.0
                };
                format!("{:.1},{:.1}", x(*at), y)
            })
            .collect::<Vec<_>>()
            .join(" ");
        (points, max)
    };
    let (lag, lag_max) = line(
        samples
            .iter()
            .filter_map(|s| s.lag.map(|l| (s.at_ms, l as f64)))
            .collect(),
    );
    let (rate, rate_max) = line(
        samples
            .iter()
            .filter_map(|s| s.rate.map(|r| (s.at_ms, r)))
            .collect(),
    );
    html! {
        figure.chart {
            svg viewBox=(format!("0 0 {W} {H}")) preserveAspectRatio="none" role="img" aria-label="rate and lag over the last hour" {
                polyline.rate points=(rate) {}
                polyline.lag points=(lag) {}
            }
            figcaption {
                span.rate-key { "rate" } " (max " (format!("{rate_max:.1}")) "/s) · "
                span.lag-key { "lag" } " (max " (lag_max) ") · the last hour, one sample every "
                (admin::human(SAMPLE_EVERY))
                @if let Some(first) = samples.first() { ", since " (ago(first.at_ms)) " ago" }
            }
        }
    }
}
