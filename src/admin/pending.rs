//! `streamworker pending -c FILE --group G`: the group's pending entries, one row each, with
//! who holds them, for how long, after how many deliveries and, for a parked retry, when
//! it is due: what operators used to read off `XPENDING` by hand.
//!
//! A failed entry waits for its retry parked with the consumer `streamworker:backoff`, its
//! idle time set to `claim_idle − backoff` (see `consumer::fate`); any
//! replica's reclaim (XAUTOCLAIM with min-idle `claim_idle`, every `claim_interval`) takes
//! it once its idle time reaches `claim_idle`. So the retry is due `claim_idle − idle`
//! from now, at the latest one `claim_interval` after that.

use std::time::{Duration, SystemTime};

use crate::keys::BACKOFF_CONSUMER;
use serde::Serialize;

use crate::client::admin::PendingRow;
use crate::client::{Client, ClientError};
use crate::config::GroupConfig;

use super::{human, table};

/// What to list.
#[derive(Debug, Clone)]
pub struct Query {
    /// Only entries held by this consumer (`streamworker:backoff`: parked retries).
    pub consumer: Option<String>,
    /// Only entries idle for at least this long.
    pub min_idle: Option<Duration>,
    /// At most this many rows, oldest ids first.
    pub count: usize,
    pub json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PendingError {
    #[error(
        "stream {stream:?} has no consumer group {group:?} yet; `streamworker run` creates it when it starts"
    )]
    NoGroup { stream: String, group: String },
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// One row of the listing.
#[derive(Debug, Serialize)]
struct Row {
    id: String,
    consumer: String,
    idle_ms: u64,
    deliveries: u64,
    /// Parked for a retry (held by `streamworker:backoff`).
    parked: bool,
    /// For a parked entry: the earliest its retry is taken, from now.
    retry_due_in_ms: Option<u64>,
    /// For a parked entry: the latest (one `claim_interval` after the earliest).
    retry_due_by_ms: Option<u64>,
    /// For a parked entry: the earliest, as an RFC 3339 time.
    retry_due_at: Option<String>,
}

#[derive(Debug, Serialize)]
struct Consumer {
    name: String,
    pending: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    stream: String,
    group: String,
    /// Every pending entry of the group, whatever the filters.
    total: u64,
    consumers: Vec<Consumer>,
    entries: Vec<Row>,
}

fn row(r: PendingRow, claim_idle: Duration, claim_interval: Duration, now: SystemTime) -> Row {
    let parked = r.consumer == BACKOFF_CONSUMER;
    let due_in = parked.then(|| claim_idle.saturating_sub(r.idle));
    Row {
        parked,
        retry_due_in_ms: due_in.map(|d| d.as_millis() as u64),
        retry_due_by_ms: due_in.map(|d| (d + claim_interval).as_millis() as u64),
        retry_due_at: due_in.map(|d| humantime::format_rfc3339_millis(now + d).to_string()),
        id: r.id,
        consumer: r.consumer,
        idle_ms: r.idle.as_millis() as u64,
        deliveries: r.deliveries,
    }
}

pub async fn run(
    client: &Client,
    group: &GroupConfig,
    claim_interval: Duration,
    query: &Query,
) -> Result<String, PendingError> {
    let no_group = |e: ClientError| match e {
        ClientError::NoGroup(_) => PendingError::NoGroup {
            stream: group.stream.clone(),
            group: group.name.clone(),
        },
        other => other.into(),
    };
    let summary = client
        .pending_summary(&group.stream, &group.name)
        .await
        .map_err(no_group)?;
    let rows = client
        .pending_rows(
            &group.stream,
            &group.name,
            query.min_idle,
            query.count,
            query.consumer.as_deref(),
        )
        .await
        .map_err(no_group)?;
    let now = SystemTime::now();
    let report = Report {
        stream: group.stream.clone(),
        group: group.name.clone(),
        total: summary.total,
        consumers: summary
            .consumers
            .into_iter()
            .map(|(name, pending)| Consumer { name, pending })
            .collect(),
        entries: rows
            .into_iter()
            .map(|r| row(r, group.claim_idle, claim_interval, now))
            .collect(),
    };
    if query.json {
        return Ok(serde_json::to_string_pretty(&report).expect("serializes") + "\n");
    }
    Ok(render(&report, query))
}

fn render(report: &Report, query: &Query) -> String {
    let mut out = format!(
        "{} {}: {} pending",
        report.stream, report.group, report.total
    );
    if !report.consumers.is_empty() {
        let by: Vec<String> = report
            .consumers
            .iter()
            .map(|c| format!("{} {}", c.name, c.pending))
            .collect();
        out.push_str(&format!(" ({})", by.join(", ")));
    }
    out.push('\n');
    if report.entries.is_empty() {
        out.push_str("no pending entries match\n");
        return out;
    }
    let rows: Vec<Vec<String>> = report
        .entries
        .iter()
        .map(|r| {
            let due = match (r.retry_due_in_ms, r.retry_due_by_ms) {
                (Some(0), Some(by)) => {
                    format!("now (by {})", human(Duration::from_millis(by)))
                }
                (Some(from), Some(by)) => format!(
                    "in {} (by {})",
                    human(Duration::from_millis(from)),
                    human(Duration::from_millis(by))
                ),
                _ => "-".into(),
            };
            vec![
                r.id.clone(),
                r.consumer.clone(),
                human(Duration::from_millis(r.idle_ms)),
                r.deliveries.to_string(),
                due,
            ]
        })
        .collect();
    out.push_str(&table(
        &["ID", "CONSUMER", "IDLE", "DELIVERIES", "RETRY DUE"],
        &rows,
    ));
    if report.entries.len() == query.count {
        out.push_str(&format!(
            "(the oldest {} that match; --count to see more)\n",
            query.count
        ));
    }
    out
}
