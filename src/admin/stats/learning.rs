//! `stats` for a `learning` group: per model, all-time feedback (count, average rating,
//! thumbs) from `P:model:<m>`, the rolling average over `--since` from the minute
//! buckets, and the adaptation state the periodic check keeps.

use serde::Serialize;
use streamworker_handlers::learning::{Keys, LearningOptions, ModelState, Totals, window_totals};

use super::{Query, minutes, read_hashes};
use crate::admin::table;
use crate::client::{Client, ClientError};
use crate::config::GroupConfig;

#[derive(Debug, Serialize)]
struct ModelReport {
    model: String,
    feedback: u64,
    average_rating: Option<f64>,
    thumbs_up: u64,
    thumbs_down: u64,
    window_feedback: u64,
    window_average: Option<f64>,
    /// `low` once the rolling average fell to the threshold (an adaptation event was sent).
    state: &'static str,
}

#[derive(Debug, Serialize)]
struct Report {
    group: String,
    since_seconds: u64,
    threshold: f64,
    models: Vec<ModelReport>,
}

fn totals(hash: &[(String, String)]) -> Totals {
    let get = |name: &str| {
        hash.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    Totals {
        count: get("count").and_then(|v| v.parse().ok()).unwrap_or(0),
        rating_sum: get("rating_sum")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0),
        thumbs_up: get("thumbs_up").and_then(|v| v.parse().ok()).unwrap_or(0),
        thumbs_down: get("thumbs_down").and_then(|v| v.parse().ok()).unwrap_or(0),
    }
}

pub async fn run(
    client: &Client,
    group: &GroupConfig,
    options: &LearningOptions,
    query: &Query,
) -> Result<String, ClientError> {
    let keys = Keys::new(&group.stream, &group.name);
    let models: Vec<String> = client
        .hashes(&[keys.models()])
        .await?
        .into_iter()
        .flatten()
        .map(|(model, _)| model)
        .collect();
    let per_model = client
        .hashes(&models.iter().map(|m| keys.model(m)).collect::<Vec<_>>())
        .await?;
    let now = client.time_ms().await?;
    let mut buckets = Vec::new();
    read_hashes(
        client,
        minutes(now, query.since).map(|m| keys.minute(m)).collect(),
        |h| buckets.push(h),
    )
    .await?;
    let window = window_totals(&buckets);
    let mut report = Report {
        group: group.name.clone(),
        since_seconds: query.since.as_secs(),
        threshold: options.threshold,
        models: Vec::new(),
    };
    for (model, hash) in models.iter().zip(per_model) {
        let all = totals(&hash);
        let recent = window.get(model).copied().unwrap_or_default();
        let state = match client.get(&keys.state(model)).await? {
            Some(json) => match serde_json::from_str::<ModelState>(&json) {
                Ok(s) if s.low => "low",
                Ok(_) => "ok",
                Err(_) => "?",
            },
            None => "-",
        };
        report.models.push(ModelReport {
            model: model.clone(),
            // Thumbs count as ratings at the ends of the scale, so `count` is all feedback.
            feedback: all.count,

            average_rating: all.average(),
            thumbs_up: all.thumbs_up,
            thumbs_down: all.thumbs_down,
            window_feedback: recent.count,
            window_average: recent.average(),
            state,
        });
    }
    report.models.sort_by_key(|m| std::cmp::Reverse(m.feedback));
    if query.json {
        return Ok(serde_json::to_string_pretty(&report).expect("serializes") + "\n");
    }
    if report.models.is_empty() {
        return Ok(format!("{}: no feedback aggregated yet\n", group.name));
    }
    let avg = |v: Option<f64>| v.map_or("-".to_owned(), |a| format!("{a:.2}"));
    let rows: Vec<Vec<String>> = report
        .models
        .iter()
        .map(|m| {
            vec![
                m.model.clone(),
                m.feedback.to_string(),
                avg(m.average_rating),
                format!("{}/{}", m.thumbs_up, m.thumbs_down),
                m.window_feedback.to_string(),
                avg(m.window_average),
                m.state.to_owned(),
            ]
        })
        .collect();
    let mut out = format!(
        "{} (learning): feedback per model; rolling window = the last {}; adaptation threshold {:.2}\n",
        group.name,
        streamworker_handlers::duration::format(query.since),
        report.threshold
    );
    out.push_str(&table(
        &[
            "MODEL",
            "FEEDBACK",
            "AVG RATING",
            "THUMBS UP/DOWN",
            "IN WINDOW",
            "WINDOW AVG",
            "STATE",
        ],
        &rows,
    ));
    Ok(out)
}
