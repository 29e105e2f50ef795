//! The PostgreSQL sink: one transaction per batch into a table keyed by `(stream, id)`.
//!
//! The table is created if missing:
//!
//! ```sql
//! CREATE TABLE IF NOT EXISTS streamworker_events (
//!     stream      text        NOT NULL,
//!     id          text        NOT NULL,  -- the entry id, `<ms>-<seq>` (the original id of a replay)
//!     "time"      timestamptz NOT NULL,  -- from the id
//!     event_type  text,
//!     payload     jsonb       NOT NULL,  -- the fields as an object, or the JSON document
//!     inserted_at timestamptz NOT NULL DEFAULT now(),
//!     PRIMARY KEY (stream, id)
//! )
//! ```
//!
//! A batch is one `INSERT … SELECT … FROM unnest($arrays) ON CONFLICT DO NOTHING RETURNING
//! id` in one transaction: a redelivered entry meets its own row and inserts nothing (it is
//! reported as a dropped duplicate), so a crash anywhere — before, during or after the
//! commit — never makes a second row.
//!
//! Failures:
//! - the server unreachable, the connection lost, any error but a data error → the whole
//!   batch is retried; the connection is dropped and a new one made for the next batch;
//! - a data error (SQLSTATE class 22, e.g. a `\u0000` that jsonb cannot store, or 54) → the
//!   batch is redone row by row under savepoints in one transaction: the rows PostgreSQL
//!   refuses fail permanently (dead-lettered), every other row is stored.
//!
//! Connections are made **without TLS** (`NoTls`): run the sink on a private network or
//! behind a local TLS-terminating proxy. `sslmode=require` is refused by `check`.
//! Connections are pooled per group and replica: one per batch in flight, made on demand.

use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Config, NoTls, Statement};

use super::{Context, PayloadJson, Recorder, WarehouseOptions};
use crate::{Effects, Entry, EntryId, HandlerError};

/// Idle connections kept for the next batches.
const IDLE_CONNECTIONS: usize = 4;

pub struct PostgresSink {
    config: Config,
    /// For logs: the URL without its password.
    display: String,
    table: String,
    stream: String,
    recorder: Recorder,
    idle: Mutex<Vec<Connection>>,
    /// The last connection attempt failed (so a recovery is logged once).
    failing: std::sync::atomic::AtomicBool,
}

struct Connection {
    client: Client,
    insert: Statement,
}

/// One row to insert.
struct Row {
    id: String,
    time: SystemTime,
    event_type: Option<String>,
    payload: String,
}

/// Why a batch could not be stored.
enum Failure {
    /// Nothing was stored; retry every entry.
    Batch(String),
    /// The data of some row was refused.
    Data(String),
}

/// Parses a connection string the way the sink will use it.
pub(crate) fn parse_url(url: &str) -> Result<Config, String> {
    let config =
        Config::from_str(url).map_err(|e| format!("not a PostgreSQL connection string: {e}"))?;
    if config.get_ssl_mode() == SslMode::Require {
        return Err(
            "sslmode=require: this build connects without TLS; use sslmode=disable or prefer, over a private network or a local TLS proxy".into(),
        );
    }
    Ok(config)
}

/// Hides the password of a `postgres://user:password@…` URL, of a `password=` query
/// parameter, or of a `password=…` key in the `key=value` form.
pub fn redact_url(url: &str) -> String {
    const REDACTED: &str = super::REDACTED;
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        // user:password@ sits between the scheme and the first '/', '?' after it.
        let scheme_end = url.find("://").map_or(0, |i| i + 3);
        let rest = &url[scheme_end..];
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let authority = &rest[..authority_end];
        let mut out = url[..scheme_end].to_owned();
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                match userinfo.find(':') {
                    Some(colon) => {
                        out.push_str(&userinfo[..colon]);
                        out.push(':');
                        out.push_str(REDACTED);
                    }
                    None => out.push_str(userinfo),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        let tail = &rest[authority_end..];
        match tail.split_once('?') {
            Some((path, query)) => {
                out.push_str(path);
                out.push('?');
                let params: Vec<String> = query
                    .split('&')
                    .map(|p| match p.split_once('=') {
                        Some((k, _)) if k.eq_ignore_ascii_case("password") => {
                            format!("{k}={REDACTED}")
                        }
                        _ => p.to_owned(),
                    })
                    .collect();
                out.push_str(&params.join("&"));
            }
            None => out.push_str(tail),
        }
        return out;
    }
    // key=value form: find `password`, optional spaces, `=`, then a quoted or bare value.
    let mut out = String::with_capacity(url.len());
    let mut rest = url;
    while let Some(i) = rest.find("password") {
        let (before, from) = rest.split_at(i);
        out.push_str(before);
        let after_key = &from["password".len()..];
        let trimmed = after_key.trim_start();
        let at_word_start = before.is_empty() || before.ends_with(char::is_whitespace);
        if !at_word_start || !trimmed.starts_with('=') {
            out.push_str("password");
            rest = after_key;
            continue;
        }
        let value = trimmed[1..].trim_start();
        let value_len = if let Some(quoted) = value.strip_prefix('\'') {
            let mut end = quoted.len();
            let mut escaped = false;
            for (j, c) in quoted.char_indices() {
                match c {
                    '\\' if !escaped => escaped = true,
                    '\'' if !escaped => {
                        end = j + 1;
                        break;
                    }
                    _ => escaped = false,
                }
            }
            1 + end
        } else {
            value.find(char::is_whitespace).unwrap_or(value.len())
        };
        out.push_str("password=");
        out.push_str(REDACTED);
        rest = &value[value_len.min(value.len())..];
    }
    out.push_str(rest);
    out
}

/// `table` or `schema.table`, each part a lower-case identifier of at most 63 bytes (so it
/// needs no quoting and means the same to every tool).
pub(crate) fn check_table_name(table: &str) -> Result<(), String> {
    let parts: Vec<&str> = table.split('.').collect();
    let ok = parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.len() <= 63
                && p.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                && p.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        });
    if ok {
        Ok(())
    } else {
        Err("must be a lower-case identifier (letters, digits, _), optionally schema-qualified: e.g. \"streamworker_events\" or \"analytics.llm_events\"".into())
    }
}

fn create_table_sql(table: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {table} (
            stream      text        NOT NULL,
            id          text        NOT NULL,
            \"time\"      timestamptz NOT NULL,
            event_type  text,
            payload     jsonb       NOT NULL,
            inserted_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (stream, id)
        )"
    )
}

fn insert_sql(table: &str) -> String {
    format!(
        "INSERT INTO {table} (stream, id, \"time\", event_type, payload)
         SELECT $1::text, r.id, r.t, r.e, r.p::jsonb
         FROM unnest($2::text[], $3::timestamptz[], $4::text[], $5::text[]) AS r(id, t, e, p)
         ON CONFLICT (stream, id) DO NOTHING
         RETURNING id"
    )
}

/// Errors in the data of a row: retrying cannot help, but the other rows can be stored.
fn is_data_error(e: &tokio_postgres::Error) -> bool {
    e.code()
        .is_some_and(|c| c.code().starts_with("22") || c.code().starts_with("54"))
}

/// One line, with the SQLSTATE when the server sent one.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut text = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                text.push_str(": ");
                text.push_str(detail);
            }
            text
        }
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(cause) = source {
                let cause = cause.to_string();
                if !text.contains(&cause) {
                    text.push_str(": ");
                    text.push_str(&cause);
                }
                source = cause_of(source);
            }
            text
        }
    }
}

fn cause_of<'a>(
    e: Option<&'a (dyn std::error::Error + 'static)>,
) -> Option<&'a (dyn std::error::Error + 'static)> {
    e.and_then(|e| e.source())
}

impl PostgresSink {
    pub(super) fn new(
        options: &WarehouseOptions,
        context: &Context,
        recorder: Recorder,
    ) -> Result<Self, String> {
        let url = options.url.as_deref().unwrap_or_default();
        let mut config = parse_url(url).map_err(|e| format!("url: {e}"))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        if config.get_application_name().is_none() {
            config.application_name("streamworker");
        }
        check_table_name(options.table()).map_err(|e| format!("table: {e}"))?;
        Ok(Self {
            config,
            display: redact_url(url),
            table: options.table().to_owned(),
            stream: context.stream.clone(),
            recorder,
            idle: Mutex::new(Vec::new()),
            failing: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub(super) async fn write_batch(
        &self,
        entries: &[Entry],
    ) -> Vec<Result<Effects, HandlerError>> {
        let ids: Vec<EntryId> = entries.iter().map(Entry::idempotency_id).collect();
        let twice = super::duplicates_in_batch(&ids);
        let mut results: Vec<Option<Result<Effects, HandlerError>>> = vec![None; entries.len()];
        let mut rows = Vec::with_capacity(entries.len());
        let mut row_entry = Vec::with_capacity(entries.len());
        for (i, entry) in entries.iter().enumerate() {
            if twice[i] {
                results[i] = Some(Err(super::duplicate_in_batch(ids[i])));
                continue;
            }
            match serde_json::to_string(&PayloadJson(entry)) {
                Ok(payload) => {
                    rows.push(Row {
                        id: ids[i].to_string(),
                        time: ids[i].time(),
                        event_type: self.recorder.event_type(entry).map(|t| t.into_owned()),
                        payload,
                    });
                    row_entry.push(i);
                }
                Err(e) => {
                    results[i] = Some(Err(HandlerError::permanent(format!(
                        "warehouse: cannot encode the payload as JSON: {e}"
                    ))));
                }
            }
        }
        if !rows.is_empty() {
            for (k, result) in self.store(&rows).await.into_iter().enumerate() {
                results[row_entry[k]] = Some(result.map_err(|e| match e {
                    RowError::Stored => super::already_stored(ids[row_entry[k]]),
                    RowError::Other(e) => e,
                }));
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(HandlerError::retry("warehouse: no result"))))
            .collect()
    }

    /// Stores the rows: one result per row.
    async fn store(&self, rows: &[Row]) -> Vec<Result<Effects, RowError>> {
        let mut conn = match self.acquire().await {
            Ok(c) => c,
            Err(e) => return retry_all(rows.len(), &e),
        };
        match self.insert_batch(&mut conn, rows).await {
            Ok(inserted) => {
                self.release(conn);
                mark_inserted(rows, &inserted)
            }
            Err(Failure::Batch(e)) => retry_all(rows.len(), &e),
            Err(Failure::Data(e)) => {
                tracing::info!(table = %self.table, error = %e, rows = rows.len(), "warehouse: PostgreSQL refused the data of a batch; storing it row by row");
                match self.insert_each(&mut conn, rows).await {
                    Ok(results) => {
                        self.release(conn);
                        results
                    }
                    Err(e) => retry_all(rows.len(), &e),
                }
            }
        }
    }

    /// A pooled connection, or a new one (creating the table on it).
    async fn acquire(&self) -> Result<Connection, String> {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        if let Some(conn) = idle
            && !conn.client.is_closed()
        {
            return Ok(conn);
        }
        match self.connect().await {
            Ok(conn) => {
                if self
                    .failing
                    .swap(false, std::sync::atomic::Ordering::Relaxed)
                {
                    tracing::info!(postgres = %self.display, "warehouse: PostgreSQL is reachable again");
                }
                Ok(conn)
            }
            Err(e) => {
                if !self
                    .failing
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    tracing::warn!(postgres = %self.display, error = %e, "warehouse: cannot use PostgreSQL; batches are retried");
                }
                Err(e)
            }
        }
    }

    fn release(&self, conn: Connection) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < IDLE_CONNECTIONS && !conn.client.is_closed() {
            idle.push(conn);
        }
    }

    async fn connect(&self) -> Result<Connection, String> {
        let (client, connection) = self.config.connect(NoTls).await.map_err(|e| {
            format!(
                "PostgreSQL at {} unreachable: {}",
                self.display,
                describe(&e)
            )
        })?;
        let server = self.display.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(postgres = %server, error = %describe(&e), "warehouse: PostgreSQL connection closed");
            }
        });
        let create = client.batch_execute(&create_table_sql(&self.table)).await;
        if let Err(e) = create {
            // Replicas starting together race on CREATE TABLE IF NOT EXISTS; the loser
            // sees the winner's table (or its type) as a duplicate.
            let raced = e.code().is_some_and(|c| {
                *c == SqlState::UNIQUE_VIOLATION || *c == SqlState::DUPLICATE_TABLE
            });
            if !raced {
                return Err(format!(
                    "cannot create table {}: {}",
                    self.table,
                    describe(&e)
                ));
            }
        }
        let insert = client
            .prepare(&insert_sql(&self.table))
            .await
            .map_err(|e| {
                format!(
                    "cannot prepare the insert into {}: {}",
                    self.table,
                    describe(&e)
                )
            })?;
        Ok(Connection { client, insert })
    }

    /// The whole batch in one transaction; the ids inserted (the others were stored
    /// before).
    async fn insert_batch(
        &self,
        conn: &mut Connection,
        rows: &[Row],
    ) -> Result<Vec<String>, Failure> {
        let Connection { client, insert } = conn;
        let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        let times: Vec<SystemTime> = rows.iter().map(|r| r.time).collect();
        let types: Vec<Option<&str>> = rows.iter().map(|r| r.event_type.as_deref()).collect();
        let payloads: Vec<&str> = rows.iter().map(|r| r.payload.as_str()).collect();
        let fail = |e: tokio_postgres::Error| {
            if is_data_error(&e) {
                Failure::Data(describe(&e))
            } else {
                Failure::Batch(format!("PostgreSQL: {}", describe(&e)))
            }
        };
        let tx = client.transaction().await.map_err(fail)?;
        let inserted = tx
            .query(insert, &[&self.stream, &ids, &times, &types, &payloads])
            .await
            .map_err(fail)?;
        tx.commit().await.map_err(fail)?;
        Ok(inserted
            .iter()
            .filter_map(|row| row.try_get::<_, String>(0).ok())
            .collect())
    }

    /// Row by row under savepoints, in one transaction: refused rows fail permanently,
    /// the others are stored. `Err` when the batch as a whole must be retried.
    async fn insert_each(
        &self,
        conn: &mut Connection,
        rows: &[Row],
    ) -> Result<Vec<Result<Effects, RowError>>, String> {
        let Connection { client, insert } = conn;
        let batch = |e: tokio_postgres::Error| format!("PostgreSQL: {}", describe(&e));
        let mut tx = client.transaction().await.map_err(batch)?;
        let mut results = Vec::with_capacity(rows.len());
        for row in rows {
            let savepoint = tx.savepoint("row").await.map_err(batch)?;
            let one = savepoint
                .query(
                    &*insert,
                    &[
                        &self.stream,
                        &[row.id.as_str()].as_slice(),
                        &[row.time].as_slice(),
                        &[row.event_type.as_deref()].as_slice(),
                        &[row.payload.as_str()].as_slice(),
                    ],
                )
                .await;
            match one {
                Ok(inserted) => {
                    savepoint.commit().await.map_err(batch)?;
                    results.push(if inserted.is_empty() {
                        Err(RowError::Stored)
                    } else {
                        Ok(Effects::new())
                    });
                }
                Err(e) if is_data_error(&e) => {
                    savepoint.rollback().await.map_err(batch)?;
                    results.push(Err(RowError::Other(HandlerError::permanent(format!(
                        "warehouse: PostgreSQL refused the row: {}",
                        describe(&e)
                    )))));
                }
                Err(e) => return Err(batch(e)),
            }
        }
        tx.commit().await.map_err(batch)?;
        Ok(results)
    }
}

enum RowError {
    /// The row was there already: a duplicate.
    Stored,
    Other(HandlerError),
}

fn retry_all(n: usize, reason: &str) -> Vec<Result<Effects, RowError>> {
    let e = HandlerError::retry(format!("warehouse: {reason}"));
    (0..n).map(|_| Err(RowError::Other(e.clone()))).collect()
}

fn mark_inserted(rows: &[Row], inserted: &[String]) -> Vec<Result<Effects, RowError>> {
    let inserted: std::collections::HashSet<&str> = inserted.iter().map(String::as_str).collect();
    rows.iter()
        .map(|r| {
            if inserted.contains(r.id.as_str()) {
                Ok(Effects::new())
            } else {
                Err(RowError::Stored)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/events?sslmode=disable"),
            "postgres://app:<redacted>@db:5432/events?sslmode=disable"
        );
        assert_eq!(
            redact_url("postgresql://app@db/events?password=s3cret&x=1"),
            "postgresql://app@db/events?password=<redacted>&x=1"
        );
        assert_eq!(redact_url("postgres://db/events"), "postgres://db/events");
        assert_eq!(
            redact_url("host=db user=app password=s3cret dbname=events"),
            "host=db user=app password=<redacted> dbname=events"
        );
        assert_eq!(
            redact_url(r"host=db password = 'it\'s secret' dbname=x"),
            "host=db password=<redacted> dbname=x"
        );
        assert_eq!(redact_url("passwordless=1"), "passwordless=1");
    }

    #[test]
    fn connection_strings_parse_and_tls_is_refused() {
        assert!(parse_url("postgres://u:p@127.0.0.1:5432/db").is_ok());
        assert!(parse_url("host=/tmp port=5433 user=postgres").is_ok());
        assert!(parse_url("postgres://h/db?sslmode=require").is_err());
        assert!(parse_url("mysql://h/db").is_err());
    }

    #[test]
    fn table_names() {
        assert!(check_table_name("streamworker_events").is_ok());
        assert!(check_table_name("analytics.llm_events").is_ok());
        assert!(check_table_name("Events").is_err());
        assert!(check_table_name("a.b.c").is_err());
        assert!(check_table_name("x; drop table y").is_err());
        assert!(check_table_name("").is_err());
    }

    #[test]
    fn sql_uses_the_table() {
        assert!(create_table_sql("a.b").contains("CREATE TABLE IF NOT EXISTS a.b ("));
        assert!(insert_sql("t").contains("ON CONFLICT (stream, id) DO NOTHING"));
    }
}
