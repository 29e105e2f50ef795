//! `streamworker dlq list|show|replay|purge -c FILE --group NAME`: inspect dead letters,
//! replay them to their origin stream (DESIGN §3), purge them. Replay and purge work one
//! dead letter at a time, each step atomic, so both are safe to interrupt and to repeat;
//! both stop at the dead-letter stream's last id as of their start.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use streamworker_handlers::{EntryId, one_line};

use crate::client::{Client, ClientError, StreamEntry};
use crate::config::GroupConfig;

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
        origin_id: field(fields, "dlq_origin_id"),
        deliveries: field(fields, "dlq_deliveries"),
        failed_at: field(fields, "dlq_failed_at"),
        consumer: field(fields, "dlq_consumer"),
        error: field(fields, "dlq_error"),
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

/// The dead letters `selection` names after `after`, up to `last` (no earlier than any
/// dead letter there was when the walk began), one page at a time, oldest first.
async fn select(
    client: &Client,
    dlq: &str,
    selection: &Selection,
    after: Option<&str>,
    last: &EntryId,
) -> Result<Vec<String>, ClientError> {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    let start = after.map_or_else(|| "-".to_owned(), |id| format!("({id}"));
    // Inclusive: the last dead letter there was is still selected.
    let snapshot = last.to_string();
    let (start, end) = match selection {
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
    };
    // Ids only: a page of dead letters may hold megabytes of fields.
    client.range_ids(dlq, &start, &end, PAGE).await
}

/// Walks the selected dead letters a page at a time, oldest first, and only those there
/// were when the walk began: a replay that fails again is dead-lettered again while the
/// walk is still going, and must not be picked up (a replay would chase its own output
/// for as long as the handler keeps failing).
struct Cursor<'a> {
    selection: &'a Selection,
    after: Option<String>,
    /// The highest id a dead letter there when the walk began can have; `None` until then.
    last: Option<EntryId>,
    done: bool,
}

impl<'a> Cursor<'a> {
    fn new(selection: &'a Selection) -> Self {
        Self {
            selection,
            after: None,
            last: None,
            done: false,
        }
    }

    async fn next_page(&mut self, client: &Client, dlq: &str) -> Result<Vec<String>, ClientError> {
        if self.done {
            return Ok(Vec::new());
        }
        if let Selection::Ids(ids) = self.selection {
            self.done = true;
            return Ok(ids.clone());
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
        let page = select(client, dlq, self.selection, self.after.as_deref(), &last).await?;
        match page.last() {
            Some(id) => self.after = Some(id.clone()),
            None => self.done = true,
        }
        Ok(page)
    }
}

/// Replays the selected dead letters to the group's stream, reporting each on `out`.
pub async fn replay(
    client: &Client,
    group: &GroupConfig,
    selection: &Selection,
    out: &mut dyn std::io::Write,
) -> Result<u64, ClientError> {
    let dlq = group.dead_letter_stream();
    let mut cursor = Cursor::new(selection);
    let mut replayed = 0;
    loop {
        let page = cursor.next_page(client, &dlq).await?;
        if page.is_empty() {
            return Ok(replayed);
        }
        for id in page {
            match client.replay(&dlq, &group.stream, &id, &group.name).await? {
                Some(new_id) => {
                    replayed += 1;
                    let _ = writeln!(out, "replayed {id} as {}/{new_id}", group.stream);
                }
                None => {
                    let _ = writeln!(out, "{id}: not in {dlq} (already replayed or purged)");
                }
            }
        }
    }
}

/// Deletes the selected dead letters.
pub async fn purge(
    client: &Client,
    group: &GroupConfig,
    selection: &Selection,
) -> Result<u64, ClientError> {
    let dlq = group.dead_letter_stream();
    let mut cursor = Cursor::new(selection);
    let mut purged = 0;
    loop {
        let page = cursor.next_page(client, &dlq).await?;
        if page.is_empty() {
            return Ok(purged);
        }
        purged += client.xdel(&dlq, &page).await?;
    }
}
