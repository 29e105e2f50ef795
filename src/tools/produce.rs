//! Realistic events for the seed scenarios: `streamworker produce` writes them at a rate,
//! and `streamworker demo` feeds its groups with them.

use std::time::{Duration, Instant, SystemTime};

use serde_json::json;

use crate::client::{ClientError, Producer};

/// The write-ups' scenarios and the shapes of their events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// `user_logs`: flat fields (user-logging-redis-streams.md).
    UserActivity,
    /// `ml_events`: one JSON document in field `event` (production-redis-sink.md).
    LlmObservability,
    /// `events.raw`: commerce events with a JSON payload (event-pipeline-architecture.md).
    Commerce,
    /// `user:feedback`: ratings and thumbs on model answers (redis-beta-readiness.md).
    Feedback,
    /// `memory:events`: an AI agent's event-sourced memory (event-streaming-memory.md).
    Memory,
}

/// Shifts the generated traffic, so a demo shows alerts and adaptations happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mood {
    #[default]
    Normal,
    /// LLM calls fail a lot; one model's ratings collapse.
    Incident,
}

pub const MODELS: [&str; 3] = [
    "gemini/gemini-2.0-flash",
    "openai/gpt-4o-mini",
    "anthropic/claude-3-5-haiku",
];

impl Scenario {
    pub fn stream(&self) -> &'static str {
        match self {
            Self::UserActivity => "user_logs",
            Self::LlmObservability => "ml_events",
            Self::Commerce => "events.raw",
            Self::Feedback => "user:feedback",
            Self::Memory => "memory:events",
        }
    }

    /// The `n`th event, as fields.
    pub fn event(&self, n: u64, mood: Mood) -> Vec<(String, String)> {
        let now = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let user = format!("user_{}", fastrand::u32(1..500));
        let pick = |items: &[&'static str]| items[fastrand::usize(..items.len())];
        let f = |pairs: &[(&str, String)]| {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect()
        };
        match self {
            Self::UserActivity => f(&[
                ("user_id", fastrand::u32(1..500).to_string()),
                ("event_type", pick(&["click", "prompt", "pageview", "feedback"]).into()),
                ("message", pick(&["What is quantum computing?", "Summarize this page", "Show pricing", "Thanks!"]).into()),
                ("timestamp", now),
            ]),
            Self::LlmObservability => {
                let model = MODELS[fastrand::usize(..MODELS.len())];
                let error_share = if mood == Mood::Incident { 30 } else { 3 };
                let roll = fastrand::u32(0..100);
                let event = if roll < error_share {
                    json!({
                        "event_id": format!("{:032x}", fastrand::u128(..)),
                        "event_type": "error",
                        "timestamp": now,
                        "execution_id": format!("exec_{n}"),
                        "operation": "answer_generation",
                        "data": {"model": model, "error_type": pick(&["RateLimitError", "Timeout", "InvalidResponse"])},
                        "tags": {"environment": "production", "user_id": user},
                    })
                } else {
                    let tokens = fastrand::u32(50..1500);
                    // Log-normal-ish response times around a few hundred ms.
                    let base = match model {
                        "openai/gpt-4o-mini" => 450.0,
                        "anthropic/claude-3-5-haiku" => 650.0,
                        _ => 300.0,
                    };
                    let response_ms = (base * (fastrand::f64() * 1.2 - 0.6).exp()).round();
                    json!({
                        "event_id": format!("{:032x}", fastrand::u128(..)),
                        "event_type": if roll < error_share + 10 { "token" } else { "llm_call" },
                        "timestamp": now,
                        "execution_id": format!("exec_{n}"),
                        "operation": pick(&["answer_generation", "retrieval", "summarization"]),
                        "data": {
                            "model": model,
                            "tokens_used": tokens,
                            "cost_usd": (tokens as f64 * 0.000008 * 1e6).round() / 1e6,
                            "response_time_ms": response_ms,
                        },
                        "tags": {"environment": "production", "user_id": user},
                    })
                };
                vec![("event".into(), event.to_string())]
            }
            Self::Commerce => {
                let event_type = pick(&["purchase", "page_view", "page_view", "whatsapp_message"]);
                let payload = match event_type {
                    "purchase" => json!({"customer": {"profile_id": format!("p-{}", fastrand::u32(1..300)), "phone": format!("+1555{:07}", fastrand::u32(..10_000_000))}, "total": (fastrand::f64() * 200.0 * 100.0).round() / 100.0}),
                    "page_view" => json!({"customer": {"profile_id": format!("p-{}", fastrand::u32(1..300))}, "url": pick(&["/", "/pricing", "/checkout"])}),
                    _ => json!({"phone": format!("+1555{:07}", fastrand::u32(..10_000_000)), "text": "Is my order on its way?"}),
                };
                f(&[
                    ("event_id", format!("{:032x}", fastrand::u128(..))),
                    ("brand_id", pick(&["brand-a", "brand-b", "brand-c"]).into()),
                    ("event_type", event_type.into()),
                    ("payload", payload.to_string()),
                    ("timestamp", now),
                ])
            }
            Self::Feedback => {
                let model = MODELS[fastrand::usize(..MODELS.len())];
                // In an incident the first model's answers get poor ratings.
                let poor = mood == Mood::Incident && model == MODELS[0];
                let rating = if poor { fastrand::u32(1..=2) } else { fastrand::u32(3..=5) };
                let prompt = pick(&["Explain Redis Streams", "Write a haiku about queues", "What is backpressure?"]);
                let mut fields: Vec<(String, String)> = f(&[
                    ("prompt", prompt.into()),
                    ("response", format!("An answer to: {prompt}")),
                    ("model", model.into()),
                    ("user", user),
                    ("timestamp", now),
                ]);
                if fastrand::u8(..4) == 0 {
                    fields.push(("thumbs".into(), if rating >= 3 { "up" } else { "down" }.into()));
                } else {
                    fields.push(("rating".into(), rating.to_string()));
                }
                fields
            }
            Self::Memory => f(&[
                ("type", pick(&["message.added", "message.added", "search.performed", "summary.created", "session.started", "error.occurred"]).into()),
                ("agent_id", pick(&["planner", "researcher", "writer"]).into()),
                ("session_id", format!("session-{}", fastrand::u32(1..50))),
                ("user_id", user),
                ("timestamp", now),
                ("data", json!({"message_id": format!("msg-{n}"), "role": "user", "tokens": fastrand::u32(10..400)}).to_string()),
            ]),
        }
    }
}

/// A W3C `traceparent` for a producer span (random ids, sampled).
pub fn traceparent() -> String {
    format!(
        "00-{:032x}-{:016x}-01",
        fastrand::u128(1..),
        fastrand::u64(1..)
    )
}

/// How `produce --partition-by FIELD --partitions N` spreads entries: each entry goes to
/// partition `partition_of(value of FIELD, N)` of the stream (`docs/partitions.md`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partitioning {
    pub field: String,
    pub partitions: u32,
}

/// Why `produce` stopped.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    #[error(transparent)]
    Redis(#[from] ClientError),
    /// The rule for entries without the key: refuse, rather than guess a partition that a
    /// consumer ordering by the key could not agree with.
    #[error(
        "event {n} has no field `{field}` to partition by (its fields: {fields}); pick a field every event of the scenario has"
    )]
    MissingKey {
        n: u64,
        field: String,
        fields: String,
    },
}

/// Events as field/value pairs.
pub type Events = Vec<Vec<(String, String)>>;

/// Where each event goes: the stream itself, or its partition by the key field. Events
/// keep their order within each destination, so entries of one key keep theirs.
pub fn route(
    stream: &str,
    first: u64,
    events: Events,
    partitioning: Option<&Partitioning>,
) -> Result<Vec<(String, Events)>, ProduceError> {
    let Some(p) = partitioning else {
        return Ok(vec![(stream.to_owned(), events)]);
    };
    let mut by_partition = std::collections::BTreeMap::<u32, Events>::new();
    for (i, fields) in events.into_iter().enumerate() {
        let Some((_, key)) = fields.iter().find(|(name, _)| *name == p.field) else {
            return Err(ProduceError::MissingKey {
                n: first + i as u64,
                field: p.field.clone(),
                fields: fields
                    .iter()
                    .map(|(name, _)| name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        let partition = crate::partition::partition_of(key.as_bytes(), p.partitions);
        by_partition.entry(partition).or_default().push(fields);
    }
    Ok(by_partition
        .into_iter()
        .map(|(partition, events)| {
            (
                crate::partition::partition_stream(stream, partition),
                events,
            )
        })
        .collect())
}

/// Writes `count` events (or until `deadline`) at `rate` per second to `stream` (or its
/// partitions), in pipelined slices every 10 ms. Returns how many were added.
#[allow(clippy::too_many_arguments)]
pub async fn produce(
    producer: &mut Producer,
    scenario: Scenario,
    stream: &str,
    partitioning: Option<&Partitioning>,
    rate: u64,
    count: Option<u64>,
    until: Option<Instant>,
    with_traceparent: bool,
    mood: impl Fn() -> Mood,
) -> Result<u64, ProduceError> {
    let started = Instant::now();
    let mut added = 0u64;
    loop {
        if count.is_some_and(|c| added >= c) || until.is_some_and(|u| Instant::now() >= u) {
            return Ok(added);
        }
        let due =
            ((started.elapsed().as_secs_f64() * rate as f64) as u64).min(count.unwrap_or(u64::MAX));
        if due > added {
            let m = mood();
            let events = (added..due)
                .map(|n| {
                    let mut fields = scenario.event(n, m);
                    if with_traceparent {
                        fields.push(("traceparent".to_owned(), traceparent()));
                    }
                    fields
                })
                .collect();
            for (stream, events) in route(stream, added, events, partitioning)? {
                producer.add_all(&stream, events).await?;
            }
            added = due;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_have_the_write_ups_shapes() {
        let llm = Scenario::LlmObservability.event(1, Mood::Normal);
        let doc: serde_json::Value = serde_json::from_str(&llm[0].1).unwrap();
        assert_eq!(llm[0].0, "event");
        assert!(doc["data"]["model"].is_string());
        let feedback = Scenario::Feedback.event(1, Mood::Normal);
        assert!(feedback.iter().any(|(k, _)| k == "rating" || k == "thumbs"));
        let raw = Scenario::Commerce.event(1, Mood::Normal);
        let payload = raw.iter().find(|(k, _)| k == "payload").unwrap();
        assert!(serde_json::from_str::<serde_json::Value>(&payload.1).is_ok());
        assert!(traceparent().starts_with("00-") && traceparent().len() == 55);
    }

    fn event(user: &str) -> Vec<(String, String)> {
        vec![
            ("user_id".to_owned(), user.to_owned()),
            ("n".to_owned(), "1".to_owned()),
        ]
    }

    #[test]
    fn routes_each_event_to_its_keys_partition_and_refuses_events_without_the_key() {
        let p = Partitioning {
            field: "user_id".into(),
            partitions: 16,
        };
        let events = vec![event("customer-42"), event("order-1"), event("customer-42")];
        let routed = route("orders", 0, events.clone(), Some(&p)).unwrap();
        // Known answers from Python's zlib.crc32 (src/partition.rs).
        assert_eq!(
            routed,
            vec![
                (
                    "orders:p5".to_owned(),
                    vec![events[0].clone(), events[2].clone()]
                ),
                ("orders:p15".to_owned(), vec![events[1].clone()]),
            ]
        );
        assert_eq!(
            route("orders", 0, events.clone(), None).unwrap(),
            vec![("orders".to_owned(), events)]
        );
        let missing = route("orders", 7, vec![vec![("n".into(), "1".into())]], Some(&p));
        let message = missing.unwrap_err().to_string();
        assert!(
            message.contains("event 7 has no field `user_id`")
                && message.contains("(its fields: n)"),
            "{message}"
        );
    }
}
