//! `streamworker rewind -c FILE --group G --to <id|time|duration>`: moves the group's
//! position (XGROUP SETID), so that the entries after it are delivered to the group again
//! (or, moving forward, never). Entries already pending stay pending with their owners.
//!
//! The count it prints is of the entries between the new position and the group's
//! last-delivered id. Applying reads that id in the same script as the SETID, so a replica
//! reading meanwhile cannot make the count wrong.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use streamworker_handlers::EntryId;

use crate::client::{Client, ClientError};
use crate::config::GroupConfig;

/// Where to move the group to, as the operator said it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// This id: the entries after it are delivered.
    Id(EntryId),
    /// The entries added at or after this time are delivered.
    Time(SystemTime),
    /// The entries added within this long (by the server's clock) are delivered.
    Ago(Duration),
}

/// Parses `--to`: an entry id (`1700000000000-0`, or a bare milliseconds part), an RFC 3339
/// time (`2024-05-01T12:00:00Z`), or a duration ago (`10m`).
pub fn parse_target(text: &str) -> Result<Target, String> {
    if let Some(id) = EntryId::parse(text.as_bytes()) {
        return Ok(Target::Id(id));
    }
    if let Ok(time) = humantime::parse_rfc3339_weak(text) {
        return Ok(Target::Time(time));
    }
    if let Ok(ago) = streamworker_handlers::duration::parse(text) {
        return Ok(Target::Ago(ago));
    }
    Err(format!(
        "{text:?} is not an entry id (1700000000000-0), an RFC 3339 time \
         (2024-05-01T12:00:00Z) or a duration ago (10m)"
    ))
}

#[derive(Debug, thiserror::Error)]
pub enum RewindError {
    #[error(
        "stream {stream:?} has no consumer group {group:?} yet; `streamworker run` creates it when it starts"
    )]
    NoGroup { stream: String, group: String },
    #[error(
        "Redis reports last-delivered id {0:?} for the group, which is not an entry id; nothing was changed"
    )]
    BadPosition(String),
    #[error(
        "Redis's ACL does not let this user move a group ({0}); add +xgroup|setid to its rules (docs/configuration.md, \"Least-privilege ACL user\")"
    )]
    NotAllowed(ClientError),
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// What a rewind does (or did).
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub stream: String,
    pub group: String,
    /// The group's last-delivered id before.
    pub from: String,
    /// Its last-delivered id after.
    pub to: String,
    /// Entries that will be delivered to the group again.
    pub redelivered: u64,
    /// Entries never delivered because the position moved forward past them.
    pub skipped: u64,
    /// Whether the group was moved (`--yes`).
    pub applied: bool,
}

impl Plan {
    pub fn render(&self) -> String {
        let verb = if self.applied { "moved" } else { "would move" };
        let mut out = format!(
            "{verb} group {} on {} from {} to {}: ",
            self.group, self.stream, self.from, self.to
        );
        if self.skipped > 0 {
            out.push_str(&format!(
                "{} entr{} will be skipped (never delivered to the group)\n",
                self.skipped,
                if self.skipped == 1 { "y" } else { "ies" }
            ));
        } else {
            out.push_str(&format!(
                "{} entr{} will be delivered again\n",
                self.redelivered,
                if self.redelivered == 1 { "y" } else { "ies" }
            ));
        }
        out
    }
}

/// The group's new position for `target`, taking the server's clock for durations.
async fn position(client: &Client, target: &Target) -> Result<EntryId, ClientError> {
    let at_ms = match target {
        Target::Id(id) => return Ok(*id),
        Target::Time(t) => t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64,
        // Entry ids carry the server's clock, so "10 minutes ago" is the server's.
        Target::Ago(d) => client.time_ms().await?.saturating_sub(d.as_millis() as u64),
    };
    // Just before the first id of that millisecond, so its entries are delivered.
    Ok(match at_ms {
        0 => EntryId::new(0, 0),
        ms => EntryId::new(ms - 1, u64::MAX),
    })
}

/// Counts what moving from `from` to `to` does to the group.
async fn count(
    client: &Client,
    stream: &str,
    from: EntryId,
    to: EntryId,
) -> Result<(u64, u64), ClientError> {
    Ok(if to < from {
        (client.count_after(stream, to, from).await?, 0)
    } else {
        (0, client.count_after(stream, from, to).await?)
    })
}

/// Works out what moving the group to `target` would do, changing nothing; with `apply`,
/// moves it.
pub async fn run(
    client: &Client,
    group: &GroupConfig,
    target: &Target,
    apply: bool,
) -> Result<Plan, RewindError> {
    let no_group = || RewindError::NoGroup {
        stream: group.stream.clone(),
        group: group.name.clone(),
    };
    let to = position(client, target).await?;
    let from_text = if apply {
        client
            .rewind(&group.stream, &group.name, to)
            .await
            .map_err(|e| match e {
                // A script's command refused by the ACL.
                ClientError::Command(ref r)
                    if r.code() == Some("NOPERM")
                        || r.to_string().contains("can't run this command") =>
                {
                    RewindError::NotAllowed(e)
                }
                other => other.into(),
            })?
            .ok_or_else(no_group)?
    } else {
        client
            .groups(&group.stream)
            .await?
            .into_iter()
            .find(|g| g.name == group.name)
            .ok_or_else(no_group)?
            .last_delivered_id
    };
    let from = EntryId::parse(from_text.as_bytes())
        .ok_or_else(|| RewindError::BadPosition(from_text.clone()))?;
    let (redelivered, skipped) = count(client, &group.stream, from, to).await?;
    Ok(Plan {
        stream: group.stream.clone(),
        group: group.name.clone(),
        from: from.to_string(),
        to: to.to_string(),
        redelivered,
        skipped,
        applied: apply,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn to_takes_ids_times_and_durations() {
        assert_eq!(
            parse_target("1700000000000-3"),
            Ok(Target::Id(EntryId::new(1_700_000_000_000, 3)))
        );
        assert_eq!(parse_target("0"), Ok(Target::Id(EntryId::new(0, 0))));
        assert_eq!(
            parse_target("2024-05-01T12:00:00Z"),
            Ok(Target::Time(
                UNIX_EPOCH + Duration::from_secs(1_714_564_800)
            ))
        );
        assert_eq!(
            parse_target("10m"),
            Ok(Target::Ago(Duration::from_secs(600)))
        );
        let err = parse_target("yesterday").unwrap_err();
        assert!(err.contains("RFC 3339"), "{err}");
    }
}
