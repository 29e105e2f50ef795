//! `streamworker pause|resume -c FILE --group G`: stops or restarts one group on every
//! replica at once. The pause is a key in Redis (`keys::pause_key`, in the stream's
//! slot) that every replica's loop looks at with its reclaim, once per `claim_interval`;
//! a paused loop finishes and settles what it holds and fetches nothing new.

use std::time::Duration;

use serde::Serialize;

use crate::client::{Client, ClientError};
use crate::config::GroupConfig;
use crate::keys::pause_key;

use super::human;

/// What `pause` or `resume` did.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub stream: String,
    pub group: String,
    pub paused: bool,
    /// False when the group already was in that state.
    pub changed: bool,
    /// The pause key (of partition 0, for a partitioned group: every partition has one).
    pub key: String,
    /// The longest a replica takes to notice.
    pub within_seconds: f64,
}

pub async fn run(
    client: &Client,
    group: &GroupConfig,
    claim_interval: Duration,
    pause: bool,
) -> Result<Outcome, ClientError> {
    // A partitioned group is paused partition by partition: each partition's loop looks
    // at the pause key in its own stream's slot.
    let streams: Vec<String> = match group.partitions {
        Some(n) => crate::partition::partition_streams(&group.stream, n).collect(),
        None => vec![group.stream.clone()],
    };
    let mut changed = false;
    for stream in &streams {
        changed |= client.set_paused(stream, &group.name, pause).await?;
    }
    Ok(Outcome {
        stream: group.stream.clone(),
        group: group.name.clone(),
        paused: pause,
        changed,
        key: pause_key(&streams[0], &group.name),
        within_seconds: claim_interval.as_secs_f64(),
    })
}

impl Outcome {
    pub fn render(&self) -> String {
        let within = human(Duration::from_secs_f64(self.within_seconds));
        match (self.paused, self.changed) {
            (true, true) => format!(
                "paused group {} on stream {}: every replica stops reading within {within} (claim_interval); entries in flight finish and are settled. Undo with `streamworker resume`.\n",
                self.group, self.stream
            ),
            (true, false) => format!(
                "group {} on stream {} was already paused; nothing changed. Undo with `streamworker resume`.\n",
                self.group, self.stream
            ),
            (false, true) => format!(
                "resumed group {} on stream {}: every replica reads again within {within} (claim_interval).\n",
                self.group, self.stream
            ),
            (false, false) => format!(
                "group {} on stream {} was not paused; nothing changed.\n",
                self.group, self.stream
            ),
        }
    }
}
