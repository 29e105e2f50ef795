//! The options of a learning group (`[groups.<name>.options]`): defaults, values derived
//! from the keys set and the group's limits, and their checks.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::math::MINUTE_MS;
use crate::{Derived, Limits, Needs, OptionProblem, batch_wait};

/// `[groups.<name>.options]` for `handler = "learning"`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LearningOptions {
    /// Field (or JSON path) holding the numeric rating.
    pub rating: String,
    /// Field holding a thumbs up/down, used as `rating_max`/`rating_min` when there is no
    /// rating, and counted in `thumbs_up`/`thumbs_down`.
    pub thumbs: String,
    /// Field holding the prompt text.
    pub prompt: String,
    /// Field holding the model's response.
    pub response: String,
    /// Field holding the model name; feedback without one is aggregated as `unknown`.
    pub model: String,
    /// Field holding the user id (copied to the dataset, not aggregated).
    pub user: String,
    /// Field holding a prompt id; unset (or missing in an entry): a hash of the prompt text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_id: Option<String>,
    /// The bottom of the rating scale (what a thumbs down counts as).
    pub rating_min: f64,
    /// The top of the rating scale (what a thumbs up counts as).
    pub rating_max: f64,
    /// Where the JSON Lines dataset goes (relative to the working directory); `""` for no
    /// dataset.
    pub dataset_dir: String,
    /// How long a dataset marker lives; must outlive any redelivery (> `claim_idle`), and a
    /// replay after that is checked against the files only.
    #[serde(with = "crate::duration")]
    pub marker_ttl: Duration,
    /// The stream adaptation events are added to.
    pub adaptations_stream: String,
    /// `MAXLEN ~` for the adaptations stream; 0 for no cap.
    pub adaptations_max_len: u64,
    /// A model whose rolling average rating is at or below this needs adaptation.
    pub threshold: f64,
    /// The rolling window, whole minutes (per-minute buckets by entry time).
    #[serde(with = "crate::duration")]
    pub window: Duration,
    /// Ratings a model needs in the window before it is judged.
    pub min_feedback: u64,
    /// How often the rolling ratings are checked (one replica at a time).
    #[serde(with = "crate::duration")]
    pub check_every: Duration,
    /// How long aggregates (and the per-minute buckets `stats` reads) live after their last
    /// write; at least `window`.
    #[serde(with = "crate::duration")]
    pub retention: Duration,
    /// Entries handled together (one fsync, one round of markers).
    pub max_batch: usize,
    /// How long the first entry of a batch waits for more.
    #[serde(with = "crate::duration")]
    pub max_wait: Duration,
}

impl Default for LearningOptions {
    fn default() -> Self {
        Self {
            rating: "rating".into(),
            thumbs: "thumbs".into(),
            prompt: "prompt".into(),
            response: "response".into(),
            model: "model".into(),
            user: "user".into(),
            prompt_id: None,
            rating_min: 1.0,
            rating_max: 5.0,
            dataset_dir: "learning".into(),
            marker_ttl: Duration::from_secs(24 * 3600),
            adaptations_stream: "ai:adaptations".into(),
            adaptations_max_len: 10_000,
            threshold: 3.0,
            window: Duration::from_secs(3600),
            min_feedback: 20,
            check_every: Duration::from_secs(5),
            retention: Duration::from_secs(7 * 24 * 3600),
            max_batch: 100,
            max_wait: Duration::from_millis(50),
        }
    }
}

fn minutes_exact(d: Duration) -> bool {
    d.as_millis().is_multiple_of(u128::from(MINUTE_MS))
}

const MAX_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// The width of the default rating scale (1 to 5), kept when only one end is set.
const DEFAULT_SCALE_WIDTH: f64 = 4.0;

impl LearningOptions {
    /// `max_wait` (set or not) and an explicit `marker_ttl` bound the group's `claim_idle`
    /// (the rules in `validate`).
    pub(crate) fn needs(&self, is_set: &dyn Fn(&str) -> bool) -> Needs {
        Needs {
            claim_idle_below: is_set("marker_ttl").then_some((self.marker_ttl, "marker_ttl")),
            ..batch_wait::needs(self.max_wait, is_set)
        }
    }

    /// Options left out follow the ones set and the group's limits, one derivation per
    /// rule of `validate`, in the order the rules depend on each other.
    pub(crate) fn derive(
        &mut self,
        limits: &Limits,
        is_set: &dyn Fn(&str) -> bool,
    ) -> Vec<Derived> {
        let mut derived = Vec::new();
        let mut derive = |key: &str, from: &str| derived.push(Derived::new(key, from));
        // The scale: one end set past the default other end keeps the default's width.
        if self.rating_min.is_finite()
            && self.rating_max.is_finite()
            && self.rating_min >= self.rating_max
        {
            if is_set("rating_min") && !is_set("rating_max") {
                self.rating_max = self.rating_min + DEFAULT_SCALE_WIDTH;
                derive("rating_max", "options.rating_min");
            } else if is_set("rating_max") && !is_set("rating_min") {
                self.rating_min = self.rating_max - DEFAULT_SCALE_WIDTH;
                derive("rating_min", "options.rating_max");
            }
        }
        // The threshold: the middle of a scale that does not hold the default.
        if !is_set("threshold")
            && self.rating_min < self.rating_max
            && !(self.rating_min..=self.rating_max).contains(&self.threshold)
        {
            self.threshold = (self.rating_min + self.rating_max) / 2.0;
            let from = if is_set("rating_min") {
                "options.rating_min"
            } else {
                "options.rating_max"
            };
            derive("threshold", from);
        }
        // The window: whole minutes, within an explicit retention, covering an explicit
        // check_every.
        if !is_set("window") {
            let minute = Duration::from_millis(MINUTE_MS);
            let minutes = |d: Duration| d.as_millis() / u128::from(MINUTE_MS);
            if is_set("retention") && self.retention < self.window && self.retention >= minute {
                self.window = minute * u32::try_from(minutes(self.retention)).unwrap_or(1);
                derive("window", "options.retention");
            } else if is_set("check_every")
                && self.check_every > self.window
                && self.check_every <= MAX_WINDOW
            {
                let whole =
                    minutes(self.check_every) + u128::from(!minutes_exact(self.check_every));
                self.window = minute * u32::try_from(whole).unwrap_or(1);
                derive("window", "options.check_every");
            }
        }
        if !is_set("retention") && self.retention < self.window {
            self.retention = self.window;
            derive("retention", "options.window");
        }
        if !is_set("check_every") && self.check_every > self.window {
            self.check_every = self.window;
            derive("check_every", "options.window");
        }
        // Against the group's limits.
        if !is_set("marker_ttl") && self.marker_ttl <= limits.claim_idle {
            self.marker_ttl = limits.claim_idle.saturating_mul(2);
            derive("marker_ttl", "claim_idle");
        }
        derived.extend(batch_wait::derive(&mut self.max_wait, limits, is_set));
        derived
    }

    pub(crate) fn validate(&self, limits: &Limits) -> Vec<OptionProblem> {
        let mut problems = Vec::new();
        let mut problem = |key: &str, message: String| {
            problems.push(OptionProblem {
                key: key.to_owned(),
                message,
            })
        };
        let d = crate::duration::format;
        for (key, path) in [
            ("rating", &self.rating),
            ("thumbs", &self.thumbs),
            ("prompt", &self.prompt),
            ("response", &self.response),
            ("model", &self.model),
            ("user", &self.user),
        ] {
            if path.trim().is_empty() {
                problem(
                    key,
                    format!(
                        "is empty: name the field (or JSON path) to read, e.g. {key} = \"{key}\""
                    ),
                );
            }
        }
        if matches!(&self.prompt_id, Some(p) if p.trim().is_empty()) {
            problem(
                "prompt_id",
                "is empty: name the field holding a prompt id, or remove it to hash the prompt text".into(),
            );
        }
        if !(self.rating_min.is_finite()
            && self.rating_max.is_finite()
            && self.rating_min < self.rating_max)
        {
            problem(
                "rating_max",
                format!(
                    "the scale [{}, {}] is empty: rating_min must be below rating_max (e.g. 1 and 5)",
                    self.rating_min, self.rating_max
                ),
            );
        } else if !(self.rating_min..=self.rating_max).contains(&self.threshold) {
            problem(
                "threshold",
                format!(
                    "= {} is outside the rating scale [{}, {}]: pick a rating on the scale, e.g. 3",
                    self.threshold, self.rating_min, self.rating_max
                ),
            );
        }
        if self.marker_ttl <= limits.claim_idle {
            problem(
                "marker_ttl",
                format!(
                    "({}) must be longer than the group's claim_idle ({}), or a redelivery could find the marker gone and write a second line; e.g. marker_ttl = \"24h\"",
                    d(self.marker_ttl),
                    d(limits.claim_idle)
                ),
            );
        }
        if self.adaptations_stream.trim().is_empty() {
            problem(
                "adaptations_stream",
                "is empty: name the stream adaptation events go to, e.g. \"ai:adaptations\"".into(),
            );
        }
        if self.window < Duration::from_secs(60)
            || self.window > MAX_WINDOW
            || !self
                .window
                .as_millis()
                .is_multiple_of(u128::from(MINUTE_MS))
        {
            problem(
                "window",
                format!(
                    "({}) must be whole minutes between 1m and 24h (the window is made of per-minute buckets), e.g. \"1h\"",
                    d(self.window)
                ),
            );
        } else if self.retention < self.window {
            problem(
                "retention",
                format!(
                    "({}) is shorter than window ({}): the buckets of the window would expire before they are read",
                    d(self.retention),
                    d(self.window)
                ),
            );
        }
        if self.min_feedback == 0 {
            problem(
                "min_feedback",
                "must be at least 1: a model with no ratings has no average".into(),
            );
        }
        if self.check_every < Duration::from_millis(100) || self.check_every > self.window {
            problem(
                "check_every",
                format!(
                    "({}) must be between 100ms and window ({}), e.g. \"5s\"",
                    d(self.check_every),
                    d(self.window)
                ),
            );
        }
        if !(1..=10_000).contains(&self.max_batch) {
            problem(
                "max_batch",
                format!("= {}: must be between 1 and 10000", self.max_batch),
            );
        }
        problems.extend(batch_wait::check(self.max_wait, limits));
        problems
    }

    /// Nothing secret in these options.
    pub(crate) fn redacted(&self) -> Self {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learning::tests::limits;

    #[test]
    fn defaults_are_valid_and_problems_name_their_key() {
        assert!(LearningOptions::default().validate(&limits()).is_empty());
        let bad = LearningOptions {
            rating: "".into(),
            threshold: 9.0,
            window: Duration::from_secs(90),
            min_feedback: 0,
            max_wait: Duration::from_secs(100),
            marker_ttl: Duration::from_secs(60),
            ..Default::default()
        };
        let keys: Vec<String> = bad.validate(&limits()).into_iter().map(|p| p.key).collect();
        assert_eq!(
            keys,
            [
                "rating",
                "threshold",
                "marker_ttl",
                "window",
                "min_feedback",
                "max_wait"
            ]
        );
        let short = LearningOptions {
            retention: Duration::from_secs(60),
            ..Default::default()
        };
        assert_eq!(short.validate(&limits())[0].key, "retention");
    }

    #[test]
    fn options_parse_from_toml_with_defaults() {
        let o: LearningOptions = toml_like(r#"{"threshold": 2.5, "window": "10m"}"#);
        assert_eq!(o.threshold, 2.5);
        assert_eq!(o.window, Duration::from_secs(600));
        assert_eq!(o.rating, "rating");
        assert_eq!(o.adaptations_stream, "ai:adaptations");
        assert!(
            serde_json::from_str::<LearningOptions>(r#"{"ratings": "x"}"#).is_err(),
            "unknown keys are errors"
        );
    }

    fn toml_like(json: &str) -> LearningOptions {
        serde_json::from_str(json).unwrap()
    }
}
