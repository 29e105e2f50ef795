//! `streamworker dlq list|show|replay|purge -c FILE --group NAME`: inspect dead letters,
//! replay them to their origin stream (DESIGN §3), purge them. Replay and purge work one
//! dead letter at a time, each step atomic, so both are safe to interrupt and to repeat;
//! both stop at the dead-letter stream's last id as of their start.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use streamworker_handlers::{EntryId, one_line};

use crate::client::{Client, ClientError, StreamEntry};
use crate::config::GroupConfig;
use crate::dead_letter;

use super::{field, table};

/// Which dead letters a replay or purge applies to.
#[derive(Debug, Clone)]
pub enum Selection {
    All,
    Ids(Vec<String>),
    /// Dead-lettered within this long.
    Since(Duration),
    /// Dead-lettered longer ago than this.
    Before(Duration),
}

const PAGE: usize = 100;

#[derive(Debug, Serialize)]
struct Listed {
    id: String,
    origin_id: String,
    deliveries: String,
    failed_at: String,
    consumer: String,
    error: String,
}

fn listed(entry: &StreamEntry) -> Listed {
    let (id, fields) = entry;
    Listed {
        id: id.clone(),
        origin_id: field(fields, dead_letter::ORIGIN_ID),
        deliveries: field(fields, dead_letter::DELIVERIES),
        failed_at: field(fields, dead_letter::FAILED_AT),
        consumer: field(fields, dead_letter::CONSUMER),
        error: field(fields, dead_letter::ERROR),
    }
}

pub async fn list(
    client: &Client,
    group: &GroupConfig,
    count: usize,
    json: bool,
) -> Result<String, ClientError> {
    let dlq = group.dead_letter_stream();
    let entries = client.range(&dlq, "-", "+", count, false).await?;
    let total = client.xlen(&dlq).await?;
    let items: Vec<Listed> = entries.iter().map(listed).collect();
    if json {
        return Ok(serde_json::to_string_pretty(&items).expect("serializes") + "\n");
    }
    if items.is_empty() {
        return Ok(format!("{dlq} is empty\n"));
    }
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|l| {
            let mut error = one_line(&l.error);
            if error.chars().count() > 100 {
                error = error.chars().take(99).collect::<String>() + "…";
            }
            vec![
                l.id.clone(),
                l.origin_id.clone(),
                l.deliveries.clone(),
                l.failed_at.clone(),
                error,
            ]
        })
        .collect();
    let mut out = format!(
        "{dlq}: {total} dead letter{}",
        if total == 1 { "" } else { "s" }
    );
    if total as usize > items.len() {
        out.push_str(&format!(
            " (oldest {} shown; --count to see more)",
            items.len()
        ));
    }
    out.push('\n');
    out.push_str(&table(
        &["ID", "ORIGIN ID", "DELIVERIES", "FAILED AT", "ERROR"],
        &rows,
    ));
    Ok(out)
}

pub async fn show(
    client: &Client,
    group: &GroupConfig,
    id: &str,
    json: bool,
) -> Result<Option<String>, ClientError> {
    let dlq = group.dead_letter_stream();
    let entries = client.range(&dlq, id, id, 1, false).await?;
    let Some((id, fields)) = entries.into_iter().next() else {
        return Ok(None);
    };
    if json {
        let map: serde_json::Map<String, serde_json::Value> = fields
            .iter()
            .map(|(k, v)| {
                (
                    String::from_utf8_lossy(k).into_owned(),
                    serde_json::Value::String(String::from_utf8_lossy(v).into_owned()),
                )
            })
            .collect();
        let value = serde_json::json!({"id": id, "fields": map});
        return Ok(Some(
            serde_json::to_string_pretty(&value).expect("serializes") + "\n",
        ));
    }
    let mut out = format!("{dlq} {id}\n");
    for (k, v) in &fields {
        out.push_str(&format!(
            "  {} = {}\n",
            String::from_utf8_lossy(k),
            String::from_utf8_lossy(v)
        ));
    }
    Ok(Some(out))
}

/// The bounds of the next page of the dead letters `selection` names after `after`, up
/// to `last` (no earlier than any dead letter there was when the walk began), oldest first.
fn bounds(selection: &Selection, after: Option<&str>, last: &EntryId) -> (String, String) {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    let start = after.map_or_else(|| "-".to_owned(), |id| format!("({id}"));
    // Inclusive: the last dead letter there was is still selected.
    let snapshot = last.to_string();
    match selection {
        Selection::All => (start, snapshot),
        Selection::Since(d) => {
            let from = format!("{}-0", now_ms.saturating_sub(d.as_millis() as u64));
            (if after.is_some() { start } else { from }, snapshot)
        }
        Selection::Before(d) => {
            let before = EntryId::new(now_ms.saturating_sub(d.as_millis() as u64), 0);
            // Whichever comes first: the age bound (exclusive) or the snapshot.
            let end = if before <= *last {
                format!("({before}")
            } else {
                snapshot
            };
            (start, end)
        }
        Selection::Ids(_) => unreachable!("ids are not paged"),
    }
}

/// The fields of a dead letter `dlq replay --dry-run` and `--error` look at; a page reads
/// these only (a page of dead letters may hold megabytes of other fields).
const SUMMARY_FIELDS: [&str; 3] = [
    dead_letter::ORIGIN_ID,
    dead_letter::DELIVERIES,
    dead_letter::ERROR,
];

/// A selected dead letter; `summary` holds [`SUMMARY_FIELDS`] when the walk reads them.
struct Letter {
    id: String,
    /// `None`: not read, or (for `--id`) not in the dead-letter stream.
    summary: Option<Vec<Option<String>>>,
}

/// Walks the selected dead letters a page at a time, oldest first, and only those there
/// were when the walk began: a replay that fails again is dead-lettered again while the
/// walk is still going, and must not be picked up (a replay would chase its own output
/// for as long as the handler keeps failing).
struct Cursor<'a> {
    selection: &'a Selection,
    /// Whether pages carry [`SUMMARY_FIELDS`] (otherwise ids only).
    summaries: bool,
    after: Option<String>,
    /// The highest id a dead letter there when the walk began can have; `None` until then.
    last: Option<EntryId>,
    done: bool,
}

impl<'a> Cursor<'a> {
    fn new(selection: &'a Selection, summaries: bool) -> Self {
        Self {
            selection,
            summaries,
            after: None,
            last: None,
            done: false,
        }
    }

    async fn next_page(&mut self, client: &Client, dlq: &str) -> Result<Vec<Letter>, ClientError> {
        if self.done {
            return Ok(Vec::new());
        }
        if let Selection::Ids(ids) = self.selection {
            self.done = true;
            let mut letters = Vec::with_capacity(ids.len());
            for id in ids {
                let summary = if self.summaries {
                    client
                        .range_fields(dlq, id, id, 1, &SUMMARY_FIELDS)
                        .await?
                        .pop()
                        .map(|(_, values)| values)
                } else {
                    None
                };
                letters.push(Letter {
                    id: id.clone(),
                    summary,
                });
            }
            return Ok(letters);
        }
        let last = match self.last {
            Some(last) => last,
            None => {
                // Dead letters are added with `*` ids, taken from the server's clock: every
                // one added after this millisecond has a later id, and every one there is has
                // an id no later (unless the server's clock went back). TIME is in the
                // documented ACL; XREVRANGE (the stream's last id) is not.
                let now = client.time_ms().await?;
                let last = EntryId::new(now, u64::MAX);
                self.last = Some(last);
                last
            }
        };
        let (start, end) = bounds(self.selection, self.after.as_deref(), &last);
        let page: Vec<Letter> = if self.summaries {
            client
                .range_fields(dlq, &start, &end, PAGE, &SUMMARY_FIELDS)
                .await?
                .into_iter()
                .map(|(id, values)| Letter {
                    id,
                    summary: Some(values),
                })
                .collect()
        } else {
            // Ids only: a page of dead letters may hold megabytes of fields.
            client
                .range_ids(dlq, &start, &end, PAGE)
                .await?
                .into_iter()
                .map(|id| Letter { id, summary: None })
                .collect()
        };
        match page.last() {
            Some(letter) => self.after = Some(letter.id.clone()),
            None => self.done = true,
        }
        Ok(page)
    }
}

/// How to replay.
#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    /// List what would be replayed; change nothing.
    pub dry_run: bool,
    /// At most this many replays a second.
    pub rate: Option<f64>,
    /// Only dead letters whose `dlq_error` contains this.
    pub error: Option<String>,
    /// One JSON document at the end instead of a line per dead letter.
    pub json: bool,
    /// Keep a progress line on stderr (a terminal).
    pub progress: bool,
}

/// One dead letter a replay took (or would take).
#[derive(Debug, Serialize)]
pub struct Replayed {
    pub id: String,
    /// Its id in the origin stream; `None` in a dry run.
    pub new_id: Option<String>,
    pub origin_id: Option<String>,
    pub deliveries: Option<String>,
    pub error: Option<String>,
}

/// What a replay did.
#[derive(Debug, Default, Serialize)]
pub struct ReplayReport {
    pub dead_letter_stream: String,
    pub stream: String,
    pub dry_run: bool,
    /// Replayed (or, in a dry run, would be).
    pub replayed: u64,
    /// Selected but left alone because their `dlq_error` does not match `--error`.
    pub not_matching: u64,
    /// Ids given with `--id` that are not in the dead-letter stream.
    pub missing: Vec<String>,
    /// Each dead letter replayed, with `--json` only.
    pub entries: Vec<Replayed>,
}

/// The progress line on a terminal: redrawn at most every 100 ms, cleared at the end.
struct Progress {
    on: bool,
    started: Instant,
    drawn: Option<Instant>,
}

impl Progress {
    fn draw(&mut self, report: &ReplayReport, force: bool) {
        if !self.on
            || (!force
                && self
                    .drawn
                    .is_some_and(|t| t.elapsed() < Duration::from_millis(100)))
        {
            return;
        }
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        eprint!(
            "\r\x1b[2K{} {} dead letters to {} ({:.1}/s), {} not matching, {} missing",
            if report.dry_run { "listed" } else { "replayed" },
            report.replayed,
            report.stream,
            report.replayed as f64 / secs,
            report.not_matching,
            report.missing.len()
        );
        self.drawn = Some(Instant::now());
    }

    /// Clears the line (before other output, and at the end).
    fn clear(&mut self) {
        if self.on && self.drawn.take().is_some() {
            eprint!("\r\x1b[2K");
        }
    }
}

/// Replays the selected dead letters to the group's stream, reporting each on `out`
/// (unless `options.json`).
pub async fn replay(
    client: &Client,
    group: &GroupConfig,
    selection: &Selection,
    options: &ReplayOptions,
    out: &mut (dyn std::io::Write + Send),
) -> Result<ReplayReport, ClientError> {
    let dlq = group.dead_letter_stream();
    let mut cursor = Cursor::new(selection, options.dry_run || options.error.is_some());
    let mut report = ReplayReport {
        dead_letter_stream: dlq.clone(),
        stream: group.stream.clone(),
        dry_run: options.dry_run,
        ..ReplayReport::default()
    };
    let mut progress = Progress {
        on: options.progress,
        started: Instant::now(),
        drawn: None,
    };
    // Replay k (from 0) starts no earlier than k / rate after the first.
    let pace = options
        .rate
        .filter(|r| *r > 0.0)
        .map(|r| Duration::from_secs_f64(1.0 / r));
    let mut paced: u32 = 0;
    let mut line = |progress: &mut Progress, text: String| {
        if !options.json {
            progress.clear();
            let _ = writeln!(out, "{text}");
        }
    };
    loop {
        let page = cursor.next_page(client, &dlq).await?;
        if page.is_empty() {
            progress.clear();
            return Ok(report);
        }
        for letter in page {
            let summary = match &letter.summary {
                Some(values) => Some(values),
                // Read but absent: an --id that is not there.
                None if cursor.summaries => {
                    line(
                        &mut progress,
                        format!("{}: not in {dlq} (already replayed or purged)", letter.id),
                    );
                    report.missing.push(letter.id);
                    continue;
                }
                None => None,
            };
            let value = |i: usize| summary.and_then(|v| v.get(i).cloned().flatten());
            let (origin_id, deliveries, error) = (value(0), value(1), value(2));
            if let Some(wanted) = &options.error
                && !error
                    .as_deref()
                    .is_some_and(|e| e.contains(wanted.as_str()))
            {
                report.not_matching += 1;
                continue;
            }
            if options.dry_run {
                report.replayed += 1;
                line(
                    &mut progress,
                    format!(
                        "would replay {} (origin {}, {} deliveries): {}",
                        letter.id,
                        origin_id.as_deref().unwrap_or("?"),
                        deliveries.as_deref().unwrap_or("?"),
                        one_line(error.as_deref().unwrap_or(""))
                    ),
                );
                if options.json {
                    report.entries.push(Replayed {
                        id: letter.id,
                        new_id: None,
                        origin_id,
                        deliveries,
                        error,
                    });
                }
                progress.draw(&report, false);
                continue;
            }
            if let Some(pace) = pace {
                tokio::time::sleep_until((progress.started + pace * paced).into()).await;
                paced += 1;
            }
            match client
                .replay(&dlq, &group.stream, &letter.id, &group.name)
                .await?
            {
                Some(new_id) => {
                    report.replayed += 1;
                    line(
                        &mut progress,
                        format!("replayed {} as {}/{new_id}", letter.id, group.stream),
                    );
                    if options.json {
                        report.entries.push(Replayed {
                            id: letter.id,
                            new_id: Some(new_id),
                            origin_id,
                            deliveries,
                            error,
                        });
                    }
                }
                None => {
                    line(
                        &mut progress,
                        format!("{}: not in {dlq} (already replayed or purged)", letter.id),
                    );
                    report.missing.push(letter.id);
                }
            }
            progress.draw(&report, false);
        }
        progress.draw(&report, true);
    }
}

/// Deletes the selected dead letters.
pub async fn purge(
    client: &Client,
    group: &GroupConfig,
    selection: &Selection,
) -> Result<u64, ClientError> {
    let dlq = group.dead_letter_stream();
    let mut cursor = Cursor::new(selection, false);
    let mut purged = 0;
    loop {
        let page = cursor.next_page(client, &dlq).await?;
        if page.is_empty() {
            return Ok(purged);
        }
        let ids: Vec<String> = page.into_iter().map(|letter| letter.id).collect();
        purged += client.xdel(&dlq, &ids).await?;
    }
}
