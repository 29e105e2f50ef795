//! Reading one feedback event from an entry (rating, thumbs, model, prompt) and the
//! aggregate writes it makes, applied with the entry's acknowledgement.

use std::borrow::Cow;

use super::Learning;
use super::math::{MINUTE_MS, prompt_id};
use crate::{Effect, Effects, Entry, HandlerError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Thumbs {
    Up,
    Down,
}

impl Thumbs {
    fn parse(text: &str) -> Option<Self> {
        let t = text.trim().to_lowercase();
        match t.as_str() {
            "up" | "1" | "1.0" | "true" | "yes" | "+1" | "👍" | "thumbs_up" | "thumbsup"
            | "positive" | "like" => Some(Self::Up),
            "down" | "0" | "0.0" | "-1" | "false" | "no" | "👎" | "thumbs_down" | "thumbsdown"
            | "negative" | "dislike" => Some(Self::Down),
            _ => None,
        }
    }
    pub(super) fn name(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Down => "down",
        }
    }
}

/// One feedback event, read from an entry.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Feedback<'a> {
    pub(super) rating: f64,
    pub(super) thumbs: Option<Thumbs>,
    pub(super) model: Cow<'a, str>,
    pub(super) prompt: Option<Cow<'a, str>>,
    pub(super) response: Option<Cow<'a, str>>,
    pub(super) user: Option<Cow<'a, str>>,
    pub(super) prompt_id: Option<String>,
}

fn non_empty(v: Option<Cow<'_, str>>) -> Option<Cow<'_, str>> {
    v.filter(|s| !s.trim().is_empty())
}

pub(super) fn clip(text: &str) -> String {
    text.chars().take(40).collect()
}

impl Learning {
    pub(super) fn feedback<'e>(&self, entry: &'e Entry) -> Result<Feedback<'e>, HandlerError> {
        let o = &self.options;
        let thumbs = match non_empty(entry.get(&o.thumbs)) {
            None => None,
            Some(text) => Some(Thumbs::parse(&text).ok_or_else(|| {
                HandlerError::permanent(format!(
                    "{} = `{}` is neither a thumbs up nor down (use up/down, 1/0, true/false)",
                    o.thumbs,
                    clip(&text)
                ))
            })?),
        };
        let rating = match non_empty(entry.get(&o.rating)) {
            Some(text) => {
                let r: f64 = text
                    .trim()
                    .parse()
                    .ok()
                    .filter(|r: &f64| r.is_finite())
                    .ok_or_else(|| {
                        HandlerError::permanent(format!(
                            "{} = `{}` is not a number",
                            o.rating,
                            clip(&text)
                        ))
                    })?;
                if !(o.rating_min..=o.rating_max).contains(&r) {
                    return Err(HandlerError::permanent(format!(
                        "{} = {r} is outside the rating scale [{}, {}]",
                        o.rating, o.rating_min, o.rating_max
                    )));
                }
                r
            }
            None => match thumbs {
                Some(Thumbs::Up) => o.rating_max,
                Some(Thumbs::Down) => o.rating_min,
                None => {
                    return Err(HandlerError::drop_entry(format!(
                        "no rating (`{}`) and no thumbs (`{}`): nothing to learn from",
                        o.rating, o.thumbs
                    )));
                }
            },
        };
        let prompt = non_empty(entry.get(&o.prompt));
        let prompt_id = o
            .prompt_id
            .as_deref()
            .and_then(|path| non_empty(entry.get(path)))
            .map(Cow::into_owned)
            .or_else(|| prompt.as_deref().map(prompt_id));
        Ok(Feedback {
            rating,
            thumbs,
            model: non_empty(entry.get(&o.model)).unwrap_or(Cow::Borrowed("unknown")),
            prompt,
            response: non_empty(entry.get(&o.response)),
            user: non_empty(entry.get(&o.user)),
            prompt_id,
        })
    }

    /// The aggregate writes of one feedback, applied with the entry's acknowledgement.
    pub(super) fn effects(&self, entry: &Entry, f: &Feedback<'_>) -> Effects {
        let ttl = self.options.retention;
        let model = f.model.as_ref();
        let mut out = Vec::with_capacity(18);
        let totals = |key: String, out: &mut Effects| {
            out.push(Effect::HashIncr {
                key: key.clone(),
                field: "count".into(),
                by: 1,
            });
            out.push(Effect::HashIncrFloat {
                key: key.clone(),
                field: "rating_sum".into(),
                by: f.rating,
            });
            if let Some(t) = f.thumbs {
                out.push(Effect::HashIncr {
                    key: key.clone(),
                    field: format!("thumbs_{}", t.name()),
                    by: 1,
                });
            }
            out.push(Effect::Expire { key, ttl });
        };
        totals(self.keys.model(model), &mut out);
        if let Some(id) = &f.prompt_id {
            totals(self.keys.prompt(id), &mut out);
        }
        let models = self.keys.models();
        out.push(Effect::HashIncr {
            key: models.clone(),
            field: model.to_owned(),
            by: 1,
        });
        out.push(Effect::Expire { key: models, ttl });
        let bucket = self.keys.minute(entry.idempotency_id().ms / MINUTE_MS);
        out.push(Effect::HashIncr {
            key: bucket.clone(),
            field: format!("count:{model}"),
            by: 1,
        });
        out.push(Effect::HashIncrFloat {
            key: bucket.clone(),
            field: format!("rating_sum:{model}"),
            by: f.rating,
        });
        if let Some(t) = f.thumbs {
            out.push(Effect::HashIncr {
                key: bucket.clone(),
                field: format!("thumbs_{}:{model}", t.name()),
                by: 1,
            });
        }
        out.push(Effect::Expire { key: bucket, ttl });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;
    use crate::learning::tests::{entry, handler};
    use crate::learning::{Keys, LearningOptions, Totals, window_totals};
    use crate::{EntryId, PayloadFormat};
    use std::path::Path;
    use std::sync::Arc;

    #[test]
    fn thumbs_and_ratings_are_read_and_checked() {
        let store = Arc::new(MemoryStore::new());
        let h = handler(Path::new(""), store);
        let id = EntryId::new(1_700_000_000_000, 0);
        let f = |pairs: &[(&str, &str)]| {
            let e = entry(id, 1, pairs);
            h.feedback(&e)
                .map(|f| (f.rating, f.thumbs, f.model.into_owned()))
        };
        assert_eq!(
            f(&[("rating", "4"), ("model", "m")]),
            Ok((4.0, None, "m".into()))
        );
        assert_eq!(
            f(&[("thumbs", "UP")]),
            Ok((5.0, Some(Thumbs::Up), "unknown".into()))
        );
        assert_eq!(
            f(&[("thumbs", "0")]),
            Ok((1.0, Some(Thumbs::Down), "unknown".into()))
        );
        assert_eq!(
            f(&[("thumbs", "down"), ("rating", "2")]),
            Ok((2.0, Some(Thumbs::Down), "unknown".into()))
        );
        assert!(matches!(f(&[("model", "m")]), Err(HandlerError::Drop(_))));
        assert!(matches!(f(&[("rating", "")]), Err(HandlerError::Drop(_))));
        assert!(matches!(
            f(&[("rating", "six")]),
            Err(HandlerError::Permanent(_))
        ));
        assert!(matches!(
            f(&[("rating", "6")]),
            Err(HandlerError::Permanent(_))
        ));
        assert!(matches!(
            f(&[("thumbs", "meh")]),
            Err(HandlerError::Permanent(_))
        ));
    }

    #[test]
    fn json_payloads_use_paths() {
        let store = Arc::new(MemoryStore::new());
        let options = LearningOptions {
            rating: "feedback.score".into(),
            model: "data.model".into(),
            prompt_id: Some("data.prompt_id".into()),
            dataset_dir: String::new(),
            ..Default::default()
        };
        let h = Learning::new(&options, "user:feedback", "learning", store).unwrap();
        let mut e = entry(
            EntryId::new(1, 0),
            1,
            &[(
                "event",
                r#"{"feedback":{"score":3},"data":{"model":"gpt-4o","prompt_id":"p-7"},"prompt":"hi"}"#,
            )],
        );
        e.decode(&PayloadFormat::Json("event".into())).unwrap();
        let f = h.feedback(&e).unwrap();
        assert_eq!(f.rating, 3.0);
        assert_eq!(f.model, "gpt-4o");
        assert_eq!(f.prompt_id.as_deref(), Some("p-7"));
        assert_eq!(f.prompt.as_deref(), Some("hi"));
    }

    #[test]
    fn effects_cover_model_prompt_index_and_minute() {
        let store = Arc::new(MemoryStore::new());
        let h = handler(Path::new(""), store);
        let e = entry(
            EntryId::new(120_000, 3),
            1,
            &[
                ("rating", "4.5"),
                ("thumbs", "up"),
                ("model", "m:1"),
                ("prompt", "p"),
            ],
        );
        let f = h.feedback(&e).unwrap();
        let effects = h.effects(&e, &f);
        let pid = prompt_id("p");
        let k = Keys::new("user:feedback", "learning");
        let incr = |key: String, field: &str| Effect::HashIncr {
            key,
            field: field.into(),
            by: 1,
        };
        assert!(effects.contains(&incr(k.model("m:1"), "count")));
        assert!(effects.contains(&incr(k.model("m:1"), "thumbs_up")));
        assert!(effects.contains(&incr(k.prompt(&pid), "count")));
        assert!(effects.contains(&incr(k.models(), "m:1")));
        assert!(effects.contains(&incr(k.minute(2), "count:m:1")));
        assert!(effects.contains(&Effect::HashIncrFloat {
            key: k.minute(2),
            field: "rating_sum:m:1".into(),
            by: 4.5
        }));
        assert_eq!(k.model("m"), "{user:feedback}:learning:learning:model:m");
        // Every key is in the stream's hash slot.
        assert!(
            effects
                .iter()
                .all(|e| e.key().starts_with("{user:feedback}:"))
        );
        // The window sums what the minute buckets hold, models with colons included.
        let bucket = vec![
            ("count:m:1".to_string(), "2".to_string()),
            ("rating_sum:m:1".to_string(), "7.5".to_string()),
            ("thumbs_down:m:1".to_string(), "1".to_string()),
        ];
        let totals = window_totals(&[bucket.clone(), bucket]);
        assert_eq!(
            totals["m:1"],
            Totals {
                count: 4,
                rating_sum: 15.0,
                thumbs_up: 0,
                thumbs_down: 2
            }
        );
        assert_eq!(totals["m:1"].average(), Some(3.75));
    }
}
