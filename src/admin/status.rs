//! `streamworker status -c FILE [--json]`: per stream and group, what Redis says.

use std::time::Duration;

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
